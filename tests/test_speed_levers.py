"""Each speed lever leaves the numbers as they were: same loss, same gradients (fp32, tiny model)."""

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, random_model
from tunelite.models.llama import LoRAArgs, RMSNorm, lora_llama
from tunelite.modules.loss import IGNORE_INDEX, LinearCrossEntropyLoss
from tunelite.modules.lora import LoRALinear, set_trainable_params
from tunelite.modules.nf4 import dequantize_nf4, frozen_linear, linear_nf4, quantize_nf4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_nf4_dequantization_equals_torchao(dtype):
    weight = quantize_nf4(torch.randn(512, 256, dtype=dtype))
    assert torch.equal(dequantize_nf4(weight), weight.get_original_weight())
    x = torch.randn(3, 256, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, ref = frozen_linear(x, weight), linear_nf4(x_ref, weight)
    out.sum().backward()
    ref.sum().backward()
    assert torch.equal(out, ref) and torch.equal(x.grad, x_ref.grad)


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
    model = lora_llama(TINY, LoRAArgs(lora_attn_modules=("q_proj", "v_proj", "output_proj"), apply_lora_to_mlp=True))
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
