"""Time the course: each executed notebook's papermill duration, and how much it printed to stderr.

    python benchmarks/course_time.py --run                     # run `lora-nb course` in a new workspace, then report
    python benchmarks/course_time.py --run --threads 2         # with two torch threads (`make course` uses one)
    python benchmarks/course_time.py --workspace runs/course   # report on an earlier course run

The course's targets: the sum of the durations at most 600 s on a 2-core CPU (06 at most 300 s), and no
executed notebook with more than 20 lines of stderr. The figures come from the notebooks' own papermill
metadata, so they are the time each notebook ran, without the process start-up. With --run it also prints the
peak resident memory of the largest process of the run (each notebook runs in its own kernel process, so this is
the notebook that needed most; Linux and macOS).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def notebook_figures(path: Path) -> dict:
    """Duration (s), stderr lines and displayed images of one executed notebook."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    stderr = images = 0
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            if out.get("name") == "stderr":
                stderr += "".join(out.get("text", "")).count("\n")
            if "image/png" in out.get("data", {}):
                images += 1
    return {"notebook": path.name, "seconds": nb["metadata"].get("papermill", {}).get("duration"),
            "stderr_lines": stderr, "images": images}


def peak_child_rss_mib() -> float:
    """The largest peak resident set of the finished child processes and their descendants, in MiB."""
    import resource

    kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20  # Linux reports KiB, macOS bytes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", default="", help="default with --run: a new runs/course-bench-<time>")
    p.add_argument("--run", action="store_true", help="run the course into a new workspace first")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each notebook with --run (OMP_NUM_THREADS; "
                   "`make course` uses 1)")
    args = p.parse_args(argv)
    if not args.workspace and not args.run:
        p.error("name the --workspace of an earlier course run, or --run a new one")
    ws = Path(args.workspace or f"runs/course-bench-{time.strftime('%Y%m%d-%H%M%S')}")
    ws = ws if ws.is_absolute() else ROOT / ws
    if args.run and ws.exists():
        p.error(f"{ws} exists: --run times a fresh course, in a new workspace")
    if args.run:
        start = time.time()
        cmd = [sys.executable, "-m", "lora_nb.cli", "course", "--workspace", str(ws)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        code = subprocess.call(cmd, cwd=ROOT, env=env)
        print(f"course: exit {code}, {time.time() - start:.0f} s whole process, {args.threads} torch thread(s) per notebook")
        print(f"peak memory: {peak_child_rss_mib():.0f} MiB resident, the largest process of the run (a notebook's kernel)")
    rows = [notebook_figures(p) for p in sorted((ws / "executed").glob("*.ipynb"))]
    if not rows:
        print(f"no executed notebooks in {ws / 'executed'}: run with --run first")
        return 1
    for r in rows:
        secs = f"{r['seconds']:7.1f} s" if r["seconds"] is not None else "      – "
        print(f"{r['notebook']:<28} {secs}   stderr {r['stderr_lines']:4d} lines   {r['images']:3d} images")
    total = sum(r["seconds"] or 0 for r in rows)
    print(f"{'total':<28} {total:7.1f} s   (target ≤ 600 s; notebook 06 ≤ 300 s; stderr ≤ 20 lines each)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
