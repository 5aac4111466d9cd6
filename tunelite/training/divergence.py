"""A loss far above its recent history: a diverging run, stopped before the optimizer takes the step.

A NaN often comes only after the weights have blown up over a few finite steps (at lr 1e6 the
adapters reach 2e5 while the loss is still a number), and every checkpoint written meanwhile holds
ruined weights. So a step whose loss is above `divergence_factor` times the median of the last
MEDIAN_OF finite losses, and above the first step's loss by more than MARGIN, is taken for
divergence. The second condition spares a run late in training, whose loss can be far below
where it began: ten times a tiny median is still a low loss.

Where the run went wrong is where its loss began to climb: the first of the steps leading up to
the stop each of whose losses stood above the median of the MEDIAN_OF before it. That loss was
computed with the weights of the step before it, so the checkpoint to go back to is the newest
one from before those weights. The history lives in the recipe state's Progress, so a resumed run
decides as the run it continues would have.
"""

import statistics
from pathlib import Path

import torch

from tunelite.checkpointing.state import Progress, checkpoint_folders, checkpoint_step

MEDIAN_OF = 20
# In the loss's own units: nats per token for cross-entropy, which is how far above its first
# step's loss a run must be (its perplexity e times the untrained model's) to count as diverging.
MARGIN = 1.0


def _median(progress: Progress) -> float:
    return statistics.median(loss for _, loss in progress.losses[-MEDIAN_OF:])


def divergence_limit(progress: Progress, factor: float | None) -> float | None:
    """The loss above which the step in progress counts as diverging: `factor` times the recent
    median and the first step's loss + MARGIN, whichever is higher (`factor` None: no limit). The
    first step has no history to compare with."""
    if factor is None or not progress.losses:
        return None
    return max(factor * _median(progress), progress.first_loss + MARGIN)


def diverged(progress: Progress, loss: torch.Tensor, factor: float | None) -> bool:
    """Whether the step in progress's finite `loss` is far above the run's recent losses."""
    limit = divergence_limit(progress, factor)
    return limit is not None and loss.item() > limit


def divergence_message(progress: Progress, loss: torch.Tensor, factor: float) -> str:
    """Why the step in progress counts as diverging, in numbers."""
    recent = min(len(progress.losses), MEDIAN_OF)
    return (f"the loss is {loss.item():.4g}, more than divergence_factor ({factor}) x the median "
            f"({_median(progress):.4g}) of the last {recent} steps' losses and more than the first step's "
            f"({progress.first_loss:.4g}) + {MARGIN}: the run is diverging")


def climb_start(progress: Progress) -> int:
    """The step at which the loss began the climb leading to the step in progress: the first of the
    steps before it each of whose losses stood above the median of the MEDIAN_OF before it (the step
    in progress itself when the one before was in its band)."""
    start = progress.step + 1
    for i in range(len(progress.losses) - 1, 0, -1):
        step, loss = progress.losses[i]
        if loss <= statistics.median(value for _, value in progress.losses[max(0, i - MEDIAN_OF):i]):
            break
        start = int(step)
    return start


def resume_note(progress: Progress, output_dir: Path) -> str:
    """The sentence a message stopping a run for a bad step closes with: the checkpoint to resume
    from, the newest whose weights gave a loss still in its band (the checkpoint after step k holds
    the weights step k + 1's loss was computed with), and the checkpoints written since, whose
    weights are suspect."""
    start = climb_start(progress)
    folders = checkpoint_folders(output_dir) if output_dir.is_dir() else []
    if not folders:
        return "There is no complete checkpoint yet."
    sound = [folder for folder in folders if checkpoint_step(folder) + 1 < start]
    later = [str(folder) for folder in folders if checkpoint_step(folder) + 1 >= start]
    if not sound:
        return (f"There is no complete checkpoint from before the loss began climbing (at step {start}): start again, "
                "with a lower learning rate.")
    if not later:
        return f"The newest complete checkpoint is {sound[-1]}; resume_from_checkpoint=True continues from it."
    return (f"The newest checkpoint from before the loss began climbing (at step {start}) is {sound[-1]}; "
            f"resume_from_checkpoint={sound[-1]} continues from it ({', '.join(later)} came after it).")
