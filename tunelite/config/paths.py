"""Checking that what a config names on this machine is there, before anything is built: the
checkpoint folder (config.json and safetensors weights), the tokenizer file, the dataset's file
or glob, an adapter folder, and an output folder that can be created.

Plain file-system checks, no import of torch, so `tunelite validate` and the start of
`tunelite run` report a missing path in a second, not after the model loaded.
"""

import glob
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tunelite.config.values import COMPONENT_KEY
from tunelite.errors import DataError

DATASET_FORMATS = (".json", ".jsonl", ".csv", ".parquet", ".txt")
# `owner/name` as the Hugging Face hub spells dataset names.
_HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+")
_GLOB_CHARS = re.compile(r"[*?[]")


def dataset_files(source: str) -> list[Path] | None:
    """The local files a dataset `source` names (a file, or a glob's files in sorted order, so the
    row order does not depend on the file system), or None for a Hugging Face hub dataset name."""
    if _GLOB_CHARS.search(source):
        paths = sorted(p for p in glob.glob(source, recursive=True) if Path(p).is_file())
        if not paths:
            raise DataError(f"dataset source {source} matches no files")
        return [Path(p) for p in paths]
    path = Path(source)
    if path.is_dir():
        raise DataError(f"dataset source {source} is a folder; name its files with a glob, like {path / '*.jsonl'}")
    if path.is_file():
        return [path]
    if _HUB_NAME.fullmatch(source) and path.suffix not in DATASET_FORMATS:
        return None
    raise DataError(
        f"dataset source {source} does not exist; give a local file ({', '.join(DATASET_FORMATS)}), "
        "a glob like data/*.jsonl, or a Hugging Face dataset name like tatsu-lab/alpaca"
    )


def _checkpoint_folder(path: Path) -> str | None:
    if not path.is_dir():
        return f"{path} is not a folder; point it at a Hugging Face model folder (config.json and *.safetensors)"
    if not (path / "config.json").is_file():
        return f"{path} holds no config.json: it is not a Hugging Face model folder"
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in (*path.glob("*.bin"), *path.glob("*.pth")))
        fix = (f"it holds {pickled[:3]}: tunelite never unpickles weights; convert them to safetensors" if pickled
               else "download the weights into it")
        return f"{path} holds no .safetensors weights; {fix}"
    return None


def _existing(path: Path) -> str | None:
    return None if path.exists() else f"{path} does not exist"


def _dataset_source(source: Path) -> str | None:
    try:
        dataset_files(str(source))
    except DataError as error:
        return str(error)
    return None


def _adapter_folder(path: Path) -> str | None:
    if not (path / "adapter_config.json").is_file():
        return f"{path} is not a peft adapter folder (adapter_config.json and adapter_model.safetensors)"
    return None


def _creatable_folder(path: Path) -> str | None:
    """Whether a run can write into `path`, creating it and its parents: nothing is created here."""
    existing = path
    while not existing.exists():
        if existing.is_symlink():
            return f"{existing} is a dangling symbolic link; remove it or choose another folder"
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot create {path}: {existing} is a file, not a folder; choose another folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot create or write {path}: {existing} is not writable by this user; choose another folder"
    return None


def _resume_folder(path: Path) -> str | None:
    return None if path.is_dir() else f"{path} is not a folder; give a step_N folder, or True for the newest"


# Arguments of tunelite's components that name something on this machine, by the component's
# package (as the config writes it) and the argument's name.
COMPONENT_PATHS: dict[tuple[str, str], Callable[[Path], str | None]] = {
    ("tunelite.checkpointing", "checkpoint_dir"): _checkpoint_folder,
    ("tunelite.tokenizers", "path"): _existing,
    ("tunelite.data", "source"): _dataset_source,
}
# Top-level keys recipes read as paths.
KEY_PATHS: dict[str, Callable[[Path], str | None]] = {
    "output_dir": _creatable_folder,
    "adapter_dir": _adapter_folder,
    "resume_from_checkpoint": _resume_folder,
}


def _components(node: Any, key_path: str) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(key path, dotted name, arguments) of every `_component_` node, nested ones included."""
    if isinstance(node, dict):
        if isinstance(node.get(COMPONENT_KEY), str):
            yield key_path, node[COMPONENT_KEY], node
        for key, value in node.items():
            yield from _components(value, f"{key_path}.{key}" if key_path else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _components(value, f"{key_path}.{index}")


def _plain(cfg: DictConfig, key: str) -> Any:
    try:
        value = cfg[key]
        return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value
    except OmegaConfBaseException:  # reported by validate_config
        return None


def _keyed(key_path: str, problem: str | None) -> str | None:
    return problem and f"{key_path}: {problem}"


def path_problems(cfg: DictConfig) -> list[str]:
    """One line per path the config names that is not there (or, for output_dir, cannot be made),
    with its key."""
    problems = []
    for key in map(str, cfg):
        value = _plain(cfg, key)
        check = KEY_PATHS.get(key)
        if check is not None and isinstance(value, str) and value:
            problems.append(_keyed(key, check(Path(value))))
        for key_path, dotted, arguments in _components(value, key):
            for (package, name), check in COMPONENT_PATHS.items():
                argument = arguments.get(name)
                if (dotted == package or dotted.startswith(package + ".")) and isinstance(argument, str):
                    problems.append(_keyed(f"{key_path}.{name}", check(Path(argument))))
    return [problem for problem in problems if problem]
