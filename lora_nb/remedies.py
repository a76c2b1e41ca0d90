"""The remedies table: every remedy the course names, measured on the toy world over several training seeds.

Each remedy is one change to a baseline that is in the regime it addresses — the overfit remedies start from a
deliberately overfit run, the underfit remedies from a deliberately underfit one, the folk claims from the
baseline of the regime they speak of — and every run is trained with ``training.seed`` = 0, 1, 2, … and measured by the toy judge on
its final file. A remedy "worked" only when the difference between the means exceeds the spread between seeds
(the range, max − min, of either run); otherwise the table says "no difference this experiment can resolve".

``lora-nb experiments [--seeds N] [--only NAME …]`` trains what is missing (each run's files kept under
``<out>/<run>/seed-<n>/``, so an interrupted table resumes) and writes ``remedies.json`` and ``remedies.md``.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from lora_nb import LoraNbError, runstate
from lora_nb.config import Config, preset
from lora_nb.fsutil import write_text_atomic
from lora_nb.workspace import Workspace

MEASURES = ("fidelity", "generalisation", "memorization", "leakage")


@dataclass(frozen=True)
class Run:
    name: str
    regime: str  # "overfit" or "underfit": which baseline it changes (or "baseline")
    what: str  # one line: what differs from its baseline
    overrides: dict = field(default_factory=dict)  # on top of the baseline's
    goal: str = ""  # the measure that says whether it worked, and its direction: "+fidelity", "-memorization"


def _lr(cfg: Config, factor: float) -> dict:
    return {"optimizer.learning_rate": cfg.optimizer.learning_rate * factor,
            "optimizer.text_encoder_lr": cfg.optimizer.text_encoder_lr * factor}


OVERFIT_EPOCHS = 60  # 3 images × 10 repeats / batch 3 = 10 steps an epoch: 600 steps
UNDERFIT_EPOCHS = 2  # the course's 120 steps an epoch: 240 steps


def baselines(course: Config, few_dir: str) -> dict[str, dict]:
    """The two baselines' overrides of the course's toy preset: an overfit run (3 images, no class images, 600
    steps at the course's LR: at 3× it the pictures burn into noise instead of copying) and an underfit one (a
    third of the LR, two epochs: the zorb in a few images, so a remedy has room to bring it in; a tenth of the LR
    for one epoch drew it in none, and no single remedy rescued that)."""
    return {
        "overfit": {"dataset.dir": few_dir, "dataset.repeats": 10, "dataset.reg_dir": "", "training.batch_size": 3,
                    "training.epochs": OVERFIT_EPOCHS},
        "underfit": {"training.epochs": UNDERFIT_EPOCHS, **_lr(course, 1 / 3)},
    }


def remedy_runs(course: Config, few_dir: str, varied_dir: str) -> list[Run]:
    """Every run of the table (baselines first), each differing from its baseline in the one respect named.

    The folk claims are rows too, in the regime they are about: "raise alpha against overfitting"
    (``overfit-higher-alpha``), "lower the repeats to avoid rigid results" (``overfit-repeats-vs-epochs``: the
    same steps), "class images keep the model general" (``overfit-reg-images``)."""
    b = baselines(course, few_dir)
    over, under = b["overfit"], b["underfit"]
    r, a = course.network.rank, course.network.alpha
    n = _images_in(course.dataset.dir)
    varied_epochs = max(1, round(OVERFIT_EPOCHS * 3 * 10 / (2 * n)))  # 2n images × 1 repeat / batch 3: same steps
    # The overfit baseline is overfit by its leakage (the zorb drawn without the trigger word): that is the measure
    # its remedies must bring down; the underfit baseline lacks the subject: its remedies must bring fidelity up.
    plus, more = "-leakage", "+fidelity"
    return [
        Run("overfit", "baseline", f"3 images × 10 repeats, no class images, {OVERFIT_EPOCHS} epochs", over),
        Run("underfit", "baseline", f"a third of the LR, {UNDERFIT_EPOCHS} epochs", under),
        # overfit remedies: each must bring the leakage down
        Run("overfit-lower-lr", "overfit", "a third of the learning rate", {**over, **_lr(course, 1 / 3)}, plus),
        Run("overfit-fewer-epochs", "overfit", f"a fifth of the epochs ({OVERFIT_EPOCHS // 5})",
            {**over, "training.epochs": OVERFIT_EPOCHS // 5}, plus),
        Run("overfit-fewer-repeats", "overfit", "2 repeats instead of 10 (a fifth of the steps)",
            {**over, "dataset.repeats": 2}, plus),
        Run("overfit-repeats-vs-epochs", "overfit", f"5 repeats × {OVERFIT_EPOCHS * 2} epochs (the same steps; folk: "
            "'lower the repeats to avoid rigid results')", {**over, "dataset.repeats": 5,
                                                           "training.epochs": OVERFIT_EPOCHS * 2}, plus),
        Run("overfit-lower-rank", "overfit", f"rank {max(1, r // 4)}, alpha {a / 4:g} (a quarter of the capacity)",
            {**over, "network.rank": max(1, r // 4), "network.alpha": a / 4}, plus),
        Run("overfit-higher-alpha", "overfit", f"alpha {a * 4:g} at rank {r} (folk: 'raise alpha against "
            "overfitting')", {**over, "network.alpha": a * 4}, plus),
        Run("overfit-reg-images", "overfit", "with the class images (prior loss weight 0.3; folk: 'class images keep "
            "it general')", {**over, "dataset.reg_dir": course.dataset.reg_dir or "data/toy-reg",
                             "dataset.prior_loss_weight": 0.3}, plus),
        Run("overfit-varied-data", "overfit", f"{2 * n} varied images instead of 3, 1 repeat, {varied_epochs} epochs "
            "(about the same steps)", {**over, "dataset.dir": varied_dir, "dataset.repeats": 1,
                                        "training.epochs": varied_epochs}, plus),
        # underfit remedies: each must bring the subject in (fidelity up)
        Run("underfit-higher-lr", "underfit", f"3× the LR (the course's {course.optimizer.learning_rate:g})",
            {**under, **_lr(course, 1.0)}, more),
        Run("underfit-more-epochs", "underfit", f"{UNDERFIT_EPOCHS * 3} epochs instead of {UNDERFIT_EPOCHS}",
            {**under, "training.epochs": UNDERFIT_EPOCHS * 3}, more),
        Run("underfit-more-repeats", "underfit", "30 repeats instead of 10", {**under, "dataset.repeats": 30}, more),
        Run("underfit-higher-rank", "underfit", f"rank {r * 4}, alpha {a:g} (4× the capacity, relatively lower "
            "alpha)", {**under, "network.rank": r * 4}, more),
        Run("underfit-lower-alpha", "underfit", f"alpha {a / 4:g} at rank {r} (a quarter of the scale)",
            {**under, "network.alpha": a / 4}, more),
        Run("underfit-weaker-reg", "underfit", f"prior loss weight 0.1 instead of {course.dataset.prior_loss_weight:g}",
            {**under, "dataset.prior_loss_weight": 0.1}, more),
        Run("underfit-more-data", "underfit", f"{2 * n} varied images × 5 repeats instead of {n} × 10 (the same "
            "steps)", {**under, "dataset.dir": varied_dir, "dataset.repeats": 5}, more),
    ]


# --------------------------------------------------------------------------- running

def _images_in(dataset_dir: str) -> int:
    from lora_nb.dataset import scan_dataset

    return len(scan_dataset(dataset_dir).items)


def data_dirs(out: Path) -> tuple[Path, Path]:
    """Where the table's two extra datasets live: 3 zorbs (the overfit baseline) and twice the course's number
    (the "more data" runs)."""
    return out / "data" / "zorb-3", out / "data" / "zorb-more"


def prepare_data(out: Path, n: int) -> None:
    """Write the datasets of :func:`data_dirs` once (drawn by the toy world, like the bundled ones; the larger one
    holds ``n`` images: the bundled set's first ones and more)."""
    from lora_nb.toy import concept

    few, varied = data_dirs(out)
    if not (few / "truth.json").exists():
        concept.make_concept_dataset(few, n=3, repeats=10)
    if not (varied / "truth.json").exists():
        concept.make_concept_dataset(varied, n=n, repeats=10)


def run_config(course: Config, run: Run, seed: int, folder: Path, max_steps: int | None = None) -> Config:
    """The config of one run and training seed: the course's, the run's overrides, no previews, one final file
    (and at most ``max_steps`` steps, for quick runs)."""
    cap = {"training.max_steps": max_steps} if max_steps else {}
    return course.with_overrides({**run.overrides, "training.seed": seed, "save.output_dir": str(folder),
                                  "sample.every_n_epochs": 0, "save.every_n_epochs": 0, "save.save_state": False,
                                  **cap})


def measure_run(cfg: Config, folder: Path, sample_seeds: list[int], steps: int) -> dict:
    """Train (unless its final file exists) and measure one run; ``measures.json`` is written last (atomic), so a
    run without it is redone."""
    from lora_nb.diagnose import diagnose_run
    from lora_nb.train import train

    done = folder / "measures.json"
    settings = _settings_hash(cfg)
    if done.exists():
        kept = json.loads(done.read_text(encoding="utf-8"))
        if kept.get("settings") == settings:
            return kept
    start = time.time()
    final = Workspace(folder).lora_file(cfg.save.output_name)
    if not final.exists() or _settings_of(folder) != settings:
        train(cfg, progress=False, resume=False)  # an earlier run with other settings is archived by the trainer
    seconds = time.time() - start
    d = diagnose_run(folder, seeds=sample_seeds, steps=steps, write=True, progress=False, only_final=True)
    e = d["epochs"][-1]
    save_examples(folder, d["_examples"][e["epoch"]])
    result = {**{k: e["images"].get(k) for k in MEASURES}, "verdict": e["verdict"], "reasons": e["reasons"],
              "train_seconds": round(seconds),
              "n_images": e["images"]["n_images"], "steps": _steps_of(folder), "settings": settings}
    write_text_atomic(done, json.dumps(result, indent=1))
    return result


def save_examples(folder: Path, examples: list) -> None:
    """Keep a run's example generations (``[(prompt, image)]``) as ``examples/NN.png`` + ``examples.json``."""
    from PIL import Image

    from lora_nb.fsutil import atomic_path

    (folder / "examples").mkdir(exist_ok=True)
    for i, (_, img) in enumerate(examples):
        with atomic_path(folder / "examples" / f"{i:02d}.png") as tmp:
            Image.fromarray(img).save(tmp, format="PNG")
    write_text_atomic(folder / "examples.json", json.dumps([p for p, _ in examples]))


def load_examples(folder: str | Path) -> list:
    """``[(prompt, PIL image)]`` kept by :func:`save_examples` (empty when the run has none)."""
    from PIL import Image

    folder = Path(folder)
    if not (folder / "examples.json").exists():
        return []
    prompts = json.loads((folder / "examples.json").read_text(encoding="utf-8"))
    return [(p, Image.open(folder / "examples" / f"{i:02d}.png").convert("RGB")) for i, p in enumerate(prompts)]


def concept_fingerprint(folder: str | Path) -> str:
    """What identifies the concept pictures a table was measured on: a hash of every file's name and bytes under
    ``folder`` (images and captions). A table whose fingerprint differs from today's data was measured on others."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _settings_hash(cfg: Config) -> str:
    """What identifies a run's settings: a changed setting retrains, an unchanged one reuses the run."""
    return hashlib.sha256(cfg.to_yaml().encode()).hexdigest()[:16]


def _settings_of(folder: Path) -> str | None:
    """The settings hash of the run trained in ``folder`` (its train_config.yaml), or None."""
    path = Workspace(folder).train_config
    return _settings_hash(Config.load(path)) if path.exists() else None


def _steps_of(folder: Path) -> int | None:
    """The last step the run in ``folder`` logged."""
    from lora_nb.diagnose import read_metrics

    return max((r.get("step", 0) for r in read_metrics(Workspace(folder).metrics)), default=None)


def select_runs(runs: list[Run], only: list[str] | None) -> list[Run]:
    """``only`` runs (with the baselines they are compared with); every run when ``only`` is empty."""
    if not only:
        return runs
    names = {r.name for r in runs}
    unknown = [n for n in only if n not in names]
    if unknown:
        raise LoraNbError(f"--only {' '.join(unknown)}: no such run. Runs: {', '.join(sorted(names))}.")
    base_of = {"overfit": "overfit", "underfit": "underfit"}
    keep = set(only) | {base_of[r.regime] for r in runs if r.name in only and r.regime in base_of}
    return [r for r in runs if r.name in keep]


def run_table(out: str | Path, seeds: int = 3, only: list[str] | None = None, sample_seeds: list[int] | None = None,
              steps: int = 20, course: Config | None = None, max_steps: int | None = None, log=print,
              measured_only: bool = False) -> dict:
    """Train and measure every selected run at training seeds 0 … ``seeds``−1 (resuming what exists), and return
    the table: ``{"runs": {name: {"seeds": {seed: measures}, "mean": …, "spread": …}}, "rows": [...]}``.
    ``max_steps`` caps every run (quick runs; the table records it). ``measured_only`` trains nothing and
    reports the runs measured so far (while another process is still filling the table); otherwise one sweep
    per ``out`` folder at a time (a lock)."""
    if seeds < 1:
        raise LoraNbError(f"--seeds {seeds}: use at least 1 (3 or more to tell a remedy from noise).")
    out = Path(out)
    course = course or preset("toy")
    few, varied = data_dirs(out)
    runs = select_runs(remedy_runs(course, str(few), str(varied)), only)
    if measured_only:  # a reader beside the process filling the table: takes no lock
        return _run_table(out, seeds, runs, sample_seeds, steps, course, max_steps, log, measured_only)
    with runstate.hold_workspace(Workspace(out), "experiments", elsewhere="another --out folder"):
        prepare_data(out, 2 * _images_in(course.dataset.dir))
        return _run_table(out, seeds, runs, sample_seeds, steps, course, max_steps, log, measured_only)


def _run_table(out: Path, seeds: int, runs: list[Run], sample_seeds, steps: int, course: Config, max_steps, log,
               measured_only: bool) -> dict:
    table: dict = {"runs": {}, "seeds": list(range(seeds)), "sample_seeds": sample_seeds or [0, 1], "steps": steps,
                   "max_steps": max_steps, "concept": concept_fingerprint(course.dataset.dir)}
    for run in runs:
        per_seed = {}
        for seed in range(seeds):
            folder = out / run.name / f"seed-{seed}"
            if measured_only and not (folder / "measures.json").exists():
                table.setdefault("missing", []).append(f"{run.name} seed {seed}")
                continue
            t = time.time()
            cfg = run_config(course, run, seed, folder, max_steps)
            per_seed[seed] = measure_run(cfg, folder, table["sample_seeds"], steps)
            m = per_seed[seed]
            log(f"{run.name} seed {seed}: fidelity {m['fidelity']:.2f}, generalisation {m['generalisation']:.2f}, "
                f"memorization {m['memorization']:.2f}, leakage {m['leakage']:.2f} ({time.time() - t:.0f} s)")
        if per_seed:
            table["runs"][run.name] = {"regime": run.regime, "what": run.what, "goal": run.goal,
                                       "seeds": per_seed, **summarise(per_seed)}
    table["rows"] = conclude(table["runs"])
    return table


def summarise(per_seed: dict) -> dict:
    """Mean and spread (max − min over seeds) of each measure."""
    mean, spread = {}, {}
    for k in MEASURES:
        values = [m[k] for m in per_seed.values() if m.get(k) is not None]
        mean[k] = statistics.fmean(values) if values else None
        spread[k] = (max(values) - min(values)) if len(values) > 1 else None
    return {"mean": mean, "spread": spread, "n": len(per_seed)}


def conclude(runs: dict) -> list[dict]:
    """One row per remedy: the goal measure's baseline and remedy means, their spreads, and the conclusion."""
    base_of = {"overfit": "overfit", "underfit": "underfit"}
    rows = []
    for name, r in runs.items():
        if r["regime"] not in base_of or base_of[r["regime"]] not in runs:
            continue
        base = runs[base_of[r["regime"]]]
        sign, measure = (1 if r["goal"][0] == "+" else -1), r["goal"][1:]
        b, v = base["mean"][measure], r["mean"][measure]
        spreads = [s for s in (base["spread"][measure], r["spread"][measure]) if s is not None]
        spread = max(spreads) if spreads else None
        diff = v - b
        if spread is None or min(base["n"], r["n"]) < 2:
            verdict = "one seed: no spread to compare with (run with --seeds 3)"
        elif abs(diff) <= spread + 1e-9:  # a tie is no difference (shares of n images: float sums can miss by 1e-17)
            verdict = "no difference this experiment can resolve"
        elif diff * sign > 0:
            verdict = "worked"
        else:
            verdict = "made it worse"
        rows.append({"run": name, "regime": r["regime"], "what": r["what"], "measure": measure,
                     "baseline": base_of[r["regime"]], "baseline_mean": b, "mean": v, "difference": diff,
                     "spread": spread, "n": r["n"], "conclusion": verdict})
    return rows


def format_table(table: dict, command: str = "", date: str = "") -> str:
    """The table as Markdown: every run's means ± spread, then each remedy's conclusion."""
    lines = ["# Remedies and folk claims, measured on the toy world", ""]
    if command:
        lines += [f"Reproduce: `{command}`" + (f" (run {date})" if date else ""), ""]
    lines += [f"Training seeds {table['seeds']}; each final file judged on 12 colour × background prompts × sample "
              f"seeds {table['sample_seeds']} with the trigger word and the same without it (DDIM {table['steps']} "
              "steps, CFG 5). Values are the mean over training seeds, ± half the range between them."
              + (f" Concept pictures: fingerprint {table['concept']} (`lora_nb.remedies.concept_fingerprint`)."
                 if table.get("concept") else ""), "",
              "| run | regime | what differs | fidelity | generalisation | memorization | leakage |",
              "|---|---|---|---|---|---|---|"]
    for name, r in table["runs"].items():
        cells = [_pm(r["mean"][k], r["spread"][k]) for k in MEASURES]
        lines.append(f"| {name} | {r['regime']} | {r['what']} | " + " | ".join(cells) + " |")
    if table.get("missing"):
        lines += ["", f"Not measured yet ({len(table['missing'])} runs): " + ", ".join(table["missing"]) + "."]
    lines += ["", "| remedy | against | measure | baseline | remedy | difference | spread between seeds | "
              "conclusion |", "|---|---|---|---|---|---|---|---|"]
    for row in table["rows"]:
        spread = f"{row['spread']:.2f}" if row["spread"] is not None else "–"
        lines.append(f"| {row['run']} | {row['baseline']} | {row['measure']} | {row['baseline_mean']:.2f} | "
                     f"{row['mean']:.2f} | {row['difference']:+.2f} | {spread} | {row['conclusion']} |")
    return "\n".join(lines) + "\n"


def _pm(mean, spread) -> str:
    if mean is None:
        return "–"
    return f"{mean:.2f}" + (f" ± {spread / 2:.2f}" if spread is not None else "")


def write_table(table: dict, out: str | Path, command: str, date: str) -> tuple[Path, Path]:
    """``remedies.json`` and ``remedies.md`` in ``out`` (atomic)."""
    out = Path(out)
    js, md = out / "remedies.json", out / "remedies.md"
    write_text_atomic(js, json.dumps({**table, "command": command, "date": date}, indent=1, default=str))
    write_text_atomic(md, format_table(table, command, date))
    return js, md
