"""One builder for any model folder: the user points at what they downloaded and picks nothing else."""

from pathlib import Path

from tunelite.errors import ConfigError
from tunelite.tokenizers.hf import TOKENIZER_FILE, HFTokenizer
from tunelite.tokenizers.llama2 import Llama2Tokenizer
from tunelite.tokenizers.llama3 import Llama3Tokenizer, is_tiktoken_bpe

# Meta's own tokenizer files, where Meta's folders and Hugging Face's copies of them keep them.
META_TOKENIZER_FILES = ("tokenizer.model", "original/tokenizer.model")


def auto_tokenizer(path: str, max_seq_len: int | None = None) -> HFTokenizer | Llama3Tokenizer | Llama2Tokenizer:
    """The tokenizer of a model folder (or of one tokenizer file).

    A tokenizer.json (every Hugging Face folder) gives `hf_tokenizer`, with the folder's own chat
    template; without one, Meta's tokenizer.model (also looked for in original/) gives
    `llama3_tokenizer` for a tiktoken BPE file and `llama2_tokenizer` for a SentencePiece model,
    with their hand-written chat layouts.
    """
    given = Path(path)
    if given.is_dir():
        candidates = [given / TOKENIZER_FILE, *(given / name for name in META_TOKENIZER_FILES)]
        found = next((file for file in candidates if file.is_file()), None)
        if found is None:
            looked = ", ".join(str(file.relative_to(given)) for file in candidates)
            raise ConfigError(f"auto_tokenizer: {given} holds no tokenizer (looked for {looked})")
    elif given.is_file():
        found = given
    else:
        raise ConfigError(f"auto_tokenizer: {given} does not exist; pass a model folder or a tokenizer file")
    if found.name == TOKENIZER_FILE or found.suffix == ".json":
        return HFTokenizer(found, max_seq_len=max_seq_len)
    with open(found, "rb") as f:
        head = f.read(4096)
    if is_tiktoken_bpe(head):
        return Llama3Tokenizer(str(found), max_seq_len=max_seq_len)
    return Llama2Tokenizer(str(found), max_seq_len=max_seq_len)
