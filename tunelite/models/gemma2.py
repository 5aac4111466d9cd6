"""Gemma 2 sizes (HF config.json of google/gemma-2-2b and -9b, as torchtune's gemma2 builders
state them).

What sets Gemma 2 apart, each a trait of the one decoder: embeddings scaled by sqrt(hidden),
RMSNorm as x * (1 + w), a norm after attention and after the MLP as well as before, a GELU-tanh
gated MLP, scores scaled by query_pre_attn_scalar^-1/2, a 4096-token sliding window in every
other layer (even layers local, odd global), attention scores capped at 50 and logits at 30
(tanh soft-capping), and the output tied to a 256,000-token embedding.
"""

from tunelite.models.builders import builders
from tunelite.models.decoder import ModelArgs

_GEMMA2 = dict(
    model_type="gemma2", vocab_size=256_000, head_dim=256, max_seq_len=8192, norm_eps=1e-6, rope_base=10_000.0,
    tie_word_embeddings=True, norm="rms_offset", activation="gelu_tanh", post_norms=True, embed_scale=True,
    query_pre_attn_scalar=256, sliding_window=4096, sliding_window_pattern=2, attn_softcap=50.0,
    final_softcap=30.0,
)

GEMMA2_2B = ModelArgs(num_layers=26, num_heads=8, num_kv_heads=4, embed_dim=2304, intermediate_dim=9216, **_GEMMA2)
GEMMA2_9B = ModelArgs(num_layers=42, num_heads=16, num_kv_heads=8, embed_dim=3584, intermediate_dim=14_336,
                      **_GEMMA2)

gemma2_2b, lora_gemma2_2b, qlora_gemma2_2b = builders(GEMMA2_2B, "gemma2_2b")
gemma2_9b, lora_gemma2_9b, qlora_gemma2_9b = builders(GEMMA2_9B, "gemma2_9b")
