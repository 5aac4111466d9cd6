"""torch.compile as the recipes use it: one transformer layer at a time."""

from torch import nn


def compile_layers(model: nn.Module) -> None:
    """Compiles each transformer layer on its own: one graph reused for every layer keeps compile
    time short, and the loop and loss stay eager."""
    for layer in model.layers:
        layer.compile()
