"""The model to generate with, built from what is on disk: a base folder plus a peft adapter
folder, or a merged folder, each described by its own config.json / adapter_config.json."""

from pathlib import Path

import torch
from omegaconf import DictConfig

from tunelite.checkpointing.hf import HFCheckpointer, model_args_from_hf_config, read_hf_config
from tunelite.checkpointing.loading import load_checkpoint_into
from tunelite.checkpointing.peft import load_adapter_into, lora_args_from_adapter_config
from tunelite.config import instantiate
from tunelite.models.decoder import TransformerDecoder, decoder, lora_decoder


def load_generation_model(
    checkpointer: HFCheckpointer, adapter_dir: str | Path | None, device: torch.device, dtype: torch.dtype,
    model_cfg: DictConfig | None = None,
) -> TransformerDecoder:
    """The checkpoint's model in eval mode, with the adapter's weights when `adapter_dir` is given.

    The architecture comes from the checkpoint's config.json and the LoRA layout (rank, alpha,
    target modules) from the adapter's adapter_config.json, so neither is restated in the
    generation config; `model_cfg` overrides both, e.g. to run a `qlora_*` builder in less memory."""
    with torch.device("meta"):
        if model_cfg is not None:
            model = instantiate(model_cfg)
        else:
            folder = Path(checkpointer.checkpoint_dir)
            args = model_args_from_hf_config(read_hf_config(folder), str(folder / "config.json"))
            model = (lora_decoder(args, lora_args_from_adapter_config(Path(adapter_dir), args)) if adapter_dir
                     else decoder(args))
    load_checkpoint_into(model, checkpointer, device, dtype)
    if adapter_dir:
        load_adapter_into(model, Path(adapter_dir))
    return model.eval()
