"""Sharing an adapter or merged folder on the Hugging Face Hub, with a generated model card.

One commit carries the folder's files and the card (`create_repo`, then `create_commit`, which
is what `upload_folder` does inside), so a repository never shows the weights without their card,
and the user's folder is not written to. Run logs, checkpoint state and manifests never go up,
and a file holding a secret of the environment stops the upload before anything is sent.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from tunelite.checkpointing.atomic import MANIFEST
from tunelite.checkpointing.peft import ADAPTER_CONFIG
from tunelite.errors import TuneliteError
from tunelite.hub.model_card import model_card
from tunelite.runtime.secrets import environment_secrets, scrub

CARD = "README.md"
# Never uploaded: the run's logs (they may hold resolved secrets), pickled training state, the
# checkpoint manifest (it lists the files, not the card), leftovers of interrupted writes.
_NEVER = ("logs", "recipe_state.pt", MANIFEST, CARD)
# Files above this size are weights, not text that a secret could sit in.
_SCANNED_BYTES = 10 * 2**20


class UploadError(TuneliteError):
    """The folder cannot be shared as it is, or the Hub refused the upload."""


@dataclass(frozen=True)
class Uploaded:
    url: str
    files: list[str]


def files_to_upload(folder: Path) -> list[Path]:
    """The folder's files that make up the model, after refusing a folder that is not one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UploadError(f"{folder} is not a folder")
    if not (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file():
        hint = (" It looks like a run's output folder: upload one of its step_N/adapter or step_N/model folders."
                if (folder / "logs").is_dir() or any(folder.glob("step_*")) else "")
        raise UploadError(f"{folder} holds neither {ADAPTER_CONFIG} (a peft adapter) nor config.json (an HF model): "
                          f"nothing to upload.{hint}")
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        parts = path.relative_to(folder).parts
        if parts[0] in _NEVER or "logs" in parts or any(part.startswith(".") for part in parts) or path.suffix in (".pt", ".pth", ".bin"):
            continue
        files.append(path)
    return files


def check_no_secrets(files: list[Path], secrets: list[str]) -> None:
    """Refuses, naming the file, to upload a (text-sized) file that holds a secret of the environment."""
    for path in files:
        if path.stat().st_size > _SCANNED_BYTES:
            continue
        data = path.read_bytes()
        if any(secret.encode() in data for secret in secrets):
            raise UploadError(f"{path} contains the value of a secret environment variable (a token or key); "
                              "remove it from the file before uploading")


def upload(folder: Path, repo_id: str, private: bool = False, token: str | None = None,
           endpoint: str | None = None) -> Uploaded:
    """Creates `repo_id` (if new) and commits the folder's model files with a generated README.md.
    The token is `token`, else huggingface_hub's own (HF_TOKEN, or `hf auth login`)."""
    import httpx
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    files = files_to_upload(folder)
    secrets = environment_secrets(os.environ, [token])
    check_no_secrets(files, secrets)
    card = model_card(folder, repo_id, secrets)
    operations = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=p) for p in files]
    operations.append(CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=card.encode()))
    api = HfApi(endpoint=endpoint, token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.create_commit(repo_id, operations, commit_message=f"Upload {folder.name} with tunelite", repo_type="model")
    except (HfHubHTTPError, httpx.HTTPError, OSError, ValueError) as e:
        first_line = scrub(str(e), secrets).splitlines()[0] if str(e) else type(e).__name__
        auth = getattr(getattr(e, "response", None), "status_code", None) in (401, 403)
        hint = " Pass a write token with --token, or set HF_TOKEN." if auth else ""
        raise UploadError(f"uploading {folder} to {repo_id} failed: {first_line}.{hint}") from e
    return Uploaded(str(url), [op.path_in_repo for op in operations])
