"""What a component takes: its parameters, each with a type spec (tunelite.config.values).

Read from a table shipped with tunelite (signatures.json) for tunelite's own components, and for
torch's and torchao's optimizers at the versions the table was made with, so `tunelite validate`
checks a config in a fraction of a second, without importing torch; any other component is
imported and its signature read. `python scripts/make_signature_table.py` rewrites the table, and
a test fails when it no longer matches the code.
"""

import functools
import importlib
import importlib.metadata
import inspect
import json
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelite.config.values import Spec, type_spec

TABLE = Path(__file__).with_name("signatures.json")
# tunelite's packages whose public callables configs name (models, tokenizers, data, ...).
TABLED_PACKAGES = ("checkpointing", "data", "models", "modules", "tokenizers", "training")
# Outside tunelite, the table holds these modules' optimizers, valid only at the recorded versions.
TABLED_OPTIMIZERS = ("torch.optim", "torchao.optim")
_KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: "positional",
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "either",
    inspect.Parameter.VAR_POSITIONAL: "*args",
    inspect.Parameter.KEYWORD_ONLY: "keyword",
    inspect.Parameter.VAR_KEYWORD: "**kwargs",
}
_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


@dataclass(frozen=True)
class Parameter:
    name: str
    kind: str  # one of _KINDS' values
    required: bool
    type: Spec


@dataclass(frozen=True)
class Signature:
    """A component's parameters; `open` when it takes any keyword (**kwargs, or no signature to read)."""

    parameters: tuple[Parameter, ...]
    open: bool = False

    @property
    def keywords(self) -> list[str]:
        """Names a config may set."""
        return [p.name for p in self.parameters if p.kind in ("either", "keyword")]

    def parameter(self, name: str) -> Parameter | None:
        return next((p for p in self.parameters if p.name == name), None)


def signature_of(fn: Callable[..., Any]) -> Signature:
    """The signature of an imported callable, its type hints as specs (a hint that cannot be
    evaluated counts as anything)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return Signature((), open=True)
    try:
        evaluated = inspect.signature(fn, eval_str=True)
    except Exception:  # a hint naming what its module cannot import: read as "any"
        evaluated = signature
    parameters = tuple(
        Parameter(p.name, _KINDS[p.kind], p.default is inspect.Parameter.empty and p.kind not in _VARIADIC,
                  "any" if p.annotation is inspect.Parameter.empty else type_spec(p.annotation))
        for p in evaluated.parameters.values()
    )
    return Signature(parameters, open=any(p.kind == "**kwargs" for p in parameters))


@functools.cache
def _table() -> dict[str, Any]:
    try:
        return json.loads(TABLE.read_text())
    except FileNotFoundError:
        return {"versions": {}, "components": {}}


def _version(package: str) -> str | None:
    """The installed version without its local part (2.13.0 for 2.13.0+cpu and 2.13.0+cu128: the
    same signatures)."""
    try:
        return importlib.metadata.version(package).partition("+")[0]
    except importlib.metadata.PackageNotFoundError:
        return None


def tabled_signature(dotted: str) -> Signature | None:
    """The signature the table holds for `dotted` (as a config writes it), or None when it holds
    none, or holds one made with another version of the package it comes from."""
    table = _table()
    entry = table["components"].get(dotted)
    if entry is None:
        return None
    package = dotted.split(".")[0]
    if package != "tunelite" and table["versions"].get(package) != _version(package):
        return None
    parameters = tuple(Parameter(name, kind, required, spec) for name, kind, required, spec in entry)
    return Signature(parameters, open=any(p.kind == "**kwargs" for p in parameters))


def _entry(fn: Callable[..., Any]) -> list[list[Any]]:
    return [[p.name, p.kind, p.required, p.type] for p in signature_of(fn).parameters]


def build_table() -> dict[str, Any]:
    """The table as the code stands: every public callable defined in tunelite's component
    packages, under each dotted name a config can write it by, and torch's and torchao's optimizers.
    A module that needs what this machine lacks (triton on a CPU) is left out, and named in `skipped`."""
    components: dict[str, list[list[Any]]] = {}
    modules = [importlib.import_module(f"tunelite.{name}") for name in TABLED_PACKAGES]
    skipped = []
    for package in list(modules):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if any(part.startswith("_") for part in info.name.split(".")):
                continue
            try:
                modules.append(importlib.import_module(info.name))
            except ImportError:
                skipped.append(info.name)
    for module in modules:
        # What a module defines, and what a package exports from its own modules (tunelite.models.lora_*).
        home = module.__name__ + ("." if hasattr(module, "__path__") else "")
        for name in dir(module):
            obj = getattr(module, name)
            defined = getattr(obj, "__module__", None) or ""
            if not name.startswith("_") and callable(obj) and (defined == module.__name__ or defined.startswith(home)):
                components[f"{module.__name__}.{name}"] = _entry(obj)
    for module_name in TABLED_OPTIMIZERS:
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", dir(module)):
            obj = getattr(module, name, None)
            if isinstance(obj, type) and any(base.__name__ == "Optimizer" for base in obj.__mro__[1:]):
                components[f"{module_name}.{name}"] = _entry(obj)
    versions = {package: _version(package) for package in ("torch", "torchao")}
    return {"versions": versions, "skipped": sorted(skipped), "components": dict(sorted(components.items()))}


def write_table(table: dict[str, Any]) -> None:
    """Writes the table one component a line, so a change to one signature is one line of diff."""
    lines = [f"  {json.dumps(name)}: {json.dumps(entry)}" for name, entry in table["components"].items()]
    TABLE.write_text('{"versions": ' + json.dumps(table["versions"], sort_keys=True) + ',\n"skipped": '
                     + json.dumps(table["skipped"]) + ',\n"components": {\n' + ",\n".join(lines) + "\n}}\n")
