"""How each transformer layer pays for its backward pass: memory for speed, chosen layer by layer.

- `keep`: every activation the layer's backward needs stays on the card. Fastest, most memory.
- `recompute`: activation checkpointing. Only the layer's input is kept; its forward runs again
  in backward. About a third more compute for the layer, a small fraction of the memory.
- `offload`: every activation the backward needs is copied to host memory as the forward runs
  and fetched back one layer ahead of the backward (tunelite.modules.offload). No recompute,
  but PCIe traffic of the layer's whole activations, which only pays when it hides behind compute.
- `recompute+offload`: checkpointing whose saved input goes to host memory: almost nothing of
  the layer stays on the card, for a few MB of traffic per layer (Unsloth's trick).
- `recompute+attention`, `recompute+offload+attention`: the same, but the attention kernel's
  output (and its log-sum-exp) stays on the card from forward to backward, so the recomputation
  runs the projections, norms and MLP again but not attention (torch's selective checkpointing).
  Attention costs seq^2 and its output only seq: at long samples the best use of a little memory.

Long sequences also run the MLP in chunks of the sequence, each chunk under its own checkpoint,
so no (tokens x intermediate_dim) tensor exists whole, in forward or backward; a recomputed layer
may then recompute its attention block alone (`by_block`), keeping its MLP block's input too.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from tunelite.errors import ConfigError
from tunelite.modules.nf4 import keep_dequantized_weights
from tunelite.modules.offload import MIN_OFFLOAD_BYTES, ActivationOffloader

KEEP, RECOMPUTE, OFFLOAD, RECOMPUTE_OFFLOAD = "keep", "recompute", "offload", "recompute+offload"
RECOMPUTE_ATTENTION, RECOMPUTE_OFFLOAD_ATTENTION = "recompute+attention", "recompute+offload+attention"
POLICIES = (KEEP, RECOMPUTE, OFFLOAD, RECOMPUTE_OFFLOAD, RECOMPUTE_ATTENTION, RECOMPUTE_OFFLOAD_ATTENTION)
# The fused attention kernels SDPA dispatches to; a layer that keeps its attention output saves
# theirs. (The math fallback, used with some masks on the CPU, is recomputed as before.)
ATTENTION_OPS = tuple(getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, name))
# Above this many tokens in a batch the MLP runs in chunks of at most this many: at 8B sizes a
# chunk's SwiGLU intermediates are 8192 x 14336 values, and the matmuls stay large enough to be fast.
MLP_CHUNK_TOKENS = 8192


def recomputes(policy: str) -> bool:
    """Whether a layer under `policy` runs its forward again in backward."""
    return policy in (RECOMPUTE, RECOMPUTE_OFFLOAD, RECOMPUTE_ATTENTION, RECOMPUTE_OFFLOAD_ATTENTION)


def offloads(policy: str) -> bool:
    """Whether a layer under `policy` sends what it saves to host memory."""
    return policy in (OFFLOAD, RECOMPUTE_OFFLOAD, RECOMPUTE_OFFLOAD_ATTENTION)


def keeps_attention(policy: str) -> bool:
    """Whether a recomputed layer under `policy` keeps its attention output instead of recomputing it."""
    return policy in (RECOMPUTE_ATTENTION, RECOMPUTE_OFFLOAD_ATTENTION)


def uniform_policies(num_layers: int, checkpointing: bool, offloading: bool) -> list[str]:
    """The policy of torchtune's two switches, the same for every layer: enable_activation_checkpointing
    recomputes each layer, enable_activation_offloading offloads what the layer then saves (its
    input under checkpointing, every activation without)."""
    policy = {(False, False): KEEP, (True, False): RECOMPUTE, (False, True): OFFLOAD,
              (True, True): RECOMPUTE_OFFLOAD}[checkpointing, offloading]
    return [policy] * num_layers


@dataclass
class MemoryPolicy:
    """A model's per-layer policies, with the offloader the offloaded layers share."""

    layers: tuple[str, ...]
    offloader: ActivationOffloader | None
    by_block: bool = False  # a recomputed layer whose MLP runs in chunks recomputes its attention block alone

    def run(self, layers: Sequence[nn.Module], h: torch.Tensor, *args: object,
            keep: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Runs `layers` in turn on h, each under its policy; `keep`: tensors every layer shares
        (the rotary tables), which are never offloaded."""
        if not torch.is_grad_enabled():
            return _plain(layers, h, *args)
        for layer, policy in zip(layers, self.layers):
            run = partial(_recomputed, layer, self.by_block) if recomputes(policy) else layer
            if offloads(policy):
                with self.offloader.offloaded(layer, keep):
                    h = run(h, *args)
            else:
                h = run(h, *args)
        if self.offloader is not None:
            self.offloader.forward_done()
        return h


def _recomputed(layer: nn.Module, by_block: bool, h: torch.Tensor, *args: object) -> torch.Tensor:
    """A layer under activation checkpointing. Its MLP whole, the layer checkpoints itself
    (`layer.checkpoint`, see TransformerLayer.forward). In chunks (which checkpoint themselves)
    the checkpoint goes around the layer, and with `by_block` around its attention block alone,
    the MLP block running after it, keeping its input, one more residual-stream tensor.
    Recomputing the whole layer instead runs every chunk but the last a third time, since the
    recomputation stops only once the last chunk's input is saved again (3/4 of the MLP's forward
    at 32k tokens). Not for an FSDP2 unit: called twice a forward, it would gather the unit's
    weights twice and reduce its gradients in two parts (right on one process; not tried on several)."""
    if not chunks_sequence(h, layer.mlp_chunk_tokens):
        return layer(h, *args)
    if not by_block or isinstance(layer, FSDPModule):
        return layer.checkpoint(layer, h, *args)
    return layer(layer.checkpoint(layer, h, *args, mlp=False), *args, attention=False)


def _layer_checkpoint(policy: str) -> Callable[..., torch.Tensor] | None:
    """The checkpoint a layer under `policy` runs under (None: it keeps its activations). A
    context_fn only where it does something: the compiler traces none but selective checkpointing's."""
    if not recomputes(policy):
        return None
    if keeps_attention(policy):
        return partial(checkpoint, use_reentrant=False, context_fn=_attention_kept)
    return partial(checkpoint, use_reentrant=False)


def _attention_kept() -> tuple[object, object]:
    """Selective checkpointing's contexts that save the attention kernels' outputs."""
    return create_selective_checkpoint_contexts(list(ATTENTION_OPS))


def run_layers(layers: Sequence[nn.Module], policy: MemoryPolicy | None, h: torch.Tensor, *args: object,
               keep: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """The decoder's layer loop: under `policy` when one is set (training), else plainly."""
    return policy.run(layers, h, *args, keep=keep) if policy is not None else _plain(layers, h, *args)


def _plain(layers: Sequence[nn.Module], h: torch.Tensor, *args: object) -> torch.Tensor:
    for layer in layers:
        h = layer(h, *args)
    return h


def set_memory_policy(model: nn.Module, policies: Sequence[str], mlp_chunk_tokens: int | None = MLP_CHUNK_TOKENS,
                      by_block: bool = False, min_offload_bytes: int = MIN_OFFLOAD_BYTES) -> None:
    """Gives each of `model.layers` its policy (see the module docstring) for training, and the
    MLP its chunk size (None: whole). `by_block`: a recomputed layer whose MLP runs in chunks
    recomputes its attention block alone (see _recomputed). `min_offload_bytes`: smaller saved
    tensors stay on the card (tests offload everything with 0)."""
    layers = model.layers
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown or len(policies) != len(layers):
        raise ConfigError(f"memory policy: {len(policies)} policies {sorted(set(policies))} for {len(layers)} layers; "
                          f"give one per layer, each one of {list(POLICIES)}")
    offloader = None
    if any(offloads(p) for p in policies):
        offloader = ActivationOffloader(model.device, min_offload_bytes)  # not the table's (offload_embeddings)
    model.memory_policy = MemoryPolicy(tuple(policies), offloader, by_block)
    for layer, policy in zip(layers, policies):
        layer.mlp_chunk_tokens = mlp_chunk_tokens
        layer.checkpoint = _layer_checkpoint(policy)
        # A recomputed layer's NF4 weights hand their recomputation's bf16 copy to backward.
        keep_dequantized_weights(layer, recomputes(policy))


def in_sequence_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                       chunk_tokens: int | None) -> torch.Tensor:
    """fn(x) for a per-token fn over (b, s, ...) x, run over pieces of the sequence of at most
    `chunk_tokens` tokens (b x length) when x holds more. With gradients each piece runs under
    checkpoint, so only its input is kept and fn's intermediates exist for one piece at a time."""
    if not chunks_sequence(x, chunk_tokens):
        return fn(x)
    pieces = x.split(max(1, chunk_tokens // x.shape[0]), dim=1)
    if torch.is_grad_enabled():
        return torch.cat([checkpoint(fn, piece, use_reentrant=False) for piece in pieces], dim=1)
    return torch.cat([fn(piece) for piece in pieces], dim=1)


def chunks_sequence(x: torch.Tensor, chunk_tokens: int | None) -> bool:
    """Whether `in_sequence_chunks` splits (b, s, ...) x: it holds more than `chunk_tokens` tokens."""
    return bool(chunk_tokens) and x.shape[0] * x.shape[1] > chunk_tokens
