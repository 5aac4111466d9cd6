"""Causal GQA attention at Llama 3.1 8B's shapes: which SDPA kernel runs, how fast, how accurate.

    python benchmarks/attention_bench.py [--seqs 2x2048,1x16384,1x32768,1x65536] [--reps 5]

For each batch x length, forward plus backward of 32 query heads over 8 kv heads of 128, bf16,
laid out as the decoder lays them out (heads transposed out of (b, s, h, d)), through:
  flash, cudnn, efficient   SDPA held to one backend (`sdpa_kernel([...])`)
  default                   SDPA as torch orders its backends
  attend                    tunelite's `attend`, eager and compiled (what training runs)
and prints one line each:

    RESULT seq=1x32768 path=attend kernel=cudnn ms=... tflops=... max_err=... ref_err=...

kernel: the backend whose kernels the profiler saw; tflops: causal FLOPs (forward 2 b h s^2 d,
backward 2.5x that) over the time. Accuracy, at 1 x 4096: max_err is the largest deviation of the
output and of dq, dk, dv from an fp32 reference (SDPA's math backend on fp32 copies), ref_err the
same for bf16 math, the bar a correct bf16 kernel is judged by.
"""

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tunelite.modules.attention import attend

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def inputs(batch: int, seq: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """q, k, v as the decoder has them: (b, h, s, d) views of (b, s, h, d) projections."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(batch, seq, heads, HEAD_DIM, device="cuda", generator=g).to(dtype).transpose(1, 2)
            .requires_grad_() for heads in (HEADS, KV_HEADS, KV_HEADS)]


def sdpa(backend: str | None):
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        with sdpa_kernel([BACKENDS[backend]]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return run


def paths() -> dict:
    return {**{name: sdpa(name) for name in BACKENDS}, "default": sdpa(None),
            "attend": lambda q, k, v: attend(q, k, v, None),
            "attend-compiled": torch.compile(lambda q, k, v: attend(q, k, v, None), fullgraph=True)}


def forward_backward(run, q, k, v, grad: torch.Tensor) -> list[torch.Tensor]:
    for t in (q, k, v):
        t.grad = None
    out = run(q, k, v)
    out.backward(grad)
    return [out.detach(), q.grad, k.grad, v.grad]


def kernel_of(run, q, k, v, grad) -> str:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        forward_backward(run, q, k, v, grad)
        torch.cuda.synchronize()
    names = " ".join(e.name.lower() for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    for kernel, marks in (("cudnn", ("cudnn", "sdpa_sm90")), ("flash", ("flash",)), ("efficient", ("fmha", "mem_eff"))):
        if any(mark in names for mark in marks):
            return kernel
    return "other"


def time_ms(run, q, k, v, grad, reps: int) -> float:
    forward_backward(run, q, k, v, grad)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        forward_backward(run, q, k, v, grad)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def max_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, want))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqs", default="2x2048,1x16384,1x32768,1x65536")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version(), torch.cuda.get_device_name())
    runs = paths()
    q, k, v = inputs(1, 4096, torch.float32)
    grad = torch.randn_like(q.detach().transpose(1, 2)).transpose(1, 2)
    with sdpa_kernel([SDPBackend.MATH]):
        want = forward_backward(sdpa(None), q, k, v, grad)
        q16, k16, v16 = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
        ref_err = max_error(forward_backward(sdpa(None), q16, k16, v16, grad.bfloat16()), want)
    errors = {}
    for name, run in runs.items():
        try:
            errors[name] = max_error(forward_backward(run, q16, k16, v16, grad.bfloat16()), want)
        except RuntimeError as error:
            errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    del q, k, v, want
    for shape in args.seqs.split(","):
        batch, seq = (int(n) for n in shape.split("x"))
        q, k, v = inputs(batch, seq, torch.bfloat16)
        grad = torch.randn_like(q.detach())
        flops = 2 * batch * HEADS * seq * seq * HEAD_DIM * 3.5
        for name, run in runs.items():
            try:
                ms = time_ms(run, q, k, v, grad, args.reps)
                kernel = kernel_of(run, q, k, v, grad)
                print(f"RESULT seq={shape} path={name} kernel={kernel} ms={ms:.2f} tflops={flops / ms / 1e9:.0f} "
                      f"max_err={errors[name] if isinstance(errors[name], str) else f'{errors[name]:.2e}'} "
                      f"ref_err={ref_err:.2e}", flush=True)
            except RuntimeError as error:
                print(f"RESULT seq={shape} path={name} error=\"{str(error).splitlines()[0][:160]}\"", flush=True)
        del q, k, v, grad
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
