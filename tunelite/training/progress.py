"""The progress bar every recipe shows: step count, ETA, loss and tokens/s."""

import sys

from tqdm import tqdm


def progress_bar(total: int, initial: int = 0, desc: str = "train", disable: bool = False) -> tqdm:
    """`disable`: no bar at all, e.g. on all ranks but the first of a distributed run."""
    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr,
                disable=disable)
