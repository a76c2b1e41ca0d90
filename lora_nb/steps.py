"""The diffusion steps shared by training (:mod:`lora_nb.train`) and diagnosis (:mod:`lora_nb.diagnose`).

In the order one training step uses them: caption embeddings (:func:`encode_prompts`), latents of the
images (:func:`prepare_samples` once, :func:`latents_of` per batch), noise at a timestep
(:func:`noise_like`, :func:`sample_timesteps`), the prediction target (:func:`prediction_target`), the UNet's
extra conditioning on SDXL (:func:`unet_conditioning`), the per-sample loss (:func:`diffusion_loss`,
weighted by :func:`loss_weights`). :func:`fixed_noise_loss` evaluates the same loss with fixed noise and
timesteps: the validation loss that compares across epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lora_nb.dataset import Item, load_training_image


# --------------------------------------------------------------------------- text

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


# --------------------------------------------------------------------------- images and latents

def sdxl_time_ids(original_hw, crop_tl, target_hw) -> torch.Tensor:
    """SDXL's micro-conditioning: original size, crop top-left, target size (each (h, w))."""
    return torch.tensor(list(original_hw) + list(crop_tl) + list(target_hw), dtype=torch.float32)


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


# --------------------------------------------------------------------------- noise, target, loss

def noise_like(latents: torch.Tensor, gen, noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise for ``latents`` from ``gen``; ``noise_offset`` adds a per-channel constant (C21)."""
    device = latents.device
    noise = torch.randn(latents.shape, generator=gen).to(device)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=gen).to(device)
    return noise


def sample_timesteps(noise_scheduler, n: int, gen, device) -> torch.Tensor:
    return torch.randint(0, noise_scheduler.config.num_train_timesteps, (n,), generator=gen).to(device)


def prediction_target(noise_scheduler, latents, noise, timesteps, prediction_type: str) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity (v-prediction)."""
    return noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)


def unet_conditioning(pooled, time_ids, dtype=None) -> dict:
    """The UNet's extra keyword arguments: SDXL's ``added_cond_kwargs`` (nothing for SD1.x, whose pooled is None)."""
    if pooled is None:
        return {}
    if dtype is not None:
        pooled, time_ids = pooled.to(dtype), time_ids.to(dtype)
    return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


def loss_weights(noise_scheduler, timesteps, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ weights per sample (1 when γ is 0)."""
    if not gamma:
        return torch.ones_like(timesteps, dtype=torch.float32)
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample (one value per batch element), computed in fp32."""
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.dim())))


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
            target = prediction_target(noise_scheduler, latents, noise, ts, prediction_type)
            pred = unet(noisy.to(unet.dtype), ts, embeds.to(unet.dtype), **unet_conditioning(pooled, time_ids)).sample
            total += F.mse_loss(pred.float(), target.float(), reduction="sum").item()
            count += target.numel()
    return total / count
