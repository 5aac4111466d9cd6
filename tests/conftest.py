"""Tiny models and HF-layout checkpoints, built by the tests themselves with a fixed seed."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tunelite.checkpointing.hf import ADAPTERS, save_hf_state_dict
from tunelite.models.decoder import LongRopeScaling, ModelArgs, RopeScaling, decoder
from tunelite.models.hf_config import hf_config_from_model_args
from tunelite.models.llama3_1 import LLAMA3_1_8B


def tiny_of(family: ModelArgs, vocab_size: int, num_heads: int, num_kv_heads: int) -> ModelArgs:
    """A family's structure at CPU size: its traits, RoPE base and scaling, norm eps and tying are
    kept, heads are 16 wide, and the window shrinks to 64 positions with RoPE scaling from 48 and
    any sliding window to 24, so a test sequence of 128 runs past all three, as real use runs
    past 8192. At base 500,000 the rotation wavelengths are 6.3, 32.5, 168, ... positions: one
    below 48/4 (kept), one between 48/4 and 48 (smoothed), the rest above 48 (divided by the
    factor), so every branch of Llama 3's RoPE scaling is exercised. LongRoPE gets divisors for
    the tiny head's frequencies, rising as Phi-4-mini's do. Learned positions (GPT-2) cover 128."""
    scaling = family.rope_scaling
    if isinstance(scaling, RopeScaling):
        scaling = dataclasses.replace(scaling, original_max_position_embeddings=48)
    elif isinstance(scaling, LongRopeScaling):
        pairs = int(16 * family.partial_rotary_factor) // 2
        scaling = LongRopeScaling(short_factor=tuple(1.0 + 0.05 * i for i in range(pairs)),
                                  long_factor=tuple(1.0 + 2.0 * i for i in range(pairs)),
                                  original_max_position_embeddings=48,
                                  attention_factor=LongRopeScaling.default_attention_factor(64 / 48, 48))
    return dataclasses.replace(
        family, vocab_size=vocab_size, num_layers=2, num_heads=num_heads, num_kv_heads=num_kv_heads,
        embed_dim=16 * num_heads, intermediate_dim=160, max_seq_len=128 if family.learned_positions else 64,
        head_dim=None, rope_scaling=scaling, sliding_window=24 if family.sliding_window else None,
    )


TINY = tiny_of(LLAMA3_1_8B, vocab_size=300, num_heads=4, num_kv_heads=2)


def random_model(args: ModelArgs = TINY, seed: int = 0) -> torch.nn.Module:
    """A model whose norms are random too, so a mis-mapped norm shows up in the logits."""
    torch.manual_seed(seed)
    model = decoder(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.05 * torch.randn_like(p))
    return model


def write_hf_checkpoint(folder: Path, args: ModelArgs = TINY, seed: int = 0, shards: int = 1) -> torch.nn.Module:
    """Writes a random model as an HF folder (sharded with an index when shards > 1); returns it."""
    model = random_model(args, seed)
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if shards > 1:
        layout = ADAPTERS[args.model_type]
        keys = list(state)
        per = -(-len(keys) // shards)
        weight_map = {layout.to_hf(k): f"model-{i // per + 1:05d}-of-{shards:05d}.safetensors"
                      for i, k in enumerate(keys)}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        save_hf_state_dict(state, folder, source_dir=folder, dtype=torch.float32, model_type=args.model_type)
    else:
        save_hf_state_dict(state, folder, source_dir=None, dtype=torch.float32, model_type=args.model_type)
    (folder / "config.json").write_text(json.dumps(hf_config_from_model_args(args, torch.float32)))
    return model


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    folder = tmp_path / "base"
    return folder, write_hf_checkpoint(folder)
