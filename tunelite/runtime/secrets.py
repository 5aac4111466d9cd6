"""Credentials in the environment (HF_TOKEN, WANDB_API_KEY, ...), found by their variables' names,
so whatever tunelite writes (metric logs, the logged config, W&B, the model card and files
`tunelite upload` sends) can be scrubbed of their values.

The first defence is that configs are logged as written, `${oc.env:HF_TOKEN}` unresolved; this
is the second: a value that reached a string anyway (a resolved path, a run name, an error) is
replaced before it is written.
"""

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

REDACTED = "<redacted>"
# Config keys and environment variables whose values are credentials: hf_token, api_key, WANDB_API_KEY,
# password, secret, ... (whole words between separators, so max_tokens and tokenizer are not).
SECRET_NAME = re.compile(r"(?i)(^|[_\-.])(token|secret|password|passwd|key|apikey|api|auth|credentials?)($|[_\-.])")
# A secret shorter than this is not searched for in text: "1" or "true" would blank out every line.
MIN_SECRET_LENGTH = 6


def is_secret_name(name: str) -> bool:
    """Whether a config key or environment variable's name says its value is a credential."""
    return bool(SECRET_NAME.search(name))


def environment_secrets(env: Mapping[str, str] | None = None, extra: Iterable[str | None] = ()) -> list[str]:
    """Values of the environment's secret-like variables (of `os.environ` unless `env` is given) and
    `extra`, longest first so a secret that contains another is replaced whole."""
    env = os.environ if env is None else env
    values = {v for k, v in env.items() if is_secret_name(k)} | {v for v in extra if v}
    return sorted((v for v in values if len(v) >= MIN_SECRET_LENGTH), key=len, reverse=True)


def scrub(text: str, secrets: Sequence[str]) -> str:
    """`text` with every occurrence of a secret replaced."""
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


def redact(node: Any, secrets: Sequence[str]) -> Any:
    """A config (plain containers) with values under secret-like keys replaced and secrets scrubbed
    from every string; an unresolved `${oc.env:NAME}` stays, as it names the variable, not its value."""
    if isinstance(node, Mapping):
        return {key: REDACTED if is_secret_name(str(key)) and _is_value(value) else redact(value, secrets)
                for key, value in node.items()}
    if isinstance(node, list):
        return [redact(item, secrets) for item in node]
    return scrub(node, secrets) if isinstance(node, str) else node


def _is_value(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value) and not value.startswith("${oc.env:")
    return value is not None and not isinstance(value, (Mapping, list, bool))
