"""Turning tokens into text one at a time, for printing a reply while it is generated."""

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
