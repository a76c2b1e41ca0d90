"""The toy preset end to end: `lora-nb train` time on this machine, then what the LoRA learned (toy judge).

    python benchmarks/toy_lora.py                 # train the toy preset, measure base and LoRA
    python benchmarks/toy_lora.py --set training.epochs=8 --set dataset.reg_dir=data/toy-reg

Prints the training wall time (whole process, model load included) and, for the base model and the trained
LoRA: the zorb's presence with the trigger word (24 prompts "a {colour} zorb circle on a {background}
background"), whether the asked colour and background are obeyed, and the zorb's presence without the
trigger word (leakage: the same prompts without "zorb"). Targets: training < 5 min on 2 cores; with the
LoRA, zorb ≥ 70 % with the trigger, colour/background ≥ 60 %, leakage ≤ 10 %; before it, zorb ≤ 5 %.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(pipe, seeds: list[int], steps: int) -> dict:
    from lora_nb.toy import quality

    on = quality.measure_generations(pipe, quality.concept_prompts(True), seeds, steps=steps)
    off = quality.measure_generations(pipe, quality.concept_prompts(False), seeds, steps=steps)
    return {"zorb": on["zorb"], "colour": on["colour"], "background": on["background"], "leak": off["zorb"],
            "n": on["n"] + off["n"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a toy-preset setting")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()

    import torch

    from lora_nb.config import preset
    from lora_nb.lora_io import load_lora
    from lora_nb.models import load_base_model

    with tempfile.TemporaryDirectory(prefix="toy-lora-") as tmp:
        cfg = preset("toy").with_overrides({"save.output_dir": tmp, "sample.every_n_epochs": 0,
                                            "dataset.dir": str(ROOT / "data" / "toy-concept")})
        cfg = cfg.with_overrides(args.set)
        cfg.write_yaml(Path(tmp) / "toy.yaml")
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "lora_nb.cli", "train", str(Path(tmp) / "toy.yaml")],
                              capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        wall = time.perf_counter() - t
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        steps = sum(1 for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines() if '"loss"' in line)
        print(f"toy preset: {steps} steps, `lora-nb train` took {wall:.0f} s (whole process) "
              f"on {os.cpu_count()} CPU cores, torch {torch.__version__}")
        model = load_base_model("toy")
        model.pipe.set_progress_bar_config(disable=True)
        rows = {"base model": measure(model.pipe, args.seeds, args.steps)}
        load_lora(model.pipe, Path(tmp) / "lora" / "lora.safetensors")
        rows["with the LoRA"] = measure(model.pipe, args.seeds, args.steps)
    print(f"\n{'':<16}{'images':>7}{'zorb (trigger)':>16}{'colour':>8}{'background':>12}{'leak (no trigger)':>19}")
    for name, r in rows.items():
        print(f"{name:<16}{r['n']:>7}{r['zorb']:>16.0%}{r['colour']:>8.0%}{r['background']:>12.0%}{r['leak']:>19.0%}")
    print("\ntargets: before ≤ 5 % zorb; with the LoRA ≥ 70 % zorb, colour and background ≥ 60 %, leak ≤ 10 %")


if __name__ == "__main__":
    main()
