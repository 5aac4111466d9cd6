"""Per-layer cost of each speed lever on 8B shapes, in one short GPU call: the NF4 kernel against its
reference, the FP8 linear against bf16, and a forward + backward through Llama 3.1 8B-shaped
LoRA layers (random weights, no checkpoint needed) with each base format, eager and compiled,
with and without activation checkpointing.

    python benchmarks/layer_levers.py [--layers 2] [--batch 2] [--seq 2048] [--kernels-only]

Prints `RESULT ...` lines; a variant that fails prints its error and the others still run.
"""

import argparse
import dataclasses
import time
import traceback

import torch
import torch.nn.functional as F

from tunelite.models.llama import LoRAArgs, lora_llama, set_activation_checkpointing
from tunelite.models.llama3_1 import LLAMA3_1_8B
from tunelite.modules import fp8, nf4
from tunelite.modules.lora import set_trainable_params


def timed(fn, repeat: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of fn() over `repeat` runs, with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def kernels() -> None:
    weight = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    q = nf4.quantize_nf4(weight)
    pieces = nf4._pieces(q)
    fast, ref = nf4.dequantize_nf4(q), nf4._dequantize_reference(*pieces)
    moved = q.quantized_data.numel() + 2 * weight.numel()
    ms_fast, ms_ref = timed(lambda: nf4.dequantize_nf4(q)), timed(lambda: nf4._dequantize_reference(*pieces))
    from tunelite.modules.nf4_kernel import dequantize_nf4_cuda

    for size in (1024, 2048, 4096, 8192):  # the launch shapes first, their lines before the checks'
        for warps in (4, 8, 16):
            ms = timed(lambda: dequantize_nf4_cuda(*pieces, bytes_per_program=size, num_warps=warps), repeat=20)
            print(f"RESULT nf4_kernel_sweep bytes_per_program={size} num_warps={warps} ms={ms:.4f} "
                  f"GB/s={moved / ms / 1e6:.0f}", flush=True)
    print(f"RESULT nf4_kernel bit_identical={torch.equal(fast, ref)} equal_torchao={torch.equal(fast, q.get_original_weight())} "
          f"triton_ms={ms_fast:.3f} ({moved / ms_fast / 1e6:.0f} GB/s) torch_ms={ms_ref:.3f}", flush=True)
    # compiled: the same product and gradient as eager
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(4096, 14336, device="cuda", dtype=torch.bfloat16)
    results = []
    for fn in (nf4.frozen_linear, torch.compile(nf4.frozen_linear)):
        out = fn(x, q)
        out.backward(grad)
        results.append((out, x.grad))
        x.grad = None
    print(f"RESULT nf4_compiled equal_output={torch.equal(results[0][0], results[1][0])} "
          f"equal_grad={torch.equal(results[0][1], results[1][1])}", flush=True)
    w8 = fp8.quantize_weight(weight)
    args = [w8[k] for k in ("weight", fp8.SCALE, fp8.TRANSPOSED, fp8.TRANSPOSED_SCALE)]
    out = fp8.fp8_linear(x, *args)
    ref = F.linear(x, weight)
    error = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    ms_fp8 = timed(lambda: fp8.fp8_linear(x, *args).backward(grad))
    ms_bf16 = timed(lambda: F.linear(x, weight).backward(grad))
    print(f"RESULT fp8_linear rel_error={error:.4f} fwd_bwd_ms fp8={ms_fp8:.3f} bf16={ms_bf16:.3f} "
          f"speedup={ms_bf16 / ms_fp8:.2f}", flush=True)


def layers(base: str, compiled: bool, checkpointing: bool, a: argparse.Namespace) -> None:
    torch.manual_seed(0)
    args = dataclasses.replace(LLAMA3_1_8B, num_layers=a.layers)
    lora = LoRAArgs(("q_proj", "v_proj", "output_proj"), apply_lora_to_mlp=True, quantize_base=base.startswith("nf4"),
                    fp8_base=base == "fp8")
    torch.set_default_dtype(torch.bfloat16)  # not model.to(bf16), which would turn FP8 weights into bf16
    with torch.device("cuda"):
        model = lora_llama(args, lora)
    torch.set_default_dtype(torch.float32)
    set_trainable_params(model)
    set_activation_checkpointing(model, 1 if checkpointing else 0)
    if base == "nf4_no_handoff":
        for layer in model.layers:
            nf4.keep_dequantized_weights(layer, False)
    if compiled:
        for layer in model.layers:
            layer.compile()
    model.train()
    tokens = torch.randint(0, args.vocab_size, (a.batch, a.seq), device="cuda")

    def step() -> None:
        model.hidden_states(tokens).float().pow(2).mean().backward()

    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    ms = timed(step, repeat=5, warmup=2)
    print(f"RESULT layers base={base} compile={compiled} checkpointing={checkpointing} layers={a.layers} "
          f"ms_per_layer={ms / a.layers:.2f} peak_gib={torch.cuda.max_memory_allocated() / 2**30:.2f} "
          f"wall_s={time.perf_counter() - started:.0f}", flush=True)
    del model
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--kernels-only", action="store_true", help="the kernels against their references, no layers")
    a = ap.parse_args()
    print(f"RESULT device {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    runs = [lambda: kernels()]
    for base, compiled, checkpointing in [] if a.kernels_only else [
        ("bf16", False, True), ("nf4", False, True), ("nf4_no_handoff", False, True), ("fp8", False, True),
        ("bf16", True, True), ("nf4", True, True), ("fp8", True, True), ("fp8", True, False), ("bf16", True, False),
    ]:
        runs.append(lambda b=base, c=compiled, k=checkpointing: layers(b, c, k, a))
    for run in runs:
        try:
            run()
        except Exception:
            print("RESULT error", traceback.format_exc(limit=4).replace("\n", " | ")[-1500:], flush=True)


if __name__ == "__main__":
    main()
