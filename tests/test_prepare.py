"""lora_nb.prepare on the bundled toy pictures: the rebuilt folders hold what the trainer reads, and a
rebuild deletes nothing outside the folder it rebuilds: not the originals, not other concepts, not
what a link points to."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from lora_nb import LoraNbError
from lora_nb.dataset import scan_dataset
from lora_nb.images import list_images
from lora_nb.import_demo import awkward_import_demo, file_digests
from lora_nb.prepare import add_regularization_images, clear_pictures, rebuild_processed, rebuild_training_folder
from lora_nb.workspace import open_workspace

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "data" / "toy-concept" / "10_zorb"
TOY_REG = ROOT / "data" / "toy-reg" / "1_circle"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def pictures(tmp_path):
    """Ten toy pictures (no captions beside them) outside the workspace: the 'processed' pictures to copy."""
    folder = tmp_path / "pictures"
    folder.mkdir()
    for p in sorted(TOY.glob("*.png"))[:10]:
        shutil.copyfile(p, folder / p.name)
    return folder


def test_training_folder_is_built_from_the_pictures_and_read_by_the_trainer(tmp_path, pictures):
    ws = open_workspace(tmp_path / "ws")
    captions = {str(p): f"zorb, picture {i}" for i, p in enumerate(list_images(pictures))}
    built = rebuild_training_folder(ws, captions, repeats=3, concept="zorb")
    assert built.folder == ws.dataset / "3_zorb"
    assert sorted(p.name for p in list_images(built.folder)) == sorted(p.name for p in list_images(pictures))
    assert all(digest(Path(dest)) == digest(pictures / Path(dest).name) for dest in built.captions)
    assert built.check.ok and built.check.captioned == built.check.images == 10
    scan = scan_dataset(ws.dataset, caption_extension=".txt")
    assert len(scan.items) == 10 and {i.repeats for i in scan.items} == {3}
    assert sorted(i.caption for i in scan.items) == sorted(captions.values())
    assert "wrote 10 pictures + 10 captions" in built.summary() and "OK" in built.summary()


def test_rebuild_deletes_only_this_concepts_pictures_inside_the_dataset_folder(tmp_path, pictures):
    ws = open_workspace(tmp_path / "ws")
    originals = tmp_path / "my photos"  # a learner's own folder, outside the workspace
    shutil.copytree(TOY, originals)
    before_originals = file_digests(originals)
    before_pictures = file_digests(pictures)
    # what is in the workspace from earlier runs
    ws.source.mkdir(parents=True)
    shutil.copyfile(TOY / "zorb_000.png", ws.source / "zorb_000.png")
    ws.processed.mkdir()
    shutil.copyfile(TOY / "zorb_001.png", ws.processed / "zorb_001.png")
    same = ws.dataset / "10_zorb"  # the folder this run writes, with an old picture, a note and a hard link
    same.mkdir(parents=True)
    shutil.copyfile(TOY / "zorb_019.png", same / "old.png")
    (same / "old.txt").write_text("zorb, old caption", encoding="utf-8")
    (same / "notes.md").write_text("my notes", encoding="utf-8")
    os.link(originals / "zorb_018.png", same / "zorb_000.png")  # a name this run copies in: never written through
    other_repeats = ws.dataset / "4_zorb"  # same concept, other repeats: it would be trained too
    other_repeats.mkdir()
    shutil.copyfile(TOY / "zorb_017.png", other_repeats / "zorb_017.png")
    (other_repeats / "zorb_017.txt").write_text("zorb", encoding="utf-8")
    os.symlink(originals, ws.dataset / "7_zorb", target_is_directory=True)  # linked in: only the link may go
    other_concept = ws.dataset / "5_circle"
    shutil.copytree(TOY_REG, other_concept)
    before_other_concept = file_digests(other_concept)
    before_ws = {name: file_digests(getattr(ws, name)) for name in ("source", "processed")}

    captions = {str(p): "zorb" for p in list_images(pictures)}
    built = rebuild_training_folder(ws, captions, repeats=10, concept="zorb")

    assert file_digests(originals) == before_originals, "the originals must never change"
    assert file_digests(pictures) == before_pictures
    assert file_digests(other_concept) == before_other_concept
    assert {name: file_digests(getattr(ws, name)) for name in ("source", "processed")} == before_ws
    assert not (ws.dataset / "7_zorb").exists() and originals.is_dir()
    assert not other_repeats.exists()
    assert (same / "notes.md").read_text(encoding="utf-8") == "my notes" and same / "notes.md" in built.left
    assert not (same / "old.png").exists() and not (same / "old.txt").exists()
    assert sorted(p.name for p in list_images(same)) == sorted(p.name for p in list_images(pictures))
    assert {ws.dataset / "7_zorb", same / "old.png", same / "old.txt"} <= set(built.removed)
    # the trainer now sees this concept once, at the repeats asked for, beside the untouched other concept
    scan = scan_dataset(ws.dataset)
    assert {(i.folder, i.repeats) for i in scan.items} == {("10_zorb", 10), ("5_circle", 5)}


def test_rebuild_refuses_links_and_pictures_inside_the_folder_it_empties(tmp_path, pictures):
    ws = open_workspace(tmp_path / "ws")
    originals = tmp_path / "originals"
    shutil.copytree(TOY, originals)
    before = file_digests(originals)
    ws.dataset.mkdir()
    os.symlink(originals, ws.dataset / "10_zorb", target_is_directory=True)
    with pytest.raises(LoraNbError, match="is a link"):
        rebuild_training_folder(ws, {str(p): "zorb" for p in list_images(pictures)}, 10, "zorb")
    assert file_digests(originals) == before
    # the pictures to copy inside the dataset folder: refused before anything is deleted
    inside = ws.dataset / "3_zorb"
    shutil.copytree(pictures, inside)
    with pytest.raises(LoraNbError, match="inside"):
        rebuild_training_folder(ws, {str(p): "zorb" for p in list_images(inside)}, 3, "zorb")
    assert len(list_images(inside)) == 10
    with pytest.raises(LoraNbError, match="do not exist"):
        rebuild_training_folder(ws, {str(tmp_path / "gone.png"): "zorb"}, 3, "zorb")
    assert len(list_images(inside)) == 10
    # a dataset/ folder that is itself a link out of the workspace
    ws2 = open_workspace(tmp_path / "ws2")
    os.symlink(originals, ws2.dataset, target_is_directory=True)
    with pytest.raises(LoraNbError, match="is a link"):
        rebuild_training_folder(ws2, {str(p): "zorb" for p in list_images(pictures)}, 10, "zorb")
    assert file_digests(originals) == before


def test_pictures_of_the_same_name_get_their_own_files(tmp_path, pictures):
    ws = open_workspace(tmp_path / "ws")
    again = tmp_path / "again"
    again.mkdir()
    shutil.copyfile(pictures / "zorb_000.png", again / "zorb_000.png")
    built = rebuild_training_folder(ws, {str(pictures / "zorb_000.png"): "zorb, one", str(again / "zorb_000.png"):
                                         "zorb, two"}, 2, "zorb")
    assert sorted(Path(p).name for p in built.captions) == ["zorb_000-1.png", "zorb_000.png"]
    assert (built.folder / "zorb_000-1.txt").read_text(encoding="utf-8") == "zorb, two"


def test_clear_pictures_removes_links_not_their_targets(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    target = tmp_path / "outside.png"
    shutil.copyfile(TOY / "zorb_000.png", target)
    os.symlink(target, folder / "link.png")
    (folder / "keep.json").write_text("{}", encoding="utf-8")
    (folder / "sub").mkdir()
    shutil.copyfile(TOY / "zorb_001.png", folder / "sub" / "deep.png")
    assert clear_pictures(folder) == [folder / "link.png"]
    assert target.is_file() and (folder / "keep.json").is_file() and (folder / "sub" / "deep.png").is_file()


def test_processed_is_rebuilt_fresh_from_the_source_pictures(tmp_path):
    ws = open_workspace(tmp_path / "ws")
    shutil.copytree(TOY, ws.source)
    before = file_digests(ws.source)
    ws.processed.mkdir()
    shutil.copyfile(TOY / "zorb_005.png", ws.processed / "left over from another mode.png")
    outside = tmp_path / "outside.png"
    shutil.copyfile(TOY / "zorb_006.png", outside)
    os.symlink(outside, ws.processed / "linked.png")
    done = rebuild_processed(ws, ws.source, (48, 48), "center")
    assert file_digests(ws.source) == before and outside.is_file()
    assert sorted(p.name for p in list_images(ws.processed)) == sorted(p.name for p in list_images(TOY))
    assert done.sizes == {"48x48": len(list_images(TOY))} and all(Image.open(p).size == (48, 48) for p in done.written)
    assert {p.name for p in done.removed} == {"left over from another mode.png", "linked.png"}
    pairs = done.before_after(3)
    assert len(pairs) == 3 and pairs[0][0].size == (64, 64) and pairs[0][1].image.size == (48, 48)
    assert "48 picture(s) cropped (center)" in done.summary()
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraNbError, match="No pictures"):
        rebuild_processed(ws, tmp_path / "empty", (48, 48))
    assert len(list_images(ws.processed)) == 48  # nothing deleted when there is nothing to crop


def test_processed_pictures_keep_the_caption_files_beside_their_sources(tmp_path):
    """03 keeps these captions when no tagger can run (offline, a learner's own photos)."""
    ws = open_workspace(tmp_path / "ws")
    ws.source.mkdir(parents=True)
    for name in ("zorb_001", "zorb_002"):
        shutil.copyfile(TOY / f"{name}.png", ws.source / f"{name}.png")
    (ws.source / "zorb_001.txt").write_text("zorb, red, many tags", encoding="utf-8")
    ws.processed.mkdir()
    (ws.processed / "zorb_002.txt").write_text("stale", encoding="utf-8")  # left by an earlier rebuild
    rebuild_processed(ws, ws.source, (48, 48), "center")
    assert (ws.processed / "zorb_001.txt").read_text(encoding="utf-8") == "zorb, red, many tags"
    assert not (ws.processed / "zorb_002.txt").exists()
    assert (ws.source / "zorb_001.txt").is_file()


def test_regularization_images_are_added_once(tmp_path):
    ws = open_workspace(tmp_path / "ws")
    folder, paths = add_regularization_images(ws, TOY_REG, "circle")
    assert folder == ws.regularization / "1_circle" and len(paths) == len(list_images(TOY_REG))
    again, paths_again = add_regularization_images(ws, TOY_REG, "circle")
    assert again == folder and paths_again == paths


def test_awkward_import_demo_keeps_good_files_skips_bad_ones_and_leaves_originals(tmp_path):
    demo = awkward_import_demo(tmp_path)
    assert demo.originals_unchanged
    result = {r["file"]: r["result"] for r in demo.rows}
    assert result["ok.jpg"] == "kept 240x160 (byte copy)"
    assert result["phone photo (EXIF rotated).jpg"].startswith("kept 160x240")
    assert "too small" in result["icon 20x20.png"] and "not an image" in result["notes.txt"]
    assert all(p.is_file() and p.parent == tmp_path / "out" for p in demo.kept)


def test_focus_crop_writes_subject_box_masks_that_03_copies_and_training_reads(tmp_path):
    """``subject_masks`` in 02: each focus-cropped toy picture (a zorb off-centre, its box known) gets a
    ``.mask.png``, white where the zorb lands in the crop; 03's copy takes the masks along, the trainer reads
    them as masks (not pictures)."""
    import numpy as np

    from lora_nb.crop import toy_crop_set
    from lora_nb.dataset import load_training_mask

    ws = open_workspace(tmp_path / "ws")
    ws.source.mkdir(parents=True)
    samples = [s for s in toy_crop_set(12) if s[2] == (64, 64)][:4]
    for i, (image, _, _, _) in enumerate(samples):
        image.save(ws.source / f"zorb_{i}.png")
    done = rebuild_processed(ws, ws.source, (64, 64), "focus", masks=True)
    assert done.masks == 4 and "4 with a subject-box loss mask" in done.summary()
    assert len(list_images(ws.processed)) == 4  # the masks are not pictures
    for (image, truth, _, _), (_, written, box, _) in zip(samples, done.crops.results):
        mask = np.asarray(Image.open(Path(written).with_name(Path(written).stem + ".mask.png"))) > 127
        scale = 64 / (box[2] - box[0])
        x0, y0, x1, y1 = ((truth[0] - box[0]) * scale, (truth[1] - box[1]) * scale,
                          (truth[2] - box[0]) * scale, (truth[3] - box[1]) * scale)
        ys, xs = np.nonzero(mask)
        inter = max(0, min(x1, xs.max() + 1) - max(x0, xs.min())) * max(0, min(y1, ys.max() + 1) - max(y0, ys.min()))
        union = (x1 - x0) * (y1 - y0) + mask.sum() - inter
        assert inter / union > 0.5, (written, inter / union)  # the white box is where the zorb is
        assert 0.05 < mask.mean() < 0.8  # and the rest is left out
    built = rebuild_training_folder(ws, {w: "zorb" for w in done.written}, repeats=2, concept="zorb")
    assert len(list(built.folder.glob("*.mask.png"))) == 4
    items = scan_dataset(ws.dataset, caption_extension=".txt").items
    assert len(items) == 4
    loaded = load_training_mask(items[0].image, (64, 64))
    assert loaded is not None and loaded.min() == 0 and loaded.max() == 1
    plain = rebuild_processed(ws, ws.source, (64, 64), "center", masks=True)
    assert plain.masks == 0 and not list(ws.processed.glob("*.mask.png"))  # only focus finds a subject
