"""Mistral 7B sizes (HF config.json of mistralai/Mistral-7B-v0.3 and -v0.1).

Llama's layout with 8 kv heads. v0.3 (and its Instruct) has a 32,768-token vocabulary, RoPE at
base 1,000,000 and full attention; v0.1 a 32,000-token vocabulary, base 10,000 and a 4096-token
sliding window in every layer.
"""

from tunelite.models.builders import builders
from tunelite.models.decoder import ModelArgs

_MISTRAL_7B = dict(model_type="mistral", num_layers=32, num_heads=32, num_kv_heads=8, embed_dim=4096,
                   intermediate_dim=14_336, max_seq_len=32_768, norm_eps=1e-5)

MISTRAL_7B = ModelArgs(vocab_size=32_768, rope_base=1_000_000.0, **_MISTRAL_7B)
MISTRAL_7B_V0_1 = ModelArgs(vocab_size=32_000, rope_base=10_000.0, sliding_window=4096, **_MISTRAL_7B)

mistral_7b, lora_mistral_7b, qlora_mistral_7b = builders(MISTRAL_7B, "mistral_7b")
mistral_7b_v0_1, lora_mistral_7b_v0_1, qlora_mistral_7b_v0_1 = builders(MISTRAL_7B_V0_1, "mistral_7b_v0_1")
