"""Predicting a training run's peak GPU memory from shapes, before anything loads.

Only the checkpoint's config.json is read: the model is built on the meta device from `model:`
to count its parameters exactly (trainable or frozen, NF4 or not), and the rest follows from
what the recipes do, in eager PyTorch with flash attention. A step's memory peaks at one of these
moments, each the persistent part (weights, adapter, optimizer state, resident gradients) plus:

- backward through a layer: every layer's saved input (activation checkpointing) or every
  layer's saved activations (without it), plus the layer being recomputed and the transient
  gradients of its SwiGLU;
- the loss's backward: the saved inputs plus one chunk's fp32 log-softmax, its gradient and the
  logits' gradient (LinearCrossEntropyLoss);
- when the output projection trains (full fine-tuning), the moment its gradient is summed over
  the loss chunks.

On an H100 (Llama 3.1 8B, bf16, checkpointing on; LoRA, QLoRA and full with an offloaded
optimizer, each at batch 2 x 2048 and 1 x 8192) the prediction was within 1% of
`torch.cuda.max_memory_allocated` in all six runs (benchmarks/estimate_check.py).
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
from tunelite.errors import ConfigError
from tunelite.models.decoder import ModelArgs
from tunelite.modules.lora import LoRALinear, is_adapter_key
from tunelite.modules.nf4 import BLOCK_SIZE as NF4_BLOCK
from tunelite.recipe_registry import RecipeDeclarations
from tunelite.runtime.device import get_dtype

GIB = 2**30
OFFLOAD_OPTIMIZER = "tunelite.training.optimizers.cpu_offload_optimizer"

WEIGHTS, ADAPTER, GRADIENTS, OPTIMIZER = "weights", "adapter", "gradients", "optimizer state"
ACTIVATIONS, LOSS, WORKSPACE, OVERHEAD = "activations", "logits/loss", "workspace (cuBLAS)", "CUDA context + reserve"
# The moments a step's memory can peak at.
IN_LAYER, IN_LOSS, OUTPUT_GRADIENT = ("backward through a layer", "the loss's backward",
                                      "summing the output projection's gradient")

# cuBLAS's workspace on Hopper (CUBLAS_WORKSPACE_CONFIG=:4096:8), allocated through PyTorch's allocator.
CUBLAS_WORKSPACE = 32 * 2**20
# On the card but not in max_memory_allocated: the CUDA context with its kernels (about 0.5 GiB
# with lazy loading), and what the caching allocator reserves beyond what is allocated (its
# reserved/allocated ratio was 1.05-1.23 in the six H100 runs above).
CUDA_CONTEXT = GIB // 2
ALLOCATOR_RESERVE = 0.20
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

    @property
    def total(self) -> int:
        return sum(self.components.values())

    @property
    def peak_allocated(self) -> int:
        return self.total - self.components[OVERHEAD]

    def report(self) -> str:
        """The breakdown as the `tunelite estimate` command prints it."""
        lines = [f"Predicted peak GPU memory ({self.setup}):"]
        for name, size in self.components.items():
            if name == OVERHEAD:
                lines.append(f"  {'= peak allocated':<24}{gib(self.peak_allocated):>9}   during {self.peak_during}")
                lines += [f"  {'':<33}   ({gib(other)} during {when})" for when, other in self.other_moments.items()]
            lines.append(f"  {name:<24}{gib(size):>9}   {self.details.get(name, '')}".rstrip())
        lines.append(f"  {'= needed on the card':<24}{gib(self.total):>9}")
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
    name, memory = declarations.keys.recipe, declarations.memory
    if not isinstance(memory, dict) or memory.get("trains") not in ("adapters", "all"):
        raise ConfigError(f"{name} declares no MEMORY = {{'trains': 'adapters' | 'all', ...}}, so its memory cannot "
                          "be estimated; `tunelite estimate` models training recipes")
    return RecipeMemory(name, memory["trains"], int(memory.get("sequences_per_sample", 1)))


@dataclass(frozen=True)
class _Optimizer:
    """What the memory model needs to know of the configured optimizer."""

    name: str  # class name of the optimizer that holds the state, e.g. AdamW
    offloaded: bool  # cpu_offload_optimizer: state (and step) in host memory
    offload_gradients: bool
    in_backward: bool  # optimizer_in_bwd: one parameter stepped, and its gradient freed, at a time
    momentum: bool

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
    offloaded = dotted == OFFLOAD_OPTIMIZER
    inner = str(node.get("optimizer", "torch.optim.AdamW")) if offloaded else dotted
    return _Optimizer(
        name=inner.rsplit(".", 1)[-1],
        offloaded=offloaded,
        offload_gradients=offloaded and bool(node.get("offload_gradients", False)),
        in_backward=recipe.trains_all and bool(cfg.get("optimizer_in_bwd", False)),
        momentum=bool(node.get("momentum", 0)),
    )


def nf4_bytes(numel: int, dtype_bytes: int) -> float:
    """Storage of an NF4 weight: 4-bit codes, an int8 scale per 64 values, and a scale in the
    weight's dtype per 256 of those."""
    return numel / 2 + numel / NF4_BLOCK + numel / (NF4_BLOCK * NF4_SCALER_BLOCK) * dtype_bytes


def saved_bytes_per_token(args: ModelArgs, dtype_bytes: int, adapters: list[LoRALinear], seq_len: int) -> float:
    """What one layer's forward keeps for its backward, per token (besides the layer's input):
    eager PyTorch with flash attention, whose memory is linear in the sequence length, except
    where the family's attention cannot use it (Gemma 2's capped scores: per head, each token
    keeps a row of `seq_len` scores, probabilities in fp32 and in the weights' dtype)."""
    d, hd, inter = args.embed_dim, args.resolved_head_dim, args.intermediate_dim
    q, kv = args.num_heads * hd, args.num_kv_heads * hd
    capped = args.attn_softcap is not None
    kept = (
        d  # sa_norm output: input of q/k/v (and of their adapters)
        + (q + 2 * (q if capped else kv))  # q and k after RoPE, v (k and v shared out to every head when capped)
        + ((q + kv) if args.qk_norm else 0)  # q and k before their norms (Qwen 3)
        + ((q + kv) if args.fused_qkv and not args.learned_positions else 0)  # qkv_proj's output, held by v's view
        + q  # attention output: SDPA's output and output_proj's input (one tensor)
        + d  # residual stream after attention: mlp_norm's input
        + d  # mlp_norm output: input of w1 and w3
        # gated: w1 and w3 outputs, act(w1 x), and their product (w2's input); plain: w1's output and act's
        + (4 if args.gated_mlp else 2) * inter
        + (2 * d if args.post_norms else 0)  # the attention and MLP outputs, inputs of Gemma's post-norms
        + sum(a.rank for a in adapters)  # x A^T, lora_b's input
    ) * dtype_bytes
    fp32 = 4 * args.num_heads + 2 * 4 * (2 if args.post_norms else 1)  # SDPA's logsumexp per head, each norm's 1 / rms
    scores = args.num_heads * seq_len * (2 * dtype_bytes + 4) + seq_len if capped else 0  # + the boolean mask
    dropout = sum(a.in_dim * (dtype_bytes + 1) for a in adapters if isinstance(a.dropout, torch.nn.Dropout))
    return kept + fp32 + scores + dropout


def backward_extra_bytes_per_token(args: ModelArgs, dtype_bytes: int) -> float:
    """Gradients alive beyond the saved activations, at the layer's peak (the MLP product's
    backward): the gradients of w3 x, act(w1 x) and the product instead of the product itself,
    plus the residual stream's gradient and its copy into the MLP branch. (A plain MLP, GPT-2's,
    holds the gradients of act(w1 x) and of w1 x at its activation's backward: as many.)"""
    return (2 * args.intermediate_dim + 2 * args.embed_dim) * dtype_bytes


def estimate_memory(cfg: DictConfig, recipe: RecipeMemory) -> MemoryEstimate:
    """The peak GPU memory of `recipe` on `cfg` (batch_size x tokenizer.max_seq_len, the longest a
    batch can be, times the sequences a sample holds), by component. Reads the checkpoint's config.json, nothing else on disk.

    Formulas, with T = batch x seq tokens, L layers, d embed_dim, I intermediate_dim, V vocab,
    p bytes per value of `dtype`, C = loss.num_chunks:
      weights      every frozen or trained weight: p per value, NF4 weights `nf4_bytes`
      adapter      LoRA A and B: p per value
      gradients    p per trained value (optimizer_in_bwd: a layer's largest trained tensor;
                   offloaded gradients: one layer's); when the output projection trains, its
                   gradient is summed over the loss chunks out of place: 3 V d p at that moment
      optimizer    AdamW: 2 p per trained value (state in the parameter's dtype); torchao 8-bit
                   2 (1 + 4/256), 4-bit 2 (0.5 + 4/128); cpu_offload_optimizer: none
      activations  checkpointing: L T d p (each layer's input) + T saved + T extra (one layer
                   recomputed, `saved_bytes_per_token`, `backward_extra_bytes_per_token`,
                   which follow the family's layer: gated or plain MLP, q/k norms, fused qkv,
                   Gemma's post-norms and capped attention scores, quadratic in seq);
                   without: L T (saved + d p) + T extra. At the loss: the saved part + 3 T d p
                   (final norm input and output, their gradient)
      logits/loss  12 bytes x (T / C) x V: one chunk's fp32 log-softmax, its gradient and the
                   logits' gradient (+ 2 p for Gemma 2's capped logits)
      workspace    cuBLAS's, 32 MiB
      context      0.5 GiB CUDA context + 20% allocator reserve: counted to fit a card only.
    A QLoRA layer also holds the dequantized copy of its largest weight (p per value) in backward."""
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
    sequences = cfg.batch_size * recipe.sequences_per_sample
    tokens = sequences * seq
    chunk_tokens = sequences * math.ceil(seq / getattr(instantiate(cfg.loss), "num_chunks", 1))
    checkpointing = bool(cfg.enable_activation_checkpointing)
    optimizer = _optimizer_facts(cfg, recipe)

    params = dict(model.named_parameters())
    quantized = nf4_weight_names(model)
    trained = {n for n in params if recipe.trains_all or is_adapter_key(n)}
    adapters = {n for n in params if is_adapter_key(n)}
    weights = sum(nf4_bytes(params[n].numel(), p) if n in quantized else params[n].numel() * p
                  for n in params if n not in adapters)
    adapter = sum(params[n].numel() * p for n in adapters)
    trained_bytes = sum(params[n].numel() * p for n in trained)
    state = sum(optimizer.state_bytes(params[n].numel(), p) for n in trained)

    layer = model.layers[0]
    layer_params = {n: t for n, t in layer.named_parameters()}
    layer_trained = [t.numel() * p for n, t in layer_params.items() if f"layers.0.{n}" in trained]
    if optimizer.keeps_all_gradients:
        resident_grads, layer_grads = trained_bytes, 0.0
    elif optimizer.in_backward:
        resident_grads, layer_grads = 0.0, max(layer_trained, default=0)
    else:
        resident_grads, layer_grads = 0.0, sum(layer_trained)
    output_trains = "output.weight" in trained or (args.tie_word_embeddings and "tok_embeddings.weight" in trained)
    output_grad = args.vocab_size * args.embed_dim * p if output_trains else 0
    # The output projection's gradient is summed over the loss chunks out of place (old + new ->
    # sum): three copies at once, one of which resident gradients already count.
    counted = 1 if optimizer.keeps_all_gradients else 0

    layer_adapters = [m for m in layer.modules() if isinstance(m, LoRALinear)]
    saved = tokens * saved_bytes_per_token(args, p, layer_adapters, seq)
    extra = tokens * backward_extra_bytes_per_token(args, p)
    largest_nf4 = max((t.numel() for n, t in layer_params.items() if f"layers.0.{n}" in quantized), default=0)
    if largest_nf4:
        # w2's backward: the saved activations, the incoming gradients and w2's dequantized copy.
        extra = max(extra, tokens * (2 * args.embed_dim + args.intermediate_dim) * p + largest_nf4 * p)
    hidden = tokens * args.embed_dim * p
    stored = args.num_layers * hidden if checkpointing else args.num_layers * (hidden + saved)
    at_loss = stored + 3 * hidden
    # Gemma 2's capped logits add the tanh's output and its gradient, in the weights' dtype.
    loss_chunk = (12 + (2 * p if args.final_softcap else 0)) * chunk_tokens * args.vocab_size

    # (gradients, activations, logits/loss) at each moment that can be the peak
    moments = {
        IN_LAYER: (resident_grads + layer_grads, stored + (saved if checkpointing else 0) + extra, 0),
        IN_LOSS: (resident_grads + output_grad * (1 - counted), at_loss, loss_chunk),
    }
    if output_trains:
        moments[OUTPUT_GRADIENT] = (resident_grads + output_grad * (3 - counted), at_loss, 0)
    peak_during, (grads, activations, loss) = max(moments.items(), key=lambda moment: sum(moment[1]))
    in_layer = peak_during == IN_LAYER
    components = {WEIGHTS: weights, ADAPTER: adapter, GRADIENTS: grads, OPTIMIZER: state, ACTIVATIONS: activations,
                  LOSS: loss, WORKSPACE: CUBLAS_WORKSPACE}
    components[OVERHEAD] = CUDA_CONTEXT + ALLOCATOR_RESERVE * sum(components.values())

    details = {
        WEIGHTS: _weights_detail(params, adapters, quantized, cfg.dtype, frozen=not recipe.trains_all),
        ADAPTER: f"{sum(params[n].numel() for n in adapters) / 1e6:.1f}M trained values" if adapters else "",
        GRADIENTS: _gradient_detail(optimizer) + ("; the output projection's, summed over loss chunks"
                                                  if output_trains and not in_layer else ""),
        OPTIMIZER: (f"{optimizer.name} in host memory (cpu_offload_optimizer)" if optimizer.offloaded
                    else f"{optimizer.name}, for {sum(params[n].numel() for n in trained) / 1e6:.1f}M trained values"),
        ACTIVATIONS: (f"{args.num_layers} saved layer inputs" if checkpointing
                      else f"all {args.num_layers} layers' activations (no checkpointing)")
                     + (" + one layer recomputed" if in_layer else " + the final hidden states"),
        LOSS: f"one loss chunk: {chunk_tokens} tokens x {args.vocab_size} vocabulary in fp32" if loss else "",
        OVERHEAD: f"{gib(CUDA_CONTEXT)} context + {ALLOCATOR_RESERVE:.0%} allocator reserve; not in peak allocated",
    }
    notes = ["compile: True usually needs less than this eager estimate"] if cfg.get("compile") else []
    if not found:
        notes.append(f"no {config_json}: the sizes are those of {cfg.model._component_}, unchecked against a checkpoint")
    setup = (f"{recipe.recipe}, batch {cfg.batch_size} x {seq} tokens, {cfg.dtype}, activation checkpointing "
             f"{'on' if checkpointing else 'off'}")
    persistent = weights + adapter + state + CUBLAS_WORKSPACE
    others = {when: int(persistent + sum(parts)) for when, parts in moments.items() if when != peak_during}
    return MemoryEstimate({k: int(v) for k, v in components.items()}, details, peak_during, setup, others, notes)


def _weights_detail(params: dict[str, torch.Tensor], adapters: set[str], quantized: set[str], dtype: str,
                    frozen: bool) -> str:
    base = sum(t.numel() for n, t in params.items() if n not in adapters)
    in_nf4 = sum(params[n].numel() for n in quantized)
    split = f"{in_nf4 / 1e9:.2f}B in NF4, {(base - in_nf4) / 1e9:.2f}B in {dtype}" if in_nf4 else f"in {dtype}"
    return f"{base / 1e9:.2f}B {'frozen ' if frozen else ''}parameters, {split}"


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


def _ladders(cfg: DictConfig, recipe: RecipeMemory) -> list[list[list[str]]]:
    """Ways to save memory, each a list of ever stronger override sets, least disruptive first:
    smaller micro-batches (same effective batch through accumulation where the optimizer allows
    it), then a lighter method (QLoRA, CPU-offloaded or in-backward optimizer), then shorter sequences."""
    optimizer = _optimizer_facts(cfg, recipe)
    batch, accumulation = cfg.batch_size, cfg.gradient_accumulation_steps
    can_accumulate = not optimizer.in_backward and not optimizer.offload_gradients
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
    if recipe.trains_all and not optimizer.offloaded:
        lighter.append([[_set(cfg, "optimizer._component_", OFFLOAD_OPTIMIZER),
                         _set(cfg, "optimizer.optimizer", cfg.optimizer._component_),
                         _set(cfg, "optimizer.offload_gradients", True), _set(cfg, "optimizer_in_bwd", False),
                         _set(cfg, "gradient_accumulation_steps", 1), _set(cfg, "clip_grad_norm", None)]])
    if recipe.trains_all and not optimizer.offloaded and not optimizer.in_backward:
        lighter.append([[_set(cfg, "optimizer_in_bwd", True), _set(cfg, "gradient_accumulation_steps", 1),
                         _set(cfg, "clip_grad_norm", None)]])
    seq = cfg.tokenizer.max_seq_len
    shorter = [[_set(cfg, "tokenizer.max_seq_len", seq // 2**i)] for i in range(1, 8) if seq // 2**i >= 256]
    return [ladder for ladder in (smaller_batches, *lighter, shorter) if ladder]


def fitting_overrides(cfg: DictConfig, recipe: RecipeMemory, budget: int) -> list[tuple[list[str], MemoryEstimate]]:
    """Override sets with which the run fits `budget` bytes, each verified by estimating the
    config with it applied: activation checkpointing first if it is off, then the weakest step
    of each way to save memory that suffices alone; if none does, the ways combined in order."""
    base = [] if cfg.enable_activation_checkpointing else [_set(cfg, "enable_activation_checkpointing", True)]

    def estimate(overrides: list[str]) -> MemoryEstimate:
        return estimate_memory(with_overrides(cfg, overrides), recipe)

    if base and estimate(base).total <= budget:
        return [(base, estimate(base))]
    options = []
    for ladder in _ladders(cfg, recipe):
        for rung in ladder:
            result = estimate(base + rung)
            if result.total <= budget:
                options.append((base + rung, result))
                break
    if options:
        return options
    combined = list(base)
    for ladder in _ladders(cfg, recipe):
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
