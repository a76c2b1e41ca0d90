"""Shared fixtures. The whole suite runs offline: hub access is switched off here."""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread: on a shared 2-core machine (CI, notebooks running beside the
# suite) two threads per process oversubscribe the cores and run many times slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory):
    """A tiny random SD1.5-architecture pipeline saved in diffusers format."""
    from lora_nb.models import build_tiny_sd15

    return build_tiny_sd15(tmp_path_factory.mktemp("tiny-sd15"))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A tiny random SDXL-architecture pipeline (two text encoders) saved in diffusers format."""
    from lora_nb.models import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """Four 64×64 images of coloured squares with booru-style captions, kohya layout ``2_sks``."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("dataset")
    folder = root / "2_sks"
    folder.mkdir()
    rng = np.random.default_rng(0)
    colours = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
    for i, (name, rgb) in enumerate(colours.items()):
        a = np.full((64, 64, 3), 128, np.uint8)
        x, y = rng.integers(4, 36, 2)
        a[y:y + 24, x:x + 24] = rgb
        Image.fromarray(a).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"{name} square, gray background", encoding="utf-8")
    return root


def make_config(model_dir, dataset_dir, workspace, **overrides):
    """A small, fast training config for tests."""
    from lora_nb.config import preset

    cfg = preset("toy")
    cfg.model.source = str(model_dir)
    cfg.dataset.dir = str(dataset_dir)
    cfg.dataset.trigger_word = "sks"
    cfg.dataset.repeats = 1
    cfg.dataset.reg_dir = ""  # the toy preset's regularization circles are for the toy model
    cfg.dataset.validation_dir = ""  # so are its held-out zorbs
    cfg.training.batch_size = 2
    cfg.training.epochs = 2
    cfg.optimizer.optimizer = "AdamW"
    cfg.optimizer.lr_warmup_steps = 0
    cfg.sample.every_n_epochs = 0
    cfg.save.output_dir = str(workspace)
    cfg.save.every_n_epochs = 1
    return cfg.with_overrides(overrides) if overrides else cfg


@pytest.fixture
def captions_seen(monkeypatch):
    """The caption strings that reach the text encoder during training (a spy on ``encode_prompts``)."""
    from lora_nb import steps as steps_module

    seen: list[str] = []
    original = steps_module.encode_prompts

    def spy(model, captions, *args, **kwargs):
        seen.extend(captions)
        return original(model, captions, *args, **kwargs)

    monkeypatch.setattr(steps_module, "encode_prompts", spy)
    return seen


@pytest.fixture
def fault_before_step(monkeypatch):
    """``with fault_before_step(hook):`` makes ``hook(step)`` the trainer's test seam
    (:func:`lora_nb.train.before_step`) for the block: it runs before every training step with the number of
    steps done, so a test can poison a tensor or fail at a chosen step."""
    import contextlib

    from lora_nb import train as train_module

    @contextlib.contextmanager
    def installed(hook):
        original = train_module.before_step
        monkeypatch.setattr(train_module, "before_step", hook)
        try:
            yield hook
        finally:
            monkeypatch.setattr(train_module, "before_step", original)

    return installed


NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def kill_train_when_paused(cfg_path, env: dict) -> str:
    """Run ``lora-nb train cfg_path`` in a subprocess with ``env`` (which sets the file-replacement pause hook of
    :mod:`lora_nb.fsutil`), SIGKILL it the moment it says it paused, and return its stderr so far."""
    import signal
    import subprocess
    import sys
    import threading

    proc = subprocess.Popen([sys.executable, "-m", "lora_nb.cli", "train", str(cfg_path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    paused, seen = threading.Event(), []

    def watch():
        for line in proc.stderr:
            seen.append(line)
            if "lora-nb test hook: paused before replacing" in line:
                paused.set()

    threading.Thread(target=watch, daemon=True).start()
    try:
        assert paused.wait(timeout=240), "".join(seen)[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    return "".join(seen)


def code_cells(path: Path) -> tuple[list[str], int]:
    """The source of every code cell, and the index (among them) of the setup cell."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    params = next(i for i, c in enumerate(cells) if "parameters" in c["metadata"].get("tags", []))
    return ["".join(c["source"]) for c in cells], params + 1
