"""Phi-3-mini and Phi-4-mini sizes (HF config.json of microsoft/Phi-3-mini-4k-instruct and
microsoft/Phi-4-mini-instruct; both are transformers' `phi3` model type).

The checkpoints fuse q, k and v into one `qkv_proj` and gate and up into one `gate_up_proj`; the
model keeps both fused (`attn.qkv_proj`, `mlp.w13`), so LoRA targets `qkv_proj` as peft does on
these models. Phi-3-mini attends within a 2047-token sliding window. Phi-4-mini rotates only the
first 3/4 of each head, ties its output to the embedding and stretches RoPE with LongRoPE from a
4096-token pre-training window to 131,072.
"""

from tunelite.models.builders import builders
from tunelite.models.decoder import LongRopeScaling, ModelArgs

_PHI3 = dict(model_type="phi3", fused_qkv=True, fused_gate_up=True, rope_base=10_000.0, norm_eps=1e-5)

# Phi-4-mini-instruct's rope_scaling (type longrope): one divisor per rotated frequency pair.
_PHI4_MINI_LONG_FACTOR = (
    1, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649, 2.446418898,
    2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845, 5.351743533, 5.984965424,
    6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158, 11.70738129, 13.09260651, 14.64173252,
    16.37415215, 18.31155283, 20.47818807, 22.90118105, 25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23, 32.6,
    32.61, 32.64, 32.66, 32.7, 32.71, 32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77,
)
_PHI4_MINI_ROPE = LongRopeScaling(
    short_factor=(1.0,) * 48, long_factor=_PHI4_MINI_LONG_FACTOR, original_max_position_embeddings=4096,
    attention_factor=LongRopeScaling.default_attention_factor(131_072 / 4096, 4096),
)

PHI3_MINI = ModelArgs(vocab_size=32_064, num_layers=32, num_heads=32, num_kv_heads=32, embed_dim=3072,
                      intermediate_dim=8192, max_seq_len=4096, sliding_window=2047, **_PHI3)
PHI4_MINI = ModelArgs(vocab_size=200_064, num_layers=32, num_heads=24, num_kv_heads=8, embed_dim=3072,
                      intermediate_dim=8192, max_seq_len=131_072, tie_word_embeddings=True,
                      partial_rotary_factor=0.75, rope_scaling=_PHI4_MINI_ROPE, sliding_window=262_144, **_PHI3)

phi3_mini, lora_phi3_mini, qlora_phi3_mini = builders(PHI3_MINI, "phi3_mini")
phi4_mini, lora_phi4_mini, qlora_phi4_mini = builders(PHI4_MINI, "phi4_mini")
