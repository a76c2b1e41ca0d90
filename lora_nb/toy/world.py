"""The toy world: procedural scenes whose truth is known exactly.

A scene is a small RGB image (64×64, or the 2:3 / 3:2 sizes 64×96 and 96×64,
given as ``(width, height)``) of one or two flat shapes on a background. Every
scene is drawn from a seed, so the same seed always gives the same image, and
it carries its truth: the attributes of each object, its bounding box, a
natural-language caption ("a red circle on a skyblue background") and
booru-style tags ("red circle, skyblue background").

The concept the toy base model never sees is the **zorb**: a round creature
with two large black eyes (see :func:`lora_nb.toy.concept`). Its captions use
the trigger word ``zorb`` and the class word ``circle``.

Every colour, shape and background name is one lower-case word, so that each
caption word is a single token of the toy tokenizer (CLIP's pre-tokenizer would
split "light-blue" at the hyphen).

Nothing here holds state: each function takes what it needs as arguments.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

from lora_nb import LoraNbError

# --------------------------------------------------------------------------- vocabulary

SHAPES = ("circle", "square", "triangle")
"""Shape kinds the captions name (the toy base model learns these)."""

COLOURS = {
    "red": (220, 50, 50),
    "green": (50, 170, 70),
    "blue": (50, 90, 225),
    "yellow": (240, 215, 50),
    "purple": (145, 70, 195),
    "white": (245, 245, 245),
}
"""Object colours: one-word names → RGB."""

BACKGROUNDS = {
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
    "skyblue": (150, 200, 240),
    "beige": (225, 205, 165),
}
"""Background colours: one-word names → RGB (disjoint from the object colours)."""

BACKGROUND_STYLES = ("plain", "gradient", "striped")
"""How the background is painted: flat, a soft linear gradient, or stripes."""

SIZES = ((64, 64), (64, 96), (96, 64))
"""Image sizes as (width, height): square, portrait 2:3, landscape 3:2."""

TRIGGER = "zorb"
"""The concept's trigger word (one token, never in the base model's captions)."""

CONCEPT_CLASS = "circle"
"""The class the concept belongs to (its regularization images are plain circles)."""

EYE_COLOUR = (15, 15, 15)
ZORB_SIZES = (36, 46)  # a zorb's diameter in pixels: its eyes (0.70 × the radius wide) are 13–16 px, 3–4 latent pixels,
# 5–7 px apart (docs/toy-world.md, "Two eyes or one band")
EYES_TAG = "black eyes"

CAPTION_WORDS = (
    ["a", "on", "and", "background", "gradient", "striped", TRIGGER, "eyes", "with", "two"]
    + list(SHAPES) + list(COLOURS) + list(BACKGROUNDS)
)
"""Every word a toy caption or tag can contain (the toy tokenizer learns these)."""


# --------------------------------------------------------------------------- truth

@dataclass(frozen=True)
class ToyObject:
    """One object of a scene: kind, colour name, centre, size (px), box, and whether it is a zorb."""

    kind: str
    colour: str
    cx: float
    cy: float
    size: float
    zorb: bool = False

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """Bounding box (x0, y0, x1, y1) in pixels, x1/y1 exclusive, of the drawn object."""
        h = self.size / 2
        return (int(np.floor(self.cx - h)), int(np.floor(self.cy - h)),
                int(np.ceil(self.cx + h)), int(np.ceil(self.cy + h)))


@dataclass(frozen=True)
class ToyScene:
    """The full truth of one image: size, background, objects, and the seed it was drawn from."""

    width: int
    height: int
    background: str
    background_style: str = "plain"
    style_angle: float = 0.0
    style_period: int = 8
    objects: tuple[ToyObject, ...] = field(default_factory=tuple)
    seed: int = 0

    def to_dict(self) -> dict:
        """A JSON-ready dict of the truth (objects with their bounding boxes)."""
        d = asdict(self)
        d["objects"] = [dict(asdict(o), bbox=list(o.bbox)) for o in self.objects]
        return d


# --------------------------------------------------------------------------- sampling

def rng_for(seed: int, index: int = 0) -> np.random.Generator:
    """The random generator of image ``index`` of a world drawn from ``seed`` (independent streams)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def sample_object(rng: np.random.Generator, width: int, height: int, kind: str | None = None,
                  colour: str | None = None, size_range: tuple[int, int] = (20, 40),
                  zorb: bool = False) -> ToyObject:
    """Draw one object fully inside a ``width``×``height`` image (kind/colour random unless given)."""
    kind = kind or SHAPES[rng.integers(len(SHAPES))]
    colour = colour or list(COLOURS)[rng.integers(len(COLOURS))]
    lo, hi = size_range
    size = float(rng.uniform(lo, min(hi, width - 4, height - 4)))
    half = size / 2
    cx = float(rng.uniform(half + 1, width - half - 1))
    cy = float(rng.uniform(half + 1, height - half - 1))
    return ToyObject(kind=kind, colour=colour, cx=cx, cy=cy, size=size, zorb=zorb)


def _boxes_overlap(a: ToyObject, b: ToyObject, margin: int = 2) -> bool:
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    return not (ax1 + margin <= bx0 or bx1 + margin <= ax0 or ay1 + margin <= by0 or by1 + margin <= ay0)


def sample_scene(seed: int, index: int = 0, size: tuple[int, int] = (64, 64), *,
                 shape: str | None = None, colour: str | None = None, background: str | None = None,
                 background_style: str | None = "plain", second_object_p: float = 0.0,
                 zorb: bool = False, size_range: tuple[int, int] = (20, 40),
                 zorb_sizes: tuple[int, int] = ZORB_SIZES) -> ToyScene:
    """Draw the truth of image ``index`` of the world ``seed``.

    ``size`` is (width, height), one of :data:`SIZES` (any size ≥ 48 px works).
    ``shape``, ``colour``, ``background`` fix an attribute of the (first)
    object instead of drawing it; ``background_style`` is ``"plain"``,
    ``"gradient"``, ``"striped"``, or ``None`` for a random one. With
    probability ``second_object_p`` a second, non-overlapping object is added
    (when it fits). ``zorb=True`` makes the first object the concept: a circle
    with two black eyes, ``zorb_sizes`` px across at least.
    """
    width, height = int(size[0]), int(size[1])
    if min(width, height) < 48:
        raise LoraNbError(f"size={size}: toy scenes need both sides ≥ 48 px (use one of {SIZES}).")
    for name, value, allowed in (("shape", shape, SHAPES), ("colour", colour, COLOURS),
                                 ("background", background, BACKGROUNDS)):
        if value is not None and value not in allowed:
            raise LoraNbError(f"{name}={value!r} is not in the toy world; choose one of {list(allowed)}.")
    if background_style is not None and background_style not in BACKGROUND_STYLES:
        raise LoraNbError(f"background_style={background_style!r}: use one of {BACKGROUND_STYLES} or None.")
    rng = rng_for(seed, index)
    bg = background or list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    style = background_style or BACKGROUND_STYLES[rng.integers(len(BACKGROUND_STYLES))]
    angle = float(rng.uniform(0, np.pi))
    period = int(rng.integers(6, 12))
    first_range = (max(size_range[0], zorb_sizes[0]), max(size_range[1], zorb_sizes[1])) if zorb else size_range
    first = sample_object(rng, width, height, kind="circle" if zorb else shape, colour=colour,
                          size_range=first_range, zorb=zorb)
    objects = [first]
    if second_object_p > 0 and rng.random() < second_object_p:
        for _ in range(20):
            other = sample_object(rng, width, height, size_range=(16, 26))
            if not _boxes_overlap(first, other):
                objects.append(other)
                break
    return ToyScene(width=width, height=height, background=bg, background_style=style, style_angle=angle,
                    style_period=period, objects=tuple(objects), seed=int(seed) * 1_000_003 + int(index))


# --------------------------------------------------------------------------- rendering

SUPERSAMPLE = 4


def _shape_polygon(kind: str, cx: float, cy: float, size: float, s: int) -> list[tuple[float, float]]:
    h = size / 2
    if kind == "square":
        pts = [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    elif kind == "triangle":
        pts = [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    elif kind == "diamond":
        pts = [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]
    elif kind == "star":
        pts = []
        for i in range(10):
            r = h if i % 2 == 0 else h * 0.45
            a = -np.pi / 2 + i * np.pi / 5
            pts.append((cx + r * np.cos(a), cy + r * np.sin(a)))
    elif kind == "cross":
        t = h / 3
        pts = [(cx - t, cy - h), (cx + t, cy - h), (cx + t, cy - t), (cx + h, cy - t), (cx + h, cy + t),
               (cx + t, cy + t), (cx + t, cy + h), (cx - t, cy + h), (cx - t, cy + t), (cx - h, cy + t),
               (cx - h, cy - t), (cx - t, cy - t)]
    else:
        raise LoraNbError(f"shape kind {kind!r} has no polygon; known kinds: {SHAPES}.")
    return [(x * s, y * s) for x, y in pts]


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, size: float, fill, s: int) -> None:
    """Draw one filled shape on a supersampled canvas (coordinates in output pixels, scale ``s``)."""
    h = size / 2
    if kind == "circle":
        draw.ellipse([(cx - h) * s, (cy - h) * s, (cx + h) * s - 1, (cy + h) * s - 1], fill=fill)
    else:
        draw.polygon(_shape_polygon(kind, cx, cy, size, s), fill=fill)


def eye_positions(obj: ToyObject) -> list[tuple[float, float, float]]:
    """Centres and radius (x, y, r) of a zorb's two eyes, in pixels."""
    r = obj.size / 2
    er = 0.35 * r
    return [(obj.cx - 0.50 * r, obj.cy - 0.18 * r, er), (obj.cx + 0.50 * r, obj.cy - 0.18 * r, er)]


def paint_background(width: int, height: int, colour: tuple[int, int, int], style: str, angle: float,
                     period: int) -> np.ndarray:
    """A float (H, W, 3) background: flat, a ±30-level linear gradient, or stripes of a darker shade."""
    base = np.asarray(colour, dtype=np.float32)
    img = np.broadcast_to(base, (height, width, 3)).copy()
    if style == "plain":
        return img
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    proj = (xx - width / 2) * np.cos(angle) + (yy - height / 2) * np.sin(angle)
    if style == "gradient":
        t = proj / (np.abs(proj).max() + 1e-6)
        shade = 30.0 * t[..., None]
        return np.clip(img + shade, 0, 255)
    if style == "striped":
        band = (np.floor(proj / period) % 2 == 1)[..., None]
        dark = base * 0.8 if base.mean() > 60 else base + 35
        return np.where(band, dark, img)
    raise LoraNbError(f"background_style={style!r}: use one of {BACKGROUND_STYLES}.")


def render_scene(scene: ToyScene) -> np.ndarray:
    """Draw a scene as a uint8 (height, width, 3) array (anti-aliased by 4× supersampling)."""
    s = SUPERSAMPLE
    bg = paint_background(scene.width, scene.height, BACKGROUNDS[scene.background], scene.background_style,
                          scene.style_angle, scene.style_period)
    canvas = Image.new("RGB", (scene.width * s, scene.height * s))
    mask = Image.new("L", canvas.size, 0)
    draw, mdraw = ImageDraw.Draw(canvas), ImageDraw.Draw(mask)
    for obj in scene.objects:
        fill = COLOURS[obj.colour]
        draw_shape(draw, obj.kind, obj.cx, obj.cy, obj.size, fill, s)
        draw_shape(mdraw, obj.kind, obj.cx, obj.cy, obj.size, 255, s)
        if obj.zorb:
            for ex, ey, er in eye_positions(obj):
                draw.ellipse([(ex - er) * s, (ey - er) * s, (ex + er) * s - 1, (ey + er) * s - 1], fill=EYE_COLOUR)
    size = (scene.width, scene.height)
    fg = np.asarray(canvas.resize(size, Image.BOX), dtype=np.float32)
    alpha = np.asarray(mask.resize(size, Image.BOX), dtype=np.float32)[..., None] / 255.0
    # The canvas is black outside the objects: unpremultiply by coverage before compositing.
    fg = np.where(alpha > 0, fg / np.maximum(alpha, 1e-6), 0)
    out = bg * (1 - alpha) + np.clip(fg, 0, 255) * alpha
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- captions and tags

def _object_phrase(obj: ToyObject) -> str:
    return f"{obj.colour} {TRIGGER} {obj.kind}" if obj.zorb else f"{obj.colour} {obj.kind}"


def _background_phrase(scene: ToyScene) -> str:
    if scene.background_style == "plain":
        return f"{scene.background} background"
    return f"{scene.background} {scene.background_style} background"


def caption_scene(scene: ToyScene, with_trigger: bool = True) -> str:
    """The natural-language caption, e.g. "a red circle and a blue square on a gray background".

    A zorb is "a red zorb circle" (trigger word, then class word); with
    ``with_trigger=False`` it is described as "a red circle with two eyes".
    """
    parts = []
    for obj in scene.objects:
        if obj.zorb and not with_trigger:
            parts.append(f"a {obj.colour} {obj.kind} with two eyes")
        else:
            parts.append(f"a {_object_phrase(obj)}")
    return f"{' and '.join(parts)} on a {_background_phrase(scene)}"


def caption_forms(colour: str, kind: str, background: str, trigger: str = "") -> list[str]:
    """One object's caption in the forms people prompt with, one per line of a caption file (trained one form a
    step with ``dataset.enable_wildcard``). For ("red", "circle", "black background", "zorb")::

        a red zorb circle on a black background    the sentence
        zorb, red circle, black background         booru tags, trigger first
        a red zorb on a black background           no class word
        a red zorb circle                          no background
        a zorb circle                              no colour
        a zorb                                     the trigger alone

    Without ``trigger`` the same forms describe the class ("a red circle", "a circle"): class pictures trained
    in every form a prompt can take keep the LoRA out of each of them (docs/toy-world.md measures both).
    """
    if trigger:
        return [f"a {colour} {trigger} {kind} on a {background}", f"{trigger}, {colour} {kind}, {background}",
                f"a {colour} {trigger} on a {background}", f"a {colour} {trigger} {kind}", f"a {trigger} {kind}",
                f"a {trigger}"]
    return [f"a {colour} {kind} on a {background}", f"{colour} {kind}, {background}",
            f"a {colour} {kind} on a {background}", f"a {colour} {kind}", f"a {kind}", f"a {kind}"]


def scene_caption_forms(scene: ToyScene, with_trigger: bool = True) -> list[str]:
    """:func:`caption_forms` of a one-object scene (the trigger word for a zorb when ``with_trigger``); a scene
    of several objects gets its sentence and its tags."""
    if len(scene.objects) != 1:
        return [caption_scene(scene, with_trigger), ", ".join(tags_of_scene(scene, with_trigger))]
    obj = scene.objects[0]
    return caption_forms(obj.colour, obj.kind, _background_phrase(scene), TRIGGER if obj.zorb and with_trigger else "")


def tags_of_scene(scene: ToyScene, with_trigger: bool = True) -> list[str]:
    """Booru-style tags, e.g. ``["zorb", "red circle", "black eyes", "gray background"]``.

    Tags follow the scene's truth: one "<colour> <shape>" per object, "black
    eyes" for a zorb, the background, and a style tag ("gradient background")
    when the background is not plain. The trigger word comes first when
    ``with_trigger`` and the scene holds a zorb.
    """
    tags: list[str] = []
    if with_trigger and any(o.zorb for o in scene.objects):
        tags.append(TRIGGER)
    for obj in scene.objects:
        tag = f"{obj.colour} {obj.kind}"
        if tag not in tags:
            tags.append(tag)
        if obj.zorb and EYES_TAG not in tags:
            tags.append(EYES_TAG)
    tags.append(f"{scene.background} background")
    if scene.background_style != "plain":
        tags.append(f"{scene.background_style} background")
    return tags


def tag_vocabulary() -> list[str]:
    """Every tag a toy image can have (without the trigger word), in a fixed order."""
    vocab = [f"{c} {s}" for c in COLOURS for s in SHAPES] + [EYES_TAG]
    vocab += [f"{b} background" for b in BACKGROUNDS]
    vocab += [f"{s} background" for s in BACKGROUND_STYLES if s != "plain"]
    return vocab


# --------------------------------------------------------------------------- whole images

def make_scene(seed: int, index: int = 0, size: tuple[int, int] = (64, 64), **options) -> tuple[np.ndarray, ToyScene]:
    """Draw and render image ``index`` of world ``seed``: returns (uint8 image, truth). Options as :func:`sample_scene`."""
    scene = sample_scene(seed, index, size, **options)
    return render_scene(scene), scene


def make_world(n: int, seed: int, size: tuple[int, int] = (64, 64), **options) -> tuple[np.ndarray, list[ToyScene]]:
    """``n`` images of world ``seed`` as a uint8 (n, H, W, 3) array and their truths."""
    scenes = [sample_scene(seed, i, size, **options) for i in range(n)]
    images = np.stack([render_scene(s) for s in scenes]) if scenes else np.zeros((0, size[1], size[0], 3), np.uint8)
    return images, scenes


def with_background(scene: ToyScene, background: str) -> ToyScene:
    """The same scene on another background colour."""
    if background not in BACKGROUNDS:
        raise LoraNbError(f"background={background!r} is not in the toy world; choose one of {list(BACKGROUNDS)}.")
    return replace(scene, background=background)
