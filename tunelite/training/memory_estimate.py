"""Predicting a training run's peak GPU memory from shapes, before anything loads.

Only the checkpoint's config.json is read: the model is built on the meta device from `model:`
to count its parameters exactly (trainable or frozen, NF4 or not), and the rest follows from
what the recipes do, in eager PyTorch with flash attention, under a memory plan (each layer's
policy: keep, recompute, offload, recompute+offload; the MLP whole or in chunks;
tunelite.modules.memory_policy). A step's memory peaks at one of these moments, each the
persistent part (weights, adapter, optimizer state, resident gradients) plus:

- backward through a layer: what the layers below keep on the card (all their activations,
  their input, or nothing, by policy), plus that layer's input and activations (kept, recomputed
  or fetched back from host memory), the previous offloaded layer's fetched ahead, and the
  transient gradients of its SwiGLU (or of its attention once the MLP runs in chunks);
- the loss's backward: the saved inputs plus one chunk's fp32 log-softmax, its gradient and the
  logits' gradient (LinearCrossEntropyLoss);
- when the output projection trains (full fine-tuning), the moment its gradient is summed over
  the loss chunks;
- sharded over N processes with FSDP2, when the weights outside the layers train: the end of
  the backward, when their gradients are reduce-scattered.

Over N processes (tunelite.distributed.sharding) the figure is one GPU's: each holds 1/N of
every weight, gradient and optimizer state, plus what FSDP2 gathers whole for a while (see
`memory_model`); activations are per process, as batch_size is.

On an H100 (Llama 3.1 8B, bf16, checkpointing on; LoRA, QLoRA and full with an offloaded
optimizer, each at batch 2 x 2048 and 1 x 8192) the prediction was within 1% of
`torch.cuda.max_memory_allocated` in all six runs (benchmarks/estimate_check.py). The terms of
offloading, chunked MLP and attention-bound peaks (long samples) are predictions still to be
measured (benchmarks/long_context_bench.py prints both).

The same model picks a run's plan for a budget (`MemoryModel.fastest_plan`, what
`memory_budget_gib` uses) and the longest sample a card fits (`MemoryModel.longest_sequence`).
"""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tunelite.checkpointing.hf import check_model_matches
from tunelite.checkpointing.loading import nf4_weight_names
from tunelite.config import apply_overrides, instantiate, resolve_component
from tunelite.distributed.sharding import mixed_precision
from tunelite.errors import ConfigError
from tunelite.models.decoder import ModelArgs
from tunelite.modules.host_embedding import check_offloadable
from tunelite.modules.lora import LoRALinear, is_adapter_key
from tunelite.modules.loss import MAX_CHUNK_TOKENS, loss_chunks
from tunelite.modules.memory_policy import (
    KEEP,
    MLP_CHUNK_TOKENS,
    OFFLOAD,
    POLICIES,
    RECOMPUTE,
    RECOMPUTE_ATTENTION,
    RECOMPUTE_OFFLOAD,
    RECOMPUTE_OFFLOAD_ATTENTION,
    offloads,
    recomputes,
    uniform_policies,
)
from tunelite.modules.offload import MIN_OFFLOAD_BYTES
from tunelite.modules.nf4 import BLOCK_SIZE as NF4_BLOCK
from tunelite.recipe_registry import RecipeDeclarations
from tunelite.runtime.device import get_dtype
from tunelite.training.offload_optimizer import ACCUMULATION_DTYPES, CHUNK_SIZE, device_memory, host_memory

GIB = 2**30
OFFLOAD_OPTIMIZER = "tunelite.training.optimizers.cpu_offload_optimizer"
# Its state, update and accumulated gradients are in host memory, like offload_gradients, and it accumulates.
OVERLAPPED_OPTIMIZER = "tunelite.training.offload_optimizer.overlapped_cpu_adamw"

WEIGHTS, ADAPTER, GRADIENTS, OPTIMIZER = "weights", "adapter", "gradients", "optimizer state"
ACTIVATIONS, LOSS, WORKSPACE, OVERHEAD = "activations", "logits/loss", "workspace (cuBLAS)", "CUDA context + reserve"
# The moments a step's memory can peak at.
IN_LAYER, IN_LOSS, OUTPUT_GRADIENT = ("backward through a layer", "the loss's backward",
                                      "summing the output projection's gradient")
REDUCING_ROOT = "reduce-scattering the root unit's gradients (the embedding's and output projection's, or all)"

# cuBLAS's workspace on Hopper (CUBLAS_WORKSPACE_CONFIG=:4096:8), allocated through PyTorch's allocator.
CUBLAS_WORKSPACE = 32 * 2**20
# On the card but not in max_memory_allocated: the CUDA context with its kernels (about 0.5 GiB
# with lazy loading), and what the caching allocator reserves beyond what is allocated. The
# reserve tracks what a step allocates and frees (gradients, activations, logits), not the
# weights, which are allocated once. With the default allocator it was 37-47% of that part (the
# five H200 runs of ../shared/bench/ANCHORS.md); with expandable segments, which recipes turn on
# (tunelite.runtime.device.get_device), 1-13% in the nine capped runs of docs/benchmarks.md
# (batch 2 x 2048 under a budget, QLoRA 16k-128k, LoRA 32k-48k).
CUDA_CONTEXT = GIB // 2
ALLOCATOR_RESERVE = 0.15
# torchao's NF4: 4-bit codes, an int8 scale per 64 values, and per 256 scales one scale in the
# weight's dtype (double quantization).
NF4_SCALER_BLOCK = 256
# torchao's low-bit optimizer states: bytes per value (codes plus an fp32 scale per block). Tensors
# under 4096 values, or not a multiple of the block, keep full-precision state.
LOW_BIT_STATE_BYTES = {
    "AdamW8bit": 1 + 4 / 256, "Adam8bit": 1 + 4 / 256, "AdamWFp8": 1 + 4 / 256, "AdamFp8": 1 + 4 / 256,
    "AdamW4bit": 0.5 + 4 / 128, "Adam4bit": 0.5 + 4 / 128,
}
LOW_BIT_BLOCK = {"AdamW4bit": 128, "Adam4bit": 128}
# CPUOffloadOptimizer keeps tensors under this many values, and their state, on the GPU.
OFFLOAD_MINIMAL_SIZE = 4096


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak GPU memory by what holds it at the moment of the peak; `components` sums
    to `total`, which is what the card must have. `peak_allocated` leaves out the CUDA context
    and the allocator's reserve, so it compares with torch.cuda.max_memory_allocated."""

    components: dict[str, int]
    details: dict[str, str]
    peak_during: str
    setup: str
    other_moments: dict[str, int] = field(default_factory=dict)  # allocated at the other candidate peaks
    notes: list[str] = field(default_factory=list)
    host_bytes: int = 0  # pinned host memory of offloaded activations
    host_weights: int = 0  # pinned host memory of the embedding table (offload_embeddings)
    # fsdp_cpu_offload: this process's shards of the weights, their gradients and the optimizer
    # state, in host memory (apart from host_bytes, which a run checks against the free memory
    # before it starts, when the shards are already loaded)
    host_state: int = 0

    @property
    def total(self) -> int:
        return sum(self.components.values())

    @property
    def peak_allocated(self) -> int:
        return self.total - self.components[OVERHEAD]

    @property
    def pinned_host(self) -> int:
        """All the pinned host memory a run takes: offloaded activations and the embedding table."""
        return self.host_bytes + self.host_weights

    def report(self) -> str:
        """The breakdown as the `tunelite estimate` command prints it."""
        lines = [f"Predicted peak GPU memory ({self.setup}):"]
        for name, size in self.components.items():
            if name == OVERHEAD:
                lines.append(f"  {'= peak allocated':<24}{gib(self.peak_allocated):>9}   during {self.peak_during}")
                lines += [f"  {'':<33}   ({gib(other)} during {when})" for when, other in self.other_moments.items()]
            lines.append(f"  {name:<24}{gib(size):>9}   {self.details.get(name, '')}".rstrip())
        lines.append(f"  {'= needed on the card':<24}{gib(self.total):>9}")
        if self.host_bytes:
            lines.append(f"  {'host memory (pinned)':<24}{gib(self.host_bytes):>9}   offloaded activations")
        if self.host_weights:
            lines.append(f"  {'host memory (pinned)':<24}{gib(self.host_weights):>9}   the embedding table "
                         "(offload_embeddings), read in place by the GPU")
        if self.host_state:
            lines.append(f"  {'host memory (shards)':<24}{gib(self.host_state):>9}   weights, gradients and optimizer "
                         "state (fsdp_cpu_offload), per process")
        return "\n".join(lines + [f"note: {note}" for note in self.notes])


def gib(size: float) -> str:
    return f"{size / GIB:.2f} GiB"


@dataclass(frozen=True)
class RecipeMemory:
    """What the memory model needs to know of a recipe, from the MEMORY its script declares:
    whether only adapters train or every weight, and how many sequences one sample holds (a
    preference pair runs chosen and rejected in one forward)."""

    recipe: str
    trains: str
    sequences_per_sample: int = 1

    @property
    def trains_all(self) -> bool:
        return self.trains == "all"


def recipe_memory(declarations: RecipeDeclarations) -> RecipeMemory:
    """The declared facts of a training recipe; a recipe that declares no MEMORY (generation) is refused."""
    return memory_facts(declarations.keys.recipe, declarations.memory)


def memory_facts(name: str, memory: Any) -> RecipeMemory:
    """A recipe's MEMORY declaration, checked, as the memory model takes it."""
    if not isinstance(memory, dict) or memory.get("trains") not in ("adapters", "all"):
        raise ConfigError(f"{name} declares no MEMORY = {{'trains': 'adapters' | 'all', ...}}, so its memory cannot "
                          "be estimated; `tunelite estimate` models training recipes")
    return RecipeMemory(name, memory["trains"], int(memory.get("sequences_per_sample", 1)))


@dataclass(frozen=True)
class _Optimizer:
    """What the memory model needs to know of the configured optimizer."""

    name: str  # class name of the optimizer that holds the state, e.g. AdamW
    offloaded: bool  # cpu_offload_optimizer, overlapped_cpu_adamw: state (and step) in host memory
    offload_gradients: bool
    in_backward: bool  # optimizer_in_bwd: one parameter stepped, and its gradient freed, at a time
    momentum: bool
    can_accumulate: bool  # not with optimizer_in_bwd, nor with torchao's offloaded gradients

    def state_bytes(self, numel: int, param_bytes: int) -> float:
        """GPU bytes of optimizer state for one parameter tensor."""
        if self.offloaded and numel >= OFFLOAD_MINIMAL_SIZE:
            return 0
        if self.name in LOW_BIT_STATE_BYTES and numel >= 4096 and numel % LOW_BIT_BLOCK.get(self.name, 256) == 0:
            return 2 * numel * LOW_BIT_STATE_BYTES[self.name]
        if self.name == "SGD":
            return numel * param_bytes if self.momentum else 0
        return 2 * numel * param_bytes  # Adam's two moments in the parameter's dtype (fused too); others alike

    @property
    def keeps_all_gradients(self) -> bool:
        return not self.in_backward and not (self.offloaded and self.offload_gradients)


def _optimizer_facts(cfg: DictConfig, recipe: RecipeMemory) -> _Optimizer:
    node = cfg.optimizer
    dotted = str(node._component_)
    torchao = dotted == OFFLOAD_OPTIMIZER
    inner = {OFFLOAD_OPTIMIZER: str(node.get("optimizer", "torch.optim.AdamW")), OVERLAPPED_OPTIMIZER: "AdamW"}.get(
        dotted, dotted)
    offload_gradients = dotted == OVERLAPPED_OPTIMIZER or (torchao and bool(node.get("offload_gradients", False)))
    in_backward = recipe.trains_all and bool(cfg.get("optimizer_in_bwd", False))
    return _Optimizer(
        name=inner.rsplit(".", 1)[-1],
        offloaded=torchao or dotted == OVERLAPPED_OPTIMIZER,
        offload_gradients=offload_gradients,
        in_backward=in_backward,
        momentum=bool(node.get("momentum", 0)),
        can_accumulate=not in_backward and not (torchao and offload_gradients),
    )


def nf4_bytes(numel: int, dtype_bytes: int) -> float:
    """Storage of an NF4 weight: 4-bit codes, an int8 scale per 64 values, and a scale in the
    weight's dtype per 256 of those."""
    return numel / 2 + numel / NF4_BLOCK + numel / (NF4_BLOCK * NF4_SCALER_BLOCK) * dtype_bytes


def saved_tensors_per_token(args: ModelArgs, dtype_bytes: int, adapters: dict[str, LoRALinear],
                            compiled: bool = False, trains_base: bool = False) -> tuple[list[float], list[float]]:
    """What one layer's forward keeps for its backward, tensor by tensor, in bytes per token
    (besides the layer's input): (attention half, MLP half). PyTorch with flash attention,
    whose memory is linear in the sequence length (Gemma 2's capped scores add
    `attention_scores_bytes`). The family's layer decides: gated or plain MLP, q/k norms, fused
    qkv, post-norms. `adapters`: the layer's, by module name. A gated MLP keeps w1 x and w3 x
    (`gated_mlp`), and their product only when w2's weight trains (`trains_base`: full
    fine-tuning; an adapter on w2 recomputes it). `compiled`: inductor's partitioner recomputes a
    plain MLP's activation in backward instead of keeping it (measured on the gated MLP before
    `gated_mlp`: a kept 8B layer at 2 x 2048 held one 4096 x 14336 tensor less than eager)."""
    d, hd, inter, p = args.embed_dim, args.resolved_head_dim, args.intermediate_dim, dtype_bytes
    q, kv = args.num_heads * hd, args.num_kv_heads * hd
    shared = q if args.attn_softcap is not None else kv  # capped attention shares k and v out to every head
    norms = 2 if args.post_norms else 1  # 1 / rms of each norm of a half, in fp32

    def lora(half: str) -> list[float]:
        # x A^T (lora_b's input), and with dropout its output and mask
        return [a.rank * p + (a.in_dim * (p + 1) if isinstance(a.dropout, torch.nn.Dropout) else 0)
                for name, a in adapters.items() if name.startswith(half)]

    attention = [
        d * p,  # sa_norm output: input of q/k/v (and of their adapters)
        q * p, shared * p, shared * p,  # q, k after RoPE, v
        *([(q + kv) * p] if args.qk_norm else []),  # q and k before their norms (Qwen 3)
        *([(q + kv) * p] if args.fused_qkv and not args.learned_positions else []),  # qkv_proj's output, v's base
        q * p,  # attention output: SDPA's output and output_proj's input (one tensor)
        *([d * p] if args.post_norms else []),  # the attention output projected: Gemma's post-norm input
        d * p,  # residual stream after attention: mlp_norm's input (and the MLP chunks')
        4 * args.num_heads, 4 * norms,  # SDPA's logsumexp per head, the norms' 1 / rms (fp32)
        *lora("attn."),
    ]
    mlp = [
        d * p,  # mlp_norm output: input of w1 and w3
        # gated: w1 and w3 outputs, and their product (w2's input) when w2's weight trains;
        # plain: w1's output and act's (not when compiled)
        *[inter * p] * (2 + trains_base if args.gated_mlp else 2 - compiled),
        *([d * p] if args.post_norms else []),  # the MLP output: Gemma's post-norm input
        4 * norms,  # the norms' 1 / rms (fp32)
        *lora("mlp."),
    ]
    return attention, mlp


def attention_scores_bytes(args: ModelArgs, dtype_bytes: int) -> float:
    """Per token and per key position, what attention that cannot run as flash attention keeps:
    Gemma 2's capped scores, probabilities in fp32 and in the weights' dtype, per head, and the
    boolean mask. 0 for every other family."""
    return args.num_heads * (2 * dtype_bytes + 4) + 1 if args.attn_softcap is not None else 0


def backward_extra_bytes_per_token(args: ModelArgs, dtype_bytes: int, compiled: bool = False,
                                   trains_base: bool = False, recomputed_adapters: bool = False) -> float:
    """Gradients alive beyond the MLP's saved activations, at the layer's peak, plus the residual
    stream's gradient and its copy into the MLP branch. Gated: the product's backward
    (`gated_mlp`) holds the product's gradient, act(w1 x) recomputed, and the gradients of w1 x
    and w3 x (inductor fuses them: one less), the product itself freed by then when it was kept.
    Plain (GPT-2): the gradients of act(w1 x) and of w1 x at its activation's backward.
    `recomputed_adapters`: a compiled layer recomputed whole, with adapters on its MLP: the
    recomputation is inside the backward graph, where inductor fuses each adapter's add into the
    SwiGLU's backward, so w1 x, w3 x and the product's gradient are held as base and adapter parts
    apart: four more (call 29, 8B at 2 x 2048: 17.39 GiB against 17.13 for the layer recomputed
    around its graph, whose count was one more than here)."""
    if not args.gated_mlp:
        extra = 2
    else:
        extra = 4 - compiled - trains_base + 4 * (compiled and recomputed_adapters)
    return (extra * args.intermediate_dim + 2 * args.embed_dim) * dtype_bytes


def attention_backward_bytes_per_token(args: ModelArgs, dtype_bytes: int) -> float:
    """What flash attention's backward adds to the attention half's saved tensors: the residual
    stream's gradient and the attention output's, dq, dk and dv expanded to every query head (then
    summed to the kv heads), and dq's fp32 accumulator; less the residual stream after attention,
    freed with the MLP's backward. Once the MLP runs in chunks, this is a layer's peak."""
    q_heads, kv_heads = args.num_heads * args.resolved_head_dim, args.num_kv_heads * args.resolved_head_dim
    return (4 * q_heads + 2 * kv_heads) * dtype_bytes + 4 * q_heads


def pinned_bytes(size: float) -> int:
    """Host memory a pinned copy of `size` bytes takes: PyTorch's caching host allocator rounds
    each block up to a power of two."""
    return 2 ** math.ceil(math.log2(size)) if size >= 1 else 0


@dataclass(frozen=True)
class MemoryPlan:
    """What `set_memory_policy` applies: a policy per layer, the size of the MLP's chunks (None:
    the MLP runs whole), and whether a recomputed layer whose MLP runs in chunks recomputes its
    attention block alone, keeping its MLP block's input too (faster, one more residual-stream
    tensor a layer; the switches' plans keep what torchtune's keep)."""

    layers: tuple[str, ...]
    mlp_chunk_tokens: int | None = MLP_CHUNK_TOKENS
    by_block: bool = False

    def chunks_mlp(self, tokens: int) -> bool:
        return self.mlp_chunk_tokens is not None and tokens > self.mlp_chunk_tokens

    def describe(self, tokens: int) -> str:
        """E.g. `recompute every layer`, `keep 9, recompute 23`, `..., MLP in chunks of 8192 tokens`."""
        counts = {policy: self.layers.count(policy) for policy in POLICIES if policy in self.layers}
        text = (f"{self.layers[0]} every layer" if len(counts) == 1
                else ", ".join(f"{policy} {count}" for policy, count in counts.items()))
        if not self.chunks_mlp(tokens):
            return text
        return text + f", MLP in chunks of {self.mlp_chunk_tokens} tokens" + (", by block" if self.by_block else "")


def _ordered_plan(layers: int, recomputed: int, offloaded: int, kept_attention: int,
                  mlp_chunk_tokens: int | None, by_block: bool) -> MemoryPlan:
    """The first `recomputed` layers, the first `offloaded` of them offloaded and the first
    `kept_attention` keeping their attention output, then the layers kept. Kept last, a kept
    layer's activations are the first backward frees, so no recomputed layer's backward (its
    recomputed activations and, in QLoRA, its dequantized weights) runs on top of them: at 2 x 2048
    an 8B QLoRA keeps 6 layers under 8.9 GiB where it kept 4 first. The offloaded layers come first
    too: their copies to the host run beside the later layers' forward instead of holding up the loss."""
    by_choice = {(True, True): RECOMPUTE_OFFLOAD_ATTENTION, (True, False): RECOMPUTE_OFFLOAD,
                 (False, True): RECOMPUTE_ATTENTION, (False, False): RECOMPUTE}
    policies = [by_choice[i < offloaded, i < kept_attention] for i in range(recomputed)]
    policies += [KEEP] * (layers - recomputed)
    return MemoryPlan(tuple(policies), mlp_chunk_tokens, by_block)


def switches_plan(num_layers: int, checkpointing: bool, offloading: bool) -> MemoryPlan:
    """The plan of enable_activation_checkpointing and enable_activation_offloading, as torchtune means them."""
    return MemoryPlan(tuple(uniform_policies(num_layers, checkpointing, offloading)))


@dataclass(frozen=True)
class Sharding:
    """What FSDP2 (tunelite.distributed.sharding.shard_model) holds on each of `world_size` GPUs
    beyond its 1/N shards: each transformer layer is a unit gathered whole while it runs, in
    forward and again in backward (the next one prefetched meanwhile), and freed after; the root
    unit, the weights outside the layers (embedding, final norm, output projection), is gathered
    from the forward to the end of the backward, since the loss applies the output projection
    after the forward returns. A unit's gradients are reduce-scattered after its backward, through
    an input buffer in the reduce dtype that lives until the next unit's; the root's, at the end.
    With fsdp_shard_frozen_weights: False only the trained weights are sharded and gathered; the
    frozen ones are whole on every GPU, counted with the persistent weights."""

    world_size: int
    root_weights: float  # bytes of the sharded weights outside the layers, whole
    layer_weights: float  # bytes of one layer's sharded weights, whole (NF4 as stored: FSDP gathers its codes)
    reshard_after_forward: bool  # False: every layer stays gathered from its forward to its backward
    root_reduce: float  # the root's trained weights' unsharded gradients and their reduce-scatter input
    host_state: int  # fsdp_cpu_offload: the shards of weights, gradients and optimizer state in host memory
    frozen_sharded: bool = True  # False: the frozen weights whole, never gathered; what trains one unit

    def gathered(self, moment: str, num_layers: int) -> tuple[float, str]:
        """Bytes of the weights gathered whole at `moment`, and which they are."""
        if moment == REDUCING_ROOT:  # every unit has been resharded after its backward
            return 0, ""
        if not self.frozen_sharded:  # one unit, the trained weights, gathered from forward to backward's end
            return self.root_weights, "every trained weight"
        if not self.reshard_after_forward:
            layers = num_layers
        else:  # the layer in backward and the one prefetched
            layers = min(2, num_layers) if moment == IN_LAYER else 0
        return (self.root_weights + layers * self.layer_weights,
                f"the embedding, final norm, output projection and {layers} layers" if layers
                else "the embedding, final norm and output projection")


@dataclass(frozen=True)
class MemoryModel:
    """A config's memory facts that no memory policy changes, from which `estimate` predicts the
    peak under any plan and batch shape: the model is built on the meta device once, and a
    search over plans or lengths evaluates arithmetic only."""

    recipe: RecipeMemory
    args: ModelArgs
    dtype: str
    p: int  # bytes per value of the training dtype
    batch: int
    seq: int
    loss_chunking: tuple[int, int]  # the loss's num_chunks and max_chunk_tokens
    optimizer: _Optimizer
    persistent: dict[str, float]  # weights, adapter, optimizer state: the same at every moment
    resident_grads: float  # gradients held through the step
    layer_grads: float  # gradients of one layer, while it is in backward
    output_grad: float  # the output projection's gradient, when it trains
    attention_saved: tuple[float, ...]  # saved_tensors_per_token
    mlp_saved: tuple[float, ...]
    mlp_backward_extra: float  # backward_extra_bytes_per_token
    recomputed_mlp_backward_extra: float  # the same for a layer recomputed whole (recomputed_adapters)
    chunk_mlp_backward_extra: float  # the same for the MLP in chunks, which run eagerly
    attention_scores: float  # attention_scores_bytes: per token and key position
    # per token, the tensors a recomputed layer that keeps its attention output keeps: the output and its
    # logsumexp (fp32)
    attention_output: tuple[float, ...]
    largest_nf4: int  # values of a layer's largest NF4 weight, dequantized in its backward
    # values of a recomputed layer's NF4 weights whose recomputation's bf16 copies (keep_dequantized_weights)
    # are alive at its MLP's backward: all but the down projection's, the first used
    recomputed_nf4: int
    details: dict[str, str]
    notes: tuple[str, ...]  # said under every estimate: compile, sizes unchecked against a checkpoint
    sharding: Sharding | None = None  # FSDP2 over several processes; None: one device holds everything
    packed: bool = False  # dataset.packed: documents attend through FlexAttention, whose output no policy keeps
    compiled: bool = False  # compile: a layer recomputed whole checkpoints itself inside its graph
    host_weights: int = 0  # offload_embeddings: the embedding table's pinned host bytes, not on the card

    @property
    def world_size(self) -> int:
        return self.sharding.world_size if self.sharding else 1

    def estimate(self, plan: MemoryPlan, batch: int | None = None, seq: int | None = None) -> MemoryEstimate:
        """The peak under `plan` at batch x seq (by default the config's), by component."""
        args, p, recipe = self.args, self.p, self.recipe
        batch, seq = batch or self.batch, seq or self.seq
        sequences = batch * recipe.sequences_per_sample
        tokens = sequences * seq
        chunk_tokens = sequences * math.ceil(seq / loss_chunks(sequences, seq, *self.loss_chunking))
        hidden = tokens * args.embed_dim * p  # a layer's input, the residual stream
        chunked = plan.chunks_mlp(tokens)
        piece = sequences * max(1, plan.mlp_chunk_tokens // sequences) if chunked else tokens
        attention_saved = tokens * (sum(self.attention_saved) + seq * self.attention_scores)
        mlp_saved = sum(self.mlp_saved)
        saved = attention_saved + (0 if chunked else tokens * mlp_saved)
        def in_backward(mlp_backward_extra: float) -> float:
            """Beyond a layer's input and attention half, at its backward's peak: the SwiGLU's
            backward (over the whole sequence, or one chunk while the chunks' input gradients
            gather), or flash attention's once the MLP half is freed."""
            mlp_extra = piece * mlp_backward_extra
            if self.largest_nf4:
                # w2's backward: its incoming gradients, its dequantized copy, the product's gradient
                # from the base and (gated) from the adapter
                inputs = (1 + args.gated_mlp) * args.intermediate_dim
                mlp_extra = max(mlp_extra, piece * (2 * args.embed_dim + inputs) * p + self.largest_nf4 * p)
            return max(piece * mlp_saved + mlp_extra + (2 * hidden if chunked else 0),
                       tokens * attention_backward_bytes_per_token(args, p))

        # by whether the layer is recomputed; the MLP's chunks run eagerly, compiled or not
        if chunked:
            backward = dict.fromkeys((False, True), in_backward(self.chunk_mlp_backward_extra))
        else:
            backward = {False: in_backward(self.mlp_backward_extra),
                        True: in_backward(self.recomputed_mlp_backward_extra) + self.recomputed_nf4 * p}

        # Layer by layer through backward: the lower layers' resident activations, this layer's
        # (kept, recomputed or fetched back), and the previous offloaded layer's, fetched ahead.
        # A layer recomputed by block keeps its MLP block's input as well as its own. A kept attention
        # output goes to the host with the input where the offloader sees it (_attention_offloaded).
        kept_attention, inputs = tokens * sum(self.attention_output), hidden * (1 + (chunked and plan.by_block))
        moved_attention = kept_attention if self._attention_offloaded(chunked) else 0
        resident = {KEEP: hidden + saved, RECOMPUTE: inputs, OFFLOAD: 0, RECOMPUTE_OFFLOAD: 0,
                    RECOMPUTE_ATTENTION: inputs + kept_attention,
                    RECOMPUTE_OFFLOAD_ATTENTION: kept_attention - moved_attention}
        fetched = {OFFLOAD: hidden + saved, RECOMPUTE_OFFLOAD: inputs,
                   RECOMPUTE_OFFLOAD_ATTENTION: inputs + moved_attention}
        below, in_layer, previous, host = 0.0, 0.0, None, 0
        for policy in plan.layers:
            ahead = fetched[previous] if offloads(policy) and previous else 0
            in_layer = max(in_layer, below + hidden + attention_saved + backward[recomputes(policy)] + ahead)
            below += resident[policy]
            if offloads(policy):
                previous = policy
                host += self._host_bytes(policy, tokens, chunked, plan.by_block)
        at_loss = below + 3 * hidden  # and the final norm's input and output, and their gradient
        # Gemma 2's capped logits add the tanh's output and its gradient, in the weights' dtype.
        loss_chunk = (12 + (2 * p if args.final_softcap else 0)) * chunk_tokens * args.vocab_size

        # (gathered weights, gradients, activations, logits/loss) at each moment that can be the peak
        sharding = self.sharding

        def gathered(moment: str) -> float:
            return sharding.gathered(moment, args.num_layers)[0] if sharding else 0

        # One device's resident gradients include the output projection's; FSDP2's are shards, and
        # it holds the output projection's whole gradient until the root's reduce-scatter, which
        # comes at the end of the backward.
        counted = 1 if self.optimizer.keeps_all_gradients and not sharding else 0
        held = self.output_grad if sharding else 0
        moments = {
            IN_LAYER: (gathered(IN_LAYER), self.resident_grads + self.layer_grads + held, in_layer, 0),
            IN_LOSS: (gathered(IN_LOSS), self.resident_grads + self.output_grad * (1 - counted), at_loss, loss_chunk),
        }
        if self.output_grad:
            moments[OUTPUT_GRADIENT] = (gathered(IN_LOSS), self.resident_grads + self.output_grad * (3 - counted),
                                        at_loss, 0)
        if sharding and sharding.root_reduce:
            moments[REDUCING_ROOT] = (0, self.resident_grads + sharding.root_reduce, 0, 0)
        peak_during, (weights, grads, activations, loss) = max(moments.items(), key=lambda moment: sum(moment[1]))
        components = {WEIGHTS: self.persistent[WEIGHTS] + weights, ADAPTER: self.persistent[ADAPTER],
                      GRADIENTS: grads, OPTIMIZER: self.persistent[OPTIMIZER], ACTIVATIONS: activations, LOSS: loss,
                      WORKSPACE: CUBLAS_WORKSPACE}
        # FSDP2's gathered weights come and go with each layer, as activations do.
        components[OVERHEAD] = CUDA_CONTEXT + ALLOCATOR_RESERVE * (weights + grads + activations + loss)

        in_layer_peak = peak_during == IN_LAYER
        policy = plan.describe(tokens)
        details = {
            **self.details,
            WEIGHTS: self.details[WEIGHTS] + (f" + {sharding.gathered(peak_during, args.num_layers)[1]} gathered"
                                              if weights else ""),
            GRADIENTS: self.details[GRADIENTS] + _gradients_at(peak_during, sharding is not None,
                                                               bool(self.output_grad)),
            ACTIVATIONS: (f"{policy}" + (" + the layer in backward" if in_layer_peak else " + the final hidden states")
                          if activations else ""),
            LOSS: f"one loss chunk: {chunk_tokens} tokens x {args.vocab_size} vocabulary in fp32" if loss else "",
        }
        per_gpu = f"per GPU, {self.world_size} processes, " if sharding else ""
        setup = f"{recipe.recipe}, {per_gpu}batch {batch} x {seq} tokens, {self.dtype}, {policy}"
        persistent = sum(self.persistent.values()) + CUBLAS_WORKSPACE
        others = {when: int(persistent + sum(parts)) for when, parts in moments.items() if when != peak_during}
        return MemoryEstimate({k: int(v) for k, v in components.items()}, details, peak_during, setup, others,
                              list(self.notes), host, self.host_weights, sharding.host_state if sharding else 0)

    def _attention_offloaded(self, chunked: bool) -> bool:
        """Whether recompute+offload+attention moves the kept attention output to the host too. Compiled
        with its MLP whole, a layer checkpoints itself inside its graph, and the graph saves the
        attention output like its input, through the offloader's hook; an eager checkpoint (or one
        around a compiled layer whose MLP runs in chunks) keeps it on the card, out of the hook's
        sight. Call 35 at 32k: 3.55 GiB more pinned than counted without this, 2.46 GiB less on the card."""
        return self.compiled and not chunked

    def _host_bytes(self, policy: str, tokens: int, chunked: bool, by_block: bool) -> int:
        """Pinned host memory of one offloaded layer: its input (and its MLP block's, recomputed by
        block), or every tensor it saves that is large enough to move (the MLP's only when the MLP
        runs whole)."""
        if policy in (RECOMPUTE_OFFLOAD, RECOMPUTE_OFFLOAD_ATTENTION):
            moved = (1 + (chunked and by_block)) * pinned_bytes(tokens * self.args.embed_dim * self.p)
            if policy == RECOMPUTE_OFFLOAD_ATTENTION and self._attention_offloaded(chunked):
                moved += sum(pinned_bytes(tokens * size) for size in self.attention_output)
            return moved
        tensors = [self.args.embed_dim * self.p, *self.attention_saved, *(() if chunked else self.mlp_saved)]
        return sum(pinned_bytes(tokens * size) for size in tensors if tokens * size >= MIN_OFFLOAD_BYTES)

    def fastest_plan(self, budget: int, batch: int | None = None,
                     seq: int | None = None) -> tuple[MemoryPlan, MemoryEstimate] | None:
        """The fastest plan whose estimate fits `budget` bytes on the card, or None: the least
        recomputation first, counted in FLOPs (`recompute_flops`: a recomputed layer's
        projections and MLP, and its attention unless it keeps the attention output), then the
        fewest offloaded layers; the first layers recomputed, the first of those offloaded and
        keeping their attention output, the rest kept (_ordered_plan); the MLP in chunks only when
        nothing fits without, the recomputed layers then recomputed by block unless nothing fits
        so. `offload` without recomputation is never chosen: it moves a layer's every activation
        over PCIe (about 22x its input at Llama sizes), slower than recomputing it unless the copy
        hides behind compute."""
        layers = self.args.num_layers
        batch, seq = batch or self.batch, seq or self.seq
        tokens = batch * self.recipe.sequences_per_sample * seq
        linear, attention = self.recompute_flops(batch, seq)
        # (recomputed layers, of them keeping their attention output) by the FLOPs they recompute
        choices = sorted(((recomputed * linear + (recomputed - kept) * attention, recomputed, kept)
                          for recomputed in range(layers + 1)
                          for kept in range(recomputed + 1 if attention else 1)))
        # The MLP whole if anything fits so, else in chunks: recomputed by block, else (the
        # longest samples) by layer
        ways = ((None, False), (MLP_CHUNK_TOKENS, True), (MLP_CHUNK_TOKENS, False))
        for chunk, by_block in (ways if tokens > MLP_CHUNK_TOKENS else ((MLP_CHUNK_TOKENS, False),)):
            for _, recomputed, kept in choices:
                plans = [_ordered_plan(layers, recomputed, offloaded, kept, chunk, by_block)
                         for offloaded in range(recomputed + 1)]
                if self.estimate(plans[-1], batch, seq).total > budget:
                    continue  # not even with every recomputed layer offloaded
                for plan in plans:
                    result = self.estimate(plan, batch, seq)
                    if result.total <= budget:
                        return plan, result
        return None

    def recompute_flops(self, batch: int, seq: int) -> tuple[float, float]:
        """FLOPs one layer's recomputation costs at batch x seq, forward only: (its projections
        and MLP, its attention). The attention part is 0 where no SDPA kernel runs (Gemma 2's
        capped scores, packed samples' FlexAttention), since a kept output saves nothing there."""
        args, sequences = self.args, batch * self.recipe.sequences_per_sample
        hd = args.resolved_head_dim
        d, q, kv = args.embed_dim, args.num_heads * hd, args.num_kv_heads * hd
        weights = d * (q + 2 * kv) + q * d + (3 if args.gated_mlp else 2) * d * args.intermediate_dim
        fused = args.attn_softcap is None and not self.packed
        attention = 2.0 * sequences * seq * seq * q if fused else 0.0  # causal: half of 4 s^2 q
        return 2.0 * sequences * seq * weights, attention

    def longest_sequence(self, budget: int, step: int = 1024) -> tuple[int, MemoryPlan, MemoryEstimate] | None:
        """The longest sample (batch 1, a multiple of `step` tokens) whose fastest plan fits
        `budget`, by binary search on the estimate, with that plan; None if not even `step` fits."""
        leanest = MemoryPlan((RECOMPUTE_OFFLOAD,) * self.args.num_layers)

        def fits(seq: int) -> bool:
            return self.estimate(leanest, 1, seq).total <= budget

        if not fits(step):
            return None
        low, high = 1, 2
        while fits(high * step) and high < 2**12:  # up to 4M tokens
            low, high = high, high * 2
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle * step) else (low, middle)
        seq = low * step
        plan, result = self.fastest_plan(budget, 1, seq)
        return seq, plan, result


def memory_model(cfg: DictConfig, recipe: RecipeMemory, world_size: int = 1) -> MemoryModel:
    """The facts `MemoryModel` predicts from, for `recipe` on `cfg` on each of `world_size` GPUs:
    reads the checkpoint's config.json, nothing else on disk, and builds the model on the meta
    device. `world_size` 1 is one device holding everything (the single-device recipes; a
    distributed recipe on one process is estimated so too, without FSDP2's gathered copies);
    more is FSDP2 as tunelite.distributed.sharding applies it, the same arithmetic with the
    sharded terms below, so that a plan picked for a budget fits each GPU's share.

    Formulas, with T = batch x seq tokens, L layers, d embed_dim, I intermediate_dim, V vocab,
    p bytes per value of `dtype`, C = loss chunks (`loss_chunks`):
      weights      every frozen or trained weight: p per value, NF4 weights `nf4_bytes`; with
                   offload_embeddings the embedding table is in pinned host memory instead
      adapter      LoRA A and B: p per value
      gradients    p per trained value (optimizer_in_bwd: a layer's largest trained tensor;
                   offloaded gradients: one layer's); when the output projection trains, its
                   gradient is summed over the loss chunks out of place: 3 V d p at that moment
      optimizer    AdamW: 2 p per trained value (state in the parameter's dtype); torchao 8-bit
                   2 (1 + 4/256), 4-bit 2 (0.5 + 4/128); cpu_offload_optimizer: none
      activations  per layer, by its policy: keep T (d p + saved), recompute T d p (2 T d p
                   by block), offloaded none, and a recomputed layer that keeps its attention
                   output T (H p + 4 h) (H the heads' width, h the heads: the output and its
                   log-sum-exp); plus, at the peak of the backward through a layer, that layer's
                   input and saved activations and its backward's gradients
                   (`saved_tensors_per_token`, `backward_extra_bytes_per_token`,
                   `attention_backward_bytes_per_token`; the MLP's for one chunk when it runs in
                   chunks), and an offloaded layer's predecessor fetched ahead. At the loss: the
                   resident part + 3 T d p (final norm input and output, their gradient)
      logits/loss  12 bytes x (T / C) x V: one chunk's fp32 log-softmax, its gradient and the
                   logits' gradient (+ 2 p for Gemma 2's capped logits)
      workspace    cuBLAS's, 32 MiB
      context      0.5 GiB CUDA context + 15% allocator reserve: counted to fit a card only.
      host         pinned copies of the offloaded tensors (and the embedding table), each
                   rounded up to a power of two.
    A QLoRA layer also holds the dequantized copy of its largest weight (p per value) in backward.
    Over N = world_size > 1 processes (FSDP2, `Sharding`), per GPU, with r bytes per value of the
    reduce dtype (`mixed_precision`: fp32 when training in bf16), R the root's weights (outside
    the layers: embedding, final norm, output projection) and l one layer's:
      weights      1/N of each, as stored; plus gathered whole R + 2 l in backward through a layer
                   (it and the one prefetched), R at the loss; every layer instead of 2 (and at
                   the loss) with fsdp_reshard_after_forward: False
      gradients    1/N of each trained value (p); in backward through a layer also its trained
                   values whole (p) and the reduce-scatter input of the layer after it (r), and
                   the output projection's whole, held until the root's reduce-scatter at the end
                   of backward, a moment of its own: the root's trained values x (p + r). With
                   gradient_accumulation_steps > 1, every trained value whole in r instead of 1/N
                   (no reduce-scatter until a step's last micro-batch)
      optimizer    the state of 1/N of each trained tensor
      activations  as on one device: batch_size is per process
      host         with fsdp_cpu_offload, the shards of weights, gradients (p) and optimizer state
                   are in host memory, not on the GPU (`MemoryEstimate.host_state`, per process)
    With fsdp_shard_frozen_weights: False, the frozen weights are whole on every GPU (as on one
    device) and only the trained ones are sharded and gathered: R and l count only those."""
    with torch.device("meta"):
        model = instantiate(cfg.model)
    # Without the checkpoint (yet), the builder's own sizes: an estimate helps decide what to download.
    config_json = Path(cfg.checkpointer.checkpoint_dir) / "config.json"
    found = config_json.is_file()
    if found:
        check_model_matches(model.args, config_json.parent)
    args: ModelArgs = model.args
    dtype = get_dtype(cfg.dtype, torch.device("meta"))
    p = dtype.itemsize
    seq = cfg.tokenizer.get("max_seq_len")
    if not seq:
        raise ConfigError("tokenizer.max_seq_len: not set, so the longest batch is unknown; set it or pass --seq-len")
    loss = instantiate(cfg.loss)
    optimizer = _optimizer_facts(cfg, recipe)
    notes = (("compile: True: the activations as inductor keeps them (the MLP backward's gradients fused)",)
             if cfg.get("compile") else ()) + (
        () if found else (f"no {config_json}: the sizes are those of {cfg.model._component_}, unchecked against "
                          "a checkpoint",))

    params = dict(model.named_parameters())
    quantized = nf4_weight_names(model)
    trained = {n for n in params if recipe.trains_all or is_adapter_key(n)}
    adapters = {n for n in params if is_adapter_key(n)}
    stored = {n: nf4_bytes(t.numel(), p) if n in quantized else t.numel() * p for n, t in params.items()}
    weights = sum(stored[n] for n in params if n not in adapters)
    host_weights = 0
    if cfg.get("offload_embeddings"):  # the frozen table in pinned host memory (tunelite.modules.host_embedding)
        check_offloadable(args.tie_word_embeddings, "tok_embeddings.weight" in trained)
        host_weights = pinned_bytes(stored["tok_embeddings.weight"])
        weights -= stored["tok_embeddings.weight"]
    adapter = sum(stored[n] for n in adapters)
    trained_bytes = sum(params[n].numel() * p for n in trained)
    # Sharded, each process keeps the state of its 1/N of each tensor.
    state = sum(optimizer.state_bytes(math.ceil(params[n].numel() / world_size), p) for n in trained)

    layer = model.layers[0]
    layer_params = {n: t for n, t in layer.named_parameters()}
    layer_nf4 = {n: t.numel() for n, t in layer_params.items() if f"layers.0.{n}" in quantized}
    layer_trained = [t.numel() * p for n, t in layer_params.items() if f"layers.0.{n}" in trained]
    if optimizer.keeps_all_gradients:
        resident_grads, layer_grads = trained_bytes, 0.0
    elif optimizer.in_backward:
        resident_grads, layer_grads = 0.0, max(layer_trained, default=0)
    else:
        resident_grads, layer_grads = 0.0, sum(layer_trained)
    output_trains = "output.weight" in trained or (args.tie_word_embeddings and "tok_embeddings.weight" in trained)
    layer_adapters = {name: m for name, m in layer.named_modules() if isinstance(m, LoRALinear)}
    compiled = bool(cfg.get("compile"))
    attention_saved, mlp_saved = saved_tensors_per_token(args, p, layer_adapters, compiled, recipe.trains_all)
    details = {
        WEIGHTS: _weights_detail(params, adapters, quantized, cfg.dtype, frozen=not recipe.trains_all),
        ADAPTER: f"{sum(params[n].numel() for n in adapters) / 1e6:.1f}M trained values" if adapters else "",
        GRADIENTS: _gradient_detail(optimizer),
        OPTIMIZER: (f"{optimizer.name} in host memory ({str(cfg.optimizer._component_).rsplit('.', 1)[-1]})"
                    if optimizer.offloaded
                    else f"{optimizer.name}, for {sum(params[n].numel() for n in trained) / 1e6:.1f}M trained values"),
        OVERHEAD: (f"{gib(CUDA_CONTEXT)} context + allocator reserve ({ALLOCATOR_RESERVE:.0%} of "
                   f"{'gathered weights, ' if world_size > 1 else ''}gradients, activations and logits); not in peak "
                   "allocated"),
    }
    if host_weights:
        details[WEIGHTS] += ", the embedding table in host memory"
    if str(cfg.optimizer._component_) == OVERLAPPED_OPTIMIZER:
        accumulation = ACCUMULATION_DTYPES.get(str(cfg.optimizer.get("accumulation_dtype", "fp32")), torch.float32)
        chunk = int(cfg.optimizer.get("chunk_size", CHUNK_SIZE))
        on_device = bool(cfg.optimizer.get("accumulate_on_device"))
        staging = cfg.optimizer.get("staging_gib")
        host = host_memory([params[n].numel() for n in trained], dtype, accumulation, chunk, on_device,
                           None if staging is None else float(staging))
        state += device_memory(accumulation, chunk, on_device)  # its fp32 chunk (and the accumulator's, on device)
        notes += (f"host memory for the optimizer: {gib(sum(host.values()))} ("
                  + ", ".join(f"{name} {gib(size)}" for name, size in host.items()) + ")",)
    persistent, sharding = {WEIGHTS: weights, ADAPTER: adapter, OPTIMIZER: state}, None
    if world_size > 1:  # FSDP2, as `Sharding` says
        offload, accumulates = bool(cfg.get("fsdp_cpu_offload", False)), cfg.get("gradient_accumulation_steps", 1) > 1
        reduce_bytes = (mixed_precision(dtype).reduce_dtype or dtype).itemsize
        # What shard_model shards: everything, or with fsdp_shard_frozen_weights: False what trains.
        frozen_sharded = bool(cfg.get("fsdp_shard_frozen_weights", True))
        sharded = {n for n in params if frozen_sharded or n in trained}
        whole = sum(stored[n] for n in params if n not in sharded)  # on every GPU, never gathered
        # The root unit: the weights outside the layers, or with the frozen weights whole every
        # trained weight (shard_model then makes no unit per layer).
        in_layers = {id(t) for t in model.layers.parameters()} if frozen_sharded else set()
        root = [n for n, t in params.items() if id(t) not in in_layers and n in sharded]
        shards = {WEIGHTS: (weights - whole) / world_size, ADAPTER: adapter / world_size, OPTIMIZER: state}
        sharding = Sharding(
            world_size, sum(stored[n] for n in root),
            sum(stored[f"layers.0.{n}"] for n in layer_params) if frozen_sharded else 0,
            bool(cfg.get("fsdp_reshard_after_forward", True)),
            root_reduce=sum(params[n].numel() for n in root if n in trained) * (p + reduce_bytes),
            host_state=int(sum(shards.values()) + trained_bytes / world_size) if offload else 0,
            frozen_sharded=frozen_sharded)
        on_gpu = dict.fromkeys(shards, 0.0) if offload else shards
        persistent = {**on_gpu, WEIGHTS: on_gpu[WEIGHTS] + whole}
        if accumulates:
            # Gradient sync only on a step's last micro-batch (set_gradient_sync): until its
            # reduce-scatter, each gradient is kept whole, accumulated in the reduce dtype.
            resident_grads = trained_bytes / p * reduce_bytes
        elif not frozen_sharded:  # one unit: every gradient whole until the backward's end
            resident_grads = trained_bytes
        else:
            resident_grads = 0.0 if offload else trained_bytes / world_size
        # A layer's gradients whole, and the reduce-scatter input (reduce dtype) of the layer after it.
        layer_grads = sum(layer_trained) / p * (p + reduce_bytes) if frozen_sharded else 0.0
        details.update(_sharded_details(details, world_size, offload, accumulates, optimizer.name,
                                        sum(params[n].numel() for n in trained), frozen_sharded))
        notes += ("NCCL's own buffers, outside PyTorch's allocator, are not counted",)
    return MemoryModel(
        recipe, args, cfg.dtype, p, cfg.batch_size, seq,
        (getattr(loss, "num_chunks", 1), getattr(loss, "max_chunk_tokens", MAX_CHUNK_TOKENS)), optimizer,
        persistent, resident_grads, layer_grads,
        args.vocab_size * args.embed_dim * p if output_trains else 0, tuple(attention_saved), tuple(mlp_saved),
        backward_extra_bytes_per_token(args, p, compiled, recipe.trains_all),
        backward_extra_bytes_per_token(args, p, compiled, recipe.trains_all,
                                       recomputed_adapters=any(name.startswith("mlp.") for name in layer_adapters)),
        backward_extra_bytes_per_token(args, p, False, recipe.trains_all),
        attention_scores_bytes(args, p),
        (args.num_heads * args.resolved_head_dim * p, args.num_heads * 4),
        max(layer_nf4.values(), default=0),
        sum(numel for n, numel in layer_nf4.items() if not n.startswith("mlp.w2.")),
        details, notes, sharding, bool(OmegaConf.select(cfg, "dataset.packed", default=False)), compiled,
        host_weights,
    )


def _sharded_details(details: dict[str, str], world_size: int, offload: bool, accumulates: bool, optimizer: str,
                     trained_values: int, frozen_sharded: bool) -> dict[str, str]:
    """The details of the components FSDP2 shards, for one process."""
    where = "shards in host memory (fsdp_cpu_offload)" if offload else f"1/{world_size} each"
    weights_where = where if frozen_sharded else "whole on every GPU (fsdp_shard_frozen_weights: False)"
    return {
        WEIGHTS: f"{details[WEIGHTS]}, {weights_where}",
        ADAPTER: details[ADAPTER] and f"{details[ADAPTER]}, {where}",
        GRADIENTS: ("every trained value whole, accumulated in the reduce dtype until a step's last micro-batch"
                    if accumulates else f"every trained value, {where}"),
        OPTIMIZER: f"{optimizer}, for {trained_values / 1e6:.1f}M trained values, {where}",
    }


def estimate_memory(cfg: DictConfig, recipe: RecipeMemory, plan: MemoryPlan | None = None,
                    world_size: int = 1) -> MemoryEstimate:
    """The peak GPU memory of `recipe` on `cfg` (batch_size x tokenizer.max_seq_len, the longest a
    batch can be, times the sequences a sample holds), by component, under `plan` (by default the
    plan of the config's enable_activation_checkpointing and enable_activation_offloading); one
    GPU's when sharded over `world_size` processes."""
    model = memory_model(cfg, recipe, world_size)
    return model.estimate(plan or config_switches_plan(cfg, model.args.num_layers))


def config_switches_plan(cfg: DictConfig, num_layers: int) -> MemoryPlan:
    """The plan of the config's enable_activation_checkpointing and enable_activation_offloading."""
    return switches_plan(num_layers, bool(cfg.enable_activation_checkpointing),
                         bool(cfg.get("enable_activation_offloading", False)))


def _weights_detail(params: dict[str, torch.Tensor], adapters: set[str], quantized: set[str], dtype: str,
                    frozen: bool) -> str:
    base = sum(t.numel() for n, t in params.items() if n not in adapters)
    in_nf4 = sum(params[n].numel() for n in quantized)
    split = f"{in_nf4 / 1e9:.2f}B in NF4, {(base - in_nf4) / 1e9:.2f}B in {dtype}" if in_nf4 else f"in {dtype}"
    return f"{base / 1e9:.2f}B {'frozen ' if frozen else ''}parameters, {split}"


def _gradients_at(moment: str, sharded: bool, output_trains: bool) -> str:
    """What the gradients at `moment` hold beyond the resident ones."""
    if moment == REDUCING_ROOT:
        return "; the embedding's and output projection's unsharded, and their reduce-scatter input"
    if moment == IN_LAYER:
        return ("; a layer's unsharded, and the reduce-scatter input of the one after it"
                + ("; the output projection's unsharded" if output_trains else "")) if sharded else ""
    return "; the output projection's, summed over loss chunks" if output_trains else ""


def _gradient_detail(optimizer: _Optimizer) -> str:
    if optimizer.keeps_all_gradients:
        return "every trained value"
    if optimizer.in_backward:
        return "one tensor at a time (optimizer_in_bwd)"
    return "moved to host memory as produced (offload_gradients)"


def parse_memory_size(text: str) -> int:
    """Bytes in `24GB`, `24GiB`, `24` (GiB), `16000MiB`: GB as printed on cards, which are GiB."""
    units = {"": GIB, "g": GIB, "gb": GIB, "gib": GIB, "m": 2**20, "mb": 2**20, "mib": 2**20}
    number = text.strip().lower().rstrip("bgimB ")
    unit = text.strip().lower()[len(number):].strip()
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or value <= 0:
        raise ConfigError(f"--gpu-memory: cannot read {text!r} as a memory size; write e.g. 24GB or 16000MiB")
    return int(value * units[unit])


def with_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """A copy of `cfg` with command-line style overrides applied."""
    copy = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    apply_overrides(copy, overrides)
    return copy


def _set(cfg: DictConfig, key: str, value: Any) -> str:
    """`key=value` as an override, `+key=value` when the config lacks the key."""
    text = "null" if value is None else str(value)
    return f"{key}={text}" if OmegaConf.select(cfg, key, default="__absent__") != "__absent__" else f"+{key}={text}"


def _ladders(cfg: DictConfig, recipe: RecipeMemory, world_size: int) -> list[list[list[str]]]:
    """Ways to save memory, each a list of ever stronger override sets, least disruptive first:
    smaller micro-batches (same effective batch through accumulation where the optimizer allows
    it), then a lighter method (QLoRA; for a full fine-tune a CPU-offloaded or in-backward
    optimizer on one device, fsdp_cpu_offload when sharded), then shorter sequences."""
    optimizer = _optimizer_facts(cfg, recipe)
    batch, accumulation = cfg.batch_size, cfg.gradient_accumulation_steps
    can_accumulate = optimizer.can_accumulate
    smaller_batches = [
        [_set(cfg, "batch_size", b)] + ([_set(cfg, "gradient_accumulation_steps", accumulation * batch // b)]
                                        if can_accumulate else [])
        for b in range(batch - 1, 0, -1) if batch % b == 0
    ]
    lighter = []
    component = str(cfg.model._component_)
    module, _, builder = component.rpartition(".")
    if not recipe.trains_all and builder.startswith("lora_"):
        twin = f"{module}.q{builder}"
        try:
            resolve_component(twin, "model")
            lighter.append([[_set(cfg, "model._component_", twin)]])
        except ConfigError:
            pass
    if world_size > 1:
        if recipe.trains_all and not cfg.get("fsdp_cpu_offload", False):
            lighter.append([[_set(cfg, "fsdp_cpu_offload", True)]])
    elif recipe.trains_all and not optimizer.offloaded:
        lighter.append([[_set(cfg, "optimizer._component_", OFFLOAD_OPTIMIZER),
                         _set(cfg, "optimizer.optimizer", cfg.optimizer._component_),
                         _set(cfg, "optimizer.offload_gradients", True), _set(cfg, "optimizer_in_bwd", False),
                         _set(cfg, "gradient_accumulation_steps", 1), _set(cfg, "clip_grad_norm", None)]])
    if world_size == 1 and recipe.trains_all and not optimizer.offloaded and not optimizer.in_backward:
        lighter.append([[_set(cfg, "optimizer_in_bwd", True), _set(cfg, "gradient_accumulation_steps", 1),
                         _set(cfg, "clip_grad_norm", None)]])
    seq = cfg.tokenizer.max_seq_len
    shorter = [[_set(cfg, "tokenizer.max_seq_len", seq // 2**i)] for i in range(1, 8) if seq // 2**i >= 256]
    return [ladder for ladder in (smaller_batches, *lighter, shorter) if ladder]


def fitting_overrides(cfg: DictConfig, recipe: RecipeMemory, budget: int,
                      world_size: int = 1) -> list[tuple[list[str], MemoryEstimate]]:
    """Override sets with which the run fits `budget` bytes (on each GPU of `world_size`), each
    verified by estimating the config with it applied: activation checkpointing first if it is
    off, then the weakest step of each way to save memory that suffices alone; if none does, the
    ways combined in order."""
    base = [] if cfg.enable_activation_checkpointing else [_set(cfg, "enable_activation_checkpointing", True)]

    def estimate(overrides: list[str]) -> MemoryEstimate:
        return estimate_memory(with_overrides(cfg, overrides), recipe, world_size=world_size)

    if base and estimate(base).total <= budget:
        return [(base, estimate(base))]
    options = []
    for ladder in _ladders(cfg, recipe, world_size):
        for rung in ladder:
            result = estimate(base + rung)
            if result.total <= budget:
                options.append((base + rung, result))
                break
    if options:
        return options
    combined = list(base)
    for ladder in _ladders(cfg, recipe, world_size):
        for rung in ladder:
            result = estimate(merge_overrides(combined, rung))
            if result.total <= budget:
                return [(merge_overrides(combined, rung), result)]
        combined = merge_overrides(combined, ladder[-1])
    return []


def merge_overrides(overrides: list[str], more: list[str]) -> list[str]:
    """`more` after `overrides`, a later setting of a key replacing an earlier one."""
    def key(override: str) -> str:
        return override.partition("=")[0].lstrip("+~")

    replaced = {key(o) for o in more}
    return [o for o in overrides if key(o) not in replaced] + more
