"""lora_nb.notebook helpers the notebooks share: saving reports, finding pictures, the training settings."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from lora_nb import LoraNbError
from lora_nb.captions import check_caption_extension
from lora_nb.config import Config, ConfigError, preset
from lora_nb.images import list_images
from lora_nb.notebook import (
    NotebookEnv, extend_report, find_pictures, load_training_config, repo_root, report_json, save_report,
)
from lora_nb.workspace import open_workspace

TOY = repo_root() / "data" / "toy-concept"


def make_env(tmp_path) -> NotebookEnv:
    return NotebookEnv(open_workspace(tmp_path / "ws"), repo_root(), "cpu", "local", None)


# --------------------------------------------------------------------------- save_report

def test_save_report_writes_the_workspace_report_atomically(tmp_path):
    ws = open_workspace(tmp_path / "ws")
    data = {"source": Path("/data/photos"), "sizes": {"64x64": 20}, "mean": np.float32(0.5), "pair": (1, 2),
            "tags": {"zorb"}, "array": np.arange(3), "name": "Café zorb"}
    path = save_report(ws, "dataset_report", data)
    assert path == ws.report("dataset_report") == ws.reports / "dataset_report.json"
    text = path.read_text(encoding="utf-8")
    assert "Café zorb" in text  # readable, not \u00e9
    assert json.loads(text) == {"source": "/data/photos", "sizes": {"64x64": 20}, "mean": 0.5, "pair": [1, 2],
                                "tags": ["zorb"], "array": [0, 1, 2], "name": "Café zorb"}
    save_report(ws, "dataset_report.json", {"again": True})  # the extension is optional; the file is replaced
    assert json.loads(path.read_text(encoding="utf-8")) == {"again": True}
    assert sorted(p.name for p in ws.reports.iterdir()) == ["dataset_report.json"]  # no temporary file left
    with pytest.raises(LoraNbError, match="plain name"):
        save_report(ws, "../outside", {})


def test_save_report_never_fails_on_a_file_name_that_is_not_utf8(tmp_path):
    """A picture whose name is not valid UTF-8 (as a camera or an old zip can leave): Python holds it with
    lone surrogates, which strict UTF-8 cannot encode. The report still writes and reads back the same name."""
    folder = tmp_path / "pictures" / "10_zorb"
    folder.mkdir(parents=True)
    raw_name = b"caf\xe9 " + "zorb ü".encode() + b".png"
    shutil.copyfile(TOY / "10_zorb" / "zorb_000.png", os.path.join(os.fsencode(folder), raw_name))
    name = os.fsdecode(raw_name)
    assert [p.name for p in list_images(folder)] == [name]
    with pytest.raises(UnicodeEncodeError):
        name.encode("utf-8")
    check = check_caption_extension(tmp_path / "pictures", ".txt")
    data = {"captions": {name: "zorb"}, "check": check.to_dict(), "folder": folder / name}
    path = save_report(open_workspace(tmp_path / "ws"), "tagging_report", data)
    back = json.loads(path.read_bytes().decode("utf-8"))  # strict UTF-8: the file is valid
    assert back["captions"] == {name: "zorb"} and back["folder"] == str(folder / name)
    assert any(name in m for m in back["check"]["missing"])
    assert "zorb ü" in path.read_text(encoding="utf-8")


def test_report_json_turns_objects_with_to_dict_and_dataclasses_into_objects(tmp_path):
    check = check_caption_extension(TOY, ".txt")
    assert json.loads(report_json({"check": check}))["check"] == json.loads(json.dumps(check.to_dict()))


def test_extend_report_adds_keys_and_keeps_the_rest(tmp_path):
    path = tmp_path / "diagnosis.json"
    path.write_text(json.dumps({"verdict": "good", "epochs": [1, 2]}), encoding="utf-8")
    extend_report(path, {"experiments": {"underfit": {"verdict": "underfit"}}, "verdict": "good fit"})
    assert json.loads(path.read_text(encoding="utf-8")) == {
        "verdict": "good fit", "epochs": [1, 2], "experiments": {"underfit": {"verdict": "underfit"}}}
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(LoraNbError, match="JSON object"):
        extend_report(path, {"a": 1})


# --------------------------------------------------------------------------- find_pictures

def test_find_pictures_uses_the_folder_or_says_it_falls_back_to_the_bundled_set(tmp_path):
    env = make_env(tmp_path)
    folder, pictures, note = find_pictures(env, env.workspace.processed, "notebook 02 writes them")
    assert folder == TOY / "10_zorb" and len(pictures) == 48
    assert note.startswith(f"No pictures in {env.workspace.processed} (notebook 02 writes them): using the bundled")
    shutil.copytree(TOY / "10_zorb", env.workspace.processed)
    folder, pictures, note = find_pictures(env, env.workspace.processed)
    assert folder == env.workspace.processed and len(pictures) == 48 and note.startswith("48 picture(s) in")


# --------------------------------------------------------------------------- load_training_config

def test_training_config_falls_back_to_the_toy_preset_and_writes_it(tmp_path):
    ws = open_workspace(tmp_path / "ws")
    got = load_training_config(ws, dataset_dir=TOY)
    assert not got.from_file and got.path == ws.config and "does not exist: using the toy preset" in got.note
    cfg = got.config
    assert cfg.dataset.dir == str(TOY) and cfg.save.output_dir == str(ws.root)
    assert cfg.network.rank == preset("toy").network.rank
    assert Config.load(ws.config).to_yaml() == cfg.to_yaml()  # lora-nb train can use the same file
    again = load_training_config(ws, dataset_dir=tmp_path / "elsewhere")
    assert again.from_file and again.config.dataset.dir == str(TOY) and again.note == f"settings from {ws.config}"


def test_training_config_from_the_workspace_always_saves_into_the_workspace(tmp_path):
    ws = open_workspace(tmp_path / "ws")
    preset("realistic").with_overrides({"save.output_dir": "/somewhere/else", "network.rank": 24}).write_yaml(ws.config)
    got = load_training_config(ws, dataset_dir=TOY)
    assert got.from_file and got.config.network.rank == 24 and got.config.save.output_dir == str(ws.root)


def test_training_config_for_a_diagnosis_does_not_write_the_trainers_file(tmp_path):
    ws = open_workspace(tmp_path / "ws")
    got = load_training_config(ws, dataset_dir=TOY, default=ws.train_config,
                               fallback_overrides={"dataset.validation_split": 2}, write_fallback=False)
    assert not got.from_file and got.path is None and got.config.dataset.validation_split == 2
    assert not ws.train_config.exists() and not ws.config.exists()


def test_a_given_config_path_must_exist(tmp_path):
    ws = open_workspace(tmp_path / "ws")
    with pytest.raises(ConfigError, match="does not exist"):
        load_training_config(ws, "missing.yaml", base=tmp_path)
    assert not ws.config.exists()  # no toy preset written in its place
    preset("toy").with_overrides({"network.rank": 2}).write_yaml(tmp_path / "mine.yaml")
    got = load_training_config(ws, "mine.yaml", base=tmp_path)
    assert got.from_file and got.path == tmp_path / "mine.yaml" and got.config.network.rank == 2


def test_text_table_wraps_long_cells_in_their_column_and_cuts_nothing():
    from lora_nb.plots import text_table

    reason = "only the noisier half: with debiased estimation the quieter half carries little weight yet took half"
    out = text_table([{"setting": "timesteps", "why": reason}, {"setting": "rank", "why": "short"}], max_width=30)
    lines = out.splitlines()
    assert "…" not in out and len(lines) > 4 and all(len(line) <= len("timesteps") + 2 + 30 for line in lines)
    column = lines[0].index("why")
    assert " ".join(line[column:].strip() for line in lines[2:-1]) == reason  # every word, in order
    assert lines[-1].split() == ["rank", "short"]
