"""Long samples stay linear in memory: packed documents attend within themselves without a dense
mask, and the MLP and the loss run over the sequence in chunks with the unchunked results."""

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask

from conftest import TINY, random_model
from tunelite.config import asset_path
from tunelite.data.collate import padded_collate
from tunelite.modules.attention import BLOCK, DocumentSpans, attend, document_attention_mask, document_block_mask
from tunelite.modules.loss import IGNORE_INDEX, LinearCrossEntropyLoss, loss_chunks
from tunelite.modules.memory_policy import KEEP, RECOMPUTE, in_sequence_chunks, set_memory_policy
from tunelite.modules.offload import ActivationOffloader
from tunelite.training import memory_policy

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
LENGTHS = (37, 81, 22)  # three samples of one pack, in tokens


def three_samples(seed: int = 0) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    return [{"tokens": torch.randint(1, TINY.vocab_size, (n,), generator=g).tolist(),
             "labels": torch.randint(1, TINY.vocab_size, (n,), generator=g).tolist()} for n in LENGTHS]


def pack(samples: list[dict[str, list[int]]], length: int) -> dict[str, list[int]]:
    """The three samples in one sequence as PackedDataset lays them out: positions restart,
    each sample's first label is -100, padding is document -1."""
    out = {"tokens": [], "labels": [], "positions": [], "document_ids": []}
    for document, sample in enumerate(samples):
        out["tokens"] += sample["tokens"]
        out["labels"] += [IGNORE_INDEX] + sample["labels"][1:]
        out["positions"] += list(range(len(sample["tokens"])))
        out["document_ids"] += [document] * len(sample["tokens"])
    pad = length - len(out["tokens"])
    return {"tokens": out["tokens"] + [0] * pad, "labels": out["labels"] + [IGNORE_INDEX] * pad,
            "positions": out["positions"] + [0] * pad, "document_ids": out["document_ids"] + [-1] * pad}


def sample_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor], documents: torch.Tensor | None = None,
                  mask=None) -> list[torch.Tensor]:
    """Each sample's summed token loss: per document of a pack, or per row unpacked."""
    if mask is not None:  # an attention mask built by the test, in place of the model's own
        hidden = model.hidden_states(batch["tokens"], batch["positions"], mask)
    else:
        hidden = model.hidden_states(batch["tokens"], batch.get("positions"), document_ids=batch.get("document_ids"))
    logits = model.output(hidden).float()
    tokens = F.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=IGNORE_INDEX, reduction="none")
    if documents is None:
        return [row.sum() for row in tokens]
    return [tokens[0][documents[0] == d].sum() for d in range(len(LENGTHS))]


@pytest.mark.parametrize("flex", [False, True], ids=["per-document SDPA", "FlexAttention block mask"])
def test_a_pack_of_three_samples_gives_each_its_loss_alone(flex):
    model = random_model().eval()
    samples = three_samples()
    packed = padded_collate([pack(samples, 160)], pad_id=0)
    mask = document_attention_mask(packed["document_ids"], flex=flex)
    assert isinstance(mask, DocumentSpans) != flex
    with torch.no_grad():  # FlexAttention has no backward on the CPU; the SDPA path's is tested below
        together = sample_losses(model, packed, packed["document_ids"], mask)
        alone = [sample_losses(model, padded_collate([sample], pad_id=0))[0] for sample in samples]
    torch.testing.assert_close(torch.stack(together), torch.stack(alone), rtol=1e-5, atol=1e-5)


def test_a_pack_trains_each_sample_as_alone():
    """Gradients through the packed path (what training on the CPU runs) equal the sum of the
    samples' gradients alone."""
    samples = three_samples(1)

    def grads(batches) -> torch.Tensor:
        model = random_model().train()
        for batch in batches:
            documents = batch.get("document_ids")
            torch.stack(sample_losses(model, batch, documents)).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    packed = grads([padded_collate([pack(samples, 160)], pad_id=0)])
    alone = grads([padded_collate([sample], pad_id=0) for sample in samples])
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("lengths", [(37, 81, 22), (128, 128), (300,), (5, 250, 1, 44)])
def test_the_block_mask_equals_flex_attentions_own_from_a_dense_mask(lengths):
    """Built tile by tile from document ids, with nothing of size s x s, it keeps and skips the
    tiles create_block_mask finds by evaluating every (query, key) pair."""
    s = sum(lengths) + 17
    documents = torch.tensor([sum(([d] * n for d, n in enumerate(lengths)), []) + [-1] * 17,
                              [0] * s])  # and a row holding one long document

    def same_document_causal(b, h, q, kv):
        return (documents[b, q] == documents[b, kv]) & (q >= kv)

    ours = document_block_mask(documents)
    reference = create_block_mask(same_document_causal, 2, None, s, s, device="cpu")
    assert ours.kv_num_blocks.shape == (2, 1, -(-s // BLOCK))
    assert torch.equal(ours.to_dense(), reference.to_dense())
    assert torch.equal(ours.full_kv_num_blocks, reference.full_kv_num_blocks)


def test_unpacked_batches_run_causal_attention_with_no_mask(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append((k.get("attn_mask"), k.get("is_causal"))) or sdpa(*a, **k))
    random_model()(torch.randint(0, TINY.vocab_size, (2, 9)))
    assert calls == [(None, True)] * TINY.num_layers


def test_attend_with_document_spans_matches_sdpa_with_the_dense_block_causal_mask():
    q, k, v = torch.randn(2, 4, 50, 16), torch.randn(2, 2, 50, 16), torch.randn(2, 2, 50, 16)
    documents = torch.tensor([[0] * 20 + [1] * 25 + [-1] * 5, [0] * 50])
    dense = (documents[:, :, None] == documents[:, None, :]) & torch.ones(50, 50, dtype=torch.bool).tril()
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                              attn_mask=dense[:, None])
    torch.testing.assert_close(attend(q, k, v, document_attention_mask(documents)), expected, rtol=1e-5, atol=1e-6)


# --- the MLP and the loss in chunks ---------------------------------------------------------------


def test_the_mlp_in_chunks_equals_the_whole_mlp_and_never_saves_a_whole_intermediate():
    layer = random_model().layers[0]
    x = torch.randn(2, 40, TINY.embed_dim, requires_grad=True)
    biggest = []

    def run(chunk_tokens):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            out = in_sequence_chunks(layer.feed_forward, x, chunk_tokens)
        biggest.append(max(sizes))
        grad, = torch.autograd.grad(out.pow(2).sum(), x)
        return out, grad

    (whole, whole_grad), (chunked, chunked_grad) = run(None), run(16)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(chunked_grad, whole_grad, rtol=0, atol=1e-6)
    # Whole, a (b x s x intermediate) tensor is saved; in chunks, only the chunks' inputs.
    assert biggest == [2 * 40 * TINY.intermediate_dim, 2 * 8 * TINY.embed_dim]


def test_a_model_with_the_mlp_in_chunks_gives_the_whole_mlps_logits_and_gradients():
    tokens = torch.randint(0, TINY.vocab_size, (1, 70))
    results = []
    for chunk_tokens in (None, 16):
        model = random_model().train()
        set_memory_policy(model, (KEEP, RECOMPUTE), chunk_tokens)
        logits = model(tokens)
        logits.float().pow(2).mean().backward()
        results.append((logits, model.layers[1].mlp.w2.weight.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=1e-6)


def test_the_loss_in_chunks_equals_the_loss_whole():
    model = random_model()
    hidden = torch.randn(2, 70, TINY.embed_dim, requires_grad=True)
    labels = torch.randint(0, TINY.vocab_size, (2, 70))
    labels[:, :5] = IGNORE_INDEX
    results = []
    for loss in (LinearCrossEntropyLoss(num_chunks=1, max_chunk_tokens=10**6),
                 LinearCrossEntropyLoss(num_chunks=1, max_chunk_tokens=16)):
        value = loss(hidden, labels, model.output)
        results.append((value, torch.autograd.grad(value, hidden)[0]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=1e-6)


class CountingOutput(torch.nn.Module):
    def __init__(self, output: torch.nn.Module) -> None:
        super().__init__()
        self.output, self.calls = output, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.output(x)


@pytest.mark.parametrize("trains", [False, True])
def test_a_frozen_output_projection_gives_the_losss_gradient_from_one_projection_per_chunk(trains):
    # Frozen (LoRA): each chunk projected once, its gradient taken at once; trained (full
    # fine-tuning): checkpointed, projected again in backward for the weight's gradient.
    model = random_model()
    model.output.weight.requires_grad_(trains)
    output = CountingOutput(model.output)
    hidden = torch.randn(2, 70, TINY.embed_dim, requires_grad=True)
    labels = torch.randint(0, TINY.vocab_size, (2, 70))
    labels[:, :5] = IGNORE_INDEX
    loss = LinearCrossEntropyLoss(num_chunks=1, max_chunk_tokens=16)  # 9 chunks
    value = loss(hidden, labels, output) * 0.5
    value.backward()
    assert output.calls == (18 if trains else 9)
    whole = F.cross_entropy(model.output(hidden).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX) * 0.5
    inputs = [hidden] + ([model.output.weight] if trains else [])
    wanted = torch.autograd.grad(whole, inputs)
    torch.testing.assert_close(value, whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(hidden.grad, wanted[0], rtol=0, atol=1e-6)
    if trains:
        torch.testing.assert_close(model.output.weight.grad, wanted[1], rtol=1e-5, atol=1e-6)


def test_long_batches_take_more_loss_chunks_than_configured():
    assert loss_chunks(2, 2048, num_chunks=8) == 8  # 512 tokens a chunk: as configured
    assert loss_chunks(1, 131072, num_chunks=8) == 128  # 1024 tokens a chunk, not 16k
    assert loss_chunks(1, 131072, num_chunks=8, max_chunk_tokens=4096) == 32


def test_packs_take_memory_linear_in_their_length():
    """No (s x s) tensor anywhere: the collate passes ids, and the block mask holds one flag per
    128 x 128 tile."""
    documents = torch.arange(4096)[None] // 300
    batch = padded_collate([{"tokens": [1] * 4096, "labels": [1] * 4096, "positions": [0] * 4096,
                             "document_ids": documents[0].tolist()}], pad_id=0)
    assert max(t.numel() for t in batch.values()) == 4096
    mask = document_block_mask(documents)
    assert mask.kv_indices.numel() == (4096 // BLOCK) ** 2



# --- the GPU benchmark's code, on the CPU -------------------------------------------------------


def test_the_long_context_benchmark_runs_every_kind_of_row_on_the_cpu(monkeypatch, capsys):
    """benchmarks/long_context_bench.py as the integrator runs it on the H200, on the tiny model:
    the same code path (the offloader really moving tensors, the MLP in chunks), each row printing
    its RESULT line, a failing row not stopping the next."""
    moved = []
    offload, plan = ActivationOffloader._offload, memory_policy.switches_plan
    monkeypatch.setattr(ActivationOffloader, "_offload",
                        lambda self, layer, t: moved.append(t) or offload(self, layer, t))
    monkeypatch.setattr(ActivationOffloader, "_worth_moving", lambda self, t: type(t) is torch.Tensor)  # any size
    monkeypatch.setattr(memory_policy, "switches_plan",  # the MLP in chunks from 16 tokens, not 8192
                        lambda *args, **kw: dataclasses.replace(plan(*args, **kw), mlp_chunk_tokens=16))
    spec = importlib.util.spec_from_file_location("long_context_bench", BENCHMARKS / "long_context_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    run_row = bench.run_row

    def failing_row(trainee, row, *args):
        if row.name == "qlora-budget":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return run_row(trainee, row, *args)

    monkeypatch.setattr(bench, "run_row", failing_row)
    bench.main([str(asset_path("tiny/model")), "--device", "cpu", "--qlora-config", "tiny/qlora_cpu",
                "--lora-config", "tiny/lora_cpu", "--rows",
                "qlora:40,qlora-budget,qlora-packed:300,qlora-compiled:40,lora-plain",
                "--batch-seq", "8", "--cap-gib", "0.001", "--no-compile", "--steps", "1"])
    results = [line for line in capsys.readouterr().out.splitlines() if line.startswith("RESULT")]
    assert [line.split()[1] for line in results] == ["row=qlora:40", "row=qlora-budget", "row=qlora-packed:300",
                                                     "row=qlora-compiled:40", "row=lora-plain"]
    # 0.001 GiB holds no plan by the estimate: the long rows run the leanest one.
    for line in (results[0], results[2], results[3]):
        assert 'plan="recompute+offload every layer, MLP in chunks of 16 tokens"' in line
        assert re.search(r"tokens_per_s=\d+ .*predicted_alloc_gib=\d+\.\d\d .*loss=\d", line)
    assert 'error="OutOfMemoryError: CUDA out of memory. Tried to allocate 1.00 GiB"' in results[1]
    assert "compile=True" in results[3] and "compile=False" in results[0]
    assert 'plan="recompute every layer"' in results[4]
    assert moved
