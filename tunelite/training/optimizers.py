"""Optimizer set-ups that let a full fine-tune of an 8B model fit a 24 GB card.

Full gradients of 8B parameters in bf16 are 15 GiB on their own. `OptimizerInBackward` steps
each parameter as soon as its gradient is complete and frees that gradient, so they never all
exist; `cpu_offload_optimizer` keeps optimizer state (and, optionally, gradients) in host memory
through torchao's CPUOffloadOptimizer. `tunelite.training.offload_optimizer.overlapped_cpu_adamw`
does the same with fp32 master weights, gradient accumulation and clipping, and overlaps the
CPU's work with the GPU's.
"""

from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from tunelite.checkpointing.state import newest_checkpoint_note
from tunelite.config import resolve_component
from tunelite.errors import NonFiniteError


class OptimizerInBackward:
    """One optimizer per parameter, stepped from the parameter's post-accumulate-grad hook.

    It offers what the recipe and the LR schedule use (`param_groups`, `step`, `zero_grad`,
    `state_dict`, `load_state_dict`); `step` and `zero_grad` have nothing left to do. Gradient
    clipping and accumulation need all gradients at once and cannot be combined with it."""

    def __init__(self, params: Iterable[torch.nn.Parameter], make_optimizer: Callable[[list], Any]) -> None:
        self.optimizers = [make_optimizer([p]) for p in params if p.requires_grad]
        for opt in self.optimizers:
            opt.param_groups[0]["params"][0].register_post_accumulate_grad_hook(self._step_hook(opt))

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Looked up each time: a sub-optimizer's load_state_dict replaces its group list, and a
        list kept from before would leave the LR schedule setting groups nobody reads."""
        return [group for opt in self.optimizers for group in opt.param_groups]

    @staticmethod
    def _step_hook(opt: Any) -> Callable[[torch.Tensor], None]:
        def hook(_: torch.Tensor) -> None:
            opt.step()
            opt.zero_grad(set_to_none=True)

        return hook

    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {str(i): opt.state_dict() for i, opt in enumerate(self.optimizers)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state) != len(self.optimizers):
            raise ValueError(f"state holds {len(state)} optimizers, the model has {len(self.optimizers)} parameters")
        for i, opt in enumerate(self.optimizers):
            opt.load_state_dict(state[str(i)])


def backward_stepping_weights(
    loss: torch.Tensor, params: Iterable[torch.nn.Parameter], step: int, output_dir: Path
) -> torch.Tensor:
    """`loss.backward()` under an OptimizerInBackward, which steps each weight from its gradient hook
    and frees the gradient: returns the total gradient norm, gathered by tensor hooks as the
    gradients arrive (those run before the optimizer's hook). A non-finite norm shows only once
    the weights have taken it, so it raises NonFiniteError whatever skip_nonfinite_steps says."""
    norms: list[torch.Tensor] = []
    hooks = [p.register_hook(lambda grad: norms.append(torch.linalg.vector_norm(grad)))
             for p in params if p.requires_grad]
    try:
        loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    grad_norm = torch.linalg.vector_norm(torch.stack(norms))
    if not torch.isfinite(grad_norm):
        raise NonFiniteError(
            f"step {step}: the gradient norm is {grad_norm.item()} although the loss ({loss.item():.4g}) is finite; "
            "optimizer_in_bwd: True had already stepped each weight during backward, so the run stops "
            f"whatever skip_nonfinite_steps says. {newest_checkpoint_note(Path(output_dir))}"
        )
    return grad_norm


def cpu_offload_optimizer(
    params: Iterable[torch.nn.Parameter], optimizer: str = "torch.optim.AdamW", offload_gradients: bool = False,
    **optimizer_kwargs: Any,
) -> Any:
    """torchao's CPUOffloadOptimizer around `optimizer` (a dotted class path, so YAML can name it).

    State and the step live in host memory; `offload_gradients` also moves each gradient to the
    host as it is produced (not with gradient accumulation). Needs a CUDA (or XPU) device."""
    from torchao.optim import CPUOffloadOptimizer

    return CPUOffloadOptimizer(
        params, resolve_component(optimizer, "optimizer.optimizer"), offload_gradients=offload_gradients,
        **optimizer_kwargs,
    )
