"""`tunelite merge`: fold a LoRA adapter (any step's `adapter/`) into its base model.

Writes a plain Hugging Face model folder (the base's shards, index, config and tokenizer files)
that transformers, vLLM, `tunelite generate` and `tunelite export gguf` load without peft.
Tensors are streamed one at a time, so a 70B merge needs about one tensor of host memory.
"""

import argparse
import ctypes
import ctypes.util
from pathlib import Path
from typing import Any

DTYPES = ("bf16", "fp16", "fp32")


def add_parser(subcommands: Any) -> None:
    """Register `merge` on the `tunelite` parser."""
    parser = subcommands.add_parser("merge", help="fold a LoRA adapter into its base, as an HF model folder",
                                    description=__doc__)
    parser.add_argument("--base", required=True, type=Path, help="the base model folder the adapter was trained on")
    parser.add_argument("--adapter", required=True, type=Path, help="a peft adapter folder, e.g. OUT/step_500/adapter")
    parser.add_argument("--output-dir", required=True, type=Path, help="a new folder for the merged model")
    parser.add_argument("--dtype", choices=DTYPES, help="store the weights in this dtype (default: as the base stores them)")
    parser.add_argument("--base-model-id", help="the base's hub id, for model cards (default: what `tunelite download` "
                                                "recorded in --base, else its path)")
    parser.set_defaults(handler=merge)


def merge(args: argparse.Namespace) -> int:
    """Merge, then say where the result is and how to use it."""
    import torch

    from tunelite.checkpointing.merge import merge_adapter
    from tunelite.checkpointing.peft import base_model_name

    release_freed_memory_promptly()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(args.dtype)
    summary = merge_adapter(args.base, args.adapter, args.output_dir, dtype,
                            base_model_name(args.base, args.base_model_id))
    print(f"Merged {summary.adapted} adapted weights ({summary.tensors} tensors in {summary.files} files) into "
          f"{summary.output_dir}\n  chat:  tunelite generate --config GENERATION_CONFIG "
          f"checkpointer.checkpoint_dir={summary.output_dir}\n"
          f"  share: tunelite upload {summary.output_dir} USER/NAME")
    return 0


def release_freed_memory_promptly() -> None:
    """Makes glibc hand freed blocks of 1 MiB and more straight back to the system.

    By default glibc raises its mmap threshold each time a large block is freed, so the merge's
    many 8-16 MiB temporaries end up on its heap, which it rarely shrinks: measured on a 1.8 GiB
    model, that kept 150-250 MiB more than the merge needs. A fixed threshold (mallopt
    M_MMAP_THRESHOLD) turns that off. Elsewhere than glibc there is nothing to do."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD, 1 MiB
    except (OSError, AttributeError):
        pass
