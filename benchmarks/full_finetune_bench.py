"""Full fine-tuning throughput with the overlapped CPU AdamW, and the CPU kernels it runs.

On a GPU, a full fine-tune of an HF checkpoint (bf16 weights, activation checkpointing, the
chunked loss) on random fixed-length samples, written out as a recipe's loop, with
`tunelite.training.offload_optimizer.OverlappedCPUAdamW`:

    python ../shared/bench/make_random_ckpt.py /tmp/ck --size 8b
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python benchmarks/full_finetune_bench.py /tmp/ck \\
        [--batch 2] [--seq 2048] [--accumulation 8] [--steps 4] [--warmup 1] [--clip 1.0] \\
        [--accumulation-dtype fp32|bf16] [--chunk-size 4194304] [--cpu-threads N] [--accumulate-on-device]

prints one `RESULT` line: tokens/s over the steps after warm-up (batch x seq x accumulation per
step), peak allocated / reserved GPU memory and peak host RSS since loading finished, and where
the host waited: `norm_wait_s` (per step, for the last gradients to be added after backward),
`forward_wait_s` (per step, the forward's wait for updated weights: the GPU's idle time, near
enough), `update_s` (per step, the worker's first update to its last weight sent back).

Before trusting a new path's speed, its numbers: `--check` trains a small Llama (two layers of
256) on the device for 3 steps of 3 micro-batches with the optimizer as configured (e.g. with
`--accumulate-on-device`, whose copies run on CUDA streams) and with torch's fused AdamW, and
prints the largest difference between their weights (`RESULT bench=full_finetune_check ...`;
fp32, so differences of ~1e-7 are rounding).

On a GPU, the rate the link between host and device gives what the optimizer moves (`--pcie`):
pinned copies of 1 GiB device-to-host, host-to-device, and both at once on two streams (a
micro-batch's gradients leave while the weights or offloaded activations come back).

On any machine, the CPU side alone (what the brief's "whichever is faster" compares):

    python benchmarks/full_finetune_bench.py --cpu-kernels [--numel 268435456] [--cpu-threads N]

times, on `--numel` fp32 values: torch.optim.AdamW(fused=True).step(), torch._fused_adamw_ on the
whole tensor and chunk by chunk, the conversions between fp32 and bf16, the optimizer's chunked
update (`adamw_update`, of a bf16 gradient), its accumulation of a bf16 gradient into fp32
(`accumulate`) and the squared norm it takes once a step, at several chunk sizes, and the
accumulation into bf16 (one whole-tensor add).
"""

import argparse
import copy
import dataclasses
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from tunelite.checkpointing import HFCheckpointer
from tunelite.checkpointing.loading import load_checkpoint_into
from tunelite.config import instantiate
from tunelite.models.decoder import decoder
from tunelite.models.llama import set_activation_checkpointing
from tunelite.models.llama3_1 import LLAMA3_1_8B
from tunelite.modules.loss import LinearCrossEntropyLoss
from tunelite.training.offload_optimizer import (
    ACCUMULATION_DTYPES,
    CHUNK_SIZE,
    OverlappedCPUAdamW,
    accumulate,
    adamw_update,
    forward_blocks,
    squared_norm,
)

GIB = 2**30


def host_rss(field: str) -> int:
    """VmRSS (resident bytes now) or VmHWM (their peak) from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> bool:
    """Restarts the kernel's peak-RSS count (VmHWM), so the peak is training's, not loading's (the
    checkpoint passes through host memory). False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def best_seconds(run: object, reps: int) -> float:
    """The fastest of `reps` runs: the one least disturbed by other work on the machine."""
    run()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def cpu_kernels(numel: int, chunk_sizes: list[int], reps: int) -> None:
    settings = {"lr": 2e-5, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}
    master, grad = torch.randn(numel), torch.randn(numel)
    exp_avg, exp_avg_sq, step = torch.zeros(numel), torch.zeros(numel), torch.zeros(())
    weights_out, grad_bf16 = torch.empty(numel, dtype=torch.bfloat16), torch.randn(numel, dtype=torch.bfloat16)
    param = torch.nn.Parameter(master.clone())
    param.grad = grad.clone()
    torch_fused = torch.optim.AdamW([param], fused=True, **{k: v for k, v in settings.items() if "beta" not in k})

    def raw() -> None:
        step.add_(1)
        torch._fused_adamw_([master], [grad], [exp_avg], [exp_avg_sq], [], [step], amsgrad=False, maximize=False,
                            **settings)

    rows = [("torch.optim.AdamW(fused=True).step()", best_seconds(torch_fused.step, reps)),
            ("torch._fused_adamw_, whole tensor", best_seconds(raw, reps))]
    whole = torch.empty(numel)
    rows.append(("whole tensors: bf16 gradient to fp32, fused, bf16 out",
                 best_seconds(lambda: (whole.copy_(grad_bf16), raw(), weights_out.copy_(master)), reps)))
    rows.append(("copy fp32 to bf16, whole tensor", best_seconds(lambda: weights_out.copy_(master), reps)))
    rows.append(("copy bf16 to fp32, whole tensor", best_seconds(lambda: whole.copy_(grad_bf16), reps)))
    for size in chunk_sizes:
        scratch = torch.empty(size)

        def fused_chunks() -> None:
            step.add_(1)
            for lo in range(0, numel, size):
                torch._fused_adamw_([master[lo:lo + size]], [grad[lo:lo + size]], [exp_avg[lo:lo + size]],
                                    [exp_avg_sq[lo:lo + size]], [], [step], amsgrad=False, maximize=False, **settings)

        rows.append((f"torch._fused_adamw_, chunks of 2^{size.bit_length() - 1}", best_seconds(fused_chunks, reps)))
        rows.append((f"adamw_update, chunks of 2^{size.bit_length() - 1}, bf16 gradient in",
                     best_seconds(lambda: adamw_update(master, grad_bf16, exp_avg, exp_avg_sq, step, scratch, settings,
                                                         None), reps)))
        rows.append((f"accumulate bf16 into fp32, chunks of 2^{size.bit_length() - 1}",
                     best_seconds(lambda: accumulate(grad, grad_bf16, False, scratch), reps)))
        rows.append((f"squared norm of bf16, chunks of 2^{size.bit_length() - 1}",
                     best_seconds(lambda: squared_norm(grad_bf16, scratch), reps)))
    accum_bf16 = grad_bf16.clone()
    rows.append(("accumulate bf16 into bf16", best_seconds(lambda: accumulate(accum_bf16, grad_bf16, False, grad), reps)))
    print(f"{numel} fp32 values, {torch.get_num_threads()} threads, best of {reps}:")
    for name, seconds in rows:
        print(f"  {name:<48} {seconds * 1e3:9.1f} ms  {numel / seconds / 1e9:6.2f} G values/s")


def pcie(reps: int) -> None:
    host = torch.empty(GIB, dtype=torch.uint8, pin_memory=True)
    back = torch.empty(GIB, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(GIB, dtype=torch.uint8, device="cuda")
    other = torch.empty(GIB, dtype=torch.uint8, device="cuda")
    down, up = torch.cuda.Stream(), torch.cuda.Stream()

    def copies(*directions: str) -> None:
        for direction in directions:
            with torch.cuda.stream(down if direction == "d2h" else up):
                (host.copy_(device, non_blocking=True) if direction == "d2h"
                 else other.copy_(back, non_blocking=True))
        torch.cuda.synchronize()

    for directions in (("d2h",), ("h2d",), ("d2h", "h2d")):
        seconds = best_seconds(lambda: copies(*directions), reps)
        print(f"RESULT bench=pcie copies={'+'.join(directions)} gib_per_s_each={1 / seconds:.1f}", flush=True)


def train(a: argparse.Namespace) -> None:
    device, dtype = torch.device(a.device), torch.bfloat16
    cuda = device.type == "cuda"
    with torch.device("meta"):
        model = instantiate(OmegaConf.create({"_component_": a.model}))
    load_checkpoint_into(model, HFCheckpointer(a.checkpoint), device, dtype)
    set_activation_checkpointing(model, 1)
    loss_fn = LinearCrossEntropyLoss(num_chunks=8)
    times: dict[str, list[float]] = {"stepped": [], "weight_copied": []}

    def on_event(kind: str, index: int) -> None:
        if kind in times:
            times[kind].append(time.perf_counter())

    optimizer = OverlappedCPUAdamW(model.parameters(), lr=2e-5, weight_decay=0.01,
                                   accumulation_dtype=ACCUMULATION_DTYPES[a.accumulation_dtype],
                                   chunk_size=a.chunk_size, on_event=on_event,
                                   accumulate_on_device=a.accumulate_on_device)
    # The forward's wait for weights: a hook before the optimizer's and one after it, per block.
    forward_wait, entered = [0.0], [0.0]
    blocks = list(forward_blocks(model))
    for block in blocks:
        block.register_forward_pre_hook(lambda *_: entered.__setitem__(0, time.perf_counter()))
    optimizer.wait_in_forward(model)
    for block in blocks:
        block.register_forward_pre_hook(lambda *_: forward_wait.__setitem__(0, forward_wait[0] + time.perf_counter()
                                                                            - entered[0]))
    generator = torch.Generator().manual_seed(0)
    vocab = model.args.vocab_size
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss_reset = reset_peak_rss()
    norm_wait, loss = 0.0, torch.zeros(())
    start = time.perf_counter()
    for step in range(a.warmup + a.steps):
        if step == a.warmup:  # every timed step then pays one forward/backward and one update
            optimizer.wait()
            if cuda:
                torch.cuda.synchronize()
            start, norm_wait, forward_wait[0] = time.perf_counter(), 0.0, 0.0
            times = {kind: [] for kind in times}
        for _ in range(a.accumulation):
            tokens = torch.randint(0, vocab, (a.batch, a.seq), generator=generator).to(device, non_blocking=True)
            loss = loss_fn(model.hidden_states(tokens), tokens, model.output) / a.accumulation
            loss.backward()
        waited = time.perf_counter()
        norm = optimizer.total_grad_norm()
        norm_wait += time.perf_counter() - waited
        if torch.isfinite(loss) and torch.isfinite(norm):
            if a.clip:
                optimizer.clip_grads_with_norm_(a.clip, norm)
            optimizer.step()
        optimizer.zero_grad()
    optimizer.wait()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    steps = a.steps
    params = len(list(model.parameters()))
    update = sum(times["weight_copied"][(i + 1) * params - 1] - times["stepped"][i * params] for i in range(steps))
    print(f"RESULT bench=full_finetune optimizer=overlapped_cpu_adamw batch={a.batch} seq={a.seq} "
          f"accumulation={a.accumulation} accumulation_dtype={a.accumulation_dtype} clip={a.clip} "
          f"accumulate_on_device={a.accumulate_on_device} "
          f"chunk_size={a.chunk_size} cpu_threads={torch.get_num_threads()} steps={steps} "
          f"tokens_per_s={steps * a.accumulation * a.batch * a.seq / seconds:.0f} "
          f"peak_alloc_gib={torch.cuda.max_memory_allocated() / GIB if cuda else 0:.2f} "
          f"peak_reserved_gib={torch.cuda.max_memory_reserved() / GIB if cuda else 0:.2f} "
          f"host_rss_gib={host_rss('VmRSS') / GIB:.1f} peak_host_rss_gib={host_rss('VmHWM') / GIB:.1f} "
          f"peak_host_rss_since={'loaded' if rss_reset else 'start'} "
          f"norm_wait_s={norm_wait / steps:.2f} forward_wait_s={forward_wait[0] / steps:.2f} "
          f"update_s={update / steps:.2f} step_s={seconds / steps:.2f} loss={loss.item() * a.accumulation:.4f}",
          flush=True)


def check(a: argparse.Namespace) -> None:
    """The optimizer as configured against torch's fused AdamW, on a small fp32 Llama on the device."""
    device = torch.device(a.device)
    args = dataclasses.replace(LLAMA3_1_8B, num_layers=2, embed_dim=256, num_heads=4, num_kv_heads=2,
                               intermediate_dim=512, vocab_size=1000)
    torch.manual_seed(0)
    with device:
        ours = decoder(args)
    reference = copy.deepcopy(ours)
    optimizer = OverlappedCPUAdamW(ours.parameters(), lr=1e-3, weight_decay=0.01,
                                   accumulation_dtype=ACCUMULATION_DTYPES[a.accumulation_dtype],
                                   chunk_size=min(a.chunk_size, 4096), accumulate_on_device=a.accumulate_on_device)
    optimizer.wait_in_forward(ours)
    fused = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.01, fused=True)
    loss_fn = LinearCrossEntropyLoss(num_chunks=2)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        window = [torch.randint(0, args.vocab_size, (2, 64), generator=g).to(device) for _ in range(3)]
        for model in (ours, reference):
            for tokens in window:
                (loss_fn(model.hidden_states(tokens), tokens, model.output) / len(window)).backward()
        norm = optimizer.total_grad_norm()
        optimizer.clip_grads_with_norm_(a.clip, norm)
        optimizer.step()
        optimizer.zero_grad()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), a.clip)
        fused.step()
        fused.zero_grad()
    optimizer.wait()
    difference = max((p - q).abs().max().item() for p, q in zip(ours.parameters(), reference.parameters()))
    print(f"RESULT bench=full_finetune_check device={device.type} accumulation_dtype={a.accumulation_dtype} "
          f"accumulate_on_device={a.accumulate_on_device} max_weight_diff={difference:.3g}", flush=True)
    optimizer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", help="HF-layout model folder (not with --cpu-kernels)")
    ap.add_argument("--model", default="tunelite.models.llama3_1_8b")
    ap.add_argument("--device", default="cuda", help="cpu runs the same loop (a smoke test on a tiny model)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--accumulation", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--clip", type=float, default=1.0, help="max gradient norm; 0 for none")
    ap.add_argument("--accumulation-dtype", choices=sorted(ACCUMULATION_DTYPES), default="fp32")
    ap.add_argument("--chunk-size", type=int, default=CHUNK_SIZE)
    ap.add_argument("--cpu-threads", type=int, help="torch's intra-op threads (default: torch's choice)")
    ap.add_argument("--accumulate-on-device", action="store_true",
                    help="micro-batches after the first are added into the host accumulators on the device")
    ap.add_argument("--check", action="store_true", help="the optimizer's weights against torch AdamW's, small model")
    ap.add_argument("--cpu-kernels", action="store_true", help="time the CPU kernels only")
    ap.add_argument("--pcie", action="store_true", help="time pinned copies between host and device only")
    ap.add_argument("--numel", type=int, default=2**28)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    if a.cpu_threads:
        torch.set_num_threads(a.cpu_threads)
    if a.cpu_kernels:
        cpu_kernels(a.numel, [2**20, 2**22, 2**24], a.reps)
    elif a.pcie:
        pcie(a.reps)
    elif a.check:
        check(a)
    elif a.checkpoint:
        train(a)
    else:
        ap.error("give a checkpoint folder, or --cpu-kernels")


if __name__ == "__main__":
    main()
