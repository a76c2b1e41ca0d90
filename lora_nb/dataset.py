"""The training dataset as the trainer reads it: images, captions, repeats.

Follows the kohya folder convention: ``<dataset dir>/<repeats>_<concept>/``
holds images with a caption file of the same name next to each one
(``image.png`` + ``image.txt``). Images placed directly in the dataset folder
count with ``dataset.repeats`` (or 1).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from lora_nb import LoraNbError
from lora_nb.captions import add_trigger, caption_variants, read_caption, split_tags
from lora_nb import folders
from lora_nb.folders import mask_file_for, CAPTION_EXTENSIONS, IMAGE_EXTENSIONS, match_concept_folder
from lora_nb.crop import bucket_for_image, make_buckets
from lora_nb.images import image_size, load_image
from lora_nb.workspace import repo_data_dir


@dataclass
class Item:
    image: Path
    caption: str
    repeats: int
    folder: str
    is_reg: bool = False
    size: tuple[int, int] | None = None  # (w, h) this image trains at: its bucket; None = dataset.resolution


@dataclass
class DatasetScan:
    items: list[Item]
    folders: list[tuple[int, int]]  # (image count, repeats) per folder, for the steps math
    tag_frequency: dict[str, dict[str, int]]
    warnings: list[str] = field(default_factory=list)


def resolve_data_path(path: str | Path) -> Path:
    """A dataset path as given; a relative one that does not exist here is looked up in the repository
    (so presets' ``data/toy-concept`` works from any folder, notebooks/ included)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    candidate = repo_data_dir().parent / p
    return candidate if candidate.exists() else p


def list_images(folder: Path) -> list[Path]:
    """The images the trainer reads in one folder (not its sub-folders; linked-in images count)."""
    return folders.list_images(folder, recursive=False, follow_links=True)


def scan_dataset(root: str | Path, caption_extension: str = ".txt", repeats: int | None = None,
                 trigger_word: str = "", is_reg: bool = False, setting: str = "", wildcard: bool = False) -> DatasetScan:
    """Find the images, captions and repeats under ``root``; with ``wildcard`` (``dataset.enable_wildcard``) a
    caption file's lines stay apart, one form each (the trigger word put in each, every form's tags counted).

    A missing caption falls back to the trigger word (or the folder's concept
    name), and is reported. When no image has a caption with
    ``caption_extension`` but captions with another extension exist, that is
    the classic "LoRA does nothing" mistake: it raises a clear error.
    """
    root = resolve_data_path(root)
    what = setting or ("dataset.reg_dir" if is_reg else "dataset.dir")
    if not root.is_dir():
        fix = ("Point it at the folder holding your <repeats>_<concept> subfolders (notebook 03 writes it into the "
               "workspace)." if what == "dataset.dir" else "Point it at a folder of images (in <repeats>_<concept> "
               "subfolders or directly), or clear the setting.")
        raise LoraNbError(f"{what}={str(root)!r} is not a folder. {fix}")
    groups: list[tuple[Path, int, str]] = []
    unprefixed: list[str] = []  # subfolders with images but no <repeats>_ prefix: kohya ignores them
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        parsed = match_concept_folder(sub.name)
        if parsed:
            groups.append((sub, *parsed))
        elif list_images(sub):
            unprefixed.append(sub.name)
    if list_images(root):
        groups.append((root, 1, root.name))
    items: list[Item] = []
    folders: list[tuple[int, int]] = []
    tag_frequency: dict[str, dict[str, int]] = {}
    warnings: list[str] = []
    other_ext: collections.Counter = collections.Counter()
    missing: list[str] = []
    found_any_caption = False
    for folder, folder_repeats, concept in groups:
        images = list_images(folder)
        if not images:
            continue
        r = repeats if repeats is not None else folder_repeats
        freq: collections.Counter = collections.Counter()
        for img in images:
            cap_path = img.with_suffix(caption_extension)
            if cap_path.is_file():
                caption = read_caption(cap_path, keep_lines=wildcard)
                found_any_caption = True
            else:
                caption = ""
                missing.append(img.name)
                for ext in CAPTION_EXTENSIONS:
                    if ext != caption_extension and img.with_suffix(ext).is_file():
                        other_ext[ext] += 1
            if not caption:  # kohya's rule: a picture without a caption is trained with its folder's words
                caption = concept.replace("_", " ") if is_reg else (trigger_word or concept.replace("_", " "))
            if trigger_word and not is_reg:
                caption = "\n".join(add_trigger(line, trigger_word) for line in caption.split("\n"))
            freq.update(tag for line in caption_variants(caption) for tag in split_tags(line))
            items.append(Item(img, caption, r, folder.name, is_reg))
        folders.append((len(images), r))
        tag_frequency[folder.name] = dict(freq)
    if other_ext and not found_any_caption:
        ext, n = other_ext.most_common(1)[0]
        raise LoraNbError(
            f"No caption files with dataset.caption_extension={caption_extension!r} in {root}, but {n} with {ext!r}: "
            f"the trainer would ignore every caption (the classic 'LoRA does nothing' bug). "
            f"Set dataset.caption_extension={ext!r}, or rename the files."
        )
    if not items:
        _raise_for_no_images(root, what, groups, unprefixed, caption_extension)
    elif unprefixed:
        warnings.append(f"Subfolder(s) {', '.join(repr(u) for u in unprefixed)} of {root} hold images but have no "
                        "<repeats>_ prefix: they are not trained on. Rename them (e.g. '10_name') to include them.")
    if missing and not is_reg:
        shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        warnings.append(f"{len(missing)} image(s) in {root} have no {caption_extension} caption ({shown}); "
                        f"they train with the caption {(trigger_word or 'the folder concept name')!r} only.")
    return DatasetScan(items, folders, tag_frequency, warnings)


def _raise_for_no_images(root: Path, what: str, groups, unprefixed: list[str], caption_extension: str) -> None:
    """No usable image: say why when it is one of the classic causes (else the caller's check reports it)."""
    if unprefixed:
        name = unprefixed[0]
        raise LoraNbError(
            f"{what}={str(root)!r}: the images are in subfolder(s) {', '.join(repr(u) for u in unprefixed)} whose "
            f"names lack the repeats prefix, so the trainer skips them. Rename e.g. {name!r} to '10_{name}' "
            "(<repeats>_<concept>).")
    known = IMAGE_EXTENSIONS + CAPTION_EXTENSIONS + (caption_extension,)
    others = sorted(p for folder in [root] + [g[0] for g in groups] for p in folder.iterdir()
                    if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in known)
    if others:
        kinds = sorted({p.suffix.lower() or "(no extension)" for p in others})
        raise LoraNbError(
            f"{what}={str(root)!r} holds no image the trainer reads ({', '.join(IMAGE_EXTENSIONS)}), only "
            f"{len(others)} file(s) of other types ({', '.join(kinds)}; e.g. {others[0].name!r}). Convert them with "
            "notebook 01's import (lora_nb.images.import_images), which reads most formats.")


def load_training_image(path: Path, size: tuple[int, int], flip: bool = False):
    """Load ``path`` as RGB (:func:`lora_nb.images.load_image`), cover-resize and centre-crop to ``size`` (w, h).

    Returns ``(array float32 in [-1, 1] CHW, original (h, w), crop (top, left))``.
    """
    try:
        im = load_image(path)  # the importer's loader: EXIF rotation, alpha on white, CMYK, 16-bit, palette
    except LoraNbError as exc:
        raise LoraNbError(f"Cannot read training image {exc}. Remove it or re-import the dataset "
                          "(notebook 01 skips broken files).") from None
    ow, oh = im.size
    im, top, left = _cover_crop(im, size, flip)
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return arr.transpose(2, 0, 1).copy(), (oh, ow), (top, left)


def _cover_crop(im, size: tuple[int, int], flip: bool):
    """Cover-resize ``im`` to ``size`` (w, h), centre-crop, mirror when ``flip``: ``(image, top, left)``."""
    w, h = size
    ow, oh = im.size
    scale = max(w / ow, h / oh)
    nw, nh = max(w, round(ow * scale)), max(h, round(oh * scale))
    im = im.resize((nw, nh), Image.LANCZOS if scale < 1 else Image.BICUBIC)
    left, top = (nw - w) // 2, (nh - h) // 2
    im = im.crop((left, top, left + w, top + h))
    return (ImageOps.mirror(im) if flip else im), top, left


def load_training_mask(path: Path, size: tuple[int, int], flip: bool = False) -> np.ndarray | None:
    """The loss mask of a training image (``dataset.masked_loss``), cropped exactly as the image is: its
    ``<stem>.mask.png`` (white = learn, black = ignore) or else its alpha channel; None when it has neither.
    Returns float32 (h, w) in [0, 1]."""
    mask_path = mask_file_for(path)
    try:
        if mask_path is not None:
            with Image.open(mask_path) as m, Image.open(path) as im:
                mask = ImageOps.exif_transpose(m).convert("L")
                shown = ImageOps.exif_transpose(im).size
            if mask.size != shown:
                raise LoraNbError(f"The loss mask {mask_path} is {mask.size[0]}x{mask.size[1]} but its image is "
                                  f"{shown[0]}x{shown[1]}: save the mask at the image's size.")
        else:
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im)
                if im.mode not in ("RGBA", "LA") and not (im.mode == "P" and "transparency" in im.info):
                    return None
                mask = im.convert("RGBA").getchannel("A")
    except (OSError, ValueError) as exc:
        raise LoraNbError(f"Cannot read the loss mask of {path} ({mask_path or 'alpha channel'}: {exc}): fix or "
                          "remove the mask, or set dataset.masked_loss false.") from None
    mask, _top, _left = _cover_crop(mask, size, flip)
    return np.asarray(mask, dtype=np.float32) / 255.0


# Never enlarge a picture more than this to fill its bucket: a smaller bucket of its own shape instead
# (crop mode "none" in notebook 02 uses the same limit).
BUCKET_MAX_UPSCALE = 2.0


def assign_buckets(items: list[Item], resolution: tuple[int, int], step: int,
                   max_upscale: float = BUCKET_MAX_UPSCALE) -> list[Item]:
    """Each item with ``size`` set to its aspect-ratio bucket (kohya-style buckets of about the area of
    ``resolution`` in steps of ``step``): nothing of the picture is cropped but the small remainder of
    rounding its sides to the step. Only the image headers are read."""
    buckets = make_buckets(resolution, step=step)
    out = []
    for it in items:
        w, h = image_size(it.image)
        try:
            size = bucket_for_image(w, h, buckets, max_upscale=max_upscale, step=step)
        except LoraNbError as exc:
            raise LoraNbError(f"{it.image}: {exc}") from None
        out.append(replace(it, size=size))
    return out


def bucket_counts(items: list[Item]) -> dict[tuple[int, int], int]:
    """Training samples per bucket in one epoch (images × repeats), largest bucket first."""
    counts: collections.Counter = collections.Counter()
    for it in items:
        counts[it.size] += it.repeats
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
