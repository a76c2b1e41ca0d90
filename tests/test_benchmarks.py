"""Benchmark scripts keep running (they print figures; the figures themselves are not asserted)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_with_tiny_models_and_prints_its_table():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--steps", "1"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [l for l in out.stdout.splitlines() if l.startswith(("sd15", "sdxl"))]
    assert len(rows) == 10  # per family: batch 1 and 4 × savers on/off, plus one uncached
    assert "steps/s" in out.stdout and "peak GB" in out.stdout
    assert "lora_nb.train.train" in out.stdout  # the trainer itself, not a step written for the benchmark
    assert all(float(r.split()[-5]) > 0 for r in rows)  # every case timed its steps


@pytest.mark.slow
def test_cpu_benchmark_runs_the_reference_job_and_prints_its_table_and_attention_share():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpu_train.py"), "--jobs", "reference",
                          "--steps", "3", "--attention-share"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "end-to-end steps/s" in out.stdout and "peak RSS MB" in out.stdout
    row = next(l for l in out.stdout.splitlines() if l.startswith("lora-nb train"))
    assert float(row.split()[-1]) > 100  # a peak RSS in MB was measured
    share = next(l for l in out.stdout.splitlines() if "scaled_dot_product_attention" in l)
    assert 0 < int(share.split("of which ")[1].split("%")[0]) <= 100


@pytest.mark.slow
def test_startup_benchmark_times_the_first_training_step_of_the_cli():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "startup.py"), "--runs", "1"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(l for l in out.stdout.splitlines() if l.strip().startswith("this checkout") and "median" in l)
    assert 0.5 < float(line.split("median")[1].split()[0]) < 300
