"""One Llama decoder for every family (Llama 2, 3, 3.1, 3.2): the families differ only in sizes.

Layout and naming follow torchtune (`tok_embeddings`, `layers.N.attn.q_proj`, `mlp.w1/w2/w3`,
`sa_norm`, `mlp_norm`, `norm`, `output`) so configs and checkpoints read the same. Rotary
embeddings use Hugging Face's rotate-half convention, so HF weights load with a plain key
rename and no permutation of q/k rows.

Shapes in comments: b batch, s sequence, d embed_dim, h heads, kv kv heads, hd head_dim.
"""

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tunelite.errors import ConfigError
from tunelite.modules.lora import LoRALinear
from tunelite.modules.fp8 import FrozenFP8Linear
from tunelite.modules.nf4 import FrozenNF4Linear, keep_dequantized_weights


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's frequency scaling, which stretches the context window past pre-training."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelArgs:
    """The numbers that tell one Llama from another; everything else is shared code."""

    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    intermediate_dim: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope_base: float = 500_000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    head_dim: int | None = None

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.embed_dim // self.num_heads


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
    targets: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        mlp = ("w1", "w2", "w3") if self.apply_lora_to_mlp else ()
        out = ("output",) if self.apply_lora_to_output else ()
        object.__setattr__(self, "targets", tuple(self.lora_attn_modules) + mlp + out)


ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "output_proj")

LinearFactory = Callable[[int, int, str], nn.Module]


class RMSNorm(nn.Module):
    """x / rms(x) * weight, the statistics taken in fp32 as in Meta's and HF's reference."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # Written out, the compiler fuses it with its neighbours.
            x32 = x.float()
            return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        # Eager: one fused kernel on GPUs; it too accumulates in fp32, and matches HF exactly in fp32.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_inverse_frequencies(head_dim: int, base: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Per-pair rotation speeds; Llama 3.1 slows the low frequencies so long contexts stay apart."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
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

    def __init__(self, head_dim: int, base: float, scaling: RopeScaling | None) -> None:
        super().__init__()
        self.head_dim, self.base, self.scaling = head_dim, base, scaling
        self.register_buffer("inv_freq", rope_inverse_frequencies(head_dim, base, scaling), persistent=False)

    def reset_parameters(self) -> None:
        self.inv_freq.copy_(rope_inverse_frequencies(self.head_dim, self.base, self.scaling))

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq  # (b|1, s, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (b|1, 1, s, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class KVCache(nn.Module):
    """The keys and values of the tokens seen so far, so that generating a token runs the model on
    that token alone rather than on the whole sequence again. Preallocated at the longest length."""

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


class Attention(nn.Module):
    """Grouped-query attention through SDPA, which picks flash attention on GPUs when it can."""

    def __init__(self, args: ModelArgs, linear: LinearFactory) -> None:
        super().__init__()
        hd = args.resolved_head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, hd
        self.q_proj = linear(args.embed_dim, args.num_heads * hd, "q_proj")
        self.k_proj = linear(args.embed_dim, args.num_kv_heads * hd, "k_proj")
        self.v_proj = linear(args.embed_dim, args.num_kv_heads * hd, "v_proj")
        self.output_proj = linear(args.num_heads * hd, args.embed_dim, "output_proj")
        self.kv_cache: KVCache | None = None  # only while generating (TransformerDecoder.setup_caches)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None
    ) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # (b, h, s, hd)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (b, kv, s, hd)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(k, v)  # (b, kv, cached + s, hd); the decoder passes the mask
        if mask is not None and self.num_kv_heads != self.num_heads:
            # SDPA's GQA path exists only in its flash kernel, which takes no mask: with a mask
            # (packed samples) share each kv head explicitly, so a memory-efficient kernel runs.
            k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
            v = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=k.shape[1] != self.num_heads
        )  # (b, h, s, hd)
        return self.output_proj(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1/w3 are HF's gate/up projections, w2 its down projection."""

    def __init__(self, args: ModelArgs, linear: LinearFactory) -> None:
        super().__init__()
        self.w1 = linear(args.embed_dim, args.intermediate_dim, "w1")
        self.w2 = linear(args.intermediate_dim, args.embed_dim, "w2")
        self.w3 = linear(args.embed_dim, args.intermediate_dim, "w3")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerLayer(nn.Module):
    def __init__(self, args: ModelArgs, linear: LinearFactory) -> None:
        super().__init__()
        self.sa_norm = RMSNorm(args.embed_dim, args.norm_eps)
        self.attn = Attention(args, linear)
        self.mlp_norm = RMSNorm(args.embed_dim, args.norm_eps)
        self.mlp = FeedForward(args, linear)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None
    ) -> torch.Tensor:
        h = x + self.attn(self.sa_norm(x), rope, mask)
        return h + self.mlp(self.mlp_norm(h))


class TiedOutput:
    """The output projection of tied models (Llama 3.2): reuses the embedding without owning it,
    so the state dict holds the shared tensor once and saving writes no `lm_head` duplicate."""

    def __init__(self, embedding: nn.Embedding) -> None:
        self.embedding = embedding

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.embedding.weight)


class TransformerDecoder(nn.Module):
    def __init__(self, args: ModelArgs, linear: LinearFactory) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.embed_dim)
        self.rope = RotaryEmbedding(args.resolved_head_dim, args.rope_base, args.rope_scaling)
        self.layers = nn.ModuleList(TransformerLayer(args, linear) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.embed_dim, args.norm_eps)
        self.output: nn.Module | TiedOutput
        if args.tie_word_embeddings:
            self.output = TiedOutput(self.tok_embeddings)
        else:
            self.output = linear(args.embed_dim, args.vocab_size, "output")
        self.checkpoint_every: int = 0

    def hidden_states(
        self, tokens: torch.Tensor, positions: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The final normed hidden states; the loss projects them to the vocabulary chunk by chunk,
        so full-vocabulary logits for a whole batch never sit in memory at once.

        With caches set up (generation), `tokens` continue the cached sequence, and the default
        positions and mask say so."""
        start = self.layers[0].attn.kv_cache.size if self.caches_enabled else 0
        if positions is None:
            positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)[None]
        if mask is None and self.caches_enabled:
            mask = cache_causal_mask(start, tokens.shape[1], tokens.device)
        h = self.tok_embeddings(tokens)  # (b, s, d)
        rope = self.rope(positions, h.dtype)
        for i, layer in enumerate(self.layers):
            if self.training and self.checkpoint_every and i % self.checkpoint_every == 0:
                h = checkpoint(layer, h, rope, mask, use_reentrant=False)
            else:
                h = layer(h, rope, mask)
        return self.norm(h)

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.output(self.hidden_states(tokens, positions, mask))  # (b, s, vocab)

    def setup_caches(
        self, batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> None:
        """Gives every attention layer an empty KV cache of `max_seq_len` positions, for generation;
        training never calls this, so its forward pass is unchanged."""
        weight = self.tok_embeddings.weight
        for layer in self.layers:
            layer.attn.kv_cache = KVCache(batch_size, self.args.num_kv_heads, max_seq_len, self.args.resolved_head_dim,
                                          dtype or weight.dtype, device or weight.device)

    def reset_caches(self) -> None:
        """Drops the KV caches and their memory: the model attends over its input alone again."""
        for layer in self.layers:
            layer.attn.kv_cache = None

    @property
    def caches_enabled(self) -> bool:
        return self.layers[0].attn.kv_cache is not None


def plain_linear(in_dim: int, out_dim: int, name: str) -> nn.Module:
    return nn.Linear(in_dim, out_dim, bias=False)


def set_activation_checkpointing(model: TransformerDecoder, every: int = 1) -> None:
    """Recompute every `every`-th layer's activations in backward (0 turns it off): memory for speed.
    A recomputed layer's NF4 weights hand their recomputation's bf16 copy to backward."""
    model.checkpoint_every = every
    for i, layer in enumerate(model.layers):
        keep_dequantized_weights(layer, bool(every) and i % every == 0)


def llama(args: ModelArgs) -> TransformerDecoder:
    return TransformerDecoder(args, plain_linear)


def lora_llama(args: ModelArgs, lora: LoRAArgs) -> TransformerDecoder:
    """The same decoder with `LoRALinear` in the projections `lora` names."""
    unknown = sorted(set(lora.lora_attn_modules) - set(ATTN_MODULES))
    if unknown:
        raise ConfigError(
            f"model.lora_attn_modules: {unknown} are not attention projections; choose from {list(ATTN_MODULES)}"
        )
    if lora.apply_lora_to_output and args.tie_word_embeddings:
        raise ConfigError(
            "model.apply_lora_to_output: this model ties its output to the embedding, which has no "
            "adapter; set apply_lora_to_output: False"
        )

    # QLoRA keeps every frozen projection inside the layers in NF4, an FP8 base in FP8; the output
    # projection stays in bf16, as in torchtune and the QLoRA paper, since it is one matrix and the
    # most sensitive.
    def linear(in_dim: int, out_dim: int, name: str) -> nn.Module:
        quantize, in_fp8 = (flag and name != "output" for flag in (lora.quantize_base, lora.fp8_base))
        if name in lora.targets:
            return LoRALinear(in_dim, out_dim, lora.lora_rank, lora.lora_alpha, lora.lora_dropout, quantize, in_fp8)
        if in_fp8:
            return FrozenFP8Linear(in_dim, out_dim)
        return FrozenNF4Linear(in_dim, out_dim) if quantize else plain_linear(in_dim, out_dim, name)

    return TransformerDecoder(args, linear)
