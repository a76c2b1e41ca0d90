"""Loss weighting per timestep: min-SNR-γ and debiased estimation, on the scheduler SD1.5 trains with."""

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from lora_nb.steps import loss_weights


def _scheduler():
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_debiased_estimation_weights_eps_by_one_over_root_snr_and_v_by_one_over_snr_plus_one():
    sched = _scheduler()
    t = torch.tensor([0, 10, 250, 500, 999])
    snr = compute_snr(sched, t).float().clamp(max=1000)
    eps = loss_weights(sched, t, 0.0, "epsilon", debiased=True)
    v = loss_weights(sched, t, 0.0, "v_prediction", debiased=True)
    assert torch.allclose(eps, 1 / snr.sqrt()) and torch.allclose(v, 1 / (snr + 1))
    assert torch.isfinite(eps).all() and eps[0] > 0
    assert (eps[1:] > eps[:-1]).all(), "the noisier the step, the more its loss counts"
    assert eps[-1] > 10 * eps[2]  # the noisiest step outweighs a middle one many times


def test_debiased_estimation_multiplies_min_snr_and_nothing_is_weighted_when_both_are_off():
    sched = _scheduler()
    t = torch.tensor([5, 300, 900])
    min_snr = loss_weights(sched, t, 1.0, "epsilon")
    both = loss_weights(sched, t, 1.0, "epsilon", debiased=True)
    assert torch.allclose(both, min_snr * loss_weights(sched, t, 0.0, "epsilon", debiased=True))
    assert torch.equal(loss_weights(sched, t, 0.0, "epsilon"), torch.ones(3))
    snr = compute_snr(sched, t).float()
    assert torch.allclose(min_snr, torch.minimum(snr, torch.ones(3)) / snr)
