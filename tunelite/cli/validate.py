"""`tunelite validate`: check a config against the keys its recipe reads, without building anything.

    tunelite validate my.yaml                                   # the recipe named in its header
    tunelite validate lora_finetune_single_device --config my.yaml
    tunelite validate my_recipe.py --config my.yaml             # an edited copy of a recipe

The recipe is the one named, else the one a built-in config belongs to, else the one the config's
header comment runs (`# tunelite run <recipe> ...`, kept by `tunelite cp`).
"""

import argparse
from pathlib import Path
from typing import Any

from tunelite import recipe_registry
from tunelite.config import load_config, resolve_config_path, validate_config
from tunelite.errors import ConfigError


def add_parser(subcommands: Any) -> None:
    """Register `validate` on the `tunelite` parser."""
    parser = subcommands.add_parser(
        "validate",
        help="check a config against the keys and components its recipe reads",
        description=__doc__,
        epilog="Overrides: key=value sets a key, +key=value adds one, ~key deletes one.",
    )
    parser.add_argument("target", help="the config (built-in name or YAML path), or the recipe when --config is given")
    parser.add_argument("--config", help="the config to check against the recipe named first")
    parser.add_argument("overrides", nargs="*", help="key=value, +key=value or ~key")
    parser.set_defaults(handler=validate)


def validate(args: argparse.Namespace) -> int:
    """Report every problem in the config at once, or confirm it is well-formed for its recipe."""
    path = resolve_config_path(args.config or args.target)
    recipe = args.target if args.config else recipe_registry.recipe_of_config(path)
    if recipe is None:
        raise ConfigError(f"{path} does not say which recipe reads it; name the recipe: "
                          f"tunelite validate RECIPE --config {path}")
    script = recipe_registry.recipe_script(recipe)
    validate_config(load_config(path, args.overrides), recipe_registry.read_declarations(script).keys, source=path)
    print(f"Config is well-formed for {Path(script).stem}!")
    return 0
