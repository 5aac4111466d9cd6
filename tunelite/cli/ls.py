"""`tunelite ls`: the recipes tunelite ships and the built-in configs each one accepts."""

import argparse
from typing import Any

from tunelite import recipe_registry


def add_parser(subcommands: Any) -> None:
    """Register `ls` on the `tunelite` parser."""
    parser = subcommands.add_parser("ls", help="list recipes and their built-in configs", description=__doc__)
    parser.set_defaults(handler=list_recipes)


def list_recipes(args: argparse.Namespace) -> int:
    """Print a RECIPE / CONFIG table, the recipe named only on its first config's row, as `tune ls` does."""
    rows = [("RECIPE", "CONFIG")]
    for recipe in recipe_registry.RECIPES:
        for index, config in enumerate(recipe.configs or ("",)):
            rows.append((recipe.name if index == 0 else "", config))
    width = max(len(recipe) for recipe, _ in rows) + 3
    for recipe, config in rows:
        print(f"{recipe:<{width}}{config}".rstrip())
    return 0
