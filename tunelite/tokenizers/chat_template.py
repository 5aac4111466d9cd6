"""A model's own chat template (the jinja2 text in its Hugging Face folder), rendered as
transformers renders it, and cut into one span per message so each token gets its loss mask.

The template is untrusted code from a download, so it runs in jinja2's immutable sandbox with the
same extras transformers installs (`raise_exception`, `strftime_now`, a `tojson` that keeps
non-ASCII text, `namespace` without dunder attributes): the rendered text, and so the token ids,
equal `tokenizer.apply_chat_template`'s.

Where a message starts and ends is found by rendering prefixes of the conversation, as torchtune
did late: the text of `messages[:k]` must be a prefix of the text of the whole, and the generation
prompt of `messages[:k]` (`add_generation_prompt=True`) marks where an assistant turn's own tokens
begin. Some templates close a rendering with a tail they omit when asked for a generation prompt
(Phi-3 ends with `eos_token`); that tail is cut before the comparison. A template that renders an
earlier turn differently once later turns follow (Qwen3 drops the empty think block of earlier
replies, Mistral v0.3 moves the system prompt into the last user turn) has no exact per-turn span
and is refused, naming the template and the turn.
"""

import json
import os
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tunelite import files
from tunelite.errors import ConfigError, DataError
from tunelite.files import MAX_JSON_BYTES, read_bounded
from tunelite.tokenizers.messages import Message

# Where a Hugging Face folder keeps its template, in the order transformers prefers them.
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")
_RENDER_ERRORS = (jinja2.TemplateError, TypeError, ValueError, AttributeError, IndexError, KeyError)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _Namespace(jinja2.utils.Namespace):
    """jinja2's namespace, refusing underscore names so a template cannot reach interpreter internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


class _GenerationTags(Extension):
    """`{% generation %}...{% endgeneration %}`, the assistant-mask markers of training templates
    (TRL's, SmolLM3's), render their body as transformers does; the mask comes from the spans."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationTags]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env


class ChatTemplate:
    """One compiled template with the special-token strings it is rendered with (`bos_token`, ...)."""

    def __init__(self, source: str, name: str, special_tokens: Mapping[str, str]) -> None:
        self.name = name
        self.special_tokens = dict(special_tokens)
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as err:
            raise ConfigError(f"chat template {name}: line {err.lineno}: {err.message}") from None

    def render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        """The template's text for the messages, as `apply_chat_template(..., tokenize=False)` gives it."""
        chat = [{"role": m.role, "content": m.content} for m in messages]
        try:
            return self._template.render(messages=chat, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except _RENDER_ERRORS as err:
            raise DataError(f"chat template {self.name} refused the conversation: {err}") from None

    def spans(
        self, messages: Sequence[Message], atomic: Collection[str], prompt: bool = False
    ) -> tuple[str, list[tuple[int, int, bool]]]:
        """The conversation's text and its (start, end, masked) character spans, in order, covering it.

        A message's span runs from the end of the rendering of the messages before it to the end of
        its own; an assistant turn's span starts after its generation prompt (its header), which
        gets a span of its own masked like the message before it (the preamble before a first
        assistant turn is masked). `atomic` are strings a boundary must not split (the tokenizer's
        added tokens). With `prompt`, a final assistant message is rendered as the generation
        prompt followed by its content, unclosed, for the model to continue.
        """
        if not messages:
            raise DataError("tokenize_messages got an empty list of messages")
        prompts: dict[int, str] = {}

        def prompt_before(k: int) -> str:  # the generation prompt after messages[:k]
            if k not in prompts:
                prompts[k] = self.render(messages[:k], add_generation_prompt=True)
            return prompts[k]

        continuing = prompt and messages[-1].role == "assistant"
        whole = (prompt_before(len(messages) - 1) + messages[-1].content if continuing
                 else self.render(messages, add_generation_prompt=False))
        ends = []
        for k in range(1, len(messages)):
            # messages[:k] end where their rendering ends, less a closing tail their generation
            # prompt rendering lacks; what is left must be a prefix of the whole.
            closed = self.render(messages[:k], add_generation_prompt=False)
            ends.append(_common_prefix(closed, prompt_before(k), atomic))
            if not whole.startswith(closed[:ends[-1]]):
                raise self._not_a_prefix(messages, k - 1, "the template renders it differently once later turns follow")
        ends.append(len(whole))
        spans: list[tuple[int, int, bool]] = []
        start = 0
        for k, (message, end) in enumerate(zip(messages, ends)):
            if message.role == "assistant":
                header = prompt_before(k)
                if not (start <= len(header) <= end and whole.startswith(header)):
                    raise self._not_a_prefix(messages, k, "its generation prompt is not where it starts")
                spans.append((start, len(header), messages[k - 1].masked if k else True))
                start = len(header)
            if end < start:
                raise self._not_a_prefix(messages, k, "it ends before the turn before it")
            spans.append((start, end, message.masked))
            start = end
        return whole, spans

    def _not_a_prefix(self, messages: Sequence[Message], k: int, why: str) -> DataError:
        return DataError(
            f"chat template {self.name}: turn {k} ({messages[k].role}) of this {len(messages)}-message "
            f"conversation has no exact span: {why}, so its loss mask would be a guess. Make each sample "
            "end before the template rewrites earlier turns (one sample per assistant reply; no system "
            "prompt where the template moves it), or pass tokenizer.chat_template=<a .jinja file> whose "
            "rendering of the first turns is a prefix of its rendering of the whole"
        )


def _common_prefix(a: str, b: str, atomic: Collection[str]) -> int:
    """Length of the common prefix of a and b, moved back so it splits none of the atomic strings."""
    end = len(os.path.commonprefix([a, b]))
    if end == len(a):
        return end
    moved = True
    while moved:
        moved = False
        for token in atomic:
            for start in range(max(0, end - len(token) + 1), end):
                if a.startswith(token, start) or b.startswith(token, start):
                    end, moved = start, True
                    break
    return end


def read_chat_template(folder: Path, override: str | Path | None = None) -> tuple[str, str] | None:
    """(template text, where it came from) for a model folder, or None when it has no template.

    `override` (a .jinja file) wins; then chat_template.jinja, chat_template.json and
    tokenizer_config.json's `chat_template`, which may be a list of named templates: `default` is used.
    """
    if override is not None:
        path = Path(override)
        if not path.is_file():
            raise ConfigError(f"chat_template: {path} is not a file; pass the path of a .jinja chat template")
        return _read_template(path), str(path)
    for name in TEMPLATE_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".jinja"):
            return _read_template(path), str(path)
        template = read_json(path).get("chat_template")
        if isinstance(template, list):
            named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
            template = named.get("default")
            if template is None:
                raise ConfigError(f"{path}: chat_template lists {sorted(map(str, named))} but no 'default' template")
        if template is not None:
            if not isinstance(template, str):
                raise ConfigError(f"{path}: chat_template must be a string or a list of named templates")
            return template, str(path)
    return None


def _read_template(path: Path) -> str:
    """A .jinja chat template, its size bounded as every file from elsewhere is (tunelite.files)."""
    try:
        return read_bounded(path, MAX_JSON_BYTES, "chat template", ConfigError).decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"chat template {path} is not UTF-8 text ({err})") from None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a model folder, its size bounded (tunelite.files), or a ConfigError naming the file."""
    data = files.read_json(path, "model folder file", ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
