"""How far the host runs ahead of the GPU in a training step, measured without a profiler (a profiler
adds host time to every op and launch, so its traces show the host behind where it may not be).

Adds host time where the step spends it and runs recipe_bench.py: if the step slows by what was
added, the host was the bottleneck there; if not, the GPU had that much queued work to hide it.

    python benchmarks/host_slack.py --dequant-us 100 lora_finetune_single_device \
        llama3_1/8B_qlora_single_device CKPT_DIR compile=True   # + recipe_bench.py's arguments

--dequant-us busy-waits that long in each NF4 dequantization (445 a compiled QLoRA step at 2 x 2048,
most in backward); --step-ms before the step's verdict, between the backward and the optimizer.
Call 45 (docs/benchmarks.md) measured a compiled QLoRA step so: the host ran 20-25 ms ahead.
"""

import argparse
import sys
import time
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recipe_bench  # noqa: E402

from tunelite.training import nonfinite  # noqa: E402


def _delay(module: ModuleType, name: str, seconds: float) -> None:
    """Makes every call of module.name busy-wait `seconds` on the host first (not sleep: a sleeping
    thread would give the host time it does not have)."""
    function = getattr(module, name)

    def delayed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        until = time.perf_counter() + seconds
        while time.perf_counter() < until:
            pass
        return function(*args, **kwargs)

    setattr(module, name, delayed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dequant-us", type=float, default=0.0)
    ap.add_argument("--step-ms", type=float, default=0.0)
    a, rest = ap.parse_known_args()
    if a.dequant_us:
        from tunelite.modules import nf4_kernel  # the GPU's kernel, which nf4's op looks up at each call

        _delay(nf4_kernel, "dequantize_nf4_cuda", a.dequant_us / 1e6)
    if a.step_ms:
        _delay(nonfinite, "bad_step", a.step_ms / 1e3)  # the recipe imports it when it runs
    sys.argv = [sys.argv[0], *rest]
    recipe_bench.main()


if __name__ == "__main__":
    main()
