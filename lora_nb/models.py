"""Base models: load SD1.x / SDXL from a hub id, a diffusers folder, a single
checkpoint file or the bundled toy model; build tiny random models for tests.

A loaded model is a :class:`BaseModel`: the diffusers pipeline plus its family
(``"sd15"`` or ``"sdxl"``) and where it came from.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_nb import LoraNbError, checkpoints
from lora_nb.workspace import repo_data_dir
from lora_nb.tokenizer import write_clip_tokenizer

FAMILIES = ("sd15", "sdxl")

# Words the tiny test tokenizers know as single tokens (everything else still
# tokenizes, byte by byte).
TINY_WORDS = (
    "a an the of on in with and photo picture painting drawing portrait of person man woman girl boy "
    "dog cat bird car house tree flower sky sea mountain city street room face hair eyes smile "
    "red green blue yellow purple white black gray orange pink brown circle square triangle star "
    "background style anime realistic best quality masterpiece lowres blurry sks zorb toy"
)


@dataclass
class BaseModel:
    """A loaded base model: the pipeline, its family and a human-readable source."""

    pipe: object
    family: str
    source: str

    @property
    def text_encoders(self) -> list:
        encs = [self.pipe.text_encoder]
        if self.family == "sdxl":
            encs.append(self.pipe.text_encoder_2)
        return encs

    @property
    def tokenizers(self) -> list:
        toks = [self.pipe.tokenizer]
        if self.family == "sdxl":
            toks.append(self.pipe.tokenizer_2)
        return toks

    @property
    def vae_scale(self) -> int:
        """How many pixels one latent cell covers (8 for real SD, less for tiny models)."""
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: VAE scale × UNet downsampling."""
        unet_down = 2 ** (len(self.pipe.unet.config.block_out_channels) - 1)
        return self.vae_scale * unet_down


def toy_model_dir() -> Path:
    return repo_data_dir() / "toy-model"


# --------------------------------------------------------------------------- tiny builders

def _tiny_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 64), latent_channels=4,
        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32, sample_size=64,
    )


def _tiny_text_encoder(tokenizer, with_projection: bool = False, width: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=37, num_hidden_layers=5,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, projection_dim=width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_act="gelu",
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def build_tiny_sd15(folder: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Build a tiny random SD1.5-architecture pipeline and save it (diffusers format) to ``folder``.

    64×64 images → 32×32 latents; about 2 M parameters; for tests and benchmarks.
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    folder = Path(folder)
    torch.manual_seed(seed)
    tok = write_clip_tokenizer(TINY_WORDS.split(), folder / "tokenizer")
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=32,
    )
    sched = _tiny_scheduler()
    if prediction_type != "epsilon":
        sched = sched.__class__.from_config(sched.config, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(), text_encoder=_tiny_text_encoder(tok), tokenizer=tok, unet=unet,
        scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def build_tiny_sdxl(folder: str | Path, seed: int = 0, text_encoder_2_width: int = 32) -> Path:
    """Build a tiny random SDXL-architecture pipeline (two text encoders, time ids) and save it.

    ``text_encoder_2_width`` other than 32 gives the two text encoders different widths, as in SDXL
    (a single-file checkpoint tells them apart by width)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    folder = Path(folder)
    torch.manual_seed(seed)
    tok = write_clip_tokenizer(TINY_WORDS.split(), folder / "tokenizer")
    tok2 = write_clip_tokenizer(TINY_WORDS.split(), folder / "tokenizer_2")
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, transformer_layers_per_block=(1, 2), cross_attention_dim=32 + text_encoder_2_width,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=text_encoder_2_width + 6 * 8, norm_num_groups=32,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(), text_encoder=_tiny_text_encoder(tok),
        text_encoder_2=_tiny_text_encoder(tok2, True, text_encoder_2_width),
        tokenizer=tok, tokenizer_2=tok2, unet=unet, scheduler=_tiny_scheduler(),
    )
    pipe.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- loading

def detect_family_of_folder(folder: Path) -> str:
    """``sdxl`` when the diffusers folder has a second text encoder, else ``sd15``."""
    index = folder / "model_index.json"
    if not index.exists():
        raise LoraNbError(
            f"{folder} is not a diffusers model folder (no model_index.json). "
            "Set model_source to a diffusers folder, a .safetensors checkpoint file, a hub id, or 'toy'."
        )
    import json

    cls = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
    return "sdxl" if ("XL" in cls or (folder / "text_encoder_2").exists()) else "sd15"


def detect_family_of_checkpoint(path: Path) -> str:
    """Read only the tensor names of a single-file checkpoint and tell SD1.x from SDXL."""
    return _family_from_keys(checkpoints.read_shapes(path), path)


def _family_from_keys(keys, path: Path) -> str:
    keys = list(keys)
    if any(k.startswith("conditioner.embedders.1") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.") for k in keys) or any(k.startswith("model.diffusion_model.") for k in keys):
        return "sd15"
    raise LoraNbError(f"{path} does not look like an SD1.x or SDXL checkpoint (no UNet or text-encoder weights found).")


def _pipeline_class(family: str):
    """The family's pipeline class, imported alone (diffusers imports its pipelines lazily: an SD1.5 run does not
    pay for the SDXL pipeline's modules)."""
    if family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline


def looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not Path(source).exists() and not source.startswith((".", "~"))


def load_base_model(source: str | Path, family: str = "auto", dtype: torch.dtype = torch.float32,
                    allow_pickle: bool = False, single_file_config: str | Path | None = None,
                    frozen_dtype: torch.dtype | None = None) -> BaseModel:
    """Load a base model from ``source``.

    ``source`` is ``"toy"`` (the bundled toy model), a local diffusers folder, a
    single ``.safetensors`` checkpoint file (community models), or a hub id such
    as ``stable-diffusion-v1-5/stable-diffusion-v1-5``. ``family`` is ``auto``,
    ``sd15`` or ``sdxl``. Pickle checkpoints (``.ckpt``/``.pt``) need
    ``allow_pickle=True`` because unpickling can run arbitrary code.

    A single file is read with the shipped SD1.5/SDXL configuration (no download), or with
    ``single_file_config`` (a diffusers folder or hub id) when given; its scheduler predicts
    ``v_prediction`` when the file carries the ``v_pred`` marker.

    ``frozen_dtype`` reads the UNet and text encoders of a diffusers folder or hub model straight in that dtype
    (the VAE and the rest in ``dtype``): a trainer that freezes them in bf16 then never holds them in fp32, which
    on a full-size model is the peak of the run's memory. A single file loads in ``dtype`` (diffusers' single-file
    loader takes one dtype for all parts); the trainer casts it afterwards.
    """
    if family not in ("auto",) + FAMILIES:
        raise LoraNbError(f"model_family={family!r} is not known: use 'auto', 'sd15' or 'sdxl'.")
    src = str(source)
    if src == "toy":
        path = toy_model_dir()
        if not (path / "model_index.json").exists():
            raise LoraNbError(
                f"The bundled toy model is missing at {path}. It ships with the repository; "
                "re-clone, or rebuild it with `python scripts/build_toy_model.py`."
            )
        src = str(path)
    path = Path(src).expanduser()
    if path.is_dir():
        found = detect_family_of_folder(path)
        if family != "auto" and family != found:
            raise LoraNbError(f"model.family={family!r} but {path} holds an {found} model: set model.family=auto "
                              f"(or {found}).")
        fam = found
        each = part_dtypes(dtype, frozen_dtype)
        try:
            pipe = _pipeline_class(fam).from_pretrained(path, dtype=each, safety_checker=None) if fam == "sd15" \
                else _pipeline_class(fam).from_pretrained(path, dtype=each)
        except (OSError, ValueError) as exc:
            raise LoraNbError(f"Could not load the diffusers model in {path}: {exc}") from None
        return BaseModel(pipe, fam, str(path))
    if path.is_file():
        return _load_single_file(path, family, dtype, allow_pickle, single_file_config)
    if looks_like_hub_id(src):
        return _load_from_hub(src, family, part_dtypes(dtype, frozen_dtype))
    raise LoraNbError(
        f"model_source={src!r} is neither a folder, a file, 'toy' nor a hub id like 'org/name'. "
        "Check the path (it does not exist)."
    )


def part_dtypes(dtype: torch.dtype, frozen_dtype: torch.dtype | None):
    """What diffusers' ``from_pretrained(dtype=…)`` takes: one dtype, or the UNet and text encoders in
    ``frozen_dtype`` and every other part (the VAE) in ``dtype``."""
    if frozen_dtype is None or frozen_dtype == dtype:
        return dtype
    return {"default": dtype, "unet": frozen_dtype, "text_encoder": frozen_dtype, "text_encoder_2": frozen_dtype}


def load_model_of(model_cfg, dtype: torch.dtype = torch.float32, zero_terminal_snr: bool = False,
                  frozen_dtype: torch.dtype | None = None) -> BaseModel:
    """The base model a :class:`lora_nb.config.ModelConfig` names, with its ``vae`` in place when one is set and
    its scheduler set to ``model.prediction_type`` and, with ``zero_terminal_snr``, the rescaled schedule
    (``frozen_dtype``: see :func:`load_base_model`)."""
    model = load_base_model(model_cfg.source, model_cfg.family, dtype, allow_pickle=model_cfg.allow_pickle,
                            frozen_dtype=frozen_dtype)
    if str(model_cfg.vae or "").strip():
        use_vae(model, load_vae(model_cfg.vae, model.pipe.vae.config, dtype))
    use_noise_schedule(model, model_cfg.prediction_type, zero_terminal_snr)
    return model


def load_model_for(cfg, dtype: torch.dtype = torch.float32, frozen_dtype: torch.dtype | None = None) -> BaseModel:
    """The base model of a whole run's :class:`lora_nb.config.Config` as training, previews, the strength
    comparisons and diagnosis all use it (one place, so none of them forgets a setting)."""
    return load_model_of(cfg.model, dtype, zero_terminal_snr=cfg.training.zero_terminal_snr,
                         frozen_dtype=frozen_dtype)


def use_noise_schedule(model: BaseModel, prediction_type: str = "auto", zero_terminal_snr: bool = False) -> None:
    """Give the model's scheduler the prediction type and noise schedule the settings name, so training,
    previews and diagnosis all use them: ``prediction_type`` other than "auto" replaces the one the model's
    scheduler config says (a single file may not say), and ``zero_terminal_snr`` rescales the betas so the
    last timestep is pure noise (Lin et al. 2024) with "trailing" timesteps, as v-prediction models such as
    NoobAI-XL V-Pred were trained."""
    changes = {}
    if prediction_type not in ("", "auto"):
        changes["prediction_type"] = prediction_type
    if zero_terminal_snr:
        changes.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    if changes:
        import inspect

        from diffusers import DDIMScheduler

        cls = model.pipe.scheduler.__class__
        if zero_terminal_snr and "rescale_betas_zero_snr" not in inspect.signature(cls.__init__).parameters:
            cls = DDIMScheduler  # PNDM (SD1.5's default) cannot rescale and would drop the setting from its config
        model.pipe.register_modules(scheduler=cls.from_config(model.pipe.scheduler.config, **changes))
    if zero_terminal_snr and model.pipe.scheduler.config.get("prediction_type") != "v_prediction":
        raise LoraNbError(f"training.zero_terminal_snr needs v-prediction, and {model.source} predicts "
                          f"{model.pipe.scheduler.config.get('prediction_type')}: set model.prediction_type=v_prediction "
                          "(only for a model trained so, e.g. NoobAI-XL V-Pred) or turn zero_terminal_snr off.")


def use_vae(model: BaseModel, vae) -> None:
    """Put ``vae`` into the model's pipeline (training encodes and previews decode with it)."""
    model.pipe.register_modules(vae=vae)


def load_vae(source: str | Path, base_config=None, dtype: torch.dtype = torch.float32):
    """A VAE (``AutoencoderKL``) from a hub id (e.g. ``madebyollin/sdxl-vae-fp16-fix``), a diffusers folder
    (the VAE's own, or a pipeline folder with ``vae/``) or a single ``.safetensors`` file.

    A single file is read with the base model's VAE configuration (``base_config``), so no download is
    needed. Errors name the ``model.vae`` setting and what to pass instead.
    """
    from diffusers import AutoencoderKL

    src = str(source).strip()
    path = Path(src).expanduser()
    try:
        if path.is_dir():
            sub = "vae" if (path / "vae" / "config.json").exists() and not (path / "config.json").exists() else None
            if sub is None and not (path / "config.json").exists():
                raise LoraNbError(f"model.vae={src!r} is a folder without a VAE (no config.json, no vae/): point it at "
                                  "a VAE folder, a pipeline folder or a .safetensors VAE file.")
            return AutoencoderKL.from_pretrained(path, subfolder=sub, dtype=dtype)
        if path.is_file():
            if path.suffix.lower() != ".safetensors":
                raise LoraNbError(f"model.vae={src!r}: a single-file VAE must be .safetensors (pickles can run code).")
            if base_config is not None:
                import tempfile

                with tempfile.TemporaryDirectory(prefix="lora-nb-vae-") as tmp:
                    AutoencoderKL.from_config(base_config).save_config(tmp)
                    return AutoencoderKL.from_single_file(str(path), config=tmp, dtype=dtype)
            return AutoencoderKL.from_single_file(str(path), dtype=dtype)
        if looks_like_hub_id(src):
            return AutoencoderKL.from_pretrained(src, dtype=dtype)
    except LoraNbError:
        raise
    except Exception as exc:  # noqa: BLE001 - diffusers and the hub raise many types
        offline = " Hub access is switched off (HF_HUB_OFFLINE=1)." if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise LoraNbError(f"model.vae={src!r} could not be loaded ({type(exc).__name__}: {str(exc)[:200]}).{offline} "
                          "Pass a VAE folder or .safetensors file, or clear model.vae to use the model's own.") from None
    raise LoraNbError(f"model.vae={src!r} does not exist (neither a folder, a file nor a hub id like 'org/name'): "
                      "fix the path, or clear model.vae to use the model's own VAE.")


def _load_single_file(path: Path, family: str, dtype, allow_pickle: bool, config) -> BaseModel:
    suffix = path.suffix.lower()
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        if not allow_pickle:
            raise LoraNbError(
                f"{path} is a pickle checkpoint, and unpickling a file can run code hidden in it. "
                "Prefer a .safetensors version of the model; if you trust this file, set model.allow_pickle=true "
                "(allow_pickle=True in Python; it is then loaded with torch.load(weights_only=True))."
            )
        import tempfile

        from safetensors.torch import save_file

        tensors = load_pickle_checkpoint(path)
        shapes = checkpoints.shapes_of(tensors)
        fam = family if family != "auto" else _family_from_keys(shapes, path)
        # diffusers gets the tensors as a .safetensors file: nothing of the pickle reaches its loader
        with tempfile.TemporaryDirectory(prefix="lora-nb-ckpt-") as tmp:
            converted = Path(tmp) / (path.stem + ".safetensors")
            save_file(tensors, str(converted))
            del tensors
            return _from_single_file(converted, fam, dtype, path, shapes, config)
    elif suffix != ".safetensors":
        raise LoraNbError(f"{path} is not a model checkpoint (expected .safetensors, or a diffusers folder).")
    shapes = checkpoints.read_shapes(path)
    fam = family if family != "auto" else _family_from_keys(shapes, path)
    return _from_single_file(path, fam, dtype, path, shapes, config)


def _pickle_global(exc: Exception) -> str:
    """The object torch's safe unpickler refused (``posix.system``, ``__main__.Net``), as ``" (posix.system)"``.

    Only that part of torch's message is quoted: the rest advises re-running with ``weights_only=False``,
    which would read as if lora-nb were about to."""
    import re

    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return f" ({found.group(1)})" if found else ""


def load_pickle_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.ckpt``/``.pt`` checkpoint, unpickled with ``torch.load(weights_only=True)``:
    only tensors and plain containers are rebuilt, so code hidden in the file never runs."""
    import pickle

    path = Path(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise LoraNbError(
            f"{path} was refused and nothing in it was run: it holds Python objects besides tensors{_pickle_global(exc)}, "
            "which only a full unpickle could rebuild, and that can run code hidden in the file. lora-nb never "
            "does that: use a .safetensors version of this model."
        ) from None
    except Exception as exc:  # noqa: BLE001 - truncated files, not a pickle at all, ...
        raise LoraNbError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {str(exc)[:200]}).") from None
    while isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    tensors, seen = {}, set()
    for k, v in (sd.items() if isinstance(sd, dict) else ()):
        if isinstance(k, str) and isinstance(v, torch.Tensor):
            v = v.contiguous()
            ptr = (v.untyped_storage().data_ptr(), v.storage_offset())
            tensors[k] = v.clone() if ptr in seen else v  # safetensors refuses tensors that share memory
            seen.add(ptr)
    if not tensors:
        raise LoraNbError(f"{path} holds no tensors: it is not a model checkpoint.")
    return tensors


class _CastWarningFilter:
    """Drops diffusers' "modules ... that should be kept in float32: []" line, printed whenever a model is cast
    with ``to(dtype)`` (single-file loading does, and so does the trainer's cast of the frozen weights to
    fp16/bf16): the list it names is empty, and its advice (``torch_dtype`` in ``from_pretrained``) is about
    code the learner did not write."""

    @staticmethod
    def filter(record) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


@contextlib.contextmanager
def quiet_cast_warning():
    """A context in which diffusers' empty "should be kept in float32: []" warning is not printed."""
    log = logging.getLogger("diffusers.models.modeling_utils")
    log.addFilter(_CastWarningFilter)
    try:
        yield
    finally:
        log.removeFilter(_CastWarningFilter)


def _from_single_file(path: Path, fam: str, dtype, shown: Path, shapes: dict, config) -> BaseModel:
    """Load the checkpoint at ``path`` (named ``shown`` to the learner) with the configuration folder
    ``config``, else the shipped one of ``fam`` when the layout is the standard one; tokenizers from
    :func:`lora_nb.checkpoints.load_tokenizers`."""
    unusual = checkpoints.unusual_layout(shapes, fam) if config is None else ""
    if config is None and not unusual:
        config = checkpoints.shipped_config_dir(fam)
    kwargs = {}
    if config is not None and Path(config).is_dir():
        kwargs = dict(config=str(config), local_files_only=True,
                      **checkpoints.load_tokenizers(fam, shown, config, checkpoints.REFERENCE_MODELS[fam]))
    elif config is not None:
        kwargs = dict(config=str(config))
    try:
        with quiet_cast_warning():
            pipe = _pipeline_class(fam).from_single_file(str(path), dtype=dtype, **kwargs)
    except Exception as exc:  # noqa: BLE001 - diffusers raises many types here
        raise LoraNbError(_single_file_failure(shown, fam, exc, unusual, config)) from None
    if checkpoints.is_v_prediction(shapes):  # model.prediction_type, when set, still has the last word
        pipe.register_modules(scheduler=pipe.scheduler.__class__.from_config(pipe.scheduler.config,
                                                                             prediction_type="v_prediction"))
    return BaseModel(pipe, fam, str(shown))


def _single_file_failure(shown: Path, fam: str, exc: Exception, unusual: str, config) -> str:
    what = f"Could not load the {fam} checkpoint {shown}: {type(exc).__name__}: {str(exc)[:300]}. "
    if unusual:
        return what + (f"lora-nb ships the SD1.5 and SDXL base configurations, but {unusual}, so diffusers looked "
                       "up its configuration on the Hugging Face hub. Offline, convert the checkpoint to a diffusers "
                       "folder on a machine with internet access and set model.source to that folder.")
    shipped = Path(str(config)).parent == checkpoints.CONFIG_ROOT
    used = f"the shipped {fam} configuration" if shipped else f"the configuration in {config}"
    return what + (f"It was read with {used}; check that the file is complete and really an {fam} checkpoint "
                   "(set model.family to the other family if not).")


def _load_from_hub(repo_id: str, family: str, dtype) -> BaseModel:
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(repo_id, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise LoraNbError(
            f"Could not load {repo_id!r} from the Hugging Face hub ({type(exc).__name__}). "
            + ("Hub access is switched off (HF_HUB_OFFLINE=1). " if offline else "This machine may be offline. ")
            + "Use model_source='toy' for the offline course, or download the model to a folder and pass its path."
        ) from None
    fam = "sdxl" if hasattr(pipe, "text_encoder_2") and pipe.text_encoder_2 is not None else "sd15"
    if family != "auto" and family != fam:
        raise LoraNbError(f"model_family={family!r} but {repo_id} is an {fam} model: set model_family='auto'.")
    return BaseModel(pipe, fam, repo_id)
