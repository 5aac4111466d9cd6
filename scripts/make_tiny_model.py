"""Writes the embedded demo model, tunelite/assets/tiny/model/, a randomly initialised tiny Llama 3.1.

The demo needs a base checkpoint that ships with the package (no downloads); its weights are
random with Hugging Face's initialisation (normal, std 0.02), saved in HF layout so the demo
exercises the same loading path as a real checkpoint.

    python scripts/make_tiny_model.py
"""

import json
from pathlib import Path

import torch

from tunelite.checkpointing.hf import hf_config_from_model_args, save_hf_state_dict
from tunelite.models.llama3_1 import LLAMA3_1_TINY, llama3_1_tiny

OUT = Path(__file__).resolve().parent.parent / "tunelite" / "assets" / "tiny" / "model"


def main() -> None:
    torch.manual_seed(0)
    model = llama3_1_tiny()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.normal_(0.0, 0.02)
    save_hf_state_dict(model.state_dict(), OUT, source_dir=None, dtype=torch.float32)
    config = hf_config_from_model_args(LLAMA3_1_TINY, torch.float32)
    config.update(bos_token_id=512, eos_token_id=[513, 521])  # <|begin_of_text|>, <|end_of_text|>, <|eot_id|>
    (OUT / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
