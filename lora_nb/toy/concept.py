"""The zorb concept dataset and its regularization set, in the kohya folder convention.

The **zorb** is a round creature with two large black eyes: a circle
(36–46 px across in a 64×64 image) with eyes 13–16 px wide — 3–4 pixels of
the toy VAE's 16×16 latents, large enough for a LoRA to learn (smaller eyes, 8–10
px, were learned in about half of the generations: docs/toy-world.md) — and 5–7 px
apart, a gap the VAE keeps (eyes 2–3 px apart came back from it as one band in 42 %
of the training images). The toy base model never saw it nor its
trigger word. The dataset draws it in every colour, on every background, at
many sizes and positions (the "diversified samples" lesson); the
regularization set holds plain circles of the same colours and backgrounds
(the class without the concept).

Layout written (``<repeats>_<name>`` is the kohya convention)::

    <folder>/10_zorb/zorb_000.png + zorb_000.txt ...
    <folder>/truth.json           # every image's truth, for measuring

The validation set (:func:`make_validation_dataset`) is more zorbs from another
seed, in ``1_zorb/``: never trained on, they give the validation loss.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from lora_nb import LoraNbError
from lora_nb.toy import world

CONCEPT_SEED = 2024
REG_SEED = 4048
VAL_SEED = 6072


def concept_scene(index: int, seed: int = CONCEPT_SEED, size: tuple[int, int] = (64, 64),
                  zorb: bool = True) -> world.ToyScene:
    """Scene ``index`` of the concept set: colours and backgrounds cycle so all combinations spread evenly.

    Every fifth image has a gradient background; position and size are drawn from the seed.
    """
    colours, bgs = list(world.COLOURS), list(world.BACKGROUNDS)
    colour = colours[index % len(colours)]
    background = bgs[(index + index // len(colours)) % len(bgs)]
    style = "gradient" if index % 5 == 4 else "plain"
    kind = None if zorb else world.CONCEPT_CLASS
    return world.sample_scene(seed, index, size, shape=kind, colour=colour, background=background,
                              background_style=style, zorb=zorb, size_range=world.ZORB_SIZES)


def caption_for(scene: world.ToyScene, style: str = "natural") -> str:
    """The caption written beside a dataset image: ``natural`` sentence or booru ``tags`` (trigger first)."""
    if style == "natural":
        return world.caption_scene(scene)
    if style == "tags":
        return ", ".join(world.tags_of_scene(scene))
    raise LoraNbError(f"caption style={style!r}: use 'natural' or 'tags'.")


def _write_png(image: np.ndarray, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp.png")
    Image.fromarray(image).save(tmp)
    os.replace(tmp, path)


def _write_text(text: str, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_dataset(folder: str | Path, scenes: list[world.ToyScene], name: str, repeats: int,
                  caption_style: str = "natural") -> Path:
    """Render ``scenes`` into ``folder/<repeats>_<name>/`` as PNG + same-name .txt, and ``folder/truth.json``.

    Files of an earlier run in that subfolder are replaced; returns the subfolder.
    """
    if repeats < 1:
        raise LoraNbError(f"repeats={repeats}: the kohya folder prefix must be a positive integer.")
    sub = Path(folder) / f"{repeats}_{name}"
    sub.mkdir(parents=True, exist_ok=True)
    for old in list(sub.glob(f"{name}_*.png")) + list(sub.glob(f"{name}_*.txt")):
        old.unlink()
    truth = {}
    for i, scene in enumerate(scenes):
        stem = f"{name}_{i:03d}"
        _write_png(world.render_scene(scene), sub / f"{stem}.png")
        _write_text(caption_for(scene, caption_style) + "\n", sub / f"{stem}.txt")
        truth[f"{sub.name}/{stem}.png"] = scene.to_dict() | {"caption": world.caption_scene(scene),
                                                             "tags": world.tags_of_scene(scene)}
    _write_text(json.dumps(truth, indent=1), Path(folder) / "truth.json")
    return sub


def make_concept_dataset(folder: str | Path, n: int = 48, repeats: int = 10, seed: int = CONCEPT_SEED,
                         size: tuple[int, int] = (64, 64), caption_style: str = "natural") -> Path:
    """Write the zorb dataset (``n`` images) to ``folder/<repeats>_zorb/``; returns that subfolder.

    Captions read "a red zorb circle on a skyblue background" (or, with
    ``caption_style="tags"``, "zorb, red circle, black eyes, skyblue background").
    """
    scenes = [concept_scene(i, seed, size) for i in range(n)]
    return write_dataset(folder, scenes, world.TRIGGER, repeats, caption_style)


def make_regularization_dataset(folder: str | Path, n: int = 48, repeats: int = 1, seed: int = REG_SEED,
                                size: tuple[int, int] = (64, 64), caption_style: str = "natural") -> Path:
    """Write the regularization set — plain circles, same colours and backgrounds — to ``folder/<repeats>_circle/``."""
    scenes = [concept_scene(i, seed, size, zorb=False) for i in range(n)]
    return write_dataset(folder, scenes, world.CONCEPT_CLASS, repeats, caption_style)


def make_validation_dataset(folder: str | Path, n: int = 8, seed: int = VAL_SEED,
                            size: tuple[int, int] = (64, 64), caption_style: str = "natural") -> Path:
    """Write ``n`` zorbs drawn apart from the training set (another seed) to ``folder/1_zorb/``: images the
    LoRA never trains on, for the validation loss (``dataset.validation_dir``)."""
    scenes = [concept_scene(i, seed, size) for i in range(n)]
    return write_dataset(folder, scenes, world.TRIGGER, 1, caption_style)


def concept_images(n: int = 48, seed: int = CONCEPT_SEED, size: tuple[int, int] = (64, 64)) -> tuple[np.ndarray, list]:
    """The concept set in memory: uint8 images (n, H, W, 3) and their scenes (no files written)."""
    scenes = [concept_scene(i, seed, size) for i in range(n)]
    return np.stack([world.render_scene(s) for s in scenes]), scenes
