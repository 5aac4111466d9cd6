"""Writes the embedded preference sample, tunelite/assets/tiny/preference_sample.jsonl.

Each of the Alpaca sample's rows becomes a pair: its own answer chosen, and the answer to another
row's instruction rejected (the next row's, shifted by a fixed offset), so a model can learn which
answer fits the prompt; the DPO demo and its tests run on it with nothing downloaded.

    python scripts/make_tiny_preference_data.py
"""

import json
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "tunelite" / "assets" / "tiny"
OFFSET = 37  # coprime with 100: every answer is rejected once, never for its own prompt


def main() -> None:
    rows = json.loads((ASSETS / "alpaca_sample.json").read_text())
    with open(ASSETS / "preference_sample.jsonl", "w") as out:
        for i, row in enumerate(rows):
            prompt = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
            other = rows[(i + OFFSET) % len(rows)]["output"]
            out.write(json.dumps({"prompt": prompt, "chosen": row["output"], "rejected": other}) + "\n")


if __name__ == "__main__":
    main()
