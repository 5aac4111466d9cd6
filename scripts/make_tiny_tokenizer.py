"""Regenerate tunelite/assets/tiny/tokenizer.model from tunelite/assets/tiny/alpaca_sample.json.

Rerun it after editing the sample data or the Alpaca prompt in tunelite/data/instruct.py
(tests/test_tokenizers.py fails until the shipped file matches what this script writes).

The tiny demo model has 512 + 256 = 768 embeddings, so the BPE has exactly 512 ranks (the
256 single bytes and 256 merges) and `llama3_tokenizer` appends Llama 3's 256 special
tokens. Training is deterministic: rerunning on unchanged data rewrites the same file.

    python scripts/make_tiny_tokenizer.py
"""

import argparse
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from tunelite.data.instruct import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT
from tunelite.tokenizers import train_bpe_ranks, write_tiktoken_bpe

TINY_ASSETS = Path(__file__).resolve().parents[1] / "tunelite" / "assets" / "tiny"
BASE_VOCAB_SIZE = 512


def sample_text(rows: Sequence[Mapping[str, str]]) -> str:
    """The text the demo model reads: each row as `alpaca_dataset` lays it out (the Alpaca
    prompt, then the output) and the role names of the Llama 3 chat headers. Learning the
    prompt's fixed wording roughly halves the tokens per sample (81 instead of 149)."""
    parts = ["system", "user", "assistant"]
    for row in rows:
        template = ALPACA_PROMPT if row.get("input") else ALPACA_PROMPT_NO_INPUT
        prompt = template.format(instruction=row["instruction"], input=row.get("input", ""))
        parts += [prompt, row["output"]]
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=TINY_ASSETS / "alpaca_sample.json")
    parser.add_argument("--out", type=Path, default=TINY_ASSETS / "tokenizer.model")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = json.loads(args.data.read_text(encoding="utf-8"))
    ranks = train_bpe_ranks(sample_text(rows), BASE_VOCAB_SIZE)
    write_tiktoken_bpe(ranks, args.out)
    print(f"wrote {len(ranks)} ranks to {args.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
