"""Everything besides weights that a resumed run needs to continue as if never stopped.

`recipe_state.pt` holds the optimizer and scheduler states, the RNG states, the position in
the data and the recent losses, a fingerprint of the settings that decide which batches come
next (a resumed run must keep them), and the settings a resumed run may change (learning rate,
schedule, epochs, ...: each change is applied and said). It is read with
`torch.load(weights_only=True)`, which unpickles tensors and plain containers only.
"""

import contextlib
import errno
import math
import os
import random
import re
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from omegaconf import OmegaConf

from tunelite.checkpointing.atomic import (
    atomic_folder,
    folder_bytes,
    folder_run_id,
    remove_folder,
    verify_folder,
    verify_written_files,
)
from tunelite.runtime.ranks import (
    barrier,
    broadcast_object,
    gather_objects,
    get_rank,
    is_distributed,
    is_main_process,
)
from tunelite.errors import CheckpointError, ResourceError

STATE_FILE = "recipe_state.pt"
_STEP_FOLDER = re.compile(r"^step_(\d+)$")
# torch.save reports a full disk with no errno; a write of it that fails while less than this is
# free is taken for what it then almost surely is.
_FULL_DISK_BYTES = 1 << 20
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
# The finite step losses a run keeps (tunelite.training.divergence reads them): enough to find where
# a climb that ends a run began, however many steps it took.
LOSS_HISTORY = 100


@dataclass
class Progress:
    """Where training stands: optimizer steps done, and the epoch and step within it of the next one;
    how many steps were skipped for a non-finite loss; the first step's loss and the recent finite
    ones as [step, loss] pairs. A resumed run keeps all of it, so it decides as the run it continues
    would have."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    skipped_steps: int = 0
    first_loss: float | None = None
    losses: list[list[float]] = field(default_factory=list)

    def advanced(self, steps_per_epoch: int, loss: torch.Tensor) -> "Progress":
        """The progress after the step in progress, whose loss (summed over its micro-batches) was `loss`."""
        value = loss.item()
        recorded = {}
        if math.isfinite(value):
            recorded = {"first_loss": value if self.first_loss is None else self.first_loss,
                        "losses": [*self.losses, [self.step + 1, value]][-LOSS_HISTORY:]}
        if self.step_in_epoch + 1 == steps_per_epoch:
            return replace(self, step=self.step + 1, epoch=self.epoch + 1, step_in_epoch=0, **recorded)
        return replace(self, step=self.step + 1, step_in_epoch=self.step_in_epoch + 1, **recorded)


def run_fingerprint(
    model: str, dataset_size: int, batch_size: int, gradient_accumulation_steps: int, shuffle: bool, seed: int,
    world_size: int = 1,
) -> dict[str, Any]:
    """What decides which batches come next (and what they train): a resumed run must agree on all of
    it, or it would silently train on other batches than the run it continues."""
    return {"model": model, "dataset_size": dataset_size, "batch_size": batch_size,
            "gradient_accumulation_steps": gradient_accumulation_steps, "shuffle": shuffle, "seed": seed,
            "world_size": world_size}


def flat_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings as `{"optimizer.lr": 0.003, "epochs": 3, ...}`, plain values, as the recipe state keeps them."""
    plain = OmegaConf.to_container(OmegaConf.create(dict(settings)), resolve=True)

    def flatten(tree: dict[str, Any], prefix: str) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return flat

    return flatten(plain, "")


def checkpoint_folders(output_dir: Path) -> list[Path]:
    """Complete `step_N` folders, oldest first; half-written ones only ever exist under a temporary name."""
    folders = [p for p in Path(output_dir).glob("step_*") if p.is_dir() and _STEP_FOLDER.match(p.name)]
    return sorted(folders, key=checkpoint_step)


def checkpoint_step(folder: Path) -> int:
    """N of a `step_N` checkpoint folder: the optimizer steps its weights have taken."""
    return int(_STEP_FOLDER.match(Path(folder).name).group(1))


def find_resume_folder(resume_from_checkpoint: bool | str | None, output_dir: Path) -> Path | None:
    """`True`: the newest checkpoint in output_dir (None if there is none yet); a path: that folder."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint is True:
        folders = checkpoint_folders(output_dir)
        if not folders:
            print(f"resume_from_checkpoint: no checkpoint in {output_dir} yet; starting from step 0")
            return None
        folder = folders[-1]
    else:
        folder = Path(resume_from_checkpoint)
        if not folder.is_dir():
            raise CheckpointError(f"resume_from_checkpoint: {folder} is not a folder; give a step_N folder or True")
    verify_folder(folder, checksums=False)  # whole; each file's checksum is checked as it is loaded
    if not (folder / STATE_FILE).is_file():
        raise CheckpointError(f"{folder / STATE_FILE} is missing: {folder} is an export, not a resumable checkpoint")
    return folder


def checkpoint_lacks(folder: Path, subfolders: Sequence[str]) -> bool:
    """Whether a checkpoint folder is missing, or lacks one of `subfolders` (adapter, model). Rank 0,
    which writes the checkpoints, looks, and every rank gets its answer, so all of them save or none."""
    lacks = not all((Path(folder) / name).is_dir() for name in subfolders) if is_main_process() else None
    return broadcast_object(lacks)


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_training_state(
    folder: Path | None,
    optimizer: Any,
    scheduler: Any,
    progress: Progress,
    fingerprint: dict[str, Any],
    settings: Mapping[str, Any],
) -> None:
    """Writes recipe_state.pt into `folder`. Distributed, every rank calls it (the optimizer state and
    the RNG states are gathered) and only rank 0, the one given a folder, writes."""
    state = {
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "progress": asdict(progress),
        "rng": rng_states(),
        "fingerprint": fingerprint,
        "settings": flat_settings(settings),
    }
    if is_distributed():
        # Each rank draws its own dropout masks (its batches differ), so each resumes its own RNG.
        state["rng_by_rank"] = gather_objects(state["rng"])
    if folder is not None:
        torch.save(state, Path(folder) / STATE_FILE)


def load_training_state(
    folder: Path,
    optimizer: Any,
    scheduler: Any,
    fingerprint: dict[str, Any],
    settings: Mapping[str, Any],
    steps_per_epoch: int,
) -> Progress:
    """Restores optimizer, scheduler, RNG and progress. Refuses when the run's data settings changed,
    since the resumed run would then silently train on other batches than the original, or its
    optimizer or LR schedule is another component, whose state would not fit. Any other change of
    `settings` is applied and said: the optimizer's settings (the learning rate among them) are the
    config's, not those its loaded state brings back, and the schedule and the step count run to
    the new total; the run continues at its step count, cut into epochs of `steps_per_epoch`."""
    path = Path(folder) / STATE_FILE
    verify_written_files(path)
    state = torch.load(path, weights_only=True, map_location="cpu")
    saved, current = state.get("settings", {}), flat_settings(settings)
    changed = {key: (saved.get(key), current.get(key)) for key in saved.keys() | current.keys()
               if saved.get(key) != current.get(key)}
    refused = [f"{key}: checkpoint {state['fingerprint'].get(key)!r}, config {value!r}"
               for key, value in fingerprint.items() if state["fingerprint"].get(key) != value]
    refused += [f"{key}: checkpoint {before!r}, config {after!r}"
                for key, (before, after) in sorted(changed.items()) if key.endswith("._component_")]
    if refused:
        raise CheckpointError(
            f"{path} was written by a run with other settings ({'; '.join(refused)}); resuming would not "
            "reproduce it. Restore those settings, or set a new output_dir to start afresh."
        )
    # Loading an optimizer's state brings back the hyperparameters it was saved with: keep the config's.
    configured = [{key: value for key, value in group.items() if key not in ("params", "lr", "initial_lr")}
                  for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: the optimizer state does not fit this model's trainable parameters ({e})") from e
    for group, values in zip(optimizer.param_groups, configured):
        group.update(values)
    # The schedule's position from the checkpoint, its learning rate from the config: it sets the lr.
    scheduler.load_state_dict({**state["lr_scheduler"], "base_lrs": scheduler.state_dict()["base_lrs"]})
    set_rng_states(state["rng_by_rank"][get_rank()] if "rng_by_rank" in state else state["rng"])
    progress = Progress(**state["progress"])
    if changed and is_main_process():
        print(f"resumed with changed settings, applied: "
              f"{'; '.join(f'{key}: {before} -> {after}' for key, (before, after) in sorted(changed.items()))}")
    return replace(progress, epoch=progress.step // steps_per_epoch, step_in_epoch=progress.step % steps_per_epoch)


def save_checkpoint(
    output_dir: Path,
    progress: Progress,
    write_weights: Callable[[Path | None], None],
    optimizer: Any,
    scheduler: Any,
    fingerprint: dict[str, Any],
    settings: Mapping[str, Any],
    keep_last_n: int | None,
    run_id: str,
) -> Path:
    """Writes `output_dir/step_N/` atomically: the recipe's weights (what makes it LoRA or full)
    plus the training state, its manifest naming `run_id`, then drops this run's checkpoints beyond
    `keep_last_n`. Pruning waits until the new folder is complete, so while it is written the
    previous one is still there, whatever `keep_last_n` says. Distributed, every rank calls it and
    rank 0 alone writes (_checkpoint_folder).

    A disk too small for it, or a folder that cannot be written (read-only, no permission), raises
    ResourceError naming the folder and the cause: before anything is written when the shortage
    shows in advance (see expected_checkpoint_bytes), else when the write fails, with no
    temporary folder left behind."""
    final = Path(output_dir) / f"step_{progress.step}"
    ensure_free_space(final, expected_checkpoint_bytes(output_dir, optimizer))
    try:
        with _checkpoint_folder(final, run_id) as folder:
            write_weights(folder)
            save_training_state(folder, optimizer, scheduler, progress, fingerprint, settings)
    except OSError as error:
        raise ResourceError(_write_failure(final, error)) from error
    if is_main_process():
        prune_checkpoints(output_dir, keep_last_n, run_id)
    barrier()  # no rank runs ahead of a checkpoint that is not complete yet
    return final


@contextlib.contextmanager
def _checkpoint_folder(final: Path, run_id: str) -> Iterator[Path | None]:
    """The atomic folder to fill, on rank 0 or the only process. Other ranks get None: they take part
    in gathering the weights and state that rank 0 writes, and write nothing themselves."""
    if not is_main_process():
        yield None
        return
    with atomic_folder(final, run_id) as folder, _writer_errors_as_os_errors(folder):
        yield folder


def prune_checkpoints(output_dir: Path, keep_last_n: int | None, run_id: str) -> None:
    """Deletes all but the newest `keep_last_n` checkpoints of the run `run_id` (None keeps every
    one); another run's, whose steps are numbered on their own, are never this run's to delete."""
    if not keep_last_n:
        return
    ours = [folder for folder in checkpoint_folders(output_dir) if folder_run_id(folder) == run_id]
    for folder in ours[:-keep_last_n]:
        remove_folder(folder)


def expected_checkpoint_bytes(output_dir: Path, optimizer: Any) -> int:
    """What the next checkpoint will take on disk, estimated simply: the newest checkpoint's size
    when there is one (the same tensors again), else the trained weights plus the optimizer state.
    An export that only the last checkpoint holds (a merged model) is not foreseen; a disk it
    fills is reported when its write fails."""
    folders = checkpoint_folders(output_dir)
    if folders:
        return folder_bytes(folders[-1])
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return _tensor_bytes(params) + _tensor_bytes(optimizer.state_dict())


def _tensor_bytes(tree: Any) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.nbytes
    if isinstance(tree, dict):
        return sum(_tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_tensor_bytes(v) for v in tree)
    return 0


def free_bytes(path: Path) -> int:
    """Free space for `path`, measured on its nearest existing ancestor (the output folder may not exist yet)."""
    existing = next(p for p in [Path(path), *Path(path).parents] if p.exists())
    return shutil.disk_usage(existing).free


def ensure_free_space(final: Path, needed: int) -> None:
    free = free_bytes(final)
    if free < needed:
        raise ResourceError(
            f"the checkpoint {final} needs about {_size(needed)} but its disk has {_size(free)} free; free some "
            f"space or set output_dir to another disk. {newest_checkpoint_note(final.parent)}"
        )


@contextlib.contextmanager
def _writer_errors_as_os_errors(folder: Path) -> Iterator[None]:
    """Gives the checkpoint writers' storage failures back the errno they hide: safetensors raises
    a SafetensorError whose message ends "(os error 28)" (and deletes its partial file), torch.save
    a RuntimeError ("unexpected pos ...") that says nothing, taken for a full disk when the disk
    is then full. The original stays chained, for the traceback."""
    try:
        yield
    except OSError:
        raise
    except Exception as error:
        rust_error = _RUST_OS_ERROR.search(str(error))
        if rust_error:
            code = int(rust_error[1])
        elif free_bytes(folder) < _FULL_DISK_BYTES:
            code = errno.ENOSPC
        else:
            raise
        raise OSError(code, os.strerror(code)) from error


def _write_failure(final: Path, error: OSError) -> str:
    cause = f"{error.strerror} [{errno.errorcode[error.errno]}]" if error.errno in errno.errorcode else str(error)
    if error.filename and final.parent not in Path(error.filename).parents:
        cause += f" at {error.filename}"  # not one of the checkpoint's own files: where it failed matters
    fix = ("free some space or set output_dir to another disk" if error.errno in (errno.ENOSPC, errno.EDQUOT)
           else f"make {final.parent} writable or set output_dir to another folder")
    return (f"could not write the checkpoint {final}: {cause}; {fix}. Nothing of it was kept. "
            f"{newest_checkpoint_note(final.parent)}")


def newest_checkpoint_note(output_dir: Path) -> str:
    """The sentence an error ending a run closes with: where it can be resumed from."""
    folders = checkpoint_folders(output_dir) if output_dir.is_dir() else []
    if not folders:
        return "There is no complete checkpoint yet."
    return f"The newest complete checkpoint is {folders[-1]}; resume_from_checkpoint=True continues from it."


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"
