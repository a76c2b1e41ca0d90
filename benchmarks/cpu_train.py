"""CPU training benchmark: steps/s and peak memory of `lora-nb train`.

Jobs:
  reference  the tiny SD1.5 pipeline (UNet (32, 64), VAE (32, 64) → 32×32 latents), 20 images at 64×64,
             batch 2, rank 4, UNet-only attention LoRA, 100 steps, fp32 — the job the diffusers example
             `train_text_to_image_lora.py` is compared on (pass its path with --diffusers-script to run it
             side by side: it needs `datasets` and `torchvision` installed in the environment you point to
             with --diffusers-python).
  full       the full-size SD1.5 architecture with random weights (built here, saved as a diffusers folder; pass
             --model DIR to reuse one), 20 images at 256x256, batch 1, rank 16, sd-scripts' module set for lora-nb
             (the example trains its own set, the attention projections), 30 steps, bf16 autocast where the CPU
             computes bf16 natively (fp32 otherwise, printed) — a real model's job, where a trainer's choices
             (cached latents and text embeddings, frozen parts kept out of the step) decide speed and memory.
  toy        the `toy` preset on the bundled concept set (what notebook 05 trains).
  --table    how the step time grows with image count, resolution and rank (tiny SD1.5, in process).

Every job runs as its own process; peak memory is that process's maximum resident set size.
Side by side with the diffusers example (its script and an environment where it runs are not part of this
repository: a separate venv with diffusers 0.42.1, torchvision, datasets, and tensorboard for the example's
default logging, whose per-step wall times give its training-phase steps/s):
  python benchmarks/cpu_train.py --jobs reference --repeat 3 --threads 1 \
      --diffusers-script /path/to/train_text_to_image_lora.py --diffusers-python /path/to/venv/bin/python
Runs alternate (ours, theirs, then theirs, ours, ...) so drift in the machine's load hits both alike; the table
shows medians and the ratio line the per-pair ratios (ours/theirs end-to-end throughput and peak memory).

--precision bf16 runs the reference job in bf16 autocast in both trainers (worth it only on CPUs with AVX512-BF16
or AMX); --attention-share profiles the reference step and prints the share of it spent in attention kernels.

Usage: python benchmarks/cpu_train.py [--jobs reference full toy] [--table] [--threads N] [--repeat N]
                                      [--precision no|bf16] [--attention-share]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_dataset(folder: Path, n: int = 20, size: int = 64) -> Path:
    import numpy as np
    from PIL import Image

    sub = folder / "1_sks"
    sub.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        a = np.full((size, size, 3), rng.integers(0, 255, 3), np.uint8)
        x, y = rng.integers(0, size // 2, 2)
        a[y:y + size // 3, x:x + size // 3] = rng.integers(0, 255, 3)
        Image.fromarray(a).save(sub / f"{i:03d}.png")
        (sub / f"{i:03d}.txt").write_text("sks, a square", encoding="utf-8")
    return folder


def run_process(cmd: list[str], env: dict, log: Path | None = None) -> tuple[float, float, str]:
    """Wall seconds and peak RSS (MB) of one child process (its own peak, read with wait4)."""
    log = log or Path(tempfile.mkstemp(prefix="bench-", suffix=".log")[1])
    t = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        # RUSAGE_CHILDREN is the maximum over every child so far: the second job would inherit the first's peak
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text(encoding="utf-8", errors="replace")
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{text[-3000:]}")
    return wall, usage.ru_maxrss / 1024, text


def training_steps_per_second(metrics: Path) -> float:
    times = [json.loads(l)["time"] for l in metrics.read_text().splitlines() if '"loss"' in l]
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")


def tensorboard_steps_per_second(folder: Path) -> float:
    """Training steps/s of the diffusers example from its TensorBoard events (one event per step, wall time).

    Reads the TFRecord framing and the first two protobuf fields of each Event (wall_time: double, step:
    varint) directly, so this environment needs no tensorboard.
    """
    import struct

    times: dict[int, float] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i + 12 <= len(data):
            (n,) = struct.unpack_from("<Q", data, i)
            rec = data[i + 12:i + 12 + n]
            i += 12 + n + 4
            if len(rec) < 10 or rec[0] != 0x09 or rec[9] != 0x10:
                continue  # not an event with a step (the file-version header)
            (wall,) = struct.unpack_from("<d", rec, 1)
            step, shift, j = 0, 0, 10
            while True:
                b = rec[j]
                step |= (b & 0x7F) << shift
                shift, j = shift + 7, j + 1
                if not b & 0x80:
                    break
            times.setdefault(step, wall)
    if len(times) < 2:
        return float("nan")
    steps = sorted(times)
    return (len(steps) - 1) / (times[steps[-1]] - times[steps[0]])


# What each side-by-side job trains: image side, batch, rank and lora-nb's UNet module set (the example always
# trains the attention projections at --rank).
JOBS = {"reference": {"size": 64, "batch": 2, "rank": 4, "targets": "attention", "steps": 100},
        "full": {"size": 256, "batch": 1, "rank": 16, "targets": "kohya", "steps": 30}}
# lora-nb against the example, per job: (end-to-end throughput at least, peak memory at most), medians of the pairs
GOALS = {"reference": None,  # bound by the attention kernel both call (docs/performance.md): parity expected
         "full": (1.2, 0.7)}


def reference_config(model: Path, data: Path, out: Path, steps: int, precision: str = "no", spec: dict | None = None):
    from lora_nb.config import preset

    spec = spec or JOBS["reference"]
    return preset("toy").with_overrides({
        "model.source": str(model), "model.family": "sd15", "dataset.dir": str(data), "dataset.repeats": 1,
        "dataset.trigger_word": "", "dataset.resolution": f"{spec['size']}x{spec['size']}",
        "dataset.reg_dir": "", "dataset.prior_loss_weight": 1.0,  # the toy preset's class images are not in this job
        "dataset.validation_dir": "", "dataset.validation_split": 0,  # nor its validation loss: the example has none
        "dataset.shuffle_caption": False, "dataset.enable_wildcard": False,  # nor caption changes: one text a picture
        "training.batch_size": spec["batch"], "training.max_steps": steps, "training.epochs": 1000,
        "training.min_snr_gamma": 0.0, "training.min_timestep": 0, "network.rank": spec["rank"],
        "network.alpha": spec["rank"], "network.unet_targets": spec["targets"],
        "optimizer.optimizer": "AdamW", "optimizer.learning_rate": 1e-4, "optimizer.text_encoder_lr": 0.0,
        "optimizer.lr_scheduler": "constant", "optimizer.lr_warmup_steps": 0, "sample.every_n_epochs": 0,
        "save.every_n_epochs": 0, "save.output_dir": str(out), "save.save_state": False,
        "training.mixed_precision": precision})


def job_reference(tmp: Path, env: dict, steps: int, args) -> list[dict]:
    """Ours (and, with --diffusers-script, the diffusers example) on the reference job, --repeat times each."""
    from lora_nb.models import build_tiny_sd15

    return side_by_side(tmp, build_tiny_sd15(tmp / "tiny-sd15"), env, "reference", steps, args.precision, args)


def full_size_model(tmp: Path, given: str | None) -> Path:
    """The full-size SD1.5 architecture with random weights as a diffusers folder (fp16 on disk, 2.1 GB)."""
    import gc

    import torch

    from lora_nb.archs import random_full_size_pipeline

    if given:
        return Path(given)
    folder = tmp / "sd15-full"
    t = time.perf_counter()
    pipe = random_full_size_pipeline("sd15", tmp / "sd15-vocabulary", seed=0, dtype=torch.float16)
    pipe.save_pretrained(folder)
    del pipe
    gc.collect()
    print(f"  built the full-size SD1.5 folder in {time.perf_counter() - t:.0f} s: {folder}", flush=True)
    return folder


def job_full(tmp: Path, env: dict, args) -> list[dict]:
    """The full-size job: bf16 autocast where this CPU has native bf16, fp32 otherwise (said so)."""
    from lora_nb.config import cpu_has_native_bf16

    precision = "bf16" if cpu_has_native_bf16() else "no"
    print(f"  full job precision: {'bf16 autocast (native on this CPU)' if precision == 'bf16' else 'fp32 (this CPU has no native bf16)'}",
          flush=True)
    return side_by_side(tmp, full_size_model(tmp, args.model), env, "full", args.full_steps, precision, args)


def side_by_side(tmp: Path, model: Path, env: dict, job: str, steps: int, precision: str, args) -> list[dict]:
    """``--repeat`` runs of lora-nb (and of the example, with --diffusers-script) on one job, alternating."""
    spec = JOBS[job]
    data = make_dataset(tmp / f"data-{job}", 20, spec["size"])
    hf_data = diffusers_dataset(tmp / job, data) if args.diffusers_script else None
    rows = []
    for i in range(args.repeat):
        runs = [lambda i=i: run_ours_reference(tmp, model, data, env, steps, args, i, job, precision)]
        if args.diffusers_script:
            runs.append(lambda i=i: job_diffusers_example(tmp, model, hf_data, env, steps, args, i, job, precision))
        for run in (runs if i % 2 == 0 else runs[::-1]):  # alternate which goes first
            row = run()
            rows.append(row)
            print(f"  run {row['run']}: {row['job']:<34} {row['wall_s']:7.1f} s  {row['peak_rss_mb']:6.0f} MB",
                  flush=True)
    return rows


def run_ours_reference(tmp: Path, model: Path, data: Path, env: dict, steps: int, args, i: int,
                       job: str = "reference", precision: str = "no") -> dict:
    out = tmp / f"{job}-run-{i}"
    cfg = reference_config(model, data, out, steps, precision, JOBS[job])
    cfg.write_yaml(tmp / f"{job}-{i}.yaml")
    wall, rss, _ = run_process([args.ours_python or sys.executable, "-m", "lora_nb.cli", "train",
                                str(tmp / f"{job}-{i}.yaml")], env, tmp / f"{job}-{i}.log")
    return {"job": f"lora-nb train [{job}]", "kind": job, "trainer": "lora-nb", "run": i, "wall_s": wall,
            "peak_rss_mb": rss,
            "train_steps_per_s": training_steps_per_second(out / "metrics.jsonl"),
            "end_to_end_steps_per_s": steps / wall}


def diffusers_dataset(tmp: Path, data: Path) -> Path:
    """The same images and captions as an imagefolder with metadata.jsonl (the example's data layout)."""
    import shutil

    folder = tmp / "hf-data"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
        for img in sorted((data / "1_sks").glob("*.png")):
            shutil.copy2(img, folder / img.name)
            caption = img.with_suffix(".txt").read_text(encoding="utf-8").strip()
            f.write(json.dumps({"file_name": img.name, "text": caption}) + "\n")
    return folder


def job_diffusers_example(tmp: Path, model: Path, folder: Path, env: dict, steps: int, args, i: int,
                          job: str = "reference", precision: str = "no") -> dict:
    """The diffusers example on the same job: its defaults otherwise (TensorBoard logging, no validation)."""
    spec = JOBS[job]
    out = tmp / f"hf-{job}-run-{i}"
    # a fresh datasets cache per run: every run pays for building its Arrow cache, as a first run does
    cmd = [args.diffusers_python or sys.executable, args.diffusers_script,
           f"--pretrained_model_name_or_path={model}", f"--train_data_dir={folder}",
           f"--cache_dir={tmp / f'hf-cache-{job}-{i}'}", f"--resolution={spec['size']}",
           f"--train_batch_size={spec['batch']}", f"--max_train_steps={steps}", f"--rank={spec['rank']}",
           "--learning_rate=1e-4", "--lr_scheduler=constant", "--lr_warmup_steps=0", "--seed=42", f"--output_dir={out}",
           "--dataloader_num_workers=0", "--checkpointing_steps=1000000", f"--mixed_precision={precision}"]
    wall, rss, text = run_process(cmd, dict(env, HF_DATASETS_OFFLINE="1"), tmp / f"hf-{job}-{i}.log")
    if not (out / "pytorch_lora_weights.safetensors").is_file():
        raise SystemExit(f"the diffusers example wrote no LoRA file:\n{text[-3000:]}")
    return {"job": f"diffusers train_text_to_image_lora.py [{job}]", "kind": job, "trainer": "diffusers", "run": i,
            "wall_s": wall, "peak_rss_mb": rss,
            "train_steps_per_s": tensorboard_steps_per_second(out / "logs"), "end_to_end_steps_per_s": steps / wall}


def summarize(rows: list[dict]) -> list[dict]:
    """One row per job: medians over its runs."""
    out = []
    for job in dict.fromkeys(r["job"] for r in rows):
        mine = [r for r in rows if r["job"] == job]
        med = {k: statistics.median(r[k] for r in mine)
               for k in ("wall_s", "train_steps_per_s", "end_to_end_steps_per_s", "peak_rss_mb")}
        out.append(dict(med, job=job + (f" (median of {len(mine)})" if len(mine) > 1 else ""), runs=len(mine)))
    return out


def pair_ratios(rows: list[dict]) -> str | None:
    """Ours/theirs per repeat and job: end-to-end throughput (their wall / our wall), training-phase steps/s and
    peak memory (our RSS / theirs), with the job's goal."""
    lines = []
    for kind in dict.fromkeys(r.get("kind") for r in rows if r.get("trainer")):
        ours = {r["run"]: r for r in rows if r.get("kind") == kind and r["trainer"] == "lora-nb"}
        theirs = {r["run"]: r for r in rows if r.get("kind") == kind and r["trainer"] == "diffusers"}
        pairs = sorted(set(ours) & set(theirs))
        if not pairs:
            continue
        speed = [theirs[i]["wall_s"] / ours[i]["wall_s"] for i in pairs]
        train = [ours[i]["train_steps_per_s"] / theirs[i]["train_steps_per_s"] for i in pairs]
        mem = [ours[i]["peak_rss_mb"] / theirs[i]["peak_rss_mb"] for i in pairs]
        fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs)
        lines.append(f"[{kind}] ours/theirs per pair — end-to-end throughput: {fmt(speed)} (median "
                     f"{statistics.median(speed):.2f}×); training-phase steps/s: {fmt(train)} (median "
                     f"{statistics.median(train):.2f}×); peak RSS: {fmt(mem)} (median {statistics.median(mem):.2f}×)")
        goal = GOALS.get(kind)
        if goal:
            met = statistics.median(speed) >= goal[0] and statistics.median(mem) <= goal[1]
            lines.append(f"[{kind}] goal: throughput ≥ {goal[0]:.2f}× and peak RSS ≤ {goal[1]:.2f}× — "
                         f"{'met' if met else 'NOT met'} on the medians")
    return "\n".join(lines) or None


def job_toy(tmp: Path, env: dict, args) -> list[dict]:
    from lora_nb.config import preset
    from lora_nb.models import toy_model_dir

    if not (toy_model_dir() / "model_index.json").exists():
        return [{"job": "toy preset (no toy model shipped)", "wall_s": float("nan"), "peak_rss_mb": float("nan"),
                 "train_steps_per_s": float("nan"), "end_to_end_steps_per_s": float("nan")}]
    cfg = preset("toy").with_overrides({"save.output_dir": str(tmp / "toy-run"), "sample.every_n_epochs": 0,
                                        "dataset.dir": str(ROOT / "data" / "toy-concept")})
    cfg.write_yaml(tmp / "toy.yaml")
    wall, rss, _ = run_process([sys.executable, "-m", "lora_nb.cli", "train", str(tmp / "toy.yaml")], env,
                              tmp / "toy.log")
    steps = sum(1 for l in (tmp / "toy-run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in l)
    return [{"job": f"toy preset ({steps} steps)", "wall_s": wall, "peak_rss_mb": rss,
             "train_steps_per_s": training_steps_per_second(tmp / "toy-run" / "metrics.jsonl"),
             "end_to_end_steps_per_s": steps / wall}]


def scaling_table(tmp: Path, steps: int = 8) -> list[dict]:
    """Median step time on the tiny SD1.5 while one factor changes (in process)."""
    from lora_nb.models import build_tiny_sd15, load_base_model
    from lora_nb.train import train

    model_dir = build_tiny_sd15(tmp / "tiny-table")
    rows = []
    for label, n, size, rank in [("baseline", 20, 64, 4), ("images ×4", 80, 64, 4), ("resolution 128", 20, 128, 4),
                                 ("rank 16", 20, 64, 16), ("rank 64", 20, 64, 64)]:
        data = make_dataset(tmp / f"data-{n}-{size}", n, size)
        cfg = reference_config(model_dir, data, tmp / f"run-{label}", steps).with_overrides(
            {"network.rank": rank, "network.alpha": rank, "dataset.resolution": f"{size}x{size}"})
        stamps = []
        t = time.perf_counter()
        train(cfg, model=load_base_model(model_dir), on_event=lambda e: stamps.append(time.perf_counter())
              if e.kind == "step" else None, progress=False, resume=False)
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        rows.append({"case": label, "images": n, "resolution": size, "rank": rank,
                     "step_ms": 1000 * statistics.median(gaps), "total_s": time.perf_counter() - t})
    return rows


def attention_share(tmp: Path, steps: int = 3) -> tuple[float, float]:
    """(share of the step's CPU time spent in SDPA kernels, ms per step) for the reference job's step."""
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from lora_nb.lora_io import add_lora
    from lora_nb.models import build_tiny_sd15, load_base_model

    folder = tmp / "tiny-share"
    if not (folder / "model_index.json").exists():
        build_tiny_sd15(folder)
    model = load_base_model(folder)
    unet = model.pipe.unet.requires_grad_(False)
    add_lora(model, 4, 4, unet_targets="attention", train_text_encoder=False)
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], 1e-4)
    gen = torch.Generator().manual_seed(0)
    x, emb = torch.randn(2, 4, 32, 32, generator=gen), torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)

    def step():
        t = torch.randint(0, 1000, (2,), generator=gen)
        F.mse_loss(unet(x, t, emb).sample, x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    ms = (time.perf_counter() - t0) / steps * 1000
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    attention = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key)
    return attention / total, ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", nargs="*", default=["reference", "toy"], choices=["reference", "full", "toy"])
    p.add_argument("--model", help="full job: a full-size SD1.5 diffusers folder to reuse (default: build one)")
    p.add_argument("--full-steps", type=int, default=JOBS["full"]["steps"], help="training steps of the full job")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--table", action="store_true")
    p.add_argument("--precision", default="no", choices=["no", "bf16"],
                   help="reference job precision for both trainers (bf16: CPU autocast; fast only with AVX512-BF16/AMX)")
    p.add_argument("--attention-share", action="store_true",
                   help="profile the reference job's training step: the share of its time in attention kernels")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each job (default: torch's)")
    p.add_argument("--diffusers-script", help="path to diffusers' examples/text_to_image/train_text_to_image_lora.py")
    p.add_argument("--diffusers-python", help="python of an environment where that script runs")
    p.add_argument("--ours-python", help="python that runs `lora_nb.cli train` (default: this one); e.g. the "
                   "example's environment with this checkout on PYTHONPATH, to rule out a torch-build difference")
    p.add_argument("--repeat", type=int, default=1, help="runs of each reference job (medians are shown)")
    args = p.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    if args.ours_python:
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [x for x in [env.get("PYTHONPATH")] if x])
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, threads per job: {args.threads or torch.get_num_threads()}"
          f", {args.repeat} run(s) of each reference job", flush=True)
    with tempfile.TemporaryDirectory(prefix="lora-nb-bench-") as tmp:
        tmp = Path(tmp)
        rows = []
        if "reference" in args.jobs:
            rows += job_reference(tmp, env, args.steps, args)
        if "full" in args.jobs:
            rows += job_full(tmp, env, args)
        if "toy" in args.jobs:
            rows += job_toy(tmp, env, args)
        print(f"\n{'job':<52} {'wall s':>8} {'train steps/s':>14} {'end-to-end steps/s':>19} {'peak RSS MB':>12}")
        for r in summarize(rows):
            print(f"{r['job']:<52} {r['wall_s']:>8.1f} {r['train_steps_per_s']:>14.2f} "
                  f"{r['end_to_end_steps_per_s']:>19.2f} {r['peak_rss_mb']:>12.0f}")
        ratio = pair_ratios(rows)
        if ratio:
            print(ratio)
        if args.attention_share:
            share, ms = attention_share(tmp)
            print(f"\nreference step (tiny SD1.5, batch 2, 64 px, fp32): {ms:.0f} ms, of which "
                  f"{100 * share:.0f}% in scaled_dot_product_attention (forward + backward): the same PyTorch kernel "
                  "in any trainer of this model, so it bounds how much faster a trainer can make this job")
        if args.table:
            torch.set_num_threads(args.threads or torch.get_num_threads())
            print(f"\n{'case':<16} {'images':>7} {'px':>5} {'rank':>5} {'ms/step':>8}")
            for r in scaling_table(tmp):
                print(f"{r['case']:<16} {r['images']:>7} {r['resolution']:>5} {r['rank']:>5} {r['step_ms']:>8.0f}")


if __name__ == "__main__":
    main()
