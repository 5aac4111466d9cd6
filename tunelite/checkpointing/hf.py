"""Hugging Face Llama checkpoints <-> our module names, through safetensors only.

One name table serves every Llama family: they share HF's `LlamaForCausalLM` layout, and
tied models (Llama 3.2) simply have no `lm_head.weight`. Files are read memory-mapped, so
loading never holds two copies of the weights, and written back sharded like the input so
`from_pretrained` and vLLM see the folder they were given.
"""

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tunelite.errors import CheckpointError
from tunelite.models.llama import ModelArgs, RopeScaling

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files a model folder carries beside its weights, copied into exported folders so the export
# loads with the same tokenizer and generation settings.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "original/tokenizer.model",  # Meta's tiktoken file, which tunelite's Llama 3 tokenizer reads
)

_GLOBAL = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_PER_LAYER = {
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.o_proj": "attn.output_proj",
    "mlp.gate_proj": "mlp.w1",
    "mlp.down_proj": "mlp.w2",
    "mlp.up_proj": "mlp.w3",
    "input_layernorm": "sa_norm",
    "post_attention_layernorm": "mlp_norm",
}
_PER_LAYER_BACK = {v: k for k, v in _PER_LAYER.items()}
_GLOBAL_BACK = {v: k for k, v in _GLOBAL.items()}
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight)$")
_OUR_LAYER = re.compile(r"layers\.(\d+)\.(.+)\.(weight)$")
# Buffers some older exports carry; they are recomputed, not loaded.
_IGNORED_HF_KEYS = re.compile(r".*rotary_emb\.inv_freq$")


def hf_to_ours(key: str) -> str | None:
    if key in _GLOBAL:
        return _GLOBAL[key]
    m = _HF_LAYER.match(key)
    if m and m.group(2) in _PER_LAYER:
        return f"layers.{m.group(1)}.{_PER_LAYER[m.group(2)]}.weight"
    return None


def ours_to_hf(key: str) -> str:
    """HF name of one of our keys; `..._proj.lora_a` keeps its suffix for the peft writer to map."""
    if key in _GLOBAL_BACK:
        return _GLOBAL_BACK[key]
    m = _OUR_LAYER.match(key)
    if m and m.group(2) in _PER_LAYER_BACK:
        return f"model.layers.{m.group(1)}.{_PER_LAYER_BACK[m.group(2)]}.weight"
    raise KeyError(f"no Hugging Face name for {key!r}")


def read_hf_config(checkpoint_dir: Path) -> dict:
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found: checkpoint_dir must be a Hugging Face model folder (config.json and "
            "*.safetensors), e.g. what `huggingface-cli download meta-llama/Llama-3.1-8B-Instruct` writes"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download the checkpoint") from e


def model_args_from_hf_config(hf: dict) -> ModelArgs:
    """Our sizes for an HF `config.json`, to check a checkpoint against the model a config builds."""
    scaling = hf.get("rope_scaling") or None
    rope = None
    if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
        rope = RopeScaling(
            factor=scaling["factor"],
            low_freq_factor=scaling["low_freq_factor"],
            high_freq_factor=scaling["high_freq_factor"],
            original_max_position_embeddings=scaling["original_max_position_embeddings"],
        )
    return ModelArgs(
        vocab_size=hf["vocab_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
        embed_dim=hf["hidden_size"],
        intermediate_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 4096),
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        rope_base=hf.get("rope_theta", 10_000.0),
        rope_scaling=rope,
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        head_dim=hf.get("head_dim"),
    )


def hf_config_from_model_args(args: ModelArgs, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The `config.json` transformers reads for a model of these sizes (Llama 3 special-token ids)."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab_size,
        "hidden_size": args.embed_dim,
        "intermediate_size": args.intermediate_dim,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_heads,
        "num_key_value_heads": args.num_kv_heads,
        "head_dim": args.resolved_head_dim,
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_base,
        "tie_word_embeddings": args.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if args.rope_scaling is not None:
        config["rope_scaling"] = {"rope_type": "llama3", **asdict(args.rope_scaling)}
    return config


def check_model_matches(args: ModelArgs, checkpoint_dir: Path) -> None:
    """Names every size that differs, so a wrong `model:` builder fails before any weight is read."""
    theirs = model_args_from_hf_config(read_hf_config(checkpoint_dir))
    fields = ("vocab_size", "num_layers", "num_heads", "num_kv_heads", "embed_dim", "intermediate_dim",
              "tie_word_embeddings", "rope_base", "rope_scaling")
    diffs = [f"{f}: model {getattr(args, f)} vs checkpoint {getattr(theirs, f)}"
             for f in fields if getattr(args, f) != getattr(theirs, f)]
    if args.resolved_head_dim != theirs.resolved_head_dim:
        diffs.append(f"head_dim: model {args.resolved_head_dim} vs checkpoint {theirs.resolved_head_dim}")
    if diffs:
        raise CheckpointError(
            f"the model built from `model._component_` does not match {Path(checkpoint_dir) / 'config.json'}: "
            + "; ".join(diffs) + ". Pick the builder for this checkpoint's family and size."
        )


def weight_files(checkpoint_dir: Path, checkpoint_files: list[str] | None = None) -> list[Path]:
    """The safetensors files of a folder: those named, else the index's, else the single file."""
    folder = Path(checkpoint_dir)
    if checkpoint_files:
        files = [folder / f for f in checkpoint_files]
    elif (folder / INDEX_FILE).is_file():
        index = json.loads((folder / INDEX_FILE).read_text())
        files = [folder / f for f in sorted(set(index["weight_map"].values()))]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pth"))
        hint = (
            f" It holds {pickled}: tunelite never unpickles weights; convert them to safetensors first "
            "(e.g. load with transformers and `save_pretrained(..., safe_serialization=True)`)."
            if pickled else ""
        )
        raise CheckpointError(f"no .safetensors weights in {folder}.{hint}")
    for f in files:
        if not f.suffix == ".safetensors":
            raise CheckpointError(f"{f}: only .safetensors files are read; list safetensors files in checkpoint_files")
        if not f.is_file():
            raise CheckpointError(f"{f} is missing: the checkpoint folder is incomplete; download it again")
    return files


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one file, memory-mapped; a truncated or corrupt file is named."""
    try:
        with safe_open(path, framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} cannot be read as safetensors ({e}); the file is truncated or corrupt") from e


def load_hf_state_dict(checkpoint_dir: Path, checkpoint_files: list[str] | None = None) -> dict[str, torch.Tensor]:
    """All weights of an HF Llama folder, memory-mapped, under our names."""
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(checkpoint_dir, checkpoint_files):
        for key, value in read_safetensors(path).items():
            ours = hf_to_ours(key)
            if ours is None:
                if _IGNORED_HF_KEYS.match(key):
                    continue
                raise CheckpointError(f"{path}: tensor {key!r} is not part of a Llama model")
            state[ours] = value
    return state


def save_hf_state_dict(
    state_dict: dict[str, torch.Tensor], out_dir: Path, source_dir: Path | None, dtype: torch.dtype | None = None
) -> None:
    """Writes our weights under HF names, sharded like `source_dir`, with its config and tokenizer
    files (one `model.safetensors` when there is no source folder).

    `out_dir` must be fresh (callers write into an `atomic_folder`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_state = {ours_to_hf(k): v for k, v in state_dict.items()}
    if dtype is not None:
        hf_state = {k: v.to(dtype) for k, v in hf_state.items()}
    index_path = Path(source_dir or out_dir) / INDEX_FILE
    if source_dir is not None and index_path.is_file():
        source_map = json.loads(index_path.read_text())["weight_map"]
        files = sorted(set(source_map.values()))
        shards: dict[str, dict[str, torch.Tensor]] = {f: {} for f in files}
        for key, value in hf_state.items():
            shards[source_map.get(key, files[-1])][key] = value
        total = sum(v.numel() * v.element_size() for v in hf_state.values())
        weight_map = {k: f for f, shard in shards.items() for k in shard}
        for fname, shard in shards.items():
            save_file(_contiguous(shard), out_dir / fname, metadata={"format": "pt"})
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
    else:
        save_file(_contiguous(hf_state), out_dir / SINGLE_FILE, metadata={"format": "pt"})
    if source_dir is not None:
        copy_side_files(Path(source_dir), out_dir)


def copy_side_files(source_dir: Path, out_dir: Path) -> None:
    """Copies the config, generation and tokenizer files a model folder has, so a folder written
    from its weights loads with the same tokenizer and generation settings."""
    for name in SIDE_FILES:
        if (source_dir / name).is_file():
            (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source_dir / name, out_dir / name)


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


@dataclass
class HFCheckpointer:
    """Where a run's base weights come from: an HF model folder (config.json + safetensors)."""

    checkpoint_dir: str
    checkpoint_files: list[str] | None = None
    # The dtype the weights were stored in, so exports are written back in it.
    source_dtype: torch.dtype | None = field(default=None, init=False)

    def load(self, args: ModelArgs) -> dict[str, torch.Tensor]:
        check_model_matches(args, Path(self.checkpoint_dir))
        state = load_hf_state_dict(Path(self.checkpoint_dir), self.checkpoint_files)
        self.source_dtype = next(iter(state.values())).dtype
        return state

    def save(self, state_dict: dict[str, torch.Tensor], out_dir: Path, dtype: torch.dtype | None = None) -> None:
        """Writes in `dtype`, by default the dtype the base checkpoint was stored in."""
        save_hf_state_dict(state_dict, out_dir, Path(self.checkpoint_dir), dtype or self.source_dtype)
