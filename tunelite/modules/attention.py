"""Attention whose memory stays linear in the sequence: no (s x s) score or mask is ever stored.

Three shapes of mask reach it:
- none: causal attention over the whole sequence, through SDPA's flash kernel on GPUs;
- a boolean tensor: generation with a KV cache (a few new tokens against the cached ones);
- packed documents, built once per forward by `document_attention_mask` from the collate's
  document ids: on a GPU a FlexAttention block mask, made from the ids block by block (128 x 128
  tokens) rather than from a dense mask, so a 128k-token pack needs 1M block flags, not 16 GiB of
  token flags; elsewhere (FlexAttention has no backward on the CPU) one causal SDPA call per
  document. Either way a token sees the earlier tokens of its own document only.
"""

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

BLOCK = 128  # FlexAttention's tile, in tokens, for queries and keys alike


@dataclass(frozen=True)
class DocumentSpans:
    """Packed documents as (start, end) spans per batch row, for per-document attention."""

    spans: tuple[tuple[tuple[int, int], ...], ...]


DocumentMask = BlockMask | DocumentSpans


def document_attention_mask(document_ids: torch.Tensor, flex: bool | None = None) -> DocumentMask:
    """What `attend` needs to keep packed documents apart, from (b, s) document ids (padding is a
    document of its own). `flex`: FlexAttention's block mask, by default on GPUs only."""
    if flex if flex is not None else document_ids.device.type == "cuda":
        return document_block_mask(document_ids)
    return DocumentSpans(tuple(_spans(row) for row in document_ids.tolist()))


def dense_document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """(b, 1, s, s) boolean mask of causal attention within each packed document, for attention
    that needs its mask whole (sliding windows narrow it, Gemma 2's capped scores apply it)."""
    same = document_ids[:, :, None] == document_ids[:, None, :]
    return (same & torch.ones_like(same[0]).tril())[:, None]


def _spans(row: list[int]) -> tuple[tuple[int, int], ...]:
    starts = [i for i in range(len(row)) if i == 0 or row[i] != row[i - 1]]
    return tuple(zip(starts, starts[1:] + [len(row)]))


def document_block_mask(document_ids: torch.Tensor) -> BlockMask:
    """FlexAttention's block mask for causal attention within each document.

    A tile of queries and keys is skipped when no document spans both, taken whole (no mask
    evaluated) when one document fills both and the keys come before the queries, and masked
    token by token otherwise (so is a last tile shorter than 128). Which is which follows from
    each tile's lowest and highest document id, so nothing of size s x s is built."""
    b, s = document_ids.shape
    n = math.ceil(s / BLOCK)
    # Padding (-1) after the last document, numbered as one: ids then rise along each row, and two
    # tiles share a document exactly when their id ranges meet.
    ids = torch.where(document_ids < 0, document_ids.max() + 1, document_ids)
    padded = torch.cat([ids, ids[:, -1:].expand(b, n * BLOCK - s)], dim=1).view(b, n, BLOCK)
    low, high = padded.amin(-1), padded.amax(-1)  # (b, n): the documents each tile touches
    ones = torch.ones(n, n, dtype=torch.bool, device=document_ids.device)
    shared = (low[:, None, :] <= high[:, :, None]) & (low[:, :, None] <= high[:, None, :])  # (b, q tile, kv tile)
    one_document = (low == high)[:, :, None] & (low == high)[:, None, :] & (low[:, :, None] == low[:, None, :])
    whole = torch.arange(n, device=document_ids.device) < s // BLOCK  # a last, shorter tile is masked
    full = one_document & ones.tril(-1) & whole[:, None] & whole[None, :]
    partial = shared & ones.tril() & ~full

    def same_document_causal(batch: torch.Tensor, head: torch.Tensor, q: torch.Tensor,
                             kv: torch.Tensor) -> torch.Tensor:
        return (document_ids[batch, q] == document_ids[batch, kv]) & (q >= kv)

    return BlockMask.from_kv_blocks(*_ordered(partial), *_ordered(full), BLOCK_SIZE=BLOCK,
                                    mask_mod=same_document_causal, seq_lengths=(s, s))


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, n, n) tile flags as a block mask stores them: per query tile, how many key tiles, and
    their indices first."""
    count = tiles.sum(-1, dtype=torch.int32)
    indices = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return count[:, None], indices[:, None]  # with the head dimension, shared by every head


@functools.cache
def _compiled_flex_attention():
    # Eager FlexAttention builds the (s x s) scores; compiled, it is a fused block-sparse kernel.
    return torch.compile(flex_attention, dynamic=False)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | DocumentMask | None,
           scale: float | None = None) -> torch.Tensor:
    """Grouped-query attention of q (b, h, s, hd) over k, v (b, kv, s', hd); returns (b, h, s, hd).
    `scale`: of the scores, 1/sqrt(hd) by default."""
    gqa = k.shape[1] != q.shape[1]
    if isinstance(mask, BlockMask):
        run = _compiled_flex_attention() if q.device.type == "cuda" else flex_attention
        return run(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa)
    if isinstance(mask, DocumentSpans):
        rows = [torch.cat([F.scaled_dot_product_attention(q[i:i + 1, :, start:end], k[i:i + 1, :, start:end],
                                                          v[i:i + 1, :, start:end], is_causal=True, scale=scale,
                                                          enable_gqa=gqa)
                           for start, end in spans], dim=2)
                for i, spans in enumerate(mask.spans)]
        return torch.cat(rows, dim=0)
    if mask is not None and gqa:
        # SDPA's GQA path exists only in its flash kernel, which takes no mask: with a mask (a KV
        # cache) share each kv head explicitly, so a memory-efficient kernel runs.
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        gqa = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                          enable_gqa=gqa)
