"""SmolLM2 sizes (HF config.json of HuggingFaceTB/SmolLM2-*, as torchtune's smol builders state
them): Llama models (`model_type: llama`) with a 49,152-token vocabulary, the output tied to the
embedding and an 8192-token window."""

from tunelite.models.builders import builders
from tunelite.models.decoder import ModelArgs

_SMOLLM2 = dict(vocab_size=49_152, max_seq_len=8192, norm_eps=1e-5, tie_word_embeddings=True)

SMOLLM2_135M = ModelArgs(num_layers=30, num_heads=9, num_kv_heads=3, embed_dim=576, intermediate_dim=1536,
                         rope_base=100_000.0, **_SMOLLM2)
SMOLLM2_360M = ModelArgs(num_layers=32, num_heads=15, num_kv_heads=5, embed_dim=960, intermediate_dim=2560,
                         rope_base=100_000.0, **_SMOLLM2)
SMOLLM2_1_7B = ModelArgs(num_layers=24, num_heads=32, num_kv_heads=32, embed_dim=2048, intermediate_dim=8192,
                         rope_base=130_000.0, **_SMOLLM2)

smollm2_135m, lora_smollm2_135m, qlora_smollm2_135m = builders(SMOLLM2_135M, "smollm2_135m")
smollm2_360m, lora_smollm2_360m, qlora_smollm2_360m = builders(SMOLLM2_360M, "smollm2_360m")
smollm2_1_7b, lora_smollm2_1_7b, qlora_smollm2_1_7b = builders(SMOLLM2_1_7B, "smollm2_1_7b")
