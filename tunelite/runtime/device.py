"""Device, precision and memory facts every recipe reports the same way."""

import os
import resource

import torch

from tunelite.errors import ConfigError

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def get_device(name: str = "auto") -> torch.device:
    """`auto` takes the GPU when there is one, so one config runs on a laptop and on a GPU box.

    Turns on the CUDA allocator's expandable segments unless PYTORCH_CUDA_ALLOC_CONF says
    otherwise: long samples, offloading and FSDP's gathers allocate blocks of many sizes, which
    fragment the default allocator (reserved memory 37-47% above what a step allocates, against
    1-13% with expandable segments), and the memory estimate counts on the smaller reserve."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} asked for, but torch sees no CUDA GPU; use device: cpu or auto")
    return device


def get_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in _DTYPES:
        raise ConfigError(f"dtype: {name!r} is not one of {sorted(_DTYPES)}")
    dtype = _DTYPES[name]
    if dtype == torch.float16:
        raise ConfigError("dtype: fp16 needs loss scaling that tunelite does not do; use bf16 (or fp32)")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("dtype: bf16 is not supported by this GPU; use fp32")
    return dtype


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak GPU memory (allocated and reserved, since the last reset) and the process's peak host
    memory, in GiB: what decides whether a config fits a card and a PC."""
    stats = {"peak_host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        stats["peak_alloc_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        stats["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    return stats


def reset_peak_memory(device: torch.device) -> None:
    """Start measuring peaks from here: training's peak, not loading's."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def cap_memory(device: torch.device, gib: float) -> None:
    """Caps the CUDA caching allocator's reserved memory on `device` at `gib`, as a card of that
    size would hold it (the allocator frees its cache and retries before it goes past the cap):
    how the benchmarks measure a 24 GB card on a larger one. Nothing off CUDA."""
    if device.type == "cuda":
        if device.index is None:  # "cuda": the current one (set_per_process_memory_fraction wants an index)
            device = torch.device("cuda", torch.cuda.current_device())
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(gib * 2**30 / total, device)
