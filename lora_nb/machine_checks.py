"""What a hosted notebook (Colab, Kaggle) must know before any work: the GPU and its memory, bf16, free disk,
whether the Hugging Face hub answers, whether Drive is mounted — one line each, with what to do.

:func:`check_lines` turns facts into lines (every fact an argument, so it is tested on any machine);
:func:`gather_facts` reads them from this machine.
"""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

# what a base model takes on disk in fp16, with room for a few LoRA files and the latent cache
DISK_NEEDED_GIB = {"SD1.5": 6, "SDXL": 16}


@dataclass
class MachineFacts:
    platform: str  # "colab", "kaggle" or "local"
    gpu: str | None  # the GPU's name; None: no CUDA GPU
    gpu_gib: float | None
    bf16: bool | None
    free_gib: float
    hub: str  # "reachable", "offline" (HF_HUB_OFFLINE=1), "unreachable" or "not checked"
    drive: str  # "mounted", "not mounted" or "not asked"


def check_lines(f: MachineFacts) -> list[str]:
    """One line per fact, each saying what it means for training here."""
    if f.gpu:
        precision = "bf16 or fp16" if f.bf16 else "fp16 (this card has no bf16)"
        lines = [f"GPU: {f.gpu}, {f.gpu_gib:.1f} GiB · mixed precision {precision} · notebook 04 says which "
                 "memory savers this card needs"]
    else:
        lines = ["GPU: none · training runs on the CPU: the toy course is sized for it; SD1.5/SDXL need a GPU "
                 "(Colab: Runtime > Change runtime type > GPU; Kaggle: Settings > Accelerator)"]
    short = [name for name, gib in DISK_NEEDED_GIB.items() if f.free_gib < gib]
    lines.append(f"disk: {f.free_gib:.1f} GiB free" + (f" · too little for {' and '.join(short)} (about "
                 + ", ".join(f"{n} {DISK_NEEDED_GIB[n]} GiB" for n in short) + "): free some space" if short else ""))
    hub = {"reachable": "internet: the Hugging Face hub answers (hub ids load)",
           "offline": "internet: switched off (HF_HUB_OFFLINE=1): only local models and the toy model load",
           "not checked": "internet: not checked on a local machine"}
    if f.hub in hub:
        lines.append(hub[f.hub])
    elif f.platform == "kaggle":
        lines.append("internet: off · attach what you need under Input: the base model (a diffusers folder or a "
                     ".safetensors file) and lora-nb as datasets, then set model_source to its /kaggle/input/… path; "
                     "or switch Internet on in the notebook's settings")
    else:
        lines.append("internet: the Hugging Face hub does not answer: hub ids will not load; use a local model "
                     "folder or file (model_source), or the toy model")
    if f.drive == "mounted":
        lines.append("Drive: mounted · the workspace is on Google Drive: a disconnect loses nothing")
    elif f.drive == "not mounted":
        lines.append("Drive: asked for (use_drive) but not mounted · the workspace is on this machine's disk and is "
                     "lost when it disconnects")
    elif f.platform == "colab":
        lines.append("Drive: not used · the workspace is lost when Colab disconnects (set use_drive=True to keep it)")
    return lines


def hub_reachable(timeout: float = 2.0) -> str:
    """"offline" when HF_HUB_OFFLINE is set, else whether huggingface.co:443 answers within ``timeout``."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "offline"
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return "reachable"
    except OSError:
        return "unreachable"


def gather_facts(platform: str, workspace: Path, use_drive: bool, drive_mounted: bool) -> MachineFacts:
    """This machine's facts; the hub is probed on Colab and Kaggle only (a local run is not held up)."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if gpu else None
    bf16 = bool(torch.cuda.is_bf16_supported()) if gpu else None
    folder = Path(workspace)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free / 2**30
    hub = hub_reachable() if platform in ("colab", "kaggle") else "not checked"
    drive = ("mounted" if drive_mounted else "not mounted") if use_drive else "not asked"
    return MachineFacts(platform, gpu, gib, bf16, free, hub, drive)
