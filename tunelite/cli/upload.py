"""`tunelite upload`: share an adapter or merged folder on the Hugging Face Hub with a model card.

The card (README.md) is generated: base model, data source, final metrics and the run's config
with secrets redacted, read from the run's logs when the folder is a run's `step_N/adapter` or
`step_N/model` (or a `tunelite merge` of one). The logs themselves are never uploaded. The token
is --token, else HF_TOKEN or a saved `hf auth login`; it is never printed.
"""

import argparse
from pathlib import Path
from typing import Any


def add_parser(subcommands: Any) -> None:
    """Register `upload` on the `tunelite` parser."""
    parser = subcommands.add_parser("upload", help="share an adapter or merged folder on the Hugging Face Hub",
                                    description=__doc__)
    parser.add_argument("folder", type=Path, help="e.g. OUT/step_500/adapter, OUT/step_500/model or a merged folder")
    parser.add_argument("repo_id", help="USER/NAME or ORG/NAME; created if it does not exist")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--token", help="a Hugging Face write token (default: HF_TOKEN or a saved login)")
    parser.set_defaults(handler=upload)


def upload(args: argparse.Namespace) -> int:
    """Upload, then print the repository's address and what went up."""
    from tunelite.hub.upload import upload as upload_folder

    uploaded = upload_folder(args.folder, args.repo_id, args.private, args.token)
    print(f"Uploaded {len(uploaded.files)} files to {uploaded.url}: {', '.join(uploaded.files)}")
    return 0
