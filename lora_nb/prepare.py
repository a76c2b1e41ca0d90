"""Fill the workspace folders notebooks 01–03 derive from the learner's pictures.

* :func:`add_regularization_images` — ``regularization/<R>_<class>/`` (notebook 01);
* :func:`rebuild_processed` — ``processed/``, the cropped pictures (notebook 02);
* :func:`rebuild_training_folder` — ``dataset/<repeats>_<concept>/``, pictures + caption files, the folder
  the trainer reads (notebook 03).

A rebuild starts fresh, so no leftover of an earlier run is trained. What it deletes is bounded: only
image and caption files, only directly inside the folder it rebuilds (or, for the training folder, a
folder of the same concept with other repeats), only inside the workspace, never through a symbolic
link (a link is removed, not what it points to). The pictures it copies from are only read.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from PIL import Image

from lora_nb import LoraNbError
from lora_nb.captions import check_caption_extension, write_captions
from lora_nb.crop import CropFolderReport, crop_folder, crop_image, make_buckets
from lora_nb.folders import (
    CAPTION_EXTENSIONS, IMAGE_EXTENSIONS, concept_folder_name, find_concept_folders, list_images,
    make_regularization_folder, mask_file_for, mask_path_for,
)
from lora_nb.fsutil import atomic_path
from lora_nb.images import copy_images, load_image
from lora_nb.workspace import Workspace

_REMOVABLE = IMAGE_EXTENSIONS + CAPTION_EXTENSIONS


def _inside(path: str | Path, folder: str | Path) -> bool:
    """True when ``path`` (links resolved) is ``folder`` or lies under it."""
    p, f = os.path.realpath(path), os.path.realpath(folder)
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def _check_rebuildable(folder: Path, workspace: Workspace) -> None:
    if folder.is_symlink():
        raise LoraNbError(f"{folder} is a link to {os.path.realpath(folder)}: rebuilding it would delete files there. "
                          "Replace the link with a plain folder (or remove it) and run again.")
    if not _inside(folder, workspace.root):
        raise LoraNbError(f"{folder} lies outside the workspace {workspace.root} (through a link): not rebuilding it.")


def _refuse_sources_inside(sources: list[Path], folder: Path) -> None:
    inside = [str(p) for p in sources if _inside(p, folder)]
    if inside:
        raise LoraNbError(f"{len(inside)} picture(s) to copy lie inside {folder}, which is rebuilt (emptied first), "
                          f"e.g. {inside[0]}: keep your pictures in another folder (the workspace's source/ or "
                          "processed/) and run again.")


def clear_pictures(folder: str | Path) -> list[Path]:
    """Delete the image and caption files directly inside ``folder`` (not in sub-folders); links are removed,
    never followed. Other files stay. Returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir() or folder.is_symlink():
        return removed
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            is_file = entry.is_symlink() or entry.is_file(follow_symlinks=False)
            if is_file and os.path.splitext(entry.name)[1].lower() in _REMOVABLE:
                os.unlink(entry.path)  # a link: only the link goes
                removed.append(Path(entry.path))
    return removed


def _copy_atomic(src: Path, dest: Path) -> Path:
    """Copy ``src`` to ``dest`` through a temporary file: a link or hard link at ``dest`` is replaced, never written through."""
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
    return dest


def _unique_name(name: str, taken: set[str]) -> str:
    stem, ext = os.path.splitext(name)
    out, n = name, 1
    while out.lower() in taken:
        out = f"{stem}-{n}{ext}"
        n += 1
    taken.add(out.lower())
    return out


# --------------------------------------------------------------------------- regularization/ (01)

def add_regularization_images(workspace: Workspace, src: str | Path, class_name: str,
                              repeats: int = 1) -> tuple[Path, list[Path]]:
    """Copy the class pictures of ``src`` into ``regularization/<repeats>_<class_name>/`` (pictures already
    there by name are not copied twice), each with its caption file when it has one (the trainer reads it;
    a picture without one is trained with the class word, as kohya's trainers do); returns the folder and
    every picture in it."""
    folder = make_regularization_folder(workspace.regularization, class_name, repeats=repeats)
    have = {p.name for p in list_images(folder)}
    todo = [p for p in list_images(src) if p.name not in have]
    for original, copied in zip(todo, copy_images(todo, folder)):
        copy_caption_files(original, copied)
    return folder, list_images(folder)


def copy_caption_files(original: Path, copied: Path) -> None:
    """Copy the caption files beside ``original`` (each of the kohya caption extensions) beside ``copied``,
    under its name; links are not followed."""
    for ext in CAPTION_EXTENSIONS:
        caption = Path(original).with_suffix(ext)
        if caption.is_file() and not caption.is_symlink():
            shutil.copyfile(caption, Path(copied).with_suffix(ext))


# --------------------------------------------------------------------------- processed/ (02)

@dataclass
class ProcessedFolder:
    """What :func:`rebuild_processed` wrote: the crop report, the sizes written, what it removed first."""

    folder: Path
    source: Path
    size: tuple[int, int]
    mode: str
    max_upscale: float
    crops: CropFolderReport
    sizes: dict[str, int] = field(default_factory=dict)  # "64x64" -> pictures written at that size
    removed: list[Path] = field(default_factory=list)
    buckets: list[tuple[int, int]] | None = None  # mode none: the buckets the pictures were resized into
    masks: int = 0  # subject-box loss masks written beside the pictures

    def summary(self) -> str:
        return (f"{len(self.crops.results)} picture(s) cropped ({self.mode}) into {self.folder}; sizes: {self.sizes}"
                + (f"; {self.masks} with a subject-box loss mask (<name>.mask.png, for dataset.masked_loss)"
                   if self.masks else "")
                + (f"; {len(self.crops.skipped)} skipped" if self.crops.skipped else ""))

    def before_after(self, n: int = 6) -> list[tuple]:
        """``(original, CropResult)`` for the first ``n`` pictures, as :func:`lora_nb.crop.before_after_grid` draws them."""
        out = []
        for source_path, _, _, _ in self.crops.results[:n]:
            original = load_image(source_path)
            out.append((original, crop_image(original, self.size, self.mode, buckets=self.buckets,
                                             max_upscale=self.max_upscale)))
        return out

    @property
    def written(self) -> list[str]:
        return [w for _, w, _, _ in self.crops.results]


def rebuild_processed(workspace: Workspace, source: str | Path, size: tuple[int, int], mode: str = "focus",
                      max_upscale: float = 2.0, bucket_step: int | None = None, masks: bool = False) -> ProcessedFolder:
    """Crop every picture of ``source`` into the workspace's ``processed/``, emptied of pictures first (a fresh
    result: no leftover of an earlier crop mode), each with its caption file when it has one, and with
    ``masks`` its subject-box loss mask (:func:`lora_nb.crop.subject_mask`). ``source`` is only read."""
    source, folder = Path(source), workspace.processed
    _check_rebuildable(folder, workspace)
    pictures = list_images(source)
    if not pictures:
        raise LoraNbError(f"No pictures in {source}: import some first (notebook 01).")
    _refuse_sources_inside(pictures, folder)
    folder.mkdir(parents=True, exist_ok=True)
    removed = clear_pictures(folder)
    buckets = make_buckets(size, step=bucket_step) if bucket_step else None  # the steps training's buckets use
    crops = crop_folder(pictures, folder, size, mode, max_upscale=max_upscale, buckets=buckets, progress=False,
                        masks=masks)
    for original, written, _, _ in crops.results:  # 03 keeps these captions when no tagger can run
        copy_caption_files(Path(original), Path(written))
    sizes: Counter = Counter()
    for _, written, _, _ in crops.results:
        with Image.open(written) as im:
            sizes[f"{im.width}x{im.height}"] += 1
    n_masks = sum(1 for _, written, _, _ in crops.results if mask_file_for(written) is not None)
    return ProcessedFolder(folder, source, tuple(size), mode, max_upscale, crops, dict(sizes), removed, buckets,
                           n_masks)


# --------------------------------------------------------------------------- dataset/<R>_<concept>/ (03)

@dataclass
class TrainingFolder:
    """What :func:`rebuild_training_folder` wrote into the folder the trainer reads, and what it removed."""

    folder: Path
    captions: dict[str, str]  # copied picture -> its caption
    caption_files: list[Path]
    removed: list[Path]  # image / caption files (and links) removed from this concept's folders
    left: list[Path]  # other files found in them, left in place
    check: object  # lora_nb.captions.CaptionCheck of the whole dataset/ folder

    def summary(self) -> str:
        check = self.check
        lines = [f"wrote {len(self.captions)} pictures + {len(self.caption_files)} captions into {self.folder}"
                 + (f" (removed {len(self.removed)} earlier file(s))" if self.removed else "")]
        lines.append(f"caption check: {check.captioned}/{check.images} pictures have a {check.extension} caption -> "
                     + ("OK, the trainer reads them all" if check.ok else "; ".join(check.warnings)))
        if self.left:
            lines.append(f"left in place (not pictures or captions): {', '.join(str(p) for p in self.left[:5])}")
        return "\n".join(lines)


def rebuild_training_folder(workspace: Workspace, captions: Mapping[str | Path, str], repeats: int, concept: str,
                            caption_ext: str = ".txt") -> TrainingFolder:
    """(Re)build ``dataset/<repeats>_<concept>/`` from ``captions`` (``{picture: caption}``): each picture copied
    in with its caption file beside it, and its loss mask (``<stem>.mask.png``) when it has one.

    First the concept's earlier pictures and captions go: those of this folder, and any folder of the same
    concept with other repeats (it would be trained too; a link there is removed, its target left alone).
    Other files, other concepts and everything outside ``dataset/`` stay; the pictures are only read.
    """
    dataset = workspace.dataset
    _check_rebuildable(dataset, workspace)
    folder = dataset / concept_folder_name(repeats, concept)
    _check_rebuildable(folder, workspace)
    sources = [Path(p) for p in captions]
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        raise LoraNbError(f"{len(missing)} picture(s) to copy do not exist, e.g. {missing[0]}: nothing was changed.")
    _refuse_sources_inside(sources, dataset)
    _, concept_name = folder.name.split("_", 1)
    removed, left = [], []
    for other, _, name in find_concept_folders(dataset):
        if name != concept_name or other == folder:
            continue
        if other.is_symlink():
            os.unlink(other)
            removed.append(other)
            continue
        removed += clear_pictures(other)
        rest = sorted(other.iterdir())
        if rest:
            left += rest
        else:
            other.rmdir()
    folder.mkdir(parents=True, exist_ok=True)
    removed += clear_pictures(folder)
    left += sorted(p for p in folder.iterdir() if p.is_file())
    taken: set[str] = set()
    final = {}
    for src, caption in captions.items():
        dest = _copy_atomic(Path(src), folder / _unique_name(Path(src).name, taken))
        mask = mask_file_for(src)
        if mask is not None:  # named after the copy, which may have been renamed
            _copy_atomic(mask, mask_path_for(dest))
        final[str(dest)] = caption
    files = write_captions(folder, final, ext=caption_ext)
    return TrainingFolder(folder, final, files, removed, left, check_caption_extension(dataset, caption_ext))
