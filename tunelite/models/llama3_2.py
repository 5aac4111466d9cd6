"""Llama 3.2 text sizes (HF config.json of meta-llama/Llama-3.2-1B and -3B).

Both tie the output projection to the embedding and stretch RoPE 32-fold from an 8192-token
pre-training window; only the sizes below tell them from Llama 3.1.
"""

from tunelite.models.builders import builders
from tunelite.models.decoder import ModelArgs, RopeScaling

_ROPE = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)

LLAMA3_2_1B = ModelArgs(
    vocab_size=128_256, num_layers=16, num_heads=32, num_kv_heads=8, embed_dim=2048,
    intermediate_dim=8192, max_seq_len=131_072, rope_base=500_000.0, rope_scaling=_ROPE,
    tie_word_embeddings=True, head_dim=64,
)
LLAMA3_2_3B = ModelArgs(
    vocab_size=128_256, num_layers=28, num_heads=24, num_kv_heads=8, embed_dim=3072,
    intermediate_dim=8192, max_seq_len=131_072, rope_base=500_000.0, rope_scaling=_ROPE,
    tie_word_embeddings=True, head_dim=128,
)

llama3_2_1b, lora_llama3_2_1b, qlora_llama3_2_1b = builders(LLAMA3_2_1B, "llama3_2_1b")
llama3_2_3b, lora_llama3_2_3b, qlora_llama3_2_3b = builders(LLAMA3_2_3B, "llama3_2_3b")
