"""Long samples and the memory budget on one capped card: tokens/s, peak memory and the estimate.

Issue 16's tables in one process, the allocator capped as on a 24 GB card (22 GiB), each model
loaded once and reused row after row (a fresh process per row would spend the call loading):

    python benchmarks/long_context_bench.py CKPT_DIR [--cap-gib 22] [--rows ROWS] [--time-limit 570]

Rows (ROWS picks a subset, e.g. `qlora:32768,qlora:131072,lora-budget`), by model so each loads once,
the eager rows before the compiled ones, the most important first within each:
  qlora:SEQ           QLoRA 8B, batch 1 x SEQ, memory_budget_gib = the cap: the fastest plan the
                      estimate fits, else the leanest (every layer recomputed, its input in pinned
                      host memory, the MLP in chunks): 32768, 131072, 65536, 16384
  qlora-budget        batch 2 x 2048, memory_budget_gib = the cap, compiled
  qlora-plain         batch 2 x 2048, every layer recomputed, compiled: today's memory
  qlora-compiled:SEQ  the same, the layers compiled (after the eager rows: one model, compiled once)
  qlora-packed:SEQ    batch 1 x SEQ of packed documents (256-4096 tokens each): FlexAttention's
                      block mask from document ids, compiled, on the GPU
  lora:SEQ, lora-budget, lora-plain     the same for LoRA 8B (bf16 base): 49152, 32768
All rows take about 11 minutes on an H200; in two calls of at most 10:
  --rows qlora:32768,qlora:131072,qlora:65536,qlora:16384,qlora-budget,qlora-plain,qlora-packed:16384
  --rows lora:49152,lora:32768,lora-budget,lora-plain

Each row runs one warm-up step and two timed steps as the recipe steps (hidden states, chunked
loss, backward, AdamW on the adapters), in a try/except, and prints one line:

    RESULT row=qlora:131072 batch=1 seq=131072 plan="..." compile=False tokens_per_s=... peak_alloc_gib=...
        peak_reserved_gib=... predicted_alloc_gib=... predicted_card_gib=... host_pinned_gib=...
        pinned_pool_gib=... predicted_host_gib=... host_rss_gib=... peak_host_rss_gib=... loss=...

(host_pinned_gib: the offloaded tensors; pinned_pool_gib: the pinned allocator's power-of-two
blocks, what predicted_host_gib predicts.)

or `RESULT row=... error="..."`; the next row runs either way. A row starts only when the time
left (--time-limit, seconds since start) exceeds its rough cost. PYTORCH_CUDA_ALLOC_CONF defaults
to expandable_segments:True, as Unsloth sets it, so large blocks of varied sizes fragment less.

The same code runs on the CPU (tests/test_long_context.py runs it on the tiny model):
    python benchmarks/long_context_bench.py CKPT --device cpu --qlora-config tiny/qlora_cpu \\
        --lora-config tiny/lora_cpu --rows qlora:64,lora-budget --batch-seq 32 --cap-gib 1
"""

import argparse
import gc
import os
import re
import resource
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402  (after the allocator setting, which the first CUDA allocation reads)
from omegaconf import DictConfig  # noqa: E402

from tunelite.checkpointing.loading import load_checkpoint_into  # noqa: E402
from tunelite.config import instantiate, load_recipe_config  # noqa: E402
from tunelite.modules.host_embedding import offload_embeddings  # noqa: E402
from tunelite.modules.lora import set_trainable_params  # noqa: E402
from tunelite.modules.memory_policy import set_memory_policy  # noqa: E402
from tunelite.recipe_registry import get_recipe, read_declarations  # noqa: E402
from tunelite.runtime.device import cap_memory, get_device, get_dtype  # noqa: E402
from tunelite.training.compile import compile_layers  # noqa: E402
from tunelite.training.memory_estimate import GIB, memory_facts, memory_model  # noqa: E402
from tunelite.training.memory_policy import plan_memory  # noqa: E402

RECIPE = "lora_finetune_single_device"
DEFAULT_ROWS = ("qlora:32768,qlora:131072,qlora:65536,qlora:16384,qlora-budget,qlora-plain,qlora-packed:16384,"
                "lora:49152,lora:32768,lora-budget,lora-plain")
# Rough seconds on an H200, so that a row that cannot finish in the time left is skipped: its steps
# (by length), loading a model, compiling the layers.
ROUGH_SECONDS = {131072: 200, 65536: 70, 49152: 45, 32768: 30, 16384: 15}
LOADING_SECONDS, COMPILING_SECONDS = 45, 60


@dataclass
class Row:
    name: str
    kind: str  # qlora or lora
    batch: int
    seq: int
    budget: bool  # memory_budget_gib = the cap, else every layer recomputed (today's default)
    compile: bool
    packed: bool = False  # documents packed into the sequence, attending within themselves


def parse_rows(text: str, batch_seq: int, compile_batch_rows: bool) -> list[Row]:
    """The rows named in --rows, in their order."""
    rows = []
    for name in filter(None, text.split(",")):
        kind, _, rest = name.partition(":")
        if kind in ("qlora", "lora") and rest.isdigit():
            rows.append(Row(name, kind, 1, int(rest), budget=True, compile=False))
        elif kind in ("qlora-compiled", "lora-compiled") and rest.isdigit():
            rows.append(Row(name, kind.split("-")[0], 1, int(rest), budget=True, compile=True))
        elif kind in ("qlora-packed", "lora-packed") and rest.isdigit():
            rows.append(Row(name, kind.split("-")[0], 1, int(rest), budget=True, compile=False, packed=True))
        elif re.fullmatch(r"(q?lora)-(budget|plain)", name):
            kind, how = name.split("-")
            rows.append(Row(name, kind, 2, batch_seq, budget=how == "budget", compile=compile_batch_rows))
        else:
            raise SystemExit(f"--rows: cannot read {name!r}; e.g. qlora:32768, lora:49152, qlora-budget, lora-plain, "
                             "qlora-packed:16384")
    return rows


class Trainee:
    """One model as the recipe builds it (meta device, checkpoint, adapters trainable), with its
    optimizer and loss, reused by every row of its kind."""

    def __init__(self, config: str, checkpoint: str, device: torch.device) -> None:
        self.keys = read_declarations(get_recipe(RECIPE).path).keys
        self.config, self.checkpoint, self.device = config, checkpoint, device
        cfg = self.cfg(1, 1)
        with torch.device("meta"):
            self.model = instantiate(cfg.model)
        load_checkpoint_into(self.model, instantiate(cfg.checkpointer), device, get_dtype(cfg.dtype, device))
        set_trainable_params(self.model)
        if cfg.get("offload_embeddings", False):  # as the recipe does: the estimate counts the table on the host
            offload_embeddings(self.model, device)
        self.adapters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = instantiate(cfg.optimizer, self.adapters)
        self.loss_fn = instantiate(cfg.loss)
        self.compiled = False
        self.model.train()

    def cfg(self, batch: int, seq: int, *overrides: str) -> DictConfig:
        """The config as a run at batch x seq would receive it (the tokenizer is the tiny one: no
        row tokenizes text)."""
        return load_recipe_config(self.config, self.keys, [
            f"checkpointer.checkpoint_dir={self.checkpoint}", "tokenizer.path=${asset:tiny/tokenizer.model}",
            f"batch_size={batch}", f"tokenizer.max_seq_len={seq}", "gradient_accumulation_steps=1",
            f"device={self.device.type}", *overrides], check_paths=False)  # no row reads the data set

    def step(self, tokens: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None,
             document_ids: torch.Tensor | None) -> torch.Tensor:
        """One optimizer step as the recipe takes it: hidden states, chunked loss, backward, AdamW."""
        hidden = self.model.hidden_states(tokens, positions, document_ids=document_ids)
        loss = self.loss_fn(hidden, labels, self.model.output)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def run_row(trainee: Trainee, row: Row, cap_gib: float, steps: int, warmup: int) -> str:
    """Sets the row's plan on the model, times its steps, and returns its RESULT fields."""
    # compile as the row runs, so that the plan is chosen as a compiled run's (the estimate knows what inductor keeps)
    overrides = ["enable_activation_checkpointing=True", f"compile={row.compile}",
                 *([f"+memory_budget_gib={cap_gib}"] if row.budget else [])]
    cfg = trainee.cfg(row.batch, row.seq, *overrides)
    plan = plan_memory(cfg, {"trains": "adapters"}, len(trainee.model.layers), trainee.device, True, False,
                       cfg.get("memory_budget_gib"))
    set_memory_policy(trainee.model, plan.layers, plan.mlp_chunk_tokens, plan.by_block)
    predicted = memory_model(cfg, memory_facts(RECIPE, {"trains": "adapters"})).estimate(plan)
    if row.compile and not trainee.compiled:
        compile_layers(trainee.model)
        trainee.loss_fn.compile()
        trainee.compiled = True
    vocab = trainee.model.args.vocab_size
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (row.batch, row.seq), generator=g).to(trainee.device)
    labels = torch.randint(0, vocab, (row.batch, row.seq), generator=g).to(trainee.device)
    positions = document_ids = None
    if row.packed:
        positions, document_ids = (t.to(trainee.device) for t in packed_documents(row.seq, g))
    synchronize(trainee.device)
    if trainee.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(trainee.device)
    started = time.perf_counter()
    for step in range(warmup + steps):
        if step == warmup:
            synchronize(trainee.device)
            started = time.perf_counter()
        loss = trainee.step(tokens, labels, positions, document_ids)
    synchronize(trainee.device)
    seconds = time.perf_counter() - started
    offloader = trainee.model.memory_policy.offloader
    return (f'plan="{plan.describe(row.batch * row.seq)}" compile={row.compile} steps={steps} '
            f"tokens_per_s={steps * row.batch * row.seq / seconds:.0f} {peaks(trainee.device)} "
            f"predicted_alloc_gib={predicted.peak_allocated / GIB:.2f} predicted_card_gib={predicted.total / GIB:.2f} "
            f"host_pinned_gib={(offloader.peak_host_bytes if offloader else 0) / GIB:.2f} "
            f"{pinned_pool(trainee.device)}"
            f"predicted_host_gib={predicted.host_bytes / GIB:.2f} {host_rss()} loss={loss.item():.4f}")


def packed_documents(seq: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, seq) positions and document ids of documents of 256-4096 tokens filling the sequence."""
    lengths = []
    while sum(lengths) < seq:
        lengths.append(min(int(torch.randint(256, 4097, (1,), generator=generator)), seq - sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    document_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    return positions, document_ids


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peaks(device: torch.device) -> str:
    """Peak allocated and reserved GPU memory since the row's start."""
    if device.type != "cuda":
        return "peak_alloc_gib=0 peak_reserved_gib=0"
    return (f"peak_alloc_gib={torch.cuda.max_memory_allocated(device) / GIB:.2f} "
            f"peak_reserved_gib={torch.cuda.max_memory_reserved(device) / GIB:.2f}")


def pinned_pool(device: torch.device) -> str:
    """What the pinned host allocator holds now (power-of-two blocks, the estimate's host figure),
    where this torch reports it."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if device.type != "cuda" or stats is None:
        return ""
    return f"pinned_pool_gib={stats().get('allocated_bytes.current', 0) / GIB:.2f} "


def host_rss() -> str:
    """This process's resident host memory now and at its peak so far (the peak never falls, so
    a later row's peak may be an earlier row's)."""
    now = 0.0
    status = Path("/proc/self/status")
    if status.exists():
        match = re.search(r"VmRSS:\s+(\d+) kB", status.read_text())
        now = int(match.group(1)) / 2**20 if match else 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return f"host_rss_gib={now:.2f} peak_host_rss_gib={peak:.2f}"


def free(device: torch.device) -> None:
    """Drops what a finished (or failed) row left, so the next starts from the model alone."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        getattr(torch._C, "_host_emptyCache", lambda: None)()  # the pinned blocks of this row's offloading


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="HF-layout Llama 3.1 8B folder (make_random_ckpt.py --size 8b)")
    ap.add_argument("--rows", default=DEFAULT_ROWS)
    ap.add_argument("--cap-gib", type=float, default=22.0, help="allocator cap, GiB (0: none); also the budget")
    ap.add_argument("--time-limit", type=float, default=570.0, help="seconds; rows that would overrun are skipped")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch-seq", type=int, default=2048, help="sequence length of the batch-2 rows")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="batch-2 rows eager too")
    ap.add_argument("--qlora-config", default="llama3_1/8B_qlora_single_device")
    ap.add_argument("--lora-config", default="llama3_1/8B_lora_single_device")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args(argv)
    begun = time.perf_counter()
    device = get_device(a.device)
    if a.cap_gib:
        cap_memory(device, a.cap_gib)
    print(f"device={device} cap_gib={a.cap_gib} PYTORCH_CUDA_ALLOC_CONF={os.environ['PYTORCH_CUDA_ALLOC_CONF']} "
          f"torch={torch.__version__}", flush=True)
    rows = parse_rows(a.rows, a.batch_seq, a.compile)
    configs = {"qlora": a.qlora_config, "lora": a.lora_config}
    trainee: Trainee | None = None
    for row in rows:
        loads = trainee is None or trainee.config != configs[row.kind]
        rough = (ROUGH_SECONDS.get(row.seq, 20) + LOADING_SECONDS * loads
                 + COMPILING_SECONDS * (row.compile and (loads or not trainee.compiled)))
        left = a.time_limit - (time.perf_counter() - begun)
        if left < rough:
            print(f"RESULT row={row.name} batch={row.batch} seq={row.seq} skipped=\"{left:.0f} s left\"", flush=True)
            continue
        try:
            if loads:
                trainee = None  # the other model goes before this one loads
                free(device)
                loading = time.perf_counter()
                trainee = Trainee(configs[row.kind], a.checkpoint, device)
                print(f"loaded {row.kind} in {time.perf_counter() - loading:.0f} s", flush=True)
            fields = run_row(trainee, row, a.cap_gib, a.steps, a.warmup)
        except Exception as error:  # noqa: BLE001  (a row's failure is its result; the next row runs)
            message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
            fields = f'error="{message}" {peaks(device)}'
            traceback.print_exc(limit=3)
        print(f"RESULT row={row.name} batch={row.batch} seq={row.seq} {fields}", flush=True)
        if trainee is not None:
            trainee.optimizer.zero_grad(set_to_none=True)
        free(device)


if __name__ == "__main__":
    main()
