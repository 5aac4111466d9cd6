"""The preference recipe's pieces against TRL, its data, and the recipe end to end on the tiny model."""

import json
import shutil
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, write_hf_checkpoint

from tunelite.checkpointing.hf import HFCheckpointer
from tunelite.checkpointing.loading import load_checkpoint_into
from tunelite.checkpointing.peft import peft_key
from tunelite.cli.main import main
from tunelite.config import asset_path, instantiate, load_config, resolve_config_path
from tunelite.data.preference import preference_collate, preference_dataset
from tunelite.errors import DataError
from tunelite.models.llama import LoRAArgs, lora_llama
from tunelite.modules.lora import adapters_disabled, set_trainable_params
from tunelite.modules.loss import IGNORE_INDEX, sequence_log_probs
from tunelite.modules.preference import DPOLoss, IPOLoss, SimPOLoss

PAIRS, PROMPT, RANK, ALPHA = 3, 5, 4, 8.0


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dpo") / "base"
    write_hf_checkpoint(folder)
    return folder


def pair_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids (2 x PAIRS sequences, chosen first, right-padded), the completion mask TRL takes (1 on
    response tokens) and its attention mask: prompts of PROMPT tokens, responses of 3 to 8."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 9, (2 * PAIRS,), generator=g)
    ids = torch.zeros(2 * PAIRS, PROMPT + 8, dtype=torch.long)
    completion, attention = torch.zeros_like(ids), torch.zeros_like(ids)
    prompts = torch.randint(1, TINY.vocab_size, (PAIRS, PROMPT), generator=g)
    for row, length in enumerate(lengths.tolist()):
        ids[row, :PROMPT] = prompts[row % PAIRS]
        ids[row, PROMPT:PROMPT + length] = torch.randint(1, TINY.vocab_size, (length,), generator=g)
        completion[row, PROMPT:PROMPT + length] = 1
        attention[row, :PROMPT + length] = 1
    return ids, completion, attention


def shifted_labels(ids: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    """Our labels: position t is labelled with token t + 1 where that token is a response token."""
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = torch.where(completion[:, 1:].bool(), ids[:, 1:], IGNORE_INDEX)
    return labels


def models_with_the_same_adapters(base: Path):
    """Ours and transformers + peft (with TRL's fused LM head), the same base weights and non-zero adapters."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    add_fused_lm_head(hf, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    theirs = get_peft_model(hf, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.device("meta"):
        ours = lora_llama(TINY, LoRAArgs(("q_proj", "v_proj"), apply_lora_to_mlp=True, lora_rank=RANK, lora_alpha=ALPHA))
    load_checkpoint_into(ours, HFCheckpointer(str(base)), torch.device("cpu"), torch.float32)
    set_trainable_params(ours)
    torch.manual_seed(1)
    peft_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if param.requires_grad:
                mine = peft_key(name).replace(".weight", ".default.weight")
                if mine in peft_params:
                    param.normal_(0, 0.2)
                    peft_params[mine].copy_(param)
                else:
                    param.zero_()  # w1 / w3: peft adapts down_proj only here
    return ours, theirs, peft_params


def trl_dpo(model, ids, completion, attention, loss_type: str, beta: float) -> tuple[torch.Tensor, dict]:
    """TRL's DPOTrainer._compute_loss on a PEFT model, the reference being the model with its adapter off."""
    from trl import DPOTrainer

    accelerator = SimpleNamespace(device=torch.device("cpu"), unwrap_model=lambda m: m, gather=lambda t: t,
                                  gather_for_metrics=lambda t: t)
    trainer = SimpleNamespace(
        model=model, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=False,
        ref_model=None, args=SimpleNamespace(gradient_checkpointing_kwargs=None), f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
    )
    inputs = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, {name: values[0] for name, values in trainer._metrics["train"].items()}


def our_preference(model, loss_fn, ids, labels):
    counts = (labels != IGNORE_INDEX).sum(dim=1)
    with torch.no_grad(), adapters_disabled(model):
        ref = sequence_log_probs(model.hidden_states(ids), labels, model.output, num_chunks=3)
    policy = sequence_log_probs(model.hidden_states(ids), labels, model.output, num_chunks=3)
    return loss_fn(policy[:PAIRS], policy[PAIRS:], ref[:PAIRS], ref[PAIRS:], counts[:PAIRS], counts[PAIRS:])


@pytest.mark.parametrize("loss_type, loss_fn", [("sigmoid", DPOLoss(beta=0.3)), ("ipo", IPOLoss(beta=0.3))])
def test_loss_rewards_and_adapter_gradients_equal_trls_dpo_trainer(base, loss_type, loss_fn):
    ours, theirs, peft_params = models_with_the_same_adapters(base)
    ids, completion, attention = pair_batch()
    ours.train(), theirs.train()
    their_loss, their_metrics = trl_dpo(theirs, ids, completion, attention, loss_type, beta=0.3)
    their_loss.backward()
    out = our_preference(ours, loss_fn, ids, shifted_labels(ids, completion))
    loss = out.losses.mean()
    loss.backward()
    assert loss.item() == pytest.approx(their_loss.item(), abs=1e-5)
    assert abs(loss.item() - 0.6931) > 1e-3, "the adapters changed nothing: the test proves little"
    chosen, rejected = out.chosen_rewards, out.rejected_rewards
    assert chosen.mean().item() == pytest.approx(their_metrics["rewards/chosen"], abs=1e-5)
    assert rejected.mean().item() == pytest.approx(their_metrics["rewards/rejected"], abs=1e-5)
    assert (chosen > rejected).float().mean().item() == pytest.approx(their_metrics["rewards/accuracies"])
    assert (chosen - rejected).mean().item() == pytest.approx(their_metrics["rewards/margins"], abs=1e-5)
    compared = 0
    for name, param in ours.named_parameters():
        key = peft_key(name).replace(".weight", ".default.weight") if param.requires_grad else None
        if key in peft_params:
            torch.testing.assert_close(param.grad, peft_params[key].grad, rtol=1e-4, atol=1e-5)
            compared += 1
    assert compared == 2 * 3 * TINY.num_layers


def test_simpo_equals_trls_cpo_trainer_in_its_simpo_mode():
    from trl.experimental.cpo import CPOTrainer

    g = torch.Generator().manual_seed(0)
    chosen, rejected = -20 * torch.rand(4, generator=g), -20 * torch.rand(4, generator=g)
    lengths_c, lengths_r = torch.randint(2, 30, (4,), generator=g), torch.randint(2, 30, (4,), generator=g)
    trainer = SimpleNamespace(alpha=0.0, beta=2.5, simpo_gamma=0.7, label_smoothing=0.1, loss_type="simpo",
                              accelerator=SimpleNamespace(device=torch.device("cpu")))
    # CPO's SimPO mode takes per-token averaged log-probs.
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(trainer, chosen / lengths_c, rejected / lengths_r)
    out = SimPOLoss(beta=2.5, gamma=0.7, label_smoothing=0.1)(chosen, rejected, None, None, lengths_c, lengths_r)
    torch.testing.assert_close(out.losses, losses)
    torch.testing.assert_close(out.chosen_rewards, chosen_rewards)
    torch.testing.assert_close(out.rejected_rewards, rejected_rewards)


def test_label_smoothing_is_conservative_dpo():
    """cDPO: the loss expected when a `label_smoothing` share of the pairs' labels is flipped."""
    chosen, rejected, ref_c, ref_r = torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.5])
    logits = 0.5 * ((chosen - ref_c) - (rejected - ref_r))
    expected = -0.8 * F.logsigmoid(logits) - 0.2 * F.logsigmoid(-logits)
    out = DPOLoss(beta=0.5, label_smoothing=0.2)(chosen, rejected, ref_c, ref_r, torch.tensor([3]), torch.tensor([3]))
    torch.testing.assert_close(out.losses, expected)


# --- data ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    cfg = load_config(resolve_config_path("tiny/lora_dpo_cpu"))
    return instantiate(cfg.tokenizer)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_the_three_row_layouts_give_the_same_pairs_labelled_on_the_responses_only(tmp_path, tokenizer):
    user = {"role": "user", "content": "Name a colour."}
    system = {"role": "system", "content": "Be brief."}
    good, bad = {"role": "assistant", "content": "Blue."}, {"role": "assistant", "content": "A chair."}
    layouts = [
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "A chair."},
        {"prompt": [user], "chosen": [good], "rejected": [bad]},
        {"chosen": [user, good], "rejected": [user, bad]},
    ]
    pairs = [preference_dataset(tokenizer, write_jsonl(tmp_path / f"{i}.jsonl", [row]), system_prompt="Be brief.")[0]
             for i, row in enumerate(layouts)]
    assert pairs[0] == pairs[1] == pairs[2]
    pair = pairs[0]
    without_system = preference_dataset(tokenizer, write_jsonl(tmp_path / "p.jsonl", [layouts[0]]))[0]
    for side, reply in (("chosen", good), ("rejected", bad)):
        labels = pair[f"{side}_labels"]
        prompt_length = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        assert all(label != IGNORE_INDEX for label in labels[prompt_length:])
        trained = tokenizer.decode(labels[prompt_length:])
        assert reply["content"] in trained and "colour" not in trained and "brief" not in trained
        assert len(without_system[f"{side}_tokens"]) < len(pair[f"{side}_tokens"])
    assert pair["chosen_tokens"][:prompt_length] == pair["rejected_tokens"][:prompt_length]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Hi", "chosen": "Hello"}, "line 1: column 'rejected' is missing"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
     "line 1: columns 'chosen' and 'rejected' must be the same conversation up to their last turn"),
    ({"prompt": "Hi", "chosen": "Hello", "rejected": [{"role": "user", "content": "x"}]},
     "line 1: column 'rejected': the response must end with an assistant turn"),
    ({"prompt": "Hi", "chosen": 3, "rejected": "no"}, "line 1: column 'chosen' must be a string or a list"),
    ({"prompt": "Hi", "chosen": "ok", "rejected": [{"role": "assistant"}]}, "line 1: column 'rejected', turn 0: expected"),
])
def test_a_bad_row_is_named_with_its_file_line_and_column(tmp_path, tokenizer, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError, match=rf"{path}, {message}"):
        preference_dataset(tokenizer, path)


def test_collate_runs_chosen_then_rejected_in_one_batch(tokenizer):
    pairs = preference_dataset(tokenizer, asset_path("tiny/preference_sample.jsonl"))
    batch = preference_collate([pairs[0], pairs[1]], pad_id=tokenizer.pad_id)
    assert batch["tokens"].shape[0] == 4
    for row, (index, side) in enumerate([(0, "chosen"), (1, "chosen"), (0, "rejected"), (1, "rejected")]):
        tokens = pairs[index][f"{side}_tokens"]
        assert batch["tokens"][row, :len(tokens)].tolist() == tokens
        assert batch["labels"][row, :len(tokens) - 1].tolist() == pairs[index][f"{side}_labels"][1:]


# --- the recipe ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped sample's first 16 pairs: two steps an epoch at the demo's batch of 8."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(Path(asset_path("tiny/preference_sample.jsonl")).read_text().splitlines(True)[:16]))
    return path


def dpo_run(out: Path, source: Path, *extra: str) -> list[dict]:
    """The tiny DPO demo on `source`; the logged rows."""
    assert main(["run", "lora_dpo_single_device", "--config", "tiny/lora_dpo_cpu", f"output_dir={out}",
                 f"dataset.source={source}", "log_every_n_steps=1", *extra]) == 0
    return [json.loads(line) for path in sorted((out / "logs").glob("*.jsonl")) for line in path.read_text().splitlines()]


def test_tiny_dpo_run_raises_reward_accuracy_above_0_9(tmp_path, pairs16):
    rows = dpo_run(tmp_path / "run", pairs16, "epochs=10")
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # adapters start at zero: policy == reference
    assert rows[0]["rewards/accuracies"] < 0.9
    assert sum(r["rewards/accuracies"] for r in rows[-4:]) / 4 > 0.9
    assert rows[-1]["rewards/margins"] > 0 and rows[-1]["loss"] < 0.3
    assert (tmp_path / "run" / "step_20" / "adapter" / "adapter_model.safetensors").is_file()


def test_qlora_dpo_and_simpo_run(tmp_path, pairs16):
    for name, extra in (("qlora", "model._component_=tunelite.models.qlora_llama3_1_tiny"),
                        ("simpo", "loss={_component_: tunelite.modules.preference.SimPOLoss, beta: 2.0, gamma: 0.5}")):
        rows = dpo_run(tmp_path / name, pairs16, "epochs=1", extra)
        assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_a_resumed_dpo_run_continues_with_the_uninterrupted_losses(tmp_path, pairs16):
    common = ("epochs=3", "save_every_n_steps=2", "keep_last_n_checkpoints=null", "model.lora_dropout=0.1")
    whole = dpo_run(tmp_path / "whole", pairs16, *common)
    # As after a kill just after step 2's checkpoint: the later checkpoints and the logs gone.
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut)
    for path in (cut / "step_4", cut / "step_6", cut / "logs"):
        shutil.rmtree(path)
    resumed = dpo_run(cut, pairs16, *common, "resume_from_checkpoint=True")
    assert [r["step"] for r in resumed] == [3, 4, 5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole if r["step"] > 2]
    assert [r["rewards/accuracies"] for r in resumed] == [r["rewards/accuracies"] for r in whole if r["step"] > 2]
