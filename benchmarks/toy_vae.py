"""Can the toy VAE draw the toy world and the zorb? Judge accuracy on originals vs reconstructions, and PSNR.

    python benchmarks/toy_vae.py                      # the VAE of the shipped model (data/toy-model)
    python benchmarks/toy_vae.py --build build/toy    # the latest VAE checkpoint of a running build
    python benchmarks/toy_vae.py --grid vae.png       # also save originals over reconstructions
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", default=None, help="a build folder (uses its vae.pt) instead of the shipped model")
    p.add_argument("--n", type=int, default=200, help="images per set")
    p.add_argument("--grid", default=None, help="save a PNG grid of originals and reconstructions")
    args = p.parse_args(argv)

    import numpy as np
    import torch
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    dlog.set_verbosity_error()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()

    from lora_nb.toy import build, concept, judge, world

    torch.set_num_threads(1)
    if args.build:
        vae = build.load_trained_vae(Path(args.build))
        step = build.load_checkpoint(Path(args.build) / "vae.pt")["step"]
        print(f"VAE checkpoint {args.build}/vae.pt at step {step}")
    else:
        from lora_nb.models import load_base_model

        vae = load_base_model("toy").pipe.vae
        print("VAE of the shipped toy model")
    sets = {
        "plain": world.make_world(args.n, 501),
        "gradient": world.make_world(args.n // 2, 502, background_style="gradient"),
        "zorb": world.make_world(args.n, 503, zorb=True),
        "zorb dataset": concept.concept_images(20),
        "two objects": world.make_world(args.n // 2, 504, second_object_p=1.0),
    }
    print(f"{'set':<14}{'n':>5}  {'PSNR':>6}  {'shape':>12}  {'colour':>12}  {'backgr':>12}  {'zorb':>12}   (original → reconstruction)")
    grid = []
    for name, (images, scenes) in sets.items():
        rec = build.reconstruct(vae, images)
        mse = np.mean((images.astype(np.float32) - rec.astype(np.float32)) ** 2)
        psnr = 10 * np.log10(255 ** 2 / max(mse, 1e-9))
        a, b = judge.score_judge(images, scenes), judge.score_judge(rec, scenes)
        cells = "  ".join(f"{a[k]:5.2f}→{b[k]:5.2f}" for k in ("shape", "colour", "background", "zorb"))
        print(f"{name:<14}{len(images):>5}  {psnr:6.1f}  {cells}")
        grid.append(np.concatenate([np.concatenate(list(images[:10]), 1), np.concatenate(list(rec[:10]), 1)], 0))
    if args.grid:
        from PIL import Image

        g = np.concatenate(grid, 0)
        Image.fromarray(g).resize((g.shape[1] * 3, g.shape[0] * 3), Image.NEAREST).save(args.grid)
        print(f"grid: {args.grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
