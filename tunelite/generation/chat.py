"""A conversation with the model: the chat layout of the tokenizer, and the reply streamed out."""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from tunelite.errors import TuneliteError
from tunelite.generation.loop import GenerationSettings, GenerationStats, generate
from tunelite.generation.streaming import TextStream
from tunelite.models.llama import TransformerDecoder
from tunelite.tokenizers.messages import Message


def chat_prompt(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """The conversation in the tokenizer's chat format (Llama 3 headers, Llama 2 [INST]), ending
    where the assistant's reply begins: an empty assistant turn without end tokens."""
    tokens, _ = tokenizer.tokenize_messages([*messages, Message("assistant", "")], add_end_tokens=False)
    return tokens


class ChatSession:
    """Replies to one message after another, each generated from the whole conversation so far.

    With `chat=False` each message is a plain text prompt to continue, with no chat layout and
    no memory of earlier ones (for base models)."""

    def __init__(
        self, model: TransformerDecoder, tokenizer: Any, settings: GenerationSettings, chat: bool = True,
        system_prompt: str | None = None,
    ) -> None:
        self.model, self.tokenizer, self.settings, self.chat = model, tokenizer, settings, chat
        self.messages: list[Message] = [Message("system", system_prompt)] if chat and system_prompt else []

    def prompt_tokens(self, text: str) -> list[int]:
        """The tokens the model continues to answer `text`, the conversation before it included."""
        if not self.chat:
            return self.tokenizer.encode(text, add_bos=True, add_eos=False)
        return chat_prompt(self.tokenizer, [*self.messages, Message("user", text)])

    def reply(self, text: str, write: Callable[[str], None], generator: torch.Generator | None = None
              ) -> tuple[str, GenerationStats]:
        """Generates the answer to `text`, passing its text to `write` piece by piece as the tokens
        arrive; the exchange then joins the conversation."""
        prompt = self.prompt_tokens(text)
        window = self.model.args.max_seq_len
        if len(prompt) >= window:
            raise TuneliteError(f"the prompt is {len(prompt)} tokens, the model's window {window}: shorten it"
                              + (" or start a new conversation" if self.messages else ""))
        settings = self.settings
        if len(prompt) + settings.max_new_tokens > window:
            settings = dataclasses.replace(settings, max_new_tokens=window - len(prompt))
        stop = set(self.tokenizer.stop_tokens)
        stream = TextStream(self.tokenizer.decode)

        def on_tokens(new: list[int]) -> None:
            if new[0] not in stop:
                write(stream.push(new[0]))

        (answer,), stats = generate(self.model, [prompt], settings, stop, on_tokens=on_tokens, generator=generator)
        write(stream.flush())
        reply = self.tokenizer.decode(answer)
        if self.chat:
            self.messages += [Message("user", text), Message("assistant", reply)]
        return reply, stats
