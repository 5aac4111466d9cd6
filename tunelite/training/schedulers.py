"""Learning-rate schedules, as plain functions returning a small schedule object.

Not torch's LambdaLR: that insists on a `torch.optim.Optimizer`, and the optimizers that make a
full fine-tune fit (torchao's CPUOffloadOptimizer, optimizer-in-backward) are not one. This sets
`lr` in any object's `param_groups`.
"""

import math
from typing import Any, Callable

import torch


class LambdaSchedule:
    """lr = initial lr x factor(step), with step counting optimizer steps done."""

    def __init__(self, optimizer: Any, factor: Callable[[int], float]) -> None:
        self.optimizer, self.factor = optimizer, factor
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.last_step = 0
        self._apply()

    def _apply(self) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            lr = base * self.factor(self.last_step)
            # torchao's low-bit optimizers keep lr as a tensor so that changing it does not
            # recompile their step: update it in place rather than replace it with a float.
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "base_lrs": self.base_lrs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step, self.base_lrs = state["last_step"], state["base_lrs"]
        self._apply()


def cosine_schedule_with_warmup(
    optimizer: Any, num_warmup_steps: int, num_training_steps: int, num_cycles: float = 0.5
) -> LambdaSchedule:
    """Linear warm-up then cosine decay to zero; the recipe passes num_training_steps."""

    def factor(step: int) -> float:
        if step < num_warmup_steps:
            return step / max(1, num_warmup_steps)
        progress = (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress)))

    return LambdaSchedule(optimizer, factor)

