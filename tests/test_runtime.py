"""The runtime room: what a recipe's device setup turns on before the first CUDA allocation."""

import os

from tunelite.runtime.device import get_device


def test_the_device_setup_turns_on_expandable_segments_unless_the_user_configured_the_allocator(monkeypatch):
    # The memory estimate's allocator reserve (15%) holds only with expandable segments.
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    get_device("cpu")
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    get_device("cpu")
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
