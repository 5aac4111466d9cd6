"""One decoder for every family tunelite builds: Llama 2/3.x, SmolLM2, Mistral, Qwen 2.5 and 3,
Phi-3/Phi-4-mini, Gemma 2 and GPT-2 differ only in the sizes and traits of `ModelArgs`.

Layout and naming follow torchtune (`tok_embeddings`, `layers.N.attn.q_proj`, `mlp.w1/w2/w3`,
`sa_norm`, `mlp_norm`, `norm`, `output`) so configs and checkpoints read the same. Where a
family's checkpoint fuses projections (Phi-3's `qkv_proj` and `gate_up_proj`, GPT-2's `c_attn`),
the model keeps them fused (`attn.qkv_proj`, `mlp.w13`), so an adapter on one is an adapter on
the checkpoint's module and peft loads it onto transformers' model. Rotary embeddings use Hugging
Face's rotate-half convention, so HF weights load with a plain key rename.

Shapes in comments: b batch, s sequence, S keys (cached + new), d embed_dim, h heads, kv kv heads,
hd head_dim, rd rotated dims.
"""

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from tunelite.errors import ConfigError, TuneliteError
from tunelite.modules.attention import DocumentMask, attend, dense_document_mask, document_attention_mask
from tunelite.modules.fp8 import FrozenFP8Linear
from tunelite.modules.gated_mlp import ACTIVATIONS, gated_product
from tunelite.modules.lora import LoRALinear
from tunelite.modules.memory_policy import (
    KEEP,
    RECOMPUTE,
    MemoryPolicy,
    chunks_sequence,
    in_sequence_chunks,
    run_layers,
    set_memory_policy,
)
from tunelite.modules.nf4 import FrozenNF4Linear


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's frequency scaling, which stretches the context window past pre-training."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class LongRopeScaling:
    """Phi's LongRoPE: per-frequency divisors, the long set once a sequence runs past the
    pre-training window, and cos/sin scaled by `attention_factor`."""

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position_embeddings: int
    attention_factor: float

    @staticmethod
    def default_attention_factor(factor: float, original_max_position_embeddings: int) -> float:
        """sqrt(1 + ln(factor) / ln(original window)) for a window stretched `factor`-fold, as the
        LongRoPE paper and transformers set it."""
        return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original_max_position_embeddings))


NORMS = ("rms", "rms_offset", "layer")


@dataclass(frozen=True)
class ModelArgs:
    """The numbers and traits that tell one family and size from another; the code is shared.

    The defaults are Llama's; each trait below names the families that set it."""

    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    intermediate_dim: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope_base: float = 500_000.0
    rope_scaling: RopeScaling | LongRopeScaling | None = None
    tie_word_embeddings: bool = False
    head_dim: int | None = None
    # The Hugging Face `model_type` whose checkpoints this model reads and writes.
    model_type: str = "llama"
    # "rms"; "rms_offset": x / rms(x) * (1 + w), Gemma; "layer": LayerNorm with a bias, GPT-2.
    norm: str = "rms"
    qkv_bias: bool = False  # biases on q, k and v (Qwen 2.5, GPT-2)
    proj_bias: bool = False  # biases on the attention output and MLP projections (GPT-2)
    fused_qkv: bool = False  # one qkv_proj, as the checkpoint stores it (Phi-3, GPT-2)
    fused_gate_up: bool = False  # one w13 = [gate; up] projection (Phi-3)
    gated_mlp: bool = True  # w2(act(w1 x) * w3 x); False: w2(act(w1 x)) (GPT-2)
    activation: str = "silu"  # "gelu_tanh": Gemma, GPT-2
    qk_norm: bool = False  # q and k normed per head before RoPE (Qwen 3)
    post_norms: bool = False  # attention and MLP outputs normed before the residual add (Gemma 2)
    embed_scale: bool = False  # embeddings multiplied by sqrt(embed_dim) (Gemma)
    learned_positions: bool = False  # an embedding per position instead of RoPE (GPT-2)
    partial_rotary_factor: float = 1.0  # RoPE on the first fraction of each head (Phi-4-mini: 0.75)
    # Keys older than `sliding_window` positions are not attended to: in every layer (Mistral v0.1,
    # Phi-3), or with `sliding_window_pattern` p > 1 in all but every p-th layer (Gemma 2: p = 2).
    sliding_window: int | None = None
    sliding_window_pattern: int = 1
    query_pre_attn_scalar: float | None = None  # scores scaled by its -1/2 power, not head_dim's (Gemma)
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_softcap: float | None = None  # the same on the logits (Gemma 2)

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ConfigError(f"norm: {self.norm!r} is not one of {list(NORMS)}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation: {self.activation!r} is not one of {list(ACTIVATIONS)}")
        if self.final_softcap is not None and not self.tie_word_embeddings:
            raise ConfigError("final_softcap: only models that tie their output to the embedding (Gemma 2) cap logits")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.embed_dim // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.resolved_head_dim * self.partial_rotary_factor)

    def window(self, layer: int) -> int | None:
        """How many positions back layer `layer` attends (itself included); None: all of them."""
        pattern = self.sliding_window_pattern
        return self.sliding_window if pattern == 1 or (layer + 1) % pattern else None


@dataclass(frozen=True)
class LoRAArgs:
    """Where adapters go and how large they are; keys match torchtune's config names."""

    lora_attn_modules: tuple[str, ...] = ("q_proj", "v_proj")
    apply_lora_to_mlp: bool = False
    apply_lora_to_output: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    quantize_base: bool = False
    fp8_base: bool = False


def attention_projections(args: ModelArgs) -> tuple[str, ...]:
    """The attention's linear layers, the names `lora_attn_modules` chooses from."""
    return ("qkv_proj", "output_proj") if args.fused_qkv else ("q_proj", "k_proj", "v_proj", "output_proj")


def mlp_projections(args: ModelArgs) -> tuple[str, ...]:
    """The MLP's linear layers, all adapted with `apply_lora_to_mlp`."""
    if args.fused_gate_up:
        return ("w13", "w2")
    return ("w1", "w2", "w3") if args.gated_mlp else ("w1", "w2")


# Builds a linear layer from (in_dim, out_dim, name, bias): plain, LoRA or NF4 by name.
LinearFactory = Callable[[int, int, str, bool], nn.Module]


class RMSNorm(nn.Module):
    """x / rms(x) * weight, the statistics taken in fp32 as in Meta's and HF's reference."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # Written out, the compiler fuses it with its neighbours.
            x32 = x.float()
            return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        # Eager: one fused kernel on GPUs; it too accumulates in fp32, and matches HF exactly in fp32.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class OffsetRMSNorm(RMSNorm):
    """Gemma's norm: x / rms(x) * (1 + weight), all in fp32 before casting back (HF multiplies
    before the cast, Llama after); the weight is stored as the offset from one, zero at init."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), 1.0 + self.weight.float(), self.eps).to(x.dtype)


def build_norm(args: ModelArgs, dim: int) -> nn.Module:
    if args.norm == "layer":
        return nn.LayerNorm(dim, eps=args.norm_eps)
    return (OffsetRMSNorm if args.norm == "rms_offset" else RMSNorm)(dim, args.norm_eps)


def rope_inverse_frequencies(dim: int, base: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Per-pair rotation speeds; Llama 3.1 slows the low frequencies so long contexts stay apart."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Computes cos/sin from positions on the fly: no length cap, and packed samples restart at 0."""

    def __init__(self, dim: int, base: float, scaling: RopeScaling | LongRopeScaling | None) -> None:
        super().__init__()
        self.dim, self.base, self.scaling = dim, base, scaling
        self.long = isinstance(scaling, LongRopeScaling)
        self.attention_factor = scaling.attention_factor if isinstance(scaling, LongRopeScaling) else 1.0
        self.register_buffer("inv_freq", torch.empty(dim // 2), persistent=False)
        self.register_buffer("long_inv_freq", torch.empty(dim // 2 if self.long else 0), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if isinstance(self.scaling, LongRopeScaling):
            # Written as transformers writes it, so the frequencies agree to the last bit.
            powers = self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim)
            self.inv_freq.copy_(1.0 / (torch.tensor(self.scaling.short_factor) * powers))
            self.long_inv_freq.copy_(1.0 / (torch.tensor(self.scaling.long_factor) * powers))
        else:
            self.inv_freq.copy_(rope_inverse_frequencies(self.dim, self.base, self.scaling))

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if isinstance(self.scaling, LongRopeScaling):
            # As transformers does: the long factors for the whole call once any position passes
            # the pre-training window (a tensor choice, so no wait for the GPU).
            past = positions.max() >= self.scaling.original_max_position_embeddings
            inv_freq = torch.where(past, self.long_inv_freq, self.inv_freq)
        freqs = positions.float()[..., None] * inv_freq  # (b|1, s, rd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (b|1, 1, s, rd)
        return (emb.cos() * self.attention_factor).to(dtype), (emb.sin() * self.attention_factor).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the first rd = cos.shape[-1] dims of each head; the rest pass (partial RoPE)."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos + rotated * sin
    return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)


class KVCache(nn.Module):
    """The keys and values of the tokens seen so far, so that generating a token runs the model on
    that token alone rather than on the whole sequence again. Preallocated at the longest length;
    sliding-window layers keep every position too and mask the old ones out."""

    def __init__(
        self, batch_size: int, num_kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.size = 0  # positions filled so far

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends this call's (b, kv, s, hd) keys and values; returns every one cached so far."""
        end = self.size + k.shape[2]
        assert end <= self.k.shape[2], f"KV cache holds {self.k.shape[2]} positions, {end} asked for"
        self.k[:, :, self.size:end] = k
        self.v[:, :, self.size:end] = v
        self.size = end
        return self.k[:, :, :end], self.v[:, :, :end]


def cache_causal_mask(start: int, length: int, device: torch.device) -> torch.Tensor:
    """(1, 1, length, start + length) boolean SDPA mask for `length` new tokens after `start` cached
    ones: each sees every cached position and the new ones up to itself."""
    keys = torch.arange(start + length, device=device)
    queries = torch.arange(start, start + length, device=device)
    return (keys[None, :] <= queries[:, None])[None, None]


def window_mask(
    mask: torch.Tensor, query_positions: torch.Tensor, key_positions: torch.Tensor, window: int
) -> torch.Tensor:
    """`mask` (b|1, 1, s, S) narrowed to keys fewer than `window` positions before each query.
    Positions, not columns, count: a left-padded row sees what it would see alone."""
    distance = query_positions[:, :, None] - key_positions[:, None, :]  # (b|1, s, S)
    return mask & (distance < window)[:, None]


def softcapped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, cap: float
) -> torch.Tensor:
    """Attention with Gemma 2's capped scores, cap * tanh(scores / cap), which SDPA cannot apply:
    the (b, h, s, S) scores are materialised, as in transformers' eager attention."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.tanh((q @ k.transpose(-2, -1)) * scale / cap) * cap  # (b, h, s, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


class Attention(nn.Module):
    """Grouped-query attention with no (s x s) tensor stored (tunelite.modules.attention), except
    Gemma 2's capped scores, which only an eager product can apply."""

    def __init__(self, args: ModelArgs, linear: LinearFactory, window: int | None) -> None:
        super().__init__()
        hd = args.resolved_head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, hd
        self.fused = args.fused_qkv
        if args.fused_qkv:
            self.qkv_proj = linear(args.embed_dim, (args.num_heads + 2 * args.num_kv_heads) * hd, "qkv_proj",
                                   args.qkv_bias)
        else:
            self.q_proj = linear(args.embed_dim, args.num_heads * hd, "q_proj", args.qkv_bias)
            self.k_proj = linear(args.embed_dim, args.num_kv_heads * hd, "k_proj", args.qkv_bias)
            self.v_proj = linear(args.embed_dim, args.num_kv_heads * hd, "v_proj", args.qkv_bias)
        self.q_norm = build_norm(args, hd) if args.qk_norm else nn.Identity()
        self.k_norm = build_norm(args, hd) if args.qk_norm else nn.Identity()
        self.output_proj = linear(args.num_heads * hd, args.embed_dim, "output_proj", args.proj_bias)
        self.window = window
        self.scale = args.query_pre_attn_scalar ** -0.5 if args.query_pre_attn_scalar else hd ** -0.5
        self.softcap = args.attn_softcap
        self.kv_cache: KVCache | None = None  # only while generating (TransformerDecoder.setup_caches)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (b, s, h, hd), k and v (b, s, kv, hd)."""
        b, s, _ = x.shape
        if self.fused:
            qkv = self.qkv_proj(x).view(b, s, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
            return qkv.split((self.num_heads, self.num_kv_heads, self.num_kv_heads), dim=2)
        return (self.q_proj(x).view(b, s, self.num_heads, self.head_dim),
                self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim),
                self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim))

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, mask: torch.Tensor | DocumentMask | None
    ) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.project(x)
        q, k, v = self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2), v.transpose(1, 2)  # (b, h|kv, s, hd)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(k, v)  # (b, kv, S, hd); the decoder passes the mask
        if self.softcap is not None:
            causal = mask if mask is not None else cache_causal_mask(0, s, x.device)
            out = softcapped_attention(q, k, v, causal, self.scale, self.softcap)
        else:
            out = attend(q, k, v, mask, self.scale)  # (b, h, s, hd)
        return self.output_proj(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    """Gated: w2(act(w1 x) * w3 x), w1/w3 HF's gate/up projections (fused as w13 = [gate; up] where
    the checkpoint fuses them) and w2 its down projection; not gated (GPT-2): w2(act(w1 x))."""

    def __init__(self, args: ModelArgs, linear: LinearFactory) -> None:
        super().__init__()
        d, inter, bias = args.embed_dim, args.intermediate_dim, args.proj_bias
        self.fused, self.gated = args.fused_gate_up, args.gated_mlp
        if args.fused_gate_up:
            self.w13 = linear(d, 2 * inter, "w13", bias)
        else:
            self.w1 = linear(d, inter, "w1", bias)
        self.w2 = linear(inter, d, "w2", bias)
        if args.gated_mlp and not args.fused_gate_up:
            self.w3 = linear(d, inter, "w3", bias)
        self.activation = args.activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.w13(x).chunk(2, dim=-1)
        elif self.gated:
            gate, up = self.w1(x), self.w3(x)
        else:
            return _down(self.w2, ACTIVATIONS[self.activation](self.w1(x)))
        # Kept for backward: gate and up, not act(gate) nor the product (see gated_mlp).
        return _down(self.w2, gated_product(gate, up, self.activation), gate, up, self.activation)


def _down(w2: nn.Module, product: torch.Tensor, gate: torch.Tensor | None = None, up: torch.Tensor | None = None,
          activation: str = "") -> torch.Tensor:
    """The down projection, last in the layer, its frozen base weight's matmul last in it: what its
    backward needs is saved before that matmul runs (a bf16 or NF4 base: a plain linear saves its
    weight first), so an eager checkpoint's recomputation, which stops once every tensor the forward
    saved is saved again, never runs it (1/3 of the MLP's, 1/4 of a Llama layer's matmul work,
    recomputed for nothing). An FP8 base's autograd Function saves after its matmul: it still runs.
    In a compiled layer the partitioner leaves it out of the recomputation (TransformerLayer.forward)."""
    if gate is not None and isinstance(w2, LoRALinear):
        return w2.forward_gated(product, gate, up, activation)
    return w2(product)


# A compiled layer runs its MLP's chunks outside its graph, each an eager checkpoint, whose memory
# the estimate counts (measured at 48k-128k). Inside the graph the chunks' checkpoints held more: a
# compiled 32k QLoRA step ran out of memory 2.5 GiB or more over that count (call 20).
_chunks_eagerly = torch.compiler.disable(in_sequence_chunks)


class TransformerLayer(nn.Module):
    def __init__(self, args: ModelArgs, linear: LinearFactory, window: int | None) -> None:
        super().__init__()
        self.sa_norm = build_norm(args, args.embed_dim)
        self.attn = Attention(args, linear, window)
        self.sa_post_norm = build_norm(args, args.embed_dim) if args.post_norms else nn.Identity()
        self.mlp_norm = build_norm(args, args.embed_dim)
        self.mlp = FeedForward(args, linear)
        self.mlp_post_norm = build_norm(args, args.embed_dim) if args.post_norms else nn.Identity()

        self.mlp_chunk_tokens: int | None = None  # set_memory_policy: longer batches run the MLP in chunks
        self.checkpoint: Callable[..., torch.Tensor] | None = None  # set_memory_policy: activation checkpointing

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | DocumentMask | None, windowed_mask: torch.Tensor | DocumentMask | None,
        attention: bool = True, mlp: bool = True,
    ) -> torch.Tensor:
        """`windowed_mask` is `mask` narrowed to the sliding window, for a layer that has one.
        `attention`, `mlp`: which residual blocks to run, so a memory policy can checkpoint the
        attention block alone (tunelite.modules.memory_policy).

        A layer under activation checkpointing whose MLP runs whole checkpoints itself, here, so that
        a compiled layer holds the checkpoint inside its graph (torchtitan's order: the checkpoint,
        then compile): one graph forward and one backward, whose partitioner recomputes only what
        backward reads, never the down projection's product. Around a compiled layer the checkpoint
        took two graphs with the down projection run eagerly between them, and the GPU waited on the
        host (call 28). Where the MLP runs in chunks the memory policy checkpoints from outside.
        Evaluation and generation (no gradients, or the model in eval mode) run the blocks plainly."""
        if (self.checkpoint is not None and self.training and torch.is_grad_enabled() and attention and mlp
                and not chunks_sequence(x, self.mlp_chunk_tokens)):
            return self.checkpoint(self.blocks, x, rope, mask, windowed_mask)
        return self.blocks(x, rope, mask, windowed_mask, attention, mlp)

    def blocks(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | DocumentMask | None, windowed_mask: torch.Tensor | DocumentMask | None,
        attention: bool = True, mlp: bool = True,
    ) -> torch.Tensor:
        """The attention and MLP residual blocks (those asked for), with no checkpoint of their own."""
        h = x
        if attention:
            attn_mask = windowed_mask if self.attn.window is not None else mask
            h = h + self.sa_post_norm(self.attn(self.sa_norm(h), rope, attn_mask))
        if mlp:
            chunks = _chunks_eagerly if chunks_sequence(h, self.mlp_chunk_tokens) else in_sequence_chunks
            h = h + chunks(self.feed_forward, h, self.mlp_chunk_tokens)
        return h

    def feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp_post_norm(self.mlp(self.mlp_norm(h)))


class TiedOutput:
    """The output projection of tied models (Llama 3.2, SmolLM2, Qwen's small sizes, Phi-4-mini,
    Gemma, GPT-2):
    reuses the embedding without owning it, so the state dict holds the shared tensor once and
    saving writes no `lm_head` duplicate. Gemma 2 caps its logits here, so the loss, which calls
    `model.output` chunk by chunk, sees the model's real logits."""

    def __init__(self, embedding: nn.Embedding, softcap: float | None = None) -> None:
        self.embedding, self.softcap = embedding, softcap

    def parameters(self) -> Iterator[nn.Parameter]:
        """The embedding's: what the projection trains when the embedding does (the loss asks)."""
        return self.embedding.parameters()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.embedding.weight)
        return logits if self.softcap is None else torch.tanh(logits / self.softcap) * self.softcap


class TransformerDecoder(nn.Module):
    def __init__(self, args: ModelArgs, linear: LinearFactory) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.embed_dim)
        self.pos_embeddings = nn.Embedding(args.max_seq_len, args.embed_dim) if args.learned_positions else None
        self.rope = None if args.learned_positions else RotaryEmbedding(args.rotary_dim, args.rope_base,
                                                                         args.rope_scaling)
        self.layers = nn.ModuleList(TransformerLayer(args, linear, args.window(i)) for i in range(args.num_layers))
        self.norm = build_norm(args, args.embed_dim)
        self.output: nn.Module | TiedOutput
        if args.tie_word_embeddings:
            self.output = TiedOutput(self.tok_embeddings, args.final_softcap)
        else:
            self.output = linear(args.embed_dim, args.vocab_size, "output", False)
        self.memory_policy: MemoryPolicy | None = None  # set_memory_policy; None keeps every activation
        # The positions of the cached tokens, while generating: sliding windows count in positions.
        self.cache_positions: torch.Tensor | None = None

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)  # (b, s, d)
        if self.args.embed_scale:
            # Gemma scales by sqrt(d) rounded to the weights' dtype, as its checkpoints were trained.
            h = h * torch.tensor(self.args.embed_dim ** 0.5, dtype=h.dtype, device=h.device)
        if self.pos_embeddings is not None:
            h = h + self.pos_embeddings(positions)
        return h

    def hidden_states(
        self, tokens: torch.Tensor, positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final normed hidden states; the loss projects them to the vocabulary chunk by chunk,
        so full-vocabulary logits for a whole batch never sit in memory at once.

        Packed samples pass their (b, s) `document_ids` (and positions restarting per document):
        each token then attends within its own document, with no (s x s) mask where the family's
        attention allows (sliding windows and capped scores need one). With caches set up
        (generation), `tokens` continue the cached sequence, and the default positions and mask
        say so."""
        s = tokens.shape[1]
        start = self.layers[0].attn.kv_cache.size if self.caches_enabled else 0
        if self.pos_embeddings is not None:  # learned positions (GPT-2): a table of max_seq_len rows
            longest = start + s if positions is None else int(positions.max()) + 1  # packs restart theirs
            if longest > self.args.max_seq_len:
                raise TuneliteError(f"{longest} positions, but this model learned {self.args.max_seq_len}: set "
                                    "tokenizer.max_seq_len (or shorten the prompt and max_new_tokens) to at most "
                                    f"{self.args.max_seq_len}")
        if positions is None:
            positions = torch.arange(start, start + s, device=tokens.device)[None]
        if mask is None and self.caches_enabled:
            mask = cache_causal_mask(start, s, tokens.device)
        key_positions = positions
        if self.cache_positions is not None:
            self.cache_positions[:, start:start + s] = positions
            key_positions = self.cache_positions[:, :start + s]
        window = self.args.sliding_window
        if document_ids is not None:
            dense = self.args.attn_softcap is not None or (window is not None and s > window)
            mask = dense_document_mask(document_ids) if dense else document_attention_mask(document_ids)
        windowed = mask
        if window is not None and start + s > window:  # shorter sequences fit the window whole
            windowed = window_mask(mask if mask is not None else cache_causal_mask(start, s, tokens.device),
                                   positions, key_positions, window)
        h = self.embed(tokens, positions)
        rope = self.rope(positions, h.dtype) if self.rope is not None else None
        policy = self.memory_policy if self.training else None
        h = run_layers(self.layers, policy, h, rope, mask, windowed, keep=rope or ())
        return self.norm(h)

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.output(self.hidden_states(tokens, positions, mask, document_ids))  # (b, s, vocab)

    def setup_caches(
        self, batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> None:
        """Gives every attention layer an empty KV cache of `max_seq_len` positions, for generation;
        training never calls this, so its forward pass is unchanged."""
        dtype = dtype or self.tok_embeddings.weight.dtype
        device = device or self.device
        for layer in self.layers:
            layer.attn.kv_cache = KVCache(batch_size, self.args.num_kv_heads, max_seq_len, self.args.resolved_head_dim,
                                          dtype, device)
        self.cache_positions = torch.zeros((batch_size, max_seq_len), dtype=torch.long, device=device)

    def reset_caches(self) -> None:
        """Drops the KV caches and their memory: the model attends over its input alone again."""
        for layer in self.layers:
            layer.attn.kv_cache = None
        self.cache_positions = None

    @property
    def device(self) -> torch.device:
        """Where the model computes: its final norm's device, not the embedding table's, which
        offload_embeddings keeps in host memory (tunelite.modules.host_embedding)."""
        return self.norm.weight.device

    @property
    def caches_enabled(self) -> bool:
        return self.layers[0].attn.kv_cache is not None


def plain_linear(in_dim: int, out_dim: int, name: str, bias: bool = False) -> nn.Module:
    return nn.Linear(in_dim, out_dim, bias=bias)


def set_activation_checkpointing(model: TransformerDecoder, every: int = 1) -> None:
    """Recompute every `every`-th layer's activations in backward (0 turns it off): memory for speed.
    A shorthand for `set_memory_policy`, which chooses layer by layer."""
    set_memory_policy(model, [RECOMPUTE if every and i % every == 0 else KEEP for i in range(len(model.layers))])


def decoder(args: ModelArgs) -> TransformerDecoder:
    """The model of `args`, every weight a plain linear layer: for full fine-tuning and merged weights."""
    return TransformerDecoder(args, plain_linear)


def lora_decoder(args: ModelArgs, lora: LoRAArgs) -> TransformerDecoder:
    """The same decoder with `LoRALinear` in the projections `lora` names."""
    choices = attention_projections(args)
    unknown = sorted(set(lora.lora_attn_modules) - set(choices))
    if unknown:
        fused = (" (this model keeps q, k and v in one qkv_proj, as its checkpoint does)"
                 if args.fused_qkv else "")
        raise ConfigError(
            f"model.lora_attn_modules: {unknown} are not attention projections{fused}; choose from {list(choices)}"
        )
    if lora.apply_lora_to_output and args.tie_word_embeddings:
        raise ConfigError(
            "model.apply_lora_to_output: this model ties its output to the embedding, which has no "
            "adapter; set apply_lora_to_output: False"
        )
    targets = set(lora.lora_attn_modules) | (set(mlp_projections(args)) if lora.apply_lora_to_mlp else set())
    targets |= {"output"} if lora.apply_lora_to_output else set()

    # QLoRA keeps every frozen projection inside the layers in NF4, an FP8 base in FP8; the output
    # projection stays in bf16, as in torchtune and the QLoRA paper, since it is one matrix and the
    # most sensitive.
    def linear(in_dim: int, out_dim: int, name: str, bias: bool) -> nn.Module:
        quantize, in_fp8 = (flag and name != "output" for flag in (lora.quantize_base, lora.fp8_base))
        if name in targets:
            return LoRALinear(in_dim, out_dim, lora.lora_rank, lora.lora_alpha, lora.lora_dropout, quantize, in_fp8,
                              bias)
        if in_fp8:
            return FrozenFP8Linear(in_dim, out_dim, bias)
        return FrozenNF4Linear(in_dim, out_dim, bias) if quantize else plain_linear(in_dim, out_dim, name, bias)

    return TransformerDecoder(args, linear)
