"""Captions: edit tags (C10-C12), read and write caption files, check what the trainer will read.

A caption here is a comma-separated tag list (``"sks, 1girl, black hair"``)
or a sentence (BLIP); the editing functions treat each comma-separated part
as a tag. Every function takes a caption string and returns a new one; the
``*_captions`` variants apply the same edit to a ``{image path: caption}`` dict.

Guarantees (property-tested): after :func:`edit_caption` with a trigger word
the trigger is the first tag and occurs once, and no tag occurs twice.
"""

from __future__ import annotations

import codecs
import collections
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from lora_nb import LoraNbError
from lora_nb.folders import CAPTION_EXTENSIONS
from lora_nb.fsutil import write_text_atomic

_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


# --------------------------------------------------------------------------- tags

def normalize_tag(tag: str) -> str:
    """A tag with surrounding spaces removed and inner whitespace collapsed to one space."""
    return " ".join(str(tag).split())


def _key(tag: str) -> str:
    """What counts as 'the same tag': case and spacing ignored, ``_`` equals space (booru style)."""
    return normalize_tag(tag.replace("_", " ")).casefold()


def split_tags(caption: str) -> list[str]:
    """``"a, b ,, c"`` -> ``["a", "b", "c"]`` (empty parts dropped, spacing normalised)."""
    return [t for t in (normalize_tag(p) for p in str(caption).split(",")) if t]


def join_tags(tags: Iterable[str]) -> str:
    """``["a", "b"]`` -> ``"a, b"``."""
    return ", ".join(t for t in (normalize_tag(t) for t in tags) if t)


def _check_tag(tag: str, what: str) -> str:
    tag = normalize_tag(tag)
    if not tag or "," in tag:
        raise LoraNbError(f"{what}={tag!r}: must be a non-empty word or phrase without commas.")
    return tag


def dedupe_tags(caption: str) -> str:
    """Remove repeated tags, keeping the first occurrence (case, spacing and ``_`` ignored)."""
    seen, out = set(), []
    for t in split_tags(caption):
        if _key(t) not in seen:
            seen.add(_key(t))
            out.append(t)
    return join_tags(out)


def trigger_leads(caption: str, trigger: str) -> bool:
    """Whether ``trigger`` leads the caption (C11): it is the first tag, or a word of the first tag — a sentence
    caption ("a red zorb circle on a black background") places it where it reads, before the class word."""
    tags = split_tags(caption)
    if not tags:
        return False
    words = re.findall(r"[\w'-]+", tags[0].lower())
    return _key(tags[0]) == _key(trigger) or trigger.strip().lower() in words


def add_trigger(caption: str, trigger: str) -> str:
    """Put the trigger word first (C11), removing any other occurrence of it; a caption it already leads
    (:func:`trigger_leads`: first tag, or a word of a leading sentence) is left as it is."""
    trigger = _check_tag(trigger, "trigger")
    if trigger_leads(caption, trigger):
        first, *rest = split_tags(caption)
        return join_tags([first] + [t for t in rest if _key(t) != _key(trigger)])
    return join_tags([trigger] + [t for t in split_tags(caption) if _key(t) != _key(trigger)])


def remove_tags(caption: str, tags: Iterable[str]) -> str:
    """Delete ``tags`` (fixed features, C10: e.g. ``"black hair"`` when every image has it)."""
    drop = {_key(t) for t in ([tags] if isinstance(tags, str) else tags)}
    return join_tags(t for t in split_tags(caption) if _key(t) not in drop)


def add_tags(caption: str, tags: Iterable[str], position: str = "end") -> str:
    """Add ``tags`` (things you want to control later, C10) at the ``"end"`` or ``"start"``, skipping ones present."""
    new = [_check_tag(t, "tag") for t in ([tags] if isinstance(tags, str) else tags)]
    old = split_tags(caption)
    have = {_key(t) for t in old}
    new = [t for t in new if _key(t) not in have]
    if position not in ("start", "end"):
        raise LoraNbError(f"position={position!r}: use 'start' or 'end'.")
    return dedupe_tags(join_tags(new + old if position == "start" else old + new))


def replace_tags(caption: str, mapping: Mapping[str, str]) -> str:
    """Replace whole tags: ``{"1girl": "woman"}``. An empty replacement removes the tag."""
    lookup = {_key(k): normalize_tag(v) for k, v in mapping.items()}
    out = []
    for t in split_tags(caption):
        new = lookup.get(_key(t), t)
        out += split_tags(new)
    return dedupe_tags(join_tags(out))


def edit_caption(caption: str, trigger: str | None = None, remove: Iterable[str] = (), add: Iterable[str] = (),
                 replace: Mapping[str, str] | None = None, dedupe: bool = True) -> str:
    """All edits in a fixed order: replace, remove, add, dedupe, then the trigger word first.

    The trigger goes last so nothing can remove or displace it.
    """
    out = caption
    if replace:
        out = replace_tags(out, replace)
    if remove:
        out = remove_tags(out, remove)
    if add:
        out = add_tags(out, add)
    if dedupe:
        out = dedupe_tags(out)
    if trigger:
        out = add_trigger(out, trigger)
    return out


def edit_captions(captions: Mapping[str, str], **edits) -> dict[str, str]:
    """:func:`edit_caption` applied to every caption of a ``{image: caption}`` dict."""
    return {k: edit_caption(v, **edits) for k, v in captions.items()}


def shuffle_caption(caption: str, keep_tokens: int = 1, rng: random.Random | None = None) -> str:
    """Shuffle the tags after the first ``keep_tokens`` ones (kohya's ``shuffle_caption`` + ``keep_tokens``, C12).

    Tags nearer the front weigh more; shuffling each step spreads that weight,
    while ``keep_tokens=1`` keeps the trigger word first. ``rng`` is a
    :class:`random.Random` (pass a seeded one for a reproducible preview).
    """
    if keep_tokens < 0:
        raise LoraNbError(f"keep_tokens={keep_tokens}: must be 0 or more (1 keeps the trigger word first).")
    rng = rng or random.Random()
    tags = split_tags(caption)
    fixed, rest = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(rest)
    return join_tags(fixed + rest)


def drop_tags(caption: str, rate: float, keep_tokens: int = 1, rng: random.Random | None = None) -> str:
    """Leave each tag after the first ``keep_tokens`` out with probability ``rate`` (sd-scripts'
    ``caption_tag_dropout_rate``): the model cannot lean on any one tag always being there."""
    if not rate:
        return caption
    rng = rng or random.Random()
    tags = split_tags(caption)
    return join_tags(tags[:keep_tokens] + [t for t in tags[keep_tokens:] if rng.random() >= rate])


_WILDCARD = re.compile(r"\{([^{}]*\|[^{}]*)\}")


def caption_variants(caption: str) -> list[str]:
    """The lines of a multi-line caption (``dataset.enable_wildcard``), each with every ``{a|b}`` choice at its
    first option: what is counted and checked for a caption that trains in several forms."""
    return [_WILDCARD.sub(lambda m: m.group(1).split("|")[0], line) for line in caption.split("\n") if line.strip()]


def pick_caption_variant(caption: str, rng: random.Random | None = None) -> str:
    """One form of a caption, as one training step sees it (sd-scripts' ``enable_wildcard``): a random line of
    a multi-line caption, then one random option of each ``{a|b|c}``. Lets one picture train under several
    wordings, so the LoRA answers prompts worded unlike any single caption (measured in docs/toy-world.md)."""
    rng = rng or random.Random()
    lines = [line for line in caption.split("\n") if line.strip()]
    line = rng.choice(lines) if lines else ""
    return _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), line)


def dress_caption(caption: str, prefix: str = "", suffix: str = "") -> str:
    """``caption`` with ``prefix`` before and ``suffix`` after it, space-joined as sd-scripts'
    ``caption_prefix`` / ``caption_suffix`` (put the comma in the prefix yourself: "masterpiece,")."""
    return " ".join(p for p in (prefix.strip(), caption, suffix.strip()) if p)


def tag_frequency(captions: Mapping[str, str] | Iterable[str]) -> list[tuple[str, int]]:
    """How many captions contain each tag, most frequent first (a tag counts once per caption).

    A tag present in (nearly) every caption is a fixed feature: remove it (C10)
    unless you want to be able to change it later.
    """
    texts = captions.values() if isinstance(captions, Mapping) else captions
    counts: collections.Counter = collections.Counter()
    names: dict[str, str] = {}
    for text in texts:
        for key, tag in {_key(t): t for t in reversed(split_tags(text))}.items():
            counts[key] += 1
            names.setdefault(key, tag)
    return [(names[k], c) for k, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def fixed_feature_candidates(captions: Mapping[str, str], share: float = 0.8,
                             exclude: Iterable[str] = ()) -> list[str]:
    """Tags found in at least ``share`` of the captions (candidates to remove, C10), minus ``exclude``."""
    n = len(captions)
    skip = {_key(t) for t in exclude}
    return [t for t, c in tag_frequency(captions) if n and c / n >= share and _key(t) not in skip]


# --------------------------------------------------------------------------- files

def read_caption(path: str | Path, keep_lines: bool = False) -> str:
    """Read a caption file whatever its encoding: UTF-8 (with or without BOM), UTF-16 with BOM, else Latin-1.

    Lines are joined with ``", "`` and surrounding whitespace removed; with ``keep_lines`` (for
    ``dataset.enable_wildcard``) each non-empty line is kept, joined with a line break.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LoraNbError(f"Could not read the caption file {path}: {exc.strerror or exc}.") from None
    if raw.startswith(codecs.BOM_UTF8):
        text = raw[len(codecs.BOM_UTF8):].decode("utf-8", errors="replace")
    elif raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text = raw.decode("utf-16", errors="replace")
    else:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            try:
                text = raw.decode("cp1252")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
    return normalize_caption_lines(text) if keep_lines else normalize_caption_text(text)


def _atomic_write_text(path: Path, text: str) -> None:
    """UTF-8 without BOM, through a temporary file and rename (a full disk gives a clear error)."""

    write_text_atomic(path, text)


def caption_path(image_path: str | Path, ext: str = ".txt") -> Path:
    """The caption file the trainer reads for ``image_path``: same folder, same stem, ``ext``."""
    ext = ext if ext.startswith(".") else "." + ext
    p = Path(image_path)
    return p.with_name(p.stem + ext)


def write_captions(directory: str | Path, captions: Mapping[str | Path, str], ext: str = ".txt") -> list[Path]:
    """Write one caption file per image next to it (UTF-8, no BOM, atomically); returns the files.

    Keys are image paths; a relative path is taken relative to ``directory``.
    Images outside ``directory`` get their caption in ``directory`` under the image's stem.
    """
    directory = Path(directory)
    if not ext or ext in _IMAGE_EXTS:
        raise LoraNbError(f"caption ext={ext!r}: use '.txt' (what the trainer reads by default) or '.caption'.")
    out = []
    root = directory.resolve()
    for image, text in captions.items():
        p = Path(image)
        if not p.is_absolute():
            p = directory / p
        if root not in p.resolve().parents:
            p = directory / p.name
        target = caption_path(p, ext)
        _atomic_write_text(target, normalize_caption_lines(text))
        out.append(target)
    return out


def normalize_caption_text(text: str) -> str:
    """One line: line breaks become ``", "`` (no doubled commas), NUL bytes and surrounding whitespace removed."""
    lines = (ln.strip().strip(",").strip() for ln in str(text).replace("\x00", "").splitlines())
    return ", ".join(ln for ln in lines if ln)


def normalize_caption_lines(text: str) -> str:
    """:func:`normalize_caption_text` line by line: a caption of several forms (``dataset.enable_wildcard``)
    keeps one form per line; empty lines go."""
    lines = (normalize_caption_text(ln) for ln in str(text).splitlines())
    return "\n".join(ln for ln in lines if ln)


def read_captions(directory: str | Path, ext: str = ".txt", default: str | None = None) -> dict[str, str]:
    """``{image path: caption}`` for every image under ``directory``; missing captions get ``default`` (or are left out)."""
    out = {}
    for img in sorted(Path(directory).rglob("*")):
        if img.suffix.lower() in _IMAGE_EXTS and img.is_file():
            cap = caption_path(img, ext)
            if cap.is_file():
                out[str(img)] = read_caption(cap)
            elif default is not None:
                out[str(img)] = default
    return out


@dataclass
class CaptionCheck:
    """What the trainer will find: which images have a caption with the extension it reads."""

    extension: str
    images: int
    captioned: int
    missing: list[str] = field(default_factory=list)              # images without a caption in ``extension``
    other_extensions: dict[str, int] = field(default_factory=dict)  # e.g. {".caption": 12} among the missing
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.warnings

    def to_dict(self) -> dict:
        return {"extension": self.extension, "images": self.images, "captioned": self.captioned,
                "missing": list(self.missing), "other_extensions": dict(self.other_extensions),
                "warnings": list(self.warnings)}


def check_caption_extension(dataset_dir: str | Path, ext: str = ".txt",
                            others: Iterable[str] = CAPTION_EXTENSIONS) -> CaptionCheck:
    """Check that images have captions with ``ext``, the extension the trainer reads.

    The classic "my LoRA does nothing" bug: captions written as ``.caption``
    while the trainer reads ``.txt`` (or the reverse) -- then every image is
    trained with no caption but the folder's concept name. This warns, naming
    the count and the fix, when captions exist only with another extension,
    and also when some images have no caption at all.
    """
    ext = ext if ext.startswith(".") else "." + ext
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise LoraNbError(f"dataset_dir {dataset_dir} is not a folder: run the cropping step (notebook 02) first.")
    images = sorted(p for p in dataset_dir.rglob("*") if p.suffix.lower() in _IMAGE_EXTS and p.is_file())
    check = CaptionCheck(ext, len(images), 0)
    for img in images:
        if caption_path(img, ext).is_file():
            check.captioned += 1
            continue
        check.missing.append(str(img))
        for other in others:
            other = other if other.startswith(".") else "." + other
            if other != ext and caption_path(img, other).is_file():
                check.other_extensions[other] = check.other_extensions.get(other, 0) + 1
    if not images:
        check.warnings.append(f"no images in {dataset_dir}")
    for other, n in check.other_extensions.items():
        check.warnings.append(
            f"{n} image(s) in {dataset_dir} have captions in {other} files but the trainer reads {ext}: "
            f"set caption_extension='{other}' in the training settings, or rewrite them with "
            f"write_captions(..., ext='{ext}'). Otherwise these captions are silently ignored."
        )
    bare = len(check.missing) - sum(check.other_extensions.values())
    if bare > 0:
        check.warnings.append(
            f"{bare} image(s) have no caption at all: the trainer will use only the concept/trigger word for them "
            f"(e.g. {Path(check.missing[0]).name})."
        )
    return check


# --------------------------------------------------------------------------- measuring taggers (C9)

def precision_recall(predicted: Mapping[str, float], truth: Iterable[str], threshold: float) -> dict[str, float]:
    """Precision, recall and F1 of the tags whose confidence is at least ``threshold`` against ``truth``.

    Conventions: with no tag predicted, precision is 1.0 (nothing wrong was
    claimed); with an empty truth, recall is 1.0.
    """
    truth_keys = {_key(t) for t in truth}
    chosen = {_key(t) for t, c in predicted.items() if c >= threshold}
    tp = len(chosen & truth_keys)
    precision = tp / len(chosen) if chosen else 1.0
    recall = tp / len(truth_keys) if truth_keys else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"threshold": float(threshold), "precision": precision, "recall": recall, "f1": f1,
            "tp": tp, "predicted": len(chosen), "truth": len(truth_keys)}


def threshold_sweep(predictions: list[Mapping[str, float]], truths: list[Iterable[str]],
                    thresholds: Iterable[float] | None = None) -> list[dict[str, float]]:
    """Micro-averaged precision/recall/F1 over a dataset for each threshold (the C9 lesson).

    ``predictions[i]`` is ``{tag: confidence}`` for image ``i`` and ``truths[i]``
    its true tags. Lower thresholds give more tags (recall up, precision down).
    Each row also has ``tags_per_image``.
    """
    if len(predictions) != len(truths):
        raise LoraNbError(f"threshold_sweep: {len(predictions)} predictions but {len(truths)} truths.")
    if thresholds is None:
        thresholds = [round(0.05 * i, 2) for i in range(1, 20)]
    truths = [list(t) for t in truths]
    rows = []
    for th in thresholds:
        tp = sum(precision_recall(p, t, th)["tp"] for p, t in zip(predictions, truths))
        npred = sum(precision_recall(p, t, th)["predicted"] for p, t in zip(predictions, truths))
        ntrue = sum(len({_key(x) for x in t}) for t in truths)
        precision = tp / npred if npred else 1.0
        recall = tp / ntrue if ntrue else 1.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"threshold": float(th), "precision": precision, "recall": recall, "f1": f1,
                     "tags_per_image": npred / max(1, len(predictions))})
    return rows


def tags_above(predicted: Mapping[str, float], threshold: float) -> list[str]:
    """Tags with confidence at least ``threshold``, most confident first."""
    return [t for t, c in sorted(predicted.items(), key=lambda kv: -kv[1]) if c >= threshold]

