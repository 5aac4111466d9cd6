"""The gated MLP's product act(gate) * up, kept for backward as its two inputs only.

For w2(act(w1 x) * w3 x) PyTorch's autograd keeps w1 x (act's input), act(w1 x) and w3 x (the
product's inputs), and the product itself when w2's adapter trains (its A's gradient needs its
input): four (tokens x intermediate) tensors a layer, 117 MiB each for a Llama 3.1 8B layer at
2 x 2048 in bf16 (inductor, compiling the layer, already recomputes act(w1 x): three).
`gated_product` keeps w1 x and w3 x and recomputes act in backward, one elementwise pass;
`lora_down` gives the down projection's adapter the gradient it needs without keeping the
product, recomputing it from the same two tensors. A layer that keeps its activations then holds
two such tensors, and the memory budget keeps more layers (Unsloth writes the MLP's backward by
hand for the same reason).
"""

from typing import Callable

import torch
import torch.nn.functional as F

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
# d act(x) / dx times a gradient, as autograd computes it for each activation
_ACTIVATION_BACKWARD: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "silu": torch.ops.aten.silu_backward,
    "gelu_tanh": lambda grad, x: torch.ops.aten.gelu_backward(grad, x, approximate="tanh"),
}


class _GatedProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
        ctx.activation = activation
        ctx.save_for_backward(gate, up)
        return ACTIVATIONS[activation](gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        gate, up = ctx.saved_tensors
        grad_up = grad * ACTIVATIONS[ctx.activation](gate)
        grad_gate = _ACTIVATION_BACKWARD[ctx.activation](grad * up, gate)
        return grad_gate, grad_up, None


def gated_product(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up, keeping only gate and up for backward."""
    return _GatedProduct.apply(gate, up, activation)


class _LoRADown(torch.autograd.Function):
    @staticmethod
    def forward(ctx, product: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, activation: str) -> torch.Tensor:
        low = product @ lora_a.t()  # (..., rank): kept, it is small
        ctx.scaling, ctx.activation = scaling, activation
        ctx.save_for_backward(gate, up, lora_a, lora_b, low)
        return low @ (lora_b * scaling).t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        gate, up, lora_a, lora_b, low = ctx.saved_tensors
        grad_low = grad @ (lora_b * ctx.scaling)
        grad_b = (grad.flatten(0, -2).t() @ low.flatten(0, -2)) * ctx.scaling
        # Recomputed, and freed once A's gradient is taken. Written up * act(gate), not as forward's
        # act(gate) * up: compiled, AOT autograd's common subexpression elimination would otherwise
        # merge it into forward's product, which a matmul in backward then needs: the partitioner
        # keeps such a tensor rather than recompute it, one more (tokens x intermediate) a layer.
        product = up * ACTIVATIONS[ctx.activation](gate)
        grad_a = grad_low.flatten(0, -2).t() @ product.flatten(0, -2)
        return grad_low @ lora_a, None, None, grad_a, grad_b, None, None


def lora_down(product: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, lora_a: torch.Tensor,
              lora_b: torch.Tensor, scaling: float, activation: str) -> torch.Tensor:
    """The down projection's adapter term, scaling * product A^T B^T, for product =
    act(gate) * up: keeps gate and up (which `gated_product` keeps anyway) instead of the product."""
    return _LoRADown.apply(product, gate, up, lora_a, lora_b, scaling, activation)
