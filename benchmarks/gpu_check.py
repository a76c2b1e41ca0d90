"""GPU check: LoRA training speed and memory on full-size SD1.5 (512 px) and SDXL (1024 px).

The architectures are built locally from their configurations with random
weights (no download: timing and memory do not depend on the weights' values).
For each case it times real LoRA training steps (kohya module set, rank 32,
text encoder frozen) and prints one table: steps/s, images/s, peak GPU memory
(torch.cuda.max_memory_allocated, of the training steps; with caching on, the VAE and
text encoders are off the GPU as in the trainer) and model FLOP utilisation against the
card's dense bf16 peak.

Cases: SD1.5 512 px and SDXL 1024 px × batch 1 and 4 × fp16 and bf16, plain or
with the memory savers (gradient checkpointing, 8-bit AdamW), and with cached
latents/text embeddings (the default) or encoding every step (VAE + text encoders
in the step).

  python benchmarks/gpu_check.py              # on a CUDA GPU (about 5–8 minutes on an H100)
  python benchmarks/gpu_check.py --tiny       # the same code on the CPU with tiny models (seconds)
"""

from __future__ import annotations

import argparse
import time

import torch

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "T4": 65.0, "A10": 125.0}


def card_peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def build(family: str, tiny: bool, device, dtype):
    if tiny:
        import tempfile

        from lora_nb.models import build_tiny_sd15, build_tiny_sdxl, load_base_model

        folder = tempfile.mkdtemp(prefix="gpu-check-")
        (build_tiny_sd15 if family == "sd15" else build_tiny_sdxl)(folder)
        model = load_base_model(folder)
        for m in [model.pipe.unet, model.pipe.vae] + model.text_encoders:
            m.to(device)
            if dtype != torch.float32:
                m.to(dtype=dtype)
        return model
    from lora_nb.archs import build_architecture

    return build_architecture(family, device, dtype, with_vae=True)


def run_case(family: str, px: int, batch: int, precision: str, savers: bool, cached: bool, tiny: bool,
             steps: int, warmup: int) -> dict:
    from lora_nb.lora_io import add_lora
    from lora_nb.optim import build_optimizer

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision] if cuda else torch.float32
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build(family, tiny, device, dtype)
    unet = model.pipe.unet
    for m in [unet, model.pipe.vae] + model.text_encoders:
        m.requires_grad_(False)
    add_lora(model, 32 if not tiny else 4, 16 if not tiny else 4, "kohya", train_text_encoder=False)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if savers:
        unet.enable_gradient_checkpointing()
    if cached and cuda:  # as the trainer does: with latents and embeddings cached, VAE and text encoders leave the GPU
        for m in [model.pipe.vae] + model.text_encoders:
            m.to("cpu")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    opt = build_optimizer("AdamW8bit" if savers else "AdamW", [{"params": params, "lr": 1e-4}])
    scaler = torch.amp.GradScaler("cuda") if (cuda and precision == "fp16") else None
    vae_scale = 2 ** (len(model.pipe.vae.config.block_out_channels) - 1)
    lat = px // vae_scale
    cross = unet.config.cross_attention_dim
    tokens = 77 if not tiny else model.pipe.tokenizer.model_max_length
    sdxl = family == "sdxl"
    vae_dtype = torch.float32 if sdxl else dtype  # SDXL's VAE overflows in fp16

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=cuda):
            if cached:
                latents = torch.randn(batch, 4, lat, lat, device=device, dtype=dtype)
                embeds = torch.randn(batch, tokens, cross, device=device, dtype=dtype)
                pooled = torch.randn(batch, 1280 if not tiny else 32, device=device, dtype=dtype) if sdxl else None
            else:
                with torch.no_grad():
                    pixels = torch.randn(batch, 3, px, px, device=device, dtype=vae_dtype)
                    latents = model.pipe.vae.to(vae_dtype).encode(pixels).latent_dist.sample().to(dtype)
                    ids = torch.randint(0, model.text_encoders[0].config.vocab_size, (batch, tokens), device=device)
                    outs = [te(ids, output_hidden_states=True) for te in model.text_encoders]
                    embeds = torch.cat([o.hidden_states[-2] for o in outs], -1) if sdxl else outs[0][0]
                    pooled = outs[-1][0] if sdxl else None
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (batch,), device=device)
            kwargs = {}
            if sdxl:
                kwargs["added_cond_kwargs"] = {"text_embeds": pooled,
                                               "time_ids": torch.tensor([[px, px, 0, 0, px, px]] * batch,
                                                                        device=device, dtype=dtype)}
            pred = unet(latents + noise, t, embeds, **kwargs).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)

    flops = None
    try:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
    except Exception:  # noqa: BLE001 - FLOP counting is optional
        step()
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    peak = card_peak_tflops()
    row = {"model": f"{family} {px}px", "batch": batch, "precision": precision if cuda else "fp32 (cpu)",
           "savers": savers, "cached": cached, "steps_s": 1 / dt, "images_s": batch / dt,
           "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
           "mfu": (flops / dt / 1e12 / peak) if (flops and peak) else None}
    if cuda:
        torch.cuda.empty_cache()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny models (runs anywhere, CPU included)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--only", choices=["sd15", "sdxl"], default=None)
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    tiny = args.tiny or not cuda
    steps = args.steps or (2 if tiny else 10)
    warmup = 1 if tiny else 3
    print(f"device: {torch.cuda.get_device_name(0) if cuda else 'CPU'} · torch {torch.__version__} · "
          f"{'tiny models' if tiny else 'full-size architectures, random weights'}")
    cases = []
    for family, px in (("sd15", 512), ("sdxl", 1024)):
        if args.only and family != args.only:
            continue
        px = 64 if tiny else px
        for precision in ("fp16", "bf16") if cuda else ("fp32",):
            for batch in (1, 4):
                cases.append((family, px, batch, precision, True, True))
                cases.append((family, px, batch, precision, False, True))
            cases.append((family, px, 1, precision, True, False))
    rows = []
    for c in cases:
        try:
            rows.append(run_case(*c, tiny=tiny, steps=steps, warmup=warmup))
        except torch.cuda.OutOfMemoryError:
            rows.append({"model": f"{c[0]} {c[1]}px", "batch": c[2], "precision": c[3], "savers": c[4],
                         "cached": c[5], "steps_s": float("nan"), "images_s": float("nan"), "peak_gb": "OOM", "mfu": None})
    print(f"\n{'model':<13} {'batch':>5} {'precision':<11} {'savers':<7} {'cached':<7} {'steps/s':>8} {'images/s':>9} "
          f"{'peak GB':>8} {'MFU':>6}")
    for r in rows:
        peak = r["peak_gb"] if isinstance(r["peak_gb"], str) else (f"{r['peak_gb']:.2f}" if r["peak_gb"] is not None else "—")
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "—"
        print(f"{r['model']:<13} {r['batch']:>5} {r['precision']:<11} {str(r['savers']):<7} {str(r['cached']):<7} "
              f"{r['steps_s']:>8.2f} {r['images_s']:>9.2f} {peak:>8} {mfu:>6}")
    print("\nsavers = gradient checkpointing + 8-bit AdamW; cached = latents and text embeddings precomputed.")
    print("Targets: SD1.5 512px batch 1 with savers ≤ 6 GB; SDXL 1024px batch 1 with savers ≤ 12 GB.")


if __name__ == "__main__":
    main()
