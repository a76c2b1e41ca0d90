"""The toy world: determinism, truth, captions as single tokens, the judge's accuracy, taggers, datasets, model."""

from __future__ import annotations

import numpy as np
import pytest

from lora_nb import LoraNbError
from lora_nb.toy import concept, judge, oracle, quality, world
from lora_nb.toy.build import build_tokenizer


def test_world_is_deterministic_from_seed():
    a, sa = world.make_scene(7, 3, background_style=None, second_object_p=0.5)
    b, sb = world.make_scene(7, 3, background_style=None, second_object_p=0.5)
    c, _ = world.make_scene(8, 3, background_style=None, second_object_p=0.5)
    assert np.array_equal(a, b) and sa == sb
    assert not np.array_equal(a, c)
    x, _ = world.make_world(5, 11)
    y, _ = world.make_world(5, 11)
    assert np.array_equal(x, y)


@pytest.mark.parametrize("size", world.SIZES)
def test_truth_boxes_lie_inside_the_image(size):
    w, h = size
    for i in range(150):
        img, scene = world.make_scene(1, i, size, background_style=None, second_object_p=0.5, zorb=i % 3 == 0)
        assert img.shape == (h, w, 3) and img.dtype == np.uint8
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.bbox
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            # the object is drawn there: its colour appears at its centre (eyes sit above the centre)
            cy = int(obj.cy + (obj.size * 0.25 if obj.zorb else 0))
            assert np.linalg.norm(img[cy, int(obj.cx)].astype(float) - world.COLOURS[obj.colour]) < 40


def test_captions_and_tags_name_the_truth():
    scene = world.sample_scene(0, 0, shape="square", colour="red", background="skyblue")
    assert world.caption_scene(scene) == "a red square on a skyblue background"
    assert world.tags_of_scene(scene) == ["red square", "skyblue background"]
    z = world.sample_scene(0, 1, colour="blue", background="gray", zorb=True)
    assert world.caption_scene(z) == "a blue zorb circle on a gray background"
    assert world.tags_of_scene(z)[:3] == ["zorb", "blue circle", "black eyes"]
    with pytest.raises(LoraNbError, match="colour"):
        world.sample_scene(0, 0, colour="teal")


def test_every_caption_word_is_one_token(tmp_path):
    tok = build_tokenizer(tmp_path / "tok")
    for i in range(60):
        scene = world.sample_scene(3, i, background_style=None, second_object_p=0.5, zorb=i % 4 == 0)
        for text in (world.caption_scene(scene), world.caption_scene(scene, with_trigger=False),
                     ", ".join(world.tags_of_scene(scene))):
            words = text.replace(",", " , ").split()
            ids = tok(text, add_special_tokens=False).input_ids
            assert len(ids) == len(words), text
            if len(scene.objects) == 1:  # one-object captions (the base world's) fit the 16 positions
                assert len(ids) + 2 <= tok.model_max_length, text
    assert len(tok(world.TRIGGER, add_special_tokens=False).input_ids) == 1


def test_judge_reads_world_images_at_least_95_percent():
    sets = [world.make_world(120, 101), world.make_world(80, 102, zorb=True),
            world.make_world(60, 103, background_style="gradient"), world.make_world(40, 104, (64, 96)),
            world.make_world(40, 105, (96, 64), zorb=True)]
    images = [im for ims, _ in sets for im in ims]
    scenes = [s for _, sc in sets for s in sc]
    acc = judge.score_judge(images, scenes)
    assert acc["n"] == 340
    for key in ("shape", "colour", "background", "zorb"):
        assert acc[key] >= 0.95, (key, acc)


def test_judge_survives_blur():
    from scipy import ndimage

    images, scenes = world.make_world(60, 106, zorb=False)
    blurred = [ndimage.gaussian_filter(im.astype(np.float32), sigma=(0.8, 0.8, 0)) for im in images]
    acc = judge.score_judge(blurred, scenes)
    assert min(acc["shape"], acc["colour"], acc["background"]) >= 0.9, acc


def test_memorization_score_finds_the_copy():
    train, _ = concept.concept_images(10)
    same = judge.memorization_score(train[4], train)
    assert same["index"] == 4 and same["score"] > 0.99
    new, _ = world.make_scene(999, 0, zorb=True)
    assert judge.memorization_score(new, train)["score"] < same["score"]


def test_oracle_taggers():
    images, scenes = world.make_world(60, 107)
    truth = [world.tags_of_scene(s, with_trigger=False) for s in scenes]
    assert all(set(oracle.tag_truth(s)) == set(t) for s, t in zip(scenes, truth))
    exact = [oracle.tag_image_oracle(im) for im in images]
    assert oracle.precision_recall(exact, truth, 0.5)["recall"] >= 0.95
    noisy = [oracle.tag_image_noisy(im, seed=1) for im in images]
    assert noisy == [oracle.tag_image_noisy(im, seed=1) for im in images]
    low, high = (oracle.precision_recall(noisy, truth, t) for t in (0.2, 0.8))
    assert low["recall"] > high["recall"] and high["precision"] > low["precision"]
    assert low["precision"] < 0.9 and high["recall"] < 0.95  # no threshold is perfect


def test_concept_and_regularization_datasets(tmp_path):
    sub = concept.make_concept_dataset(tmp_path / "concept", n=8)
    reg = concept.make_regularization_dataset(tmp_path / "reg", n=8)
    assert sub.name == "10_zorb" and reg.name == "1_circle"
    from PIL import Image

    for folder, zorb in ((sub, True), (reg, False)):
        pngs = sorted(folder.glob("*.png"))
        assert len(pngs) == 8 and all(p.with_suffix(".txt").exists() for p in pngs)
        for p in pngs:
            caption = p.with_suffix(".txt").read_text().strip()
            assert ("zorb" in caption.split()) == zorb
            got = judge.judge_image(np.asarray(Image.open(p)))
            assert got["zorb"] == zorb and got["shape"] == "circle"
    again = concept.make_concept_dataset(tmp_path / "again", n=8)
    assert (again / "zorb_003.png").read_bytes() == (sub / "zorb_003.png").read_bytes()


def test_parse_prompt():
    assert quality.parse_prompt("a red zorb circle on a skyblue background") == {
        "shape": "circle", "colour": "red", "background": "skyblue", "zorb": True}
    assert quality.parse_prompt("blue square, gray background")["background"] == "gray"


def test_judge_label_says_what_the_judge_read_against_the_prompt():
    from PIL import Image

    zorb = world.sample_scene(3, 0, shape="circle", colour="red", background="skyblue", zorb=True)
    image = Image.fromarray(world.render_scene(zorb))
    assert quality.judge_label("a red zorb circle on a skyblue background", image) == "zorb: yes\nred ok / skyblue ok"
    plain = world.sample_scene(3, 1, shape="circle", colour="green", background="beige")
    label = quality.judge_label("a red zorb circle on a skyblue background", world.render_scene(plain))
    assert label == "zorb: no\ngreen, not red / beige, not skyblue"
    assert quality.judge_label("a green circle on a beige background", world.render_scene(plain)) == \
        "zorb: no (no trigger word)\ngreen ok / beige ok"


def test_judge_label_says_when_it_counts_one_merged_band_as_the_eyes():
    import numpy as np

    yy, xx = np.mgrid[:64, :64]
    image = np.empty((64, 64, 3), np.uint8)
    image[:] = world.BACKGROUNDS["gray"]
    image[(yy - 32) ** 2 + (xx - 32) ** 2 <= 20 ** 2] = world.COLOURS["yellow"]
    image[20:28, 21:44] = world.EYE_COLOUR  # the two eyes blurred into one dark band
    label = quality.judge_label("a yellow zorb circle on a gray background", image)
    assert label == "zorb: yes, eyes merged\nyellow ok / gray ok"
    assert judge.judge_image(image)["eyes_merged"] is True


def test_judge_tells_two_touching_eyes_from_one_band():
    import numpy as np

    yy, xx = np.mgrid[:64, :64]
    image = np.empty((64, 64, 3), np.uint8)
    image[:] = world.BACKGROUNDS["gray"]
    image[(yy - 32) ** 2 + (xx - 32) ** 2 <= 20 ** 2] = world.COLOURS["yellow"]
    for cx in (25, 39):  # two round eyes of radius 6 whose edges meet, joined by a 2-px bridge
        image[(yy - 24) ** 2 + (xx - cx) ** 2 <= 6 ** 2] = world.EYE_COLOUR
    image[23:25, 28:37] = world.EYE_COLOUR
    got = judge.judge_image(image)
    assert got["zorb"] and got["eyes_touching"] and not got["eyes_merged"]
    assert quality.judge_label("a yellow zorb circle on a gray background", image) == \
        "zorb: yes, eyes touch\nyellow ok / gray ok"
    # the same eyes further apart: a pair, neither touching nor merged
    apart = np.empty_like(image)
    apart[:] = world.BACKGROUNDS["gray"]
    apart[(yy - 32) ** 2 + (xx - 32) ** 2 <= 20 ** 2] = world.COLOURS["yellow"]
    for cx in (23, 41):
        apart[(yy - 24) ** 2 + (xx - cx) ** 2 <= 6 ** 2] = world.EYE_COLOUR
    got = judge.judge_image(apart)
    assert got["zorb"] and not got["eyes_touching"] and not got["eyes_merged"]
    # one eye beside a bite out of the circle's edge, joined to it: a waist too, but open to the outside
    bite = np.empty_like(image)
    bite[:] = world.BACKGROUNDS["black"]
    bite[(yy - 32) ** 2 + (xx - 32) ** 2 <= 20 ** 2] = world.COLOURS["blue"]
    bite[(yy - 24) ** 2 + (xx - 14) ** 2 <= 7 ** 2] = world.BACKGROUNDS["black"]
    bite[(yy - 24) ** 2 + (xx - 39) ** 2 <= 6 ** 2] = world.EYE_COLOUR
    bite[23:25, 20:34] = world.EYE_COLOUR
    assert not judge.judge_image(bite)["eyes_touching"]


def test_two_lobes_needs_a_waist_in_the_middle():
    import numpy as np

    assert judge.two_lobes(np.array([3, 6, 8, 8, 6, 2, 2, 6, 8, 8, 6, 3])) == 5  # two round lobes, a thin bridge
    assert judge.two_lobes(np.array([6, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 6])) is None  # a band
    assert judge.two_lobes(np.array([8, 2, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8])) is None  # a notch near the end, not a waist
    assert judge.two_lobes(np.array([2, 2, 1, 2, 2])) is None  # too small to tell


def test_measure_generations_on_a_tiny_pipeline(tiny_sd15_dir):
    from lora_nb.models import load_base_model

    pipe = load_base_model(tiny_sd15_dir).pipe
    pipe.set_progress_bar_config(disable=True)
    res = quality.measure_generations(pipe, ["a red circle on a gray background"], [0, 1], steps=2)
    assert res["n"] == 2 and 0 <= res["colour"] <= 1 and len(res["records"]) == 2


def test_vae_stage_resumes_where_it_stopped(tmp_path):
    from lora_nb.toy import build

    build.train_vae(tmp_path, steps=2, crop_steps=2, checkpoint_every=1)
    first = build.load_checkpoint(tmp_path / "vae.pt")
    assert first["step"] == 2
    build.train_vae(tmp_path, steps=3, crop_steps=2, checkpoint_every=1)
    assert build.load_checkpoint(tmp_path / "vae.pt")["step"] == 3


def test_every_build_checkpoint_reloads_as_weights_only(tmp_path):
    """Latents (size-tuple keys) and the UNet stage (EMA dicts) come back through torch.load(weights_only=True)."""
    from lora_nb.toy import build

    build.build_tokenizer(tmp_path / "tokenizer")
    build.train_vae(tmp_path, steps=1, crop_steps=1, checkpoint_every=1)
    build.cache_latents(tmp_path, counts={(64, 64): 2, (64, 96): 1, (96, 64): 1})
    assert set(build.load_checkpoint(tmp_path / "latents.pt")["buckets"]) == {(64, 64), (64, 96), (96, 64)}
    build.train_unet(tmp_path, steps=1, batch=2, checkpoint_every=1)
    ckpt = build.load_checkpoint(tmp_path / "unet.pt")
    assert ckpt["step"] == 1 and ckpt["ema_unet"] and ckpt["optimizer"]["state"]


# --------------------------------------------------------------------------- the shipped model

def _shipped():
    from lora_nb.models import toy_model_dir

    path = toy_model_dir()
    if not (path / "model_index.json").exists():
        pytest.skip(f"the toy model is not built yet ({path}); run scripts/build_toy_model.py")
    return path


def test_shipped_toy_model_loads_and_generates():
    import torch
    from diffusers import StableDiffusionPipeline

    from lora_nb.models import load_base_model

    path = _shipped()
    size_mb = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6
    assert size_mb <= 20
    model = load_base_model("toy")
    assert model.family == "sd15" and model.vae_scale == 4
    plain = StableDiffusionPipeline.from_pretrained(path)
    for pipe in (model.pipe, plain):
        pipe.set_progress_bar_config(disable=True)
        out = pipe("a red circle on a gray background", num_inference_steps=3, guidance_scale=5.0,
                   generator=torch.Generator().manual_seed(0), output_type="np").images
        assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    tok = plain.tokenizer
    assert tok.model_max_length == 16 and len(tok("zorb", add_special_tokens=False).input_ids) == 1


def test_shipped_toy_model_follows_prompts_and_has_no_zorb_yet():
    from lora_nb.models import load_base_model

    _shipped()
    pipe = load_base_model("toy").pipe
    pipe.set_progress_bar_config(disable=True)
    base = quality.measure_generations(pipe, quality.adherence_prompts()[::5], [0], steps=20)
    assert min(base["shape"], base["colour"], base["background"]) >= 0.8, base
    trigger = quality.measure_generations(pipe, quality.concept_prompts(True)[::4], [0], steps=20)
    assert trigger["zorb"] <= 0.2, trigger
