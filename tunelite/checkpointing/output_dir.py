"""An output folder belongs to one run, so that no run replaces, prunes or mixes its logs with another's.

A run takes its folder before it writes anything there. It locks it (`fcntl.flock` on
`.tunelite.lock`, with the holder's process id, host and start time written inside), so a second
live run is refused naming the first; a lock whose holder is gone is taken over. Holding the
lock, it deletes the temporaries of writes a dead run never finished (a live run's are never
stale, since no live run holds the lock then). It refuses to start over another run's
checkpoints or logs unless it resumes that run, or is told to move it aside
(`overwrite_output_dir: True`, into `.previous/<run id>/`; nothing is deleted). Its id, fresh for
a new run and carried over by a resumed one, is written into each checkpoint's manifest, and
pruning deletes only the run's own checkpoints.
"""

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tunelite.checkpointing.atomic import folder_run_id, remove_stale_temporaries
from tunelite.checkpointing.state import checkpoint_folders, find_resume_folder
from tunelite.errors import CheckpointError, ConfigError, ResourceError
from tunelite.runtime.ranks import broadcast_object, is_main_process

LOCK_FILE = ".tunelite.lock"
PREVIOUS = ".previous"
LOGS = "logs"


@dataclass(frozen=True)
class RunFolder:
    """The output folder a run holds: the id its checkpoints carry, and the checkpoint it continues
    from (None: it starts at step 0)."""

    path: Path
    run_id: str
    resume: Path | None


@contextlib.contextmanager
def claim_output_dir(output_dir: Path, resume_from_checkpoint: bool | str | None, overwrite: bool
                     ) -> Iterator[RunFolder]:
    """Holds `output_dir` for the run in the block, or refuses, naming why, before anything is
    written. Distributed, rank 0 locks the folder and decides, and every rank acts on its decision,
    so all of them refuse together."""
    lock, run, failure = None, None, None
    created = False
    if is_main_process():
        created = not Path(output_dir).exists()
        try:
            lock = _lock(Path(output_dir))
            run = _take(Path(output_dir), resume_from_checkpoint, overwrite)
        except Exception as error:  # the other ranks wait for word from rank 0 whatever went wrong
            failure = error
    run, message = broadcast_object((run, None if failure is None else str(failure)))
    try:
        if failure is not None:
            raise failure
        if message is not None:
            raise CheckpointError(message)
        yield run
    finally:
        if lock is not None:
            _unlock(lock)
            if created:
                _remove_if_unused(Path(output_dir))


def _remove_if_unused(output_dir: Path) -> None:
    """Removes a folder this run created and left holding only its lock file: a run refused
    before it wrote anything (bad data, a bad checkpoint) leaves nothing behind."""
    with contextlib.suppress(OSError):
        if [entry.name for entry in output_dir.iterdir()] == [LOCK_FILE]:
            (output_dir / LOCK_FILE).unlink()
            output_dir.rmdir()


def _lock(output_dir: Path) -> int:
    """The locked descriptor of output_dir's lock file, the holder's particulars written in it."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ResourceError(f"output_dir {output_dir} cannot be created: {_cause(error)}; make its parent writable "
                            "or set output_dir to another folder") from error
    path = output_dir / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise ResourceError(f"output_dir {output_dir} cannot be written: {_cause(error)}; make it writable or "
                                "set output_dir to another folder") from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder, inode = _holder(fd), os.fstat(fd).st_ino
            os.close(fd)
            if holder is None or not _gone(holder):
                raise ResourceError(f"output_dir {output_dir} is in use by another run: {_describe(holder)}; wait "
                                    "for it to end, or set output_dir to another folder") from None
            # Held by a leftover of a run that is gone (a forked worker keeps the descriptor): leave
            # that file to it, and lock a new one.
            _say_taken_over(output_dir, holder)
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == inode:
                    os.unlink(path)
            continue
        if not _still_at(fd, path):  # taken over while we waited: lock the file now there
            os.close(fd)
            continue
        holder = _holder(fd)
        if holder is not None:  # its holder ended without letting go: killed, or its machine went down
            _say_taken_over(output_dir, holder)
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(mine).encode(), 0)
        return fd


def _say_taken_over(output_dir: Path, holder: dict[str, Any]) -> None:
    print(f"output_dir {output_dir} was held by {_describe(holder)}, which is gone; taking the folder over")


def _unlock(fd: int) -> None:
    """Lets go of the folder; the empty file left behind names no one."""
    os.ftruncate(fd, 0)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _holder(fd: int) -> dict[str, Any] | None:
    """The particulars a lock file holds (None: empty, or still being written)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
    except ValueError:
        return None
    if isinstance(holder, dict) and {"pid", "host", "started"} <= holder.keys() and isinstance(holder["pid"], int):
        return holder
    return None


def _gone(holder: dict[str, Any]) -> bool:
    """Whether the process a lock names has ended: known only for a process of this host."""
    if holder["host"] != socket.gethostname():
        return False
    try:
        os.kill(holder["pid"], 0)  # signal 0: asks whether the process exists, sends nothing
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, another user's
        pass
    return False


def _still_at(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "its lock names no process yet"
    return f"process {holder['pid']} on {holder['host']} (started {holder['started']})"


def _cause(error: OSError) -> str:
    return f"{error.strerror} [{errno.errorcode[error.errno]}]" if error.errno in errno.errorcode else str(error)


def _take(output_dir: Path, resume_from_checkpoint: bool | str | None, overwrite: bool) -> RunFolder:
    """What the run holding the folder may do there, decided before it writes anything."""
    remove_stale_temporaries(output_dir)
    if resume_from_checkpoint:
        if overwrite:
            raise ConfigError("resume_from_checkpoint continues the run in output_dir and overwrite_output_dir: True "
                              "moves it aside: set only one of them")
        resume = find_resume_folder(resume_from_checkpoint, output_dir)
        run_id = (folder_run_id(resume) if resume else None) or uuid.uuid4().hex
        others = [f.name for f in checkpoint_folders(output_dir) if folder_run_id(f) not in (run_id, None)]
        if others:
            raise ConfigError(f"output_dir {output_dir} holds checkpoints of another run than {resume} "
                              f"({', '.join(others)}); resume from one of those, or set output_dir to another folder")
        return RunFolder(output_dir, run_id, resume)
    previous = previous_run(output_dir)
    if previous and not overwrite:
        raise ConfigError(
            f"output_dir {output_dir} holds another run ({', '.join(previous)}); continue it with "
            "resume_from_checkpoint=True, move it aside into "
            f"{output_dir / PREVIOUS}/ with overwrite_output_dir=True, or set output_dir to another folder"
        )
    if previous:
        moved = _move_aside(output_dir, previous)
        print(f"overwrite_output_dir: moved the previous run ({', '.join(previous)}) to {moved}")
    return RunFolder(output_dir, uuid.uuid4().hex, None)


def previous_run(output_dir: Path) -> list[str]:
    """What a run left in output_dir: its checkpoints, and its logs once they hold a logged step."""
    found = [folder.name for folder in checkpoint_folders(output_dir)]
    if any(path.stat().st_size for path in (output_dir / LOGS).glob("*.jsonl")):
        found.append(LOGS)
    return found


def _move_aside(output_dir: Path, names: list[str]) -> Path:
    """Moves a previous run's checkpoints and logs into output_dir/.previous/<its run id>/."""
    folders = checkpoint_folders(output_dir)
    name = (folder_run_id(folders[-1]) if folders else None) or f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    destination = output_dir / PREVIOUS / name
    suffix = 1
    while destination.exists():
        suffix += 1
        destination = output_dir / PREVIOUS / f"{name}-{suffix}"
    destination.mkdir(parents=True)
    for entry in names:
        os.rename(output_dir / entry, destination / entry)
    return destination
