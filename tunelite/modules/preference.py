"""Preference losses: from the policy's (and a reference's) log-probabilities of the chosen and
rejected responses, a loss per pair and the implicit rewards that are logged with it.

Each takes per-pair tensors (b,): summed log-probs of the chosen and rejected responses under the
policy, the same under the reference (None when the loss needs no reference), and the responses'
labelled-token counts (for the losses that average per token). The reference is the policy with
its adapters disabled, so a LoRA run keeps one copy of the weights.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tunelite.errors import ConfigError


@dataclass
class PreferenceOutput:
    """Per pair: the loss, and the rewards of the chosen and rejected responses (detached)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


class DPOLoss(nn.Module):
    """Direct Preference Optimization (Rafailov et al., 2023): -log sigmoid(beta * (chosen log-ratio -
    rejected log-ratio)), each log-ratio the policy's log-prob over the reference's. `label_smoothing`
    > 0 is conservative DPO (cDPO, Mitchell 2023): it assumes that share of the labels flipped."""

    needs_reference = True

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if beta <= 0:
            raise ConfigError(f"loss.beta must be positive (the strength of the pull toward the reference), got {beta}")
        if not 0 <= label_smoothing < 0.5:
            raise ConfigError(f"loss.label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.beta, self.label_smoothing = beta, label_smoothing

    def forward(
        self, chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
        chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
    ) -> PreferenceOutput:
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        logits = self.beta * (chosen_ratio - rejected_ratio)
        losses = -F.logsigmoid(logits) * (1 - self.label_smoothing) - F.logsigmoid(-logits) * self.label_smoothing
        return PreferenceOutput(losses, self.beta * chosen_ratio.detach(), self.beta * rejected_ratio.detach())


class IPOLoss(nn.Module):
    """Identity Preference Optimization (Azar et al., 2023): (delta - 1 / (2 beta))^2, where delta is
    the difference of the per-token averaged log-ratios (TRL's normalisation, which its authors
    confirmed), so beta means the same whatever the responses' lengths."""

    needs_reference = True

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        if beta <= 0:
            raise ConfigError(f"loss.beta must be positive (IPO's regularisation strength), got {beta}")
        self.beta = beta

    def forward(
        self, chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
        chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
    ) -> PreferenceOutput:
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (delta - 1 / (2 * self.beta)) ** 2
        return PreferenceOutput(losses, self.beta * chosen_ratio.detach(), self.beta * rejected_ratio.detach())


class SimPOLoss(nn.Module):
    """SimPO (Meng et al., 2024): no reference; the reward is beta times the per-token average log-prob,
    and the chosen must beat the rejected by a margin gamma: -log sigmoid(reward gap - gamma)."""

    needs_reference = False

    def __init__(self, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if beta <= 0:
            raise ConfigError(f"loss.beta must be positive (SimPO's reward scale), got {beta}")
        if not 0 <= label_smoothing < 0.5:
            raise ConfigError(f"loss.label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.beta, self.gamma, self.label_smoothing = beta, gamma, label_smoothing

    def forward(
        self, chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor | None,
        ref_rejected: torch.Tensor | None, chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
    ) -> PreferenceOutput:
        chosen_reward = self.beta * chosen / chosen_tokens.clamp(min=1)
        rejected_reward = self.beta * rejected / rejected_tokens.clamp(min=1)
        logits = chosen_reward - rejected_reward - self.gamma
        losses = -F.logsigmoid(logits) * (1 - self.label_smoothing) - F.logsigmoid(-logits) * self.label_smoothing
        return PreferenceOutput(losses, chosen_reward.detach(), rejected_reward.detach())
