"""Causal GQA attention at Llama 3.1 8B's shapes: which SDPA kernel runs, how fast, how accurate.

    python benchmarks/attention_bench.py [--seqs 2x2048,1x16384,1x32768,1x65536] [--reps 5] [--model-check]

For each batch x length, forward plus backward of 32 query heads over 8 kv heads of 128, bf16,
laid out as the decoder lays them out (heads transposed out of (b, s, h, d)), through:
  flash, cudnn, efficient   SDPA held to one backend (`sdpa_kernel([...])`), with `enable_gqa`
  cudnn-repeated            cuDNN on k and v repeated to every query head
  default                   SDPA as torch orders its backends, with `enable_gqa`
  attend                    tunelite's `attend`, eager and compiled (what training runs)
and prints one line each:

    RESULT seq=1x32768 path=attend kernel=cudnn ms=... tflops=...

kernel: the backend whose kernels the profiler saw; tflops: causal FLOPs (forward 2 b h s^2 d,
backward 2.5x that) over the time. First, at 1 x 4096, each path's error, eager and compiled, each
case in a fresh process, against an fp32 reference (SDPA's math backend on fp32 copies) beside
bf16 math's, the bar a correct bf16 kernel is judged by:

    CHECK path=cudnn compiled=False grads=transposed,contiguous now=contiguous out=... dq=... dk=... dv=...

`grads`: the layouts of the output's gradient the process ran in turn (`transposed` is the
decoder's), `now` the one this line measures. With torch 2.11 and cuDNN 9.19 a second layout in
one process gets the first one's cached backward plan, and wrong gradients (docs/benchmarks.md).
`--model-check`: two Llama 3.1 8B layers with LoRA, eager and compiled under each memory policy
and under two policies at once (one process, as training runs), their LoRA gradients against eager flash attention's (`MODEL ... max_rel_grad_err=...`).
"""

import argparse
import contextlib
import dataclasses
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tunelite.models.llama import LoRAArgs, lora_llama
from tunelite.models.llama3_1 import LLAMA3_1_8B
from tunelite.modules.attention import attend
from tunelite.modules.lora import set_trainable_params
from tunelite.modules.memory_policy import KEEP, RECOMPUTE, RECOMPUTE_ATTENTION, set_memory_policy
from tunelite.training.compile import compile_layers

from layer_levers import timed  # a sibling script: run from benchmarks/, or with it on the path

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def inputs(batch: int, seq: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """q, k, v as the decoder has them: (b, h, s, d) views of (b, s, h, d) projections."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(batch, seq, heads, HEAD_DIM, device="cuda", generator=g).to(dtype).transpose(1, 2)
            .requires_grad_() for heads in (HEADS, KV_HEADS, KV_HEADS)]


def sdpa(backend: str | None, repeat: bool = False):
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if repeat:
            k, v = (t.repeat_interleave(HEADS // KV_HEADS, dim=1) for t in (k, v))
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=not repeat)
        with sdpa_kernel([BACKENDS[backend]]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=not repeat)
    return run


def paths() -> dict:
    return {**{name: sdpa(name) for name in BACKENDS}, "cudnn-repeated": sdpa("cudnn", repeat=True),
            "default": sdpa(None), "attend": lambda q, k, v: attend(q, k, v, None)}


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


def errors(got: list[torch.Tensor], want: list[torch.Tensor]) -> str:
    return " ".join(f"{name}={float((a.float() - b.float()).abs().max()):.3g}"
                    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want))


def check(path: str, compiled: bool, layouts: list[str]) -> None:
    """One path's error at 1 x 4096, for each layout of the output's gradient in turn, in this
    process: `transposed` is the decoder's (heads transposed out of (b, s, h, d)), `contiguous`
    what a test's grad tensor usually is."""
    run = paths()[path]
    q, k, v = inputs(1, 4096, torch.float32)
    grads = {"transposed": torch.randn(1, 4096, HEADS, HEAD_DIM, device="cuda").transpose(1, 2)}
    grads["contiguous"] = grads["transposed"].contiguous()
    with sdpa_kernel([SDPBackend.MATH]):
        want = forward_backward(sdpa(None), q, k, v, grads["transposed"])
        low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
        bar = errors(forward_backward(sdpa(None), *low, grads["transposed"].bfloat16()), want)
    traced = torch.compile(run, fullgraph=True) if compiled else run
    for layout in layouts:
        try:
            got = errors(forward_backward(traced, *low, grads[layout].bfloat16()), want)
        except RuntimeError as error:
            got = f"error=\"{str(error).splitlines()[0][:120]}\""
        print(f"CHECK path={path} compiled={compiled} grads={','.join(layouts)} now={layout} {got} "
              f"(bf16 math: {bar})", flush=True)


# (path, compiled, gradient layouts in turn), each in a fresh process: cuDNN caches its backward
# plan per shape and not per gradient layout, so a case run after another would inherit its plan.
CHECKS = [(path, compiled, layouts) for path in ("flash", "cudnn", "default", "attend")
          for compiled, layouts in ((False, "transposed"), (False, "contiguous"), (True, "transposed"))] + [
    ("cudnn", False, "transposed,contiguous"), ("cudnn", False, "contiguous,transposed")]


def model_check() -> None:
    """Two 8B layers with LoRA: LoRA gradients, eager and compiled per pair of policies, against eager flash."""
    def grads(compiled: bool, policies: tuple[str, str], flash: bool) -> tuple[float, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        torch._dynamo.reset()
        torch.set_default_dtype(torch.bfloat16)
        with torch.device("cuda"):
            model = lora_llama(dataclasses.replace(LLAMA3_1_8B, num_layers=2),
                               LoRAArgs(("q_proj", "k_proj", "v_proj", "output_proj"), apply_lora_to_mlp=True))
        torch.set_default_dtype(torch.float32)
        set_trainable_params(model)
        for name, p in model.named_parameters():
            if "lora_b" in name:  # nonzero, so every adapter's gradient depends on attention's
                torch.nn.init.normal_(p, std=0.02)
        set_memory_policy(model, policies)
        if compiled:
            compile_layers(model)
        tokens = torch.randint(0, 1000, (1, 4097), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]) if flash else contextlib.nullcontext():
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
            loss.backward()
        return loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}

    ref_loss, ref = grads(False, (KEEP, KEEP), True)
    for compiled in (False, True):
        for policies in ((KEEP, KEEP), (RECOMPUTE, RECOMPUTE), (RECOMPUTE_ATTENTION, RECOMPUTE_ATTENTION),
                         (KEEP, RECOMPUTE_ATTENTION)):
            for flash in (True, False):
                case = f"MODEL compiled={compiled} policies={','.join(policies)} sdpa={'flash' if flash else 'any'}"
                try:
                    loss, got = grads(compiled, policies, flash)
                except RuntimeError as error:
                    print(f"{case} error=\"{str(error).splitlines()[0][:160]}\"", flush=True)
                    continue
                worst = max(float((got[n] - ref[n]).norm() / ref[n].norm()) for n in ref)
                print(f"{case} loss={loss:.5f} (eager flash {ref_loss:.5f}) max_rel_grad_err={worst:.3g}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqs", default="2x2048,1x16384,1x32768,1x65536")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--model-check", action="store_true")
    parser.add_argument("--check", nargs=3, metavar=("PATH", "COMPILED", "LAYOUTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.check:
        check(args.check[0], args.check[1] == "True", args.check[2].split(","))
        return
    print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version(), torch.cuda.get_device_name())
    for path, compiled, layouts in CHECKS:
        done = subprocess.run([sys.executable, __file__, "--check", path, str(compiled), layouts],
                              capture_output=True, text=True)
        print("\n".join(line for line in done.stdout.splitlines() if line.startswith("CHECK"))
              or f"CHECK path={path} compiled={compiled} grads={layouts} error=\"{done.stderr.strip()[-160:]}\"",
              flush=True)
    if args.model_check:
        model_check()
    runs = paths()
    compiled_attend = torch.compile(runs["attend"], fullgraph=True)
    for shape in args.seqs.split(","):
        batch, seq = (int(n) for n in shape.split("x"))
        q, k, v = inputs(batch, seq, torch.bfloat16)
        grad = torch.randn_like(q.detach())
        flops = 2 * batch * HEADS * seq * seq * HEAD_DIM * 3.5
        for name, run in {**runs, "attend-compiled": compiled_attend}.items():
            try:
                ms = timed(lambda: forward_backward(run, q, k, v, grad), repeat=args.reps, warmup=1)
                print(f"RESULT seq={shape} path={name} kernel={kernel_of(run, q, k, v, grad)} ms={ms:.2f} "
                      f"tflops={flops / ms / 1e9:.0f}", flush=True)
            except RuntimeError as error:
                print(f"RESULT seq={shape} path={name} error=\"{str(error).splitlines()[0][:160]}\"", flush=True)
        del q, k, v, grad
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
