"""Families beyond Llama end to end: a model built from whatever folder a user points at, refusals
that name what is wrong, generation past sliding windows as transformers generates, QLoRA twins,
the memory estimate per family, and the tiny Qwen demo from training to peft and transformers."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers
from omegaconf import OmegaConf
from peft import PeftModel
from safetensors.torch import save_file

from conftest import random_model, write_hf_checkpoint
from test_hf_parity import FAMILIES, WINDOWED, every_adapter, max_diff, meta, ours_from, theirs_from, tokens_for
from tunelite import models
from tunelite.checkpointing.hf import HFCheckpointer, read_safetensors
from tunelite.checkpointing.peft import load_adapter_into
from tunelite.cli.main import main
from tunelite.config import asset_path, load_config
from tunelite.errors import CheckpointError, ConfigError, TuneliteError
from tunelite.generation import GenerationSettings, generate
from tunelite.models import from_checkpoint, lora_llama3_1_8b
from tunelite.models.decoder import LoRAArgs, attention_projections, decoder, lora_decoder, mlp_projections
from tunelite.models.hf_config import SUPPORTED_MODEL_TYPES, hf_config_from_model_args
from tunelite.modules.lora import LoRALinear, merged_state_dict, set_trainable_params
from tunelite.modules.fp8 import FrozenFP8Linear
from tunelite.modules.memory_policy import (
    KEEP,
    RECOMPUTE,
    RECOMPUTE_ATTENTION,
    RECOMPUTE_OFFLOAD_ATTENTION,
    set_memory_policy,
)
from tunelite.modules.nf4 import NF4Tensor
from tunelite.recipe_registry import configs_dir, get_recipe, read_declarations
from tunelite.training.memory_estimate import ACTIVATIONS, WEIGHTS, estimate_memory, recipe_memory

QWEN_DEMO = Path(asset_path("tiny/qwen2_5_model"))
LORA_MEMORY = recipe_memory(read_declarations(get_recipe("lora_finetune_single_device").path))
each_family = pytest.mark.parametrize("args", FAMILIES.values(), ids=FAMILIES.keys())
each_windowed = pytest.mark.parametrize("args", WINDOWED.values(), ids=WINDOWED.keys())


@each_family
def test_from_checkpoint_builds_whatever_family_and_size_the_folder_holds(tmp_path, args):
    write_hf_checkpoint(tmp_path, args)
    plain = from_checkpoint(str(tmp_path))
    assert dataclasses.replace(plain.args, head_dim=None) == dataclasses.replace(args, head_dim=None)
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())

    attention = list(attention_projections(args))
    lora = from_checkpoint(str(tmp_path), lora_attn_modules=attention[:1], apply_lora_to_mlp=True, lora_rank=4)
    adapted = {name.split(".", 2)[-1] for name, m in lora.named_modules() if isinstance(m, LoRALinear)}
    assert adapted == {f"attn.{attention[0]}", *(f"mlp.{name}" for name in mlp_projections(args))}


def test_from_checkpoint_refuses_nf4_weights_with_nothing_to_train(tmp_path):
    write_hf_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match="model.quantize_base.*lora_attn_modules"):
        from_checkpoint(str(tmp_path), quantize_base=True)


def test_an_unsupported_model_type_is_refused_naming_the_supported_ones(tmp_path):
    write_hf_checkpoint(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "falcon"}))
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    for attempt in (lambda: from_checkpoint(str(tmp_path)),
                    lambda: HFCheckpointer(str(tmp_path)).load(FAMILIES["llama3_1-gqa-rope_scaled"])):
        with pytest.raises(CheckpointError, match=f"config.json: model_type 'falcon' is not supported; "
                                                  f"tunelite builds {supported}"):
            attempt()


def test_a_builder_of_another_family_is_refused_naming_both_before_any_weight_is_read(tmp_path, monkeypatch):
    write_hf_checkpoint(tmp_path, FAMILIES["qwen2_5-qkv_bias-tied"])
    read = []
    monkeypatch.setattr("tunelite.checkpointing.hf.read_safetensors", lambda path: read.append(path) or {})
    with pytest.raises(CheckpointError, match="is a 'llama' model, but .*config.json holds a 'qwen2' one"):
        HFCheckpointer(str(tmp_path)).load(meta(lora_llama3_1_8b, ["q_proj"]).args)
    assert read == []


@pytest.mark.parametrize("model_type, setting, message", [
    ("qwen2", {"use_sliding_window": True, "max_window_layers": 1}, "use_sliding_window=true"),
    ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling 'yarn' is not supported"),
    ("llama", {"attention_bias": True}, "attention_bias=True is not supported"),
    ("gemma2", {"hidden_activation": "gelu"}, "hidden_activation 'gelu' is not supported"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True is not supported"),
])
def test_a_setting_tunelite_does_not_implement_is_refused_by_name(tmp_path, model_type, setting, message):
    args = next(a for a in FAMILIES.values() if a.model_type == model_type)
    write_hf_checkpoint(tmp_path, args)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **setting}))
    with pytest.raises(CheckpointError, match=f"config.json: .*{message}"):
        from_checkpoint(str(tmp_path))


@each_family
def test_greedy_generation_is_what_transformers_generates_past_any_sliding_window(tmp_path, args):
    """Prompt and reply together run well past the sliding windows (24): the KV cache keeps every
    key and masks the old ones, so cached, recomputed and transformers' greedy tokens agree."""
    write_hf_checkpoint(tmp_path, args)
    ours = ours_from(tmp_path, meta(decoder, args))
    prompt = tokens_for(args, 10)[0].tolist()
    settings = GenerationSettings(max_new_tokens=40)
    (cached,), _ = generate(ours, [prompt], settings)
    (recomputed,), _ = generate(ours, [prompt], settings, use_cache=False)
    ids = torch.tensor([prompt])
    theirs = theirs_from(tmp_path).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40,
                                            min_new_tokens=40, do_sample=False)
    assert cached == recomputed == theirs[0, len(prompt):].tolist()


@each_windowed
def test_a_left_padded_row_sees_the_window_it_would_see_alone(args):
    model = random_model(args).eval()
    prompts = [tokens_for(args, 30)[0].tolist(), [5, 17, 42]]
    settings = GenerationSettings(max_new_tokens=30)
    alone = [generate(model, [prompt], settings)[0][0] for prompt in prompts]
    assert generate(model, prompts, settings)[0] == alone


def test_gpt2_reads_openais_original_names_and_skips_its_mask_buffers(tmp_path):
    """openai-community/gpt2's files name tensors without `transformer.` and carry each layer's
    causal mask as `attn.bias`: both load, as transformers loads them."""
    args = FAMILIES["gpt2-learned_positions-conv1d"]
    write_hf_checkpoint(tmp_path, args)
    state = read_safetensors(tmp_path / "model.safetensors")
    original = {key.removeprefix("transformer."): value for key, value in state.items()}
    original |= {f"h.{i}.attn.bias": torch.ones(1, 1, 8, 8).tril() for i in range(args.num_layers)}
    save_file(original, tmp_path / "model.safetensors")
    ours = ours_from(tmp_path, meta(decoder, args))
    assert max_diff(ours, theirs_from(tmp_path), tokens_for(args, 40)) <= 1e-4


def test_gpt2_refuses_positions_it_never_learned_with_the_fix():
    args = FAMILIES["gpt2-learned_positions-conv1d"]
    model = random_model(args).eval()
    with pytest.raises(TuneliteError, match=f"learned {args.max_seq_len}: set tokenizer.max_seq_len"):
        model(torch.zeros((1, args.max_seq_len + 1), dtype=torch.long))


@each_family
def test_qlora_twin_keeps_frozen_weights_in_nf4_and_trains_only_the_adapters(tmp_path, args):
    """Its logits are those of the plain model holding its dequantized weights (biases and fused
    projections included), and only the adapters get gradients."""
    write_hf_checkpoint(tmp_path, args)
    lora = dataclasses.replace(every_adapter(args), quantize_base=True)
    model = ours_from(tmp_path, meta(lora_decoder, args, lora))
    dequantized = decoder(args)
    dequantized.load_state_dict(merged_state_dict(model))
    tokens = tokens_for(args, 32)
    assert max_diff(model, dequantized.eval(), tokens) <= 1e-5
    set_trainable_params(model.train())
    model(tokens).float().pow(2).mean().backward()
    adapted = [m for m in model.layers.modules() if isinstance(m, LoRALinear)]
    assert adapted and all(isinstance(m.weight, NF4Tensor) and m.weight.grad is None for m in adapted)
    assert all(m.lora_a.grad is not None for m in adapted)
    assert all(m.bias is None or not m.bias.requires_grad for m in adapted)


@pytest.mark.parametrize("name", ["qwen2_5-qkv_bias-tied", "gpt2-learned_positions-conv1d"])
def test_fp8_base_keeps_the_families_biases_frozen_beside_its_fp8_weights(tmp_path, name):
    """`base_dtype: fp8` on the families with biases: the biases stay in the model's dtype, are
    applied (zeroing them changes the logits) and frozen; the logits are the base's up to FP8's
    rounding (e4m3: about 6% per value)."""
    args = FAMILIES[name]
    write_hf_checkpoint(tmp_path, args)
    base = ours_from(tmp_path, meta(decoder, args))
    lora = LoRAArgs(lora_attn_modules=("output_proj",), lora_rank=4, fp8_base=True)  # q/k/v frozen, adapted or not
    model = ours_from(tmp_path, meta(lora_decoder, args, lora))
    tokens = tokens_for(args, 32)
    assert max_diff(model, base, tokens) < 0.25
    biased = [m for m in model.layers.modules() if getattr(m, "fp8_base", False) and m.bias is not None]
    assert {type(m) for m in biased} >= {FrozenFP8Linear}
    assert all(m.weight.dtype == torch.float8_e4m3fn and not m.bias.requires_grad for m in biased)
    with torch.no_grad():
        before = model(tokens)
        for m in biased:
            m.bias.zero_()
        assert (model(tokens) - before).abs().max() > 1e-3


FAMILY_CONFIGS = sorted(str(p.relative_to(configs_dir()).with_suffix("")) for p in configs_dir().glob("*/*.yaml")
                        if p.parent.name not in ("tiny", "llama3_1", "llama3_2", "llama2", "generation"))


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_each_family_config_estimates_from_its_config_json_alone(tmp_path, name):
    """`tunelite estimate` on each family's shipped config, with a folder holding the published
    config.json and no weights: it builds the model on the meta device and counts every weight."""
    cfg = load_config(configs_dir() / f"{name}.yaml", [f"checkpointer.checkpoint_dir={tmp_path}"])
    OmegaConf.resolve(cfg)
    builder = str(cfg.model._component_).rsplit(".", 1)[-1].split("lora_", 1)[-1]  # the base builder of a (q)lora_ one
    published = Path(__file__).parent / "hf_configs" / f"{builder}.json"
    (tmp_path / "config.json").write_text(published.read_text())
    result = estimate_memory(cfg, LORA_MEMORY)
    model = meta(getattr(models, builder))
    params = sum(p.numel() for p in model.parameters())
    assert result.total == sum(result.components.values())
    # the embedding table in host memory where the config says so (untied models' GPU configs)
    table = model.tok_embeddings.weight.numel() if cfg.get("offload_embeddings") else 0
    assert result.host_weights >= 2 * table
    if "qlora" not in name:
        assert result.components[WEIGHTS] == 2 * (params - table)  # bf16, every frozen weight on the card


def estimate_for(tmp_path: Path, args, seq: int):
    (tmp_path / "config.json").write_text(json.dumps(hf_config_from_model_args(args)))
    cfg = load_config(configs_dir() / "llama3_1/8B_lora_single_device.yaml", [
        "model._component_=tunelite.models.from_checkpoint", f"+model.checkpoint_dir={tmp_path}",
        f"checkpointer.checkpoint_dir={tmp_path}", f"tokenizer.max_seq_len={seq}", "batch_size=1",
        "enable_activation_checkpointing=False", "model.lora_attn_modules=[output_proj]",
        "offload_embeddings=False"])  # some families tie the table to the output projection
    return estimate_memory(cfg, LORA_MEMORY).components[ACTIVATIONS]


def test_estimated_activations_follow_each_familys_layer(tmp_path):
    """A plain MLP (GPT-2) keeps less than a gated one of the same sizes; Gemma 2's capped scores
    make its attention's memory grow with the square of the sequence, flash attention's does not."""
    gemma = FAMILIES["gemma2-softcaps-alternating_window"]
    sizes = dict(vocab_size=1024, num_layers=4, num_heads=8, num_kv_heads=8, embed_dim=512, intermediate_dim=2048)
    gpt2 = dataclasses.replace(FAMILIES["gpt2-learned_positions-conv1d"], **sizes, max_seq_len=4096)
    gated = dataclasses.replace(FAMILIES["llama3_1-gqa-rope_scaled"], **sizes)
    assert estimate_for(tmp_path, gpt2, 1024) < estimate_for(tmp_path, gated, 1024)
    capped = dataclasses.replace(gemma, **sizes)
    uncapped = dataclasses.replace(capped, attn_softcap=None)
    growth = [estimate_for(tmp_path, model, 2048) / estimate_for(tmp_path, model, 1024) for model in (capped, uncapped)]
    assert growth[0] > 2.5 and growth[1] < 2.1


@pytest.fixture(scope="module")
def qwen_demo_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qwen_demo")
    assert main(["run", "lora_finetune_single_device", "--config", "tiny/qwen_lora_cpu", f"output_dir={out}",
                 "epochs=1", "log_every_n_steps=1"]) in (0, None)
    return out


def our_qwen_demo_model(adapter: Path) -> torch.nn.Module:
    with torch.device("meta"):
        model = from_checkpoint(str(QWEN_DEMO), lora_attn_modules=["q_proj", "v_proj", "output_proj"],
                                apply_lora_to_mlp=True, lora_rank=16, lora_alpha=32)
    model = ours_from(QWEN_DEMO, model)
    load_adapter_into(model, adapter)
    return model.eval()


def test_tiny_qwen_demo_lowers_the_loss_and_writes_what_peft_and_transformers_load(qwen_demo_run):
    losses = [json.loads(line)["loss"] for p in (qwen_demo_run / "logs").glob("*.jsonl")
              for line in p.read_text().splitlines()]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]) - 0.3
    step = qwen_demo_run / "step_12"
    config = json.loads((step / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "gate_proj", "o_proj", "q_proj", "up_proj", "v_proj"]

    ours = our_qwen_demo_model(step / "adapter")
    tokens = torch.randint(0, 768, (2, 40), generator=torch.Generator().manual_seed(0))
    base = theirs_from(QWEN_DEMO)
    peft_model = PeftModel.from_pretrained(theirs_from(QWEN_DEMO), step / "adapter").eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(step / "model", dtype=torch.float32).eval()
    assert type(merged).__name__ == "Qwen2ForCausalLM"
    assert max_diff(ours, base, tokens) > 1e-2, "the adapter trained to nothing"
    assert max_diff(ours, peft_model, tokens) <= 1e-4
    assert max_diff(ours, merged, tokens) <= 1e-4


def test_the_qwen_demos_adapter_and_merged_model_generate_the_same_reply(qwen_demo_run, capsys):
    step = qwen_demo_run / "step_12"
    replies = []
    for folders in ([f"checkpointer.checkpoint_dir={step / 'model'}"],
                    [f"checkpointer.checkpoint_dir={QWEN_DEMO}", f"adapter_dir={step / 'adapter'}"]):
        assert main(["generate", "--config", "tiny/generation", *folders, "--prompt", "Give three tips",
                     "max_new_tokens=8"]) == 0
        replies.append(capsys.readouterr().out.rsplit("\n[", 1)[0])
    assert replies[0] == replies[1] and replies[0]  # the text, newlines included, of the same tokens


@each_family
def test_a_pack_of_three_samples_gives_each_its_loss_alone(args):
    # Sliding windows (the 81-token sample runs past the tiny 24-token ones) and Gemma 2's capped
    # scores take a dense block-causal mask built from the document ids; the others the
    # per-document path of tunelite.modules.attention. LongRoPE switches to its long factors for a
    # whole call once any position passes the pre-training window (as transformers does), so its
    # samples stay inside the window, where packed and alone agree on the factors.
    model = random_model(args).eval()
    g = torch.Generator().manual_seed(0)
    window = getattr(args.rope_scaling, "original_max_position_embeddings", None) or 81
    samples = [torch.randint(1, args.vocab_size, (1, min(n, window)), generator=g) for n in (37, 81, 22)]
    tokens = torch.cat(samples, dim=1)
    positions = torch.cat([torch.arange(s.shape[1]) for s in samples])[None]
    documents = torch.cat([torch.full((s.shape[1],), i) for i, s in enumerate(samples)])[None]
    with torch.no_grad():
        together = model(tokens, positions, document_ids=documents)
        alone = torch.cat([model(s) for s in samples], dim=1)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


@each_family
def test_each_familys_adapters_get_the_same_gradients_however_its_layers_are_recomputed(args):
    # The layer's blocks (attention alone under a checkpoint, the MLP's chunks), the down projection
    # left out of each recomputation, post-norms, fused projections, plain MLPs: all as if kept.
    def gradients(policy: str, mlp_chunk_tokens: int | None, by_block: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = lora_decoder(args, every_adapter(args))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lora_b"):
                    p.normal_(0, 0.1)
        set_trainable_params(model)
        set_memory_policy(model, [policy] * args.num_layers, mlp_chunk_tokens, by_block, min_offload_bytes=0)
        tokens = torch.randint(1, args.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
        model(tokens).float().pow(2).mean().backward()
        return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}

    kept = gradients(KEEP, None, False)
    for way in [(RECOMPUTE, None, False), (RECOMPUTE_OFFLOAD_ATTENTION, 16, True), (RECOMPUTE_ATTENTION, 16, False)]:
        other = gradients(*way)
        for name, grad in kept.items():
            torch.testing.assert_close(other[name], grad, rtol=1e-5, atol=1e-6, msg=f"{way}: {name}")
