"""The bad-input catalogue: every mistake a learner makes with files and settings gets one clear message
naming the file or setting (a LoraNbError; on the command line exit status 2 and one line on stderr, no
traceback), and nothing of theirs is lost or changed.

Also the safety rules: no pickle is unpickled without an explicit opt-in (and then only with
``weights_only=True``), no ``trust_remote_code`` anywhere in the package.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_config
from PIL import Image
from safetensors import safe_open

from lora_nb import LoraNbError, cli
from lora_nb.config import Config
from lora_nb.dataset import scan_dataset
from lora_nb.models import load_base_model

PACKAGE = Path(__file__).resolve().parents[1] / "lora_nb"


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _image(path: Path, rgb=(200, 40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.full((64, 64, 3), 128, np.uint8)
    a[16:48, 16:48] = rgb
    Image.fromarray(a).save(path)
    return path


def _cli_error(capsys, *argv) -> str:
    """Run ``lora-nb *argv`` in-process; assert exit status 2 and one stderr line; return that line."""
    capsys.readouterr()  # forget what earlier steps of the test printed
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("lora-nb: "), err
    return lines[0]


def _train_error(capsys, tmp_path, model_dir, dataset_dir, **overrides) -> str:
    cfg = make_config(model_dir, dataset_dir, tmp_path / "ws", **overrides)
    return _cli_error(capsys, "train", cfg.write_yaml(tmp_path / "config.yaml"))


# --------------------------------------------------------------------------- datasets

def test_empty_dataset_folder_is_named_on_the_command_line(tiny_sd15_dir, tmp_path, capsys):
    """An empty dataset folder: exit 2, one line naming dataset.dir and the folder, what to put there."""
    empty = tmp_path / "my dataset"
    empty.mkdir()
    line = _train_error(capsys, tmp_path, tiny_sd15_dir, empty)
    assert "dataset.dir" in line and str(empty) in line and "Put images" in line


def test_missing_dataset_folder_is_named(tiny_sd15_dir, tmp_path, capsys):
    """A dataset path that does not exist: named, with where the folder should come from."""
    line = _train_error(capsys, tmp_path, tiny_sd15_dir, tmp_path / "no such folder")
    assert "dataset.dir=" in line and "no such folder" in line and "is not a folder" in line


def test_images_only_of_unsupported_types_are_named_with_the_fix(tiny_sd15_dir, tmp_path, capsys):
    """Only .heic/.pdf/.psd files: the message says which types were found, names one file and points to
    the importer that converts them; the files are untouched. (.gif and .tif are read by the trainer as by
    the importer: one list of image types, lora_nb.folders.)"""
    folder = tmp_path / "data" / "5_cat"
    folder.mkdir(parents=True)
    for name in ("c.heic", "notes.pdf", "d.psd"):
        (folder / name).write_bytes(b"not really")
    before = _digests(tmp_path / "data")
    line = _train_error(capsys, tmp_path, tiny_sd15_dir, tmp_path / "data")
    assert "holds no image the trainer reads" in line
    assert ".heic" in line and ".psd" in line and "import_images" in line
    assert _digests(tmp_path / "data") == before


def test_the_trainer_reads_every_type_the_importer_reads_and_names_a_broken_one(tiny_sd15_dir, tmp_path, capsys):
    folder = tmp_path / "data" / "5_cat"
    _image(folder / "a.png").rename(folder / "a.gif")  # a PNG under another name still loads
    assert [it.image.name for it in scan_dataset(tmp_path / "data").items] == ["a.gif"]
    (folder / "b.tif").write_bytes(b"not really")
    line = _train_error(capsys, tmp_path, tiny_sd15_dir, tmp_path / "data", **{"training.batch_size": 1})
    assert "b.tif" in line and "not an image file" in line


def test_images_in_a_folder_without_the_repeats_prefix_get_the_rename_fix(tiny_sd15_dir, tmp_path, capsys):
    """kohya skips ``photos/`` (no ``10_`` prefix): the message says so and gives the new name; when another
    folder does train, the skipped one is a warning instead."""
    _image(tmp_path / "data" / "photos" / "a.png")
    line = _train_error(capsys, tmp_path, tiny_sd15_dir, tmp_path / "data")
    assert "'photos'" in line and "'10_photos'" in line
    _image(tmp_path / "data" / "2_sks" / "b.png")
    scan = scan_dataset(tmp_path / "data", trigger_word="sks")
    assert [it.image.name for it in scan.items] == ["b.png"]
    assert any("'photos'" in w and "not trained on" in w for w in scan.warnings)


def test_caption_extension_mismatch_is_named_on_the_command_line(tiny_sd15_dir, tmp_path, capsys):
    """Captions saved as .caption while the trainer reads .txt: both extensions and the setting are named."""
    folder = tmp_path / "data" / "2_sks"
    for i in range(2):
        _image(folder / f"{i}.png")
        (folder / f"{i}.caption").write_text("red square", encoding="utf-8")
    before = _digests(tmp_path / "data")
    line = _train_error(capsys, tmp_path, tiny_sd15_dir, tmp_path / "data")
    assert "dataset.caption_extension='.txt'" in line and "'.caption'" in line
    assert _digests(tmp_path / "data") == before


def test_missing_captions_train_with_the_trigger_word_and_say_so(tmp_path):
    """Two of three images lack a caption: they get the trigger word as their whole caption, and the
    warning gives the count, names them and states that caption."""
    folder = tmp_path / "3_sks"
    for name in ("a", "b", "c"):
        _image(folder / f"{name}.png")
    (folder / "a.txt").write_text("red square, gray background", encoding="utf-8")
    scan = scan_dataset(tmp_path, trigger_word="sks")
    captions = {it.image.name: it.caption for it in scan.items}
    assert captions == {"a.png": "sks, red square, gray background", "b.png": "sks", "c.png": "sks"}
    (warning,) = scan.warnings
    assert "2 image(s)" in warning and "b.png" in warning and "c.png" in warning and "'sks' only" in warning


ENCODED = {  # file name -> (bytes on disk, the caption the trainer must read)
    "utf8-bom": (codecs.BOM_UTF8 + "sks, café, naïve".encode("utf-8"), "sks, café, naïve"),
    "utf16-le": ("sks, café, 写真".encode("utf-16"), "sks, café, 写真"),
    "utf16-be": (codecs.BOM_UTF16_BE + "sks, café".encode("utf-16-be"), "sks, café"),
    "cp1252": ("sks, it’s “quoted” – café".encode("cp1252"), "sks, it’s “quoted” – café"),
    "crlf": ("sks, red square\r\n".encode("utf-8"), "sks, red square"),
}


def test_caption_files_in_other_encodings_are_read_right_and_left_unchanged(tmp_path):
    """UTF-8 with BOM, UTF-16 (either byte order, with BOM), Windows-1252 and CRLF endings all give the
    caption that was meant (no BOM or mojibake in the text the model sees); the files are not rewritten."""
    folder = tmp_path / "1_sks"
    for name, (raw, _) in ENCODED.items():
        _image(folder / f"{name}.png")
        (folder / f"{name}.txt").write_bytes(raw)
    before = _digests(tmp_path)
    scan = scan_dataset(tmp_path, trigger_word="sks")
    assert {it.image.stem: it.caption for it in scan.items} == {k: v for k, (_, v) in ENCODED.items()}
    assert scan.warnings == []
    assert _digests(tmp_path) == before


# --------------------------------------------------------------------------- config files

BAD_CONFIGS = [  # YAML text -> fragments the one-line message must contain (besides the file name)
    ("network:\n  rnak: 8\n", ["Unknown setting(s) 'rnak'", ".network", "rank"]),
    ("learning_rate: 1e-4\n", ["Unknown setting(s) 'learning_rate'", "optimizer"]),
    ("training:\n  epochs: ten\n", ["training.epochs must be a whole number", "'ten'"]),
    ("training:\n  batch_size: 1.5\n", ["training.batch_size must be a whole number"]),
    ("dataset:\n  flip_aug: maybe\n", ["dataset.flip_aug must be true or false"]),
    ("optimizer:\n  learning_rate: .nan\n", ["optimizer.learning_rate must be a finite number"]),
    ("save:\n  formats: {kohya: 1}\n", ["save.formats must be a list"]),
    ("model:\n  source: null\n", ["model.source must not be empty"]),
    ("model:\n  source: '  '\n", ["model.source: is empty"]),
    ("dataset:\n  dir: ''\n", ["dataset.dir: is empty"]),
    ("save:\n  output_dir: ''\n", ["save.output_dir: is empty"]),
    ("dataset:\n  trigger_word: 'sks, woman'\n", ["dataset.trigger_word", "comma"]),
    ("model: [\n", ["is not valid YAML (line", "column"]),
    ("dataset:\n\tdir: x\n", ["is not valid YAML (line 2"]),
    ("- model\n- dataset\n", ["must be a mapping of sections"]),
    ("training: 5\n", ["must be a mapping"]),
    ("training:\n  seed: 2024-13-45\n", ["is not valid YAML"]),
]


@pytest.mark.parametrize("text,fragments", BAD_CONFIGS, ids=[t.splitlines()[0][:24] for t, _ in BAD_CONFIGS])
def test_bad_config_files_get_one_line_naming_the_file_and_the_setting(tmp_path, capsys, text, fragments):
    """Unknown keys, wrong types, empty required settings, broken YAML: ``lora-nb train`` exits 2 with one
    line naming the file and the setting; the config file is untouched and no workspace is created."""
    path = tmp_path / "my config.yaml"
    path.write_text(text, encoding="utf-8")
    line = _cli_error(capsys, "train", path)
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    if "Please fix" not in line:  # settings checks name the setting; file-level errors name the file
        assert str(path) in line, line
    assert path.read_text(encoding="utf-8") == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my config.yaml"]


def test_config_file_missing_or_not_text_and_bad_overrides(tmp_path, capsys):
    """A missing file, a binary file and wrong ``--set`` overrides each get one named line."""
    assert "does not exist" in _cli_error(capsys, "train", tmp_path / "nope.yaml")
    (tmp_path / "a-folder").mkdir()
    assert "is a folder, not a config file" in _cli_error(capsys, "train", tmp_path / "a-folder")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x81 not text")
    assert "is not UTF-8 text" in _cli_error(capsys, "train", binary)
    good = Config().write_yaml(tmp_path / "good.yaml")
    assert "network.rank must be a whole number, not 'abc'" in _cli_error(capsys, "train", good, "--set", "network.rank=abc")
    assert "Unknown or ambiguous setting 'nosuch'" in _cli_error(capsys, "train", good, "--set", "nosuch=1")
    assert "must look like section.name=value" in _cli_error(capsys, "train", good, "--set", "network.rank")
    assert "write it 'Prodigy' (the names are case-sensitive)" in _cli_error(
        capsys, "train", good, "--set", "optimizer.optimizer=prodigy")
    assert "network.rank must be a whole number, not '['" in _cli_error(capsys, "train", good, "--set", "network.rank=[")


# --------------------------------------------------------------------------- models and LoRA files

def test_model_paths_that_are_not_models_are_named(tiny_sd15_dir, tmp_path, capsys):
    """An empty folder, a text file, a non-safetensors .safetensors, a LoRA given as the base model, a
    diffusers folder with a truncated weights file: each a LoraNbError naming the path; files untouched."""
    empty = tmp_path / "empty model"
    empty.mkdir()
    with pytest.raises(LoraNbError, match=r"empty model is not a diffusers model folder \(no model_index.json\)"):
        load_base_model(empty)
    notes = tmp_path / "model.txt"
    notes.write_text("hello")
    with pytest.raises(LoraNbError, match=r"model.txt is not a model checkpoint"):
        load_base_model(notes)
    fake = tmp_path / "fake.safetensors"
    fake.write_text("<html>404 Not Found</html>")
    with pytest.raises(LoraNbError, match=r"fake.safetensors is not a readable .safetensors checkpoint"):
        load_base_model(fake)
    lora = tmp_path / "a lora.safetensors"
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, str(lora))
    with pytest.raises(LoraNbError, match=r"a lora.safetensors does not look like an SD1.x or SDXL checkpoint"):
        load_base_model(lora)
    broken = tmp_path / "broken model"
    shutil.copytree(tiny_sd15_dir, broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:5000])
    before = _digests(broken)
    with pytest.raises(LoraNbError, match="broken model"):
        load_base_model(broken)
    assert _digests(broken) == before
    for name in ("a", "b"):
        _image(tmp_path / "data" / "1_sks" / f"{name}.png")
    cfg = make_config(empty, tmp_path / "data", tmp_path / "ws")
    line = _cli_error(capsys, "train", cfg.write_yaml(tmp_path / "c.yaml"))
    assert "empty model" in line and "model_index.json" in line


def test_a_lora_from_another_family_is_refused_at_load_time_naming_the_file(tiny_sd15_dir, tiny_sdxl_dir, tmp_path):
    """An SDXL LoRA file loaded onto an SD1.5 pipeline: refused before diffusers touches the pipeline, the
    message names the file and both families; the pipeline keeps no adapter and the file is unchanged."""
    from lora_nb import lora_io

    sdxl = load_base_model(tiny_sdxl_dir)
    lora_io.add_lora(sdxl, 4, 2.0, init="random")
    path = lora_io.save_lora(tmp_path / "my sdxl style.safetensors", sdxl)
    before = path.read_bytes()
    sd15 = load_base_model(tiny_sd15_dir)
    with pytest.raises(LoraNbError, match=r"my sdxl style.safetensors was made for sdxl .* this pipeline is sd15"):
        lora_io.load_lora(sd15.pipe, path)
    assert lora_io._loaded_counts(sd15.pipe, "lora") == {}
    assert path.read_bytes() == before


# --------------------------------------------------------------------------- pickles

class _Payload:
    """Unpickling this creates a file: proof that code inside a pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2),
                               "payload": _Payload(marker)}}, path)
    return path


def test_pickle_model_checkpoints_need_the_opt_in_and_never_run_code(tmp_path, tiny_sd15_dir):
    """A .ckpt model is refused without ``allow_pickle`` (naming the file and the setting). With it, a
    checkpoint hiding code is still refused by ``torch.load(weights_only=True)``: the code never runs.
    A plain tensor checkpoint gets through the unpickling and on to diffusers (which cannot build a model
    from its two tensors: a named error)."""
    marker = tmp_path / "code ran"
    evil = _evil_checkpoint(tmp_path / "model.ckpt", marker)
    with pytest.raises(LoraNbError, match=r"model.ckpt is a pickle checkpoint.*model.allow_pickle=true"):
        load_base_model(evil)
    with pytest.raises(LoraNbError, match=r"model.ckpt was refused and nothing in it was run: it holds Python "
                                          r"objects besides tensors \(io\.open\)") as refused:
        load_base_model(evil, allow_pickle=True)
    assert "weights_only" not in str(refused.value) and "Re-running" not in str(refused.value)
    assert not marker.exists()
    renamed = tmp_path / "really a pickle.safetensors"
    renamed.write_bytes(evil.read_bytes())
    with pytest.raises(LoraNbError, match="is not a readable .safetensors checkpoint"):
        load_base_model(renamed, allow_pickle=True)
    assert not marker.exists()

    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2),
                               "cond_stage_model.transformer.x": torch.ones(1)}, "global_step": 7}, plain)
    with pytest.raises(LoraNbError, match=r"Could not load the sd15 checkpoint .*plain.ckpt"):
        load_base_model(plain, allow_pickle=True, single_file_config=tiny_sd15_dir)


def test_model_loading_code_unpickles_only_with_weights_only(monkeypatch, tmp_path, tiny_sd15_dir):
    """The only unpickling on the model path is ``torch.load(..., weights_only=True)``, whatever the
    installed diffusers does: diffusers is handed a .safetensors file."""
    from lora_nb import models

    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    seen_by_diffusers = []

    def from_single_file(path, **kwargs):
        seen_by_diffusers.append(Path(path).suffix)
        raise OSError("offline")

    monkeypatch.setattr(torch, "load", spy)
    from diffusers import StableDiffusionPipeline

    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", from_single_file)
    plain = tmp_path / "m.pt"
    torch.save({"model.diffusion_model.a": torch.zeros(1)}, plain)
    with pytest.raises(LoraNbError, match="Could not load"):
        models.load_base_model(plain, allow_pickle=True, single_file_config=tiny_sd15_dir)
    assert calls == [True] and seen_by_diffusers == [".safetensors"]


def test_pickle_lora_files_are_refused_and_never_run_code(tiny_sd15_dir, tmp_path):
    """A .ckpt/.pt LoRA is refused by name; a pickle renamed to .safetensors is unreadable, not executed."""
    from lora_nb import lora_io

    marker = tmp_path / "code ran"
    pipe = load_base_model(tiny_sd15_dir).pipe
    for name in ("style.ckpt", "style.pt"):
        path = _evil_checkpoint(tmp_path / name, marker)
        with pytest.raises(LoraNbError, match=rf"{re.escape(name)} is a pickle file"):
            lora_io.load_lora(pipe, path)
        with pytest.raises(LoraNbError, match="pickle"):
            lora_io.inspect_lora(path)
    disguised = tmp_path / "style.safetensors"
    disguised.write_bytes((tmp_path / "style.ckpt").read_bytes())
    with pytest.raises(LoraNbError, match="style.safetensors is not a readable .safetensors file"):
        lora_io.load_lora(pipe, disguised)
    assert not marker.exists()


# --------------------------------------------------------------------------- safety in the source

def _package_sources() -> dict[str, str]:
    return {str(p.relative_to(PACKAGE.parent)): p.read_text(encoding="utf-8") for p in sorted(PACKAGE.rglob("*.py"))}


def test_no_trust_remote_code_anywhere_in_the_package():
    """No model or tokenizer is ever loaded with code from its repository."""
    offenders = [name for name, text in _package_sources().items() if "trust_remote_code" in text]
    assert offenders == []


def test_every_unpickle_in_the_package_is_weights_only():
    """Every ``torch.load`` passes ``weights_only=True`` explicitly, and nothing calls pickle.load(s)."""
    offenders = []
    for name, text in _package_sources().items():
        for m in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", text):
            if "weights_only=True" not in m.group(0):
                offenders.append(f"{name}: {m.group(0)}")
        if re.search(r"\bpickle\.loads?\(|\bdill\.|cloudpickle", text):
            offenders.append(f"{name}: pickle.load")
    assert offenders == []


# --------------------------------------------------------------------------- awkward paths

@pytest.mark.slow
def test_paths_with_spaces_and_non_ascii_names_through_a_whole_training_run(tiny_sd15_dir, tmp_path, capsys):
    """Model, dataset, image, caption, workspace and config paths with spaces, accents and CJK: ``lora-nb
    train`` runs to the end, writes a loadable LoRA whose metadata keeps the names, states the missing
    caption, and leaves the dataset byte-identical."""
    root = tmp_path / "Mes données é 写真"
    model_dir = root / "base model ñ"
    shutil.copytree(tiny_sd15_dir, model_dir)
    folder = root / "dataset ü" / "2_sks chat"
    for i, rgb in enumerate([(220, 30, 30), (30, 200, 60), (40, 60, 220)]):
        _image(folder / f"photo {i} é 猫.png", rgb)
    (folder / "photo 0 é 猫.txt").write_text("sks, chat roux, fond gris", encoding="utf-8")
    (folder / "photo 1 é 猫.txt").write_bytes(codecs.BOM_UTF8 + "chat vert".encode("utf-8"))
    before = _digests(root / "dataset ü")
    ws = root / "runs" / "my run ü"
    cfg = make_config(model_dir, root / "dataset ü", ws, **{"training.epochs": 1, "training.batch_size": 3,
                                                             "save.output_name": "chat é"})
    cfg_path = cfg.write_yaml(root / "ma config é.yaml")
    assert cli.main(["train", str(cfg_path)]) == 0
    out, err = capsys.readouterr()
    final = ws / "lora" / "chat é.safetensors"
    assert str(final) in out
    assert "photo 2 é 猫.png" in err and "'sks' only" in err
    from lora_nb.lora_io import inspect_lora

    info = inspect_lora(final)
    assert info["problems"] == [] and info["family"] == "sd15"
    with safe_open(str(final), "pt") as f:
        freq = json.loads(f.metadata()["ss_tag_frequency"])
    assert freq["2_sks chat"]["sks"] == 3 and freq["2_sks chat"]["chat roux"] == 1
    assert _digests(root / "dataset ü") == before


# Settings refused before any work, each by the CLI with one line naming the setting (and no file written).
BAD_SETTINGS = [
    ({"network.rank": 10**20}, "network.rank"),
    ({"network.alpha": float("inf")}, "network.alpha"),
    ({"training.seed": 10**23}, "training.seed"),
    ({"training.max_steps": -5}, "training.max_steps"),
    ({"training.epochs": 10**9}, "training.epochs"),
    ({"optimizer.learning_rate": float("nan")}, "optimizer.learning_rate"),
    ({"optimizer.optimizer": "Prodigy", "optimizer.learning_rate": 1.0, "optimizer.text_encoder_lr": 0.5},
     "Prodigy finds one step size"),
    ({"dataset.validation_split": -1}, "dataset.validation_split: must be 0"),
    ({"dataset.validation_split": 20}, "dataset.validation_split: holds out 20"),
    ({"save.output_name": ".."}, "save.output_name"),
    ({"save.output_dir": "/proc/lora-nb"}, "save.output_dir: '/proc/lora-nb' is a system folder"),
    ({"sample.steps": 0}, "sample.steps"),
    ({"dataset.max_token_length": 100}, "dataset.max_token_length"),
    ({"dataset.resolution": 100000}, "dataset.resolution: 100000x100000: at most 4096 px a side"),
    ({"dataset.validation_dir": "/nonexistent/val"}, "dataset.validation_dir='/nonexistent/val' is not a folder"),
]


@pytest.mark.parametrize("overrides,fragment", BAD_SETTINGS, ids=[next(iter(o)) + "=" + str(next(iter(o.values())))
                                                                  for o, _ in BAD_SETTINGS])
def test_absurd_or_contradictory_settings_are_refused_by_name(tiny_sd15_dir, tiny_dataset, tmp_path, capsys,
                                                               overrides, fragment):
    before = _digests(tiny_dataset)
    cfg = make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "ws")
    for key, value in overrides.items():  # set directly: some values are ones YAML overrides cannot spell
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    line = _cli_error(capsys, "train", cfg.write_yaml(tmp_path / "config.yaml"))
    assert fragment in line, line
    assert not (tmp_path / "ws" / "lora").exists() and _digests(tiny_dataset) == before


def test_an_output_dir_that_is_a_file_is_refused_before_loading_the_model(tiny_sd15_dir, tiny_dataset, tmp_path,
                                                                          capsys):
    target = tmp_path / "a-file"
    target.write_text("mine")
    line = _train_error(capsys, tmp_path, tiny_sd15_dir, tiny_dataset, **{"save.output_dir": str(target)})
    assert "save.output_dir" in line and "is a file" in line and target.read_text() == "mine"


def test_a_warm_up_longer_than_the_run_is_said(tiny_sd15_dir, tiny_dataset, tmp_path):
    from lora_nb.train import train

    result = train(make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "ws", **{"optimizer.lr_warmup_steps": 500}),
                   progress=False)
    assert any("lr_warmup_steps: 500 warm-up steps but the run has only 4" in w for w in result.warnings)


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path, capsys):
    import resource

    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcdefg", "bcdefgh"):
        levels.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 10)}]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(levels) + "\nsample:\n  prompts: *h\n", encoding="utf-8")  # 10^8 values if expanded
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    line = _cli_error(capsys, "train", path)
    assert "YAML aliases (*name) expand to more than 100,000 values" in line and len(line) < 300
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # kB: nothing was expanded


def test_a_class_name_that_is_a_path_is_refused_under_its_own_name(tmp_path):
    """01's ``class_name`` becomes the regularization folder's name: a path in it is refused as class_name
    (not under another setting's name), and nothing is created anywhere."""
    from lora_nb.folders import make_regularization_folder

    with pytest.raises(LoraNbError, match=r"^class_name='\.\./\.\./x' cannot be a folder name"):
        make_regularization_folder(tmp_path / "reg", "../../x")
    assert list(tmp_path.rglob("*")) == []
