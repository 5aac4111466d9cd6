"""`tunelite download`: fetch a model from the Hugging Face hub, only the files tunelite reads.

That is the safetensors weights, config.json, generation_config.json and the tokenizer files
(Meta's original/tokenizer.model included); never *.bin / *.pth pickles nor Meta's and Mistral's
consolidated copies of the weights, which would double the download. An interrupted download
resumes when run again. The folder gets tunelite_source.json, {"repo_id": ..., "revision": <the
commit downloaded>}, which records where the weights came from; it is written last, so a folder
without it is incomplete.
"""

import argparse
import json
import os
from pathlib import Path
from typing import Any

from tunelite.errors import TuneliteError
from tunelite.files import SOURCE_RECORD, read_json

ALLOW_PATTERNS = (
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "original/tokenizer.model",
)
IGNORE_PATTERNS = ("consolidated*", "*/consolidated*", "original/*.safetensors")


def add_parser(subcommands: Any) -> None:
    """Register `download` on the `tunelite` parser."""
    parser = subcommands.add_parser(
        "download", help="download a model's weights, config and tokenizer from the Hugging Face hub",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("repo_id", help="hub repository, e.g. Qwen/Qwen2.5-7B-Instruct")
    parser.add_argument("--output-dir", help="folder to download into (default: models/<repository name>)")
    parser.add_argument("--revision", help="branch, tag or commit to download (default: main)")
    parser.add_argument("--token", help="hub token for gated or private repositories (default: $HF_TOKEN, "
                                        "else your `hf auth login`); never printed")
    parser.set_defaults(handler=download)


def download(args: argparse.Namespace) -> int:
    """Download REPO_ID into the output folder and record the repository and commit it came from."""
    output = Path(args.output_dir) if args.output_dir else Path("models") / args.repo_id.split("/")[-1]
    _check_output(output, args.repo_id)
    token = args.token or os.environ.get("HF_TOKEN") or None  # None: the saved `hf auth login`
    files, commit = _fetch(args.repo_id, args.revision, token, output)
    record = output / SOURCE_RECORD
    partial = record.with_name(record.name + ".partial")
    partial.write_text(json.dumps({"repo_id": args.repo_id, "revision": commit}, indent=1) + "\n")
    os.replace(partial, record)
    print(f"Downloaded {args.repo_id} at {commit} to {output} ({len(files)} files)")
    return 0


def _check_output(output: Path, repo_id: str) -> None:
    """Refuse a folder that is a file, or that holds another repository's download."""
    if output.exists() and not output.is_dir():
        raise TuneliteError(f"--output-dir {output} is a file; pass a folder")
    record = output / SOURCE_RECORD
    if record.is_file():
        try:
            previous = read_json(record, "download record").get("repo_id")
        except (TuneliteError, AttributeError):
            previous = f"an unknown repository ({record} is unreadable)"
        if previous != repo_id:
            raise TuneliteError(f"{output} holds a download of {previous}; pass another --output-dir for {repo_id}")


def _fetch(repo_id: str, revision: str | None, token: str | None, output: Path) -> tuple[list[str], str]:
    """The files downloaded and the commit they are at; a hub or network error becomes one line."""
    import huggingface_hub

    patterns = {"allow_patterns": list(ALLOW_PATTERNS), "ignore_patterns": list(IGNORE_PATTERNS)}
    try:
        plan = huggingface_hub.snapshot_download(repo_id, revision=revision, token=token, dry_run=True, **patterns)
    except Exception as err:  # the hub's errors, and its HTTP client's, which differ across versions
        raise _explained(err, repo_id, revision, token) from None
    files = sorted(entry.filename for entry in plan)
    if not any(name.endswith(".safetensors") for name in files):
        raise TuneliteError(
            f"{repo_id} has no .safetensors weights (tunelite reads safetensors only, never pickled "
            f"*.bin / *.pth files); files it would download: {', '.join(files) or 'none'}"
        )
    commit = plan[0].commit_hash
    try:
        huggingface_hub.snapshot_download(repo_id, revision=commit, token=token, local_dir=output, **patterns)
    except Exception as err:
        raise _explained(err, repo_id, revision, token) from None
    return files, commit


def _explained(err: Exception, repo_id: str, revision: str | None, token: str | None) -> TuneliteError:
    """A hub error as one line a user can act on (a dry run wraps the hub's error in DryRunError)."""
    from huggingface_hub import constants, errors

    if isinstance(err, errors.DryRunError) and err.__cause__ is not None:
        err = err.__cause__
    if isinstance(err, errors.GatedRepoError):
        return TuneliteError(f"{repo_id} is gated: accept its license on the hub, then pass --token or set HF_TOKEN")
    if isinstance(err, errors.RepositoryNotFoundError):
        return TuneliteError(f"no repository {repo_id} on the Hugging Face hub "
                             "(if it is gated or private, pass --token or set HF_TOKEN)")
    if isinstance(err, errors.RevisionNotFoundError):
        return TuneliteError(f"{repo_id} has no revision {revision!r}")
    unreachable = isinstance(err, errors.LocalEntryNotFoundError)  # what a dry run or download says offline
    if isinstance(err, errors.HfHubHTTPError) or (isinstance(err, OSError) and not unreachable):
        return TuneliteError(f"downloading {repo_id} failed: {_without_secrets(str(err), token)}")
    return TuneliteError(
        f"cannot reach the Hugging Face hub at {constants.ENDPOINT} to download {repo_id} "
        f"({type(err).__name__}: {_without_secrets(str(err), token)}): "
        "check the network, HF_ENDPOINT and HF_HUB_OFFLINE"
    )


def _without_secrets(text: str, token: str | None) -> str:
    """The first line of an error message with any token blanked, so it can be printed."""
    for secret in (token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")):
        if secret:
            text = text.replace(secret, "***")
    return text.strip().splitlines()[0] if text.strip() else "no message"
