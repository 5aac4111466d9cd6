"""4-bit NormalFloat base weights (QLoRA) through torchao, wherever the installed torchao keeps them.

torchao 0.18 moved NF4 from `torchao.dtypes.nf4tensor` to
`torchao.quantization.quantize_.workflows.nf4`, with no compatibility shim; this is the one
place that knows both homes.
"""

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Importing torchao on a CPU build logs that its CUDA extensions are missing, and torch warns
# about an enum torchao registers: harmless, and noise in every run's output, so quieted here.
_NOISY = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
_levels = [logger.level for logger in _NOISY]
for logger in _NOISY:
    logger.setLevel(logging.ERROR)
try:
    from torchao.quantization import NF4Tensor, to_nf4
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4
except ImportError:  # torchao < 0.18
    from torchao.dtypes.nf4tensor import NF4Tensor, linear_nf4, to_nf4
finally:
    for logger, level in zip(_NOISY, _levels):
        logger.setLevel(level)

__all__ = ["FrozenNF4Linear", "NF4Tensor", "dequantize", "frozen_linear", "quantize_nf4"]

BLOCK_SIZE = 64


def quantize_nf4(weight: torch.Tensor, shards: int = 1) -> NF4Tensor:
    """NF4 with torchao's block sizes (64 values per scale, 256 scales per double-quantized
    scale) where the shape allows, else the largest scaler block that divides it (tiny test models).

    `shards`: the number of row shards FSDP will cut the tensor into; each must hold whole scaler
    blocks (always so for real model sizes, where this changes nothing)."""
    if weight.numel() % BLOCK_SIZE:
        raise ValueError(f"NF4 needs a multiple of {BLOCK_SIZE} values, got shape {tuple(weight.shape)}")
    scaler_block = 256
    while (weight.numel() // BLOCK_SIZE // shards) % scaler_block:
        scaler_block //= 2
    return to_nf4(weight, BLOCK_SIZE, scaler_block)


def _dequantize_nf4(weight: NF4Tensor) -> torch.Tensor:
    """torchao's NF4Tensor.get_original_weight, written as one pure function so that on a GPU it
    compiles to a single fused kernel; eager torchao runs a dozen kernels through int64 indices."""
    first = weight.nf4[(weight.quantized_data >> 4).to(torch.int32)]
    second = weight.nf4[(weight.quantized_data & 0b1111).to(torch.int32)]
    scalers = weight.quantized_scalers.view(-1, weight.scaler_block_size) / weight.quantization_factor.unsqueeze(-1)
    scalers = scalers.flatten().to(weight.dtype) + weight.scaler_mean
    repeated = scalers.unsqueeze(-1).expand(scalers.size(0), weight.block_size // 2).flatten()
    return torch.stack([first * repeated, second * repeated], dim=-1).reshape(weight.shape)


_dequantize_nf4_fused = torch.compile(_dequantize_nf4, dynamic=False)


def dequantize_nf4(weight: NF4Tensor) -> torch.Tensor:
    return (_dequantize_nf4_fused if weight.quantized_data.is_cuda else _dequantize_nf4)(weight)


class _FrozenNF4Linear(torch.autograd.Function):
    """x @ dequant(W)^T with the gradient to x only; W is dequantized again in backward rather
    than kept, so only its 4-bit form stays in memory."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: NF4Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, dequantize_nf4(weight).to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (weight,) = ctx.saved_tensors
        return grad @ dequantize_nf4(weight).to(grad.dtype), None


def frozen_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ W^T for a frozen W that may be NF4: dequantized on the fly, gradient to x only.

    Inside a compiled model torchao's `linear_nf4` is traced and fused by the compiler; outside
    one, the fused dequantization kernel above does the same work in one launch."""
    if not isinstance(weight, NF4Tensor):
        return F.linear(x, weight)
    if torch.compiler.is_compiling():
        return linear_nf4(input=x, weight=weight)
    return _FrozenNF4Linear.apply(x, weight)


def dequantize(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor in the weight's original dtype, e.g. to merge an adapter into an NF4 base."""
    return t.get_original_weight() if isinstance(t, NF4Tensor) else t


class FrozenNF4Linear(nn.Module):
    """A bias-free linear layer whose weight is stored in NF4 and never trained.

    Built with a plain weight (on the meta device when loading); the loader quantizes the
    checkpoint tensor as it assigns it, one layer at a time."""

    quantize_base = True

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim), requires_grad=False)
        if not self.weight.is_meta:
            nn.init.kaiming_uniform_(self.weight, a=5**0.5)
            self.weight = nn.Parameter(quantize_nf4(self.weight.detach()), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_linear(x, self.weight)
