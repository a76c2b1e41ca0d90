"""Every training setting, as dataclasses; presets; validation; the steps math.

A :class:`Config` groups the settings the course teaches (concepts C13–C25)
plus what a real trainer needs. It round-trips through YAML, accepts dotted
overrides (``network.rank=16``), and is validated *before* any compute: every
wrong value gives one message naming the setting and the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lora_nb import LoraNbError
from lora_nb.fsutil import write_text_atomic

OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "Lion8bit", "Prodigy", "SGD", "Adafactor", "CAME", "AdamWScheduleFree",
              "DAdaptAdam")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "rex")
PRECISIONS = ("no", "fp16", "bf16")
SAVE_PRECISIONS = ("fp16", "bf16", "fp32")
SAVE_FORMATS = ("kohya", "diffusers")
UNET_TARGETS = ("kohya", "attention")
MAX_RESOLUTION_SIDE = 4096  # pixels a side of dataset.resolution (SDXL trains at 1024)
NETWORK_TYPES = ("lora", "locon", "loha", "lokr")  # what each trains and stores: lora_nb.networks
SAMPLERS = ("Euler", "Euler a", "Heun", "LMS", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE",
            "DPM++ SDE", "DPM2", "DPM2 a", "DDIM")
NAMED_SIZES = {
    "square": (512, 512), "portrait": (512, 768), "landscape": (768, 512),
    "sdxl-square": (1024, 1024), "sdxl-portrait": (832, 1216), "sdxl-landscape": (1216, 832),
    "toy-square": (64, 64), "toy-portrait": (64, 96), "toy-landscape": (96, 64),
}


class ConfigError(LoraNbError):
    """One or more settings are wrong; the message lists each with its fix."""


@dataclass
class ModelConfig:
    source: str = "toy"  # "toy", a hub id, a local diffusers folder or a .safetensors checkpoint
    family: str = "auto"  # auto / sd15 / sdxl
    prediction_type: str = "auto"  # auto (from the model's scheduler) / epsilon / v_prediction
    vae: str = ""  # optional separate VAE (e.g. the fp16-fix VAE for SDXL); empty = the model's own
    allow_pickle: bool = False  # allow .ckpt/.pt checkpoints (loaded with weights_only=True)


@dataclass
class DatasetConfig:
    dir: str = "data/toy-concept"  # folder of <repeats>_<concept> subfolders (kohya convention) or images
    resolution: str = "64x64"  # WIDTHxHEIGHT, or a named size (square, portrait, landscape, sdxl-…, toy-…)
    repeats: int | None = None  # times each image is learned per epoch; None = from the folder names
    caption_extension: str = ".txt"  # the captions the trainer reads, next to each image
    max_token_length: int = 225  # 75 / 150 / 225 caption tokens, encoded in 75-token chunks as AUTOMATIC1111 does
    trigger_word: str = ""  # put first in every caption when missing; empty = captions as they are
    enable_wildcard: bool = False  # a caption file's lines are forms of one caption: each step trains one at random, and one option of each {a|b} (sd-scripts' enable_wildcard); off = lines joined as tags
    shuffle_caption: bool = False  # shuffle comma-separated tags every step
    keep_tokens: int = 1  # with shuffle: this many leading tags stay in place (the trigger word)
    caption_dropout: float = 0.0  # share of steps trained with an empty caption
    flip_aug: bool = False  # random horizontal flips (cached too)
    tag_dropout: float = 0.0  # share of tags left out of each step's caption (the first keep_tokens never)
    caption_prefix: str = ""  # text put before every training caption as trained (never shuffled or dropped)
    caption_suffix: str = ""  # text put after every training caption as trained
    masked_loss: bool = False  # weight the loss by each image's mask (<name>.mask.png beside it, else its alpha): learn the subject, not the background
    reg_dir: str = ""  # regularization images (same class, without the subject); empty = none
    prior_loss_weight: float = 1.0  # weight of the regularization images' loss
    enable_buckets: bool = False  # no crop: aspect-ratio buckets instead of one size
    bucket_step: int = 64  # bucket side step in pixels (64 real models, 8 toy)
    cache_latents: bool = True  # encode each image with the VAE once, not every step
    cache_latents_to_disk: bool = False  # keep those latents on disk: later runs on the same images skip the VAE
    cache_dir: str = ""  # where the disk cache lives; empty = <save.output_dir>/cache
    cache_text_embeddings: str = "auto"  # auto / yes / no; auto = when the text encoder is frozen and captions fixed
    validation_split: int = 0  # images held out of training for the fixed-noise validation loss
    validation_dir: str = ""  # a folder of images never trained on, for the validation loss; empty = none


@dataclass
class NetworkConfig:
    rank: int = 8  # network dim: capacity and file size
    alpha: float = 4.0  # the update is scaled by alpha / rank
    unet_targets: str = "kohya"  # kohya (every linear in transformer blocks) / attention (q, k, v, out)
    clip_skip: int = 1  # use the text encoder's N-th layer from the end (2 is common for anime models)
    init_from: str = ""  # a kohya LoRA file to continue training (same family, rank, alpha and modules); empty = new
    type: str = "lora"  # lora / locon (3x3 convolutions too) / loha (Hadamard product) / lokr (Kronecker product)
    conv_rank: int = 0  # rank on the UNet's 3x3 convolutions (locon, loha, lokr; sd-scripts' conv_dim); 0 = off
    conv_alpha: float = 1.0  # alpha of those convolutions (sd-scripts' conv_alpha)
    lokr_factor: int = -1  # lokr: the Kronecker factor's size; -1 = as square as the layer allows
    dora: bool = False  # lora/locon: weight-decomposed LoRA (DoRA): a learned magnitude per output row besides the low-rank direction
    dropout: float = 0.0  # lora/locon: share of the LoRA's input features dropped each step (peft's lora_dropout)
    rank_dropout: float = 0.0  # loha/lokr: share of the update's output rows dropped each step
    module_dropout: float = 0.0  # loha/lokr: share of steps on which a module is left out
    block_lr_weights: list[float] = field(default_factory=list)  # UNet LR multipliers [down, mid, up]; empty = 1, 1, 1


@dataclass
class OptimizerConfig:
    optimizer: str = "AdamW8bit"  # AdamW, AdamW8bit, Lion, Lion8bit, Prodigy, SGD, Adafactor, CAME, AdamWScheduleFree, DAdaptAdam; 8bit = state in 1 byte a value
    learning_rate: float = 1e-4  # base LR; used for the UNet when unet_lr is not set
    unet_lr: float | None = None  # overrides learning_rate for the UNet when set
    text_encoder_lr: float = 0.0  # 0 = text encoder frozen; usually unet_lr/2 … /10
    lr_scheduler: str = "cosine"  # constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial, rex
    lr_warmup_steps: int = 0  # steps of linear warm-up
    lr_warmup_ratio: float = 0.0  # or the warm-up as a share of all steps (0.05 = the first 5%); 0 = lr_warmup_steps decides
    lr_restarts: int = 1  # cosine_with_restarts: number of hard restarts (cycles)
    lr_power: float = 1.0  # polynomial: the power
    weight_decay: float = 0.01  # decoupled weight decay (AdamW, Lion)
    max_grad_norm: float = 1.0  # gradient clipping; 0 = off

    def warmup_steps_for(self, total_steps: int) -> int:
        """The warm-up length of a run of ``total_steps``: ``lr_warmup_ratio`` of it when set, else
        ``lr_warmup_steps`` (the one home of this rule)."""
        return round(self.lr_warmup_ratio * total_steps) if self.lr_warmup_ratio else self.lr_warmup_steps

    @property
    def effective_unet_lr(self) -> float:
        """The UNet's learning rate: ``unet_lr`` when set, else ``learning_rate`` (the one home of this rule)."""
        return self.unet_lr if self.unet_lr is not None else self.learning_rate


@dataclass
class TrainingConfig:
    epochs: int = 10  # passes over the dataset (each image × repeats per pass)
    batch_size: int = 1  # images per step: faster epochs, more memory
    gradient_accumulation_steps: int = 1  # batches summed before each optimizer step: effective batch = batch_size × this, at one batch's memory
    mixed_precision: str = "no"  # no / fp16 / bf16: half-precision compute, LoRA weights stay fp32 (unless full_precision_lora); fp16 needs a CUDA GPU
    full_precision_lora: str = "fp32"  # fp32 / fp16 / bf16: the LoRA's own weights and optimizer state too (sd-scripts' full_fp16/full_bf16): least memory, coarser updates
    seed: int = 42  # same seed + settings → same LoRA
    noise_offset: float = 0.0  # 0.05–0.1 helps very dark/bright images
    min_snr_gamma: float = 0.0  # 0 = off; 5 is the usual value
    debiased_estimation: bool = False  # weight each step's loss by 1/sqrt(SNR): the noisiest steps count most
    min_timestep: int = 0  # train on timesteps from this one (0–999; sd-scripts' --min_timestep): above 0 skips the quietest, detail-only steps
    max_timestep: int = 1000  # up to this one, not included (1–1000): below 1000 skips the noisiest, layout-deciding steps
    zero_terminal_snr: bool = False  # rescale the noise schedule so its last step is pure noise (v-prediction models only)
    multires_noise_iterations: int = 0  # 0 = off; 6–10: add coarser noise too (pyramid noise), brighter/darker pictures learnable
    multires_noise_discount: float = 0.3  # each coarser level's weight is this times the previous one's
    ip_noise_gamma: float = 0.0  # 0 = off; about 0.1: perturb the noise the model sees, not the one it predicts
    loss_type: str = "l2"  # l2 (mean squared error) / huber / smooth_l1: less pull from outlier pixels
    huber_c: float = 0.1  # huber / smooth_l1: where the loss turns from squared to linear
    huber_schedule: str = "snr"  # huber_c over the timesteps: snr (larger at low noise), exponential, constant
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: far less memory, slower steps
    max_steps: int = 0  # 0 = epochs decide; otherwise stop after this many steps


@dataclass
class SampleConfig:
    every_n_epochs: int = 0  # 0 = no previews during training
    prompts: list[str] = field(default_factory=list)  # sd-scripts prompt lines (--n --w --h --d --s --l --ss)
    sampler: str = "DDIM"  # AUTOMATIC1111 sampler name
    steps: int = 20  # denoising steps per preview
    cfg_scale: float = 7.0  # how strongly previews follow the prompt
    seed: int = 42  # fixed seed: previews comparable across epochs
    width: int = 0  # 0 = the training resolution
    height: int = 0  # 0 = the training resolution
    negative_prompt: str = ""  # default negative prompt for previews


@dataclass
class SaveConfig:
    every_n_epochs: int = 1  # 0 = only the final file
    every_n_steps: int = 0  # also a LoRA file every N optimizer steps (<name>-step00000120); 0 = off
    state_every_n_steps: int = 0  # also the resumable state every N steps: an interrupted epoch continues where it stopped; 0 = at epoch ends
    precision: str = "fp16"  # fp16 / bf16 / fp32
    formats: list[str] = field(default_factory=lambda: ["kohya"])  # kohya and/or diffusers
    output_name: str = "lora"  # file name: <name>.safetensors, <name>-e0002.safetensors …
    output_dir: str = "runs/default"  # the workspace: lora/, samples/, metrics.jsonl, state/
    save_state: bool = True  # keep resumable training state (rerun continues)


@dataclass
class LoggingConfig:
    tensorboard: bool = False  # also write TensorBoard event files under <workspace>/logs/ (loss, LR, samples)
    wandb_project: str = ""  # also log to Weights & Biases under this project (pip install wandb; wandb login); empty = off


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    # ------------------------------------------------------------------ conversions
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def write_yaml(self, path: str | Path) -> Path:

        return write_text_atomic(Path(path), self.to_yaml())

    @classmethod
    def from_dict(cls, data: dict, where: str = "config") -> "Config":
        return _build(cls, data or {}, where)

    @classmethod
    def from_yaml(cls, text: str, where: str = "config") -> "Config":
        try:
            _refuse_alias_bombs(text, where)
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            what = " ".join(str(getattr(exc, "problem", None) or exc).split())  # one line
            raise ConfigError(f"{where} is not valid YAML{at}: {what}. Check the indentation, colons and quotes there.") from None
        except (ValueError, OverflowError, RecursionError) as exc:  # e.g. a date like 2024-13-45, deep nesting
            raise ConfigError(f"{where} is not valid YAML: {type(exc).__name__}: {str(exc)[:200]}") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{where} must be a mapping of sections (model:, dataset:, …), not {type(data).__name__}.")
        return cls.from_dict(data or {}, where)

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"{path} is a folder, not a config file: give the path of its YAML file (e.g. "
                              f"{path / 'config.yaml'}), or write one with `lora-nb config --preset toy > FILE`.")
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist. Write one with `lora-nb config --preset toy > {path}`.")
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not UTF-8 text; save it as UTF-8.") from None
        return cls.from_yaml(text, where=str(path))

    def with_overrides(self, overrides: dict | list[str]) -> "Config":
        """A copy with dotted overrides applied: ``{"network.rank": 16}`` or ``["network.rank=16"]``."""
        if isinstance(overrides, list):
            overrides = dict(_split_assignment(o) for o in overrides)
        data = self.to_dict()
        for key, value in overrides.items():
            parts = key.split(".")
            if len(parts) == 1:
                parts = [_section_of(parts[0]), parts[0]]
            section, name = parts[0], ".".join(parts[1:])
            if section not in data or name not in data[section]:
                raise ConfigError(f"Unknown setting {key!r}. Known: {', '.join(all_setting_names())}.")
            text_setting = _field_type(section, name).replace(" ", "") in ("str", "str|None")
            if isinstance(value, str) and value != "" and not text_setting:  # "no" stays text for text settings
                try:
                    value = yaml.safe_load(value)
                except (yaml.YAMLError, ValueError, OverflowError, RecursionError):
                    pass  # not YAML: keep the text; the type check names the setting if text is wrong
            data[section][name] = value
        return Config.from_dict(data, where="overrides")


def _split_assignment(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"Override {text!r} must look like section.name=value, e.g. network.rank=16.")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def setting_help() -> dict[str, str]:
    """``{"network.rank": "network dim: capacity and file size", …}`` from the comments above."""
    import inspect

    out = {}
    for section, cls in _SECTIONS.items():
        for line in inspect.getsource(cls).splitlines():
            m = re.match(r"\s+(\w+):.*?#\s*(.+)$", line)
            if m:
                out[f"{section}.{m.group(1)}"] = m.group(2).strip()
    return out


def all_setting_names() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in _SECTIONS.items() for f in dataclasses.fields(cls)]


_SECTIONS = {"model": ModelConfig, "dataset": DatasetConfig, "network": NetworkConfig, "optimizer": OptimizerConfig,
             "training": TrainingConfig, "sample": SampleConfig, "save": SaveConfig, "logging": LoggingConfig}


def _field_type(section: str, name: str) -> str:
    f = next(f for f in dataclasses.fields(_SECTIONS[section]) if f.name == name)
    return f.type if isinstance(f.type, str) else str(f.type)


def _section_of(name: str) -> str:
    owners = [s for s, cls in _SECTIONS.items() if name in {f.name for f in dataclasses.fields(cls)}]
    if len(owners) != 1:
        raise ConfigError(f"Unknown or ambiguous setting {name!r}: write it as section.name ({', '.join(all_setting_names())}).")
    return owners[0]


def _check_type(value, annotation: str, where: str):
    """Coerce/check one value against its annotation string; raise a named ConfigError."""
    hint = annotation.replace(" ", "")
    optional = hint.endswith("|None")
    base = hint[:-5] if optional else hint
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where} must not be empty (expected {base}).")
    if base == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, not {value!r}.")
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{where} must be a whole number, not {value!r}.")
        return int(value)
    if base == "float":
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where} must be a number, not {value!r}.") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, not {value!r}.")
        try:
            value = float(value)
        except OverflowError:  # an int too large for a float
            value = math.inf
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, not {value!r}.")
        return value
    if base == "str":
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted no / yes as a boolean
            return "no" if value is False else "yes"
        if isinstance(value, (int, float)):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be text, not {value!r}.")
        return value
    if base == "list[float]":
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list of numbers such as [1.0, 0.5, 1.0], not {value!r}.")
        return [_check_type(v, "float", f"{where}[{i}]") for i, v in enumerate(value)]
    if base == "list[str]":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of text lines, not {value!r}.")
        return list(value)
    raise AssertionError(f"unhandled annotation {annotation}")  # pragma: no cover - programming error


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, not {type(data).__name__}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"Unknown setting(s) {', '.join(repr(u) for u in unknown)} in {where}. "
            f"Known here: {', '.join(fields)}. Check the spelling."
        )
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        value = data[name]
        if cls is Config:
            kwargs[name] = _build(_SECTIONS[name], value or {}, f"{where}.{name}" if where != "config" else name)
        else:
            kwargs[name] = _check_type(value, f.type if isinstance(f.type, str) else str(f.type), f"{where}.{name}")
    return cls(**kwargs)


# ---------------------------------------------------------------------------- presets

def _preset_anime() -> Config:
    c = Config()
    c.model.source = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    c.dataset.resolution = "512x512"
    c.dataset.repeats, c.training.epochs = 8, 20
    c.network.rank, c.network.alpha, c.network.clip_skip = 16, 8.0, 2
    c.optimizer.learning_rate = c.optimizer.unet_lr = 1e-4
    c.optimizer.text_encoder_lr = 5e-5
    c.optimizer.optimizer, c.optimizer.lr_scheduler = "AdamW8bit", "cosine"
    c.training.mixed_precision, c.save.precision = "fp16", "fp16"
    c.training.batch_size = 1
    c.dataset.shuffle_caption, c.dataset.keep_tokens = True, 1
    c.save.every_n_epochs, c.sample.every_n_epochs = 2, 2
    c.sample.sampler, c.sample.steps, c.sample.cfg_scale = "Euler a", 28, 7.0
    c.dataset.bucket_step = 64
    return c


def _preset_realistic() -> Config:
    c = _preset_anime()
    c.dataset.repeats, c.training.epochs = 15, 10
    c.network.rank, c.network.alpha, c.network.clip_skip = 64, 32.0, 1
    c.sample.sampler = "DPM++ 2M Karras"
    return c


def _preset_toy() -> Config:
    """Fast on a CPU: the toy model learns the zorb in 1680 steps (48 images × 10 repeats, each paired with a
    regularization circle, / batch 8 × 14 epochs), a few minutes on 2 cores. 14 epochs, not 10: with the caption
    forms the 10-epoch final file drew the zorb in 0.84-0.95 of sentence prompts, 14 epochs 0.95-0.98 (3 seeds
    each, docs/toy-world.md)."""
    c = Config()
    c.model.source = "toy"
    c.dataset.dir = "data/toy-concept"
    c.dataset.resolution = "64x64"
    c.dataset.repeats, c.training.epochs = 10, 14
    c.dataset.bucket_step = 8
    c.dataset.max_token_length = 75  # toy captions are ~9 tokens; one chunk of the toy encoder's 16 positions
    c.dataset.reg_dir, c.dataset.prior_loss_weight = "data/toy-reg", 0.3  # without them the zorb leaks into "circle"
    c.dataset.validation_dir = "data/toy-val"  # 8 zorbs drawn apart from the 48 trained on: the validation loss
    c.dataset.enable_wildcard = True  # notebook 03 writes each caption in several forms, one line each: one a step
    c.network.rank, c.network.alpha = 8, 8.0
    c.optimizer.optimizer, c.optimizer.lr_scheduler = "AdamW", "cosine"
    c.optimizer.learning_rate = 5e-3
    c.optimizer.text_encoder_lr = 2e-3
    c.optimizer.lr_warmup_steps = 20
    c.training.batch_size, c.training.mixed_precision = 8, "no"
    c.training.min_snr_gamma = 1.0  # weights the noisy steps that decide the eyes more than γ 5 (docs/toy-world.md)
    c.training.debiased_estimation = True  # and 1/√SNR on top: the noisiest steps, where the eyes are decided, count most
    c.training.min_timestep = 500  # and only the noisier half of the steps, where that weight lies (docs/toy-world.md)
    c.save.every_n_epochs, c.save.precision = 2, "fp32"
    c.save.output_dir = "runs/toy"
    c.sample.every_n_epochs, c.sample.sampler, c.sample.steps, c.sample.cfg_scale = 2, "DDIM", 20, 5.0
    c.sample.prompts = ["a red zorb circle on a skyblue background --d 1",
                        "a yellow zorb circle on a gray background --d 2",
                        "a blue circle on a beige background --d 3"]
    return c


def _preset_sdxl_realistic() -> Config:
    c = _preset_realistic()
    c.model.source, c.model.family = "stabilityai/stable-diffusion-xl-base-1.0", "sdxl"
    c.dataset.resolution = "1024x1024"
    c.network.rank, c.network.alpha, c.network.clip_skip = 32, 16.0, 1  # SDXL reads the penultimate layer already
    c.optimizer.text_encoder_lr = 0.0  # both text encoders frozen, as SDXL LoRAs usually are (sd-scripts' unet only)
    c.training.gradient_checkpointing = True  # a 2.6 B-parameter UNet at 1024 px: activations are what fill the GPU
    c.sample.steps, c.sample.cfg_scale = 28, 6.0
    return c


def _preset_sdxl_anime() -> Config:
    c = _preset_sdxl_realistic()
    c.dataset.repeats, c.training.epochs = 8, 20
    c.network.rank, c.network.alpha = 16, 8.0
    c.dataset.shuffle_caption, c.dataset.keep_tokens = True, 1
    c.sample.sampler = "Euler a"
    return c


def _preset_illustrious() -> Config:
    c = _preset_sdxl_anime()
    c.model.source = "Illustrious-XL-v0.1.safetensors"  # a community file: download it and give its path
    return c


def _preset_pony() -> Config:
    c = _preset_sdxl_anime()
    c.model.source = "ponyDiffusionV6XL.safetensors"  # a community file: download it and give its path
    c.network.clip_skip = 2  # what Pony Diffusion V6 XL was trained and is used with
    return c


def _preset_noobai_vpred() -> Config:
    c = _preset_sdxl_anime()
    c.model.source = "Laxhar/noobai-XL-Vpred-1.0"
    c.model.prediction_type, c.training.zero_terminal_snr = "v_prediction", True
    c.sample.cfg_scale = 4.5  # v-prediction models want a lower CFG
    return c


PRESETS = {"anime": _preset_anime, "realistic": _preset_realistic, "sdxl-realistic": _preset_sdxl_realistic,
           "sdxl-anime": _preset_sdxl_anime, "illustrious": _preset_illustrious, "pony": _preset_pony,
           "noobai-vpred": _preset_noobai_vpred, "toy": _preset_toy}
PRESET_DESCRIPTIONS = {
    "anime": "SD1.5 anime character or style: 512 px, rank 16 / alpha 8, repeats 8 x 20 epochs, clip skip 2, "
             "shuffled tags",
    "realistic": "SD1.5 photos of a person or thing: 512 px, rank 64 / alpha 32, repeats 15 x 10 epochs",
    "sdxl-realistic": "SDXL base 1.0 photos: 1024 px, rank 32 / alpha 16, UNet only, gradient checkpointing "
                      "(less memory, slower steps)",
    "sdxl-anime": "SDXL anime on SDXL base 1.0: 1024 px, rank 16 / alpha 8, repeats 8 x 20, shuffled tags, UNet only",
    "illustrious": "Illustrious-XL (an SDXL anime base, booru tags): as sdxl-anime; download its .safetensors file "
                   "and set model_source to it",
    "pony": "Pony Diffusion V6 XL: as sdxl-anime with clip skip 2 and score_9-style prompts; download the file "
            "(Civitai) and set model_source to it",
    "noobai-vpred": "NoobAI-XL V-Pred 1.0: as sdxl-anime with v-prediction and zero terminal SNR, CFG 4.5",
    "toy": "the offline course: the bundled toy model on a CPU in minutes (64 px, 1,680 steps)",
}


ANIME_PRESETS = ("anime", "sdxl-anime", "illustrious", "pony", "noobai-vpred")
REAL_TRIGGER = "ohwx"  # a rare token often used as a trigger word; your own rare word is as good


def default_class_word(name: str) -> str:
    """The class word a preset's prompts use until the learner names theirs."""
    return "circle" if name == "toy" else "1girl" if name in ANIME_PRESETS else "person"


def sample_prompts_for(name: str, trigger: str, class_word: str) -> list[str]:
    """Preview prompts for preset ``name`` built from the trigger and class words: two with the trigger, one
    without it (the last shows whether the subject leaks into its class)."""
    if name == "toy":
        return list(_preset_toy().sample.prompts)
    if name in ANIME_PRESETS:
        score = "score_9, score_8_up, score_7_up, " if name == "pony" else ""
        neg = "--n lowres, bad anatomy, bad hands, worst quality"
        return [f"{score}{trigger}, {class_word}, solo, upper body, looking at viewer {neg} --d 1",
                f"{score}{trigger}, {class_word}, full body, standing, outdoors, smile {neg} --d 2",
                f"{score}{class_word}, solo, upper body, looking at viewer {neg} --d 3"]
    neg = "--n lowres, blurry, deformed, watermark"
    return [f"a photo of {trigger} {class_word}, looking at the camera, natural light {neg} --d 1",
            f"a photo of {trigger} {class_word} in a park, smiling {neg} --d 2",
            f"a photo of a {class_word}, looking at the camera, natural light {neg} --d 3"]


def preset(name: str, trigger_word: str = "", class_word: str = "") -> Config:
    """A fresh Config filled with a preset's recommended values (:data:`PRESET_DESCRIPTIONS` says what each is).

    The real presets put ``trigger_word`` (default :data:`REAL_TRIGGER`) first in every caption, build their
    preview prompts from it and ``class_word``, and name the LoRA files after it; the toy preset's captions,
    prompts and file names (``lora``) are its own."""
    if name not in PRESETS:
        raise ConfigError(f"Unknown preset {name!r}: choose one of {', '.join(PRESETS)}.")
    cfg = copy.deepcopy(PRESETS[name]())
    if name != "toy":
        cfg.dataset.trigger_word = trigger_word or REAL_TRIGGER
        cfg.sample.prompts = sample_prompts_for(name, cfg.dataset.trigger_word, class_word or default_class_word(name))
        # the files are named after the trigger: two LoRAs in one UI folder never share the alias "lora"
        cfg.save.output_name = re.sub(r"[^\w.\- ]", "_", cfg.dataset.trigger_word).strip(". ") or "lora"
    return cfg


# ---------------------------------------------------------------------------- validation

MAX_YAML_VALUES = 100_000  # a full config holds about 80; aliases that expand beyond this are an attack or a mistake


def _refuse_alias_bombs(text: str, where: str) -> None:
    """Count the values ``text`` would expand to, aliases followed, on the composed node graph (where an alias is
    one shared node, so counting costs what the text costs), and refuse before anything is expanded."""
    if "*" not in text:
        return
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    sizes: dict[int, int] = {}

    def size(node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = 1  # a cycle counts once, not forever
        if isinstance(node, yaml.SequenceNode):
            n = 1 + sum(size(v) for v in node.value)
        elif isinstance(node, yaml.MappingNode):
            n = 1 + sum(size(k) + size(v) for k, v in node.value)
        else:
            n = 1
        sizes[id(node)] = n
        return n

    if root is not None and size(root) > MAX_YAML_VALUES:
        raise ConfigError(f"{where}: its YAML aliases (*name) expand to more than {MAX_YAML_VALUES:,} values (a "
                          "config holds about 80): remove the aliases, or write the values out.")


@dataclass
class Problem:
    level: str  # "error" or "warning"
    setting: str
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.setting}: {self.message}"


def parse_resolution(text: str) -> tuple[int, int]:
    """``"512x768"`` → (512, 768) as (width, height); named sizes allowed."""
    text = str(text).strip().lower()
    if text in NAMED_SIZES:
        return NAMED_SIZES[text]
    m = re.fullmatch(r"(\d+)\s*[x×*,]\s*(\d+)", text) or re.fullmatch(r"(\d+)", text)
    if not m:
        raise ConfigError(
            f"dataset.resolution={text!r} is not a size: write WIDTHxHEIGHT such as 512x512, 512x768, 768x512, "
            f"or one of {', '.join(NAMED_SIZES)}."
        )
    w = int(m.group(1))
    h = int(m.group(2)) if m.lastindex and m.lastindex >= 2 else w
    return w, h


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 in hardware (AVX512-BF16 or AMX), where bf16 training beats fp32."""
    import torch

    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


class _Checks:
    """Collects the problems one validation pass finds."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def err(self, setting: str, msg: str) -> None:
        self.problems.append(Problem("error", setting, msg))

    def warn(self, setting: str, msg: str) -> None:
        self.problems.append(Problem("warning", setting, msg))


MAX_RANK = 1024
MAX_STEPS = 10_000_000
ADAPTIVE_LR_OPTIMIZERS = ("Prodigy", "DAdaptAdam")  # optimizers that find the step size and want every group's LR equal
SYSTEM_DIRS = ("/proc", "/sys", "/dev")


def check_config(cfg: Config, cuda_available: bool | None = None) -> list[Problem]:
    """Every problem of ``cfg`` that can be seen without the model or dataset."""
    import torch

    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    c = _Checks()
    _check_required(c, cfg)
    _check_network(c, cfg.network)
    if cfg.network.type in ("loha", "lokr") and "diffusers" in cfg.save.formats:
        c.err("save.formats", f"type {cfg.network.type} is saved in the kohya/LyCORIS format only (diffusers has no "
                              "LoHa/LoKr format): use save.formats [kohya].")
    elif cfg.network.dora and "diffusers" in cfg.save.formats:
        c.err("save.formats", "DoRA is saved in the kohya/LyCORIS format (dora_scale) only: use save.formats [kohya].")
    _check_optimizer(c, cfg.optimizer)
    _check_training(c, cfg.training, cuda_available)
    _check_dataset(c, cfg.dataset)
    _check_sample_and_save(c, cfg)
    return c.problems


def _check_required(c: _Checks, cfg: Config) -> None:
    """Paths and words that must not be empty (an empty path would silently mean the current folder)."""
    d, sv = cfg.dataset, cfg.save
    if not str(cfg.model.source).strip():
        c.err("model.source", "is empty: set it to 'toy', a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5, "
                            "a diffusers folder or a .safetensors checkpoint.")
    src = str(cfg.model.source).strip()
    if src.lower().endswith((".safetensors", ".ckpt", ".pt")) and not Path(src).expanduser().exists():
        c.err("model.source", f"{src!r} does not exist: download the checkpoint and set model.source to the path of "
                              "the file (a community model such as Illustrious or Pony comes as one file).")
    if not str(d.dir).strip():
        c.err("dataset.dir", "is empty: set it to the folder holding your <repeats>_<concept> subfolders of images.")
    if not str(sv.output_dir).strip():
        c.err("save.output_dir", "is empty: set it to the run's workspace folder, e.g. runs/my-lora.")
    vae = str(cfg.model.vae or "").strip()
    if vae and (vae.startswith(("/", ".", "~")) or vae.lower().endswith((".safetensors", ".ckpt", ".pt"))) \
            and not Path(vae).expanduser().exists():
        c.err("model.vae", f"{vae!r} does not exist: fix the path, or clear model.vae to use the model's own VAE.")
    if d.trigger_word and not d.trigger_word.strip():
        c.err("dataset.trigger_word", "is only spaces: set a word such as sks, or leave it empty (no trigger).")
    if "," in d.trigger_word:
        c.err("dataset.trigger_word", f"{d.trigger_word!r} contains a comma: the trigger must be one tag "
                                    "(a word or phrase without commas), e.g. sks.")


def _check_network(c: _Checks, n: NetworkConfig) -> None:
    """Rank, alpha, targets, clip skip, the file to continue."""
    if n.init_from and not Path(n.init_from).expanduser().is_file():
        c.err("network.init_from", f"{n.init_from!r} is not a file: give the .safetensors LoRA to continue, or leave "
                                   "it empty for a new LoRA.")
    if n.rank <= 0 or n.rank > MAX_RANK:
        c.err("network.rank", f"must be a positive whole number, at most {MAX_RANK} (got {n.rank:g}); 8–32 for "
                              "styles/characters, 64–128 for realistic.")
    if not math.isfinite(n.alpha) or n.alpha <= 0 or n.alpha > MAX_RANK:
        c.err("network.alpha", f"must be positive and at most {MAX_RANK} (got {n.alpha:g}); rank/2 is usual.")
    elif 0 < n.rank <= MAX_RANK and n.alpha > n.rank:
        c.warn("network.alpha", f"alpha {n.alpha:g} > rank {n.rank}: the update is multiplied by {n.alpha / n.rank:.2f}, "
             "like a larger learning rate. Usually alpha ≤ rank (rank/2 is common).")
    if n.unet_targets not in UNET_TARGETS:
        c.err("network.unet_targets", f"{n.unet_targets!r} is unknown: use one of {', '.join(UNET_TARGETS)}.")
    if n.clip_skip < 1:
        c.err("network.clip_skip", "must be 1 (last layer) or more.")
    _check_network_type(c, n)


def _check_network_type(c: _Checks, n: NetworkConfig) -> None:
    """The network type and the settings that go with it (each names the fix)."""
    if n.type not in NETWORK_TYPES:
        c.err("network.type", f"{n.type!r} is unknown: use one of {', '.join(NETWORK_TYPES)}.")
        return
    if n.conv_rank < 0 or n.conv_rank > MAX_RANK:
        c.err("network.conv_rank", f"must be 0 (off) to {MAX_RANK} (got {n.conv_rank}); 4–16 is usual.")
    elif n.type == "lora" and n.conv_rank > 0:
        c.err("network.conv_rank", "trains the 3x3 convolutions, which type lora leaves out: set network.type "
                                   "locon (or loha / lokr), or conv_rank 0.")
    elif n.type == "locon" and n.conv_rank == 0:
        c.err("network.conv_rank", "type locon is LoRA on the 3x3 convolutions too: give them a rank (4–16 is "
                                   "usual), or set network.type lora.")
    if not 0 < n.conv_alpha <= MAX_RANK:
        c.err("network.conv_alpha", f"must be positive and at most {MAX_RANK} (got {n.conv_alpha:g}); 1 is usual.")
    if n.lokr_factor != -1 and (n.lokr_factor < 1 or n.type != "lokr"):
        c.err("network.lokr_factor", "is -1 (automatic) or a positive whole number, and only for type lokr.")
    for name in ("dropout", "rank_dropout", "module_dropout"):
        if not 0 <= getattr(n, name) < 1:
            c.err(f"network.{name}", f"is a share of 0 (off) to below 1 (got {getattr(n, name):g}); 0.1 is usual.")
    if n.dropout and n.type in ("loha", "lokr"):
        c.err("network.dropout", "peft's LoHa and LoKr have no input dropout: use network.rank_dropout or "
                                 "module_dropout with them, or set dropout 0.")
    for name in ("rank_dropout", "module_dropout"):
        if getattr(n, name) and n.type in ("lora", "locon"):
            c.err(f"network.{name}", "peft's LoRA has no rank or module dropout: use network.dropout with type "
                                     f"{n.type}, or network.type loha / lokr.")
    if n.dora and n.type not in ("lora", "locon"):
        c.err("network.dora", f"DoRA here is peft's, for type lora or locon; {n.type} with DoRA (LyCORIS' DoHa/DoKr) "
                              "is not built: set network.type lora / locon, or dora false.")
    if n.block_lr_weights and (len(n.block_lr_weights) != 3 or not all(0 < w <= 10 for w in n.block_lr_weights)):
        c.err("network.block_lr_weights", f"{n.block_lr_weights} must be three multipliers above 0 (at most 10) for "
                                          "the down, middle and up blocks, e.g. [1.0, 0.5, 1.0]; empty = all 1.")


def _check_optimizer(c: _Checks, o: OptimizerConfig) -> None:
    """Optimizer and schedule names, learning rates and the advice that goes with each optimizer."""
    if o.optimizer not in OPTIMIZERS:
        same = [name for name in OPTIMIZERS if name.lower() == str(o.optimizer).lower()]
        hint = f"write it {same[0]!r} (the names are case-sensitive)" if same else f"use one of {', '.join(OPTIMIZERS)}"
        c.err("optimizer.optimizer", f"{o.optimizer!r} is unknown: {hint}.")
    if o.lr_scheduler not in SCHEDULERS:
        c.err("optimizer.lr_scheduler", f"{o.lr_scheduler!r} is unknown: use one of {', '.join(SCHEDULERS)}.")
    for name in ("learning_rate", "unet_lr", "text_encoder_lr", "weight_decay", "max_grad_norm", "lr_power"):
        value = getattr(o, name)
        if value is not None and (not math.isfinite(value) or abs(value) > 1e3):
            c.err(f"optimizer.{name}", f"{value!r} is not a usable value: a finite number (LRs are ~1e-4, 1 for "
                                       "Prodigy).")
    if o.lr_warmup_steps > MAX_STEPS or o.lr_restarts > 1000:
        c.err("optimizer.lr_warmup_steps" if o.lr_warmup_steps > MAX_STEPS else "optimizer.lr_restarts",
              "is far too large: warm-up is a few hundred steps at most, restarts 3–5.")
    if o.optimizer in ADAPTIVE_LR_OPTIMIZERS and o.text_encoder_lr > 0 and o.text_encoder_lr != o.effective_unet_lr:
        c.err("optimizer.text_encoder_lr", f"{o.optimizer} finds one step size for all parameters and refuses groups "
                                           f"with different LRs (UNet {o.effective_unet_lr:g}, text encoder "
                                           f"{o.text_encoder_lr:g}): set optimizer.learning_rate, unet_lr and "
                                           "text_encoder_lr all to 1, or text_encoder_lr=0 (text encoder frozen).")
    if o.learning_rate <= 0:
        c.err("optimizer.learning_rate", f"must be positive (got {o.learning_rate:g}); 1e-4 is the usual start (1 for Prodigy).")
    if o.unet_lr is not None and o.unet_lr <= 0:
        c.err("optimizer.unet_lr", "must be positive, or empty (null) to use learning_rate.")
    if o.text_encoder_lr < 0:
        c.err("optimizer.text_encoder_lr", "must be 0 (text encoder frozen) or positive.")
    unet_lr = o.effective_unet_lr
    if o.text_encoder_lr > unet_lr > 0:
        c.warn("optimizer.text_encoder_lr", f"{o.text_encoder_lr:g} is above the UNet LR {unet_lr:g}; usually it is 1/2 to 1/10 of it.")
    if o.optimizer in ("Lion", "Lion8bit") and unet_lr >= 5e-5:
        c.warn("optimizer.learning_rate", f"Lion wants an LR about 10× smaller than AdamW (try {unet_lr / 10:g}); {unet_lr:g} is AdamW-sized.")
    if o.optimizer in ADAPTIVE_LR_OPTIMIZERS and unet_lr != 1.0:
        c.warn("optimizer.learning_rate", f"{o.optimizer} finds the step size itself: set every LR to 1 (got {unet_lr:g}).")
    if o.optimizer == "AdamWScheduleFree" and o.lr_scheduler not in ("constant", "constant_with_warmup"):
        c.warn("optimizer.lr_scheduler", f"AdamWScheduleFree replaces the schedule (it averages the weights instead): "
                                         f"set lr_scheduler to constant (got {o.lr_scheduler}); its warm-up still applies.")
    if o.lr_warmup_steps < 0:
        c.err("optimizer.lr_warmup_steps", "must be 0 or more.")
    if not (math.isfinite(o.lr_warmup_ratio) and 0 <= o.lr_warmup_ratio < 1):
        c.err("optimizer.lr_warmup_ratio", f"must be from 0 to below 1 (got {o.lr_warmup_ratio:g}); 0.05–0.1 is usual.")
    elif o.lr_warmup_ratio and o.lr_warmup_steps:
        c.err("optimizer.lr_warmup_ratio", f"and lr_warmup_steps={o.lr_warmup_steps} are both set: keep one "
                                           "(set lr_warmup_steps to 0 to use the ratio).")
    if o.lr_restarts < 1:
        c.err("optimizer.lr_restarts", "must be 1 or more (3–5 is usual with cosine_with_restarts).")


def _check_training(c: _Checks, t: TrainingConfig, cuda_available: bool) -> None:
    """Epochs, batch, precision (what really runs here), noise settings."""
    if t.epochs < 1 or t.epochs > MAX_STEPS:
        c.err("training.epochs", f"must be at least 1 and at most {MAX_STEPS} (got {t.epochs:g}); 10–20 is usual.")
    if t.batch_size < 1 or t.batch_size > 4096:
        c.err("training.batch_size", f"must be at least 1 and at most 4096 (got {t.batch_size:g}); 1–8 is usual.")
    if t.max_steps < 0 or t.max_steps > MAX_STEPS:
        c.err("training.max_steps", f"must be 0 (epochs decide) or a step count up to {MAX_STEPS} (got {t.max_steps:g}).")
    if not 0 <= t.seed < 2**32:
        c.err("training.seed", f"must be a whole number from 0 to 4294967295 (got {t.seed:g}).")
    if not math.isfinite(t.noise_offset) or not math.isfinite(t.min_snr_gamma) or t.noise_offset > 1 or t.min_snr_gamma > 1e3:
        c.err("training.noise_offset" if not (math.isfinite(t.noise_offset) and t.noise_offset <= 1)
              else "training.min_snr_gamma", "is out of range: noise_offset 0–0.1, min_snr_gamma 0 or about 5.")
    if t.mixed_precision not in PRECISIONS:
        c.err("training.mixed_precision", f"{t.mixed_precision!r} is unknown: use no, fp16 or bf16.")
    elif t.mixed_precision == "fp16" and not cuda_available:
        c.warn("training.mixed_precision", "fp16 needs a CUDA GPU and there is none here: training runs in fp32 instead "
             "(same result, slower and more memory on a GPU). Set training.mixed_precision=no to silence this.")
    elif t.mixed_precision == "bf16" and not cuda_available and not cpu_has_native_bf16():
        c.warn("training.mixed_precision", "bf16 on this CPU is emulated (no AVX512-BF16 or AMX): training will be "
             "slower than fp32. Set training.mixed_precision=no.")
    if not 1 <= t.gradient_accumulation_steps <= 1024:
        c.err("training.gradient_accumulation_steps", f"must be 1 (off) to 1024 (got {t.gradient_accumulation_steps:g}); "
                                                      "2–8 is usual, for an effective batch of 4–16 on a small GPU.")
    _check_full_precision_lora(c, t, cuda_available)
    if t.min_snr_gamma < 0:
        c.err("training.min_snr_gamma", "must be 0 (off) or positive (5 is usual).")
    if t.noise_offset < 0:
        c.err("training.noise_offset", "must be 0 (off) or positive (0.05–0.1).")
    _check_noise_and_loss(c, t)


LORA_PRECISIONS = ("fp32", "fp16", "bf16")


def _check_full_precision_lora(c: _Checks, t: TrainingConfig, cuda_available: bool) -> None:
    """The LoRA's own weights in half precision only with the same half-precision compute."""
    f = t.full_precision_lora
    if f not in LORA_PRECISIONS:
        c.err("training.full_precision_lora", f"{f!r} is unknown: use fp32, fp16 or bf16.")
    elif f != "fp32" and t.mixed_precision != f:
        c.err("training.full_precision_lora", f"{f} weights need training.mixed_precision={f} (the model then "
                                              f"computes in {f} too); set it, or use fp32.")
    elif f == "fp16" and cuda_available:
        c.warn("training.full_precision_lora", "fp16 LoRA weights: an update below about 1/2000 of a weight is "
               "lost, values above 65504 overflow (the loss scaler then skips the step) and the optimizer's small "
               "values underflow; prefer bf16 where the GPU has it (T4 does not, A100/L4/H100 do).")
    elif f == "fp16":
        c.warn("training.full_precision_lora", "fp16 needs a CUDA GPU: the LoRA stays fp32 here, like the compute.")
    elif f == "bf16":
        c.warn("training.full_precision_lora", "bf16 LoRA weights: an update below about 1/500 of a weight is lost "
               "(an AdamW step of 1e-4 leaves a weight of 0.1 unchanged); keep it for the smallest cards.")


LOSS_TYPES = ("l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")


def _check_noise_and_loss(c: _Checks, t: TrainingConfig) -> None:
    """Multires noise, input perturbation, the loss function."""
    if not 0 <= t.multires_noise_iterations <= 16:
        c.err("training.multires_noise_iterations", f"must be 0 (off) to 16 (got {t.multires_noise_iterations}); "
                                                    "6–10 is usual.")
    if not (math.isfinite(t.multires_noise_discount) and 0 < t.multires_noise_discount < 1):
        c.err("training.multires_noise_discount", f"must be between 0 and 1 (got {t.multires_noise_discount:g}); "
                                                  "0.3–0.8 is usual.")
    if not (math.isfinite(t.ip_noise_gamma) and 0 <= t.ip_noise_gamma <= 1):
        c.err("training.ip_noise_gamma", f"must be 0 (off) to 1 (got {t.ip_noise_gamma:g}); about 0.1 is usual.")
    if not 0 <= t.min_timestep < t.max_timestep <= 1000:
        bad = "training.min_timestep" if not 0 <= t.min_timestep < 1000 else "training.max_timestep"
        c.err(bad, f"the timesteps trained on must satisfy 0 ≤ min_timestep < max_timestep ≤ 1000 (got "
                   f"{t.min_timestep} and {t.max_timestep}); 0 and 1000 train on all of them.")
    if t.loss_type not in LOSS_TYPES:
        c.err("training.loss_type", f"{t.loss_type!r} is unknown: use {', '.join(LOSS_TYPES)}.")
    if not (math.isfinite(t.huber_c) and 0 < t.huber_c <= 1):
        c.err("training.huber_c", f"must be above 0 and at most 1 (got {t.huber_c:g}); 0.1 is usual.")
    if t.huber_schedule not in HUBER_SCHEDULES:
        c.err("training.huber_schedule", f"{t.huber_schedule!r} is unknown: use {', '.join(HUBER_SCHEDULES)}.")


def _check_dataset(c: _Checks, d: DatasetConfig) -> None:
    """Caption handling, repeats, caches, buckets, resolution."""
    if not 0 <= d.caption_dropout < 1:
        c.err("dataset.caption_dropout", "must be between 0 and 1 (e.g. 0.05).")
    if not 0 <= d.tag_dropout < 1:
        c.err("dataset.tag_dropout", f"must be between 0 and 1 (got {d.tag_dropout:g}); 0.05–0.1 is usual.")
    for name in ("caption_prefix", "caption_suffix"):
        if len(getattr(d, name)) > 500 or "\n" in getattr(d, name):
            c.err(f"dataset.{name}", "must be one line of at most 500 characters (e.g. 'masterpiece, best quality,').")
    if d.keep_tokens < 0:
        c.err("dataset.keep_tokens", "must be 0 or more.")
    if d.validation_split < 0:
        c.err("dataset.validation_split", f"must be 0 (no validation images) or a number of images to hold out "
                                          f"(got {d.validation_split}).")
    if d.repeats is not None and d.repeats > 10_000:
        c.err("dataset.repeats", f"{d.repeats} is far too many: 5–20 is usual.")
    if d.repeats is not None and d.repeats < 1:
        c.err("dataset.repeats", f"must be at least 1 (got {d.repeats}); leave empty to read it from folder names.")
    if not d.caption_extension.startswith("."):
        c.err("dataset.caption_extension", f"must start with a dot, e.g. '.txt' (got {d.caption_extension!r}).")
    if d.max_token_length not in (75, 150, 225):
        c.err("dataset.max_token_length", f"must be 75, 150 or 225 (got {d.max_token_length}): captions are encoded in "
                                          "chunks of 75 tokens, as AUTOMATIC1111 and sd-scripts do.")
    if d.cache_text_embeddings not in ("auto", "yes", "no"):
        c.err("dataset.cache_text_embeddings", "must be auto, yes or no.")
    if d.cache_latents_to_disk and not d.cache_latents:
        c.warn("dataset.cache_latents_to_disk", "has no effect while dataset.cache_latents=false (the VAE then runs "
             "every step). Turn cache_latents on to use the disk cache.")
    if d.bucket_step < 8 or d.bucket_step % 8 or d.bucket_step > MAX_RESOLUTION_SIDE:
        c.err("dataset.bucket_step", f"must be a multiple of 8 up to {MAX_RESOLUTION_SIDE} (64 for real models, 8 for "
                                     "the toy model).")
    try:
        w, h = parse_resolution(d.resolution)
        if w % 8 or h % 8 or w < 8 or h < 8:
            c.err("dataset.resolution", f"{w}x{h}: both sides must be multiples of 8 (e.g. 512x512, 512x768, 768x512).")
        elif max(w, h) > MAX_RESOLUTION_SIDE:
            c.err("dataset.resolution", f"{w}x{h}: at most {MAX_RESOLUTION_SIDE} px a side (SD1.5 trains at 512, SDXL "
                                        "at 1024; one 8192 px image would not fit any GPU's memory).")
    except ConfigError as exc:
        c.err("dataset.resolution", str(exc).split(": ", 1)[-1])


def _check_sample_and_save(c: _Checks, cfg: Config) -> None:
    """Previews, saving, the model's family and prediction type."""
    s, sv = cfg.sample, cfg.save
    if s.steps < 1:
        c.err("sample.steps", f"must be at least 1 (got {s.steps}); 20–30 is usual.")
    if s.sampler not in SAMPLERS:
        c.err("sample.sampler", f"{s.sampler!r} is unknown: use one of {', '.join(SAMPLERS)}.")
    if s.every_n_epochs < 0 or sv.every_n_epochs < 0:
        c.err("save.every_n_epochs" if sv.every_n_epochs < 0 else "sample.every_n_epochs", "must be 0 (off) or more.")
    if sv.every_n_steps < 0 or sv.state_every_n_steps < 0:
        c.err("save.every_n_steps" if sv.every_n_steps < 0 else "save.state_every_n_steps",
              "must be 0 (off) or a number of optimizer steps (e.g. 100).")
    if sv.state_every_n_steps and not sv.save_state:
        c.err("save.state_every_n_steps", "saves the resumable state, which save.save_state=false turns off: set "
                                          "save.save_state=true, or state_every_n_steps=0.")
    if cfg.logging.wandb_project and importlib.util.find_spec("wandb") is None:
        c.err("logging.wandb_project", "needs the wandb package: pip install wandb, then wandb login (or set "
                                       "WANDB_MODE=offline to log to files); or leave the setting empty.")
    if sv.precision not in SAVE_PRECISIONS:
        c.err("save.precision", f"{sv.precision!r} is unknown: use fp16, bf16 or fp32.")
    bad = [f for f in sv.formats if f not in SAVE_FORMATS]
    if bad or not sv.formats:
        c.err("save.formats", f"{bad or sv.formats} not allowed: use kohya (AUTOMATIC1111/ComfyUI) and/or diffusers.")
    if not re.fullmatch(r"[\w.\- ]+", sv.output_name or "") or not sv.output_name.strip(". "):
        c.err("save.output_name", f"{sv.output_name!r} must be a plain file name (letters, digits, - _ .).")
    out = Path(str(sv.output_dir)).expanduser()
    if str(sv.output_dir).strip() and out.exists() and not out.is_dir():
        c.err("save.output_dir", f"{str(out)!r} is a file: the workspace must be a folder (give a new folder's path).")
    elif str(sv.output_dir).strip() and any(str(out.resolve()).startswith(sys_dir) for sys_dir in SYSTEM_DIRS):
        c.err("save.output_dir", f"{str(out)!r} is a system folder: put the workspace in your own folder, e.g. runs/my-lora.")
    if not 0 <= s.seed < 2**32 or s.steps > 1000 or s.cfg_scale > 100 or s.width < 0 or s.height < 0:
        c.err("sample.seed" if not 0 <= s.seed < 2**32 else "sample.steps", "is out of range: seed 0–4294967295, "
              "steps 1–1000 (20–30 usual), cfg_scale up to 100 (5–8 usual), width/height 0 or a size.")
    if cfg.model.family not in ("auto", "sd15", "sdxl"):
        c.err("model.family", f"{cfg.model.family!r} is unknown: use auto, sd15 or sdxl.")
    if cfg.model.prediction_type not in ("auto", "epsilon", "v_prediction"):
        c.err("model.prediction_type", f"{cfg.model.prediction_type!r} is unknown: use auto, epsilon or v_prediction.")
    if cfg.training.zero_terminal_snr and cfg.model.prediction_type == "epsilon":
        c.err("training.zero_terminal_snr", "needs v-prediction: an epsilon model cannot predict the noise it is given "
                                            "at the last, pure-noise step. Set model.prediction_type=v_prediction "
                                            "(for a model trained so, e.g. NoobAI-XL V-Pred) or turn this off.")


def check_against_model(cfg: Config, size_multiple: int, family: str) -> list[Problem]:
    """Problems that need the loaded model: can it take this resolution?"""
    p = []
    w, h = parse_resolution(cfg.dataset.resolution)
    if w % size_multiple or h % size_multiple:
        fix_w, fix_h = (max(size_multiple, round(v / size_multiple) * size_multiple) for v in (w, h))
        p.append(Problem("error", "dataset.resolution",
                         f"{w}x{h} does not fit this {family} model: sides must be multiples of {size_multiple} "
                         f"(the VAE and UNet downsampling). Try {fix_w}x{fix_h}."))
    if cfg.dataset.enable_buckets and cfg.dataset.bucket_step % size_multiple:
        p.append(Problem("error", "dataset.bucket_step", f"must be a multiple of {size_multiple} for this model."))
    return p


def check_against_dataset(cfg: Config, n_images: int, where: str) -> list[Problem]:
    """Problems that need the dataset's size."""
    p = []
    if n_images == 0 and cfg.dataset.validation_split > 0:
        p.append(Problem("error", "dataset.validation_split", f"holds out {cfg.dataset.validation_split} image(s), "
                                                              f"which leaves none to train on in {where}: use a "
                                                              "smaller number (1–2 of 20 is plenty) or 0."))
    elif n_images == 0:
        p.append(Problem("error", "dataset.dir", f"no training images found in {where}. Put images (png/jpg/webp) there, "
                                                 "in <repeats>_<concept> subfolders or directly."))
    elif cfg.training.batch_size > n_images:
        p.append(Problem("error", "training.batch_size", f"{cfg.training.batch_size} is larger than the dataset "
                                                         f"({n_images} images): use at most {n_images}."))
    return p


def check_against_plan(cfg: Config, plan: "StepsPlan") -> list[Problem]:
    """Problems that need the run's step count: a warm-up longer than the whole run (a warning: short trial
    runs, such as notebook 04's step timing, legitimately stop before the warm-up ends)."""
    if cfg.optimizer.lr_warmup_steps > plan.total_steps:
        return [Problem("warning", "optimizer.lr_warmup_steps", f"{cfg.optimizer.lr_warmup_steps} warm-up steps but "
                                                                f"the run has only {plan.total_steps}: the LR never "
                                                                "reaches its value. Use about 5–10% of the steps, or 0.")]
    return []


def raise_for_errors(problems: list[Problem]) -> list[Problem]:
    """Raise one ConfigError listing every error; return the warnings."""
    errors = [p for p in problems if p.level == "error"]
    if errors:
        if len(errors) == 1:  # one problem, one line (the command line prints it as is)
            raise ConfigError(f"Please fix this setting: {errors[0].setting}: {errors[0].message}")
        raise ConfigError("Please fix these settings:\n" + "\n".join(f"  - {e.setting}: {e.message}" for e in errors))
    return [p for p in problems if p.level == "warning"]


# ---------------------------------------------------------------------------- steps math

@dataclass
class StepsPlan:
    images: int  # training images (without repeats)
    samples_per_epoch: int  # images × repeats (doubled with regularization, as kohya does)
    steps_per_epoch: int  # optimizer steps
    epochs: int
    total_steps: int  # optimizer steps: the LR schedule, logging and saving count these
    saves: int  # LoRA files written: one every N epochs, the last epoch's being the final file
    batch_size: int = 1
    accumulation: int = 1  # batches summed into each optimizer step
    batches_per_epoch: int = 0

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.accumulation

    def describe(self) -> str:
        steps = f"{self.steps_per_epoch} steps per epoch"
        if self.accumulation > 1:
            steps += (f" (each step sums {self.accumulation} batches of {self.batch_size}: an effective batch of "
                      f"{self.effective_batch})")
        return (f"{self.images} images → {self.samples_per_epoch} samples per epoch → {steps}; "
                f"{self.epochs} epochs → {self.total_steps} steps; {self.saves} LoRA file(s) saved")


def plan_steps(folders: list[tuple[int, int]], batch_size: int, epochs: int, save_every: int = 0,
               with_regularization: bool = False, max_steps: int = 0,
               batches_of_epochs: list[int] | None = None, accumulation: int = 1) -> StepsPlan:
    """The steps math in one place.

    ``folders`` is ``[(image_count, repeats), …]``. Batches per epoch =
    ceil(Σ images × repeats / batch); with regularization images kohya pairs
    every training sample with one class image, doubling the samples. An optimizer step sums
    ``accumulation`` batches, so steps per epoch = ceil(batches / accumulation) (an epoch's last step may
    sum fewer). Files saved: one at every ``save_every``-th epoch before the last, plus the final
    file (``<name>.safetensors``) at the end: 10 epochs, every 2 → 5 files.

    With aspect-ratio buckets a batch holds one bucket only, so an epoch has a partial batch per bucket:
    ``batches_of_epochs`` gives each epoch's real batch count (the trainer lays the batches out in advance).
    """
    images = sum(c for c, _ in folders)
    samples = sum(c * r for c, r in folders) * (2 if with_regularization else 1)
    if batches_of_epochs is None:
        batches_of_epochs = [math.ceil(samples / batch_size) if samples else 0] * epochs
    steps_of_epochs = [math.ceil(b / accumulation) for b in batches_of_epochs]
    steps_per_epoch = steps_of_epochs[0] if steps_of_epochs else 0
    ends = [sum(steps_of_epochs[:e + 1]) for e in range(len(steps_of_epochs))]
    total = ends[-1] if ends else 0
    if max_steps and max_steps < total:
        total = max_steps
        epochs = next(e + 1 for e, end in enumerate(ends) if end >= total)
    return StepsPlan(images, samples, steps_per_epoch, epochs, total, _saves(epochs, save_every), batch_size,
                     accumulation, batches_of_epochs[0] if batches_of_epochs else 0)


def _saves(epochs: int, save_every: int) -> int:
    return (len([e for e in range(1, epochs) if e % save_every == 0]) if save_every else 0) + 1
