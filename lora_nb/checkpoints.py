"""Single-file checkpoints: one ``.safetensors`` holding UNet, VAE and text encoder(s) in the original
Stable Diffusion key layout (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*`` /
``conditioner.embedders.*``), as community models are shared.

diffusers needs a configuration folder to read such a file. The package ships one for SD1.5 and one for
SDXL base (``lora_nb/model_configs/<family>/``, written by ``scripts/write_model_configs.py``), so the
standard layouts load offline. The CLIP vocabulary (``vocab.json`` + ``merges.txt``, the same two files for
every SD1.x/SDXL tokenizer) is not shipped: it is looked for beside the checkpoint, in the configuration
folder, then in the hub's reference model (its local cache when ``HF_HUB_OFFLINE=1``). Also here: writing a
diffusers pipeline out in the single-file layout (tests and benchmarks load what it writes).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from lora_nb import LoraNbError

CONFIG_ROOT = Path(__file__).resolve().parent / "model_configs"
TOKENIZER_FILES = ("vocab.json", "merges.txt")
TOKENIZER_FOLDERS = {"sd15": ("tokenizer",), "sdxl": ("tokenizer", "tokenizer_2")}
# The models whose tokenizer folders are the ones the shipped configurations describe.
REFERENCE_MODELS = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}
UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"


def shipped_config_dir(family: str) -> Path:
    """The shipped diffusers configuration folder of ``family`` (``sd15`` or ``sdxl``)."""
    if family not in TOKENIZER_FOLDERS:
        raise ValueError(f"family must be sd15 or sdxl, not {family!r}")
    return CONFIG_ROOT / family


def read_config(config_dir: str | Path, part: str) -> dict:
    """``<config_dir>/<part>/config.json`` (or ``scheduler_config.json``) as a dict."""
    folder = Path(config_dir) / part
    path = folder / ("scheduler_config.json" if part == "scheduler" else "config.json")
    return json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- what a checkpoint holds

def read_shapes(path: str | Path) -> dict[str, tuple]:
    """Every tensor name of a ``.safetensors`` file with its shape, read from the header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not a checkpoint"
        raise LoraNbError(f"{path} is not a readable .safetensors checkpoint ({exc}).") from None


def shapes_of(tensors: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def unusual_layout(shapes: dict[str, tuple], family: str) -> str:
    """Why the shipped ``family`` configuration does not describe this checkpoint ('' when it does).

    The shipped folders describe SD1.x (CLIP ViT-L, 4 latent channels in) and SDXL base (CLIP ViT-L +
    OpenCLIP ViT-bigG); SD2.x, inpainting UNets, the SDXL refiner and Playground v2.5 are other layouts.
    """
    keys = shapes.keys()
    conv_in = shapes.get(UNET_IN, ())
    if len(conv_in) == 4 and conv_in[1] != 4:
        return f"its UNet takes {conv_in[1]} input channels (an inpainting or instruct model)"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "its text encoder is OpenCLIP ViT-H (an SD2.x model)"
    conditioned = any(k.startswith("conditioner.") for k in keys)
    if conditioned and not any(k.startswith("conditioner.embedders.0.transformer.") for k in keys):
        return "it has no CLIP ViT-L text encoder (an SDXL refiner)"
    if "edm_mean" in keys:
        return "it is an EDM model (Playground v2.5)"
    return ""


def is_v_prediction(shapes: dict[str, tuple]) -> bool:
    """Whether the checkpoint carries the ``v_pred`` marker tensor (sd-scripts / ComfyUI convention, e.g.
    NoobAI-XL V-Pred)."""
    return "v_pred" in shapes


# --------------------------------------------------------------------------- tokenizers

def load_tokenizers(family: str, checkpoint: str | Path, config_dir: str | Path, hub_model: str | None) -> dict:
    """The CLIP tokenizer(s) for a single-file checkpoint, as ``{"tokenizer": ..., "tokenizer_2": ...}``.

    Looked for, per tokenizer folder: beside the checkpoint (``<its folder>/tokenizer/vocab.json`` +
    ``merges.txt``; ``tokenizer_2/`` falls back to ``tokenizer/``, as both hold the same vocabulary), then in
    ``config_dir``, then in ``hub_model``'s tokenizer folders (read from the local hub cache when
    ``HF_HUB_OFFLINE=1``). Each must have as many tokens as its text encoder. Otherwise the error lists
    exactly which files to place where.
    """
    beside = Path(checkpoint).expanduser().resolve().parent
    found = {}
    for sub in TOKENIZER_FOLDERS[family]:
        place = (find_tokenizer_files(beside, sub) or find_tokenizer_files(Path(config_dir), sub)
                 or _hub_tokenizer_files(hub_model, sub))
        if place is None:
            raise LoraNbError(missing_tokenizer_message(family, checkpoint))
        tok = tokenizer_from(place, sub, config_dir)
        _check_vocab_size(tok, config_dir, sub, place)
        found[sub] = tok
    return found


def find_tokenizer_files(folder: Path, sub: str) -> Path | None:
    """``folder/sub`` when it holds vocab.json and merges.txt, else ``folder/tokenizer`` when that does."""
    for place in dict.fromkeys((folder / sub, folder / "tokenizer")):
        if all((place / name).is_file() for name in TOKENIZER_FILES):
            return place
    return None


def missing_tokenizer_message(family: str, checkpoint: str | Path) -> str:
    beside = Path(checkpoint).expanduser().resolve().parent
    files = "\n".join(f"  {beside / 'tokenizer' / name}" for name in TOKENIZER_FILES)
    extra = (f"\n{beside / 'tokenizer_2'}/ with the same two files is optional (SDXL's second tokenizer uses the "
             "same vocabulary)." if family == "sdxl" else "")
    return (f"{checkpoint} needs the CLIP tokenizer files, which lora-nb does not ship and could not find "
            f"(not beside the checkpoint, not in the hub cache of {REFERENCE_MODELS[family]}). Place these files:\n"
            f"{files}{extra}\nCopy them from the tokenizer/ folder of any SD1.5 or SDXL model in diffusers format "
            "(stable-diffusion-v1-5/stable-diffusion-v1-5, stabilityai/stable-diffusion-xl-base-1.0, ...) or from "
            "openai/clip-vit-large-patch14; then load the checkpoint again (no network needed).")


def tokenizer_from(place: Path, sub: str, config_dir: str | Path):
    """A CLIP tokenizer from the vocabulary files in ``place``. A complete tokenizer folder keeps its own
    settings (``tokenizer_config.json``); bare files, or ``tokenizer/`` standing in for ``tokenizer_2/``, get
    those of ``config_dir/sub`` (SDXL's second tokenizer pads with ``!``)."""
    from transformers import CLIPTokenizer

    own = place.name == sub and (place / "tokenizer_config.json").is_file()
    settings_file = (place if own else Path(config_dir) / sub) / "tokenizer_config.json"
    settings = json.loads(settings_file.read_text(encoding="utf-8"))
    kwargs = {k: settings[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token", "model_max_length")
              if k in settings}
    return CLIPTokenizer(str(place / "vocab.json"), str(place / "merges.txt"), **kwargs)


def _hub_tokenizer_files(hub_model: str | None, sub: str) -> Path | None:
    """The folder of ``hub_model``'s ``sub/vocab.json`` and ``sub/merges.txt`` (from the local cache when
    ``HF_HUB_OFFLINE=1``, else downloaded), or None when they cannot be had."""
    if not hub_model:
        return None
    from huggingface_hub import hf_hub_download

    try:
        paths = [Path(hf_hub_download(hub_model, f"{sub}/{name}")) for name in TOKENIZER_FILES]
    except Exception:  # noqa: BLE001 - offline, not cached, no network: all mean "not found"
        return None
    return paths[0].parent


def _check_vocab_size(tok, config_dir: str | Path, sub: str, source) -> None:
    encoder = "text_encoder" + sub.removeprefix("tokenizer")
    size = read_config(config_dir, encoder).get("vocab_size")
    if size is not None and len(tok) != size:
        raise LoraNbError(
            f"The tokenizer files in {source} have {len(tok)} tokens but the {encoder} of {config_dir} expects "
            f"{size}: they are not CLIP's vocabulary. Replace {' and '.join(TOKENIZER_FILES)} there with those of "
            "an SD1.5/SDXL model's tokenizer/ folder.")


# --------------------------------------------------------------------------- writing the single-file layout

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _rename_first(rest: str, pairs) -> str:
    head, _, tail = rest.partition(".")
    return dict(pairs).get(head, head) + "." + tail


def unet_to_original(sd: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict renamed to the original ``model.diffusion_model.*``
    layout (the inverse of diffusers' single-file UNet conversion)."""
    step = layers_per_block + 1
    attn_up = {int(m.group(1)) for k in sd if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for key, value in sd.items():
        out["model.diffusion_model." + _unet_key(key, step, attn_up)] = value
    return out


def original_unet_module(module_path: str, layers_per_block: int, attn_up: set[int]) -> str:
    """The original-layout path of one diffusers UNet module (``ValueError`` when it has none); ``attn_up``
    the indices of the up blocks with attentions."""
    return _unet_key(f"{module_path}.weight", layers_per_block + 1, attn_up).rsplit(".", 1)[0]


def _unet_key(key: str, step: int, attn_up: set[int]) -> str:
    head, _, param = key.rpartition(".")
    if head in _UNET_FIXED:
        return f"{_UNET_FIXED[head]}.{param}"
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        side, i, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        inner = f"0.{_rename_first(rest, _RESNET)}" if kind == "resnets" else f"1.{rest}"
        # the down side counts from 1 (input_blocks.0 is conv_in), the up side from 0
        return f"input_blocks.{step * i + j + 1}.{inner}" if side == "down" else f"output_blocks.{step * i + j}.{inner}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{step * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_rename_first(m[2], _RESNET)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        i = int(m[1])
        return f"output_blocks.{step * i + step - 1}.{2 if i in attn_up else 1}.conv.{m[2]}"
    raise ValueError(f"no single-file name for UNet weight {key!r}")


_VAE_ATTN = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out", "proj_out"))


def vae_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict in the original ``first_stage_model.*`` layout (attention
    projections as 1×1 convolutions)."""
    n_up = 1 + max(int(m[1]) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    out = {}
    for key, value in sd.items():
        new, is_attn = _vae_key(key, n_up)
        if is_attn and value.ndim == 2:
            value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    return out


def _vae_key(key: str, n_up: int) -> tuple[str, bool]:
    key = key.replace("conv_norm_out", "norm_out")
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        rest = m[2].replace("to_out.0", "to_out")
        return f"{m[1]}.mid.attn_1.{_rename_first(rest, _VAE_ATTN)}", True
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}", False
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}", False
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}", False
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}", False
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.up.{n_up - 1 - int(m[1])}.upsample.{m[2]}", False
    return key, False


def clip_to_original(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model's state dict under ``prefix`` (``cond_stage_model.transformer.`` for
    SD1.x, ``conditioner.embedders.0.transformer.`` for SDXL), always with the ``text_model.`` level."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}


_OPEN_CLIP = (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
              ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))


def open_clip_to_original(sd: dict[str, torch.Tensor], prefix: str = "conditioner.embedders.1.model.") -> dict:
    """SDXL's second text encoder (``CLIPTextModelWithProjection``) in the OpenCLIP layout: fused q/k/v
    ``in_proj``, ``resblocks``, ``ln_final`` and a transposed ``text_projection``."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out = {prefix + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
           prefix + "positional_embedding": sd["embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": sd["final_layer_norm.weight"],
           prefix + "ln_final.bias": sd["final_layer_norm.bias"],
           prefix + "text_projection": sd["text_projection.weight"].T.contiguous()}
    layers = sorted({int(m[1]) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for param in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{param}"] = torch.cat([sd[f"{src}self_attn.{p}_proj.{param}"] for p in "qkv"])
            for old, new in _OPEN_CLIP:
                out[f"{dst}{new}.{param}"] = sd[f"{src}{old}.{param}"]
    return out


def single_file_state_dict(pipe, family: str) -> dict[str, torch.Tensor]:
    """All weights of a diffusers SD1.5/SDXL pipeline in the single-file layout."""
    sd = unet_to_original(pipe.unet.state_dict(), pipe.unet.config.layers_per_block)
    sd.update(vae_to_original(pipe.vae.state_dict()))
    if family == "sdxl":
        sd.update(clip_to_original(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer."))
        sd.update(open_clip_to_original(pipe.text_encoder_2.state_dict()))
    else:
        sd.update(clip_to_original(pipe.text_encoder.state_dict(), "cond_stage_model.transformer."))
    return sd


def write_single_file(pipe, family: str, path: str | Path, dtype: torch.dtype | None = None,
                      extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Save a diffusers pipeline as one ``.safetensors`` checkpoint in the original layout (``extra``: more
    tensors, such as the ``v_pred`` marker), in ``dtype`` when given."""
    from safetensors.torch import save_file

    sd = single_file_state_dict(pipe, family)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    sd.update(extra or {})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path
