"""Notebook 03 on a learner's own photos, offline: it says in one line that no tagger can tell the truth about
them here, and writes honest captions (the trigger word and the added tags), never the toy oracle's tags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from skimage import data as skdata

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def test_03_does_not_tag_photos_with_the_toy_oracle(tmp_path):
    import nbformat
    import papermill

    ws = tmp_path / "ws"
    processed = ws / "processed"
    processed.mkdir(parents=True)
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        Image.fromarray(getattr(skdata, name)()).convert("RGB").resize((64, 64)).save(processed / f"{name}.png")
    out = tmp_path / "03.ipynb"
    papermill.execute_notebook(str(REPO / "notebooks" / "03_tagging.ipynb"), str(out), kernel_name="python3",
                               cwd=str(REPO / "notebooks"), progress_bar=False,
                               parameters={"interactive": False, "workspace": str(ws), "quick": True,
                                           "try_real_taggers": False, "tagger": "wd", "trigger_word": "sks",
                                           "add": "photo"})
    nb = nbformat.read(out, as_version=4)
    text = "\n".join("".join(o.get("text", "")) for c in nb.cells for o in c.get("outputs", []))
    line = next(ln for ln in text.splitlines() if ln.startswith("The wd tagger cannot be used here"))
    assert "not toy-world pictures" in line and "trigger word" in line
    report = json.loads((ws / "reports" / "tagging_report.json").read_text(encoding="utf-8"))
    assert report["tagger"] == "existing captions" and report["tagger_requested"] == "wd"
    assert report["captions"] == {f"{n}.png": "sks, photo" for n in ("astronaut", "chelsea", "coffee", "rocket")}
    written = sorted((ws / "dataset" / "10_sks").glob("*.txt"))
    assert [p.read_text(encoding="utf-8") for p in written] == ["sks, photo"] * 4
