"""Optimizers and learning-rate schedules by the names the course uses."""

from __future__ import annotations

import torch

from lora_nb import LoraNbError


def build_optimizer(name: str, param_groups: list[dict], weight_decay: float = 0.01) -> torch.optim.Optimizer:
    """Build optimizer ``name`` over ``param_groups`` (each with its own ``lr``).

    AdamW8bit / Lion8bit come from bitsandbytes (≥ 0.50 runs them on CPU too);
    Lion from lion-pytorch; Prodigy from prodigyopt and DAdaptAdam from dadaptation (both: set LRs to 1);
    Adafactor from transformers (a fixed LR: relative steps off, as sd-scripts' LoRA recipes set it); CAME
    from came-pytorch; AdamWScheduleFree from schedulefree (switch it with :func:`use_averaged_weights`
    around saving, validation and previews).
    """
    groups = [g for g in param_groups if g["params"]]
    if name == "AdamW":
        return torch.optim.AdamW(groups, weight_decay=weight_decay)
    if name == "SGD":
        return torch.optim.SGD(groups, momentum=0.9, weight_decay=weight_decay)
    if name in ("AdamW8bit", "Lion8bit"):
        try:
            import bitsandbytes as bnb
        except Exception as exc:  # noqa: BLE001 - bitsandbytes fails to load in many ways
            raise LoraNbError(
                f"optimizer.optimizer={name} needs bitsandbytes, which could not be loaded ({exc}). "
                "Install bitsandbytes>=0.50, or choose AdamW / Lion."
            ) from None
        cls = bnb.optim.AdamW8bit if name == "AdamW8bit" else bnb.optim.Lion8bit
        return cls(groups, weight_decay=weight_decay)
    if name == "Lion":
        from lion_pytorch import Lion

        return Lion(groups, weight_decay=weight_decay, use_triton=False)
    if name == "Prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups, weight_decay=weight_decay, safeguard_warmup=True, use_bias_correction=True)
    if name in MORE_OPTIMIZERS:
        return MORE_OPTIMIZERS[name](groups, weight_decay)
    raise LoraNbError(f"optimizer.optimizer={name!r} is unknown: use AdamW, AdamW8bit, Lion, Lion8bit, Prodigy, SGD, "
                      f"{', '.join(MORE_OPTIMIZERS)}.")


def _adafactor(groups, weight_decay):
    from transformers.optimization import Adafactor

    return Adafactor(groups, scale_parameter=False, relative_step=False, warmup_init=False, weight_decay=weight_decay)


def _came(groups, weight_decay):
    from came_pytorch import CAME

    # CAME checks a default lr even when every group brings its own
    return CAME(groups, lr=groups[0]["lr"], weight_decay=weight_decay, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16))


def _schedule_free(groups, weight_decay):
    from schedulefree import AdamWScheduleFree

    opt = AdamWScheduleFree(groups, weight_decay=weight_decay)
    opt.train()
    return opt


def _dadapt_adam(groups, weight_decay):
    import contextlib
    import io

    from dadaptation import DAdaptAdam

    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using decoupled weight decay" when built
        # bias correction as for Prodigy: without it the step-size estimate overshoots in the first steps
        return DAdaptAdam(groups, weight_decay=weight_decay, decouple=True, use_bias_correction=True)


MORE_OPTIMIZERS = {"Adafactor": _adafactor, "CAME": _came, "AdamWScheduleFree": _schedule_free,
                   "DAdaptAdam": _dadapt_adam}


class use_averaged_weights:
    """``with use_averaged_weights(optimizer):`` the weights a schedule-free optimizer would hand out (its
    running average) are in the model for the block — saving, validation, previews — and training resumes
    on its own iterate after it. Any other optimizer: nothing happens."""

    def __init__(self, optimizer):
        self.switch = optimizer if hasattr(optimizer, "eval") and hasattr(optimizer, "train") else None

    def __enter__(self):
        if self.switch is not None:
            self.switch.eval()
        return self

    def __exit__(self, *exc):
        if self.switch is not None:
            self.switch.train()
        return False


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    restarts: int = 1, power: float = 1.0):
    """The LR schedule ``name`` (diffusers' definitions, and :func:`rex_factor`); ``restarts`` =
    cosine_with_restarts cycles."""
    from diffusers.optimization import get_scheduler

    if name == "rex":  # not in diffusers or transformers: a LambdaLR of the published formula
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: rex_factor(step, warmup_steps, total_steps))
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max(total_steps, 1),
                         num_cycles=restarts, power=power)


def rex_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """The REX schedule (Chen et al. 2021, "REX: Revisiting budgeted training with an improved schedule"):
    a linear warm-up, then (1 − z) / (1 − z/2) of the LR at progress z from 0 to 1 — it stays high longer
    than linear decay and falls faster than cosine at the end."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    z = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return (1 - z) / (1 - z / 2)


def lr_curve(name: str, base_lrs: list[float], warmup_steps: int, total_steps: int, restarts: int = 1,
             power: float = 1.0) -> list[list[float]]:
    """The LR of each param group at every step, without training (for plots)."""
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in base_lrs]
    opt = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, base_lrs)])
    sched = build_scheduler(name, opt, warmup_steps, total_steps, restarts, power)
    out = []
    for _ in range(total_steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


def allow_fp16_gradients(scaler) -> None:
    """Let ``scaler`` (a ``torch.amp.GradScaler``) unscale fp16 gradients: ``training.full_precision_lora=fp16``
    keeps the LoRA's weights, and so their gradients, in fp16 (sd-scripts' ``full_fp16``). torch refuses that
    by default because fp16 gradients can overflow while being unscaled; with loss scaling the scaler sees the
    overflow (inf) and skips the step, which is the caveat the setting's warning states. torch has no public
    switch, so its unscale method is called with ``allow_fp16=True`` (sd-scripts does the same)."""
    unscale = scaler._unscale_grads_

    def unscale_allowing_fp16(optimizer, inv_scale, found_inf, allow_fp16):  # noqa: ARG001 - always allowed
        return unscale(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale_allowing_fp16
