"""Building objects from config nodes that name a callable with `_component_`.

A recipe hands in what only it has (the model's parameters, the tokenizer) as arguments; the
config supplies the rest. Import and argument mistakes are reported by key path, with a close
match, before anything is called.
"""

import difflib
import importlib
import inspect
import pkgutil
import re
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tunelite.config.loading import interpolation_error
from tunelite.errors import ConfigError

COMPONENT_KEY = "_component_"


def resolve_component(dotted: Any, key_path: str) -> Callable[..., Any]:
    """Import the callable a `_component_` names; on failure say which key and suggest a close name."""
    where = f"{key_path}.{COMPONENT_KEY}" if key_path else COMPONENT_KEY
    parts = dotted.split(".") if isinstance(dotted, str) else []
    if not parts or not all(part.isidentifier() for part in parts):
        raise ConfigError(f"{where}: {dotted!r} is not a dotted path to a callable, like torch.optim.AdamW")
    for depth in range(len(parts), 0, -1):
        module_name = ".".join(parts[:depth])
        try:
            obj: Any = importlib.import_module(module_name)
            break
        except ModuleNotFoundError as error:
            # Only "this prefix is not a module" means try a shorter one; a module that fails on
            # its own imports is a missing dependency, and says so.
            if error.name is None or not (module_name + ".").startswith(error.name + "."):
                raise ConfigError(f"{where}: importing {module_name} failed ({error}); install what it needs") from None
    else:
        top_level = [m.name for m in pkgutil.iter_modules()] + list(sys.builtin_module_names)
        suggestion = _suggest(parts, 0, top_level)
        raise ConfigError(f"{where}: cannot import {dotted}: no installed module named {parts[0]!r}{suggestion}")
    for index in range(depth, len(parts)):
        if not hasattr(obj, parts[index]):
            raise ConfigError(
                f"{where}: cannot import {dotted}: {'.'.join(parts[:index])} has no {parts[index]!r}"
                f"{_suggest(parts, index, _member_names(obj))}"
            )
        obj = getattr(obj, parts[index])
    if not callable(obj):
        raise ConfigError(f"{where}: {dotted} is a {type(obj).__name__}, not a callable; name a class or function")
    return obj


def _member_names(obj: Any) -> list[str]:
    names = [name for name in dir(obj) if not name.startswith("_")]
    if isinstance(obj, ModuleType) and hasattr(obj, "__path__"):
        names += [m.name for m in pkgutil.iter_modules(obj.__path__)]
    return names


def _suggest(parts: list[str], index: int, candidates: list[str]) -> str:
    close = difflib.get_close_matches(parts[index], candidates, n=1)
    if not close:
        return ""
    return f"; did you mean {'.'.join([*parts[:index], close[0], *parts[index + 1:]])}?"


def accepted_keywords(fn: Callable[..., Any]) -> list[str] | None:
    """Names a config may set on `fn`, or None when any name goes (**kwargs or no signature)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def unknown_key_problems(fn: Callable[..., Any], dotted: str, keys: list[str], key_path: str) -> list[str]:
    """One message per key that `fn` does not take, with its full key path and a close match."""
    accepted = accepted_keywords(fn)
    if accepted is None:
        return []
    prefix = f"{key_path}." if key_path else ""
    problems = []
    for key in keys:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f"did you mean {prefix}{close[0]}?" if close else f"it takes: {', '.join(accepted) or 'no keywords'}"
            problems.append(f"{prefix}{key}: not a parameter of {dotted} ({hint})")
    return problems


def node_key_path(node: Any) -> str:
    """Where a config node sits in its config (`optimizer`, `dataset.0`), for error messages."""
    parts = []
    while isinstance(node, (DictConfig, ListConfig)) and node._get_parent() is not None:
        parts.append(str(node._key()))
        node = node._get_parent()
    return ".".join(reversed(parts))


def instantiate(node: DictConfig | dict[str, Any], *args: Any, **kwargs: Any) -> Any:
    """Build the object a `_component_` node names: config keys, then the recipe's args and kwargs."""
    key_path = node_key_path(node)
    try:
        plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else _to_plain(node)
    except OmegaConfBaseException as error:
        raise interpolation_error(error) from None
    if not isinstance(plain, dict) or COMPONENT_KEY not in plain:
        raise ConfigError(f"{key_path or 'config node'}: has no {COMPONENT_KEY}; add one naming the callable to build")
    return _build(plain, key_path, args, kwargs)


def _to_plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {key: _to_plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_to_plain(item) for item in value]
    return value


def _build_value(value: Any, key_path: str) -> Any:
    if isinstance(value, dict) and COMPONENT_KEY in value:
        return _build(value, key_path, (), {})
    if isinstance(value, dict):
        return {key: _build_value(item, _join(key_path, key)) for key, item in value.items()}
    if isinstance(value, list):
        return [_build_value(item, _join(key_path, index)) for index, item in enumerate(value)]
    return value


def _build(node: dict[str, Any], key_path: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    dotted = node[COMPONENT_KEY]
    fn = resolve_component(dotted, key_path)
    config_kwargs = {key: value for key, value in node.items() if key != COMPONENT_KEY}
    problems = unknown_key_problems(fn, dotted, [k for k in config_kwargs if k not in kwargs], key_path)
    if problems:
        raise ConfigError("; ".join(problems))
    built = {key: _build_value(value, _join(key_path, key)) for key, value in config_kwargs.items()}
    built.update(kwargs)
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        try:
            signature.bind(*args, **built)
        except TypeError as error:
            fix = _binding_fix(error, key_path)
            raise ConfigError(f"{key_path or 'config'}: cannot call {dotted}: {error}; {fix}") from None
    return fn(*args, **built)


def _binding_fix(error: TypeError, key_path: str) -> str:
    missing = re.search(r"missing a required argument: '(\w+)'", str(error))
    if missing:
        return f"add {_join(key_path, missing.group(1))} to the config"
    return f"check the keys under {key_path or 'the config'}"


def _join(key_path: str, key: Any) -> str:
    return f"{key_path}.{key}" if key_path else str(key)
