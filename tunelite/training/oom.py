"""What a run that ran out of GPU memory should change, instead of only the allocator's traceback."""

import contextlib
from typing import Iterator

import torch

from tunelite.errors import ResourceError


def oom_advice(
    error: torch.OutOfMemoryError, batch_size: int, gradient_accumulation_steps: int, activation_checkpointing: bool
) -> ResourceError:
    """What to change after a CUDA out-of-memory error, instead of only the allocator's traceback."""
    tips = []
    if batch_size > 1:
        tips.append(f"batch_size={batch_size // 2} gradient_accumulation_steps={gradient_accumulation_steps * 2} "
                    "(same effective batch, half the activations)")
    tips.append("a shorter tokenizer.max_seq_len (activations grow with sequence length)")
    if not activation_checkpointing:
        tips.append("enable_activation_checkpointing=True (recompute activations instead of storing them)")
    tips.append("a QLoRA config (base weights in 4 bits) for LoRA, or, for full fine-tuning, "
                "optimizer_in_bwd=True or an offloaded optimizer (tunelite.training.optimizers.cpu_offload_optimizer)")
    return ResourceError("the GPU ran out of memory. Try, in this order:\n  - " + "\n  - ".join(tips)
                         + f"\n(torch said: {str(error).splitlines()[0]})")


@contextlib.contextmanager
def advice_on_oom(batch_size: int, gradient_accumulation_steps: int, activation_checkpointing: bool) -> Iterator[None]:
    """Turns a CUDA out-of-memory error inside the block into `oom_advice`'s one message."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        raise oom_advice(error, batch_size, gradient_accumulation_steps, activation_checkpointing) from None
