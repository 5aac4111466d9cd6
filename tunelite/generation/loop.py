"""The generation loop: prompts in, new tokens out, with a KV cache so each step runs one token.

Prompts of different lengths share a batch by left padding: every row's last prompt token sits
in the same column, so one new column is appended per step. Padding is kept out of attention
by the mask, and positions count real tokens only, so a padded row generates exactly what it
would alone.
"""

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch

from tunelite.errors import ConfigError
from tunelite.generation.sampling import sample_next_token
from tunelite.models.decoder import TransformerDecoder


@dataclass(frozen=True)
class GenerationSettings:
    """How many tokens to generate and how to pick them; the names are the config's keys."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens: must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature: must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k: must be at least 1 or null, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: must be in (0, 1] or null, got {self.top_p}")


@dataclass(frozen=True)
class GenerationStats:
    """What a user wants to know of a reply's speed: the wait for its first token, then the pace.
    `num_tokens` counts the steps taken (per row), a final stop token included."""

    num_tokens: int
    seconds: float
    time_to_first_token: float

    @property
    def tokens_per_s(self) -> float:
        """Decoding speed after the first token (which includes reading the whole prompt)."""
        decode_seconds = self.seconds - self.time_to_first_token
        if self.num_tokens < 2 or decode_seconds <= 0:
            return self.num_tokens / self.seconds if self.seconds > 0 else 0.0
        return (self.num_tokens - 1) / decode_seconds


def attention_mask(valid: torch.Tensor, start: int) -> torch.Tensor:
    """(b, 1, s, start + s) boolean SDPA mask for the columns from `start` of a left-padded batch
    whose real tokens are `valid` (b, start + s): causal, and blind to padding. A padding column
    sees itself, so no row is all False (which would give NaN)."""
    length = valid.shape[1]
    keys = torch.arange(length, device=valid.device)
    queries = keys[start:, None]
    return ((keys[None, :] <= queries) & (valid[:, None, :] | (keys[None, :] == queries)))[:, None]


@torch.inference_mode()
def generate(
    model: TransformerDecoder,
    prompts: Sequence[Sequence[int]],
    settings: GenerationSettings,
    stop_tokens: Collection[int] = (),
    use_cache: bool = True,
    on_tokens: Callable[[list[int]], bool | None] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[list[list[int]], GenerationStats]:
    """Continues each prompt by up to `settings.max_new_tokens` tokens, a row ending at its first
    stop token (not included in its result). `on_tokens` receives each step's new token of every
    row, for streaming; returning True ends generation after that step (a stop string seen). Without `use_cache` each step recomputes the whole sequence: the
    reference the cache is tested against. The model should be in eval mode."""
    device = model.device
    longest = max(len(p) for p in prompts)
    total = longest + settings.max_new_tokens
    tokens = torch.zeros((len(prompts), total), dtype=torch.long, device=device)
    valid = torch.ones((len(prompts), total), dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt):longest] = torch.tensor(prompt, dtype=torch.long)
        valid[row, :longest - len(prompt)] = False
    positions = (valid.cumsum(dim=1) - 1).clamp(min=0)
    stop = torch.tensor(sorted(stop_tokens), dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)

    started = time.perf_counter()
    first_token_at = 0.0
    start, end = 0, longest  # columns this step feeds to the model
    if use_cache:
        model.setup_caches(len(prompts), total)
    try:
        while end < total and not done.all():
            hidden = model.hidden_states(tokens[:, start:end], positions[:, start:end],
                                         attention_mask(valid[:, :end], start))
            next_tokens = sample_next_token(model.output(hidden[:, -1]), settings.temperature, settings.top_k,
                                            settings.top_p, generator)
            tokens[:, end] = next_tokens
            done |= torch.isin(next_tokens, stop)
            new = next_tokens.tolist()  # waits for the GPU: the timings below are real
            if not first_token_at:
                first_token_at = time.perf_counter() - started
            if on_tokens is not None and on_tokens(new):
                done[:] = True
            start, end = (end if use_cache else 0), end + 1
    finally:
        if use_cache:
            model.reset_caches()
    outputs = [_until_stop(row, stop_tokens) for row in tokens[:, longest:end].tolist()]
    stats = GenerationStats(end - longest, time.perf_counter() - started, first_token_at)
    return outputs, stats


def _until_stop(row: list[int], stop_tokens: Collection[int]) -> list[int]:
    return next((row[:i] for i, token in enumerate(row) if token in stop_tokens), row)
