"""Faults during training: nothing a crash, a NaN, a full GPU or a full disk does loses saved work.

Every test injects the fault into a real training run of the tiny SD1.5 model
(4 images, batch 2: two steps per epoch, one LoRA file and one resumable state
saved per epoch) and then checks what is on disk.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import kill_train_when_paused, make_config
from safetensors.torch import load_file

from lora_nb import LoraNbError, cli
from lora_nb.config import Config
from lora_nb.lora_io import inspect_lora
from lora_nb.models import load_base_model
from lora_nb.train import TrainingStopped, out_of_memory_advice, train
from lora_nb.workspace import Workspace

pytestmark = pytest.mark.slow


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in ("metrics.jsonl", Workspace(folder).lock.name)}


def _temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*.tmp")]


def _state(ws: Path) -> dict:
    return torch.load(ws / "state" / "training_state.pt", map_location="cpu", weights_only=True)


def _assert_every_lora_file_loads(ws: Path) -> list[str]:
    names = []
    for path in sorted((ws / "lora").glob("*.safetensors")):
        assert inspect_lora(path)["problems"] == [], path.name
        names.append(path.name)
    return names


class _Snapshot:
    """A ``_fault`` hook that records the workspace's files when step ``at`` begins, then runs ``then``."""

    def __init__(self, ws: Path, at: int, then=None):
        self.ws, self.at, self.then, self.files = ws, at, then, None

    def __call__(self, step: int) -> None:
        if step == self.at:
            self.files = _digests(self.ws)
            if self.then:
                self.then()


# --------------------------------------------------------------------------- non-finite values

@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0], ids=["clipping", "no-clipping"])
def test_an_infinite_gradient_stops_at_that_step_and_keeps_the_saved_files(
        fault_before_step, tiny_sd15_dir, tiny_dataset, tmp_path, max_grad_norm):
    """A gradient that turns inf (with or without gradient clipping) stops training before the optimizer
    step; the message names the step, the last good file and the causes with their fixes; the files
    saved after epoch 1 are byte-identical and the saved state holds no NaN."""
    ws = tmp_path / "ws"
    cfg = make_config(tiny_sd15_dir, tiny_dataset, ws, **{"training.epochs": 3,
                                                         "optimizer.max_grad_norm": max_grad_norm})
    model = load_base_model(tiny_sd15_dir)

    def poison_a_gradient():
        lora_b = next(p for n, p in model.pipe.unet.named_parameters() if "lora_B" in n)
        lora_b.register_hook(lambda g: torch.full_like(g, float("inf")))

    snap = _Snapshot(ws, at=2, then=poison_a_gradient)  # step 3 = first step of epoch 2
    with fault_before_step(snap), pytest.raises(TrainingStopped) as info:
        train(cfg, model=model, progress=False)
    message = str(info.value)
    assert "step 3: the gradients became NaN or infinite" in message
    assert "lora-e0001.safetensors" in message
    for cause in ("fp16", "bf16", "learning rate", "corrupt"):
        assert cause in message, cause
    assert _digests(ws) == snap.files  # nothing written or changed after the fault
    assert _assert_every_lora_file_loads(ws) == ["lora-e0001.safetensors"]
    state = _state(ws)
    assert (state["epoch"], state["step"]) == (1, 2)
    assert all(torch.isfinite(t).all() for t in state["lora"]["unet"].values())
    assert _temp_files(ws) == []


# --------------------------------------------------------------------------- out of memory

OOM_ORDER = ["training.gradient_checkpointing=true", "training.batch_size=1", "optimizer.optimizer=AdamW8bit",
             "training.mixed_precision=fp16", "optimizer.text_encoder_lr=0", "a smaller dataset.resolution"]


def test_gpu_out_of_memory_in_a_step_stops_with_the_memory_savers_in_order_and_resumes(
        fault_before_step, tiny_sd15_dir, tiny_dataset, tmp_path):
    """``torch.cuda.OutOfMemoryError`` raised inside the loop becomes TrainingStopped listing the memory
    savers from most to least effective; the epoch-1 files are untouched, and a rerun resumes from them."""
    ws = tmp_path / "ws"
    cfg = make_config(tiny_sd15_dir, tiny_dataset, ws, **{"training.epochs": 2})

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    snap = _Snapshot(ws, at=2, then=oom)
    with fault_before_step(snap), pytest.raises(TrainingStopped) as info:
        train(cfg, progress=False)
    message = str(info.value)
    assert "ran out of memory" in message and "Saved files are intact" in message
    positions = [message.index(tip) for tip in OOM_ORDER]
    assert positions == sorted(positions), message
    assert "Traceback" not in message and info.value.__cause__ is None
    assert _digests(ws) == snap.files and _temp_files(ws) == []

    result = train(cfg, progress=False)  # the same settings again: continues after epoch 1
    assert result.resumed_from_epoch == 1 and result.steps == 4
    assert _assert_every_lora_file_loads(ws) == ["lora-e0001.safetensors", "lora.safetensors"]


def test_out_of_memory_advice_only_lists_savers_not_already_in_use(tiny_sd15_dir, tiny_dataset, tmp_path):
    """Settings that already save memory are not suggested again; a smaller resolution or rank always is."""
    cfg = make_config(tiny_sd15_dir, tiny_dataset, tmp_path, **{
        "training.gradient_checkpointing": True, "training.batch_size": 1, "optimizer.optimizer": "AdamW8bit",
        "training.mixed_precision": "bf16", "optimizer.text_encoder_lr": 0})
    advice = out_of_memory_advice(cfg)
    for tip in OOM_ORDER[:-1]:
        assert tip not in advice
    assert "a smaller dataset.resolution than 64x64 or a lower network.rank" in advice


def test_out_of_memory_while_caching_latents_is_the_same_clear_stop(tiny_sd15_dir, tiny_dataset, tmp_path):
    """Out of memory before the first step (the VAE encoding the dataset, common with SDXL) gives the same
    TrainingStopped advice, not a CUDA traceback."""
    model = load_base_model(tiny_sd15_dir)

    def encode(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    model.pipe.vae.encode = encode
    cfg = make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "ws")
    with pytest.raises(TrainingStopped, match="ran out of memory"):
        train(cfg, model=model, progress=False)


# --------------------------------------------------------------------------- disk full

def test_disk_full_while_saving_names_the_file_and_keeps_the_older_files(
        fault_before_step, tiny_sd15_dir, tiny_dataset, tmp_path, monkeypatch):
    """The disk fills up during epoch 2 (every write fails with ENOSPC from then on): training stops with
    a message naming the file being written; the epoch-1 LoRA and state are byte-identical (a rerun
    resumes from them, as after any stop) and no temporary file is left behind."""
    ws = tmp_path / "ws"
    cfg = make_config(tiny_sd15_dir, tiny_dataset, ws)

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    snap = _Snapshot(ws, at=2, then=lambda: monkeypatch.setattr(os, "fsync", no_space))
    with fault_before_step(snap), pytest.raises(LoraNbError) as info:
        train(cfg, progress=False)
    message = str(info.value)
    assert "The disk is full while writing" in message and str(ws / "lora" / "lora.safetensors") in message
    assert "previous version of the file is intact" in message
    assert message.endswith("training resumes from the last saved state.")
    assert _digests(ws) == snap.files and _temp_files(ws) == []
    assert _state(ws)["epoch"] == 1


def test_a_full_disk_says_what_a_rerun_does_for_who_was_writing(tiny_sd15_dir, tiny_dataset, tmp_path, monkeypatch):
    """Without a saved state a rerun starts over, and the message says so instead of promising a resume; a
    full disk outside training (an import) promises nothing about training."""
    from lora_nb.fsutil import write_bytes_atomic
    from lora_nb.images import import_images

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    cfg = make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "ws", **{"save.save_state": False})
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(LoraNbError) as info:
        train(cfg, progress=False)
    assert "training starts over from step 0, because save.save_state is off" in str(info.value)
    assert "resumes" not in str(info.value)
    with pytest.raises(LoraNbError) as info:
        import_images(tiny_dataset / "2_sks", tmp_path / "imported", progress=False)
    assert "The disk is full while writing" in str(info.value) and "training" not in str(info.value)
    with pytest.raises(LoraNbError, match=r"and run it again\.$"):
        write_bytes_atomic(tmp_path / "x.bin", b"data")


def test_disk_full_while_replacing_the_training_state_keeps_the_previous_state(tmp_path, monkeypatch):
    """Overwriting an existing file on a full disk: the old version stays whole, the temp file goes."""
    from lora_nb.fsutil import write_bytes_atomic

    target = tmp_path / "state" / "training_state.pt"
    write_bytes_atomic(target, b"old complete state")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(LoraNbError, match=r"disk is full while writing .*training_state\.pt"):
        write_bytes_atomic(target, b"new state that does not fit")
    monkeypatch.undo()
    assert target.read_bytes() == b"old complete state"
    assert [p.name for p in target.parent.iterdir()] == ["training_state.pt"]


# --------------------------------------------------------------------------- killed process, interrupt

def _subprocess_env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def _lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _assert_same_lora(a: Path, b: Path) -> None:
    ta, tb = _lora_tensors(a), _lora_tensors(b)
    assert ta.keys() == tb.keys()
    worst = max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta)
    assert worst <= 1e-6, worst


def test_killed_while_replacing_the_state_then_rerun_resumes_to_the_uninterrupted_result(
        tiny_sd15_dir, tiny_dataset, tmp_path, capsys):
    """``lora-nb train`` in a subprocess, SIGKILLed after epoch 1 was saved, at the worst moment: epoch 2's
    state is completely written to its temp file but not yet renamed over epoch 1's (a test hook pauses
    there). On disk: every .safetensors loads, the state is epoch 1's, complete. The rerun clears the
    stale temp file, resumes after epoch 1 (LoRA, optimizer, LR schedule, step; the data order is seeded per
    epoch, each sample's noise by its place in the run) and ends with the LoRA an uninterrupted run with the
    same seed produces."""
    overrides = {"training.epochs": 3, "save.precision": "fp32"}
    ref = train(make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "reference", **overrides), progress=False)

    ws = tmp_path / "killed"
    cfg_path = make_config(tiny_sd15_dir, tiny_dataset, ws, **overrides).write_yaml(tmp_path / "train.yaml")
    kill_train_when_paused(cfg_path, _subprocess_env(LORA_NB_TEST_PAUSE_BEFORE_REPLACE="training_state.pt"))

    assert _assert_every_lora_file_loads(ws) == ["lora-e0001.safetensors", "lora-e0002.safetensors"]
    state = _state(ws)
    assert (state["epoch"], state["step"]) == (1, 2), "the state on disk is epoch 1's, complete"
    assert any(n.startswith(".training_state.pt.") for n in _temp_files(ws)), "killed mid-replace"
    epoch_1 = _lora_tensors(ws / "lora" / "lora-e0001.safetensors")

    capsys.readouterr()
    assert cli.main(["train", str(cfg_path)]) == 0  # the rerun: same command, in this process (saves a start-up)
    assert "Resuming after epoch 1 from the saved state." in capsys.readouterr().out
    assert _temp_files(ws) == []
    assert _assert_every_lora_file_loads(ws) == ["lora-e0001.safetensors", "lora-e0002.safetensors",
                                                 "lora.safetensors"]
    assert all(torch.equal(v, _lora_tensors(ws / "lora" / "lora-e0001.safetensors")[k]) for k, v in epoch_1.items())
    for name in ("lora-e0002.safetensors", "lora.safetensors"):
        _assert_same_lora(ws / "lora" / name, ref.workspace / "lora" / name)
    steps = [json.loads(l)["step"] for l in (ws / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert steps == [1, 2, 3, 4, 5, 6], "metrics of the killed epoch are replaced, not duplicated"


def test_ctrl_c_in_the_cli_says_what_is_kept_exits_130_and_the_rerun_continues(
        fault_before_step, tiny_sd15_dir, tiny_dataset, tmp_path, capsys):
    """A KeyboardInterrupt (Ctrl-C, a notebook's stop button) during epoch 2 of ``lora-nb train``: one
    message saying saved files are intact, exit status 130, no traceback; the rerun resumes after epoch 1.

    The interrupt is raised in the main thread at the first step of epoch 2 through the trainer's test seam
    (an interrupt sent from another thread can land in a destructor, where Python drops it)."""
    ws = tmp_path / "ws"
    cfg_path = make_config(tiny_sd15_dir, tiny_dataset, ws).write_yaml(tmp_path / "c.yaml")  # 2 epochs

    def ctrl_c_after_the_first_save(step):
        if step == 2:  # 4 images / batch 2: epoch 1 (steps 1-2) is saved
            raise KeyboardInterrupt

    with fault_before_step(ctrl_c_after_the_first_save):
        rc = cli.main(["train", str(cfg_path)])
    err = capsys.readouterr().err
    assert rc == 130
    assert "lora-nb: interrupted; files saved so far are intact, and a rerun continues from the last save." in err
    assert "Traceback" not in err
    assert _temp_files(ws) == [] and _state(ws)["epoch"] >= 1
    _assert_every_lora_file_loads(ws)

    assert cli.main(["train", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    assert "Resuming after epoch" in out
    assert "lora.safetensors" in _assert_every_lora_file_loads(ws)


def test_stale_temp_files_of_a_killed_run_are_removed_and_nothing_else(tmp_path):
    """What a killed save leaves (``.<name>.<random>.tmp``, ``.lora-save-*/``) is removed at the next start;
    complete files and the user's own files, hidden or not, stay."""
    import tempfile

    from lora_nb.fsutil import remove_stale_temp_files

    fd, stale = tempfile.mkstemp(prefix=".lora-e0002.safetensors.", suffix=".tmp", dir=tmp_path)
    os.close(fd)
    (tmp_path / ".lora-save-abc123").mkdir()
    (tmp_path / ".lora-save-abc123" / "lora.safetensors").write_bytes(b"partial")
    keep = ["lora-e0001.safetensors", "notes.tmp", ".hidden.tmp", "my.file.tmp", ".config"]
    for name in keep:
        (tmp_path / name).write_bytes(b"mine")
    removed = remove_stale_temp_files(tmp_path)
    assert sorted(p.name for p in removed) == sorted([Path(stale).name, ".lora-save-abc123"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


# --------------------------------------------------------------------------- one run per workspace

def _start_training(cfg_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lora_nb.cli", "train", str(cfg_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_subprocess_env())


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.05)


def test_a_second_training_in_the_same_workspace_is_refused_naming_the_first(tiny_sd15_dir, tiny_dataset, tmp_path):
    """Two ``lora-nb train`` in one workspace (here with different seeds): the second refuses at once with the
    holder's pid and how to proceed, and writes nothing; the first finishes with all its files intact."""
    ws = tmp_path / "ws"
    first = make_config(tiny_sd15_dir, tiny_dataset, ws, **{"training.epochs": 3}).write_yaml(tmp_path / "a.yaml")
    second = make_config(tiny_sd15_dir, tiny_dataset, ws, **{"training.seed": 7}).write_yaml(tmp_path / "b.yaml")
    proc = _start_training(first)
    _wait_for(Workspace(ws).lock, proc)
    refused = subprocess.run([sys.executable, "-m", "lora_nb.cli", "train", str(second)], capture_output=True,
                             text=True, env=_subprocess_env(), timeout=240)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert f"is in use: training by process {proc.pid}" in refused.stderr and "Traceback" not in refused.stderr
    assert "another save.output_dir" in refused.stderr
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert _assert_every_lora_file_loads(ws) == ["lora-e0001.safetensors", "lora-e0002.safetensors",
                                                 "lora.safetensors"]
    assert Config.load(ws / "train_config.yaml").training.seed == 42 and _state(ws)["epoch"] == 3
    assert not (ws / "previous").exists() and not Workspace(ws).lock.exists()


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_note(tiny_sd15_dir, tiny_dataset, tmp_path):
    ws = Workspace(tmp_path / "ws")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ws.root.mkdir()
    ws.lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "what": "training",
                                   "started": "2026-01-01 00:00:00", "command": "lora-nb train old.yaml"}))
    result = train(make_config(tiny_sd15_dir, tiny_dataset, ws.root, **{"training.epochs": 1}), progress=False)
    assert any(f"process {dead.pid}" in w and "taken over" in w for w in result.warnings)
    assert result.final.is_file() and not ws.lock.exists()


def test_sigterm_in_the_cli_is_handled_like_ctrl_c_exit_143(tiny_sd15_dir, tiny_dataset, tmp_path):
    ws = tmp_path / "ws"
    cfg_path = make_config(tiny_sd15_dir, tiny_dataset, ws, **{"training.epochs": 40}).write_yaml(tmp_path / "c.yaml")
    proc = _start_training(cfg_path)
    _wait_for(ws / "state" / "training_state.pt", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "lora-nb: terminated (SIGTERM); files saved so far are intact, and a rerun continues" in err
    assert "Traceback" not in err and not Workspace(ws).lock.exists()
    _assert_every_lora_file_loads(ws)
