"""Regenerate the bundled toy datasets: the zorb concept set and its regularization set.

    python scripts/make_toy_data.py            # writes data/toy-concept/10_zorb, data/toy-reg/1_circle, data/toy-val/1_zorb

Deterministic: the same seeds give byte-identical PNGs and captions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    from lora_nb.toy import concept

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT / "data"), help="folder that receives toy-concept/, toy-reg/ and toy-val/")
    p.add_argument("--n", type=int, default=48, help="images per set (concept and regularization)")
    p.add_argument("--caption-style", default="natural", choices=("natural", "tags"))
    args = p.parse_args(argv)
    data = Path(args.data)
    sub = concept.make_concept_dataset(data / "toy-concept", n=args.n, caption_style=args.caption_style)
    reg = concept.make_regularization_dataset(data / "toy-reg", n=args.n, caption_style=args.caption_style)
    val = concept.make_validation_dataset(data / "toy-val", caption_style=args.caption_style)
    for folder in (sub, reg, val):
        first = sorted(folder.glob("*.txt"))[0]
        print(f"{folder}: {len(list(folder.glob('*.png')))} images, e.g. {first.name}: {first.read_text().strip()!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
