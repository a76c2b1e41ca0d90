"""Notebook 06's experiments on the toy world: runs that differ in one setting, diagnosed side by side.

Each experiment is a config derived from a base config; :func:`run_experiments`
trains each in its own folder (resuming if already done) and diagnoses it.
Conclusions are computed from the measurements (:func:`conclude_*`), never
written in advance.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from lora_nb.config import Config, plan_steps
from lora_nb.dataset import list_images, resolve_data_path, scan_dataset
from lora_nb.diagnose import diagnose_run
from lora_nb.folders import CAPTION_EXTENSIONS, concept_folder_name, find_concept_folders
from lora_nb.train import train
from lora_nb.workspace import Workspace


@dataclass
class Experiment:
    name: str
    what: str  # one line: what differs
    cfg: Config


def small_dataset(src: str | Path, dest: str | Path, n: int, repeats: int) -> Path:
    """Copy the first ``n`` images (with captions) of a kohya dataset into ``dest/<repeats>_<concept>/``."""
    src = resolve_data_path(src)
    found = find_concept_folders(src)
    folder, concept = (found[0][0], found[0][2]) if found else (src, src.name)
    out = Path(dest) / concept_folder_name(repeats, concept)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for img in list_images(folder)[:n]:
        shutil.copy2(img, out / img.name)
        for cap in img.parent.glob(img.stem + ".*"):
            if cap.suffix.lower() in CAPTION_EXTENSIONS:
                shutil.copy2(cap, out / cap.name)
    return Path(dest)


def fit_experiments(base: Config, scratch: str | Path, quick: bool = False) -> list[Experiment]:
    """A deliberately underfit and a deliberately overfit run around ``base`` (the default is the run itself).

    underfit: a tenth of the steps at a tenth of the learning rate;
    overfit: 3 images seen many times at a high learning rate, no caption variety.
    """
    scratch = Path(scratch)
    steps = base.training.max_steps or 0
    lr = base.optimizer.effective_unet_lr
    common = {"sample.every_n_epochs": 0, "save.save_state": False}
    few = small_dataset(base.dataset.dir, scratch / "data-3-images", 3, 1)
    return [
        Experiment("underfit", "1/10 of the learning rate and 1/4 of the epochs",
                   base.with_overrides({**common, "save.output_dir": str(scratch / "underfit"),
                                        "optimizer.learning_rate": lr / 10, "optimizer.unet_lr": lr / 10,
                                        "optimizer.text_encoder_lr": base.optimizer.text_encoder_lr / 10,
                                        "training.epochs": max(1, base.training.epochs // 4),
                                        "save.every_n_epochs": 0, "training.max_steps": steps // 4})),
        Experiment("overfit", "3 images, 4× the steps, 3× the learning rate",
                   base.with_overrides({**common, "save.output_dir": str(scratch / "overfit"),
                                        "dataset.dir": str(few), "dataset.repeats": 1, "dataset.reg_dir": "",
                                        "training.batch_size": 3,
                                        "training.max_steps": (steps or base_steps(base)) * 4,
                                        "training.epochs": 10_000,
                                        "optimizer.learning_rate": lr * 3, "optimizer.unet_lr": lr * 3,
                                        "optimizer.text_encoder_lr": base.optimizer.text_encoder_lr * 3,
                                        "save.every_n_epochs": 0})),
    ]


def base_steps(cfg: Config) -> int:
    """Total steps ``cfg`` trains (from the dataset on disk)."""
    scan = scan_dataset(cfg.dataset.dir, cfg.dataset.caption_extension, cfg.dataset.repeats, cfg.dataset.trigger_word)
    return plan_steps(scan.folders, cfg.training.batch_size, cfg.training.epochs, 0, bool(cfg.dataset.reg_dir),
                      cfg.training.max_steps).total_steps


def folk_experiments(base: Config, scratch: str | Path, reg_dir: str | None) -> dict[str, list[Experiment]]:
    """Runs that test the course's folk claims, each differing from ``base`` in one respect."""
    scratch = Path(scratch)
    r, a = base.network.rank, base.network.alpha
    lr = base.optimizer.effective_unet_lr
    common = {"sample.every_n_epochs": 0, "save.save_state": False, "save.every_n_epochs": 0}
    total = base_steps(base)

    def exp(name, what, **over):
        return Experiment(name, what, base.with_overrides({**common, "save.output_dir": str(scratch / name), **over}))

    claims = {
        "alpha": [
            exp("alpha-x1", f"alpha {a:g} (rank {r})"),
            exp("alpha-x4", f"alpha {a * 4:g}: 4× alpha at the same rank", **{"network.alpha": a * 4}),
            exp("lr-x4", f"alpha {a:g}, 4× the learning rate",
                **{"optimizer.learning_rate": lr * 4, "optimizer.unet_lr": lr * 4,
                   "optimizer.text_encoder_lr": base.optimizer.text_encoder_lr * 4}),
        ],
        "repeats": [
            exp("repeats-high", f"repeats {base.dataset.repeats or 10}, {base.training.epochs} epochs"),
            exp("repeats-low", "half the repeats, twice the epochs (same steps)",
                **{"dataset.repeats": max(1, (base.dataset.repeats or 10) // 2),
                   "training.epochs": base.training.epochs * 2, "training.max_steps": total}),
            exp("steps-half", "half the steps",
                **{"training.epochs": max(1, base.training.epochs // 2), "training.max_steps": max(1, total // 2)}),
        ],
    }
    if reg_dir:
        weight = base.dataset.prior_loss_weight if base.dataset.reg_dir else 1.0
        claims["regularization"] = [
            exp("no-reg", "no regularization images", **{"dataset.reg_dir": ""}),
            exp("with-reg", f"with regularization images (prior loss weight {weight:g})",
                **{"dataset.reg_dir": str(reg_dir), "dataset.prior_loss_weight": weight}),
        ]
    return claims


def run_experiment(exp: Experiment, seeds: list[int], steps: int = 20, model=None) -> dict:
    """Train (or reuse a finished run of) ``exp`` and diagnose its final file only."""
    out = Path(exp.cfg.save.output_dir)
    final = Workspace(out).lora_file(exp.cfg.save.output_name)
    if not final.exists():
        result = train(exp.cfg, progress=False, resume=False)
        seconds = result.seconds
    else:
        seconds = None
    diagnosis = diagnose_run(out, seeds=seeds, steps=steps, write=True, progress=False, only_final=True)
    diagnosis["train_seconds"] = seconds
    diagnosis["name"], diagnosis["what"] = exp.name, exp.what
    return diagnosis


def final_measures(diagnosis: dict, run_verdict: bool = False) -> dict:
    """The last epoch's image measures, with its verdict (or, with ``run_verdict``, the whole run's)."""
    e = diagnosis["epochs"][-1]
    return {"verdict": diagnosis["verdict"] if run_verdict else e["verdict"],
            **{k: e["images"].get(k) for k in ("fidelity", "generalisation", "memorization", "leakage")}}


def _close(a: float, b: float, tol: float) -> bool:
    return abs(a - b) <= tol


def conclude_alpha(results: dict[str, dict], tol: float = 0.15) -> str:
    """What the alpha runs showed, in words derived from the numbers."""
    x1, x4, lr4 = (final_measures(results[k]) for k in ("alpha-x1", "alpha-x4", "lr-x4"))
    like_lr = _close(x4["fidelity"], lr4["fidelity"], tol) and _close(x4["leakage"] or 0, lr4["leakage"] or 0, tol)
    stronger = x4["fidelity"] > x1["fidelity"] + tol or (x4["leakage"] or 0) > (x1["leakage"] or 0) + tol
    weaker = x4["fidelity"] < x1["fidelity"] - tol
    parts = [f"4× alpha: fidelity {x1['fidelity']:.0%} → {x4['fidelity']:.0%}, leakage "
             f"{(x1['leakage'] or 0):.0%} → {(x4['leakage'] or 0):.0%}; 4× LR instead: fidelity {lr4['fidelity']:.0%}, "
             f"leakage {(lr4['leakage'] or 0):.0%}."]
    if stronger and like_lr:
        parts.append("Raising alpha made the LoRA learn *more*, much like raising the learning rate: "
                     "it did not reduce overfitting here.")
    elif stronger:
        parts.append("Raising alpha made the LoRA learn more, though not exactly like the 4× learning rate.")
    elif weaker:
        parts.append("Raising alpha made the LoRA learn less here, as the folk claim says.")
    else:
        parts.append("Within the measurement noise, raising alpha changed little at this setting.")
    if x4["verdict"] != x1["verdict"]:
        parts.append(f"Verdict: {x1['verdict']} → {x4['verdict']}.")
    return " ".join(parts)


def conclude_repeats(results: dict[str, dict], tol: float = 0.15) -> str:
    high, low, half = (final_measures(results[k]) for k in ("repeats-high", "repeats-low", "steps-half"))
    same = _close(high["fidelity"], low["fidelity"], tol) and _close(high["memorization"], low["memorization"], 0.05)
    text = (f"Same total steps split as repeats×epochs two ways: fidelity {high['fidelity']:.0%} vs {low['fidelity']:.0%}, "
            f"memorization {high['memorization']:.2f} vs {low['memorization']:.2f}. Half the steps: fidelity "
            f"{half['fidelity']:.0%}. ")
    if same:
        text += ("Lowering repeats while raising epochs changed nothing measurable: what matters is the total number "
                 "of steps (repeats only decide how often files are saved and the schedule's shape). ")
    else:
        text += "The split between repeats and epochs did change the result here (beyond the noise tolerance). "
    if half["fidelity"] < high["fidelity"] - tol:
        text += "Fewer steps learned less: fewer epochs is the lever, not the repeats/epochs split."
    return text


def conclude_regularization(results: dict[str, dict], tol: float = 0.1) -> str:
    no, yes = final_measures(results["no-reg"]), final_measures(results["with-reg"])
    text = (f"Leakage without the trigger word: {(no['leakage'] or 0):.0%} → {(yes['leakage'] or 0):.0%} with "
            f"regularization images; memorization {no['memorization']:.2f} → {yes['memorization']:.2f}; fidelity "
            f"{no['fidelity']:.0%} → {yes['fidelity']:.0%}. ")
    if (yes["leakage"] or 0) < (no["leakage"] or 0) - tol:
        text += "Regularization images reduced leakage"
        text += (", at the cost of slower learning." if yes["fidelity"] < no["fidelity"] - tol else ".")
    elif (no["leakage"] or 0) <= tol:
        text += "This run did not leak to begin with, so there was little for regularization to fix."
    else:
        text += "Regularization images did not reduce leakage measurably here."
    return text


CLAIM_JUDGES = {"alpha": conclude_alpha, "repeats": conclude_repeats, "regularization": conclude_regularization}


def run_folk_claims(base: Config, scratch: str | Path, reg_dir: str | None, seeds: list[int], steps: int = 20,
                    quick: bool = False) -> dict[str, str]:
    """Train every folk-claim experiment and say, per claim, what the measurements showed.

    ``quick`` keeps the alpha and regularization claims only.
    """
    claims = folk_experiments(base, scratch, reg_dir)
    if quick:
        claims = {k: v for k, v in claims.items() if k in ("alpha", "regularization")}
    conclusions = {}
    for claim, runs in claims.items():
        results = {exp.name: run_experiment(exp, seeds=seeds, steps=steps) for exp in runs}
        conclusions[claim] = CLAIM_JUDGES[claim](results)
    return conclusions
