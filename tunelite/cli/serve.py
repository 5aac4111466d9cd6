"""`tunelite serve`: an OpenAI-compatible HTTP server for a model, with a generation config.

Takes the config `tunelite generate` takes (base + `adapter_dir`, or a merged folder) and serves
`/v1/chat/completions` (streamed or not), `/v1/completions` and `/v1/models` on tunelite's own
generation, one request at a time. Its sampling keys (max_new_tokens, temperature, top_k, top_p)
are the defaults of requests that leave them out. Ctrl-C or SIGTERM stops it. For production
throughput serve the merged folder or the adapter with vLLM (see the README).
"""

import argparse
import runpy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tunelite.config import add_trust_option

if TYPE_CHECKING:
    from tunelite.serving import OpenAIServer


def add_parser(subcommands: Any) -> None:
    """Register `serve` on the `tunelite` parser."""
    parser = subcommands.add_parser(
        "serve", help="serve a model (base + adapter, or merged) over an OpenAI-compatible HTTP API",
        description=__doc__, epilog="Overrides: key=value sets a key, +key=value adds one, ~key deletes one.",
    )
    parser.add_argument("--config", required=True, help="generation config (tiny/generation, generation/llama3_1_8B) "
                                                        "or a YAML path")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                             "only; 0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--served-model-name", help="the model id clients send (default: adapter_dir, else "
                                                    "checkpointer.checkpoint_dir)")
    add_trust_option(parser)
    parser.add_argument("overrides", nargs="*", help="key=value, +key=value or ~key, e.g. adapter_dir=PATH")
    parser.set_defaults(handler=serve)


def serve(args: argparse.Namespace) -> int:
    """Load the model the config names, then serve it until stopped."""
    from tunelite.serving import serve_until_signal

    server = build_server(args.config, args.overrides, args.host, args.port, args.served_model_name, args.trust)
    name = server.served.name
    host, port = server.server_address[:2]
    print(f"Serving {name!r} on http://{host}:{port}/v1 (OpenAI API); Ctrl-C stops.\n"
          f"  curl http://{host}:{port}/v1/chat/completions -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'",
          flush=True)
    serve_until_signal(server)
    print("Stopped.", flush=True)
    return 0


def build_server(config: str, overrides: list[str], host: str, port: int, name: str | None = None,
                 trust: Sequence[str] = ()) -> "OpenAIServer":
    """The server for a generation config, listening but not yet serving. `name` defaults to the
    adapter folder, else the checkpoint folder, as given in the config; `trust`: --trust packages."""
    from tunelite import recipe_registry
    from tunelite.config import load_recipe_config
    from tunelite.errors import ResourceError
    from tunelite.serving import OpenAIServer, ServedModel

    script = recipe_registry.recipe_script("generate")
    cfg = load_recipe_config(config, recipe_registry.read_declarations(script).keys, overrides, trust=trust)
    model, tokenizer, defaults = runpy.run_path(str(script))["load"](cfg)  # as `tunelite generate` builds them
    name = name or str(cfg.get("adapter_dir") or cfg.checkpointer.checkpoint_dir)
    try:
        return OpenAIServer(ServedModel(model, tokenizer, name, defaults), host, port)
    except OSError as e:
        raise ResourceError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port") from e
