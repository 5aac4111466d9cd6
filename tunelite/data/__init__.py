"""Datasets configs name by `_component_`, and the collate function recipes batch them with."""

from tunelite.data.collate import padded_collate
from tunelite.data.instruct import alpaca_dataset

__all__ = ["alpaca_dataset", "padded_collate"]
