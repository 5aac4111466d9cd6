"""`tunelite export gguf`: a merged (or base) Llama model folder as one GGUF file for llama.cpp.

    tunelite merge --base /models/Llama-3.1-8B-Instruct --adapter OUT/step_500/adapter --output-dir merged
    tunelite export gguf merged merged-q8_0.gguf --dtype q8_0
    llama-cli -m merged-q8_0.gguf -cnv        # or: ollama create NAME -f Modelfile (FROM ./merged-q8_0.gguf)

The tokenizer comes from Meta's `original/tokenizer.model` (tiktoken, Llama 3) or `tokenizer.model`
(SentencePiece, Llama 2) in the folder, or --tokenizer; the chat template from the folder's
tokenizer_config.json or chat_template.jinja when it has one.
"""

import argparse
from pathlib import Path
from typing import Any

FORMATS = ("gguf",)


def add_parser(subcommands: Any) -> None:
    """Register `export` on the `tunelite` parser."""
    parser = subcommands.add_parser("export", help="write a model folder for another runtime (GGUF for llama.cpp)",
                                    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("format", choices=FORMATS, help="gguf: llama.cpp / Ollama")
    parser.add_argument("model_dir", type=Path, help="an HF model folder, e.g. what `tunelite merge` wrote")
    parser.add_argument("output", type=Path, help="the file to write, e.g. model-q8_0.gguf")
    parser.add_argument("--dtype", choices=("f16", "bf16", "q8_0"), default="f16",
                        help="the 2-D weights' type (norms stay f32); default f16")
    parser.add_argument("--tokenizer", type=Path, help="Meta's tokenizer.model, when the folder has none")
    parser.set_defaults(handler=export)


def export(args: argparse.Namespace) -> int:
    """Write the GGUF file and say how to run it."""
    try:
        from tunelite.export.gguf import export_gguf
    except ImportError as e:
        from tunelite.errors import TuneliteError

        raise TuneliteError(f"GGUF export needs the gguf package ({e}): pip install 'tunelite[gguf]'") from e
    summary = export_gguf(args.model_dir, args.output, args.dtype, args.tokenizer)
    print(f"Wrote {summary.path} ({summary.tensors} tensors, {args.dtype}, {summary.tokenizer} tokenizer). "
          f"Run it: llama-cli -m {summary.path} -cnv")
    return 0
