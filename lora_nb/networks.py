"""Network types: which modules each type trains, the peft adapter that trains them, and the
tensors the kohya/LyCORIS file format stores for each adapter layer.

=========  ====================================================  ======================================
type       what it adds to a layer's weight W                     tensors in the file (per module)
=========  ====================================================  ======================================
lora       (alpha/r) · up @ down                                  ``lora_down``, ``lora_up``, ``alpha``
locon      the same, on the UNet's 3x3 convolutions too           the same (a 3x3 ``lora_down``)
loha       (alpha/r) · (w1a @ w1b) ⊙ (w2a @ w2b)   (Hadamard)     ``hada_w1_a/_b``, ``hada_w2_a/_b``, ``alpha``
lokr       (alpha/r) · w1 ⊗ (w2a @ w2b)            (Kronecker)    ``lokr_w1``, ``lokr_w2`` or ``lokr_w2_a/_b``
=========  ====================================================  ======================================

DoRA (``network.dora``, lora and locon): the merged weight W + ΔW is rescaled row by row to a learned
magnitude, W' = m ⊙ (W + ΔW) / ‖W + ΔW‖ (one norm per output row), stored as ``dora_scale`` of shape
``(out, 1)`` (``(out, 1, 1, 1)`` for a convolution). That is peft's DoRA and LyCORIS's default
(``wd_on_out``), applied by LyCORIS as trained. ComfyUI recognises the orientation by the shape but divides by
the base weight's row norm ‖W‖ (another model, the further off the larger the update); AUTOMATIC1111's
loader assumes the other orientation (one magnitude per input column) and does not read these files correctly.

The adapters are peft's (``LoraConfig``, ``LoHaConfig``, ``LoKrConfig``: ports of LyCORIS's algorithms),
so training, mixed precision, strength and resume treat every type alike. peft's LoHa and LoKr compute
exactly what AUTOMATIC1111's and ComfyUI's LyCORIS loaders compute from these tensors, with one
difference this module undoes on save: a LoKr layer with *no* low-rank factor is applied by the loaders
at scale 1 whatever its alpha, so its ``alpha/r`` is multiplied into ``lokr_w1`` and ``alpha`` written
as ``r``. Tucker-decomposed convolutions (``hada_t1``, ``lokr_t2``) are not used: peft and LyCORIS order
their factors differently, and the plain layout is what every loader reads the same way.

Module sets follow the trainers: ``lora`` is sd-scripts' set (the transformer blocks); ``locon`` adds
sd-scripts' ``conv_dim`` set (every layer of the ResNet blocks and the down/upsamplers: linears and
1x1 convolutions at ``rank``, 3x3 convolutions at ``conv_rank``); ``loha``/``lokr`` use LyCORIS's
``full`` preset (that set plus ``conv_in``, ``conv_out`` and the time embedding; 3x3 convolutions only
when ``conv_rank`` > 0).
"""

from __future__ import annotations

import torch

from lora_nb import LoraNbError
from lora_nb.config import NETWORK_TYPES
# What a kohya/LyCORIS file names each type in ``ss_network_module`` and ``ss_network_args``.
NETWORK_MODULES = {"lora": "networks.lora", "locon": "networks.lora", "loha": "lycoris.kohya",
                   "lokr": "lycoris.kohya"}
# The tensors of each type, without the module prefix (``alpha`` aside).
TYPE_TENSORS = {
    "lora": ("lora_down.weight", "lora_up.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
}
UNSUPPORTED_TENSORS = ("hada_t1", "hada_t2", "lokr_t2", "lora_mid.weight", "oft_blocks", "oft_diag",
                       "diff", "w_norm")
DORA_TENSOR = "dora_scale"
# peft's LoRA init for lora-nb's choices: gaussian (B = 0, diffusers' choice), default (Kaiming A, B = 0),
# random (A and B random: tests, the network changes the output from the start). LoHa/LoKr: no-op or random.
INIT_CHOICES = {"gaussian": "gaussian", "default": True, "random": False}
RESNET_PARENTS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
FULL_PRESET_NAMES = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")


def is_lycoris(network_type: str) -> bool:
    return network_type in ("loha", "lokr")


def tensor_kind(key: str) -> str:
    """``lora``, ``loha``, ``lokr``, ``alpha``, ``dora``, ``unsupported`` (Tucker, OFT …) or ``other``."""
    tail = key.split(".", 1)[1] if "." in key else key
    if tail == "alpha":
        return "alpha"
    if tail == DORA_TENSOR:
        return "dora"
    for kind, names in TYPE_TENSORS.items():
        if tail in names:
            return kind
    if tail in ("lora_A.weight", "lora_B.weight", "lora.down.weight", "lora.up.weight"):
        return "lora"
    if tail in UNSUPPORTED_TENSORS:
        return "unsupported"
    return "other"


def network_type_of_file(tensors: dict) -> str:
    """``lora``, ``locon`` (a lora_down with a kernel larger than 1x1), ``loha`` or ``lokr``."""
    kinds = {tensor_kind(k) for k in tensors}
    if "loha" in kinds:
        return "loha"
    if "lokr" in kinds:
        return "lokr"
    conv = any(k.endswith("lora_down.weight") and t.dim() == 4 and t.shape[-1] > 1 for k, t in tensors.items())
    return "locon" if conv else "lora"


# --------------------------------------------------------------------------- which modules

def unet_extra_modules(unet, network_type: str, conv_rank: int) -> tuple[list[str], list[str]]:
    """The UNet modules a type trains beyond the transformer blocks: ``(linear and 1x1 paths, 3x3 paths)``."""
    if network_type == "lora":
        return [], []
    if network_type == "locon" and conv_rank <= 0:
        return [], []
    linear, conv = [], []
    for parent_name, parent in unet.named_modules():
        if type(parent).__name__ not in RESNET_PARENTS:
            continue
        for rel, mod in parent.named_modules():
            path = f"{parent_name}.{rel}" if rel else parent_name
            _sort_module(path, mod, linear, conv)
    if is_lycoris(network_type):
        mods = dict(unet.named_modules())
        for name in FULL_PRESET_NAMES:
            if name in mods:
                _sort_module(name, mods[name], linear, conv)
    return linear, (conv if conv_rank > 0 else [])


def _sort_module(path: str, mod, linear: list, conv: list) -> None:
    if isinstance(mod, torch.nn.Linear):
        linear.append(path)
    elif isinstance(mod, torch.nn.Conv2d):
        (linear if tuple(mod.kernel_size) == (1, 1) else conv).append(path)


# --------------------------------------------------------------------------- the peft adapter

def peft_config(network_type: str, rank: int, alpha: float, targets: list[str], conv_targets: list[str] = (),
                conv_rank: int = 0, conv_alpha: float = 1.0, lokr_factor: int = -1, dropout: float = 0.0,
                rank_dropout: float = 0.0, module_dropout: float = 0.0, init="gaussian", dora: bool = False):
    """The peft config of one component: ``targets`` at ``rank``/``alpha``, ``conv_targets`` at
    ``conv_rank``/``conv_alpha`` (peft's per-module ``rank_pattern``/``alpha_pattern``, exact paths);
    ``dora``: peft's DoRA (lora and locon only)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    every = list(targets) + list(conv_targets)
    ranks = {_exact(p): int(conv_rank) for p in conv_targets}
    alphas = {_exact(p): float(conv_alpha) for p in conv_targets}
    if network_type in ("lora", "locon"):
        init_value = INIT_CHOICES[init]
        return LoraConfig(r=int(rank), lora_alpha=float(alpha), target_modules=every, rank_pattern=ranks,
                          alpha_pattern=alphas, lora_dropout=float(dropout), init_lora_weights=init_value,
                          use_dora=bool(dora))
    if dora:
        raise LoraNbError(f"network.dora works with network.type lora or locon (peft's DoRA), not {network_type}.")
    common = dict(r=int(rank), alpha=float(alpha), target_modules=every, rank_pattern=ranks, alpha_pattern=alphas,
                  rank_dropout=float(rank_dropout), module_dropout=float(module_dropout),
                  init_weights=init != "random", use_effective_conv2d=False)
    if network_type == "loha":
        return LoHaConfig(**common)
    if network_type == "lokr":
        return LoKrConfig(**common, decompose_factor=int(lokr_factor), decompose_both=False)
    raise LoraNbError(f"network.type={network_type!r} is not known: use one of {', '.join(NETWORK_TYPES)}.")


def _exact(path: str) -> str:
    """A peft pattern matching exactly this module path (peft matches patterns as regular expressions)."""
    return "^" + path.replace(".", r"\.") + "$"


def adapter_layers(module, adapter: str) -> dict[str, object]:
    """``{module path: peft layer}`` of every layer carrying ``adapter``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: m for name, m in module.named_modules()
            if isinstance(m, BaseTunerLayer) and adapter in _layer_adapters(m)}


def _layer_adapters(layer) -> set[str]:
    for attr in ("lora_A", "hada_w1_a", "lokr_w1", "lokr_w1_a"):
        if hasattr(layer, attr):
            found = set(getattr(layer, attr).keys())
            if attr == "lokr_w1":
                found |= set(layer.lokr_w1_a.keys())
            return found
    return set()


def layer_rank_alpha(layer, adapter: str) -> tuple[int, float]:
    alpha = layer.lora_alpha[adapter] if hasattr(layer, "lora_alpha") else layer.alpha[adapter]
    return int(layer.r[adapter]), float(alpha)


# --------------------------------------------------------------------------- to and from the file

def kohya_layer_tensors(layer, adapter: str) -> dict[str, torch.Tensor]:
    """The tensors of one adapter layer as the kohya/LyCORIS format names them (``alpha`` included)."""
    r, alpha = layer_rank_alpha(layer, adapter)
    if hasattr(layer, "lora_A"):
        out = {"lora_down.weight": layer.lora_A[adapter].weight, "lora_up.weight": layer.lora_B[adapter].weight,
               "alpha": torch.tensor(alpha)}
        magnitude = dora_magnitude(layer, adapter)
        if magnitude is not None:  # (out,) or (1, out, 1, 1) in peft; (out, 1[, 1, 1]) in the file
            out[DORA_TENSOR] = magnitude.reshape(-1, *[1] * (layer.lora_A[adapter].weight.dim() - 1))
        return out
    if hasattr(layer, "hada_w1_a"):
        out = {name: getattr(layer, name)[adapter] for name in TYPE_TENSORS["loha"]}
        return {**out, "alpha": torch.tensor(alpha)}
    out = {name: getattr(layer, name)[adapter] for name in TYPE_TENSORS["lokr"] if adapter in getattr(layer, name)}
    if "lokr_w1" in out and "lokr_w2" in out:  # no low-rank factor: the loaders apply it at scale 1
        out["lokr_w1"] = out["lokr_w1"] * (alpha / r)
        alpha = float(r)
    return {**out, "alpha": torch.tensor(alpha)}


def dora_magnitude(layer, adapter: str):
    """The DoRA magnitude parameter of a peft LoRA layer (None without DoRA)."""
    vectors = getattr(layer, "lora_magnitude_vector", None)
    if vectors is None or adapter not in vectors:
        return None
    return vectors[adapter].weight


def dora_axis(parts: dict[str, torch.Tensor]) -> str:
    """``per output row`` or ``per input column``: which way a module's ``dora_scale`` holds its magnitudes."""
    scale, up = parts[DORA_TENSOR], parts.get("lora_up.weight")
    rows = int(up.shape[0]) if up is not None else None
    return "per output row" if scale.shape[0] == rows and scale.numel() == rows else "per input column"


def group_file_tensors(tensors: dict) -> dict[str, dict[str, torch.Tensor]]:
    """``{kohya module name: {tensor name: tensor}}`` of a kohya/LyCORIS file."""
    modules: dict[str, dict] = {}
    for key, t in tensors.items():
        if "." not in key:
            continue
        name, tail = key.split(".", 1)
        modules.setdefault(name, {})[tail] = t
    return modules


def file_rank_alpha(parts: dict[str, torch.Tensor]) -> tuple[int, float]:
    """The rank and alpha a loader applies for one module's tensors (``alpha/r``: the loaders' scale)."""
    for name in ("lora_down.weight", "hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
        if name in parts:
            r = int(parts[name].shape[0])
            break
    else:  # a LoKr module without a low-rank factor: applied at scale 1
        w2 = parts["lokr_w2"]
        r = max(int(w2.shape[0]), int(w2.shape[1]))
        return r, float(r)
    alpha = parts.get("alpha")
    return r, float(alpha) if alpha is not None else float(r)


def check_loadable(path_name: str, modules: dict[str, dict]) -> None:
    """Refuse, with the reason, a file whose tensors lora-nb cannot rebuild exactly."""
    for name, parts in modules.items():
        odd = [t for t in parts if tensor_kind(f"x.{t}") == "unsupported"]
        if odd:
            raise LoraNbError(f"{path_name}: module {name} has {', '.join(sorted(odd))}: Tucker-decomposed "
                              "convolutions and OFT are not loaded by lora-nb (AUTOMATIC1111 and ComfyUI "
                              "load them); use the file there.")


def copy_file_tensors(layer, adapter: str, parts: dict[str, torch.Tensor], where: str) -> None:
    """Copy one module's file tensors into a peft layer's ``adapter`` parameters (the inverse of
    :func:`kohya_layer_tensors`); a shape that does not fit is refused with both shapes."""
    r, alpha = layer_rank_alpha(layer, adapter)
    if hasattr(layer, "lora_A"):
        targets = {"lora_down.weight": layer.lora_A[adapter].weight, "lora_up.weight": layer.lora_B[adapter].weight}
        if dora_magnitude(layer, adapter) is not None:
            targets[DORA_TENSOR] = dora_magnitude(layer, adapter)
    else:
        kind = "loha" if hasattr(layer, "hada_w1_a") else "lokr"
        targets = {n: getattr(layer, n)[adapter] for n in TYPE_TENSORS[kind] if adapter in getattr(layer, n)}
    if DORA_TENSOR in parts and dora_axis(parts) != "per output row":
        raise LoraNbError(f"{where}: its DoRA scale has shape {tuple(parts[DORA_TENSOR].shape)}, one magnitude per "
                          "input column (AUTOMATIC1111's orientation); lora-nb loads DoRA per output row (peft, "
                          "LyCORIS's default), so use the file in AUTOMATIC1111.")
    given = {n for n in parts if n != "alpha"}
    if given != set(targets):
        raise LoraNbError(f"{where} holds {', '.join(sorted(given))} but this network has "
                          f"{', '.join(sorted(targets))}: it was trained with another network.type (or rank).")
    with torch.no_grad():
        for name, param in targets.items():
            value = parts[name]
            if value.numel() != param.numel():
                raise LoraNbError(f"{where}: {name} has shape {tuple(value.shape)}, the model wants "
                                  f"{tuple(param.shape)}.")
            if name == "lokr_w1" and "lokr_w2" in parts:  # saved with the scale multiplied in
                value = value * (r / alpha)
            param.copy_(value.reshape(param.shape).to(param.dtype))


def peft_config_for_file(network_type: str, modules: dict[str, dict[str, torch.Tensor]], layers: dict[str, object]):
    """The peft config that rebuilds these file modules (``{module path: tensors}``, their base ``layers``)
    exactly: each module at its own rank and alpha, LoKr factors as the file has them, DoRA where the file
    has its scales."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    ranks, alphas = {}, {}
    for path, parts in modules.items():
        r, alpha = file_rank_alpha(parts)
        ranks[_exact(path)], alphas[_exact(path)] = r, alpha
    first = next(iter(ranks))
    if network_type in ("lora", "locon"):
        return LoraConfig(r=ranks[first], lora_alpha=alphas[first], target_modules=list(modules), rank_pattern=ranks,
                          alpha_pattern=alphas, use_dora=any(DORA_TENSOR in parts for parts in modules.values()))
    common = dict(r=ranks[first], alpha=alphas[first], target_modules=list(modules), rank_pattern=ranks,
                  alpha_pattern=alphas, use_effective_conv2d=False)
    if network_type == "loha":
        return LoHaConfig(**common)
    both = any("lokr_w1_a" in parts for parts in modules.values())
    return LoKrConfig(**common, decompose_both=both, decompose_factor=lokr_factor_of(modules, layers))


def lokr_factor_of(modules: dict[str, dict[str, torch.Tensor]], layers: dict[str, object]) -> int:
    """The ``lokr_factor`` a LoKr file was made with: the one for which peft's factorization of every layer's
    output and input width gives the file's small Kronecker factor ``w1`` (-1 when it is the automatic one)."""
    from peft.tuners.lokr.layer import factorization

    def w1_shape(parts):
        if "lokr_w1" in parts:
            return tuple(parts["lokr_w1"].shape[:2])
        return parts["lokr_w1_a"].shape[0], parts["lokr_w1_b"].shape[1]

    def dims(layer):
        base = getattr(layer, "base_layer", layer)
        if isinstance(base, torch.nn.Conv2d):
            return base.out_channels, base.in_channels
        return base.out_features, base.in_features

    shapes = {path: (w1_shape(parts), dims(layers[path])) for path, parts in modules.items()}
    candidates = [-1] + sorted({d for (w1, _) in shapes.values() for d in w1})
    for factor in candidates:
        if all((factorization(out, factor)[0], factorization(inp, factor)[0]) == w1
               for w1, (out, inp) in shapes.values()):
            return factor
    raise LoraNbError("This LoKr file's Kronecker factors follow no single factor (each module was split its own "
                      "way): lora-nb loads LoKr files made with one lokr_factor; AUTOMATIC1111 and ComfyUI load it.")
