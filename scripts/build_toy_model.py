"""Build the toy base model from scratch (resumable) and export it to data/toy-model.

    python scripts/build_toy_model.py                   # all stages; rerun to continue
    python scripts/build_toy_model.py --max-minutes 20  # stop UNet training after 20 min (resume later)
    python scripts/build_toy_model.py --export-only     # write data/toy-model from the latest checkpoint
    touch build/toy/STOP                                # ask a running build to save and stop

Stages: tokenizer → VAE (rich world, never the concept) → latents of the base
world → UNet + text encoder jointly → export (EMA weights, diffusers format).
Checkpoints live in build/toy/ (git-ignored); each stage continues where it
stopped. Uses 1 torch thread unless --threads says otherwise: on a busy
machine one thread was 5-10x faster than two (no waiting on a descheduled
sibling thread).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build-dir", default=str(ROOT / "build" / "toy"), help="checkpoint folder")
    p.add_argument("--out", default=str(ROOT / "data" / "toy-model"), help="exported diffusers folder")
    p.add_argument("--vae-steps", type=int, default=900)
    p.add_argument("--unet-steps", type=int, default=5000)
    p.add_argument("--max-minutes", type=float, default=None, help="stop UNet training after this long (resumable)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is much faster than 2 when other jobs share the cores)")
    p.add_argument("--export-only", action="store_true", help="only write --out from the latest checkpoint")
    p.add_argument("--no-export", action="store_true", help="train, but do not write --out")
    return p.parse_args(argv)


def bar_callback(bar, every: int = 10):
    def on_step(step, info):
        bar.n = step
        if step % every == 0:
            bar.set_postfix({k: (f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in info.items()})
            bar.refresh()
    return on_step


def record_timing(build_dir: Path, stage: str, seconds: float) -> dict:
    from lora_nb.toy.build import write_json_atomic

    path = build_dir / "timings.json"
    timings = json.loads(path.read_text()) if path.exists() else {}
    timings[stage] = round(timings.get(stage, 0.0) + seconds, 1)
    write_json_atomic(timings, path)
    return timings


def machine_info(threads: int) -> str:
    import os

    import torch

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {threads} torch threads, torch {torch.__version__}"


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from tqdm import tqdm

    from lora_nb.toy import build

    torch.set_num_threads(args.threads)
    build_dir = Path(args.build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    if (build_dir / "STOP").exists() and not args.export_only:
        (build_dir / "STOP").unlink()
        print(f"removed {build_dir / 'STOP'} left by an earlier stop request")

    if not args.export_only:
        t0 = time.time()
        if not (build_dir / "tokenizer" / "vocab.json").exists():
            tok = build.build_tokenizer(build_dir / "tokenizer")
            print(f"tokenizer: {len(tok)} tokens, max length {tok.model_max_length}")

        vae_ck = build.load_checkpoint(build_dir / "vae.pt")
        if not (vae_ck and vae_ck["step"] >= args.vae_steps):
            t0 = time.time()
            with tqdm(total=args.vae_steps, initial=vae_ck["step"] if vae_ck else 0, desc="VAE", mininterval=5) as bar:
                res = build.train_vae(build_dir, steps=args.vae_steps, crop_steps=int(args.vae_steps * 0.7),
                                      on_step=bar_callback(bar))
            dt = time.time() - t0
            record_timing(build_dir, "vae", dt)
            print(f"VAE: step {res['step']}/{args.vae_steps}, {dt:.0f} s this run ({res['seconds']:.0f} s in total)")
        del vae_ck

        if not (build_dir / "latents.pt").exists():
            t0 = time.time()
            with tqdm(total=13000, desc="latents", mininterval=5) as bar:
                data = build.cache_latents(build_dir, on_step=bar_callback(bar, every=1))
            dt = time.time() - t0
            record_timing(build_dir, "latents", dt)
            print(f"latents: {dt:.0f} s, scaling factor {data['scaling_factor']:.4f}")

        un_ck = build.load_checkpoint(build_dir / "unet.pt")
        start_step = un_ck["step"] if un_ck else 0
        del un_ck
        if start_step < args.unet_steps:
            t0 = time.time()
            with tqdm(total=args.unet_steps, initial=start_step, desc="UNet+text", mininterval=10) as bar:
                res = build.train_unet(build_dir, steps=args.unet_steps, max_minutes=args.max_minutes,
                                       on_step=bar_callback(bar))
            dt = time.time() - t0
            record_timing(build_dir, "unet", dt)
            print(f"UNet+text: step {res['step']}/{args.unet_steps}, {dt:.0f} s this run "
                  f"({res['seconds']:.0f} s in total, {dt / max(1, res['step'] - start_step):.2f} s/step)")

    if args.no_export:
        return 0
    t0 = time.time()
    timings_path = build_dir / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    out = build.export_model(build_dir, Path(args.out), info={"timings_s": timings, "machine": machine_info(args.threads)})
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    print(f"exported {out} ({size:.1f} MB) in {time.time() - t0:.1f} s; build timings (s): {timings}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
