"""Predicted peak GPU memory of the 8B recipes, to pair with what recipe_bench.py measures.

For LoRA, QLoRA and full fine-tuning (single device) at batch 2 x 2048 and 1 x 8192, runs the
estimate of `tunelite estimate` on the built-in 8B configs pointed at CKPT_DIR (only its
config.json is read, so this runs on any machine) and prints one line each:

    python benchmarks/estimate_check.py CKPT_DIR
    ESTIMATE recipe=lora_finetune_single_device config=llama3_1/8B_lora_single_device batch=2 seq=2048 predicted_gib=17.03

Pair each with `python benchmarks/recipe_bench.py RECIPE CONFIG CKPT_DIR --batch B --seq S`,
whose peak_alloc_gib is the measured counterpart of predicted_gib.
"""

import argparse
from pathlib import Path

from omegaconf import OmegaConf

from tunelite.config import load_config, validate_config
from tunelite.recipe_registry import get_recipe, read_declarations
from tunelite.training.memory_estimate import GIB, estimate_memory, recipe_memory

ROOT = Path(__file__).resolve().parent.parent
RUNS = (
    ("lora_finetune_single_device", "llama3_1/8B_lora_single_device"),
    ("lora_finetune_single_device", "llama3_1/8B_qlora_single_device"),
    ("full_finetune_single_device", "llama3_1/8B_full_single_device"),
)
SHAPES = ((2, 2048), (1, 8192))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="HF-layout model folder of Llama 3.1 8B (config.json is all that is read)")
    a = ap.parse_args()
    for recipe, config in RUNS:
        for batch, seq in SHAPES:
            # As recipe_bench.py sets up its runs: the config's own settings, this checkpoint and shape.
            cfg = load_config(ROOT / "recipe_configs" / f"{config}.yaml", [
                f"checkpointer.checkpoint_dir={a.checkpoint}", f"batch_size={batch}", f"tokenizer.max_seq_len={seq}",
                "gradient_accumulation_steps=1"])
            declarations = read_declarations(get_recipe(recipe).path)
            validate_config(cfg, declarations.keys)
            OmegaConf.resolve(cfg)
            estimate = estimate_memory(cfg, recipe_memory(declarations))
            print(f"ESTIMATE recipe={recipe} config={config} batch={batch} seq={seq} "
                  f"predicted_gib={estimate.peak_allocated / GIB:.2f}", flush=True)


if __name__ == "__main__":
    main()
