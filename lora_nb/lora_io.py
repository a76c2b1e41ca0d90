"""LoRA files: attach LoRA adapters to a base model, save them in the kohya
format (what AUTOMATIC1111 and ComfyUI load) or the diffusers format, load a
file into a pipeline for inference, and inspect a file.

Kohya format, in short (details: ``shared/reference/stack-facts.md``)::

    lora_unet_<module path, "." -> "_">.lora_down.weight   [rank, in, (1, 1)]
    lora_unet_<...>.lora_up.weight                           [out, rank, (1, 1)]
    lora_unet_<...>.alpha                                    0-dim, the real alpha
    lora_te_text_model_encoder_layers_<i>_self_attn_q_proj... (SD1.5 text encoder)
    lora_te1_text_model_... / lora_te2_text_model_...         (SDXL's two text encoders)

SDXL UNet modules use the LDM/SGM block names (``input_blocks_4_1_...``,
``middle_block_1_...``, ``output_blocks_0_1_...``) as kohya's sd-scripts writes
them; SD1.x UNet modules keep diffusers names (``down_blocks_0_attentions_0_...``),
as sd-scripts writes those too.

The scale a LoRA applies is ``alpha / rank`` in both formats.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import time
from pathlib import Path

import torch

from lora_nb import LoraNbError, checkpoints, networks
from lora_nb.config import parse_resolution
from lora_nb.fsutil import DiskFullError, atomic_path, is_disk_full

ADAPTER_NAME = "default"

# Inside every UNet transformer (``Transformer2DModel``): the module names kohya's
# sd-scripts puts LoRA on (every Linear / 1x1 conv), relative to the transformer
# (proj_in / proj_out) or to each of its ``transformer_blocks.N``.
KOHYA_UNET_TARGETS = (
    "proj_in", "proj_out",
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ff.net.0.proj", "ff.net.2",
)
# What diffusers' training examples target: attention projections only.
ATTENTION_UNET_TARGETS = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
)
# CLIP text encoder layers (kohya's set); "attention" keeps the first four.
TEXT_ENCODER_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                        "mlp.fc1", "mlp.fc2")
TEXT_ENCODER_ATTENTION_TARGETS = TEXT_ENCODER_TARGETS[:4]

TARGET_CHOICES = ("kohya", "attention")
FORMATS = ("kohya", "diffusers")
PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
BASE_MODEL_VERSIONS = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


# --------------------------------------------------------------------------- target modules

def unet_target_modules(unet, which: str = "kohya") -> list[str]:
    """Full names of the UNet modules that get a LoRA: ``which`` is ``kohya`` or ``attention``.

    Only modules inside the UNet's transformers (``attentions.*``) qualify, so the
    names can go to peft's ``target_modules`` and match exactly these modules.
    """
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    suffixes = _unet_suffixes(which)
    names = []
    for tname, transformer in unet.named_modules():
        if not isinstance(transformer, Transformer2DModel):
            continue
        for rel, mod in transformer.named_modules():
            if _is_lora_able(mod) and _strip_block_index(rel) in suffixes:
                names.append(f"{tname}.{rel}")
    return names


def text_encoder_target_modules(text_encoder, which: str = "kohya") -> list[str]:
    """Full names of the CLIP text-encoder modules that get a LoRA (q/k/v/out_proj, fc1, fc2 for kohya)."""
    suffixes = TEXT_ENCODER_TARGETS if which == "kohya" else TEXT_ENCODER_ATTENTION_TARGETS
    _unet_suffixes(which)  # validates ``which``
    pattern = re.compile(r"(?:^|\.)encoder\.layers\.\d+\.(.+)$")
    names = []
    for name, mod in text_encoder.named_modules():
        m = pattern.search(name)
        if m and m.group(1) in suffixes and isinstance(mod, torch.nn.Linear):
            names.append(name)
    return names


def _unet_suffixes(which: str) -> tuple[str, ...]:
    if which == "kohya":
        return KOHYA_UNET_TARGETS
    if which == "attention":
        return ATTENTION_UNET_TARGETS
    raise LoraNbError(f"target_modules={which!r} is not known: use one of {', '.join(TARGET_CHOICES)}.")


def _strip_block_index(rel: str) -> str:
    """``transformer_blocks.3.attn1.to_q`` -> ``attn1.to_q``; ``proj_in`` stays."""
    return re.sub(r"^transformer_blocks\.\d+\.", "", rel)


def _is_lora_able(mod) -> bool:
    if isinstance(mod, torch.nn.Linear):
        return True
    return isinstance(mod, torch.nn.Conv2d) and tuple(mod.kernel_size) == (1, 1)


# --------------------------------------------------------------------------- attach

def add_lora(model, rank: int, alpha: float, unet_targets: str = "kohya", train_text_encoder: bool = True,
             init: str = "gaussian", network_type: str = "lora", conv_rank: int = 0, conv_alpha: float = 1.0,
             **options) -> dict[str, int]:
    """Attach peft adapters of ``network_type`` (adapter name ``default``; see :mod:`lora_nb.networks`) to
    ``model``'s UNet and, when ``train_text_encoder``, to its text encoder(s) (SDXL: both). ``conv_rank`` /
    ``conv_alpha`` size the 3x3 convolutions of ``locon``/``loha``/``lokr``; ``options`` are
    ``lokr_factor``, ``dropout``, ``rank_dropout``, ``module_dropout``, ``dora``.

    ``init``: ``gaussian`` (B = 0: a no-op at step 0, diffusers' choice), ``default``
    (peft's Kaiming A, B = 0) or ``random`` (A and B random: for tests, the LoRA
    changes the output from the start). ``unet_targets`` (``kohya`` or ``attention``) also
    picks the text-encoder set: q/k/v/out_proj + fc1/fc2, or q/k/v/out_proj only.
    Returns the number of LoRA modules per component, e.g. ``{"unet": 192, "text_encoder": 72}``.
    """
    if rank <= 0:
        raise LoraNbError(f"rank={rank} must be a positive integer (typical: 4 to 128).")
    if alpha <= 0:
        raise LoraNbError(f"alpha={alpha} must be positive (typical: rank/2 to rank; 1 is common too).")
    if init not in networks.INIT_CHOICES:
        raise LoraNbError(f"init={init!r} is not known: use one of {', '.join(networks.INIT_CHOICES)}.")
    counts = {}
    for name, module, targets, conv_targets in network_modules(model, unet_targets, train_text_encoder,
                                                                network_type, conv_rank):
        if not targets:
            raise LoraNbError(f"The {name} of {model.source} has no module for target_modules={unet_targets!r}.")
        cfg = networks.peft_config(network_type, rank, alpha, targets, conv_targets, conv_rank, conv_alpha,
                                   init=init, **options)
        module.add_adapter(cfg, adapter_name=ADAPTER_NAME)
        counts[name] = len(targets) + len(conv_targets)
    return counts


def network_options(net) -> dict:
    """The keyword arguments of :func:`add_lora` for a :class:`lora_nb.config.NetworkConfig`."""
    return {"network_type": net.type, "conv_rank": net.conv_rank, "conv_alpha": net.conv_alpha,
            "lokr_factor": net.lokr_factor, "dropout": net.dropout, "rank_dropout": net.rank_dropout,
            "module_dropout": net.module_dropout, "dora": net.dora}


def network_modules(model, unet_targets: str = "kohya", train_text_encoder: bool = True, network_type: str = "lora",
                    conv_rank: int = 0) -> list[tuple]:
    """``[(component, module, paths at rank, 3x3 paths at conv_rank)]``: what a network type trains."""
    unet = model.pipe.unet
    extra, conv = networks.unet_extra_modules(unet, network_type, conv_rank)
    out = [("unet", unet, unet_target_modules(unet, unet_targets) + extra, conv)]
    if train_text_encoder:
        for name, enc in zip(_text_encoder_names(model.family), model.text_encoders):
            out.append((name, enc, text_encoder_target_modules(enc, unet_targets), []))
    return out


def _text_encoder_names(family: str) -> list[str]:
    return ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]


def lora_components(model) -> dict[str, torch.nn.Module]:
    """The model's components that carry the ``default`` LoRA adapter, by diffusers name."""
    comps = {"unet": model.pipe.unet}
    comps.update(zip(_text_encoder_names(model.family), model.text_encoders))
    return {n: m for n, m in comps.items() if ADAPTER_NAME in (getattr(m, "peft_config", None) or {})}


# --------------------------------------------------------------------------- kohya names

def sdxl_ldm_path(module_path: str, unet_config) -> str | None:
    """The LDM/SGM path of a diffusers SDXL UNet module (``down_blocks.1.attentions.0.proj_in`` ->
    ``input_blocks.4.1.proj_in``, ``down_blocks.1.resnets.0.conv1`` -> ``input_blocks.4.0.in_layers.2``),
    or None when it has none: the single-file layout's names (:func:`lora_nb.checkpoints.original_unet_module`),
    which sd-scripts trains SDXL under and diffusers' loader maps back."""
    lpb = unet_config.layers_per_block
    if not isinstance(lpb, int):
        if len(set(lpb)) != 1:
            raise LoraNbError("This UNet has a different layers_per_block per block; LDM naming needs one value.")
        lpb = lpb[0]
    attn_up = {i for i, kind in enumerate(unet_config.up_block_types) if "CrossAttn" in kind}
    try:
        return checkpoints.original_unet_module(module_path, lpb, attn_up)
    except ValueError:
        return None


def kohya_module_name(component: str, module_path: str, family: str, unet_config=None) -> str:
    """The kohya key prefix of one module, e.g. ``lora_unet_down_blocks_0_attentions_0_proj_in``.

    ``component`` is ``unet``, ``text_encoder`` or ``text_encoder_2``; text-encoder paths
    get their ``text_model.`` back (transformers 5 ``CLIPTextModel`` has none). SDXL UNet names need
    ``unet_config`` (the UNet's ``config``) for their LDM paths.
    """
    if component == "unet":
        path = module_path
        if family == "sdxl":
            path = sdxl_ldm_path(module_path, unet_config) if unet_config is not None else None
            if path is None:
                raise LoraNbError(f"UNet module {module_path} has no LDM name, which kohya SDXL files need.")
        prefix = "lora_unet_"
    else:
        path = module_path if module_path.startswith("text_model.") else f"text_model.{module_path}"
        prefix = {"text_encoder": "lora_te1_" if family == "sdxl" else "lora_te_", "text_encoder_2": "lora_te2_"}[component]
    return prefix + path.replace(".", "_")


def kohya_state_dict(model, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The ``default`` adapter of every adapter-carrying component as a kohya/LyCORIS state dict (each
    module's real alpha; tensor names per network type in :mod:`lora_nb.networks`)."""
    out = {}
    for comp, module in lora_components(model).items():
        for mod_path, layer in networks.adapter_layers(module, ADAPTER_NAME).items():
            key = kohya_module_name(comp, mod_path, model.family, model.pipe.unet.config)
            for name, tensor in networks.kohya_layer_tensors(layer, ADAPTER_NAME).items():
                out[f"{key}.{name}"] = tensor.detach().to("cpu", dtype).contiguous()
    return out


def kohya_names(family: str, unet_config, components: dict) -> dict[str, tuple[str, str]]:
    """``{kohya module name: (component, module path)}`` for every linear and convolution of ``components``
    that has a kohya name (what a file's module names are looked up in)."""
    names = {}
    for comp, module in components.items():
        for path, mod in module.named_modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and not path.endswith(("base_layer", "lora_A",
                                                                                            "lora_B")):
                try:
                    names[kohya_module_name(comp, path, family, unet_config)] = (comp, path)
                except LoraNbError:
                    continue
    return names


def init_lora_from(model, path: str | Path) -> int:
    """Start the ``default`` adapter from an existing kohya/LyCORIS file (``network.init_from``): every module's
    tensors are copied in, so training continues that LoRA. Refused, with the reason, when the file is for
    another family or network type, has another rank or alpha, or does not hold exactly the modules this run
    trains (other ``unet_targets``, or a text encoder trained in one and not the other). Returns the modules
    loaded."""
    path = Path(path)
    tensors, meta = read_lora_file(path)
    if file_format(tensors) != "kohya":
        raise LoraNbError(f"network.init_from={path}: not a kohya-format LoRA (save.formats kohya writes one).")
    family = guess_family(tensors, meta)
    if family != model.family:
        raise LoraNbError(f"network.init_from={path} is an {family} LoRA and the base model is {model.family}: "
                          "a LoRA continues only on the family it was trained for.")
    modules = networks.group_file_tensors(tensors)
    wanted, loaded = set(), 0
    for comp, module in lora_components(model).items():
        for mod_path, layer in networks.adapter_layers(module, ADAPTER_NAME).items():
            key = kohya_module_name(comp, mod_path, model.family, model.pipe.unet.config)
            wanted.add(key)
            if key not in modules:
                raise LoraNbError(f"network.init_from={path} has no {key}: it was trained on other modules "
                                  "(network.type or unet_targets, or the text encoder frozen there and trained here).")
            file_rank, file_alpha = networks.file_rank_alpha(modules[key])
            want_rank, want_alpha = networks.layer_rank_alpha(layer, ADAPTER_NAME)
            if "lokr_w2" not in modules[key] and (
                    file_rank != want_rank or abs(file_alpha - want_alpha) > 1e-6 * max(1.0, want_alpha)):
                raise LoraNbError(f"network.init_from={path} has rank {file_rank} / alpha {file_alpha:g} at {key}, "
                                  f"this run rank {want_rank} / alpha {want_alpha:g}: set network.rank and "
                                  "network.alpha (conv_rank / conv_alpha for 3x3 convolutions) to the file's.")
            networks.copy_file_tensors(layer, ADAPTER_NAME, modules[key], f"network.init_from={path}: {key}")
            loaded += 1
    extra = sorted(set(modules) - wanted)
    if extra:
        raise LoraNbError(f"network.init_from={path} holds {len(extra)} module(s) this run does not train (e.g. "
                          f"{extra[0]}): a text encoder trained there needs optimizer.text_encoder_lr > 0 here, "
                          "other modules the same network.unet_targets.")
    return loaded


# --------------------------------------------------------------------------- save

def save_lora(path: str | Path, model, alpha: float | None = None, fmt: str = "kohya", precision: str = "fp16",
              metadata: dict[str, str] | None = None) -> Path:
    """Save the model's ``default`` LoRA adapter(s) to ``path`` (a ``.safetensors`` file).

    ``fmt`` ``kohya`` (AUTOMATIC1111 / ComfyUI / diffusers) or ``diffusers``;
    ``precision`` fp16 / bf16 / fp32; ``metadata`` extra ``ss_*`` strings (LRs,
    epochs, steps, resolution, tag frequency as JSON ...). ``alpha`` defaults to the
    adapter's own and must match it when given. The file appears whole or not at
    all (written to a temporary file in the same folder, then renamed).
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise LoraNbError(f"save format {fmt!r} is not known: use one of {', '.join(FORMATS)}.")
    if precision not in PRECISIONS:
        raise LoraNbError(f"save_precision={precision!r} is not known: use one of {', '.join(PRECISIONS)}.")
    if path.suffix != ".safetensors":
        raise LoraNbError(f"{path}: LoRA files are saved as .safetensors; change the file name's extension.")
    comps = lora_components(model)
    if "unet" not in comps:
        raise LoraNbError("The model has no LoRA adapter to save: call add_lora(model, ...) (or train) first.")
    rank, alpha = _rank_and_alpha(comps, alpha)
    if fmt == "diffusers" and type(comps["unet"].peft_config[ADAPTER_NAME]).__name__ != "LoraConfig":
        raise LoraNbError("LoHa and LoKr files exist in the kohya/LyCORIS format only: use save.formats [kohya].")
    if fmt == "diffusers" and getattr(comps["unet"].peft_config[ADAPTER_NAME], "use_dora", False):
        raise LoraNbError("DoRA is saved in the kohya/LyCORIS format (dora_scale) only: use save.formats [kohya].")
    meta = _ss_metadata(model, comps, rank, alpha, metadata)
    dtype = PRECISIONS[precision]
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "kohya":
        _atomic_save_file(kohya_state_dict(model, dtype), path, meta)
    else:
        _save_diffusers(path, model, comps, dtype, meta)
    return path


def _rank_and_alpha(comps: dict, alpha: float | None) -> tuple[int, float]:
    cfg = comps["unet"].peft_config[ADAPTER_NAME]
    for name, mod in comps.items():
        other = mod.peft_config[ADAPTER_NAME]
        if (other.r, _config_alpha(other)) != (cfg.r, _config_alpha(cfg)) or getattr(other, "use_rslora", False):
            raise LoraNbError(f"The {name} LoRA has rank/alpha {other.r}/{_config_alpha(other)} (rsLoRA="
                              f"{getattr(other, 'use_rslora', False)}) but the UNet has {cfg.r}/{_config_alpha(cfg)}: "
                              "one rank and alpha (no rsLoRA) per file.")
    if alpha is not None and not math.isclose(float(alpha), float(_config_alpha(cfg))):
        raise LoraNbError(f"save_lora(alpha={alpha}) but the adapter was built with alpha={_config_alpha(cfg)}: "
                          "the file would not reproduce the model. Pass the alpha used in add_lora, or leave it out.")
    return int(cfg.r), float(_config_alpha(cfg))


def _config_alpha(peft_cfg) -> float:
    return float(peft_cfg.lora_alpha if hasattr(peft_cfg, "lora_alpha") else peft_cfg.alpha)


def network_args(peft_cfg) -> dict[str, str]:
    """``ss_network_args`` as sd-scripts (``conv_dim``/``conv_alpha``) and LyCORIS (``algo`` …) write them."""
    kind = type(peft_cfg).__name__
    args = {}
    if kind != "LoraConfig":
        args["algo"] = "loha" if kind == "LoHaConfig" else "lokr"
        if kind == "LoKrConfig":
            args["factor"] = str(peft_cfg.decompose_factor)
        for key in ("rank_dropout", "module_dropout"):
            if getattr(peft_cfg, key):
                args[key] = str(getattr(peft_cfg, key))
    else:
        if peft_cfg.lora_dropout:
            args["dropout"] = str(peft_cfg.lora_dropout)
        if getattr(peft_cfg, "use_dora", False):  # as LyCORIS writes a DoRA file (its algo "lora" has convolutions)
            args["algo"], args["dora_wd"] = "lora", "True"
    if peft_cfg.rank_pattern:
        args["conv_dim"] = str(next(iter(peft_cfg.rank_pattern.values())))
        args["conv_alpha"] = _fmt_number(next(iter(peft_cfg.alpha_pattern.values())))
    return args


def _ss_metadata(model, comps: dict, rank: int, alpha: float, extra: dict | None) -> dict[str, str]:
    args = network_args(comps["unet"].peft_config[ADAPTER_NAME])
    return ss_metadata(model.family, str(model.source), rank, alpha, any(n != "unet" for n in comps), extra, args)


def ss_metadata(family: str, source: str, rank: int, alpha: float, text_encoder_trained: bool,
                extra: dict | None = None, args: dict[str, str] | None = None) -> dict[str, str]:
    """The ``ss_*`` metadata strings of a kohya LoRA file (AUTOMATIC1111 shows them); ``args`` the
    network's ``ss_network_args`` (:func:`network_args`), which also decide ``ss_network_module``; an
    ``ss_network_args`` in ``extra`` (training settings sd-scripts passes as network args, such as the block LR
    weights) is merged into them."""
    args, extra = dict(args or {}), dict(extra or {})
    if "ss_network_args" in extra:
        args.update(json.loads(extra.pop("ss_network_args")))
    meta = {
        "ss_network_module": "lycoris.kohya" if "algo" in args else "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": _fmt_number(alpha),
        "ss_base_model_version": BASE_MODEL_VERSIONS.get(family, family),
        "ss_network_args": json.dumps(args),
        "ss_text_encoder_trained": str(text_encoder_trained),
        "ss_sd_model_name": Path(source).name if Path(source).exists() else source,
    }
    for key, value in (extra or {}).items():
        meta[str(key)] = value if isinstance(value, str) else json.dumps(value)
    return meta


def training_metadata(cfg, plan, tag_frequency: dict, dataset_dirs: dict | None = None,
                      reg_images: int = 0, buckets: dict | None = None) -> dict[str, str]:
    """The training half of the ``ss_*`` metadata (the settings a run used), as sd-scripts writes it.

    ``cfg`` is a :class:`lora_nb.config.Config`, ``plan`` its :class:`lora_nb.config.StepsPlan`,
    ``dataset_dirs`` ``{folder: {"n_repeats": r, "img_count": n}}``. The base model's name comes from
    :func:`ss_metadata` (a file name, never a local path); :func:`run_metadata` adds the session's
    id and times.
    """
    w, h = parse_resolution(cfg.dataset.resolution)
    d, t, o = cfg.dataset, cfg.training, cfg.optimizer
    dirs = dataset_dirs or {}
    return {
        "ss_v2": "False",
        "ss_learning_rate": str(o.learning_rate),
        "ss_unet_lr": str(o.effective_unet_lr),
        "ss_text_encoder_lr": str(o.text_encoder_lr),
        "ss_num_epochs": str(plan.epochs),
        "ss_max_train_steps": str(plan.total_steps),
        "ss_num_batches_per_epoch": str(plan.batches_per_epoch or plan.steps_per_epoch),
        "ss_batch_size_per_device": str(t.batch_size),
        "ss_gradient_accumulation_steps": str(t.gradient_accumulation_steps),
        "ss_total_batch_size": str(t.batch_size * t.gradient_accumulation_steps),
        "ss_full_fp16": str(t.full_precision_lora == "fp16"),
        "ss_full_bf16": str(t.full_precision_lora == "bf16"),
        "ss_resolution": f"({w}, {h})",
        "ss_enable_bucket": str(bool(d.enable_buckets)),
        "ss_lr_scheduler": o.lr_scheduler,
        "ss_lr_warmup_steps": str(o.warmup_steps_for(plan.total_steps)),
        "ss_optimizer": o.optimizer,
        "ss_max_grad_norm": str(o.max_grad_norm),
        "ss_mixed_precision": t.mixed_precision,
        "ss_gradient_checkpointing": str(bool(t.gradient_checkpointing)),
        "ss_seed": str(t.seed),
        "ss_clip_skip": str(cfg.network.clip_skip),
        "ss_noise_offset": str(t.noise_offset),
        "ss_min_snr_gamma": str(t.min_snr_gamma),
        "ss_debiased_estimation": str(bool(t.debiased_estimation)),
        "ss_min_timestep": str(t.min_timestep),  # sd-scripts takes these options but does not record them
        "ss_max_timestep": str(t.max_timestep),
        "ss_zero_terminal_snr": str(bool(t.zero_terminal_snr)),
        **({"ss_network_weights": Path(cfg.network.init_from).name} if cfg.network.init_from else {}),
        **({"ss_network_args": json.dumps(dict(zip(("down_lr_weight", "mid_lr_weight", "up_lr_weight"),
                                                  (_fmt_number(w) for w in cfg.network.block_lr_weights))))}
           if cfg.network.block_lr_weights else {}),
        "ss_multires_noise_iterations": str(t.multires_noise_iterations or None),
        "ss_multires_noise_discount": str(t.multires_noise_discount),
        "ss_ip_noise_gamma": str(t.ip_noise_gamma or None),
        "ss_loss_type": t.loss_type,
        "ss_huber_c": str(t.huber_c),
        "ss_huber_schedule": t.huber_schedule,
        "ss_caption_tag_dropout_rate": str(d.tag_dropout),
        "ss_caption_prefix": d.caption_prefix,
        "ss_caption_suffix": d.caption_suffix,
        "ss_masked_loss": str(bool(d.masked_loss)),
        "ss_shuffle_caption": str(bool(d.shuffle_caption)),
        "ss_keep_tokens": str(d.keep_tokens),
        "ss_max_token_length": str(d.max_token_length),
        "ss_caption_dropout_rate": str(d.caption_dropout),
        "ss_flip_aug": str(bool(d.flip_aug)),
        "ss_cache_latents": str(bool(d.cache_latents)),
        "ss_prior_loss_weight": str(d.prior_loss_weight),
        "ss_num_train_images": str(plan.samples_per_epoch),
        "ss_num_reg_images": str(reg_images),
        "ss_dataset_dirs": json.dumps(dirs, ensure_ascii=False),
        "ss_datasets": json.dumps([{"is_dreambooth": True, "batch_size_per_device": t.batch_size,
                                    "num_train_images": plan.samples_per_epoch, "num_reg_images": reg_images,
                                    "resolution": [w, h], "enable_bucket": bool(d.enable_buckets),
                                    "subsets": [{"image_dir": k, **v, "shuffle_caption": bool(d.shuffle_caption),
                                                 "keep_tokens": d.keep_tokens, "enable_wildcard": bool(d.enable_wildcard)}
                                                for k, v in dirs.items()]}], ensure_ascii=False),
        "ss_tag_frequency": json.dumps(tag_frequency, ensure_ascii=False),
        **({"ss_bucket_info": json.dumps({"buckets": {str(i): {"resolution": list(b), "count": n}
                                                      for i, (b, n) in enumerate(buckets.items())}})}
           if buckets else {}),
        "ss_output_name": cfg.save.output_name,
        "ss_training_comment": "trained with lora-nb",
    }


def run_metadata(session_id: int, started_at: float) -> dict[str, str]:
    """The keys sd-scripts uses to tie a run's files together: its session id and start time (Unix seconds)."""
    return {"ss_session_id": str(session_id), "ss_training_started_at": str(started_at)}


def legacy_model_hash(path: str | Path) -> str:
    """AUTOMATIC1111's old short hash of a checkpoint (sd-scripts' ``model_hash``): the first 8 hex digits of
    the SHA-256 of the 64 KiB at offset 1 MiB."""
    import hashlib

    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def file_sha256(path: str | Path) -> str:
    """SHA-256 of the whole file (the hash Civitai and AUTOMATIC1111 look a model up by)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def base_model_hashes(source: str, vae: str = "") -> dict[str, str]:
    """The base model's (and a separate VAE's) hashes as sd-scripts writes them, for a model given as one file;
    a folder or hub id has no single file to hash, so nothing. The name stays a file name (:func:`ss_metadata`)."""
    meta = {}
    for key, path in (("sd_model", source), ("vae", vae)):
        if path and Path(path).is_file():
            meta[f"ss_{key}_hash"] = legacy_model_hash(path)
            meta[f"ss_new_{key}_hash"] = file_sha256(path)
            if key == "vae":
                meta["ss_vae_name"] = Path(path).name
    return meta


MODELSPEC_ARCHITECTURES = {"sd15": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}


# The implementation a LoRA's keys follow, as sd-scripts names it: SDXL LoRAs the Stability AI repository's
# module names, SD1.5 LoRAs diffusers'.
MODELSPEC_IMPLEMENTATIONS = {"sd15": "diffusers", "sdxl": "https://github.com/Stability-AI/generative-models"}


def modelspec_metadata(family: str, title: str, resolution: tuple[int, int], prediction_type: str = "epsilon",
                       trigger: str = "", date: str | None = None, clip_skip: int | None = None,
                       timesteps: tuple[int, int] | None = None) -> dict[str, str]:
    """The Stability AI model-spec keys (``modelspec.*``) that UIs read to tell what a file is; the text
    encoder's layer (clip skip) and the trained timestep range as sd-scripts writes them, when given."""
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURES.get(family, f"{family}/lora"),
        "modelspec.implementation": MODELSPEC_IMPLEMENTATIONS.get(family, "diffusers"),
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
        "modelspec.date": date or time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if trigger:
        meta["modelspec.trigger_phrase"] = trigger
    if clip_skip:
        meta["modelspec.encoder_layer"] = str(clip_skip)
    if timesteps and tuple(timesteps) != (0, 1000):  # written only for a range narrower than all steps
        meta["modelspec.timestep_range"] = f"{timesteps[0]},{timesteps[1]}"
    return meta


def _fmt_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write through :func:`lora_nb.fsutil.atomic_path`: fsync, rename, a named disk-full error."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _save_diffusers(path: Path, model, comps: dict, dtype: torch.dtype, meta: dict[str, str]) -> None:
    """diffusers' ``save_lora_weights`` (with the peft configs, else alpha is lost on reload),
    into a temporary folder; then the ``ss_*`` metadata is added and the file renamed into place.

    The peft keys (``lora_A``/``lora_B``) are saved as they are: diffusers 0.42.1's
    ``convert_state_dict_to_diffusers`` only renames attention modules (``to_q.lora.down``,
    ``q_proj.lora_linear_layer.down``) and leaves proj_in/ff/fc1 as ``lora_A``; diffusers'
    loader then skips the renamed ones (48 of 72 modules on the tiny SD1.5 went missing).
    """
    from diffusers.training_utils import _collate_lora_metadata
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    kwargs = {}
    for name, module in comps.items():
        sd = get_peft_model_state_dict(module, adapter_name=ADAPTER_NAME)
        sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in sd.items()}
        kwargs[f"{name}_lora_layers"] = sd
    kwargs.update(_collate_lora_metadata(comps))

    with tempfile.TemporaryDirectory(prefix=".lora-save-", dir=path.parent) as tmpdir:
        try:
            type(model.pipe).save_lora_weights(tmpdir, weight_name="lora.safetensors", **kwargs)
        except Exception as exc:  # noqa: BLE001 - only a full disk is translated
            if is_disk_full(exc):
                raise DiskFullError(path) from None
            raise
        written = Path(tmpdir) / "lora.safetensors"
        with safe_open(str(written), framework="pt") as f:
            file_meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        _atomic_save_file(tensors, path, {**file_meta, **meta})


# --------------------------------------------------------------------------- read and inspect

def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a LoRA ``.safetensors`` file; clear errors for missing,
    pickle or unreadable files."""
    from safetensors import safe_open

    path = Path(path)
    _check_lora_path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for broken files
        raise LoraNbError(f"{path} is not a readable .safetensors file ({exc}). It may be truncated "
                          "(an interrupted download or save): download or save it again.") from None


def _check_lora_path(path: Path) -> None:
    if not path.exists():
        raise LoraNbError(f"LoRA file {path} does not exist: check the path (and the lora/ folder of the run).")
    if path.is_dir():
        raise LoraNbError(f"{path} is a folder: pass the .safetensors file inside it.")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraNbError(f"{path} is a pickle file, and unpickling can run code hidden in it. Use the "
                          ".safetensors version of this LoRA (most sites offer one), or convert it on a machine "
                          "you don't mind risking.")
    if path.suffix.lower() != ".safetensors":
        raise LoraNbError(f"{path} is not a .safetensors LoRA file.")


def file_format(keys) -> str:
    """``kohya``, ``diffusers`` (``unet.``/``text_encoder.`` prefixed peft keys) or ``unknown``."""
    keys = list(keys)
    if keys and all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        return "kohya"
    if keys and all(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in keys):
        return "diffusers"
    return "unknown"


def _component_of(key: str) -> str:
    for prefix, comp in (("lora_unet_", "unet"), ("lora_te2_", "text_encoder_2"), ("lora_te1_", "text_encoder"),
                         ("lora_te_", "text_encoder"), ("unet.", "unet"), ("text_encoder_2.", "text_encoder_2"),
                         ("text_encoder.", "text_encoder")):
        if key.startswith(prefix):
            return comp
    return "other"


def _down_keys(tensors: dict) -> list[str]:
    return [k for k in tensors if k.endswith((".lora_down.weight", ".lora_A.weight", ".lora.down.weight"))]


def _up_key(down_key: str) -> str:
    for a, b in ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"),
                 (".lora.down.weight", ".lora.up.weight")):
        if down_key.endswith(a):
            return down_key[: -len(a)] + b
    raise ValueError(down_key)


def _module_of(down_key: str) -> str:
    """``lora_unet_x.lora_down.weight`` -> ``lora_unet_x`` (also for ``.lora_A.weight``)."""
    return down_key.rsplit(".", 2)[0]


def _cross_attention_dim(tensors: dict) -> int | None:
    """Input width of an ``attn2`` key/value projection's down weight = the UNet's cross-attention dim."""
    for k in _down_keys(tensors):
        if _component_of(k) == "unet" and re.search(r"attn2[._]to[._][kv][._]", k):
            return int(tensors[k].shape[1])
    return None


def _text_widths(tensors: dict) -> dict[str, int]:
    """Hidden width per text encoder, from a q_proj down weight."""
    widths = {}
    for k in _down_keys(tensors):
        comp = _component_of(k)
        if comp.startswith("text_encoder") and re.search(r"q[._]proj", k) and comp not in widths:
            widths[comp] = int(tensors[k].shape[1])
    return widths


def guess_family(tensors: dict, metadata: dict[str, str]) -> str:
    """``sdxl``, ``sd15``, ``sd2`` or ``unknown``: a second text encoder or LDM block names mean
    SDXL; else the ``ss_base_model_version`` metadata; else the cross-attention width
    (768 SD1.x, 1024 SD2, 2048 SDXL)."""
    if any(_component_of(k) == "text_encoder_2" for k in tensors):
        return "sdxl"
    if any(k.startswith("lora_unet_") and re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_", k)
           for k in tensors):
        return "sdxl"
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl"):
        return "sdxl"
    if version.startswith("sd_v1"):
        return "sd15"
    if version.startswith("sd_v2"):
        return "sd2"
    dim = _cross_attention_dim(tensors)
    guessed = {768: "sd15", 1024: "sd2", 2048: "sdxl"}.get(dim)
    if guessed:
        return guessed
    if any(_component_of(k) == "text_encoder" for k in tensors):
        return "sd15"
    return "unknown"


def inspect_lora(path: str | Path) -> dict:
    """What a LoRA file holds: format, network type, family, rank, alpha, module counts per component (and
    how many are 3x3 convolutions), dtype, size, metadata (``ss_*`` and others) and problems (NaN/Inf,
    all-zero up weights)."""
    path = Path(path)
    tensors, metadata = read_lora_file(path)
    modules = _adapter_modules(tensors)
    if not modules:
        raise LoraNbError(f"{path} is not a LoRA file: no lora_down/lora_up, lora_A/lora_B, hada_* or lokr_* keys "
                          f"among its {len(tensors)} tensor(s) (a full model checkpoint is a base model, not a LoRA).")
    fmt = file_format(tensors)
    counts: dict[str, int] = {}
    ranks, alphas, problems, conv = set(), set(), [], 0
    grouped = networks.group_file_tensors(tensors) if fmt == "kohya" else {}
    for k in (_down_keys(tensors) if fmt != "kohya" else []):
        grouped[_module_of(k)] = {"lora_down.weight": tensors[k], "lora_up.weight": tensors[_up_key(k)]}
    for module in modules:
        parts = grouped[module]
        comp = _component_of(module)
        counts[comp] = counts.get(comp, 0) + 1
        found = _module_problems(module, parts)
        problems += found
        if any(not p.startswith("all-zero") for p in found):
            continue  # a malformed module has no rank or alpha to report
        shapes = [t.shape for n, t in parts.items() if n != "alpha"]
        conv += any(len(s) == 4 and s[-1] > 1 for s in shapes) or ("lora_down.weight" not in parts
                                                                    and _is_conv_hada(module))
        r, alpha = networks.file_rank_alpha(parts)
        ranks.add(r)
        if "alpha" in parts:
            alphas.add(alpha)
    for k, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t.float()).all()):
            problems.append(f"NaN/Inf values in {k} (the LoRA is broken: training diverged, retrain with a lower "
                            "learning rate or fp32/bf16)")
    if not alphas:
        found, odd = _alphas_from_metadata(metadata)
        alphas |= found
        problems += odd
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})
    return {
        "path": str(path),
        "format": fmt,
        "network": networks.network_type_of_file(tensors) if fmt == "kohya" else "lora",
        "family": guess_family(tensors, metadata),
        "rank": _single_or_list(ranks),
        "alpha": _single_or_list(alphas),
        "modules": counts,
        "modules_total": sum(counts.values()),
        "conv_modules": int(conv),
        "dora": sum(1 for k in tensors if k.endswith(".dora_scale")),
        "dora_axis": _dora_axes(tensors),
        "tensors": len(tensors),
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "size_bytes": path.stat().st_size,
        "metadata": metadata,
        "problems": problems,
    }


# The kohya names of the UNet's 3x3 convolutions (diffusers names for SD1.x, LDM names for SDXL).
CONV3X3_NAME = re.compile(r"lora_unet_(?:.*_resnets_\d+_conv[12]|.*_in_layers_2|.*_out_layers_3|.*samplers_0_conv"
                          r"|input_blocks_\d+_0_op|output_blocks_\d+_\d+_conv|conv_in|conv_out|input_blocks_0_0|out_2)$")


def _is_conv_hada(module: str) -> bool:
    """A LoHa/LoKr module on a 3x3 convolution: their tensors are flattened matrices, so the name tells."""
    return bool(CONV3X3_NAME.match(module))


def _module_problems(module: str, parts: dict) -> list[str]:
    problems = []
    alpha = parts.get("alpha")
    if alpha is not None and alpha.numel() != 1:
        problems.append(f"{module}.alpha has {alpha.numel()} values: alpha is one number per module")
    for name in ("lora_down.weight", "lora_up.weight"):
        if name in parts and parts[name].dim() not in (2, 4):
            problems.append(f"{module}.{name} has shape {list(parts[name].shape)}: a LoRA weight is [rank, in] or "
                            "[rank, in, kh, kw]")
    zero_at = [n for n in ("lora_up.weight", "hada_w1_a", "hada_w2_a", "lokr_w1", "lokr_w1_a") if n in parts
               and not bool(parts[n].float().abs().sum() > 0)]
    if zero_at:
        problems.append(f"all-zero up weight: {module} (this module does nothing; untrained?)")
    return problems


def _alphas_from_metadata(metadata: dict[str, str]) -> tuple[set[float], list[str]]:
    """diffusers files keep alpha in their peft configs (``lora_adapter_metadata``): the alphas found there, and
    a problem line for each value that is not one number (a loader would fail on it or ignore it)."""
    if "lora_adapter_metadata" not in metadata:
        return set(), []
    try:
        packed = json.loads(metadata["lora_adapter_metadata"])
    except json.JSONDecodeError:
        return set(), ["metadata lora_adapter_metadata is not valid JSON: loaders cannot read the alpha from it"]
    if not isinstance(packed, dict):
        return set(), ["metadata lora_adapter_metadata is not a mapping of settings: loaders cannot read the alpha"]
    found, problems = set(), []
    for k, v in packed.items():
        if not str(k).endswith(".lora_alpha"):
            continue
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            found.add(float(v))
        else:
            problems.append(f"metadata lora_adapter_metadata {k} is {v!r}, not a number: a loader fails on it or "
                            "ignores it (alpha = rank)")
    return found, problems


def _single_or_list(values: set):
    if not values:
        return None
    return next(iter(values)) if len(values) == 1 else sorted(values)


def _dora_axes(tensors: dict) -> str | None:
    axes = {networks.dora_axis(parts) for parts in networks.group_file_tensors(tensors).values()
            if networks.DORA_TENSOR in parts}
    return " and ".join(sorted(axes)) or None


def format_inspection(info: dict) -> str:
    """A human-readable report of :func:`inspect_lora`'s result."""
    size_mb = info["size_bytes"] / 1e6
    lines = [
        f"LoRA file: {info['path']} ({size_mb:.2f} MB)",
        f"  format:   {info['format']}    network: {info.get('network', 'lora')}"
        + (f" ({info['conv_modules']} on 3x3 convolutions)" if info.get("conv_modules") else "")
        + (f", DoRA on {info['dora']} modules ({info.get('dora_axis')}; lora-nb and LyCORIS read it per output "
           "row, AUTOMATIC1111 per input column)" if info.get("dora") else ""),
        f"  family:   {info['family']}",
        f"  rank:     {info['rank']}    alpha: {info['alpha']}",
        f"  dtype:    {info['dtype']}    tensors: {info['tensors']}",
        "  modules:  " + ", ".join(f"{k} {v}" for k, v in info["modules"].items()) + f" (total {info['modules_total']})",
    ]
    meta = {k: v for k, v in info["metadata"].items() if k != "lora_adapter_metadata"}
    if meta:
        lines.append("  metadata:")
        for key in sorted(meta):
            value = meta[key]
            lines.append(f"    {key}: {value if len(value) <= 100 else value[:97] + '...'}")
    if info["problems"]:
        lines.append(f"  PROBLEMS ({len(info['problems'])}):")
        lines += [f"    - {p}" for p in info["problems"][:20]]
        if len(info["problems"]) > 20:
            lines.append(f"    ... and {len(info['problems']) - 20} more")
    else:
        lines.append("  problems: none found (no NaN/Inf, no all-zero up weights)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- load for inference

def load_lora(pipe, path: str | Path, adapter_name: str = "lora", strength: float = 1.0) -> dict[str, int]:
    """Load a LoRA file (kohya or diffusers format) into ``pipe`` as ``adapter_name`` at ``strength``.

    Checks first that the file fits the pipeline (an SDXL LoRA on SD1.5 and the like),
    then loads with diffusers and verifies that every module in the file was applied.
    Loading again under the same name replaces the earlier adapter. Returns the
    number of LoRA modules loaded per component.
    """
    path = Path(path)
    tensors, metadata = read_lora_file(path)
    _check_fits_pipeline(pipe, path, tensors, metadata)
    expected = _expected_counts(tensors)
    _delete_adapter_if_present(pipe, adapter_name)
    network_type = networks.network_type_of_file(tensors)
    dora = any(k.endswith("." + networks.DORA_TENSOR) for k in tensors)
    if file_format(tensors) == "kohya":
        networks.check_loadable(path.name, networks.group_file_tensors(tensors))
    try:
        if networks.is_lycoris(network_type) or dora:  # diffusers loads plain LoRA; these are built module by module
            _load_lycoris(pipe, path, tensors, adapter_name, network_type)
        else:
            pipe.load_lora_weights(str(path), adapter_name=adapter_name)
    except (ValueError, KeyError, RuntimeError, LoraNbError) as exc:
        _delete_adapter_if_present(pipe, adapter_name)
        if isinstance(exc, LoraNbError):
            raise
        raise LoraNbError(f"diffusers could not load {path.name}: {str(exc)[:400]}. The file may come from another "
                          "base model, or use a LoRA variant (DoRA, Tucker convolutions) this course does not "
                          "load.") from None
    loaded = _loaded_counts(pipe, adapter_name)
    missing = {c: n - loaded.get(c, 0) for c, n in expected.items() if loaded.get(c, 0) != n}
    if missing:
        _delete_adapter_if_present(pipe, adapter_name)
        raise LoraNbError(f"{path.name}: some LoRA modules were not loaded (per component, file vs loaded: "
                          + ", ".join(f"{c} {expected[c]} vs {loaded.get(c, 0)}" for c in missing)
                          + "). The file's key names don't match this model: was it made for another base model?")
    set_lora_strength(pipe, adapter_name, strength)
    return loaded


def _load_lycoris(pipe, path: Path, tensors: dict, adapter_name: str, network_type: str) -> None:
    """Load a LoHa, LoKr or DoRA file: each module's peft layer is built at the file's rank, alpha, factors
    and DoRA, and its tensors copied in (:mod:`lora_nb.networks`)."""
    modules = networks.group_file_tensors(tensors)
    networks.check_loadable(path.name, modules)
    comps = _pipe_components(pipe)
    family = "sdxl" if "text_encoder_2" in comps else "sd15"
    names = kohya_names(family, pipe.unet.config, comps)
    unknown = sorted(n for n in modules if n not in names)
    if unknown:
        raise LoraNbError(f"{path.name}: {len(unknown)} module(s) are not in this model (e.g. {unknown[0]}): "
                          "was it made for another base model?")
    per_comp: dict[str, dict] = {}
    for name, parts in modules.items():
        comp, mod_path = names[name]
        per_comp.setdefault(comp, {})[mod_path] = (name, parts)
    for comp, mods in per_comp.items():
        cfg = networks.peft_config_for_file(network_type, {p: parts for p, (_, parts) in mods.items()},
                                            {p: comps[comp].get_submodule(p) for p in mods})
        comps[comp].add_adapter(cfg, adapter_name=adapter_name)
        layers = networks.adapter_layers(comps[comp], adapter_name)
        for mod_path, (name, parts) in mods.items():
            networks.copy_file_tensors(layers[mod_path], adapter_name, parts, f"{path.name}: {name}")


def set_lora_strength(pipe, adapter_name: str, strength: float) -> None:
    """Set how strongly a loaded LoRA acts (0 = off, 1 = as trained) on the UNet and text encoder(s)."""
    pipe.set_adapters([adapter_name], adapter_weights=[float(strength)])


def _delete_adapter_if_present(pipe, adapter_name: str) -> None:
    present = set()
    for comp in _pipe_components(pipe).values():
        present |= set(getattr(comp, "peft_config", None) or {})
    if adapter_name in present:
        pipe.delete_adapters(adapter_name)


def _pipe_components(pipe) -> dict[str, torch.nn.Module]:
    names = ("unet", "text_encoder", "text_encoder_2")
    return {n: getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None}


def _expected_counts(tensors: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in _adapter_modules(tensors):
        comp = _component_of(name)
        counts[comp] = counts.get(comp, 0) + 1
    return counts


def _adapter_modules(tensors: dict) -> list[str]:
    """The module names of a file that carry an adapter (LoRA, LoHa or LoKr tensors)."""
    return sorted({k.split(".", 1)[0] for k in tensors if networks.tensor_kind(k) in ("lora", "loha", "lokr")}
                  if file_format(tensors) == "kohya" else {_module_of(k) for k in _down_keys(tensors)})


def _loaded_counts(pipe, adapter_name: str) -> dict[str, int]:
    counts = {}
    for name, comp in _pipe_components(pipe).items():
        n = len(networks.adapter_layers(comp, adapter_name))
        if n:
            counts[name] = n
    return counts


def _check_fits_pipeline(pipe, path: Path, tensors: dict, metadata: dict) -> None:
    """Raise a clear error when the LoRA was made for another model family or size."""
    pipe_family = "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd15"
    file_family = guess_family(tensors, metadata)
    fmt = file_format(tensors)
    if fmt == "unknown":
        raise LoraNbError(f"{path.name} is not a kohya- or diffusers-format LoRA (unexpected key names such as "
                          f"{next(iter(tensors), '<none>')!r}). LyCORIS/LoHa files are not supported here.")
    want = pipe.unet.config.cross_attention_dim
    have = _cross_attention_dim(tensors)
    mismatch = have is not None and have != want
    if file_family in ("sd15", "sd2", "sdxl") and (file_family == "sdxl") != (pipe_family == "sdxl"):
        mismatch = True
    for comp, width in _text_widths(tensors).items():
        enc = getattr(pipe, comp, None)
        if enc is None or enc.config.hidden_size != width:
            mismatch = True
    if mismatch:
        raise LoraNbError(
            f"{path.name} was made for {file_family} (cross-attention width {have}), but this pipeline is "
            f"{pipe_family} (width {want}). A LoRA only works on the model family it was trained on: "
            "pick a LoRA for this base model, or load the matching base model.")
