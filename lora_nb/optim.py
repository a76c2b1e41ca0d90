"""Optimizers and learning-rate schedules by the names the course uses."""

from __future__ import annotations

import torch

from lora_nb import LoraNbError


def build_optimizer(name: str, param_groups: list[dict], weight_decay: float = 0.01) -> torch.optim.Optimizer:
    """Build optimizer ``name`` over ``param_groups`` (each with its own ``lr``).

    AdamW8bit / Lion8bit come from bitsandbytes (≥ 0.50 runs them on CPU too);
    Lion from lion-pytorch; Prodigy from prodigyopt (set LRs to 1).
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
    raise LoraNbError(f"optimizer.optimizer={name!r} is unknown: use AdamW, AdamW8bit, Lion, Lion8bit, Prodigy or SGD.")


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
