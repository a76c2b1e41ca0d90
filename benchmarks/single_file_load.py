"""A full-size single-file checkpoint loads offline, weight for weight, and how long that takes.

    python benchmarks/single_file_load.py                 # SD1.5 (~2.1 GB fp16 file)
    python benchmarks/single_file_load.py --family sdxl   # SDXL base (~6.9 GB fp16 file, ~20 GB RAM)

Writes a random-weight checkpoint of the published full-size architecture in the original single-file
layout (fp16), with a placeholder 49,408-token CLIP vocabulary in ``tokenizer/`` beside it (CLIP's own
vocabulary is not shipped: any file with that many tokens fits the text encoders' shapes), then loads it
through ``lora_nb.models.load_base_model`` with ``HF_HUB_OFFLINE=1`` and any hub lookup turned into an
error, and checks that every tensor of the file comes back unchanged. Prints each phase's time and the
peak memory. Too slow for the test suite on a 2-core machine (its tiny twin is tests/test_single_file.py).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=("sd15", "sdxl"), default="sd15")
    p.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def refuse_the_hub() -> None:
    import diffusers.loaders.single_file as single_file

    from lora_nb import checkpoints

    def refuse(*args, **kwargs):
        raise RuntimeError(f"the hub was asked for {args}")

    single_file._download_diffusers_model_config_from_hub = refuse
    checkpoints._hub_tokenizer_files = refuse


def compare_with_file(path: Path, loaded_pipe, family: str) -> tuple[int, list[str], list[str]]:
    """(tensors equal, tensors that differ, names missing on either side) between the file and the
    loaded pipeline written back in the single-file layout."""
    import torch
    from safetensors import safe_open

    from lora_nb.checkpoints import single_file_state_dict

    back = single_file_state_dict(loaded_pipe, family)
    equal, different = 0, []
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for k in sorted(keys & back.keys()):
            if torch.equal(f.get_tensor(k), back[k]):
                equal += 1
            else:
                different.append(k)
    return equal, different, sorted(keys ^ back.keys())


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from lora_nb.archs import random_full_size_parts, write_placeholder_vocabulary
    from lora_nb.checkpoints import write_single_file
    from lora_nb.models import load_base_model

    refuse_the_hub()
    folder = Path(args.dir or tempfile.mkdtemp(prefix="lora-nb-single-file-"))
    path = folder / f"random-{args.family}.safetensors"
    t0 = time.perf_counter()
    pipe = random_full_size_parts(args.family, args.seed)
    t1 = time.perf_counter()
    write_single_file(pipe, args.family, path)
    write_placeholder_vocabulary(folder / "tokenizer")
    del pipe
    t2 = time.perf_counter()
    loaded = load_base_model(path, dtype=torch.float16)
    t3 = time.perf_counter()
    equal, different, unmatched = compare_with_file(path, loaded.pipe, args.family)
    t4 = time.perf_counter()
    params = sum(p.numel() for part in [loaded.pipe.unet, loaded.pipe.vae] + loaded.text_encoders
                 for p in part.parameters())
    print(f"family {args.family}: {params / 1e6:.1f} M parameters, file {path.stat().st_size / 1e9:.2f} GB ({path})")
    print(f"random weights {t1 - t0:.1f} s | write {t2 - t1:.1f} s | load offline {t3 - t2:.1f} s | "
          f"compare {t4 - t3:.1f} s | peak RSS {peak_rss_gb():.1f} GB")
    print(f"scheduler {type(loaded.pipe.scheduler).__name__} ({loaded.pipe.scheduler.config.prediction_type}), "
          f"tokenizers {[len(t) for t in loaded.tokenizers]}")
    print(f"tensors equal: {equal}, different: {len(different)} {different[:3]}, unmatched: {len(unmatched)} "
          f"{unmatched[:3]}")
    if not args.dir:
        shutil.rmtree(folder)
    return 0 if not different and not unmatched and equal > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
