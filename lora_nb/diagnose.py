"""Over- and underfitting, diagnosed by measurement (concepts C26–C28).

For a trained workspace this gathers two kinds of evidence per saved epoch:

- **loss**: the smoothed training loss and the fixed-noise validation loss
  (same held-out images, noise and timesteps every time), their gap, the epoch
  with the best validation loss;
- **images**, generated at fixed seeds with each saved LoRA file:
  *fidelity* (the subject appears with the trigger word), *generalisation*
  (it follows prompts that put it in other colours/backgrounds), *memorization*
  (generations copy a training image, appearance and placement), *leakage*
  (the subject appears without the trigger word).

On the toy world the image measures come from the toy judge, which knows the
truth. On real models they are the field's embedding measures (docs/diagnosis.md):
DINO and CLIP-I similarity to the training images, CLIP-T similarity to the prompt
(:mod:`lora_nb.embedders`), each mapped onto the same 0–1 fields the verdict reads.
When DINO or CLIP cannot be loaded, they fall back to generic image similarity
(small blurred-image correlation), labelled approximate with the reason.

A verdict per epoch (underfit / good / overfit) follows from thresholds that
are arguments, with the numbers behind it, the recommended file, and the
remedies that apply, each mapped to the setting it changes.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from lora_nb import LoraNbError
from lora_nb.config import Config, parse_resolution
from lora_nb.dataset import Item, load_training_image, scan_dataset
from lora_nb.embedders import DEFAULT_CLIP, DEFAULT_DINO, cosine_matrix, embed_images, embed_texts, find_embedders
from lora_nb.fsutil import write_text_atomic
from lora_nb.lora_io import load_lora
from lora_nb.models import load_model_for, toy_model_dir
from lora_nb.steps import encode_prompts, fixed_noise_loss, latents_of, prepare_samples
from lora_nb.toy import judge, quality
from lora_nb.toy.world import COLOURS
from lora_nb.workspace import Workspace


@dataclass
class Thresholds:
    """Where the verdicts change. Shares are 0–1.

    On real models (DINO + CLIP, docs/diagnosis.md) the same numbers read: fidelity and leakage are shares of
    generations whose mean DINO similarity to the training images reaches ``subject_dino`` × the training
    images' similarity to one another; memorization is the mean nearest-training-image DINO similarity;
    generalisation is CLIP-T relative to the base model's (1.0 = as prompt-faithful as the base), so
    ``generalisation_drop`` 0.25 is CLIP-T falling a quarter below the base model's.
    """

    fidelity_min: float = 0.5  # below: the subject is missing too often → underfit
    memorization_max: float = 0.93  # mean nearest-training-image similarity above this → copying → overfit
    generalisation_drop: float = 0.25  # prompt adherence falling this far below the base model → overfit
    leakage_max: float = 0.25  # subject appearing without the trigger word this often → overfit
    val_rise: float = 0.10  # validation loss this much (relative) above its best → overfit sign
    # real models: a generation shows the subject when its mean DINO similarity to the training images reaches
    # this share of theirs to one another (DreamBooth 0.863 of it, textual inversion 0.735: Ruiz et al. 2023)
    subject_dino: float = 0.8


REMEDIES = {
    "underfit": [
        ("raise the learning rate", "optimizer.unet_lr", "×2"),
        ("train more epochs", "training.epochs", "+50%"),
        ("raise repeats", "dataset.repeats", "+50%"),
        ("higher rank, or lower alpha relative to it", "network.rank", "×2"),
        ("weaker regularization (lower prior loss weight, fewer class images)", "dataset.prior_loss_weight", "÷2"),
        ("more, better data (clear, varied images of the subject)", "dataset.dir", "add images"),
    ],
    "overfit": [
        ("use an earlier saved epoch", "save.every_n_epochs", "pick the recommended file"),
        ("lower the learning rate", "optimizer.unet_lr", "÷2"),
        ("fewer epochs", "training.epochs", "−30%"),
        ("lower repeats", "dataset.repeats", "−30%"),
        ("lower rank (or alpha)", "network.rank", "÷2"),
        ("add regularization images of the class", "dataset.reg_dir", "10–20 class images"),
        ("more varied data", "dataset.dir", "add images"),
    ],
    "good": [],
}


# --------------------------------------------------------------------------- loss evidence

def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def loss_evidence(records: list[dict]) -> dict:
    """Per-epoch training and validation loss, the best validation epoch, the trend of the training loss."""
    epochs = {r["epoch"]: r for r in records if "train_loss" in r}
    per_epoch = {e: {"train_loss": r.get("train_loss"), "val_loss": r.get("val_loss")} for e, r in sorted(epochs.items())}
    vals = {e: v["val_loss"] for e, v in per_epoch.items() if v["val_loss"] is not None}
    best = min(vals, key=vals.get) if vals else None
    losses = [r["loss"] for r in records if "loss" in r]
    slope = None
    if len(losses) >= 4:
        x = np.arange(len(losses))
        slope = float(np.polyfit(x, losses, 1)[0] * len(losses))  # change over the whole run
    for e, v in per_epoch.items():
        if v["val_loss"] is not None and v["train_loss"] is not None:
            v["gap"] = v["val_loss"] - v["train_loss"]
    return {"epochs": per_epoch, "best_val_epoch": best, "best_val_loss": vals.get(best) if best else None,
            "train_trend": slope}


# --------------------------------------------------------------------------- image evidence

def epoch_of_file(path: Path, final_epoch: int) -> int:
    m = re.search(r"-e(\d+)\.safetensors$", path.name)
    return int(m.group(1)) if m else final_epoch


def lora_files(lora_dir: Path, output_name: str) -> list[Path]:
    """The kohya files of one run, in epoch order (the final file last)."""
    files = sorted(lora_dir.glob(f"{output_name}-e*.safetensors"))
    final = lora_dir / f"{output_name}.safetensors"
    return files + ([final] if final.exists() else [])


EXAMPLES = 6  # generations kept per measured file (first seed), to show what the numbers describe


def toy_image_evidence(pipe, training_images: list[np.ndarray], seeds: list[int], steps: int = 20,
                       strength: float = 1.0, prompts: int = 12) -> dict:
    """Fidelity, generalisation, memorization, leakage of what ``pipe`` draws now (toy judge).

    ``prompts`` of the 24 colour × background concept prompts are used (spread evenly),
    each with and without the trigger word, at every seed.
    """


    def spread(items: list[str]) -> list[str]:  # a checkerboard over colour × background: every colour appears
        picked = [p for i, p in enumerate(items) if (i + i // len(COLOURS)) % 2 == 0]
        return (picked + [p for p in items if p not in picked])[:prompts]

    with_trigger = spread(quality.concept_prompts(True))
    without = spread(quality.concept_prompts(False))
    kwargs = {"cross_attention_kwargs": {"scale": strength}} if strength != 1.0 else {}
    on = quality.measure_generations(pipe, with_trigger, seeds, steps=steps, keep_images=True, **kwargs)
    off = quality.measure_generations(pipe, without, seeds, steps=steps, **kwargs)
    mem = [judge.memorization_score(r["image"], training_images)["score"] for r in on["records"] if r["got"]["zorb"]]
    adherence = np.mean([v for v in (on["colour"], on["background"]) if v is not None])
    pairs = sum(r["got"]["zorb"] and not r["got"]["eyes_merged"] for r in on["records"])
    return {
        "fidelity": on["zorb"],
        "two_eyes": pairs / max(1, on["n"]),  # the zorbs a learner sees with two eyes (apart or touching), not one band
        "generalisation": float(adherence),
        "colour": on["colour"], "background": on["background"],
        "memorization": float(np.mean(mem)) if mem else 0.0,
        "memorization_max": float(np.max(mem)) if mem else 0.0,
        "leakage": off["zorb"],
        "n_images": on["n"] + off["n"],
        "approximate": False, "measures": "toy judge",
        "examples": [(r["prompt"], r["image"]) for r in on["records"] if r["seed"] == seeds[0]][:EXAMPLES],
    }


def generic_image_evidence(pipe, training_images: list[np.ndarray], prompts: list[str], trigger: str,
                           seeds: list[int], size: tuple[int, int], steps: int = 20, base: dict | None = None) -> dict:
    """Approximate measures for real models: similarity of generations to the training images (small blurred
    images compared by correlation), each read against the base model's (``base``; None for the base itself).

    fidelity ≈ how much closer generations *with* the trigger are to the training set than the base model's
    were, × 4 (0 when the trigger changes nothing, so a LoRA that learned nothing reads as underfit);
    memorization = mean nearest-image similarity; leakage ≈ how much closer generations *without* the trigger
    came to the training set than the base model's, × 4. Generalisation is not measured (None): look at the
    sample grid.
    """

    bare = [strip_trigger(p, trigger) for p in prompts]
    on = [img for _, _, img in quality.generate(pipe, prompts, seeds, steps=steps, size=size)]
    off = [img for _, _, img in quality.generate(pipe, bare, seeds, steps=steps, size=size)]
    scores_on = [judge.memorization_score(i, training_images)["score"] for i in on]
    sim_on = float(np.mean(scores_on))
    sim_off = float(np.mean([judge.memorization_score(i, training_images)["score"] for i in off]))
    base_on, base_off = (base["similarity_on"], base["similarity_off"]) if base else (sim_on, sim_off)
    return {
        "fidelity": float(np.clip((sim_on - base_on) * APPROX_SCALE, 0, 1)),
        "generalisation": None,
        "memorization": sim_on,
        "memorization_max": float(np.max(scores_on)),
        "leakage": float(np.clip((sim_off - base_off) * APPROX_SCALE, 0, 1)) if trigger else None,
        "similarity_on": sim_on, "similarity_off": sim_off,
        "n_images": len(on) + len(off),
        "approximate": True, "measures": "approximate",
        "examples": list(zip(prompts * len(seeds), on))[:EXAMPLES],
    }


# the approximation's gain: a mean similarity 0.125 closer to the training images than the base model's reads
# as 0.5, the fidelity threshold. A convention, not a calibration: the DINO measures replace it when available.
APPROX_SCALE = 4.0


def strip_trigger(prompt: str, trigger: str) -> str:
    """``prompt`` without the trigger word (and its comma): what the prompt asks for in words CLIP knows."""
    if not trigger:
        return prompt
    return re.sub(rf"\b{re.escape(trigger)}\b,?\s*", "", prompt).strip(" ,") or "a photo"


# Prompt variations for CLIP-T: a setting or a style added to the run's own prompts, as DreamBench does
PROMPT_VARIATIONS = ("on a beach", "in a snowy forest", "as an oil painting")


def vary_prompts(prompts: list[str], variations: tuple[str, ...] = PROMPT_VARIATIONS) -> list[str]:
    """The run's prompts, then each variation added to one of them in turn."""
    return list(prompts) + [f"{prompts[i % len(prompts)]}, {v}" for i, v in enumerate(variations)]


# DreamBooth (Ruiz et al. 2023, Table 1) on Stable Diffusion: DINO 0.668, CLIP-I 0.803, CLIP-T 0.305;
# textual inversion 0.569 / 0.780 / 0.255; real images of the subject among themselves DINO 0.774, CLIP-I 0.885.
DREAMBOOTH_SD = {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305}


def reference_embeddings(embedders, training_images: list[np.ndarray]) -> dict:
    """The training images' DINO and CLIP embeddings, and their mean DINO similarity to one another
    (1.0 for a single image): the ceiling a generation of the subject is measured against."""
    if not training_images:
        raise LoraNbError("The diagnosis needs at least one training image: dataset.dir holds none.")
    dino = embed_images(embedders, training_images, "dino")
    sims = cosine_matrix(dino, dino)
    n = len(training_images)
    self_sim = float((sims.sum() - np.trace(sims)) / (n * (n - 1))) if n > 1 else 1.0
    return {"dino": dino, "clip": embed_images(embedders, training_images, "clip"), "dino_self": self_sim}


def embedding_image_evidence(pipe, embedders, reference: dict, prompts: list[str], trigger: str, seeds: list[int],
                             size: tuple[int, int], steps: int = 20, base: dict | None = None,
                             t: Thresholds = Thresholds()) -> dict:
    """The field's measures for real models (docs/diagnosis.md) of what ``pipe`` draws now: ``prompts`` (with
    the trigger word) at every seed, and again without the trigger word, measured by :func:`embedding_measures`."""
    texts = [strip_trigger(p, trigger) for p in prompts]
    on = [img for _, _, img in quality.generate(pipe, prompts, seeds, steps=steps, size=size)]
    off = [img for _, _, img in quality.generate(pipe, texts, seeds, steps=steps, size=size)] if trigger else []
    return {**embedding_measures(embedders, reference, on, [texts[i % len(texts)] for i in range(len(on))], off,
                                 base, t),
            "examples": list(zip(prompts * len(seeds), on))[:EXAMPLES]}


def embedding_measures(embedders, reference: dict, on: list[np.ndarray], texts: list[str], off: list[np.ndarray],
                       base: dict | None = None, t: Thresholds = Thresholds()) -> dict:
    """DINO, CLIP-I and CLIP-T of generations, on the 0–1 fields the verdict reads.

    ``on``: generations with the trigger word, ``texts[i]`` the prompt of ``on[i]`` without it; ``off``:
    generations without the trigger word (empty when the run has none). fidelity = share of ``on`` whose mean
    DINO similarity to the training images reaches ``t.subject_dino`` × the training images' similarity to one
    another; memorization = mean (and max) nearest-training-image DINO similarity of ``on``; generalisation =
    CLIP-T relative to ``base``'s; leakage = share of ``off`` showing the subject, above the base model's share.
    ``base`` None: these are the base model's own generations (generalisation 1, leakage 0).
    """
    present_min = t.subject_dino * reference["dino_self"]
    dino_on = cosine_matrix(embed_images(embedders, on, "dino"), reference["dino"])
    clip_on = embed_images(embedders, on, "clip")
    clip_t = float(np.mean(np.sum(clip_on.numpy() * embed_texts(embedders, texts).numpy(), axis=1)))
    nearest = dino_on.max(axis=1)
    dino_off = cosine_matrix(embed_images(embedders, off, "dino"), reference["dino"]).mean(axis=1) if off else None
    shown_off = float(np.mean(dino_off >= present_min)) if off else None
    leakage = None
    if off:
        leakage = max(0.0, shown_off - (base.get("subject_without_trigger") or 0.0)) if base else 0.0
    return {
        "fidelity": float(np.mean(dino_on.mean(axis=1) >= present_min)),
        "generalisation": clip_t / base["clip_t"] if base else 1.0,
        "memorization": float(np.mean(nearest)), "memorization_max": float(np.max(nearest)),
        "leakage": leakage, "n_images": len(on) + len(off), "approximate": False, "measures": "dino+clip",
        "dino": float(np.mean(dino_on)), "clip_i": float(np.mean(cosine_matrix(clip_on, reference["clip"]))),
        "clip_t": clip_t,
        "dino_without_trigger": float(np.mean(dino_off)) if off else None, "subject_without_trigger": shown_off,
        "dino_training": reference["dino_self"], "dino_subject_min": present_min,
    }


# --------------------------------------------------------------------------- verdicts

def verdict(images: dict, base: dict | None, val: dict | None, t: Thresholds = Thresholds(),
            leak_settles: bool = False) -> tuple[str, list[str]]:
    """underfit / good / overfit for one epoch, with the reasons (numbers included).

    ``leak_settles``: a later epoch of the same run leaks less than ``t.leakage_max``. Leakage that later training
    removes is the subject not yet tied to its trigger word (early in a run the LoRA changes the whole class),
    so it counts as underfit; leakage that stays to the end is overfitting."""
    over, under = [], []
    if images["fidelity"] < t.fidelity_min:
        under.append(f"the subject appears in {images['fidelity']:.0%} of trigger-word images (< {t.fidelity_min:.0%})")
    if images["memorization"] > t.memorization_max:
        over.append(f"generations copy training images (similarity {images['memorization']:.2f} > {t.memorization_max})")
    if images.get("generalisation") is not None and base and base.get("generalisation") is not None:
        drop = base["generalisation"] - images["generalisation"]
        if drop > t.generalisation_drop:
            over.append(f"prompt adherence fell from {base['generalisation']:.0%} to {images['generalisation']:.0%}")
    if images.get("leakage") is not None and images["leakage"] > t.leakage_max:
        leak = f"the subject leaks into {images['leakage']:.0%} of images without the trigger word"
        if leak_settles:
            under.append(f"not yet tied to the trigger word: {leak}, and later epochs stop it")
        else:
            over.append(leak)
    if val and val.get("rise") is not None and val["rise"] > t.val_rise and val.get("after_best", True):
        over.append(f"validation loss {val['rise']:.0%} above its best (epoch {val['best_epoch']})")
    if over and (not under or len(over) >= len(under)):
        return "overfit", over + under
    if under:
        return "underfit", under + over
    return "good", [f"subject in {images['fidelity']:.0%} of trigger images, leakage "
                    f"{(images.get('leakage') or 0):.0%}, memorization {images['memorization']:.2f}"]


def recommend(epochs: list[dict]) -> dict | None:
    """The epoch to use: the best-scoring 'good' one; otherwise the least underfit before any overfit."""
    if not epochs:
        return None
    good = [e for e in epochs if e["verdict"] == "good"]
    pool = good or [e for e in epochs if e["verdict"] == "underfit"] or epochs
    score = lambda e: e["images"]["fidelity"] - (e["images"].get("leakage") or 0) - max(0, e["images"]["memorization"] - 0.8)
    return max(pool, key=score)


def overall_verdict(epochs: list[dict], chosen: dict | None) -> str:
    """The run's verdict: 'good' when a good epoch exists; else what the final epoch shows."""
    if chosen is not None and chosen["verdict"] == "good":
        return "good"
    return epochs[-1]["verdict"] if epochs else "unknown"


# --------------------------------------------------------------------------- the whole run

def load_training_images(cfg, limit: int = 64) -> list[np.ndarray]:

    size = parse_resolution(cfg.dataset.resolution)
    items = scan_dataset(cfg.dataset.dir, cfg.dataset.caption_extension, cfg.dataset.repeats,
                         cfg.dataset.trigger_word).items[:limit]
    return [((load_training_image(i.image, size)[0].transpose(1, 2, 0) + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
            for i in items]


def is_toy(cfg) -> bool:

    src = str(cfg.model.source)
    return src == "toy" or (Path(src) / "toy_build.json").exists() or \
        (Path(src).exists() and Path(src).resolve() == toy_model_dir().resolve())


def grid_judge(cfg):
    """The function that writes a verdict under each image of a grid for this run's model: the toy judge's
    (:func:`lora_nb.toy.quality.judge_label`) on the toy model; None for real models (no judge knows the truth)."""
    return quality.judge_label if is_toy(cfg) else None


def image_measures(cfg, pipe, seeds: list[int], steps: int, thresholds: Thresholds, dino: str, clip: str):
    """``(measure, how, reason)``: ``measure(pipe, base)`` gives one file's image evidence (``base`` None for
    the base model itself); ``how`` is "toy judge", "dino+clip" or "approximate"; ``reason`` says why the
    measures are approximate (None when they are not)."""
    training = load_training_images(cfg)
    size = parse_resolution(cfg.dataset.resolution)
    trigger = cfg.dataset.trigger_word
    prompts = [re.split(r"\s--", p)[0] for p in cfg.sample.prompts] or [trigger or "a photo"]
    if is_toy(cfg):
        return (lambda p, base: toy_image_evidence(p, training, seeds, steps)), "toy judge", None
    embedders, reason = find_embedders(dino, clip, pipe.device)
    if embedders is None:
        reason = f"{reason}; measures are the approximation"

        def approximate(p, base):
            return {**generic_image_evidence(p, training, prompts, trigger, seeds, size, steps, base),
                    "approximate_reason": reason}

        return approximate, "approximate", reason
    reference = reference_embeddings(embedders, training)
    varied = vary_prompts(prompts)
    return (lambda p, base: embedding_image_evidence(p, embedders, reference, varied, trigger, seeds, size, steps,
                                                     base, thresholds)), "dino+clip", None


def diagnose_run(workspace: str | Path, seeds: list[int] | None = None, steps: int = 20,
                 thresholds: Thresholds = Thresholds(), write: bool = True, progress: bool = True,
                 only_final: bool = False, dino: str = DEFAULT_DINO, clip: str = DEFAULT_CLIP) -> dict:
    """Measure every saved epoch of the run in ``workspace`` (or its final file only) and
    return (and write) ``diagnosis.json``. On real models ``dino`` and ``clip`` name the embedders
    (hub ids or local folders, :mod:`lora_nb.embedders`); without them the measures are approximate."""
    from tqdm.auto import tqdm


    ws = Workspace(Path(workspace))
    cfg_path = ws.train_config if ws.train_config.exists() else ws.config
    if not cfg_path.exists():
        raise LoraNbError(f"{ws.root} holds no trained run (no {ws.train_config.name}): run notebook 05 or "
                          "`lora-nb train` first.")
    cfg = Config.load(cfg_path)
    files = lora_files(ws.lora, cfg.save.output_name)
    if not files:
        raise LoraNbError(f"No LoRA files in {ws.lora}: training has not saved anything yet.")
    if only_final:
        files = files[-1:]
    seeds = list(seeds or [0, 1])
    records = read_metrics(ws.metrics)
    losses = loss_evidence(records)
    final_epoch = max(losses["epochs"]) if losses["epochs"] else cfg.training.epochs
    toy = is_toy(cfg)
    model = load_model_for(cfg)
    model.pipe.set_progress_bar_config(disable=True)
    measure, how, reason = image_measures(cfg, model.pipe, seeds, steps, thresholds, dino, clip)
    base = measure(model.pipe, None)
    epochs = []
    for path in tqdm(files, desc="Measuring saved epochs", disable=not progress):
        epoch = epoch_of_file(path, final_epoch)
        load_lora(model.pipe, path, adapter_name="diagnose")
        images = measure(model.pipe, base)
        val = None
        vloss = losses["epochs"].get(epoch, {}).get("val_loss")
        if vloss is not None and losses["best_val_loss"]:
            val = {"val_loss": vloss, "best_epoch": losses["best_val_epoch"],
                   "rise": (vloss - losses["best_val_loss"]) / losses["best_val_loss"],
                   "after_best": epoch > losses["best_val_epoch"]}  # above the best *before* it = still learning
        epochs.append({"epoch": epoch, "file": str(path), "images": {k: v for k, v in images.items() if k != "examples"},
                       "validation": val, "examples": images["examples"]})
    for i, e in enumerate(epochs):
        settles = any((later["images"].get("leakage") or 0) <= thresholds.leakage_max for later in epochs[i + 1:])
        e["verdict"], e["reasons"] = verdict(e["images"], base, e["validation"], thresholds, settles)
    chosen = recommend(epochs)
    run_verdict = overall_verdict(epochs, chosen)
    result = {
        "workspace": str(ws.root), "toy_judge": toy, "approximate": how == "approximate", "measures": how,
        "approximate_reason": reason,
        "embedders": {"dino": str(dino), "clip": str(clip)} if how == "dino+clip" else None,
        "seeds": seeds,
        "thresholds": asdict(thresholds), "loss": losses,
        "base": {k: v for k, v in base.items() if k != "examples"},
        "epochs": [{k: v for k, v in e.items() if k != "examples"} for e in epochs],
        "verdict": run_verdict,
        "recommended": {"epoch": chosen["epoch"], "file": chosen["file"]} if chosen else None,
        "remedies": [{"remedy": r, "setting": s, "change": c} for r, s, c in REMEDIES.get(run_verdict, [])],
    }
    if write:
        write_text_atomic(ws.diagnosis, json.dumps(result, indent=2))
    result["_examples"] = {e["epoch"]: e["examples"] for e in epochs}
    return result


def diagnose_workspace(workspace: str | Path, **kwargs) -> dict:
    """``lora-nb diagnose``: :func:`diagnose_run` without the in-memory example images."""
    result = diagnose_run(workspace, **kwargs)
    result.pop("_examples", None)
    return result


def loss_versus_judge(result: dict) -> str:
    """What the validation loss said against what the judge saw: its best epoch next to the recommended one,
    and the lesson this run supports (computed from the numbers, not written in advance)."""
    loss, rec = result["loss"], result["recommended"]
    if loss.get("best_val_epoch") is None:
        return ("No validation loss in this run: set dataset.validation_dir (or validation_split) to get the one "
                "loss curve that compares across epochs.")
    vals = {e: v["val_loss"] for e, v in loss["epochs"].items() if v.get("val_loss") is not None}
    best, first, last = loss["best_val_epoch"], vals[min(vals)], vals[max(vals)]
    lowest = vals[best]
    text = (f"Validation loss: {first:.4f} after epoch {min(vals)}, lowest {lowest:.4f} at epoch {best}, "
            f"{last:.4f} at the end ({(last - lowest) / lowest:+.1%} from its lowest).")
    if rec is None:
        return text
    judged = int(rec["epoch"])
    fid = {e["epoch"]: e["images"]["fidelity"] for e in result["epochs"]}
    text += f" The judge recommends epoch {judged} (the subject in {fid[judged]:.0%} of trigger-word images)."
    at_judged = vals.get(judged)
    if best == judged:
        text += " Both point to the same epoch: here the loss curve and the images agree."
    elif at_judged is not None and (at_judged - lowest) / lowest <= 0.05:
        text += (f" At epoch {judged} the validation loss is {(at_judged - lowest) / lowest:.1%} above its lowest: "
                 f"the curve is flat from there on, so the loss cannot tell epochs {min(best, judged)}–"
                 f"{max(best, judged)} apart, while the images still changed. Read the loss for the trend (is it "
                 "still falling? turning up?), the images for the choice.")
    else:
        apart = abs(best - judged)
        text += (f" They disagree by {apart} epoch{'s' if apart != 1 else ''}: the loss scores every pixel's noise, the judge "
                 "what a viewer sees; when they differ, trust the images.")
    return text


def format_diagnosis(result: dict) -> str:
    """The diagnosis as text: how it was measured (the reason when approximate), the base model, every epoch
    with its verdict and reasons (and DINO / CLIP-I / CLIP-T where measured), the file to use, the remedies."""
    how = result.get("measures", "toy judge" if result.get("toy_judge") else "approximate")
    header = {"toy judge": " (toy judge)", "dino+clip": " (DINO + CLIP measures)"}
    lines = [f"Diagnosis of {result['workspace']}" + header.get(how, " (approximate measures: no judge for this model)")]
    if result.get("approximate_reason"):
        lines.append(f"  {result['approximate_reason']}")
    b = result["base"]
    per = b.get("n_images", 0) // 2
    lines.append(f"  each measure below: {per} generations with the trigger word and {per} without, seeds "
                 f"{result['seeds']}; a share of {per} images is uncertain by about "
                 f"±{(0.25 / max(per, 1)) ** 0.5:.0%} (one standard error at 50%), and other seeds can differ more")
    if how == "dino+clip":
        lines += describe_embedding_measures(result)
    lines.append(f"  base model:  fidelity {b['fidelity']:.0%}  leakage {_pct(b.get('leakage'))}  "
                 f"adherence {_pct(b.get('generalisation'))}" + _embedding_figures(b))
    for e in result["epochs"]:
        im = e["images"]
        val = e["validation"]["val_loss"] if e.get("validation") else None
        two = f" (two eyes {im['two_eyes']:.0%})" if im.get("two_eyes") is not None else ""
        lines.append(f"  epoch {e['epoch']:>3}: {e['verdict']:<8} fidelity {im['fidelity']:.0%}{two}  "
                     f"adherence {_pct(im.get('generalisation'))}  memorization {im['memorization']:.2f}  "
                     f"leakage {_pct(im.get('leakage'))}" + (f"  val loss {val:.4f}" if val is not None else "")
                     + _embedding_figures(im))
        for r in e["reasons"]:
            lines.append(f"             - {r}")
    lines.append(f"Verdict: {result['verdict']}")
    if result["recommended"]:
        lines.append(f"Use: epoch {result['recommended']['epoch']} → {result['recommended']['file']}")
    for r in result["remedies"]:
        lines.append(f"  remedy: {r['remedy']}  ({r['setting']}: {r['change']})")
    return "\n".join(lines)


def describe_embedding_measures(result: dict) -> list[str]:
    """How the DINO + CLIP figures map onto the fields, with DreamBooth's published values to read them by."""
    b, emb, t = result["base"], result.get("embedders") or {}, result.get("thresholds", {})
    ref = DREAMBOOTH_SD
    return [
        f"  DINO {emb.get('dino', '?')}, CLIP {emb.get('clip', '?')}: fidelity / leakage = share of generations "
        f"with mean DINO similarity ≥ {b['dino_subject_min']:.2f} ({t.get('subject_dino', 0.8):g} × the training "
        f"images' {b['dino_training']:.2f} to one another); adherence = CLIP-T relative to the base model's; "
        "memorization = mean nearest-training-image DINO similarity",
        f"  DreamBooth on Stable Diffusion (Ruiz et al. 2023): DINO {ref['dino']}, CLIP-I {ref['clip_i']}, "
        f"CLIP-T {ref['clip_t']}",
    ]


def _embedding_figures(images: dict) -> str:
    if images.get("dino") is None:
        return ""
    return f"\n{'':13}DINO {images['dino']:.3f}  CLIP-I {images['clip_i']:.3f}  CLIP-T {images['clip_t']:.3f}"


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.0%}"


def fine_tune_comparison(model, lora_file: str | Path, train_seconds: float | None) -> list[dict]:
    """C29 with this run's numbers: LoRA vs a full (DreamBooth-style) fine-tune vs a textual-inversion embedding.

    Sizes: the LoRA file as written; a full fine-tune saves the UNet and text
    encoder(s) (fp16); an embedding is one token vector per text encoder (fp16).
    """
    unet = sum(p.numel() for p in model.pipe.unet.parameters())
    te = sum(p.numel() for enc in model.text_encoders for p in enc.parameters())
    hidden = sum(enc.config.hidden_size for enc in model.text_encoders)
    lora_bytes = Path(lora_file).stat().st_size
    return [
        {"method": "LoRA (this run)", "file_bytes": lora_bytes, "trains": "low-rank updates of attention/MLP layers",
         "train_seconds": train_seconds},
        {"method": "DreamBooth checkpoint", "file_bytes": (unet + te) * 2, "trains": "every weight of UNet + text encoder",
         "train_seconds": None},
        {"method": "Textual inversion", "file_bytes": hidden * 2, "trains": "one new token embedding",
         "train_seconds": None},
    ]


def validation_loss_of_file(model, lora_file: str | Path | None, image_paths: list[Path], captions: list[str],
                            resolution: tuple[int, int], seed: int = 1234) -> float:
    """The fixed-noise validation loss of ``model`` with ``lora_file`` loaded (None: the base model).

    Same images, noise and timesteps every call: computing it twice gives the same number.
    """


    from diffusers import DDPMScheduler

    if lora_file is not None:
        load_lora(model.pipe, lora_file, adapter_name="validation")
    items = [Item(Path(p), c, 1, "validation") for p, c in zip(image_paths, captions)]
    device = model.pipe.unet.device
    samples = prepare_samples(items, resolution, model, False, True, seed, device)
    latents = latents_of(model, samples, [0] * len(samples), device, None)
    with torch.no_grad():
        embeds, pooled = encode_prompts(model, captions, 1, device)
    time_ids = torch.stack([s.time_ids[0] for s in samples]).to(device)
    prediction = model.pipe.scheduler.config.get("prediction_type", "epsilon")
    scheduler = DDPMScheduler.from_config(model.pipe.scheduler.config)
    try:
        return fixed_noise_loss(model, latents, embeds, pooled, time_ids, scheduler, prediction, seed=seed)
    finally:
        if lora_file is not None:
            model.pipe.delete_adapters(["validation"])
