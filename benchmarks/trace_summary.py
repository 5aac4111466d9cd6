"""Where a profiled training step's GPU time goes, from the Chrome trace the recipe's profiler writes.

    python benchmarks/recipe_bench.py RECIPE CONFIG CKPT compile=True \
        "+profiler={_component_: tunelite.training.profiling.build_profiler, enabled: True, output_dir: /tmp/p, wait: 5, warmup: 1, active: 2}"
    python benchmarks/trace_summary.py /tmp/p/trace_step*.json

Prints GPU kernel time per step by kind (GEMM, attention, Triton, ...) and the top kernels, then
the GPU's idle gaps attributed to what the host was doing meanwhile: the two numbers that say
whether a step is bound by its kernels or by the Python driving them.
"""

import argparse
import collections
import json
import re
from pathlib import Path

KINDS = [("attention", r"flash|fmha|attention|sdpa"), ("gemm", r"gemm|nvjet|cutlass|sm90_xmma|splitk"),
         ("triton", r"triton"), ("optimizer", r"adam|multi_tensor"), ("copy", r"copy|memcpy|cat"),
         ("elementwise", r"elementwise|vectorized"), ("reduce", r"reduce|norm|softmax")]
HOST_CATEGORIES = ("cpu_op", "python_function", "user_annotation")


def kind(kernel: str) -> str:
    return next((name for name, pattern in KINDS if re.search(pattern, kernel.lower())), "other")


def idle_gaps(kernels: list[tuple[float, float]], min_us: float) -> list[tuple[float, float]]:
    """(start, end) of every stretch longer than min_us with no kernel running."""
    gaps, busy_until = [], kernels[0][1]
    for start, end in kernels[1:]:
        if start - busy_until > min_us:
            gaps.append((busy_until, start))
        busy_until = max(busy_until, end)
    return gaps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", type=Path)
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args()
    events = json.loads(a.trace.read_text())["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    if not kernels:
        raise SystemExit(f"{a.trace}: no GPU kernels in this trace (a CPU run, or CUDA not profiled)")
    steps = max(1, sum(e.get("cat") == "user_annotation" and e["name"].startswith("ProfilerStep#") for e in events))
    by_kind, by_name = collections.Counter(), collections.Counter()
    for e in kernels:
        by_kind[kind(e["name"])] += e["dur"]
        by_name[e["name"][:100]] += e["dur"]
    print(f"{steps} profiled steps; GPU kernel time per step {sum(by_kind.values()) / steps / 1e3:.1f} ms")
    for name, us in by_kind.most_common():
        print(f"  {name:12s} {us / steps / 1e3:8.1f} ms")
    for name, us in by_name.most_common(a.top):
        print(f"    {us / steps / 1e3:7.1f} ms  {name}")

    gaps = idle_gaps(sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels), min_us=50)
    host = [e for e in events if e.get("cat") in HOST_CATEGORIES and "dur" in e
            and not e["name"].startswith("ProfilerStep#")]
    doing = collections.Counter()
    for start, end in gaps:
        middle = (start + end) / 2
        around = [e for e in host if e["ts"] <= middle <= e["ts"] + e["dur"]]
        # The outermost op names the activity (Optimizer.step, DataLoader); inner ones are its parts.
        doing[max(around, key=lambda e: e["dur"])["name"][:90] if around else "(no host op)"] += end - start
    print(f"GPU idle per step (gaps > 50 us): {sum(e - s for s, e in gaps) / steps / 1e3:.1f} ms, while the host ran")
    for name, us in doing.most_common(a.top):
        print(f"    {us / steps / 1e3:7.1f} ms  {name}")
    gap_causes(events, steps, a.top)


def gap_causes(events: list[dict], steps: int, top: int) -> None:
    """Each gap on the main stream (> 20 us) as late (its next kernel launched after the gap began: the
    host was behind) or waiting (launched before: the GPU waited on another stream or a copy), named
    by the kernels on either side. The profiler's own host time makes gaps late that would not be
    (call 45: without it the host ran 20-25 ms ahead of the step call 41 profiled as host-bound);
    benchmarks/host_slack.py measures that margin."""
    launched = {e["args"]["correlation"]: e["ts"] + e["dur"] for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    work = [e for e in events if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy") and "dur" in e]
    main_stream = collections.Counter(e["args"].get("stream") for e in work).most_common(1)[0][0]
    work = sorted((e for e in work if e["args"].get("stream") == main_stream), key=lambda e: e["ts"])
    causes, total = collections.Counter(), collections.Counter()
    busy_until, previous = work[0]["ts"] + work[0]["dur"], work[0]
    for e in work[1:]:
        gap = e["ts"] - busy_until
        if gap > 20:
            when = launched.get(e["args"].get("correlation"))
            cause = "late" if when is None or when > busy_until else "waiting"
            total[cause] += gap
            causes[f"{cause:7s} {kind(previous['name'])}:{previous['name'][:45]} -> {e['name'][:45]}"] += gap
        if e["ts"] + e["dur"] >= busy_until:
            busy_until, previous = e["ts"] + e["dur"], e
    print("Main-stream gaps per step (> 20 us): "
          + ", ".join(f"{cause} {us / steps / 1e3:.1f} ms" for cause, us in total.items()))
    for name, us in causes.most_common(top):
        print(f"    {us / steps / 1e3:7.1f} ms  {name}")


if __name__ == "__main__":
    main()
