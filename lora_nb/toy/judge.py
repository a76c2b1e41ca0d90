"""The judge: measure an image of the toy world — shapes, colours, background, the zorb — and memorization.

It is built to read *generated* images, which are blurrier than the world's
own drawings:

- background: a plane (per channel) fitted to the border pixels, so
  gradients count as their middle colour; its name is the nearest background
  colour;
- objects: connected regions far from that background; each region's colour is
  the nearest palette colour of its median pixel;
- shape: from the region with its holes filled — the top-vs-bottom width ratio
  (triangles point up) and how full the bounding box's corners are (a square
  fills them, a circle does not);
- zorb: dark holes inside the object (the eyes): two holes side by side in the
  upper part, or one wide hole where blur merged them.

:func:`judge_image` returns the measurement, :func:`score_judge` its accuracy
against the world's truth, :func:`memorization_score` the similarity of an
image to its nearest training image.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import ndimage
from skimage.morphology import convex_hull_image

from lora_nb import LoraNbError
from lora_nb.toy.world import BACKGROUNDS, COLOURS, EYE_COLOUR, ToyScene

FG_THRESHOLD = 45.0
MIN_OBJECT_AREA = 40


def as_array(image) -> np.ndarray:
    """An (H, W, 3) float32 array in 0..255 from a PIL image, a uint8 array or a float array in 0..1."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise LoraNbError(f"The judge needs an RGB image (H, W, 3); got an array of shape {arr.shape}.")
    arr = arr[..., :3]
    if arr.dtype != np.uint8 and arr.max() <= 1.0 + 1e-6:
        arr = arr * 255.0
    return arr.astype(np.float32)


def nearest_name(rgb: np.ndarray, palette: dict) -> tuple[str, float, float]:
    """Nearest palette name to ``rgb``, its distance, and the margin to the second nearest."""
    names = list(palette)
    d = np.linalg.norm(np.asarray([palette[n] for n in names], np.float32) - rgb[None], axis=1)
    order = np.argsort(d)
    return names[order[0]], float(d[order[0]]), float(d[order[1]] - d[order[0]])


def fit_background(img: np.ndarray, border: int = 2) -> np.ndarray:
    """Per-pixel background estimate: a plane per channel fitted to the border (robust to objects at the edge)."""
    h, w, _ = img.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    edge = np.zeros((h, w), bool)
    edge[:border], edge[-border:], edge[:, :border], edge[:, -border:] = True, True, True, True
    a = np.stack([np.ones(edge.sum()), xx[edge] / w - 0.5, yy[edge] / h - 0.5], 1)
    vals = img[edge]
    keep = np.abs(vals - np.median(vals, axis=0)).max(axis=1) < 50
    if keep.sum() < 8:
        keep[:] = True
    for _ in range(2):
        coef, *_ = np.linalg.lstsq(a[keep], vals[keep], rcond=None)
        resid = np.abs(a @ coef - vals).max(axis=1)
        keep = resid < 25 if (resid < 25).sum() >= 8 else keep
    full = np.stack([np.ones(h * w), (xx.ravel() / w - 0.5), (yy.ravel() / h - 0.5)], 1) @ coef
    return full.reshape(h, w, 3).astype(np.float32)


def shape_features(filled: np.ndarray) -> dict:
    """Fill ratio, top/bottom width ratio and corner fill of a filled object mask (cropped to its box)."""
    ys, xs = np.nonzero(filled)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = filled[y0:y1, x0:x1].astype(np.float32)
    bh, bw = box.shape
    widths = box.sum(axis=1)
    top = widths[int(bh * 0.2):max(int(bh * 0.2) + 1, int(bh * 0.35))].mean()
    bottom = widths[int(bh * 0.65):max(int(bh * 0.65) + 1, int(bh * 0.8))].mean()
    ch, cw = max(1, round(bh * 0.15)), max(1, round(bw * 0.15))
    corners = np.mean([box[:ch, :cw].mean(), box[:ch, -cw:].mean(), box[-ch:, :cw].mean(), box[-ch:, -cw:].mean()])
    return {"fill": float(box.mean()), "top_bottom": float(top / max(bottom, 1e-6)), "corners": float(corners),
            "bbox": (int(x0), int(y0), int(x1), int(y1))}


def classify_shape(feat: dict) -> tuple[str, float]:
    """Shape name from :func:`shape_features`, with a 0..1 confidence from the distance to the decision lines."""
    tb, corners = feat["top_bottom"], feat["corners"]
    if tb < 0.7:
        return "triangle", float(min(1.0, 0.5 + (0.7 - tb) * 1.5))
    if corners > 0.5:
        return "square", float(min(1.0, 0.5 + (corners - 0.5) * 1.5))
    return "circle", float(min(1.0, 0.5 + min(0.5 - corners, tb - 0.7) * 1.5))


def eye_measure(obj_mask: np.ndarray, filled: np.ndarray, bbox: tuple[int, int, int, int],
                dist_eye: np.ndarray | None = None) -> dict:
    """Dark holes in an object (zorb eyes): count of eye-like holes, and a 0..1 zorb score.

    ``filled`` is the object's outline filled (its convex hull); its 1-px rim is
    ignored. An eye is a hole of at least 1.2% of the box, in the upper 70% of the
    object, whose darkest pixel is near black (``dist_eye``: distance of each
    pixel to the eye colour). A zorb has two eyes side by side, of similar
    size, about symmetric around the object's middle — or one wide hole where
    blur merged them.
    """
    x0, y0, x1, y1 = bbox
    bw, bh = x1 - x0, y1 - y0
    holes = ndimage.binary_erosion(filled, iterations=1) & ~obj_mask
    labels, n = ndimage.label(holes)
    eyes = []
    for i in range(1, n + 1):
        ys, xs = np.nonzero(labels == i)
        area = len(ys)
        cy, cx = ys.mean(), xs.mean()
        rel_y = (cy - y0) / max(bh, 1)
        dark = dist_eye is None or float(dist_eye[labels == i].min()) < 90
        if area >= 0.012 * bw * bh and rel_y < 0.7 and dark:
            eyes.append({"area": area, "cx": cx, "cy": cy, "w": int(np.ptp(xs)) + 1, "h": int(np.ptp(ys)) + 1,
                         "ys": ys, "xs": xs})

    def eye_pair(a: dict, b: dict) -> bool:  # two eyes side by side, of similar size, about symmetric
        level = abs(a["cy"] - b["cy"]) < 0.25 * bh
        apart = abs(a["cx"] - b["cx"]) > 0.2 * bw
        alike = max(a["area"], b["area"]) < 3 * min(a["area"], b["area"])
        centred = abs((a["cx"] + b["cx"]) / 2 - (x0 + x1 - 1) / 2) < 0.2 * bw
        return bool(level and apart and alike and centred)

    pair = any(eye_pair(eyes[i], eyes[j]) for i in range(len(eyes)) for j in range(i + 1, len(eyes)))
    wide = [e for e in eyes if e["w"] >= 1.5 * e["h"] and e["area"] >= 0.03 * bw * bh]
    near_edge = ndimage.binary_dilation(~filled, iterations=2)  # within 2 px of the object's outline
    touching = not pair and any(touching_pair(e, eye_pair, near_edge) for e in wide)
    merged = bool(wide) and not pair and not touching
    hole_share = float(sum(e["area"] for e in eyes) / max(1, filled.sum()))
    score = 1.0 if pair else (0.9 if touching else 0.75 if merged else min(0.45, hole_share * 5))
    return {"eyes": len(eyes), "zorb": bool(pair or touching or merged), "zorb_score": score,
            "eyes_touching": bool(touching), "eyes_merged": bool(merged)}


def two_lobes(heights: np.ndarray, waist: float = 0.6) -> int | None:
    """Where a wide dark hole narrows between two eyes that touch: the column of its waist, or None for one band.
    Its height per column (``heights``, left to right) rises to a peak on each side of a waist in the middle half
    no taller than ``waist`` × the lower peak. Two round eyes joined by a thin bridge have that waist; a band
    blurred from both eyes is about as tall in the middle as at its ends."""
    n = len(heights)
    if n < 6:
        return None
    mid = np.arange(n // 4, n - n // 4)  # the waist lies in the middle half
    m = int(mid[np.argmin(heights[mid])])
    left, right = heights[:m].max(initial=0), heights[m + 1:].max(initial=0)
    return m if heights[m] <= waist * min(left, right) and min(left, right) >= 3 else None


def touching_pair(hole: dict, eye_pair: Callable[[dict, dict], bool], near_edge: np.ndarray) -> bool:
    """Whether a wide hole (``ys``/``xs``: its pixels) is two eyes that touch: it has a waist
    (:func:`two_lobes`), its two sides, cut there, pass ``eye_pair`` as two separate eyes would (level, apart,
    alike in size, about symmetric around the object's middle), and neither side reaches the object's outline
    (``near_edge``): a bite out of the object's edge beside one eye has a waist too, but it is open to the
    outside, and a viewer sees one eye."""
    ys, xs = hole["ys"], hole["xs"]
    m = two_lobes(np.bincount(xs - xs.min()))
    if m is None:
        return False
    sides = []
    for keep in (xs - xs.min() < m, xs - xs.min() > m):
        if int(near_edge[ys[keep], xs[keep]].sum()) >= 3:
            return False
        sides.append({"area": int(keep.sum()), "cx": float(xs[keep].mean()), "cy": float(ys[keep].mean())})
    return eye_pair(*sides)


def judge_image(image) -> dict:
    """Measure one image: background name, and per object shape, colour, box and whether it is a zorb.

    Returns ``{"background", "background_margin", "gradient", "objects": [...]}``
    plus the main (largest) object's ``shape``, ``colour``, ``zorb``,
    ``zorb_score`` (None when no object is found). Objects are sorted
    largest first; each has ``shape``, ``shape_conf``, ``colour``,
    ``colour_margin``, ``bbox`` (x0, y0, x1, y1), ``area``, ``zorb``, ``zorb_score``.
    """
    img = as_array(image)
    h, w, _ = img.shape
    bg = fit_background(img)
    bg_mid = bg[h // 2, w // 2]
    bg_name, _, bg_margin = nearest_name(bg_mid, BACKGROUNDS)
    slope = float(np.abs(bg[0, 0] - bg[-1, -1]).max() + np.abs(bg[0, -1] - bg[-1, 0]).max())
    dist_bg = np.linalg.norm(img - bg, axis=2)
    fg = dist_bg > FG_THRESHOLD
    labels, n = ndimage.label(fg)
    objects = []
    eye = np.asarray(EYE_COLOUR, np.float32)
    for i in range(1, n + 1):
        comp = labels == i
        if comp.sum() < MIN_OBJECT_AREA:
            continue
        comp_filled = ndimage.binary_fill_holes(comp)
        core = ndimage.binary_erosion(comp, iterations=1)
        pix = img[core] if core.sum() >= 10 else img[comp]
        # The object's colour: median of pixels that are not eye-dark (eyes would pull it darker).
        not_dark = np.linalg.norm(pix - eye, axis=1) > 70
        colour_rgb = np.median(pix[not_dark] if not_dark.sum() >= 10 else pix, axis=0)
        colour, _, colour_margin = nearest_name(colour_rgb, COLOURS)
        d_obj = np.linalg.norm(img - colour_rgb, axis=2)
        d_eye = np.linalg.norm(img - eye, axis=2)
        region = ndimage.binary_dilation(comp_filled, iterations=1)
        obj_mask = region & (d_obj < dist_bg) & (d_obj < d_eye)
        if obj_mask.sum() < MIN_OBJECT_AREA:
            continue
        olabels, on = ndimage.label(obj_mask)
        if on > 1:
            sizes = ndimage.sum(obj_mask, olabels, range(1, on + 1))
            obj_mask = olabels == (1 + int(np.argmax(sizes)))
        filled = ndimage.binary_fill_holes(obj_mask)
        feat = shape_features(filled)
        shape, shape_conf = classify_shape(feat)
        # Eyes are holes in the object's convex hull: that also catches an eye that blur opened to the edge.
        hull = convex_hull_image(obj_mask) | filled
        eyes = eye_measure(obj_mask, hull, feat["bbox"], d_eye)
        objects.append({"shape": shape, "shape_conf": shape_conf, "colour": colour, "colour_margin": colour_margin,
                        "colour_rgb": [float(v) for v in colour_rgb], "bbox": feat["bbox"],
                        "area": int(filled.sum()), "fill": feat["fill"], "top_bottom": feat["top_bottom"],
                        "corners": feat["corners"], **eyes})
    objects.sort(key=lambda o: -o["area"])
    main = objects[0] if objects else None
    return {
        "background": bg_name, "background_margin": bg_margin, "gradient": slope > 25,
        "objects": objects,
        "shape": main["shape"] if main else None,
        "colour": main["colour"] if main else None,
        "zorb": bool(main["zorb"]) if main else False,
        "zorb_score": float(main["zorb_score"]) if main else 0.0,
        "eyes_merged": bool(main["eyes_merged"]) if main else False,
        "eyes_touching": bool(main["eyes_touching"]) if main else False,
    }


def truth_of_scene(scene: ToyScene) -> dict:
    """The attributes the judge measures, read from a scene's truth (main object = the largest)."""
    fill = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
    obj = max(scene.objects, key=lambda o: fill.get(o.kind, 1.0) * o.size ** 2)
    return {"shape": obj.kind, "colour": obj.colour, "background": scene.background, "zorb": obj.zorb,
            "count": len(scene.objects)}


def score_judge(images, scenes: list[ToyScene]) -> dict:
    """Accuracy of the judge on ``images`` against their truths: share right per attribute, and all four.

    ``count`` is the share of images where the number of objects found is right.
    """
    if len(images) != len(scenes) or not len(scenes):
        raise LoraNbError(f"score_judge needs as many images as scenes (got {len(images)} and {len(scenes)}).")
    right = {"shape": 0, "colour": 0, "background": 0, "zorb": 0, "all": 0, "count": 0}
    for img, scene in zip(images, scenes):
        got, want = judge_image(img), truth_of_scene(scene)
        ok = {k: got[k] == want[k] for k in ("shape", "colour", "background", "zorb")}
        for k, v in ok.items():
            right[k] += v
        right["all"] += all(ok.values())
        right["count"] += len(got["objects"]) == want["count"]
    return {k: v / len(scenes) for k, v in right.items()} | {"n": len(scenes)}


# --------------------------------------------------------------------------- memorization

def _signature(image, size: int = 32) -> np.ndarray:
    from PIL import Image

    arr = as_array(image).astype(np.uint8)
    small = np.asarray(Image.fromarray(arr).resize((size, size), Image.BILINEAR), np.float32)
    small = ndimage.gaussian_filter(small, sigma=(1, 1, 0))
    v = small.ravel() - small.mean()
    return v / (np.linalg.norm(v) + 1e-6)


def memorization_score(image, training_images) -> dict:
    """Similarity of ``image`` to its nearest training image.

    Both are shrunk to 32×32, slightly blurred, and compared by correlation
    (1.0 = the same picture; a new arrangement of the same concept usually
    scores well below 0.9). Returns ``{"score", "index"}`` of the nearest one.
    """
    if not len(training_images):
        raise LoraNbError("memorization_score needs at least one training image.")
    sig = _signature(image)
    sims = np.asarray([float(sig @ _signature(t)) for t in training_images])
    i = int(np.argmax(sims))
    return {"score": float(sims[i]), "index": i}
