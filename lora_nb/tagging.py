"""Taggers (C8-C9): BLIP sentences and WD-style booru tags with a confidence threshold.

* :func:`load_blip` -- BLIP image captioning with transformers
  (``Salesforce/blip-image-captioning-base`` / ``-large`` or a local folder):
  natural-language captions such as "a woman with black hair".
* :func:`load_wd_tagger` -- a WD v3 / WD14-style ONNX tagger (``model.onnx`` +
  ``selected_tags.csv``) run with onnxruntime: comma-separated tags with a
  confidence each; ``general_threshold`` applies to general tags (category 0)
  and ``character_threshold`` to character tags (category 4); ratings are
  category 9.

Both load from a Hugging Face hub id when online, or from a local folder.
When the hub cannot be reached the error says so (:class:`LoraNbError`)
instead of a long traceback. Nothing is downloaded or loaded on import.

Caption editing (trigger word, removing fixed features, shuffle, frequency,
caption files) lives in :mod:`lora_nb.captions`; its main functions are
re-exported here for convenience.
"""

from __future__ import annotations

import csv
import os
import re
import socket
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
from PIL import Image

from lora_nb import LoraNbError
from lora_nb.captions import (  # noqa: F401 - re-exported
    add_tags, add_trigger, caption_path, check_caption_extension, dedupe_tags, edit_caption, edit_captions,
    join_tags, precision_recall, read_caption, remove_tags, replace_tags, shuffle_caption, split_tags,
    tag_frequency, tags_above, threshold_sweep, write_captions,
)
from lora_nb.folders import list_images
from lora_nb.images import load_image
from lora_nb.toy import oracle, world
from lora_nb.toy.judge import as_array, fit_background

__all__ = [
    "BlipCaptioner", "TagScores", "WdTagger", "caption_images", "clean_blip_caption", "load_blip", "load_wd_tagger",
    "hub_unreachable_reason", "prepare_wd_image", "read_selected_tags", "row_at", "toy_tagger_predictions", "toy_tagging_set",
    "TaggerChoice", "are_toy_world_pictures", "choose_tagger", "existing_captions", "load_real_tagger",
    "caption_class_pictures", "real_tagger_status", "style_captions", "threshold_rows", "toy_world_share",
    # re-exported from lora_nb.captions
    "add_tags", "add_trigger", "check_caption_extension", "dedupe_tags", "edit_caption", "edit_captions",
    "join_tags", "precision_recall", "read_caption", "remove_tags", "replace_tags", "shuffle_caption",
    "split_tags", "tag_frequency", "tags_above", "threshold_sweep", "write_captions",
]

BLIP_BASE = "Salesforce/blip-image-captioning-base"
BLIP_LARGE = "Salesforce/blip-image-captioning-large"
WD_VIT_V3 = "SmilingWolf/wd-vit-tagger-v3"
WD_EVA02_LARGE_V3 = "SmilingWolf/wd-eva02-large-tagger-v3"
RECOMMENDED_THRESHOLD = 0.6   # the course's recommendation (C9); WD's own demo uses 0.35
CHARACTER_THRESHOLD = 0.85
CATEGORY_GENERAL, CATEGORY_CHARACTER, CATEGORY_RATING = 0, 4, 9
# Tags whose underscores are part of the face (kept as is), as the WD demo does.
KAOMOJIS = {"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o",
            "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"}


def _is_hub_id(source: str) -> bool:
    parts = source.split("/")
    return (len(parts) == 2 and all(re.fullmatch(r"[\w.\-]+", p) for p in parts)
            and not source.startswith((".", "~")) and not Path(source).exists())


def _hub_error(source: str, exc: BaseException, what: str) -> LoraNbError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    return LoraNbError(
        f"Could not load the {what} {source!r} from the Hugging Face hub ({type(exc).__name__}). "
        + ("Hub access is switched off (HF_HUB_OFFLINE=1). " if offline else "This machine may be offline. ")
        + f"Download it on a machine with internet access and pass the local folder instead of {source!r}, "
        "or use the toy tagger for the offline course."
    )


def _resolve_source(source: str | Path, what: str) -> tuple[str, bool]:
    """``(path or hub id, is_local)``; a clear error for a path that does not exist."""
    src = str(source)
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LoraNbError(f"{what} source {src} is a file: pass the folder that holds the model files.")
        return str(path), True
    if _is_hub_id(src):
        return src, False
    raise LoraNbError(f"{what} source {src!r} is neither an existing folder nor a hub id like 'org/name'.")


# --------------------------------------------------------------------------- BLIP

_BLIP_JUNK = re.compile(r"^(there is |arafed |araffe |arafe |araffed |arafy )+", re.IGNORECASE)


def clean_blip_caption(text: str) -> str:
    """Tidy a BLIP caption: strip spaces and the well-known junk openers ("arafed", "araffe" ...)."""
    text = " ".join(text.split())
    return _BLIP_JUNK.sub("", text).strip()


@dataclass
class BlipCaptioner:
    """A loaded BLIP captioning model. Call :meth:`caption` with PIL images."""
    model: object
    processor: object
    source: str
    device: str = "cpu"

    def caption(self, images: Image.Image | list[Image.Image], prompt: str | None = None, max_new_tokens: int = 40,
                num_beams: int = 3, batch_size: int = 4, progress: bool = False) -> list[str]:
        """Captions for ``images`` (one string each). ``prompt`` starts every caption (e.g. ``"a photo of"``)."""
        import torch
        from tqdm.auto import tqdm

        images = [images] if isinstance(images, Image.Image) else list(images)
        out: list[str] = []
        starts = range(0, len(images), batch_size)
        for i in tqdm(starts, desc="BLIP", unit="batch", disable=not progress):
            batch = [im.convert("RGB") for im in images[i:i + batch_size]]
            kwargs = {"images": batch, "return_tensors": "pt"}
            if prompt:
                kwargs["text"] = [prompt] * len(batch)
            inputs = self.processor(**kwargs).to(self.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)  # fp16/bf16 models
            with torch.inference_mode():
                ids = self.model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams)
            out += [clean_blip_caption(t) for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
        return out


def load_blip(source: str | Path = BLIP_BASE, device: str = "cpu", dtype=None) -> BlipCaptioner:
    """Load BLIP (``BlipForConditionalGeneration`` + ``BlipProcessor``) from a hub id or a local folder."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    src, local = _resolve_source(source, "BLIP")
    try:
        processor = BlipProcessor.from_pretrained(src, local_files_only=local)
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model = BlipForConditionalGeneration.from_pretrained(src, local_files_only=local, **kwargs)
    except Exception as exc:  # noqa: BLE001 - hub and file errors come in many types
        if not local:
            raise _hub_error(src, exc, "BLIP model") from None
        raise LoraNbError(
            f"Could not load BLIP from {src} ({type(exc).__name__}: {str(exc)[:200]}). The folder needs "
            "config.json, the weights and the processor files (save both with save_pretrained)."
        ) from None
    model.eval().to(device)
    return BlipCaptioner(model, processor, src, device)


# --------------------------------------------------------------------------- WD / booru tagger

@dataclass
class TagScores:
    """One image's tagger output: ``{tag: confidence}`` per category."""
    general: dict[str, float] = field(default_factory=dict)
    character: dict[str, float] = field(default_factory=dict)
    rating: dict[str, float] = field(default_factory=dict)

    def tags(self, general_threshold: float = RECOMMENDED_THRESHOLD,
             character_threshold: float = CHARACTER_THRESHOLD) -> list[str]:
        """Character tags then general tags above their thresholds, each group most confident first."""
        return tags_above(self.character, character_threshold) + tags_above(self.general, general_threshold)

    def caption(self, general_threshold: float = RECOMMENDED_THRESHOLD,
                character_threshold: float = CHARACTER_THRESHOLD) -> str:
        return join_tags(self.tags(general_threshold, character_threshold))

    @property
    def top_rating(self) -> str | None:
        return max(self.rating, key=self.rating.get) if self.rating else None


def read_selected_tags(path: str | Path) -> tuple[list[str], list[int]]:
    """Tag names and categories from a WD ``selected_tags.csv`` (columns tag_id,name,category,count).

    Underscores become spaces (``black_hair`` -> ``black hair``) except in kaomoji tags.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LoraNbError(f"Could not read the tag list {path}: {exc}.") from None
    if not rows or not {"name", "category"} <= set(rows[0]):
        raise LoraNbError(f"{path} is not a WD tag list: it needs the columns tag_id,name,category,count.")
    names, cats = [], []
    for i, row in enumerate(rows, start=2):
        try:
            cats.append(int(row["category"]))
        except (TypeError, ValueError):
            raise LoraNbError(f"{path}, line {i}: category {row.get('category')!r} is not a number.") from None
        name = row["name"] or ""
        names.append(name if name in KAOMOJIS else name.replace("_", " "))
    return names, cats


def prepare_wd_image(img: Image.Image, size: int) -> np.ndarray:
    """WD v3 preprocessing: flatten alpha on white, pad to a white square, resize, BGR, float32 0-255, NHWC."""
    if img.mode in ("RGBA", "LA", "P", "PA"):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(base, rgba)
    img = img.convert("RGB")
    side = max(img.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    if side != size:
        square = square.resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(square, dtype=np.float32)[:, :, ::-1]  # RGB -> BGR
    return np.ascontiguousarray(arr)[None]


@dataclass
class WdTagger:
    """A loaded WD-style ONNX tagger. :meth:`predict` gives confidences, :meth:`tag` the tags above thresholds."""
    session: object
    names: list[str]
    categories: list[int]
    input_name: str
    input_size: int
    source: str

    def predict(self, images: Image.Image | list[Image.Image], batch_size: int = 8,
                progress: bool = False) -> list[TagScores]:
        """Confidences for every tag of every image."""
        from tqdm.auto import tqdm

        images = [images] if isinstance(images, Image.Image) else list(images)
        out: list[TagScores] = []
        cats = np.asarray(self.categories)
        for i in tqdm(range(0, len(images), batch_size), desc="tagging", unit="batch", disable=not progress):
            batch = np.concatenate([prepare_wd_image(im, self.input_size) for im in images[i:i + batch_size]])
            probs = self.session.run(None, {self.input_name: batch})[0]
            if probs.shape[-1] != len(self.names):
                raise LoraNbError(
                    f"The tagger {self.source} outputs {probs.shape[-1]} scores but selected_tags.csv lists "
                    f"{len(self.names)} tags: the model and the tag list do not belong together."
                )
            for row in probs:
                scores = TagScores()
                for target, cat in ((scores.general, CATEGORY_GENERAL), (scores.character, CATEGORY_CHARACTER),
                                    (scores.rating, CATEGORY_RATING)):
                    for j in np.flatnonzero(cats == cat):
                        target[self.names[j]] = float(row[j])
                out.append(scores)
        return out

    def tag(self, img: Image.Image, general_threshold: float = RECOMMENDED_THRESHOLD,
            character_threshold: float = CHARACTER_THRESHOLD) -> list[str]:
        """Tags of one image above the thresholds: characters first, then general tags."""
        return self.predict(img)[0].tags(general_threshold, character_threshold)


def _fetch_wd_files(src: str, local: bool, model_file: str, tags_file: str) -> tuple[Path, Path]:
    if local:
        model, tags = Path(src) / model_file, Path(src) / tags_file
        for p in (model, tags):
            if not p.is_file():
                raise LoraNbError(f"The tagger folder {src} has no {p.name}: it needs {model_file} and {tags_file}.")
        return model, tags
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(src, model_file)), Path(hf_hub_download(src, tags_file))
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        raise _hub_error(src, exc, "tagger") from None


def load_wd_tagger(source: str | Path = WD_VIT_V3, model_file: str = "model.onnx",
                   tags_file: str = "selected_tags.csv", providers: list[str] | None = None) -> WdTagger:
    """Load a WD v3 / WD14-style ONNX tagger from a hub id or a folder with ``model.onnx`` + ``selected_tags.csv``."""
    import onnxruntime as ort

    src, local = _resolve_source(source, "tagger")
    model_path, tags_path = _fetch_wd_files(src, local, model_file, tags_file)
    names, cats = read_selected_tags(tags_path)
    available = ort.get_available_providers()
    providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    try:
        session = ort.InferenceSession(str(model_path), providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise LoraNbError(f"{model_path} is not a usable ONNX model ({type(exc).__name__}: {str(exc)[:200]}).") from None
    inp = session.get_inputs()[0]
    shape = list(inp.shape)
    if len(shape) != 4 or shape[-1] != 3 or not isinstance(shape[1], int):
        raise LoraNbError(f"{model_path}: expected an image input of shape [batch, H, W, 3] (NHWC), got {shape}.")
    return WdTagger(session, names, cats, inp.name, int(shape[1]), src)


# --------------------------------------------------------------------------- whole datasets

def caption_images(paths: Iterable[str | Path], tagger, general_threshold: float = RECOMMENDED_THRESHOLD,
                   character_threshold: float = CHARACTER_THRESHOLD, load: Callable | None = None,
                   progress: bool = True) -> dict[str, str]:
    """``{image path: caption}`` for every image, with a :class:`WdTagger`, a :class:`BlipCaptioner`
    or any callable ``image -> caption string | {tag: confidence}`` (e.g. the toy oracle)."""
    from tqdm.auto import tqdm  # looked up when called: notebooks switch tqdm.auto to text bars

    load = load or load_image
    out = {}
    for p in tqdm(list(paths), desc="captioning", unit="img", disable=not progress):
        img = load(p)
        if isinstance(tagger, WdTagger):
            out[str(p)] = tagger.predict(img)[0].caption(general_threshold, character_threshold)
        elif isinstance(tagger, BlipCaptioner):
            out[str(p)] = tagger.caption(img)[0]
        else:
            res = tagger(img)
            out[str(p)] = join_tags(tags_above(res, general_threshold)) if isinstance(res, Mapping) else str(res)
    return out


# --------------------------------------------------------------------------- measuring on the toy world (C9)

def toy_tagging_set(n: int = 60, seed: int = 0, zorb_share: float = 0.5,
                    second_object_p: float = 0.3) -> tuple[list[Image.Image], list[list[str]]]:
    """``n`` toy-world pictures with their true tags (no trigger word): the ground truth for a threshold sweep.

    Sizes cycle through the toy sizes; about ``zorb_share`` of the pictures hold a
    zorb; backgrounds are plain, gradient or striped; some pictures get a second object.
    """
    images, truths = [], []
    for i in range(n):
        size = world.SIZES[i % len(world.SIZES)]
        zorb = int((i + 1) * zorb_share) > int(i * zorb_share)  # spread evenly
        scene = world.sample_scene(seed, i, size, zorb=zorb, background_style=None,
                                   second_object_p=second_object_p)
        images.append(Image.fromarray(world.render_scene(scene)))
        truths.append(world.tags_of_scene(scene, with_trigger=False))
    return images, truths


def toy_tagger_predictions(images: list[Image.Image], seed: int = 0, noise: float = 0.12) -> dict[str, list[dict]]:
    """``{"oracle": [...], "noisy": [...]}``: each toy tagger's ``{tag: confidence}`` for every image."""
    return {"oracle": [oracle.tag_image_oracle(im) for im in images],
            "noisy": [oracle.tag_image_noisy(im, seed=seed, noise=noise) for im in images]}


def row_at(sweep: list[dict], threshold: float) -> dict:
    """The row of a :func:`threshold_sweep` result nearest ``threshold``."""
    if not sweep:
        raise LoraNbError("row_at got an empty sweep.")
    return min(sweep, key=lambda r: abs(r["threshold"] - threshold))


def hub_unreachable_reason(source: str | Path, timeout: float = 3.0, host: str = "huggingface.co") -> str | None:
    """Why a model at ``source`` cannot be fetched right now, or ``None`` when it can (a local folder, or the hub answers).

    Checked in a few seconds before any download is tried: the hub libraries retry
    for minutes on an offline machine. ``HF_HUB_OFFLINE=1`` counts as unreachable.
    """
    if Path(str(source)).expanduser().exists():
        return None
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
        return (f"{source}: hub access is switched off (HF_HUB_OFFLINE=1). Download the model on a machine with "
                "internet access and pass its local folder.")
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return None
    except OSError as exc:
        return (f"{source}: the Hugging Face hub ({host}) cannot be reached from this machine ({exc.strerror or exc}). "
                "Run this on Colab/Kaggle or a machine with internet access, or pass a local folder with the model.")


def _toy_parts(caption: str, trigger: str) -> tuple[list[list[str]], str | None, list[str]]:
    """A toy caption's tags read as ([colour, shape] objects, the background tag, the other tags)."""
    objects, background, rest = [], None, []
    for tag in split_tags(caption):
        words = tag.split()
        if len(words) == 2 and words[0] in world.COLOURS and words[1] in world.SHAPES:
            objects.append(words)
        elif words and words[0] in world.BACKGROUNDS and words[-1] == "background" and (
                len(words) == 2 or (len(words) == 3 and words[1] in world.BACKGROUND_STYLES)):
            background = tag
        elif tag != trigger:
            rest.append(tag)
    styles = [t for t in rest if t.split()[0] in world.BACKGROUND_STYLES and t.endswith(" background")]
    if background is not None and len(background.split()) == 2 and len(styles) == 1:  # the toy world's words:
        background = f"{background.split()[0]} {styles[0]}"  # "black background" + "gradient background"
        rest.remove(styles[0])  # -> "black gradient background", as the base model's captions say it
    return objects, background, rest


def toy_sentence(caption: str, trigger: str = "") -> str:
    """Rewrite toy-world tags as the sentence style the toy model was mostly trained on (like a BLIP caption).

    "zorb, black background, red circle" → "a red zorb circle on a black background". Tags it does not
    recognise are kept, comma-separated, after the sentence; a caption with no object or background tag is
    returned unchanged.
    """
    objects, background, rest = _toy_parts(caption, trigger)
    if not objects or background is None:
        return caption
    phrases = [f"a {c} {trigger + ' ' if trigger and i == 0 else ''}{s}" for i, (c, s) in enumerate(objects)]
    sentence = f"{' and '.join(phrases)} on a {background}"
    return ", ".join([sentence] + rest)


def toy_forms(caption: str, trigger: str = "") -> str:
    """Toy-world tags as a caption in several forms, one per line (:func:`lora_nb.toy.world.caption_forms`:
    the sentence, parts of it left out, the tags, the words alone), for ``dataset.enable_wildcard``, which
    trains one form a step. Tags it does not recognise follow each form; a picture of several objects gets
    its sentence and its tags; a caption with no object or background tag is returned unchanged."""
    objects, background, rest = _toy_parts(caption, trigger)
    if not objects or background is None:
        return caption
    if len(objects) > 1:
        return "\n".join(dict.fromkeys([toy_sentence(caption, trigger), caption]))
    forms = world.caption_forms(*objects[0], background, trigger)
    return "\n".join(", ".join([form] + rest) for form in forms)


# --------------------------------------------------------------------------- which tagger (notebook 03)

TAGGER_KINDS = ("toy", "toy-noisy", "wd", "blip")
CAPTION_STYLES = ("forms", "sentence", "tags")
TOY_PIXEL_TOLERANCE = 6.0   # RGB distance within which a pixel counts as painted by the toy world
TOY_MIN_SHARE = 0.75        # toy pictures measure ≥ 0.86 (also cropped, enlarged, shrunk); photos ≤ 0.62


def _toy_palette() -> np.ndarray:
    colours = [np.asarray(c, np.float32) for c in (*world.COLOURS.values(), world.EYE_COLOUR)]
    for bg in world.BACKGROUNDS.values():  # plain backgrounds and the darker shade of their stripes
        bg = np.asarray(bg, np.float32)
        colours += [bg, bg * 0.8 if bg.mean() > 60 else bg + 35]
    return np.stack(colours)


def toy_world_share(image, max_side: int = 128) -> float:
    """The share of an image's pixels the toy world could have painted: within a few levels of a toy
    colour (objects, eyes, backgrounds, stripes) or of a flat / linear-gradient background.

    Toy-world pictures score ≥ 0.86, cropped or resized; photos, even grey ones (the moon, a clock),
    score ≤ 0.62: real pictures have noise and colours the toy world never uses.
    """
    img = image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image)).convert("RGB")
    if max(img.size) > max_side:
        img = img.copy()
        img.thumbnail((max_side, max_side), Image.Resampling.BOX)
    arr = as_array(img)
    near_background = np.linalg.norm(arr - fit_background(arr), axis=2) < TOY_PIXEL_TOLERANCE
    palette = _toy_palette()
    near_colour = np.linalg.norm(arr[:, :, None, :] - palette[None, None], axis=3).min(axis=2) < TOY_PIXEL_TOLERANCE
    return float((near_background | near_colour).mean())


def are_toy_world_pictures(paths: Iterable[str | Path], min_share: float = TOY_MIN_SHARE) -> bool:
    """True when every picture looks painted by the toy world (:func:`toy_world_share`): only then do the
    toy taggers, which read the toy world's truth, say something true about them."""

    paths = list(paths)
    return bool(paths) and all(toy_world_share(load_image(p)) >= min_share for p in paths)


def load_real_tagger(kind: str, source: str | Path = "", device: str = "cpu"):
    """``(tagger, "")`` for ``kind`` "wd" or "blip" from ``source`` (empty: the usual default model),
    or ``(None, why)`` when it cannot load here (no hub, a bad folder). Checks the hub first, in seconds."""
    if kind not in ("wd", "blip"):
        raise LoraNbError(f"load_real_tagger: kind={kind!r}: use wd or blip.")
    source = str(source) if source else (WD_VIT_V3 if kind == "wd" else BLIP_BASE)
    why = hub_unreachable_reason(source)
    if why:
        return None, why
    try:
        return (load_wd_tagger(source) if kind == "wd" else load_blip(source, device=device)), ""
    except LoraNbError as exc:
        return None, str(exc)


def real_tagger_status(device: str = "cpu") -> list[str]:
    """One line per real tagger (BLIP, the WD tagger) with its default model: loaded, or why not."""
    lines = []
    for name, kind, source in (("BLIP", "blip", BLIP_BASE), ("WD tagger", "wd", WD_VIT_V3)):
        tagger, why = load_real_tagger(kind, source, device)
        lines.append(f"{name}: loaded {source}" if tagger is not None else f"{name}: not loaded. {why}")
    return lines


def existing_captions(paths: Iterable[str | Path], exts: tuple[str, ...] = (".txt", ".caption")) -> dict[str, str]:
    """``{picture: caption}`` from the caption file beside each picture (first of ``exts`` found); ``""`` where none."""
    out = {}
    for p in paths:
        found = next((c for c in (caption_path(p, e) for e in exts) if c.is_file()), None)
        out[str(p)] = read_caption(found) if found else ""
    return out


@dataclass
class TaggerChoice:
    """The tagger notebook 03 uses, and one line saying what was chosen and why.

    ``kind`` is the tagger really used: "toy", "toy-noisy", "wd", "blip", or "existing captions"
    (no tagger that tells the truth about these pictures: each keeps the caption file beside it,
    or starts empty, so the caption is the trigger word and the added tags only).
    """
    requested: str
    kind: str
    report: str
    tagger: object = None  # a WdTagger, a BlipCaptioner, or a callable image -> {tag: confidence}

    @property
    def is_toy(self) -> bool:
        return self.kind in ("toy", "toy-noisy")

    def caption(self, paths: Iterable[str | Path], threshold: float = RECOMMENDED_THRESHOLD) -> dict[str, str]:
        """``{picture: caption}`` for every picture."""
        paths = list(paths)
        if self.tagger is None:
            return existing_captions(paths)
        return caption_images(paths, self.tagger, general_threshold=threshold, progress=False)


def _toy_tagger(kind: str, seed: int):


    return oracle.tag_image_oracle if kind == "toy" else partial(oracle.tag_image_noisy, seed=seed)


def choose_tagger(kind: str, pictures: Iterable[str | Path], source: str | Path = "", device: str = "cpu",
                  seed: int = 0) -> TaggerChoice:
    """The tagger for ``pictures``: ``kind`` when it can run here and tells the truth about them.

    * "wd" / "blip" that cannot load (no hub, a bad folder): the toy oracle on toy-world pictures;
    * on other pictures the toy taggers would invent tags, so neither a toy tagger nor a failed
      real one is used: each picture keeps the caption file beside it, or gets the trigger word and
      the added tags only. The report says so.
    """
    if kind not in TAGGER_KINDS:
        raise LoraNbError(f"tagger={kind!r}: use one of {', '.join(TAGGER_KINDS)}.")
    pictures = list(pictures)
    why = ""
    if kind in ("wd", "blip"):
        tagger, why = load_real_tagger(kind, source, device)
        if tagger is not None:
            return TaggerChoice(kind, kind, f"tagger: {kind} ({tagger.source})", tagger)
    toy = are_toy_world_pictures(pictures)
    if toy:
        used = kind if kind in ("toy", "toy-noisy") else "toy"
        what = "the oracle of the toy world" if used == "toy" else "the noisy toy tagger"
        report = (f"tagger: {used} ({what})" if not why else
                  f"The {kind} tagger cannot be used here: {why.rstrip('.')}. These are toy-world pictures: the toy "
                  "oracle tags them.")
        return TaggerChoice(kind, used, report, _toy_tagger(used, seed))
    kept = sum(1 for c in existing_captions(pictures).values() if c)
    problem = (f"The {kind} tagger cannot be used here: {why.rstrip('.')}" if why else
               f"tagger={kind} reads only toy-world pictures (use wd or blip, online or from a local tagger_source)")
    report = (f"{problem}. These are not toy-world pictures, so the toy tagger would invent their tags: {kept} of "
              f"{len(pictures)} picture(s) keep the caption file beside them, the others get only the trigger word "
              "and the added tags.")
    return TaggerChoice(kind, "existing captions", report, None)


def threshold_rows(sweeps: Mapping[str, list[dict]], thresholds=(0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)) -> list[dict]:
    """One row per threshold: each tagger's precision, recall and tags per picture there (a table of
    :func:`threshold_sweep` results, ``{tagger name: sweep}``)."""
    rows = []
    for th in thresholds:
        row = {"threshold": th}
        for name, sweep in sweeps.items():
            r = row_at(sweep, th)
            row |= {f"{name} precision": r["precision"], f"{name} recall": r["recall"],
                    f"{name} tags/img": r["tags_per_image"]}
        rows.append(row)
    return rows


def style_captions(captions: Mapping[str, str], style: str, trigger: str = "", toy: bool = False) -> dict[str, str]:
    """The captions in ``style``: "tags" keeps them; "sentence" rewrites toy-world tags as the sentences the
    toy model learned (:func:`toy_sentence`) and "forms" as one caption in several forms, a line each
    (:func:`toy_forms`, trained with ``dataset.enable_wildcard``), when ``toy`` (a toy tagger wrote them);
    other captions are kept as they are."""
    if style not in CAPTION_STYLES:
        raise LoraNbError(f"caption_style={style!r}: use one of {', '.join(CAPTION_STYLES)}.")
    if toy and style != "tags":
        rewrite = toy_sentence if style == "sentence" else toy_forms
        return {k: rewrite(c, trigger) for k, c in captions.items()}
    return dict(captions)

def caption_class_pictures(folder: str | Path, choice: TaggerChoice, style: str,
                           threshold: float = RECOMMENDED_THRESHOLD) -> str:
    """Caption the class pictures under ``folder`` (the workspace's ``regularization/``) the way the training
    pictures were: the same tagger and caption style, without the trigger word. A prompt in any form the
    training captions took then has class pictures of that form to hold it back (measured in
    docs/toy-world.md: without them the zorb leaks into "circle" prompts of the other forms). Only toy
    pictures read by a toy tagger are rewritten; other class pictures keep their captions (the workspace
    holds copies: the originals are never touched). Returns one line saying what was done."""
    folder = Path(folder)
    pictures = [p for sub in sorted(folder.iterdir()) if sub.is_dir() for p in list_images(sub, recursive=False)] if folder.is_dir() else []
    if not pictures:
        return f"no class pictures in {folder}: nothing to caption"
    if not choice.is_toy or style == "tags" or not are_toy_world_pictures(pictures):
        return f"{len(pictures)} class picture(s) in {folder} keep the captions they came with"
    raw = choice.caption(pictures, threshold=threshold)
    written = write_captions(folder, style_captions(raw, style, "", toy=True))
    example = read_caption(written[0], keep_lines=True).split("\n")[0] if written else ""
    return (f"{len(written)} class picture(s) in {folder} captioned like the training pictures ({style}, no trigger "
            f"word), e.g. {example!r}")
