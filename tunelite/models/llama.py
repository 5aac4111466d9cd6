"""The one decoder under the Llama names it had before other families joined it
(tunelite/models/decoder.py): `llama(args)` and `lora_llama(args, lora)` are its builders, and code
that imports the decoder's classes from here keeps working."""

from tunelite.models.decoder import (
    LoRAArgs,
    ModelArgs,
    RopeScaling,
    TransformerDecoder,
    set_activation_checkpointing,
)
from tunelite.models.decoder import decoder as llama
from tunelite.models.decoder import lora_decoder as lora_llama

__all__ = ["LoRAArgs", "ModelArgs", "RopeScaling", "TransformerDecoder", "llama", "lora_llama",
           "set_activation_checkpointing"]
