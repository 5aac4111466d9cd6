"""`tunelite upload` against a stand-in Hugging Face Hub on 127.0.0.1: huggingface_hub's own
requests arrive, the right files and a model card go up, and no secret is in any uploaded byte."""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import huggingface_hub.constants
import pytest

from conftest import write_hf_checkpoint
from test_generation import _lora_model_with_trained_adapter
from tunelite.checkpointing.merge import merge_adapter
from tunelite.checkpointing.peft import save_peft_adapter
from tunelite.cli.main import main
from tunelite.hub.upload import UploadError, files_to_upload
from tunelite.runtime.secrets import environment_secrets, is_secret_name, redact
from tunelite.serving.server import send_json

HF_TOKEN = "hf_Secret0TokenValue1234567890"
WANDB_KEY = "wandb0secret0key0abcdef0123456789"


class StandInHub(ThreadingHTTPServer):
    """The few Hub endpoints an upload calls; every file is taken inline ("regular" upload mode)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.created: list[dict] = []
        self.files: dict[str, bytes] = {}
        self.bodies: list[bytes] = []
        self.authorizations: list[str | None] = []
        self.refuse_with: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _HubHandler(BaseHTTPRequestHandler):
    server: StandInHub

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.bodies.append(body)
        self.server.authorizations.append(self.headers.get("Authorization"))
        if self.server.refuse_with:
            return self._json(self.server.refuse_with, {"error": "Invalid credentials in Authorization header"})
        path = self.path.split("?")[0]
        if path == "/api/repos/create":
            request = json.loads(body)
            self.server.created.append(request)
            return self._json(200, {"url": f"{self.server.url}/{request['organization']}/{request['name']}"})
        if path == "/api/validate-yaml":
            return self._json(200, {"errors": [], "warnings": []})
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                              for f in files]})
        if "/commit/" in path:
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.server.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            repo = path.removeprefix("/api/models/").split("/commit/")[0]
            return self._json(200, {"commitUrl": f"{self.server.url}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40})
        self._json(404, {"error": f"stand-in has no {path}"})

    def _json(self, status: int, body: dict) -> None:
        send_json(self, status, body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def hub(monkeypatch):
    server = StandInHub()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def run(tmp_path) -> Path:
    """A run's output as a LoRA recipe leaves it, whose logged config holds resolved secrets."""
    base = tmp_path / "base"
    write_hf_checkpoint(base)
    (base / "tunelite_source.json").write_text('{"repo_id": "meta-llama/Llama-3.1-8B-Instruct", "revision": "main"}')
    out = tmp_path / "out"
    save_peft_adapter(_lora_model_with_trained_adapter(base), out / "step_4" / "adapter", "meta-llama/Llama-3.1-8B-Instruct")
    (out / "step_4" / "recipe_state.pt").write_bytes(b"pickled optimizer state")
    (out / "step_4" / "manifest.json").write_text('{"run_id": "r", "files": {}}')
    logs = out / "logs"
    logs.mkdir()
    (logs / "metrics_20260101-000000.jsonl").write_text(
        json.dumps({"step": 2, "loss": 2.5, "val_loss": 2.7}) + "\n" + json.dumps({"step": 4, "loss": 1.25, "lr": 1e-4}) + "\n")
    (logs / "metrics_20260101-000000.config.yaml").write_text(f"""
output_dir: {out}
checkpointer:
  _component_: tunelite.checkpointing.HFCheckpointer
  checkpoint_dir: {base}
dataset:
  _component_: tunelite.data.alpaca_dataset
  source: https://user:{HF_TOKEN}@example.com/data.json
model:
  _component_: tunelite.models.lora_llama3_1_8b
  lora_rank: 4
metric_logger:
  - _component_: tunelite.training.metric_logging.WandBLogger
    api_key: {WANDB_KEY}
    project: demo
hf_token: {HF_TOKEN}
password: hunter2
note: "${{oc.env:HF_TOKEN}}"
max_new_tokens: 5
""")
    return out


def test_adapter_upload_sends_its_files_and_a_card_with_no_secret(hub, run, capsys):
    assert main(["upload", str(run / "step_4" / "adapter"), "me/tiny-lora", "--private"]) == 0
    assert hub.created == [{"name": "tiny-lora", "organization": "me", "visibility": "private", "type": "model"}]
    assert sorted(hub.files) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert hub.files["adapter_model.safetensors"] == (run / "step_4" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert f"Bearer {HF_TOKEN}" in hub.authorizations  # the token authenticates, and goes nowhere else

    card = hub.files["README.md"].decode()
    assert card.startswith("---\nbase_model: meta-llama/Llama-3.1-8B-Instruct\nlibrary_name: peft\n")
    assert "tunelite.data.alpaca_dataset" in card and "| loss | 1.25 |" in card and "| val_loss | 2.7 |" in card
    assert "tunelite run lora_finetune_single_device --config config.yaml" in card
    assert "lora_rank: 4" in card and "max_new_tokens: 5" in card
    assert "${oc.env:HF_TOKEN}" in card  # names the variable, not its value
    assert "hunter2" not in card
    for sent in [*hub.bodies, *hub.files.values(), capsys.readouterr().out.encode()]:
        assert HF_TOKEN.encode() not in sent and WANDB_KEY.encode() not in sent


def test_merged_folder_card_names_the_base_and_says_transformers(hub, run, tmp_path):
    merge_adapter(tmp_path / "base", run / "step_4" / "adapter", tmp_path / "merged",
                  base_model_name="meta-llama/Llama-3.1-8B-Instruct")
    assert main(["upload", str(tmp_path / "merged"), "me/tiny-merged"]) == 0
    assert {"config.json", "model.safetensors", "tunelite_merge.json", "README.md"} == set(hub.files)
    card = hub.files["README.md"].decode()
    assert "base_model: meta-llama/Llama-3.1-8B-Instruct\nlibrary_name: transformers" in card
    assert "| loss | 1.25 |" in card  # the adapter's run, found through the merge record
    assert all(HF_TOKEN.encode() not in sent and WANDB_KEY.encode() not in sent for sent in hub.bodies)


def test_run_folder_logs_and_training_state_are_never_uploaded(run):
    with pytest.raises(UploadError, match="run's output folder: upload one of its step_N/adapter"):
        files_to_upload(run)
    (run / "step_4" / "adapter" / "logs").mkdir()
    (run / "step_4" / "adapter" / "logs" / "x.jsonl").write_text("{}")
    assert [p.name for p in files_to_upload(run / "step_4" / "adapter")] == [
        "adapter_config.json", "adapter_model.safetensors"]


def test_a_file_holding_a_secret_stops_the_upload_before_anything_is_sent(hub, run, capsys):
    config = run / "step_4" / "adapter" / "adapter_config.json"
    config.write_text(config.read_text().replace('"bias"', f'"note": "{HF_TOKEN}", "bias"'))
    assert main(["upload", str(run / "step_4" / "adapter"), "me/tiny-lora"]) == 2
    err = capsys.readouterr().err
    assert "adapter_config.json contains the value of a secret" in err and HF_TOKEN not in err
    assert hub.bodies == []


def test_a_refused_token_is_one_line_with_the_fix_and_no_token(hub, run, capsys):
    hub.refuse_with = 401
    assert main(["upload", str(run / "step_4" / "adapter"), "me/tiny-lora", "--token", "hf_other0token0value99"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: uploading ") and "--token" in err and len(err.strip().splitlines()) == 1
    assert "hf_other0token0value99" not in err and HF_TOKEN not in err


def test_secret_names_and_redaction():
    assert all(is_secret_name(n) for n in ["HF_TOKEN", "WANDB_API_KEY", "api_key", "password", "hf_token", "secret"])
    assert not any(is_secret_name(n) for n in ["max_tokens", "tokenizer", "keep_last_n_checkpoints", "apply_lora_to_mlp"])
    secrets = environment_secrets({"HF_TOKEN": HF_TOKEN, "PATH": "/usr/bin:/bin", "SHORT_TOKEN": "1"})
    assert secrets == [HF_TOKEN]
    config = {"tokenizer": {"path": "/t"}, "api_key": "abc", "x": [f"a{HF_TOKEN}b"], "token": None}
    assert redact(config, secrets) == {"tokenizer": {"path": "/t"}, "api_key": "<redacted>", "x": ["a<redacted>b"],
                                       "token": None}
