"""`tunelite validate`: check a config against its recipe without loading anything: its keys, its
values' types and ranges, that each component comes from a trusted package, that the files it
names are there, and that the model it builds fits the checkpoint's config.json.

    tunelite validate my.yaml                                   # the recipe named in its header
    tunelite validate lora_finetune_single_device --config my.yaml
    tunelite validate my_recipe.py --config my.yaml             # an edited copy of a recipe

The recipe is the one named, else the one a built-in config belongs to, else the one the config's
header comment runs (`# tunelite run <recipe> ...`, kept by `tunelite cp`).
"""

import argparse
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tunelite import recipe_registry
from tunelite.config import add_trust_option, instantiate, load_recipe_config, outside_components, resolve_config_path
from tunelite.errors import ConfigError


def add_parser(subcommands: Any) -> None:
    """Register `validate` on the `tunelite` parser."""
    parser = subcommands.add_parser(
        "validate",
        help="check a config's keys, values, components and paths against its recipe, loading no weights",
        description=__doc__,
        epilog="Overrides: key=value sets a key, +key=value adds one, ~key deletes one.",
    )
    parser.add_argument("target", help="the config (built-in name or YAML path), or the recipe when --config is given")
    parser.add_argument("--config", help="the config to check against the recipe named first")
    add_trust_option(parser)
    parser.add_argument("overrides", nargs="*", help="key=value, +key=value or ~key")
    parser.set_defaults(handler=validate)


def validate(args: argparse.Namespace) -> int:
    """Report every problem in the config at once, or confirm it is well-formed for its recipe and
    list the outside packages building it would import."""
    path = resolve_config_path(args.config or args.target)
    recipe = args.target if args.config else recipe_registry.recipe_of_config(path)
    if recipe is None:
        raise ConfigError(f"{path} does not say which recipe reads it; name the recipe: "
                          f"tunelite validate RECIPE --config {path}")
    script = recipe_registry.recipe_script(recipe)
    cfg = load_recipe_config(path, recipe_registry.read_declarations(script).keys, args.overrides, trust=args.trust)
    check_checkpoint_fits(cfg)
    outside = outside_components(cfg)
    if outside:
        print(f"Imports from outside tunelite, torch and torchao (trusted): {', '.join(outside)}")
    print(f"Config is well-formed for {Path(script).stem}!")
    return 0


def check_checkpoint_fits(cfg: DictConfig) -> None:
    """The model the config builds, on the meta device, against its checkpoint's config.json:
    family and sizes, before any weight is read. (Only this imports torch.)"""
    if "model" not in cfg or "checkpointer" not in cfg or not cfg.checkpointer.get("checkpoint_dir"):
        return
    import torch  # only here: checking keys, values and paths reads no module that needs it

    from tunelite.checkpointing.hf import check_model_matches

    with torch.device("meta"):
        model = instantiate(cfg.model)
    check_model_matches(model.args, Path(cfg.checkpointer.checkpoint_dir))
