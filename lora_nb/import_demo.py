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
