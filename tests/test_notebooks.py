"""Every notebook: committed clean, parameters documented, same setup cell; 04 and 05 run headless."""

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill
import pytest

from lora_nb.config import Config

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
COMMON = ["workspace", "interactive", "seed", "use_drive", "quick"]


def run_notebook(name: str, tmp_path: Path, **params) -> nbformat.NotebookNode:
    out = tmp_path / f"executed-{name}"
    papermill.execute_notebook(str(ROOT / "notebooks" / name), str(out), parameters={"interactive": False, **params},
                               kernel_name="python3", cwd=str(ROOT / "notebooks"), progress_bar=False)
    return nbformat.read(out, as_version=4)


def printed(nb) -> str:
    return "\n".join("".join(o.get("text", "")) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def test_notebooks_exist_in_course_order():
    assert [p.name[:2] for p in NOTEBOOKS][:2] == ["01", "02"] or len(NOTEBOOKS) >= 2
    assert {"04_parameters.ipynb", "05_training.ipynb"} <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs_or_widget_state(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell.get("execution_count") is None
    assert "widgets" not in nb["metadata"]
    # nbformat 4.5 cells carry an id; without one, every run warns and future nbformat refuses the file.
    ids = [cell.get("id") for cell in nb["cells"]]
    assert None not in ids and len(set(ids)) == len(ids)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_help_notebook_lists_every_parameter_with_its_help(path):
    out = subprocess.run([sys.executable, "-m", "papermill", "--help-notebook", str(path)], capture_output=True,
                         text=True, check=True).stdout
    params = papermill.inspect_notebook(str(path))
    assert list(params)[:5] == COMMON
    nb = nbformat.read(path, as_version=4)
    source = next(c.source for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    declared = [line.split(":")[0] for line in source.splitlines() if line.strip() and not line.startswith("#")]
    assert list(params) == declared  # papermill skips lines it cannot parse (e.g. a second "=" in the help)
    for name, info in params.items():
        assert name in out and info["help"], f"{path.name}: parameter {name} has no help text"
        assert info["help"] in out.replace("\n", " ").replace("  ", " ") or info["help"][:30] in out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_parameters_cell_is_literal_only_and_setup_cell_is_shared(path):
    import ast

    nb = nbformat.read(path, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    for node in ast.parse(params[0].source).body:
        assert isinstance(node, ast.AnnAssign), ast.dump(node)
        ast.literal_eval(node.value)  # raises unless the value is a plain literal
    setup = nb.cells[nb.cells.index(params[0]) + 1].source
    reference = nbformat.read(ROOT / "notebooks" / "05_training.ipynb", as_version=4)
    ref_params = [c for c in reference.cells if "parameters" in c.metadata.get("tags", [])][0]
    assert setup == reference.cells[reference.cells.index(ref_params) + 1].source


def test_notebook_04s_worked_example_is_the_sum_the_toy_preset_prints():
    """The text's worked example uses the numbers the default course prints for the toy preset."""
    from lora_nb.config import preset
    from lora_nb.dataset import scan_dataset
    from lora_nb.planning import report_settings

    nb = nbformat.read(ROOT / "notebooks" / "04_parameters.ipynb", as_version=4)
    text = " ".join(" ".join(c.source.split()) for c in nb.cells if c.cell_type == "markdown")
    cfg = preset("toy")
    plan = report_settings(cfg, scan_dataset(cfg.dataset.dir)).plan
    assert (plan.steps_per_epoch, plan.total_steps) == (120, 1680)
    assert "48 pictures × repeat 10 = 480, paired = 960 samples, / batch 8 = 120 steps per epoch; × 14 epochs = 1,680" in text


@pytest.mark.slow
def test_notebook_04_reports_the_worked_example_for_the_realistic_preset(tmp_path):
    nb = run_notebook("04_parameters.ipynb", tmp_path, workspace=str(tmp_path / "ws"), preset="realistic",
                      repeats=10, epochs=10, save_every_n_epochs=2, measure_time=False,
                      gradient_checkpointing="yes", cache_latents_to_disk="no", lr_scheduler="rex",
                      optimizer="AdamWScheduleFree", network_type="locon", conv_rank=8, gradient_accumulation_steps=2)
    text = printed(nb)
    # the network types, each with its modules, parameters and size on the full-size SD1.5, and their settings
    from lora_nb.planning import NETWORK_SETTINGS

    table = [line.split() for line in text.splitlines() if line.split()[:1] in (["lora"], ["locon"], ["loha"],
                                                                                  ["lokr"])]
    assert [row[0] for row in table] == ["lora", "locon", "loha", "loha", "lokr", "lokr"]
    assert "full-size sd15, rank 64, fp16:" in text and table[1][1:3] == ["8", "350"]  # 264 + the 86 LoCon adds
    assert set(NETWORK_SETTINGS) <= {line.split()[0] for line in text.splitlines() if line.split()}
    # every noise, loss and caption option is listed with its value and help; the new schedule and optimizer run
    from lora_nb.planning import NOISE_LOSS_CAPTION_SETTINGS

    listed = {line.split()[0] for line in text.splitlines() if line.split()}
    assert set(NOISE_LOSS_CAPTION_SETTINGS) <= listed and "training.loss_type" in NOISE_LOSS_CAPTION_SETTINGS
    # so is every saving, logging, accumulation and precision option
    from lora_nb.planning import SAVE_AND_LOG_SETTINGS, SPEED_MEMORY_SETTINGS

    assert set(SAVE_AND_LOG_SETTINGS) | set(SPEED_MEMORY_SETTINGS) <= listed
    assert {"save.state_every_n_steps", "logging.wandb_project", "training.gradient_accumulation_steps",
            "training.full_precision_lora"} <= listed
    assert "AdamWScheduleFree replaces the schedule" in text  # the advice that goes with it, rex is no constant
    # the speed and memory section: each setting with its value and help, and what to do on this machine
    words = " ".join(text.split())
    assert "training.gradient_checkpointing True recompute activations" in words
    assert "dataset.cache_latents_to_disk False" in words and "optimizer.optimizer AdamWScheduleFree" in words
    assert "no CUDA GPU here" in text
    assert "48 images" in text
    assert ("steps per epoch: ceil(480 / batch 1) = 480 batches, 2 summed into each step: ceil(480 / 2) = 240 "
            "(effective batch 2)") in text
    assert "total steps: 240 × 10 epochs = 2400" in text
    assert "LoRA files saved: 5" in text
    report = json.loads((tmp_path / "ws" / "reports" / "parameters.json").read_text())
    assert (report["steps_per_epoch"], report["total_steps"], report["files_saved"]) == (240, 2400, 5)
    assert (tmp_path / "ws" / "config.yaml").exists() and (tmp_path / "ws" / "figures" / "04_lr_schedule.png").exists()
    saved = Config.load(tmp_path / "ws" / "config.yaml")
    assert saved.training.gradient_checkpointing is True and saved.dataset.cache_latents_to_disk is False
    assert (saved.network.type, saved.network.conv_rank) == ("locon", 8)
    assert saved.training.gradient_accumulation_steps == 2


def test_file_size_estimate_matches_full_size_sd15_files_written_for_ranks_32_64_128(tmp_path):
    """The estimate for a full-size SD1.5 architecture equals the size of the file really written
    (LoRA weights materialised on the CPU; the base weights stay on the meta device)."""
    import torch

    from lora_nb.archs import build_architecture
    from lora_nb.estimate import estimate_lora_file_size
    from lora_nb.lora_io import add_lora, save_lora

    for rank in (32, 64, 128):
        arch = build_architecture("sd15", "meta")
        est = estimate_lora_file_size(arch, rank, rank / 2, "kohya", True, "fp16", {"ss_epoch": "10"})
        add_lora(arch, rank, rank / 2, "kohya", train_text_encoder=True)
        for module in [arch.pipe.unet] + arch.text_encoders:
            for name, sub in module.named_modules():
                if name.endswith(("lora_A.default", "lora_B.default")):
                    sub.to_empty(device="cpu")
                    torch.nn.init.zeros_(sub.weight)
        path = save_lora(tmp_path / f"r{rank}.safetensors", arch, precision="fp16", metadata={"ss_epoch": "10"})
        assert abs(path.stat().st_size - est) / est < 0.01, (rank, path.stat().st_size, est)
        path.unlink()


@pytest.mark.slow
def test_notebook_06_diagnoses_the_run_and_prints_the_measured_experiments(tmp_path):
    from lora_nb.config import preset
    from lora_nb.models import toy_model_dir
    from lora_nb.train import train

    if not (toy_model_dir() / "model_index.json").exists():
        pytest.fail("the toy model is missing from data/toy-model")
    ws = tmp_path / "ws"
    train(preset("toy").with_overrides({"save.output_dir": str(ws), "training.max_steps": 120,
                                        "save.every_n_epochs": 2, "sample.every_n_epochs": 0}), progress=False)
    nb = run_notebook("06_diagnosis.ipynb", tmp_path, workspace=str(ws), quick=True, seeds=1, sample_steps=12,
                      live_remedy="underfit-higher-lr")
    text = printed(nb)
    diagnosis = json.loads((ws / "diagnosis.json").read_text())
    assert f"Verdict for this run: {diagnosis['verdict'].upper()}" in text
    runs = {row["run"].split(",")[0]: row for row in diagnosis["experiments"]}
    assert set(runs) == {"underfit run", "this run", "overfit run"}
    assert runs["underfit run"]["verdict"] == "underfit"  # labelled by the thresholds, with the reasons printed
    for row in diagnosis["experiments"]:
        assert f"{row['run']}: {row['verdict']}, because {row['because']}" in text
    chosen = next(e for e in diagnosis["epochs"] if e["epoch"] == diagnosis["recommended"]["epoch"])
    assert chosen["verdict"] != "overfit"  # the default run is not overfit at the epoch it recommends
    for e in diagnosis["epochs"]:  # zorbs with two eyes (apart or touching): some of those the fidelity counts, said beside it
        assert 0 <= e["images"]["two_eyes"] <= e["images"]["fidelity"]
        assert f"fidelity {e['images']['fidelity']:.0%} (two eyes {e['images']['two_eyes']:.0%})" in text
    live = diagnosis["live_remedies"]
    assert [r["run"] for r in live] == ["underfit-higher-lr"] and live[0]["conclusion"].startswith("one seed")
    assert "Rerun here (one training seed)" in text and "Committed table" in text
    assert "Rerun here (the baselines of section 6)" in text and "overfit (training seed 0), the table:" in text
    from lora_nb.remedies import concept_fingerprint  # a table measured on other concept pictures says so

    committed = json.loads((ROOT / "docs" / "remedies.json").read_text(encoding="utf-8"))
    stale = committed.get("concept") != concept_fingerprint(ROOT / "data" / "toy-concept")
    assert ("measured on other concept pictures" in text) == stale
    for fig in ("06_loss", "06_measures", "06_strength_grid", "06_fit_trio"):
        assert (ws / "figures" / f"{fig}.png").exists(), fig
    assert "DreamBooth checkpoint" in text


def test_file_size_estimate_matches_the_file_written_for_the_toy_model(tmp_path):
    """Notebook 04's estimate for the shipped toy model equals the size of the LoRA file really written."""
    from lora_nb.estimate import estimate_lora_file_size
    from lora_nb.lora_io import add_lora, save_lora
    from lora_nb.models import load_base_model

    model = load_base_model("toy")
    meta = {"ss_epoch": "24", "ss_tag_frequency": '{"10_zorb": {"zorb": 20}}'}
    est = estimate_lora_file_size(model, 8, 8.0, "kohya", True, "fp32", meta)
    add_lora(model, 8, 8.0, "kohya", train_text_encoder=True)
    path = save_lora(tmp_path / "toy.safetensors", model, precision="fp32", metadata=meta)
    assert abs(path.stat().st_size - est) / est < 0.01, (path.stat().st_size, est)
