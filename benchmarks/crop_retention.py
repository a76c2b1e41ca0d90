"""Crop benchmark: how often does a crop keep the whole subject? Center vs focus (C7).

Two sets where the subject's box is known exactly:

* generated pictures: one textured subject (ellipse, rectangle, polygon or
  star) placed off-centre on a cluttered gradient background, in the canvas
  shapes and target sizes the course uses (512/768 px, SDXL 1024-class, toy 64/96 px);
* toy-world pictures (lora_nb.toy) of a zorb off-centre on 96x64 / 64x96 /
  64x64 canvases cropped to another of those shapes;
* the scikit-image astronaut (a real photo, offline) placed off-centre on
  wider or taller canvases, with her face box marked by hand.

A crop "keeps the subject" when the subject box lies completely inside the
crop window. Run:  python benchmarks/crop_retention.py [--n 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_nb.crop import astronaut_crop_set, crop_retention, toy_crop_set  # noqa: E402

# (canvas w, h) -> target (w, h): the target's aspect differs from the canvas, so something is cut
LAYOUTS = [
    ((768, 512), (512, 512)), ((512, 768), (512, 512)), ((512, 512), (512, 768)), ((512, 512), (768, 512)),
    ((1216, 832), (1024, 1024)), ((768, 768), (832, 1216)), ((96, 64), (64, 64)), ((64, 64), (64, 96)),
]


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A smooth two-colour gradient with noise and a few soft blobs (clutter)."""
    c0, c1 = rng.uniform(40, 215, 3), rng.uniform(40, 215, 3)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w]
    t = ((xx / w - 0.5) * math.cos(angle) + (yy / h - 0.5) * math.sin(angle)) + 0.5
    arr = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    arr += rng.normal(0, 6, (h, w, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    blobs = Image.new("RGB", (w, h))
    mask = Image.new("L", (w, h), 0)
    d, dm = ImageDraw.Draw(blobs), ImageDraw.Draw(mask)
    for _ in range(rng.integers(2, 6)):
        r = rng.uniform(0.05, 0.15) * min(w, h)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        col = tuple(int(v) for v in np.clip(arr[int(min(cy, h - 1)), int(min(cx, w - 1))] + rng.normal(0, 25, 3), 0, 255))
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
        dm.ellipse([cx - r, cy - r, cx + r, cy + r], fill=110)
    mask = mask.filter(ImageFilter.GaussianBlur(max(1, min(w, h) / 40)))
    return Image.composite(blobs, img, mask)


def _shape_points(rng, kind: str, cx, cy, rx, ry):
    if kind == "star":
        n = int(rng.integers(5, 8))
        return [(cx + (rx if i % 2 == 0 else rx * 0.45) * math.cos(math.pi * i / n - math.pi / 2),
                 cy + (ry if i % 2 == 0 else ry * 0.45) * math.sin(math.pi * i / n - math.pi / 2)) for i in range(2 * n)]
    n = int(rng.integers(5, 9))
    angles = np.sort(rng.uniform(0, 2 * math.pi, n))
    return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in angles]


def make_subject_image(rng: np.random.Generator, canvas: tuple[int, int], target: tuple[int, int]):
    """One generated picture with a known subject box, off-centre along the axis the crop cuts."""
    w, h = canvas
    img = _background(rng, w, h)
    short = min(w, h)
    rx, ry = rng.uniform(0.09, 0.2) * short, rng.uniform(0.09, 0.2) * short
    # the axis the crop cuts: the one where the canvas is relatively longer than the target
    cut_x = w * target[1] >= h * target[0]
    span, other = (w, h) if cut_x else (h, w)
    r_cut, r_other = (rx, ry) if cut_x else (ry, rx)
    lo, hi = r_cut + 1, span - r_cut - 1
    # off-centre: at least 20% of the span away from the middle, on either side
    side = rng.choice([-1, 1])
    centre = span / 2 + side * rng.uniform(0.2 * span, max(0.2 * span + 1, hi - span / 2))
    c_cut = float(np.clip(centre, lo, hi))
    c_other = rng.uniform(r_other + 1, other - r_other - 1)
    cx, cy = (c_cut, c_other) if cut_x else (c_other, c_cut)
    colour = tuple(int(v) for v in rng.uniform(0, 255, 3))
    layer = Image.new("RGB", (w, h), colour)
    stripes = ImageDraw.Draw(layer)
    period = max(3, int(short / 30))
    dark = tuple(max(0, c - 80) for c in colour)
    for x in range(0, w + h, period * 2):
        stripes.line([(x, 0), (x - h, h)], fill=dark, width=max(1, period // 2))
    mask = Image.new("L", (w, h), 0)
    dm = ImageDraw.Draw(mask)
    kind = rng.choice(["ellipse", "rect", "polygon", "star"])
    if kind == "ellipse":
        dm.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    elif kind == "rect":
        dm.rounded_rectangle([cx - rx, cy - ry, cx + rx, cy + ry], radius=int(min(rx, ry) / 3), fill=255)
    else:
        dm.polygon(_shape_points(rng, kind, cx, cy, rx, ry), fill=255)
    img.paste(layer, (0, 0), mask)
    bbox = mask.getbbox()
    return img, bbox


def generated_set(n: int, seed: int = 0):
    """``n`` generated ``(image, truth box, target size, label)`` samples across all layouts."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        canvas, target = LAYOUTS[i % len(LAYOUTS)]
        img, box = make_subject_image(rng, canvas, target)
        out.append((img, box, target, f"{canvas[0]}x{canvas[1]}->{target[0]}x{target[1]}"))
    return out


def astronaut_set(n: int = 24, seed: int = 0):
    """The astronaut photo pasted off-centre on wider/taller canvases (see lora_nb.crop.astronaut_crop_set)."""
    return astronaut_crop_set(n, seed)


def retention(samples, mode: str) -> tuple[float, list[str]]:
    """Share of samples whose truth box lies inside the crop window of ``mode`` (lora_nb.crop.crop_retention)."""
    return crop_retention(samples, mode)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="generated pictures")
    parser.add_argument("--astronauts", type=int, default=24, help="astronaut pictures")
    parser.add_argument("--toy", type=int, default=120, help="toy-world pictures (zorb off-centre)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show-misses", action="store_true")
    args = parser.parse_args(argv)
    sets = {"generated off-centre shapes": generated_set(args.n, args.seed),
            "toy world, zorb off-centre": toy_crop_set(args.toy, args.seed),
            "astronaut face (real photo)": astronaut_set(args.astronauts, args.seed)}
    results = {}
    print(f"{'set':32s} {'n':>4s} {'center':>8s} {'focus':>8s} {'s/img (focus)':>14s}")
    for name, samples in sets.items():
        c, _ = retention(samples, "center")
        t = time.perf_counter()
        f, misses = retention(samples, "focus")
        dt = (time.perf_counter() - t) / len(samples)
        results[name] = {"n": len(samples), "center": c, "focus": f}
        print(f"{name:32s} {len(samples):4d} {c:8.1%} {f:8.1%} {dt:14.3f}")
        if args.show_misses:
            for m in misses:
                print("   miss:", m)
    allc = sum(r["center"] * r["n"] for r in results.values()) / sum(r["n"] for r in results.values())
    allf = sum(r["focus"] * r["n"] for r in results.values()) / sum(r["n"] for r in results.values())
    print(f"{'all':32s} {sum(r['n'] for r in results.values()):4d} {allc:8.1%} {allf:8.1%}")
    print("aim: focus >= 95% where center is clearly lower ->", "MET" if allf >= 0.95 and allc < allf - 0.2 else "NOT MET")
    return results


if __name__ == "__main__":
    main()
