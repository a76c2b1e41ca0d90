"""The embedders behind the real-model diagnosis: DINO and CLIP, as transformers ships them.

- **DINO** (``Dinov2Model``, default ``facebook/dinov2-small``): an image embedding that tells one
  subject from another of the same class; its pooled (CLS) output is the embedding.
- **CLIP** (``CLIPModel``, default ``openai/clip-vit-base-patch32``): image and text embeddings in one
  space, so an image can be compared with other images (CLIP-I) and with its prompt (CLIP-T).

Each one is loaded from a hub id (from the local cache, or downloaded when the hub may be reached) or from a
local folder holding the model, its ``preprocessor_config.json`` and, for CLIP, its tokenizer. When one
cannot be loaded, :func:`load_embedders` raises :class:`EmbeddersUnavailable` whose message is one line
saying why; :func:`find_embedders` returns that line instead, so the diagnosis can fall back to its
approximation and say so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_nb import LoraNbError
from lora_nb.models import looks_like_hub_id

DEFAULT_DINO = "facebook/dinov2-small"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"


class EmbeddersUnavailable(LoraNbError):
    """DINO or CLIP could not be loaded; the message is one line naming the model and the reason."""


@dataclass
class Embedders:
    """A loaded DINO and CLIP, their preprocessing, and the device they run on."""

    dino: Any
    dino_processor: Any
    clip: Any
    clip_processor: Any
    clip_tokenizer: Any
    device: torch.device
    sources: tuple[str, str]


def hub_offline() -> bool:
    """Whether hub access is switched off (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_source(source: str) -> None:
    """Raise :class:`EmbeddersUnavailable` when ``source`` is sure not to load: a missing folder, or a hub id
    that is not in the local cache while the hub is off."""
    from huggingface_hub import try_to_load_from_cache

    what = "offline" if hub_offline() else "here"
    if not looks_like_hub_id(source):
        if not Path(source).expanduser().is_dir():
            raise EmbeddersUnavailable(f"DINO/CLIP not available {what}: the folder {source} does not exist "
                                       "(pass the folder or hub id of a saved model)")
        return
    if hub_offline() and not isinstance(try_to_load_from_cache(source, "config.json"), str):
        raise EmbeddersUnavailable(f"DINO/CLIP not available offline: {source} not in the local cache "
                                   "(download it where the hub is reachable, or pass a local folder)")


def load_part(loader, source: str, **kwargs):
    """``loader.from_pretrained(source)``, every failure turned into a one-line :class:`EmbeddersUnavailable`."""
    check_source(source)
    where = Path(source).expanduser() if not looks_like_hub_id(source) else source
    try:
        return loader.from_pretrained(where, **kwargs)
    except Exception as exc:  # noqa: BLE001 - hub and file errors come in many types
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise EmbeddersUnavailable(f"DINO/CLIP not available: {loader.__name__} could not load {source} "
                                   f"({type(exc).__name__}: {first})") from None


def load_embedders(dino: str = DEFAULT_DINO, clip: str = DEFAULT_CLIP, device: str | torch.device = "cpu") -> Embedders:
    """DINO and CLIP from hub ids or local folders, in eval mode on ``device`` (float32)."""
    from transformers import AutoImageProcessor, CLIPModel, CLIPTokenizer, Dinov2Model

    device = torch.device(device)
    dino_model = load_part(Dinov2Model, str(dino)).to(device).eval()
    dino_processor = load_part(AutoImageProcessor, str(dino))
    clip_model = load_part(CLIPModel, str(clip)).to(device).eval()
    clip_processor = load_part(AutoImageProcessor, str(clip))
    tokenizer = load_part(CLIPTokenizer, str(clip))
    return Embedders(dino_model, dino_processor, clip_model, clip_processor, tokenizer, device, (str(dino), str(clip)))


def find_embedders(dino: str = DEFAULT_DINO, clip: str = DEFAULT_CLIP,
                   device: str | torch.device = "cpu") -> tuple[Embedders | None, str | None]:
    """(the embedders, None), or (None, the one-line reason they cannot be loaded)."""
    try:
        return load_embedders(dino, clip, device), None
    except EmbeddersUnavailable as exc:
        return None, str(exc)


def _pooled(output) -> torch.Tensor:
    """The pooled embedding of a transformers output (a tensor in older versions, an output object in newer)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def embed_images(embedders: Embedders, images: list[np.ndarray], which: str, batch: int = 32) -> torch.Tensor:
    """Unit-length embeddings (one row per uint8 HWC image) from ``which`` = ``"dino"`` (pooled CLS output)
    or ``"clip"`` (CLIP's projected image embedding)."""
    if which not in ("dino", "clip"):
        raise LoraNbError(f"embed_images: which={which!r} is not known: use 'dino' or 'clip'.")
    processor = embedders.dino_processor if which == "dino" else embedders.clip_processor
    rows = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            pixels = processor(images=list(images[i:i + batch]), return_tensors="pt")["pixel_values"]
            pixels = pixels.to(embedders.device, torch.float32)
            out = embedders.dino(pixel_values=pixels) if which == "dino" \
                else embedders.clip.get_image_features(pixel_values=pixels)
            rows.append(_pooled(out).float().cpu())
    return torch.nn.functional.normalize(torch.cat(rows), dim=-1)


def embed_texts(embedders: Embedders, texts: list[str]) -> torch.Tensor:
    """Unit-length CLIP text embeddings, one row per text (cut at the tokenizer's length)."""
    tok = embedders.clip_tokenizer
    inputs = tok(list(texts), padding=True, truncation=True, max_length=tok.model_max_length, return_tensors="pt")
    with torch.no_grad():
        out = embedders.clip.get_text_features(**{k: v.to(embedders.device) for k, v in inputs.items()})
    return torch.nn.functional.normalize(_pooled(out).float().cpu(), dim=-1)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Cosine similarity of every row of ``a`` with every row of ``b`` (both unit length)."""
    return (a @ b.T).numpy().astype(np.float64)


def build_tiny_embedders(folder: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny random DINO (``Dinov2Model``) and CLIP (``CLIPModel``, with an offline tokenizer) saved with their
    preprocessors under ``folder``/dino and ``folder``/clip, for tests: ``(dino folder, clip folder)``."""
    from transformers import BitImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, Dinov2Config, Dinov2Model

    from lora_nb.models import TINY_WORDS
    from lora_nb.tokenizer import write_clip_tokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    square = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                             patch_size=8, image_size=32)).save_pretrained(folder / "dino")
    BitImageProcessor(**square, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(
        folder / "dino")
    tok = write_clip_tokenizer(TINY_WORDS.split(), folder / "clip")
    text = {"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": tok.model_max_length,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    vision = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 8}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder / "clip")
    CLIPImageProcessor(**square).save_pretrained(folder / "clip")
    return folder / "dino", folder / "clip"
