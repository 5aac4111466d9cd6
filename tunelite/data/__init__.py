"""Datasets configs name by `_component_`, and the collate function recipes batch them with."""

from tunelite.data.chat import chat_dataset
from tunelite.data.collate import padded_collate
from tunelite.data.instruct import alpaca_dataset, instruct_dataset
from tunelite.data.preference import preference_collate, preference_dataset
from tunelite.data.text import text_completion_dataset

__all__ = [
    "alpaca_dataset",
    "chat_dataset",
    "instruct_dataset",
    "padded_collate",
    "preference_collate",
    "preference_dataset",
    "text_completion_dataset",
]
