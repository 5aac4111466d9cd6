"""Using a fine-tuned model: load it (base + adapter, or merged), lay out a chat, sample tokens
with a KV cache, and stream the text as it arrives."""

from tunelite.generation.chat import ChatSession, Reply, chat_prompt, stream_reply
from tunelite.generation.loop import GenerationSettings, GenerationStats, generate
from tunelite.generation.loading import load_generation_model
from tunelite.generation.sampling import sample_next_token, top_k_filter, top_p_filter
from tunelite.generation.streaming import StopStrings, TextStream

__all__ = [
    "ChatSession",
    "GenerationSettings",
    "GenerationStats",
    "Reply",
    "StopStrings",
    "TextStream",
    "chat_prompt",
    "generate",
    "load_generation_model",
    "sample_next_token",
    "stream_reply",
    "top_k_filter",
    "top_p_filter",
]
