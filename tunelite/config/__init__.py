"""Configs: load YAML, apply command-line overrides, validate, and build `_component_` nodes.

Every recipe ends with `recipe_entry(main)`, so each one parses its command line the same way and
a typo in the config is reported before any model loads.
"""

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tunelite.config.instantiate import instantiate, resolve_component
from tunelite.config.loading import (
    apply_overrides,
    asset_path,
    builtin_config_names,
    interpolation_error,
    load_config,
    resolve_config_path,
)
from tunelite.config.validate import validate_config
from tunelite.errors import TuneliteError
from tunelite.recipe_registry import RecipeKeys, read_declarations

__all__ = [
    "apply_overrides",
    "asset_path",
    "builtin_config_names",
    "instantiate",
    "load_config",
    "load_recipe_config",
    "parse_recipe_args",
    "recipe_entry",
    "resolve_component",
    "resolve_config_path",
    "validate_config",
]


def parse_recipe_args(keys: RecipeKeys, argv: Sequence[str] | None = None) -> DictConfig:
    """Turn a recipe's `--config NAME_OR_PATH [key=value ...]` into a config validated against the
    recipe's `keys`, and resolved."""
    parser = argparse.ArgumentParser(
        description="Run a tunelite recipe.",
        epilog="Overrides: key=value sets a key, +key=value adds one, ~key deletes one.",
    )
    parser.add_argument("--config", required=True, help="built-in config name (see `tunelite ls`) or a YAML path")
    parser.add_argument("overrides", nargs="*", help="key=value, +key=value or ~key")
    args = parser.parse_intermixed_args(argv)
    return load_recipe_config(args.config, keys, args.overrides)


def load_recipe_config(name_or_path: str, keys: RecipeKeys, overrides: Sequence[str] = ()) -> DictConfig:
    """A config as a recipe receives it: found by name or path, overridden, validated against the
    keys the recipe reads, resolved."""
    path = resolve_config_path(name_or_path)
    cfg = load_config(path, overrides)
    validate_config(cfg, keys, source=path)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as error:
        raise interpolation_error(error) from None
    return cfg


def recipe_entry(main: Callable[[DictConfig], None]) -> None:
    """Run a recipe's `main` on its command line, its config checked against the CONFIG_KEYS its script
    declares; a user's mistake exits 2 with one line, no traceback."""
    try:
        main(parse_recipe_args(read_declarations(Path(main.__globals__["__file__"])).keys))
    except TuneliteError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
