"""What one compiled, recomputed Llama 3.1 8B-shaped LoRA layer adds to peak GPU memory in its
backward, by sequence length, beside what the estimate counts for it: the two slopes (bytes a
token) say whether the estimate's count of the backward graph's tensors holds at every length,
not only at the 2 x 2048 the end-to-end rows measure.

    python benchmarks/layer_memory.py [--tokens 4096,16384,32768] [--kinds lora,qlora]

A model of two layers (8B shapes, random weights, the 8B configs' adapters, batch 1), the first
kept and the second recomputed, both compiled; the loss is the final hidden states' mean square, so
no output projection's memory hides the layer's. Prints `RESULT layer_memory ...` lines: the peak
above what the model and the kept layer hold, measured with torch.cuda's peak statistics.
"""

import argparse
import dataclasses

import torch

from tunelite.models.llama import LoRAArgs, lora_llama
from tunelite.models.llama3_1 import LLAMA3_1_8B
from tunelite.modules.lora import set_trainable_params
from tunelite.modules.memory_policy import KEEP, RECOMPUTE, set_memory_policy
from tunelite.training.compile import compile_layers
from tunelite.training.memory_estimate import backward_extra_bytes_per_token

GIB = 2**30


def peak_above_start(model: torch.nn.Module, tokens: int, policies: tuple[str, ...]) -> float:
    """Bytes the peak of a forward and backward at `tokens` rises above what was allocated before it."""
    set_memory_policy(model, policies, None)
    ids = torch.randint(0, model.args.vocab_size, (1, tokens), device="cuda")
    for _ in range(2):  # the first compiles
        model.hidden_states(ids).float().pow(2).mean().backward()
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model.hidden_states(ids).float().pow(2).mean().backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="4096,16384,32768")
    ap.add_argument("--kinds", default="lora,qlora")
    a = ap.parse_args()
    args = dataclasses.replace(LLAMA3_1_8B, num_layers=2)
    lengths = [int(t) for t in a.tokens.split(",")]
    for kind in a.kinds.split(","):
        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16)
        with torch.device("cuda"):
            model = lora_llama(args, LoRAArgs(("q_proj", "v_proj", "output_proj"), apply_lora_to_mlp=True,
                                              quantize_base=kind == "qlora"))
        torch.set_default_dtype(torch.float32)
        set_trainable_params(model)
        model.train()
        compile_layers(model)
        peaks = {}
        for tokens in lengths:
            # the same model with its second layer kept: the difference is the recomputed layer's backward
            recomputed = peak_above_start(model, tokens, (KEEP, RECOMPUTE))
            kept = peak_above_start(model, tokens, (KEEP, KEEP))
            peaks[tokens] = recomputed
            print(f"RESULT layer_memory kind={kind} tokens={tokens} peak_recomputed_gib={recomputed / GIB:.3f} "
                  f"peak_kept_gib={kept / GIB:.3f}", flush=True)
        counted = {extra: backward_extra_bytes_per_token(args, 2, compiled=True, recomputed_adapters=extra)
                   for extra in (False, True)}
        for short, long in zip(lengths, lengths[1:]):
            slope = (peaks[long] - peaks[short]) / (long - short)
            print(f"RESULT layer_memory_slope kind={kind} tokens={short}-{long} bytes_per_token={slope:.0f} "
                  f"(the estimate's MLP backward extra: {counted[True]:.0f} with the adapters' parts apart, "
                  f"{counted[False]:.0f} without)", flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
