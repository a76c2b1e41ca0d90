"""LoRA training: one function, used by the notebooks and the command line.

:func:`train` reads as its phases, in the order a reader of the diffusers examples expects:

1. :func:`load_training_data` — scan the dataset, hold out validation images, find the class images,
   check everything that needs no model, plan the steps;
2. :func:`prepare_model` — the base model in its training dtype, the LoRA attached, checkpointing;
3. :func:`cache_training_data` — VAE latents and (when the text encoder is frozen) caption embeddings;
4. :func:`build_optimization` — the optimizer and the LR schedule, wrapped by accelerate;
5. :func:`open_run` — the workspace: resume from the saved state, or move an earlier run aside;
6. the loop — per epoch :func:`epoch_steps`, per optimizer step :func:`training_step` (its batches through
   :func:`batch_loss`, the gradients accumulated), the saves due by step count, then :func:`end_of_epoch`
   (save the LoRA, the state, validation loss, previews).

One step (:mod:`lora_nb.steps` holds the pieces the diagnosis shares): (cached) latents → noise at a
random timestep → UNet with LoRA, conditioned on caption embeddings → MSE against the target (noise or
velocity, optional min-SNR weight) → backward into the LoRA parameters only → optimizer and LR schedule →
an event for whoever watches (a live plot, a progress bar, ``metrics.jsonl``).

It runs on accelerate, so the same code trains on a CPU, one GPU, or several GPUs under
``accelerate launch``.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lora_nb import LoraNbError, lora_io, runstate, steps
from lora_nb.captions import caption_variants, dress_caption, drop_tags, pick_caption_variant, shuffle_caption
from lora_nb.config import (Config, StepsPlan, check_against_dataset, check_against_model, check_against_plan,
                            check_config,
                            parse_resolution, plan_steps, raise_for_errors)
from lora_nb.dataset import Item, assign_buckets, bucket_counts, scan_dataset
from lora_nb.images import image_size
from lora_nb.fsutil import FREE_SPACE, DiskFullError, atomic_path, is_disk_full, remove_stale_temp_files
from lora_nb.latent_cache import LatentCache
from lora_nb.models import load_model_for, quiet_cast_warning, use_noise_schedule
from lora_nb.optim import allow_fp16_gradients, build_optimizer, build_scheduler, use_averaged_weights
from lora_nb.sampling import render_previews, sample_prompts_of
from lora_nb.tblog import TensorBoardLog, WandbLog, chain
from lora_nb.workspace import Workspace


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
    resumed_at_step: int = 0  # the step a resumed run continued from (0: a new run)


def before_step(step: int) -> None:
    """Test seam: called before every training step with the number of steps done so far.

    Does nothing. The fault tests (tests/test_faults.py) replace it to poison a tensor, fill the disk
    or raise out-of-memory at a chosen step; it is not part of :func:`train`'s signature.
    """


# ------------------------------------------------------------------------- the trainer

def train(cfg: Config, on_event: Callable[[Event], None] | None = None, model=None, resume: bool = True,
          progress: bool = True, batch_log_dir: str | Path | None = None) -> TrainResult:
    """Train a LoRA as ``cfg`` says; return the files written.

    ``on_event`` receives :class:`Event` s (step loss and LR, epoch ends with the
    validation loss, sample images, saved files). ``model`` may be a loaded
    :class:`lora_nb.models.BaseModel` to reuse (it is modified: the LoRA is
    attached). With ``resume`` a rerun continues from the last saved state in
    ``<workspace>/state`` when the settings match. ``batch_log_dir``: each process
    lists the images of its batches in ``batches-rank<N>.jsonl`` there (to check
    data-parallel runs).

    Running out of GPU memory anywhere (loading, caching latents, a step) stops
    with :class:`TrainingStopped` listing the memory savers; a full disk with a
    :class:`LoraNbError` naming the file. Files saved before either stay intact.
    """
    try:
        return _run_phases(cfg, on_event or (lambda e: None), model, resume, progress, batch_log_dir)
    except torch.cuda.OutOfMemoryError:
        raise TrainingStopped(out_of_memory_advice(cfg)) from None
    except DiskFullError as exc:
        raise DiskFullError(exc.path, then=_after_disk_full(cfg)) from None
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFullError(exc.filename or cfg.save.output_dir, then=_after_disk_full(cfg)) from None
        raise


def _after_disk_full(cfg: Config) -> str:
    """What a rerun does after a full disk: resume from the saved state, or start over when none is kept."""
    if cfg.save.save_state:
        return f"{FREE_SPACE} and run again: training resumes from the last saved state."
    return (f"{FREE_SPACE} and run again: training starts over from step 0, because save.save_state is off "
            "(there is no state to resume from).")


def _run_phases(cfg: Config, emit: Callable[[Event], None], model, resume: bool, progress: bool,
                batch_log_dir) -> TrainResult:
    """The body of :func:`train`: its phases, then the loop."""
    t_start = time.time()
    warnings = [str(p) for p in raise_for_errors(check_config(cfg))]
    data = load_training_data(cfg)
    warnings += data.warnings
    accelerator, precision = start_accelerator(cfg)
    if cfg.logging.tensorboard and accelerator.is_main_process:
        emit = chain(emit, TensorBoardLog(Workspace(Path(cfg.save.output_dir)).logs))
    if cfg.logging.wandb_project and accelerator.is_main_process:
        emit = chain(emit, WandbLog(cfg.logging.wandb_project, Workspace(Path(cfg.save.output_dir)).logs,
                                    cfg.to_dict()))
    with hold_workspace_of(cfg, accelerator, warnings):
        net = prepare_model(cfg, model, accelerator.device, precision)
        cached = cache_training_data(cfg, data, net, accelerator, warnings)
        opt = build_optimization(cfg, net, data.plan, accelerator)
        cached.embedder.encoders = opt.text_encoders
        run = open_run(cfg, accelerator, net, opt, data, resume, warnings, batch_log_dir)
        s = Session(cfg, accelerator, data, net, cached, opt, run, emit, t_start, warnings)
        announce_start(s, precision)
        run_loop(s, progress)
    final = next((f for f in reversed(run.files) if f.name == run.ws.lora_file(cfg.save.output_name).name), None)
    result = TrainResult(run.files, final, run.ws.root, data.plan, run.step, time.time() - t_start,
                         run.start_epoch, warnings, run.resumed_at)
    emit(Event("done", run.step, data.plan.epochs, {"files": [str(f) for f in run.files], "seconds": result.seconds}))
    return result


def run_loop(s: Session, progress: bool) -> None:
    """The loop: per epoch its optimizer steps, one :func:`training_step` each (then the saves due by step
    count), then :func:`end_of_epoch`. A run resumed inside an epoch skips the steps that epoch already took."""
    run, plan = s.run, s.data.plan
    bar = _progress_bar(plan.total_steps, run.step, progress and s.accelerator.is_main_process)
    try:
        with modules_off(s.cached.idle, s.accelerator.device):
            for epoch in range(run.start_epoch + 1, plan.epochs + 1):
                s.opt.unet.train()
                done = run.epoch_step if epoch == run.start_epoch + 1 else 0
                losses = runstate.epoch_losses(run.ws.metrics, epoch) if done else []
                groups = epoch_steps(s, epoch)
                for k, group in enumerate(groups[done:], start=done + 1):
                    if run.step >= plan.total_steps:
                        break
                    before_step(run.step)
                    record = training_step(s, group, epoch)
                    losses.append(record["loss"])
                    bar.set_postfix(loss=f"{record['loss']:.4f}", epoch=epoch, refresh=False)  # drawn by update's clock
                    bar.update(1)
                    saves_by_step(s, epoch, k, mid_epoch=k < len(groups) and run.step < plan.total_steps)
                end_of_epoch(s, epoch, losses)
                if run.step >= plan.total_steps:
                    break
    finally:
        bar.close()
        run.close()


def saves_by_step(s: Session, epoch: int, epoch_step: int, mid_epoch: bool) -> None:
    """``save.every_n_steps``: a LoRA file ``<name>-step<N>``; ``save.state_every_n_steps``: the resumable state
    inside an epoch (at the epoch's end :func:`end_of_epoch` saves it anyway)."""
    sv, run = s.cfg.save, s.run
    if sv.every_n_steps and run.step % sv.every_n_steps == 0 and run.is_main:
        with use_averaged_weights(s.opt.optimizer):
            save_lora_files(s, epoch, last=False, name=run.ws.step_name(s.cfg.save.output_name, run.step))
    if sv.state_every_n_steps and run.step % sv.state_every_n_steps == 0 and mid_epoch and sv.save_state:
        if run.is_main:
            run.flush_metrics()  # the steps' losses first: a resumed epoch averages them with its own
            runstate.save_state(run.ws, run.fingerprint, s.net.model, s.opt.optimizer, s.opt.lr_scheduler,
                                epoch - 1, run.step, s.net.train_te, epoch_step=epoch_step)
        s.accelerator.wait_for_everyone()


def hold_workspace_of(cfg: Config, accelerator, notes: list[str]):
    """One run per workspace: the main process holds ``save.output_dir`` (its other processes share it)."""
    if not accelerator.is_main_process:
        return contextlib.nullcontext()
    return runstate.hold_workspace(Workspace(Path(cfg.save.output_dir)), "training", notes)


def announce_start(s: Session, precision: str) -> None:
    """The start event (plan, precision, device, resume point), then each warning, then what left the GPU."""
    run = s.run
    s.emit(Event("start", run.step, run.start_epoch, {"plan": s.data.plan, "warnings": s.warnings,
                                                      "precision": precision, "resumed_from_epoch": run.start_epoch,
                                                      "resumed_at_step": run.step, "resumed_epoch_step": run.epoch_step,
                                                      "device": str(s.accelerator.device)}))
    for w in s.warnings:
        s.emit(Event("warning", data={"message": w}))
    if s.data.buckets:
        s.emit(Event("info", data={"message": "aspect-ratio buckets (samples per epoch): " +
                                   describe_buckets(s.data.buckets),
                                   "buckets": {f"{w}x{h}": n for (w, h), n in s.data.buckets.items()}}))
    if s.cached.idle:
        s.emit(Event("info", data={"message": "cached: " + ", ".join(type(m).__name__ for m in s.cached.idle) +
                                   " moved off the GPU until sampling"}))


# ------------------------------------------------------------------------- 1. the data

@dataclass
class TrainingData:
    items: list[Item]
    val_items: list[Item]
    reg_items: list[Item]
    plan: StepsPlan
    tag_frequency: dict
    warnings: list[str]
    buckets: dict | None = None  # {(w, h): samples per epoch} with aspect-ratio buckets, else None


def load_training_data(cfg: Config) -> TrainingData:
    """Scan, hold out ``validation_split`` images (and read ``validation_dir``'s), find the class images, assign
    aspect-ratio buckets, check, plan — before any heavy work, so a bad dataset fails fast."""
    d = cfg.dataset
    scan = scan_dataset(d.dir, d.caption_extension, d.repeats, d.trigger_word, wildcard=d.enable_wildcard)
    warnings = list(scan.warnings)
    items, val_items = split_validation(scan.items, d.validation_split, cfg.training.seed)
    raise_for_errors(check_against_dataset(cfg, len(items), d.dir))
    if d.validation_dir:
        val_items += scan_dataset(d.validation_dir, d.caption_extension, 1, d.trigger_word,
                                  setting="dataset.validation_dir", wildcard=d.enable_wildcard).items
    reg_items: list[Item] = []
    if d.reg_dir:
        reg_items = scan_dataset(d.reg_dir, d.caption_extension, None, "", is_reg=True, wildcard=d.enable_wildcard).items
        if not reg_items:
            raise LoraNbError(f"dataset.reg_dir={d.reg_dir!r} holds no images: add 10–20 class images or clear the setting.")
    size = parse_resolution(d.resolution)
    buckets = None
    if d.enable_buckets:
        items, reg_items = assign_buckets(items, size, d.bucket_step), assign_buckets(reg_items, size, d.bucket_step)
        buckets = bucket_counts(items)
    else:
        warnings += crop_warnings(items, size)
    folders = [(sum(1 for it in items if it.folder == f), r) for f, r in
               dict.fromkeys((it.folder, it.repeats) for it in items)]
    data = TrainingData(items, val_items, reg_items, None, scan.tag_frequency, warnings, buckets)
    per_epoch = ([len(epoch_layout(data, e, cfg.training.seed, cfg.training.batch_size))
                  for e in range(1, cfg.training.epochs + 1)] if buckets else None)
    data.plan = plan_steps(folders, cfg.training.batch_size, cfg.training.epochs, cfg.save.every_n_epochs,
                           bool(reg_items), cfg.training.max_steps, per_epoch, cfg.training.gradient_accumulation_steps)
    data.warnings += [f"{w.setting}: {w.message}" for w in raise_for_errors(check_against_plan(cfg, data.plan))]
    return data


def crop_warnings(items: list[Item], size: tuple[int, int]) -> list[str]:
    """Without buckets every image is cover-resized and centre-cropped to ``size``: say how many lose a side."""
    target = size[0] / size[1]
    cut = [it.image.name for it in items if abs(math.log(_aspect(it.image) / target)) > 0.05]
    if not cut:
        return []
    return [f"{len(cut)} of {len(items)} images have another shape than dataset.resolution ({size[0]}x{size[1]}) "
            f"and are centre-cropped to it (e.g. {cut[0]}). Set dataset.enable_buckets=true to train each whole, "
            "in its aspect-ratio bucket (crop mode none)."]


def _aspect(path: Path) -> float:
    w, h = image_size(path)
    return w / h


def describe_buckets(buckets: dict) -> str:
    """The bucket table: ``64x96: 40, 64x64: 30, …`` (samples per epoch)."""
    return ", ".join(f"{w}x{h}: {n}" for (w, h), n in buckets.items())


def split_validation(items: list[Item], n: int, seed: int) -> tuple[list[Item], list[Item]]:
    """``(training, held out)``: ``n`` images chosen by ``seed`` leave training for the validation loss."""
    if not n:
        return items, []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[:n])
    return [it for i, it in enumerate(items) if i not in held], [it for i, it in enumerate(items) if i in held]


# ------------------------------------------------------------------------- 2. the model

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


def start_accelerator(cfg: Config):
    """The accelerator for this process and the precision that really runs."""
    from accelerate import Accelerator

    precision = effective_precision(cfg.training.mixed_precision)
    reset_accelerate_state()
    # cpu=True without a GPU: several processes then train data-parallel over gloo (MULTI_CPU)
    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available()), precision


@dataclass
class PreparedModel:
    model: object  # lora_nb.models.BaseModel, the LoRA attached
    noise_scheduler: object
    prediction_type: str
    weight_dtype: torch.dtype
    train_te: bool
    size: tuple[int, int]


def prepare_model(cfg: Config, model, device, precision: str) -> PreparedModel:
    """Load (or reuse) the base model, freeze it in the training dtype, attach the LoRA, enable checkpointing."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import cast_training_params

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    if model is None:  # the frozen parts read straight in the training dtype: no fp32 copy at any time
        model = load_model_for(cfg, frozen_dtype=weight_dtype)
    else:  # a model handed in gets the run's prediction type and noise schedule too
        use_noise_schedule(model, cfg.model.prediction_type, cfg.training.zero_terminal_snr)
    raise_for_errors(check_against_model(cfg, model.size_multiple, model.family))
    pipe = model.pipe
    prediction_type = (cfg.model.prediction_type if cfg.model.prediction_type != "auto"
                       else pipe.scheduler.config.get("prediction_type", "epsilon"))
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    for module in [pipe.unet] + model.text_encoders:
        module.requires_grad_(False)
        module.to(device)
        if weight_dtype != torch.float32:
            with quiet_cast_warning():
                module.to(dtype=weight_dtype)
    pipe.vae.requires_grad_(False)
    pipe.vae.to(device)  # kept in fp32: the SDXL VAE overflows in fp16

    train_te = cfg.optimizer.text_encoder_lr > 0
    torch.manual_seed(cfg.training.seed)  # the LoRA's random init: same seed, same LoRA, in any process
    lora_io.add_lora(model, cfg.network.rank, cfg.network.alpha, unet_targets=cfg.network.unet_targets,
                     train_text_encoder=train_te, **lora_io.network_options(cfg.network))
    if cfg.network.init_from:  # continue an existing LoRA (a saved state, when resuming, overrides it later)
        lora_io.init_lora_from(model, Path(cfg.network.init_from).expanduser())
    if precision != "no":  # the LoRA in fp32 unless training.full_precision_lora asks for this half precision
        lora_dtype = weight_dtype if cfg.training.full_precision_lora == precision else torch.float32
        cast_training_params([pipe.unet] + (model.text_encoders if train_te else []), dtype=lora_dtype)
    if cfg.training.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        if train_te:
            for te in model.text_encoders:
                te.gradient_checkpointing_enable()
    return PreparedModel(model, noise_scheduler, prediction_type, weight_dtype, train_te,
                         parse_resolution(cfg.dataset.resolution))


# ------------------------------------------------------------------------- 3. the cache

class TextEmbedder:
    """Caption embeddings for a batch: from a cache filled once when the text encoders are frozen and
    captions fixed, computed (with gradients when the text encoder trains) otherwise."""

    def __init__(self, model, clip_skip: int, device, use_cache: bool, train_te: bool, max_token_length: int = 75):
        self.model, self.clip_skip, self.device, self.max_tokens = model, clip_skip, device, max_token_length
        self.use_cache, self.train_te = use_cache, train_te
        self.encoders = None  # the distributed wrappers of the trained text encoders, once prepared
        self.cache: dict[str, tuple] = {}

    def __call__(self, captions: list[str]):
        if not self.use_cache:
            with torch.set_grad_enabled(self.train_te):
                return steps.encode_prompts(self.model, captions, self.clip_skip, self.device, self.encoders,
                                            self.max_tokens)
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            with torch.no_grad():
                e, p = steps.encode_prompts(self.model, missing, self.clip_skip, self.device,
                                            max_token_length=self.max_tokens)
            for i, c in enumerate(missing):
                self.cache[c] = (e[i], None if p is None else p[i])
        e = torch.stack([self.cache[c][0] for c in captions])
        p = None if self.model.family == "sd15" else torch.stack([self.cache[c][1] for c in captions])
        return e, p


@dataclass
class CachedData:
    samples: list[steps.Sample]
    reg_samples: list[steps.Sample]
    validation: tuple | None  # (latents, embeds, pooled, time_ids) of the held-out images
    embedder: TextEmbedder
    idle: list  # modules that leave the GPU until sampling (everything they compute is cached)


def latent_cache_dir(cfg: Config) -> Path:
    """``dataset.cache_dir``, or the workspace's ``cache/`` when it is empty."""
    return Path(cfg.dataset.cache_dir) if cfg.dataset.cache_dir else Workspace(Path(cfg.save.output_dir)).cache


def text_cache_wanted(cfg: Config, train_te: bool, warnings: list[str]) -> bool:
    """Whether caption embeddings are cached: ``auto`` when the text encoder is frozen and captions fixed."""
    fixed = not (train_te or cfg.dataset.shuffle_caption or cfg.dataset.tag_dropout or cfg.dataset.enable_wildcard)
    choice = cfg.dataset.cache_text_embeddings
    if choice == "yes" and not fixed:
        warnings.append("dataset.cache_text_embeddings=yes is ignored: the text encoder trains or captions are "
                        "shuffled, so embeddings change every step.")
    return fixed if choice in ("auto", "yes") else False


def cache_training_data(cfg: Config, data: TrainingData, net: PreparedModel, accelerator,
                        warnings: list[str]) -> CachedData:
    """Load every image once (VAE latents when ``cache_latents``); with frozen text encoders encode every
    caption up front; then move what the steps no longer need off the GPU."""
    model, device, seed, d = net.model, accelerator.device, cfg.training.seed, cfg.dataset
    disk = LatentCache.for_vae(latent_cache_dir(cfg), model.pipe.vae) if d.cache_latents_to_disk else None
    samples = steps.prepare_samples(data.items, net.size, model, d.flip_aug, d.cache_latents, seed, device,
                                    disk_cache=disk, masked=d.masked_loss)
    reg_samples = steps.prepare_samples(data.reg_items, net.size, model, d.flip_aug, d.cache_latents, seed + 1,
                                        device, "Caching regularization latents", disk_cache=disk, masked=d.masked_loss)
    if d.masked_loss and all(bool((m == 1).all()) for x in samples for m in x.masks):
        warnings.append(f"dataset.masked_loss is on but none of the {len(samples)} training images has a mask "
                        "(<name>.mask.png beside it, or an alpha channel): it trains as without.")
    val_samples = steps.prepare_samples(data.val_items, net.size, model, False, True, seed + 2, device,
                                        "Caching validation latents", disk_cache=disk)
    embedder = TextEmbedder(model, cfg.network.clip_skip, device, text_cache_wanted(cfg, net.train_te, warnings),
                            net.train_te, d.max_token_length)
    warnings += long_caption_warnings(model, data.items + data.val_items, d.max_token_length)
    validation = None
    if val_samples:
        lat = steps.latents_of(model, val_samples, [0] * len(val_samples), device, None)
        with torch.no_grad():
            e, p = steps.encode_prompts(model, [dress_caption(caption_variants(s.item.caption)[0], d.caption_prefix,
                                                              d.caption_suffix) for s in val_samples], cfg.network.clip_skip, device,
                                        max_token_length=d.max_token_length)
        validation = (lat, e, p, torch.stack([s.time_ids[0] for s in val_samples]).to(device))
    if embedder.use_cache:  # every caption a step can use, encoded now (in small batches)
        todo = list(dict.fromkeys([dress_caption(s.item.caption, d.caption_prefix, d.caption_suffix) for s in samples]
                                  + [s.item.caption for s in reg_samples] + ([""] if d.caption_dropout else [])))
        with accelerator.autocast():
            for i in range(0, len(todo), 32):
                embedder(todo[i:i + 32])
    idle = frozen_parts(model, d.cache_latents, embedder.use_cache) if device.type != "cpu" else []
    return CachedData(samples, reg_samples, validation, embedder, idle)


def long_caption_warnings(model, items: list[Item], max_token_length: int) -> list[str]:
    """One warning naming the caption files whose tokens go past ``dataset.max_token_length`` (cut there)."""
    tokenizer = model.tokenizers[0]
    limit = steps.chunk_count(max_token_length) * (tokenizer.model_max_length - 2)
    over = [(it.image.with_suffix(".txt").name, n) for it in items
            if (n := max(steps.count_tokens(tokenizer, c) for c in caption_variants(it.caption) or [""])) > limit]
    if not over:
        return []
    shown = ", ".join(f"{name} ({n})" for name, n in over[:5]) + (" …" if len(over) > 5 else "")
    more = " Raise dataset.max_token_length (150 or 225)," if max_token_length < 225 else ""
    return [f"{len(over)} caption(s) have more than {limit} tokens and are cut there: {shown}.{more} or shorten "
            "them (notebook 03)."]


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


@contextlib.contextmanager
def modules_off(modules: list, device):
    """The cached-away ``modules`` on the CPU for the block; back on ``device`` afterwards (the notebook
    renders with the whole model next)."""
    for m in modules:
        m.to("cpu")
    if modules and device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        yield
    finally:
        for m in modules:
            m.to(device)


# ------------------------------------------------------------------------- 4. optimizer and schedule

@dataclass
class Optimization:
    optimizer: object
    lr_scheduler: object
    unet: object  # the UNet as accelerate wraps it
    text_encoders: list | None  # the trained text encoders as accelerate wraps them
    params: list  # every trained parameter (for clipping and the gradient check)


def build_optimization(cfg: Config, net: PreparedModel, plan: StepsPlan, accelerator) -> Optimization:
    """One parameter group per part (UNet, text encoders) with its own LR; the schedule over the run's steps."""
    o, model = cfg.optimizer, net.model
    unet_params = [p for p in model.pipe.unet.parameters() if p.requires_grad]
    te_params = [p for te in model.text_encoders for p in te.parameters() if p.requires_grad] if net.train_te else []
    groups = unet_param_groups(model.pipe.unet, o.effective_unet_lr, cfg.network.block_lr_weights)
    if te_params:
        groups.append({"params": te_params, "lr": o.text_encoder_lr, "name": "text_encoder"})
    optimizer = build_optimizer(o.optimizer, groups, o.weight_decay)
    lr_scheduler = build_scheduler(o.lr_scheduler, optimizer, o.warmup_steps_for(plan.total_steps), plan.total_steps,
                                   o.lr_restarts,
                                   o.lr_power)
    prepared = accelerator.prepare(model.pipe.unet, *(model.text_encoders if net.train_te else []), optimizer)
    if accelerator.scaler is not None and cfg.training.full_precision_lora == "fp16":
        allow_fp16_gradients(accelerator.scaler)
    return Optimization(prepared[-1], lr_scheduler, prepared[0], list(prepared[1:-1]) or None, unet_params + te_params)


def unet_param_groups(unet, lr: float, block_weights: list[float]) -> list[dict]:
    """The UNet's trained parameters as one group at ``lr``, or, with ``block_weights`` [down, mid, up]
    (``network.block_lr_weights``, sd-scripts' down/mid/up_lr_weight), one group per block at ``lr`` times
    its weight (the rest of the UNet, conv_in and the like, at ``lr``)."""
    trained = [(name, p) for name, p in unet.named_parameters() if p.requires_grad]
    if not block_weights:
        return [{"params": [p for _, p in trained], "lr": lr, "name": "unet"}]
    blocks = {"down_blocks.": ("unet_down", block_weights[0]), "mid_block.": ("unet_mid", block_weights[1]),
              "up_blocks.": ("unet_up", block_weights[2])}
    groups = {"unet": {"params": [], "lr": lr, "name": "unet"}}
    for name, p in trained:
        key, weight = next((v for k, v in blocks.items() if name.startswith(k)), ("unet", 1.0))
        groups.setdefault(key, {"params": [], "lr": lr * weight, "name": key})["params"].append(p)
    return [g for g in groups.values() if g["params"]]


# ------------------------------------------------------------------------- 5. the run in its workspace

@dataclass
class Run:
    ws: Workspace
    fingerprint: str
    start_epoch: int
    step: int
    files: list[Path]
    metadata: dict[str, str]
    is_main: bool
    metrics_file: object = None
    batch_log: object = None
    epoch_step: int = 0  # optimizer steps already taken in epoch start_epoch + 1 (a state saved inside it)
    resumed_at: int = 0  # the step the saved state was at (0: a new run)

    def write_metrics(self, record: dict, flush: bool = False) -> None:
        if self.metrics_file:
            self.metrics_file.write(json.dumps(record) + "\n")
            if flush:
                self.metrics_file.flush()

    def flush_metrics(self) -> None:
        if self.metrics_file:
            self.metrics_file.flush()

    def close(self) -> None:
        for f in (self.metrics_file, self.batch_log):
            if f:
                f.close()


def open_run(cfg: Config, accelerator, net: PreparedModel, opt: Optimization, data: TrainingData, resume: bool,
             warnings: list[str], batch_log_dir=None) -> Run:
    """Prepare the workspace: clear a killed run's temp files, resume from the saved state when the settings
    match, otherwise move an earlier run with other settings to ``previous/``; open the metrics."""
    ws = Workspace(Path(cfg.save.output_dir))
    ws.lora.mkdir(parents=True, exist_ok=True)
    is_main = accelerator.is_main_process
    if is_main:
        for folder in (ws.root, ws.lora, ws.state, ws.samples):
            remove_stale_temp_files(folder)  # left by a killed run (the complete files are untouched)
    fingerprint = runstate.config_fingerprint(cfg)
    start_epoch, step, epoch_step = 0, 0, 0
    if resume and cfg.save.save_state:
        loaded = runstate.load_state(ws, fingerprint, net.model, opt.optimizer, opt.lr_scheduler, net.train_te)
        if loaded:
            start_epoch, step, epoch_step = loaded
    if step == 0 and is_main:
        moved_to = runstate.archive_previous_run(ws, cfg.save.output_name, fingerprint)
        if moved_to:
            warnings.append(f"{ws.root} held a run with other settings: its LoRA files, metrics, samples and state "
                            f"were moved to {moved_to} (nothing is overwritten). Delete that folder when you no "
                            "longer need it.")
    accelerator.wait_for_everyone()
    runstate.trim_metrics(ws.metrics, step)
    cfg.write_yaml(ws.train_config)
    files = (sorted(ws.lora.glob(f"{cfg.save.output_name}-e*.safetensors"))
             + sorted(ws.lora.glob(f"{cfg.save.output_name}-step*.safetensors"))) if step else []
    dirs = {f: {"n_repeats": r, "img_count": sum(1 for it in data.items if it.folder == f)}
            for f, r in dict.fromkeys((it.folder, it.repeats) for it in data.items)}
    metadata = dict(lora_io.training_metadata(cfg, data.plan, data.tag_frequency, dirs, len(data.reg_items),
                                              data.buckets),
                    **lora_io.run_metadata(random.SystemRandom().randrange(2**31), round(time.time(), 3)),
                    **lora_io.base_model_hashes(str(cfg.model.source), str(cfg.model.vae or "")),
                    **lora_io.modelspec_metadata(net.model.family, cfg.save.output_name, net.size,
                                                 net.prediction_type, cfg.dataset.trigger_word,
                                                 clip_skip=cfg.network.clip_skip,
                                                 timesteps=(cfg.training.min_timestep, cfg.training.max_timestep)))
    metrics_file = open(ws.metrics, "a", encoding="utf-8") if is_main else None
    batch_log = None
    if batch_log_dir:
        batch_log = open(Path(batch_log_dir) / f"batches-rank{accelerator.process_index}.jsonl", "a", encoding="utf-8")
    return Run(ws, fingerprint, start_epoch, step, files, metadata, is_main, metrics_file, batch_log, epoch_step, step)


# ------------------------------------------------------------------------- 6. the loop

@dataclass
class Session:
    """What the loop's functions share: every phase's result."""
    cfg: Config
    accelerator: object
    data: TrainingData
    net: PreparedModel
    cached: CachedData
    opt: Optimization
    run: Run
    emit: Callable[[Event], None]
    t_start: float
    warnings: list[str]  # said at the start and during the run; returned in TrainResult


def epoch_order(items_repeats: list[int], epoch: int, seed: int) -> list[int]:
    """Indices of one epoch: each item repeated, shuffled by (seed, epoch) alone so resuming replays it."""
    order = [i for i, r in enumerate(items_repeats) for _ in range(r)]
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


def epoch_layout(data: TrainingData, epoch: int, seed: int, batch_size: int) -> list[list[tuple[bool, int, int]]]:
    """The batches of one epoch as ``[(is_reg, index, position), …]`` lists, from (seed, epoch) alone (a resumed
    run replays them); ``position`` is the sample's place in the epoch, which seeds its random draws
    (:func:`steps.sample_generators`). With regularization every training sample is paired with a class
    sample, as kohya does. With buckets a batch holds one bucket only: each bucket's samples in that order,
    cut into batches, and the batches shuffled."""
    order = epoch_order([it.repeats for it in data.items], epoch, seed)
    combined = [(False, i) for i in order]
    if data.reg_items:
        n = len(data.reg_items)
        reg_order = (epoch_order([1] * n, epoch, seed + 7) * (len(order) // n + 1))[: len(order)]
        combined = [x for pair in zip(combined, [(True, j) for j in reg_order]) for x in pair]
    placed = [(is_reg, i, pos) for pos, (is_reg, i) in enumerate(combined)]
    if data.buckets is None:
        return [placed[i:i + batch_size] for i in range(0, len(placed), batch_size)]
    groups: dict[tuple[int, int], list] = {}
    for entry in placed:
        groups.setdefault((data.reg_items if entry[0] else data.items)[entry[1]].size, []).append(entry)
    batches = [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    random.Random(seed * 31_337 + epoch).shuffle(batches)
    return batches


def epoch_steps(s: Session, epoch: int) -> list[list[tuple[list[steps.Sample], list[int]]]]:
    """The optimizer steps of one epoch, each a list of ``gradient_accumulation_steps`` batches (the epoch's
    last step may hold fewer); a batch is ``(this process's samples, their positions in the epoch)``."""
    sources = {False: s.cached.samples, True: s.cached.reg_samples}
    world, rank = s.accelerator.num_processes, s.accelerator.process_index
    batches = []
    for batch in epoch_layout(s.data, epoch, s.cfg.training.seed, s.cfg.training.batch_size):
        mine = batch[rank::world] or batch[:1]
        batches.append(([sources[is_reg][i] for is_reg, i, _ in mine], [pos for _, _, pos in mine]))
    n = s.cfg.training.gradient_accumulation_steps
    return [batches[i:i + n] for i in range(0, len(batches), n)]


def batch_captions(cfg: Config, batch: list[steps.Sample], cap_rngs: list[random.Random]) -> list[str]:
    """The captions as this step trains them: one form of each (``enable_wildcard``: a line, and an option of
    each ``{a|b}``), tags shuffled (keeping the first ``keep_tokens``), some tags left out (``tag_dropout``), the
    prefix and suffix around them, some captions dropped whole (each sample's changes drawn from its own
    generator)."""
    d, captions = cfg.dataset, []
    for sample, cap_rng in zip(batch, cap_rngs):
        c = pick_caption_variant(sample.item.caption, cap_rng) if d.enable_wildcard else sample.item.caption
        if not sample.item.is_reg:
            if d.shuffle_caption:
                c = shuffle_caption(c, d.keep_tokens, cap_rng)
            c = dress_caption(drop_tags(c, d.tag_dropout, d.keep_tokens, cap_rng), d.caption_prefix, d.caption_suffix)
        if d.caption_dropout and cap_rng.random() < d.caption_dropout:
            c = ""
        captions.append(c)
    return captions


def batch_loss(s: Session, batch: list[steps.Sample], positions: list[int], epoch: int) -> torch.Tensor:
    """The forward pass of one batch: each sample's weighted loss, ``(len(batch),)``. Every random draw of a
    sample (flip, VAE sample, noise, timestep, caption changes) comes from its own generators."""
    cfg, acc, net, t = s.cfg, s.accelerator, s.net, s.cfg.training
    device, model = acc.device, net.model
    rngs = [steps.sample_generators(t.seed, epoch, pos) for pos in positions]
    gens = [g for g, _ in rngs]
    variants = ([int(torch.randint(0, 2, (1,), generator=g)) for g in gens] if cfg.dataset.flip_aug
                else [0] * len(batch))
    is_reg = torch.tensor([x.item.is_reg for x in batch], device=device)
    captions = batch_captions(cfg, batch, [r for _, r in rngs])
    latents = steps.latents_of(model, batch, variants, device, gens)
    one = [latents[i:i + 1] for i in range(len(batch))]
    noise = torch.cat([steps.noise_like(x, g, t.noise_offset, t.multires_noise_iterations, t.multires_noise_discount)
                       for x, g in zip(one, gens)])
    timesteps = torch.cat([steps.sample_timesteps(net.noise_scheduler, 1, g, device, t.min_timestep, t.max_timestep)
                           for g in gens])
    seen = torch.cat([steps.perturbed_noise(noise[i:i + 1], g, t.ip_noise_gamma) for i, g in enumerate(gens)])
    noisy = net.noise_scheduler.add_noise(latents, seen, timesteps)
    target = steps.prediction_target(net.noise_scheduler, latents, noise, timesteps, net.prediction_type)
    huber_c = (steps.huber_c_of(net.noise_scheduler, timesteps, t.huber_c, t.huber_schedule).to(device)
               if t.loss_type != "l2" else None)
    with acc.autocast():
        embeds, pooled = s.cached.embedder(captions)
        time_ids = torch.stack([x.time_ids[v] for x, v in zip(batch, variants)]).to(device) if pooled is not None else None
        pred = s.opt.unet(noisy.to(net.weight_dtype), timesteps, embeds.to(net.weight_dtype),
                          **steps.unet_conditioning(pooled, time_ids, net.weight_dtype)).sample
        mask = (torch.stack([x.masks[v] for x, v in zip(batch, variants)]) if cfg.dataset.masked_loss else None)
        per_sample = steps.diffusion_loss(pred, target, t.loss_type, huber_c, mask)
        per_sample = per_sample * steps.loss_weights(net.noise_scheduler, timesteps, t.min_snr_gamma,
                                                     net.prediction_type, t.debiased_estimation).to(device)
        return torch.where(is_reg, per_sample * cfg.dataset.prior_loss_weight, per_sample)


def training_step(s: Session, group: list[tuple[list[steps.Sample], list[int]]], epoch: int) -> dict:
    """One optimizer step on ``group``'s batches (gradient accumulation: each batch's backward pass adds to the
    gradients, weighted so that the step learns the mean over all of the group's samples, exactly as one
    batch of them would); returns (and records) ``{"step", "epoch", "loss", "lr", "time"}``."""
    acc, opt, run = s.accelerator, s.opt, s.run
    n = sum(len(batch) for batch, _ in group)
    total = torch.zeros((), device=acc.device)
    for j, (batch, positions) in enumerate(group):
        if run.batch_log:
            run.batch_log.write(json.dumps({"step": run.step + 1, "rank": acc.process_index,
                                            "images": [x.item.image.name for x in batch]}) + "\n")
        with no_gradient_sync(acc, opt, last=j == len(group) - 1):
            loss = batch_loss(s, batch, positions, epoch).sum() / n
            acc.backward(loss)
        total = total + loss.detach().float()
    loss_here = check_health(s, total)
    lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(opt.optimizer.param_groups)}
    opt.optimizer.step()
    opt.lr_scheduler.step()
    opt.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    loss_value = loss_here if acc.num_processes == 1 else acc.gather(total[None]).mean().item()
    record = {"step": run.step, "epoch": epoch, "loss": loss_value, "lr": lrs, "time": round(time.time() - s.t_start, 3)}
    run.write_metrics(record)
    s.emit(Event("step", run.step, epoch, record))
    return record


def no_gradient_sync(acc, opt: Optimization, last: bool):
    """Data-parallel: the processes average their gradients on the last batch of a step only."""
    if last or acc.num_processes == 1:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    for module in [opt.unet] + (opt.text_encoders or []):
        stack.enter_context(acc.no_sync(module))
    return stack


def check_health(s: Session, loss: torch.Tensor) -> float:
    """Clip the gradients, then read the loss and the gradient norm in one host sync; stop on NaN/Inf."""
    acc, cfg = s.accelerator, s.cfg
    grad_norm = None
    if acc.sync_gradients:
        if cfg.optimizer.max_grad_norm:
            grad_norm = acc.clip_grad_norm_(s.opt.params, cfg.optimizer.max_grad_norm)
        elif acc.scaler is None:
            grad_norm = _grad_norm(s.opt.params)
    checks = [loss.detach().float()]
    if grad_norm is not None and acc.scaler is None:  # fp16's scaler skips inf steps itself
        checks.append(torch.as_tensor(grad_norm, device=loss.device).float())
    loss_here, *norm_here = torch.stack(checks).tolist()
    if not math.isfinite(loss_here):
        raise_non_finite(s.run.step + 1, cfg, s.run.files)
    if norm_here and not math.isfinite(norm_here[0]):
        raise_non_finite(s.run.step + 1, cfg, s.run.files, what="gradients")
    return loss_here


def end_of_epoch(s: Session, epoch: int, losses: list[float]) -> None:
    """The epoch's LoRA file(s) when due and the resumable state first (nothing later can cost them), then
    the validation loss and the previews; a failing preview is a warning, not the end of the run."""
    cfg, run, acc = s.cfg, s.run, s.accelerator
    last = epoch == s.data.plan.epochs
    if run.is_main and (last or (cfg.save.every_n_epochs and epoch % cfg.save.every_n_epochs == 0)):
        with use_averaged_weights(s.opt.optimizer):  # a schedule-free optimizer's files hold its average
            save_lora_files(s, epoch, last)
    if run.is_main and cfg.save.save_state:
        runstate.save_state(run.ws, run.fingerprint, s.net.model, s.opt.optimizer, s.opt.lr_scheduler, epoch,
                            run.step, s.net.train_te)
    record = {"epoch": epoch, "step": run.step, "train_loss": float(np.mean(losses)) if losses else None}
    with use_averaged_weights(s.opt.optimizer):
        if s.cached.validation is not None:
            s.opt.unet.eval()
            record["val_loss"] = steps.fixed_noise_loss(
                s.net.model, *s.cached.validation, s.net.noise_scheduler, s.net.prediction_type,
                timesteps=steps.validation_timesteps(cfg.training.min_timestep, cfg.training.max_timestep))
        run.write_metrics(record, flush=True)
        s.emit(Event("epoch", run.step, epoch, record))
        if run.is_main and cfg.sample.every_n_epochs and cfg.sample.prompts and \
                (epoch % cfg.sample.every_n_epochs == 0 or last):
            write_previews(s, epoch)
    acc.wait_for_everyone()


def write_previews(s: Session, epoch: int) -> None:
    """Render and save the epoch's previews; on failure say why in a warning and go on training."""
    try:
        with modules_on(s.cached.idle, s.accelerator.device):
            paths = write_samples(s.cfg, s.net.model, s.run.ws, epoch, s.net.size)
    except Exception as exc:  # noqa: BLE001 - a preview must never cost the run: its files are already saved
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        message = (f"Previews of epoch {epoch} failed ({type(exc).__name__}: {exc}); the epoch's files are saved "
                   "and training goes on. Check the sample.* settings.")
        s.warnings.append(message)
        s.emit(Event("warning", s.run.step, epoch, {"message": message}))
        return
    s.emit(Event("sample", s.run.step, epoch, {"paths": [str(p) for p in paths]}))


def save_lora_files(s: Session, epoch: int, last: bool, name: str = "") -> None:
    """The LoRA as it is now (after ``epoch``, or at a step inside it: ``name``), in every format asked (the last
    epoch's is the final file)."""
    cfg, run = s.cfg, s.run
    name = name or (cfg.save.output_name if last else run.ws.epoch_name(cfg.save.output_name, epoch))
    # each file carries its own name (AUTOMATIC1111's alias) and its own time
    meta = dict(run.metadata, ss_epoch=str(epoch), ss_steps=str(run.step), ss_output_name=name,
                ss_training_finished_at=str(round(time.time(), 3)), **{"modelspec.title": name})
    for fmt in cfg.save.formats:
        saved = Path(lora_io.save_lora(run.ws.lora_file(name, fmt), s.net.model, cfg.network.alpha, fmt=fmt,
                                       precision=cfg.save.precision, metadata=meta))
        run.files.append(saved)
        s.emit(Event("save", run.step, epoch, {"path": str(saved), "format": fmt}))


def write_samples(cfg: Config, model, ws: Workspace, epoch: int, size: tuple[int, int]) -> list[Path]:
    """Render the sample prompts with the LoRA as it is now; save PNGs under samples/."""
    out = []
    prompts = sample_prompts_of(cfg.sample, size)
    for i, img in enumerate(render_previews(model, prompts, cfg.network.clip_skip, cfg.dataset.max_token_length)):
        path = ws.sample_image(epoch, i)
        with atomic_path(path) as tmp:
            img.save(tmp, format="PNG")
        out.append(path)
    return out


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="Training", disable=not enabled)


def _grad_norm(params) -> torch.Tensor | None:
    """Total L2 norm of the gradients (no clipping): non-finite when any gradient is."""
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm() if grads else None


# ------------------------------------------------------------------------- messages

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
