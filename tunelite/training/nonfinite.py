"""What a recipe does with a step whose loss or gradient norm is NaN or infinite: skip it, up to
`skip_nonfinite_steps` of them, or stop the run naming the step and its samples.

The recipe checks before the optimizer steps, so the weights never take such a step."""

from dataclasses import replace
from pathlib import Path

import torch

from tunelite.checkpointing.state import Progress, newest_checkpoint_note
from tunelite.errors import NonFiniteError


def is_finite(*values: torch.Tensor | None) -> bool:
    """Whether every given value (a loss, a gradient norm; None is skipped) is finite. Reading
    them waits for the device, which reading the loss for the progress bar does anyway."""
    return all(value is None or bool(torch.isfinite(value)) for value in values)


def skip_nonfinite_step(
    progress: Progress, limit: int, loss: torch.Tensor, grad_norm: torch.Tensor | None, sample_indices: list[int],
    output_dir: Path,
) -> tuple[Progress, str]:
    """Counts the step in progress as skipped and returns the progress with that count and the line
    to show; past `limit` skipped steps raises NonFiniteError instead, naming the step, its samples
    (dataset indices) and the newest checkpoint to resume from."""
    step = f"step {progress.step + 1} (dataset samples {', '.join(map(str, sample_indices))})"
    values = f"the loss is {loss.item()}" + ("" if grad_norm is None else f", the gradient norm {grad_norm.item()}")
    if progress.skipped_steps >= limit:
        raise NonFiniteError(
            f"{step}: {values}; the optimizer did not step, so the weights are those after step {progress.step}. "
            f"Look at those samples, lower the learning rate, or skip such steps with skip_nonfinite_steps: N "
            f"(now {limit}, {progress.skipped_steps} skipped). No checkpoint was written of this state. "
            f"{newest_checkpoint_note(Path(output_dir))}"
        )
    progress = replace(progress, skipped_steps=progress.skipped_steps + 1)
    return progress, f"{step}: {values}; skipped ({progress.skipped_steps} of skip_nonfinite_steps: {limit})"
