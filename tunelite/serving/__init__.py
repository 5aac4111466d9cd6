"""Serving a fine-tuned model over HTTP with OpenAI's API (`tunelite serve`)."""

from tunelite.serving.openai_api import APIError
from tunelite.serving.server import OpenAIServer, ServedModel, serve_until_signal

__all__ = ["APIError", "OpenAIServer", "ServedModel", "serve_until_signal"]
