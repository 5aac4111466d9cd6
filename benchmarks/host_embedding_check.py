"""The embedding table in pinned host memory (offload_embeddings) against the table on the card, at
Llama 3.1 8B's shape (128,256 x 4,096, bf16): the same rows, the card memory freed, and what each
lookup costs.

    python benchmarks/host_embedding_check.py [--tokens 4096,32768,131072] [--reps 50]

prints, per token count, then once,

    RESULT tokens=4096 equal=True on_card_ms=... host_ms=... host_gbps=...
    RESULT freed_gib=... (the table: 0.98 GiB)

host_gbps: the rows' bytes over the host lookup's time, the rate the GPU reads pinned memory at.
"""

import argparse

import torch
import torch.nn.functional as F

from tunelite.models.llama3_1 import LLAMA3_1_8B
from tunelite.modules.host_embedding import HostEmbedding


def timed(fn, reps: int) -> float:  # noqa: ANN001
    """Milliseconds a call, by CUDA events over `reps` calls after two warm-up calls."""
    for _ in range(2):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def compare(table: torch.Tensor, host: HostEmbedding, counts: list[int], reps: int) -> None:
    """One RESULT line per token count: the same rows, and each lookup's time."""
    for count in counts:
        tokens = torch.randint(0, table.shape[0], (1, count), device=table.device)
        equal = torch.equal(host(tokens), F.embedding(tokens, table))
        on_card = timed(lambda: F.embedding(tokens, table), reps)  # noqa: B023
        in_host = timed(lambda: host(tokens), reps)  # noqa: B023
        rows = count * table.shape[1] * table.element_size()
        print(f"RESULT tokens={count} equal={equal} on_card_ms={on_card:.3f} host_ms={in_host:.3f} "
              f"host_gbps={rows / in_host / 1e6:.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="4096,32768,131072")
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    device = torch.device("cuda")
    vocab, dim = LLAMA3_1_8B.vocab_size, LLAMA3_1_8B.embed_dim
    table = torch.randn(vocab, dim, dtype=torch.bfloat16, device=device)
    host = HostEmbedding(table, device)
    compare(table, host, [int(n) for n in args.tokens.split(",")], args.reps)
    with_table = torch.cuda.memory_allocated()
    del table
    print(f"RESULT freed_gib={(with_table - torch.cuda.memory_allocated()) / 2**30:.2f} "
          f"(the table: {vocab * dim * 2 / 2**30:.2f} GiB)", flush=True)


if __name__ == "__main__":
    main()
