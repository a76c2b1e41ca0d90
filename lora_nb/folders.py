"""The kohya folder convention, in one place: which files are images and captions, how a
``<repeats>_<concept>`` folder is named and read, and how a folder's images are listed.

The importer (:mod:`lora_nb.images`), the notebooks and the trainer (:mod:`lora_nb.dataset`)
all use these, so a file the importer accepts is a file the trainer reads.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lora_nb import LoraNbError

# Every format the robust loader (lora_nb.images.load_image) reads and the trainer trains on.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Caption files kohya's tools and taggers write beside an image (the trainer reads dataset.caption_extension).
CAPTION_EXTENSIONS = (".txt", ".caption", ".cap", ".tags")
# ``<repeats>_<concept>``: the trainer repeats every image of the folder ``repeats`` times per epoch (C14).
FOLDER_RE = re.compile(r"^(\d+)_(.+)$")


def is_image_file(path: str | Path) -> bool:
    """An image by its extension, not hidden (``.name``)."""
    p = Path(path)
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


MASK_SUFFIX = ".mask"  # <name>.mask.png beside <name>.jpg: the loss mask of dataset.masked_loss, not an image


def is_mask_file(path: str | Path) -> bool:
    """``photo.mask.png`` (beside ``photo.jpg``): a loss mask, listed with no images."""
    return Path(path).stem.lower().endswith(MASK_SUFFIX)


def mask_path_for(image: str | Path) -> Path:
    """Where the loss mask of ``image`` lives: ``<stem>.mask.png`` beside it."""
    return Path(image).with_name(Path(image).stem + MASK_SUFFIX + ".png")


def mask_file_for(image: str | Path) -> Path | None:
    """The loss mask beside ``image`` (:func:`mask_path_for`), or None when it has none."""
    candidate = mask_path_for(image)
    return candidate if candidate.is_file() else None


def list_images(folder: str | Path, recursive: bool = True, follow_links: bool = False) -> list[Path]:
    """Image files in ``folder`` (and its non-hidden sub-folders when ``recursive``), sorted.

    Symbolic links are skipped unless ``follow_links`` (the importer never follows them; the trainer
    reads a dataset folder whose images a learner may have linked in).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise LoraNbError(f"{folder} is not a folder: pass the folder that holds your images.")
    found = []
    for root, dirs, files in os.walk(folder, followlinks=follow_links):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in files:
            p = Path(root) / f
            if is_image_file(p) and not is_mask_file(p) and (follow_links or not p.is_symlink()) and p.is_file():
                found.append(p)
        if not recursive:
            break
    return sorted(found)


def concept_folder_name(repeats: int, concept: str, setting: str = "concept") -> str:
    """The kohya dataset folder name ``<repeats>_<concept>`` (e.g. ``10_sks dog``); ``setting`` is the name the
    learner gave the concept under, for the message when it cannot be a folder name."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise LoraNbError(f"repeats={repeats!r}: must be a whole number of at least 1 (anime ~8, realistic ~15).")
    concept = str(concept).strip()
    if not concept or any(c in concept for c in '/\\<>:"|?*') or concept in (".", ".."):
        raise LoraNbError(f"{setting}={concept!r} cannot be a folder name: give a short name without slashes or "
                          "special characters, e.g. 'sks dog'.")
    return f"{repeats}_{concept}"


def match_concept_folder(name: str | Path) -> tuple[int, str] | None:
    """``"10_sks dog"`` -> ``(10, "sks dog")``; None when the name does not follow the convention."""
    m = FOLDER_RE.match(Path(name).name)
    if not m or int(m.group(1)) < 1:
        return None
    return int(m.group(1)), m.group(2)


def parse_concept_folder(name: str | Path) -> tuple[int, str]:
    """``"10_sks dog"`` -> ``(10, "sks dog")``. Raises :class:`LoraNbError` when the name does not follow the convention."""
    parsed = match_concept_folder(name)
    if parsed is None:
        raise LoraNbError(
            f"Folder {Path(name).name!r} does not follow the kohya convention '<repeats>_<concept>' (e.g. '10_sks dog'): "
            "rename it, or create it with concept_folder_name()."
        )
    return parsed


def make_concept_folder(dataset_dir: str | Path, repeats: int, concept: str, setting: str = "concept") -> Path:
    """Create ``dataset_dir/<repeats>_<concept>`` and return it."""
    path = Path(dataset_dir) / concept_folder_name(repeats, concept, setting)
    path.mkdir(parents=True, exist_ok=True)
    return path


def find_concept_folders(dataset_dir: str | Path) -> list[tuple[Path, int, str]]:
    """Every ``<repeats>_<concept>`` sub-folder of ``dataset_dir`` as ``(path, repeats, concept)``."""
    root = Path(dataset_dir)
    out = []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        parsed = match_concept_folder(p.name) if p.is_dir() and not p.name.startswith(".") else None
        if parsed:
            out.append((p, *parsed))
    return out


def make_regularization_folder(reg_dir: str | Path, class_name: str, repeats: int = 1) -> Path:
    """Create the regularization set folder ``reg_dir/<repeats>_<class>`` (C5), kohya's layout for reg images."""
    return make_concept_folder(reg_dir, repeats, class_name, setting="class_name")
