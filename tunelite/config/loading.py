"""Reading a config: finding the YAML, loading it, applying command-line overrides, resolving assets.

Override values are parsed as YAML with the same float rule as the file loader, so `lr=1e-4`
on the command line and `lr: 1e-4` in a file both give a float.
"""

import difflib
import io
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tunelite import recipe_registry
from tunelite.errors import ConfigError
from tunelite.files import MAX_CONFIG_BYTES, read_bounded


class _OverrideValueLoader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, but `1e-4` is a float and dates stay strings, as in OmegaConf."""


_OverrideValueLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)
_OverrideValueLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in _OverrideValueLoader.yaml_implicit_resolvers.items()
}


def asset_path(relative: str) -> str:
    """Absolute path of a file or folder shipped in `tunelite/assets`, so configs work after any install."""
    root = Path(str(resources.files("tunelite.assets")))
    path = root / relative
    if not path.exists():
        raise ConfigError(f"no asset {relative!r} in {root}; `${{asset:...}}` takes a path relative to that folder")
    return str(path.resolve())


OmegaConf.register_resolver("asset", asset_path, replace=True)


def interpolation_error(error: OmegaConfBaseException, key_path: str | None = None) -> ConfigError:
    """Turn OmegaConf's resolution failure into a ConfigError that names the key whose value failed."""
    message = str(error).splitlines()[0]
    message = re.sub(r"^\w+ raised while resolving interpolation: ", "", message)
    key = key_path or getattr(error, "full_key", None)
    return ConfigError(f"{key}: {message}" if key else message)


def builtin_config_names() -> list[str]:
    """Names of the YAML configs shipped with tunelite, as `family/name` without `.yaml`."""
    root = recipe_registry.configs_dir()
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    """Find the YAML a user named, as a file path or as a built-in name like `tiny/lora_cpu`."""
    given = Path(name_or_path)
    if given.is_file():
        return given
    name = name_or_path.removesuffix(".yaml")
    builtin = recipe_registry.configs_dir() / f"{name}.yaml"
    if builtin.is_file():
        return builtin
    names = builtin_config_names()
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else f"built-in configs: {', '.join(names) or 'none'}"
    raise ConfigError(f"no config file {name_or_path!r} and no built-in config of that name; {hint}")


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Load a YAML config and apply command-line overrides, leaving `${...}` unresolved."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a YAML path or a built-in name from `tunelite ls`")
    text = read_bounded(path, MAX_CONFIG_BYTES, "config file", ConfigError).decode("utf-8", errors="replace")
    try:
        cfg = OmegaConf.load(io.StringIO(text))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML: {getattr(error, 'problem', None) or error}{where}") from None
    except OSError:  # OmegaConf's word for a file holding a single value
        raise ConfigError(f"{path} must hold a mapping of keys at the top level, not a single value") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path} must hold a mapping of keys at the top level, not a list")
    apply_overrides(cfg, overrides)
    return cfg


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Apply `key=value`, `+key=value` (add) and `~key` (delete) overrides in order, in place."""
    for override in overrides:
        where = f"override {override!r}"
        key, sep, text = override.partition("=")
        if key.startswith("~"):
            if sep:
                raise ConfigError(f"{where}: `~` deletes a key and takes no value; write {key}")
            _delete(cfg, key[1:], where)
            continue
        adding = key.startswith("+")
        key = key.removeprefix("+")
        if not sep or not key:
            raise ConfigError(f"{where} is not key=value; write key=value to set, +key=value to add, ~key to delete")
        value = _parse_value(text, where)
        exists = _exists(cfg, key)
        if adding and exists:
            raise ConfigError(f"{where}: {key} already exists; drop the + to set it")
        if not adding and not exists:
            raise ConfigError(f"{where}: config has no key {key}{_close_key(cfg, key)}; to add it write +{override}")
        try:
            OmegaConf.update(cfg, key, value, merge=False)
        except OmegaConfBaseException as error:
            raise ConfigError(f"{where}: {str(error).splitlines()[0]}") from None


def _parse_value(text: str, where: str) -> Any:
    if text == "":
        return ""
    try:
        return yaml.load(text, Loader=_OverrideValueLoader)
    except yaml.YAMLError as error:
        problem = str(error).splitlines()[0]
        raise ConfigError(f"{where}: value is not valid YAML ({problem}); quote the value") from None


def _walk(node: Any, key: str) -> tuple[bool, Any]:
    """Follow a dotted key (list items by index) through plain dicts and lists; return (found, value)."""
    for part in key.split(".") if key else ():
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False, None
    return True, node


def _exists(cfg: DictConfig, key: str) -> bool:
    return _walk(OmegaConf.to_container(cfg, resolve=False), key)[0]


def _close_key(cfg: DictConfig, key: str) -> str:
    """` (did you mean model.lora_rank?)` for a misspelt last part of a key, or nothing."""
    parent, _, leaf = key.rpartition(".")
    found, siblings = _walk(OmegaConf.to_container(cfg, resolve=False), parent)
    if not found or not isinstance(siblings, dict):
        return ""
    close = difflib.get_close_matches(leaf, [str(k) for k in siblings], n=1)
    prefix = f"{parent}." if parent else ""
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _delete(cfg: DictConfig, key: str, where: str) -> None:
    if not key or not _exists(cfg, key):
        raise ConfigError(f"{where}: config has no key {key or '(empty)'} to delete{_close_key(cfg, key)}")
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if isinstance(parent, ListConfig):
        del parent[int(leaf)]
    else:
        del parent[leaf]
