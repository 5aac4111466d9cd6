"""Metric loggers a config names under `metric_logger`; the recipe writes to all of them.

No environment value reaches a log: the config is written as loaded, `${oc.env:HF_TOKEN}` kept
unresolved, and whatever a logger writes is scrubbed of the values of the environment's
secret-like variables (HF_TOKEN, WANDB_API_KEY, ...) and of values under secret-like keys.
"""

import json
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig, OmegaConf

from tunelite.runtime.secrets import environment_secrets, redact, scrub


class MetricLogger(Protocol):
    def log_config(self, config: DictConfig) -> None: ...

    def log_dict(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def _format(metrics: dict[str, float], step: int) -> str:
    return f"step {step} | " + " | ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in metrics.items())


def loggable_config(config: DictConfig) -> dict[str, Any]:
    """The config as loaded, with overrides but interpolations unresolved, and secrets redacted:
    what a logger may write or upload."""
    return redact(OmegaConf.to_container(config, resolve=False), environment_secrets())


class StdoutLogger:
    """One line per logging step on stdout, clear of the progress bar."""

    def log_config(self, config: DictConfig) -> None:
        pass

    def log_dict(self, metrics: dict[str, float], step: int) -> None:
        from tqdm import tqdm

        tqdm.write(scrub(_format(metrics, step), environment_secrets()), file=sys.stdout)

    def close(self) -> None:
        pass


class DiskLogger:
    """A JSONL file per run (one object per logging step) and the config as loaded beside it.

    Nothing is written before the first row: a run refused before it trains leaves no folder."""

    def __init__(self, log_dir: str, filename: str | None = None) -> None:
        self.log_dir = Path(log_dir)
        name = filename or f"metrics_{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        self.path = self.log_dir / name
        self._config: str | None = None
        self._file: Any = None

    def log_config(self, config: DictConfig) -> None:
        self._config = OmegaConf.to_yaml(loggable_config(config))

    def log_dict(self, metrics: dict[str, float], step: int) -> None:
        if self._file is None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            if self._config is not None:
                self.path.with_suffix(".config.yaml").write_text(self._config)
            self._file = open(self.path, "a", buffering=1)
        self._file.write(scrub(json.dumps({"step": step, **metrics}), environment_secrets()) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class MetricLoggers:
    """Fans one call out to every configured logger."""

    def __init__(self, loggers: list[Any]) -> None:
        self.loggers = loggers

    def log_config(self, config: DictConfig) -> None:
        for logger in self.loggers:
            logger.log_config(config)

    def log_dict(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log_dict(metrics, step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


class WandBLogger:
    """Weights & Biases: project, entity, run name and tags from the config, the config as loaded
    (interpolations unresolved, secrets redacted) recorded with the run. `WANDB_MODE=offline` (or
    `mode: offline`) writes the run to `log_dir` for a later `wandb sync`, with no network."""

    def __init__(
        self, project: str, entity: str | None = None, name: str | None = None, tags: list[str] | None = None,
        log_dir: str | None = None, mode: str | None = None,
    ) -> None:
        import wandb

        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, entity=entity, name=name, tags=tags, dir=log_dir, mode=mode)

    def log_config(self, config: DictConfig) -> None:
        self.run.config.update(loggable_config(config), allow_val_change=True)

    def log_dict(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()
