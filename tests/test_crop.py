"""lora_nb.crop: center / focus / none crops, subject finding, aspect-ratio buckets, grids."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from lora_nb import LoraNbError
from lora_nb import crop as cr

ROOT = Path(__file__).resolve().parents[1]


def _benchmark():
    spec = importlib.util.spec_from_file_location("crop_retention", ROOT / "benchmarks" / "crop_retention.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _benchmark()


def test_parse_size():
    assert cr.parse_size("512x768") == (512, 768)
    assert cr.parse_size((768, 512)) == (768, 512)
    assert cr.parse_size(64) == (64, 64)
    for bad in ("big", "512x", (0, 10), "1x1"):
        with pytest.raises(LoraNbError, match="size"):
            cr.parse_size(bad)


def test_center_window_is_largest_of_the_target_aspect():
    assert cr.window_size((768, 512), (512, 512)) == (512, 512)
    assert cr.window_size((512, 512), (512, 768)) == (341, 512)
    assert cr.crop_box((768, 512), (512, 512), "center") == (128, 0, 640, 512)
    assert cr.crop_box((512, 512), (768, 512), "center") == (0, 85, 512, 426)


def test_focus_window_slides_to_the_subject_and_stays_inside_the_image():
    assert cr.crop_box((768, 512), (512, 512), "focus", subject=(20, 100, 120, 200)) == (0, 0, 512, 512)
    assert cr.crop_box((768, 512), (512, 512), "focus", subject=(650, 100, 760, 200)) == (256, 0, 768, 512)
    # subject wider than the window: the core is kept
    box = cr.crop_box((1000, 400), (400, 400), "focus", subject=(0, 0, 900, 400), core=(600, 50, 700, 150))
    assert cr.box_inside((600, 50, 700, 150), box)


@pytest.mark.parametrize("name", list(cr.TARGET_SIZES))
def test_every_target_size_comes_out_exact(name):
    size = cr.TARGET_SIZES[name]
    img = Image.fromarray(skdata.coffee())
    for mode in ("center", "focus"):
        res = cr.crop_image(img, size, mode)
        assert res.image.size == size and res.mode == mode


def test_astronaut_face_is_found_and_kept():
    img = Image.fromarray(skdata.astronaut())
    box, method = cr.find_subject(img)
    assert method == "face:frontal"
    face = cr.ASTRONAUT_FACE
    assert cr.box_inside(face, box)
    res = cr.crop_image(img, (768, 512), "focus")
    assert cr.box_inside(face, res.box)
    assert not cr.box_inside(face, cr.crop_image(img, (768, 512), "center").box)


def test_saliency_finds_an_off_centre_subject():
    rng = np.random.default_rng(3)
    arr = np.clip(rng.normal(120, 5, (300, 600, 3)), 0, 255).astype(np.uint8)
    arr[100:180, 470:560] = (230, 40, 40)
    img = Image.fromarray(arr)
    box, method = cr.find_subject(img)
    assert method == "saliency+object"  # a plain background: the saliency seed is grown to the whole square
    assert cr.box_inside((470, 100, 560, 180), box)
    assert box[0] > 470 - 45 and box[1] > 100 - 45 and box[2] < 560 + 45 and box[3] < 180 + 45
    flat = Image.new("RGB", (200, 100), (90, 90, 90))
    assert cr.find_subject(flat) == ((0, 0, 200, 100), "none")


def test_focus_keeps_generated_subjects_where_center_does_not(bench):
    samples = bench.generated_set(24, seed=11) + bench.astronaut_set(5, seed=11)
    center, _ = bench.retention(samples, "center")
    focus, misses = bench.retention(samples, "focus")
    assert focus >= 0.9, misses
    assert center <= focus - 0.3


def test_generated_truth_boxes_are_off_centre_and_inside(bench):
    kept = 0
    for img, box, target, _ in bench.generated_set(16, seed=2):
        assert 0 <= box[0] < box[2] <= img.width and 0 <= box[1] < box[3] <= img.height
        kept += cr.box_inside(box, cr.crop_box(img.size, target, "center"))
    assert kept < 8


# --------------------------------------------------------------------------- buckets

@pytest.mark.parametrize("base,step", [((512, 512), 64), ((1024, 1024), 64), ((64, 64), 8), ((768, 512), 64)])
def test_buckets_have_about_constant_area_in_steps(base, step):
    buckets = cr.make_buckets(base, step=step)
    area = base[0] * base[1]
    side = int(math.sqrt(area)) // step * step
    assert (side, side) in buckets
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert w * h <= area and w * h >= 0.7 * area, (w, h)  # the side caps trim the extremes
        assert (h, w) in buckets
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios) and len(buckets) >= 7


def test_sd15_buckets_match_kohya():
    buckets = cr.make_buckets((512, 512), step=64)
    for b in [(256, 1024), (320, 768), (384, 640), (448, 576), (512, 512), (576, 448), (640, 384), (768, 320), (1024, 256)]:
        assert b in buckets
    toy = cr.make_buckets((64, 64), step=8)
    assert (64, 64) in toy and (48, 80) in toy and all(min(b) >= 32 and max(b) <= 128 for b in toy)


def test_assign_bucket_picks_nearest_aspect():
    buckets = cr.make_buckets((512, 512))
    for w, h in [(1000, 500), (600, 800), (512, 512), (3000, 1000), (300, 1200)]:
        best = cr.assign_bucket(w, h, buckets)
        err = abs(math.log(best[0] / best[1]) - math.log(w / h))
        assert all(err <= abs(math.log(b[0] / b[1]) - math.log(w / h)) + 1e-12 for b in buckets)
    assert cr.assign_bucket(512, 512, buckets) == (512, 512)
    with pytest.raises(LoraNbError):
        cr.assign_bucket(10, 10, [])


def test_resize_to_bucket_never_upscales_past_the_limit():
    img = Image.fromarray(skdata.chelsea())  # 451x300
    buckets = cr.make_buckets((512, 512))
    bucket = cr.assign_bucket(*img.size, buckets)
    out, box = cr.resize_to_bucket(img, bucket, max_upscale=2.0)
    assert out.size == bucket
    with pytest.raises(LoraNbError, match="max_upscale"):
        cr.resize_to_bucket(img, bucket, max_upscale=1.0)
    small = cr.bucket_for_image(*img.size, buckets, max_upscale=1.0)
    assert small[0] <= img.width and small[1] <= img.height and small[0] % 64 == 0 and small[1] % 64 == 0
    out, _ = cr.resize_to_bucket(img, small, max_upscale=1.0)
    assert out.size == small
    res = cr.crop_image(img, (512, 512), "none", max_upscale=1.0)
    assert res.image.size == small and res.method.startswith("bucket")
    toy = cr.crop_image(img.resize((96, 64)), (64, 64), "none")
    assert toy.image.size[0] % 8 == 0 and toy.image.size[1] % 8 == 0 and toy.image.size[0] > toy.image.size[1]


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(LoraNbError, match="crop mode"):
        cr.crop_image(Image.new("RGB", (64, 64)), (64, 64), "smart")


# --------------------------------------------------------------------------- folders and grids

def test_crop_folder_and_grid(tmp_path):
    src = tmp_path / "in put"
    src.mkdir()
    Image.fromarray(skdata.astronaut()).save(src / "astronaut é.png")
    Image.fromarray(skdata.coffee()).save(src / "coffee.jpg")
    (src / "broken.png").write_bytes(b"not a png")
    report = cr.crop_folder(src, tmp_path / "out", (64, 96), "focus", progress=False)
    written = sorted(Path(r[1]).name for r in report.results)
    assert written == ["astronaut é.png", "coffee.png"]
    assert all(Image.open(r[1]).size == (64, 96) for r in report.results)
    assert list(report.skipped) == [str(src / "broken.png")]
    img = Image.fromarray(skdata.astronaut())
    pairs = [(img, cr.crop_image(img, (512, 768), m)) for m in cr.MODES]
    grid = cr.before_after_grid(pairs, cell=128)
    assert grid.size == (2 * 128 + 18, 3 * (128 + 40 + 6) + 6)  # three label lines above each row
    assert cr.draw_boxes(img, [(10, 10, 100, 100)]).getpixel((10, 50)) == (255, 40, 40)
