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
        for name, value in event_scalars(event).items():
            self.writer.add_scalar(name, value, event.step)
        if event.kind == "sample":
            from PIL import Image

            for tag, path in sample_tags(event).items():
                self.writer.add_image(tag, np.asarray(Image.open(path).convert("RGB")), event.step, dataformats="HWC")
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
        values = event_scalars(event)
        if event.kind == "sample":
            values = {tag: self.wandb.Image(path) for tag, path in sample_tags(event).items()}
        if values:
            self.run.log(values, step=event.step)
        if event.kind == "done":
            self.run.finish()


def event_scalars(event) -> dict[str, float]:
    """The values both logs record for an event: a step's loss and each parameter group's LR, an epoch's mean
    training loss and validation loss."""
    d = event.data or {}
    if event.kind == "step":
        return {"loss/step": d["loss"], **{f"lr/{group}": lr for group, lr in d.get("lr", {}).items()}}
    if event.kind == "epoch":
        return {f"loss/{key}": d[key] for key in ("train_loss", "val_loss") if d.get(key) is not None}
    return {}


def sample_tags(event) -> dict[str, str]:
    """``{"samples/p01": path, …}`` for a sample event: e0002-p01.png is prompt 01 at epoch 2."""
    return {f"samples/{Path(path).stem.split('-')[-1]}": path for path in (event.data or {}).get("paths", [])}


def chain(*listeners):
    """One event callable that hands each event to every listener in turn."""
    def emit(event) -> None:
        for listener in listeners:
            listener(event)
    return emit
