"""Notebook 04's logic: settings from a preset plus the learner's changes, and
their consequences before any training (steps, files, file size, LR scale,
measured time, warnings that teach).
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_nb import LoraNbError, lora_io
from lora_nb.archs import build_architecture
from lora_nb.config import Config, StepsPlan, check_config, plan_steps, preset, setting_help
from lora_nb.course_settings import CourseSettings, is_unset, prompt_lines
from lora_nb.estimate import (estimate_lora_file_size, file_size_of, lora_parameter_count, network_shapes,
                              parameter_count_of)
from lora_nb.dataset import resolve_data_path
from lora_nb.folders import list_images
from lora_nb.images import regularization_advice
from lora_nb.lora_io import training_metadata
from lora_nb.models import load_model_for
from lora_nb.train import train

# notebook parameter → config setting; -1 / "" in a parameter means "the preset's value"
PARAMETER_SETTINGS = {
    "model_source": "model.source",
    "model_family": "model.family",
    "resolution": "dataset.resolution",
    "repeats": "dataset.repeats",
    "epochs": "training.epochs",
    "batch_size": "training.batch_size",
    "learning_rate": "optimizer.learning_rate",
    "unet_lr": "optimizer.unet_lr",
    "text_encoder_lr": "optimizer.text_encoder_lr",
    "lr_scheduler": "optimizer.lr_scheduler",
    "lr_warmup_steps": "optimizer.lr_warmup_steps",
    "lr_warmup_ratio": "optimizer.lr_warmup_ratio",
    "lr_restarts": "optimizer.lr_restarts",
    "optimizer": "optimizer.optimizer",
    "rank": "network.rank",
    "alpha": "network.alpha",
    "unet_targets": "network.unet_targets",
    "network_type": "network.type",
    "conv_rank": "network.conv_rank",
    "conv_alpha": "network.conv_alpha",
    "min_snr_gamma": "training.min_snr_gamma",
    "debiased_estimation": "training.debiased_estimation",
    "min_timestep": "training.min_timestep",
    "zero_terminal_snr": "training.zero_terminal_snr",
    "mixed_precision": "training.mixed_precision",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "gradient_checkpointing": "training.gradient_checkpointing",
    "cache_latents_to_disk": "dataset.cache_latents_to_disk",
    "enable_buckets": "dataset.enable_buckets",
    "bucket_step": "dataset.bucket_step",
    "max_token_length": "dataset.max_token_length",
    "save_every_n_epochs": "save.every_n_epochs",
    "save_precision": "save.precision",
    "sample_every_n_epochs": "sample.every_n_epochs",
    "sampler": "sample.sampler",
    "shuffle_caption": "dataset.shuffle_caption",
    "keep_tokens": "dataset.keep_tokens",
    "trigger_word": "dataset.trigger_word",
    "reg_dir": "dataset.reg_dir",
    "init_from": "network.init_from",
    "sample_prompts": "sample.prompts",
}
# the shared course settings (course.yaml) that fill notebook 04's parameters of the same name
COURSE_PARAMETERS = ("model_source", "model_family", "resolution", "bucket_step", "repeats", "trigger_word",
                     "keep_tokens")
# the settings that trade speed against memory (notebook 04 shows them with their help)
SPEED_MEMORY_SETTINGS = ("training.mixed_precision", "training.gradient_checkpointing", "optimizer.optimizer",
                         "training.batch_size", "training.gradient_accumulation_steps",
                         "training.full_precision_lora", "dataset.cache_latents", "dataset.cache_latents_to_disk",
                         "dataset.cache_text_embeddings")
# saving inside an epoch and the logs other tools read (notebook 04 lists them with their help)
SAVE_AND_LOG_SETTINGS = ("save.every_n_steps", "save.state_every_n_steps", "logging.tensorboard",
                         "logging.wandb_project")
# the noise, loss and caption options notebook 04 lists with their help (set them in config.yaml or with
# lora-nb train --set; each is off or neutral in every preset)
NOISE_LOSS_CAPTION_SETTINGS = ("training.noise_offset", "training.multires_noise_iterations",
                               "training.multires_noise_discount", "training.ip_noise_gamma", "training.loss_type",
                               "training.huber_c", "training.huber_schedule", "training.zero_terminal_snr",
                               "training.max_timestep",
                               "dataset.caption_dropout", "dataset.tag_dropout", "dataset.enable_wildcard", "dataset.caption_prefix",
                               "dataset.caption_suffix", "dataset.masked_loss")
USUAL_VIEWS_PER_IMAGE = (40, 400)  # how often each image is seen in a typical run


def build_config(preset_name: str, values: dict, dataset_dir: str, output_dir: str) -> Config:
    """The preset's config with every value that is not "the preset's" (-1 or "") applied."""
    data = preset(preset_name, values.get("trigger_word") or "", values.get("class_name") or "").to_dict()
    overrides = {"dataset.dir": dataset_dir, "save.output_dir": output_dir}
    for name, setting in PARAMETER_SETTINGS.items():
        if name in values and values[name] not in (-1, -1.0, "", None):
            overrides[setting] = values[name]
    if isinstance(overrides.get("sample.prompts"), str):
        overrides["sample.prompts"] = prompt_lines(overrides["sample.prompts"])
    if str(overrides.get("dataset.reg_dir", "")).lower() == "none":
        overrides["dataset.reg_dir"] = ""
    # Text for a text setting is set as is; text for any other setting goes through Config.with_overrides,
    # which reads it as YAML: a headless run's gradient_checkpointing "yes" / "no" becomes True / False.
    rest = {}
    for setting, value in overrides.items():
        section, key = setting.split(".")
        if isinstance(value, str) and isinstance(data[section][key], str):
            data[section][key] = value
        else:
            rest[setting] = value
    return Config.from_dict(data, where="settings").with_overrides(rest)


def widget_values(cfg: Config) -> dict:
    """The config's values under the notebook's parameter names (to fill the widgets)."""
    d = cfg.to_dict()
    out = {}
    for name, setting in PARAMETER_SETTINGS.items():
        section, key = setting.split(".")
        v = d[section][key]
        out[name] = -1.0 if v is None else "\n".join(v) if isinstance(v, list) else v
    return out


def values_from_course(course: CourseSettings, values: dict, regularization: Path) -> dict:
    """Notebook 04's parameters with what the course chose filled in where 04 left them unset: the shared
    settings chosen in an earlier notebook (not those that are only the preset's), the sample prompts built
    from the trigger and class words, buckets when 02 crops with mode none, and the class pictures 01 put
    in ``regularization`` (unless the course said none)."""
    out = dict(values)
    for name in COURSE_PARAMETERS:
        if is_unset(out.get(name)) and not course.sources[name].startswith("preset"):
            out[name] = course[name]
    out["class_name"] = course["class_name"]
    if is_unset(out.get("sample_prompts")):
        out["sample_prompts"] = course["sample_prompts"]
    if is_unset(out.get("enable_buckets")) and course["crop_mode"] == "none":
        out["enable_buckets"] = "yes"
    if is_unset(out.get("reg_dir")):
        if str(course["regularization_dir"]).lower() == "none":
            out["reg_dir"] = "none"
        elif regularization.is_dir() and any(list_images(f) for f in regularization.iterdir() if f.is_dir()):
            out["reg_dir"] = str(regularization)
    return out


def regularization_lines(cfg: Config, images: int, toy: bool) -> list[str]:
    """What 04 says about the class pictures training will use: how many, where, and the course's 10–20 advice
    (the toy preset pairs one with each of its pictures, and says why)."""
    if not cfg.dataset.reg_dir:
        return ["no class pictures (dataset.reg_dir is empty): the subject may leak into its class word"]
    folder = resolve_data_path(cfg.dataset.reg_dir)  # as the trainer finds it: presets' data/… from any folder
    n = len(list_images(folder)) if folder.is_dir() else 0
    return [f"class pictures: {n} in {folder}"] + regularization_advice(n, images, toy=toy)


@dataclass
class SettingsReport:
    cfg: Config
    plan: StepsPlan
    images: int
    file_bytes: int | None
    lora_params: dict
    alpha_scale: float
    seconds_per_step: float | None = None
    peak_gpu_bytes: int | None = None
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        p, c = self.plan, self.cfg
        out = [
            f"dataset: {self.images} images × repeats → {p.samples_per_epoch} samples per epoch"
            + (" (each paired with a regularization image)" if c.dataset.reg_dir else ""),
            (f"steps per epoch: ceil({p.samples_per_epoch} / batch {c.training.batch_size}) = {p.steps_per_epoch}"
             if p.accumulation == 1 else
             f"steps per epoch: ceil({p.samples_per_epoch} / batch {c.training.batch_size}) = {p.batches_per_epoch} "
             f"batches, {p.accumulation} summed into each step: ceil({p.batches_per_epoch} / {p.accumulation}) = "
             f"{p.steps_per_epoch} (effective batch {p.effective_batch})"),
            f"total steps: {p.steps_per_epoch} × {p.epochs} epochs = {p.total_steps}",
            f"LoRA files saved: {p.saves} (every {c.save.every_n_epochs or '—'} epochs + the final file)",
            f"alpha / rank = {c.network.alpha:g} / {c.network.rank} = {self.alpha_scale:g} "
            f"(the LoRA update is multiplied by this: it acts like a learning-rate factor)",
        ]
        if self.file_bytes is not None:
            out.append(f"LoRA file size: {self.file_bytes / 1e6:.2f} MB each ({c.save.precision}, "
                       f"{sum(self.lora_params.values()):,} trainable parameters)")
        if self.seconds_per_step is not None:
            total = self.seconds_per_step * p.total_steps
            out.append(f"time: {self.seconds_per_step:.2f} s per step measured here → about {_duration(total)} "
                       "of training steps (previews and saves add a little)")
        if self.peak_gpu_bytes:
            out.append(f"GPU memory: {self.peak_gpu_bytes / 2**30:.2f} GiB peak measured in the warm-up")
        out += [f"note: {n}" for n in self.notes]
        out += [f"warning: {w}" for w in self.warnings]
        out += [f"ERROR: {e}" for e in self.errors]
        return out

    def to_dict(self) -> dict:
        return {"steps_per_epoch": self.plan.steps_per_epoch, "total_steps": self.plan.total_steps,
                "epochs": self.plan.epochs, "files_saved": self.plan.saves, "images": self.images,
                "file_bytes": self.file_bytes, "alpha_scale": self.alpha_scale,
                "seconds_per_step": self.seconds_per_step, "peak_gpu_bytes": self.peak_gpu_bytes,
                "warnings": self.warnings, "errors": self.errors}


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def report_settings(cfg: Config, scan, model=None, cuda_available: bool | None = None) -> SettingsReport:
    """Everything notebook 04 prints about ``cfg`` (no training: see :func:`measure_step_time`)."""
    problems = check_config(cfg, cuda_available=cuda_available)
    warnings = [f"{p.setting}: {p.message}" for p in problems if p.level == "warning"]
    errors = [f"{p.setting}: {p.message}" for p in problems if p.level == "error"]
    repeats = cfg.dataset.repeats
    folders = [(n, repeats if repeats is not None else r) for n, r in scan.folders]
    images = sum(n for n, _ in folders)
    plan = plan_steps(folders, max(cfg.training.batch_size, 1), max(cfg.training.epochs, 1),
                      max(cfg.save.every_n_epochs, 0), bool(cfg.dataset.reg_dir), cfg.training.max_steps,
                      accumulation=max(cfg.training.gradient_accumulation_steps, 1))
    if images and cfg.training.batch_size > images:
        errors.append(f"training.batch_size: {cfg.training.batch_size} is larger than the dataset ({images} images).")
    pairing = 2 if cfg.dataset.reg_dir else 1  # with regularization, half of each batch is class images
    views = plan.total_steps * plan.effective_batch / pairing / images if images else 0
    low, high = USUAL_VIEWS_PER_IMAGE
    if images and views < low:
        warnings.append(f"each image is seen only {views:.0f} times ({plan.total_steps} steps): most runs use "
                        f"{low}–{high}; expect underfitting. Raise repeats or epochs.")
    elif images and views > high:
        warnings.append(f"each image is seen {views:.0f} times ({plan.total_steps} steps): most runs use {low}–{high}; "
                        "expect overfitting. Lower repeats or epochs (or save often and pick an earlier file).")
    file_bytes, lora_params = None, {}
    scale = cfg.network.alpha / cfg.network.rank if cfg.network.rank > 0 else float("nan")
    if model is not None and cfg.network.rank > 0 and not errors:
        train_te = cfg.optimizer.text_encoder_lr > 0
        meta = training_metadata(cfg, plan, scan.tag_frequency)
        meta.update(ss_epoch=str(plan.epochs), ss_steps=str(plan.total_steps))
        net = lora_io.network_options(cfg.network)
        file_bytes = estimate_lora_file_size(model, cfg.network.rank, cfg.network.alpha, cfg.network.unet_targets,
                                             train_te, cfg.save.precision, meta, net)
        lora_params = lora_parameter_count(model, cfg.network.rank, cfg.network.unet_targets, train_te, net)
    toy = str(cfg.model.source) == "toy" or (Path(str(cfg.model.source)) / "toy_build.json").exists()
    return SettingsReport(cfg, plan, images, file_bytes, lora_params, scale, warnings=warnings, errors=errors,
                          notes=regularization_lines(cfg, images, toy))


NETWORK_SETTINGS = ("network.type", "network.conv_rank", "network.conv_alpha", "network.lokr_factor", "network.dora",
                    "network.dropout", "network.rank_dropout", "network.module_dropout", "network.block_lr_weights")


def network_type_rows(family: str, rank: int, alpha: float, conv_rank: int, precision: str = "fp16",
                      train_text_encoder: bool = True) -> list[dict]:
    """For each network type at ``rank`` (3x3 convolutions at ``conv_rank`` where the type has them): the
    modules it trains, its parameters and its file size on the full-size ``family`` architecture (built
    on the meta device, so the numbers are the real layers' and nothing is allocated)."""
    arch = build_architecture(family, "meta")
    rows = []
    for network_type, conv in (("lora", 0), ("locon", conv_rank), ("loha", 0), ("loha", conv_rank),
                               ("lokr", 0), ("lokr", conv_rank)):
        if conv == 0 and network_type == "locon":
            continue
        net = {"network_type": network_type, "conv_rank": conv}
        shapes = network_shapes(arch, rank, "kohya", train_text_encoder, net)
        modules = len([k for k in shapes if k.endswith(".alpha")])
        params = sum(parameter_count_of(shapes).values())
        size = file_size_of(shapes, arch, rank, alpha, train_text_encoder, precision, None, net)
        rows.append({"type": network_type, "conv_rank": conv, "modules": modules, "parameters": params,
                     "MB": round(size / 1e6, 1)})
    return rows


def measure_step_time(cfg: Config, steps: int = 4, model=None) -> tuple[float, int | None]:
    """Train ``steps`` real steps in a scratch folder; return (median seconds per step after the first, peak GPU bytes)."""
    import time

    with tempfile.TemporaryDirectory(prefix="lora-nb-warmup-") as tmp:
        trial = cfg.with_overrides({"training.max_steps": steps, "save.output_dir": tmp, "save.save_state": False,
                                    "sample.every_n_epochs": 0, "save.every_n_epochs": 0})
        stamps = []
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        fresh = model if model is not None else load_model_for(cfg)
        train(trial, on_event=lambda e: stamps.append(time.perf_counter()) if e.kind == "step" else None,
              model=fresh, resume=False, progress=False)
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return (statistics.median(gaps) if gaps else float("nan")), peak


def speed_memory_rows(cfg: Config) -> list[tuple[str, str, str]]:
    """(setting, value in ``cfg``, what it does) for every setting that trades speed against memory."""
    return setting_rows(cfg, SPEED_MEMORY_SETTINGS)


def setting_rows(cfg: Config, settings: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """(setting, value in ``cfg``, what it does) for each of ``settings`` (dotted names)."""
    d, helps = cfg.to_dict(), setting_help()
    rows = []
    for setting in settings:
        section, key = setting.split(".")
        value = d[section][key]
        rows.append((setting, "''" if value == "" else str(value), helps.get(setting, "")))  # '' shows "empty"
    return rows


def gpu_memory_gib() -> float | None:
    """The CUDA GPU's memory in GiB, or None without one."""
    return torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None


def memory_advice(cfg: Config, family: str, gpu_gib: float | None) -> list[str]:
    """What to switch on so training fits the card: the usual recipe for 8 GB (SD1.5) and 16 GB (SDXL)."""
    t, o, d = cfg.training, cfg.optimizer, cfg.dataset
    if gpu_gib is None:
        return ["no CUDA GPU here: training runs in fp32 on the CPU (the toy model is sized for this); "
                "the memory savers matter on a GPU."]
    want = {"training.mixed_precision": ("fp16/bf16", t.mixed_precision in ("fp16", "bf16")),
            "dataset.cache_latents": ("true", d.cache_latents)}
    tight = gpu_gib < (12 if family == "sd15" else 24)
    if tight and family == "sdxl":  # SDXL's two text encoders: freezing them lets their outputs be cached
        want["optimizer.text_encoder_lr"] = ("0 (frozen text encoders, cached embeddings)",
                                             o.text_encoder_lr == 0 and d.cache_text_embeddings != "no")
    if tight:
        want["training.gradient_checkpointing"] = ("true", t.gradient_checkpointing)
        want["optimizer.optimizer"] = ("AdamW8bit (or another 8-bit optimizer)", o.optimizer.endswith("8bit"))
        want["training.batch_size"] = ("1–2 (training.gradient_accumulation_steps keeps a larger effective batch)",
                                       t.batch_size <= 2)
    missing = [f"{k}={v}" for k, (v, ok) in want.items() if not ok]
    card = f"{gpu_gib:.0f} GiB GPU, {'SD1.5' if family == 'sd15' else 'SDXL'}"
    if not missing:
        return [f"{card}: the memory savers this card needs are on."]
    return [f"{card}: {'tight — ' if tight else ''}consider " + ", ".join(missing) +
            " (the GPU check in benchmarks/ measures what each one saves)."]


def describe_base_models() -> list[tuple[str, str, str]]:
    """Base models the course names (C13): (use, model, where to get it)."""
    return [
        ("offline course", "toy", "bundled in data/toy-model (CPU, minutes)"),
        ("realistic", "SD1.5", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
        ("realistic", "ChilloutMix, MajicMIX Realistic, Realistic Vision", "community .safetensors checkpoints"),
        ("anime", "AnyLoRA, Anything, ReV Animated", "community .safetensors checkpoints"),
        ("SDXL", "SDXL base 1.0", "stabilityai/stable-diffusion-xl-base-1.0 (1024 px; fp16-fix VAE: madebyollin/sdxl-vae-fp16-fix)"),
        ("SDXL anime", "Illustrious-XL, Pony Diffusion V6 XL", "community .safetensors (presets illustrious, pony)"),
        ("SDXL anime v-pred", "NoobAI-XL V-Pred 1.0", "Laxhar/noobai-XL-Vpred-1.0 (preset noobai-vpred)"),
    ]


def model_for_estimates(cfg: Config):
    """(model, loaded, note): the base model when it can be loaded here; otherwise its full-size
    architecture on the meta device (module shapes only), with a note saying why."""

    try:
        return load_model_for(cfg), True, ""
    except LoraNbError as exc:
        family = cfg.model.family if cfg.model.family != "auto" else "sd15"
        note = (f"{exc} File sizes below use the full-size {family} architecture; "
                "the time warm-up needs the model itself and is skipped.")
        return build_architecture(family, "meta"), False, note


class SettingsPanel:
    """Notebook 04's live view: settings in, consequences out, recomputed on every change.

    Choosing another preset refills every field with that preset's values.
    Models for the estimates are loaded once per source and kept.
    """

    def __init__(self, preset_name: str, values: dict, scan, dataset_dir: str, output_dir: str):
        self.preset = preset_name
        self.scan = scan
        self.dataset_dir = dataset_dir
        self.output_dir = output_dir
        self._models: dict[str, tuple] = {}
        self.form = None
        self.last_report: SettingsReport | None = None
        self.initial = {"preset": preset_name, **widget_values(self.config_for({"preset": preset_name, **values}))}

    def config_for(self, values: dict) -> Config:
        return build_config(values["preset"], values, self.dataset_dir, self.output_dir)

    def model_for(self, cfg: Config):
        if cfg.model.source not in self._models:
            self._models[cfg.model.source] = model_for_estimates(cfg)
        return self._models[cfg.model.source]

    def refresh(self, values: dict) -> SettingsReport | None:
        """Print the consequences of ``values`` (refill from the preset first when it changed)."""
        if values["preset"] != self.preset:
            self.preset = values["preset"]
            fresh = widget_values(preset(self.preset))
            if self.form is not None and self.form.interactive:
                self.form.set_values(fresh)  # refreshes again with the preset's values
                return None
            values = {**values, **fresh}
        cfg = self.config_for(values)
        model, _loaded, note = self.model_for(cfg)
        report = report_settings(cfg, self.scan, model)
        if note:
            report.notes.append(note)
        print("\n".join(report.lines()))
        self.last_report = report
        return report


# Why each value of the toy preset differs from the real presets: a learner sees the toy's numbers first and
# must not take them for a recommendation for SD1.5 / SDXL.
TOY_REASONS = {
    "resolution": "the toy model draws 64x64 pictures (16x16 latents); SD1.5 learned 512, SDXL 1024",
    "repeats x epochs": "48 pictures x 10 repeats, paired with as many class images, / batch 8 x 14 epochs = "
                        "1,680 steps: minutes on a CPU",
    "batch size": "8 (half of it class images): a CPU takes 8 toy pictures at once; at 512 px a GPU's memory "
                  "usually allows 1-2",
    "UNet LR": "chosen by trial on the toy (docs/toy-world.md); SD's 1e-4 is tuned for an 860 M-parameter UNet, "
               "the toy's has 1.7 M",
    "text-encoder LR": "0.4 of the UNet LR; the real presets use 1/2",
    "rank / alpha": "alpha = rank gives the small toy LoRA its whole update; rank 16 / alpha 8 was not better "
                    "(docs/toy-world.md)",
    "optimizer": "8-bit AdamW needs a GPU (bitsandbytes); on a CPU the plain AdamW it imitates",
    "scheduler": "the same cosine as the anime preset: 1,680 steps leave no room for restarts",
    "mixed precision": "CPUs train in fp32; fp16/bf16 is for GPUs",
    "min-SNR gamma": "gamma 1 weights the noisy steps that decide the zorb's eyes more (docs/toy-world.md: "
                     "eyes in 0.50 of 48 generations at gamma 5, about 0.6 at gamma 1)",
    "debiased estimation": "1/sqrt(SNR) on top weights the noisiest steps most, where the toy LoRA decides the "
                           "eyes: the zorb in 0.35 of held-out generations without it, 0.94-1.00 with it for the "
                           "two training seeds it was tuned on, 0.48-0.96 over eight (docs/toy-world.md); for real "
                           "models it is an option, not the rule",
    "timesteps trained": "only the noisier half: with debiased estimation the quieter half carries little weight "
                         "yet took half the samples. For the course's training seed the zorb in 0.98 of held-out "
                         "generations instead of 0.69; over six seeds 0.58-0.98 instead of 0.32-0.94, no "
                         "difference six seeds can resolve (docs/toy-world.md); the real presets train on all",
    "class images": "without them the zorb leaks into plain 'circle' prompts (docs/toy-world.md: 25-75% of "
                    "them, against 0-4% with)",
    "clip skip": "the toy text encoder has 3 layers; skipping one would leave 2",
    "shuffle tags / keep first": "not shuffled: each caption comes in six forms already (notebook 03), and "
                                 "shuffling them too did not resolve a difference over three trainings "
                                 "(docs/toy-world.md)",
}


def preset_rows(names: tuple[str, ...] = ("anime", "realistic", "toy")) -> list[dict]:
    """The presets side by side, one row per setting, with why the toy's value differs (:data:`TOY_REASONS`)."""
    from lora_nb.config import preset

    cfgs = {n: preset(n) for n in names}

    def values(c: Config) -> dict:
        o, n, t, d = c.optimizer, c.network, c.training, c.dataset
        return {"resolution": d.resolution, "repeats x epochs": f"{d.repeats} x {t.epochs}",
                "batch size": str(t.batch_size), "UNet LR": f"{o.effective_unet_lr:g}",
                "text-encoder LR": f"{o.text_encoder_lr:g}", "rank / alpha": f"{n.rank} / {n.alpha:g}",
                "optimizer": o.optimizer, "scheduler": o.lr_scheduler, "mixed precision": t.mixed_precision,
                "min-SNR gamma": f"{t.min_snr_gamma:g}",
                "debiased estimation": "yes" if t.debiased_estimation else "no",
                "timesteps trained": f"{t.min_timestep}-{t.max_timestep - 1}", "class images": "yes" if d.reg_dir else "no",
                "clip skip": str(n.clip_skip),
                "shuffle tags / keep first": f"{'yes' if d.shuffle_caption else 'no'} / {d.keep_tokens}"}

    table = {n: values(c) for n, c in cfgs.items()}
    return [{"setting": s, **{n: table[n][s] for n in names}, "why the toy differs": TOY_REASONS.get(s, "")}
            for s in table[names[0]]]
