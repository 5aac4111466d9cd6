"""`tunelite estimate`: predict a training config's peak GPU memory before running it.

Reads the checkpoint's config.json only (no weights), and prints the memory by component
(weights, adapter, gradients, optimizer state, activations, logits/loss, workspace, CUDA
context) and whether it fits the card; when it does not, overrides that would make it fit.
Exit code 1 when it does not fit.
"""

import argparse
from typing import Any

from tunelite import recipe_registry
from tunelite.config import add_trust_option, load_recipe_config


def add_parser(subcommands: Any) -> None:
    """Register `estimate` on the `tunelite` parser."""
    parser = subcommands.add_parser(
        "estimate",
        help="predict a config's peak GPU memory and whether it fits",
        description=__doc__,
        epilog="Overrides: key=value sets a key, +key=value adds one, ~key deletes one.",
    )
    parser.add_argument("recipe", help="a training recipe's name (see `tunelite ls`) or the path of a recipe script")
    parser.add_argument("--config", required=True, help="built-in config name (see `tunelite ls`) or a YAML path")
    parser.add_argument("--gpu-memory", help="the card's memory, e.g. 24GB (default: this machine's GPU, if any)")
    parser.add_argument("--seq-len", type=int, help="longest sample in tokens (default: tokenizer.max_seq_len)")
    add_trust_option(parser)
    parser.add_argument("overrides", nargs="*", help="key=value, +key=value or ~key")
    parser.set_defaults(handler=estimate)


def estimate(args: argparse.Namespace) -> int:
    """Print the breakdown and the verdict; 0 when it fits (or no card is known), 1 when not."""
    import torch  # here, not at the top: `tunelite ls` and `--help` should not wait for torch

    from tunelite.training.memory_estimate import (
        estimate_memory,
        fitting_overrides,
        gib,
        merge_overrides,
        parse_memory_size,
        recipe_memory,
    )

    overrides = [*args.overrides, *([f"tokenizer.max_seq_len={args.seq_len}"] if args.seq_len else [])]
    declarations = recipe_registry.read_declarations(recipe_registry.recipe_script(args.recipe))
    recipe = recipe_memory(declarations)
    # The files need not exist yet: an estimate is for deciding what to download.
    cfg = load_recipe_config(args.config, declarations.keys, overrides, trust=args.trust, check_paths=False)
    result = estimate_memory(cfg, recipe)
    print(result.report())
    if args.gpu_memory:
        budget = parse_memory_size(args.gpu_memory)
    elif torch.cuda.is_available():
        budget = torch.cuda.get_device_properties(0).total_memory
    else:
        print("No GPU here: pass --gpu-memory (e.g. 24GB) to check a card.")
        return 0
    if result.total <= budget:
        print(f"Fits in {gib(budget)}, with {gib(budget - result.total)} to spare.")
        return 0
    print(f"Does not fit in {gib(budget)}: {gib(result.total - budget)} short.")
    options = fitting_overrides(cfg, recipe, budget)
    if not options:
        print("No override tunelite knows makes it fit; use a smaller model or a larger card.")
        return 1
    print("Any of these would fit:")
    for extra, fitted in options:
        command = " ".join(["tunelite run", args.recipe, "--config", args.config, *merge_overrides(overrides, extra)])
        print(f"  {command}   # {gib(fitted.total)}")
    return 1
