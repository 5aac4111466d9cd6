"""`tunelite generate`: chat with a model, or answer one prompt, with a generation config.

Runs the `generate` recipe: the model is built from the checkpoint's config.json, with the LoRA
adapter in `adapter_dir` (peft layout) applied when one is set, or from a merged folder as is.
"""

import argparse
import runpy
from typing import Any

from tunelite import recipe_registry
from tunelite.config import add_trust_option, load_recipe_config


def add_parser(subcommands: Any) -> None:
    """Register `generate` on the `tunelite` parser."""
    parser = subcommands.add_parser(
        "generate",
        help="chat with a model (base + adapter, or merged), streaming its replies",
        description=__doc__,
        epilog="Overrides: key=value sets a key, +key=value adds one, ~key deletes one. "
               "Without --prompt (or prompt:) it reads one message per line until /exit or end of input.",
    )
    parser.add_argument("--config", required=True, help="generation config (tiny/generation, generation/llama3_1_8B) "
                                                        "or a YAML path")
    parser.add_argument("--prompt", help="answer this once and exit, instead of chatting")
    add_trust_option(parser)
    parser.add_argument("overrides", nargs="*", help="key=value, +key=value or ~key, e.g. adapter_dir=PATH")
    parser.set_defaults(handler=generate)


def generate(args: argparse.Namespace) -> int:
    """Load the config, put --prompt in it, and run the generate recipe's main on it."""
    script = recipe_registry.recipe_script("generate")
    cfg = load_recipe_config(args.config, recipe_registry.read_declarations(script).keys, args.overrides,
                             trust=args.trust)
    if args.prompt is not None:
        cfg.prompt = args.prompt
    runpy.run_path(str(script))["main"](cfg)
    return 0
