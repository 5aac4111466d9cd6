"""Generation: the KV cache, sampling, stopping, streaming, adapters vs merged folders, the command."""

import dataclasses
import io
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, random_model, write_hf_checkpoint
from test_tokenizers import corpus, llama2_path  # noqa: F401  (fixtures: a small SentencePiece model)
from tunelite.checkpointing.hf import HFCheckpointer
from tunelite.checkpointing.peft import save_peft_adapter
from tunelite.cli.main import main
from tunelite.config import asset_path
from tunelite.errors import CheckpointError, ConfigError
from tunelite.generation import (
    ChatSession,
    GenerationSettings,
    TextStream,
    chat_prompt,
    generate,
    load_generation_model,
    sample_next_token,
    top_k_filter,
    top_p_filter,
)
from tunelite.generation import loop
from tunelite.models.decoder import LoRAArgs, decoder, lora_decoder
from tunelite.modules.lora import LoRALinear, merged_state_dict
from tunelite.tokenizers import Message, llama2_tokenizer, llama3_tokenizer

PROMPTS = [[5, 17, 42, 8, 99, 3], [250, 1], [7, 7, 7, 7, 7, 7, 7, 7, 7, 31]]
GREEDY = GenerationSettings(max_new_tokens=20)


@pytest.fixture
def model() -> torch.nn.Module:
    return random_model().eval()


def tiny_tokenizer():
    return llama3_tokenizer(asset_path("tiny/tokenizer.model"))


def test_greedy_with_kv_cache_equals_recomputing_the_whole_sequence_each_step(model):
    for prompt in PROMPTS:
        cached, _ = generate(model, [prompt], GREEDY)
        recomputed, _ = generate(model, [prompt], GREEDY, use_cache=False)
        assert cached == recomputed
        assert len(cached[0]) == GREEDY.max_new_tokens


def test_a_left_padded_batch_generates_what_each_prompt_generates_alone(model):
    alone = [generate(model, [prompt], GREEDY)[0][0] for prompt in PROMPTS]
    assert generate(model, PROMPTS, GREEDY)[0] == alone
    assert generate(model, PROMPTS, GREEDY, use_cache=False)[0] == alone


def test_prefill_then_one_token_at_a_time_gives_the_full_forward_logits(model):
    tokens = torch.tensor([PROMPTS[0] + [11, 12, 13, 14]])
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(batch_size=1, max_seq_len=16)
        steps = [model(tokens[:, :6])] + [model(tokens[:, i:i + 1]) for i in range(6, 10)]
        model.reset_caches()
    torch.testing.assert_close(torch.cat(steps, dim=1), full)


def test_caches_leave_the_training_forward_and_state_dict_untouched(model):
    tokens = torch.tensor([PROMPTS[0]])
    model.train()
    keys, before = set(model.state_dict()), model.hidden_states(tokens)
    model.setup_caches(batch_size=1, max_seq_len=16)
    assert model.caches_enabled and set(model.state_dict()) == keys
    model.reset_caches()
    assert not model.caches_enabled and not any("kv_cache" in name for name, _ in model.named_buffers())
    torch.testing.assert_close(model.hidden_states(tokens), before)


def test_generation_stops_at_the_first_stop_token_and_leaves_it_out(model, monkeypatch):
    # A sampler that plays a script: row 0 says 5, 6, EOT; row 1 says 8, 9, 10, EOT.
    eot = 299
    script = iter([[5, 8], [6, 9], [eot, 10], [1, eot], [2, 3]])
    monkeypatch.setattr(loop, "sample_next_token", lambda logits, *args: torch.tensor(next(script)))
    seen = []
    outputs, stats = generate(model, [[1, 2], [3]], GREEDY, stop_tokens={eot}, on_tokens=seen.append)
    assert outputs == [[5, 6], [8, 9, 10]]
    assert stats.num_tokens == 4 and len(seen) == 4  # stopped once every row had stopped


def test_llama3_stops_on_eot_eos_and_eom():
    tokenizer = tiny_tokenizer()
    assert set(tokenizer.stop_tokens) == {tokenizer.eot_id, tokenizer.eos_id, tokenizer.eom_id}


def test_temperature_zero_is_greedy_whatever_the_filters():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next_token(logits, temperature=0.0, top_k=5, top_p=0.5), logits.argmax(-1))
    assert torch.equal(sample_next_token(logits, temperature=1.0, top_k=1), logits.argmax(-1))


def test_top_k_keeps_exactly_the_k_largest_logits():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = top_k_filter(logits, 3)
    assert torch.isfinite(kept).tolist() == [[False, True, True, True, False]]
    assert torch.equal(kept[torch.isfinite(kept)], logits[torch.isfinite(kept)])


def test_top_p_keeps_the_smallest_set_reaching_p_and_always_the_top_token():
    logits = torch.tensor([[0.30, 0.05, 0.50, 0.15]]).log()
    def kept(p: float) -> list[int]:
        return torch.isfinite(top_p_filter(logits, p))[0].nonzero().flatten().tolist()
    assert kept(0.7) == [0, 2]  # 0.5 + 0.3 reaches 0.7
    assert kept(0.85) == [0, 2, 3]
    assert kept(0.5) == [2]
    assert kept(0.01) == [2]
    assert kept(1.0) == [0, 1, 2, 3]


def test_sampling_draws_only_tokens_the_filters_keep():
    logits = torch.zeros(1, 10)
    logits[0, :4] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    generator = torch.Generator().manual_seed(0)
    draws = {sample_next_token(logits, 1.0, top_k=3, generator=generator).item() for _ in range(300)}
    assert draws == {0, 1, 2}
    # Probabilities 0.60, 0.22, 0.08, ...: 0.7 needs the first two.
    draws = {sample_next_token(logits, 1.0, top_p=0.7, generator=generator).item() for _ in range(300)}
    assert draws == {0, 1}


def test_bad_sampling_settings_name_the_config_key():
    for field, value in (("temperature", -1.0), ("top_k", 0), ("top_p", 1.5), ("max_new_tokens", 0)):
        with pytest.raises(ConfigError, match=field):
            GenerationSettings(**{field: value})


def test_streamed_text_equals_the_decoded_text_and_never_splits_a_character():
    tokenizer = tiny_tokenizer()
    text = "Grüße aus Zürich: 日本語のテキスト, emoji 🎉 and plain words."
    ids = tokenizer.encode(text, add_bos=False, add_eos=False)
    assert len(ids) > len(text.encode()) // 3  # multi-byte characters span several tokens
    stream = TextStream(tokenizer.decode)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_streaming_keeps_sentencepiece_spaces_between_tokens(llama2_path):  # noqa: F811
    tokenizer = llama2_tokenizer(llama2_path)
    text = "naïve words and café über größer"
    stream = TextStream(tokenizer.decode)
    ids = tokenizer.encode(text, add_bos=False, add_eos=False)
    assert "".join([stream.push(i) for i in ids] + [stream.flush()]) == tokenizer.decode(ids)


def test_chat_prompt_ends_where_the_reply_begins_in_each_chat_format(llama2_path):  # noqa: F811
    messages = [Message("system", "Be brief."), Message("user", "Hi there")]
    llama3 = tiny_tokenizer()
    assert llama3.decode(chat_prompt(llama3, messages), skip_special_tokens=False).endswith(
        "Hi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    llama2 = llama2_tokenizer(llama2_path)
    tokens = chat_prompt(llama2, messages)
    assert tokens[0] == llama2.bos_id and llama2.eos_id not in tokens
    assert llama2.decode(tokens).endswith("Hi there [/INST]")


def test_chat_session_keeps_the_conversation():
    tokenizer = tiny_tokenizer()
    args = dataclasses.replace(TINY, vocab_size=tokenizer.vocab_size, max_seq_len=256)
    session = ChatSession(random_model(args).eval(), tokenizer, GenerationSettings(max_new_tokens=5), system_prompt="Be brief.")
    first, _ = session.reply("Hello", lambda piece: None)
    session.reply("And again", lambda piece: None)
    assert [m.role for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert session.messages[2].content == first
    assert tokenizer.decode(session.prompt_tokens("third")).count("Hello") == 1


def _lora_model_with_trained_adapter(base: Path) -> torch.nn.Module:
    """A LoRA model on `base` whose adapters are random and non-zero, as if trained."""
    lora = LoRAArgs(("q_proj", "v_proj", "output_proj"), apply_lora_to_mlp=True, apply_lora_to_output=True,
                    lora_rank=4, lora_alpha=8.0)
    model = lora_decoder(TINY, lora)
    model.load_state_dict(decoder(TINY).state_dict() | random_model().state_dict(), strict=False)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_b"):
                param.copy_(0.1 * torch.randn_like(param))
    return model


def test_base_plus_adapter_folder_generates_what_the_merged_folder_generates(tiny_checkpoint, tmp_path):
    base, _ = tiny_checkpoint
    trained = _lora_model_with_trained_adapter(base)
    save_peft_adapter(trained, tmp_path / "adapter", base_model_name_or_path=str(base))
    HFCheckpointer(str(base)).save(merged_state_dict(trained), tmp_path / "merged", torch.float32)

    cpu = torch.device("cpu")
    with_adapter = load_generation_model(HFCheckpointer(str(base)), tmp_path / "adapter", cpu, torch.float32)
    merged = load_generation_model(HFCheckpointer(str(tmp_path / "merged")), None, cpu, torch.float32)
    plain = load_generation_model(HFCheckpointer(str(base)), None, cpu, torch.float32)
    adapted = {n: (m.rank, m.alpha) for n, m in with_adapter.named_modules() if isinstance(m, LoRALinear)}
    assert len(adapted) == 2 * 6 + 1 and set(adapted.values()) == {(4, 8.0)}  # read from adapter_config.json
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())

    assert generate(with_adapter, PROMPTS, GREEDY)[0] == generate(merged, PROMPTS, GREEDY)[0]
    assert generate(with_adapter, PROMPTS, GREEDY)[0] != generate(plain, PROMPTS, GREEDY)[0]


def test_adapter_folder_without_adapter_config_is_named(tiny_checkpoint, tmp_path):
    base, _ = tiny_checkpoint
    save_peft_adapter(_lora_model_with_trained_adapter(base), tmp_path / "adapter", str(base))
    (tmp_path / "adapter" / "adapter_config.json").unlink()
    with pytest.raises(CheckpointError, match="adapter_config.json is missing"):
        load_generation_model(HFCheckpointer(str(base)), tmp_path / "adapter", torch.device("cpu"), torch.float32)


def test_adapter_made_for_another_model_is_refused_naming_the_file(tiny_checkpoint, tmp_path):
    base, _ = tiny_checkpoint
    other = dataclasses.replace(TINY, embed_dim=96, num_heads=6, num_kv_heads=2)
    write_hf_checkpoint(tmp_path / "other_base", other)
    save_peft_adapter(lora_decoder(other, LoRAArgs(("q_proj", "v_proj"))), tmp_path / "adapter", "other")
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        load_generation_model(HFCheckpointer(str(base)), tmp_path / "adapter", torch.device("cpu"), torch.float32)


def test_adapter_on_part_of_the_mlp_is_refused_naming_adapter_config(tiny_checkpoint, tmp_path):
    base, _ = tiny_checkpoint
    save_peft_adapter(_lora_model_with_trained_adapter(base), tmp_path / "adapter", str(base))
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_modules"] = ["q_proj", "gate_proj"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="adapter_config.json: adapters on \\['gate_proj'\\] only"):
        load_generation_model(HFCheckpointer(str(base)), tmp_path / "adapter", torch.device("cpu"), torch.float32)


def test_generate_command_answers_a_prompt_and_reports_speed(capsys):
    assert main(["generate", "--config", "tiny/generation", "--prompt", "Give three tips: be kind", "max_new_tokens=12"]) == 0
    out = capsys.readouterr().out
    reply, report = out.rstrip("\n").rsplit("\n", 1)
    assert reply.strip()
    assert report.startswith("[12 tokens, ") and "tokens/s, first token after" in report


def test_generate_command_chats_line_by_line_until_exit(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n\nWhat next?\n/exit\nnever read\n"))
    assert main(["generate", "--config", "tiny/generation", "max_new_tokens=4"]) == 0
    assert capsys.readouterr().out.count("tokens/s") == 2


@pytest.mark.parametrize("command", ["generate", "estimate"])
def test_new_subcommands_have_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"usage: tunelite {command}" in capsys.readouterr().out
