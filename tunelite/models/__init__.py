"""Model builders by family; configs name them as `tunelite.models.<builder>`."""

from tunelite.models.llama import LoRAArgs, ModelArgs, RopeScaling, TransformerDecoder, llama, lora_llama
from tunelite.models.llama3_1 import (
    llama3_1_8b,
    llama3_1_70b,
    llama3_1_tiny,
    lora_llama3_1_8b,
    lora_llama3_1_70b,
    lora_llama3_1_tiny,
)

__all__ = [
    "LoRAArgs",
    "ModelArgs",
    "RopeScaling",
    "TransformerDecoder",
    "llama",
    "llama3_1_8b",
    "llama3_1_70b",
    "llama3_1_tiny",
    "lora_llama",
    "lora_llama3_1_8b",
    "lora_llama3_1_70b",
    "lora_llama3_1_tiny",
]
