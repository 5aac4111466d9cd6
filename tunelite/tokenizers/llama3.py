"""Llama 3 tokenizer: Meta's tiktoken BPE file, its special tokens and its chat layout.

Also holds the small byte-level BPE trainer that produced the tiny demo tokenizer, so the
demo assets and the tests build their files with the same code.
"""

import base64
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import sentencepiece
import tiktoken

from tunelite.errors import ConfigError, DataError
from tunelite.files import bounded_lines
from tunelite.tokenizers.messages import Message, check_tokenizer_file, read_head, truncate

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_SPECIAL_TOKENS = 256

# Llama 3.1's order; the rest of the 256 slots are reserved_special_token_3, _4, ...
_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)

# tiktoken's BPE slows down badly on long runs without a split point, so text is cut into
# pieces first, at the same places as Meta's reference tokenizer cuts it.
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000
_LONG_RUN = re.compile(rf"\s{{{_MAX_RUN_CHARS + 1},}}|\S{{{_MAX_RUN_CHARS + 1},}}")
# A `base64(token) rank` line is under 200 bytes in every tiktoken file we know; longer is no such line.
_MAX_LINE = 4096


def llama3_special_tokens(base_vocab_size: int) -> dict[str, int]:
    """Special token ids as Meta assigns them: the 256 ids right after the BPE ranks."""
    names = list(_NAMED_SPECIAL_TOKENS)
    names += [
        f"<|reserved_special_token_{i}|>"
        for i in range(3, 3 + NUM_SPECIAL_TOKENS - len(_NAMED_SPECIAL_TOKENS))
    ]
    return {name: base_vocab_size + i for i, name in enumerate(names)}


def _split_for_bpe(text: str) -> Iterator[str]:
    """Cut text into 400k-char chunks, then cut runs of one kind (space / non-space) every 25k."""
    for start in range(0, len(text), _MAX_ENCODE_CHARS):
        chunk = text[start : start + _MAX_ENCODE_CHARS]
        cut = 0
        for run in _LONG_RUN.finditer(chunk):
            for end in range(run.start() + _MAX_RUN_CHARS, run.end(), _MAX_RUN_CHARS):
                yield chunk[cut:end]
                cut = end
        yield chunk[cut:]


def is_tiktoken_bpe(data: bytes) -> bool:
    """Whether the bytes look like a `base64(token) rank` file (judged on its first line)."""
    first = data.split(b"\n", 1)[0].strip()
    return re.fullmatch(rb"[A-Za-z0-9+/]+=*\s+\d+", first) is not None


def _wrong_format(file: Path, data: bytes, problem: str) -> ConfigError:
    if data.lstrip().startswith(b"{"):
        hint = (
            "it looks like a Hugging Face tokenizer.json; pass Meta's original/tokenizer.model"
        )
    elif not is_tiktoken_bpe(data) and _is_sentencepiece(file):
        hint = "it is a SentencePiece model (Llama 2); build it with llama2_tokenizer instead"
    else:
        hint = "expected Meta's Llama 3 format, one `base64(token) rank` pair per line"
    return ConfigError(f"llama3_tokenizer: cannot read {file}: {problem}; {hint}")


def _is_sentencepiece(file: Path) -> bool:
    try:
        sentencepiece.SentencePieceProcessor(model_file=str(file))
    except (RuntimeError, OSError):
        return False
    return True


def load_bpe_ranks(path: str) -> dict[bytes, int]:
    """Read a `base64(token) rank` file, checking what tiktoken silently assumes.

    Parsed here rather than by `tiktoken.load.load_tiktoken_bpe`, which caches every file
    it reads under its path in a temp folder and so keeps returning a stale vocabulary
    after the file at that path is rewritten (checked with tiktoken 0.14).
    """
    file = check_tokenizer_file(path, "llama3_tokenizer")
    data = read_head(file)  # for the hints of an error: which format the file is in
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(bounded_lines(file, _MAX_LINE, "tokenizer file", ConfigError), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as err:
            raise _wrong_format(file, data, f"line {number} is not `base64(token) rank`") from err
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise _wrong_format(file, data, "ranks are not 0..N-1, each once, for N distinct tokens")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise _wrong_format(
            file, data, f"{len(missing)} single bytes have no rank, so not all text is encodable"
        )
    return ranks


class Llama3Tokenizer:
    """Meta's Llama 3 (3.1 layout) tokenizer on tiktoken, with chat formatting and loss masks."""

    def __init__(self, path: str, max_seq_len: int | None = None) -> None:
        ranks = load_bpe_ranks(path)
        self.path = path
        self.max_seq_len = max_seq_len
        self.base_vocab_size = len(ranks)
        self.special_tokens = llama3_special_tokens(self.base_vocab_size)
        self.vocab_size = self.base_vocab_size + NUM_SPECIAL_TOKENS
        self._encoding = tiktoken.Encoding(
            name=f"tunelite_llama3_{self.base_vocab_size}",
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.start_header_id = self.special_tokens["<|start_header_id|>"]
        self.end_header_id = self.special_tokens["<|end_header_id|>"]
        self.eom_id = self.special_tokens["<|eom_id|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.python_tag_id = self.special_tokens["<|python_tag|>"]
        self.stop_tokens = [self.eos_id, self.eot_id, self.eom_id]
        self._headers: dict[str, list[int]] = {}

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        """Encode text; special-token strings in it stay plain text, so data cannot forge them."""
        ids = [self.bos_id] if add_bos else []
        for piece in _split_for_bpe(text):
            ids.extend(self._encoding.encode_ordinary(piece))
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Decode ids; special tokens are dropped unless asked for (to inspect a chat layout)."""
        if skip_special_tokens:
            ids = [i for i in ids if not self.base_vocab_size <= i < self.vocab_size]
        return self._encoding.decode(list(ids))

    def _header(self, role: str) -> list[int]:
        if role not in self._headers:
            self._headers[role] = (
                [self.start_header_id]
                + self.encode(role, add_bos=False, add_eos=False)
                + [self.end_header_id]
                + self.encode("\n\n", add_bos=False, add_eos=False)
            )
        return self._headers[role]

    def tokenize_messages(
        self, messages: Sequence[Message], add_end_tokens: bool = True
    ) -> tuple[list[int], list[bool]]:
        """Lay messages out as Meta's Llama 3 chat format; mask True = excluded from the loss.

        Layout: `<|begin_of_text|>` then per message
        `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|>`,
        then `<|end_of_text|>`. Every token of a message, its header and `<|eot_id|>`
        included, takes that message's mask, as in torchtune: a trained assistant turn
        thus also trains its `<|eot_id|>`, which is what teaches the model to stop.
        `<|begin_of_text|>` takes the first message's mask and `<|end_of_text|>` the last's.

        With `add_end_tokens=False` the last message gets neither `<|eot_id|>` nor the final
        `<|end_of_text|>` (torchtune's behaviour): ending the list with an empty assistant
        message then yields the prompt for generation, ending in the assistant header.
        Longer results are cut to `max_seq_len` (see `truncate`).

        This is Meta's layout, not a Hugging Face folder's chat template: Llama 3.1 Instruct's
        template (`hf_tokenizer`) always writes a system block beginning "Cutting Knowledge Date:
        December 2023\nToday Date: 26 Jul 2024\n\n", writes no final `<|end_of_text|>` and trains
        no assistant header (tests/test_chat_templates.py pins exactly these differences).
        """
        if not messages:
            raise DataError("tokenize_messages got an empty list of messages")
        tokens = [self.bos_id]
        mask = [messages[0].masked]
        for i, message in enumerate(messages):
            ids = self._header(message.role) + self.encode(
                message.content.strip(), add_bos=False, add_eos=False
            )
            if add_end_tokens or i < len(messages) - 1:
                ids.append(self.eot_id)
            tokens += ids
            mask += [message.masked] * len(ids)
        if add_end_tokens:
            tokens.append(self.eos_id)
            mask.append(messages[-1].masked)
        return truncate(tokens, mask, self.max_seq_len, self.eos_id if add_end_tokens else None)


def llama3_tokenizer(path: str, max_seq_len: int | None = None) -> Llama3Tokenizer:
    """Build the Llama 3 tokenizer from Meta's `tokenizer.model` (the one in `original/`)."""
    return Llama3Tokenizer(path, max_seq_len=max_seq_len)


def _merge_pair(word: tuple[bytes, ...], pair: tuple[bytes, bytes]) -> tuple[bytes, ...]:
    out: list[bytes] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def train_bpe_ranks(
    text: str, vocab_size: int, pattern: str = LLAMA3_PATTERN
) -> dict[bytes, int]:
    """Train a byte-level BPE whose ranks tiktoken can load, deterministically.

    Ranks 0-255 are the single bytes, so every text stays encodable; each later rank is the
    most frequent adjacent pair within the pattern's pieces (ties go to the smaller pair of
    byte strings). A pair whose bytes already have a rank is merged without a new rank, so
    the result has exactly `vocab_size` distinct tokens.
    """
    import regex

    if vocab_size < 256:
        raise ValueError(f"vocab_size must be at least 256 (the single bytes), got {vocab_size}")
    words = Counter(
        tuple(bytes([b]) for b in piece.encode("utf-8")) for piece in regex.findall(pattern, text)
    )
    ranks = {bytes([b]): b for b in range(256)}
    while len(ranks) < vocab_size:
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            raise ValueError(
                f"text is too small for {vocab_size} ranks: no pairs left at {len(ranks)}"
            )
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        ranks.setdefault(best[0] + best[1], len(ranks))
        merged: Counter[tuple[bytes, ...]] = Counter()
        for word, count in words.items():
            merged[_merge_pair(word, best) if len(word) > 1 else word] += count
        words = merged
    return ranks


def write_tiktoken_bpe(ranks: dict[bytes, int], path: str | Path) -> None:
    """Write ranks in Meta's `base64(token) rank` line format, ordered by rank."""
    lines = [
        f"{base64.b64encode(token).decode('ascii')} {rank}\n"
        for token, rank in sorted(ranks.items(), key=lambda item: item[1])
    ]
    Path(path).write_text("".join(lines), encoding="ascii")
