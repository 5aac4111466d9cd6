"""Tokens/s and peak memory of a recipe on an HF checkpoint, one line per run.

Runs the recipe's own `main` for a fixed number of steps on random fixed-length samples (every
sample exactly --seq tokens, no padding), so the same command measures every recipe on the work
of ../shared/bench/ANCHORS.md. Checkpoint writing is skipped: it is not what is measured.

    python benchmarks/recipe_bench.py lora_finetune_single_device llama3_1/8B_lora_single_device CKPT_DIR \
        [--batch 2] [--seq 2048] [--accumulation 1] [--steps 12] [--warmup 3] [--cap-gib 22]
        [key=value overrides...]

Prints `RESULT recipe=... tokens_per_s=... peak_alloc_gib=... peak_reserved_gib=... peak_host_rss_gib=...`,
with tokens/s counted as batch x seq x accumulation per step over the steps after warm-up (as the
anchors count). `--cap-gib` caps the CUDA caching allocator (reserved memory) as a smaller card
would: the allocator frees its cache and retries before it goes past the cap.

Under torchrun it measures a distributed recipe: --batch is per GPU, tokens/s counts every GPU's
tokens, the peaks are rank 0's (each GPU holds the same share), and rank 0 alone prints:

    python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/recipe_bench.py \
        lora_finetune_distributed llama3_1/8B_lora CKPT_DIR
"""

import argparse
import json
import os
import runpy
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

from tunelite.checkpointing.hf import model_args_from_hf_config, read_hf_config
from tunelite.checkpointing import state
from tunelite.config import load_config, validate_config
from tunelite.recipe_registry import read_declarations
from tunelite.runtime.device import cap_memory

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("config", help="built-in config name, e.g. llama3_1/8B_lora_single_device")
    ap.add_argument("checkpoint", help="HF-layout model folder")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--accumulation", type=int, default=1, help="micro-batches a step (gradient_accumulation_steps)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cap-gib", type=float, help="cap the CUDA allocator's reserved memory at this many GiB")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_intermixed_args()
    if a.cap_gib and torch.cuda.is_available():
        cap_memory(torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))), a.cap_gib)  # this rank's GPU

    world_size = int(os.environ.get("WORLD_SIZE", 1))  # the processes torchrun started, 1 without it
    out = Path(tempfile.mkdtemp(prefix="tunelite-bench-"))
    vocab = model_args_from_hf_config(read_hf_config(Path(a.checkpoint))).vocab_size
    cfg = load_config(ROOT / "recipe_configs" / f"{a.config}.yaml", [
        f"output_dir={out}", f"checkpointer.checkpoint_dir={a.checkpoint}", "tokenizer.path=${asset:tiny/tokenizer.model}",
        f"batch_size={a.batch}", "epochs=1", f"max_steps_per_epoch={a.steps}",
        f"gradient_accumulation_steps={a.accumulation}",
        "log_every_n_steps=1", "log_peak_memory_stats=True", "resume_from_checkpoint=False",
        f"metric_logger=[{{_component_: tunelite.training.metric_logging.DiskLogger, log_dir: {out}/logs, filename: m.jsonl}}]",
        f"dataset={{_component_: tunelite.data.synthetic.random_tokens_dataset, "
        f"num_samples: {a.batch * a.accumulation * a.steps * world_size}, "
        f"seq_len: {a.seq}, vocab_size: {vocab}}}",
        *a.overrides,
    ])
    script = ROOT / "recipes" / f"{a.recipe}.py"
    validate_config(cfg, read_declarations(script).keys)
    OmegaConf.resolve(cfg)
    state.save_checkpoint = lambda *args, **kwargs: None  # measure training, not writing 16 GB
    runpy.run_path(str(script))["main"](cfg)
    if int(os.environ.get("RANK", 0)) != 0:
        return

    rows = [json.loads(line) for line in (out / "logs" / "m.jsonl").read_text().splitlines()]
    timed = rows[a.warmup:]
    # The recipe counts labelled tokens (seq - 1 per sample: the last position has no target).
    seconds = sum(world_size * a.batch * a.accumulation * (a.seq - 1) / r["tokens_per_s"] for r in timed)
    last = rows[-1]
    tokens = len(timed) * world_size * a.batch * a.accumulation * a.seq
    print(f"RESULT recipe={a.recipe} config={a.config} gpus={world_size} batch={a.batch} seq={a.seq} "
          f"accumulation={a.accumulation} "
          f"compile={cfg.compile} steps={len(timed)} tokens_per_s={tokens / seconds:.0f} "
          f"peak_alloc_gib={last.get('peak_alloc_gib', 0):.2f} peak_reserved_gib={last.get('peak_reserved_gib', 0):.2f} "
          f"peak_host_rss_gib={last['peak_host_rss_gib']:.2f} loss={last['loss']:.4f}", flush=True)


if __name__ == "__main__":
    main()
