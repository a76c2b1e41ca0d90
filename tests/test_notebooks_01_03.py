"""Notebooks 01-03 run headless through papermill, and what they write is what the trainer reads."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"


def run_notebook(name: str, out_dir: Path, **parameters) -> Path:
    import papermill

    out = out_dir / f"{name}.ipynb"
    papermill.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(out), parameters={"interactive": False, **parameters},
                               kernel_name="python3", cwd=str(NOTEBOOKS), progress_bar=False)
    return out


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _outputs_text(nb_path: Path) -> str:
    nb = json.loads(nb_path.read_text(encoding="utf-8"))
    parts = []
    for cell in nb["cells"]:
        for o in cell.get("outputs", []):
            parts.append("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """01 → 02 → 03 into one workspace, on the bundled data, as a learner would run them."""
    root = tmp_path_factory.mktemp("course")
    ws = root / "ws"
    bundled = REPO / "data" / "toy-concept"
    before = _digests(bundled)
    outs = {
        "01": run_notebook("01_dataset", root, workspace=str(ws)),
        "02": run_notebook("02_cropping", root, workspace=str(ws), quick=True),
        # tag-style captions: the trigger-first and keep-tokens lessons are about tags (the default writes sentences)
        "03": run_notebook("03_tagging", root, workspace=str(ws), measure_n=30, try_real_taggers=False,
                           caption_style="tags"),
    }
    return {"ws": ws, "outs": outs, "bundled_before": before, "bundled_after": _digests(bundled)}


def test_01_imports_audits_and_reports(course):
    ws = course["ws"]
    report = json.loads((ws / "reports" / "dataset_report.json").read_text(encoding="utf-8"))
    assert report["imported"] == 48 and report["audit"]["count"] == 48
    assert len([p for p in (ws / "source").iterdir() if p.suffix == ".png"]) == 48
    assert course["bundled_before"] == course["bundled_after"], "the originals must never change"
    assert report["skipped"] == {}  # the bundled captions come along with their pictures, not as skipped files
    assert (ws / "source" / "zorb_000.txt").read_text(encoding="utf-8").startswith("a red zorb circle")
    faults = " ".join(report["audit_demo"])
    assert "blurry" in faults and "smaller than the 64x64 target" in faults and "exact duplicates" in faults
    # the audit measured every image, at the toy target, and nothing is called blurry in the sharp toy set
    assert report["audit"]["target"] == [64, 64]
    assert not any(a["blurry"] for a in report["audit"]["images"])
    assert 0 < report["audit"]["variety"] <= 1
    # the awkward demo: good files kept, bad ones skipped with a reason
    demo = {r["file"]: r["result"] for r in report["awkward_demo"]}
    assert demo["cmyk.jpg"].startswith("kept") and demo["phone photo (EXIF rotated).jpg"].startswith("kept 160x240")
    assert "too small" in demo["icon 20x20.png"] and "truncated" in demo["truncated.jpg"]
    assert "duplicate" in demo["ok_copy.jpg"] and "not an image" in demo["notes.txt"]
    assert "originals unchanged: True" in _outputs_text(course["outs"]["01"])
    reg = report["regularization"]
    assert reg["count"] == 48 and Path(reg["folder"]).name == "1_circle"
    for fig in ("01_imported", "01_sharpness", "01_regularization", "01_awkward_imported"):
        assert (ws / "figures" / f"{fig}.png").is_file(), fig


def test_02_crops_to_the_toy_size_and_measures_retention(course):
    ws = course["ws"]
    report = json.loads((ws / "reports" / "crop_report.json").read_text(encoding="utf-8"))
    assert report["mode"] == "focus" and report["resolution"] == [64, 64]
    assert report["written"] == 48 and report["sizes"] == {"64x64": 48}
    processed = sorted((ws / "processed").glob("*.png"))
    assert len(processed) == 48 and all(Image.open(p).size == (64, 64) for p in processed)
    rows = {r["set"]: r for r in report["retention"]}
    off = rows["toy world, zorb off-centre"]
    assert off["focus"] >= 0.95 and off["center"] < off["focus"] - 0.3
    assert rows["astronaut photo, face"]["focus"] >= 0.95
    assert rows["all"]["focus"] >= 0.95
    for fig in ("02_modes", "02_retention", "02_processed"):
        assert (ws / "figures" / f"{fig}.png").is_file(), fig
    # the bundled pictures already have the toy size: no before/after pair that would show two identical pictures
    assert not (ws / "figures" / "02_before_after.png").exists()
    assert "Every picture already has the training size 64x64: nothing was cut or scaled" in _outputs_text(
        course["outs"]["02"])


def test_03_writes_captions_with_the_trigger_first_where_the_trainer_reads(course):
    ws = course["ws"]
    report = json.loads((ws / "reports" / "tagging_report.json").read_text(encoding="utf-8"))
    folder = ws / "dataset" / "10_zorb"
    images = sorted(folder.glob("*.png"))
    assert len(images) == 48
    for img in images:
        caption = img.with_suffix(".txt").read_text(encoding="utf-8")
        tags = [t.strip() for t in caption.split(",")]
        assert tags[0] == "zorb", caption
        assert "black eyes" not in tags and len(tags) == len(set(tags))
        assert report["captions"][img.name] == caption
    assert report["caption_check"]["captioned"] == 48 and not report["caption_check"]["warnings"]
    at = report["threshold_sweep"]["at_0.6"]
    assert at["oracle"]["precision"] > 0.85 and at["oracle"]["recall"] > 0.85
    noisy = report["threshold_sweep"]["sweeps"]["noisy"]
    low, high = noisy[0], noisy[-1]  # the threshold lesson: low = more tags and worse precision, high = worse recall
    assert low["precision"] < at["noisy"]["precision"] and high["recall"] < at["noisy"]["recall"]
    for fig in ("03_threshold", "03_tags_before", "03_tags_after"):
        assert (ws / "figures" / f"{fig}.png").is_file(), fig


def test_03_alone_falls_back_to_the_bundled_set(tmp_path):
    ws = tmp_path / "ws"
    out = run_notebook("03_tagging", tmp_path, workspace=str(ws), quick=True, try_real_taggers=False,
                       trigger_word="sks", repeats=3, remove="", add="toy picture", tagger="toy-noisy")
    assert "using the bundled" in _outputs_text(out)
    captions = [p.read_text(encoding="utf-8") for p in sorted((ws / "dataset" / "3_sks").glob("*.txt"))]
    assert len(captions) == 48
    # default caption_style "forms": six lines, each naming the trigger, the sentence first and the added tag
    # after each (a caption the noisy tagger left without an object or background tag stays one tag line)
    forms = [c.split("\n") for c in captions]
    assert sum(len(f) == 6 for f in forms) >= 40, forms
    bad = [f for f in forms if not all("sks" in line.split(", ")[0].split() + [line.split(", ")[0]]
                                       and line.endswith("toy picture") for line in f)
           or (len(f) == 6 and not (f[0].startswith("a ") and " sks " in f[0] and f[1].startswith("sks, ")))]
    assert not bad, bad


def test_captions_written_by_03_are_the_ones_the_trainer_reads(course, tiny_sd15_dir, tmp_path, captions_seen):
    from conftest import make_config

    from lora_nb.train import train

    ws = course["ws"]
    written = {p.read_text(encoding="utf-8") for p in (ws / "dataset" / "10_zorb").glob("*.txt")}
    # no trigger word in the settings: whatever comes first must come from 03's caption files
    cfg = make_config(tiny_sd15_dir, ws / "dataset", tmp_path / "train", **{
        "dataset.trigger_word": "", "training.epochs": 1, "training.max_steps": 2, "dataset.shuffle_caption": False})
    train(cfg, progress=False)
    seen = captions_seen
    assert seen, "no caption reached the text encoder"
    assert set(seen) <= written, set(seen) - written
    assert all(c.split(", ")[0] == "zorb" for c in seen), seen


def test_toy_tags_become_the_sentences_the_toy_model_learned():
    from lora_nb.tagging import toy_sentence

    assert toy_sentence("zorb, black background, red circle", "zorb") == "a red zorb circle on a black background"
    assert toy_sentence("zorb, red circle, gray gradient background, blue square", "zorb") == \
        "a red zorb circle and a blue square on a gray gradient background"
    assert toy_sentence("sks, 1girl, smile", "sks") == "sks, 1girl, smile"  # not a toy caption: unchanged
