"""The runtime room: what a recipe's device setup turns on before the first CUDA allocation."""

import os
import types

import torch

from tunelite.runtime.device import cap_memory, get_device


def test_the_device_setup_turns_on_expandable_segments_unless_the_user_configured_the_allocator(monkeypatch):
    # The memory estimate's allocator reserve (15%) holds only with expandable segments.
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    get_device("cpu")
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    get_device("cpu")
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"


def test_the_memory_cap_goes_to_the_current_gpu_when_the_device_names_none(monkeypatch):
    # long_context_bench passes torch.device("cuda"); torch wants an index (call 29 failed so)
    capped = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=2**40))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda fraction, device: capped.append(
        (fraction, device)))
    cap_memory(torch.device("cuda"), 22)
    cap_memory(torch.device("cuda", 0), 22)
    cap_memory(torch.device("cpu"), 22)
    assert capped == [(22 / 1024, torch.device("cuda", 1)), (22 / 1024, torch.device("cuda", 0))]
