"""Per-layer memory policies (keep, recompute, offload, recompute+offload): the same gradients
under each, what the offloader moves and when, and how a recipe chooses its plan."""

import contextlib
import dataclasses
import re
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import TINY, random_model
from test_training_recipes import run_recipe
from tunelite.config import load_recipe_config
from tunelite.errors import ConfigError, ResourceError
from tunelite.models.llama import LoRAArgs, lora_llama, set_activation_checkpointing
from tunelite.modules.lora import set_trainable_params
from tunelite.modules.memory_policy import (
    ATTENTION_OPS,
    KEEP,
    OFFLOAD,
    POLICIES,
    RECOMPUTE,
    RECOMPUTE_ATTENTION,
    RECOMPUTE_OFFLOAD,
    RECOMPUTE_OFFLOAD_ATTENTION,
    keeps_attention,
    set_memory_policy,
    uniform_policies,
)
from tunelite.modules.nf4 import NF4Tensor
from tunelite.modules import offload
from tunelite.modules.offload import ActivationOffloader
from tunelite.recipe_registry import get_recipe, read_declarations
from tunelite.training.memory_estimate import GIB, MemoryPlan, memory_facts, memory_model, pinned_bytes
from tunelite.cli.estimate import run_plan
from tunelite.runtime.host import available_host_memory
from tunelite.training.memory_policy import budget_bytes, plan_memory

LORA = "lora_finetune_single_device"
# kept layers first and last (the budget's plans keep the last ones)
MIXED = [(KEEP, RECOMPUTE_OFFLOAD), (OFFLOAD, RECOMPUTE), (RECOMPUTE_OFFLOAD, OFFLOAD), (RECOMPUTE_OFFLOAD, KEEP),
         (RECOMPUTE_OFFLOAD_ATTENTION, KEEP)]


def lora_model() -> torch.nn.Module:
    """The tiny model with adapters on attention and MLP, B non-zero so every adapter gets a gradient."""
    base = random_model()
    torch.manual_seed(1)
    model = lora_llama(TINY, LoRAArgs(lora_attn_modules=("q_proj", "v_proj", "output_proj"), apply_lora_to_mlp=True))
    model.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.1)
    set_trainable_params(model)
    return model.train()


def gradients(model: torch.nn.Module, policies, mlp_chunk_tokens=None, tokens=None,
              by_block=False) -> dict[str, torch.Tensor]:
    set_memory_policy(model, policies, mlp_chunk_tokens, by_block, min_offload_bytes=0)
    if tokens is None:
        tokens = torch.randint(0, TINY.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    model(tokens).float().pow(2).mean().backward()
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("policies", [(p, p) for p in POLICIES[1:]] + MIXED, ids=str)
@pytest.mark.parametrize("build", [lora_model, lambda: random_model().train()], ids=["lora", "full"])
def test_gradients_are_identical_under_every_policy(policies, build):
    kept = gradients(build(), (KEEP, KEEP))
    other = gradients(build(), policies)
    assert kept.keys() == other.keys() and len(kept) > 0
    for name in kept:
        assert torch.equal(kept[name], other[name]), name


@pytest.mark.parametrize("by_block", [False, True], ids=["by layer", "by block"])
@pytest.mark.parametrize("policy", POLICIES)
def test_the_mlp_in_chunks_gives_the_gradients_of_the_whole_mlp(policy, by_block):
    whole = gradients(lora_model(), (policy, policy))
    # 2 x 33 tokens: 5 chunks of 2 x 8
    chunked = gradients(lora_model(), (policy, policy), mlp_chunk_tokens=16, by_block=by_block)
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], rtol=0, atol=1e-6)


def test_offloading_holds_host_copies_from_forward_to_backward():
    model = lora_model()
    set_memory_policy(model, (RECOMPUTE_OFFLOAD, OFFLOAD), min_offload_bytes=0)
    offloader = model.memory_policy.offloader
    tokens = torch.randint(0, TINY.vocab_size, (2, 33))
    loss = model(tokens).float().pow(2).mean()
    after_forward = offloader.host_bytes
    # The recomputed layer saves its input alone (b x s x d fp32); the plain one far more.
    assert after_forward > 2 * 33 * TINY.embed_dim * 4 * 5
    loss.backward()
    assert offloader.host_bytes == 0 and offloader.peak_host_bytes == after_forward


def test_recompute_and_offload_moves_only_each_layer_input():
    model = lora_model()
    set_memory_policy(model, (RECOMPUTE_OFFLOAD,) * TINY.num_layers, min_offload_bytes=0)
    model(torch.randint(0, TINY.vocab_size, (2, 33))).float().pow(2).mean().backward()
    assert model.memory_policy.offloader.peak_host_bytes == TINY.num_layers * 2 * 33 * TINY.embed_dim * 4


@pytest.mark.parametrize("by_block", [False, True], ids=["by layer", "by block"])
def test_recompute_and_offload_by_block_moves_each_layer_input_and_its_mlp_blocks_input(by_block):
    model = lora_model()
    set_memory_policy(model, (RECOMPUTE_OFFLOAD,) * TINY.num_layers, 16, by_block, min_offload_bytes=0)
    model(torch.randint(0, TINY.vocab_size, (2, 33))).float().pow(2).mean().backward()
    inputs = 1 + by_block
    assert model.memory_policy.offloader.peak_host_bytes == inputs * TINY.num_layers * 2 * 33 * TINY.embed_dim * 4
    # and the estimate counts as many
    estimate = memory_model(tiny_cfg(), memory_facts(LORA, MEMORY))
    layers, one = estimate.args.num_layers, pinned_bytes(2 * 33 * estimate.args.embed_dim * estimate.p)
    plan = MemoryPlan((RECOMPUTE_OFFLOAD,) * layers, 16, by_block)
    assert estimate.estimate(plan, 2, 33).host_bytes == inputs * layers * one
    assert estimate.estimate(dataclasses.replace(plan, mlp_chunk_tokens=None), 2, 33).host_bytes == layers * one


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_recompute_offload_attention_moves_the_kept_attention_output_where_the_estimate_says(compiled):
    """Compiled, the layer's checkpoint is inside its graph, which saves the attention output through
    the offloader's hook: it goes to the host with the input. Eager, the checkpoint keeps it on the card."""
    torch._dynamo.reset()
    model = lora_model()
    set_memory_policy(model, (RECOMPUTE_OFFLOAD_ATTENTION,) * TINY.num_layers, None, min_offload_bytes=0)
    if compiled:
        for layer in model.layers:
            layer.compile(backend="aot_eager")
    model(torch.randint(0, TINY.vocab_size, (2, 33))).float().pow(2).mean().backward()
    tokens, heads, p = 2 * 33, TINY.num_heads, 4
    attention = tokens * heads * (TINY.resolved_head_dim * p + 4) if compiled else 0  # the output and its logsumexp
    assert model.memory_policy.offloader.peak_host_bytes == TINY.num_layers * (tokens * TINY.embed_dim * p + attention)
    estimate = memory_model(tiny_cfg(f"compile={compiled}"), memory_facts(LORA, MEMORY))
    layers, plan = estimate.args.num_layers, MemoryPlan((RECOMPUTE_OFFLOAD_ATTENTION,) * estimate.args.num_layers, None)
    one = pinned_bytes(tokens * estimate.args.embed_dim * estimate.p)
    if compiled:
        one += pinned_bytes(tokens * estimate.args.num_heads * estimate.args.resolved_head_dim * estimate.p)
        one += pinned_bytes(tokens * estimate.args.num_heads * 4)
    assert estimate.estimate(plan, 2, 33).host_bytes == layers * one


@pytest.mark.parametrize("by_block, runs", [(False, 14), (True, 10)], ids=["by layer", "by block"])
@pytest.mark.parametrize("policy", [RECOMPUTE, RECOMPUTE_ATTENTION, RECOMPUTE_OFFLOAD_ATTENTION])
def test_a_layer_recomputed_by_block_runs_each_mlp_chunk_twice_not_three_times(policy, by_block, runs):
    # The chunks checkpoint themselves; recomputing the whole layer runs them until the last one's
    # input is saved again: 4 of 5 chunks a third time.
    model = lora_model()
    calls = mlp_calls(model)
    gradients(model, (policy,) * TINY.num_layers, mlp_chunk_tokens=16, by_block=by_block)  # 5 chunks a layer
    assert len(calls) == runs * TINY.num_layers


def mlp_calls(model: torch.nn.Module) -> list[int]:
    """A list that each layer's MLP appends its input's length to whenever it runs."""
    calls = []
    for layer in model.layers:
        forward = layer.mlp.forward
        layer.mlp.forward = lambda x, *args, forward=forward: calls.append(x.shape[1]) or forward(x, *args)
    return calls


class Dispatched(TorchDispatchMode):
    """Counts the ops dispatched while active for which `which(op, args)` holds."""

    def __init__(self, which) -> None:
        super().__init__()
        self.which, self.count = which, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += bool(self.which(func, args))
        return func(*args, **(kwargs or {}))


def down_projections(func, args) -> bool:
    """(tokens x intermediate) @ (intermediate x embed) products: the down projection's forward,
    and the up and gate projections' input gradients."""
    return (func is torch.ops.aten.mm.default and args[0].shape[-1] == TINY.intermediate_dim
            and args[1].shape[-1] == TINY.embed_dim)


@pytest.mark.parametrize("quantized", [False, True], ids=["bf16 base", "NF4 base"])
@pytest.mark.parametrize("policy", [RECOMPUTE, RECOMPUTE_OFFLOAD_ATTENTION])
def test_a_recomputed_layer_does_not_run_its_down_projection_again(policy, quantized):
    # Backward needs nothing the down projection computes: the recomputation stops before it.
    def products(policy: str) -> int:
        torch.manual_seed(0)
        model = lora_llama(TINY, LoRAArgs(("q_proj", "v_proj"), apply_lora_to_mlp=True, quantize_base=quantized))
        set_trainable_params(model)
        set_memory_policy(model.train(), (policy,) * TINY.num_layers, min_offload_bytes=0)
        with Dispatched(down_projections) as calls:
            model(torch.randint(0, TINY.vocab_size, (2, 33))).float().pow(2).mean().backward()
        return calls.count

    assert products(policy) == products(KEEP) == 3 * TINY.num_layers  # w2's forward, w1's and w3's gradients


@pytest.mark.parametrize("mlp_chunk_tokens", [None, 16], ids=["whole MLP", "MLP in chunks"])
def test_a_compiled_layer_runs_its_mlp_chunks_outside_its_graph(mlp_chunk_tokens):
    # Inside, their checkpoints held more than the estimate counts (call 20); outside, each chunk
    # is an eager checkpoint. The MLP whole stays in the graph.
    model = lora_model()
    set_memory_policy(model, (KEEP,) * TINY.num_layers, mlp_chunk_tokens)
    torch._dynamo.reset()
    h = torch.randn(2, 33, TINY.embed_dim, requires_grad=True)
    explained = torch._dynamo.explain(model.layers[0])(h, None, None, None)
    breaks = [str(reason.reason) for reason in explained.break_reasons]
    assert (breaks == []) == (mlp_chunk_tokens is None)
    assert all("in_sequence_chunks" in reason for reason in breaks)


@pytest.mark.parametrize("mlp_chunk_tokens", [None, 16], ids=["whole MLP", "MLP in chunks"])
def test_a_compiled_recomputed_layer_gives_the_kept_layers_gradients(mlp_chunk_tokens):
    # Its checkpoint inside its graph, or (in chunks) its attention block checkpointed alone around it.
    kept, model = gradients(lora_model(), (KEEP,) * TINY.num_layers), lora_model()
    torch._dynamo.reset()
    for layer in model.layers:
        layer.compile(backend="aot_eager")
    ours = gradients(model, (RECOMPUTE_OFFLOAD_ATTENTION, RECOMPUTE), mlp_chunk_tokens=mlp_chunk_tokens, by_block=True)
    for name, grad in kept.items():
        torch.testing.assert_close(ours[name], grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("quantized", [False, True], ids=["bf16 base", "NF4 base"])
@pytest.mark.parametrize("policy", [RECOMPUTE, RECOMPUTE_OFFLOAD_ATTENTION])
def test_a_compiled_recomputed_layer_is_one_graph_whose_backward_recomputes_only_what_it_reads(policy, quantized):
    # The checkpoint inside the layer's graph (call 28: around it, the layer took two graphs and the
    # GPU waited on the host). The partitioner leaves out what backward does not read: the down
    # projection's product, kept attention, and (NF4) a third dequantization of each weight.
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = lora_llama(TINY, LoRAArgs(("q_proj", "v_proj"), apply_lora_to_mlp=True, quantize_base=quantized)).train()
    set_trainable_params(model)
    set_memory_policy(model, (policy,) * TINY.num_layers, min_offload_bytes=0)
    h = torch.randn(2, 33, TINY.embed_dim, requires_grad=True)
    explained = torch._dynamo.explain(model.layers[0])(h, None, None, None)
    assert (explained.graph_count, explained.break_reasons) == (1, [])
    torch._dynamo.reset()
    for layer in model.layers:
        layer.compile(backend="aot_eager")
    tokens = torch.randint(0, TINY.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    model(tokens).float().pow(2).mean().backward()  # compiles
    counted = {"down": down_projections, "attention": lambda func, args: func in ATTENTION_OPS,
               "dequantized": lambda func, args: func is torch.ops.tunelite.dequantize_nf4.default}
    runs = {}
    for name, which in counted.items():
        with Dispatched(which) as calls:
            loss = model(tokens).float().pow(2).mean()
            in_forward = calls.count
            loss.backward()
        runs[name] = (in_forward, calls.count - in_forward)
    weights = 7 * TINY.num_layers if quantized else 0  # q, k, v, output, w1, w2, w3
    assert runs == {"down": (TINY.num_layers, 2 * TINY.num_layers),  # backward: w1's and w3's input gradients
                    "attention": (TINY.num_layers, 0 if keeps_attention(policy) else TINY.num_layers),
                    "dequantized": (weights, weights)}


@pytest.mark.parametrize("quantized", [False, True], ids=["bf16 base", "NF4 base"])
@pytest.mark.parametrize("policy", [RECOMPUTE, RECOMPUTE_ATTENTION, RECOMPUTE_OFFLOAD_ATTENTION])
def test_a_layer_that_keeps_its_attention_output_does_not_run_attention_again(policy, quantized):
    torch.manual_seed(0)
    model = lora_llama(TINY, LoRAArgs(("q_proj", "v_proj"), apply_lora_to_mlp=True, quantize_base=quantized)).train()
    set_trainable_params(model)
    set_memory_policy(model, (policy,) * TINY.num_layers, min_offload_bytes=0)
    tokens = torch.randint(0, TINY.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    with Dispatched(lambda func, args: func in ATTENTION_OPS) as calls:
        loss = model(tokens).float().pow(2).mean()
        in_forward = calls.count
        loss.backward()
    assert in_forward == TINY.num_layers  # the CPU's flash kernel, one call a layer
    assert calls.count - in_forward == (0 if keeps_attention(policy) else TINY.num_layers)


@pytest.mark.parametrize("quantized", [False, True], ids=["bf16 base", "NF4 base"])
def test_weights_and_rotary_tables_stay_where_they_are(monkeypatch, quantized):
    torch.manual_seed(0)
    model = lora_llama(TINY, LoRAArgs(("q_proj", "v_proj"), apply_lora_to_mlp=True, quantize_base=quantized)).train()
    set_memory_policy(model, (OFFLOAD, OFFLOAD), min_offload_bytes=0)
    moved, tables = [], []
    move, rope, plain_tensors = ActivationOffloader._offload, model.rope.forward, offload._plain_tensors
    monkeypatch.setattr(ActivationOffloader, "_offload",
                        lambda self, layer, t: moved.append(t.untyped_storage().data_ptr()) or move(self, layer, t))
    monkeypatch.setattr(model.rope, "forward", lambda *args: tables.extend(rope(*args)) or tuple(tables[-2:]))
    listed = []
    monkeypatch.setattr(offload, "_plain_tensors", lambda module: listed.append(module) or plain_tensors(module))
    for _ in range(2):
        model(torch.randint(0, TINY.vocab_size, (2, 33))).float().pow(2).mean().backward()
        weights = [*model.parameters(), *model.buffers()]
        if quantized:  # the NF4 linears save the codes and scales inside each weight
            weights += [getattr(w, name) for w in weights if isinstance(w, NF4Tensor) for name in w.__tensor_flatten__()[0]]
        kept = {t.untyped_storage().data_ptr() for t in [*weights, *tables] if not isinstance(t, NF4Tensor)}
        assert moved and not set(moved) & kept
        moved.clear()
        for weight in model.parameters():  # new storages, the same tensors: as FSDP2 regathers a weight each step
            if not isinstance(weight, NF4Tensor):
                weight.data = weight.data.clone()
    assert listed == list(model.layers)  # each layer's tensors listed once, their storages read at each step


def test_an_offloaded_view_comes_back_as_the_same_view_of_its_base_moved_once():
    """A compiled backward checks the strides of what it saved, so a view (an MLP chunk is one)
    must come back with its own strides and offset; its base crosses to the host once."""
    offloader = ActivationOffloader(torch.device("cpu"), min_bytes=0)
    unpacked, unpack = [], offloader._unpack
    offloader._unpack = lambda saved: unpacked.append(unpack(saved)) or unpacked[-1]
    base = torch.randn(2, 33, 8, requires_grad=True)
    with offloader.offloaded(torch.nn.Module()):
        pieces = (base * 1).split(8, dim=1)  # views with strides (264, 8, 1), offsets 0, 8, ..., 32
        total = sum((piece * piece).sum() for piece in pieces)
    assert offloader.host_bytes == base.numel() * 4
    total.backward()
    layout = sorted((tuple(t.shape), t.stride(), t.storage_offset()) for t in unpacked)
    assert layout == sorted((tuple(p.shape), p.stride(), p.storage_offset()) for p in pieces for _ in "ab")
    torch.testing.assert_close(base.grad, 2 * base.detach())


def test_backward_fetches_the_previous_offloaded_layer_while_this_one_runs(monkeypatch):
    """Layer i's first unpack starts layer i-1's copy back, so the copies go L-1, L-2, ... and
    each is under way before the backward reaches its layer."""
    model = lora_llama(dataclasses.replace(TINY, num_layers=4), LoRAArgs()).train()
    set_memory_policy(model, (RECOMPUTE_OFFLOAD,) * 4, min_offload_bytes=0)
    events = []
    fetch, unpack = ActivationOffloader._fetch, ActivationOffloader._unpack

    def number(layer) -> int:  # offloaded layers count from 0 in forward order
        return 0 if layer.previous is None else 1 + number(layer.previous)

    monkeypatch.setattr(ActivationOffloader, "_fetch",
                        lambda self, layer: events.append(("fetch", number(layer))) or fetch(self, layer))
    monkeypatch.setattr(ActivationOffloader, "_unpack",
                        lambda self, saved: events.append(("unpack", number(saved.layer))) or unpack(self, saved))
    model(torch.randint(0, TINY.vocab_size, (1, 9))).float().pow(2).mean().backward()
    assert events == [("unpack", 3), ("fetch", 3), ("fetch", 2), ("unpack", 2), ("fetch", 1), ("unpack", 1),
                      ("fetch", 0), ("unpack", 0)]


class _Streams:
    """torch.cuda's stream calls as the offloader makes them, logged: what the compute stream waits for."""

    def __init__(self, log: list) -> None:
        self.log, self.copies = log, 0
        self.compute = self.Stream("compute")

    def Stream(self, name: str = "side") -> SimpleNamespace:  # noqa: N802 (torch.cuda.Stream)
        def record_event() -> str:
            self.copies += 1
            self.log.append(("copy", self.copies))
            return f"copy {self.copies}"

        def wait_event(event: str) -> None:
            if name == "compute":
                self.log.append(("compute waits for", int(event.split()[1])))

        return SimpleNamespace(wait_stream=lambda other: None, wait_event=wait_event, record_event=record_event)

    def current_stream(self) -> SimpleNamespace:
        return self.compute

    def stream(self, stream: SimpleNamespace) -> contextlib.nullcontext:
        return contextlib.nullcontext()


def test_a_layers_copies_to_the_host_run_beside_the_next_layers_forward():
    """Layer i's input starts crossing once its forward is done; the compute stream waits for that
    copy only when layer i+2 starts (or the forward ends), so layer i+1 computes beside it."""
    model = lora_llama(dataclasses.replace(TINY, num_layers=4), LoRAArgs()).train()
    set_memory_policy(model, (RECOMPUTE_OFFLOAD,) * 4, min_offload_bytes=0)
    log = []
    offloader = model.memory_policy.offloader
    offloader.streams = _Streams(log)
    offloader.side = offloader.streams.Stream()
    model(torch.randint(0, TINY.vocab_size, (2, 33)))
    assert log == [("copy", 1), ("copy", 2), ("compute waits for", 1), ("copy", 3), ("compute waits for", 2),
                   ("copy", 4), ("compute waits for", 3), ("compute waits for", 4)]


def test_the_switches_keep_their_torchtune_meaning():
    assert uniform_policies(3, checkpointing=False, offloading=False) == [KEEP] * 3
    assert uniform_policies(3, checkpointing=True, offloading=False) == [RECOMPUTE] * 3
    assert uniform_policies(3, checkpointing=True, offloading=True) == [RECOMPUTE_OFFLOAD] * 3
    assert uniform_policies(3, checkpointing=False, offloading=True) == [OFFLOAD] * 3


def test_set_activation_checkpointing_is_a_shorthand_for_the_policy():
    model = random_model()
    set_activation_checkpointing(model, 2)
    assert model.memory_policy.layers == (RECOMPUTE, KEEP)
    set_activation_checkpointing(model, 0)
    assert model.memory_policy.layers == (KEEP, KEEP) and model.memory_policy.offloader is None


@pytest.mark.parametrize("policies", [(KEEP,), (KEEP, "checkpoint")])
def test_a_policy_list_must_name_one_known_policy_per_layer(policies):
    with pytest.raises(ConfigError, match="one per layer"):
        set_memory_policy(random_model(), policies)


def test_evaluation_runs_the_layers_plainly_under_any_policy():
    model = lora_model()
    set_memory_policy(model, (RECOMPUTE_OFFLOAD, OFFLOAD), min_offload_bytes=0)
    tokens = torch.randint(0, TINY.vocab_size, (2, 9))
    checkpoints = []
    for layer in model.layers:  # each recomputed layer checkpoints itself (TransformerLayer.forward)
        if layer.checkpoint is not None:
            layer.checkpoint = lambda *args, run=layer.checkpoint: checkpoints.append(1) or run(*args)
    with torch.no_grad():
        model(tokens)
    model.eval()
    with torch.enable_grad():
        model(tokens)
    assert model.memory_policy.offloader.peak_host_bytes == 0 and checkpoints == []
    model.train()(tokens)
    assert checkpoints == [1]


# --- the plan a recipe applies ------------------------------------------------------------------


def tiny_cfg(*overrides: str):
    return load_recipe_config("tiny/lora_cpu", read_declarations(get_recipe(LORA).path).keys, list(overrides))


MEMORY = {"trains": "adapters", "sequences_per_sample": 1}


def test_without_a_budget_the_plan_is_the_switches(capsys):
    plan = plan_memory(tiny_cfg(), MEMORY, 2, torch.device("cpu"), True, False, None)
    assert plan.layers == (RECOMPUTE, RECOMPUTE)
    assert capsys.readouterr().out == ""  # nothing offloaded, nothing to check or say


def test_a_budget_picks_what_the_estimate_says(capsys):
    cfg = tiny_cfg("batch_size=2")
    model = memory_model(cfg, memory_facts(LORA, MEMORY))
    between = (model.estimate(MemoryPlan((KEEP, KEEP))).total + model.estimate(MemoryPlan((KEEP, RECOMPUTE))).total) / 2
    for budget in (between / GIB, 24):
        plan = plan_memory(cfg, MEMORY, 2, torch.device("cpu"), False, False, budget)
        assert plan == model.fastest_plan(budget_bytes(budget, torch.device("cpu")))[0]
    assert "memory policy: keep every layer" in capsys.readouterr().out


def test_a_budget_over_sharded_processes_is_each_gpus_and_picks_by_its_share(capsys):
    cfg, cpu = tiny_cfg("batch_size=2"), torch.device("cpu")
    sharded = memory_model(cfg, memory_facts(LORA, MEMORY), world_size=2)
    # Each GPU of two also holds the layers FSDP2 gathers: keeping both layers misses this budget by a byte.
    budget = (sharded.estimate(MemoryPlan((KEEP, KEEP))).total - 1) / GIB
    plan = plan_memory(cfg, MEMORY, 2, cpu, False, False, budget, world_size=2)
    assert plan == sharded.fastest_plan(budget_bytes(budget, cpu))[0] and plan.layers != (KEEP, KEEP)
    assert plan_memory(cfg, MEMORY, 2, cpu, False, False, budget).layers == (KEEP, KEEP)  # on one device it fits


def test_a_budget_nothing_fits_runs_the_leanest_plan_and_says_what_to_change(capsys):
    plan = plan_memory(tiny_cfg(), MEMORY, 2, torch.device("cpu"), True, False, 0.01)
    assert plan.layers == (RECOMPUTE_OFFLOAD, RECOMPUTE_OFFLOAD)
    assert re.search(r"no memory policy fits .* by the estimate; running the leanest.*lower batch_size",
                     capsys.readouterr().out)


@pytest.mark.parametrize("budget", [0.01, 24], ids=["nothing fits", "fits"])
def test_tunelite_estimate_reports_the_plan_the_run_applies(budget, capsys):
    cfg = tiny_cfg(f"+memory_budget_gib={budget}")
    applied = plan_memory(cfg, MEMORY, 2, torch.device("cpu"), True, False, budget)
    assert run_plan(memory_model(cfg, memory_facts(LORA, MEMORY)), cfg, None) == applied


def test_auto_budget_without_a_gpu_falls_back_to_the_switches(capsys):
    plan = plan_memory(tiny_cfg(), MEMORY, 2, torch.device("cpu"), True, True, "auto")
    assert plan.layers == (RECOMPUTE_OFFLOAD, RECOMPUTE_OFFLOAD)
    out = capsys.readouterr().out
    assert "auto has no GPU" in out and "pinned host memory" in out
    with pytest.raises(ConfigError, match="memory_budget_gib: 'lots'"):
        budget_bytes("lots", torch.device("cpu"))


def test_offloading_more_than_the_machine_has_is_refused_before_the_run(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1000 kB\nMemAvailable:       10 kB\n")
    assert available_host_memory(meminfo) == 10 * 1024
    with pytest.raises(ResourceError, match="pinned host memory.*MemAvailable"):
        plan_memory(tiny_cfg(), MEMORY, 2, torch.device("cpu"), True, True, None, meminfo)
    assert available_host_memory(tmp_path / "absent") is None


def test_the_recipe_trains_the_same_with_its_activations_offloaded(tmp_path, capsys):
    """The switches reach the model through the recipe: the same losses, and the plan in the log."""
    common = ["max_steps_per_epoch=2", "epochs=1", "save_merged_model=False"]
    plain = run_recipe(LORA, "tiny/lora_cpu", tmp_path / "plain", *common)
    offloaded = run_recipe(LORA, "tiny/lora_cpu", tmp_path / "offloaded", *common,
                           "enable_activation_checkpointing=True", "+enable_activation_offloading=True")
    assert "memory policy: recompute+offload every layer" in capsys.readouterr().out
    losses = [[row["loss"] for row in rows if "loss" in row] for rows in (plain, offloaded)]
    assert len(losses[0]) == 2 and losses[0] == losses[1]
