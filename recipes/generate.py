"""Talk to a model: a base checkpoint with a LoRA adapter, or a merged checkpoint.

    tunelite generate --config generation/llama3_1_8B adapter_dir=outputs/llama3_1_8B_lora/step_1000/adapter
    tunelite generate --config tiny/generation --prompt "Give three tips for staying healthy."

With a prompt (`--prompt` or `prompt:`) it answers once; without one it chats: one message per
line from standard input, the conversation kept, until `/exit` or end of input. Each reply is
printed as it is generated, then its speed: time to first token and tokens/s.
"""

import sys
from typing import Any

import torch

from omegaconf import DictConfig

from tunelite.config import instantiate, recipe_entry
from tunelite.generation import ChatSession, GenerationSettings, load_generation_model
from tunelite.runtime.device import get_device, get_dtype
from tunelite.runtime.seed import set_seed

# Every config key this recipe reads: `tunelite validate`, `run` and `generate` refuse any other.
CONFIG_KEYS = {
    "required": ("checkpointer", "tokenizer", "device", "dtype", "seed", "max_new_tokens", "temperature"),
    "optional": ("adapter_dir", "model", "top_k", "top_p", "chat", "system_prompt", "prompt"),
}


def load(cfg: DictConfig) -> tuple[torch.nn.Module, Any, GenerationSettings]:
    """The model, tokenizer and sampling settings a generation config names: what `main` chats
    with and what `tunelite serve` answers requests with."""
    device = get_device(cfg.device)
    dtype = get_dtype(cfg.dtype, device)
    set_seed(cfg.seed)
    tokenizer = instantiate(cfg.tokenizer)
    model = load_generation_model(instantiate(cfg.checkpointer), cfg.get("adapter_dir"), device, dtype,
                                  cfg.get("model"))
    return model, tokenizer, GenerationSettings(cfg.max_new_tokens, cfg.temperature, cfg.get("top_k"), cfg.get("top_p"))


def main(cfg: DictConfig) -> None:
    model, tokenizer, settings = load(cfg)
    session = ChatSession(model, tokenizer, settings, cfg.get("chat", True), cfg.get("system_prompt"))

    def respond(text: str) -> None:
        _, stats = session.reply(text, lambda piece: print(piece, end="", flush=True))
        print(f"\n[{stats.num_tokens} tokens, {stats.tokens_per_s:.1f} tokens/s, "
              f"first token after {stats.time_to_first_token * 1000:.0f} ms]", flush=True)

    if cfg.get("prompt") is not None:
        respond(cfg.prompt)
        return
    print("Chat: one message per line; /exit or end of input (Ctrl-D) quits.", flush=True)
    while True:
        print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            break
        if line.strip():
            respond(line.strip())


if __name__ == "__main__":
    recipe_entry(main)
