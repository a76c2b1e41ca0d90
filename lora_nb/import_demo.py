"""Notebook 01's demo of the importer: a folder of awkward files, imported, every original checked unchanged."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from lora_nb.images import import_images, write_awkward_examples


@dataclass
class AwkwardImport:
    """The demo's result: one row per awkward file, whether the originals are byte-for-byte unchanged,
    and the pictures the import kept."""

    rows: list[dict] = field(default_factory=list)  # {"file", "what is awkward", "result"}
    originals_unchanged: bool = False
    kept: list[Path] = field(default_factory=list)


def file_digests(folder: str | Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder``."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def awkward_import_demo(scratch: str | Path) -> AwkwardImport:
    """Write the awkward files (:func:`lora_nb.images.write_awkward_examples`) into ``scratch/in``, import them
    into ``scratch/out`` and compare every original before and after."""
    scratch = Path(scratch)
    about = write_awkward_examples(scratch / "in")
    before = file_digests(scratch / "in")
    demo = import_images(scratch / "in", scratch / "out", progress=False)
    kept = {i.original: i for i in demo.imported}
    skipped = demo.skipped_names()
    rows = []
    for name, what in about.items():
        if name in kept:
            i = kept[name]
            result = f"kept {i.width}x{i.height}" + (f" ({'; '.join(i.notes)})" if i.notes else " (byte copy)")
        else:
            result = "skipped: " + skipped.get(name, "?")
        rows.append({"file": name, "what is awkward": what, "result": result})
    return AwkwardImport(rows, before == file_digests(scratch / "in"), [Path(p) for p in demo.paths])


@dataclass
class AuditDemo:
    """Notebook 01's audit demonstration: which picture was made how, and the audit of the lot."""

    made: dict[str, str]  # file name → how it was made
    audit: object  # lora_nb.images.AuditReport


def audit_demo(pictures: list[Path], scratch: str | Path, target: tuple[int, int], blur_threshold: float = 100.0,
               blur_radius: float = 2.5) -> AuditDemo:
    """Make, from the first two of ``pictures``, the faults the audit exists for — a blurred copy, a copy at a
    quarter of the size, an exact duplicate, a near duplicate (slightly brighter) — next to the originals in
    ``scratch``, and audit them all (the workspace is not touched)."""
    from PIL import Image, ImageEnhance, ImageFilter

    from lora_nb.images import audit_images

    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    a, b = (Image.open(p).convert("RGB") for p in pictures[:2])
    w, h = a.size
    faults = {
        "original 1.png": ("the first picture, as imported", a),
        "original 2.png": ("the second picture, as imported", b),
        "blurred.png": (f"picture 1, Gaussian blur of radius {blur_radius:g} px", a.filter(ImageFilter.GaussianBlur(blur_radius))),
        "small.png": (f"picture 2 at a quarter of the size ({w // 4}x{h // 4})", b.resize((w // 4, h // 4), Image.BOX)),
        "copy of 1.png": ("picture 1 again, byte for byte", a),
        "brighter 2.png": ("picture 2, 8% brighter", ImageEnhance.Brightness(b).enhance(1.08)),
    }
    for name, (_, img) in faults.items():
        img.save(scratch / name)
    audit = audit_images(sorted(scratch / n for n in faults), target=target, blur_threshold=blur_threshold,
                         progress=False)
    return AuditDemo({n: what for n, (what, _) in faults.items()}, audit)
