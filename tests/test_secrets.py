"""No secret from the environment reaches what a run writes: the config is logged as written,
`${oc.env:HF_TOKEN}` unresolved, to the metrics folder and to W&B; and whatever a logger writes
is scrubbed of secret values that reached a string anyway."""

import json

import pytest
import yaml
from omegaconf import OmegaConf

from tunelite.cli.main import main
from tunelite.modules.loss import LinearCrossEntropyLoss
from tunelite.runtime.secrets import REDACTED
from tunelite.training.metric_logging import DiskLogger

HF_TOKEN = "hf_secret0token0abcdefghijklmnop"
WANDB_KEY = "wandb0secret0key0abcdef0123456789"
received: list[str] = []


class TokenUsingLoss(LinearCrossEntropyLoss):
    """The demo's loss, built with a token: a user's component that needs a credential, handed to
    it from the environment by `${oc.env:HF_TOKEN}`."""

    def __init__(self, token: str, num_chunks: int = 8) -> None:
        super().__init__(num_chunks)
        received.append(token)


@pytest.fixture
def secret_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


LOGGERS = ("metric_logger=[{_component_: tunelite.training.metric_logging.DiskLogger, log_dir: '${output_dir}/logs'}, "
           "{_component_: tunelite.training.metric_logging.WandBLogger, project: secrets, mode: offline, "
           "log_dir: '${output_dir}/wandb'}]")


def test_no_environment_secret_reaches_any_file_a_run_writes(secret_environment, tmp_path):
    out = tmp_path / "out"
    received.clear()
    assert main(["run", "lora_finetune_single_device", "--config", "tiny/lora_cpu", f"output_dir={out}", "epochs=1",
                 "max_steps_per_epoch=2", "log_every_n_steps=1", "--trust", "test_secrets",
                 "loss._component_=test_secrets.TokenUsingLoss", "+loss.token=${oc.env:HF_TOKEN}", LOGGERS]) == 0
    assert received == [HF_TOKEN]  # the component had its secret
    files = [path for path in out.rglob("*") if path.is_file()]
    kinds = {path.suffix for path in files}
    assert {".jsonl", ".yaml", ".json", ".safetensors", ".wandb"} <= kinds, kinds
    for path in files:
        data = path.read_bytes()
        assert HF_TOKEN.encode() not in data and WANDB_KEY.encode() not in data, f"{path} holds a secret"
    logged = yaml.safe_load(next((out / "logs").glob("*.config.yaml")).read_text())
    assert logged["loss"]["token"] == "${oc.env:HF_TOKEN}"
    wandb_run = next(out.rglob("*.wandb")).read_bytes()
    assert b"${oc.env:HF_TOKEN}" in wandb_run  # W&B got the config, as written


def test_loggers_scrub_secret_values_and_secret_keys_that_reached_a_string(secret_environment, tmp_path):
    logger = DiskLogger(str(tmp_path / "logs"))
    config = OmegaConf.create({"output_dir": f"/runs/{HF_TOKEN}", "api_key": "typed-into-the-yaml",
                               "token_path": "${oc.env:HF_TOKEN}"})
    logger.log_config(config)
    logger.log_dict({"loss": 1.5, "note": f"pushed with {WANDB_KEY}"}, step=1)
    logger.close()
    text = "".join(path.read_text() for path in (tmp_path / "logs").iterdir())
    assert HF_TOKEN not in text and WANDB_KEY not in text and "typed-into-the-yaml" not in text
    logged = yaml.safe_load(next((tmp_path / "logs").glob("*.config.yaml")).read_text())
    assert logged == {"output_dir": f"/runs/{REDACTED}", "api_key": REDACTED, "token_path": "${oc.env:HF_TOKEN}"}
    assert json.loads(next((tmp_path / "logs").glob("*.jsonl")).read_text())["note"] == f"pushed with {REDACTED}"


def test_a_logger_writes_nothing_until_the_first_row(tmp_path):
    logger = DiskLogger(str(tmp_path / "logs"))
    logger.log_config(OmegaConf.create({"a": 1}))
    logger.close()
    assert not (tmp_path / "logs").exists()

