"""`tunelite estimate`: the memory model, its advice, and that it reads nothing but config.json."""

import dataclasses
import json
import math
import re
import shlex
from pathlib import Path

import pytest
import torch

from tunelite.checkpointing.hf import hf_config_from_model_args
from tunelite.cli.main import main
from tunelite.config import instantiate, load_recipe_config
from tunelite.recipe_registry import RecipeDeclarations, get_recipe, read_declarations
from tunelite.errors import ConfigError
from tunelite.models.llama3_1 import LLAMA3_1_8B
from tunelite.modules.lora import is_adapter_key
from tunelite.modules.memory_policy import (
    KEEP,
    OFFLOAD,
    RECOMPUTE,
    RECOMPUTE_OFFLOAD,
    keeps_attention,
    offloads,
    recomputes,
)
from tunelite.training.memory_estimate import (
    ACTIVATIONS,
    ADAPTER,
    GIB,
    GRADIENTS,
    IN_LAYER,
    LOSS,
    OPTIMIZER,
    OUTPUT_GRADIENT,
    OVERHEAD,
    WEIGHTS,
    MemoryModel,
    MemoryPlan,
    _ordered_plan,
    estimate_memory,
    gib,
    memory_model,
    parse_memory_size,
    recipe_memory,
    with_overrides,
)

LORA, FULL = "lora_finetune_single_device", "full_finetune_single_device"
CONFIGS = {
    "lora": (LORA, "llama3_1/8B_lora_single_device"),
    "qlora": (LORA, "llama3_1/8B_qlora_single_device"),
    "full": (FULL, "llama3_1/8B_full_single_device"),
    # FSDP2 over several processes (--nproc-per-node); gradient sync on every micro-batch
    "full_fsdp": ("full_finetune_distributed", "llama3_1/8B_full"),
    "lora_fsdp": ("lora_finetune_distributed", "llama3_1/8B_lora"),
}
# Peak allocated GiB, Llama 3.1 8B random weights, bf16, checkpointing on, no compile, the embedding
# table on the card (benchmarks/recipe_bench.py): (config, batch, seq) -> measured. On an H100
# (2026-11-23), but QLoRA on an H200 (call 37), since a recomputed layer hands its recomputation's bf16
# weights to backward (d6739bb): 7.34 and 9.21 GiB before.
MEASURED = {
    ("lora", 2, 2048): 16.99, ("lora", 1, 8192): 18.85,
    ("qlora", 2, 2048): 7.67, ("qlora", 1, 8192): 9.57,
    ("full", 2, 2048): 19.03, ("full", 1, 8192): 20.10,
}


LLAMA3_1_8B_VALUES = 8_030_261_248  # parameters of Llama 3.1 8B


@pytest.fixture(scope="module")
def config_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An 8B "checkpoint" folder holding config.json and no weights at all."""
    folder = tmp_path_factory.mktemp("llama3_1_8b")
    (folder / "config.json").write_text(json.dumps(hf_config_from_model_args(LLAMA3_1_8B)))
    return folder


def declared(recipe: str) -> RecipeDeclarations:
    return read_declarations(get_recipe(recipe).path)


def load(recipe: str, name: str, overrides: list[str] = ()):
    return load_recipe_config(name, declared(recipe).keys, overrides, check_paths=False)  # as `tunelite estimate` loads it


def estimate(config_only: Path, kind: str, *overrides: str):
    recipe, name = CONFIGS[kind]
    cfg = load(recipe, name, [f"checkpointer.checkpoint_dir={config_only}", *overrides])
    return estimate_memory(cfg, recipe_memory(declared(recipe)))


@pytest.mark.parametrize("kind", ["lora", "qlora", "full"])
def test_breakdown_sums_to_the_total(config_only, kind):
    result = estimate(config_only, kind)
    assert sum(result.components.values()) == result.total
    assert result.total - result.components[OVERHEAD] == result.peak_allocated
    assert all(size >= 0 for size in result.components.values())


@pytest.mark.parametrize(("kind", "batch", "seq"), list(MEASURED))
def test_prediction_is_within_3_percent_of_the_measurement(config_only, kind, batch, seq):
    on_card = ("offload_embeddings=False",) if kind != "full" else ()
    predicted = estimate(config_only, kind, f"batch_size={batch}", f"tokenizer.max_seq_len={seq}",
                         *on_card).peak_allocated
    assert predicted / GIB == pytest.approx(MEASURED[kind, batch, seq], rel=0.03)


# Compiled, every layer recomputed with its checkpoint inside the layer's graph, the shipped configs
# (the embedding table in host memory; H200, call 39). With the table on the card: 17.39 / 8.04 (call 29).
MEASURED_COMPILED = {"lora": 16.41, "qlora": 7.06}


@pytest.mark.parametrize("kind", list(MEASURED_COMPILED))
def test_compiled_prediction_is_within_5_percent_of_the_h200_measurement(config_only, kind):
    # The adapters' parts that inductor holds apart in a recomputed layer's backward graph are
    # counted: without them LoRA's estimate was 16.96 GiB, in the loss's backward.
    predicted = estimate(config_only, kind, "compile=True").peak_allocated / GIB
    assert predicted == pytest.approx(MEASURED_COMPILED[kind], rel=0.05)


def test_activations_grow_with_tokens_not_with_how_they_split_into_batch_and_length(config_only):
    long = estimate(config_only, "lora", "batch_size=1", "tokenizer.max_seq_len=8192")
    wide = estimate(config_only, "lora", "batch_size=4", "tokenizer.max_seq_len=2048")
    short = estimate(config_only, "lora", "batch_size=1", "tokenizer.max_seq_len=4096")
    assert long.components[ACTIVATIONS] == wide.components[ACTIVATIONS]
    assert long.components[ACTIVATIONS] == pytest.approx(2 * short.components[ACTIVATIONS], rel=0.01)


def test_checkpointing_qlora_and_a_smaller_batch_each_lower_the_estimate(config_only):
    lora = estimate(config_only, "lora").total
    assert estimate(config_only, "lora", "enable_activation_checkpointing=False").total > lora + 10 * GIB
    assert estimate(config_only, "qlora").total < lora - 7 * GIB
    assert estimate(config_only, "lora", "batch_size=1").total < lora


def test_full_fine_tune_counts_gradients_and_optimizer_state_where_they_live(config_only):
    offloaded = estimate(config_only, "full")
    on_gpu = estimate(config_only, "full", "optimizer._component_=torch.optim.AdamW", "~optimizer.accumulation_dtype")
    weights = offloaded.components[WEIGHTS]
    assert on_gpu.components[GRADIENTS] >= weights  # bf16 gradients of every weight
    assert on_gpu.components["optimizer state"] == pytest.approx(2 * weights, rel=1e-6)  # two moments
    assert offloaded.components["optimizer state"] == 4 * 2**22  # the fp32 chunk updated weights pass through
    assert offloaded.components[GRADIENTS] < weights / 5  # only the output projection's, being summed
    assert offloaded.components[LOSS] == 0 and offloaded.peak_during == OUTPUT_GRADIENT


def test_estimate_reads_only_config_json(config_only, capsys):
    assert [p.name for p in config_only.iterdir()] == ["config.json"]
    assert main(["estimate", LORA, "--config", "llama3_1/8B_lora_single_device",
                 f"checkpointer.checkpoint_dir={config_only}", "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    for line in ("weights", "adapter", "gradients", "optimizer state", "activations", "logits/loss", "workspace",
                 "CUDA context", "= peak allocated", "= needed on the card"):
        assert line in out
    assert "Fits in 80.00 GiB" in out


@pytest.mark.parametrize(("kind", "budget"), [("lora", "12GB"), ("lora", "16GB"), ("full", "24GB")])
def test_too_little_gpu_memory_prints_overrides_with_which_the_estimate_fits(config_only, capsys, kind, budget):
    recipe, name = CONFIGS[kind]
    given = [f"checkpointer.checkpoint_dir={config_only}", "enable_activation_checkpointing=False"]
    assert main(["estimate", recipe, "--config", name, *given, "--gpu-memory", budget]) == 1
    out = capsys.readouterr().out
    assert "Does not fit" in out
    commands = [line.split("#")[0] for line in out.splitlines() if line.strip().startswith("tunelite run")]
    assert commands
    for command in commands:
        overrides = [w for w in shlex.split(command) if "=" in w or w.startswith("~")]
        assert "enable_activation_checkpointing=True" in overrides
        cfg = with_overrides(load(recipe, name), overrides)
        assert estimate_memory(cfg, recipe_memory(declared(recipe))).total <= parse_memory_size(budget)


def test_seq_len_option_sets_the_sequence_length(config_only, capsys):
    main(["estimate", LORA, "--config", "llama3_1/8B_lora_single_device", f"checkpointer.checkpoint_dir={config_only}",
          "--seq-len", "8192", "batch_size=1", "--gpu-memory", "80GB"])
    assert "batch 1 x 8192 tokens" in capsys.readouterr().out


def test_tiny_cpu_configs_estimate_from_the_shipped_checkpoint(capsys):
    assert main(["estimate", LORA, "--config", "tiny/lora_cpu", "--gpu-memory", "1GB"]) == 0
    assert re.search(r"= peak allocated +0\.\d\d GiB", capsys.readouterr().out)


def test_memory_sizes_read_as_cards_print_them():
    assert parse_memory_size("24GB") == parse_memory_size("24 GiB") == parse_memory_size("24") == 24 * GIB
    assert parse_memory_size("16000MiB") == 16000 * 2**20
    with pytest.raises(ConfigError, match="--gpu-memory"):
        parse_memory_size("lots")


def test_estimate_refuses_a_recipe_that_declares_no_memory_facts(capsys):
    assert main(["estimate", "generate", "--config", "tiny/generation"]) == 2
    assert "generate declares no MEMORY" in capsys.readouterr().err


def test_estimate_reads_what_an_edited_copy_of_a_recipe_declares(config_only, tmp_path, capsys):
    """Not recipe names: a copy that trains every weight is estimated with every weight's gradient."""
    assert main(["cp", LORA, str(tmp_path / "my_recipe.py")]) == 0
    given = ["--config", "llama3_1/8B_lora_single_device", f"checkpointer.checkpoint_dir={config_only}",
             "--gpu-memory", "80GB", "offload_embeddings=False"]  # a table that trains stays on the card
    assert main(["estimate", str(tmp_path / "my_recipe.py"), *given]) == 0
    as_copied = capsys.readouterr().out
    script = tmp_path / "my_recipe.py"
    script.write_text(script.read_text().replace('MEMORY = {"trains": "adapters"', 'MEMORY = {"trains": "all"'))
    assert main(["estimate", str(script), *given]) == 0
    edited = capsys.readouterr().out
    gradients = [float(re.search(r"gradients +([\d.]+) GiB", out).group(1)) for out in (as_copied, edited)]
    assert gradients[0] < 0.1 < 10 < gradients[1]


def test_estimate_builds_the_model_on_the_meta_device_only(config_only, monkeypatch):
    monkeypatch.setattr(torch.nn.Module, "to", lambda *a, **k: pytest.fail("a model was moved to a device"))
    assert estimate(config_only, "qlora").peak_allocated > 0


# --- memory policies, the budget's choice, host memory, the longest sample ---------------------


def model_of(config_only: Path, kind: str, *overrides: str) -> MemoryModel:
    recipe, name = CONFIGS[kind]
    cfg = load(recipe, name, [f"checkpointer.checkpoint_dir={config_only}", *overrides])
    return memory_model(cfg, recipe_memory(declared(recipe)))


def uniform(policy: str) -> MemoryPlan:
    return MemoryPlan((policy,) * LLAMA3_1_8B.num_layers)


@pytest.mark.parametrize(("kind", "batch", "seq"), [("lora", 2, 2048), ("qlora", 1, 32768)])
def test_each_policys_estimate_is_ordered_as_memory_must_be(config_only, kind, batch, seq):
    model = model_of(config_only, kind, f"batch_size={batch}", f"tokenizer.max_seq_len={seq}")
    keep, recompute, offload, both = (model.estimate(uniform(p)) for p in (KEEP, RECOMPUTE, OFFLOAD, RECOMPUTE_OFFLOAD))
    assert keep.total > recompute.total > both.total and keep.total > offload.total
    assert keep.host_bytes == recompute.host_bytes == 0 < both.host_bytes < offload.host_bytes
    # recompute+offload pins each layer's input, rounded up to a power of two as the pinned allocator does
    layer_input = batch * seq * LLAMA3_1_8B.embed_dim * 2
    assert both.host_bytes == LLAMA3_1_8B.num_layers * 2 ** math.ceil(math.log2(layer_input))


@pytest.mark.parametrize(("kind", "seq"), [("lora", 2048), ("qlora", 2048), ("qlora", 32768)])
@pytest.mark.parametrize("budget_gib", [18, 20, 22, 24, 40])
def test_the_budget_picks_the_least_recomputation_then_the_fewest_offloaded_layers_that_fit(
        config_only, kind, seq, budget_gib):
    batch = 2 if seq == 2048 else 1
    model, budget = model_of(config_only, kind, f"batch_size={batch}", f"tokenizer.max_seq_len={seq}"), budget_gib * GIB
    found = model.fastest_plan(budget)
    if found is None:  # LoRA's bf16 weights alone leave no room in 18 GiB
        assert model.estimate(uniform(RECOMPUTE_OFFLOAD)).total > budget
        return
    plan, result = found
    assert result == model.estimate(plan) and result.total <= budget
    layers = len(plan.layers)
    recomputed = sum(map(recomputes, plan.layers))
    offloaded = sum(offloads(p) for p in plan.layers)
    attention = sum(map(keeps_attention, plan.layers))
    way = (plan.mlp_chunk_tokens, plan.by_block)  # the MLP whole, or its chunks and how they are recomputed
    assert plan == _ordered_plan(layers, recomputed, offloaded, attention, *way)
    linear, attention_flops = model.recompute_flops(batch, seq)
    assert linear > 0 and attention_flops > 0

    def cost(r: int, a: int) -> float:
        return r * linear + (r - a) * attention_flops

    # nothing that recomputes less fits (with the MLP chunked as chosen), however many of its layers are offloaded
    cheaper = [(r, a) for r in range(layers + 1) for a in range(r + 1) if cost(r, a) < cost(recomputed, attention)]
    assert all(model.estimate(_ordered_plan(layers, r, r, a, *way)).total > budget for r, a in cheaper)
    if offloaded:  # nor the same with one fewer offloaded
        assert model.estimate(_ordered_plan(layers, recomputed, offloaded - 1, attention, *way)).total > budget
    if seq == 32768 and budget_gib == 22:  # long samples keep attention outputs: their recomputation costs seq^2
        assert attention > 0 and attention_flops > linear / 2


@pytest.mark.parametrize(("kind", "budget_gib", "kept"), [("qlora", 8.9, 6), ("lora", 18.2, 5)])
def test_kept_layers_come_last_where_backward_frees_them_first(config_only, kind, budget_gib, kept):
    # Kept first, every recomputed layer's backward ran on top of their activations: the same
    # policies in that order peak higher, and the 8B QLoRA kept 4 layers under 8.9 GiB, not 6.
    model = model_of(config_only, kind)
    plan, result = model.fastest_plan(int(budget_gib * GIB))
    assert plan.layers.count(KEEP) == kept and set(plan.layers[-kept:]) == {KEEP}
    first = dataclasses.replace(plan, layers=plan.layers[-kept:] + plan.layers[:-kept])
    assert model.estimate(first).peak_allocated > result.peak_allocated


def test_packed_samples_keep_no_attention_output_since_flex_attention_would_not_save_it(config_only):
    unpacked, packed = (model_of(config_only, "qlora", "batch_size=1", "tokenizer.max_seq_len=32768", *extra)
                        for extra in ([], ["+dataset.packed=True"]))
    assert any(map(keeps_attention, unpacked.fastest_plan(22 * GIB)[0].layers))
    assert packed.recompute_flops(1, 32768)[1] == 0
    assert not any(map(keeps_attention, packed.fastest_plan(22 * GIB)[0].layers))


def test_more_budget_keeps_more_layers(config_only):
    model = model_of(config_only, "qlora")
    kept = [model.fastest_plan(gib * GIB)[0].layers.count(KEEP) for gib in (10, 16, 22, 40)]
    assert kept == sorted(kept) and kept[0] < kept[-1] == LLAMA3_1_8B.num_layers


def test_long_samples_grow_linearly_and_chunk_the_mlp_only_when_needed(config_only):
    model = model_of(config_only, "qlora", "batch_size=1")
    leanest = uniform(RECOMPUTE_OFFLOAD)
    activations = [model.estimate(leanest, 1, seq).components[ACTIVATIONS] for seq in (65536, 131072, 262144)]
    # a + b x tokens, no tokens^2 term: doubling the length doubles the increase
    assert activations[2] - activations[1] == pytest.approx(2 * (activations[1] - activations[0]), rel=1e-6)
    assert MemoryPlan((KEEP,)).chunks_mlp(8192) is False and MemoryPlan((KEEP,)).chunks_mlp(8193) is True
    whole = dataclasses.replace(leanest, mlp_chunk_tokens=None)
    assert model.estimate(whole, 1, 65536).total > model.estimate(leanest, 1, 65536).total + 5 * GIB


def test_layers_are_recomputed_by_block_unless_only_the_whole_layer_fits(config_only):
    model = model_of(config_only, "qlora", "batch_size=1", "offload_embeddings=False")
    assert model.fastest_plan(22 * GIB, 1, 65536)[0].by_block
    assert not model.fastest_plan(22 * GIB, 1, 131072)[0].by_block  # 128k fits only so
    leanest = uniform(RECOMPUTE_OFFLOAD)
    by_block = dataclasses.replace(leanest, by_block=True)
    # each layer's MLP block input pinned too
    assert model.estimate(by_block, 1, 131072).host_bytes == 2 * model.estimate(leanest, 1, 131072).host_bytes
    assert model.estimate(by_block, 1, 131072).total > 22 * GIB > model.estimate(leanest, 1, 131072).total


def test_estimate_prints_every_policy_and_what_the_budget_picks(config_only, capsys):
    given = [f"checkpointer.checkpoint_dir={config_only}", "--gpu-memory", "22GB"]
    assert main(["estimate", LORA, "--config", "llama3_1/8B_qlora_single_device", *given]) == 0
    out = capsys.readouterr().out
    for policy in ("keep every layer", "recompute every layer", "offload every layer", "recompute+offload every layer"):
        assert re.search(rf"  {re.escape(policy)} +\d+\.\d\d GiB +\d+\.\d\d GiB", out)
    plan, result = model_of(config_only, "qlora").fastest_plan(22 * GIB)
    assert f"fastest in 22.00 GiB: {plan.describe(4096)}" in out
    assert "what memory_budget_gib: 22 or auto on this card picks" in out


def test_a_config_with_a_budget_is_estimated_under_the_budgets_plan(config_only, capsys):
    given = [f"checkpointer.checkpoint_dir={config_only}", "--gpu-memory", "24GB", "+memory_budget_gib=16"]
    assert main(["estimate", LORA, "--config", "llama3_1/8B_qlora_single_device", *given]) == 0
    plan, result = model_of(config_only, "qlora").fastest_plan(16 * GIB)
    out = capsys.readouterr().out
    assert f"bf16, {plan.describe(4096)}):" in out
    assert re.search(rf"= needed on the card +{gib(result.total)}", out)


def test_offloading_is_counted_in_host_memory(config_only, capsys):
    given = [f"checkpointer.checkpoint_dir={config_only}", "enable_activation_checkpointing=True",
             "+enable_activation_offloading=True", "--gpu-memory", "24GB"]
    assert main(["estimate", LORA, "--config", "llama3_1/8B_qlora_single_device", *given]) == 0
    assert re.search(r"host memory \(pinned\) +1\.00 GiB", capsys.readouterr().out)  # 32 x 2 x 2048 x 4096 x 2 bytes


@pytest.mark.parametrize(("kind", "card"), [("qlora", "24GB"), ("lora", "22GB")])
def test_max_seq_prints_the_longest_sample_that_fits(config_only, capsys, kind, card):
    recipe, name = CONFIGS[kind]
    assert main(["estimate", recipe, "--config", name, f"checkpointer.checkpoint_dir={config_only}",
                 "--gpu-memory", card, "--max-seq"]) in (0, 1)
    seq = int(re.search(r"Longest sample that fits .* \(batch 1\): ([\d,]+) tokens", capsys.readouterr().out)
              .group(1).replace(",", ""))
    model, budget = model_of(config_only, kind), parse_memory_size(card)
    assert seq % 1024 == 0 and model.fastest_plan(budget, 1, seq) is not None
    assert model.fastest_plan(budget, 1, seq + 1024) is None


# --- FSDP2: one GPU's share over N processes -----------------------------------------------------


def model_over(config_only: Path, kind: str, world_size: int, *overrides: str) -> MemoryModel:
    recipe, name = CONFIGS[kind]
    cfg = load(recipe, name, [f"checkpointer.checkpoint_dir={config_only}", "gradient_accumulation_steps=1", *overrides])
    return memory_model(cfg, recipe_memory(declared(recipe)), world_size)


def sizes(kind: str) -> dict[str, int]:
    """Bytes in bf16, counted on the meta model: the weights outside the layers (embedding, final
    norm, output projection), one layer's, the trained ones, one layer's trained ones, and the
    output projection's if it trains."""
    recipe, name = CONFIGS[kind]
    with torch.device("meta"):
        model = instantiate(load(recipe, name).model)
    in_layers = {id(t) for t in model.layers.parameters()}
    layer = dict(model.layers[0].named_parameters())
    trains = (lambda name: True) if recipe_memory(declared(recipe)).trains_all else is_adapter_key
    return {
        "root": 2 * sum(t.numel() for t in model.parameters() if id(t) not in in_layers),
        "layer": 2 * sum(t.numel() for t in layer.values()),
        "trained": 2 * sum(t.numel() for n, t in model.named_parameters() if trains(n)),
        "layer trained": 2 * sum(t.numel() for n, t in layer.items() if trains(n)),
        "output": 2 * LLAMA3_1_8B.vocab_size * LLAMA3_1_8B.embed_dim if trains("output.weight") else 0,
    }


@pytest.mark.parametrize("kind", ["full_fsdp", "lora_fsdp"])
def test_two_processes_halve_weights_gradients_and_optimizer_state(config_only, kind):
    # the 8B LoRA config keeps the frozen base whole; sharded, it halves too
    sharded = ["fsdp_shard_frozen_weights=True"] if kind == "lora_fsdp" else []
    whole, half = (model_over(config_only, kind, n, *sharded).estimate(uniform(RECOMPUTE)) for n in (1, 2))
    size = sizes(kind)
    assert half.peak_during == IN_LAYER
    assert half.components[OPTIMIZER] == pytest.approx(whole.components[OPTIMIZER] / 2, abs=64)
    assert half.components[ADAPTER] == pytest.approx(whole.components[ADAPTER] / 2, abs=1)
    # Beyond its halves: the embedding and output projection gathered for the step, and the layer
    # in backward and the one prefetched, gathered whole.
    assert half.components[WEIGHTS] == pytest.approx(whole.components[WEIGHTS] / 2 + size["root"] + 2 * size["layer"],
                                                     abs=1)
    # The layer's gradients whole (bf16), the previous layer's reduce-scatter input (fp32) and the
    # output projection's whole gradient, kept until the root's reduce-scatter at the end of backward.
    assert half.components[GRADIENTS] == pytest.approx(
        size["trained"] / 2 + 3 * size["layer trained"] + size["output"], abs=1)
    assert "per GPU, 2 processes" in half.setup and "per GPU" not in whole.setup


def test_activations_are_per_process_as_on_one_device(config_only):
    one, two, four = (model_over(config_only, "lora_fsdp", n).estimate(uniform(RECOMPUTE)) for n in (1, 2, 4))
    assert one.peak_during == two.peak_during == four.peak_during == IN_LAYER
    assert one.components[ACTIVATIONS] == two.components[ACTIVATIONS] == four.components[ACTIVATIONS]
    full = [model_over(config_only, "full_fsdp", n, "enable_activation_checkpointing=False").estimate(uniform(KEEP))
            for n in (2, 8)]
    assert full[0].components[ACTIVATIONS] == full[1].components[ACTIVATIONS]


def test_cpu_offload_moves_the_shards_to_host_memory(config_only):
    on_gpu, offloaded = (model_over(config_only, "full_fsdp", 2, f"fsdp_cpu_offload={flag}").estimate(uniform(RECOMPUTE))
                         for flag in (False, True))
    size = sizes("full_fsdp")
    gathered = size["root"] + 2 * size["layer"]
    assert offloaded.components[OPTIMIZER] == 0 and offloaded.components[WEIGHTS] == pytest.approx(gathered, abs=1)
    # what stays on the GPU of the gradients: those being reduced, and the output projection's until then
    assert offloaded.components[GRADIENTS] == pytest.approx(3 * size["layer trained"] + size["output"], abs=1)
    shard_of_gradients = on_gpu.components[GRADIENTS] - offloaded.components[GRADIENTS]
    assert shard_of_gradients == pytest.approx(2 * LLAMA3_1_8B_VALUES / 2, rel=1e-6)
    assert offloaded.host_state == pytest.approx(on_gpu.components[WEIGHTS] - gathered + shard_of_gradients
                                                 + on_gpu.components[OPTIMIZER], abs=4)
    assert on_gpu.host_state == 0 and offloaded.host_bytes == 0  # no activation offloaded
    assert re.search(r"host memory \(shards\) +\d+\.\d\d GiB +weights, gradients and optimizer state", offloaded.report())
    assert offloaded.components[ACTIVATIONS] == on_gpu.components[ACTIVATIONS]


def test_accumulating_without_gradient_sync_keeps_every_gradient_whole_in_fp32(config_only):
    synced = model_over(config_only, "full_fsdp", 2).estimate(uniform(RECOMPUTE))
    accumulated = model_over(config_only, "full_fsdp", 2, "gradient_accumulation_steps=2").estimate(uniform(RECOMPUTE))
    # set_gradient_sync skips the reduce-scatter until a step's last micro-batch
    assert accumulated.components[GRADIENTS] - synced.components[GRADIENTS] == pytest.approx(
        4 * LLAMA3_1_8B_VALUES - 2 * LLAMA3_1_8B_VALUES / 2, rel=1e-6)


def test_without_resharding_after_forward_every_layer_stays_gathered(config_only):
    resharded, kept = (model_over(config_only, "full_fsdp", 2, f"fsdp_reshard_after_forward={flag}")
                       .estimate(uniform(RECOMPUTE)) for flag in (True, False))
    extra_layers = LLAMA3_1_8B.num_layers - 2
    assert kept.components[WEIGHTS] - resharded.components[WEIGHTS] == pytest.approx(
        extra_layers * sizes("full_fsdp")["layer"], abs=1)


def test_a_frozen_base_left_whole_weighs_on_each_gpu_what_it_weighs_on_one(config_only, capsys):
    one = model_over(config_only, "lora_fsdp", 1).estimate(uniform(RECOMPUTE))
    default, sharded, whole = (model_over(config_only, "lora_fsdp", 2, *flag).estimate(uniform(RECOMPUTE))
                               for flag in ([], ["fsdp_shard_frozen_weights=True"], ["fsdp_shard_frozen_weights=False"]))
    assert whole == default  # the 8B config keeps the base whole; True is the sharding the tests above check
    size = sizes("lora_fsdp")
    # The frozen base whole, as on one GPU; gathered, every adapter: what trains is one unit,
    # gathered from the forward's start to the backward's end.
    assert whole.components[WEIGHTS] == pytest.approx(one.components[WEIGHTS] + size["trained"], abs=1)
    assert whole.components[WEIGHTS] > sharded.components[WEIGHTS]
    for part in (ADAPTER, OPTIMIZER, ACTIVATIONS):
        assert whole.components[part] == sharded.components[part], part
    # one unit holds every gradient whole until its reduce-scatter, no layer's apart
    assert whole.components[GRADIENTS] == pytest.approx(size["trained"], abs=1)
    given = ["--config", "llama3_1/8B_lora", f"checkpointer.checkpoint_dir={config_only}"]
    printed = []
    for nproc in (["--nproc-per-node", "1"], ["--nproc-per-node", "2", "fsdp_shard_frozen_weights=False"]):
        assert main(["estimate", "lora_finetune_distributed", *given, *nproc]) == 0
        printed.append(re.search(r"^  weights +(\d+\.\d\d GiB) +(.*)$", capsys.readouterr().out, re.M).groups())
    # one GPU's weights, and the adapters (0.04 GiB) gathered
    assert 0 < float(printed[1][0].split()[0]) - float(printed[0][0].split()[0]) <= 0.05
    assert "whole on every GPU" in printed[1][1]


def test_more_processes_fit_a_plan_that_keeps_more_layers(config_only):
    assert model_over(config_only, "full_fsdp", 1).fastest_plan(40 * GIB) is None
    kept = [model_over(config_only, "full_fsdp", n).fastest_plan(40 * GIB)[0].layers.count(KEEP) for n in (2, 4, 8)]
    assert kept[0] < kept[1] < kept[2] == LLAMA3_1_8B.num_layers


def test_nproc_per_node_prints_one_gpus_share(config_only, capsys):
    given = ["--config", "llama3_1/8B_full", f"checkpointer.checkpoint_dir={config_only}", "--gpu-memory", "80GB"]
    assert main(["estimate", "full_finetune_distributed", *given, "--nproc-per-node", "2"]) == 0
    out = capsys.readouterr().out
    assert "(full_finetune_distributed, per GPU, 2 processes, batch 2 x 2048 tokens" in out
    expected = model_over(config_only, "full_fsdp", 2).estimate(uniform(RECOMPUTE))
    assert re.search(rf"= needed on the card +{gib(expected.total)}", out)
    assert main(["estimate", "full_finetune_distributed", *given, "--nproc_per_node", "2"]) == 0  # torchrun's spelling
    assert capsys.readouterr().out == out
    assert main(["estimate", "full_finetune_distributed", *given]) == 0
    assert "per GPU" not in capsys.readouterr().out  # one device holds everything
    with pytest.raises(SystemExit):
        main(["estimate", "full_finetune_distributed", *given, "--nproc-per-node", "0"])
    assert "'0' is not a number of processes" in capsys.readouterr().err


def test_estimate_help_says_the_figures_are_per_gpu(capsys):
    with pytest.raises(SystemExit):
        main(["estimate", "--help"])
    assert re.search(r"--nproc-per-node N.*every figure is\s+then per GPU", capsys.readouterr().out, re.S)


def test_sharded_advice_offloads_with_fsdp_and_launches_as_many_processes(config_only, capsys):
    recipe, name = CONFIGS["full_fsdp"]
    given = [f"checkpointer.checkpoint_dir={config_only}", "--gpu-memory", "24GB", "--nproc-per-node", "2"]
    assert main(["estimate", recipe, "--config", name, *given]) == 1
    commands = [line.split("#")[0] for line in capsys.readouterr().out.splitlines()
                if line.strip().startswith("tunelite run")]
    assert any("fsdp_cpu_offload=True" in command for command in commands)
    for command in commands:
        assert command.strip().startswith(f"tunelite run {recipe} --nproc_per_node 2 --config")
        assert "optimizer_in_bwd" not in command  # single-device options the distributed recipe lacks
        overrides = [w for w in shlex.split(command) if "=" in w or w.startswith("~")]
        cfg = with_overrides(load(recipe, name), overrides)
        assert estimate_memory(cfg, recipe_memory(declared(recipe)), world_size=2).total <= 24 * GIB



def test_an_offloaded_embedding_table_leaves_the_card_for_pinned_host_memory(config_only, capsys):
    table = LLAMA3_1_8B.vocab_size * LLAMA3_1_8B.embed_dim * 2
    for kind in ("lora", "qlora"):
        on_card, on_host = (model_of(config_only, kind, f"offload_embeddings={offloaded}") for offloaded in (False, True))
        plan = uniform(RECOMPUTE)
        assert on_card.estimate(plan).peak_allocated - on_host.estimate(plan).peak_allocated == table
        assert on_host.estimate(plan).host_weights == 2 ** math.ceil(math.log2(table)) and on_host.estimate(plan).host_bytes == 0
        # the freed gigabyte buys kept layers under the same budget
        budget = 18 * GIB if kind == "lora" else 9 * GIB
        assert on_host.fastest_plan(budget)[0].layers.count(KEEP) > on_card.fastest_plan(budget)[0].layers.count(KEEP)
    given = [f"checkpointer.checkpoint_dir={config_only}"]  # the shipped config offloads it
    assert main(["estimate", LORA, "--config", "llama3_1/8B_lora_single_device", *given]) == 0
    out = capsys.readouterr().out
    assert "the embedding table in host memory" in out
    assert re.search(r"host memory \(pinned\) +1\.00 GiB +the embedding table", out)
    assert re.search(r"  recompute every layer +\d+\.\d\d GiB +1\.00 GiB", out)  # the policies' host column counts it


def test_an_embedding_table_that_is_the_output_projection_cannot_be_offloaded(tmp_path):
    cfg = load(LORA, "llama3_2/1B_lora_single_device", [f"checkpointer.checkpoint_dir={tmp_path}",
                                                         "+offload_embeddings=True"])
    with pytest.raises(ConfigError, match="offload_embeddings: .*tied embeddings"):
        memory_model(cfg, recipe_memory(declared(LORA)))
