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
