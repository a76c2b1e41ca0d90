"""Cropping to the training size (C6-C7): center, focus (keep the subject) or none (aspect buckets).

* ``center`` cuts the largest window of the target aspect ratio out of the
  middle of the image, then resizes it.
* ``focus`` first finds the subject (:func:`find_subject`: faces with OpenCV's
  Haar cascades -- frontal, profile, cat -- and otherwise a spectral-residual
  saliency map, grown to the whole object when the background is plain) and
  slides the same window so the subject stays inside it.
* ``none`` keeps the whole picture: it is resized into the aspect-ratio bucket
  nearest its own shape (kohya-style buckets of about constant area), as the
  training dataloader does.

:func:`crop_retention` measures how often a mode keeps a known subject box
(:func:`toy_crop_set`, :func:`astronaut_crop_set`; used by notebook 02 and
``benchmarks/crop_retention.py``).

Boxes are ``(left, top, right, bottom)`` in pixels of the original image,
right/bottom exclusive, like PIL's ``Image.crop``.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lora_nb import LoraNbError
from lora_nb.folders import mask_path_for
from lora_nb.images import atomic_save_image, list_images, load_image
from lora_nb.toy import world

Box = tuple[int, int, int, int]
MODES = ("center", "focus", "none")

# Sizes the course offers (C6). The toy model is trained at 64 px: its sizes are
# the real ones scaled down by 8.
TARGET_SIZES: dict[str, tuple[int, int]] = {
    "512x512": (512, 512), "512x768": (512, 768), "768x512": (768, 512),
    "1024x1024": (1024, 1024), "832x1216": (832, 1216), "1216x832": (1216, 832),
    "896x1152": (896, 1152), "1152x896": (1152, 896),
    "64x64": (64, 64), "64x96": (64, 96), "96x64": (96, 64),
}

# Pictures with a shorter side under this are not searched for faces: the detectors' smallest face (20 px)
# would be a third of the picture, and on thumbnails they mostly fire on anything with two dark spots.
MIN_FACE_IMAGE_SIDE = 96

FACE_CASCADES = (
    ("frontal", "haarcascade_frontalface_default.xml"),
    ("frontal_alt2", "haarcascade_frontalface_alt2.xml"),
    ("profile", "haarcascade_profileface.xml"),
    ("cat", "haarcascade_frontalcatface.xml"),
)


def parse_size(size) -> tuple[int, int]:
    """``(w, h)``, ``[w, h]``, ``"512x768"`` or ``512`` (square) -> ``(w, h)``; a clear error otherwise."""
    try:
        if isinstance(size, str):
            w, h = (int(v) for v in size.lower().replace("×", "x").split("x"))
        elif isinstance(size, (int, np.integer)):
            w = h = int(size)
        else:
            w, h = (int(v) for v in size)
    except (ValueError, TypeError):
        raise LoraNbError(f"size={size!r} is not a size: use 'WIDTHxHEIGHT' such as '512x768', or (512, 768).") from None
    if w < 8 or h < 8:
        raise LoraNbError(f"size={size!r} is too small: both sides must be at least 8 px.")
    return w, h


# --------------------------------------------------------------------------- subject finding

def _to_gray(img: Image.Image, max_side: int) -> tuple[np.ndarray, float]:
    """Grayscale array of ``img`` downscaled so its long side is at most ``max_side``, and the scale used."""
    scale = min(1.0, max_side / max(img.size))
    small = img.convert("L")
    if scale < 1.0:
        small = small.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                             Image.Resampling.BILINEAR)
    return np.asarray(small), scale


@functools.lru_cache(maxsize=8)
def _load_cascade(file_name: str):
    """An OpenCV cascade from the files opencv-python ships (loaded once per process, on first use)."""
    import cv2

    path = os.path.join(cv2.data.haarcascades, file_name)
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise LoraNbError(f"OpenCV cascade {path} could not be loaded: reinstall opencv-python-headless<5.")
    return cascade


def find_faces(img: Image.Image, cascades=FACE_CASCADES, min_face: float = 0.06, max_side: int = 480,
               min_neighbors: int = 5) -> tuple[list[Box], str | None]:
    """Faces in ``img`` with OpenCV's Haar cascades, tried in order until one finds something.

    ``min_face`` is the smallest face side as a share of the image's shorter
    side (smaller detections are mostly false alarms). Profile faces are also
    searched in the mirrored image (the cascade only knows one side). Returns
    the face boxes in original pixels and the name of the cascade that found them.
    """
    # No histogram equalisation: on flat or noisy backgrounds it makes the cascades see faces everywhere.
    gray, scale = _to_gray(img, max_side)
    min_px = max(20, int(min_face * min(gray.shape)))
    for name, file_name in cascades:
        cascade = _load_cascade(file_name)
        found = [tuple(int(v) for v in f) for f in cascade.detectMultiScale(
            gray, scaleFactor=1.1, minNeighbors=min_neighbors, minSize=(min_px, min_px))]
        if name == "profile":
            w = gray.shape[1]
            flipped = cascade.detectMultiScale(gray[:, ::-1].copy(), scaleFactor=1.1, minNeighbors=min_neighbors,
                                               minSize=(min_px, min_px))
            found += [(w - int(x) - int(fw), int(y), int(fw), int(fh)) for x, y, fw, fh in flipped]
        if found:
            boxes = [(round(x / scale), round(y / scale), round((x + fw) / scale), round((y + fh) / scale))
                     for x, y, fw, fh in found]
            return boxes, name
    return [], None


def spectral_residual_saliency(img: Image.Image, width: int = 64, blur_sigma: float = 2.5) -> np.ndarray:
    """Saliency map (Hou & Zhang 2007, spectral residual), values 0..1, at a small resolution.

    The log amplitude spectrum of natural images is smooth; what sticks out of
    it (the residual) belongs to the unexpected parts of the picture. Computed
    per channel of the Lab colour space so colour contrast counts too, on a
    mirror-padded copy so the image borders do not light up. The map is
    ``width`` pixels wide with the image's aspect ratio.
    """
    import cv2

    height = max(8, round(width * img.height / img.width))
    small = np.asarray(img.convert("RGB").resize((width, height), Image.Resampling.BILINEAR))
    lab = cv2.cvtColor(small, cv2.COLOR_RGB2LAB).astype(np.float32)
    if float(lab.std(axis=(0, 1)).max()) < 1.0:  # a flat picture: nothing stands out
        return np.zeros((height, width), np.float64)
    py, px = height // 4, width // 4
    lab = np.pad(lab, ((py, py), (px, px), (0, 0)), mode="reflect")
    total = np.zeros(lab.shape[:2], np.float64)
    for c in range(3):
        f = np.fft.fft2(lab[..., c])
        log_amp = np.log(np.abs(f) + 1e-8)
        phase = np.angle(f)
        residual = log_amp - cv2.blur(log_amp, (3, 3), borderType=cv2.BORDER_REPLICATE)
        total += np.abs(np.fft.ifft2(np.exp(residual + 1j * phase))) ** 2
    total = cv2.GaussianBlur(total, (0, 0), blur_sigma)[py:py + height, px:px + width]
    lo, hi = total.min(), total.max()
    return (total - lo) / (hi - lo) if hi > lo else np.zeros_like(total)


def salient_regions(img: Image.Image, width: int = 64, threshold: float = 3.0) -> list[tuple[Box, float]]:
    """Salient regions of ``img`` as ``(box in original pixels, saliency mass)``, strongest first.

    Pixels of the saliency map above ``threshold`` times its mean (at most
    0.6 of its peak) form the regions (8-connected).
    """
    import cv2

    sal = spectral_residual_saliency(img, width)
    mask = (sal > min(threshold * sal.mean(), 0.6 * sal.max())).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    sx, sy = img.width / sal.shape[1], img.height / sal.shape[0]
    regions = []
    for i in range(1, n):
        x, y = stats[i, cv2.CC_STAT_LEFT], stats[i, cv2.CC_STAT_TOP]
        w, h = stats[i, cv2.CC_STAT_WIDTH], stats[i, cv2.CC_STAT_HEIGHT]
        box = (max(0, math.floor(x * sx)), max(0, math.floor(y * sy)),
               min(img.width, math.ceil((x + w) * sx)), min(img.height, math.ceil((y + h) * sy)))
        regions.append((box, float(sal[labels == i].sum())))
    return sorted(regions, key=lambda r: -r[1])


def salient_box(img: Image.Image, width: int = 64, threshold: float = 3.0, min_share: float = 0.25) -> Box | None:
    """Box around the salient regions holding at least ``min_share`` of the strongest one's mass; ``None`` if none."""
    regions = salient_regions(img, width, threshold)
    if not regions:
        return None
    return union_box([b for b, m in regions if m >= min_share * regions[0][1]])


def union_box(boxes: list[Box]) -> Box:
    """The smallest box containing all ``boxes``."""
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def expand_box(box: Box, image_size: tuple[int, int], left: float = 0.0, top: float = 0.0,
               right: float = 0.0, bottom: float = 0.0) -> Box:
    """Grow ``box`` by shares of its width/height on each side, clipped to the image."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    return (max(0, round(x0 - left * w)), max(0, round(y0 - top * h)),
            min(image_size[0], round(x1 + right * w)), min(image_size[1], round(y1 + bottom * h)))


def locate_subject(img: Image.Image, use_faces: bool = True, use_saliency: bool = True,
                   min_share: float = 0.25) -> tuple[Box, str, Box | None]:
    """Like :func:`find_subject`, plus the subject's core: ``(box, method, core)``.

    For faces the box is the faces grown to the whole head and the core the
    faces themselves; for saliency the box surrounds all strong regions and
    the core is the strongest one -- or, on a plain or softly varying
    background, the box and core are the whole object (:func:`object_box`).
    A crop keeps the core when the box does not fit.
    """
    if use_faces and min(img.size) >= MIN_FACE_IMAGE_SIDE:
        faces, name = find_faces(img)
        if faces:
            biggest = max((b[2] - b[0]) * (b[3] - b[1]) for b in faces)
            core = union_box([b for b in faces if (b[2] - b[0]) * (b[3] - b[1]) >= 0.5 * biggest])
            return expand_box(core, img.size, 0.25, 0.45, 0.25, 0.35), f"face:{name}", core
    if use_saliency:
        regions = salient_regions(img)
        if regions:
            box = union_box([b for b, m in regions if m >= min_share * regions[0][1]])
            grown = object_box(img, regions[0][0])
            if grown is not None:  # the object standing out from a plain background: trust it over scattered regions
                return grown, "saliency+object", grown
            return box, "saliency", regions[0][0]
    return (0, 0, img.width, img.height), "none", None


def object_box(img: Image.Image, seed_box: Box, max_side: int = 256, max_share: float = 0.5) -> Box | None:
    """The whole object around ``seed_box`` when it stands out from a fairly plain background; else ``None``.

    Saliency lights up edges and details (eyes, corners) more than the flat
    inside of an object, so its box can miss part of the object. On a plain or
    softly varying background (product shots, studio photos, the toy world) the
    object is the set of pixels far in colour from the border's colour: the
    connected parts of that mask touching ``seed_box`` give the full object (when
    none touches it, saliency was drawn to background texture: the largest part is taken).
    Returns ``None`` when the background is too busy for this (the mask would be
    more than ``max_share`` of the picture, or touches nothing).
    """
    import cv2

    scale = min(1.0, max_side / max(img.size))
    small = img.convert("RGB")
    if scale < 1.0:
        small = small.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                             Image.Resampling.BILINEAR)
    arr = np.asarray(small, np.float32)
    h, w, _ = arr.shape
    # the background as a plane per channel fitted to the border pixels (a gradient counts as background)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    edge = np.zeros((h, w), bool)
    edge[:2], edge[-2:], edge[:, :2], edge[:, -2:] = True, True, True, True
    design = np.stack([np.ones(h * w, np.float32), xx.ravel() / w - 0.5, yy.ravel() / h - 0.5], 1)
    coef, *_ = np.linalg.lstsq(design[edge.ravel()], arr[edge], rcond=None)
    dist = np.linalg.norm(arr - (design @ coef).reshape(h, w, 3), axis=2)
    threshold = max(60.0, 1.5 * float(np.percentile(dist[edge], 95)))
    mask = (dist > threshold).astype(np.uint8)
    if mask.mean() > max_share:
        return None
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    x0, y0, x1, y1 = (math.floor(seed_box[0] * scale), math.floor(seed_box[1] * scale),
                      math.ceil(seed_box[2] * scale), math.ceil(seed_box[3] * scale))
    touching = set(np.unique(labels[y0:y1, x0:x1]).tolist()) - {0}
    if not touching and n > 1:  # saliency picked background texture: take the largest object instead
        touching = {int(np.argmax(stats[1:, cv2.CC_STAT_AREA])) + 1}
    boxes = []
    for i in touching:
        bx, by = stats[i, cv2.CC_STAT_LEFT], stats[i, cv2.CC_STAT_TOP]
        bw, bh = stats[i, cv2.CC_STAT_WIDTH], stats[i, cv2.CC_STAT_HEIGHT]
        if stats[i, cv2.CC_STAT_AREA] < 0.002 * h * w:
            continue
        boxes.append((max(0, math.floor(bx / scale)), max(0, math.floor(by / scale)),
                      min(img.width, math.ceil((bx + bw) / scale)), min(img.height, math.ceil((by + bh) / scale))))
    if not boxes:
        return None
    box = union_box(boxes)
    if (box[2] - box[0]) * (box[3] - box[1]) > max_share * img.width * img.height:
        return None
    return box


def find_subject(img: Image.Image, use_faces: bool = True, use_saliency: bool = True) -> tuple[Box, str]:
    """Where the main subject is: ``(box, method)``.

    Faces come first (``method`` is ``"face:frontal"``, ``"face:profile"``,
    ``"face:cat"`` ...): the box covers the head around every face at least
    half as large as the largest one. Without faces, the spectral-residual
    saliency map decides (``"saliency"``; ``"saliency+object"`` when it was grown to the whole object standing
    out from a plain background, see :func:`object_box`). When nothing stands out the whole
    image is the subject (``"none"``), and focus crop behaves like center crop.
    """
    box, method, _ = locate_subject(img, use_faces, use_saliency)
    return box, method


# --------------------------------------------------------------------------- crop windows

def window_size(image_size: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """The largest window with the aspect ratio of ``size`` that fits in ``image_size``."""
    iw, ih = image_size
    tw, th = size
    if iw * th >= ih * tw:  # image wider than target: full height
        return max(1, min(iw, round(ih * tw / th))), ih
    return iw, max(1, min(ih, round(iw * th / tw)))


def _place(start_lo: int, length: int, total: int, s0: int, s1: int, ideal: float) -> int:
    """Start of a window of ``length`` in ``[0, total]`` containing ``[s0, s1]`` if possible, near ``ideal``."""
    lo, hi = max(0, s1 - length), min(total - length, s0)
    pos = round(ideal)
    if lo <= hi:
        pos = min(max(pos, lo), hi)
    return int(min(max(pos, 0), total - length))


def crop_box(image_size: tuple[int, int], size, mode: str = "center", subject: Box | None = None,
             core: Box | None = None) -> Box:
    """The crop window (in original pixels) for ``mode`` ``"center"`` or ``"focus"``.

    Focus keeps ``subject`` inside the window when it fits, centred on it as far
    as the image allows; if the subject is larger than the window, ``core``
    (e.g. the face itself inside a head-and-shoulders box) is kept instead, and
    failing that the window is centred on the subject.
    """
    size = parse_size(size)
    iw, ih = image_size
    cw, ch = window_size(image_size, size)
    if mode == "center" or subject is None:
        x0, y0 = (iw - cw) // 2, (ih - ch) // 2
        return (x0, y0, x0 + cw, y0 + ch)
    if mode != "focus":
        raise LoraNbError(f"crop mode={mode!r} has no window: use 'center' or 'focus' (or 'none' for buckets).")
    positions = []
    for axis, (length, total) in enumerate(((cw, iw), (ch, ih))):
        s0, s1 = subject[axis], subject[axis + 2]
        if s1 - s0 > length and core is not None:
            s0, s1 = core[axis], core[axis + 2]
        positions.append(_place(0, length, total, s0, s1, (s0 + s1) / 2 - length / 2))
    x0, y0 = positions
    return (x0, y0, x0 + cw, y0 + ch)


def box_inside(inner: Box, outer: Box) -> bool:
    """Whether ``inner`` lies completely inside ``outer``."""
    return inner[0] >= outer[0] and inner[1] >= outer[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


@dataclass
class CropResult:
    """A cropped image and how it was made (for before/after grids and the benchmark)."""

    image: Image.Image
    box: Box                        # the window cut from the original (original pixels)
    mode: str
    method: str = ""                # how the subject was found (focus), or the bucket (none)
    subject: Box | None = None      # the subject box found (focus)
    source_size: tuple[int, int] = (0, 0)
    notes: list[str] = field(default_factory=list)


def crop_image(img: Image.Image, size=(512, 512), mode: str = "focus", subject: Box | None = None,
               buckets: list[tuple[int, int]] | None = None, max_upscale: float = 2.0,
               resample: Image.Resampling = Image.Resampling.LANCZOS) -> CropResult:
    """Crop and resize ``img`` to ``size`` (w, h) with ``mode`` ``"center"``, ``"focus"`` or ``"none"``.

    ``subject`` overrides subject finding for focus (a box you know). Mode
    ``"none"`` does not crop to ``size``: the image goes into its nearest
    aspect-ratio bucket (``buckets``, by default :func:`make_buckets` for the
    area of ``size``), never enlarged more than ``max_upscale``. Returns a
    :class:`CropResult` (``.image``, ``.box`` ...).
    """
    if mode not in MODES:
        raise LoraNbError(f"crop mode={mode!r} is not known: use one of {', '.join(MODES)}.")
    size = parse_size(size)
    img = img if img.mode == "RGB" else img.convert("RGB")
    if mode == "none":
        if buckets is None:
            step = 8 if max(size) <= 128 else 64
            buckets = make_buckets(size, step=step)
        bucket = bucket_for_image(img.width, img.height, buckets, max_upscale=max_upscale)
        out, box = resize_to_bucket(img, bucket, max_upscale=max_upscale)
        return CropResult(out, box, mode, f"bucket {bucket[0]}x{bucket[1]}", None, img.size)
    notes = []
    core = None
    method = ""
    if mode == "focus":
        if subject is None:
            subject, method, core = locate_subject(img)
        else:
            method = "given"
    box = crop_box(img.size, size, mode, subject, core)
    window = img.crop(box)
    scale = max(size[0] / window.width, size[1] / window.height)
    if scale > max_upscale:
        notes.append(f"enlarged {scale:.1f}x (more than {max_upscale}x): expect a soft image")
    return CropResult(window.resize(size, resample), box, mode, method, subject, img.size, notes)


def subject_mask(result: CropResult) -> Image.Image | None:
    """A loss mask for ``dataset.masked_loss`` from the subject box focus crop found: white (learn) inside the
    box as it lands in the cropped picture, black (ignore) outside; None when no subject was found. A box is
    coarse — some background inside it is learned — but it keeps the loss off the rest of the scene."""
    if result.subject is None or result.mode != "focus":
        return None
    (x0, y0, x1, y1), (w, h) = result.box, result.image.size
    sx, sy = w / (x1 - x0), h / (y1 - y0)
    a0, b0, a1, b1 = result.subject
    left, top = max(0, round((a0 - x0) * sx)), max(0, round((b0 - y0) * sy))
    right, bottom = min(w, round((a1 - x0) * sx)), min(h, round((b1 - y0) * sy))
    if right <= left or bottom <= top:
        return None
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).rectangle((left, top, right - 1, bottom - 1), fill=255)
    return mask


# --------------------------------------------------------------------------- aspect-ratio buckets

def make_buckets(base=(512, 512), step: int = 64, min_side: int | None = None, max_side: int | None = None,
                 max_area: int | None = None) -> list[tuple[int, int]]:
    """Kohya-style aspect-ratio buckets: sides in multiples of ``step``, area at most ``max_area``.

    ``base`` is the training size (its area is ``max_area`` unless given).
    For every width from ``min_side`` to ``max_side`` the tallest height that
    keeps the area under the limit is taken, so all buckets hold about as
    many pixels as the base size. Defaults: sides from half to twice the base
    side. Use ``step=64`` for SD1.5/SDXL and ``step=8`` for the 64 px toy model.
    Returns the buckets sorted by aspect ratio (w/h), each ``(w, h)``.
    """
    bw, bh = parse_size(base)
    if step < 1:
        raise LoraNbError(f"bucket step={step}: must be at least 1 (64 for real models, 8 for the toy model).")
    max_area = max_area or bw * bh
    side = int(math.sqrt(max_area)) // step * step
    min_side = min_side or max(step, side // 2 // step * step)
    max_side = max_side or side * 2
    if min_side > max_side or min_side < step:
        raise LoraNbError(f"buckets: min_side={min_side}, max_side={max_side}, step={step} leave no bucket.")
    buckets = {(side, side)}
    w = min_side // step * step or step
    while w <= max_side:
        h = min(max_side, (max_area // w) // step * step)
        if h >= min_side:
            buckets.add((w, h))
            buckets.add((h, w))
        w += step
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))


def assign_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (log-ratio distance; ties -> larger bucket)."""
    if not buckets:
        raise LoraNbError("assign_bucket got no buckets: build them with make_buckets().")
    ar = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ar), -b[0] * b[1]))


def bucket_for_image(width: int, height: int, buckets: list[tuple[int, int]], max_upscale: float = 1.0,
                     step: int | None = None) -> tuple[int, int]:
    """The nearest-aspect bucket, shrunk when filling it would enlarge the image more than ``max_upscale``.

    Like sd-scripts' ``bucket_no_upscale``: a small image gets a bucket of its
    own shape (sides rounded down to ``step``, the buckets' step by default)
    instead of being blown up.
    """
    bucket = assign_bucket(width, height, buckets)
    scale = max(bucket[0] / width, bucket[1] / height)
    if scale <= max_upscale:
        return bucket
    if step is None:
        sides = [s for b in buckets for s in b]
        step = math.gcd(*sides) if len(sides) > 1 else 8
    w = int(width * max_upscale) // step * step
    h = int(height * max_upscale) // step * step
    if w < step or h < step:
        raise LoraNbError(f"An image of {width}x{height} px is too small for buckets in steps of {step}: remove it.")
    return (w, h)


def resize_to_bucket(img: Image.Image, bucket: tuple[int, int], max_upscale: float = 2.0,
                     resample: Image.Resampling = Image.Resampling.LANCZOS) -> tuple[Image.Image, Box]:
    """Resize ``img`` to cover ``bucket`` and cut the small remainder from the centre (what kohya does).

    Refuses (:class:`LoraNbError`) to enlarge more than ``max_upscale``; use
    :func:`bucket_for_image` to pick a bucket that respects the limit. Returns
    the image and the box of the original that it shows.
    """
    bw, bh = bucket
    scale = max(bw / img.width, bh / img.height)
    if scale > max_upscale + 1e-9:
        raise LoraNbError(
            f"Fitting a {img.width}x{img.height} image into the {bw}x{bh} bucket enlarges it {scale:.2f}x "
            f"(limit max_upscale={max_upscale}): use a larger image, or pick the bucket with bucket_for_image()."
        )
    # the window of the original that fills the bucket (within the picture: rounding may overshoot by a hair)
    cw, ch = min(bw / scale, img.width), min(bh / scale, img.height)
    x0, y0 = max(0.0, (img.width - cw) / 2), max(0.0, (img.height - ch) / 2)
    box = (round(x0), round(y0), round(x0 + cw), round(y0 + ch))
    out = img.resize(bucket, resample, box=(x0, y0, x0 + cw, y0 + ch))
    return out, box


# --------------------------------------------------------------------------- folders and grids

@dataclass
class CropFolderReport:
    """What :func:`crop_folder` wrote and skipped."""

    results: list[tuple[str, str, Box, str]] = field(default_factory=list)  # (source, written, box, method)
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"results": [list(r[:2]) + [list(r[2]), r[3]] for r in self.results], "skipped": dict(self.skipped)}


def crop_folder(src, dest, size=(512, 512), mode: str = "focus", ext: str = ".png",
                max_upscale: float = 2.0, buckets: list[tuple[int, int]] | None = None,
                background: tuple[int, int, int] = (255, 255, 255), progress: bool = True,
                masks: bool = False) -> CropFolderReport:
    """Crop every image in ``src`` (a folder or a list of paths) into ``dest`` with :func:`crop_image`.

    Output names keep the source stem with ``ext``; files are written
    atomically. Unreadable images are skipped and listed, never raised. With ``masks`` (focus mode) each
    picture whose subject was found gets its :func:`subject_mask` beside it as ``<stem>.mask.png``.
    """
    from tqdm.auto import tqdm

    paths = list_images(src) if isinstance(src, (str, Path)) and Path(src).is_dir() else [Path(p) for p in src]
    if not paths:
        raise LoraNbError(f"crop_folder: no images found in {src}. Import images first (import_images).")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    report = CropFolderReport()
    used: set[str] = set()
    for p in tqdm(paths, desc=f"cropping ({mode})", unit="img", disable=not progress):
        try:
            img = load_image(p, background)
            res = crop_image(img, size, mode, buckets=buckets, max_upscale=max_upscale)
        except LoraNbError as exc:
            report.skipped[str(p)] = str(exc)
            continue
        name = p.stem + ext
        n = 1
        while name.lower() in used:
            name = f"{p.stem}-{n}{ext}"
            n += 1
        used.add(name.lower())
        out = atomic_save_image(res.image, dest / name)
        mask = subject_mask(res) if masks else None
        if mask is not None:
            atomic_save_image(mask, mask_path_for(out))
        report.results.append((str(p), str(out), res.box, res.method))
    return report


def draw_boxes(img: Image.Image, boxes: list[Box], colors=((255, 40, 40), (40, 200, 255), (255, 220, 0)),
               width: int | None = None) -> Image.Image:
    """A copy of ``img`` with ``boxes`` outlined (first box in the first colour ...)."""
    out = img.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    width = width or max(2, round(max(img.size) / 150))
    for i, box in enumerate(boxes):
        if box is not None:
            draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], outline=colors[i % len(colors)], width=width)
    return out


def _fit(img: Image.Image, cell: int) -> Image.Image:
    scale = cell / max(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.LANCZOS)


def before_after_grid(pairs: list[tuple[Image.Image, CropResult]], cell: int = 256, labels: bool = True,
                      background: tuple[int, int, int] = (32, 32, 32)) -> Image.Image:
    """One row per image: the original with the crop window (red) and subject (blue), then the result.

    ``pairs`` are ``(original, crop_result)``; several results per original
    can be compared by repeating the original. Returns a PIL image to display.
    """
    if not pairs:
        raise LoraNbError("before_after_grid got nothing to show: pass [(original, crop_image(...)), ...].")
    pad, text_h = 6, (40 if labels else 0)  # three lines: mode, method, size (a long name is never cut)
    grid = Image.new("RGB", (2 * cell + 3 * pad, len(pairs) * (cell + text_h + pad) + pad), background)
    draw = ImageDraw.Draw(grid)
    for row, (orig, res) in enumerate(pairs):
        y = pad + row * (cell + text_h + pad)
        left = _fit(draw_boxes(orig, [res.box, res.subject]), cell)
        right = _fit(res.image, cell)
        grid.paste(left, (pad + (cell - left.width) // 2, y + text_h + (cell - left.height) // 2))
        grid.paste(right, (2 * pad + cell + (cell - right.width) // 2, y + text_h + (cell - right.height) // 2))
        if labels:
            draw.text((pad, y), f"{orig.width}x{orig.height}", fill=(230, 230, 230))
            lines = [res.mode] + ([f"({res.method})"] if res.method else []) + [f"-> {res.image.width}x{res.image.height}"]
            for k, line in enumerate(lines):
                draw.text((2 * pad + cell, y + 13 * k), line, fill=(230, 230, 230))
    return grid


# --------------------------------------------------------------------------- measuring crops (C7)

CropSample = tuple[Image.Image, Box, tuple[int, int], str]  # (image, truth box of the subject, target size, label)

# (canvas, target) pairs in the toy world's sizes: the target's shape differs from the canvas, so a crop cuts
TOY_CROP_LAYOUTS = [((96, 64), (64, 64)), ((64, 96), (64, 64)), ((64, 64), (64, 96)), ((64, 64), (96, 64)),
                    ((96, 64), (64, 96)), ((64, 96), (96, 64))]
ASTRONAUT_FACE = (168, 70, 285, 172)  # the face (hairline to chin, ear to ear) in skimage's 512x512 astronaut
ASTRONAUT_LAYOUTS = [((1024, 512), (512, 512)), ((512, 1024), (512, 512)), ((512, 512), (768, 512)),
                     ((900, 600), (512, 768)), ((1216, 832), (1024, 1024))]


def toy_crop_set(n: int = 60, seed: int = 0, off_centre: float = 0.15,
                 layouts=TOY_CROP_LAYOUTS) -> list[CropSample]:
    """``n`` toy-world pictures of a zorb off-centre on a canvas whose shape differs from the target.

    The truth box is the zorb's drawn box (known exactly). "Off-centre": the
    zorb's centre is at least ``off_centre`` of the canvas away from the middle
    along the side the crop cuts. Backgrounds are plain, gradient or striped. The zorbs are 24–34 px across,
    smaller than every crop window of the layouts, so a crop that loses one is the crop's fault.
    """

    out: list[CropSample] = []
    index = 0
    while len(out) < n:
        canvas, target = layouts[len(out) % len(layouts)]
        scene = world.sample_scene(seed, index, canvas, zorb=True, background_style=None, size_range=(24, 34),
                                   zorb_sizes=(24, 34))
        index += 1
        obj = scene.objects[0]
        cw, _ = window_size(canvas, target)
        centre, span = (obj.cx, canvas[0]) if cw < canvas[0] else (obj.cy, canvas[1])
        if abs(centre - span / 2) < off_centre * span:
            continue
        x0, y0, x1, y1 = obj.bbox
        truth = (max(0, x0), max(0, y0), min(canvas[0], x1), min(canvas[1], y1))
        image = Image.fromarray(world.render_scene(scene))
        out.append((image, truth, target, f"toy {canvas[0]}x{canvas[1]}->{target[0]}x{target[1]}"))
    return out


def astronaut_crop_set(n: int = 10, seed: int = 0, layouts=ASTRONAUT_LAYOUTS) -> list[CropSample]:
    """The astronaut photo (scikit-image, offline) pasted off-centre on wider or taller canvases.

    The backdrop is a blurred copy of another sample photo; the truth box is
    her face, marked by hand (:data:`ASTRONAUT_FACE`) and moved with the paste.
    """
    from PIL import ImageFilter
    from skimage import data

    rng = np.random.default_rng(seed)
    astro = Image.fromarray(data.astronaut())
    backdrop = Image.fromarray(data.coffee()).convert("RGB")
    out: list[CropSample] = []
    for i in range(n):
        canvas, target = layouts[i % len(layouts)]
        w, h = canvas
        scale = min(w, h) / 512 * rng.uniform(0.75, 1.0)
        a = astro.resize((round(512 * scale), round(512 * scale)), Image.Resampling.LANCZOS)
        bg = backdrop.resize(canvas).filter(ImageFilter.GaussianBlur(8))
        x = int(rng.integers(0, w - a.width + 1))
        y = int(rng.integers(0, h - a.height + 1))
        if w - a.width > 0:  # push to a side: off-centre
            x = int(rng.choice([rng.integers(0, max(1, (w - a.width) // 4) + 1),
                                rng.integers(3 * (w - a.width) // 4, w - a.width + 1)]))
        bg.paste(a, (x, y))
        face = tuple(round(v * scale) + off for v, off in zip(ASTRONAUT_FACE, (x, y, x, y)))
        out.append((bg, face, target, f"astronaut {w}x{h}->{target[0]}x{target[1]}"))
    return out


def crop_retention(samples: list[CropSample], mode: str) -> tuple[float, list[str]]:
    """Share of ``samples`` whose truth box lies wholly inside the crop window of ``mode``, and the misses."""
    if not samples:
        raise LoraNbError("crop_retention got no samples: build some with toy_crop_set() or astronaut_crop_set().")
    kept, misses = 0, []
    for img, truth, target, label in samples:
        res = crop_image(img, target, mode)
        if box_inside(truth, res.box):
            kept += 1
        else:
            misses.append(f"{label} truth={truth} window={res.box} found={res.subject} via {res.method or mode}")
    return kept / len(samples), misses


def retention_table(sets: dict[str, list[CropSample]], modes=("center", "focus")) -> list[dict]:
    """One row per set: ``{"set", "n", <mode>: share kept, ...}``, plus an ``"all"`` row weighted by size."""
    rows = []
    for name, samples in sets.items():
        row = {"set": name, "n": len(samples)}
        for mode in modes:
            row[mode] = round(crop_retention(samples, mode)[0], 4)
        rows.append(row)
    total = sum(r["n"] for r in rows)
    rows.append({"set": "all", "n": total, **{m: round(sum(r[m] * r["n"] for r in rows) / max(1, total), 4)
                                            for m in modes}})
    return rows
