"""`tunelite export gguf`: gguf.GGUFReader reads back every tensor equal to ours (f16 rounding,
q8_0 within its quantization error), q/k permuted so llama.cpp's interleaved RoPE gives HF's
attention scores, and the tokenizer metadata llama.cpp tokenizes with."""

import dataclasses
import json
import math
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import regex
import torch

from conftest import write_hf_checkpoint
from test_tokenizers import corpus, llama2_path  # noqa: F401  (fixtures: a small SentencePiece model)
from tunelite.checkpointing.hf import model_args_from_hf_config, read_hf_config
from tunelite.cli.main import main
from tunelite.config import asset_path
from tunelite.export.gguf import GGUFExportError, export_gguf
from tunelite.models.llama import apply_rotary, rope_inverse_frequencies
from tunelite.models.llama3_1 import LLAMA3_1_8B
from tunelite.tokenizers import LLAMA3_PATTERN, llama2_tokenizer, llama3_tokenizer

TINY_MODEL = Path(asset_path("tiny/model"))
TINY_TOKENIZER = Path(asset_path("tiny/tokenizer.model"))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """The shipped tiny model as a merged folder carries it: Meta's tokenizer in original/, a template."""
    folder = tmp_path_factory.mktemp("tiny")
    shutil.copytree(TINY_MODEL, folder, dirs_exist_ok=True)
    (folder / "original").mkdir()
    shutil.copy(TINY_TOKENIZER, folder / "original" / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}))
    return folder


def read(path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(path)


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def gguf_name(hf_name: str, layers: int) -> str:
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers).get_name(hf_name, try_suffixes=(".weight",))


def test_every_f16_tensor_reads_back_equal_to_ours_rounded_to_f16(tiny_folder, tmp_path):
    assert main(["export", "gguf", str(tiny_folder), str(tmp_path / "tiny.gguf")]) == 0
    reader = read(tmp_path / "tiny.gguf")
    args = model_args_from_hf_config(read_hf_config(tiny_folder))
    tensors = {t.name: t for t in reader.tensors}
    ours = {k: v for k, v in _hf_tensors(tiny_folder).items()}
    assert set(tensors) == {gguf_name(k, args.num_layers) for k in ours} | {"rope_freqs.weight"}
    for hf_name, value in ours.items():
        tensor = tensors[gguf_name(hf_name, args.num_layers)]
        if value.dim() == 1:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
            assert torch.equal(torch.from_numpy(np.array(tensor.data)), value), hf_name
            continue
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F16
        expected = _llama_cpp_rows(hf_name, value, args).half()
        assert torch.equal(torch.from_numpy(np.array(tensor.data)), expected), hf_name


def _hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def _llama_cpp_rows(hf_name: str, value: torch.Tensor, args) -> torch.Tensor:
    """What convert_hf_to_gguf.py's LlamaModel.permute does to q_proj / k_proj, written out again."""
    heads = args.num_heads if "q_proj" in hf_name else args.num_kv_heads if "k_proj" in hf_name else None
    if heads is None:
        return value
    half = value.shape[0] // heads // 2
    return value.reshape(heads, 2, half, -1).transpose(1, 2).reshape(value.shape)


def test_q8_0_tensors_are_within_their_quantization_error(tiny_folder, tmp_path):
    export_gguf(tiny_folder, tmp_path / "tiny-q8.gguf", "q8_0")
    reader = read(tmp_path / "tiny-q8.gguf")
    args = model_args_from_hf_config(read_hf_config(tiny_folder))
    tensors = {t.name: t for t in reader.tensors}
    quantized = 0
    for hf_name, value in _hf_tensors(tiny_folder).items():
        tensor = tensors[gguf_name(hf_name, args.num_layers)]
        if value.dim() == 1:
            continue
        assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0
        back = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type)).reshape(value.shape)
        expected = _llama_cpp_rows(hf_name, value, args)
        # Each block of 32 values is stored as int8 times one scale d = max|x| / 127 (kept in f16): at most
        # half a step off, plus up to 127 steps of d's f16 rounding (2^-11 relative).
        blocks = expected.reshape(-1, 32)
        bound = blocks.abs().amax(dim=1, keepdim=True) / 127 * (0.5 + 127 * 2**-11)
        assert ((back.reshape(-1, 32) - blocks).abs() <= bound + 1e-7).all(), hf_name
        quantized += 1
    assert quantized == 2 + 7 * args.num_layers
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0


def test_bf16_tensors_are_ours_rounded_to_bf16(tiny_folder, tmp_path):
    export_gguf(tiny_folder, tmp_path / "tiny-bf16.gguf", "bf16")
    tensors = {t.name: t for t in read(tmp_path / "tiny-bf16.gguf").tensors}
    value = _hf_tensors(tiny_folder)["model.layers.0.mlp.up_proj.weight"]
    tensor = tensors["blk.0.ffn_up.weight"]
    assert tensor.tensor_type == gguf.GGMLQuantizationType.BF16
    stored = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type)).reshape(value.shape)
    assert torch.equal(stored, value.to(torch.bfloat16).float())


def test_permuted_q_and_k_with_interleaved_rope_give_hf_attention_scores(tiny_folder, tmp_path):
    """llama.cpp rotates pairs (2i, 2i+1) of each head; HF rotates (i, i + d/2). After the permutation
    the two must agree on every query-key score."""
    export_gguf(tiny_folder, tmp_path / "tiny.gguf")
    tensors = {t.name: t for t in read(tmp_path / "tiny.gguf").tensors}
    args = model_args_from_hf_config(read_hf_config(tiny_folder))
    hf = _hf_tensors(tiny_folder)
    head_dim, seq = args.resolved_head_dim, 12
    x = torch.randn(seq, args.embed_dim, generator=torch.Generator().manual_seed(0))
    inv_freq = rope_inverse_frequencies(head_dim, args.rope_base, args.rope_scaling)
    angles = torch.arange(seq)[:, None] * inv_freq[None]  # (seq, d/2)

    def heads(w: torch.Tensor, n: int) -> torch.Tensor:
        return (x @ w.T).reshape(seq, n, head_dim).transpose(0, 1)  # (n, seq, d)

    def hf_rope(t: torch.Tensor) -> torch.Tensor:
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        return apply_rotary(t, cos, sin)

    def interleaved_rope(t: torch.Tensor) -> torch.Tensor:
        even, odd = t[..., 0::2], t[..., 1::2]
        return torch.stack([even * angles.cos() - odd * angles.sin(), even * angles.sin() + odd * angles.cos()],
                           -1).flatten(-2)

    group = args.num_heads // args.num_kv_heads
    q_hf, k_hf = (hf[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qk")
    q_ll, k_ll = (torch.from_numpy(np.array(tensors[f"blk.0.attn_{p}.weight"].data)).float() for p in "qk")
    scores_hf = hf_rope(heads(q_hf, args.num_heads)) @ hf_rope(heads(k_hf, args.num_kv_heads)).repeat_interleave(
        group, 0).transpose(1, 2)
    scores_ll = interleaved_rope(heads(q_ll, args.num_heads)) @ interleaved_rope(heads(k_ll, args.num_kv_heads)
                                                                                 ).repeat_interleave(group, 0).transpose(1, 2)
    torch.testing.assert_close(scores_ll, scores_hf, atol=2e-3, rtol=2e-3)  # f16 weights
    assert (scores_hf - hf_rope(heads(q_ll, args.num_heads)) @ hf_rope(heads(k_ll, args.num_kv_heads)).repeat_interleave(
        group, 0).transpose(1, 2)).abs().max() > 1e-2, "unpermuted rows would have given other scores"


def test_hyperparameters_and_llama3_rope_factors(tiny_folder, tmp_path):
    export_gguf(tiny_folder, tmp_path / "tiny.gguf")
    reader = read(tmp_path / "tiny.gguf")
    config = read_hf_config(tiny_folder)
    assert field(reader, "general.architecture") == "llama"
    for key, expected in {"llama.block_count": config["num_hidden_layers"], "llama.context_length": 2048,
                          "llama.embedding_length": 128, "llama.feed_forward_length": 384,
                          "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
                          "llama.rope.dimension_count": 32, "llama.vocab_size": 768}.items():
        assert field(reader, key) == expected, key
    assert field(reader, "llama.rope.freq_base") == 500000.0
    factors = np.array(next(t for t in reader.tensors if t.name == "rope_freqs.weight").data)
    scaled = rope_inverse_frequencies(32, 500000.0, model_args_from_hf_config(config).rope_scaling)
    plain = rope_inverse_frequencies(32, 500000.0, None)
    np.testing.assert_allclose(factors, (plain / scaled).numpy(), rtol=1e-5)  # llama.cpp divides by them
    assert factors.min() == 1.0 and factors.max() == 8.0 and len(set(factors.round(4))) > 2


def test_llama3_tokenizer_metadata_tokenizes_as_ours(tiny_folder, tmp_path):
    export_gguf(tiny_folder, tmp_path / "tiny.gguf")
    reader = read(tmp_path / "tiny.gguf")
    ours = llama3_tokenizer(str(TINY_TOKENIZER))
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "llama-bpe"
    assert len(tokens) == ours.vocab_size == 768
    assert tokens[ours.bos_id] == "<|begin_of_text|>" and types[ours.eot_id] == gguf.TokenType.CONTROL
    assert types[100] == gguf.TokenType.NORMAL
    assert (field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id"),
            field(reader, "tokenizer.ggml.eot_token_id")) == (ours.bos_id, ours.eos_id, ours.eot_id)
    assert field(reader, "tokenizer.ggml.add_bos_token") is True
    assert field(reader, "tokenizer.chat_template") == "{% for m in messages %}{{ m.content }}{% endfor %}"
    merges = field(reader, "tokenizer.ggml.merges")
    text = "Give three tips for staying healthy: eat well, sleep 8 hours, and walk!"
    assert _gpt2_bpe(text, tokens, merges) == ours.encode(text, add_bos=False, add_eos=False)


def _gpt2_bpe(text: str, tokens: list[str], merges: list[str]) -> list[int]:
    """GPT-2 style BPE as llama.cpp runs it on a "gpt2" vocabulary: split by the pre-tokenizer,
    spell each piece's bytes in the byte-to-unicode alphabet, merge the best-ranked pair first."""
    from tunelite.export.gguf import _byte_to_unicode

    to_text, rank = _byte_to_unicode(), {tuple(m.split(" ")): i for i, m in enumerate(merges)}
    ids, index = [], {t: i for i, t in enumerate(tokens)}
    for piece in regex.findall(LLAMA3_PATTERN, text):
        word = [to_text[b] for b in piece.encode()]
        while len(word) > 1:
            pairs = [(rank.get(pair, math.inf), i) for i, pair in enumerate(zip(word, word[1:]))]
            best, i = min(pairs)
            if best == math.inf:
                break
            word[i:i + 2] = [word[i] + word[i + 1]]
        ids += [index[w] for w in word]
    return ids


def test_sentencepiece_tokenizer_becomes_llamas_vocabulary(tmp_path, llama2_path):  # noqa: F811
    sp = llama2_tokenizer(llama2_path)
    args = dataclasses.replace(LLAMA3_1_8B, vocab_size=sp.vocab_size, num_layers=1, num_heads=2, num_kv_heads=2,
                               embed_dim=64, intermediate_dim=96, max_seq_len=128, rope_scaling=None, rope_base=10000.0)
    write_hf_checkpoint(tmp_path / "llama2", args)
    shutil.copy(llama2_path, tmp_path / "llama2" / "tokenizer.model")
    summary = export_gguf(tmp_path / "llama2", tmp_path / "llama2.gguf")
    reader = read(tmp_path / "llama2.gguf")
    assert summary.tokenizer == "llama" and field(reader, "tokenizer.ggml.model") == "llama"
    assert field(reader, "tokenizer.ggml.tokens") == [sp._sp.id_to_piece(i) for i in range(sp.vocab_size)]
    assert field(reader, "tokenizer.ggml.scores")[5] == pytest.approx(sp._sp.get_score(5))
    assert (field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id")) == (
        sp.bos_id, sp.eos_id)
    assert "rope_freqs.weight" not in {t.name for t in reader.tensors}


def test_other_model_families_are_refused_naming_config_json(tmp_path, tiny_folder):
    folder = tmp_path / "qwen"
    shutil.copytree(tiny_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "qwen2",
                                                     "architectures": ["Qwen2ForCausalLM"]}))
    with pytest.raises(GGUFExportError, match=r"qwen/config.json: model_type 'qwen2'.*supports the Llama family"):
        export_gguf(folder, tmp_path / "qwen.gguf")
    assert not (tmp_path / "qwen.gguf").exists()


def test_a_folder_without_a_tokenizer_is_refused_with_the_fix(tmp_path, capsys):
    assert main(["export", "gguf", str(TINY_MODEL), str(tmp_path / "x.gguf")]) == 2
    assert "pass its path with --tokenizer" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
