"""The toy taggers: an oracle that knows the truth, and a noisy heuristic one with realistic confidences.

Both return ``{tag: confidence}`` in booru style ("red circle", "black eyes",
"skyblue background"), so the tagging lesson can compare them with a real
tagger and sweep the threshold: precision and recall against the truth.

- :func:`tag_truth` — the true tags of a scene, confidences 0.9–1.0.
- :func:`tag_image_oracle` — the true tags read from a world image by the judge
  (exact on the world's own images), confidences from the judge's margins.
- :func:`tag_image_noisy` — every tag of the vocabulary scored by soft
  heuristics plus seeded noise: true tags mostly score high, look-alikes
  (neighbouring colours, circle vs square) get middling scores, so no single
  threshold is perfect.
"""

from __future__ import annotations

import hashlib

import numpy as np

from lora_nb.toy import judge
from lora_nb.toy.world import BACKGROUNDS, COLOURS, EYES_TAG, SHAPES, ToyScene, tag_vocabulary, tags_of_scene


def _stable_seed(*parts) -> int:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def tag_truth(scene: ToyScene, seed: int = 0) -> dict[str, float]:
    """The scene's true tags (no trigger word) with confidences between 0.9 and 1.0 (deterministic)."""
    tags = tags_of_scene(scene, with_trigger=False)
    rng = np.random.default_rng(_stable_seed(seed, scene.seed, tuple(tags)))
    return {t: round(float(rng.uniform(0.9, 1.0)), 3) for t in tags}


def tag_image_oracle(image) -> dict[str, float]:
    """True tags of a toy-world image, read by the judge; confidence 0.5–1.0 from how clear the reading was."""
    got = judge.judge_image(image)
    tags: dict[str, float] = {}
    for obj in got["objects"]:
        conf = min(obj["shape_conf"], 0.5 + min(0.5, obj["colour_margin"] / 100))
        tag = f"{obj['colour']} {obj['shape']}"
        tags[tag] = max(tags.get(tag, 0.0), round(conf, 3))
        if obj["zorb"]:
            tags[EYES_TAG] = max(tags.get(EYES_TAG, 0.0), round(obj["zorb_score"], 3))
    tags[f"{got['background']} background"] = round(0.5 + min(0.5, got["background_margin"] / 100), 3)
    if got["gradient"]:
        tags["gradient background"] = 0.8
    return tags


def _softmax_by_distance(rgb, palette: dict, sigma: float) -> dict[str, float]:
    names = list(palette)
    d = np.linalg.norm(np.asarray([palette[n] for n in names], np.float32) - np.asarray(rgb, np.float32)[None], axis=1)
    w = np.exp(-(d ** 2) / (2 * sigma ** 2))
    w = w / max(w.sum(), 1e-9)
    return dict(zip(names, w.tolist()))


def _sigmoid(x: float) -> float:
    return float(1 / (1 + np.exp(-x)))


def _shape_probs(obj: dict) -> dict[str, float]:
    tri = _sigmoid((0.72 - obj["top_bottom"]) * 9)
    sq = (1 - tri) * _sigmoid((obj["corners"] - 0.5) * 6)
    return {"triangle": tri, "square": sq, "circle": max(0.0, 1 - tri - sq)}


def tag_image_noisy(image, seed: int = 0, noise: float = 0.12, min_confidence: float = 0.05,
                    colour_sigma: float = 70.0) -> dict[str, float]:
    """Score every vocabulary tag for ``image`` with soft heuristics plus seeded noise (a realistic, imperfect tagger).

    ``noise`` is the standard deviation added to each confidence;
    ``colour_sigma`` how loosely colours match (larger → more colour
    confusion). Tags scoring below ``min_confidence`` are left out. The same
    image and seed always give the same result.
    """
    arr = judge.as_array(image)
    got = judge.judge_image(arr)
    scores = {t: 0.0 for t in tag_vocabulary()}
    for obj in got["objects"]:
        colours = _softmax_by_distance(obj["colour_rgb"], COLOURS, colour_sigma)
        shapes = _shape_probs(obj)
        for c in COLOURS:
            for s in SHAPES:
                p = (colours[c] ** 0.6) * (shapes[s] ** 0.6)
                scores[f"{c} {s}"] = max(scores[f"{c} {s}"], p)
        scores[EYES_TAG] = max(scores[EYES_TAG], obj["zorb_score"] * 0.9)
    h, w, _ = arr.shape
    border = np.concatenate([arr[:2].reshape(-1, 3), arr[-2:].reshape(-1, 3), arr[:, :2].reshape(-1, 3),
                             arr[:, -2:].reshape(-1, 3)])
    for b, p in _softmax_by_distance(np.median(border, axis=0), BACKGROUNDS, 45.0).items():
        scores[f"{b} background"] = p ** 0.5
    scores["gradient background"] = 0.75 if got["gradient"] else 0.15
    scores["striped background"] = min(1.0, float(border.std(axis=0).mean()) / 40)
    rng = np.random.default_rng(_stable_seed(seed, arr.astype(np.uint8).tobytes()))
    out = {}
    for tag, s in scores.items():
        conf = float(np.clip(0.9 * s + 0.05 + rng.normal(0, noise), 0, 1))
        if conf >= min_confidence:
            out[tag] = round(conf, 3)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def precision_recall(predicted: list[dict[str, float]], truth: list[list[str]], threshold: float) -> dict:
    """Micro precision and recall of tag predictions kept at ``threshold`` against true tag lists."""
    tp = fp = fn = 0
    for pred, true in zip(predicted, truth):
        kept = {t for t, c in pred.items() if c >= threshold}
        true_set = set(true)
        tp += len(kept & true_set)
        fp += len(kept - true_set)
        fn += len(true_set - kept)
    return {"threshold": threshold, "precision": tp / max(1, tp + fp), "recall": tp / max(1, tp + fn)}
