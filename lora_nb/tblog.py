"""TensorBoard event files (``logging.tensorboard``) and Weights & Biases (``logging.wandb_project``) for a run:
what the trainers people use log there.

The trainer's :class:`lora_nb.train.Event` stream is written as it comes: each step's loss and learning rate
per parameter group, each epoch's mean training loss and validation loss, and the preview images. The
workspace's ``metrics.jsonl`` stays the course's own record; this is for TensorBoard's views
(``%tensorboard --logdir <workspace>/logs`` in Colab or Jupyter).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class TensorBoardLog:
    """A callable for the trainer's events that writes them with ``torch.utils.tensorboard``."""

    def __init__(self, folder: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency; a partial install is named with its fix
            from lora_nb import LoraNbError

            raise LoraNbError("logging.tensorboard needs the tensorboard package: pip install tensorboard "
                              "(or set logging.tensorboard to false).") from None
        self.writer = SummaryWriter(str(folder))

    def __call__(self, event) -> None:
        d = event.data or {}
        if event.kind == "step":
            self.writer.add_scalar("loss/step", d["loss"], event.step)
            for group, lr in d.get("lr", {}).items():
                self.writer.add_scalar(f"lr/{group}", lr, event.step)
        elif event.kind == "epoch":
            for key in ("train_loss", "val_loss"):
                if d.get(key) is not None:
                    self.writer.add_scalar(f"loss/{key}", d[key], event.step)
        elif event.kind == "sample":
            from PIL import Image

            for path in d.get("paths", []):
                image = np.asarray(Image.open(path).convert("RGB"))
                prompt = Path(path).stem.split("-")[-1]  # e0002-p01.png: prompt 01 at epoch 2
                self.writer.add_image(f"samples/{prompt}", image, event.step, dataformats="HWC")
        elif event.kind == "done":
            self.writer.close()
            return
        if event.kind != "step":
            self.writer.flush()


class WandbLog:
    """A callable for the trainer's events that logs them to a Weights & Biases run of ``project`` (the same
    values as :class:`TensorBoardLog`; ``WANDB_MODE=offline`` keeps them in local files for a later
    ``wandb sync``)."""

    def __init__(self, project: str, folder: str | Path, config: dict):
        try:
            import wandb
        except ImportError:
            from lora_nb import LoraNbError

            raise LoraNbError("logging.wandb_project needs the wandb package: pip install wandb, then wandb login "
                              "(or leave the setting empty).") from None
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(project=project, dir=str(folder), config=config, reinit="finish_previous")

    def __call__(self, event) -> None:
        d = event.data or {}
        if event.kind == "step":
            self.run.log({"loss/step": d["loss"], **{f"lr/{g}": lr for g, lr in d.get("lr", {}).items()}},
                         step=event.step)
        elif event.kind == "epoch":
            values = {f"loss/{k}": d[k] for k in ("train_loss", "val_loss") if d.get(k) is not None}
            if values:
                self.run.log(values, step=event.step)
        elif event.kind == "sample":
            self.run.log({f"samples/{Path(p).stem.split('-')[-1]}": self.wandb.Image(p) for p in d.get("paths", [])},
                         step=event.step)
        elif event.kind == "done":
            self.run.finish()


def chain(*listeners):
    """One event callable that hands each event to every listener in turn."""
    def emit(event) -> None:
        for listener in listeners:
            listener(event)
    return emit
