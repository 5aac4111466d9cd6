"""Peak host memory of `tunelite merge` on a sharded folder of random weights, against its largest
shard, and of the in-memory merge (load everything, fold, save, as the recipes' final export
does) for comparison.

    python benchmarks/merge_memory.py --layers 8 --shards 4 --dim 2048 --hidden 5632

Each merge runs in a fresh subprocess; its peak resident set since exec (VmHWM) is reported over
an idle interpreter that imported the same modules.
"""

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from tunelite.checkpointing.hf import ADAPTERS, INDEX_FILE, hf_config_from_model_args, save_hf_state_dict
from tunelite.checkpointing.peft import save_peft_adapter
from tunelite.models.llama import LoRAArgs, lora_llama
from tunelite.models.llama3_1 import LLAMA3_1_8B

PRELUDE = "import sys, torch\nfrom pathlib import Path\nimport tunelite.checkpointing.merge\nfrom tunelite.cli.main import main\n"
PEAK = "\nprint(int(Path('/proc/self/status').read_text().split('VmHWM:')[1].split()[0]) * 1024)"
STREAMED = PRELUDE + "main(['merge', '--base', sys.argv[1], '--adapter', sys.argv[2], '--output-dir', sys.argv[3]])" + PEAK
IN_MEMORY = PRELUDE + """
from tunelite.checkpointing.hf import load_hf_state_dict, save_hf_state_dict
from tunelite.checkpointing.peft import load_peft_adapter
from tunelite.modules.lora import merge_lora_state_dict
adapter, config = load_peft_adapter(Path(sys.argv[2]))
state = merge_lora_state_dict({**load_hf_state_dict(Path(sys.argv[1])), **adapter}, config["r"], config["lora_alpha"])
save_hf_state_dict(state, Path(sys.argv[3]), Path(sys.argv[1]))
""" + PEAK


def peak(code: str, *argv: str) -> int:
    return int(subprocess.run([sys.executable, "-c", code, *argv], check=True, capture_output=True,
                              text=True).stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    sizes = dataclasses.replace(LLAMA3_1_8B, num_layers=args.layers, embed_dim=args.dim, num_heads=args.dim // 128,
                                num_kv_heads=args.dim // 128, intermediate_dim=args.hidden, vocab_size=args.vocab)
    lora = LoRAArgs(("q_proj", "k_proj", "v_proj", "output_proj"), apply_lora_to_mlp=True, lora_rank=16)
    with torch.device("meta"):
        model = lora_llama(sizes, lora)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        with torch.no_grad():
            state = {k: torch.randn(v.shape).mul_(0.02) for k, v in model.state_dict().items()}
        weights = {k: v for k, v in state.items() if not k.endswith(("lora_a", "lora_b"))}
        per = -(-len(weights) // args.shards)
        weight_map = {ADAPTERS["llama"].to_hf(k): f"model-{i // per + 1:05d}-of-{args.shards:05d}.safetensors"
                      for i, k in enumerate(weights)}
        (base / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        save_hf_state_dict(weights, base, source_dir=base, dtype=torch.bfloat16, model_type="llama")
        (base / "config.json").write_text(json.dumps(hf_config_from_model_args(sizes)))
        model.load_state_dict(state, assign=True)
        save_peft_adapter(model, Path(tmp) / "adapter", str(base))
        del model, state, weights
        shards = sorted(p.stat().st_size for p in base.glob("*.safetensors"))
        idle = peak(PRELUDE + PEAK)
        streamed = peak(STREAMED, str(base), str(Path(tmp) / "adapter"), str(Path(tmp) / "streamed"))
        in_memory = peak(IN_MEMORY, str(base), str(Path(tmp) / "adapter"), str(Path(tmp) / "in_memory"))
    mib = 2**20
    print(f"model: {sum(shards) / mib:.0f} MiB in {len(shards)} bf16 shards, largest {shards[-1] / mib:.0f} MiB; "
          f"every linear weight adapted (rank 16)")
    print(f"idle interpreter (torch + tunelite imported): {idle / mib:.0f} MiB peak RSS")
    print(f"tunelite merge (streamed):  {streamed / mib:.0f} MiB peak RSS, +{(streamed - idle) / mib:.0f} MiB "
          f"= {(streamed - idle) / shards[-1]:.2f} x the largest shard")
    print(f"in-memory merge (for comparison): {in_memory / mib:.0f} MiB peak RSS, +{(in_memory - idle) / mib:.0f} MiB "
          f"= {(in_memory - idle) / shards[-1]:.2f} x the largest shard")


if __name__ == "__main__":
    main()
