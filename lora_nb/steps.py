"""The diffusion steps shared by training (:mod:`lora_nb.train`) and diagnosis (:mod:`lora_nb.diagnose`).

In the order one training step uses them: caption embeddings (:func:`encode_prompts`), latents of the
images (:func:`prepare_samples` once, :func:`latents_of` per batch), noise at a timestep
(:func:`noise_like`, :func:`sample_timesteps`), the prediction target (:func:`prediction_target`), the UNet's
extra conditioning on SDXL (:func:`unet_conditioning`), the per-sample loss (:func:`diffusion_loss`,
weighted by :func:`loss_weights`). :func:`fixed_noise_loss` evaluates the same loss with fixed noise and
timesteps: the validation loss that compares across epochs.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lora_nb.dataset import Item, load_training_image, load_training_mask


# --------------------------------------------------------------------------- text

TOKENS_PER_CHUNK = 75  # what a 77-position CLIP text encoder holds between its BOS and EOS


def chunk_count(max_token_length: int) -> int:
    """75 → 1 chunk, 150 → 2, 225 → 3 (``dataset.max_token_length``)."""
    return max(1, int(max_token_length) // TOKENS_PER_CHUNK)


def tokenize(tokenizer, captions: list[str], chunks: int = 1) -> torch.Tensor:
    """Token ids as ``(batch, chunks, model_max_length)``: each chunk ``BOS + tokens + EOS``, as
    AUTOMATIC1111 and sd-scripts feed long prompts to a CLIP text encoder. One chunk is exactly what the
    pipelines' own tokenizing gives (truncated at ``model_max_length``)."""
    inner = tokenizer.model_max_length - 2
    ids = tokenizer(captions, padding="max_length", max_length=inner * chunks + 2, truncation=True,
                    return_tensors="pt").input_ids
    if chunks == 1:
        return ids[:, None]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out = []
    for i in range(chunks):
        chunk = torch.cat([ids[:, :1], ids[:, 1 + i * inner: 1 + (i + 1) * inner], ids[:, -1:]], dim=1)
        chunk[:, 0] = bos
        # a chunk ends with EOS unless it is all padding (sd-scripts' rule, for tokenizers whose pad is not EOS)
        ends_inside = (chunk[:, -2] != eos) & (chunk[:, -2] != pad)
        chunk[ends_inside, -1] = eos
        starts_empty = chunk[:, 1] == pad
        chunk[starts_empty, 1] = eos
        out.append(chunk)
    return torch.stack(out, dim=1)


def count_tokens(tokenizer, caption: str) -> int:
    """Tokens of ``caption`` without BOS/EOS (what ``dataset.max_token_length`` limits)."""
    return len(tokenizer(caption, truncation=False, add_special_tokens=False).input_ids)


def _encode_chunks(te, ids: torch.Tensor, layer: int | None):
    """Hidden states of every chunk, joined as sd-scripts does (first BOS, each chunk's tokens, last EOS),
    and the first chunk's pooled output. ``layer`` None: the last hidden state; else that hidden layer."""
    b, n, length = ids.shape
    out = te(ids.reshape(b * n, length), output_hidden_states=layer is not None)
    hidden = out[0] if layer is None else out.hidden_states[layer]
    hidden = hidden.reshape(b, n, length, -1)
    if n == 1:
        joined = hidden[:, 0]
    else:
        parts = [hidden[:, 0, :1]] + [hidden[:, i, 1:-1] for i in range(n)] + [hidden[:, -1, -1:]]
        joined = torch.cat(parts, dim=1)
    pooled = out[0].reshape(b, n, -1)[:, 0] if out[0].dim() == 2 else None
    return joined, pooled, out


def encode_prompts(model, captions: list[str], clip_skip: int = 1, device=None, text_encoders: list | None = None,
                   max_token_length: int = TOKENS_PER_CHUNK):
    """Caption embeddings as the pipelines compute them: (prompt_embeds, pooled or None).

    SD1.x: the text encoder's last hidden state (``clip_skip`` > 1: an earlier
    layer, through the final layer norm). SDXL: the penultimate hidden states
    of both encoders, concatenated, and the second encoder's pooled output.
    Captions longer than one chunk are encoded in 75-token chunks (``max_token_length`` 150 or 225),
    the same in training, cached embeddings and previews.
    ``text_encoders`` replaces the model's own (the distributed wrappers while training).
    """
    device = device or model.pipe.unet.device
    encoders = text_encoders or model.text_encoders
    chunks = chunk_count(max_token_length)
    if model.family == "sd15":
        ids = tokenize(model.pipe.tokenizer, captions, chunks).to(device)
        hidden, _, _ = _encode_chunks(encoders[0], ids, -clip_skip if clip_skip > 1 else None)
        if clip_skip > 1:
            inner = model.text_encoders[0]
            final_norm = inner.text_model.final_layer_norm if hasattr(inner, "text_model") else inner.final_layer_norm
            return final_norm(hidden), None
        return hidden, None
    embeds, pooled = [], None
    for tok, te in zip(model.tokenizers, encoders):
        ids = tokenize(tok, captions, chunks).to(device)
        hidden, pooled, _ = _encode_chunks(te, ids, -(clip_skip + 1))
        embeds.append(hidden)
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
    masks: list[torch.Tensor] | None = None  # the loss mask at latent size, per flip variant (dataset.masked_loss)


def prepare_samples(items: list[Item], size: tuple[int, int], model, flip_aug: bool, cache: bool,
                    seed: int, device, desc: str = "Caching latents", disk_cache=None,
                    masked: bool = False) -> list[Sample]:
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
        at = item.size or size  # its bucket, or the one training size
        key = store.key(item.image, at, flips) if store else ""
        stored = store.read(key, len(flips)) if store else None
        pix, lat, tids, encoded = [], [], [], []
        for v, flip in enumerate(flips):
            if stored:
                mean, std, tid = stored[v]["mean"].to(device), stored[v]["std"].to(device), stored[v]["time_ids"]
            else:
                arr, orig_hw, crop_tl = load_training_image(item.image, at, flip)
                tid = sdxl_time_ids(orig_hw, crop_tl, (at[1], at[0]))
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
        masks = [latent_mask(item.image, at, flip, model.vae_scale) for flip in flips] if masked else None
        out.append(Sample(item, pix, lat if cache else None, tids, masks))
    return out


def latent_mask(image: Path, size: tuple[int, int], flip: bool, vae_scale: int) -> torch.Tensor:
    """The image's loss mask averaged down to latent size, ``(1, h/8, w/8)``; all ones without a mask."""
    mask = load_training_mask(image, size, flip)
    w, h = size
    if mask is None:
        return torch.ones(1, h // vae_scale, w // vae_scale)
    return F.interpolate(torch.from_numpy(mask)[None, None], size=(h // vae_scale, w // vae_scale), mode="area")[0]


def latents_of(model, samples: list[Sample], variants: list[int], device, gens) -> torch.Tensor:
    """Latents for a batch (from the cache, or encoded now), scaled for the UNet. Encoded now, each sample's
    latent is drawn from its VAE distribution with its own generator (``gens``, one per sample; None: the
    global one)."""
    vae = model.pipe.vae
    if samples[0].latents is not None:
        lat = torch.stack([s.latents[v] for s, v in zip(samples, variants)]).to(device)
    else:
        x = torch.from_numpy(np.stack([s.pixels[v] for s, v in zip(samples, variants)])).to(device, vae.dtype)
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
            shape = dist.mean.shape[1:]
            noise = torch.stack([torch.randn(shape, generator=g) for g in (gens or [None] * len(samples))])
            noise = noise.to(device, dist.mean.dtype)
            lat = (dist.mean + dist.std * noise).float()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (lat - shift) * vae.config.scaling_factor


# --------------------------------------------------------------------------- noise, target, loss

def sample_generators(seed: int, epoch: int, position: int) -> tuple[torch.Generator, random.Random]:
    """The random generators of one sample: from (seed, epoch, the sample's position in the epoch) alone.
    Its flip, noise, timestep and caption changes are drawn from them, so they do not depend on which batch
    the sample lands in: batch 4 draws what batch 2 × 2 accumulated draws, a data-parallel run what one
    process draws, a run resumed in the middle of an epoch what the uninterrupted run drew."""
    key = ((seed * 1_000_003 + epoch) * 1_000_033 + position) % 2**63
    return torch.Generator().manual_seed(key), random.Random(key)


def noise_like(latents: torch.Tensor, gen, noise_offset: float = 0.0, multires_iterations: int = 0,
               multires_discount: float = 0.3) -> torch.Tensor:
    """Gaussian noise for ``latents`` from ``gen``; ``noise_offset`` adds a per-channel constant (C21);
    ``multires_iterations`` adds :func:`multires_noise` (each extra draw only when its setting is on, so the
    noise of a run without them does not change)."""
    device = latents.device
    noise = torch.randn(latents.shape, generator=gen).to(device)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=gen).to(device)
    if multires_iterations:
        noise = multires_noise(noise, gen, multires_iterations, multires_discount)
    return noise


def multires_noise(noise: torch.Tensor, gen, iterations: int, discount: float) -> torch.Tensor:
    """Pyramid ("multires") noise, as sd-scripts' ``--multires_noise_iterations`` adds it: noise drawn at ever
    coarser sizes (each 2–4× smaller, at random), enlarged and added with weight ``discount``^i, then scaled
    back to unit variance. The coarse parts shift whole regions, so the model also learns overall brightness
    and colour, which plain per-pixel noise hardly ever changes."""
    b, c, h, w = noise.shape
    out = noise.clone()
    for i in range(1, iterations + 1):
        r = 2 + 2 * torch.rand((), generator=gen).item()
        hn, wn = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        coarse = torch.randn((b, c, hn, wn), generator=gen).to(noise.device)
        out = out + F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) * discount ** i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def perturbed_noise(noise: torch.Tensor, gen, gamma: float) -> torch.Tensor:
    """Input-perturbation noise (Ning et al. 2023; sd-scripts' ``--ip_noise_gamma``): the noisy latents are made
    with ``noise + gamma * extra`` while the model still predicts ``noise``, which evens out the gap between
    training and sampling. ``gamma`` 0: ``noise`` itself (no draw)."""
    if not gamma:
        return noise
    return noise + gamma * torch.randn(noise.shape, generator=gen).to(noise.device)


def sample_timesteps(noise_scheduler, n: int, gen, device, low: int = 0, high: int = 1000) -> torch.Tensor:
    """``n`` timesteps drawn uniformly from ``low`` up to ``high`` (not included; capped at the schedule's
    length), sd-scripts' ``--min_timestep`` / ``--max_timestep``."""
    high = min(high, noise_scheduler.config.num_train_timesteps)
    return torch.randint(low, high, (n,), generator=gen).to(device)


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


def loss_weights(noise_scheduler, timesteps, gamma: float, prediction_type: str,
                 debiased: bool = False) -> torch.Tensor:
    """Per-sample loss weights: min-SNR-γ (off when γ is 0) times, with ``debiased``, the debiased-estimation
    weight (Yu et al. 2023, arXiv 2310.08442; sd-scripts' ``--debiased_estimation_loss``): 1/√SNR for
    epsilon prediction, 1/(SNR+1) for v-prediction, with SNR capped at 1000 so timestep 0 stays finite."""
    weights = torch.ones_like(timesteps, dtype=torch.float32)
    if not gamma and not debiased:
        return weights
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps).float().clamp(min=1e-8)  # 0 at the last step of a zero-terminal schedule
    if gamma:
        clipped = torch.minimum(snr, torch.full_like(snr, gamma))
        weights = clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr
    if debiased:
        capped = torch.clamp(snr, max=1000.0)
        weights = weights * (1 / (capped + 1) if prediction_type == "v_prediction" else 1 / torch.sqrt(capped))
    return weights


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                   huber_c: torch.Tensor | float | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The loss per sample (one value per batch element), computed in fp32: ``l2`` the mean squared error;
    ``huber`` 2c(√(r² + c²) − c) and ``smooth_l1`` 2(√(r² + c²) − c) per value (sd-scripts' pseudo-Huber
    losses, residual r, ``huber_c`` c per sample: :func:`huber_c_of`), equal to r² for |r| ≪ c (huber) and
    growing only linearly for large residuals, so outlier pixels pull less. ``mask`` ``(B, 1, h, w)`` weights
    each latent position (``dataset.masked_loss``: 0 where the picture is not to be learned)."""
    dims = tuple(range(1, pred.dim()))
    if loss_type == "l2":
        per_value = F.mse_loss(pred.float(), target.float(), reduction="none")
    else:
        c = torch.as_tensor(huber_c if huber_c is not None else 0.1, dtype=torch.float32, device=pred.device)
        c = c.reshape(-1, *([1] * (pred.dim() - 1))) if c.dim() else c
        smooth = torch.sqrt((pred.float() - target.float()) ** 2 + c ** 2) - c
        per_value = 2 * c * smooth if loss_type == "huber" else 2 * smooth
    if mask is not None:  # sd-scripts' masked loss: each latent position weighted by the mask, then the mean
        per_value = per_value * mask.to(per_value.device, per_value.dtype)
    return per_value.mean(dim=dims)


def huber_c_of(noise_scheduler, timesteps: torch.Tensor, huber_c: float, schedule: str) -> torch.Tensor:
    """The Huber c of each sample's timestep, as sd-scripts schedules it: ``constant`` c; ``exponential``
    c^(t/T) (1 at t = 0 falling to c at the last step); ``snr`` (1 − c)/(1 + σ_t)² + c with
    σ_t = √((1 − ᾱ_t)/ᾱ_t), close to 1 at low noise and to c at high noise."""
    t = timesteps.detach().cpu().float()
    if schedule == "constant":
        return torch.full_like(t, huber_c)
    if schedule == "exponential":
        return torch.exp(math.log(huber_c) * t / noise_scheduler.config.num_train_timesteps)
    alphas = noise_scheduler.alphas_cumprod[timesteps.detach().cpu()].float()
    sigmas = ((1 - alphas) / alphas.clamp(min=1e-12)) ** 0.5
    return (1 - huber_c) / (1 + sigmas) ** 2 + huber_c


def validation_timesteps(low: int = 0, high: int = 1000, n: int = 5) -> tuple[int, ...]:
    """The validation loss's timesteps: the middles of ``n`` equal parts of the trained range ``[low, high)``, as
    sd-scripts spreads its validation timesteps over ``--min_timestep`` … ``--max_timestep``: 100, 300, …, 900 for
    the whole schedule, 550, 650, …, 950 for a run trained on 500–999 (the steps it never trains say nothing of
    how it learns)."""
    return tuple(int(low + (high - low) * (2 * k + 1) / (2 * n)) for k in range(n))


def fixed_noise_loss(model, latents: torch.Tensor, embeds: torch.Tensor, pooled, time_ids, noise_scheduler,
                     prediction_type: str, seed: int = 1234, timesteps: tuple[int, ...] | None = None) -> float:
    """The validation loss: same latents, noise and timesteps every time, so epochs compare.

    ``latents`` are already scaled; every latent is evaluated at each of ``timesteps`` (default: those of
    :func:`validation_timesteps` for the whole schedule).
    """
    timesteps = timesteps or validation_timesteps()
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
