"""Runs what `tunelite export gguf` writes in llama.cpp (through llama-cpp-python) and compares it
with tunelite: tokenization of sample texts, and greedy tokens after a chat prompt, for a merged
tiny LoRA model (the shipped tiny Llama 3.1 plus a random adapter) in f16, bf16 and q8_0.

llama-cpp-python has no wheel on PyPI (an sdist that compiles llama.cpp: a C++ compiler, cmake and
~15 minutes on two cores), so this is a script to run by hand, not a test:

    pip install llama-cpp-python && python scripts/check_gguf_llama_cpp.py
"""

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from llama_cpp import Llama

from tunelite.checkpointing.hf import HFCheckpointer
from tunelite.checkpointing.merge import merge_adapter
from tunelite.checkpointing.peft import save_peft_adapter
from tunelite.config import asset_path
from tunelite.export.gguf import export_gguf
from tunelite.generation import GenerationSettings, chat_prompt, generate, load_generation_model
from tunelite.models.llama import LoRAArgs, lora_llama
from tunelite.checkpointing.hf import model_args_from_hf_config, read_hf_config
from tunelite.tokenizers import Message, llama3_tokenizer

TEXTS = ["Give three tips for staying healthy.", "Grüße aus Zürich: 日本語, emoji 🎉 and 1234567 numbers!",
         "  leading spaces\n\nand new lines\tand tabs"]
STEPS = 32


def main() -> None:
    tokenizer = llama3_tokenizer(asset_path("tiny/tokenizer.model"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = Path(asset_path("tiny/model"))
        args = model_args_from_hf_config(read_hf_config(base))
        torch.manual_seed(0)
        model = lora_llama(args, LoRAArgs(("q_proj", "k_proj", "v_proj", "output_proj"), apply_lora_to_mlp=True))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("lora_b"):
                    param.normal_(0, 0.01)
        save_peft_adapter(model, tmp / "adapter", str(base))
        merge_adapter(base, tmp / "adapter", tmp / "merged")
        (tmp / "merged" / "original").mkdir()
        shutil.copy(asset_path("tiny/tokenizer.model"), tmp / "merged" / "original" / "tokenizer.model")
        ours = load_generation_model(HFCheckpointer(str(tmp / "merged")), None, torch.device("cpu"), torch.float32)
        prompt = chat_prompt(tokenizer, [Message("user", TEXTS[0])])
        (expected,), _ = generate(ours, [prompt], GenerationSettings(max_new_tokens=STEPS))
        print(f"tunelite's greedy reply ({len(set(expected))} distinct tokens): {tokenizer.decode(expected)!r}")
        for dtype in ("f16", "bf16", "q8_0"):
            export_gguf(tmp / "merged", tmp / f"m-{dtype}.gguf", dtype)
            llm = Llama(model_path=str(tmp / f"m-{dtype}.gguf"), n_ctx=512, logits_all=True, verbose=False)
            same_ids = all(llm.tokenize(t.encode(), add_bos=False, special=False)
                           == tokenizer.encode(t, add_bos=False, add_eos=False) for t in TEXTS)
            llm.reset()
            llm.eval(prompt)
            got = []
            for _ in range(STEPS):
                token = int(np.argmax(llm.eval_logits[-1]))
                got.append(token)
                llm.eval([token])
            agree = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), STEPS)
            print(f"{dtype:5s} tokenization equal: {same_ids}; greedy tokens equal for {agree}/{STEPS} steps"
                  f"{'' if agree == STEPS else f' (llama.cpp {got[agree:agree + 4]}, tunelite {expected[agree:agree + 4]})'}")


if __name__ == "__main__":
    main()
