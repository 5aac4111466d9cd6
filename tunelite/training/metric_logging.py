"""Metric loggers a config names under `metric_logger`; the recipe writes to all of them."""

import json
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig, OmegaConf


class MetricLogger(Protocol):
    def log_config(self, config: DictConfig) -> None: ...

    def log_dict(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def _format(metrics: dict[str, float], step: int) -> str:
    return f"step {step} | " + " | ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in metrics.items())


class StdoutLogger:
    """One line per logging step on stdout, clear of the progress bar."""

    def log_config(self, config: DictConfig) -> None:
        pass

    def log_dict(self, metrics: dict[str, float], step: int) -> None:
        from tqdm import tqdm

        tqdm.write(_format(metrics, step), file=sys.stdout)

    def close(self) -> None:
        pass


class DiskLogger:
    """A JSONL file per run (one object per logging step) and the resolved config beside it."""

    def __init__(self, log_dir: str, filename: str | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        name = filename or f"metrics_{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        self.path = self.log_dir / name
        self._file = open(self.path, "a", buffering=1)

    def log_config(self, config: DictConfig) -> None:
        (self.log_dir / self.path.with_suffix(".config.yaml").name).write_text(OmegaConf.to_yaml(config))

    def log_dict(self, metrics: dict[str, float], step: int) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")

    def close(self) -> None:
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
    """Weights & Biases: project, entity, run name and tags from the config, the whole resolved
    config recorded with the run. `WANDB_MODE=offline` (or `mode: offline`) writes the run to
    `log_dir` for a later `wandb sync`, with no network."""

    def __init__(
        self, project: str, entity: str | None = None, name: str | None = None, tags: list[str] | None = None,
        log_dir: str | None = None, mode: str | None = None,
    ) -> None:
        import wandb

        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, entity=entity, name=name, tags=tags, dir=log_dir, mode=mode)

    def log_config(self, config: DictConfig) -> None:
        self.run.config.update(OmegaConf.to_container(config, resolve=True), allow_val_change=True)

    def log_dict(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()
