"""Optimizers run real steps on CPU (8-bit ones included); LR schedules follow their definitions."""

import math

import pytest
import torch

from lora_nb.config import OPTIMIZERS, SCHEDULERS
from lora_nb.optim import build_optimizer, lr_curve


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_reduces_a_real_loss_in_a_few_cpu_steps(name):
    torch.manual_seed(0)
    # 8-bit optimizers keep 8-bit state only for tensors of >= 4096 elements: use one that large.
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    x = torch.randn(256, 64)
    y = x[:, :1] * 0.5
    lr = {"Lion": 1e-4, "Lion8bit": 1e-4, "Prodigy": 1.0, "DAdaptAdam": 1.0, "SGD": 1e-2}.get(name, 1e-3)
    opt = build_optimizer(name, [{"params": list(model.parameters()), "lr": lr}], weight_decay=0.0)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    if name.endswith("8bit"):
        state = opt.state[model[0].weight]
        assert any(t.dtype == torch.uint8 for t in state.values() if torch.is_tensor(t)), "8-bit state expected"


def test_two_param_groups_keep_their_own_learning_rates():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer("AdamW", [{"params": [a], "lr": 1e-4}, {"params": [b], "lr": 5e-5}])
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 5e-5]


def _lr(name, total=100, warmup=10, restarts=1, power=1.0):
    return [row[0] for row in lr_curve(name, [1.0], warmup, total, restarts, power)]


def test_constant_and_warmup_schedules():
    assert set(_lr("constant", warmup=0)) == {1.0}
    c = _lr("constant_with_warmup")
    assert c[0] == 0.0 and c[5] == pytest.approx(0.5) and set(c[10:]) == {1.0}


def test_linear_and_cosine_schedules_match_their_formulas():
    lin, cos = _lr("linear"), _lr("cosine")
    for step in (10, 40, 70, 99):
        progress = (step - 10) / 90
        assert lin[step] == pytest.approx(1 - progress)
        assert cos[step] == pytest.approx(0.5 * (1 + math.cos(math.pi * progress)))


def test_cosine_with_restarts_shows_its_restart_count():
    curve = _lr("cosine_with_restarts", total=110, warmup=10, restarts=4)
    jumps = [i for i in range(11, 110) if curve[i] > curve[i - 1] + 0.5]
    # 4 cosine cycles (kohya's lr_scheduler_num_cycles): the LR jumps back to the top 3 times
    assert jumps == [35, 60, 85]
    assert curve[35] == pytest.approx(1.0)


def test_polynomial_schedule_uses_the_power():
    quad = _lr("polynomial", warmup=0, power=2.0)
    assert quad[50] == pytest.approx((1 - 0.5) ** 2, abs=1e-3)  # diffusers decays to a small lr_end, not 0
    assert _lr("polynomial", warmup=0, power=1.0)[50] == pytest.approx(0.5, abs=1e-3)


def test_every_scheduler_named_in_the_config_builds():
    for name in SCHEDULERS:
        assert len(_lr(name, total=20, warmup=2, restarts=2)) == 20


def test_rex_and_the_warm_up_ratio_follow_their_formulas():
    from lora_nb.config import preset

    curve = [lrs[0] for lrs in lr_curve("rex", [1.0], 10, 110)]
    assert curve[0] == pytest.approx(1 / 11) and curve[9] == pytest.approx(10 / 11)  # linear warm-up
    for step in (10, 35, 60, 85, 109):
        z = (step - 10) / 100
        assert curve[step] == pytest.approx((1 - z) / (1 - z / 2))
    linear = [lrs[0] for lrs in lr_curve("linear", [1.0], 10, 110)]
    assert all(r >= l - 1e-9 for r, l in zip(curve[10:], linear[10:]))  # REX stays above linear decay
    o = preset("toy").with_overrides({"optimizer.lr_warmup_steps": 0, "optimizer.lr_warmup_ratio": 0.05}).optimizer
    assert o.warmup_steps_for(1200) == 60
    assert preset("toy").optimizer.warmup_steps_for(1200) == 20  # the steps when no ratio is set


def test_a_schedule_free_optimizer_hands_out_its_average_around_saving_and_trains_on_its_iterate():
    from lora_nb.optim import use_averaged_weights

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16))
    opt = build_optimizer("AdamWScheduleFree", [{"params": [w], "lr": 1e-2}], weight_decay=0.0)
    for _ in range(20):
        (w ** 2).sum().backward()
        opt.step()
        opt.zero_grad()
    training = w.detach().clone()
    with use_averaged_weights(opt):
        averaged = w.detach().clone()
    assert not torch.equal(training, averaged)  # the average differs from the iterate
    assert torch.equal(w.detach(), training)  # and training goes on from where it was
    plain = build_optimizer("AdamW", [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1e-3}])
    with use_averaged_weights(plain):  # any other optimizer: nothing happens
        pass
