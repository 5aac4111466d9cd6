"""Qwen 3 dense sizes (HF config.json of Qwen/Qwen3-*, as torchtune's qwen3 builders state them).

Qwen 2.5's layout without the q/k/v biases and with an RMSNorm over each head of q and k before
RoPE; heads are 128 wide whatever the hidden size. Up to 4B the output is tied to the embedding.
"""

from tunelite.models.builders import builders
from tunelite.models.decoder import ModelArgs

_QWEN3 = dict(model_type="qwen3", qk_norm=True, head_dim=128, norm_eps=1e-6, rope_base=1_000_000.0,
              max_seq_len=40_960)

QWEN3_0_6B = ModelArgs(vocab_size=151_936, num_layers=28, num_heads=16, num_kv_heads=8, embed_dim=1024,
                       intermediate_dim=3072, tie_word_embeddings=True, **_QWEN3)
QWEN3_1_7B = ModelArgs(vocab_size=151_936, num_layers=28, num_heads=16, num_kv_heads=8, embed_dim=2048,
                       intermediate_dim=6144, tie_word_embeddings=True, **_QWEN3)
QWEN3_4B = ModelArgs(vocab_size=151_936, num_layers=36, num_heads=32, num_kv_heads=8, embed_dim=2560,
                     intermediate_dim=9728, tie_word_embeddings=True, **_QWEN3)
QWEN3_8B = ModelArgs(vocab_size=151_936, num_layers=36, num_heads=32, num_kv_heads=8, embed_dim=4096,
                     intermediate_dim=12_288, **_QWEN3)

qwen3_0_6b, lora_qwen3_0_6b, qlora_qwen3_0_6b = builders(QWEN3_0_6B, "qwen3_0_6b")
qwen3_1_7b, lora_qwen3_1_7b, qlora_qwen3_1_7b = builders(QWEN3_1_7B, "qwen3_1_7b")
qwen3_4b, lora_qwen3_4b, qlora_qwen3_4b = builders(QWEN3_4B, "qwen3_4b")
qwen3_8b, lora_qwen3_8b, qlora_qwen3_8b = builders(QWEN3_8B, "qwen3_8b")
