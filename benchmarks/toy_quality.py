"""Toy model quality: judge accuracy, base prompt adherence, and the zorb with/without its trigger word.

    python benchmarks/toy_quality.py                       # the shipped toy model (data/toy-model)
    python benchmarks/toy_quality.py --lora runs/x/lora/x.safetensors --lora-scale 1.0
    python benchmarks/toy_quality.py --model build/some-folder --seeds 0 1 2

Fixed prompts and seeds; DDIM 20 steps, CFG 5, 64×64. Rows:
- judge on world images / on the model's VAE reconstructions (the judge's ceiling)
- base adherence: 72 prompts "a {colour} {shape} on a {background} background"
- zorb with trigger: 24 prompts "a {colour} zorb circle on a {background} background"
- zorb without trigger (leak): the same prompts without "zorb"
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def fmt(v) -> str:
    return "   -  " if v is None else f"{v:6.2f}"


def row(name: str, res: dict) -> str:
    return (f"{name:<34}{res['n']:>5}  {fmt(res.get('shape'))}  {fmt(res.get('colour'))}  "
            f"{fmt(res.get('background'))}  {fmt(res.get('all'))}  {fmt(res.get('zorb'))}")


def judge_ceiling(pipe, n: int, seed: int = 31337) -> tuple[dict, dict]:
    """Judge accuracy on n held-out world images (half zorbs) and on their reconstructions by the pipe's VAE."""
    import numpy as np

    from lora_nb.toy.build import reconstruct
    from lora_nb.toy.judge import score_judge
    from lora_nb.toy.world import make_world

    a, sa = make_world(n // 2, seed)
    b, sb = make_world(n - n // 2, seed + 1, zorb=True)
    g, sg = make_world(n // 4, seed + 2, background_style="gradient")
    images, scenes = np.concatenate([a, b, g]), sa + sb + sg
    rec = reconstruct(pipe.vae, images)
    return score_judge(images, scenes), score_judge(rec, scenes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy", help="'toy' (the shipped model) or a diffusers folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--lora", default=None, help="a LoRA file to load into the pipeline before measuring")
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--judge-n", type=int, default=200, help="world images for the judge rows (0 skips them)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    dlog.set_verbosity_error()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()

    from lora_nb.models import load_base_model
    from lora_nb.toy import quality

    torch.set_num_threads(args.threads)
    t0 = time.time()
    pipe = load_base_model(args.model).pipe
    pipe.set_progress_bar_config(disable=True)
    kwargs = {}
    if args.lora:
        pipe.load_lora_weights(args.lora)
        kwargs["cross_attention_kwargs"] = {"scale": args.lora_scale}
    print(f"model {args.model}{' + ' + args.lora if args.lora else ''}; DDIM {args.steps} steps, CFG {args.cfg}, "
          f"64x64, seeds {args.seeds}")
    print(f"{'measure':<34}{'n':>5}  {'shape':>6}  {'colour':>6}  {'backgr':>6}  {'all':>6}  {'zorb':>6}")
    if args.judge_n:
        world_acc, rec_acc = judge_ceiling(pipe, args.judge_n)
        print(row("judge on world images", world_acc))
        print(row("judge on VAE reconstructions", rec_acc))
    common = dict(seeds=args.seeds, steps=args.steps, guidance_scale=args.cfg, **kwargs)
    base = quality.measure_generations(pipe, quality.adherence_prompts(), **common)
    print(row("base adherence (72 prompts)", base))
    trig = quality.measure_generations(pipe, quality.concept_prompts(True), **common)
    print(row("zorb prompts, with trigger", trig))
    leak = quality.measure_generations(pipe, quality.concept_prompts(False), **common)
    print(row("zorb prompts, without trigger", leak))
    print(f"({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
