"""Which packages a config may name `_component_`s from, so a downloaded config cannot run any
callable on the machine (`_component_: os.system`).

tunelite, torch and torchao are trusted; a user's own packages are trusted when the config says so
(`trusted_components: [mypkg]`, a top-level key every recipe accepts, handled here rather than in
each recipe's CONFIG_KEYS) or the command line does (`--trust mypkg`). Anything else is refused
before it is imported. Within the trusted packages, the entry points that fetch, unpickle or
compile code from elsewhere are refused too.
"""

import contextlib
import difflib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from typing import Any

from omegaconf import DictConfig, ListConfig

TRUST_KEY = "trusted_components"
DEFAULT_TRUSTED = ("tunelite", "torch", "torchao")
# Inside the trusted packages: what loads code (torch.hub runs a repository's hubconf.py, torch.load
# and torch.package unpickle, cpp_extension compiles, torch.jit.load and load_library load programs)
# or runs a script by path (tunelite's command line).
NEVER_TRUSTED = (
    "torch.hub", "torch.load", "torch.serialization", "torch.package", "torch.utils.cpp_extension", "torch.jit.load",
    "torch.ops.load_library", "torch.classes.load_library", "torch.utils.model_zoo", "tunelite.cli",
)

# The packages the config being built trusts beyond the defaults, while `instantiate` builds it, so
# a component that resolves a dotted path itself (cpu_offload_optimizer's `optimizer`) is held to them.
_building_with: ContextVar[tuple[str, ...]] = ContextVar("trusted_components", default=())


def _within(dotted: str, package: str) -> bool:
    return dotted == package or dotted.startswith(package + ".")


def untrusted_problem(dotted: str, where: str, trusted: Sequence[str] | None = None) -> str | None:
    """Why the component `dotted` may not be built, naming the key and the fix; None when it may.
    `trusted`: the user's packages (by default those of the config being built)."""
    trusted = _building_with.get() if trusted is None else tuple(trusted)
    refused = next((name for name in NEVER_TRUSTED if _within(dotted, name)), None)
    if refused is not None:
        return (f"{where}: {dotted} is refused: {refused} loads or runs code from outside the config, which a "
                "config may not ask for; build that object in your own recipe or package instead")
    if any(_within(dotted, package) for package in (*DEFAULT_TRUSTED, *trusted)):
        return None
    package, _, rest = dotted.partition(".")
    close = difflib.get_close_matches(package, [*DEFAULT_TRUSTED, *trusted], n=1)
    if close:
        suggestion = f"{close[0]}.{rest}" if rest else close[0]
        return f"{where}: cannot import {dotted}: no package {package!r}; did you mean {suggestion}?"
    return (f"{where}: {dotted} is not from tunelite, torch or torchao, and {package!r} is not trusted; a config "
            f"may only run code from packages you trust: if you trust it, add `{TRUST_KEY}: [{package}]` to the "
            f"config or pass --trust {package}")


def is_outside(dotted: str) -> bool:
    """Whether `dotted` comes from a package beyond tunelite, torch and torchao."""
    return not any(_within(dotted, package) for package in DEFAULT_TRUSTED)


def config_trust(cfg: Any) -> tuple[str, ...]:
    """The packages a config trusts beyond the defaults: its `trusted_components` list (read from
    the root of whatever node is given); a value that is no list of package names is ignored here
    and reported by `trust_key_problem`."""
    root = cfg._get_root() if isinstance(cfg, (DictConfig, ListConfig)) else cfg
    value = root.get(TRUST_KEY) if isinstance(root, (DictConfig, dict)) else None
    if isinstance(value, (ListConfig, list)) and all(isinstance(item, str) for item in value):
        return tuple(value)
    return ()


def trust_key_problem(cfg: DictConfig) -> str | None:
    """The problem with a config's `trusted_components` value, if it has one."""
    if TRUST_KEY not in cfg:
        return None
    value = cfg[TRUST_KEY]
    names = list(value) if isinstance(value, ListConfig) else None
    if names is None or not all(isinstance(n, str) and all(p.isidentifier() for p in n.split(".")) for n in names):
        return (f"{TRUST_KEY}: must be a list of package names, like [mypkg]; got {value!r}")
    return None


def add_trust(cfg: DictConfig, packages: Sequence[str]) -> None:
    """Adds the command line's `--trust` packages to the config's `trusted_components`."""
    if packages:
        cfg[TRUST_KEY] = [*config_trust(cfg), *packages]


@contextlib.contextmanager
def building_with(trusted: Sequence[str]) -> Iterator[None]:
    """Within this block, components are held to `trusted` (plus the defaults)."""
    token = _building_with.set(tuple(trusted))
    try:
        yield
    finally:
        _building_with.reset(token)
