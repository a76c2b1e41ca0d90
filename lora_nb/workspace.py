"""The folder layout of one LoRA project (a workspace).

```
<root>/
  source/                 what the user imported (originals are never modified)
  processed/              cropped images (notebook 02)
  dataset/<R>_<concept>/  processed images + captions (kohya convention, R = repeats)
  regularization/         optional class images
  course.yaml             the learner's run settings, shared by every notebook
  config.yaml             every training setting (notebook 04 → 05)
  train_config.yaml       the settings the last training really ran with (written by the trainer)
  lora/                   LoRA files: <name>-e0002.safetensors …, <name>.safetensors (and <name>-step00000120 …)
  samples/                preview images per epoch
  metrics.jsonl           one line per step / epoch
  state/                  resumable training state
  previous/<time>/        an earlier run's LoRA files, metrics, samples and state, moved here when a run
                          with other settings starts in this workspace (nothing is overwritten)
  cache/latents/          VAE latents kept between runs (dataset.cache_latents_to_disk)
  experiments/<name>/     notebook 06's experiment runs (one workspace each)
  reports/                JSON reports of each notebook (dataset_report.json, …)
  figures/                figures saved by headless runs
  executed/               executed notebooks of `lora-nb course`
  diagnosis.json
```
Every notebook reads the workspace the previous one wrote, so any notebook can
be rerun alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def source(self) -> Path:
        return self.root / "source"

    @property
    def processed(self) -> Path:
        return self.root / "processed"

    @property
    def dataset(self) -> Path:
        return self.root / "dataset"

    @property
    def regularization(self) -> Path:
        return self.root / "regularization"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def train_config(self) -> Path:
        """The settings the last training ran with (the trainer writes it; diagnosis reads it)."""
        return self.root / "train_config.yaml"

    @property
    def course_settings(self) -> Path:
        return self.root / "course.yaml"

    @property
    def logs(self) -> Path:
        """TensorBoard event files (``logging.tensorboard``)."""
        return self.root / "logs"

    @property
    def previous(self) -> Path:
        return self.root / "previous"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def experiments(self) -> Path:
        """Notebook 06's experiment runs, one sub-workspace each."""
        return self.root / "experiments"

    @property
    def lock(self) -> Path:
        return self.root / ".lora-nb.lock"

    @property
    def lora(self) -> Path:
        return self.root / "lora"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def executed(self) -> Path:
        return self.root / "executed"

    @property
    def diagnosis(self) -> Path:
        return self.root / "diagnosis.json"

    def lora_file(self, name: str, fmt: str = "kohya") -> Path:
        """``lora/<name>.safetensors`` (kohya) or ``lora/<name>.diffusers.safetensors``."""
        return self.lora / (f"{name}.safetensors" if fmt == "kohya" else f"{name}.diffusers.safetensors")

    def epoch_name(self, output_name: str, epoch: int) -> str:
        """The name of an intermediate save: ``<name>-e0002``."""
        return f"{output_name}-e{epoch:04d}"

    def step_name(self, output_name: str, step: int) -> str:
        """The name of a save inside an epoch (``save.every_n_steps``): ``<name>-step00000120``."""
        return f"{output_name}-step{step:08d}"

    def sample_image(self, epoch: int, index: int) -> Path:
        return self.samples / f"e{epoch:04d}-p{index:02d}.png"

    def report(self, name: str) -> Path:
        """``reports/<name>.json`` (a notebook's report; ``name`` without the extension)."""
        return self.reports / f"{name}.json"

    def figure(self, name: str) -> Path:
        return self.figures / f"{name}.png"

    @property
    def run_files(self) -> tuple[Path, ...]:
        """What one training run writes besides its LoRA files (moved together to ``previous/``)."""
        return (self.metrics, self.train_config, self.samples, self.state)


def repo_root() -> Path:
    """The folder that holds the ``lora_nb`` package, ``data/`` and ``notebooks/`` (a clone of the project)."""
    return Path(__file__).resolve().parents[1]


def repo_data_dir() -> Path:
    """The project's bundled ``data/`` folder (the toy model and datasets)."""
    return repo_root() / "data"


def open_workspace(path: str | Path, base: str | Path | None = None) -> Workspace:
    """The workspace at ``path`` (relative paths are taken from ``base``), created if needed."""
    p = Path(path).expanduser()
    if not p.is_absolute() and base is not None:
        p = Path(base) / p
    p.mkdir(parents=True, exist_ok=True)
    return Workspace(p.resolve())
