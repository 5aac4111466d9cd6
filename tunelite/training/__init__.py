"""What every recipe shares: setup, model loading, the optimizer step and the loop's bookkeeping."""

from tunelite.training.loop import optimizer_step
from tunelite.training.model_loading import build_loss, load_pretrained_model, restore_weights
from tunelite.training.run_setup import setup_run
from tunelite.training.step_loop import StepLoop

__all__ = ["StepLoop", "build_loss", "load_pretrained_model", "optimizer_step", "restore_weights", "setup_run"]
