"""Our decoder must be Hugging Face's model for every family users bring (Llama 3.1, 3.2 tied and
2, Mistral, Qwen 2.5 and 3, Phi-3 and Phi-4-mini, Gemma 2, GPT-2): the same sizes as the official
config.json, the same weights in, the same logits out, including past sliding windows; what we
write back, fine-tuned or not, is what transformers reads, and our adapters load in peft."""

import dataclasses
import json
from pathlib import Path
from typing import Callable

import pytest
import torch
import transformers
from peft import PeftModel

from conftest import TINY, random_model, tiny_of, write_hf_checkpoint
from tunelite import models
from tunelite.checkpointing.hf import (
    HFCheckpointer,
    model_args_from_hf_config,
    read_safetensors,
    save_hf_state_dict,
    weight_files,
)
from tunelite.checkpointing.merge import merge_adapter
from tunelite.checkpointing.peft import load_adapter_into, save_peft_adapter
from tunelite.models.decoder import (
    LoRAArgs,
    ModelArgs,
    TransformerDecoder,
    attention_projections,
    decoder,
    lora_decoder,
    mlp_projections,
)
from tunelite.models.gemma2 import GEMMA2_2B
from tunelite.models.gpt2 import GPT2_124M
from tunelite.models.llama2 import LLAMA2_7B
from tunelite.models.llama3_2 import LLAMA3_2_3B
from tunelite.models.mistral import MISTRAL_7B_V0_1
from tunelite.models.phi3 import PHI3_MINI, PHI4_MINI
from tunelite.models.qwen2_5 import QWEN2_5_0_5B
from tunelite.models.qwen3 import QWEN3_8B
from tunelite.modules.lora import LoRALinear, merge_lora_state_dict
from tunelite.checkpointing.loading import load_checkpoint_into

# Each family's structure at CPU size (see conftest.tiny_of): GQA or MHA, tied or not, RoPE scaled,
# plain, partial or learned positions, sliding windows in every or every other layer. Llama 2's
# vocabulary is SentencePiece-sized (the size of the tokenizer tests' model), not a power of two.
# Gemma 2's caps shrink so that tiny random weights reach them and a missing cap shows.
FAMILIES = {
    "llama3_1-gqa-rope_scaled": TINY,
    "llama3_2-gqa-tied-rope_scaled": tiny_of(LLAMA3_2_3B, vocab_size=300, num_heads=6, num_kv_heads=2),
    "llama2-mha-plain_rope": tiny_of(LLAMA2_7B, vocab_size=450, num_heads=4, num_kv_heads=4),
    "mistral_v0_1-sliding_window": tiny_of(MISTRAL_7B_V0_1, vocab_size=300, num_heads=4, num_kv_heads=2),
    "qwen2_5-qkv_bias-tied": tiny_of(QWEN2_5_0_5B, vocab_size=300, num_heads=4, num_kv_heads=2),
    "qwen3-qk_norm": tiny_of(QWEN3_8B, vocab_size=300, num_heads=4, num_kv_heads=2),
    "phi3_mini-fused-sliding_window": tiny_of(PHI3_MINI, vocab_size=300, num_heads=4, num_kv_heads=4),
    "phi4_mini-fused-partial_longrope-tied": tiny_of(PHI4_MINI, vocab_size=300, num_heads=4, num_kv_heads=2),
    "gemma2-softcaps-alternating_window": dataclasses.replace(
        tiny_of(GEMMA2_2B, vocab_size=300, num_heads=4, num_kv_heads=2), attn_softcap=1.0, final_softcap=0.5),
    "gpt2-learned_positions-conv1d": tiny_of(GPT2_124M, vocab_size=300, num_heads=4, num_kv_heads=4),
}
each_family = pytest.mark.parametrize("args", FAMILIES.values(), ids=FAMILIES.keys())
WINDOWED = {name: args for name, args in FAMILIES.items() if args.sliding_window}
# LONG runs past the tiny window (64), the original one RoPE scaling starts from (48) and the
# sliding windows (24); SHORT stays inside all of them.
SHORT, LONG = 16, 128

_LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3"}
# The fields of each official config.json that set the architecture, as published on the Hub,
# with each model card's parameter count.
OFFICIAL = {
    "llama3_1_8b": (8_030_261_248, {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "rope_scaling": _LLAMA3_ROPE, "tie_word_embeddings": False}),
    "llama3_2_1b": (1_235_814_400, {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0},
        "tie_word_embeddings": True}),
    "llama3_2_3b": (3_212_749_824, {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
        "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0},
        "tie_word_embeddings": True}),
    # Llama 2's files state no rope_theta: transformers' default, 10000, applies.
    "llama2_7b": (6_738_415_616, {
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False}),
    "llama2_13b": (13_015_864_320, {
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
        "num_attention_heads": 40, "num_key_value_heads": 40, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False}),
}


def tokens_for(args: ModelArgs, seq_len: int) -> torch.Tensor:
    """Random ids that include both ends of the vocabulary, so a row lost or shifted in the
    embedding or output mapping shows up."""
    tokens = torch.randint(0, args.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(0))
    tokens[0, :4] = torch.tensor([0, 1, 2, args.vocab_size - 1])
    return tokens


def ours_from(folder: Path, model: TransformerDecoder) -> TransformerDecoder:
    """Fills a meta-device model from an HF folder through the checkpointer, as the recipes do."""
    return load_checkpoint_into(model, HFCheckpointer(str(folder)), torch.device("cpu"), torch.float32).eval()


def meta(build: Callable[..., TransformerDecoder], *build_args: object) -> TransformerDecoder:
    """A model with no storage yet, as the recipes build one before loading the checkpoint."""
    with torch.device("meta"):
        return build(*build_args)


def theirs_from(folder: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def max_diff(a: torch.nn.Module, b: torch.nn.Module, tokens: torch.Tensor) -> float:
    """Largest logit difference of two models, ours or transformers' (whose output has `.logits`)."""
    with torch.no_grad():
        la, lb = (getattr(out, "logits", out) for out in (a(tokens), b(tokens)))
    return (la - lb).abs().max().item()


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder under its HF name, as transformers sees it."""
    return {k: v for f in weight_files(folder) for k, v in read_safetensors(f).items()}


@pytest.mark.parametrize("name", OFFICIAL)
def test_builders_have_the_official_sizes_and_parameter_counts(name):
    params, official = OFFICIAL[name]
    model = meta(getattr(models, name))
    ours, theirs = model.args, model_args_from_hf_config(official)
    assert dataclasses.replace(ours, head_dim=ours.resolved_head_dim) == dataclasses.replace(
        theirs, head_dim=theirs.resolved_head_dim)
    # A tied model must not count (or store) its output projection twice.
    assert sum(p.numel() for p in model.parameters()) == params
    lora = meta(getattr(models, f"lora_{name}"), ["q_proj", "v_proj"])
    assert lora.args == model.args


PUBLISHED = sorted(p.stem for p in (Path(__file__).parent / "hf_configs").glob("*.json"))


@pytest.mark.parametrize("name", PUBLISHED)
def test_family_builders_match_the_published_config_and_transformers_parameter_count(name):
    """Each builder (and its LoRA and QLoRA twins) has the sizes and traits of the published
    config.json, and as many parameters as transformers' model of that file."""
    official = json.loads((Path(__file__).parent / "hf_configs" / f"{name}.json").read_text())
    model = meta(getattr(models, name))
    theirs = model_args_from_hf_config(official)
    assert dataclasses.replace(model.args, head_dim=model.args.resolved_head_dim, max_seq_len=0) == \
        dataclasses.replace(theirs, head_dim=theirs.resolved_head_dim, max_seq_len=0)
    config = transformers.AutoConfig.for_model(**official)
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())
    attention = list(attention_projections(model.args))
    for twin in ("lora", "qlora"):
        assert meta(getattr(models, f"{twin}_{name}"), attention, True).args == model.args


@each_family
@pytest.mark.parametrize("seq_len", [SHORT, LONG])
def test_logits_match_transformers(tmp_path, args, seq_len):
    folder = tmp_path / "ckpt"
    write_hf_checkpoint(folder, args, shards=2)
    ours = ours_from(folder, meta(decoder, args))
    assert max_diff(ours, theirs_from(folder), tokens_for(args, seq_len)) <= 1e-4


@pytest.mark.parametrize("args", WINDOWED.values(), ids=WINDOWED.keys())
def test_the_sliding_window_changes_only_what_lies_past_it(tmp_path, args):
    """Inside the window the model is the windowless one; past it, the old keys drop out (so the
    parity above, at LONG, checks which keys each layer drops)."""
    windowed = random_model(args).eval()
    unlimited = decoder(dataclasses.replace(args, sliding_window=None))
    unlimited.load_state_dict(windowed.state_dict())
    assert max_diff(windowed, unlimited, tokens_for(args, args.sliding_window)) == 0
    assert max_diff(windowed, unlimited, tokens_for(args, LONG)) > 1e-3


@each_family
def test_saved_folder_is_the_downloaded_one_and_transformers_reads_it(tmp_path, args):
    source, out = tmp_path / "source", tmp_path / "out"
    write_hf_checkpoint(source, args)
    ours = ours_from(source, meta(decoder, args))
    save_hf_state_dict(ours.state_dict(), out, source)

    written, original = hf_tensors(out), hf_tensors(source)
    assert written.keys() == original.keys()
    assert ("lm_head.weight" in written) is not args.tie_word_embeddings
    for key, value in original.items():
        assert torch.equal(written[key], value), key
    assert max_diff(ours, theirs_from(out), tokens_for(args, LONG)) <= 1e-4


def every_adapter(args: ModelArgs) -> LoRAArgs:
    """Adapters on every projection the family has (the output too where it is not tied)."""
    return LoRAArgs(lora_attn_modules=attention_projections(args), apply_lora_to_mlp=True,
                    apply_lora_to_output=not args.tie_word_embeddings, lora_rank=4, lora_alpha=8.0)


def trained_lora_model(folder: Path, args: ModelArgs) -> TransformerDecoder:
    """The LoRA twin of a checkpoint with random, non-zero adapters, as if trained."""
    torch.manual_seed(1)
    lora = ours_from(folder, meta(lora_decoder, args, every_adapter(args)))
    with torch.no_grad():
        for m in lora.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(0, 0.1)
    return lora


@each_family
def test_merged_lora_gives_the_unmerged_logits_in_our_model_and_in_transformers(tmp_path, args):
    base_folder, merged_folder = tmp_path / "base", tmp_path / "merged"
    base = write_hf_checkpoint(base_folder, args).eval()
    lora = trained_lora_model(base_folder, args)
    adapted = [m for m in lora.modules() if isinstance(m, LoRALinear)]
    per_layer = len(attention_projections(args)) + len(mlp_projections(args))
    assert len(adapted) == args.num_layers * per_layer + (not args.tie_word_embeddings)
    tokens = tokens_for(args, LONG)
    assert max_diff(lora, base, tokens) > 1e-2

    merged_state = merge_lora_state_dict(lora.state_dict(), rank=4, alpha=8.0)
    merged = decoder(args)
    merged.load_state_dict(merged_state)
    assert max_diff(merged.eval(), lora, tokens) <= 1e-5

    save_hf_state_dict(merged_state, merged_folder, base_folder)
    assert ("lm_head.weight" in hf_tensors(merged_folder)) is not args.tie_word_embeddings
    assert max_diff(theirs_from(merged_folder), lora, tokens) <= 1e-4


@each_family
def test_our_adapter_loads_in_peft_on_transformers_model_with_our_logits(tmp_path, args):
    """peft finds every adapter on the module transformers has (fused ones included) and, with
    `fan_in_fan_out` where the checkpoint stores (in, out), computes what our model computes; the
    adapter comes back into a fresh model of ours unchanged."""
    base_folder = tmp_path / "base"
    base = write_hf_checkpoint(base_folder, args).eval()
    lora = trained_lora_model(base_folder, args)
    save_peft_adapter(lora, tmp_path / "adapter", base_model_name_or_path=str(base_folder))

    theirs = PeftModel.from_pretrained(theirs_from(base_folder), tmp_path / "adapter").eval()
    peft_adapters = [n for n, _ in theirs.named_parameters() if "lora_A" in n]
    assert len(peft_adapters) == sum(isinstance(m, LoRALinear) for m in lora.modules())
    tokens = tokens_for(args, LONG)
    assert max_diff(lora, base, tokens) > 1e-2
    assert max_diff(theirs, lora, tokens) <= 1e-4

    reloaded = ours_from(base_folder, meta(lora_decoder, args, every_adapter(args)))
    load_adapter_into(reloaded, tmp_path / "adapter")
    assert max_diff(reloaded, lora, tokens) == 0


@each_family
def test_tunelite_merge_folds_our_adapter_into_each_familys_folder(tmp_path, args):
    """`tunelite merge`'s streamed merge reads each family's names (and GPT-2's transposed Conv1D
    weights): the folder it writes is the LoRA model, in transformers."""
    base_folder = tmp_path / "base"
    write_hf_checkpoint(base_folder, args, shards=2)
    lora = trained_lora_model(base_folder, args)
    save_peft_adapter(lora, tmp_path / "adapter", base_model_name_or_path=str(base_folder))
    summary = merge_adapter(base_folder, tmp_path / "adapter", tmp_path / "merged")
    assert summary.adapted == sum(isinstance(m, LoRALinear) for m in lora.modules())
    assert max_diff(theirs_from(tmp_path / "merged"), lora, tokens_for(args, LONG)) <= 1e-4
