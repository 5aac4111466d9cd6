"""The progress bar every recipe shows: step count, ETA, loss and tokens/s."""

import sys

from tqdm import tqdm


def progress_bar(total: int, initial: int = 0, desc: str = "train") -> tqdm:
    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr)
