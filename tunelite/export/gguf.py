"""A Llama-family HF model folder as one GGUF file, the format llama.cpp and Ollama run.

What llama.cpp's `convert_hf_to_gguf.py` does for `LlamaModel`, on tunelite's own reading of
the folder: tensors under llama.cpp's names (the `gguf` package's table), the q/k projections
permuted from Hugging Face's rotate-half layout back to the interleaved pairs llama.cpp rotates,
norms in F32, Llama 3 RoPE scaling as a `rope_freqs` tensor of per-frequency factors, and the
tokenizer as metadata: Meta's tiktoken file as a GPT-2 style BPE (tokens, types, merges) or a
SentencePiece model as llama's. Tensors are read and written one at a time, so an 8B export
needs about one tensor of memory, not the model.
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelite.checkpointing.hf import model_args_from_hf_config, read_hf_config, weight_files
from tunelite.checkpointing.streamed import TensorEntry, list_tensors, read_tensor
from tunelite.errors import CheckpointError
from tunelite.files import MAX_JSON_BYTES, read_bounded, read_json
from tunelite.models.llama import ModelArgs, rope_inverse_frequencies
from tunelite.tokenizers.llama3 import is_tiktoken_bpe, llama3_special_tokens, load_bpe_ranks
from tunelite.tokenizers.messages import read_head

DTYPES = ("f16", "bf16", "q8_0")
# Where a folder keeps a tokenizer file llama.cpp can be given, in the order looked at.
TOKENIZER_FILES = ("original/tokenizer.model", "tokenizer.model")
_SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


class GGUFExportError(CheckpointError):
    """The folder cannot be exported to GGUF as it is."""


@dataclass(frozen=True)
class ExportSummary:
    path: Path
    tensors: int
    tokenizer: str


def export_gguf(model_dir: Path, out_path: Path, dtype: str = "f16", tokenizer_file: Path | None = None) -> ExportSummary:
    """Writes `model_dir` (an HF Llama folder, e.g. what `tunelite merge` writes) to `out_path`, its
    2-D weights in `dtype` (f16, bf16 or q8_0), written under a temporary name and renamed."""
    import gguf

    if dtype not in DTYPES:
        raise GGUFExportError(f"--dtype {dtype!r}: GGUF export writes one of {', '.join(DTYPES)}")
    model_dir = Path(model_dir)
    config = read_hf_config(model_dir)
    _check_family(model_dir, config)
    args = model_args_from_hf_config(config)
    tokenizer_file = Path(tokenizer_file) if tokenizer_file else _find_tokenizer(model_dir)
    qtype = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, args.num_layers)
    entries = [e for path in weight_files(model_dir) for e in list_tensors(path)
               if not e.name.endswith("rotary_emb.inv_freq")]
    extra = _rope_freqs(args)

    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        _add_hyperparameters(writer, model_dir, config, args, file_type)
        kind = _add_tokenizer(writer, model_dir, config, tokenizer_file)
        planned = []
        if extra is not None:
            planned.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", None, gguf.GGMLQuantizationType.F32))
        for entry in entries:
            name = names.get_name(entry.name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise GGUFExportError(f"{entry.file}: tensor {entry.name!r} has no llama.cpp name; is this a "
                                      "plain Llama model?")
            planned.append((name, entry, _tensor_type(name, entry, qtype)))
        for name, entry, ttype in planned:
            shape = tuple(entry.shape) if entry is not None else tuple(extra.shape)
            nbytes = math.prod(gguf.quants.quant_shape_to_byte_shape(shape, ttype)) if len(shape) else 4
            writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=ttype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, entry, ttype in planned:
            data = extra if entry is None else _convert(read_tensor(entry), entry, args)
            writer.write_tensor_data(_encode(data, ttype))
        writer.close()
        tmp.replace(out_path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return ExportSummary(out_path, len(planned), kind)


def _check_family(model_dir: Path, config: dict) -> None:
    architectures = config.get("architectures") or []
    if config.get("model_type") != "llama" or not any(a in _SUPPORTED_ARCHITECTURES for a in architectures):
        raise GGUFExportError(
            f"{model_dir / 'config.json'}: model_type {config.get('model_type')!r} ({', '.join(architectures) or 'no '}"
            "architectures): tunelite's GGUF export supports the Llama family (model_type llama, LlamaForCausalLM) "
            "for now; convert other families with llama.cpp's convert_hf_to_gguf.py")


def _find_tokenizer(model_dir: Path) -> Path:
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            return model_dir / name
    raise GGUFExportError(f"{model_dir} has no {' or '.join(TOKENIZER_FILES)} (Meta's tiktoken or SentencePiece "
                          "tokenizer): pass its path with --tokenizer")


def _add_hyperparameters(writer: Any, model_dir: Path, config: dict, args: ModelArgs, file_type: int) -> None:
    """The sizes llama.cpp reads, as convert_hf_to_gguf.py's TextModel and LlamaModel write them."""
    writer.add_type("model")
    writer.add_name(model_dir.resolve().name)
    writer.add_block_count(args.num_layers)
    writer.add_context_length(args.max_seq_len)
    writer.add_embedding_length(args.embed_dim)
    writer.add_feed_forward_length(args.intermediate_dim)
    writer.add_head_count(args.num_heads)
    writer.add_head_count_kv(args.num_kv_heads)
    writer.add_rope_freq_base(args.rope_base)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    if config.get("head_dim") is not None:
        writer.add_key_length(args.resolved_head_dim)
        writer.add_value_length(args.resolved_head_dim)
    writer.add_file_type(file_type)
    writer.add_vocab_size(args.vocab_size)
    writer.add_rope_dimension_count(args.resolved_head_dim)
    writer.add_quantization_version(2)


def _rope_freqs(args: ModelArgs) -> np.ndarray | None:
    """Llama 3's RoPE scaling as llama.cpp takes it: one factor per rotary frequency, which it
    divides the plain frequency by (convert_hf_to_gguf.py's `rope_freqs`)."""
    if args.rope_scaling is None:
        return None
    plain = rope_inverse_frequencies(args.resolved_head_dim, args.rope_base, None)
    return (plain / rope_inverse_frequencies(args.resolved_head_dim, args.rope_base, args.rope_scaling)).numpy()


def _tensor_type(name: str, entry: TensorEntry, qtype: Any) -> Any:
    """F32 for norms and 1-D tensors (llama.cpp reads only those in F32); Q8_0 needs rows of whole
    32-value blocks and falls back to F16 otherwise, as convert_hf_to_gguf.py does."""
    import gguf

    if len(entry.shape) <= 1 or name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.Q8_0 and entry.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return gguf.GGMLQuantizationType.F16
    return qtype


def permute_for_llama_cpp(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's q/k rows (each head's first half of rotary dims, then its second half) reordered to the
    interleaved pairs llama.cpp rotates, per head: convert_hf_to_gguf.py's `LlamaModel.permute`."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _convert(tensor: torch.Tensor, entry: TensorEntry, args: ModelArgs) -> torch.Tensor:
    if entry.name.endswith("self_attn.q_proj.weight"):
        return permute_for_llama_cpp(tensor, args.num_heads)
    if entry.name.endswith("self_attn.k_proj.weight"):
        return permute_for_llama_cpp(tensor, args.num_kv_heads)
    return tensor


def _encode(data: torch.Tensor | np.ndarray, ttype: Any) -> np.ndarray:
    """The tensor's bytes in the GGUF type: F32/F16/BF16 rounded by torch, Q8_0 by the gguf package."""
    import gguf

    if isinstance(data, np.ndarray):
        return data
    if ttype == gguf.GGMLQuantizationType.F32:
        return data.to(torch.float32).numpy()
    if ttype == gguf.GGMLQuantizationType.F16:
        return data.to(torch.float16).numpy()
    if ttype == gguf.GGMLQuantizationType.BF16:
        return data.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return gguf.quants.quantize(data.to(torch.float32).numpy(), ttype)


def _add_tokenizer(writer: Any, model_dir: Path, config: dict, tokenizer_file: Path) -> str:
    """Writes the tokenizer metadata; returns "gpt2" (BPE) or "llama" (SentencePiece)."""
    if not tokenizer_file.is_file():
        raise GGUFExportError(f"tokenizer file {tokenizer_file} does not exist")
    if is_tiktoken_bpe(read_head(tokenizer_file)):
        _add_tiktoken_vocab(writer, tokenizer_file, config)
        kind = "gpt2"
    else:
        _add_sentencepiece_vocab(writer, tokenizer_file, config)
        kind = "llama"
    template = _chat_template(model_dir)
    if template:
        writer.add_chat_template(template)
    return kind


def _add_tiktoken_vocab(writer: Any, path: Path, config: dict) -> None:
    """Meta's Llama 3 tiktoken file as llama.cpp's "gpt2" BPE: byte-level token strings, merges
    recovered from the ranks, special tokens as CONTROL, Llama 3's pre-tokenizer."""
    import gguf

    ranks = load_bpe_ranks(str(path))
    special = llama3_special_tokens(len(ranks))
    vocab_size = config.get("vocab_size", len(ranks) + len(special))
    to_text = _byte_to_unicode()
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, rank in ranks.items():
        tokens[rank], types[rank] = "".join(to_text[b] for b in token), gguf.TokenType.NORMAL
    for text, token_id in special.items():
        if token_id < vocab_size:
            tokens[token_id], types[token_id] = text, gguf.TokenType.CONTROL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(list(_merges(ranks, to_text)))
    eos = config.get("eos_token_id", special["<|end_of_text|>"])
    writer.add_bos_token_id(config.get("bos_token_id", special["<|begin_of_text|>"]))
    writer.add_eos_token_id(eos[0] if isinstance(eos, list) else eos)
    writer.add_eot_token_id(special["<|eot_id|>"])
    writer.add_eom_token_id(special["<|eom_id|>"])
    writer.add_pad_token_id(special["<|finetune_right_pad_id|>"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def _merges(ranks: dict[bytes, int], to_text: dict[int, str]) -> Iterator[str]:
    """The BPE merge list, in rank order, that rebuilds each multi-byte token from two lower-ranked
    ones: what tiktoken applies implicitly and GPT-2 style tokenizers list (as transformers'
    TikTokenConverter recovers it)."""
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best = min(((ranks.get(a + b), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))
                        if ranks.get(a + b) is not None and ranks[a + b] < rank), default=None)
            if best is None:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            yield " ".join("".join(to_text[b] for b in part) for part in parts)


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of bytes to printable characters, in which byte-level BPE vocabularies
    (tokenizer.json, GGUF) spell their tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _add_sentencepiece_vocab(writer: Any, path: Path, config: dict) -> None:
    """A SentencePiece model (Llama 2) as llama.cpp's "llama" tokenizer: pieces, scores and types."""
    import gguf
    import sentencepiece

    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise GGUFExportError(f"{path} is neither Meta's tiktoken file nor a SentencePiece model") from e
    vocab_size = config.get("vocab_size", sp.vocab_size())
    tokens, scores = [f"[PAD{i}]" for i in range(vocab_size)], [-1000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        tokens[i], scores[i] = sp.id_to_piece(i), sp.get_score(i)
        types[i] = (gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
                    else gguf.TokenType.UNUSED if sp.is_unused(i) else gguf.TokenType.BYTE if sp.is_byte(i)
                    else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    if sp.unk_id() >= 0:
        writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def _chat_template(model_dir: Path) -> str | None:
    """The folder's jinja chat template, where transformers keeps it."""
    if (model_dir / "chat_template.jinja").is_file():
        return read_bounded(model_dir / "chat_template.jinja", MAX_JSON_BYTES, "chat template",
                            GGUFExportError).decode("utf-8", errors="replace")
    config_path = model_dir / "tokenizer_config.json"
    if config_path.is_file():
        template = read_json(config_path, "tokenizer config", GGUFExportError).get("chat_template")
        return template if isinstance(template, str) else None
    return None
