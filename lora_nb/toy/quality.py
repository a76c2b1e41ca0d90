"""Measure what a toy pipeline draws: prompt adherence, concept presence, leakage, judge ceiling.

:func:`measure_generations` generates one image per (prompt, seed), lets the
judge read each, and reports the share of images that show what the prompt
asked (shape, colour, background — each counted only where the prompt names
it) and the share where the zorb is present. The same function serves the
base model, the base with a LoRA loaded (pass ``pipe_kwargs`` such as
``{"cross_attention_kwargs": {"scale": 1.0}}``) and any sweep.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from lora_nb import LoraNbError
from lora_nb.toy import judge as judge_mod
from lora_nb.toy.world import BACKGROUNDS, COLOURS, SHAPES, TRIGGER


def parse_prompt(prompt: str) -> dict:
    """What a toy prompt asks for: ``shape``, ``colour``, ``background`` (None when unnamed) and ``zorb``.

    "a red zorb circle on a skyblue background" → circle, red, skyblue, zorb=True.
    The first shape and colour named count; the background is the word before "background".
    """
    words = prompt.lower().replace(",", " ").split()
    want = {"shape": None, "colour": None, "background": None, "zorb": TRIGGER in words}
    for i, w in enumerate(words):
        if w in SHAPES and want["shape"] is None:
            want["shape"] = w
        elif w in COLOURS and want["colour"] is None:
            want["colour"] = w
        elif w in BACKGROUNDS and i + 1 < len(words) and words[i + 1] in ("background", "gradient", "striped"):
            want["background"] = w
    return want


def adherence_prompts(backgrounds: tuple[str, ...] | None = None) -> list[str]:
    """The fixed base-model prompts: every colour × shape on each background (72 with all four)."""
    bgs = backgrounds or tuple(BACKGROUNDS)
    return [f"a {c} {s} on a {b} background" for b in bgs for c in COLOURS for s in SHAPES]


def concept_prompts(with_trigger: bool = True) -> list[str]:
    """Zorb prompts ("a red zorb circle on a gray background"), or the same without the trigger word (leak test)."""
    word = f"{TRIGGER} circle" if with_trigger else "circle"
    return [f"a {c} {word} on a {b} background" for b in BACKGROUNDS for c in COLOURS]


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int = 20, guidance_scale: float = 5.0,
             size: tuple[int, int] = (64, 64), batch: int = 48, **pipe_kwargs) -> list[tuple[str, int, np.ndarray]]:
    """One uint8 image per (prompt, seed): returns [(prompt, seed, image)], seed-major order.

    Each image's noise comes from its own ``torch.Generator`` seeded with its
    seed, so a result does not depend on the batch it was generated in.
    """
    jobs = [(p, s) for s in seeds for p in prompts]
    out = []
    for i in range(0, len(jobs), batch):
        chunk = jobs[i:i + batch]
        gens = [torch.Generator().manual_seed(int(s)) for _, s in chunk]
        images = pipe(prompt=[p for p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance_scale,
                      width=size[0], height=size[1], generator=gens, output_type="np", **pipe_kwargs).images
        for (p, s), img in zip(chunk, images):
            out.append((p, s, (np.clip(img, 0, 1) * 255).round().astype(np.uint8)))
    return out


def measure_generations(pipe, prompts: list[str], seeds: list[int],
                        judge: Callable[[np.ndarray], dict] = judge_mod.judge_image, steps: int = 20,
                        guidance_scale: float = 5.0, size: tuple[int, int] = (64, 64), batch: int = 48,
                        keep_images: bool = False, **pipe_kwargs) -> dict:
    """Generate every (prompt, seed), judge each image, and report the shares.

    Returns ``{"n", "shape", "colour", "background", "all", "zorb", "records"}``:
    ``shape``/``colour``/``background`` are the share of images showing the
    asked attribute among prompts that name it (None if none does), ``all``
    the share where every named attribute is right, ``zorb`` the share of
    images in which the judge finds the concept. ``records`` holds one dict per
    image (prompt, seed, wanted, got; and the image when ``keep_images``).
    """
    if not prompts or not seeds:
        raise LoraNbError("measure_generations needs at least one prompt and one seed.")
    records = []
    for prompt, seed, img in generate(pipe, prompts, seeds, steps, guidance_scale, size, batch, **pipe_kwargs):
        want, got = parse_prompt(prompt), judge(img)
        rec = {"prompt": prompt, "seed": seed, "want": want,
               "got": {**{k: got[k] for k in ("shape", "colour", "background", "zorb", "zorb_score")},
                       "eyes_merged": bool(got.get("eyes_merged", False)),
                       "eyes_touching": bool(got.get("eyes_touching", False))}}
        if keep_images:
            rec["image"] = img
        records.append(rec)
    result: dict = {"n": len(records)}
    for key in ("shape", "colour", "background"):
        asked = [r for r in records if r["want"][key] is not None]
        result[key] = (sum(r["got"][key] == r["want"][key] for r in asked) / len(asked)) if asked else None
    result["all"] = sum(all(r["got"][k] == r["want"][k] for k in ("shape", "colour", "background")
                            if r["want"][k] is not None) for r in records) / len(records)
    result["zorb"] = sum(bool(r["got"]["zorb"]) for r in records) / len(records)
    result["records"] = records
    return result


def judgement_label(want: dict, got: dict) -> str:
    """The judge's reading of one image, as the lines printed under it in a grid: whether it is a zorb (and
    whether its eyes are one merged band, which the judge counts, or two eyes that touch, or the prompt had no
    trigger word), then the
    colour and background it shows, each marked ``ok`` or with what the prompt asked::

        zorb: yes, eyes merged
        red ok / skyblue ok
    """
    zorb = "yes" if got.get("zorb") else "no"
    if got.get("zorb") and got.get("eyes_merged"):
        zorb += ", eyes merged"
    elif got.get("zorb") and got.get("eyes_touching"):
        zorb += ", eyes touch"
    if want.get("zorb") is False:
        zorb += " (no trigger word)"
    lines = [f"zorb: {zorb}"]
    parts = []
    for key in ("colour", "background"):
        seen = got.get(key) or "?"
        if want.get(key) is None:
            parts.append(seen)
        else:
            parts.append(f"{seen} ok" if seen == want[key] else f"{seen}, not {want[key]}")
    lines.append(" / ".join(parts))
    return "\n".join(lines)


def judge_prompt_image(prompt: str, image) -> dict:
    """``{"want", "got", "label"}`` for one generated image of ``prompt`` (a PIL image or uint8 array)."""
    want = parse_prompt(prompt)
    got = judge_mod.judge_image(np.asarray(image.convert("RGB") if hasattr(image, "convert") else image))
    return {"want": want, "got": got, "label": judgement_label(want, got)}


def judge_label(prompt: str, image) -> str:
    """The label a grid prints under a generated toy image: :func:`judgement_label` of what the judge read."""
    return judge_prompt_image(prompt, image)["label"]
