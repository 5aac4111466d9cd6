import pytest
import torch

from conftest import TINY, random_model
from tunelite.errors import ConfigError
from tunelite.models.decoder import LoRAArgs, lora_decoder
from tunelite.modules.lora import LoRALinear, adapter_state_dict, merge_lora_state_dict, set_trainable_params


def lora_twin(base: torch.nn.Module, **kw) -> torch.nn.Module:
    args = LoRAArgs(**{"lora_attn_modules": ("q_proj", "v_proj", "output_proj"), "apply_lora_to_mlp": True, **kw})
    model = lora_decoder(TINY, args)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(k.endswith(("lora_a", "lora_b")) for k in missing)
    return model


def test_fresh_lora_adapter_leaves_logits_unchanged():
    base = random_model()
    lora = lora_twin(base)
    tokens = torch.randint(0, TINY.vocab_size, (2, 17))
    assert torch.equal(base(tokens), lora(tokens))


def test_only_adapter_weights_require_grad():
    lora = lora_twin(random_model())
    set_trainable_params(lora)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_a", "lora_b")) for n in trainable)
    assert trainable == set(adapter_state_dict(lora))
    # q, v, output_proj and the three MLP projections, in each of the two layers, each with A and B.
    assert len(trainable) == 2 * 6 * 2


def test_merged_adapter_gives_the_unmerged_logits():
    base = random_model()
    lora = lora_twin(base, apply_lora_to_output=True, lora_rank=4, lora_alpha=8.0)
    with torch.no_grad():
        for m in lora.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(0, 0.1)
    merged_state = merge_lora_state_dict(lora.state_dict(), rank=4, alpha=8.0)
    merged = random_model(seed=1)
    merged.load_state_dict(merged_state)
    tokens = torch.randint(0, TINY.vocab_size, (2, 17))
    assert not torch.allclose(base(tokens), lora(tokens), atol=1e-3)
    torch.testing.assert_close(merged(tokens), lora(tokens), atol=1e-5, rtol=1e-5)


def test_lora_on_unknown_module_names_the_choices():
    with pytest.raises(ConfigError, match="lora_attn_modules.*o_proj"):
        lora_decoder(TINY, LoRAArgs(lora_attn_modules=("q_proj", "o_proj")))


def test_activation_checkpointing_gives_the_same_gradients():
    from tunelite.models.decoder import set_activation_checkpointing

    torch.manual_seed(0)
    tokens = torch.randint(0, TINY.vocab_size, (2, 9))
    grads = []
    for every in (0, 1):
        model = random_model()
        set_activation_checkpointing(model, every)
        model(tokens).float().pow(2).mean().backward()
        grads.append(model.layers[0].attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
