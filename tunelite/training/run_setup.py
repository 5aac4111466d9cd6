"""What every recipe builds before its model, in one call: device, precision, seed, loggers,
tokenizer, data and the step counts, so recipes share this code instead of copies of it."""

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from tunelite.config import instantiate
from tunelite.training.device import get_device, get_dtype
from tunelite.training.loop import build_dataloader, build_metric_logger, steps_per_epoch
from tunelite.training.metric_logging import MetricLoggers
from tunelite.training.seed import set_seed


@dataclass
class RunSetup:
    device: torch.device
    dtype: torch.dtype
    output_dir: Path
    logger: MetricLoggers
    tokenizer: object
    dataset: Dataset
    loader: DataLoader
    steps_per_epoch: int
    total_steps: int
    val_loader: DataLoader | None = None

    def fingerprint(self, cfg: DictConfig, world_size: int = 1) -> dict:
        """What decides which batches come next: a resumed run must agree on all of it."""
        return {"model": cfg.model._component_, "dataset_size": len(self.dataset), "batch_size": cfg.batch_size,
                "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "steps_per_epoch": self.steps_per_epoch,
                "shuffle": cfg.shuffle, "seed": cfg.seed, "world_size": world_size}


def setup_run(cfg: DictConfig, device: torch.device | None = None, rank: int = 0, world_size: int = 1) -> RunSetup:
    device = device or get_device(cfg.device)
    dtype = get_dtype(cfg.dtype, device)
    set_seed(cfg.seed)
    logger = build_metric_logger(cfg.metric_logger if rank == 0 else [])
    logger.log_config(cfg)
    tokenizer = instantiate(cfg.tokenizer)
    dataset = instantiate(cfg.dataset, tokenizer)
    loader = build_dataloader(dataset, cfg.batch_size, cfg.shuffle, tokenizer.pad_id, cfg.seed, rank, world_size)
    steps = steps_per_epoch(loader, cfg.gradient_accumulation_steps, cfg.max_steps_per_epoch)
    val_loader = None
    if cfg.get("val_dataset") or cfg.dataset.get("val_fraction"):
        # Either a dataset of its own, or the held-out share of the training source.
        val_set = (instantiate(cfg.val_dataset, tokenizer) if cfg.get("val_dataset")
                   else instantiate(cfg.dataset, tokenizer, partition="validation"))
        val_loader = build_dataloader(val_set, cfg.batch_size, False, tokenizer.pad_id, cfg.seed, rank, world_size,
                                      drop_last=False)
    return RunSetup(device, dtype, Path(cfg.output_dir), logger, tokenizer, dataset, loader, steps,
                    steps * cfg.epochs, val_loader)
