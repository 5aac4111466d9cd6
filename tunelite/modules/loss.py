"""Cross-entropy that projects hidden states to the vocabulary one chunk at a time.

At a 128k vocabulary the logits of 2 x 2048 tokens are 2 GiB in fp32, plus their gradient.
Each chunk's projection and loss run under activation checkpointing, so only the hidden
states are kept and a single chunk's logits exist at any moment, in forward and backward. When
the output projection is frozen (LoRA), each chunk's gradient with respect to the hidden states
is taken at once in forward instead, so the projection runs twice a chunk, not three times.
Long batches take more chunks than `num_chunks`, so no chunk holds more than `max_chunk_tokens`
tokens (a 128k-token sample in 8 chunks would hold 16k x 128k fp32 logits, 8 GiB).
"""

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
MAX_CHUNK_TOKENS = 1024


def loss_chunks(batch: int, seq: int, num_chunks: int, max_chunk_tokens: int = MAX_CHUNK_TOKENS) -> int:
    """How many chunks of the sequence a (batch x seq) loss runs in: `num_chunks`, or more when a
    chunk would hold over `max_chunk_tokens` tokens. tunelite estimate counts with this too."""
    return max(num_chunks, math.ceil(batch * seq / max_chunk_tokens))


def _chunk_loss_sum(output: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = output(hidden).float()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


class LinearCrossEntropyLoss(nn.Module):
    """Mean next-token loss over labelled positions; labels are already aligned with `hidden`."""

    def __init__(self, num_chunks: int = 8, max_chunk_tokens: int = MAX_CHUNK_TOKENS) -> None:
        super().__init__()
        self.num_chunks, self.max_chunk_tokens = num_chunks, max_chunk_tokens
        self.chunk_loss = _chunk_loss_sum

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """Compiles the per-chunk projection and cross-entropy (not the chunk loop): the fp32
        upcast, log-softmax and gather fuse, so fp32 logits are never written out."""
        self.chunk_loss = torch.compile(_chunk_loss_sum, *args, **kwargs)

    def forward(
        self, hidden: torch.Tensor, labels: torch.Tensor, output: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        chunks = loss_chunks(labels.shape[0], labels.shape[1], self.num_chunks, self.max_chunk_tokens)
        if torch.is_grad_enabled() and hidden.requires_grad and _frozen(output):
            total = _LossAndGradient.apply(hidden, labels, output, chunks, self.chunk_loss)
        else:
            total = hidden.new_zeros((), dtype=torch.float32)
            for h, y in zip(hidden.chunk(chunks, dim=1), labels.chunk(chunks, dim=1)):
                if torch.is_grad_enabled():
                    total = total + checkpoint(self.chunk_loss, output, h, y, use_reentrant=False)
                else:
                    total = total + self.chunk_loss(output, h, y)
        return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def _frozen(output: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Whether nothing of the output projection trains (LoRA without an adapter on it), as far as
    it says: a callable without `parameters()` counts as training."""
    parameters = getattr(output, "parameters", None)
    return parameters is not None and not any(p.requires_grad for p in parameters())


class _LossAndGradient(torch.autograd.Function):
    """The summed loss of every chunk, with its gradient with respect to the hidden states taken
    in the same pass, chunk by chunk (the projection forward, then backward at once), and kept in
    the hidden states' dtype for backward, which only scales it. Under checkpointing each chunk's
    projection would run three times (forward, recomputed, backward); here twice. Only for a
    frozen output projection: no weight gradient is taken."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, labels: torch.Tensor, output: Callable[[torch.Tensor], torch.Tensor],
                chunks: int, chunk_loss: Callable[..., torch.Tensor]) -> torch.Tensor:
        gradient = torch.empty_like(hidden)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for h, y, g in zip(hidden.chunk(chunks, dim=1), labels.chunk(chunks, dim=1), gradient.chunk(chunks, dim=1)):
            with torch.enable_grad():
                h = h.detach().requires_grad_()
                loss = chunk_loss(output, h, y)
                (grad,) = torch.autograd.grad(loss, h)
            g.copy_(grad)
            total += loss.detach()
        ctx.save_for_backward(gradient)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (gradient,) = ctx.saved_tensors
        return gradient * grad_total.to(gradient.dtype), None, None, None, None


def _chunk_label_log_probs(output: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                           labels: torch.Tensor) -> torch.Tensor:
    """Per sequence of the chunk, the summed log-probability of its labelled tokens."""
    logits = output(hidden).float()
    token_nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return -token_nll.sum(dim=1)


def sequence_log_probs(
    hidden: torch.Tensor, labels: torch.Tensor, output: Callable[[torch.Tensor], torch.Tensor], num_chunks: int = 8
) -> torch.Tensor:
    """log p(labels | prompt) per sequence, (b,): the sum over its labelled positions, what preference
    losses compare. Projected to the vocabulary chunk by chunk under activation checkpointing, as
    LinearCrossEntropyLoss does, so a whole batch's logits never exist at once."""
    total = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
    for h, y in zip(hidden.chunk(num_chunks, dim=1), labels.chunk(num_chunks, dim=1)):
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_label_log_probs, output, h, y, use_reentrant=False)
        else:
            total = total + _chunk_label_log_probs(output, h, y)
    return total
