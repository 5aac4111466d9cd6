"""Model builders by family; configs name them as `tunelite.models.<builder>`."""

from tunelite.models.llama import LoRAArgs, ModelArgs, RopeScaling, TransformerDecoder, llama, lora_llama
from tunelite.models.llama2 import llama2_7b, llama2_13b, lora_llama2_7b, lora_llama2_13b
from tunelite.models.llama3_1 import (
    llama3_1_8b,
    llama3_1_70b,
    llama3_1_tiny,
    lora_llama3_1_8b,
    lora_llama3_1_70b,
    lora_llama3_1_tiny,
    qlora_llama3_1_8b,
    qlora_llama3_1_70b,
    qlora_llama3_1_tiny,
)
from tunelite.models.llama3_2 import llama3_2_1b, llama3_2_3b, lora_llama3_2_1b, lora_llama3_2_3b

__all__ = [
    "LoRAArgs",
    "ModelArgs",
    "RopeScaling",
    "TransformerDecoder",
    "llama",
    "llama2_7b",
    "llama2_13b",
    "llama3_1_8b",
    "llama3_1_70b",
    "llama3_1_tiny",
    "llama3_2_1b",
    "llama3_2_3b",
    "lora_llama",
    "lora_llama2_7b",
    "lora_llama2_13b",
    "lora_llama3_1_8b",
    "lora_llama3_1_70b",
    "lora_llama3_1_tiny",
    "lora_llama3_2_1b",
    "lora_llama3_2_3b",
    "qlora_llama3_1_8b",
    "qlora_llama3_1_70b",
    "qlora_llama3_1_tiny",
]
