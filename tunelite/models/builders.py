"""Turns a table of sizes into the builders configs name by `_component_`.

Each family file states its sizes once and gets its builders from here, so families differ by
numbers, never by copied builder code.
"""

from typing import Callable

from tunelite.config.values import check_arguments
from tunelite.errors import ConfigError
from tunelite.models.decoder import LoRAArgs, ModelArgs, TransformerDecoder, decoder, lora_decoder


def base_builder(args: ModelArgs, name: str) -> Callable[[], TransformerDecoder]:
    def build() -> TransformerDecoder:
        return decoder(args)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"{name}: the model at its pre-trained sizes, for full fine-tuning."
    return build


def lora_args(
    lora_attn_modules: list[str], apply_lora_to_mlp: bool, apply_lora_to_output: bool, lora_rank: int,
    lora_alpha: float, lora_dropout: float, quantize_base: bool, base_dtype: str | None,
) -> LoRAArgs:
    """The config's LoRA keys (torchtune's names, and `base_dtype`) as `LoRAArgs`, a frozen base in
    NF4 (`quantize_base`) or FP8 (`base_dtype: fp8`) but not both."""
    if base_dtype not in (None, "fp8") or (base_dtype and quantize_base):
        allowed = "null (the run's dtype)" + ("" if quantize_base else " or fp8 (a GPU with FP8 tensor cores)")
        raise ConfigError(f"model.base_dtype: {base_dtype!r} is not one of {allowed}")
    return LoRAArgs(
        lora_attn_modules=tuple(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        quantize_base=quantize_base,
        fp8_base=base_dtype == "fp8",
    )


def lora_builder(args: ModelArgs, name: str, quantize_base: bool = False) -> Callable[..., TransformerDecoder]:
    """The `lora_*` builder of a size, or with `quantize_base` its `qlora_*` twin (NF4 base weights)."""

    def build(
        lora_attn_modules: list[str],
        apply_lora_to_mlp: bool = False,
        apply_lora_to_output: bool = False,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        base_dtype: str | None = None,
    ) -> TransformerDecoder:
        # A config's values were checked when it was validated; a call from Python is checked here.
        check_arguments(f"tunelite.models.{name}", {"lora_rank": lora_rank, "lora_alpha": lora_alpha,
                                                    "lora_dropout": lora_dropout}, "model")
        return lora_decoder(args, lora_args(lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank,
                                            lora_alpha, lora_dropout, quantize_base, base_dtype))

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"{name}: the model with low-rank adapters on the named projections" + (
        ", its frozen base weights stored in 4-bit NF4 (QLoRA)." if quantize_base else
        "; base_dtype: fp8 keeps the frozen base in FP8, for speed on GPUs with FP8 tensor cores."
    )
    return build


def builders(args: ModelArgs, name: str) -> tuple[Callable[..., TransformerDecoder], ...]:
    """`name`, `lora_<name>` and `qlora_<name>`: a size's three builders, in that order."""
    return base_builder(args, name), lora_builder(args, f"lora_{name}"), lora_builder(args, f"qlora_{name}", True)
