"""Each speed lever leaves the numbers as they were: same loss, same gradients (fp32, tiny model)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, random_model
from tunelite.models.decoder import LoRAArgs, RMSNorm, lora_decoder, set_activation_checkpointing
from tunelite.modules.loss import IGNORE_INDEX, LinearCrossEntropyLoss
from tunelite.modules.lora import LoRALinear, set_trainable_params
from tunelite.modules import nf4
from tunelite.modules.nf4 import dequantize_nf4, frozen_linear, quantize_nf4
from tunelite.training.memory_estimate import saved_tensors_per_token

try:
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4
except ImportError:  # torchao < 0.18
    from torchao.dtypes.nf4tensor import linear_nf4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_nf4_dequantization_equals_torchao(dtype):
    weight = quantize_nf4(torch.randn(512, 256, dtype=dtype))
    assert torch.equal(dequantize_nf4(weight), weight.get_original_weight())
    x = torch.randn(3, 256, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    for keep_dequantized in (False, True):
        x.grad = x_ref.grad = None
        out, ref = frozen_linear(x, weight, keep_dequantized), linear_nf4(x_ref, weight)
        out.sum().backward()
        ref.sum().backward()
        assert torch.equal(out, ref) and torch.equal(x.grad, x_ref.grad)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_compiled_nf4_linear_saves_the_4_bit_pieces_for_backward_as_eager_does(backend):
    # Compiled, the backward's dequantization must not be merged into the forward's: that would
    # keep every kept layer's weights in bf16 until backward (what the memory estimate does not count).
    weight = quantize_nf4(torch.randn(512, 256, dtype=torch.bfloat16))
    x = torch.randn(64, 256, dtype=torch.bfloat16, requires_grad=True)

    def saved_by(fn) -> list[tuple[tuple[int, ...], torch.dtype]]:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t,
                                                      lambda t: t):
            fn(x, weight).backward()
        return sorted(saved, key=str)

    def step(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return frozen_linear(x, weight).sum()

    torch._dynamo.reset()
    compiled = saved_by(torch.compile(step, backend=backend))
    assert ((512, 256), torch.bfloat16) not in compiled
    assert compiled == saved_by(step)


def qlora_step(monkeypatch, checkpointing: bool, keep: bool, compiled: bool = False) -> tuple[torch.Tensor, dict, int]:
    """Loss, adapter gradients and the number of NF4 dequantizations of one step of the tiny QLoRA model."""
    torch.manual_seed(0)
    model = lora_decoder(TINY, LoRAArgs(("q_proj", "v_proj"), apply_lora_to_mlp=True, quantize_base=True))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(0, 0.05)
    set_trainable_params(model)
    set_activation_checkpointing(model, 1 if checkpointing else 0)
    if not keep:
        for layer in model.layers:
            nf4.keep_dequantized_weights(layer, False)
    if compiled:
        for layer in model.layers:
            layer.compile()
    calls = []
    real = nf4._dequantize_reference
    monkeypatch.setattr(nf4, "_dequantize_reference", lambda *a: calls.append(1) or real(*a))
    tokens = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    loss = LinearCrossEntropyLoss(2)(model.hidden_states(tokens), tokens.roll(-1, dims=1), model.output)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, len(calls)


def test_a_recomputed_qlora_layer_hands_its_dequantized_weights_to_backward(monkeypatch):
    """Three dequantizations of each weight a step (forward, recomputation, backward) become two,
    with the same loss and gradients."""
    loss, grads, kept = qlora_step(monkeypatch, checkpointing=True, keep=True)
    ref_loss, ref_grads, plain = qlora_step(monkeypatch, checkpointing=True, keep=False)
    weights = 7 * TINY.num_layers
    # Layer 0's q, k and v have no backward at all: their input, the frozen embedding's output, needs no gradient.
    assert (plain, kept) == (3 * weights - 3, 2 * weights)
    assert torch.equal(loss, ref_loss)
    for name, grad in ref_grads.items():
        assert torch.equal(grads[name], grad), name
    compiled_loss, compiled_grads, _ = qlora_step(monkeypatch, checkpointing=True, keep=True, compiled=True)
    assert abs(compiled_loss.item() - loss.item()) <= 1e-5
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5)
    _, _, unchecked = qlora_step(monkeypatch, checkpointing=False, keep=True)
    assert unchecked == 2 * weights - 3, "layers that keep their activations must not keep bf16 weights too"


def test_rms_norm_equals_the_fp32_reference_formula():
    norm = RMSNorm(64)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 5, 64)
    assert torch.equal(norm(x), norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)))


def test_chunked_linear_cross_entropy_equals_full_logits():
    model = random_model()
    tokens = torch.randint(0, TINY.vocab_size, (2, 24))
    labels = tokens.roll(-1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    labels[0, :5] = IGNORE_INDEX
    logits = model(tokens).float()
    ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    chunked = LinearCrossEntropyLoss(num_chunks=5)(model.hidden_states(tokens), labels, model.output)
    torch.testing.assert_close(chunked, ref, rtol=1e-6, atol=1e-6)


def loss_and_grads(compiled: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = lora_decoder(TINY, LoRAArgs(lora_attn_modules=("q_proj", "v_proj", "output_proj"), apply_lora_to_mlp=True))
    model.load_state_dict(random_model().state_dict(), strict=False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(0, 0.05)
    set_trainable_params(model)
    loss_fn = LinearCrossEntropyLoss(num_chunks=4)
    if compiled:
        for layer in model.layers:
            layer.compile()
        loss_fn.compile()
    tokens = torch.randint(0, TINY.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    loss = loss_fn(model.hidden_states(tokens), tokens.roll(-1, dims=1), model.output)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_compiled_layers_and_loss_keep_loss_and_gradients():
    eager_loss, eager_grads = loss_and_grads(compiled=False)
    compiled_loss, compiled_grads = loss_and_grads(compiled=True)
    assert abs(compiled_loss.item() - eager_loss.item()) <= 1e-5
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("quantize_base", [False, True], ids=["bf16_base", "nf4_base"])
def test_lora_scaling_b_instead_of_the_output_equals_the_textbook_formula(quantize_base):
    torch.manual_seed(0)
    lora = LoRALinear(256, 128, rank=4, alpha=8, quantize_base=quantize_base)
    torch.nn.init.normal_(lora.lora_b)
    x = torch.randn(2, 7, 256, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out = lora(x)
    ref = frozen_linear(x_ref, lora.weight) + (x_ref @ lora.lora_a.T @ lora.lora_b.T) * lora.scaling
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    fused_grads = torch.autograd.grad(out, (x, lora.lora_a, lora.lora_b), grad)
    ref_grads = torch.autograd.grad(ref, (x_ref, lora.lora_a, lora.lora_b), grad)
    for fused, expected in zip(fused_grads, ref_grads):
        torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)


def test_lora_scaling_b_keeps_the_tiny_models_loss_and_gradients(monkeypatch):
    loss, grads = loss_and_grads(compiled=False)

    def textbook(self: LoRALinear, x: torch.Tensor) -> torch.Tensor:
        return frozen_linear(x, self.weight) + (x @ self.lora_a.T @ self.lora_b.T) * self.scaling

    monkeypatch.setattr(LoRALinear, "forward", textbook)
    ref_loss, ref_grads = loss_and_grads(compiled=False)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5)


# --- the gated MLP keeps gate and up only ---------------------------------------------------------


def plain_mlp(mlp, x: torch.Tensor) -> torch.Tensor:
    """The MLP as autograd would run it unaided: act(gate) * up through F.gelu / F.silu, the down
    projection's adapter through two F.linear."""
    gate, up = mlp.w13(x).chunk(2, -1) if mlp.fused else (mlp.w1(x), mlp.w3(x))
    product = (F.silu(gate) if mlp.activation == "silu" else F.gelu(gate, approximate="tanh")) * up
    w2 = mlp.w2
    if not isinstance(w2, LoRALinear):
        return w2(product)
    return w2.base(product) + F.linear(F.linear(w2.dropout(product), w2.lora_a), w2.lora_b * w2.scaling)


def mlp_of(family: str, lora: bool, fused: bool = False) -> torch.nn.Module:
    args = dataclasses.replace(TINY, activation=family, fused_gate_up=fused)
    torch.manual_seed(0)
    model = lora_decoder(args, LoRAArgs(("q_proj",), apply_lora_to_mlp=True)) if lora else random_model(args)
    mlp = model.layers[0].mlp
    for name, p in mlp.named_parameters():
        if "lora_b" in name:  # nonzero, so the adapters' inputs matter to the output
            torch.nn.init.normal_(p)
        if lora:
            p.requires_grad_("lora" in name)
    return mlp


@pytest.mark.parametrize("activation, lora, fused", [("silu", True, False), ("gelu_tanh", True, False),
                                                     ("silu", False, False), ("silu", True, True)])
def test_the_gated_mlp_gives_autograds_outputs_and_gradients(activation, lora, fused):
    mlp = mlp_of(activation, lora, fused)
    x = torch.randn(2, 5, TINY.embed_dim, requires_grad=True)
    grads = []
    for run in (mlp, lambda x: plain_mlp(mlp, x)):
        mlp.zero_grad()
        x.grad = None
        out = run(x)
        out.backward(torch.ones_like(out))
        grads.append([out, x.grad] + [p.grad for p in mlp.parameters() if p.requires_grad])
    for ours, plain in zip(*grads):
        torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", [None, "aot_eager_decomp_partition"])
@pytest.mark.parametrize("lora, kept", [(True, 2), (False, 3)])
def test_the_gated_mlp_keeps_gate_and_up_and_the_product_only_for_a_trained_down_projection(lora, kept, backend):
    # LoRA: the down projection's adapter recomputes the product; a trained w2 (full fine-tuning)
    # needs it for its weight's gradient. Eager autograd alone would keep act(gate) too. Compiled
    # (the backend runs inductor's partitioner), a layer must keep no more: on an H200 the product
    # kept besides made 30 kept QLoRA layers overrun the 22 GiB budget the estimate planned them in.
    torch._dynamo.reset()
    mlp = mlp_of("silu", lora)
    run = mlp if backend is None else torch.compile(mlp, backend=backend, fullgraph=True)
    x = torch.randn(2, 5, TINY.embed_dim, requires_grad=True)
    storages, weights = set(), {p.untyped_storage().data_ptr() for p in mlp.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.numel() == 10 * TINY.intermediate_dim and t.untyped_storage().data_ptr() not in weights:
            storages.add(t.untyped_storage().data_ptr())  # a (tokens x intermediate) activation
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run(x)
    out.sum().backward()
    assert len(storages) == kept
    # and the memory estimate counts as many
    adapters = {f"mlp.{name}": m for name, m in mlp.named_modules() if isinstance(m, LoRALinear)}
    _, estimated = saved_tensors_per_token(TINY, 4, adapters, trains_base=not lora)
    assert estimated.count(TINY.intermediate_dim * 4) == kept


def test_a_compiled_gated_mlp_traces_whole_and_gives_eagers_gradients():
    mlp = mlp_of("silu", True)
    x = torch.randn(2, 5, TINY.embed_dim, requires_grad=True)
    grads = []
    torch._dynamo.reset()
    for run in (mlp, torch.compile(mlp, backend="aot_eager", fullgraph=True)):
        mlp.zero_grad()
        out = run(x)
        out.sum().backward()
        grads.append([out] + [p.grad for p in mlp.parameters() if p.requires_grad])
    for ours, plain in zip(*grads):
        torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)
