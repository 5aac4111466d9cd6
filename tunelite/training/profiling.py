"""An optional torch.profiler trace of a few training steps, switched on from the config."""

from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, schedule


class _NoProfiler:
    def __enter__(self) -> "_NoProfiler":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def step(self) -> None:
        pass


def build_profiler(
    enabled: bool = False, output_dir: str = "profile", wait: int = 1, warmup: int = 1, active: int = 2
) -> Any:
    """A context whose `step()` the recipe calls once per optimizer step. When enabled, it skips
    `wait` steps, warms up for `warmup`, then records `active` steps (CPU and CUDA, shapes and
    memory) into a Chrome/Perfetto trace in output_dir, viewable at ui.perfetto.dev."""
    if not enabled:
        return _NoProfiler()
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])

    def save(prof: profile) -> None:
        prof.export_chrome_trace(str(folder / f"trace_step{prof.step_num}.json"))

    return profile(activities=activities, schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=1),
                   on_trace_ready=save, record_shapes=True, profile_memory=True, with_stack=False)
