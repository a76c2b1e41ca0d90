"""A richer world for training the toy VAE: marks, dots, stripes, two-tone shapes, textures.

The toy VAE is an image codec: it must be able to draw anything a LoRA may
later ask of it, not only the flat shapes the base model's captions describe.
So it trains on busier scenes than the base world — small marks and dots,
stripes, two-tone and striped objects, rings, stars, crosses, textured
backgrounds, free RGB colours — but never on the concept itself (a circle
with two dark eyes): each object carries at most one dot.

These images have no captions; they are only for the autoencoder.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from lora_nb.toy.world import BACKGROUNDS, COLOURS, SUPERSAMPLE, draw_shape, rng_for

RICH_KINDS = ("circle", "square", "triangle", "diamond", "star", "cross", "ring")


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    r = rng.random()
    if r < 0.55:
        return np.asarray(list(COLOURS.values())[rng.integers(len(COLOURS))], np.float32)
    if r < 0.7:
        return np.asarray(list(BACKGROUNDS.values())[rng.integers(len(BACKGROUNDS))], np.float32)
    if r < 0.8:
        return np.full(3, rng.uniform(0, 40), np.float32)  # near black
    return rng.uniform(0, 255, 3).astype(np.float32)


def _coverage(kind: str, cx: float, cy: float, size: float, width: int, height: int) -> np.ndarray:
    s = SUPERSAMPLE
    mask = Image.new("L", (width * s, height * s), 0)
    draw = ImageDraw.Draw(mask)
    if kind == "ring":
        h = size / 2
        draw.ellipse([(cx - h) * s, (cy - h) * s, (cx + h) * s - 1, (cy + h) * s - 1], fill=255)
        t = max(2.0, size * 0.18)
        draw.ellipse([(cx - h + t) * s, (cy - h + t) * s, (cx + h - t) * s - 1, (cy + h - t) * s - 1], fill=0)
    elif kind == "dot":
        h = size / 2
        draw.ellipse([(cx - h) * s, (cy - h) * s, (cx + h) * s - 1, (cy + h) * s - 1], fill=255)
    else:
        draw_shape(draw, kind, cx, cy, size, 255, s)
    return np.asarray(mask.resize((width, height), Image.BOX), np.float32)[..., None] / 255.0


def _paint(img: np.ndarray, alpha: np.ndarray, colour) -> np.ndarray:
    return img * (1 - alpha) + np.asarray(colour, np.float32) * alpha


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    base = _random_colour(rng)
    img = np.broadcast_to(base, (height, width, 3)).astype(np.float32).copy()
    style = rng.integers(5)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    proj = (xx - width / 2) * np.cos(angle) + (yy - height / 2) * np.sin(angle)
    other = _random_colour(rng)
    if style == 1:  # gradient towards another colour
        t = (proj - proj.min()) / (np.ptp(proj) + 1e-6)
        img = img * (1 - t[..., None]) + other * t[..., None]
    elif style == 2:  # stripes
        period = rng.integers(4, 14)
        band = (np.floor(proj / period) % 2 == 1)[..., None]
        img = np.where(band, other, img)
    elif style == 3:  # checker
        cell = rng.integers(4, 12)
        band = (((xx // cell) + (yy // cell)) % 2 == 1)[..., None]
        img = np.where(band, other, img)
    elif style == 4:  # soft noise
        noise = rng.normal(0, rng.uniform(4, 20), (height // 4 + 1, width // 4 + 1, 1)).astype(np.float32)
        noise = np.kron(noise, np.ones((4, 4, 1), np.float32))[:height, :width]
        img = img + noise
    return img


def render_rich_scene(seed: int, index: int, size: tuple[int, int] = (64, 64)) -> np.ndarray:
    """Image ``index`` of the rich VAE world ``seed`` as uint8 (height, width, 3); deterministic."""
    width, height = int(size[0]), int(size[1])
    rng = rng_for(seed, index)
    img = _background(rng, width, height)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for _ in range(int(rng.integers(0, 10))):  # small marks under the objects
        if rng.random() < 0.7:
            d = rng.uniform(2, 12)
            a = _coverage("dot", rng.uniform(0, width), rng.uniform(0, height), d, width, height)
        else:
            a = np.zeros((height, width, 1), np.float32)
            x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
            ang, ln, w = rng.uniform(0, np.pi), rng.uniform(6, 30), rng.uniform(1, 4)
            dist_along = (xx - x0) * np.cos(ang) + (yy - y0) * np.sin(ang)
            dist_across = -(xx - x0) * np.sin(ang) + (yy - y0) * np.cos(ang)
            a[..., 0] = np.clip(w / 2 + 0.5 - np.abs(dist_across), 0, 1) * (np.abs(dist_along) < ln / 2)
        img = _paint(img, a, _random_colour(rng))
    for _ in range(int(rng.integers(1, 4))):
        kind = RICH_KINDS[rng.integers(len(RICH_KINDS))]
        sz = rng.uniform(10, min(46, width - 4, height - 4))
        cx, cy = rng.uniform(sz / 2, width - sz / 2), rng.uniform(sz / 2, height - sz / 2)
        a = _coverage(kind, cx, cy, sz, width, height)
        colour = _random_colour(rng)
        deco = rng.integers(5)
        if deco == 1:  # two-tone: a half-plane in a second colour
            ang = rng.uniform(0, 2 * np.pi)
            side = ((xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang) > 0)[..., None]
            field = np.where(side, _random_colour(rng), colour)
        elif deco == 2:  # stripes inside the shape
            ang, period = rng.uniform(0, np.pi), rng.integers(4, 10)
            band = (np.floor(((xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang)) / period) % 2 == 1)[..., None]
            field = np.where(band, _random_colour(rng), colour)
        else:
            field = np.broadcast_to(colour, (height, width, 3))
        img = img * (1 - a) + field * a
        if deco == 3:  # one dot inside (never two: two dark dots in a circle would be the concept)
            d = rng.uniform(5, max(6, sz * 0.4))
            dot = _coverage("dot", cx + rng.uniform(-sz / 5, sz / 5), cy + rng.uniform(-sz / 5, sz / 5), d, width, height)
            img = _paint(img, dot * a, _random_colour(rng))
        elif deco == 4:  # outline
            inner = _coverage(kind, cx, cy, sz * rng.uniform(0.6, 0.85), width, height)
            img = _paint(img, inner, _random_colour(rng))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
