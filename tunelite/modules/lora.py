"""Low-rank adapters: a frozen base weight plus a trainable B @ A, merged away at save time.

`LoRALinear` keeps `nn.Linear`'s parameter names `weight` (and `bias`, where the base has one)
for the base, so a base checkpoint loads into a LoRA model with no key remapping; the adapters
are the extra parameters `lora_a` (rank x in) and `lora_b` (out x rank).
"""

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from tunelite.modules import fp8
from tunelite.modules.gated_mlp import lora_down
from tunelite.modules.nf4 import dequantize, frozen_linear, quantize_nf4

ADAPTER_SUFFIXES = ("lora_a", "lora_b")


class LoRALinear(nn.Module):
    """y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T, with B zero at init so a fresh adapter
    leaves the model's outputs unchanged. The bias (Qwen's q/k/v, GPT-2's) is frozen with W."""

    def __init__(
        self, in_dim: int, out_dim: int, rank: int, alpha: float, dropout: float = 0.0, quantize_base: bool = False,
        fp8_base: bool = False, bias: bool = False,
    ) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.rank, self.alpha = in_dim, out_dim, rank, alpha
        self.scaling = alpha / rank
        # QLoRA: the loader stores the base weight in NF4; an FP8 base: in FP8 with its scales and
        # a transposed copy (see checkpointing/loading.py and modules/fp8.py).
        self.quantize_base, self.fp8_base = quantize_base, fp8_base
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim), requires_grad=False)
        if fp8_base:
            self.weight = nn.Parameter(torch.empty(out_dim, in_dim, dtype=fp8.FP8), requires_grad=False)
            self.register_buffer(fp8.SCALE, torch.empty(out_dim))
            self.register_buffer(fp8.TRANSPOSED, torch.empty(in_dim, out_dim, dtype=fp8.FP8))
            self.register_buffer(fp8.TRANSPOSED_SCALE, torch.empty(in_dim))
        self.bias = nn.Parameter(torch.zeros(out_dim), requires_grad=False) if bias else None
        self.lora_a = nn.Parameter(torch.empty(rank, in_dim))
        self.lora_b = nn.Parameter(torch.empty(out_dim, rank))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False  # set by adapters_disabled: the frozen base alone
        self.keep_dequantized = False  # NF4 base: see tunelite.modules.nf4.keep_dequantized_weights
        if not self.weight.is_meta:
            weight = nn.init.kaiming_uniform_(torch.empty(out_dim, in_dim), a=math.sqrt(5))
            if quantize_base:
                weight = quantize_nf4(weight)
            if fp8_base:
                pieces = fp8.quantize_weight(weight)
                weight = pieces.pop("weight")
                for name, value in pieces.items():
                    setattr(self, name, value)
            self.weight = nn.Parameter(weight, requires_grad=False)
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialises the adapter only: the base weight comes from the checkpoint."""
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T (+ b) through the frozen base weight, however it is stored (bf16, NF4 or FP8)."""
        if self.fp8_base:
            out = fp8.fp8_linear(x, self.weight, self.weight_scale, self.weight_t, self.weight_t_scale)
            return out if self.bias is None else out + self.bias
        return frozen_linear(x, self.weight, self.keep_dequantized, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base(x)
        # alpha / rank scales the small B rather than the (tokens x out) product: eager PyTorch
        # would otherwise make one more pass over the layer's output forward and one backward.
        # The base last: its saved weight is then the last tensor a recomputation waits for.
        lora = F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b * self.scaling)
        return self.base(x) + lora

    def forward_gated(self, product: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                      activation: str) -> torch.Tensor:
        """forward(product) for the gated MLP's product = act(gate) * up: the adapter recomputes
        the product in backward from gate and up (see tunelite.modules.gated_mlp) instead of
        keeping it. With dropout the adapter's input is not the product, so it runs as forward."""
        if self.disabled or not isinstance(self.dropout, nn.Identity):
            return self(product)
        lora = lora_down(product, gate, up, self.lora_a, self.lora_b, self.scaling, activation)
        return self.base(product) + lora  # the base last, as in forward (tunelite.models.decoder._down)

    def extra_repr(self) -> str:
        return f"in={self.in_dim}, out={self.out_dim}, rank={self.rank}, alpha={self.alpha}"


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """For the block, every LoRALinear runs its frozen base weight alone: the model as it was before
    fine-tuning, e.g. the reference of a preference loss, with no second copy of the weights."""
    modules = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for module in modules:
        module.disabled = True
    try:
        yield
    finally:
        for module in modules:
            module.disabled = False


def is_adapter_key(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ADAPTER_SUFFIXES


def set_trainable_params(model: nn.Module) -> None:
    """Freezes everything but the adapters, so the optimizer and gradients cover only them."""
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_key(name))


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights alone, in our names: the small part of a LoRA checkpoint."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}


def merge_lora_state_dict(
    state_dict: dict[str, torch.Tensor], rank: int, alpha: float, dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """Folds each adapter into its base weight (W + alpha/rank * B @ A) and drops the adapter keys,
    giving a plain model's state dict that any Llama loader reads. A quantized base (NF4, FP8) is
    dequantized first (FP8 into `dtype`): the merge holds the rounded base the adapter was trained on."""
    merged = {}
    fp8_extras = (fp8.SCALE, fp8.TRANSPOSED, fp8.TRANSPOSED_SCALE)
    for key, value in state_dict.items():
        if is_adapter_key(key) or key.rsplit(".", 1)[-1] in fp8_extras:
            continue
        prefix = key[: -len("weight")]
        if value.dtype == fp8.FP8:
            value = fp8.dequantize_weight(value, state_dict[prefix + fp8.SCALE], dtype)
        value = dequantize(value)
        if key.endswith("weight") and prefix + "lora_a" in state_dict:
            a, b = state_dict[prefix + "lora_a"], state_dict[prefix + "lora_b"]
            value = (value.float() + (b.float() @ a.float()) * (alpha / rank)).to(value.dtype)
        merged[key] = value
    return merged


def merged_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's weights with every adapter folded in: what a merged export writes. `state_dict`
    stands in for the model's own tensors when those are shards (gathered whole from the ranks)."""
    first = next(m for m in model.modules() if isinstance(m, LoRALinear))
    return merge_lora_state_dict(model.state_dict() if state_dict is None else state_dict, first.rank, first.alpha,
                                 first.lora_a.dtype)
