"""Adapters in peft's on-disk layout, the format the ecosystem loads with `PeftModel.from_pretrained`.

Our `layers.N.attn.q_proj.lora_a` becomes peft's
`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` (through the checkpoint layout of
the model's family), and `adapter_config.json` names the HF modules the adapters sit on: `q_proj`,
`qkv_proj` for Phi-3, `c_attn` for GPT-2. An adapter on a fused projection is one LoRA on the
fused module, as peft puts it on transformers' model.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from tunelite.checkpointing.atomic import verify_written_files
from tunelite.checkpointing.hf import ADAPTERS, read_safetensors
from tunelite.config.values import ARGUMENT_RANGES, value_problem
from tunelite.files import SOURCE_RECORD, read_json
from tunelite.runtime.shards import local_shard
from tunelite.errors import CheckpointError
from tunelite.models.decoder import LoRAArgs, ModelArgs, attention_projections, mlp_projections
from tunelite.modules.lora import LoRALinear, adapter_state_dict

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."
_SUFFIX_TO_PEFT = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight"}


def peft_key(our_key: str, model_type: str = "llama") -> str:
    """peft's name of one of our adapter tensors, in the checkpoint layout of `model_type`."""
    module, suffix = our_key.rsplit(".", 1)
    return _PEFT_PREFIX + ADAPTERS[model_type].hf_module(module) + "." + _SUFFIX_TO_PEFT[suffix]


def load_peft_adapter(folder: Path, model_type: str = "llama") -> tuple[dict[str, torch.Tensor], dict]:
    """A peft adapter folder as our adapter state dict and its adapter_config.json, its module
    names read in the checkpoint layout of `model_type` (Llama's serves Mistral, Qwen and Gemma 2
    too; an adapter of another layout is refused naming its first unknown module); one tunelite
    wrote is checked against its checkpoint's manifest first."""
    folder = Path(folder)
    layout = ADAPTERS[model_type]
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name} is missing: not a peft adapter folder")
    verify_written_files(folder)
    theirs = read_safetensors(folder / ADAPTER_WEIGHTS)
    back = {v: k for k, v in _SUFFIX_TO_PEFT.items()}
    ours = {}
    for key, value in theirs.items():
        module, lora_name, _ = key.removeprefix(_PEFT_PREFIX).rsplit(".", 2)
        suffix = lora_name + ".weight"
        if suffix not in back:
            raise CheckpointError(f"{folder / ADAPTER_WEIGHTS}: tensor {key!r} is not a LoRA A or B matrix")
        our_module = layout.our_module(module)
        if our_module is None:
            raise CheckpointError(f"{folder / ADAPTER_WEIGHTS}: {key!r} sits on a module tunelite does not know")
        ours[our_module + "." + back[suffix]] = value
    return ours, read_adapter_config(folder)


def read_adapter_config(folder: Path) -> dict:
    """A peft adapter folder's adapter_config.json, its size bounded and its rank, alpha and dropout
    checked (a rank of 1e9 would ask for terabytes); a missing or unusable file is named."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: not a peft adapter folder ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    config = read_json(path, "adapter config", CheckpointError)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object (peft's LoraConfig), not {type(config).__name__}")
    # peft's names for the LoRA builders' lora_rank, lora_alpha and lora_dropout, checked against their ranges.
    checked = {"r": ("lora_rank", "int"), "lora_alpha": ("lora_alpha", "float"),
               "lora_dropout": ("lora_dropout", "float")}
    for key, (argument, spec) in checked.items():
        if key in config or key != "lora_dropout":  # peft always writes r and lora_alpha
            problem = value_problem(key, config.get(key), spec, ARGUMENT_RANGES[argument])
            if problem:
                raise CheckpointError(f"{path}: {problem}")
    return config


def lora_args_from_adapter_config(folder: Path, args: ModelArgs) -> LoRAArgs:
    """The LoRA layout an adapter was trained with (rank, alpha, target modules), read from its
    adapter_config.json, so the model of `args` to load it into is built without restating them."""
    path = Path(folder) / ADAPTER_CONFIG
    config = read_adapter_config(folder)
    targets = config.get("target_modules")
    if not isinstance(targets, list) or not targets:
        raise CheckpointError(f"{path}: target_modules must list the adapted modules (q_proj, v_proj, ...), "
                              f"got {targets!r}")
    unsupported = [key for key in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern") if config.get(key)]
    if unsupported:
        raise CheckpointError(f"{path}: {', '.join(unsupported)} is set; tunelite loads plain LoRA adapters only")
    layout = ADAPTERS[args.model_type]
    attention = [f"attn.{name}" for name in attention_projections(args)]
    mlp = [f"mlp.{name}" for name in mlp_projections(args)]
    linears = [*attention, *mlp, "output"]
    adapted = {ours for target in targets for ours in layout.targeted_by(target) if ours in linears}
    unknown = sorted(t for t in targets if not set(layout.targeted_by(t)) & set(linears))
    if unknown:
        raise CheckpointError(f"{path}: target_modules {unknown} are not projections of a {args.model_type} model; "
                              f"tunelite adapts {sorted(layout.target_name(m) for m in linears)}")
    mlp_adapted = [m for m in mlp if m in adapted]
    if mlp_adapted and len(mlp_adapted) != len(mlp):
        raise CheckpointError(f"{path}: adapters on {[layout.target_name(m) for m in mlp_adapted]} only; tunelite "
                              f"puts them on all of {[layout.target_name(m) for m in mlp]} or on none")
    return LoRAArgs(
        lora_attn_modules=tuple(m.removeprefix("attn.") for m in attention if m in adapted),
        apply_lora_to_mlp=bool(mlp_adapted),
        apply_lora_to_output="output" in adapted,
        lora_rank=config["r"],
        lora_alpha=float(config["lora_alpha"]),
    )


def load_adapter_into(model: nn.Module, folder: Path) -> None:
    """Copies a peft adapter folder's weights into the model's adapters, to continue training them.

    Refuses, naming the folder, when the adapter was made for other modules, rank or alpha."""
    adapter, config = load_peft_adapter(folder, model.args.model_type)
    modules = lora_modules(model)
    if not modules:
        raise CheckpointError(f"{folder} is a LoRA adapter, but the model has no adapters to load it into; "
                              "build it with a lora_* model builder")
    first = next(iter(modules.values()))
    if config.get("r") != first.rank or float(config.get("lora_alpha", 0)) != float(first.alpha):
        raise CheckpointError(
            f"{Path(folder) / ADAPTER_CONFIG}: adapter has r={config.get('r')}, lora_alpha={config.get('lora_alpha')}, "
            f"but the model has lora_rank={first.rank}, lora_alpha={first.alpha}; set them to match the adapter"
        )
    ours = {f"{name}.{s}": getattr(m, s) for name, m in modules.items() for s in ("lora_a", "lora_b")}
    if adapter.keys() != ours.keys():
        only_file, only_model = sorted(adapter.keys() - ours.keys()), sorted(ours.keys() - adapter.keys())
        raise CheckpointError(
            f"{Path(folder) / ADAPTER_WEIGHTS} covers other modules than the model's adapters (only in the file: "
            f"{only_file[:3]}, only in the model: {only_model[:3]}); make lora_attn_modules, apply_lora_to_mlp and "
            "apply_lora_to_output match the run that wrote it"
        )
    with torch.no_grad():
        for key, param in ours.items():
            if adapter[key].shape != param.shape:
                raise CheckpointError(f"{Path(folder) / ADAPTER_WEIGHTS}: {key} has shape {tuple(adapter[key].shape)}, "
                                      f"the model's is {tuple(param.shape)}")
            param.copy_(local_shard(adapter[key], param, param.device, param.dtype))  # this rank's rows when sharded


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def peft_adapter_config(model: nn.Module, base_model_name_or_path: str) -> dict:
    """peft's LoraConfig fields for the adapters this model carries."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA adapters to export")
    layout = ADAPTERS[model.args.model_type]
    kinds = {name.split(".", 2)[-1] if name.startswith("layers.") else name for name in modules}
    first = next(iter(modules.values()))
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": first.rank,
        "lora_alpha": first.alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(layout.target_name(kind) for kind in kinds),
        "bias": "none",
        # GPT-2's Conv1D stores (in, out): peft then transposes the merged update, not the A and B it saves.
        "fan_in_fan_out": any(kind in layout.transposed for kind in kinds),
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }


def base_model_name(checkpoint_dir: str | Path, base_model_id: str | None = None) -> str:
    """What an adapter names as its `base_model_name_or_path`: `base_model_id` when given, else the
    hub id `tunelite download` recorded in the base folder, else the folder's path. A hub id lets
    peft find the base wherever the adapter is shared; a local path only works on this machine."""
    if base_model_id:
        return base_model_id
    record = Path(checkpoint_dir) / SOURCE_RECORD
    if not record.is_file():
        return str(checkpoint_dir)
    try:
        repo_id = read_json(record, "download record", CheckpointError).get("repo_id")
    except AttributeError as e:
        raise CheckpointError(f"{record} is not a JSON object with a repo_id ({e}); delete it, or set "
                              "base_model_id in the config") from e
    if not isinstance(repo_id, str) or not repo_id:
        raise CheckpointError(f"{record}: repo_id must be a hub id like meta-llama/Llama-3.1-8B, got {repo_id!r}; "
                              "fix it, or set base_model_id in the config")
    return repo_id


def save_peft_adapter(
    model: nn.Module, out_dir: Path, base_model_name_or_path: str, adapter: dict[str, torch.Tensor] | None = None
) -> None:
    """Writes `adapter_model.safetensors` and `adapter_config.json` into `out_dir`. `adapter` (our
    names) stands in for the model's own adapter tensors when those are shards, gathered whole."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter = adapter_state_dict(model) if adapter is None else adapter
    model_type = model.args.model_type
    tensors = {peft_key(key, model_type): value.detach().cpu().contiguous() for key, value in adapter.items()}
    save_file(tensors, out_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    config = peft_adapter_config(model, base_model_name_or_path)
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))

