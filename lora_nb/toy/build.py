"""Build the toy base model from scratch: tokenizer, VAE, cached latents, UNet + text encoder, export.

Each stage reads and writes files in a build folder (``build/toy/`` by the
build script) and checkpoints often, so the build is resumable: run it again
and it continues where it stopped. The base model never sees the concept (no
zorb image, no trigger word in a caption), although the trigger word is in the
tokenizer's vocabulary so that it is one token.

Architecture (about 2.6 M parameters, ~11 MB in fp32):

- VAE: AutoencoderKL, blocks (16, 32, 64), 4 latent channels — 64×64 → 16×16×4
- text encoder: CLIPTextModel, hidden 64, 3 layers, 4 heads, 16 positions
- UNet: (32, 64, 64), cross-attention only at 8×8 and 4×4 latent resolution

The training loops report through an ``on_step(step, info)`` callback, so the
caller decides how to show progress.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from lora_nb import LoraNbError
from lora_nb.tokenizer import write_clip_tokenizer
from lora_nb.toy import world
from lora_nb.toy.rich import render_rich_scene

OnStep = Callable[[int, dict], None] | None

TOKENIZER_MAX_LENGTH = 16
BASE_SEED = 1234
VAE_SEED = 777
SIZE_SHARES = {(64, 64): 0.8, (64, 96): 0.1, (96, 64): 0.1}


# --------------------------------------------------------------------------- files

def save_atomic(obj, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename it over ``path`` (no half-written checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json_atomic(data: dict, path: Path) -> None:
    """Write ``data`` as JSON via a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict | None:
    """The checkpoint at ``path``, or None when there is none yet."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise LoraNbError(f"The build checkpoint {path} is unreadable ({exc}); delete it to restart that stage.") from None


# --------------------------------------------------------------------------- architecture

def build_tokenizer(folder: Path):
    """Write the toy CLIP tokenizer (every caption word, the trigger and class word one token)."""
    words = list(dict.fromkeys(world.CAPTION_WORDS + [world.TRIGGER, world.CONCEPT_CLASS]))
    return write_clip_tokenizer(words, folder, model_max_length=TOKENIZER_MAX_LENGTH)


def make_vae():
    """A fresh toy AutoencoderKL (64×64×3 → 16×16×4)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=8, sample_size=64,
    )


def make_text_encoder(tokenizer):
    """A fresh toy CLIPTextModel (hidden 64, 3 layers, positions = the tokenizer's max length)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, projection_dim=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_act="gelu",
    )
    return CLIPTextModel(cfg)


def make_unet():
    """A fresh toy UNet2DConditionModel (16×16 latents, cross-attention at 8×8 and 4×4)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
    )


def make_scheduler(kind: str = "ddim"):
    """The toy model's noise schedule (SD's scaled-linear betas): DDIM for sampling, DDPM for training."""
    from diffusers import DDIMScheduler, DDPMScheduler

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  num_train_timesteps=1000)
    if kind == "ddim":
        return DDIMScheduler(**common, set_alpha_to_one=False, steps_offset=1)
    return DDPMScheduler(**common)


# --------------------------------------------------------------------------- data

def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) → float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def base_scene(seed: int, index: int, size: tuple[int, int]) -> world.ToyScene:
    """Training scene ``index`` of the base world: one object, plain (3/4) or gradient (1/4) background."""
    style = "gradient" if index % 4 == 3 else "plain"
    return world.sample_scene(seed, index, size, background_style=style)


def vae_batch(step: int, batch: int, crop: int | None, seed: int = VAE_SEED) -> torch.Tensor:
    """VAE training batch ``step``: 70% rich-world images, 30% base-world images (never a zorb).

    With ``crop`` each image is a random ``crop``×``crop`` window of a 64×64 scene (cheaper steps).
    """
    rng = np.random.default_rng([seed, step])
    images = []
    for i in range(batch):
        idx = step * batch + i
        if rng.random() < 0.7:
            img = render_rich_scene(seed, idx)
        else:
            img = world.render_scene(world.sample_scene(seed + 1, idx, background_style=None, second_object_p=0.3))
        if crop:
            y, x = rng.integers(0, 64 - crop + 1, 2)
            img = img[y:y + crop, x:x + crop]
        images.append(img)
    return to_tensor(np.stack(images))


# --------------------------------------------------------------------------- stage: VAE

def train_vae(build_dir: Path, steps: int = 900, crop_steps: int = 630, lr: float = 1e-3,
              max_minutes: float | None = None, on_step: OnStep = None, checkpoint_every: int = 100) -> dict:
    """Train (or continue training) the toy VAE; returns the final checkpoint dict.

    Steps before ``crop_steps`` use 32×32 crops at batch 32, later ones full
    64×64 images at batch 16. Loss: L1 + 0.5·MSE + a tiny KL term.
    Checkpoint: ``build_dir/vae.pt`` (weights, optimizer, step, seconds).
    """
    path = Path(build_dir) / "vae.pt"
    ckpt = load_checkpoint(path)
    torch.manual_seed(VAE_SEED)
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    step, seconds = 0, 0.0
    if ckpt:
        vae.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, seconds = ckpt["step"], ckpt["seconds"]
    vae.train()
    start, t_last = time.time(), time.time()

    def lr_at(s: int) -> float:
        warm = min(1.0, (s + 1) / 50)
        return lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))

    def save():
        save_atomic({"model": vae.state_dict(), "optimizer": opt.state_dict(), "step": step,
                     "seconds": seconds, "done": step >= steps}, path)

    while step < steps:
        crop = 32 if step < crop_steps else None
        x = vae_batch(step, 32 if crop else 16, crop)
        torch.manual_seed(VAE_SEED * 100_003 + step)  # posterior samples: the same whether resumed or not
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        l1 = F.l1_loss(rec, x)
        loss = l1 + 0.5 * F.mse_loss(rec, x) + 1e-7 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        now = time.time()
        seconds += now - t_last
        t_last = now
        if on_step:
            on_step(step, {"loss": loss.item(), "l1": l1.item(), "lr": lr_at(step - 1)})
        if step % checkpoint_every == 0 or step == steps:
            save()
        if max_minutes is not None and (now - start) > max_minutes * 60:
            save()
            break
    return {"step": step, "seconds": seconds, "done": step >= steps}


def load_trained_vae(build_dir: Path):
    """The VAE from ``build_dir/vae.pt`` in eval mode (raises when the VAE stage has not run)."""
    ckpt = load_checkpoint(Path(build_dir) / "vae.pt")
    if ckpt is None:
        raise LoraNbError(f"No VAE checkpoint in {build_dir}: run `python scripts/build_toy_model.py` first.")
    vae = make_vae()
    vae.load_state_dict(ckpt["model"])
    return vae.eval()


@torch.no_grad()
def reconstruct(vae, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """Encode and decode uint8 images (N, H, W, 3) with the VAE (posterior mean); returns uint8."""
    out = []
    for i in range(0, len(images), batch):
        x = to_tensor(images[i:i + batch])
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        out.append(((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out) if out else images.copy()


# --------------------------------------------------------------------------- stage: latents

@torch.no_grad()
def cache_latents(build_dir: Path, counts: dict | None = None, seed: int = BASE_SEED,
                  on_step: OnStep = None, batch: int = 128) -> dict:
    """Encode the base world once per size into ``build_dir/latents.pt`` (mean and std of the posterior).

    ``counts`` maps (width, height) → number of images (default 10,000 square,
    1,500 of each 2:3 size). Also stores the latent scaling factor
    (1 / std of the square latents), as SD does.
    """
    path = Path(build_dir) / "latents.pt"
    if path.exists():
        return load_checkpoint(path)
    counts = counts or {(64, 64): 10000, (64, 96): 1500, (96, 64): 1500}
    vae = load_trained_vae(build_dir)
    data = {"seed": seed, "buckets": {}}
    done = 0
    for size, n in counts.items():
        means, stds = [], []
        for i in range(0, n, batch):
            idx = range(i, min(n, i + batch))
            images = np.stack([world.render_scene(base_scene(seed, j, size)) for j in idx])
            dist = vae.encode(to_tensor(images)).latent_dist
            means.append(dist.mean.clone())
            stds.append(dist.std.clone())
            done += len(idx)
            if on_step:
                on_step(done, {"size": size})
        data["buckets"][size] = {"mean": torch.cat(means), "std": torch.cat(stds), "n": n}
    square = data["buckets"][(64, 64)]["mean"]
    data["scaling_factor"] = float(1.0 / square.std())
    save_atomic(data, path)
    return data


# --------------------------------------------------------------------------- stage: UNet + text encoder

def caption_for_training(scene: world.ToyScene, rng: np.random.Generator, empty_p: float = 0.1,
                         tags_p: float = 0.15) -> str:
    """A training caption: empty (for CFG), booru tags in shuffled order, or the natural caption."""
    r = rng.random()
    if r < empty_p:
        return ""
    if r < empty_p + tags_p:
        tags = world.tags_of_scene(scene)
        rng.shuffle(tags)
        return ", ".join(tags)
    return world.caption_scene(scene)


def _ema_update(ema: dict, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            ema[name].mul_(decay).add_(p.detach(), alpha=1 - decay)


def draw_base_batch(data: dict, tok, sched, step: int, batch: int, sizes: list, shares: np.ndarray):
    """Step ``step``'s batch, drawn from (BASE_SEED, step) alone so a resumed build draws what an
    uninterrupted one would: one size bucket, latents, captions (token ids), noise, timesteps, noisy latents."""
    rng = np.random.default_rng([BASE_SEED, 99, step])
    size = sizes[rng.choice(len(sizes), p=shares)]
    bucket = data["buckets"][size]
    idx = rng.integers(0, bucket["n"], batch)
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    lat = bucket["mean"][idx] + bucket["std"][idx] * torch.randn(bucket["mean"][idx].shape, generator=gen)
    lat = lat * data["scaling_factor"]
    captions = [caption_for_training(base_scene(data["seed"], int(j), size), rng) for j in idx]
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    noise = torch.randn(lat.shape, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    return size, ids, noise, t, sched.add_noise(lat, noise, t)


def train_unet(build_dir: Path, steps: int = 5000, batch: int = 32, lr: float = 1e-3, warmup: int = 200,
               ema_decay: float = 0.995, snr_gamma: float = 5.0, max_minutes: float | None = None,
               on_step: OnStep = None, checkpoint_every: int = 200) -> dict:
    """Train (or continue) the UNet and the text encoder jointly from scratch on cached latents.

    AdamW at ``lr`` with linear warmup, batch ``batch`` (one size bucket per
    batch), 10% empty captions, 15% tag-style captions, min-SNR-γ weighting,
    EMA of both models. Checkpoint: ``build_dir/unet.pt`` (mean loss per
    checkpoint appended to ``unet_log.jsonl``); stops after ``steps`` in
    total, after ``max_minutes`` in this call, or when a file ``build_dir/STOP``
    appears (saving first).
    """
    from transformers import CLIPTokenizer

    build_dir = Path(build_dir)
    tok = CLIPTokenizer.from_pretrained(build_dir / "tokenizer")
    data = cache_latents(build_dir)
    sf = data["scaling_factor"]
    torch.manual_seed(BASE_SEED)
    unet, te = make_unet(), make_text_encoder(tok)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = make_scheduler("ddpm")
    alphas = sched.alphas_cumprod
    snr_all = alphas / (1 - alphas)
    ckpt = load_checkpoint(build_dir / "unet.pt")
    step, seconds = 0, 0.0
    if ckpt:
        unet.load_state_dict(ckpt["unet"])
        te.load_state_dict(ckpt["text_encoder"])
        opt.load_state_dict(ckpt["optimizer"])
        ema_u, ema_t = ckpt["ema_unet"], ckpt["ema_text_encoder"]
        step, seconds = ckpt["step"], ckpt["seconds"]
    else:
        ema_u = {n: p.detach().clone() for n, p in unet.named_parameters()}
        ema_t = {n: p.detach().clone() for n, p in te.named_parameters()}
    unet.train()
    te.train()
    sizes = list(SIZE_SHARES)
    shares = np.asarray([SIZE_SHARES[s] for s in sizes])
    start = t_last = time.time()
    losses: list[float] = []

    def save():
        save_atomic({"unet": unet.state_dict(), "text_encoder": te.state_dict(), "optimizer": opt.state_dict(),
                     "ema_unet": ema_u, "ema_text_encoder": ema_t, "step": step, "seconds": seconds,
                     "scaling_factor": sf}, build_dir / "unet.pt")

    while step < steps:
        size, ids, noise, t, noisy = draw_base_batch(data, tok, sched, step, batch, sizes, shares)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup)
        cond = te(ids)[0]
        pred = unet(noisy, t, encoder_hidden_states=cond).sample
        snr = snr_all[t]
        weight = torch.clamp(snr, max=snr_gamma) / snr
        loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_u, unet, decay)
        _ema_update(ema_t, te, decay)
        now = time.time()
        seconds += now - t_last
        t_last = now
        if on_step:
            on_step(step, {"loss": loss.item(), "size": size})
        losses.append(loss.item())
        if step % checkpoint_every == 0 or step == steps:
            save()
            with open(build_dir / "unet_log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "loss": float(np.mean(losses)), "seconds": round(seconds, 1)}) + "\n")
            losses.clear()
        if (max_minutes is not None and (now - start) > max_minutes * 60) or (build_dir / "STOP").exists():
            save()
            break
    return {"step": step, "seconds": seconds, "done": step >= steps}


# --------------------------------------------------------------------------- export

def assemble_pipeline(build_dir: Path, use_ema: bool = True):
    """A StableDiffusionPipeline from the latest checkpoints in ``build_dir`` (EMA weights by default)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    build_dir = Path(build_dir)
    ckpt = load_checkpoint(build_dir / "unet.pt")
    if ckpt is None:
        raise LoraNbError(f"No UNet checkpoint in {build_dir}: run `python scripts/build_toy_model.py` first.")
    tok = CLIPTokenizer.from_pretrained(build_dir / "tokenizer")
    vae = load_trained_vae(build_dir)
    vae.register_to_config(scaling_factor=ckpt["scaling_factor"])
    unet, te = make_unet(), make_text_encoder(tok)
    unet.load_state_dict(ckpt["unet"])
    te.load_state_dict(ckpt["text_encoder"])
    if use_ema:
        for model, ema in ((unet, ckpt["ema_unet"]), (te, ckpt["ema_text_encoder"])):
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(ema[name])
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=te.eval(), tokenizer=tok, unet=unet.eval(), scheduler=make_scheduler("ddim"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe, ckpt


def export_model(build_dir: Path, out_dir: Path, info: dict | None = None, use_ema: bool = True) -> Path:
    """Write the diffusers folder ``out_dir`` from the latest checkpoint (atomically: temp folder, then swap).

    ``info`` (build times, machine, steps) is stored beside it as ``toy_build.json``.
    """
    out_dir = Path(out_dir)
    pipe, ckpt = assemble_pipeline(build_dir, use_ema)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp)
    meta = {"unet_steps": ckpt["step"], "unet_seconds": round(ckpt["seconds"], 1), "ema": use_ema}
    meta.update(info or {})
    write_json_atomic(meta, tmp / "toy_build.json")
    old = out_dir.with_name(out_dir.name + ".old")
    if out_dir.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old.exists():
        shutil.rmtree(old)
    return out_dir
