"""lora_nb.tagging and lora_nb.captions: tiny local BLIP and ONNX taggers, caption editing, caption files."""

from __future__ import annotations

import codecs
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lora_nb import LoraNbError
from lora_nb import captions as cap
from lora_nb import tagging as tg

# --------------------------------------------------------------------------- tiny local models

TAGS = [  # (name, category, channel the tiny model looks at in BGR order, or None for a constant score)
    ("blue_sky", 0, 0), ("green_field", 0, 1), ("red_theme", 0, 2), ("^_^", 0, None),
    ("hatsune_miku", 4, 0), ("general", 9, None), ("explicit", 9, 2),
]


def _write_tags_csv(path: Path, tags=TAGS) -> None:
    lines = ["tag_id,name,category,count"] + [f"{i},{n},{c},{1000 - i}" for i, (n, c, _) in enumerate(tags)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def build_tiny_wd_tagger(folder: Path, size: int = 32, tags=TAGS) -> Path:
    """A WD-style ONNX tagger: mean of each BGR channel -> one tag per channel (sigmoid), NHWC float32 input."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    n = len(tags)
    w = np.zeros((3, n), np.float32)
    b = np.zeros(n, np.float32)
    for j, (_, _, ch) in enumerate(tags):
        if ch is None:
            b[j] = 0.0  # constant 0.5
        else:
            w[ch, j] = 0.1
            b[j] = -0.1 * 128  # above mid-grey in that channel -> above 0.5
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1, 2], keepdims=0),
        helper.make_node("MatMul", ["mean", "W"], ["logits0"]),
        helper.make_node("Add", ["logits0", "B"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_wd_tagger",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", n])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    _write_tags_csv(folder / "selected_tags.csv", tags)
    return folder


def build_tiny_blip(folder: Path) -> Path:
    """A random-weight BLIP captioner (vision + text decoder) with a word-level BERT tokenizer, saved offline."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + \
        "a photo of the cat dog girl woman with black hair red blue sky in on".split()
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(vocab))
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    config = BlipConfig(
        text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, bos_token_id=2, sep_token_id=3,
                         pad_token_id=0, eos_token_id=3),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, projection_dim=32),
        projection_dim=32,
    )
    import torch

    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    vocab.unlink()
    return folder


@pytest.fixture(scope="module")
def wd_dir(tmp_path_factory) -> Path:
    pytest.importorskip("onnx")
    return build_tiny_wd_tagger(tmp_path_factory.mktemp("wd tagger ä"))


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory) -> Path:
    return build_tiny_blip(tmp_path_factory.mktemp("tiny blip"))


# --------------------------------------------------------------------------- WD tagger

def test_wd_preprocessing_pads_white_resizes_and_swaps_to_bgr():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    arr = tg.prepare_wd_image(img, 32)
    assert arr.shape == (1, 32, 32, 3) and arr.dtype == np.float32
    assert tuple(arr[0, 16, 16]) == (0.0, 0.0, 255.0)        # red in BGR
    assert tuple(arr[0, 0, 16]) == (255.0, 255.0, 255.0)     # white padding above
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    assert tuple(tg.prepare_wd_image(rgba, 32)[0, 5, 5]) == (255.0, 255.0, 255.0)


def test_wd_tagger_thresholds_and_categories(wd_dir):
    tagger = tg.load_wd_tagger(wd_dir)
    assert tagger.input_size == 32 and tagger.names[3] == "^_^" and tagger.names[0] == "blue sky"
    blue, red = Image.new("RGB", (64, 64), (0, 0, 255)), Image.new("RGB", (50, 50), (255, 0, 0))
    s_blue, s_red = tagger.predict([blue, red])
    assert s_blue.general["blue sky"] > 0.99 and s_blue.general["red theme"] < 0.01
    assert s_red.general["red theme"] > 0.99 and s_red.general["blue sky"] < 0.01
    assert s_blue.general["^_^"] == pytest.approx(0.5, abs=1e-6)
    assert set(s_blue.character) == {"hatsune miku"} and set(s_blue.rating) == {"general", "explicit"}
    assert s_red.top_rating == "explicit"
    assert tagger.tag(blue, general_threshold=0.6, character_threshold=0.85) == ["hatsune miku", "blue sky"]
    assert tagger.tag(blue, general_threshold=0.4, character_threshold=0.999999) == ["blue sky", "^_^"]
    assert s_blue.caption(0.6) == "hatsune miku, blue sky"


def test_wd_tagger_errors_are_clear(wd_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(LoraNbError, match="has no model.onnx"):
        tg.load_wd_tagger(bad)
    (bad / "model.onnx").write_bytes(b"not onnx")
    _write_tags_csv(bad / "selected_tags.csv")
    with pytest.raises(LoraNbError, match="not a usable ONNX model"):
        tg.load_wd_tagger(bad)
    mismatch = tmp_path / "mismatch"
    mismatch.mkdir()
    (mismatch / "model.onnx").write_bytes((wd_dir / "model.onnx").read_bytes())
    _write_tags_csv(mismatch / "selected_tags.csv", TAGS[:3])
    with pytest.raises(LoraNbError, match="do not belong together"):
        tg.load_wd_tagger(mismatch).predict(Image.new("RGB", (32, 32)))
    (mismatch / "selected_tags.csv").write_text("id,label\n1,x\n", encoding="utf-8")
    with pytest.raises(LoraNbError, match="tag_id,name,category,count"):
        tg.load_wd_tagger(mismatch)
    with pytest.raises(LoraNbError, match="neither an existing folder nor a hub id"):
        tg.load_wd_tagger(tmp_path / "missing" / "folder")


def test_wd_tagger_hub_unreachable_is_a_short_clear_error():
    with pytest.raises(LoraNbError, match="Hugging Face hub") as info:
        tg.load_wd_tagger("SmilingWolf/wd-vit-tagger-v3")
    assert info.value.__suppress_context__ and "local folder" in str(info.value)


def test_caption_images_with_any_tagger(wd_dir, tmp_path):
    paths = []
    for i, colour in enumerate([(0, 0, 255), (0, 255, 0)]):
        p = tmp_path / f"img {i}.png"
        Image.new("RGB", (40, 40), colour).save(p)
        paths.append(p)
    tagger = tg.load_wd_tagger(wd_dir)
    caps = tg.caption_images(paths, tagger, general_threshold=0.6, progress=False)
    assert caps == {str(paths[0]): "hatsune miku, blue sky", str(paths[1]): "green field"}
    oracle = tg.caption_images(paths, lambda img: {"toy": 0.9, "maybe": 0.3}, progress=False)
    assert set(oracle.values()) == {"toy"}


# --------------------------------------------------------------------------- BLIP

def test_tiny_blip_captions_offline(blip_dir):
    blip = tg.load_blip(blip_dir)
    imgs = [Image.new("RGB", (50, 40), (200, 10, 10)), Image.new("RGBA", (30, 60), (0, 0, 255, 128))]
    caps = blip.caption(imgs, max_new_tokens=6, num_beams=1)
    assert len(caps) == 2 and all(isinstance(c, str) and c == c.strip() for c in caps)
    with_prompt = blip.caption(imgs[0], prompt="a photo of", max_new_tokens=4, num_beams=1)
    assert with_prompt[0].startswith("a photo of")


def test_blip_hub_unreachable_and_bad_folder(tmp_path):
    with pytest.raises(LoraNbError, match="Hugging Face hub") as info:
        tg.load_blip("Salesforce/blip-image-captioning-base")
    assert info.value.__suppress_context__
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraNbError, match="Could not load BLIP"):
        tg.load_blip(tmp_path / "empty")


def test_clean_blip_caption():
    assert tg.clean_blip_caption("arafed woman with  black hair ") == "woman with black hair"
    assert tg.clean_blip_caption("a dog on a sofa") == "a dog on a sofa"


# --------------------------------------------------------------------------- caption editing

def test_edits():
    c = "1girl, black hair, Black_Hair, smile,  , red dress"
    assert cap.dedupe_tags(c) == "1girl, black hair, smile, red dress"
    assert cap.add_trigger(c, "sks") == "sks, 1girl, black hair, Black_Hair, smile, red dress"
    assert cap.add_trigger("a, sks, b", "sks") == "sks, a, b"
    assert cap.remove_tags(c, ["black hair"]) == "1girl, smile, red dress"
    assert cap.add_tags("a, b", ["c", "a"]) == "a, b, c"
    assert cap.add_tags("a, b", "c", position="start") == "c, a, b"
    assert cap.replace_tags("1girl, smile", {"1girl": "woman", "smile": ""}) == "woman"
    out = cap.edit_caption(c, trigger="sks", remove=["black hair", "sks"], add=["outdoors"],
                           replace={"red dress": "blue dress"})
    assert out == "sks, 1girl, smile, blue dress, outdoors"
    with pytest.raises(LoraNbError, match="trigger"):
        cap.add_trigger("a", "x, y")
    with pytest.raises(LoraNbError, match="trigger"):
        cap.add_trigger("a", "  ")


def test_a_sentence_that_names_the_trigger_is_led_by_it_and_left_as_written():
    sentence = "a red zorb circle on a black background"
    assert cap.trigger_leads(sentence, "zorb") and cap.add_trigger(sentence, "zorb") == sentence
    assert cap.add_trigger(sentence + ", zorb", "zorb") == sentence  # a second mention is dropped
    assert not cap.trigger_leads("a red circle, zorb", "zorb")
    assert cap.add_trigger("a red circle, zorb", "zorb") == "zorb, a red circle"
    assert not cap.trigger_leads("a red zorbish circle", "zorb")  # a word, not a part of one


def test_shuffle_keeps_the_first_tokens():
    c = "sks, woman, smile, red dress, outdoors, hat"
    rng = random.Random(0)
    outs = {cap.shuffle_caption(c, keep_tokens=2, rng=rng) for _ in range(30)}
    assert len(outs) > 1
    for o in outs:
        tags = cap.split_tags(o)
        assert tags[:2] == ["sks", "woman"] and sorted(tags) == sorted(cap.split_tags(c))
    assert cap.shuffle_caption(c, keep_tokens=10, rng=rng) == c
    assert cap.shuffle_caption(c, 1, random.Random(5)) == cap.shuffle_caption(c, 1, random.Random(5))
    with pytest.raises(LoraNbError, match="keep_tokens"):
        cap.shuffle_caption(c, -1)


def test_tag_frequency_and_fixed_features():
    caps = {"a.png": "sks, black hair, smile", "b.png": "sks, black_hair, hat, hat", "c.png": "sks, black hair"}
    freq = cap.tag_frequency(caps)
    assert freq[:2] == [("black hair", 3), ("sks", 3)] and dict(freq)["hat"] == 1
    assert cap.fixed_feature_candidates(caps, exclude=["sks"]) == ["black hair"]


tag_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters=","), min_size=0,
                   max_size=12)
caption_st = st.lists(tag_text, max_size=12).map(lambda ts: ",".join(ts))
trigger_st = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters=","),
                     min_size=1, max_size=10).filter(lambda t: cap.normalize_tag(t) != "")


@settings(max_examples=300, deadline=None)
@given(caption=caption_st, trigger=trigger_st, remove=st.lists(tag_text, max_size=4),
       add=st.lists(trigger_st, max_size=4), keep=st.integers(0, 4), seed=st.integers(0, 10_000))
def test_property_trigger_first_once_and_no_duplicates(caption, trigger, remove, add, keep, seed):
    out = cap.edit_caption(caption, trigger=trigger, remove=remove + [trigger], add=add)
    tags = cap.split_tags(out)
    keys = [cap._key(t) for t in tags]
    assert tags[0] == cap.normalize_tag(trigger)
    assert keys.count(cap._key(trigger)) == 1
    assert len(keys) == len(set(keys))
    shuffled = cap.split_tags(cap.shuffle_caption(out, keep_tokens=max(1, keep), rng=random.Random(seed)))
    assert shuffled[0] == tags[0] and sorted(shuffled) == sorted(tags)
    assert cap.edit_caption(out, trigger=trigger) == out  # idempotent


# --------------------------------------------------------------------------- caption files

def test_write_and_read_captions(tmp_path):
    d = tmp_path / "10_sks dog"
    d.mkdir()
    imgs = [d / "ä photo 1.png", d / "two.jpg"]
    for p in imgs:
        Image.new("RGB", (8, 8)).save(p)
    written = cap.write_captions(d, {imgs[0]: "sks, dog", "two.jpg": "sks,\ncat"})
    assert [p.name for p in written] == ["ä photo 1.txt", "two.txt"]
    assert (d / "two.txt").read_bytes() == b"sks\ncat"  # a line a form (dataset.enable_wildcard)
    assert cap.read_caption(d / "two.txt", keep_lines=True) == "sks\ncat"
    assert sorted(p.name for p in d.iterdir()) == ["two.jpg", "two.txt", "ä photo 1.png", "ä photo 1.txt"]
    assert cap.read_captions(d) == {str(imgs[0]): "sks, dog", str(imgs[1]): "sks, cat"}
    with pytest.raises(LoraNbError, match="caption ext"):
        cap.write_captions(d, {imgs[0]: "x"}, ext=".png")


@pytest.mark.parametrize("raw", [
    codecs.BOM_UTF8 + "sks, café".encode("utf-8"),
    "sks, café".encode("utf-8"),
    "sks, café".encode("cp1252"),
    "sks, café".encode("utf-16"),
    codecs.BOM_UTF8 + "sks,\r\ncafé\r\n".encode("utf-8"),
])
def test_read_caption_any_encoding(tmp_path, raw):
    p = tmp_path / "c.txt"
    p.write_bytes(raw)
    assert cap.read_caption(p) == "sks, café"


def test_read_caption_missing_file_is_clear(tmp_path):
    with pytest.raises(LoraNbError, match="nope.txt"):
        cap.read_caption(tmp_path / "nope.txt")


def test_check_caption_extension_warns_on_mismatch(tmp_path):
    d = tmp_path / "dataset" / "5_zorb"
    d.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8)).save(d / f"{i}.png")
    (d / "0.caption").write_text("zorb, toy", encoding="utf-8")
    (d / "1.caption").write_text("zorb", encoding="utf-8")
    check = cap.check_caption_extension(tmp_path / "dataset", ".txt")
    assert check.images == 3 and check.captioned == 0 and check.other_extensions == {".caption": 2}
    assert any("caption_extension='.caption'" in w for w in check.warnings)
    assert any("no caption at all" in w for w in check.warnings)
    ok = cap.check_caption_extension(tmp_path / "dataset", ".caption")
    assert ok.captioned == 2 and len(ok.warnings) == 1
    cap.write_captions(d, {f"{i}.png": "zorb" for i in range(3)})
    assert cap.check_caption_extension(tmp_path / "dataset", "txt").ok
    with pytest.raises(LoraNbError, match="not a folder"):
        cap.check_caption_extension(tmp_path / "nope")


# --------------------------------------------------------------------------- threshold lesson (C9)

def test_precision_recall_and_sweep():
    pred = {"black hair": 0.9, "smile": 0.65, "hat": 0.4, "dog": 0.2}
    truth = {"black hair", "smile", "hat"}
    r = cap.precision_recall(pred, truth, 0.6)
    assert (r["precision"], r["recall"]) == (1.0, pytest.approx(2 / 3))
    r = cap.precision_recall(pred, truth, 0.1)
    assert (r["precision"], r["recall"]) == (0.75, 1.0)
    assert cap.precision_recall(pred, truth, 0.95)["precision"] == 1.0
    rng = np.random.default_rng(0)
    vocab = [f"t{i}" for i in range(30)]
    truths, preds = [], []
    for _ in range(20):
        t = set(rng.choice(vocab, 6, replace=False))
        truths.append(t)
        preds.append({v: float(np.clip((0.7 if v in t else 0.3) + rng.normal(0, 0.15), 0, 1)) for v in vocab})
    rows = cap.threshold_sweep(preds, truths)
    recalls = [r["recall"] for r in rows]
    assert recalls == sorted(recalls, reverse=True)
    assert rows[-1]["precision"] > rows[0]["precision"]
    assert any(r["threshold"] == 0.6 for r in rows)
    with pytest.raises(LoraNbError):
        cap.threshold_sweep(preds, truths[:3])


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_property_caption_file_round_trip(text):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        (written,) = cap.write_captions(d, {"img.png": text})
        assert cap.read_caption(written) == cap.normalize_caption_text(text)
        assert cap.normalize_caption_text(cap.normalize_caption_text(text)) == cap.normalize_caption_text(text)
