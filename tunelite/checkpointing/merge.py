"""A peft LoRA adapter folded into its base model folder, written as a plain HF model folder.

`merge_lora_state_dict` folds a whole state dict at once, which for a 70B base needs the model
in host memory. Here each base tensor is read in blocks of rows, each folded with its
adapter's rows, cast, and written straight into the output shard of the same name, so memory
holds about one block whatever the model's size; the output keeps the base's shards,
index, config and tokenizer files, and appears at once, complete (`atomic_folder`).
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelite.checkpointing.atomic import atomic_folder
from tunelite.checkpointing.hf import (
    ADAPTERS,
    INDEX_FILE,
    StateDictAdapter,
    copy_side_files,
    model_args_from_hf_config,
    read_hf_config,
    weight_files,
)
from tunelite.checkpointing.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_peft_adapter, lora_args_from_adapter_config
from tunelite.checkpointing.streamed import TensorEntry, list_tensors, read_row_blocks, write_safetensors
from tunelite.errors import CheckpointError
from tunelite.files import read_json
from tunelite.modules.lora import merge_lora_state_dict

# Written into the merged folder: what it was made from, for model cards (`tunelite upload`).
MERGE_RECORD = "tunelite_merge.json"


@dataclass(frozen=True)
class MergeSummary:
    """What a merge did, for the command to report."""

    output_dir: Path
    files: int
    tensors: int
    adapted: int


def merge_adapter(
    base_dir: Path, adapter_dir: Path, output_dir: Path, dtype: torch.dtype | None = None,
    base_model_name: str | None = None,
) -> MergeSummary:
    """Writes `base_dir` with the peft adapter in `adapter_dir` folded in (W + alpha/r * B @ A,
    in fp32, rounded once) to the new folder `output_dir`, each tensor in `dtype` or as stored.

    Refuses, naming the adapter's file, an adapter made for another base (modules it lacks,
    shapes that differ) or whose rank disagrees with its adapter_config.json."""
    base_dir, adapter_dir, output_dir = Path(base_dir), Path(adapter_dir), Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise CheckpointError(f"{output_dir} exists and is not empty: merge into a new folder (nothing is overwritten)")
    # The names, and which weights are stored transposed, are those of the base's family.
    args = model_args_from_hf_config(read_hf_config(base_dir), str(base_dir / "config.json"))
    lora = lora_args_from_adapter_config(adapter_dir, args)
    adapter, adapter_config = load_peft_adapter(adapter_dir, args.model_type)
    files = {path: list_tensors(path) for path in weight_files(base_dir)}
    pairs = _adapter_pairs(files, adapter, ADAPTERS[args.model_type], adapter_dir, base_dir, adapter_config,
                           lora.lora_rank)

    def blocks(entry: TensorEntry) -> Iterator[torch.Tensor]:
        out_dtype = _out_dtype(entry, dtype)
        for start, block in read_row_blocks(entry):
            if entry.name in pairs:
                lora_a, lora_b = pairs[entry.name]
                block = merge_lora_state_dict({"weight": block.float(), "lora_a": lora_a,
                                               "lora_b": lora_b[start:start + len(block)]},
                                              lora.lora_rank, lora.lora_alpha)["weight"]
            yield block.to(out_dtype)

    with atomic_folder(output_dir) as tmp:
        for path, entries in files.items():
            header = [(e.name, _out_dtype(e, dtype), e.shape) for e in entries]
            write_safetensors(tmp / path.name, header, (blocks(e) for e in entries), metadata={"format": "pt"})
        copy_side_files(base_dir, tmp)
        if (base_dir / INDEX_FILE).is_file():
            _write_index(base_dir / INDEX_FILE, tmp)
        if dtype is not None:
            _set_config_dtype(tmp / "config.json", dtype)
        record = {"base_model": base_model_name or str(base_dir), "adapter": str(adapter_dir),
                  "adapter_base_model": adapter_config.get("base_model_name_or_path")}
        (tmp / MERGE_RECORD).write_text(json.dumps(record, indent=2))
    return MergeSummary(output_dir, len(files), sum(len(e) for e in files.values()), len(pairs))


def _out_dtype(entry: TensorEntry, dtype: torch.dtype | None) -> torch.dtype:
    """`dtype` for floating-point tensors when one is asked for; otherwise as stored."""
    return dtype if dtype is not None and entry.dtype.is_floating_point else entry.dtype


def _adapter_pairs(
    files: dict[Path, list[TensorEntry]], adapter: dict[str, torch.Tensor], layout: StateDictAdapter,
    adapter_dir: Path, base_dir: Path, adapter_config: dict, rank: int,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(lora_a, lora_b) for each base tensor the adapter changes, keyed by its HF name, after
    checking that the adapter fits this base. For a weight the checkpoint stores transposed (GPT-2's
    Conv1D, in x out) the pair is (B^T, A^T): its rows then take (B A)^T's rows."""
    to_ours = layout.to_ours
    weights_file = adapter_dir / ADAPTER_WEIGHTS
    made_for = adapter_config.get("base_model_name_or_path")
    pairs = {}
    for entry in (e for entries in files.values() for e in entries):
        ours = to_ours(entry.name)
        if ours is None or ours.removesuffix("weight") + "lora_a" not in adapter:
            continue
        prefix = ours.removesuffix("weight")
        lora_a, lora_b = adapter[prefix + "lora_a"], adapter[prefix + "lora_b"]
        if lora_a.shape[0] != rank or lora_b.shape[1] != rank:
            raise CheckpointError(f"{weights_file}: {prefix}lora_a/lora_b have rank {lora_a.shape[0]}, but "
                                  f"{adapter_dir / ADAPTER_CONFIG} says r={rank}; the folder mixes two adapters")
        if layout.is_transposed(ours):
            lora_a, lora_b = lora_b.t(), lora_a.t()
        if (lora_b.shape[0], lora_a.shape[1]) != tuple(entry.shape):
            raise CheckpointError(
                f"{weights_file}: the adapter of {entry.name} is for a {lora_b.shape[0]} x {lora_a.shape[1]} weight, "
                f"but {base_dir}'s is {' x '.join(map(str, entry.shape))}: the adapter was made for another base "
                f"model ({made_for}); merge it into that one")
        pairs[entry.name] = (lora_a.float(), lora_b.float())
    unmatched = sorted({key.rsplit(".", 1)[0] for key in adapter} - {
        to_ours(name).removesuffix(".weight") for name in pairs})
    if unmatched:
        raise CheckpointError(
            f"{weights_file}: adapters on {unmatched[:3]}{' ...' if len(unmatched) > 3 else ''}, which {base_dir} "
            f"has no weight for: the adapter was made for another base model ({made_for}); merge it into that one")
    return pairs


def _write_index(source_index: Path, out_dir: Path) -> None:
    """The base's index with the same tensor -> shard map and the merged shards' total size."""
    index = read_json(source_index, "safetensors index", CheckpointError)
    total = sum(e.nbytes for shard in sorted(set(index["weight_map"].values()))
                for e in list_tensors(out_dir / shard))
    index["metadata"] = {**index.get("metadata", {}), "total_size": total}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))


def _set_config_dtype(config_path: Path, dtype: torch.dtype) -> None:
    """config.json names the dtype the weights are stored in (`torch_dtype`, `dtype` in transformers 5)."""
    config = read_json(config_path, "model config", CheckpointError)
    name = str(dtype).removeprefix("torch.")
    config["torch_dtype"] = name
    if "dtype" in config:
        config["dtype"] = name
    config_path.write_text(json.dumps(config, indent=2))
