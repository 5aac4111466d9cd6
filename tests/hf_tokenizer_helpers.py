"""Small Hugging Face tokenizer folders built by the tests: a BPE trained on text the test writes,
the special tokens a chat template needs, and tokenizer_config.json / generation_config.json.

Two pipelines, as real folders have them: byte-level (Llama 3, Qwen, Phi-4, SmolLM2) and
SentencePiece-style "▁" pieces (Mistral, Phi-3, Gemma). Decoders are chosen so that decoding any
run of ids gives back exactly the text those ids came from, which the mask tests read.
"""

import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from tunelite.tokenizers import LLAMA3_PATTERN

CORPUS = (
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is the capital. "
    "You are a terse assistant. Answer in one word. Hello, how are you today? I am fine, thank you. "
    "Write a haiku about the sea: waves fold into foam, salt wind carries gull voices, the tide keeps its time. "
    "Numbers 0123456789 and punctuation: ;:!?-()[]{}'\"/\\ <>|_=+*&^%$#@~` and accents é à ü ß and 東京.\n\n\t"
)


def write_tokenizer_folder(
    folder: Path,
    special: Sequence[str],
    config: dict,
    *,
    style: str = "byte_level",
    plain_added: Sequence[str] = (),
    bos: str | None = None,
    generation_config: dict | None = None,
    chat_template: str | None = None,
    vocab_size: int = 400,
) -> Path:
    """Write tokenizer.json (+ configs) into `folder`; `bos`, when given, is added by the
    post-processor in front of every text, as Llama's and Gemma's tokenizers do."""
    folder.mkdir(parents=True, exist_ok=True)
    if style == "byte_level":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tokenizer.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tokenizer.decoder = decoders.Replace("▁", " ")
        alphabet = sorted(set(CORPUS.replace(" ", "▁")))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special), initial_alphabet=alphabet,
                                  show_progress=False)
    tokenizer.train_from_iterator([CORPUS] * 4, trainer)
    if plain_added:
        tokenizer.add_tokens(list(plain_added))
    if bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
    tokenizer.save(str(folder / "tokenizer.json"))
    full_config = {**config, **({"chat_template": chat_template} if chat_template is not None else {})}
    (folder / "tokenizer_config.json").write_text(json.dumps(full_config))
    if generation_config is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation_config))
    return folder
