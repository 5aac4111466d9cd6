"""Is our Llama 3.1 8B the model transformers loads from the same folder? Checked on one GPU in bf16.

    python benchmarks/hf_parity_8b.py CKPT_DIR
    python benchmarks/hf_parity_8b.py TINY_DIR --device cpu --sizes-from-config     # smoke run

CKPT_DIR is a Llama 3.1 8B Hugging Face folder (a real download, or random weights from
`make_random_ckpt.py OUT --size 8b`). Run from the repository root with tunelite installed
(or `PYTHONPATH=.`); transformers is the reference.

The folder is loaded into our `llama3_1_8b()` as the recipes load it (built on the meta
device, filled by the checkpointer), which computes logits and the next-token loss for a
fixed batch of random ids; our model is freed, then `transformers.LlamaForCausalLM` (SDPA
attention) does the same. One model is in memory at a time, so 8B peaks near 17 GiB. Prints

    RESULT parity_8b rel_diff=... loss_ours=... loss_ref=... loss_diff=... ...

and exits 1 when the relative logit difference ||ours - ref|| / ||ref|| (in fp32) or the loss
difference exceeds 1e-2: two bf16 implementations differ by their kernels' rounding, far
below that, while a mis-mapped weight or a wrong RoPE is off by orders of magnitude more.

`--sizes-from-config` builds the model from the folder's config.json instead of
`llama3_1_8b()`, for a smoke run on a small folder (`make_random_ckpt.py --size tiny`).
"""

import argparse
import gc
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

from tunelite.checkpointing.hf import HFCheckpointer, model_args_from_hf_config, read_hf_config
from tunelite.models import llama, llama3_1_8b
from tunelite.models.llama import TransformerDecoder
from tunelite.checkpointing.loading import load_checkpoint_into

TOLERANCE = 1e-2
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean cross-entropy of predicting each id from the ones before it, in fp32."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).item()


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def ours_logits(ckpt: Path, ids: torch.Tensor, dtype: torch.dtype, sizes_from_config: bool) -> torch.Tensor:
    with torch.device("meta"):
        model: TransformerDecoder = (
            llama(model_args_from_hf_config(read_hf_config(ckpt))) if sizes_from_config else llama3_1_8b()
        )
    load_checkpoint_into(model, HFCheckpointer(str(ckpt)), ids.device, dtype).eval()
    with torch.no_grad():
        logits = model(ids)
    del model
    free(ids.device)
    return logits


def reference_logits(ckpt: Path, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    model = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=dtype, attn_implementation="sdpa")
    model = model.to(ids.device).eval()
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    del model
    free(ids.device)
    return logits


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("ckpt", type=Path, help="Hugging Face model folder (config.json + safetensors)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=DTYPES)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--sizes-from-config", action="store_true",
                    help="build the model from config.json instead of llama3_1_8b() (smoke runs on small folders)")
    a = ap.parse_args()
    device, dtype = torch.device(a.device), DTYPES[a.dtype]

    vocab = read_hf_config(a.ckpt)["vocab_size"]
    ids = torch.randint(0, vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(0)).to(device)
    start = time.perf_counter()
    ours = ours_logits(a.ckpt, ids, dtype, a.sizes_from_config)
    ref = reference_logits(a.ckpt, ids, dtype)
    seconds = time.perf_counter() - start

    diff = ours.float() - ref.float()
    rel_diff = (diff.norm() / ref.float().norm()).item()
    loss_ours, loss_ref = next_token_loss(ours, ids), next_token_loss(ref, ids)
    loss_diff = abs(loss_ours - loss_ref)
    ok = rel_diff <= TOLERANCE and loss_diff <= TOLERANCE
    memory = (f" peak_alloc_GiB={torch.cuda.max_memory_allocated(device) / 2**30:.2f}"
              if device.type == "cuda" else "")
    print(f"RESULT parity_8b ok={ok} rel_diff={rel_diff:.3e} loss_ours={loss_ours:.5f} loss_ref={loss_ref:.5f} "
          f"loss_diff={loss_diff:.3e} max_abs_diff={diff.abs().max().item():.3e} "
          f"batch={a.batch} seq={a.seq} dtype={a.dtype} device={device.type} seconds={seconds:.1f}{memory}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
