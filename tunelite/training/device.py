"""Device, precision and memory facts every recipe reports the same way."""

import torch

from tunelite.errors import ConfigError

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def get_device(name: str = "auto") -> torch.device:
    """`auto` takes the GPU when there is one, so one config runs on a laptop and on a GPU box."""
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


def peak_memory_gib(device: torch.device) -> dict[str, float]:
    """Peak allocated and reserved GPU memory since the last reset, in GiB (empty on the CPU)."""
    if device.type != "cuda":
        return {}
    return {
        "peak_alloc_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
    }
