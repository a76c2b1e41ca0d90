"""The real path headless: `lora-nb course -p preset realistic -p model_source <SD1.5 folder> …` on photos runs
all six notebooks with one set of choices, and the file it trains says what it was trained on."""

from __future__ import annotations

import json

import nbformat
import pytest
import yaml
from PIL import Image
from safetensors import safe_open
from skimage import data as skdata

from lora_nb.course import run_course

pytestmark = pytest.mark.slow

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


def _printed(path) -> str:
    nb = nbformat.read(path, as_version=4)
    return "\n".join("".join(o.get("text", "")) for c in nb.cells for o in c.get("outputs", []))


def test_the_real_path_runs_all_six_notebooks_on_photos_and_an_sd15_model(tmp_path, tiny_sd15_dir):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in PHOTOS:  # square, landscape and portrait shapes
        Image.fromarray(getattr(skdata, name)()).convert("RGB").save(photos / f"{name}.png")
    ws = tmp_path / "ws"
    params = {"preset": "realistic", "model_source": str(tiny_sd15_dir), "source_dir": str(photos),
              "resolution": "64x64", "bucket_step": 16, "crop_mode": "none", "trigger_word": "lnbx", "class_name": "thing",
              "repeats": 1, "epochs": 2, "optimizer": "AdamW", "mixed_precision": "no", "save_precision": "fp32",
              "measure_time": True, "save_every_n_epochs": 1, "sample_every_n_epochs": 2, "strengths": "0, 1",
              "seeds": 1, "sample_steps": 2, "run_experiments": False, "awkward_demo": False,
              "try_real_taggers": False, "measure_toy": 4, "measure_photos": 2, "measure_n": 8}
    summary = run_course(ws, params=params, quick=True, log=lambda *_: None)
    assert summary.ok, summary.describe()

    shared = yaml.safe_load((ws / "course.yaml").read_text(encoding="utf-8"))
    assert shared["preset"] == "realistic" and shared["crop_mode"] == "none" and shared["class_name"] == "thing"
    assert shared["model_source"] == str(tiny_sd15_dir) and shared["resolution"] == "64x64"
    texts = {r.name[:2]: _printed(r.output) for r in summary.runs}
    assert "preset realistic" in texts["02"] and "crop_mode none" in texts["02"]  # 02 read what 01 stored
    assert "tagger blip" in texts["03"]  # the realistic preset's tagger, not the toy oracle
    assert "The blip tagger cannot be used here" in texts["03"]  # offline: said in one line, honest captions

    cfg = yaml.safe_load((ws / "config.yaml").read_text(encoding="utf-8"))
    assert cfg["model"]["source"] == str(tiny_sd15_dir)
    assert cfg["dataset"]["enable_buckets"] is True  # crop mode none in 02 → buckets in training
    assert cfg["dataset"]["reg_dir"] == "" and cfg["dataset"]["trigger_word"] == "lnbx"
    prompts = cfg["sample"]["prompts"]
    assert len(prompts) == 3 and sum("lnbx thing" in p for p in prompts) == 2 and "a photo of a thing" in prompts[2]

    final = ws / "lora" / "lnbx.safetensors"  # named after the trigger word
    with safe_open(str(final), "pt") as f:
        meta = f.metadata()
    buckets = json.loads(meta["ss_bucket_info"])["buckets"]
    assert len(buckets) >= 2 and sum(b["count"] for b in buckets.values()) == len(PHOTOS)
    assert str(tmp_path) not in json.dumps(meta)  # no local path in a file people share
    assert meta["ss_output_name"] == "lnbx" and meta["modelspec.trigger_phrase"] == "lnbx"
    assert meta["ss_max_token_length"] == "225" and meta["ss_shuffle_caption"] == "True"

    assert "s per step measured here" in texts["04"]
    estimate = json.loads((ws / "reports" / "parameters.json").read_text(encoding="utf-8"))["file_bytes"]
    assert abs(final.stat().st_size - estimate) / final.stat().st_size < 0.01  # 04's estimate is the file 05 wrote
    for fig in ("05_loss", "05_sample_grid", "05_strengths"):
        assert (ws / "figures" / f"{fig}.png").exists(), fig
    nb5 = nbformat.read(ws / "executed" / "05_training.ipynb", as_version=4)
    assert len([o for c in nb5.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]) >= 3
    assert "widgets" not in nb5.metadata

    diagnosis = json.loads((ws / "diagnosis.json").read_text(encoding="utf-8"))
    assert diagnosis["toy_judge"] is False and diagnosis["verdict"] in ("good", "underfit", "overfit")
    assert f"Verdict for this run: {diagnosis['verdict'].upper()}" in texts["06"]
    # offline there is no DINO/CLIP: 06 says so in one line and labels the approximation, read against the base
    # model, so the base model itself shows no subject and no leakage
    assert "DINO/CLIP not available offline" in texts["06"] and diagnosis["approximate"] is True
    assert diagnosis["base"]["fidelity"] == 0 and diagnosis["base"]["leakage"] == 0
