"""Our Llama must be Hugging Face's Llama: same weights in, same logits out."""

import pytest
import torch
import transformers

from conftest import TINY, write_hf_checkpoint
from tunelite.checkpointing.hf import HFCheckpointer
from tunelite.models.llama import llama
from tunelite.training.model_loading import load_checkpoint_into


@pytest.mark.parametrize("seq_len", [16, 3 * TINY.rope_scaling.original_max_position_embeddings])
def test_llama3_1_logits_match_transformers(tmp_path, seq_len):
    folder = tmp_path / "ckpt"
    write_hf_checkpoint(folder, shards=2)
    theirs = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.device("meta"):
        ours = llama(TINY)
    load_checkpoint_into(ours, HFCheckpointer(str(folder)), torch.device("cpu"), torch.float32).eval()
    tokens = torch.randint(0, TINY.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(tokens) - theirs(tokens).logits).abs().max().item()
    assert diff <= 1e-4
