"""LoRA training: one function, used by the notebooks and the command line.

The loop follows the order every diffusers reader knows: (cached) latents →
noise at a random timestep → UNet with LoRA, conditioned on caption embeddings
→ MSE against the target (noise or velocity, optional min-SNR weight) →
backward into the LoRA parameters only → optimizer and LR schedule → an event
for whoever watches (a live plot, a progress bar, ``metrics.jsonl``).

It runs on accelerate, so the same code trains on a CPU, one GPU, or several
GPUs under ``accelerate launch``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from lora_nb import LoraNbError
from lora_nb.config import (Config, StepsPlan, check_against_dataset, check_against_model, check_config,
                            parse_resolution, plan_steps, raise_for_errors)
from lora_nb.captions import shuffle_caption
from lora_nb.dataset import Item, load_training_image, scan_dataset
from lora_nb.latent_cache import LatentCache


class TrainingStopped(LoraNbError):
    """Training stopped on purpose (non-finite loss, out of memory); saved files are intact."""


@dataclass
class Event:
    kind: str  # "start", "step", "epoch", "sample", "save", "done", "warning", "info"
    step: int = 0
    epoch: int = 0
    data: dict = field(default_factory=dict)


@dataclass
class TrainResult:
    files: list[Path]
    final: Path | None
    workspace: Path
    plan: StepsPlan
    steps: int
    seconds: float
    resumed_from_epoch: int = 0
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------- helpers

def reset_accelerate_state() -> None:
    """accelerate allows one state per process; reset it so a notebook can train twice."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def effective_precision(requested: str) -> str:
    """What will really run: fp16 falls back to fp32 ("no") without a CUDA GPU."""
    if requested == "fp16" and not torch.cuda.is_available():
        return "no"
    return requested


def config_fingerprint(cfg: Config) -> str:
    """Hash of the settings that change the result (not epochs/sample/save cadence)."""
    d = cfg.to_dict()
    d["training"] = {k: v for k, v in d["training"].items() if k not in ("epochs", "max_steps")}
    d.pop("sample")
    d["save"] = {}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_prompts(model, captions: list[str], clip_skip: int = 1, device=None, text_encoders: list | None = None):
    """Caption embeddings as the pipelines compute them: (prompt_embeds, pooled or None).

    SD1.x: the text encoder's last hidden state (``clip_skip`` > 1: an earlier
    layer, through the final layer norm). SDXL: the penultimate hidden states
    of both encoders, concatenated, and the second encoder's pooled output.
    ``text_encoders`` replaces the model's own (the distributed wrappers while training).
    """
    device = device or model.pipe.unet.device
    encoders = text_encoders or model.text_encoders
    if model.family == "sd15":
        te = encoders[0]
        ids = tokenize(model.pipe.tokenizer, captions).to(device)
        out = te(ids, output_hidden_states=clip_skip > 1)
        if clip_skip > 1:
            hidden = out.hidden_states[-clip_skip]
            inner = model.text_encoders[0]
            final_norm = inner.text_model.final_layer_norm if hasattr(inner, "text_model") else inner.final_layer_norm
            return final_norm(hidden), None
        return out[0], None
    embeds, pooled = [], None
    for tok, te in zip(model.tokenizers, encoders):
        ids = tokenize(tok, captions).to(device)
        out = te(ids, output_hidden_states=True)
        embeds.append(out.hidden_states[-(clip_skip + 1)])
        pooled = out[0]
    return torch.cat(embeds, dim=-1), pooled


def sdxl_time_ids(original_hw, crop_tl, target_hw) -> torch.Tensor:
    return torch.tensor(list(original_hw) + list(crop_tl) + list(target_hw), dtype=torch.float32)


def epoch_order(items_repeats: list[int], epoch: int, seed: int) -> list[int]:
    """Indices of one epoch: each item repeated, shuffled by (seed, epoch) alone so resuming replays it."""
    order = [i for i, r in enumerate(items_repeats) for _ in range(r)]
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


def loss_weights(noise_scheduler, timesteps, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ weights per sample (1 when γ is 0)."""
    if not gamma:
        return torch.ones_like(timesteps, dtype=torch.float32)
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


# ------------------------------------------------------------------------- the data

@dataclass
class Sample:
    item: Item
    pixels: list[np.ndarray]  # one per flip variant (uncached path)
    latents: list[torch.Tensor] | None
    time_ids: list[torch.Tensor]


def prepare_samples(items: list[Item], size: tuple[int, int], model, flip_aug: bool, cache: bool,
                    seed: int, device, desc: str = "Caching latents", disk_cache=None) -> list[Sample]:
    """Load each image once; with ``cache`` encode it with the VAE once (and its flip when flip_aug).

    ``disk_cache`` (a :class:`lora_nb.latent_cache.LatentCache`) keeps the VAE's output between runs:
    images already there are not even opened. The latent noise is drawn here from ``seed`` either
    way, so a run from the disk cache trains exactly like one that encodes in memory.
    """
    from tqdm.auto import tqdm

    vae = model.pipe.vae
    gen = torch.Generator().manual_seed(seed)
    flips = (False, True) if flip_aug else (False,)
    store = disk_cache if cache else None
    out = []
    for item in tqdm(items, desc=desc if cache else "Loading images", leave=False, disable=len(items) < 8):
        key = store.key(item.image, size, flips) if store else ""
        stored = store.read(key, len(flips)) if store else None
        pix, lat, tids, encoded = [], [], [], []
        for v, flip in enumerate(flips):
            if stored:
                mean, std, tid = stored[v]["mean"].to(device), stored[v]["std"].to(device), stored[v]["time_ids"]
            else:
                arr, orig_hw, crop_tl = load_training_image(item.image, size, flip)
                tid = sdxl_time_ids(orig_hw, crop_tl, (size[1], size[0]))
                if cache:
                    with torch.no_grad():
                        dist = vae.encode(torch.from_numpy(arr)[None].to(device, vae.dtype)).latent_dist
                    mean, std = dist.mean[0], dist.std[0]
                    encoded.append({"mean": mean, "std": std, "time_ids": tid})
                else:
                    pix.append(arr)
            tids.append(tid)
            if cache:
                noise = torch.randn(mean.shape, generator=gen).to(device, mean.dtype)
                lat.append((mean + std * noise).float().cpu())
        if store and not stored:
            store.write(key, encoded, item.image)
        out.append(Sample(item, pix, lat if cache else None, tids))
    return out


def frozen_parts(model, latents_cached: bool, text_cached: bool) -> list:
    """The modules a training step no longer needs once the data is cached: the VAE when latents are,
    the text encoders when their outputs are (which implies they are frozen)."""
    return ([model.pipe.vae] if latents_cached else []) + (list(model.text_encoders) if text_cached else [])


@contextlib.contextmanager
def modules_on(modules: list, device):
    """Move ``modules`` to ``device`` for the block, and back to where each one was afterwards."""
    homes = [next(m.parameters()).device for m in modules]
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m, home in zip(modules, homes):
            m.to(home)


def latent_cache_dir(cfg: Config) -> Path:
    """``dataset.cache_dir``, or ``<save.output_dir>/cache`` when it is empty."""
    return Path(cfg.dataset.cache_dir) if cfg.dataset.cache_dir else Path(cfg.save.output_dir) / "cache"


def latents_of(model, samples: list[Sample], variants: list[int], device, gen) -> torch.Tensor:
    """Latents for a batch (from the cache, or encoded now), scaled for the UNet."""
    vae = model.pipe.vae
    if samples[0].latents is not None:
        lat = torch.stack([s.latents[v] for s, v in zip(samples, variants)]).to(device)
    else:
        x = torch.from_numpy(np.stack([s.pixels[v] for s, v in zip(samples, variants)])).to(device, vae.dtype)
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
            noise = torch.randn(dist.mean.shape, generator=gen).to(device, dist.mean.dtype)
            lat = (dist.mean + dist.std * noise).float()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (lat - shift) * vae.config.scaling_factor


# ------------------------------------------------------------------------- fixed-noise validation

def fixed_noise_loss(model, latents: torch.Tensor, embeds: torch.Tensor, pooled, time_ids, noise_scheduler,
                     prediction_type: str, seed: int = 1234, timesteps=(100, 300, 500, 700, 900)) -> float:
    """The validation loss: same latents, noise and timesteps every time, so epochs compare.

    ``latents`` are already scaled; every latent is evaluated at each of ``timesteps``.
    """
    unet = model.pipe.unet
    device = latents.device
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    with torch.no_grad():
        for t in timesteps:
            noise = torch.randn(latents.shape, generator=gen).to(device, latents.dtype)
            ts = torch.full((latents.shape[0],), t, device=device, dtype=torch.long)
            noisy = noise_scheduler.add_noise(latents, noise, ts)
            target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, ts)
            kwargs = {}
            if pooled is not None:
                kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
            pred = unet(noisy.to(unet.dtype), ts, embeds.to(unet.dtype), **kwargs).sample
            total += F.mse_loss(pred.float(), target.float(), reduction="sum").item()
            count += target.numel()
    return total / count


# ------------------------------------------------------------------------- the trainer

def train(cfg: Config, on_event: Callable[[Event], None] | None = None, model=None, resume: bool = True,
          progress: bool = True, _fault: Callable[[int], None] | None = None) -> TrainResult:
    """Train a LoRA as ``cfg`` says; return the files written.

    ``on_event`` receives :class:`Event` s (step loss and LR, epoch ends with the
    validation loss, sample images, saved files). ``model`` may be a loaded
    :class:`lora_nb.models.BaseModel` to reuse (it is modified: the LoRA is
    attached). With ``resume`` a rerun continues from the last saved state in
    ``<workspace>/state`` when the settings match. ``_fault`` is a test hook
    called before each step.

    Running out of GPU memory anywhere (loading, caching latents, a step) stops
    with :class:`TrainingStopped` listing the memory savers; a full disk with a
    :class:`LoraNbError` naming the file. Files saved before either stay intact.
    """
    from lora_nb.fsutil import is_disk_full

    try:
        return _train(cfg, on_event, model, resume, progress, _fault)
    except torch.cuda.OutOfMemoryError:
        raise TrainingStopped(out_of_memory_advice(cfg)) from None
    except OSError as exc:
        if is_disk_full(exc):
            raise LoraNbError(f"The disk is full ({exc.filename or cfg.save.output_dir}): files saved before are "
                              "intact. Free some space (delete old runs or LoRA files) and run again; training "
                              "resumes from the last save.") from None
        raise


def _train(cfg: Config, on_event: Callable[[Event], None] | None = None, model=None, resume: bool = True,
           progress: bool = True, _fault: Callable[[int], None] | None = None) -> TrainResult:
    """The body of :func:`train` (which turns out-of-memory and full-disk errors into clear messages)."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from lora_nb import lora_io
    from lora_nb.models import load_base_model
    from lora_nb.optim import build_optimizer, build_scheduler

    emit = on_event or (lambda e: None)
    t_start = time.time()
    warnings = [str(p) for p in raise_for_errors(check_config(cfg))]

    # ---- data (before any heavy work: bad datasets fail fast)
    scan = scan_dataset(cfg.dataset.dir, cfg.dataset.caption_extension, cfg.dataset.repeats, cfg.dataset.trigger_word)
    warnings += scan.warnings
    items = scan.items
    val_items: list[Item] = []
    if cfg.dataset.validation_split:
        order = list(range(len(items)))
        random.Random(cfg.training.seed).shuffle(order)
        held = set(order[: cfg.dataset.validation_split])
        val_items = [it for i, it in enumerate(items) if i in held]
        items = [it for i, it in enumerate(items) if i not in held]
    raise_for_errors(check_against_dataset(cfg, len(items), cfg.dataset.dir))
    reg_items: list[Item] = []
    if cfg.dataset.reg_dir:
        reg_items = scan_dataset(cfg.dataset.reg_dir, cfg.dataset.caption_extension, None, "", is_reg=True).items
        if not reg_items:
            raise LoraNbError(f"dataset.reg_dir={cfg.dataset.reg_dir!r} holds no images: add 10–20 class images or clear the setting.")
    folders = [(sum(1 for it in items if it.folder == f), r) for f, r in
               dict.fromkeys((it.folder, it.repeats) for it in items)]
    plan = plan_steps(folders, cfg.training.batch_size, cfg.training.epochs, cfg.save.every_n_epochs,
                      bool(reg_items), cfg.training.max_steps)

    # ---- accelerator and model
    precision = effective_precision(cfg.training.mixed_precision)
    reset_accelerate_state()
    # cpu=True without a GPU: several processes then train data-parallel over gloo (MULTI_CPU)
    accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
    device = accelerator.device
    if model is None:
        model = load_base_model(cfg.model.source, cfg.model.family, allow_pickle=cfg.model.allow_pickle)
    raise_for_errors(check_against_model(cfg, model.size_multiple, model.family))
    pipe = model.pipe
    size = parse_resolution(cfg.dataset.resolution)
    prediction_type = (cfg.model.prediction_type if cfg.model.prediction_type != "auto"
                       else pipe.scheduler.config.get("prediction_type", "epsilon"))
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    for module in [pipe.unet] + model.text_encoders:
        module.requires_grad_(False)
        module.to(device)
        if weight_dtype != torch.float32:
            module.to(dtype=weight_dtype)
    pipe.vae.requires_grad_(False)
    pipe.vae.to(device)  # kept in fp32: the SDXL VAE overflows in fp16

    train_te = cfg.optimizer.text_encoder_lr > 0
    torch.manual_seed(cfg.training.seed)  # the LoRA's random init: same seed, same LoRA, in any process
    lora_io.add_lora(model, cfg.network.rank, cfg.network.alpha, unet_targets=cfg.network.unet_targets,
                     train_text_encoder=train_te)
    if precision != "no":
        from diffusers.training_utils import cast_training_params

        cast_training_params([pipe.unet] + (model.text_encoders if train_te else []), dtype=torch.float32)
    if cfg.training.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        if train_te:
            for te in model.text_encoders:
                te.gradient_checkpointing_enable()

    # ---- cache latents and (when the text encoder is frozen and captions fixed) embeddings
    seed = cfg.training.seed
    cache_latents = cfg.dataset.cache_latents
    disk = LatentCache.for_vae(latent_cache_dir(cfg), pipe.vae) if cfg.dataset.cache_latents_to_disk else None
    samples = prepare_samples(items, size, model, cfg.dataset.flip_aug, cache_latents, seed, device,
                              disk_cache=disk)
    reg_samples = prepare_samples(reg_items, size, model, cfg.dataset.flip_aug, cache_latents, seed + 1, device,
                                  "Caching regularization latents", disk_cache=disk)
    val_samples = prepare_samples(val_items, size, model, False, True, seed + 2, device, "Caching validation latents",
                                  disk_cache=disk)
    cache_text = {"yes": True, "no": False}.get(cfg.dataset.cache_text_embeddings,
                                                not train_te and not cfg.dataset.shuffle_caption)
    if cfg.dataset.cache_text_embeddings == "yes" and (train_te or cfg.dataset.shuffle_caption):
        warnings.append("dataset.cache_text_embeddings=yes is ignored: the text encoder trains or captions are "
                        "shuffled, so embeddings change every step.")
        cache_text = False
    text_cache: dict[str, tuple] = {}

    def embed(captions: list[str]):
        if cache_text:
            missing = [c for c in dict.fromkeys(captions) if c not in text_cache]
            if missing:
                with torch.no_grad():
                    e, p = encode_prompts(model, missing, cfg.network.clip_skip, device)
                for i, c in enumerate(missing):
                    text_cache[c] = (e[i], None if p is None else p[i])
            e = torch.stack([text_cache[c][0] for c in captions])
            p = None if model.family == "sd15" else torch.stack([text_cache[c][1] for c in captions])
            return e, p
        with torch.set_grad_enabled(train_te):
            return encode_prompts(model, captions, cfg.network.clip_skip, device, text_encoders_train)

    # ---- optimizer and schedule
    unet_lr = cfg.optimizer.effective_unet_lr
    unet_params = [p for p in pipe.unet.parameters() if p.requires_grad]
    te_params = [p for te in model.text_encoders for p in te.parameters() if p.requires_grad] if train_te else []
    trained = unet_params + te_params
    groups = [{"params": unet_params, "lr": unet_lr, "name": "unet"}]
    if te_params:
        groups.append({"params": te_params, "lr": cfg.optimizer.text_encoder_lr, "name": "text_encoder"})
    optimizer = build_optimizer(cfg.optimizer.optimizer, groups, cfg.optimizer.weight_decay)
    lr_scheduler = build_scheduler(cfg.optimizer.lr_scheduler, optimizer, cfg.optimizer.lr_warmup_steps,
                                   plan.total_steps, cfg.optimizer.lr_restarts, cfg.optimizer.lr_power)
    prepared = accelerator.prepare(pipe.unet, *(model.text_encoders if train_te else []), optimizer)
    unet_train, optimizer = prepared[0], prepared[-1]
    text_encoders_train = list(prepared[1:-1]) or None

    # ---- workspace and resume
    ws = Path(cfg.save.output_dir)
    (ws / "lora").mkdir(parents=True, exist_ok=True)
    state_dir = ws / "state"
    if accelerator.is_main_process:
        from lora_nb.fsutil import remove_stale_temp_files

        for folder in (ws, ws / "lora", state_dir, ws / "samples"):
            remove_stale_temp_files(folder)  # left by a killed run (the complete files are untouched)
    fingerprint = config_fingerprint(cfg)
    start_epoch, global_step = 0, 0
    if resume and cfg.save.save_state:
        loaded = load_state(state_dir, fingerprint, model, optimizer, lr_scheduler, train_te)
        if loaded:
            start_epoch, global_step = loaded
    if start_epoch == 0 and accelerator.is_main_process:
        moved_to = archive_previous_run(ws, cfg.save.output_name, fingerprint)
        if moved_to:
            warnings.append(f"{ws} held a run with other settings: its LoRA files, metrics, samples and state were "
                            f"moved to {moved_to} (nothing is overwritten). Delete that folder when you no longer "
                            "need it.")
    accelerator.wait_for_everyone()
    metrics_path = ws / "metrics.jsonl"
    trim_metrics(metrics_path, global_step)
    cfg.write_yaml(ws / "train_config.yaml")

    is_main = accelerator.is_main_process
    metadata = training_metadata(cfg, model, plan, scan.tag_frequency, unet_lr)
    files: list[Path] = sorted((ws / "lora").glob(f"{cfg.save.output_name}-e*.safetensors")) if start_epoch else []
    emit(Event("start", global_step, start_epoch, {"plan": plan, "warnings": warnings, "precision": precision,
                                                     "resumed_from_epoch": start_epoch, "device": str(device)}))
    for w in warnings:
        emit(Event("warning", data={"message": w}))

    val_data = None
    if val_samples:
        lat = latents_of(model, val_samples, [0] * len(val_samples), device, None)
        with torch.no_grad():
            e, p = encode_prompts(model, [s.item.caption for s in val_samples], cfg.network.clip_skip, device)
        tids = torch.stack([s.time_ids[0] for s in val_samples]).to(device)
        val_data = (lat, e, p, tids)

    # ---- with everything cached, the VAE (and the frozen text encoders) leave the GPU until sampling
    if cache_text:  # every caption a step can use, encoded now (in small batches)
        todo = list(dict.fromkeys([s.item.caption for s in samples + reg_samples] +
                                  ([""] if cfg.dataset.caption_dropout else [])))
        with accelerator.autocast():
            for i in range(0, len(todo), 32):
                embed(todo[i:i + 32])
    idle = frozen_parts(model, cache_latents, cache_text) if device.type != "cpu" else []
    if idle:
        for m in idle:
            m.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        emit(Event("info", data={"message": "cached: " + ", ".join(type(m).__name__ for m in idle) +
                                 " moved off the GPU until sampling"}))

    # ---- the loop
    total_epochs = plan.epochs
    bar = tqdm(total=plan.total_steps, initial=global_step, desc="Training", disable=not (progress and is_main))
    world, rank = accelerator.num_processes, accelerator.process_index
    metrics_file = open(metrics_path, "a", encoding="utf-8") if is_main else None
    # LORA_NB_BATCH_LOG=<folder>: each process lists the images of its batches (to check data-parallel runs)
    log_dir = os.environ.get("LORA_NB_BATCH_LOG")
    batch_log = open(Path(log_dir) / f"batches-rank{rank}.jsonl", "a", encoding="utf-8") if log_dir else None
    try:
        for epoch in range(start_epoch + 1, total_epochs + 1):
            unet_train.train()
            order = epoch_order([it.repeats for it in items], epoch, seed)
            reg_order = (epoch_order([1] * len(reg_samples), epoch, seed + 7) * (len(order) // max(len(reg_samples), 1) + 1))[: len(order)] if reg_samples else []
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            cap_rng = random.Random(seed * 7_919 + epoch)
            bs = cfg.training.batch_size
            # with regularization every training sample is paired with a class sample, as kohya does
            combined = [(samples, i) for i in order]
            if reg_samples:
                combined = [x for pair in zip(combined, [(reg_samples, j) for j in reg_order]) for x in pair]
            batches = [combined[i:i + bs] for i in range(0, len(combined), bs)]
            epoch_losses = []
            for b_index, batch in enumerate(batches):
                if global_step >= plan.total_steps:
                    break
                if _fault:
                    _fault(global_step)
                mine = batch[rank::world] or batch[:1]
                batch_samples = [src[i] for src, i in mine]
                if batch_log:
                    batch_log.write(json.dumps({"step": global_step + 1, "rank": rank,
                                                "images": [s.item.image.name for s in batch_samples]}) + "\n")
                variants = [0] * len(mine)
                if cfg.dataset.flip_aug:
                    variants = torch.randint(0, 2, (len(mine),), generator=gen).tolist()
                is_reg = torch.tensor([s.item.is_reg for s in batch_samples], device=device)
                captions = []
                for s in batch_samples:
                    c = s.item.caption
                    if cfg.dataset.shuffle_caption and not s.item.is_reg:
                        c = shuffle_caption(c, cfg.dataset.keep_tokens, cap_rng)
                    if cfg.dataset.caption_dropout and cap_rng.random() < cfg.dataset.caption_dropout:
                        c = ""
                    captions.append(c)
                latents = latents_of(model, batch_samples, variants, device, gen)
                noise = torch.randn(latents.shape, generator=gen).to(device)
                if cfg.training.noise_offset:
                    noise = noise + cfg.training.noise_offset * torch.randn(
                        (latents.shape[0], latents.shape[1], 1, 1), generator=gen).to(device)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                          generator=gen).to(device)
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
                with accelerator.accumulate(unet_train), accelerator.autocast():
                    embeds, pooled = embed(captions)
                    kwargs = {}
                    if model.family == "sdxl":
                        tids = torch.stack([s.time_ids[v] for s, v in zip(batch_samples, variants)]).to(device)
                        kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(weight_dtype), "time_ids": tids.to(weight_dtype)}
                    pred = unet_train(noisy.to(weight_dtype), timesteps, embeds.to(weight_dtype), **kwargs).sample
                    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                    per_sample = per_sample * loss_weights(noise_scheduler, timesteps, cfg.training.min_snr_gamma,
                                                           prediction_type).to(device)
                    per_sample = torch.where(is_reg, per_sample * cfg.dataset.prior_loss_weight, per_sample)
                    loss = per_sample.mean()
                    accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients:
                        if cfg.optimizer.max_grad_norm:
                            grad_norm = accelerator.clip_grad_norm_(trained, cfg.optimizer.max_grad_norm)
                        elif accelerator.scaler is None:
                            grad_norm = _grad_norm(trained)
                    # the step's one host sync: the loss for the plot and both health checks, before the update
                    checks = [loss.detach().float()]
                    if grad_norm is not None and accelerator.scaler is None:  # fp16's scaler skips inf steps itself
                        checks.append(torch.as_tensor(grad_norm, device=loss.device).float())
                    loss_here, *norm_here = torch.stack(checks).tolist()
                    if not math.isfinite(loss_here):
                        raise_non_finite(global_step + 1, cfg, files)
                    if norm_here and not math.isfinite(norm_here[0]):
                        raise_non_finite(global_step + 1, cfg, files, what="gradients")
                    lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                global_step += 1
                loss_value = loss_here if world == 1 else accelerator.gather(loss.detach()[None]).mean().item()
                epoch_losses.append(loss_value)
                record = {"step": global_step, "epoch": epoch, "loss": loss_value, "lr": lrs,
                          "time": round(time.time() - t_start, 3)}
                if is_main:
                    metrics_file.write(json.dumps(record) + "\n")
                emit(Event("step", global_step, epoch, record))
                bar.set_postfix(loss=f"{loss_value:.4f}", epoch=epoch, refresh=False)  # drawn by update's clock
                bar.update(1)

            # ---- end of epoch: validation, samples, save, state
            record = {"epoch": epoch, "step": global_step, "train_loss": float(np.mean(epoch_losses)) if epoch_losses else None}
            if val_data is not None:
                unet_train.eval()
                record["val_loss"] = fixed_noise_loss(model, val_data[0], val_data[1], val_data[2], val_data[3],
                                                      noise_scheduler, prediction_type)
            if is_main:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            emit(Event("epoch", global_step, epoch, record))
            last = epoch == total_epochs
            if is_main and cfg.sample.every_n_epochs and cfg.sample.prompts and (epoch % cfg.sample.every_n_epochs == 0 or last):
                with modules_on(idle, device):
                    paths = write_samples(cfg, model, ws, epoch, size)
                emit(Event("sample", global_step, epoch, {"paths": [str(p) for p in paths]}))
            if is_main and (last or (cfg.save.every_n_epochs and epoch % cfg.save.every_n_epochs == 0)):
                name = cfg.save.output_name if last else f"{cfg.save.output_name}-e{epoch:04d}"
                meta = dict(metadata, ss_epoch=str(epoch), ss_steps=str(global_step))
                for fmt in cfg.save.formats:
                    path = ws / "lora" / (f"{name}.safetensors" if fmt == "kohya" else f"{name}.diffusers.safetensors")
                    saved = lora_io.save_lora(path, model, cfg.network.alpha, fmt=fmt, precision=cfg.save.precision,
                                              metadata=meta)
                    files.append(Path(saved))
                    emit(Event("save", global_step, epoch, {"path": str(saved), "format": fmt}))
            if is_main and cfg.save.save_state:
                save_state(state_dir, fingerprint, model, optimizer, lr_scheduler, epoch, global_step, train_te)
            accelerator.wait_for_everyone()
            if global_step >= plan.total_steps:
                break
    finally:
        for m in idle:  # the model goes back whole: the notebook renders with it next
            m.to(device)
        bar.close()
        for f in (metrics_file, batch_log):
            if f:
                f.close()
    final = next((f for f in reversed(files) if f.name == f"{cfg.save.output_name}.safetensors"), None)
    result = TrainResult(files, final, ws, plan, global_step, time.time() - t_start, start_epoch, warnings)
    emit(Event("done", global_step, plan.epochs, {"files": [str(f) for f in files], "seconds": result.seconds}))
    return result


def _grad_norm(params) -> torch.Tensor | None:
    """Total L2 norm of the gradients (no clipping): non-finite when any gradient is."""
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm() if grads else None


def raise_non_finite(step: int, cfg: Config, files: list[Path], what: str = "loss") -> None:
    kept = f" The last good LoRA file is {files[-1]}." if files else " No LoRA file had been saved yet."
    raise TrainingStopped(
        f"Training stopped at step {step}: the {what} became NaN or infinite.{kept} Likely causes and fixes:\n"
        f"  - fp16 overflow (training.mixed_precision={cfg.training.mixed_precision}): use bf16 on a GPU that has it, "
        "or no (fp32); for SDXL use an fp32 VAE or the fp16-fix VAE (model.vae=madebyollin/sdxl-vae-fp16-fix);\n"
        f"  - learning rate too high (optimizer.learning_rate={cfg.optimizer.learning_rate:g}, "
        f"unet_lr={cfg.optimizer.unet_lr}): divide it by 10;\n"
        "  - a corrupt or extreme image in the dataset: re-run notebook 01's audit."
    )


def out_of_memory_advice(cfg: Config) -> str:
    tips = []
    if not cfg.training.gradient_checkpointing:
        tips.append("training.gradient_checkpointing=true (saves the most, ~20% slower)")
    if cfg.training.batch_size > 1:
        tips.append(f"training.batch_size={max(1, cfg.training.batch_size // 2)}")
    if cfg.optimizer.optimizer not in ("AdamW8bit", "Lion8bit"):
        tips.append("optimizer.optimizer=AdamW8bit (8-bit optimizer state)")
    if cfg.training.mixed_precision == "no":
        tips.append("training.mixed_precision=fp16 (or bf16)")
    if not cfg.dataset.cache_latents:
        tips.append("dataset.cache_latents=true")
    if cfg.optimizer.text_encoder_lr > 0:
        tips.append("optimizer.text_encoder_lr=0 (freeze the text encoder, cache its outputs)")
    tips.append(f"a smaller dataset.resolution than {cfg.dataset.resolution} or a lower network.rank")
    return ("The GPU ran out of memory. Saved files are intact; try these, in this order:\n  - " + "\n  - ".join(tips))


def training_metadata(cfg: Config, model, plan: StepsPlan, tag_frequency: dict, unet_lr: float) -> dict[str, str]:
    """sd-scripts-style ``ss_*`` metadata (strings) that AUTOMATIC1111 shows."""
    w, h = parse_resolution(cfg.dataset.resolution)
    return {
        "ss_learning_rate": str(cfg.optimizer.learning_rate),
        "ss_unet_lr": str(unet_lr),
        "ss_text_encoder_lr": str(cfg.optimizer.text_encoder_lr),
        "ss_num_epochs": str(plan.epochs),
        "ss_max_train_steps": str(plan.total_steps),
        "ss_batch_size_per_device": str(cfg.training.batch_size),
        "ss_resolution": f"({w}, {h})",
        "ss_lr_scheduler": cfg.optimizer.lr_scheduler,
        "ss_optimizer": cfg.optimizer.optimizer,
        "ss_mixed_precision": cfg.training.mixed_precision,
        "ss_seed": str(cfg.training.seed),
        "ss_clip_skip": str(cfg.network.clip_skip),
        "ss_noise_offset": str(cfg.training.noise_offset),
        "ss_min_snr_gamma": str(cfg.training.min_snr_gamma),
        "ss_num_train_images": str(plan.samples_per_epoch),
        "ss_sd_model_name": str(cfg.model.source),
        "ss_tag_frequency": json.dumps(tag_frequency, ensure_ascii=False),
        "ss_output_name": cfg.save.output_name,
        "ss_training_comment": "trained with lora-nb",
    }


def write_samples(cfg: Config, model, ws: Path, epoch: int, size: tuple[int, int]) -> list[Path]:
    """Render the sample prompts with the LoRA as it is now; save PNGs under samples/."""
    from lora_nb.fsutil import atomic_path
    from lora_nb.sampling import SamplePrompt, generate, parse_prompt_line

    s = cfg.sample
    defaults = SamplePrompt(prompt="", negative_prompt=s.negative_prompt, width=s.width or size[0],
                            height=s.height or size[1], seed=s.seed, steps=s.steps, cfg_scale=s.cfg_scale,
                            sampler=s.sampler)
    prompts = [p for p in (parse_prompt_line(line, defaults) for line in s.prompts) if p is not None]
    was_training = model.pipe.unet.training
    model.pipe.unet.eval()
    for te in model.text_encoders:
        te.eval()
    images = generate(model.pipe, prompts)
    if was_training:
        model.pipe.unet.train()
    out = []
    for i, img in enumerate(images):
        path = ws / "samples" / f"e{epoch:04d}-p{i:02d}.png"
        with atomic_path(path) as tmp:
            img.save(tmp, format="PNG")
        out.append(path)
    return out


# ------------------------------------------------------------------------- resumable state

def save_state(state_dir: Path, fingerprint: str, model, optimizer, lr_scheduler, epoch: int, step: int,
               train_te: bool) -> None:
    """Everything needed to continue after ``epoch``, written atomically (one file)."""
    from peft.utils import get_peft_model_state_dict

    from lora_nb.fsutil import write_bytes_atomic

    lora = {"unet": get_peft_model_state_dict(model.pipe.unet)}
    if train_te:
        for i, te in enumerate(model.text_encoders):
            lora[f"text_encoder_{i}"] = get_peft_model_state_dict(te)
    state = {"fingerprint": fingerprint, "epoch": epoch, "step": step, "lora": lora,
             "optimizer": optimizer.state_dict(), "scheduler": lr_scheduler.state_dict()}
    buffer = io.BytesIO()  # serialised in memory, written by Python: a full disk is an OSError, not a RuntimeError
    torch.save(state, buffer)
    write_bytes_atomic(state_dir / "training_state.pt", buffer.getvalue())


def load_state(state_dir: Path, fingerprint: str, model, optimizer, lr_scheduler, train_te: bool):
    """Restore the last saved state when it belongs to these settings; return (epoch, step) or None."""
    from peft.utils import set_peft_model_state_dict

    path = state_dir / "training_state.pt"
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - an unreadable state is ignored, training starts over
        return None
    if state.get("fingerprint") != fingerprint:
        return None
    set_peft_model_state_dict(model.pipe.unet, state["lora"]["unet"])
    if train_te:
        for i, te in enumerate(model.text_encoders):
            set_peft_model_state_dict(te, state["lora"][f"text_encoder_{i}"])
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["scheduler"])
    return state["epoch"], state["step"]


def archive_previous_run(ws: Path, output_name: str, fingerprint: str) -> Path | None:
    """Move an earlier run's results out of the way when its settings differ from this run's.

    A fresh start in a workspace that holds LoRA files (or metrics) of a run with *other* settings
    would overwrite them; they are moved to ``previous/<time>/`` instead. The same settings started
    over (``--restart``, notebook 06's experiments) simply replace their own files. Returns the
    folder they went to, or None when nothing was moved.
    """
    loras = sorted((ws / "lora").glob(f"{output_name}*.safetensors"))
    metrics = ws / "metrics.jsonl"
    if not loras and not (metrics.is_file() and metrics.stat().st_size):
        return None
    try:
        same = config_fingerprint(Config.load(ws / "train_config.yaml")) == fingerprint
    except Exception:  # noqa: BLE001 - no readable settings: treat as another run and keep its files
        same = False
    if same:
        return None
    dest = ws / "previous" / time.strftime("%Y%m%d-%H%M%S")
    while dest.exists():
        dest = dest.with_name(dest.name + "-1")
    (dest / "lora").mkdir(parents=True)
    for f in loras:
        os.replace(f, dest / "lora" / f.name)
    for name in ("metrics.jsonl", "train_config.yaml", "samples", "state"):
        if (ws / name).exists():
            os.replace(ws / name, dest / name)
    return dest


def trim_metrics(path: Path, last_step: int) -> None:
    """Keep only the metric lines up to ``last_step`` (a resumed run rewrites what came after)."""
    from lora_nb.fsutil import write_text_atomic

    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("step", 0) <= last_step and last_step > 0:
            keep.append(line)
    write_text_atomic(path, "".join(l + "\n" for l in keep))
