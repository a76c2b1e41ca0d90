"""TensorBoard event files for a run (``logging.tensorboard``): what the trainers people use log there.

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


def chain(*listeners):
    """One event callable that hands each event to every listener in turn."""
    def emit(event) -> None:
        for listener in listeners:
            listener(event)
    return emit
