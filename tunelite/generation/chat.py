"""A conversation with the model: the chat layout of the tokenizer, and the reply streamed out
(to a terminal, or to an HTTP client)."""

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tunelite.errors import TuneliteError
from tunelite.generation.loop import GenerationSettings, GenerationStats, generate
from tunelite.generation.streaming import StopStrings, TextStream
from tunelite.models.decoder import TransformerDecoder
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
        reply = stream_reply(self.model, self.tokenizer, prompt, settings, write, generator)
        if self.chat:
            self.messages += [Message("user", text), Message("assistant", reply.text)]
        return reply.text, reply.stats


@dataclass(frozen=True)
class Reply:
    """A generated reply: its text, how many tokens it took (an end token excluded), and why it
    ended, in OpenAI's words: "stop" (an end token or a stop string), "length" (the token limit)."""

    text: str
    num_tokens: int
    finish_reason: str
    stats: GenerationStats


def stream_reply(
    model: TransformerDecoder, tokenizer: Any, prompt: list[int], settings: GenerationSettings,
    write: Callable[[str], None], generator: torch.Generator | None = None, stop_strings: Sequence[str] = (),
) -> Reply:
    """Continues `prompt` until one of the tokenizer's stop tokens, the first of `stop_strings` (left
    out) or `settings.max_new_tokens`, passing the text to `write` piece by piece as it is generated."""
    stop = set(tokenizer.stop_tokens)
    stream, cut = TextStream(tokenizer.decode), StopStrings(stop_strings)
    pieces: list[str] = []

    def emit(text: str) -> None:
        if text:
            pieces.append(text)
            write(text)

    def on_tokens(new: list[int]) -> bool:
        if new[0] not in stop:
            emit(cut.push(stream.push(new[0])))
        return cut.stopped

    (answer,), stats = generate(model, [prompt], settings, stop, on_tokens=on_tokens, generator=generator)
    emit(cut.push(stream.flush()))
    emit(cut.flush())
    ended = cut.stopped or stats.num_tokens > len(answer)
    return Reply("".join(pieces), len(answer), "stop" if ended else "length", stats)
