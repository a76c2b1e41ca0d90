"""GPU check: the course's trainer (``lora_nb.train.train``) on full-size SD1.5 (512 px) and SDXL (1024 px).

The pipelines are built locally from the shipped configurations with random weights (no download: timing and
memory do not depend on the weights' values) and saved as diffusers folders; a folder of generated pictures
is the dataset. Each case is one real training run of ``train`` (kohya module set, rank 32, text encoder
frozen, no previews or saves until the end) with its settings, and the table shows, for the training steps
after a warm-up: steps/s, images/s, peak GPU memory (``torch.cuda.max_memory_allocated`` and
``memory_reserved`` since the first timed step, so the one-off caching of latents is not counted) and model
FLOP utilisation against the card's dense bf16 peak (FLOPs of one training step counted with
``torch.utils.flop_counter``).

Cases: SD1.5 512 px and SDXL 1024 px × batch 1 and 4 × fp16 and bf16, plain or with the memory savers
(gradient checkpointing, 8-bit AdamW), and with cached latents/text embeddings (the trainer's default: the VAE
and text encoders then leave the GPU) or encoding every step (``dataset.cache_latents`` off).

  python benchmarks/gpu_check.py              # on a CUDA GPU
  python benchmarks/gpu_check.py --tiny       # the same code on the CPU with tiny models (seconds; in the tests)
  python benchmarks/gpu_check.py --only sd15 --diffusers-script …/train_text_to_image_lora.py
      # also runs the diffusers example on the SD1.5 512 px batch-4 case, for the throughput ratio
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cpu_train import make_dataset  # noqa: E402 - the benchmarks folder is put on the path just above

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "T4": 65.0, "A10": 125.0}


def card_peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def build_model_folder(family: str, tiny: bool, folder: Path) -> Path:
    """A diffusers folder of the family: tiny (the test models) or full-size with random weights (fp16)."""
    if (folder / "model_index.json").exists():
        return folder
    if tiny:
        from lora_nb.models import build_tiny_sd15, build_tiny_sdxl

        return (build_tiny_sd15 if family == "sd15" else build_tiny_sdxl)(folder)
    from lora_nb.archs import random_full_size_pipeline

    pipe = random_full_size_pipeline(family, folder.parent / f"{family}-vocabulary")
    pipe.save_pretrained(folder)
    return folder


def case_config(model: Path, data: Path, out: Path, px: int, batch: int, precision: str, savers: bool,
                cached: bool, steps: int, tiny: bool):
    from lora_nb.config import preset

    cuda = torch.cuda.is_available()
    return preset("toy").with_overrides({
        "model.source": str(model), "dataset.dir": str(data), "dataset.resolution": f"{px}x{px}",
        "dataset.repeats": 100, "dataset.trigger_word": "", "dataset.reg_dir": "", "dataset.validation_dir": "",
        "dataset.validation_split": 0, "dataset.cache_latents": cached,
        "dataset.cache_text_embeddings": "yes" if cached else "no",
        "training.batch_size": batch, "training.max_steps": steps, "training.epochs": 1000,
        "training.mixed_precision": precision if cuda else "no", "training.gradient_checkpointing": savers,
        "network.rank": 4 if tiny else 32, "network.alpha": 4 if tiny else 16, "network.unet_targets": "kohya",
        "optimizer.optimizer": "AdamW8bit" if savers else "AdamW", "optimizer.learning_rate": 1e-4,
        "optimizer.text_encoder_lr": 0.0, "optimizer.lr_scheduler": "constant", "optimizer.lr_warmup_steps": 0,
        "sample.every_n_epochs": 0, "save.every_n_epochs": 0, "save.save_state": False, "save.output_dir": str(out)})


class StepWatch:
    """An event callable for ``train``: the time of every step; at the end of step ``warmup`` it resets the peak
    memory and starts counting FLOPs, which it stops at the end of the next step (that one step is not timed)."""

    def __init__(self, warmup: int):
        self.warmup, self.stamps, self.flops, self.counter = warmup, [], None, None

    def __call__(self, event) -> None:
        if event.kind != "step":
            return
        if self.counter is not None:  # the counted step has ended
            self.counter.__exit__(None, None, None)
            self.flops, self.counter = self.counter.get_total_flops(), None
            self.stamps = []  # timing starts after the counted step
        self.stamps.append(time.perf_counter())
        if event.step == self.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            from torch.utils.flop_counter import FlopCounterMode

            self.counter = FlopCounterMode(display=False)
            self.counter.__enter__()


def run_case(family: str, px: int, batch: int, precision: str, savers: bool, cached: bool, tiny: bool,
             steps: int, warmup: int, tmp: Path) -> dict:
    from lora_nb.train import train

    model = build_model_folder(family, tiny, tmp / f"{family}-{'tiny' if tiny else 'full'}")
    data = make_dataset(tmp / f"pictures-{px}", n=8, size=px)  # coloured squares with captions, as cpu_train's
    out = tmp / f"run-{family}-{px}-{batch}-{precision}-{savers}-{cached}"
    cfg = case_config(model, data, out, px, batch, precision, savers, cached, warmup + 1 + steps, tiny)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    watch = StepWatch(warmup)
    train(cfg, on_event=watch, progress=False, resume=False)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    dt = statistics.median(b - a for a, b in zip(watch.stamps, watch.stamps[1:]))
    peak = card_peak_tflops()
    return {"model": f"{family} {px}px", "batch": batch, "precision": precision if cuda else "fp32 (cpu)",
            "savers": savers, "cached": cached, "steps_s": 1 / dt, "images_s": batch / dt,
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "reserved_gb": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
            "mfu": (watch.flops / dt / 1e12 / peak) if (watch.flops and peak) else None}


def diffusers_example_row(script: str, python: str, model: Path, data: Path, tmp: Path, steps: int) -> dict:
    """The diffusers example on SD1.5 512 px batch 4 (fp16, its defaults otherwise): training steps/s."""
    import os

    from cpu_train import diffusers_dataset, run_process, tensorboard_steps_per_second  # noqa: PLC0415

    folder = diffusers_dataset(tmp, data)
    out = tmp / "hf-run"
    cmd = [python, script, f"--pretrained_model_name_or_path={model}", f"--train_data_dir={folder}",
           f"--cache_dir={tmp / 'hf-cache'}", "--resolution=512", "--train_batch_size=4",
           f"--max_train_steps={steps}", "--rank=32", "--learning_rate=1e-4", "--lr_scheduler=constant",
           "--lr_warmup_steps=0", "--seed=42", f"--output_dir={out}", "--dataloader_num_workers=0",
           "--checkpointing_steps=1000000", "--mixed_precision=fp16"]
    wall, _, _ = run_process(cmd, dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"), tmp / "hf.log")
    rate = tensorboard_steps_per_second(out / "logs")
    return {"model": "sd15 512px", "batch": 4, "precision": "fp16 (diffusers example)", "savers": False,
            "cached": False, "steps_s": rate, "images_s": 4 * rate, "peak_gb": None, "reserved_gb": None, "mfu": None}


def cases_for(tiny: bool, cuda: bool, only: str | None) -> list[tuple]:
    cases = []
    for family, px in (("sd15", 512), ("sdxl", 1024)):
        if only and family != only:
            continue
        px = 64 if tiny else px
        for precision in ("fp16", "bf16") if cuda else ("fp32",):
            for batch in (1, 4):
                cases.append((family, px, batch, precision, True, True))
                cases.append((family, px, batch, precision, False, True))
            cases.append((family, px, 1, precision, True, False))
    return cases


def print_table(rows: list[dict]) -> None:
    print(f"\n{'model':<13} {'batch':>5} {'precision':<24} {'savers':<7} {'cached':<7} {'steps/s':>8} "
          f"{'images/s':>9} {'peak GB':>8} {'reserved':>8} {'MFU':>6}")
    for r in rows:
        gb = lambda v: v if isinstance(v, str) else (f"{v:.2f}" if v is not None else "—")
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "—"
        print(f"{r['model']:<13} {r['batch']:>5} {r['precision']:<24} {str(r['savers']):<7} {str(r['cached']):<7} "
              f"{r['steps_s']:>8.2f} {r['images_s']:>9.2f} {gb(r['peak_gb']):>8} {gb(r['reserved_gb']):>8} {mfu:>6}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny models (runs anywhere, CPU included)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per case (after the warm-up)")
    p.add_argument("--only", choices=["sd15", "sdxl"], default=None)
    p.add_argument("--dir", default=None, help="where to build the models and runs (default: a temporary folder)")
    p.add_argument("--diffusers-script", help="diffusers' examples/text_to_image/train_text_to_image_lora.py")
    p.add_argument("--diffusers-python", default=sys.executable, help="a python where that script runs")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    tiny = args.tiny or not cuda
    steps = args.steps or (2 if tiny else 10)
    warmup = 1 if tiny else 3
    print(f"device: {torch.cuda.get_device_name(0) if cuda else 'CPU'} · torch {torch.__version__} · "
          f"{'tiny models' if tiny else 'full-size architectures, random weights'} · lora_nb.train.train", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        tmp = Path(args.dir or scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        rows = []
        for c in cases_for(tiny, cuda, args.only):
            try:
                rows.append(run_case(*c, tiny=tiny, steps=steps, warmup=warmup, tmp=tmp))
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows.append({"model": f"{c[0]} {c[1]}px", "batch": c[2], "precision": c[3], "savers": c[4],
                             "cached": c[5], "steps_s": float("nan"), "images_s": float("nan"), "peak_gb": "OOM",
                             "reserved_gb": "OOM", "mfu": None})
            except Exception as exc:  # noqa: BLE001 - a trainer error (e.g. a stop with advice) is a row, not the end
                rows.append({"model": f"{c[0]} {c[1]}px", "batch": c[2], "precision": c[3], "savers": c[4],
                             "cached": c[5], "steps_s": float("nan"), "images_s": float("nan"),
                             "peak_gb": type(exc).__name__, "reserved_gb": "", "mfu": None})
            print(f"  done: {rows[-1]['model']} batch {rows[-1]['batch']} {rows[-1]['precision']} "
                  f"savers={rows[-1]['savers']} cached={rows[-1]['cached']}", flush=True)
        if args.diffusers_script and not tiny and args.only != "sdxl":
            rows.append(diffusers_example_row(args.diffusers_script, args.diffusers_python, tmp / "sd15-full",
                                              tmp / "pictures-512", tmp, warmup + steps + 1))
        print_table(rows)
    print("\nsavers = gradient checkpointing + 8-bit AdamW; cached = latents and text embeddings computed once "
          "(the VAE and text encoders off the GPU while training).")
    print("Targets: SD1.5 512px batch 1 with savers ≤ 6 GB; SDXL 1024px batch 1 with savers ≤ 12 GB; "
          "SD1.5 512px batch 4 ≥ 1.2× the diffusers example's steps/s.")


if __name__ == "__main__":
    main()
