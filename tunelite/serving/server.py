"""An OpenAI-compatible HTTP server on tunelite's own generation, with the standard library only.

`ThreadingHTTPServer` takes each connection on a thread of its own, and a lock lets one request
generate at a time while the others wait their turn: the model and its KV cache serve one
sequence at a time, and requests are answered in the order they get the lock. Streamed replies
are server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. For throughput
(continuous batching, paged attention) serve the merged folder or the adapter with vLLM.
"""

import json
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from tunelite.errors import TuneliteError
from tunelite.generation import GenerationSettings, Reply, chat_prompt, stream_reply
from tunelite.models.llama import TransformerDecoder
from tunelite.serving.openai_api import (
    APIError,
    ReplyShapes,
    Sampling,
    check_model,
    models_list,
    parse_body,
    parse_messages,
    parse_prompt,
    parse_sampling,
)
from tunelite.tokenizers.messages import Message

MAX_BODY_BYTES = 16 * 2**20


class ServedModel:
    """The model behind the server, its tokenizer, the name clients call it by, and the generation
    settings a request gets for what it leaves out."""

    def __init__(self, model: TransformerDecoder, tokenizer: Any, name: str, defaults: GenerationSettings) -> None:
        self.model, self.tokenizer, self.name, self.defaults = model, tokenizer, name, defaults
        self.window = model.args.max_seq_len
        self.created = int(time.time())
        self._lock = threading.Lock()

    def chat_prompt(self, messages: list[Message]) -> list[int]:
        """The conversation in the model's chat layout, ending where the reply begins."""
        try:
            return chat_prompt(self.tokenizer, messages)
        except TuneliteError as e:  # e.g. Llama 2's layout needs user and assistant turns to alternate
            raise APIError(400, str(e), param="messages") from e

    def text_prompt(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_bos=True, add_eos=False)

    def settings(self, prompt_tokens: int, sampling: Sampling, prompt_param: str) -> GenerationSettings:
        """The request's settings over the defaults; a prompt (with max_tokens) that does not fit the
        model's context window is refused, as OpenAI does."""
        if prompt_tokens >= self.window:
            raise APIError(400, f"this model's maximum context length is {self.window} tokens, but the "
                                f"{prompt_param} has {prompt_tokens}: shorten it", prompt_param, "context_length_exceeded")
        room = self.window - prompt_tokens
        if sampling.max_tokens is not None and sampling.max_tokens > room:
            raise APIError(400, f"this model's maximum context length is {self.window} tokens: the {prompt_param} "
                                f"has {prompt_tokens} and max_tokens asks for {sampling.max_tokens} more; lower "
                                f"max_tokens to at most {room}", "max_tokens", "context_length_exceeded")
        return GenerationSettings(
            max_new_tokens=sampling.max_tokens or min(self.defaults.max_new_tokens, room),
            temperature=self.defaults.temperature if sampling.temperature is None else sampling.temperature,
            top_k=self.defaults.top_k,
            top_p=self.defaults.top_p if sampling.top_p is None else sampling.top_p,
        )

    def reply(self, prompt: list[int], settings: GenerationSettings, sampling: Sampling,
              write: Callable[[str], None]) -> Reply:
        """Generates once the requests before this one are done; `seed` makes sampling repeatable."""
        with self._lock:
            generator = None
            if sampling.seed is not None:
                generator = torch.Generator(self.model.device).manual_seed(sampling.seed)
            return stream_reply(self.model, self.tokenizer, prompt, settings, write, generator, sampling.stop)


class OpenAIServer(ThreadingHTTPServer):
    """`/v1/chat/completions`, `/v1/completions` and `/v1/models` for one `ServedModel`."""

    daemon_threads = True

    def __init__(self, served: ServedModel, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False) -> None:
        self.served, self.quiet = served, quiet
        super().__init__((host, port), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: OpenAIServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        served = self.server.served
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/v1/models":
            self._send_json(200, models_list(served.name, served.created))
        elif path == f"/v1/models/{served.name}":
            self._send_json(200, models_list(served.name, served.created)["data"][0])
        elif path == "/health":
            self._send_json(200, {"status": "ok"})
        else:
            self._send_json(404, APIError(404, f"no such endpoint: GET {self.path}").body())

    def do_POST(self) -> None:
        started = False  # once a stream has begun, errors can only end the connection
        try:
            chat = {"/v1/chat/completions": True, "/v1/completions": False}.get(self.path.split("?", 1)[0].rstrip("/"))
            if chat is None:
                raise APIError(404, f"no such endpoint: POST {self.path} (use /v1/chat/completions or /v1/completions)")
            body = parse_body(self._read_body())
            served = self.server.served
            check_model(body, served.name)
            sampling = parse_sampling(body)
            prompt = served.chat_prompt(parse_messages(body)) if chat else served.text_prompt(parse_prompt(body))
            settings = served.settings(len(prompt), sampling, "messages" if chat else "prompt")
            shapes = ReplyShapes(served.name, chat)
            if not sampling.stream:
                reply = served.reply(prompt, settings, sampling, lambda piece: None)
                self._send_json(200, shapes.whole(reply.text, reply.finish_reason, len(prompt), reply.num_tokens))
                return
            started = True
            self._start_events()
            if chat:
                self._event(shapes.chunk(None, first=True))
            reply = served.reply(prompt, settings, sampling, lambda piece: self._event(shapes.chunk(piece)))
            self._event(shapes.chunk(None, reply.finish_reason))
            if sampling.include_usage:
                self._event(shapes.usage_chunk(len(prompt), reply.num_tokens))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except APIError as e:
            self._send_json(e.status, e.body())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away; the next request may run
        except Exception as e:  # a bug, not the client's fault: keep serving, say so, log it
            traceback.print_exc()
            self.close_connection = True
            if not started:
                self._send_json(500, APIError(500, f"internal error: {type(e).__name__}: {e}").body())

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise APIError(411, "a Content-Length header is required")
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            raise APIError(413, f"the request body is {length} bytes; at most {MAX_BODY_BYTES} are accepted")
        return self.rfile.read(int(length))

    def _send_json(self, status: int, body: dict) -> None:
        send_json(self, status, body)

    def _start_events(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream ends when the connection does
        self.end_headers()
        self.close_connection = True

    def _event(self, payload: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")


def send_json(handler: BaseHTTPRequestHandler, status: int, body: dict) -> None:
    """A whole JSON response, with its length, so the connection can carry the next request."""
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def serve_until_signal(server: OpenAIServer) -> None:
    """Serves until SIGINT (Ctrl-C) or SIGTERM, then stops taking connections and closes the socket;
    the handlers in force before are restored."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    worker = threading.Thread(target=server.serve_forever, name="tunelite-serve", daemon=True)
    worker.start()
    try:
        while not stop.wait(0.2):
            pass
    finally:
        server.shutdown()
        server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
