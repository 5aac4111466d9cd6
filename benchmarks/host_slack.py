"""How far the host runs ahead of the GPU in a training step, measured without a profiler (a profiler
adds host time to every op and launch, so its traces show the host behind where it may not be).

Adds host time where the step spends it and runs recipe_bench.py: if the step slows by what was
added, the host was the bottleneck there; if not, the GPU had that much queued work to hide it.

    python benchmarks/host_slack.py --dequant-us 100 lora_finetune_single_device \
        llama3_1/8B_qlora_single_device CKPT_DIR compile=True   # + recipe_bench.py's arguments

--dequant-us busy-waits that long in each NF4 dequantization (445 a compiled QLoRA step at 2 x 2048,
most in backward); --step-ms before the step's verdict, between the backward and the optimizer.
--gpu-only makes the recipe's profiler (`+profiler={...}`) record the GPU's activity alone, without
the host's ops, shapes and memory, which slow the host it means to observe; trace_summary.py then
says of each idle gap whether the host was late to launch its next kernel or the GPU waited.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recipe_bench  # noqa: E402

from tunelite.training import nonfinite  # noqa: E402


def _busy(seconds: float) -> None:
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dequant-us", type=float, default=0.0)
    ap.add_argument("--step-ms", type=float, default=0.0)
    ap.add_argument("--gpu-only", action="store_true")
    a, rest = ap.parse_known_args()
    if a.gpu_only:
        import torch

        from tunelite.training import profiling

        def gpu_only(*args, activities, record_shapes, profile_memory, **kwargs):  # noqa: ANN002, ANN003, ANN202
            return torch.profiler.profile(*args, activities=[torch.profiler.ProfilerActivity.CUDA], **kwargs)

        profiling.profile = gpu_only
    if a.dequant_us:
        from tunelite.modules import nf4_kernel

        dequantize = nf4_kernel.dequantize_nf4_cuda

        def slowed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            _busy(a.dequant_us / 1e6)
            return dequantize(*args, **kwargs)

        nf4_kernel.dequantize_nf4_cuda = slowed
    if a.step_ms:
        bad_step = nonfinite.bad_step

        def late(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            _busy(a.step_ms / 1e3)
            return bad_step(*args, **kwargs)

        nonfinite.bad_step = late
    sys.argv = [sys.argv[0], *rest]
    recipe_bench.main()


if __name__ == "__main__":
    main()
