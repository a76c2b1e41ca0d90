"""Write the shipped SD1.5 and SDXL configuration folders (lora_nb/model_configs/<family>/).

    python scripts/write_model_configs.py            # rewrite lora_nb/model_configs/
    python scripts/write_model_configs.py --out DIR  # somewhere else

The values are the published architectures of stable-diffusion-v1-5 (SD1.5) and
stable-diffusion-xl-base-1.0 (SDXL base): the same numbers diffusers' single-file
conversion derives from the original LDM configurations (v1-inference.yaml,
sd_xl_base.yaml). The files are written through diffusers' and transformers'
config classes, so every field the installed versions know is spelled out; the
result is plain JSON in the diffusers pipeline layout. The CLIP vocabulary
(vocab.json, merges.txt) is not part of it: see lora_nb/checkpoints.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768, attention_head_dim=8,
                 block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, cross_attention_dim=2048,
                 attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], layers_per_block=2,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
           layers_per_block=2, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
SD15_VAE = dict(VAE, sample_size=512, scaling_factor=0.18215)
SDXL_VAE = dict(VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
# The token ids are those of the published text-encoder configs (CLIP's pooling then takes the highest id, EOS).
CLIP_IDS = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
              **CLIP_IDS)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
              **CLIP_IDS)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1, prediction_type="epsilon")
SD15_SCHEDULER = dict(SCHEDULER, skip_prk_steps=True, set_alpha_to_one=False)
SDXL_SCHEDULER = dict(SCHEDULER, interpolation_type="linear", timestep_spacing="leading", use_karras_sigmas=False)
TOKENIZER = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                 pad_token="<|endoftext|>", model_max_length=77, do_lower_case=True)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_unet_and_vae(folder: Path, unet: dict, vae: dict) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        UNet2DConditionModel(**unet).save_config(folder / "unet")
        AutoencoderKL(**vae).save_config(folder / "vae")


def write_text_encoder(folder: Path, values: dict, with_projection: bool) -> None:
    from transformers import CLIPTextConfig

    cfg = CLIPTextConfig(**values)
    cfg.architectures = ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"]
    folder.mkdir(parents=True, exist_ok=True)
    cfg.to_json_file(str(folder / "config.json"))


def write_scheduler(folder: Path, cls_name: str, values: dict) -> None:
    import diffusers

    getattr(diffusers, cls_name)(**values).save_config(folder)


def write_tokenizer_config(folder: Path, pad_token: str) -> None:
    """The tokenizer's settings only; vocab.json and merges.txt come from elsewhere (see checkpoints.py)."""
    values = dict(TOKENIZER, pad_token=pad_token)
    write_json(folder / "tokenizer_config.json", dict(values, tokenizer_class="CLIPTokenizer", errors="replace",
                                                      add_prefix_space=False, clean_up_tokenization_spaces=True))
    write_json(folder / "special_tokens_map.json",
               {k: values[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")})


def write_sd15(folder: Path) -> None:
    import diffusers

    write_json(folder / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "image_encoder": [None, None]})
    write_unet_and_vae(folder, SD15_UNET, SD15_VAE)
    write_text_encoder(folder / "text_encoder", CLIP_L, with_projection=False)
    write_scheduler(folder / "scheduler", "PNDMScheduler", SD15_SCHEDULER)
    write_tokenizer_config(folder / "tokenizer", pad_token="<|endoftext|>")


def write_sdxl(folder: Path) -> None:
    import diffusers

    write_json(folder / "model_index.json", {
        "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None], "image_encoder": [None, None], "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]})
    write_unet_and_vae(folder, SDXL_UNET, SDXL_VAE)
    write_text_encoder(folder / "text_encoder", CLIP_L, with_projection=False)
    write_text_encoder(folder / "text_encoder_2", CLIP_G, with_projection=True)
    write_scheduler(folder / "scheduler", "EulerDiscreteScheduler", SDXL_SCHEDULER)
    write_tokenizer_config(folder / "tokenizer", pad_token="<|endoftext|>")
    write_tokenizer_config(folder / "tokenizer_2", pad_token="!")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "lora_nb" / "model_configs"))
    out = Path(p.parse_args(argv).out)
    write_sd15(out / "sd15")
    write_sdxl(out / "sdxl")
    print(f"wrote {sorted(str(f.relative_to(out)) for f in out.rglob('*.json'))}")


if __name__ == "__main__":
    main()
