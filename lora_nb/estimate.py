"""Consequences of the settings, computed before training: LoRA file size, time, memory.

The file size comes from the real module shapes of the model (or of the
full-size architecture) and the exact safetensors layout, so it matches the
file training writes.
"""

from __future__ import annotations

import json
import math

import torch

from lora_nb import lora_io, networks
from lora_nb.archs import build_architecture
from lora_nb.lora_io import ss_metadata

DTYPE_NAMES = {"fp16": ("F16", 2), "bf16": ("BF16", 2), "fp32": ("F32", 4)}


def lora_tensor_shapes(model, rank: int, unet_targets: str = "kohya", train_text_encoder: bool = True,
                       network_type: str = "lora", conv_rank: int = 0, conv_alpha: float = 1.0,
                       lokr_factor: int = -1, dora: bool = False) -> dict[str, tuple[int, ...]]:
    """Kohya key → tensor shape of the network that :func:`lora_nb.lora_io.add_lora` would attach: each
    layer is built by peft on the meta device (so the shapes are peft's own, LoKr factors included) and
    written out as :func:`lora_nb.networks.kohya_layer_tensors` writes it."""
    shapes, built = {}, {}
    for comp, module, targets, conv_targets in lora_io.network_modules(model, unet_targets, train_text_encoder,
                                                                        network_type, conv_rank):
        mods = dict(module.named_modules())
        for path in list(targets) + list(conv_targets):
            base = getattr(mods[path], "base_layer", mods[path])
            r, a = (conv_rank, conv_alpha) if path in conv_targets else (rank, 1.0)
            key = (tuple(base.weight.shape), type(base).__name__, r)
            if key not in built:
                built[key] = _layer_shapes(base, network_type, r, a, lokr_factor)
            name = lora_io.kohya_module_name(comp, path, model.family, model.pipe.unet.config)
            shapes.update({f"{name}.{t}": shape for t, shape in built[key].items()})
            if dora:  # one magnitude per output row: (out, 1) or (out, 1, 1, 1), as networks.kohya_layer_tensors writes
                shapes[f"{name}.{networks.DORA_TENSOR}"] = (base.weight.shape[0],) + (1,) * (base.weight.dim() - 1)
    return shapes


def _layer_shapes(base, network_type: str, rank: int, alpha: float, lokr_factor: int) -> dict[str, tuple]:
    """The file tensors' shapes of one layer like ``base``, from a peft layer built on the meta device."""
    from peft import inject_adapter_in_model

    if isinstance(base, torch.nn.Conv2d):
        layer = torch.nn.Conv2d(base.in_channels, base.out_channels, base.kernel_size, device="meta")
    else:
        layer = torch.nn.Linear(base.in_features, base.out_features, device="meta")
    holder = torch.nn.Module()
    holder.layer = layer
    cfg = networks.peft_config(network_type, rank, alpha, ["layer"], lokr_factor=lokr_factor)
    inject_adapter_in_model(cfg, holder, adapter_name="default")
    tensors = networks.kohya_layer_tensors(holder.layer, "default")
    return {name: tuple(t.shape) for name, t in tensors.items()}


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


SHAPE_SETTINGS = ("network_type", "conv_rank", "conv_alpha", "lokr_factor", "dora")  # the options that change shapes


def network_shapes(model, rank: int, unet_targets: str = "kohya", train_text_encoder: bool = True,
                   network: dict | None = None) -> dict[str, tuple[int, ...]]:
    """:func:`lora_tensor_shapes` for the options of :func:`lora_nb.lora_io.network_options` (or none: lora)."""
    options = {k: v for k, v in (network or {}).items() if k in SHAPE_SETTINGS}
    return lora_tensor_shapes(model, rank, unet_targets, train_text_encoder, **options)


def estimate_lora_file_size(model, rank: int, alpha: float, unet_targets: str = "kohya",
                            train_text_encoder: bool = True, precision: str = "fp16",
                            extra_metadata: dict | None = None, network: dict | None = None) -> int:
    """Size in bytes of the kohya LoRA file training will write (metadata included). ``network``: the
    type's settings (``network_type``, ``conv_rank``, ``conv_alpha``, ``lokr_factor``, dropouts), as
    :func:`lora_nb.lora_io.network_options` gives them."""
    shapes = network_shapes(model, rank, unet_targets, train_text_encoder, network)
    return file_size_of(shapes, model, rank, alpha, train_text_encoder, precision, extra_metadata, network)


def file_size_of(shapes: dict, model, rank: int, alpha: float, train_text_encoder: bool, precision: str,
                 extra_metadata: dict | None, network: dict | None) -> int:
    """Bytes of the file holding ``shapes``, with the metadata :func:`lora_nb.lora_io.save_lora` writes."""
    network = network or {}
    conv = [k for k in shapes if k.endswith((".lora_down.weight", ".hada_w1_a", ".lokr_w1", ".lokr_w1_a"))
            and lora_io.CONV3X3_NAME.match(k.split(".", 1)[0])]
    peft_cfg = networks.peft_config(network.get("network_type", "lora"), rank, alpha, ["x"], conv[:1],
                                    network.get("conv_rank", 0), network.get("conv_alpha", 1.0),
                                    network.get("lokr_factor", -1), network.get("dropout", 0.0),
                                    network.get("rank_dropout", 0.0), network.get("module_dropout", 0.0),
                                    dora=network.get("dora", False))
    meta = ss_metadata(model.family, str(model.source), rank, alpha, train_text_encoder, extra_metadata,
                       lora_io.network_args(peft_cfg))
    return safetensors_size(shapes, precision, meta)


def lora_parameter_count(model, rank: int, unet_targets: str = "kohya", train_text_encoder: bool = True,
                         network: dict | None = None) -> dict:
    """Trainable LoRA parameters per component (what the optimizer updates)."""
    return parameter_count_of(network_shapes(model, rank, unet_targets, train_text_encoder, network))


def parameter_count_of(shapes: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for key, shape in shapes.items():
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
