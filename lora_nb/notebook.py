"""What the notebooks share: the setup cell (environment report, paths, seeding), showing figures,
finding their inputs (pictures, dataset, training settings) and saving their reports.

Kept out of the core modules: it prints, and it knows about Colab/Kaggle.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from lora_nb import LoraNbError
from lora_nb.config import Config, ConfigError, preset
from lora_nb.folders import list_images
from lora_nb.fsutil import atomic_path, write_bytes_atomic
from lora_nb.machine_checks import check_lines, gather_facts
from lora_nb.plots import png_bytes
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


# Bars of loading steps that take well under a second and say nothing a learner can act on.
SILENT_BARS = ("Loading pipeline components", "Loading weights", "Loading checkpoint shards", "Fetching")


def summary_line(desc: str, n: int, total: int | None, elapsed: float) -> str | None:
    """The one line a headless bar leaves when it closes — ``"Caching latents: 20/20 in 0.4 s"`` — or None for
    a bar without a name (a sampler's steps) and for the loaders of :data:`SILENT_BARS`."""
    desc = (desc or "").strip().rstrip(":")
    if not desc or desc.startswith(SILENT_BARS):
        return None
    done = f"{n}/{total}" if total else f"{n}"
    return f"{desc}: {done} in {elapsed:.1f} s"


def use_summary_progress_bars(stream=None) -> None:
    """Make ``tqdm.auto`` (used by lora_nb, diffusers, transformers) draw nothing while it runs and print one
    :func:`summary_line` when a bar closes: an executed notebook keeps every redraw, so a headless run that
    drew its bars would bury the lesson under them. ``stream`` defaults to ``sys.stdout`` at print time.

    Takes effect for modules imported afterwards: call it before importing them.
    """
    import io

    import tqdm.auto
    import tqdm.std

    class SummaryBar(tqdm.std.tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["file"], kwargs["mininterval"] = io.StringIO(), float("inf")
            super().__init__(*args, **kwargs)

        def close(self):
            first = not self.disable and not getattr(self, "_summarised", False)
            line = summary_line(self.desc, self.n, self.total, self.format_dict["elapsed"]) if first else None
            self._summarised = True
            super().close()
            if line:
                print(line, file=stream or sys.stdout, flush=True)

    def summary_range(*args, **kwargs):
        return SummaryBar(range(*args), **kwargs)

    tqdm.auto.tqdm = SummaryBar
    tqdm.auto.trange = summary_range


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
    run (``interactive=False``) prints one line per long operation instead of
    progress bars, so executed notebooks carry no widget state and no redraws.
    """
    quiet_known_noise()
    if not interactive:
        use_summary_progress_bars()
    import numpy as np
    import torch

    plat = detect_platform()
    mounted = False
    if plat == "colab" and use_drive:
        from google.colab import drive  # type: ignore[import-not-found]

        drive.mount("/content/drive")
        mounted = Path("/content/drive/MyDrive").is_dir()
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
        if plat in ("colab", "kaggle"):  # what a hosted notebook must know before any work, one line each
            print("\n".join(check_lines(gather_facts(plat, ws.root, use_drive, mounted))))
    return env


def save_figure(fig_or_image, env: NotebookEnv, name: str):
    """Save a matplotlib figure or PIL image under the workspace's figures/ without displaying it (for a plot
    already on screen, such as the live training loss); returns the path."""
    return show(fig_or_image, env, name, display_it=False)


def show(fig_or_image, env: NotebookEnv | None = None, name: str | None = None, display_it: bool = True):
    """Display a matplotlib figure or PIL image inline, and save it under the workspace's figures/."""
    from IPython.display import display

    path = None
    if env is not None and name:
        path = env.workspace.figure(name)
        with atomic_path(path) as tmp:
            if hasattr(fig_or_image, "savefig"):
                tmp.write_bytes(png_bytes(fig_or_image))
            else:
                fig_or_image.save(tmp, format="PNG")
    if not display_it:
        return path
    if hasattr(fig_or_image, "savefig"):
        from IPython.display import Image as PngImage

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


def toy_concept_pictures(env: NotebookEnv) -> Path:
    """The bundled toy concept set (20 zorb pictures with captions): what a notebook uses when nothing came before."""
    return env.repo / "data" / "toy-concept" / "10_zorb"


def find_pictures(env: NotebookEnv, folder: str | Path, written_by: str = "") -> tuple[Path, list[Path], str]:
    """``(folder, its pictures, note)``: ``folder`` when it holds pictures, else the bundled toy concept set.
    The note is one line saying which (``written_by`` names what fills ``folder``, e.g. "notebook 01 imports them")."""
    folder = Path(folder)
    pictures = list_images(folder) if folder.is_dir() else []
    if pictures:
        return folder, pictures, f"{len(pictures)} picture(s) in {folder}"
    bundled = toy_concept_pictures(env)
    why = f" ({written_by})" if written_by else ""
    return bundled, list_images(bundled), f"No pictures in {folder}{why}: using the bundled {bundled}"


# --------------------------------------------------------------------------- reports

def _plain(data):
    """``data`` as JSON types: paths and bytes as text, sets and tuples as lists, numpy values as Python
    numbers, dataclasses and objects with ``to_dict()`` as dicts, every dict key as text."""
    if isinstance(data, dict):
        return {(k if isinstance(k, str) else str(_plain(k))): _plain(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_plain(v) for v in data]
    if isinstance(data, (set, frozenset)):
        return sorted((_plain(v) for v in data), key=str)
    if data is None or isinstance(data, (str, bool, int, float)):
        return data
    if isinstance(data, os.PathLike):
        return os.fspath(data)
    if isinstance(data, (bytes, bytearray)):
        return os.fsdecode(bytes(data))
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        return _plain(dataclasses.asdict(data))
    if hasattr(data, "to_dict"):
        return _plain(data.to_dict())
    if hasattr(data, "tolist"):  # numpy arrays and scalars, torch tensors
        return _plain(data.tolist())
    return str(data)


def report_json(data) -> bytes:
    """``data`` as indented UTF-8 JSON that never fails on a file name: names that are not valid UTF-8
    (which Python holds as lone surrogates, ``\\udcxx``) are written as JSON escapes, so the file stays
    valid UTF-8 and reads back to the same text; other non-ASCII names stay readable (``é``)."""
    text = json.dumps(_plain(data), indent=2, ensure_ascii=False)
    return text.encode("utf-8", errors="backslashreplace") + b"\n"


def save_report(workspace: Workspace, name: str, data) -> Path:
    """Write ``data`` as ``workspace.report(name)`` (``reports/<name>.json``), atomically: a reader sees the
    old report or the new one, never half. Returns the path."""
    name = str(name).removesuffix(".json")
    if not name or name in (".", "..") or any(c in name for c in "/\\"):
        raise LoraNbError(f"report name {name!r}: give a plain name such as 'dataset_report' (no folders).")
    return write_bytes_atomic(workspace.report(name), report_json(data))


def extend_report(path: str | Path, extra: dict) -> Path:
    """Add (or replace) the top-level keys of ``extra`` in the JSON file at ``path``, atomically (e.g. the
    experiments notebook 06 adds to ``diagnosis.json``). A missing file is created."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except (OSError, ValueError) as exc:
        raise LoraNbError(f"Cannot read {path} to add to it ({exc}): run the step that writes it again.") from None
    if not isinstance(data, dict):
        raise LoraNbError(f"{path} does not hold a JSON object: run the step that writes it again.")
    return write_bytes_atomic(path, report_json({**data, **extra}))


# --------------------------------------------------------------------------- training settings

@dataclass
class TrainingSettings:
    """The settings a notebook trains or diagnoses with, and where they came from."""

    config: Config
    path: Path | None  # the file they were read from, or written to (None: not written)
    from_file: bool  # False: the toy preset, because the file was missing
    note: str  # one line: where the settings came from


def load_training_config(workspace: Workspace, config_path: str | Path = "", dataset_dir: str | Path | None = None,
                         default: str | Path | None = None, base: str | Path | None = None,
                         fallback_overrides: dict | None = None, write_fallback: bool = True) -> TrainingSettings:
    """The training settings of ``workspace``, always saving into the workspace (``save.output_dir``).

    * ``config_path`` given: that file (relative paths are taken from ``base``); it must exist.
    * otherwise ``default`` (the workspace's ``config.yaml``) when it exists;
    * otherwise the toy preset on ``dataset_dir`` (the preset's own when None) with ``fallback_overrides``,
      written to ``default`` when ``write_fallback`` (so ``lora-nb train`` can use the same file).
    """
    out = {"save.output_dir": str(workspace.root)}
    if config_path:
        path = Path(config_path).expanduser()
        if not path.is_absolute() and base is not None:
            path = Path(base) / path
        if not path.is_file():
            raise ConfigError(f"config_path={str(config_path)!r}: {path} does not exist. Leave config_path empty "
                              f"to use the workspace's {workspace.config.name} (notebook 04 writes it).")
        return TrainingSettings(Config.load(path).with_overrides(out), path, True, f"settings from {path}")
    path = Path(default) if default else workspace.config
    if path.is_file():
        return TrainingSettings(Config.load(path).with_overrides(out), path, True, f"settings from {path}")
    overrides = {**({"dataset.dir": str(dataset_dir)} if dataset_dir else {}), **(fallback_overrides or {}), **out}
    cfg = preset("toy").with_overrides(overrides)
    note = f"{path} does not exist: using the toy preset on {cfg.dataset.dir}"
    if write_fallback:
        cfg.write_yaml(path)
        note += f" (written to {path})"
    return TrainingSettings(cfg, path if write_fallback else None, False, note)


def lora_file_lines(folder: str | Path) -> list[str]:
    """One line per LoRA file in ``folder``: name, size, rank, alpha, modules and any problem found."""
    from lora_nb.lora_io import inspect_lora  # imports torch and peft: only when asked

    lines = []
    for f in sorted(Path(folder).glob("*.safetensors")):
        info = inspect_lora(f)
        problems = "; ".join(info["problems"]) or "no problems"
        lines.append(f"{f.name:<28} {info['size_bytes'] / 1e6:7.2f} MB  rank {info['rank']}  alpha {info['alpha']}  "
                     f"modules {info['modules_total']}  {problems}")
    return lines
