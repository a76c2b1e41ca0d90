"""Notebook 06's experiments on the toy world: underfit, good and overfit side by side, and the remedies table.

The runs themselves are the remedies table's (:mod:`lora_nb.remedies`): the deliberately underfit and overfit
runs are its two baselines, so what notebook 06 shows and what ``lora-nb experiments`` measures are the same
runs. Every conclusion printed is computed from measurements (:func:`lora_nb.remedies.conclude`).
"""

from __future__ import annotations

import json
from pathlib import Path

from lora_nb.config import Config
from lora_nb.diagnose import Thresholds
from lora_nb.remedies import MEASURES, load_examples, run_table

FIT_RUNS = ("underfit", "overfit")


def fit_trio(diagnosis: dict, cfg: Config, scratch: str | Path, sample_seeds: list[int], steps: int = 20,
             max_steps: int | None = None, log=print) -> tuple[dict, list[dict]]:
    """Train (or reuse) the underfit and overfit baselines next to the diagnosed run and return
    ``(rows, measures)``: ``rows`` maps a label ("underfit · underfit") to that run's example generations
    ``[(prompt, image)]`` — this run's at its recommended epoch — and ``measures`` is one dict per run."""
    scratch = Path(scratch)
    table = run_table(scratch, seeds=1, only=list(FIT_RUNS), sample_seeds=sample_seeds, steps=steps, course=cfg,
                      max_steps=max_steps, log=log)
    rec = diagnosis["recommended"]
    chosen = next(e for e in diagnosis["epochs"] if e["epoch"] == rec["epoch"])
    entries = [("underfit run", table["runs"]["underfit"]["seeds"][0], load_examples(scratch / "underfit" / "seed-0")),
               (f"this run, epoch {rec['epoch']}", {**chosen["images"], "verdict": chosen["verdict"],
                                                    "reasons": chosen["reasons"]},
                diagnosis["_examples"][rec["epoch"]]),
               ("overfit run", table["runs"]["overfit"]["seeds"][0], load_examples(scratch / "overfit" / "seed-0"))]
    rows = {f"{name}\njudged: {m['verdict']}": examples for name, m, examples in entries}
    measures = [{"run": name, "verdict": m["verdict"], **{k: m.get(k) for k in MEASURES},
                 "because": "; ".join(m.get("reasons") or [])} for name, m, _ in entries]
    return rows, measures


BASELINE_OF_TRIO = {"underfit run": "underfit", "overfit run": "overfit"}


def rerun_against_committed(trio: list[dict], committed: dict | None) -> list[str]:
    """One line per baseline of the table that :func:`fit_trio` just trained (training seed 0): its measures here
    next to the committed table's seed-0 run of the same baseline. Equal settings give equal numbers up to the
    machine's arithmetic; other settings (a changed workspace config, other sample seeds) differ by design."""
    lines = []
    for row in trio:
        name = BASELINE_OF_TRIO.get(row["run"])
        if name is None:
            continue
        then = ((committed or {}).get("runs", {}).get(name, {}).get("seeds", {}) or {}).get("0")
        here = " · ".join(f"{k} {row[k]:.2f}" for k in MEASURES if row.get(k) is not None)
        table = " · ".join(f"{k} {then[k]:.2f}" for k in MEASURES if then and then.get(k) is not None)
        lines.append(f"{name} (training seed 0), here:      {here}")
        lines.append(f"{name} (training seed 0), the table: {table or 'not in the committed table'}")
    return lines


def definitions(t: Thresholds = Thresholds()) -> str:
    """The course's definitions of the labels, with the thresholds the verdict uses."""
    return (f"underfit: the subject appears in fewer than {t.fidelity_min:.0%} of trigger-word images. "
            f"overfit: generations copy training images (memorization above {t.memorization_max}), or prompt "
            f"adherence falls more than {t.generalisation_drop:.0%} below the base model's, or the subject leaks into "
            f"more than {t.leakage_max:.0%} of images without the trigger word.")


def committed_table(path: str | Path) -> dict | None:
    """The remedies table committed with the course (``docs/remedies.json``), or None when it is missing."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def describe_committed(committed: dict | None, concept_dir: str | Path | None = None) -> str:
    """The committed table's heading (date, command, seeds) and its rows, or how to make it when it is missing.
    With ``concept_dir`` (the concept pictures the course trains on now), says so when the table was measured on
    other pictures: its numbers, and a rerun's beside them, then differ for that reason."""
    if not committed:
        return "docs/remedies.json is missing: run `lora-nb experiments` to make the table."
    missing = committed.get("missing") or []
    head = (f"Committed table ({committed['date']}, `{committed['command']}`, training seeds {committed['seeds']}"
            + (f"; {len(missing)} runs not measured yet, listed in docs/remedies.md" if missing else "") + "):")
    if concept_dir is not None:
        from lora_nb.remedies import concept_fingerprint

        now = concept_fingerprint(concept_dir)
        if committed.get("concept") != now:
            head = (f"Note: this table was measured on other concept pictures than {Path(concept_dir).name} holds "
                    f"now (fingerprint {committed.get('concept') or 'not recorded'}, today {now}); "
                    f"`{committed['command']}` measures it on today's. Its numbers and conclusions are those of the "
                    "earlier pictures, and a rerun differs for that reason.\n" + head)
    return head + "\n" + format_rows(committed)


def format_rows(table: dict) -> str:
    """One line per remedy: its goal measure against the baseline, with the spread between seeds and the verdict."""
    lines = []
    for row in table["rows"]:
        spread = f"spread {row['spread']:.2f}" if row["spread"] is not None else "one seed"
        lines.append(f"{row['run']:<24} {row['measure']:<15} {row['baseline']} {row['baseline_mean']:.2f} → "
                     f"{row['mean']:.2f} ({row['difference']:+.2f}, {spread}, n={row['n']}): {row['conclusion']}")
    return "\n".join(lines) or "(no remedies in this table)"
