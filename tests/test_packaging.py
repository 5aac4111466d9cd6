"""The wheel must carry every subpackage, the recipes and their configs."""

import tomllib
from pathlib import Path

from tunelite.recipe_registry import RECIPES, configs_dir

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "tunelite").rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages"


def test_every_registered_recipe_and_config_exists():
    for recipe in RECIPES:
        assert recipe.path.is_file(), recipe.path
        for name in recipe.configs:
            assert (configs_dir() / f"{name}.yaml").is_file(), name
