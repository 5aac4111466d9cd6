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

# The top-level keys a recipe reads: torchtune 0.6's names, so an existing config ports by changing
# component paths, plus tunelite's own in the same style. torchtune's `clip_grad_norm` is kept;
# there is deliberately no `max_grad_norm`.
RECIPE_KEYS: frozenset[str] = frozenset({
    # what to build
    "model", "tokenizer", "checkpointer", "dataset", "val_dataset", "optimizer", "lr_scheduler",
    "loss", "metric_logger", "profiler",
    # where things go and how to resume
    "output_dir", "log_dir", "resume_from_checkpoint", "save_every_n_steps", "keep_last_n_checkpoints",
    "save_merged_model", "save_adapter_weights_only",
    # the loop
    "seed", "shuffle", "batch_size", "epochs", "max_steps_per_epoch", "gradient_accumulation_steps",
    "clip_grad_norm", "skip_nonfinite_steps", "eval_every_n_steps", "num_workers",
    # device and memory
    "device", "dtype", "compile", "enable_activation_checkpointing", "enable_activation_offloading",
    "optimizer_in_bwd", "fsdp_reshard_after_forward",
    # logging
    "log_every_n_steps", "log_peak_memory_stats",
    # generation (recipes/generate.py)
    "adapter_dir", "prompt", "chat", "system_prompt", "max_new_tokens", "temperature", "top_k", "top_p",
})


def validate_config(cfg: DictConfig, *, source: str | Path | None = None) -> None:
    """Raise one ConfigError listing every unknown key, bad component and unresolvable value in `cfg`."""
    problems: list[str] = []
    _check(cfg, "", problems)
    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        listing = "\n".join(f"  - {problem}" for problem in problems)
        raise ConfigError(f"{source or 'config'} has {count}:\n{listing}")


def _check(node: DictConfig | ListConfig, path: str, problems: list[str]) -> None:
    keys: list[Any] = list(node.keys()) if isinstance(node, DictConfig) else list(range(len(node)))
    values: dict[Any, Any] = {}
    for key in keys:
        key_path = f"{path}.{key}" if path else str(key)
        if not path and key not in RECIPE_KEYS:
            close = difflib.get_close_matches(str(key), sorted(RECIPE_KEYS), n=1)
            hint = f"did you mean {close[0]}?" if close else "remove it or check its spelling"
            problems.append(f"{key_path}: not a recipe key ({hint})")
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
            _check(values[key], key_path, problems)
    if COMPONENT_KEY in values:
        dotted = values[COMPONENT_KEY]
        try:
            fn = resolve_component(dotted, path)
        except ConfigError as error:
            problems.append(str(error))
            return
        problems.extend(unknown_key_problems(fn, dotted, [str(k) for k in keys if k != COMPONENT_KEY], path))
