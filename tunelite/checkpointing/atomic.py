"""Atomic, verifiable checkpoint folders: a folder that exists is complete, whenever the run died.

Everything is written into a hidden temporary sibling, a manifest of every file and its size is
added, each file is fsynced, then the folder is renamed into place and the parent directory
fsynced so the rename itself survives a crash. Loading checks the manifest, so a file deleted
or truncated afterwards is named instead of failing somewhere inside torch.
"""

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from tunelite.errors import CheckpointError

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


def _fsync_tree(folder: Path) -> None:
    for path in _files(folder) + [folder / MANIFEST]:
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    for sub in sorted({p.parent for p in _files(folder)} | {folder}):
        fsync_dir(sub)


def _temporary_name(final: Path, kind: str = "") -> Path:
    """A hidden sibling of `final` that checkpoint_folders never lists and remove_stale_temporaries deletes."""
    return final.parent / f"{TMP_PREFIX}{kind}{final.name}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """Yields a temporary folder to fill; on success it replaces `final` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(final)
    tmp.mkdir()
    try:
        yield tmp
        manifest = {str(p.relative_to(tmp)): p.stat().st_size for p in _files(tmp)}
        (tmp / MANIFEST).write_text(json.dumps({"files": manifest}, indent=1))
        _fsync_tree(tmp)
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


def verify_folder(folder: Path) -> None:
    """Raises naming the first file that is missing or whose size differs from the manifest."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path} is missing: {folder} was not written by tunelite or is incomplete")
    for name, size in json.loads(manifest_path.read_text())["files"].items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing from the checkpoint; resume from an earlier step_* folder")
        if path.stat().st_size != size:
            raise CheckpointError(
                f"{path} is {path.stat().st_size} bytes but was written with {size}: it is truncated or altered; "
                "resume from an earlier step_* folder"
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
    manifest = Path(folder) / MANIFEST
    return manifest.stat().st_size + sum(json.loads(manifest.read_text())["files"].values())


def remove_stale_temporaries(parent: Path) -> None:
    """Deletes the leftovers of writes a killed run never finished."""
    for path in Path(parent).glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)
