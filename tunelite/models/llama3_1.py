"""Llama 3.1 sizes (HF config.json of meta-llama/Llama-3.1-*), plus the tiny CPU demo model."""

from tunelite.models.builders import builders
from tunelite.models.decoder import ModelArgs, RopeScaling

_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)

LLAMA3_1_8B = ModelArgs(
    vocab_size=128_256, num_layers=32, num_heads=32, num_kv_heads=8, embed_dim=4096,
    intermediate_dim=14_336, max_seq_len=131_072, rope_base=500_000.0, rope_scaling=_ROPE,
)
LLAMA3_1_70B = ModelArgs(
    vocab_size=128_256, num_layers=80, num_heads=64, num_kv_heads=8, embed_dim=8192,
    intermediate_dim=28_672, max_seq_len=131_072, rope_base=500_000.0, rope_scaling=_ROPE,
)
# The embedded demo: the Llama 3.1 architecture at a size a laptop CPU trains in seconds, over the
# 512-rank BPE shipped in tunelite/assets/tiny plus Llama 3's 256 special tokens.
LLAMA3_1_TINY = ModelArgs(
    vocab_size=768, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=128, intermediate_dim=384,
    max_seq_len=2048, rope_base=500_000.0,
    rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=256),
)

llama3_1_8b, lora_llama3_1_8b, qlora_llama3_1_8b = builders(LLAMA3_1_8B, "llama3_1_8b")
llama3_1_70b, lora_llama3_1_70b, qlora_llama3_1_70b = builders(LLAMA3_1_70B, "llama3_1_70b")
llama3_1_tiny, lora_llama3_1_tiny, qlora_llama3_1_tiny = builders(LLAMA3_1_TINY, "llama3_1_tiny")
