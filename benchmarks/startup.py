"""Start-up: the time from starting ``lora-nb train`` to the end of its first training step.

    python benchmarks/startup.py                   # the toy preset, 5 runs
    python benchmarks/startup.py --vs HEAD~3       # side by side with another commit (alternating runs)

Each run is a fresh process, ``python -m lora_nb.cli train <toy preset config>``, timed from the moment it is
started (before the interpreter loads) to the end of the first training step, when a hook stops it. That
covers the interpreter, the imports, reading the dataset, loading the toy model, caching latents and
caption embeddings, and one step. ``--vs REV`` checks REV out into a temporary git worktree and runs both
commits in turn (A, B, B, A, …), so the machine's load drifts over both alike; the medians and the per-pair
ratios are printed. ``--profile`` prints the 25 functions with the most cumulative time in one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run in the child: stop at the end of the first step and print the seconds since the parent started it.
CHILD = """
import os, sys, time
import lora_nb.train as t
def stop(step):
    if step == 1:
        print(f"first-step-done {time.time() - float(os.environ['STARTUP_T0']):.3f}", flush=True)
        os._exit(0)
t.before_step = stop
from lora_nb import cli
sys.exit(cli.main(["train", sys.argv[1]]))
"""


def write_config(folder: Path, code: Path) -> Path:
    """The toy preset (previews off) as ``code`` writes it, training into ``folder``."""
    script = ("from lora_nb.config import preset; c = preset('toy'); "  # its data folders: relative to ``code``
              f"c.save.output_dir = {str(folder / 'ws')!r}; c.sample.every_n_epochs = 0; "
              f"c.write_yaml({str(folder / 'c.yaml')!r})")
    subprocess.run([sys.executable, "-c", script], check=True, env=env_for(code), cwd=code)
    return folder / "c.yaml"


def env_for(code: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(code), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                HF_HUB_OFFLINE="1", TQDM_DISABLE="1")


def time_once(code: Path, config: Path) -> float:
    env = dict(env_for(code), STARTUP_T0=repr(time.time()))
    out = subprocess.run([sys.executable, "-c", CHILD, str(config)], env=env, capture_output=True, text=True,
                         cwd=code, timeout=600)
    line = next((l for l in out.stdout.splitlines() if l.startswith("first-step-done")), None)
    if line is None:
        raise SystemExit(f"no first step in {code}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return float(line.split()[1])


def profile_once(code: Path, config: Path) -> None:
    import cProfile
    import pstats

    sys.path.insert(0, str(code))
    import lora_nb.train as t

    def stop(step):
        if step == 1:
            raise KeyboardInterrupt

    t.before_step = stop
    from lora_nb import cli

    prof = cProfile.Profile()
    prof.enable()
    try:
        cli.main(["train", str(config)])
    except (KeyboardInterrupt, SystemExit):
        pass
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="runs of each commit")
    p.add_argument("--vs", help="another commit to compare with (a git revision)")
    p.add_argument("--profile", action="store_true", help="profile one run of this checkout instead")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="lora-nb-startup-") as tmp:
        tmp = Path(tmp)
        codes = {"this checkout": ROOT}
        if args.vs:
            other = tmp / "other"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(other), args.vs], check=True,
                           capture_output=True)
            codes[f"{args.vs}"] = other
        try:
            configs = {}
            for name, code in codes.items():
                (tmp / f"cfg-{len(configs)}").mkdir()
                configs[name] = write_config(tmp / f"cfg-{len(configs)}", code)
            if args.profile:
                profile_once(ROOT, configs["this checkout"])
                return
            for code in codes.values():  # one warm-up each (file cache, .pyc files)
                time_once(code, configs[next(n for n, c in codes.items() if c == code)])
            times: dict[str, list[float]] = {n: [] for n in codes}
            for i in range(args.runs):
                order = list(codes) if i % 2 == 0 else list(codes)[::-1]
                for name in order:
                    times[name].append(time_once(codes[name], configs[name]))
                    print(f"  run {i}: {name:<16} {times[name][-1]:6.2f} s", flush=True)
            print(f"\ntime to the end of the first training step, toy preset ({args.runs} runs each, "
                  f"{os.cpu_count()} CPUs):")
            for name, ts in times.items():
                print(f"  {name:<16} median {statistics.median(ts):6.2f} s  (min {min(ts):.2f}, max {max(ts):.2f})")
            if args.vs:
                a, b = times["this checkout"], times[args.vs]
                ratios = [x / y for x, y in zip(a, b)]
                print(f"  this checkout / {args.vs} per pair: {', '.join(f'{r:.2f}' for r in ratios)} "
                      f"(median {statistics.median(ratios):.2f})")
        finally:
            if args.vs:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "other")],
                               capture_output=True)


if __name__ == "__main__":
    main()
