"""Using a fine-tuned model: load it (base + adapter, or merged), lay out a chat, sample tokens
with a KV cache, and stream the text as it arrives."""

from tunelite.generation.chat import ChatSession, chat_prompt
from tunelite.generation.loop import GenerationSettings, GenerationStats, generate
from tunelite.generation.loading import load_generation_model
from tunelite.generation.sampling import sample_next_token, top_k_filter, top_p_filter
from tunelite.generation.streaming import TextStream

__all__ = [
    "ChatSession",
    "GenerationSettings",
    "GenerationStats",
    "TextStream",
    "chat_prompt",
    "generate",
    "load_generation_model",
    "sample_next_token",
    "top_k_filter",
    "top_p_filter",
]
