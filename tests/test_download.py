"""`tunelite download` against stand-ins for the hub: snapshot_download replaced by a fake that
serves a Llama-3.1-like file list (what is asked for, where it lands, the record written), and
the real huggingface_hub pointed at a local server that knows no repository, or at a closed port."""

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import huggingface_hub.constants
import pytest
from huggingface_hub.utils import filter_repo_objects

from tunelite.files import SOURCE_RECORD
from tunelite.cli.main import main

COMMIT = "0e9e39f249a16976918f6564b8830bc894c89659"
LLAMA_REPO = [
    ".gitattributes", "LICENSE", "README.md", "USE_POLICY.md", "config.json", "generation_config.json",
    "model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors", "model-00003-of-00004.safetensors",
    "model-00004-of-00004.safetensors", "model.safetensors.index.json", "original/consolidated.00.pth",
    "original/params.json", "original/tokenizer.model", "special_tokens_map.json", "tokenizer.json",
    "tokenizer_config.json",
]
WANTED = [
    "config.json", "generation_config.json", "model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors",
    "model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors", "model.safetensors.index.json",
    "original/tokenizer.model", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
]
SECRET = "hf_NotARealTokenButSecret"


class FakeHub:
    """snapshot_download over one repository's file list, applying the patterns as the hub does."""

    def __init__(self, files: list[str]) -> None:
        self.files, self.calls = files, []

    def __call__(self, repo_id: str, *, revision=None, token=None, local_dir=None, dry_run=False,
                 allow_patterns=None, ignore_patterns=None):
        self.calls.append({"repo_id": repo_id, "revision": revision, "token": token, "local_dir": local_dir,
                           "dry_run": dry_run})
        selected = list(filter_repo_objects(self.files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        if dry_run:
            return [SimpleNamespace(filename=name, commit_hash=COMMIT) for name in selected]
        for name in selected:
            (Path(local_dir) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(local_dir) / name).write_text(name)
        return str(local_dir)


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    hub = FakeHub(LLAMA_REPO)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return hub


def test_downloads_only_weights_config_and_tokenizer_and_records_the_commit(tmp_path, fake_hub, capsys):
    out = tmp_path / "llama"
    assert main(["download", "meta-llama/Llama-3.1-8B-Instruct", "--output-dir", str(out), "--token", SECRET]) == 0
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == sorted([*WANTED, SOURCE_RECORD])
    assert json.loads((out / SOURCE_RECORD).read_text()) == {"repo_id": "meta-llama/Llama-3.1-8B-Instruct",
                                                             "revision": COMMIT}
    plan, fetch = fake_hub.calls
    assert plan["dry_run"] and plan["revision"] is None
    # The download is pinned to the commit the plan resolved.
    assert (fetch["revision"], fetch["local_dir"], fetch["token"]) == (COMMIT, out, SECRET)
    printed = capsys.readouterr()
    assert COMMIT in printed.out and SECRET not in printed.out + printed.err


def test_token_defaults_to_hf_token_and_default_folder_is_models_repo_name(tmp_path, fake_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.chdir(tmp_path)
    assert main(["download", "meta-llama/Llama-3.1-8B-Instruct", "--revision", "main"]) == 0
    assert fake_hub.calls[0]["token"] == SECRET and fake_hub.calls[0]["revision"] == "main"
    assert (tmp_path / "models" / "Llama-3.1-8B-Instruct" / SOURCE_RECORD).is_file()


def test_a_repository_without_safetensors_is_refused_before_downloading(tmp_path, fake_hub, capsys):
    fake_hub.files = ["config.json", "pytorch_model.bin", "tokenizer.json"]
    assert main(["download", "gpt2", "--output-dir", str(tmp_path / "gpt2")]) == 2
    assert "gpt2 has no .safetensors weights" in capsys.readouterr().err
    assert [call["dry_run"] for call in fake_hub.calls] == [True]


def test_a_folder_holding_another_download_is_refused(tmp_path, fake_hub, capsys):
    out = tmp_path / "model"
    assert main(["download", "meta-llama/Llama-3.1-8B-Instruct", "--output-dir", str(out)]) == 0
    assert main(["download", "Qwen/Qwen2.5-7B-Instruct", "--output-dir", str(out)]) == 2
    assert "holds a download of meta-llama/Llama-3.1-8B-Instruct" in capsys.readouterr().err


def test_hub_errors_never_print_the_token(tmp_path, monkeypatch, capsys):
    def echoing_hub(*args, **kwargs):  # an error that echoes the request's credentials
        raise OSError(f"proxy refused: Authorization: Bearer {kwargs['token']}\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", echoing_hub)
    assert main(["download", "a/b", "--output-dir", str(tmp_path / "m"), "--token", SECRET]) == 2
    err = capsys.readouterr().err
    assert SECRET not in err and "Bearer ***" in err and len(err.strip().splitlines()) == 1


class _NoRepositories(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # what the hub answers for an unknown repository
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("X-Error-Message", "Repository not found")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def hub_without_repositories(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NoRepositories)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
    yield url
    server.shutdown()
    thread.join()


def test_a_missing_repository_is_one_clear_line(tmp_path, hub_without_repositories, capsys):
    assert main(["download", "nobody/no-such-model", "--output-dir", str(tmp_path / "m"), "--token", SECRET]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: no repository nobody/no-such-model on the Hugging Face hub "
                                "(if it is gated or private, pass --token or set HF_TOKEN)"]
    assert not (tmp_path / "m" / SOURCE_RECORD).exists()


def test_no_network_is_one_clear_line(tmp_path, monkeypatch, capsys):
    with __import__("socket").socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{closed}")
    assert main(["download", "Qwen/Qwen2.5-7B-Instruct", "--output-dir", str(tmp_path / "m"), "--token", SECRET]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "cannot reach the Hugging Face hub" in err and SECRET not in err


def test_registering_the_command_does_not_import_huggingface_hub() -> None:
    """So `tunelite --help` does not pay for it: the hub is imported when a download runs."""
    import subprocess
    import sys

    code = ("import argparse, sys; from tunelite.cli import download; "
            "download.add_parser(argparse.ArgumentParser().add_subparsers()); print('huggingface_hub' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_download_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["download", "--help"])
    assert exit_.value.code == 0
    assert "usage: tunelite download" in capsys.readouterr().out
