"""The state of a training run in its workspace: the settings fingerprint, the resumable state file,
an earlier run moved out of the way, and the metrics a resumed run rewrites.

A run resumes only from a state written with the same result-changing settings (:func:`config_fingerprint`);
a fresh start with other settings first moves the earlier run's files to ``previous/<time>/``
(:func:`archive_previous_run`), so nothing is ever overwritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch

from lora_nb import LoraNbError
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
               train_te: bool, epoch_step: int = 0) -> None:
    """Everything needed to continue after ``epoch`` (and ``epoch_step`` optimizer steps into the next one, for a
    state saved inside an epoch), written atomically (one file). The global random state goes with it: the
    LoRA's dropout draws from it, and a resumed run must draw what the uninterrupted one did."""
    from peft.utils import get_peft_model_state_dict

    lora = {"unet": get_peft_model_state_dict(model.pipe.unet)}
    if train_te:
        for i, te in enumerate(model.text_encoders):
            lora[f"text_encoder_{i}"] = get_peft_model_state_dict(te)
    state = {"fingerprint": fingerprint, "epoch": epoch, "step": step, "epoch_step": epoch_step, "lora": lora,
             "optimizer": optimizer.state_dict(), "scheduler": lr_scheduler.state_dict(),
             "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    buffer = io.BytesIO()  # serialised in memory, written by Python: a full disk is an OSError, not a RuntimeError
    torch.save(state, buffer)
    write_bytes_atomic(ws.state / STATE_FILE, buffer.getvalue())


def load_state(ws: Workspace, fingerprint: str, model, optimizer, lr_scheduler, train_te: bool):
    """Restore the last saved state when it belongs to these settings; return (epoch, step, epoch_step) or None."""
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
    if "torch_rng" in state:
        torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") and torch.cuda.is_available() and len(state["cuda_rng"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["epoch"], state["step"], state.get("epoch_step", 0)


def epoch_losses(metrics: Path, epoch: int) -> list[float]:
    """The step losses already recorded for ``epoch`` (a run resumed inside it averages them with the rest)."""
    return [rec["loss"] for _, rec in _metric_lines(metrics) if rec.get("epoch") == epoch and "loss" in rec]


def _metric_lines(path: Path) -> list[tuple[str, dict]]:
    """``(line, record)`` for each readable line of a metrics file (a line cut by a kill is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError:
            continue
    return out


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
    keep = [line for line, rec in _metric_lines(path) if rec.get("step", 0) <= last_step and last_step > 0]
    write_text_atomic(path, "".join(l + "\n" for l in keep))


# --------------------------------------------------------------------------- one run per workspace

class WorkspaceBusy(LoraNbError):
    """Another process is training (or running experiments) in this workspace."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def read_lock(ws: Workspace) -> dict | None:
    """Who holds the workspace (pid, host, started, command, what), or None when nobody does."""
    try:
        return json.loads(ws.lock.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # half-written or foreign: treated as stale below


@contextlib.contextmanager
def hold_workspace(ws: Workspace, what: str = "training", notes: list[str] | None = None,
                   elsewhere: str = "another save.output_dir"):
    """Hold ``ws`` for one run: a second start (another process, a second notebook kernel) is refused
    with :class:`WorkspaceBusy` naming the holder. A lock left by a process that no longer runs is taken
    over, with a line in ``notes``. The lock file (``Workspace.lock``) is removed when the block ends.
    ``elsewhere`` is the setting that gives another folder (the message's way out)."""
    ws.root.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
          "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv) or what}
    while True:
        try:
            fd = os.open(ws.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_lock(ws)
            if holder is None:
                continue  # released in between: try again
            if holder.get("pid") and holder.get("host") == me["host"] and _pid_alive(int(holder["pid"])):
                raise WorkspaceBusy(
                    f"{ws.root} is in use: {holder.get('what', 'a run')} by process {holder['pid']} started "
                    f"{holder.get('started', '?')} ({holder.get('command', '?')}). Wait for it to finish (or stop it), "
                    f"or use {elsewhere}. If no such process runs, delete {ws.lock}.") from None
            with contextlib.suppress(FileNotFoundError):
                os.remove(ws.lock)
            if notes is not None:
                notes.append(f"{ws.lock.name}: the earlier holder (process {holder.get('pid', '?')}, "
                             f"{holder.get('started', '?')}) no longer runs; its lock was taken over.")
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(me, fh)
        break
    try:
        yield
    finally:
        if (read_lock(ws) or {}).get("pid") == me["pid"]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(ws.lock)
