"""Qwen 2.5 sizes (HF config.json of Qwen/Qwen2.5-*-Instruct, as torchtune's qwen2_5 builders state
them), plus the tiny CPU demo model.

Llama's layout with biases on q, k and v, RoPE at base 1,000,000 and a 151,936-token vocabulary
(152,064 rows from 7B up); up to 3B the output is tied to the embedding. The released models set
`use_sliding_window: false`: every layer attends to the whole sequence. The base models of some
sizes state a 131,072-token window where the instruct ones state 32,768; nothing else differs,
and the checkpoint check ignores the window, so one builder serves both.
"""

from tunelite.models.builders import builders
from tunelite.models.decoder import ModelArgs

_QWEN2_5 = dict(model_type="qwen2", qkv_bias=True, norm_eps=1e-6, rope_base=1_000_000.0, max_seq_len=32_768)

QWEN2_5_0_5B = ModelArgs(vocab_size=151_936, num_layers=24, num_heads=14, num_kv_heads=2, embed_dim=896,
                         intermediate_dim=4864, tie_word_embeddings=True, **_QWEN2_5)
QWEN2_5_1_5B = ModelArgs(vocab_size=151_936, num_layers=28, num_heads=12, num_kv_heads=2, embed_dim=1536,
                         intermediate_dim=8960, tie_word_embeddings=True, **_QWEN2_5)
QWEN2_5_3B = ModelArgs(vocab_size=151_936, num_layers=36, num_heads=16, num_kv_heads=2, embed_dim=2048,
                       intermediate_dim=11_008, tie_word_embeddings=True, **_QWEN2_5)
QWEN2_5_7B = ModelArgs(vocab_size=152_064, num_layers=28, num_heads=28, num_kv_heads=4, embed_dim=3584,
                       intermediate_dim=18_944, **_QWEN2_5)
# The CPU demo (recipe_configs/tiny/qwen_lora_cpu.yaml): Qwen 2.5's structure (q/k/v biases, tied
# output) at a size a laptop trains in seconds, over the 768-token vocabulary of tunelite/assets/tiny.
QWEN2_5_TINY = ModelArgs(vocab_size=768, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=128,
                         intermediate_dim=384, tie_word_embeddings=True, **{**_QWEN2_5, "max_seq_len": 2048})

qwen2_5_0_5b, lora_qwen2_5_0_5b, qlora_qwen2_5_0_5b = builders(QWEN2_5_0_5B, "qwen2_5_0_5b")
qwen2_5_1_5b, lora_qwen2_5_1_5b, qlora_qwen2_5_1_5b = builders(QWEN2_5_1_5B, "qwen2_5_1_5b")
qwen2_5_3b, lora_qwen2_5_3b, qlora_qwen2_5_3b = builders(QWEN2_5_3B, "qwen2_5_3b")
qwen2_5_7b, lora_qwen2_5_7b, qlora_qwen2_5_7b = builders(QWEN2_5_7B, "qwen2_5_7b")
qwen2_5_tiny, lora_qwen2_5_tiny, qlora_qwen2_5_tiny = builders(QWEN2_5_TINY, "qwen2_5_tiny")
