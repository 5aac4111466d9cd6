"""4-bit NormalFloat base weights (QLoRA) through torchao, wherever the installed torchao keeps them.

torchao 0.18 moved NF4 from `torchao.dtypes.nf4tensor` to
`torchao.quantization.quantize_.workflows.nf4`, with no compatibility shim; this is the one
place that knows both homes.
"""

import logging

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
except ImportError:  # torchao < 0.18
    from torchao.dtypes.nf4tensor import NF4Tensor, to_nf4
finally:
    for logger, level in zip(_NOISY, _levels):
        logger.setLevel(level)

__all__ = ["FrozenNF4Linear", "NF4Tensor", "dequantize", "dequantize_nf4", "frozen_linear", "keep_dequantized_weights",
           "quantize_nf4"]

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


FORWARD, BACKWARD = 0, 1  # _dequantize_op's `call`


def _dequantize_reference(
    data: torch.Tensor, scalers: torch.Tensor, factor: torch.Tensor, mean: torch.Tensor, table: torch.Tensor,
    block_size: int, scaler_block: int, rows: int, cols: int,
) -> torch.Tensor:
    """torchao's NF4Tensor.get_original_weight written as one pure function of the NF4 pieces: on the
    CPU it is the reference, bit for bit, and what the GPU kernel below must equal."""
    first = table[(data >> 4).to(torch.int32)]
    second = table[(data & 0b1111).to(torch.int32)]
    block_scales = (scalers.view(-1, scaler_block) / factor.unsqueeze(-1)).flatten().to(table.dtype) + mean
    repeated = block_scales.unsqueeze(-1).expand(block_scales.size(0), block_size // 2).flatten()
    return torch.stack([first * repeated, second * repeated], dim=-1).reshape(rows, cols)


@torch.library.custom_op("tunelite::dequantize_nf4", mutates_args=())
def _dequantize_op(
    data: torch.Tensor, scalers: torch.Tensor, factor: torch.Tensor, mean: torch.Tensor, table: torch.Tensor,
    block_size: int, scaler_block: int, rows: int, cols: int, call: int,
) -> torch.Tensor:
    """An opaque op to torch.compile, so a compiled layer calls the one-pass kernel instead of
    tracing a dozen indexing ops, and its saved-tensor choice is ours (see _FrozenNF4Linear).

    `call` (FORWARD or BACKWARD) changes nothing in the result: it keeps AOT autograd's common
    subexpression elimination from merging backward's dequantization into forward's, which would
    save each weight's bf16 copy for backward where eager saves its 4-bit pieces (on an H200, 16
    kept 8B QLoRA layers held 4.9 GiB more than the memory estimate)."""
    if data.is_cuda:
        from tunelite.modules.nf4_kernel import dequantize_nf4_cuda

        return dequantize_nf4_cuda(data, scalers, factor, mean, table, block_size, scaler_block, rows, cols)
    return _dequantize_reference(data, scalers, factor, mean, table, block_size, scaler_block, rows, cols)


@_dequantize_op.register_fake
def _(data, scalers, factor, mean, table, block_size, scaler_block, rows, cols, call):  # noqa: ANN001, ANN202
    return table.new_empty((rows, cols))


def _pieces(weight: NF4Tensor) -> tuple:
    return (weight.quantized_data, weight.quantized_scalers, weight.quantization_factor, weight.scaler_mean,
            weight.nf4, weight.block_size, weight.scaler_block_size, *weight.shape)


def dequantize_nf4(weight: NF4Tensor) -> torch.Tensor:
    """The weight in its original dtype, in one pass over memory on a GPU (tunelite/modules/nf4_kernel.py)."""
    return _dequantize_op(*_pieces(weight), FORWARD)


class _FrozenNF4Linear(torch.autograd.Function):
    """x @ dequant(W)^T with the gradient to x only, keeping W's 4-bit form for backward, which
    dequantizes it again: no bf16 copy outlives the forward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, *pieces: torch.Tensor | int) -> torch.Tensor:  # noqa: ANN001
        ctx.meta = pieces[5:]
        ctx.save_for_backward(*pieces[:5])
        return F.linear(x, _dequantize_op(*pieces, FORWARD).to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:  # noqa: ANN001
        weight = _dequantize_op(*ctx.saved_tensors, *ctx.meta, BACKWARD)
        return (grad @ weight.to(grad.dtype), *[None] * 9)


def frozen_linear(
    x: torch.Tensor, weight: torch.Tensor, keep_dequantized: bool = False, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ W^T (+ b) for a frozen W that may be NF4: dequantized on the fly in one pass, gradient to x
    only. `keep_dequantized`, for a layer under activation checkpointing, hands backward the bf16
    weight of the forward instead of its 4-bit form: the checkpoint drops the first forward's
    saved tensors and its recomputation runs just before backward, so this saves one of the three
    dequantizations a step makes, for one layer's bf16 weights held during that layer's backward.
    It is then a plain linear, whose autograd saves the weight before the product is computed, so
    a recomputation that needs nothing after it stops before it (tunelite.models.decoder._down)."""
    if not isinstance(weight, NF4Tensor):
        return F.linear(x, weight, bias)
    if keep_dequantized:
        return F.linear(x, dequantize_nf4(weight).to(x.dtype), bias)
    out = _FrozenNF4Linear.apply(x, *_pieces(weight))
    return out if bias is None else out + bias


def keep_dequantized_weights(module: nn.Module, keep: bool) -> None:
    """Sets whether the NF4 linears inside `module` hand their forward's bf16 weight to backward
    (see frozen_linear): right for a layer whose activations are recomputed, wrong for one whose
    activations are kept (every layer's bf16 weights would then stay alive until backward)."""
    for child in module.modules():
        if getattr(child, "quantize_base", False):
            child.keep_dequantized = keep


def dequantize(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor in the weight's original dtype, e.g. to merge an adapter into an NF4 base."""
    return t.get_original_weight() if isinstance(t, NF4Tensor) else t


class FrozenNF4Linear(nn.Module):
    """A linear layer whose weight is stored in NF4 and never trained (its bias, if any, in the
    model's dtype).

    Built with a plain weight (on the meta device when loading); the loader quantizes the
    checkpoint tensor as it assigns it, one layer at a time."""

    quantize_base = True
    keep_dequantized = False  # see keep_dequantized_weights

    def __init__(self, in_dim: int, out_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_dim), requires_grad=False) if bias else None
        if not self.weight.is_meta:
            nn.init.kaiming_uniform_(self.weight, a=5**0.5)
            self.weight = nn.Parameter(quantize_nf4(self.weight.detach()), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_linear(x, self.weight, self.keep_dequantized, self.bias)
