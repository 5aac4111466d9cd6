"""NF4 dequantization as one Triton kernel: each 4-bit code and its block's scale read once, each
bf16 value written once, the arithmetic rounded step by step as torchao's eager code rounds it,
so the result is bit-identical to NF4Tensor.get_original_weight.

Only imported on a CUDA device (Triton does not run on the CPU, where the reference in nf4.py is used).
"""

import torch
import triton
import triton.language as tl

BYTES_PER_PROGRAM = 2048  # each program reads 2 KiB of codes and writes 4,096 values
NUM_WARPS = 4


@triton.jit
def _dequantize_kernel(data_ptr, scalers_ptr, factor_ptr, mean_ptr, table_ptr, out_ptr, n_bytes,
                       BYTES_PER_BLOCK: tl.constexpr, SCALER_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n_bytes
    codes = tl.load(data_ptr + offsets, mask=inside, other=0).to(tl.int32)
    block = offsets // BYTES_PER_BLOCK  # 64 values, 32 bytes, share one scale
    scaler = tl.load(scalers_ptr + block, mask=inside, other=0).to(tl.float32)
    factor = tl.load(factor_ptr + block // SCALER_BLOCK, mask=inside, other=1).to(tl.float32)
    out_type = out_ptr.dtype.element_ty
    # As eager torch rounds: int8 / factor in the weight's dtype, plus the mean, in the weight's dtype.
    scale = (scaler / factor).to(out_type).to(tl.float32)
    scale = (scale + tl.load(mean_ptr).to(tl.float32)).to(out_type).to(tl.float32)
    high = tl.load(table_ptr + (codes >> 4)).to(tl.float32)
    low = tl.load(table_ptr + (codes & 15)).to(tl.float32)
    values = tl.interleave((high * scale).to(out_type), (low * scale).to(out_type))
    out_offsets = tl.program_id(0) * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + out_offsets, values, mask=out_offsets < 2 * n_bytes)


def dequantize_nf4_cuda(
    data: torch.Tensor, scalers: torch.Tensor, factor: torch.Tensor, mean: torch.Tensor, table: torch.Tensor,
    block_size: int, scaler_block: int, rows: int, cols: int, bytes_per_program: int = BYTES_PER_PROGRAM,
    num_warps: int = NUM_WARPS,
) -> torch.Tensor:
    """The (rows, cols) weight in `table`'s dtype from torchao's NF4 pieces (the launch shape is a
    parameter for benchmarks/layer_levers.py's sweep)."""
    out = torch.empty((rows, cols), dtype=table.dtype, device=data.device)
    n_bytes = data.numel()
    grid = (triton.cdiv(n_bytes, bytes_per_program),)
    _dequantize_kernel[grid](data, scalers, factor, mean, table, out, n_bytes, BYTES_PER_BLOCK=block_size // 2,
                             SCALER_BLOCK=scaler_block, BLOCK=bytes_per_program, num_warps=num_warps)
    return out
