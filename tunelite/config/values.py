"""What a config value must be: a type read from the component's type hints, and a range where a
hint cannot say it (a LoRA rank is a positive int, a dropout a probability below 1).

Types are kept as small JSON-able specs, so the table of tunelite's own signatures
(tunelite/config/signatures.json) can hold them and `tunelite validate` checks a config without
importing torch:

    "int", "float" (an int too), "bool", "str", "none", "dict", "any",
    "object" (something only a nested `_component_` node builds: a tensor, a module, a callable),
    {"list": SPEC}, {"literal": [VALUES]}, {"union": [SPECS]}

Ranges are one table, by argument name (ARGUMENT_RANGES): a name means one thing in every
component of tunelite, torch and torchao that takes it, and the LoRA builders and the peft adapter
reader check their arguments against the same table. The top-level keys recipes read have their
types and ranges in RECIPE_KEYS, shared by every recipe (a key means one thing in each).
"""

import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from tunelite.errors import ConfigError

COMPONENT_KEY = "_component_"
Spec = Any  # str | dict[str, Any], see the module's docstring

_PLAIN = {int: "int", float: "float", bool: "bool", str: "str", type(None): "none", dict: "dict", list: {"list": "any"},
          tuple: {"list": "any"}, typing.Any: "any", object: "any"}
_SEQUENCES = (list, tuple, Sequence, Iterable, typing.Sequence, typing.Iterable, typing.List, typing.Tuple,
              set, frozenset)


def type_spec(hint: Any) -> Spec:
    """The spec of a type hint, as far as a YAML value can match it; what a YAML value can never be
    (a tensor, a module, a callable, a protocol) is "object", and a hint not understood is "any"."""
    if hint in _PLAIN:
        return _PLAIN[hint]
    if isinstance(hint, str) or isinstance(hint, typing.TypeVar):
        return "any"
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Annotated:
        return type_spec(args[0])
    if origin is typing.Literal:
        return {"literal": list(args)}
    if origin in (typing.Union, types.UnionType):
        specs = []
        for spec in map(type_spec, args):
            specs += [] if spec in specs else [spec]
        return "any" if "any" in specs else specs[0] if len(specs) == 1 else {"union": specs}
    if origin in _SEQUENCES:
        items = [arg for arg in args if arg is not Ellipsis]
        item = type_spec(typing.Union[tuple(items)]) if items else "any"  # noqa: UP007 (a runtime Union)
        return {"list": item}
    if origin in (dict, Mapping, typing.Mapping, typing.Dict):
        return "dict"
    if origin is not None and (origin is Callable or getattr(origin, "__module__", "") == "collections.abc"):
        return "object"
    if isinstance(hint, type):
        if issubclass(hint, PurePath):
            return "str"
        return "object"
    return "any"


def _is_component(value: Any) -> bool:
    return isinstance(value, dict) and COMPONENT_KEY in value


def matches(value: Any, spec: Spec) -> bool:
    """Whether a plain config value (resolved: dicts, lists, scalars) can be passed where `spec` is
    expected. A nested `_component_` node builds something of a type only known once built: it matches."""
    if spec == "any" or _is_component(value):
        return True
    if isinstance(spec, dict):
        if "union" in spec:
            return any(matches(value, option) for option in spec["union"])
        if "literal" in spec:
            return any(type(value) is type(option) and value == option for option in spec["literal"])
        if "list" in spec:
            return isinstance(value, list) and all(matches(item, spec["list"]) for item in value)
    if spec == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if spec == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    simple = {"bool": bool, "str": str, "dict": dict, "none": type(None)}
    return isinstance(spec, str) and spec in simple and isinstance(value, simple[spec])


def describe(spec: Spec) -> str:
    """A spec as a message says what is expected: "an int or null", "a list of strings"."""
    if isinstance(spec, dict):
        if "union" in spec:
            return " or ".join(describe(option) for option in spec["union"])
        if "literal" in spec:
            return "one of " + ", ".join(repr(option) for option in spec["literal"])
        if "list" in spec:
            return "a list" if spec["list"] == "any" else f"a list of {_plural(spec['list'])}"
    return {"int": "an int", "float": "a number", "bool": "true or false", "str": "a string", "none": "null",
            "dict": "a mapping", "object": "a `_component_` node (it cannot be written as a plain value)",
            "any": "anything"}[spec]


def _plural(spec: Spec) -> str:
    if isinstance(spec, str) and spec in ("int", "float", "bool", "str"):
        return {"int": "ints", "float": "numbers", "bool": "booleans", "str": "strings"}[spec]
    return f"({describe(spec)})"


@dataclass(frozen=True)
class Range:
    """Bounds a number (or each number of a list) must keep: `low`/`high` inclusive unless open.
    NaN and infinities are never in range."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


@dataclass(frozen=True)
class Pattern:
    """A string a regular expression must match whole, and how to say it in a message."""

    regex: str
    says: str

    def contains(self, value: str) -> bool:
        return re.fullmatch(self.regex, value) is not None

    def __str__(self) -> str:
        return self.says


Constraint = Range | Pattern

# A LoRA rank above this is no low-rank adapter (Llama 3.1 70B is 8192 wide), and a typo such as
# 1e9 would ask for terabytes.
MAX_LORA_RANK = 8192
POSITIVE = Range(0, None, low_open=True)
AT_LEAST_ONE = Range(1, None)
NON_NEGATIVE = Range(0, None)
PROBABILITY_BELOW_ONE = Range(0, 1, high_open=True)

# Ranges of the arguments of tunelite's, torch's and torchao's components, by argument name.
ARGUMENT_RANGES: dict[str, Range] = {
    "lora_rank": Range(1, MAX_LORA_RANK),
    "lora_alpha": POSITIVE,
    "lora_dropout": PROBABILITY_BELOW_ONE,
    "max_seq_len": AT_LEAST_ONE,
    "num_chunks": AT_LEAST_ONE,
    "num_warmup_steps": NON_NEGATIVE,
    "val_fraction": PROBABILITY_BELOW_ONE,
    "lr": NON_NEGATIVE,
    "weight_decay": NON_NEGATIVE,
    "eps": NON_NEGATIVE,
    "momentum": NON_NEGATIVE,
    "betas": PROBABILITY_BELOW_ONE,
    "beta": POSITIVE,
}
# Packages whose components take ARGUMENT_RANGES' names in their meaning; a user's own package may
# mean something else by `lr` or `beta`.
RANGED_PACKAGES = ("tunelite", "torch", "torchao")


@dataclass(frozen=True)
class KeySpec:
    """What a top-level key of a recipe's config must be."""

    type: Spec
    constraint: Constraint | None = None


def _optional(spec: Spec) -> Spec:
    return {"union": [spec, "none"]}


# The top-level keys recipes read, with one meaning in every recipe; a key a copied recipe adds and
# this table lacks is checked by the copy's own code.
RECIPE_KEYS: dict[str, KeySpec] = {
    "output_dir": KeySpec("str"),
    "seed": KeySpec("int", NON_NEGATIVE),
    "shuffle": KeySpec("bool"),
    "batch_size": KeySpec("int", AT_LEAST_ONE),
    "epochs": KeySpec("int", AT_LEAST_ONE),
    "max_steps_per_epoch": KeySpec(_optional("int"), AT_LEAST_ONE),
    "gradient_accumulation_steps": KeySpec("int", AT_LEAST_ONE),
    "clip_grad_norm": KeySpec(_optional("float"), POSITIVE),
    "skip_nonfinite_steps": KeySpec(_optional("int"), NON_NEGATIVE),
    "eval_every_n_steps": KeySpec(_optional("int"), AT_LEAST_ONE),
    "save_every_n_steps": KeySpec(_optional("int"), AT_LEAST_ONE),
    "keep_last_n_checkpoints": KeySpec(_optional("int"), AT_LEAST_ONE),
    "log_every_n_steps": KeySpec("int", AT_LEAST_ONE),
    "device": KeySpec("str", Pattern(r"auto|cpu|mps|(cuda|xpu)(:\d+)?", "auto, cpu, cuda, cuda:N, mps or xpu")),
    "dtype": KeySpec({"literal": ["bf16", "fp32"]}),
    "compile": KeySpec("bool"),
    "enable_activation_checkpointing": KeySpec("bool"),
    "optimizer_in_bwd": KeySpec("bool"),
    "fsdp_reshard_after_forward": KeySpec("bool"),
    "fsdp_shard_frozen_weights": KeySpec("bool"),
    "save_merged_model": KeySpec("bool"),
    "resume_from_checkpoint": KeySpec({"union": ["bool", "str"]}),
    "log_peak_memory_stats": KeySpec("bool"),
    "log_prob_chunks": KeySpec("int", AT_LEAST_ONE),
    "adapter_dir": KeySpec(_optional("str")),
    "max_new_tokens": KeySpec("int", AT_LEAST_ONE),
    "temperature": KeySpec("float", NON_NEGATIVE),
    "top_k": KeySpec(_optional("int"), AT_LEAST_ONE),
    "top_p": KeySpec(_optional("float"), Range(0, 1, low_open=True)),
    "chat": KeySpec("bool"),
    "system_prompt": KeySpec(_optional("str")),
    "prompt": KeySpec(_optional("str")),
}


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def value_problem(key_path: str, value: Any, spec: Spec, constraint: Constraint | None) -> str | None:
    """The one-line problem with a config value, naming its key, what it is and what it must be;
    None when it fits."""
    if not matches(value, spec):
        return f"{key_path}: {_show(value)} is not {describe(spec)}; set {key_path} to {describe(spec)}"
    if constraint is None or _is_component(value):
        return None
    numbers = value if isinstance(value, list) else [value]
    for item in numbers:
        out = (isinstance(constraint, Range) and isinstance(item, (int, float)) and not isinstance(item, bool)
               and not constraint.contains(item)) or (
            isinstance(constraint, Pattern) and isinstance(item, str) and not constraint.contains(item))
        if out:
            verdict = "is out of range" if isinstance(constraint, Range) else "is not valid"
            return f"{key_path}: {_show(value)} {verdict}; it must be {constraint}"
    return None


def argument_constraint(dotted: str, name: str) -> Range | None:
    """The range ARGUMENT_RANGES gives argument `name` of the component `dotted`, if any."""
    if dotted.split(".")[0] not in RANGED_PACKAGES:
        return None
    return ARGUMENT_RANGES.get(name)


def check_arguments(dotted: str, arguments: Mapping[str, Any], key_path: str) -> None:
    """Raise a ConfigError for the first argument of `dotted` out of ARGUMENT_RANGES' range, naming
    the config key (`key_path`.name): what a builder called from Python checks, as validation does."""
    for name, value in arguments.items():
        constraint = argument_constraint(dotted, name)
        problem = constraint and value_problem(f"{key_path}.{name}" if key_path else name, value, "any", constraint)
        if problem:
            raise ConfigError(problem)
