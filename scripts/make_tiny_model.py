"""Writes the embedded demo models: tunelite/assets/tiny/model/ (a tiny Llama 3.1) and
tunelite/assets/tiny/qwen2_5_model/ (a tiny Qwen 2.5), randomly initialised.

The demos need base checkpoints that ship with the package (no downloads); their weights are
random with Hugging Face's initialisation (normal, std 0.02; norms at their neutral value), saved
in HF layout so the demos exercise the same loading path as a real checkpoint. Both use the tiny
tokenizer of tunelite/assets/tiny, whose special tokens set the ids below. The output is the same
on every run.

    python scripts/make_tiny_model.py
"""

import json
from pathlib import Path

import torch

from tunelite.checkpointing.hf import save_hf_state_dict
from tunelite.models.decoder import ModelArgs, decoder
from tunelite.models.hf_config import hf_config_from_model_args
from tunelite.models.llama3_1 import LLAMA3_1_TINY
from tunelite.models.qwen2_5 import QWEN2_5_TINY

ASSETS = Path(__file__).resolve().parent.parent / "tunelite" / "assets" / "tiny"
MODELS = {"model": LLAMA3_1_TINY, "qwen2_5_model": QWEN2_5_TINY}


def write_tiny_model(args: ModelArgs, out: Path) -> None:
    torch.manual_seed(0)
    model = decoder(args)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.normal_(0.0, 0.02)
    save_hf_state_dict(model.state_dict(), out, source_dir=None, dtype=torch.float32, model_type=args.model_type)
    config = hf_config_from_model_args(args, torch.float32)
    config.update(bos_token_id=512, eos_token_id=[513, 521])  # <|begin_of_text|>, <|end_of_text|>, <|eot_id|>
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {out}")


def main() -> None:
    for folder, args in MODELS.items():
        write_tiny_model(args, ASSETS / folder)


if __name__ == "__main__":
    main()
