"""How long the data pipeline takes on an Alpaca-sized dataset: write, read, tokenize, pack.

Writes 50,000 Alpaca-style rows (instruction ~20 words, input on ~40% of rows ~10 words,
output ~80 words; words drawn from the shipped sample's English vocabulary) as JSONL to a
temp dir, then times each phase with the shipped tiny tokenizer and, if given one with
--tokenizer, a Llama 3 `tokenizer.model` (128k vocabulary; none is available offline).

    python benchmarks/data_bench.py [--rows 50000] [--max-seq-len 2048] [--tokenizer PATH]
"""

import argparse
import json
import random
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tunelite.config import asset_path
from tunelite.data import alpaca_dataset, padded_collate
from tunelite.data.packing import PackedDataset
from tunelite.data.sources import load_rows
from tunelite.tokenizers import llama3_tokenizer

T = TypeVar("T")


def timed(label: str, fn: Callable[[], T]) -> T:
    start = time.perf_counter()
    result = fn()
    print(f"  {label:<34} {time.perf_counter() - start:6.2f} s")
    return result


def write_rows(path: Path, num_rows: int) -> None:
    sample = json.loads(Path(asset_path("tiny/alpaca_sample.json")).read_text())
    words = sorted({w for row in sample for text in row.values() for w in re.findall(r"[A-Za-z']+", text)})
    rng = random.Random(0)

    def sentence(mean_words: int) -> str:
        n = max(3, round(rng.gauss(mean_words, mean_words / 4)))
        text = " ".join(rng.choice(words) for _ in range(n))
        return text[0].upper() + text[1:] + rng.choice([".", "?", "!", "."])

    with path.open("w") as f:
        for _ in range(num_rows):
            extra = sentence(10) if rng.random() < 0.4 else ""
            row = {"instruction": sentence(20), "input": extra, "output": sentence(80)}
            f.write(json.dumps(row) + "\n")


def bench(name: str, tokenizer_path: str, source: Path, max_seq_len: int) -> float:
    print(f"{name} ({tokenizer_path})")
    start = time.perf_counter()
    tokenizer = timed("load tokenizer", lambda: llama3_tokenizer(tokenizer_path, max_seq_len=max_seq_len))
    timed("read rows (JSONL)", lambda: load_rows(str(source)))
    samples = timed("read + tokenize (alpaca_dataset)", lambda: alpaca_dataset(tokenizer, str(source)))
    packs = timed(f"pack at {max_seq_len}", lambda: PackedDataset(samples, max_seq_len, tokenizer.pad_id))
    timed("materialise every pack", lambda: [packs[i] for i in range(len(packs))])
    timed("collate 8 packs", lambda: padded_collate([packs[i] for i in range(8)], tokenizer.pad_id))
    lengths = samples.lengths()
    print(f"  {len(samples)} samples, {sum(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f}), "
          f"{len(packs)} packs, {sum(lengths) / (len(packs) * max_seq_len):.1%} of pack tokens are data")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--tokenizer", help="a Llama 3 tokenizer.model (Meta's original/ folder) to time as well")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "alpaca.jsonl"
        timed(f"write {args.rows} rows", lambda: write_rows(source, args.rows))
        total = bench("tiny tokenizer", asset_path("tiny/tokenizer.model"), source, args.max_seq_len)
        print(f"  total {total:.2f} s")
        if args.tokenizer:
            total = bench("Llama 3 tokenizer", args.tokenizer, source, args.max_seq_len)
            print(f"  total {total:.2f} s")
        else:
            print("Llama 3 vocabulary: not available offline; pass --tokenizer PATH to time it")


if __name__ == "__main__":
    main()
