"""An FP8 frozen base for LoRA: the quantization, the linear's forward and backward, loading, merging,
and the refusal on GPUs without FP8 (the speed is measured on a GPU: docs/benchmarks.md)."""

import pytest
import torch
from conftest import TINY, write_hf_checkpoint

from tunelite.checkpointing.hf import HFCheckpointer
from tunelite.checkpointing import loading
from tunelite.errors import ConfigError
from tunelite.models.builders import lora_builder
from tunelite.modules import fp8
from tunelite.modules.lora import LoRALinear, merged_state_dict, set_trainable_params
from tunelite.modules.loss import LinearCrossEntropyLoss


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_rows_round_trip_within_e4m3_precision():
    x = torch.randn(64, 256) * torch.logspace(-3, 3, 64)[:, None]  # rows of very different magnitude
    q, scale = fp8.quantize_rows(x)
    assert q.dtype == fp8.FP8 and scale.shape == (64, 1)
    assert q.float().abs().amax(dim=1).max() <= fp8.FP8_MAX
    # e4m3 keeps 3 mantissa bits: each row comes back within a few percent of itself, whatever its scale.
    back = q.float() * scale
    assert max(relative_error(back[i], x[i]) for i in range(64)) < 0.05


def test_the_linear_and_its_input_gradient_follow_the_full_precision_ones():
    torch.manual_seed(0)
    weight = torch.randn(96, 128) / 128**0.5
    pieces = fp8.quantize_weight(weight)
    x = torch.randn(3, 10, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out = fp8.fp8_linear(x, *(pieces[k] for k in ("weight", fp8.SCALE, fp8.TRANSPOSED, fp8.TRANSPOSED_SCALE)))
    ref = x_ref @ weight.t()
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    assert out.shape == ref.shape and relative_error(out, ref) < 0.06
    assert relative_error(x.grad, x_ref.grad) < 0.06
    assert torch.equal(fp8.dequantize_weight(pieces["weight"], pieces[fp8.SCALE], torch.float32),
                       pieces["weight"].float() * pieces[fp8.SCALE][:, None])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp8") / "base"
    write_hf_checkpoint(folder)
    return folder


def tiny_lora(base, base_dtype: str | None) -> torch.nn.Module:
    build = lora_builder(TINY, "lora_tiny")
    with torch.device("meta"):
        model = build(["q_proj", "v_proj"], apply_lora_to_mlp=True, lora_rank=4, base_dtype=base_dtype)
    loading.load_checkpoint_into(model, HFCheckpointer(str(base)), torch.device("cpu"), torch.float32)
    set_trainable_params(model)
    return model


def test_an_fp8_base_loads_trains_its_adapters_and_merges(base):
    reference, model = tiny_lora(base, None), tiny_lora(base, "fp8")
    frozen = [m for m in model.modules() if getattr(m, "fp8_base", False)]
    assert len(frozen) == 7 * TINY.num_layers and all(m.weight.dtype == fp8.FP8 for m in frozen)
    assert model.output.weight.dtype == torch.float32  # the output projection stays unquantized
    tokens = torch.randint(0, TINY.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    losses = []
    for m in (reference, model):
        loss = LinearCrossEntropyLoss(2)(m.hidden_states(tokens), tokens.roll(-1, dims=1), m.output)
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=0.01)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(m.weight.grad is None for m in frozen)
    merged = merged_state_dict(model)
    assert not any(key.endswith(("weight_scale", "weight_t", "weight_t_scale")) for key in merged)
    assert merged["layers.0.mlp.w1.weight"].dtype == torch.float32
    assert relative_error(merged["layers.0.mlp.w1.weight"], reference.state_dict()["layers.0.mlp.w1.weight"]) < 0.05


def test_a_gpu_without_fp8_is_refused_before_any_weight_is_read(base, monkeypatch):
    monkeypatch.setattr(fp8, "fp8_supported", lambda device: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    build = lora_builder(TINY, "lora_tiny")
    with torch.device("meta"):
        model = build(["q_proj"], base_dtype="fp8")
    with pytest.raises(ConfigError, match="base_dtype: fp8 needs a GPU with FP8 tensor cores .* A100"):
        loading.load_checkpoint_into(model, HFCheckpointer(str(base)), torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("quantize_base, base_dtype", [(False, "fp16"), (True, "fp8")])
def test_base_dtype_takes_only_what_the_builder_supports(quantize_base, base_dtype):
    with pytest.raises(ConfigError, match=f"model.base_dtype: '{base_dtype}' is not one of"):
        lora_builder(TINY, "x", quantize_base=quantize_base)(["q_proj"], base_dtype=base_dtype)


def test_fp8_capability_is_ada_or_later(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not fp8.fp8_supported(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8.fp8_supported(torch.device("cuda")) and fp8.fp8_supported(torch.device("cpu"))


def test_lora_linear_with_an_fp8_base_built_directly_runs():
    layer = LoRALinear(64, 32, rank=4, alpha=8, fp8_base=True)
    assert layer.weight.dtype == fp8.FP8 and layer.weight_t.shape == (64, 32)
    assert layer(torch.randn(5, 64)).shape == (5, 32)
