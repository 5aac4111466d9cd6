"""A bad step decided on the device: a fused Adam or AdamW skips it without reading anything back,
and leaves weights, moments and step count as if the step had never been taken."""

import copy
import math

import pytest
import torch
from faults_helpers import FAULTY_LOSS, metrics, run_args

from tunelite.checkpointing.state import Progress
from tunelite.cli.main import main
from tunelite.training.divergence import MARGIN
from tunelite.training.nonfinite import bad_step, skipped_if_bad


def adamw(fused: bool) -> tuple[list[torch.nn.Parameter], torch.optim.AdamW]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    return params, torch.optim.AdamW(params, lr=0.1, weight_decay=0.01, fused=fused)


def take(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, grads: list[torch.Tensor],
         bad: bool) -> None:
    for param, grad in zip(params, grads):
        param.grad = grad.clone()
    with skipped_if_bad(optimizer, torch.tensor(bad)) as take_step:
        if take_step:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("fused", [True, False], ids=["fused, on the device", "read back"])
def test_a_skipped_step_leaves_weights_moments_and_step_count_as_if_never_taken(fused, monkeypatch):
    grads = [[torch.randn(5, 3), torch.randn(7)] for _ in range(3)]
    nan = [torch.full((5, 3), math.nan), torch.full((7,), math.inf)]
    params, optimizer = adamw(fused)
    reference = copy.deepcopy(params)
    reference_optimizer = torch.optim.AdamW(reference, lr=0.1, weight_decay=0.01, fused=fused)
    if fused:  # nothing is read back from the device
        monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("skipped_if_bad read a tensor back"))
    take(params, optimizer, grads[0], False)
    take(params, optimizer, nan, True)
    take(params, optimizer, grads[1], False)
    monkeypatch.undo()
    take(reference, reference_optimizer, grads[0], False)
    take(reference, reference_optimizer, grads[1], False)
    assert all(torch.equal(p, r) for p, r in zip(params, reference))
    for p, r in zip(params, reference):
        state, expected = optimizer.state[p], reference_optimizer.state[r]
        assert all(torch.equal(torch.as_tensor(state[k]), torch.as_tensor(expected[k])) for k in expected)
        assert float(state["step"]) == 2


def test_a_bad_step_is_a_nonfinite_loss_or_norm_or_a_loss_past_the_divergence_limit():
    fresh = Progress()
    assert not bad_step(torch.tensor(100.0), torch.tensor(1.0), fresh, 10.0)  # no history: no limit yet
    assert bad_step(torch.tensor(math.nan), torch.tensor(1.0), fresh, 10.0)
    assert bad_step(torch.tensor(1.0), torch.tensor(math.inf), fresh, None)
    assert not bad_step(torch.tensor(1.0), None, fresh, None)
    history = Progress(step=3, first_loss=2.0, losses=[[1, 2.0], [2, 1.0], [3, 1.0]])  # median 1
    limit = max(10.0 * 1.0, 2.0 + MARGIN)
    assert not bad_step(torch.tensor(limit), torch.tensor(1.0), history, 10.0)
    assert bad_step(torch.tensor(limit * 1.01), torch.tensor(1.0), history, 10.0)
    assert not bad_step(torch.tensor(limit * 1.01), torch.tensor(1.0), history, None)


def test_the_lora_recipe_with_a_fused_adamw_skips_a_nan_step_and_trains_on(tmp_path, capsys):
    out, clean = tmp_path / "run", tmp_path / "clean"
    args = ["+optimizer.fused=True", "epochs=1", "+skip_nonfinite_steps=1"]
    assert main(run_args(clean, *args)) == 0
    assert main(run_args(out, *args, FAULTY_LOSS, "+loss.nan_loss_at=[7]")) == 0
    assert "step 7 (dataset samples" in capsys.readouterr().err
    rows, expected = metrics(out), metrics(clean)
    assert all(rows[step]["loss"] == expected[step]["loss"] for step in range(1, 7))
    assert math.isnan(rows[7]["loss"]) and rows[8]["skipped_steps"] == 1
    assert rows[8]["loss"] != expected[8]["loss"], "step 7's update was applied although it was skipped"
    assert rows[12]["lr"] == expected[12]["lr"]
