"""Configs: load YAML, apply command-line overrides, validate, and build `_component_` nodes.

Every recipe ends with `recipe_entry(main)`, so each one parses its command line the same way and
a typo in the config is reported before any model loads.
"""

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from omegaconf import DictConfig

from tunelite.config.instantiate import instantiate, resolve_component
from tunelite.config.loading import apply_overrides, asset_path, builtin_config_names, load_config, resolve_config_path
from tunelite.config.paths import path_problems
from tunelite.config.trust import add_trust
from tunelite.config.validate import config_problems, outside_components, report_problems, validate_config
from tunelite.errors import TuneliteError
from tunelite.recipe_registry import RecipeKeys, read_declarations

__all__ = [
    "add_trust_option",
    "apply_overrides",
    "asset_path",
    "builtin_config_names",
    "instantiate",
    "load_config",
    "load_recipe_config",
    "outside_components",
    "parse_recipe_args",
    "path_problems",
    "report_problems",
    "recipe_entry",
    "resolve_component",
    "resolve_config_path",
    "validate_config",
]


def parse_recipe_args(keys: RecipeKeys, argv: Sequence[str] | None = None) -> DictConfig:
    """Turn a recipe's `--config NAME_OR_PATH [--trust PKG] [key=value ...]` into a config checked
    against the recipe's `keys` and against the files it names."""
    parser = argparse.ArgumentParser(
        description="Run a tunelite recipe.",
        epilog="Overrides: key=value sets a key, +key=value adds one, ~key deletes one.",
    )
    parser.add_argument("--config", required=True, help="built-in config name (see `tunelite ls`) or a YAML path")
    add_trust_option(parser)
    parser.add_argument("overrides", nargs="*", help="key=value, +key=value or ~key")
    args = parser.parse_intermixed_args(argv)
    return load_recipe_config(args.config, keys, args.overrides, trust=args.trust)


def add_trust_option(parser: argparse.ArgumentParser) -> None:
    """`--trust PKG`, repeatable: packages beyond tunelite, torch and torchao whose components the
    config may name, as `trusted_components: [PKG]` in it says."""
    parser.add_argument("--trust", action="append", default=[], metavar="PKG",
                        help="let the config name components from package PKG (repeatable); "
                             "tunelite, torch and torchao are always trusted")


def load_recipe_config(name_or_path: str, keys: RecipeKeys, overrides: Sequence[str] = (), *,
                       trust: Sequence[str] = (), check_paths: bool = True) -> DictConfig:
    """A config as a recipe receives it: found by name or path, overridden, its `--trust` packages
    added, checked against the keys the recipe reads and (with `check_paths`) against the files it
    names. Interpolations stay unresolved until read, so the config a logger writes keeps
    `${oc.env:HF_TOKEN}` as written, never its value."""
    path = resolve_config_path(name_or_path)
    cfg = load_config(path, overrides)
    add_trust(cfg, trust)
    report_problems(config_problems(cfg, keys) + (path_problems(cfg) if check_paths else []), source=path)
    return cfg


def recipe_entry(main: Callable[[DictConfig], None]) -> None:
    """Run a recipe's `main` on its command line, its config checked against the CONFIG_KEYS its script
    declares; a user's mistake exits 2 with one line, no traceback."""
    try:
        main(parse_recipe_args(read_declarations(Path(main.__globals__["__file__"])).keys))
    except TuneliteError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
