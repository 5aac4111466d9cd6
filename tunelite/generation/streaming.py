"""Turning tokens into text one at a time, for printing a reply while it is generated, and
ending it at a stop string without ever showing part of one."""

from collections.abc import Callable, Sequence


class TextStream:
    """Incremental detokenization: `push(token)` returns the text that token completes.

    A token can end in the middle of a multi-byte character (BPE tokens are bytes), and
    SentencePiece drops the leading space of the first piece it decodes; so each new token is
    decoded together with the token before it, and nothing is returned while the text ends in
    an incomplete character (U+FFFD), as text-generation-inference does."""

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self._prefix = 0  # start of the context decoded with new tokens
        self._read = 0  # tokens whose text has been returned

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.decode(self.ids[self._prefix:self._read])
        text = self.decode(self.ids[self._prefix:])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(before):]
        return ""

    def flush(self) -> str:
        """The text still held back at the end (a reply that stops inside a character), as decoded."""
        before = self.decode(self.ids[self._prefix:self._read])
        text = self.decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return text[len(before):]

    def text(self) -> str:
        """Everything pushed so far, decoded at once."""
        return self.decode(self.ids)


class StopStrings:
    """Cuts streamed text at the first of some stop strings (OpenAI's `stop`), which is left out.

    Text that could be the beginning of a stop string is held back until the next piece shows
    whether it is one, so a streamed reply never shows a stop string, or part of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [stop for stop in stops if stop]
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """The text that is now certain to be part of the reply."""
        if self.stopped:
            return ""
        self.pending += text
        found = [i for i in (self.pending.find(stop) for stop in self.stops) if i >= 0]
        if found:
            self.stopped = True
            out, self.pending = self.pending[:min(found)], ""
            return out
        held = max((k for stop in self.stops for k in range(1, min(len(stop), len(self.pending) + 1))
                    if self.pending.endswith(stop[:k])), default=0)
        out, self.pending = self.pending[:len(self.pending) - held], self.pending[len(self.pending) - held:]
        return out

    def flush(self) -> str:
        """The text held back when the reply ended without completing a stop string."""
        out, self.pending = self.pending, ""
        return out
