"""Full-size SD1.5 and SDXL architectures from their configurations, no download.

The configurations are the shipped ones single-file checkpoints are read with
(``lora_nb/model_configs/<family>/``, see :mod:`lora_nb.checkpoints`).

For what depends only on the architecture: LoRA module sets and file sizes
(built on the ``meta`` device, no memory), and speed/memory measurements on a
GPU (random weights: timing and memory do not depend on the weights' values).
"""

from __future__ import annotations

import torch

from lora_nb import checkpoints
from lora_nb.models import BaseModel


class _Parts:
    def __init__(self, **parts):
        self.__dict__.update(parts)


def build_architecture(family: str, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32,
                       with_vae: bool = False):
    """SD1.5 (``sd15``) or SDXL (``sdxl``) UNet and text encoder(s) with random weights on ``device``,
    as a :class:`lora_nb.models.BaseModel` (no tokenizers or scheduler: not a full pipeline).

    ``meta`` allocates nothing (for module shapes and file sizes).
    """
    if family not in ("sd15", "sdxl"):
        raise ValueError(f"family must be sd15 or sdxl, not {family!r}")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        parts = _build_parts(family, device, with_vae)
    finally:
        torch.set_default_dtype(previous)

    return BaseModel(_Parts(**parts), family, f"{family} architecture (random weights)")


def _build_parts(family: str, device, with_vae: bool) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = checkpoints.shipped_config_dir(family)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(checkpoints.read_config(folder, "unet"))
        te = CLIPTextModel(CLIPTextConfig.from_dict(checkpoints.read_config(folder, "text_encoder")))
        parts = dict(unet=unet, text_encoder=te)
        if family == "sdxl":
            te2 = CLIPTextConfig.from_dict(checkpoints.read_config(folder, "text_encoder_2"))
            parts["text_encoder_2"] = CLIPTextModelWithProjection(te2)
        if with_vae:
            parts["vae"] = AutoencoderKL.from_config(checkpoints.read_config(folder, "vae"))
    return parts
