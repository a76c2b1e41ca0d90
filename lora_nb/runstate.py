"""The state of a training run in its workspace: the settings fingerprint, the resumable state file,
an earlier run moved out of the way, and the metrics a resumed run rewrites.

A run resumes only from a state written with the same result-changing settings (:func:`config_fingerprint`);
a fresh start with other settings first moves the earlier run's files to ``previous/<time>/``
(:func:`archive_previous_run`), so nothing is ever overwritten.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from pathlib import Path

import torch

from lora_nb.config import Config
from lora_nb.fsutil import write_bytes_atomic, write_text_atomic
from lora_nb.workspace import Workspace

STATE_FILE = "training_state.pt"


def config_fingerprint(cfg: Config) -> str:
    """Hash of the settings that change the result (not epochs/sample/save cadence)."""
    d = cfg.to_dict()
    d["training"] = {k: v for k, v in d["training"].items() if k not in ("epochs", "max_steps")}
    d.pop("sample")
    d["save"] = {}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def save_state(ws: Workspace, fingerprint: str, model, optimizer, lr_scheduler, epoch: int, step: int,
               train_te: bool) -> None:
    """Everything needed to continue after ``epoch``, written atomically (one file)."""
    from peft.utils import get_peft_model_state_dict

    lora = {"unet": get_peft_model_state_dict(model.pipe.unet)}
    if train_te:
        for i, te in enumerate(model.text_encoders):
            lora[f"text_encoder_{i}"] = get_peft_model_state_dict(te)
    state = {"fingerprint": fingerprint, "epoch": epoch, "step": step, "lora": lora,
             "optimizer": optimizer.state_dict(), "scheduler": lr_scheduler.state_dict()}
    buffer = io.BytesIO()  # serialised in memory, written by Python: a full disk is an OSError, not a RuntimeError
    torch.save(state, buffer)
    write_bytes_atomic(ws.state / STATE_FILE, buffer.getvalue())


def load_state(ws: Workspace, fingerprint: str, model, optimizer, lr_scheduler, train_te: bool):
    """Restore the last saved state when it belongs to these settings; return (epoch, step) or None."""
    from peft.utils import set_peft_model_state_dict

    path = ws.state / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - an unreadable state is ignored, training starts over
        return None
    if state.get("fingerprint") != fingerprint:
        return None
    set_peft_model_state_dict(model.pipe.unet, state["lora"]["unet"])
    if train_te:
        for i, te in enumerate(model.text_encoders):
            set_peft_model_state_dict(te, state["lora"][f"text_encoder_{i}"])
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["scheduler"])
    return state["epoch"], state["step"]


def archive_previous_run(ws: Workspace, output_name: str, fingerprint: str) -> Path | None:
    """Move an earlier run's results out of the way when its settings differ from this run's.

    A fresh start in a workspace that holds LoRA files (or metrics) of a run with *other* settings
    would overwrite them; they are moved to ``previous/<time>/`` instead. The same settings started
    over (``--restart``, notebook 06's experiments) simply replace their own files. Returns the
    folder they went to, or None when nothing was moved.
    """
    loras = sorted(ws.lora.glob(f"{output_name}*.safetensors"))
    if not loras and not (ws.metrics.is_file() and ws.metrics.stat().st_size):
        return None
    try:
        same = config_fingerprint(Config.load(ws.train_config)) == fingerprint
    except Exception:  # noqa: BLE001 - no readable settings: treat as another run and keep its files
        same = False
    if same:
        return None
    dest = ws.previous / time.strftime("%Y%m%d-%H%M%S")
    while dest.exists():
        dest = dest.with_name(dest.name + "-1")
    (dest / ws.lora.name).mkdir(parents=True)
    for f in loras:
        os.replace(f, dest / ws.lora.name / f.name)
    for path in ws.run_files:
        if path.exists():
            os.replace(path, dest / path.name)
    return dest


def trim_metrics(path: Path, last_step: int) -> None:
    """Keep only the metric lines up to ``last_step`` (a resumed run rewrites what came after)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("step", 0) <= last_step and last_step > 0:
            keep.append(line)
    write_text_atomic(path, "".join(l + "\n" for l in keep))
