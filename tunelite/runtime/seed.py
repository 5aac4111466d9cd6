"""Seeding, so two runs of one config see the same data order and initial adapters."""

import random

import torch


def set_seed(seed: int) -> torch.Generator:
    """Seeds Python and torch, and returns a generator for the data order alone, so changing the
    model (say, a dropout) does not change which samples come next."""
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
