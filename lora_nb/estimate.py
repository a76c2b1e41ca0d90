"""Consequences of the settings, computed before training: LoRA file size, time, memory.

The file size comes from the real module shapes of the model (or of the
full-size architecture) and the exact safetensors layout, so it matches the
file training writes.
"""

from __future__ import annotations

import json
import math

import torch

from lora_nb import lora_io
from lora_nb.archs import build_architecture
from lora_nb.lora_io import ss_metadata

DTYPE_NAMES = {"fp16": ("F16", 2), "bf16": ("BF16", 2), "fp32": ("F32", 4)}


def lora_tensor_shapes(model, rank: int, unet_targets: str = "kohya", train_text_encoder: bool = True
                       ) -> dict[str, tuple[int, ...]]:
    """Kohya key → tensor shape of the LoRA that :func:`lora_nb.lora_io.add_lora` would attach."""

    ldm_map = lora_io.sdxl_ldm_block_map(model.pipe.unet.config) if model.family == "sdxl" else None
    comps = [("unet", model.pipe.unet, lora_io.unet_target_modules(model.pipe.unet, unet_targets))]
    if train_text_encoder:
        names = ["text_encoder", "text_encoder_2"] if model.family == "sdxl" else ["text_encoder"]
        comps += [(n, te, lora_io.text_encoder_target_modules(te, unet_targets))
                  for n, te in zip(names, model.text_encoders)]
    shapes = {}
    for comp, module, targets in comps:
        mods = dict(module.named_modules())
        for path in targets:
            m = mods[path]
            base = m.base_layer if hasattr(m, "base_layer") else m
            key = lora_io.kohya_module_name(comp, path, model.family, ldm_map)
            if isinstance(base, torch.nn.Conv2d):
                down, up = (rank, base.in_channels, 1, 1), (base.out_channels, rank, 1, 1)
            else:
                down, up = (rank, base.in_features), (base.out_features, rank)
            shapes[f"{key}.lora_down.weight"] = down
            shapes[f"{key}.lora_up.weight"] = up
            shapes[f"{key}.alpha"] = ()
    return shapes


def safetensors_size(shapes: dict[str, tuple[int, ...]], precision: str, metadata: dict[str, str] | None) -> int:
    """Bytes of a safetensors file with these tensors (all of one dtype) and metadata."""
    name, itemsize = DTYPE_NAMES[precision]
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key in sorted(shapes):
        nbytes = math.prod(shapes[key]) * itemsize
        header[key] = {"dtype": name, "shape": list(shapes[key]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    padded = len(text) + (-len(text)) % 8
    return 8 + padded + offset


def estimate_lora_file_size(model, rank: int, alpha: float, unet_targets: str = "kohya",
                            train_text_encoder: bool = True, precision: str = "fp16",
                            extra_metadata: dict | None = None) -> int:
    """Size in bytes of the kohya LoRA file training will write (metadata included)."""

    shapes = lora_tensor_shapes(model, rank, unet_targets, train_text_encoder)
    meta = ss_metadata(model.family, str(model.source), rank, alpha, train_text_encoder, extra_metadata)
    return safetensors_size(shapes, precision, meta)


def lora_parameter_count(model, rank: int, unet_targets: str = "kohya", train_text_encoder: bool = True) -> dict:
    """Trainable LoRA parameters per component (what the optimizer updates)."""
    counts: dict[str, int] = {}
    for key, shape in lora_tensor_shapes(model, rank, unet_targets, train_text_encoder).items():
        if key.endswith(".alpha"):
            continue
        comp = "unet" if key.startswith("lora_unet_") else "text_encoder"
        counts[comp] = counts.get(comp, 0) + math.prod(shape)
    return counts


def course_size_table(family: str = "sd15", ranks=(8, 16, 32, 64, 128), precision: str = "fp16") -> list[dict]:
    """File sizes on the full-size architecture at several ranks (the course's 128 ≈ 140 MB table)."""

    arch = build_architecture(family, "meta")
    rows = []
    for r in ranks:
        size = estimate_lora_file_size(arch, r, r / 2, "kohya", True, precision)
        rows.append({"rank": r, "bytes": size, "MB": round(size / 1e6, 1)})
    return rows
