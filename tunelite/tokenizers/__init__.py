"""Tokenizers with chat formatting and loss masks: any Hugging Face folder's tokenizer.json and chat
template, and Meta's Llama 2 / Llama 3 files with their hand-written layouts."""

from tunelite.tokenizers.auto import auto_tokenizer
from tunelite.tokenizers.chat_template import ChatTemplate
from tunelite.tokenizers.hf import HFTokenizer, hf_tokenizer
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
    "ChatTemplate",
    "HFTokenizer",
    "LLAMA3_PATTERN",
    "Llama2Tokenizer",
    "Llama3Tokenizer",
    "Message",
    "auto_tokenizer",
    "hf_tokenizer",
    "llama2_tokenizer",
    "llama3_special_tokens",
    "llama3_tokenizer",
    "load_bpe_ranks",
    "messages_from_dicts",
    "train_bpe_ranks",
    "truncate",
    "write_tiktoken_bpe",
]
