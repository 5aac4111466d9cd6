"""OpenAI's HTTP API as data: requests checked into plain values, replies and errors in its shapes.

Kept apart from the HTTP server and the model, so the rules of the protocol (which parameters
exist, their ranges, the error object, the streamed chunk format) read in one place. Every
problem with a request becomes an `APIError` carrying the status and OpenAI's error fields.
"""

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from tunelite.tokenizers.messages import Message

# Roles a chat request may use; "developer" is OpenAI's newer name for the system message.
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Parameters this server does not implement, with the values that mean "not used", so clients
# that send the defaults work and a request that needs one is told so instead of ignored.
_UNSUPPORTED = {
    "n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (None, False), "top_logprobs": (None, 0),
    "tools": (None, []), "functions": (None, []), "logit_bias": (None, {}), "suffix": (None, ""),
    "response_format": (None, {"type": "text"}),
}
MAX_STOP_STRINGS = 4


class APIError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Sampling:
    """How a request wants its reply generated; None means the server's default."""

    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool


def parse_body(raw: bytes) -> dict:
    """The request's JSON object, or a 400 that says what is wrong with it."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from e
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def check_model(body: dict, served: str) -> None:
    """A request names the model it wants; this server has one."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "`model` is required: the id /v1/models lists", param="model")
    if model != served:
        raise APIError(404, f"the model {model!r} does not exist here; this server serves {served!r} "
                            "(GET /v1/models)", param="model", code="model_not_found")


def parse_sampling(body: dict) -> Sampling:
    """The generation parameters of a completion or chat request, each checked against its range."""
    for key, unused in _UNSUPPORTED.items():
        if key in body and body[key] not in unused:
            raise APIError(400, f"`{key}` is not supported by tunelite serve (leave it out or at "
                                f"{json.dumps(unused[-1])})", param=key)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise APIError(400, f"`max_tokens` must be an integer >= 1, got {max_tokens!r}", param="max_tokens")
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    if top_p == 0.0:
        raise APIError(400, "`top_p` must be in (0, 1], got 0", param="top_p")
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else ()
    if (stop is not None and not isinstance(stop, (str, list))) or not all(isinstance(s, str) for s in stops) \
            or len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"`stop` must be a string or a list of up to {MAX_STOP_STRINGS} strings, got {stop!r}",
                       param="stop")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise APIError(400, f"`seed` must be an integer, got {seed!r}", param="seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, f"`stream` must be true or false, got {stream!r}", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "`stream_options` must be an object", param="stream_options")
    return Sampling(max_tokens, temperature, top_p, stops, seed, stream, bool(options.get("include_usage")))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict, key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise APIError(400, f"`{key}` must be a number in [{low:g}, {high:g}], got {value!r}", param=key)
    return float(value)


def parse_messages(body: dict) -> list[Message]:
    """A chat request's messages (text content only), in tunelite's `Message`s."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "`messages` must be a non-empty list of {role, content} objects", param="messages")
    parsed = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            role = message.get("role") if isinstance(message, dict) else message
            raise APIError(400, f"{where}.role must be one of {sorted(_ROLES)}, got {role!r}", param=f"{where}.role")
        parsed.append(Message(_ROLES[message["role"]], _text_content(message.get("content"), where)))
    return parsed


def _text_content(content: Any, where: str) -> str:
    """A message's text: a string, or a list of {"type": "text", "text": ...} parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(part["text"] for part in content)
    raise APIError(400, f"{where}.content must be a string or a list of text parts (this model reads text only)",
                   param=f"{where}.content")


def parse_prompt(body: dict) -> str:
    """A completion request's prompt: one string (or a list holding one)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise APIError(400, "`prompt` must be a string (one prompt per request)", param="prompt")
    return prompt


def models_list(served: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": served, "object": "model", "created": created, "owned_by": "tunelite"}]}


class ReplyShapes:
    """The response objects of one request, chat or text completion, whole or streamed."""

    def __init__(self, model: str, chat: bool) -> None:
        self.model, self.chat = model, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, choices: list[dict], chunk: bool) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind + (".chunk" if chunk and self.chat else ""), "created": self.created,
                "model": self.model, "choices": choices}

    def whole(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
        body = self._envelope([self._choice(text, finish_reason)], chunk=False)
        return {**body, "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False) -> dict:
        """One streamed piece: `first` opens a chat reply with its role; `finish_reason` closes it."""
        if not self.chat:
            return self._envelope([{"index": 0, "text": text or "", "logprobs": None,
                                    "finish_reason": finish_reason}], chunk=True)
        delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
        return self._envelope([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
                              chunk=True)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        """The extra last chunk `stream_options: {include_usage: true}` asks for."""
        return {**self._envelope([], chunk=True), "usage": usage(prompt_tokens, completion_tokens)}

    def _choice(self, text: str, finish_reason: str) -> dict:
        if self.chat:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish_reason}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
