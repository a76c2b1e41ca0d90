"""lora_nb.images: robust import of awkward folders and zips, audit, kohya folders."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter
from skimage import data as skdata

from lora_nb import LoraNbError
from lora_nb import images as im


def _sample(name: str, size: int = 256) -> Image.Image:
    arr = getattr(skdata, name)()
    img = Image.fromarray(arr).convert("RGB")
    return img.resize((size, size * img.height // img.width), Image.Resampling.LANCZOS)


def _huge_png_header(width: int, height: int) -> bytes:
    """A valid-looking PNG whose header claims ``width`` x ``height`` (a decompression bomb's calling card)."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    raw = bytearray(buf.getvalue())
    ihdr = raw[12:29]  # b"IHDR" + 13 bytes of data
    new = b"IHDR" + struct.pack(">II", width, height) + bytes(ihdr[12:])
    raw[12:29] = new
    raw[29:33] = struct.pack(">I", zlib.crc32(new) & 0xFFFFFFFF)
    return bytes(raw)


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


GOOD = {  # name in the source folder -> expected (width, height) after import
    "good.jpg": (256, 256),
    "photo with spaces é ü 写真.png": (256, 170),
    "cmyk.jpg": (200, 160),
    "gray16.png": (120, 100),
    "rgb16.tif": (120, 100),
    "alpha.png": (100, 100),
    "exif rotated.jpg": (120, 200),   # stored 200x120, EXIF orientation 6 -> portrait
    "palette.gif": (90, 90),
    "grayscale.jpg": (256, 256),
    "sub/nested.webp": (128, 128),
}
BAD = {  # name -> a word the reason must contain
    "corrupt.jpg": "not an image",
    "truncated.jpg": "truncated",
    "tiny.png": "too small",
    "notes.txt": "not an image: a caption file",
    "z good copy.jpg": "duplicate",
    "bomb.png": "too large",
    "empty.png": "not an image",
}


@pytest.fixture(scope="module")
def awkward_folder(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("awkward") / "my photos ä"
    (src / "sub").mkdir(parents=True)
    astro = _sample("astronaut")
    astro.save(src / "good.jpg", quality=92)
    _sample("coffee").save(src / "photo with spaces é ü 写真.png")
    _sample("chelsea", 200).resize((200, 160)).convert("CMYK").save(src / "cmyk.jpg")
    ramp = (np.linspace(0, 65535, 120)[None, :] * np.ones((100, 1))).astype(np.uint16)
    Image.fromarray(ramp).save(src / "gray16.png")
    import cv2
    rgb16 = (np.random.default_rng(0).random((100, 120, 3)) * 65535).astype(np.uint16)
    cv2.imwrite(str(src / "rgb16.tif"), rgb16)
    rgba = np.zeros((100, 100, 4), np.uint8)
    rgba[25:75, 25:75] = (255, 0, 0, 255)  # opaque red square on a fully transparent field
    Image.fromarray(rgba, "RGBA").save(src / "alpha.png")
    landscape = _sample("rocket", 200).resize((200, 120))
    exif = Image.Exif()
    exif[0x0112] = 6
    landscape.save(src / "exif rotated.jpg", exif=exif.tobytes())
    pal = Image.new("P", (90, 90), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.paste(1, (20, 20, 70, 70))
    pal.save(src / "palette.gif", transparency=0)
    Image.fromarray(skdata.camera()).resize((256, 256)).save(src / "grayscale.jpg")
    _sample("horse", 128).convert("RGB").resize((128, 128)).save(src / "sub" / "nested.webp")
    # the bad ones
    (src / "corrupt.jpg").write_bytes(np.random.default_rng(1).bytes(5000))
    buf = io.BytesIO()
    _sample("chelsea", 300).save(buf, "JPEG", quality=95)
    (src / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    Image.new("RGB", (20, 20), (10, 200, 30)).save(src / "tiny.png")
    (src / "notes.txt").write_text("my captions go here\n", encoding="utf-8")
    (src / "good.txt").write_text("astronaut, white suit\n", encoding="utf-8")  # captions travel with their image
    (src / "sub" / "nested.txt").write_text("horse\n", encoding="utf-8")
    (src / "z good copy.jpg").write_bytes((src / "good.jpg").read_bytes())
    (src / "bomb.png").write_bytes(_huge_png_header(100_000, 100_000))
    (src / "empty.png").write_bytes(b"")
    return src


@pytest.fixture(scope="module")
def imported(awkward_folder, tmp_path_factory):
    before = _digests(awkward_folder)
    dest = tmp_path_factory.mktemp("ws") / "source"
    report = im.import_images(awkward_folder, dest, background=(255, 255, 255), progress=False)
    return before, report, dest


def test_import_keeps_every_good_image(imported):
    _, report, dest = imported
    got = {i.original: (i.width, i.height) for i in report.imported}
    assert got == GOOD, report.summary()
    for item in report.imported:
        p = Path(item.path)
        assert p.parent == dest and p.is_file()
        with Image.open(p) as img:
            assert img.size == (item.width, item.height)
            assert img.mode in ("RGB", "L")


def test_import_reports_every_bad_file_by_name_and_reason(imported):
    _, report, _ = imported
    skipped = report.skipped_names()
    assert set(skipped) == set(BAD), report.summary()
    for name, word in BAD.items():
        assert word in skipped[name].lower(), (name, skipped[name])
    assert "good.jpg" in skipped["z good copy.jpg"]
    assert "bomb.png" in report.summary()
    json.dumps(report.to_dict())


def test_captions_are_imported_next_to_their_image_and_edits_are_kept(imported, awkward_folder, tmp_path):
    _, report, dest = imported
    assert sorted(Path(c).name for c in report.captions) == ["good.txt", "nested.txt"]
    assert (dest / "good.txt").read_text(encoding="utf-8") == "astronaut, white suit\n"
    assert "with 2 caption file(s)" in report.summary() and "good.txt" not in report.skipped_names()
    again = tmp_path / "again"
    im.import_images(awkward_folder, again, progress=False)
    (again / "good.txt").write_text("my edited caption", encoding="utf-8")
    second = im.import_images(awkward_folder, again, progress=False)
    assert (again / "good.txt").read_text(encoding="utf-8") == "my edited caption"
    assert "your edits are not overwritten" in second.skipped_names()["good.txt"]


def test_originals_are_byte_identical_after_import(awkward_folder, imported):
    before, _, _ = imported
    assert _digests(awkward_folder) == before


def test_import_normalises_pixels(imported):
    _, report, _ = imported
    by_name = {i.original: i for i in report.imported}
    alpha = np.asarray(Image.open(by_name["alpha.png"].path).convert("RGB"))
    assert tuple(alpha[0, 0]) == (255, 255, 255) and tuple(alpha[50, 50]) == (255, 0, 0)
    assert any("transparency" in n for n in by_name["alpha.png"].notes)
    gray = np.asarray(Image.open(by_name["gray16.png"].path).convert("L"))
    assert gray[:, 0].max() < 5 and gray[:, -1].min() > 250  # 0..65535 ramp mapped onto 0..255
    pal = np.asarray(Image.open(by_name["palette.gif"].path).convert("RGB"))
    assert tuple(pal[0, 0]) == (255, 255, 255) and tuple(pal[45, 45]) == (0, 255, 0)
    assert by_name["good.jpg"].converted is False  # plain JPEG: byte copy
    assert Path(by_name["good.jpg"].path).read_bytes()[:2] == b"\xff\xd8"
    for name in ("gray16.png", "alpha.png", "rgb16.tif", "palette.gif"):
        assert by_name[name].converted and by_name[name].path.endswith(".png")
    for name in ("cmyk.jpg", "exif rotated.jpg"):  # photos stay JPEG, now plain RGB and upright
        assert by_name[name].converted and by_name[name].path.endswith(".jpg")
        with Image.open(by_name[name].path) as img:
            assert img.mode == "RGB" and img.getexif().get(0x0112, 1) == 1
    assert Path(by_name["photo with spaces é ü 写真.png"].path).name == "photo with spaces é ü 写真.png"


def test_import_again_is_a_no_op(awkward_folder, imported):
    _, report, dest = imported
    files_before = sorted(p.name for p in dest.iterdir())
    again = im.import_images(awkward_folder, dest, progress=False)
    assert sorted(p.name for p in dest.iterdir()) == files_before
    assert sorted(i.path for i in again.imported) == sorted(i.path for i in report.imported)


def test_load_image_errors_name_the_file(awkward_folder):
    with pytest.raises(LoraNbError, match="truncated.jpg"):
        im.load_image(awkward_folder / "truncated.jpg")
    with pytest.raises(LoraNbError, match="too large"):
        im.load_image(awkward_folder / "good.jpg", max_pixels=1000)
    assert im.load_image(awkward_folder / "cmyk.jpg").mode == "RGB"


def test_import_refuses_missing_or_odd_sources(tmp_path):
    with pytest.raises(LoraNbError, match="does not exist"):
        im.import_images(tmp_path / "nope", tmp_path / "dest")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(LoraNbError, match="neither a folder nor a .zip"):
        im.import_images(tmp_path / "a.txt", tmp_path / "dest")
    with pytest.raises(LoraNbError, match="inside the source"):
        im.import_images(tmp_path, tmp_path / "dest")


def test_hidden_and_dot_names_are_listed_never_dropped_in_silence(tmp_path):
    """``.hidden.png``, ``...png`` and a ``.thumbs/`` folder, in a folder and in a zip: each is in the report,
    imported or skipped with the reason and how to import it; every file is accounted for."""
    src = tmp_path / "src"
    (src / ".thumbs").mkdir(parents=True)
    for name, colour in (("...png", (10, 200, 10)), (".hidden.png", (10, 10, 200)), ("plain.png", (200, 10, 10)),
                         (".thumbs/t.png", (90, 90, 90))):
        (src / name).write_bytes(_png_bytes(colour))
    report = im.import_images(src, tmp_path / "dest", progress=False)
    skipped = report.skipped_names()
    assert [Path(i.path).name for i in report.imported] == ["plain.png"]
    assert set(skipped) == {"...png", ".hidden.png", ".thumbs/"}
    assert "rename it without the leading dot" in skipped["...png"] and "not looked into" in skipped[".thumbs/"]
    z = tmp_path / "set.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for name in ("...png", "photos/.hidden.png", ".thumbs/t.png", "photos/plain.png"):
            zf.writestr(name, _png_bytes())
    report = im.import_images(z, tmp_path / "dest-zip", progress=False)
    assert [i.original for i in report.imported] == ["photos/plain.png"]
    assert set(report.skipped_names()) == {"...png", "photos/.hidden.png", ".thumbs/t.png"}


# --------------------------------------------------------------------------- zips

def _png_bytes(color=(200, 30, 30), size=(80, 80)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def test_zip_import_with_awkward_names(tmp_path):
    z = tmp_path / "my set ö.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("photos/één foto.png", _png_bytes((200, 30, 30)))
        zf.writestr("photos/second one.png", _png_bytes((30, 200, 30)))
        zf.writestr("photos/readme.md", "hello")
        zf.writestr("__MACOSX/photos/._één foto.png", b"junk")
        link = zipfile.ZipInfo("photos/link.png")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    digest = hashlib.sha256(z.read_bytes()).hexdigest()
    report = im.import_images(z, tmp_path / "dest", progress=False)
    assert sorted(Path(i.path).name for i in report.imported) == ["second one.png", "één foto.png"]
    skipped = report.skipped_names()
    assert "symbolic link" in skipped["photos/link.png"]
    assert "not an image" in skipped["photos/readme.md"]
    assert "macOS metadata" in skipped["__MACOSX/photos/._één foto.png"]
    assert hashlib.sha256(z.read_bytes()).hexdigest() == digest
    assert not (tmp_path / "etc").exists()


@pytest.mark.parametrize("evil", ["../evil.png", "photos/../../evil.png", "/abs/evil.png", "C:/evil.png",
                                  "..\\evil.png"])
def test_zip_slip_is_refused(tmp_path, evil):
    z = tmp_path / "slip.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("ok.png", _png_bytes())
        zf.writestr(zipfile.ZipInfo(evil), _png_bytes())
    with pytest.raises(LoraNbError, match="zip slip"):
        im.import_images(z, tmp_path / "ws" / "dest", progress=False)
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "ws" / "evil.png").exists()


def test_zip_bomb_is_refused(tmp_path):
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ok.png", _png_bytes())
        zf.writestr("huge.png", b"\0" * 30_000_000)
    assert z.stat().st_size < 200_000
    with pytest.raises(LoraNbError, match="zip bomb"):
        im.import_images(z, tmp_path / "dest", progress=False)


def test_a_highly_compressed_image_within_the_pixel_limit_is_not_taken_for_a_zip_bomb(tmp_path):
    """A solid-colour 2000x2000 BMP (12 MB) deflates about a thousand times: the header says it is an image
    within the pixel limit and no larger than such an image can be, so it is imported, not refused."""
    buf = io.BytesIO()
    Image.new("RGB", (2000, 2000), (30, 120, 200)).save(buf, format="BMP")
    z = tmp_path / "solid.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("solid.bmp", buf.getvalue())
        info = zf.getinfo("solid.bmp")
    assert info.file_size / info.compress_size > im.MAX_ZIP_RATIO
    report = im.import_images(z, tmp_path / "dest", progress=False)
    assert [(i.width, i.height) for i in report.imported] == [(2000, 2000)]


def test_zip_limits_on_count_and_total_size(tmp_path):
    z = tmp_path / "many.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for i in range(12):
            zf.writestr(f"{i}.png", _png_bytes(size=(70, 70)))
    with pytest.raises(LoraNbError, match="12 entries"):
        im.import_images(z, tmp_path / "d1", max_zip_files=10, progress=False)
    with pytest.raises(LoraNbError, match="unpacks to"):
        im.import_images(z, tmp_path / "d2", max_zip_bytes=1000, progress=False)


def test_not_a_zip_is_a_clear_error(tmp_path):
    z = tmp_path / "broken.zip"
    z.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(LoraNbError, match="not a readable zip"):
        im.import_images(z, tmp_path / "dest", progress=False)


def test_folder_symlinks_are_not_followed(tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(_png_bytes())
    src = tmp_path / "src"
    src.mkdir()
    (src / "real.png").write_bytes(_png_bytes((1, 2, 3)))
    (src / "link.png").symlink_to(outside)
    (src / "linked dir").symlink_to(tmp_path, target_is_directory=True)
    os.mkfifo(src / "pipe.png")
    report = im.import_images(src, tmp_path / "dest", progress=False)
    assert [i.original for i in report.imported] == ["real.png"]
    assert "symbolic link" in report.skipped_names()["link.png"]
    assert "not a regular file" in report.skipped_names()["pipe.png"]


def test_zip_of_the_awkward_folder_gives_the_same_result(awkward_folder, tmp_path):
    z = tmp_path / "awkward.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(awkward_folder.rglob("*")):
            if p.is_file():
                zf.write(p, "my photos/" + p.relative_to(awkward_folder).as_posix())
    report = im.import_images(z, tmp_path / "dest", progress=False)
    strip = len("my photos/")
    assert {i.original[strip:] for i in report.imported} == set(GOOD)
    assert {n[strip:] for n in report.skipped_names()} == set(BAD)


# --------------------------------------------------------------------------- audit

@pytest.fixture(scope="module")
def audit_set(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("audit")
    astro = _sample("astronaut", 512)
    astro.save(d / "astronaut.png")
    astro.save(d / "astronaut again.png")                                 # exact duplicate
    astro.resize((400, 400)).save(d / "astronaut small.jpg", quality=80)  # near duplicate, also small
    astro.filter(ImageFilter.GaussianBlur(6)).save(d / "astronaut blurry.png")
    _sample("coffee", 600).save(d / "coffee.png")
    _sample("chelsea", 600).save(d / "chelsea.png")
    _sample("rocket", 600).save(d / "rocket.png")
    return d


def test_audit_finds_blur_duplicates_and_small_images(audit_set):
    report = im.audit_images(audit_set, target=(512, 512), progress=False)
    by_name = {Path(a.path).name: a for a in report.images}
    assert by_name["astronaut blurry.png"].blurry
    assert not by_name["astronaut.png"].blurry and not by_name["coffee.png"].blurry
    assert [sorted(Path(p).name for p in g) for g in report.exact_duplicates] == [["astronaut again.png", "astronaut.png"]]
    near = {frozenset((Path(a).name, Path(b).name)) for a, b, _ in report.near_duplicates}
    assert frozenset(("astronaut.png", "astronaut small.jpg")) in near
    assert frozenset(("astronaut.png", "coffee.png")) not in near
    assert by_name["astronaut small.jpg"].upscale == pytest.approx(512 / 400, abs=1e-3)
    assert by_name["astronaut.png"].upscale == 1.0 and by_name["coffee.png"].upscale == pytest.approx(1.28, abs=0.01)
    text = "\n".join(report.warnings)
    assert "blurry" in text and "exact duplicates" in text and "near duplicates" in text and "enlarged" in text
    d = json.loads(json.dumps(report.to_dict()))
    assert d["count"] == 7 and d["target"] == [512, 512]


def test_variety_is_lower_for_a_monotonous_set(audit_set, tmp_path):
    varied = im.audit_images([audit_set / n for n in ("astronaut.png", "coffee.png", "chelsea.png", "rocket.png")],
                             progress=False)
    astro = Image.open(audit_set / "astronaut.png")
    same = []
    for i in range(4):
        p = tmp_path / f"same{i}.png"
        astro.rotate(i * 2, fillcolor=(0, 0, 0)).crop((i * 4, i * 4, 500, 500)).save(p)
        same.append(p)
    monotonous = im.audit_images(same, progress=False)
    assert monotonous.variety < 0.5 < varied.variety
    assert any("low variety" in w for w in monotonous.warnings)


def test_audit_lists_unreadable_files_and_saves_json(audit_set, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    report = im.audit_images([audit_set / "coffee.png", bad], progress=False)
    assert str(bad) in report.unreadable
    out = report.save_json(tmp_path / "dataset_report.json")
    assert json.loads(out.read_text(encoding="utf-8"))["count"] == 1
    with pytest.raises(LoraNbError, match="no images"):
        im.audit_images([], progress=False)


# --------------------------------------------------------------------------- kohya folders

def test_concept_folder_round_trip(tmp_path):
    name = im.concept_folder_name(10, "sks dog")
    assert name == "10_sks dog"
    assert im.parse_concept_folder(name) == (10, "sks dog")
    assert im.parse_concept_folder(tmp_path / "15_my_style") == (15, "my_style")
    for bad in ("sks dog", "0_dog", "x_dog", "10_"):
        with pytest.raises(LoraNbError, match="kohya convention"):
            im.parse_concept_folder(bad)
    for repeats, concept in ((0, "dog"), (2.5, "dog"), (3, "a/b"), (3, " ")):
        with pytest.raises(LoraNbError):
            im.concept_folder_name(repeats, concept)
    folder = im.make_concept_folder(tmp_path / "dataset", 8, "zorb")
    reg = im.make_regularization_folder(tmp_path / "regularization", "toy")
    assert folder.is_dir() and reg.name == "1_toy"
    assert [(p.name, r, c) for p, r, c in im.find_concept_folders(tmp_path / "dataset")] == [("8_zorb", 8, "zorb")]


def test_regularization_advice():
    assert im.regularization_advice(15, 20) == []
    assert "10-20" in im.regularization_advice(3, 20)[0]
    assert any("instead of your subject" in w for w in im.regularization_advice(60, 20))


def test_a_16_bit_png_in_the_dataset_trains_as_its_grey_not_white(tmp_path):
    """The trainer loads images through the importer's loader: a 16-bit grey PNG placed straight in the
    dataset folder keeps its grey level (it used to become almost white)."""
    import numpy as np
    from PIL import Image

    from lora_nb.dataset import load_training_image

    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((64, 64), 32768, dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    arr, _, _ = load_training_image(path, (64, 64))
    assert abs(float(arr.mean())) < 0.05  # mid grey is 0 in [-1, 1]


def test_a_pipe_given_as_the_source_is_refused_at_once_and_odd_names_are_reported_as_text(tmp_path):
    """A FIFO source used to block in zipfile.is_zipfile; a name that is not UTF-8 is imported under a safe name
    and reported with \\x escapes (so the report can be printed and written as JSON)."""
    import dataclasses
    import json
    import os

    import numpy as np
    from PIL import Image

    from lora_nb import LoraNbError
    from lora_nb.images import import_images

    os.mkfifo(tmp_path / "photos.zip")
    with pytest.raises(LoraNbError, match="not a regular file"):
        import_images(tmp_path / "photos.zip", tmp_path / "out", progress=False)
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.full((80, 80, 3), 90, np.uint8)).save(os.fsencode(src) + b"/caf\xe9.png")
    report = import_images(src, tmp_path / "out2", progress=False)
    assert [i.original for i in report.imported] == ["caf\\xe9.png"]
    assert os.listdir(tmp_path / "out2") == ["caf_.png"]
    json.dumps(dataclasses.asdict(report), ensure_ascii=False).encode("utf-8")  # raises on a surrogate
