"""What a recipe does with a bad step, one it must not let the optimizer take: a NaN or infinite
loss or gradient norm is skipped, up to `skip_nonfinite_steps` of them, or stops the run; a finite
loss far above the run's history (tunelite.training.divergence) stops it. Either stop names the
step, its samples, and the checkpoint from before the loss began climbing.

The recipe checks before the optimizer steps, so the weights never take such a step: reading the
loss and norm back (`is_finite`, `diverged`), which waits for the GPU to finish the backward, or,
with a fused Adam or AdamW, on the device (`bad_step`, `skipped_if_bad`), so the host queues the
update while the GPU is still busy and reads the verdict afterwards."""

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

from tunelite.checkpointing.state import Progress
from tunelite.errors import DivergenceError, NonFiniteError
from tunelite.training.divergence import divergence_limit, divergence_message, resume_note


def is_finite(*values: torch.Tensor | None) -> bool:
    """Whether every given value (a loss, a gradient norm; None is skipped) is finite. Reading
    them waits for the device, which reading the loss for the progress bar does anyway."""
    return all(value is None or bool(torch.isfinite(value)) for value in values)


def bad_step(loss: torch.Tensor, grad_norm: torch.Tensor | None, progress: Progress,
             divergence_factor: float | None) -> torch.Tensor:
    """On the loss's device, whether the step in progress must not reach the weights: a NaN or
    infinite loss or gradient norm, or a loss above the run's divergence limit. Nothing is read
    back: the answer stays a tensor for `skipped_if_bad`."""
    bad = ~torch.isfinite(loss)
    if grad_norm is not None:
        bad = bad | ~torch.isfinite(grad_norm)
    limit = divergence_limit(progress, divergence_factor)
    return bad if limit is None else bad | (loss > limit)


@contextlib.contextmanager
def skipped_if_bad(optimizer: torch.optim.Optimizer, bad: torch.Tensor) -> Iterator[bool]:
    """Around the recipe's `optimizer.step()`: yields whether to call it. A fused Adam or AdamW is
    handed `bad` as its `found_inf`, as under torch's GradScaler, and always steps: on the device,
    a bad step changes no weight, moment or step count, and nothing waits for the GPU. Any other
    optimizer steps only if `bad`, read back, is false."""
    if isinstance(optimizer, torch.optim.Adam) and all(group.get("fused") for group in optimizer.param_groups):
        optimizer.found_inf = bad.float()
        try:
            yield True
        finally:
            del optimizer.found_inf
    else:
        yield not bad.item()


def skip_or_stop(
    progress: Progress, limit: int, divergence_factor: float | None, loss: torch.Tensor,
    grad_norm: torch.Tensor | None, sample_indices: list[int], output_dir: Path,
) -> tuple[Progress, str]:
    """For the step in progress, found bad: with a finite loss and gradient norm it is diverging
    (tunelite.training.divergence.diverged) and raises DivergenceError. Else it counts as skipped:
    returns the progress with that count and the line to show, or past `limit` skipped steps raises
    NonFiniteError. Each error names the step, its samples (dataset indices) and the checkpoint to
    resume from."""
    step = f"step {progress.step + 1} (dataset samples {', '.join(map(str, sample_indices))})"
    kept = (f"the optimizer did not step, so the weights are those after step {progress.step}. No checkpoint was "
            f"written of this state. {resume_note(progress, Path(output_dir))}")
    if is_finite(loss, grad_norm):
        raise DivergenceError(
            f"{step}: {divergence_message(progress, loss, divergence_factor)}; {kept} Lower the learning rate, "
            "look at those samples, or raise divergence_factor (null switches this check off)."
        )
    values = f"the loss is {loss.item()}" + ("" if grad_norm is None else f", the gradient norm {grad_norm.item()}")
    if progress.skipped_steps >= limit:
        raise NonFiniteError(
            f"{step}: {values}; {kept} Look at those samples, lower the learning rate, or skip such steps with "
            f"skip_nonfinite_steps: N (now {limit}, {progress.skipped_steps} skipped)."
        )
    progress = replace(progress, skipped_steps=progress.skipped_steps + 1)
    return progress, f"{step}: {values}; skipped ({progress.skipped_steps} of skip_nonfinite_steps: {limit})"
