"""A frozen base weight in FP8 (e4m3) with row-wise scales, for LoRA on cards with FP8 tensor cores.

The weight is quantized once, as it loads, twice over: W (out x in) scaled per output row for the
forward x W^T, and W^T (in x out) scaled per input column for backward's dy W, since a scale must
run along the dimension a product keeps, not the one it sums over. The two copies take the bytes of
one bf16 weight. Activations (and backward's incoming gradients) are scaled per row as they come,
so every matrix product of the frozen base runs in FP8 through `torch._scaled_mm`, with bf16 out;
the adapters, norms, attention and loss stay in bf16. No activation is saved for backward: the
base weight is frozen, so only dy W is needed.

On the CPU the same numbers are computed by dequantizing (`_scaled_mm` needs an FP8 GPU): slow,
for tests and demos only. On a GPU without FP8 the loader refuses the model (see fp8_supported).
"""

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# The extra tensors an FP8 base weight `W` keeps beside it, by state-dict suffix.
SCALE, TRANSPOSED, TRANSPOSED_SCALE = "weight_scale", "weight_t", "weight_t_scale"


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of a 2-D tensor in FP8 with its own scale (fp32, a column): row = q * scale."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_weight(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """A (out x in) weight as the four tensors the FP8 linear keeps, by state-dict suffix."""
    w, w_scale = quantize_rows(weight)
    w_t, w_t_scale = quantize_rows(weight.t())
    return {"weight": w, SCALE: w_scale.squeeze(1), TRANSPOSED: w_t.contiguous(), TRANSPOSED_SCALE: w_t_scale.squeeze(1)}


def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The forward copy back in `dtype` (FP8-rounded: what the model computed with), e.g. to merge an adapter."""
    return (weight.float() * scale[:, None]).to(dtype)


def fp8_supported(device: torch.device) -> bool:
    """Whether `device` multiplies FP8 in hardware: compute capability 8.9 (Ada) or later; the CPU
    emulates it."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)


def _scaled_mm(a: torch.Tensor, a_scale: torch.Tensor, b_t: torch.Tensor, b_scale: torch.Tensor,
               out_dtype: torch.dtype, fast_accumulation: bool) -> torch.Tensor:
    """(a * a_scale) @ (b_t * b_scale[:, None])^T for FP8 a (m x k, scale per row) and b_t (n x k, scale
    per row), in out_dtype. cuBLAS wants m padded to 16 and b column-major (b_t row-major, transposed).
    Fast accumulation (as torchao's float8 forward; its backward accumulates exactly) trades a little
    precision for speed."""
    if not a.is_cuda:
        return ((a.float() * a_scale) @ (b_t.float() * b_scale[:, None]).t()).to(out_dtype)
    rows = a.shape[0]
    pad = -rows % 16
    if pad:
        a, a_scale = F.pad(a.view(torch.uint8), (0, 0, 0, pad)).view(FP8), F.pad(a_scale, (0, 0, 0, pad), value=1.0)
    out = torch._scaled_mm(a, b_t.t(), scale_a=a_scale, scale_b=b_scale[None, :], out_dtype=out_dtype,
                           use_fast_accum=fast_accumulation)
    return out[:rows] if pad else out


class _FrozenFP8Linear(torch.autograd.Function):
    """x W^T with W frozen in FP8; the gradient to x only, as dy W in FP8."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, w_t: torch.Tensor,  # noqa: ANN001
                w_t_scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w_t, w_t_scale)
        q, scale = quantize_rows(x.reshape(-1, x.shape[-1]))
        return _scaled_mm(q, scale, w, w_scale, x.dtype, True).view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:  # noqa: ANN001
        w_t, w_t_scale = ctx.saved_tensors
        q, scale = quantize_rows(grad.reshape(-1, grad.shape[-1]))
        return _scaled_mm(q, scale, w_t, w_t_scale, grad.dtype, False).view(*grad.shape[:-1], w_t.shape[0]), None, None, \
            None, None


def fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, w_t: torch.Tensor,
               w_t_scale: torch.Tensor) -> torch.Tensor:
    """x W^T with a frozen FP8 base weight and its scales (see quantize_weight)."""
    return _FrozenFP8Linear.apply(x, w, w_scale, w_t, w_t_scale)


class FrozenFP8Linear(torch.nn.Module):
    """A never-trained linear layer whose weight is kept in FP8 (see quantize_weight), its bias (Qwen
    2.5's q/k/v, GPT-2's) in the model's dtype: the projections an FP8-base LoRA model leaves without
    an adapter. Built on the meta device; the loader fills it with the checkpoint's weight, quantized."""

    fp8_base = True

    def __init__(self, in_dim: int, out_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(out_dim, in_dim, dtype=FP8), requires_grad=False)
        self.bias = torch.nn.Parameter(torch.zeros(out_dim), requires_grad=False) if bias else None
        self.register_buffer(SCALE, torch.empty(out_dim))
        self.register_buffer(TRANSPOSED, torch.empty(in_dim, out_dim, dtype=FP8))
        self.register_buffer(TRANSPOSED_SCALE, torch.empty(in_dim))
        if not self.weight.is_meta:  # built on a device (tests, benchmarks): random, as nn.Linear starts
            pieces = quantize_weight(torch.nn.init.kaiming_uniform_(torch.empty(out_dim, in_dim), a=5**0.5))
            self.weight = torch.nn.Parameter(pieces.pop("weight"), requires_grad=False)
            for name, value in pieces.items():
                setattr(self, name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = fp8_linear(x, self.weight, self.weight_scale, self.weight_t, self.weight_t_scale)
        return out if self.bias is None else out + self.bias
