"""Full-size SD1.5 and SDXL architectures from their configurations, no download.

The configurations are the shipped ones single-file checkpoints are read with
(``lora_nb/model_configs/<family>/``, see :mod:`lora_nb.checkpoints`).

For what depends only on the architecture: LoRA module sets and file sizes
(built on the ``meta`` device, no memory), and speed/memory measurements on a
GPU (random weights: timing and memory do not depend on the weights' values).
Also a complete random-weight pipeline of the full-size architecture with a
placeholder CLIP vocabulary (CLIP's own is not shipped), for the benchmarks that
load, train and sample full-size models offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lora_nb import checkpoints
from lora_nb.models import TINY_WORDS, BaseModel
from lora_nb.tokenizer import BOS, EOS, write_clip_tokenizer

CLIP_VOCAB_SIZE = 49408


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


# --------------------------------------------------------------------------- random full-size models

def random_full_size_parts(family: str, seed: int = 0, dtype: torch.dtype = torch.float16):
    """The full-size UNet, VAE and text encoder(s) (``.unet``, ``.vae``, ``.text_encoder``[, ``.text_encoder_2``])
    in ``dtype`` with N(0, 0.02) weights (no init pass)."""
    model = build_architecture(family, "meta", dtype, with_vae=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for part in [model.pipe.unet, model.pipe.vae] + model.text_encoders:
            part.to_empty(device="cpu")
            for p in part.parameters():
                p.normal_(0, 0.02, generator=gen)
    return model.pipe


def write_placeholder_vocabulary(folder: str | Path) -> Path:
    """Bare ``vocab.json`` + ``merges.txt`` in ``folder`` with CLIP's token count, BOS at 49406 and EOS at 49407
    as in CLIP's own (any file with that many tokens fits the text encoders' shapes; the words are a small
    learned vocabulary padded with fillers, so real words split into more tokens than with CLIP's)."""
    folder = Path(folder)
    write_clip_tokenizer(TINY_WORDS.split(), folder)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    words = [t for t in sorted(vocab, key=vocab.get) if t not in (BOS, EOS)]
    words += [f"<|filler{i}|>" for i in range(CLIP_VOCAB_SIZE - 2 - len(words))]
    full = {t: i for i, t in enumerate(words + [BOS, EOS])}
    (folder / "vocab.json").write_text(json.dumps(full, ensure_ascii=False), encoding="utf-8")
    for name in ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "added_tokens.json"):
        (folder / name).unlink(missing_ok=True)  # bare vocabulary files, as a learner would place them
    return folder


def random_full_size_pipeline(family: str, vocabulary_dir: str | Path, seed: int = 0,
                              dtype: torch.dtype = torch.float16):
    """A complete diffusers pipeline (``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``) of the
    full-size architecture with random weights: the shipped scheduler and tokenizer settings, and the
    placeholder vocabulary written to ``vocabulary_dir`` (:func:`write_placeholder_vocabulary`). Save it with
    ``save_pretrained`` for a diffusers folder, or with :func:`lora_nb.checkpoints.write_single_file`."""
    import diffusers
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    config = checkpoints.shipped_config_dir(family)
    place = write_placeholder_vocabulary(vocabulary_dir)
    index = json.loads((config / "model_index.json").read_text(encoding="utf-8"))
    scheduler = getattr(diffusers, index["scheduler"][1]).from_config(checkpoints.read_config(config, "scheduler"))
    parts = dict(vars(random_full_size_parts(family, seed, dtype)), scheduler=scheduler,
                 **{sub: checkpoints.tokenizer_from(place, sub, config) for sub in checkpoints.TOKENIZER_FOLDERS[family]})
    if family == "sdxl":
        return StableDiffusionXLPipeline(**parts)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
