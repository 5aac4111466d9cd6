"""Hugging Face checkpoints <-> our module names, through safetensors only.

One state-dict adapter per checkpoint layout (as torchtitan has one per model), chosen by the
folder's `model_type`: Llama, SmolLM2, Mistral and Qwen 2.5 share transformers' Llama names,
Qwen 3 adds its q/k norms, Phi-3 its fused projections, Gemma 2 its four norms a layer, and
GPT-2 has names (and Conv1D weights stored transposed) of its own. Files are read memory-mapped,
so loading never holds two copies of the weights, and written back sharded like the input so
`from_pretrained` and vLLM see the folder they were given.
"""

import json
import re
import shutil
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tunelite.errors import CheckpointError
from tunelite.files import read_json
from tunelite.models.decoder import ModelArgs
from tunelite.models.hf_config import (
    SUPPORTED_MODEL_TYPES,
    hf_config_from_model_args,
    model_args_from_hf_config,
    model_type_of,
    read_hf_config,
)

# The config.json readers and writer of tunelite.models.hf_config are re-exported for code that
# imported them from here.
__all__ = ["ADAPTERS", "HFCheckpointer", "StateDictAdapter", "check_model_matches", "folder_layout",
           "hf_config_from_model_args", "load_hf_state_dict", "model_args_from_hf_config", "read_hf_config",
           "read_safetensors", "save_hf_state_dict", "weight_files"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files a model folder carries beside its weights, copied into exported folders so the export
# loads with the same tokenizer, chat template and generation settings.
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
# Buffers some exports carry (rotary frequencies, GPT-2's causal mask); they are recomputed, not loaded.
_IGNORED_HF_KEYS = re.compile(r".*(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias)$")


@dataclass(frozen=True)
class StateDictAdapter:
    """HF module names <-> ours for one checkpoint layout; parameters keep their suffix (weight, bias).

    `modules` maps global HF modules to ours; `layer_modules` those inside `layer_prefix`.N.
    `transposed` names our modules whose HF weight is stored (in, out), as GPT-2's Conv1D does.
    `optional_root` is a prefix old exports may leave out (GPT-2's `transformer.`)."""

    modules: dict[str, str]
    layer_prefix: str
    layer_modules: dict[str, str]
    transposed: frozenset[str] = frozenset()
    optional_root: str = ""
    _back: dict[str, str] = field(init=False, repr=False, compare=False)
    _layer_back: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_back", {v: k for k, v in self.modules.items()})
        object.__setattr__(self, "_layer_back", {v: k for k, v in self.layer_modules.items()})

    def our_module(self, hf_module: str) -> str | None:
        """Our name of an HF module (`model.layers.3.self_attn.q_proj` -> `layers.3.attn.q_proj`)."""
        if self.optional_root and not hf_module.startswith(self.optional_root):
            hf_module = self.optional_root + hf_module
        if hf_module in self.modules:
            return self.modules[hf_module]
        m = re.fullmatch(re.escape(self.layer_prefix) + r"\.(\d+)\.(.+)", hf_module)
        if m and m.group(2) in self.layer_modules:
            return f"layers.{m.group(1)}.{self.layer_modules[m.group(2)]}"
        return None

    def hf_module(self, our_module: str) -> str:
        if our_module in self._back:
            return self._back[our_module]
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", our_module)
        if m and m.group(2) in self._layer_back:
            return f"{self.layer_prefix}.{m.group(1)}.{self._layer_back[m.group(2)]}"
        raise KeyError(f"no Hugging Face name for {our_module!r}")

    def to_ours(self, hf_key: str) -> str | None:
        module, _, param = hf_key.rpartition(".")
        ours = self.our_module(module)
        return None if ours is None else f"{ours}.{param}"

    def to_hf(self, our_key: str) -> str:
        module, _, param = our_key.rpartition(".")
        return f"{self.hf_module(module)}.{param}"

    def is_transposed(self, our_key: str) -> bool:
        """Whether the HF tensor of this weight is stored (in, out): moved across with a transpose."""
        module, _, param = our_key.rpartition(".")
        return param == "weight" and re.sub(r"^layers\.\d+\.", "", module) in self.transposed

    def target_name(self, our_module: str) -> str:
        """peft's `target_modules` entry for one of our per-layer modules (or `output`): the HF
        module's last name, or, where another module of the layer shares it (GPT-2's two c_proj),
        its path within the layer, which peft matches as a suffix."""
        relative = self._layer_back.get(our_module) or self._back[our_module]
        short = relative.rsplit(".", 1)[-1]
        clashes = [k for k in self.layer_modules if k.rsplit(".", 1)[-1] == short and k != relative]
        return relative if clashes else short

    def targeted_by(self, target: str) -> list[str]:
        """Our per-layer modules (or `output`) a peft `target_modules` entry adapts: those whose HF
        name is the entry or ends with `.entry`, as peft matches them."""
        named = {**{k: v for k, v in self.layer_modules.items()}, **{"lm_head": "output"}}
        return [ours for theirs, ours in named.items() if theirs == target or theirs.endswith("." + target)]


_LLAMA_GLOBALS = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output"}
_SPLIT_ATTENTION = {"self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj",
                    "self_attn.v_proj": "attn.v_proj", "self_attn.o_proj": "attn.output_proj"}
_SPLIT_MLP = {"mlp.gate_proj": "mlp.w1", "mlp.down_proj": "mlp.w2", "mlp.up_proj": "mlp.w3"}
_LLAMA_NORMS = {"input_layernorm": "sa_norm", "post_attention_layernorm": "mlp_norm"}

LLAMA_LAYOUT = StateDictAdapter(_LLAMA_GLOBALS, "model.layers", _SPLIT_ATTENTION | _SPLIT_MLP | _LLAMA_NORMS)
QWEN3_LAYOUT = StateDictAdapter(_LLAMA_GLOBALS, "model.layers", _SPLIT_ATTENTION | _SPLIT_MLP | _LLAMA_NORMS | {
    "self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm"})
PHI3_LAYOUT = StateDictAdapter(_LLAMA_GLOBALS, "model.layers", _LLAMA_NORMS | {
    "self_attn.qkv_proj": "attn.qkv_proj", "self_attn.o_proj": "attn.output_proj",
    "mlp.gate_up_proj": "mlp.w13", "mlp.down_proj": "mlp.w2"})
# Gemma 2's `post_attention_layernorm` norms the attention output; its pre-MLP norm has its own name.
GEMMA2_LAYOUT = StateDictAdapter(_LLAMA_GLOBALS, "model.layers", _SPLIT_ATTENTION | _SPLIT_MLP | {
    "input_layernorm": "sa_norm", "post_attention_layernorm": "sa_post_norm",
    "pre_feedforward_layernorm": "mlp_norm", "post_feedforward_layernorm": "mlp_post_norm"})
GPT2_LAYOUT = StateDictAdapter(
    {"transformer.wte": "tok_embeddings", "transformer.wpe": "pos_embeddings", "transformer.ln_f": "norm",
     "lm_head": "output"},
    "transformer.h",
    {"ln_1": "sa_norm", "attn.c_attn": "attn.qkv_proj", "attn.c_proj": "attn.output_proj", "ln_2": "mlp_norm",
     "mlp.c_fc": "mlp.w1", "mlp.c_proj": "mlp.w2"},
    transposed=frozenset({"attn.qkv_proj", "attn.output_proj", "mlp.w1", "mlp.w2"}),
    optional_root="transformer.",
)

ADAPTERS: dict[str, StateDictAdapter] = {
    "llama": LLAMA_LAYOUT,
    "mistral": LLAMA_LAYOUT,
    "qwen2": LLAMA_LAYOUT,
    "qwen3": QWEN3_LAYOUT,
    "phi3": PHI3_LAYOUT,
    "gemma2": GEMMA2_LAYOUT,
    "gpt2": GPT2_LAYOUT,
}
assert set(ADAPTERS) == set(SUPPORTED_MODEL_TYPES), "every family config.json reads needs a checkpoint layout"


def folder_layout(folder: Path) -> StateDictAdapter:
    """The checkpoint layout of an HF folder, by its config.json's `model_type`."""
    return ADAPTERS[model_type_of(read_hf_config(folder), str(Path(folder) / "config.json"))]


def check_model_matches(args: ModelArgs, checkpoint_dir: Path) -> None:
    """Names the family, or every size and trait, that differs, so a wrong `model:` builder fails
    before any weight is read. The window (`max_seq_len`) may differ where positions are rotary:
    base and instruct releases state different ones for the same weights."""
    path = Path(checkpoint_dir) / "config.json"
    hf = read_hf_config(checkpoint_dir)
    if model_type_of(hf, str(path)) != args.model_type:
        raise CheckpointError(
            f"the model built from `model._component_` is a {args.model_type!r} model, but {path} holds a "
            f"{hf.get('model_type')!r} one. Pick a builder of that family, or tunelite.models.from_checkpoint "
            "to build whatever the folder holds."
        )
    theirs = model_args_from_hf_config(hf, str(path))
    ours_, theirs_ = (replace(a, head_dim=a.resolved_head_dim) for a in (args, theirs))
    skip = set() if args.learned_positions else {"max_seq_len"}
    diffs = [f"{f.name}: model {getattr(ours_, f.name)} vs checkpoint {getattr(theirs_, f.name)}"
             for f in fields(ModelArgs) if f.name not in skip and getattr(ours_, f.name) != getattr(theirs_, f.name)]
    if diffs:
        raise CheckpointError(
            f"the model built from `model._component_` does not match {path}: "
            + "; ".join(diffs) + ". Pick the builder for this checkpoint's family and size."
        )


def weight_files(checkpoint_dir: Path, checkpoint_files: list[str] | None = None) -> list[Path]:
    """The safetensors files of a folder: those named, else the index's, else the single file."""
    folder = Path(checkpoint_dir)
    if checkpoint_files:
        files = [folder / f for f in checkpoint_files]
    elif (folder / INDEX_FILE).is_file():
        files = [folder / f for f in sorted(set(read_weight_map(folder).values()))]
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


def read_weight_map(folder: Path) -> dict[str, str]:
    """Which file holds each tensor, from a sharded folder's index, its size bounded; a damaged index is named."""
    path = Path(folder) / INDEX_FILE
    index = read_json(path, "safetensors index", CheckpointError)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) and "/" not in f for f in weight_map.values()):
        raise CheckpointError(f"{path} is damaged (no `weight_map` of tensor names to file names in the folder); "
                              "re-download the checkpoint")
    return weight_map


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one file, memory-mapped; a truncated or corrupt file is named."""
    try:
        with safe_open(path, framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} cannot be read as safetensors ({e}); the file is truncated or corrupt") from e


def load_hf_state_dict(checkpoint_dir: Path, checkpoint_files: list[str] | None = None) -> dict[str, torch.Tensor]:
    """All weights of an HF folder, memory-mapped, under our names (the layout from its config.json)."""
    files = weight_files(checkpoint_dir, checkpoint_files)
    adapter = folder_layout(checkpoint_dir)
    state: dict[str, torch.Tensor] = {}
    for path in files:
        for key, value in read_safetensors(path).items():
            ours = adapter.to_ours(key)
            if ours is None:
                if _IGNORED_HF_KEYS.match(key):
                    continue
                raise CheckpointError(f"{path}: tensor {key!r} is not part of a model of this folder's model_type")
            state[ours] = value.t().contiguous() if adapter.is_transposed(ours) else value
    return state


def save_hf_state_dict(
    state_dict: dict[str, torch.Tensor], out_dir: Path, source_dir: Path | None, dtype: torch.dtype | None = None,
    model_type: str | None = None,
) -> None:
    """Writes our weights under HF names, sharded like `source_dir`, with its config and tokenizer
    files (one `model.safetensors` when there is no source folder). The names are those of
    `model_type`'s layout, by default of the source folder's config.json.

    `out_dir` must be fresh (callers write into an `atomic_folder`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    assert source_dir is not None or model_type is not None, "a layout comes from model_type or source_dir"
    adapter = ADAPTERS[model_type] if model_type is not None else folder_layout(source_dir)
    hf_state = {adapter.to_hf(k): v.t() if adapter.is_transposed(k) else v for k, v in state_dict.items()}
    if dtype is not None:
        hf_state = {k: v.to(dtype) for k, v in hf_state.items()}
    index_path = Path(source_dir or out_dir) / INDEX_FILE
    if source_dir is not None and index_path.is_file():
        source_map = read_weight_map(Path(source_dir))
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
