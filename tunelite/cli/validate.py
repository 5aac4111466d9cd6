"""`tunelite validate`: check a config and its overrides without building anything."""

import argparse
from typing import Any

from tunelite.config import load_config, resolve_config_path, validate_config


def add_parser(subcommands: Any) -> None:
    """Register `validate` on the `tunelite` parser."""
    parser = subcommands.add_parser(
        "validate",
        help="check a config for unknown keys and components",
        description=__doc__,
        epilog="Overrides: key=value sets a key, +key=value adds one, ~key deletes one.",
    )
    parser.add_argument("config", help="built-in config name (see `tunelite ls`) or a YAML path")
    parser.add_argument("overrides", nargs="*", help="key=value, +key=value or ~key")
    parser.set_defaults(handler=validate)


def validate(args: argparse.Namespace) -> int:
    """Report every problem in the config at once, or confirm it is well-formed."""
    path = resolve_config_path(args.config)
    validate_config(load_config(path, args.overrides), source=path)
    print("Config is well-formed!")
    return 0
