"""Checking a whole config before anything is built, so a typo fails in a second, not after model load.

Component modules are imported to read signatures; nothing is called. Every problem is collected
and reported at once, each with its full key path and a close match.
"""

import difflib
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tunelite.config.instantiate import COMPONENT_KEY, resolve_component, unknown_key_problems
from tunelite.config.loading import interpolation_error
from tunelite.errors import ConfigError
from tunelite.recipe_registry import RecipeKeys


def validate_config(cfg: DictConfig, keys: RecipeKeys, *, source: str | Path | None = None) -> None:
    """Raise one ConfigError listing every problem in `cfg` at once: a top-level key the recipe does
    not read or a required one it lacks, an unknown component or argument, an unresolvable value."""
    problems = [
        f"{key}: required by {keys.recipe}; set it (see the recipe's built-in configs, `tunelite ls`)"
        for key in keys.required if key not in cfg
    ]
    _check(cfg, "", problems, keys)
    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        listing = "\n".join(f"  - {problem}" for problem in problems)
        raise ConfigError(f"{source or 'config'} has {count}:\n{listing}")


def _check(node: DictConfig | ListConfig, path: str, problems: list[str], recipe_keys: RecipeKeys) -> None:
    keys: list[Any] = list(node.keys()) if isinstance(node, DictConfig) else list(range(len(node)))
    values: dict[Any, Any] = {}
    for key in keys:
        key_path = f"{path}.{key}" if path else str(key)
        if not path and key not in recipe_keys.all:
            close = difflib.get_close_matches(str(key), sorted(recipe_keys.all), n=1)
            hint = f"did you mean {close[0]}?" if close else "remove it or check its spelling"
            problems.append(f"{key_path}: not read by {recipe_keys.recipe} ({hint}; a recipe reads only the keys "
                            "in its CONFIG_KEYS)")
        if OmegaConf.is_missing(node, key):
            problems.append(f"{key_path}: value is missing (???); set it with {key_path}=VALUE")
            continue
        try:
            values[key] = node[key]
        except OmegaConfBaseException as error:
            problems.append(str(interpolation_error(error, key_path)))
            continue
        # A node reached through `${...}` is checked where it is defined, not again here.
        if isinstance(values[key], (DictConfig, ListConfig)) and not OmegaConf.is_interpolation(node, key):
            _check(values[key], key_path, problems, recipe_keys)
    if COMPONENT_KEY in values:
        dotted = values[COMPONENT_KEY]
        try:
            fn = resolve_component(dotted, path)
        except ConfigError as error:
            problems.append(str(error))
            return
        problems.extend(unknown_key_problems(fn, dotted, [str(k) for k in keys if k != COMPONENT_KEY], path))
