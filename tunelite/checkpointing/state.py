"""Everything besides weights that a resumed run needs to continue as if never stopped.

`recipe_state.pt` holds the optimizer and scheduler states, the RNG states, the position in
the data, and a fingerprint of the settings that decide which batches come next. It is read
with `torch.load(weights_only=True)`, which unpickles tensors and plain containers only.
"""

import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from tunelite.checkpointing.atomic import atomic_folder, remove_stale_temporaries, verify_folder
from tunelite.errors import CheckpointError

STATE_FILE = "recipe_state.pt"
_STEP_FOLDER = re.compile(r"^step_(\d+)$")


@dataclass
class Progress:
    """Where training stands: optimizer steps done, and the epoch and step within it of the next one."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0

    def advanced(self, steps_per_epoch: int) -> "Progress":
        if self.step_in_epoch + 1 == steps_per_epoch:
            return Progress(self.step + 1, self.epoch + 1, 0)
        return Progress(self.step + 1, self.epoch, self.step_in_epoch + 1)


def checkpoint_folders(output_dir: Path) -> list[Path]:
    """Complete `step_N` folders, oldest first; half-written ones only ever exist under a temporary name."""
    folders = [p for p in Path(output_dir).glob("step_*") if p.is_dir() and _STEP_FOLDER.match(p.name)]
    return sorted(folders, key=lambda p: int(_STEP_FOLDER.match(p.name).group(1)))


def find_resume_folder(resume_from_checkpoint: bool | str | None, output_dir: Path) -> Path | None:
    """`True`: the newest checkpoint in output_dir (None if there is none yet); a path: that folder."""
    if not resume_from_checkpoint:
        return None
    remove_stale_temporaries(Path(output_dir))
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
    verify_folder(folder)
    if not (folder / STATE_FILE).is_file():
        raise CheckpointError(f"{folder / STATE_FILE} is missing: {folder} is an export, not a resumable checkpoint")
    return folder


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
    folder: Path,
    optimizer: Any,
    scheduler: Any,
    progress: Progress,
    fingerprint: dict[str, Any],
) -> None:
    state = {
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "progress": asdict(progress),
        "rng": rng_states(),
        "fingerprint": fingerprint,
    }
    torch.save(state, Path(folder) / STATE_FILE)


def load_training_state(
    folder: Path,
    optimizer: Any,
    scheduler: Any,
    fingerprint: dict[str, Any],
) -> Progress:
    """Restores optimizer, scheduler and RNG; refuses when the run's data settings changed, since
    the resumed run would then silently train on other batches than the original."""
    path = Path(folder) / STATE_FILE
    state = torch.load(path, weights_only=True, map_location="cpu")
    changed = [
        f"{key}: checkpoint {state['fingerprint'].get(key)!r}, config {value!r}"
        for key, value in fingerprint.items() if state["fingerprint"].get(key) != value
    ]
    if changed:
        raise CheckpointError(
            f"{path} was written by a run with other settings ({'; '.join(changed)}); resuming would not "
            "reproduce it. Restore those settings, or set a new output_dir to start afresh."
        )
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: the optimizer state does not fit this model's trainable parameters ({e})") from e
    scheduler.load_state_dict(state["lr_scheduler"])
    set_rng_states(state["rng"])
    return Progress(**state["progress"])


def save_checkpoint(
    output_dir: Path,
    progress: Progress,
    write_weights: Callable[[Path], None],
    optimizer: Any,
    scheduler: Any,
    fingerprint: dict[str, Any],
    keep_last_n: int | None,
) -> Path:
    """Writes `output_dir/step_N/` atomically: the recipe's weights (what makes it LoRA or full)
    plus the training state, then drops checkpoints beyond `keep_last_n`."""
    final = Path(output_dir) / f"step_{progress.step}"
    with atomic_folder(final) as folder:
        write_weights(folder)
        save_training_state(folder, optimizer, scheduler, progress, fingerprint)
    prune_checkpoints(output_dir, keep_last_n)
    return final


def prune_checkpoints(output_dir: Path, keep_last_n: int | None) -> None:
    """Deletes all but the newest `keep_last_n` checkpoints (None keeps every one)."""
    if not keep_last_n:
        return
    for folder in checkpoint_folders(output_dir)[:-keep_last_n]:
        shutil.rmtree(folder)
