"""What a Hugging Face model folder's config.json says, as our `ModelArgs`, for each `model_type`
tunelite builds; and back, for the folders tests and scripts write. `from_checkpoint` builds the
model a folder describes, so a user points at a folder and picks nothing else.

Both spellings of RoPE settings are read: `rope_theta` / `rope_scaling` as published on the Hub,
and `rope_parameters` as transformers 5 saves them. A setting tunelite does not implement (a
YaRN window, Qwen's sliding layers, biases Llama never uses) is refused by name, never ignored.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from tunelite.errors import CheckpointError, ConfigError
from tunelite.files import read_json
from tunelite.models.builders import lora_args
from tunelite.models.decoder import LongRopeScaling, ModelArgs, RopeScaling, TransformerDecoder, decoder, lora_decoder


def read_hf_config(checkpoint_dir: Path) -> dict:
    """A model folder's config.json; a missing or unreadable file is named with the fix."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found: checkpoint_dir must be a Hugging Face model folder (config.json and "
            "*.safetensors), e.g. what `huggingface-cli download meta-llama/Llama-3.1-8B-Instruct` writes"
        )
    config = read_json(path, "model config", CheckpointError)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object (a Hugging Face model config); "
                              "re-download the checkpoint")
    return config


def _field(hf: dict, key: str, source: str) -> Any:
    if key not in hf:
        raise CheckpointError(f"{source}: `{key}` is missing; it is needed to build the model (re-download the folder)")
    return hf[key]


def _refuse_unless(hf: dict, source: str, **supported: Any) -> None:
    """Names a setting whose value this family's code here does not implement."""
    for key, value in supported.items():
        if hf.get(key, value) not in (value, None):
            raise CheckpointError(f"{source}: {key}={hf[key]!r} is not supported for model_type "
                                  f"{hf.get('model_type')!r} (tunelite implements {key}={value!r})")


def _rope(hf: dict) -> tuple[float, dict | None]:
    """(base, scaling dict or None), from the Hub's or transformers 5's spelling."""
    params = hf.get("rope_parameters") or {}
    base = hf.get("rope_theta") or params.get("rope_theta") or 10_000.0
    scaling = hf.get("rope_scaling") or None
    if scaling is None and params.get("rope_type", params.get("type", "default")) != "default":
        scaling = params
    return float(base), scaling


def _rope_type(scaling: dict) -> str:
    return scaling.get("rope_type", scaling.get("type", "default"))


def _unsupported_rope(scaling: dict, source: str, supported: str) -> CheckpointError:
    return CheckpointError(f"{source}: rope scaling {_rope_type(scaling)!r} is not supported for this model_type "
                           f"({supported}); remove rope_scaling to train at the pre-training window")


def _sizes(hf: dict, source: str, norm_eps: float, tie: bool) -> dict[str, Any]:
    """The fields every RoPE family spells alike; `norm_eps` and `tie` are its defaults for the
    keys a config may leave out."""
    heads = _field(hf, "num_attention_heads", source)
    base, _ = _rope(hf)
    return dict(
        vocab_size=_field(hf, "vocab_size", source),
        num_layers=_field(hf, "num_hidden_layers", source),
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        embed_dim=_field(hf, "hidden_size", source),
        intermediate_dim=_field(hf, "intermediate_size", source),
        max_seq_len=hf.get("max_position_embeddings", 4096),
        norm_eps=hf.get("rms_norm_eps", norm_eps),
        rope_base=base,
        tie_word_embeddings=hf.get("tie_word_embeddings", tie),
        head_dim=hf.get("head_dim"),
        model_type=hf["model_type"],
    )


def _sizes_to_hf(args: ModelArgs, architecture: str) -> dict[str, Any]:
    return {
        "architectures": [architecture],
        "model_type": args.model_type,
        "vocab_size": args.vocab_size,
        "hidden_size": args.embed_dim,
        "intermediate_size": args.intermediate_dim,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_heads,
        "num_key_value_heads": args.num_kv_heads,
        "head_dim": args.resolved_head_dim,
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_base,
        "tie_word_embeddings": args.tie_word_embeddings,
    }


def _no_sliding_layers(hf: dict, source: str) -> None:
    if hf.get("use_sliding_window"):
        raise CheckpointError(f"{source}: use_sliding_window=true (sliding attention from layer "
                              f"{hf.get('max_window_layers')} on) is not supported; the released Qwen models "
                              "set it false")


def _read_llama(hf: dict, source: str) -> ModelArgs:
    _refuse_unless(hf, source, attention_bias=False, mlp_bias=False)
    _, scaling = _rope(hf)
    rope = None
    if scaling is not None:
        if _rope_type(scaling) != "llama3":
            raise _unsupported_rope(scaling, source, "Llama 3's 'llama3' scaling")
        rope = RopeScaling(factor=scaling["factor"], low_freq_factor=scaling["low_freq_factor"],
                           high_freq_factor=scaling["high_freq_factor"],
                           original_max_position_embeddings=scaling["original_max_position_embeddings"])
    return ModelArgs(**_sizes(hf, source, 1e-5, False), rope_scaling=rope)


def _write_llama(args: ModelArgs) -> dict[str, Any]:
    assert args.rope_scaling is None or isinstance(args.rope_scaling, RopeScaling)
    config = _sizes_to_hf(args, "LlamaForCausalLM") | {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
    if args.rope_scaling is not None:
        config["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(args.rope_scaling)}
    return config


def _plain_rope(hf: dict, source: str) -> None:
    _, scaling = _rope(hf)
    if scaling is not None:
        raise _unsupported_rope(scaling, source, "plain RoPE")


def _read_mistral(hf: dict, source: str) -> ModelArgs:
    _plain_rope(hf, source)
    return ModelArgs(**_sizes(hf, source, 1e-6, False), sliding_window=hf.get("sliding_window"))


def _write_mistral(args: ModelArgs) -> dict[str, Any]:
    return _sizes_to_hf(args, "MistralForCausalLM") | {"hidden_act": "silu", "sliding_window": args.sliding_window}


def _read_qwen2(hf: dict, source: str) -> ModelArgs:
    _plain_rope(hf, source)
    _no_sliding_layers(hf, source)
    return ModelArgs(**_sizes(hf, source, 1e-6, False), qkv_bias=True)


def _write_qwen2(args: ModelArgs) -> dict[str, Any]:
    return _sizes_to_hf(args, "Qwen2ForCausalLM") | {"hidden_act": "silu", "use_sliding_window": False}


def _read_qwen3(hf: dict, source: str) -> ModelArgs:
    _plain_rope(hf, source)
    _no_sliding_layers(hf, source)
    _refuse_unless(hf, source, attention_bias=False)
    return ModelArgs(**_sizes(hf, source, 1e-6, False), qk_norm=True)


def _write_qwen3(args: ModelArgs) -> dict[str, Any]:
    return _sizes_to_hf(args, "Qwen3ForCausalLM") | {"hidden_act": "silu", "use_sliding_window": False,
                                                     "attention_bias": False}


def _read_phi3(hf: dict, source: str) -> ModelArgs:
    _, scaling = _rope(hf)
    sizes = _sizes(hf, source, 1e-5, False)
    rope = None
    if scaling is not None:
        if _rope_type(scaling) not in ("longrope", "su"):
            raise _unsupported_rope(scaling, source, "Phi's 'longrope'")
        original = hf.get("original_max_position_embeddings") or scaling["original_max_position_embeddings"]
        stretch = scaling.get("factor") or sizes["max_seq_len"] / original
        attention_factor = (scaling.get("attention_factor")
                            or LongRopeScaling.default_attention_factor(stretch, original))
        rope = LongRopeScaling(tuple(scaling["short_factor"]), tuple(scaling["long_factor"]), original,
                               attention_factor)
    partial = hf.get("partial_rotary_factor") or (hf.get("rope_parameters") or {}).get("partial_rotary_factor") or 1.0
    return ModelArgs(**sizes, rope_scaling=rope, fused_qkv=True, fused_gate_up=True, partial_rotary_factor=partial,
                     sliding_window=hf.get("sliding_window"))


def _write_phi3(args: ModelArgs) -> dict[str, Any]:
    config = _sizes_to_hf(args, "Phi3ForCausalLM") | {
        "hidden_act": "silu", "sliding_window": args.sliding_window,
        "partial_rotary_factor": args.partial_rotary_factor, "original_max_position_embeddings": args.max_seq_len,
        "pad_token_id": None,  # Phi3Config's default, 32000, is outside a small vocabulary
    }
    if isinstance(args.rope_scaling, LongRopeScaling):
        config["original_max_position_embeddings"] = args.rope_scaling.original_max_position_embeddings
        config["rope_scaling"] = {"type": "longrope", "short_factor": list(args.rope_scaling.short_factor),
                                  "long_factor": list(args.rope_scaling.long_factor),
                                  "attention_factor": args.rope_scaling.attention_factor}
    return config


def _sliding_window_pattern(hf: dict, source: str, default: int) -> int:
    """The p of `ModelArgs.sliding_window_pattern` that gives a config's `layer_types`."""
    types = hf.get("layer_types")
    if not types:
        return default
    for pattern in range(1, len(types) + 1):
        expected = ["sliding_attention" if pattern == 1 or (i + 1) % pattern else "full_attention"
                    for i in range(len(types))]
        if types == expected:
            return pattern
    raise CheckpointError(f"{source}: layer_types {types} do not repeat every p-th layer global, "
                          "the only arrangement tunelite implements")


def _read_gemma2(hf: dict, source: str) -> ModelArgs:
    _plain_rope(hf, source)
    _refuse_unless(hf, source, attention_bias=False, use_bidirectional_attention=False)
    activation = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if activation != "gelu_pytorch_tanh":
        raise CheckpointError(f"{source}: hidden_activation {activation!r} is not supported (gelu_pytorch_tanh is)")
    return ModelArgs(
        **_sizes(hf, source, 1e-6, True), norm="rms_offset", activation="gelu_tanh", post_norms=True,
        embed_scale=True, query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
        sliding_window=hf.get("sliding_window"), sliding_window_pattern=_sliding_window_pattern(hf, source, 2),
        attn_softcap=hf.get("attn_logit_softcapping"), final_softcap=hf.get("final_logit_softcapping"),
    )


def _write_gemma2(args: ModelArgs) -> dict[str, Any]:
    return _sizes_to_hf(args, "Gemma2ForCausalLM") | {
        "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": args.query_pre_attn_scalar,
        "sliding_window": args.sliding_window, "attn_logit_softcapping": args.attn_softcap,
        "final_logit_softcapping": args.final_softcap, "attention_bias": False,
        "layer_types": ["sliding_attention" if args.window(i) else "full_attention" for i in range(args.num_layers)],
    }


def _read_gpt2(hf: dict, source: str) -> ModelArgs:
    _refuse_unless(hf, source, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                   reorder_and_upcast_attn=False, add_cross_attention=False)
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"{source}: activation_function {activation!r} is not supported (gelu_new is)")
    heads, embed_dim = _field(hf, "n_head", source), _field(hf, "n_embd", source)
    return ModelArgs(
        vocab_size=_field(hf, "vocab_size", source), num_layers=_field(hf, "n_layer", source), num_heads=heads,
        num_kv_heads=heads, embed_dim=embed_dim, intermediate_dim=hf.get("n_inner") or 4 * embed_dim,
        max_seq_len=_field(hf, "n_positions", source), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_word_embeddings=hf.get("tie_word_embeddings", True), model_type="gpt2", norm="layer", qkv_bias=True,
        proj_bias=True, fused_qkv=True, gated_mlp=False, activation="gelu_tanh", learned_positions=True,
    )


def _write_gpt2(args: ModelArgs) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": args.vocab_size,
        "n_embd": args.embed_dim, "n_layer": args.num_layers, "n_head": args.num_heads,
        "n_inner": args.intermediate_dim, "n_positions": args.max_seq_len, "layer_norm_epsilon": args.norm_eps,
        "activation_function": "gelu_new", "tie_word_embeddings": args.tie_word_embeddings,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
    }


@dataclass(frozen=True)
class _Family:
    read: Callable[[dict, str], ModelArgs]
    write: Callable[[ModelArgs], dict[str, Any]]


_FAMILIES = {
    "gemma2": _Family(_read_gemma2, _write_gemma2),
    "gpt2": _Family(_read_gpt2, _write_gpt2),
    "llama": _Family(_read_llama, _write_llama),
    "mistral": _Family(_read_mistral, _write_mistral),
    "phi3": _Family(_read_phi3, _write_phi3),
    "qwen2": _Family(_read_qwen2, _write_qwen2),
    "qwen3": _Family(_read_qwen3, _write_qwen3),
}
SUPPORTED_MODEL_TYPES = tuple(_FAMILIES)


def model_type_of(hf: dict, source: str = "config.json") -> str:
    """A config.json's `model_type`, refused with the list of supported ones if tunelite has no
    code for it (`source` names the file in messages)."""
    model_type = hf.get("model_type")
    if model_type not in _FAMILIES:
        raise CheckpointError(f"{source}: model_type {model_type!r} is not supported; tunelite builds "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    return model_type


def model_args_from_hf_config(hf: dict, source: str = "config.json") -> ModelArgs:
    """Our sizes and traits for an HF `config.json` of a supported `model_type`."""
    return _FAMILIES[model_type_of(hf, source)].read(hf, source)


def hf_config_from_model_args(args: ModelArgs, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The `config.json` transformers reads for a model of these sizes and traits."""
    return _FAMILIES[args.model_type].write(args) | {"torch_dtype": str(dtype).removeprefix("torch.")}


def from_checkpoint(
    checkpoint_dir: str,
    lora_attn_modules: list[str] | None = None,
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    quantize_base: bool = False,
    base_dtype: str | None = None,
) -> TransformerDecoder:
    """The model a Hugging Face folder's config.json describes, whatever its supported family and
    size; with adapters where the LoRA keys (torchtune's names) put them, and the frozen base in NF4
    with `quantize_base` (QLoRA) or in FP8 with `base_dtype: fp8`. Without adapters it is the plain
    model, for full fine-tuning."""
    args = model_args_from_hf_config(read_hf_config(Path(checkpoint_dir)), str(Path(checkpoint_dir) / "config.json"))
    if not (lora_attn_modules or apply_lora_to_mlp or apply_lora_to_output):
        if quantize_base or base_dtype:
            raise ConfigError("model.quantize_base / model.base_dtype: a quantized base needs adapters to train; set "
                              "lora_attn_modules or apply_lora_to_mlp, or leave the base as it is")
        return decoder(args)
    return lora_decoder(args, lora_args(list(lora_attn_modules or ()), apply_lora_to_mlp, apply_lora_to_output,
                                        lora_rank, lora_alpha, lora_dropout, quantize_base, base_dtype))
