"""Llama 2 sizes (HF config.json of meta-llama/Llama-2-7b-hf and -13b-hf).

Multi-head attention (as many kv heads as heads), a 32,000-token SentencePiece vocabulary,
a 4096-token window and plain RoPE at base 10,000 with no scaling.
"""

from tunelite.models.builders import builders
from tunelite.models.decoder import ModelArgs

LLAMA2_7B = ModelArgs(
    vocab_size=32_000, num_layers=32, num_heads=32, num_kv_heads=32, embed_dim=4096,
    intermediate_dim=11_008, max_seq_len=4096, norm_eps=1e-5, rope_base=10_000.0,
)
LLAMA2_13B = ModelArgs(
    vocab_size=32_000, num_layers=40, num_heads=40, num_kv_heads=40, embed_dim=5120,
    intermediate_dim=13_824, max_seq_len=4096, norm_eps=1e-5, rope_base=10_000.0,
)

llama2_7b, lora_llama2_7b, qlora_llama2_7b = builders(LLAMA2_7B, "llama2_7b")
llama2_13b, lora_llama2_13b, qlora_llama2_13b = builders(LLAMA2_13B, "llama2_13b")
