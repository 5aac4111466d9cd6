"""Atomic, verifiable checkpoint folders: a folder that exists is complete, whenever the run died.

Everything is written into a hidden temporary sibling, a manifest of every file with its size and
sha256 (and the id of the run that wrote it) is added, each file is fsynced, then the folder is
renamed into place and the parent directory fsynced so the rename itself survives a crash.
Loading checks the manifest, so a file deleted, truncated or altered afterwards (one flipped bit
of a float) is named instead of being trained on, and saved again under a fresh manifest.
"""

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

from tunelite.errors import CheckpointError
from tunelite.files import read_json

TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _fsync_and_hash(path: Path) -> dict[str, Any]:
    """Flushes a file just written to the disk and returns its manifest entry, read in the same
    pass, in pieces, from the page cache the write left it in (the writers, safetensors and
    torch.save, take a path, not a stream to hash as they write)."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        os.fsync(f.fileno())
        return {"size": os.fstat(f.fileno()).st_size, "sha256": digest}


def _write_manifest(folder: Path, run_id: str | None) -> None:
    files = {str(p.relative_to(folder)): _fsync_and_hash(p) for p in _files(folder)}
    with open(folder / MANIFEST, "w") as f:
        json.dump({"run_id": run_id, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for sub in sorted({p.parent for p in _files(folder)} | {folder}):
        fsync_dir(sub)


def _temporary_name(final: Path, kind: str = "") -> Path:
    """A hidden sibling of `final` that checkpoint_folders never lists and remove_stale_temporaries deletes."""
    return final.parent / f"{TMP_PREFIX}{kind}{final.name}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_folder(final: Path, run_id: str | None = None) -> Iterator[Path]:
    """Yields a temporary folder to fill; on success it replaces `final` in one rename. `run_id`,
    recorded in the manifest, says which run wrote it (pruning deletes only its own run's)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(final)
    tmp.mkdir()
    try:
        yield tmp
        _write_manifest(tmp, run_id)
        if final.exists():
            old = _temporary_name(final, "old-")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a folder atomic_folder wrote: {"run_id": ..., "files": {name: {"size", "sha256"}}}."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {folder} was not written by tunelite or is incomplete")
    manifest = read_json(path, "checkpoint manifest", CheckpointError)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(e, dict) and set(e) == {"size", "sha256"}
                                              for e in files.values()):
        raise CheckpointError(f"{path} does not list each file with its size and sha256 (written by an older "
                              "tunelite, or altered); resume from an earlier step_* folder")
    return manifest


def verify_folder(folder: Path, checksums: bool = True) -> None:
    """Raises naming the first file that is missing, or whose size or (with `checksums`) sha256
    differs from the manifest. Without checksums it reads no file: a quick check that the folder
    is whole, before the files are read and checked one by one (verify_written_files)."""
    folder = Path(folder)
    _verify_entries(folder, read_manifest(folder)["files"], checksums)


def verify_written_files(path: Path) -> None:
    """Checks a file or folder that a folder written by atomic_folder holds (a checkpoint's
    recipe_state.pt, adapter/ or model/, or the checkpoint itself) against that folder's manifest,
    before it is loaded. A path with no manifest in it or beside it was not written by tunelite
    (a base model, an adapter from elsewhere) and passes: there is nothing to check it against."""
    path = Path(path)
    folder = next((f for f in (path, path.parent) if (f / MANIFEST).is_file()), None)
    if folder is None:
        return
    files = read_manifest(folder)["files"]
    if folder != path:
        prefix = path.name
        files = {name: entry for name, entry in files.items() if name == prefix or name.startswith(prefix + "/")}
    _verify_entries(folder, files, checksums=True)


def _verify_entries(folder: Path, files: dict[str, dict[str, Any]], checksums: bool) -> None:
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing from the checkpoint; resume from an earlier step_* folder")
        if path.stat().st_size != entry["size"]:
            raise CheckpointError(
                f"{path} is {path.stat().st_size} bytes but was written with {entry['size']}: it is truncated or "
                "altered; resume from an earlier step_* folder"
            )
        if checksums:
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            if digest != entry["sha256"]:
                raise CheckpointError(
                    f"{path} does not match its sha256 in {folder / MANIFEST}: it was altered or damaged after "
                    "tunelite wrote it (a disk error, an edit) and is not loaded; resume from an earlier step_* "
                    "folder, or restore the file from a copy"
                )


def remove_folder(folder: Path) -> None:
    """Deletes a folder written by atomic_folder; it is renamed to a temporary name first, so a
    deletion cut short leaves a leftover for remove_stale_temporaries, never a half-deleted
    folder under a name that resuming would trust."""
    doomed = _temporary_name(Path(folder), "removed-")
    os.replace(folder, doomed)
    shutil.rmtree(doomed)


def folder_bytes(folder: Path) -> int:
    """The size of a folder written by atomic_folder, read from its manifest rather than by a walk."""
    files = read_manifest(folder)["files"]
    return (Path(folder) / MANIFEST).stat().st_size + sum(entry["size"] for entry in files.values())


def folder_run_id(folder: Path) -> str | None:
    """The id of the run that wrote a checkpoint folder (None: not recorded, or no manifest)."""
    try:
        return read_manifest(folder).get("run_id")
    except CheckpointError:
        return None


def remove_stale_temporaries(parent: Path) -> None:
    """Deletes the leftovers of writes a killed run never finished. Only the run holding the
    folder's lock calls it (tunelite.checkpointing.output_dir): a live run's are not stale."""
    for path in Path(parent).glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)
