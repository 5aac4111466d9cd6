"""GPT-2 sizes (HF config.json of openai-community/gpt2 and gpt2-medium), for the seed experiments.

The one decoder with GPT-2's traits: LayerNorm with biases, learned absolute positions (1024 of
them) instead of RoPE, a fused `c_attn` (kept fused as `attn.qkv_proj`, so peft's
`target_modules=["c_attn"]` adapters load), biases on every projection, a plain GELU MLP and the
output tied to the embedding. The checkpoint stores its projections as Conv1D, (in, out); the
checkpoint adapter transposes them on the way in and out.
"""

from tunelite.models.builders import builders
from tunelite.models.decoder import ModelArgs

_GPT2 = dict(model_type="gpt2", vocab_size=50_257, max_seq_len=1024, norm_eps=1e-5, tie_word_embeddings=True,
             norm="layer", learned_positions=True, fused_qkv=True, qkv_bias=True, proj_bias=True, gated_mlp=False,
             activation="gelu_tanh")

GPT2_124M = ModelArgs(num_layers=12, num_heads=12, num_kv_heads=12, embed_dim=768, intermediate_dim=3072, **_GPT2)
GPT2_355M = ModelArgs(num_layers=24, num_heads=16, num_kv_heads=16, embed_dim=1024, intermediate_dim=4096, **_GPT2)

gpt2_124m, lora_gpt2_124m, qlora_gpt2_124m = builders(GPT2_124M, "gpt2_124m")
gpt2_355m, lora_gpt2_355m, qlora_gpt2_355m = builders(GPT2_355M, "gpt2_355m")
