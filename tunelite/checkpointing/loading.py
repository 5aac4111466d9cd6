"""Builds a model on the meta device and fills it from a checkpoint, as gpt-fast and torchtitan do.

No random initialisation of weights that are about to be overwritten, and no second copy of
the model in memory: checkpoint tensors are assigned into the module, and only what the
checkpoint lacks (adapters, rotary frequencies) is created and initialised afterwards.
"""

from pathlib import Path

import torch
from torch import nn

from tunelite.checkpointing.atomic import verify_written_files
from tunelite.checkpointing.hf import HFCheckpointer, load_hf_state_dict
from tunelite.errors import CheckpointError, ConfigError
from tunelite.models.llama import TransformerDecoder
from tunelite.modules.lora import is_adapter_key
from tunelite.modules import fp8
from tunelite.modules.nf4 import quantize_nf4


def materialize_meta_tensors(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Gives every tensor still on the meta device real storage, then lets its module initialise it."""
    for module in model.modules():
        meta_params = [n for n, p in module.named_parameters(recurse=False) if p.is_meta]
        meta_buffers = [n for n, b in module.named_buffers(recurse=False) if b is not None and b.is_meta]
        for name in meta_params:
            old = getattr(module, name)
            setattr(module, name, nn.Parameter(torch.empty_like(old, device=device, dtype=dtype), old.requires_grad))
        for name in meta_buffers:
            module._buffers[name] = torch.empty_like(module._buffers[name], device=device)
        if meta_params or meta_buffers:
            module.reset_parameters()


def load_checkpoint_into(
    model: TransformerDecoder, checkpointer: HFCheckpointer, device: torch.device, dtype: torch.dtype
) -> TransformerDecoder:
    """Fills a meta-device model with the checkpoint's weights and initialises what it lacks.

    Weights of QLoRA layers are quantized to NF4 as each one reaches the device, and those of an
    FP8 base to FP8 (with their scales and transposed copy), so the model in bf16 never exists whole
    in GPU memory. A folder tunelite wrote (a merged model) is checked against its checkpoint's
    manifest first."""
    verify_written_files(Path(checkpointer.checkpoint_dir))
    quantized, in_fp8 = nf4_weight_names(model), fp8_weight_names(model)
    if in_fp8 and not fp8.fp8_supported(device):
        name = torch.cuda.get_device_name(device)
        raise ConfigError(f"model.base_dtype: fp8 needs a GPU with FP8 tensor cores (compute capability 8.9 or "
                          f"later: Ada, Hopper, Blackwell); {name} has none. Use base_dtype: bf16, or a qlora_ model "
                          "for less memory")
    state = {}
    for key, value in load_fitting(model, checkpointer).items():
        value = value.to(device=device, dtype=dtype)
        if key in in_fp8:
            pieces = fp8.quantize_weight(value)
            state.update({key.removesuffix("weight") + suffix: piece for suffix, piece in pieces.items()})
        else:
            state[key] = quantize_nf4(value) if key in quantized else value
    assign_checkpoint(model, state, checkpointer.checkpoint_dir, device, dtype)
    return model


def load_fitting(model: nn.Module, checkpointer: HFCheckpointer) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (memory-mapped, not yet read), once each is known to have the
    shape of the model's tensor of that name: weights that disagree with their own config.json
    are named here, not in a size mismatch from inside torch."""
    state = checkpointer.load(model.args)
    expected = model.state_dict()
    wrong = [f"{key} is {tuple(value.shape)}, the model's {tuple(expected[key].shape)}"
             for key, value in state.items() if key in expected and value.shape != expected[key].shape]
    if wrong:
        raise CheckpointError(
            f"{checkpointer.checkpoint_dir}: weights do not fit the model its config.json describes: "
            f"{'; '.join(wrong[:3])}{'...' if len(wrong) > 3 else ''}; the weight files are from another model "
            "or damaged: download the checkpoint again"
        )
    return state


def assign_checkpoint(
    model: nn.Module, state: dict[str, torch.Tensor], checkpoint_dir: str, device: torch.device, dtype: torch.dtype
) -> None:
    """Assigns checkpoint tensors (whole, or this rank's shards) into a meta-device model, names any
    that do not fit it, and initialises what the checkpoint lacks."""
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not is_adapter_key(k)]
    if missing or unexpected:
        raise CheckpointError(
            f"{checkpoint_dir}: weights do not fit the model: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
        )
    materialize_meta_tensors(model, device, dtype)


def nf4_weight_names(model: nn.Module) -> set[str]:
    """The weights a QLoRA model keeps in NF4 (quantized as they load), by state-dict name."""
    return {f"{name}.weight" for name, m in model.named_modules() if getattr(m, "quantize_base", False)}


def fp8_weight_names(model: nn.Module) -> set[str]:
    """The base weights a model keeps in FP8 (quantized as they load), by state-dict name."""
    return {f"{name}.weight" for name, m in model.named_modules() if getattr(m, "fp8_base", False)}


def restore_weights(model: nn.Module, folder: Path) -> None:
    """Copies the weights of an HF-layout folder written by a full fine-tune back into the model,
    once they match its checkpoint's manifest."""
    verify_written_files(folder)
    state = load_hf_state_dict(folder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{folder}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
