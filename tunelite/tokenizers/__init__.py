"""Llama 2 and Llama 3 tokenizers with chat formatting and loss masks."""

from tunelite.tokenizers.llama2 import Llama2Tokenizer, llama2_tokenizer
from tunelite.tokenizers.llama3 import (
    LLAMA3_PATTERN,
    Llama3Tokenizer,
    llama3_special_tokens,
    llama3_tokenizer,
    load_bpe_ranks,
    train_bpe_ranks,
    write_tiktoken_bpe,
)
from tunelite.tokenizers.messages import Message, messages_from_dicts, truncate

__all__ = [
    "LLAMA3_PATTERN",
    "Llama2Tokenizer",
    "Llama3Tokenizer",
    "Message",
    "llama2_tokenizer",
    "llama3_special_tokens",
    "llama3_tokenizer",
    "load_bpe_ranks",
    "messages_from_dicts",
    "train_bpe_ranks",
    "truncate",
    "write_tiktoken_bpe",
]
