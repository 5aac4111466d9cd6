"""The one decoder under the Llama names it had before other families joined it
(tunelite/models/decoder.py): `llama(args)` and `lora_llama(args, lora)` are its builders, and code
that imports the decoder's classes and functions from here keeps working."""

from tunelite.models.decoder import (
    Attention,
    FeedForward,
    KVCache,
    LoRAArgs,
    ModelArgs,
    RMSNorm,
    RopeScaling,
    RotaryEmbedding,
    TiedOutput,
    TransformerDecoder,
    TransformerLayer,
    apply_rotary,
    cache_causal_mask,
    plain_linear,
    rope_inverse_frequencies,
    set_activation_checkpointing,
)
from tunelite.models.decoder import decoder as llama
from tunelite.models.decoder import lora_decoder as lora_llama

__all__ = ["Attention", "FeedForward", "KVCache", "LoRAArgs", "ModelArgs", "RMSNorm", "RopeScaling", "RotaryEmbedding",
           "TiedOutput", "TransformerDecoder", "TransformerLayer", "apply_rotary", "cache_causal_mask", "llama",
           "lora_llama", "plain_linear", "rope_inverse_frequencies", "set_activation_checkpointing"]
