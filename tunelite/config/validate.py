"""Checking a whole config before anything is built, so a typo fails in a second, not after model load.

Keys, and values: each component's arguments against its signature's types and the ranges of
tunelite.config.values, the recipe's own top-level keys against RECIPE_KEYS, and that every
component comes from a trusted package. tunelite's own components are read from the signature
table without being imported; others are imported (never called). Every problem is collected and
reported at once, each with its full key path and the fix.
"""

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tunelite.config.instantiate import argument_problems, check_component_name, resolve_component
from tunelite.config.loading import interpolation_error
from tunelite.config.signatures import signature_of, tabled_signature
from tunelite.config.trust import TRUST_KEY, config_trust, is_outside, trust_key_problem
from tunelite.config.values import COMPONENT_KEY, RECIPE_KEYS, value_problem
from tunelite.errors import ConfigError
from tunelite.recipe_registry import RecipeKeys


def validate_config(cfg: DictConfig, keys: RecipeKeys, *, source: str | Path | None = None) -> None:
    """Raise one ConfigError listing every problem in `cfg` at once: a top-level key the recipe does
    not read or a required one it lacks, a value of the wrong type or out of range, an unknown or
    untrusted component or argument, an unresolvable value."""
    report_problems(config_problems(cfg, keys), source)


def report_problems(problems: Sequence[str], source: str | Path | None = None) -> None:
    """Raise one ConfigError listing `problems`, one a line, if there are any (a single one on the
    line that names the file)."""
    if len(problems) == 1:
        raise ConfigError(f"{source or 'config'}: {problems[0]}")
    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        listing = "\n".join(f"  - {problem}" for problem in problems)
        raise ConfigError(f"{source or 'config'} has {count}:\n{listing}")


def config_problems(cfg: DictConfig, keys: RecipeKeys) -> list[str]:
    """Every problem validate_config reports, one line each."""
    problems = [
        f"{key}: required by {keys.recipe}; set it (see the recipe's built-in configs, `tunelite ls`)"
        for key in keys.required if key not in cfg
    ]
    trust = trust_key_problem(cfg)
    problems += [trust] if trust else []
    _check(cfg, "", problems, keys, config_trust(cfg))
    return problems


def outside_components(cfg: DictConfig) -> list[str]:
    """The components a config names from packages beyond tunelite, torch and torchao, which
    building it would import."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            dotted = node.get(COMPONENT_KEY)
            if isinstance(dotted, str) and is_outside(dotted):
                found.append(dotted)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(OmegaConf.to_container(cfg, resolve=False))
    return sorted(set(found))


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def _check(node: DictConfig | ListConfig, path: str, problems: list[str], recipe_keys: RecipeKeys,
           trusted: tuple[str, ...]) -> None:
    keys: list[Any] = list(node.keys()) if isinstance(node, DictConfig) else list(range(len(node)))
    values: dict[Any, Any] = {}
    plains: dict[Any, Any] = {}  # the values resolved into plain containers, as components receive them
    for key in keys:
        key_path = f"{path}.{key}" if path else str(key)
        if not path and key not in recipe_keys.all and key != TRUST_KEY:
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
        try:
            plains[key] = _plain(values[key])
        except OmegaConfBaseException:
            pass  # a value inside it does not resolve: reported below, where it is
        if not path and key in RECIPE_KEYS and key in recipe_keys.all and key in plains:
            problem = value_problem(key_path, plains[key], RECIPE_KEYS[key].type, RECIPE_KEYS[key].constraint)
            problems += [problem] if problem else []
        # A node reached through `${...}` is checked where it is defined, not again here.
        if isinstance(values[key], (DictConfig, ListConfig)) and not OmegaConf.is_interpolation(node, key):
            _check(values[key], key_path, problems, recipe_keys, trusted)
    if COMPONENT_KEY in values:
        dotted = values[COMPONENT_KEY]
        try:
            signature = tabled_signature(check_component_name(dotted, path, trusted))
            if signature is None:
                signature = signature_of(resolve_component(dotted, path, trusted))
        except ConfigError as error:
            problems.append(str(error))
            return
        arguments = {str(k): v for k, v in plains.items() if k != COMPONENT_KEY}
        problems.extend(argument_problems(dotted, signature, arguments, path))
