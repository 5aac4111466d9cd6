"""Random fixed-length token samples, for benchmarks: throughput and memory depend on shapes,
not on what the tokens say, and every sample is exactly `seq_len` long with no padding."""

import torch



class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, num_samples: int, seq_len: int, vocab_size: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, vocab_size, (num_samples, seq_len), generator=generator)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        ids = self.tokens[index].tolist()
        return {"tokens": ids, "labels": ids}


def random_tokens_dataset(tokenizer: object, num_samples: int, seq_len: int, vocab_size: int, seed: int = 0) -> RandomTokens:
    """`tokenizer` is what every dataset builder is given; random ids need none of it."""
    return RandomTokens(num_samples, seq_len, vocab_size, seed)
