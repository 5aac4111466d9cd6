"""The README.md model card of an adapter or merged folder shared on the Hugging Face Hub.

Built from what is on disk: the folder (adapter_config.json, or a merged folder's record), and,
when the folder sits in a run's output (`OUT/step_N/adapter`, `OUT/step_N/model`), the run's
logged config and final metrics from `OUT/logs`. A logged config may hold secrets (a resolved
`${oc.env:HF_TOKEN}`, a key typed into the YAML), so values under secret-like keys are redacted
and every string equal to a secret of the environment is replaced, in the config and in the
finished card alike.
"""

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tunelite.checkpointing.merge import MERGE_RECORD
from tunelite.checkpointing.peft import ADAPTER_CONFIG, base_model_name, read_adapter_config
from tunelite.errors import CheckpointError
from tunelite.files import read_json
from tunelite.runtime.secrets import redact, scrub

_STEP_FOLDER = re.compile(r"step_\d+")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class RunLogs:
    """What a run logged: its config (interpolations unresolved) and its last metrics."""

    run_dir: Path
    config: dict
    final_metrics: dict


def find_run_logs(folder: Path) -> RunLogs | None:
    """The logs of the run whose `step_N/` holds `folder`, the newest when it was resumed; None
    for a folder outside a run's output."""
    step = Path(folder).resolve().parent
    if not _STEP_FOLDER.fullmatch(step.name) or not (step.parent / "logs").is_dir():
        return None
    metrics = sorted((step.parent / "logs").glob("metrics_*.jsonl"))
    if not metrics:
        return None
    config_file = metrics[-1].with_suffix(".config.yaml")
    config: dict = {}
    if config_file.is_file():
        try:
            config = OmegaConf.to_container(OmegaConf.load(config_file), resolve=False)
        except (OmegaConfBaseException, ValueError) as e:
            raise CheckpointError(f"{config_file} cannot be read as YAML ({e})") from e
    rows = [json.loads(line) for line in metrics[-1].read_text().splitlines() if line.strip()]
    final = dict(rows[-1]) if rows else {}
    for row in reversed(rows):  # evaluation may not run on the last logged step
        if "val_loss" in row:
            final.setdefault("val_loss", row["val_loss"])
            break
    return RunLogs(step.parent, config, final)


def base_model_of(folder: Path, logs: RunLogs | None) -> str | None:
    """The base model's name: from the adapter's config, a `tunelite merge` record, or the run's
    checkpointer."""
    folder = Path(folder)
    if (folder / ADAPTER_CONFIG).is_file():
        return read_adapter_config(folder).get("base_model_name_or_path")
    if (folder / MERGE_RECORD).is_file():
        return read_json(folder / MERGE_RECORD, "merge record", CheckpointError).get("base_model")
    if logs is not None:
        try:
            checkpoint_dir = OmegaConf.select(OmegaConf.create(logs.config), "checkpointer.checkpoint_dir")
        except OmegaConfBaseException:
            return None
        if checkpoint_dir:
            return base_model_name(checkpoint_dir, logs.config.get("base_model_id"))
    return None


def hub_id(name: str | None) -> str | None:
    """`name` when it is a hub id (org/name) rather than a path on this machine."""
    if not name or not _HUB_ID.fullmatch(name) or Path(name).exists():
        return None
    return name


def reproduce_command(config: dict, adapter: bool) -> str:
    """The `tunelite run` line for the logged config (the recipe inferred from it)."""
    distributed = any(str(key).startswith("fsdp_") for key in config)
    recipe = ("lora_finetune" if adapter or "lora" in str(config.get("model", {}).get("_component_", ""))
              else "full_finetune") + ("_distributed" if distributed else "_single_device")
    launcher = "tunelite run --nproc_per_node N" if distributed else "tunelite run"
    return f"{launcher} {recipe} --config config.yaml"


def model_card(folder: Path, repo_id: str, secrets: Sequence[str]) -> str:
    """The README.md for `folder` uploaded as `repo_id`: YAML front matter the Hub reads (base_model,
    library_name, tags), then the base, the data, final metrics, how to use it and how to rebuild it."""
    folder = Path(folder)
    adapter = (folder / ADAPTER_CONFIG).is_file()
    logs = find_run_logs(folder)
    if logs is None and (folder / MERGE_RECORD).is_file():
        adapter_dir = read_json(folder / MERGE_RECORD, "merge record", CheckpointError).get("adapter")
        logs = find_run_logs(Path(adapter_dir)) if adapter_dir else None
    base = base_model_of(folder, logs)
    base_id = hub_id(base)
    front = ["---"] + ([f"base_model: {base_id}"] if base_id else [])
    front += (["library_name: peft", "tags:", "- tunelite", "- lora", "- peft"] if adapter else
              ["library_name: transformers", "tags:", "- tunelite"] + (["- merge"] if (folder / MERGE_RECORD).is_file() else []))
    front += ["- text-generation", "pipeline_tag: text-generation", "---", ""]
    what = "A LoRA adapter (peft format)" if adapter else "A model in Hugging Face format (adapter merged into its base)"
    base_text = f"[{base_id}](https://huggingface.co/{base_id})" if base_id else f"`{base}`" if base else "not recorded"
    lines = [f"# {repo_id.split('/')[-1]}", "", f"{what}, fine-tuned with tunelite.",
             "", f"- **Base model:** {base_text}"]
    if logs is not None:
        dataset = logs.config.get("dataset") or {}
        source = dataset.get("source") if isinstance(dataset, Mapping) else None
        component = dataset.get("_component_") if isinstance(dataset, Mapping) else None
        if source or component:
            lines.append(f"- **Data:** `{source or 'built in'}`" + (f" through `{component}`" if component else ""))
        if logs.final_metrics:
            lines += ["", "## Final metrics", "", "| metric | value |", "|---|---|"]
            lines += [f"| {key} | {_number(value)} |" for key, value in logs.final_metrics.items()]
    lines += ["", "## Use it", "", "```python"] + _usage(repo_id, base_id or base, adapter) + ["```"]
    if logs is not None and logs.config:
        config_yaml = OmegaConf.to_yaml(OmegaConf.create(redact(logs.config, secrets)))
        lines += ["", "## Reproduce it", "", "Save the config below as `config.yaml` (secrets are redacted), then:",
                  "", "```bash", reproduce_command(logs.config, adapter), "```", "", "```yaml", config_yaml.rstrip(), "```"]
    return scrub("\n".join(front + lines) + "\n", secrets)


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _usage(repo_id: str, base: str | None, adapter: bool) -> list[str]:
    if adapter:
        return ["from peft import AutoPeftModelForCausalLM",
                f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")  # loads {base or "the base"} too']
    return ["from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
            f"# or serve it: vllm serve {repo_id}"]
