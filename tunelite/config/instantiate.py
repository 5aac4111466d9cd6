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
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tunelite.config.loading import interpolation_error
from tunelite.config.signatures import Signature, signature_of
from tunelite.config.trust import building_with, config_trust, untrusted_problem
from tunelite.config.values import COMPONENT_KEY, argument_constraint, value_problem
from tunelite.errors import ConfigError


def component_where(key_path: str) -> str:
    """The key of a node's `_component_`, as messages name it."""
    return f"{key_path}.{COMPONENT_KEY}" if key_path else COMPONENT_KEY


def check_component_name(dotted: Any, key_path: str, trusted: Sequence[str] | None = None) -> str:
    """`dotted` once it is known to be a dotted path from a trusted package, else a ConfigError
    naming the key: nothing is imported for an untrusted one. `trusted`: the user's packages (by
    default those of the config being built)."""
    where = component_where(key_path)
    parts = dotted.split(".") if isinstance(dotted, str) else []
    if not parts or not all(part.isidentifier() for part in parts):
        raise ConfigError(f"{where}: {dotted!r} is not a dotted path to a callable, like torch.optim.AdamW")
    problem = untrusted_problem(dotted, where, trusted)
    if problem:
        raise ConfigError(problem)
    return dotted


def resolve_component(dotted: Any, key_path: str, trusted: Sequence[str] | None = None) -> Callable[..., Any]:
    """Import the callable a `_component_` names, once its package is trusted; on failure say which
    key and suggest a close name."""
    where = component_where(key_path)
    parts = check_component_name(dotted, key_path, trusted).split(".")
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


def argument_problems(dotted: str, signature: Signature, arguments: dict[str, Any], key_path: str) -> list[str]:
    """One message per config argument of `dotted` that it does not take (with a close match), or
    whose value is of the wrong type or out of range, each with its full key path."""
    prefix = f"{key_path}." if key_path else ""
    accepted = signature.keywords
    problems = []
    for key, value in arguments.items():
        parameter = signature.parameter(key)
        if parameter is None or parameter.kind not in ("either", "keyword"):
            if signature.open:
                continue
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f"did you mean {prefix}{close[0]}?" if close else f"it takes: {', '.join(accepted) or 'no keywords'}"
            problems.append(f"{prefix}{key}: not a parameter of {dotted} ({hint})")
            continue
        problem = value_problem(prefix + key, value, parameter.type, argument_constraint(dotted, key))
        if problem:
            problems.append(problem)
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
    with building_with(config_trust(node)):
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
    signature = signature_of(fn)
    problems = argument_problems(dotted, signature, {k: v for k, v in config_kwargs.items() if k not in kwargs},
                                 key_path)
    if problems:
        raise ConfigError("; ".join(problems))
    built = {key: _build_value(value, _join(key_path, key)) for key, value in config_kwargs.items()}
    built.update(kwargs)
    if not signature.open or signature.parameters:
        try:
            inspect.signature(fn).bind(*args, **built)
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
