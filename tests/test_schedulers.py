import torch

from tunelite.training.schedulers import cosine_schedule_with_warmup


def test_cosine_schedule_warms_up_then_decays_to_zero():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=6)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(6):
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[:3] == [0.0, 0.5, 1.0] and lrs[-1] == 0.0 and lrs[2] > lrs[3] > lrs[4] > lrs[5]


def test_tensor_lr_is_updated_in_place_and_state_round_trips():
    """torchao's low-bit optimizers hold lr as a tensor; replacing it would recompile their step."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    lr = opt.param_groups[0]["lr"] = torch.tensor(1.0)
    sched = cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=6)
    sched.step()
    assert opt.param_groups[0]["lr"] is lr and lr.item() == 0.5
    other = cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=6)
    other.load_state_dict(sched.state_dict())
    assert other.last_step == 1 and lr.item() == 0.5


def test_schedule_reaches_optimizer_in_backward_after_its_state_is_loaded():
    from tunelite.training.optimizers import OptimizerInBackward

    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(2)]
    opt = OptimizerInBackward(params, lambda one: torch.optim.SGD(one, lr=1.0))
    opt.load_state_dict(OptimizerInBackward(params, lambda one: torch.optim.SGD(one, lr=1.0)).state_dict())
    sched = cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=6)
    sched.step()
    assert [o.param_groups[0]["lr"] for o in opt.optimizers] == [0.5, 0.5]
