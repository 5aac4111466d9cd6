"""Choosing the next token from logits: greedy, or sampled with temperature, top-k and top-p.

Filters set the logits of excluded tokens to -inf, so they compose and the softmax after them
renormalises over what is left.
"""

import torch


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keeps each row's k largest logits (and any tied with the k-th): the rest cannot be sampled."""
    kth_largest = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keeps each row's most likely tokens up to the first whose cumulative probability reaches p
    (nucleus sampling): the long tail of unlikely tokens cannot be sampled. The top token always stays."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= p, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample_next_token(
    logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(b, vocab) logits -> (b,) token ids. Temperature 0 is greedy (the most likely token, no
    randomness); otherwise logits are divided by the temperature, filtered, and sampled."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)
