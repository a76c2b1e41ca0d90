"""What every notebook's setup cell calls: environment report, paths, seeding.

Kept out of the core modules: it prints, and it knows about Colab/Kaggle.
"""

from __future__ import annotations

import logging
import os
import platform
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from lora_nb.workspace import Workspace, open_workspace


@dataclass
class NotebookEnv:
    workspace: Workspace
    repo: Path
    device: str
    platform: str  # "colab", "kaggle" or "local"
    gpu: str | None

    def path(self, p: str | Path) -> Path:
        """A path from a parameter: absolute as is; relative paths are taken from the repository root."""
        p = Path(p).expanduser()
        return p if p.is_absolute() else (self.repo / p)


def use_text_progress_bars(min_interval: float = 5.0) -> None:
    """Make ``tqdm.auto`` (used by lora_nb, diffusers, transformers) print text bars instead of widgets,
    redrawn at most every ``min_interval`` seconds (an executed notebook keeps every redraw: a
    1,200-step run at tqdm's default 0.1 s would leave thousands of lines in it).

    Takes effect for modules imported afterwards: call it before importing them.
    """
    import tqdm.auto
    import tqdm.std

    class TextBar(tqdm.std.tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("mininterval", min_interval)
            super().__init__(*args, **kwargs)

    def text_range(*args, **kwargs):
        return TextBar(range(*args), **kwargs)

    tqdm.auto.tqdm = TextBar
    tqdm.auto.trange = text_range


# Messages libraries print on import that say nothing about lora-nb's work: (logger, part of the message).
KNOWN_NOISE = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),  # 4-bit CPU kernels: never used here
    ("transformers.utils.import_utils", "requires torchvision (not installed); falling back"),  # image processors
)


class _DropMessage(logging.Filter):
    def __init__(self, part: str):
        super().__init__()
        self.part = part

    def filter(self, record: logging.LogRecord) -> bool:
        return self.part not in record.getMessage()


def quiet_known_noise() -> None:
    """Drop the known, harmless import-time messages of :data:`KNOWN_NOISE` (every other message stays)."""
    for name, part in KNOWN_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.part == part for f in logger.filters):
            logger.addFilter(_DropMessage(part))


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def detect_platform() -> str:
    if "google.colab" in sys.modules or os.environ.get("COLAB_RELEASE_TAG"):
        return "colab"
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE"):
        return "kaggle"
    return "local"


def setup_notebook(workspace: str, seed: int = 42, use_drive: bool = False, interactive: bool = True,
                   quiet: bool = False) -> NotebookEnv:
    """Pick the device, seed, open the workspace and print what this notebook runs on.

    On Colab with ``use_drive`` the workspace lives on Google Drive, so a
    disconnect loses nothing and training resumes from the last save. A headless
    run (``interactive=False``) uses text progress bars, so executed notebooks
    carry no widget state.
    """
    quiet_known_noise()
    if not interactive:
        use_text_progress_bars()
    import numpy as np
    import torch

    plat = detect_platform()
    if plat == "colab" and use_drive:
        from google.colab import drive  # type: ignore[import-not-found]

        drive.mount("/content/drive")
        workspace = str(Path("/content/drive/MyDrive/lora-nb") / workspace)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    device = "cuda" if gpu else "cpu"
    ws = open_workspace(workspace, base=repo_root())
    env = NotebookEnv(ws, repo_root(), device, plat, gpu)
    if not quiet:
        import diffusers
        import transformers

        print(f"lora-nb on {plat} · Python {platform.python_version()} · torch {torch.__version__} · "
              f"diffusers {diffusers.__version__} · transformers {transformers.__version__}")
        print(f"device: {gpu or f'CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)'}")
        print(f"workspace: {ws.root}")
    return env


def show(fig_or_image, env: NotebookEnv | None = None, name: str | None = None):
    """Display a matplotlib figure or PIL image inline, and save it under the workspace's figures/."""
    from IPython.display import display

    if env is not None and name:
        from lora_nb.fsutil import atomic_path

        path = env.workspace.figures / f"{name}.png"
        with atomic_path(path) as tmp:
            if hasattr(fig_or_image, "savefig"):
                from lora_nb.plots import png_bytes

                tmp.write_bytes(png_bytes(fig_or_image))
            else:
                fig_or_image.save(tmp, format="PNG")
    if hasattr(fig_or_image, "savefig"):
        from IPython.display import Image as PngImage

        from lora_nb.plots import png_bytes

        display(PngImage(data=png_bytes(fig_or_image)))
        return
    display(fig_or_image)


def find_dataset(env: NotebookEnv, dataset_dir: str = "") -> Path:
    """The dataset a notebook works on: ``dataset_dir`` when given, else the workspace's
    ``dataset/`` when notebooks 01–03 filled it, else the bundled toy concept set."""
    if dataset_dir:
        return env.path(dataset_dir)
    ws_dataset = env.workspace.dataset
    if ws_dataset.is_dir() and any(p.is_dir() for p in ws_dataset.iterdir()):
        return ws_dataset
    return env.repo / "data" / "toy-concept"
