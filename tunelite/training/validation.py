"""The validation loss a recipe reports every eval_every_n_steps and at the end."""

import torch
from torch.utils.data import DataLoader

from tunelite.modules.loss import IGNORE_INDEX
from tunelite.runtime.ranks import sum_over_ranks


@torch.no_grad()
def validation_loss(model: torch.nn.Module, loss_fn: torch.nn.Module, loader: DataLoader) -> torch.Tensor:
    """Mean loss per labelled token over the whole validation set (summed over ranks' shares
    when distributed), with dropout off; leaves the model in training mode."""
    device = model.device
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        n = (batch["labels"] != IGNORE_INDEX).sum()
        hidden = model.hidden_states(batch["tokens"], batch.get("positions"),
                                     document_ids=batch.get("document_ids"))
        total += loss_fn(hidden, batch["labels"], model.output) * n
        count += n
    model.train()
    return sum_over_ranks(total) / sum_over_ranks(count).clamp(min=1)
