"""Full-size SD1.5 and SDXL architectures from their configurations, no download.

For what depends only on the architecture: LoRA module sets and file sizes
(built on the ``meta`` device, no memory), and speed/memory measurements on a
GPU (random weights: timing and memory do not depend on the weights' values).
"""

from __future__ import annotations

import torch

from lora_nb.models import BaseModel

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768, attention_head_dim=8,
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, cross_attention_dim=2048,
                 attention_head_dim=[5, 10, 20], block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
           layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)


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

    with torch.device(device):
        unet = UNet2DConditionModel(**(SD15_UNET if family == "sd15" else SDXL_UNET))
        te = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        parts = dict(unet=unet, text_encoder=te)
        if family == "sdxl":
            parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))
        if with_vae:
            parts["vae"] = AutoencoderKL(**VAE)
    return parts
