"""Notebook 03's tagger choice (lora_nb.tagging.choose_tagger): the tagger asked for when it can run and tells
the truth about the pictures; the toy oracle only on toy-world pictures; real photos are never tagged by it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image
from skimage import data as skdata

from lora_nb import LoraNbError
from lora_nb import tagging as tg
from lora_nb.captions import threshold_sweep
from lora_nb.images import list_images, load_image

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "data" / "toy-concept" / "10_zorb"
TOY_REG = ROOT / "data" / "toy-reg" / "1_circle"
PHOTOS = ("astronaut", "chelsea", "coffee", "moon", "clock", "hubble_deep_field")  # the last three: mostly grey/black


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """Real photos (scikit-image's samples) at the toy size, as notebook 02 would crop them at 64x64."""
    folder = tmp_path_factory.mktemp("photos")
    out = []
    for name in PHOTOS:
        img = Image.fromarray(getattr(skdata, name)()).convert("RGB").resize((64, 64), Image.Resampling.LANCZOS)
        img.save(folder / f"{name}.png")
        out.append(folder / f"{name}.png")
    return out


def test_toy_pictures_and_photos_are_told_apart(photos):
    toy = list_images(TOY) + list_images(TOY_REG)
    assert min(tg.toy_world_share(load_image(p)) for p in toy) > 0.85
    for p in toy[:4]:  # also once cropped and resized by notebook 02
        img = load_image(p)
        assert tg.toy_world_share(img.resize((128, 128), Image.Resampling.LANCZOS)) > 0.8
        assert tg.toy_world_share(img.resize((48, 48), Image.Resampling.LANCZOS)) > 0.8
    assert max(tg.toy_world_share(load_image(p)) for p in photos) < 0.65
    big = Image.fromarray(skdata.astronaut())
    assert tg.toy_world_share(big) < 0.65
    assert tg.are_toy_world_pictures(toy)
    assert not tg.are_toy_world_pictures(photos)
    assert not tg.are_toy_world_pictures(toy + photos[:1])  # one photo among them is enough to say no
    assert not tg.are_toy_world_pictures([])


def test_the_toy_tagger_is_used_on_toy_pictures():
    pictures = list_images(TOY)
    choice = tg.choose_tagger("toy", pictures)
    assert (choice.kind, choice.is_toy) == ("toy", True) and "oracle" in choice.report
    captions = choice.caption(pictures[:3], threshold=0.6)
    assert all("circle" in c and "background" in c for c in captions.values())
    noisy = tg.choose_tagger("toy-noisy", pictures, seed=3)
    assert noisy.kind == "toy-noisy" and noisy.caption(pictures[:2]) == noisy.caption(pictures[:2])


def test_a_real_tagger_without_the_hub_falls_back_to_the_oracle_on_toy_pictures(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    choice = tg.choose_tagger("wd", list_images(TOY))
    assert choice.requested == "wd" and choice.kind == "toy"
    assert choice.report.startswith("The wd tagger cannot be used here") and "toy oracle" in choice.report
    assert "\n" not in choice.report


def test_photos_are_never_tagged_by_the_toy_oracle(photos, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "pictures"
    folder.mkdir()
    for p in photos:
        shutil.copyfile(p, folder / p.name)
    (folder / "astronaut.txt").write_text("a woman in a space suit, flag", encoding="utf-8")  # the learner's caption
    pictures = list_images(folder)
    for asked in ("blip", "wd", "toy", "toy-noisy"):
        choice = tg.choose_tagger(asked, pictures)
        assert choice.kind == "existing captions" and not choice.is_toy, asked
        assert "not toy-world pictures" in choice.report and "\n" not in choice.report
        assert "1 of 6 picture(s) keep the caption file" in choice.report
        captions = choice.caption(pictures)
        assert captions[str(folder / "astronaut.png")] == "a woman in a space suit, flag"
        assert all(c == "" for p, c in captions.items() if not p.endswith("astronaut.png"))


def test_a_local_wd_tagger_is_used_on_photos(photos):
    pytest.importorskip("onnx")
    from test_tagging import build_tiny_wd_tagger

    folder = build_tiny_wd_tagger(Path(photos[0]).parent.parent / "wd")
    choice = tg.choose_tagger("wd", photos, source=folder)
    assert choice.kind == "wd" and str(folder) in choice.report
    captions = choice.caption(photos, threshold=0.5)
    assert set(captions) == {str(p) for p in photos} and all(isinstance(c, str) for c in captions.values())


def test_unknown_tagger_is_a_clear_error():
    with pytest.raises(LoraNbError, match="use one of toy, toy-noisy, wd, blip"):
        tg.choose_tagger("deepbooru", list_images(TOY))


def test_real_tagger_status_says_why_each_cannot_load_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lines = tg.real_tagger_status()
    assert [line.split(":")[0] for line in lines] == ["BLIP", "WD tagger"]
    assert all("not loaded" in line and "HF_HUB_OFFLINE" in line for line in lines)


def test_threshold_rows_table_the_sweeps():
    images, truths = tg.toy_tagging_set(12, seed=1)
    preds = tg.toy_tagger_predictions(images, seed=1)
    sweeps = {name: threshold_sweep(p, truths) for name, p in preds.items()}
    rows = tg.threshold_rows(sweeps, thresholds=(0.2, 0.6, 0.9))
    assert [r["threshold"] for r in rows] == [0.2, 0.6, 0.9]
    assert rows[1]["noisy precision"] == tg.row_at(sweeps["noisy"], 0.6)["precision"]
    assert rows[0]["noisy tags/img"] >= rows[2]["noisy tags/img"]  # a lower threshold keeps more tags


def test_style_captions_writes_toy_sentences_only_for_toy_tags():
    caps = {"a.png": "zorb, black background, red circle"}
    assert tg.style_captions(caps, "sentence", "zorb", toy=True) == {"a.png": "a red zorb circle on a black background"}
    assert tg.style_captions(caps, "sentence", "zorb", toy=False) == caps
    assert tg.style_captions(caps, "tags", "zorb", toy=True) == caps
    forms = tg.style_captions(caps, "forms", "zorb", toy=True)["a.png"].split("\n")
    assert forms[0] == "a red zorb circle on a black background" and len(forms) == 6
    assert "zorb, red circle, black background" in forms and all("zorb" in f for f in forms)
    assert tg.style_captions(caps, "forms", "zorb", toy=False) == caps
    with pytest.raises(LoraNbError, match="caption_style"):
        tg.style_captions(caps, "prose", "zorb")


def test_class_pictures_are_captioned_in_the_training_pictures_forms_without_the_trigger(tmp_path):
    """03 captions the workspace's class pictures with the tagger and style of the training pictures: each toy
    class picture gets the forms of its own truth, none names the trigger; other styles keep the captions."""
    src = TOY_REG
    folder = tmp_path / "regularization" / "1_circle"
    folder.mkdir(parents=True)
    for png in sorted(src.glob("*.png"))[:6]:
        shutil.copy(png, folder / png.name)
        shutil.copy(png.with_suffix(".txt"), folder / png.with_suffix(".txt").name)
    originals = {p.name: p.read_text().strip() for p in folder.glob("*.txt")}
    choice = tg.choose_tagger("toy", sorted(folder.glob("*.png")))
    assert "keep the captions" in tg.caption_class_pictures(tmp_path / "regularization", choice, "tags")
    assert {p.name: p.read_text().strip() for p in folder.glob("*.txt")} == originals
    line = tg.caption_class_pictures(tmp_path / "regularization", choice, "forms")
    assert line.startswith("6 class picture(s)"), line
    for name, original in originals.items():
        forms = (folder / name).read_text().split("\n")
        assert forms[0] == original and len(forms) == 6 and not any("zorb" in f for f in forms), forms
    assert "no class pictures" in tg.caption_class_pictures(tmp_path / "nowhere", choice, "forms")
