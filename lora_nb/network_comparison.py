"""The network types measured on the toy world: at about the file size of the course's rank-8 LoRA, what
LoCon, LoHa, LoKr and the course LoRA with DoRA learn of the zorb, and what resizing the course's LoRA to rank
4 and 2 keeps.

Every type trains the course's toy settings with only its network changed, at the rank (and LoKr factor)
whose file is nearest in size to the course's LoRA, at training seeds 0, 1, 2 …; each final file is judged by
the toy judge as the remedies table judges its runs (:mod:`lora_nb.remedies`). The resized files are the
course run's own, truncated by SVD (:func:`lora_nb.lora_tools.resize_lora`) and judged the same way. A
difference counts only when it exceeds the spread between seeds.

``lora-nb compare-networks [--seeds N] [--out DIR]`` trains what is missing and writes ``networks.json`` and
``networks.md`` (the table in ``docs/network-types.md`` is that file).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from lora_nb import LoraNbError, remedies, runstate
from lora_nb.config import Config, preset
from lora_nb.fsutil import write_text_atomic
from lora_nb.remedies import MEASURES, Run
from lora_nb.workspace import Workspace

CANDIDATE_RANKS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32)
LOKR_FACTORS = (-1, 2, 4, 8, 16)
RESIZED_RANKS = (4, 2)


def file_size_for(model, cfg: Config, overrides: dict) -> int:
    """The file size ``cfg`` with ``overrides`` would write on ``model`` (the estimate that equals the file)."""
    from lora_nb.estimate import estimate_lora_file_size
    from lora_nb.lora_io import network_options

    c = cfg.with_overrides(overrides)
    return estimate_lora_file_size(model, c.network.rank, c.network.alpha, c.network.unet_targets,
                                   c.optimizer.text_encoder_lr > 0, c.save.precision, None,
                                   network_options(c.network))


def matched_networks(model, course: Config) -> list[tuple[str, dict, int]]:
    """``(type, overrides, bytes)`` for each type at the rank (LoKr: and factor) nearest in file size to the
    course's LoRA; alpha / rank as in the course (conv layers at the same rank and alpha); last, the course's
    LoRA with DoRA (``lora-dora``)."""
    target = file_size_for(model, course, {})
    scale = course.network.alpha / course.network.rank
    out = [("lora", {}, target)]
    for network_type in ("locon", "loha", "lokr"):
        options = []
        for r in CANDIDATE_RANKS:
            conv = {"network.conv_rank": r, "network.conv_alpha": r * scale} if network_type == "locon" else {}
            for factor in (LOKR_FACTORS if network_type == "lokr" else (-1,)):
                o = {"network.type": network_type, "network.rank": r, "network.alpha": r * scale, **conv,
                     **({"network.lokr_factor": factor} if factor != -1 else {})}
                options.append((abs(file_size_for(model, course, o) - target), o))
        best = min(options, key=lambda t: t[0])[1]
        out.append((network_type, best, file_size_for(model, course, best)))
    dora = {"network.dora": True}  # the course's LoRA with DoRA: its magnitudes add a few per cent to the file
    out.append(("lora-dora", dora, file_size_for(model, course, dora)))
    return out


def describe(network_type: str, overrides: dict) -> str:
    r = overrides.get("network.rank", 8)
    extra = ""
    if "network.conv_rank" in overrides:
        extra = f", 3x3 convolutions at rank {overrides['network.conv_rank']}"
    if "network.lokr_factor" in overrides:
        extra = f", factor {overrides['network.lokr_factor']}"
    if network_type == "lora-dora":
        return "lora rank 8 with DoRA (a learned magnitude per output row)"
    return f"{network_type} rank {r}{extra}" if network_type != "lora" else "lora rank 8 (the course's)"


def run_comparison(out: str | Path, seeds: int = 3, sample_seeds: list[int] | None = None, steps: int = 20,
                   course: Config | None = None, max_steps: int | None = None, log=print,
                   only: list[str] | None = None) -> dict:
    """Train and judge every type at seeds 0 … ``seeds``−1 and the course run's resized files (resuming what
    exists); ``only``: those rows alone (the course's ``lora`` row always); return the table
    ``{"rows": [...], "conclusions": [...], ...}``. One run per ``out`` folder at a time (a lock)."""
    if seeds < 1:
        raise LoraNbError(f"--seeds {seeds}: use at least 1 (3 or more to tell a difference from noise).")
    out = Path(out)
    course = course or preset("toy")
    with runstate.hold_workspace(Workspace(out), "network comparison", elsewhere="another --out folder"):
        return _run_comparison(out, seeds, list(sample_seeds or [0, 1]), steps, course, max_steps, log, only)


def _run_comparison(out: Path, seeds: int, sample_seeds: list[int], steps: int, course: Config, max_steps, log,
                    only) -> dict:
    from lora_nb.models import load_model_for

    model = load_model_for(course)
    matched = matched_networks(model, course)
    names = [name for name, _, _ in matched] + [f"lora-resized-{r}" for r in RESIZED_RANKS]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise LoraNbError(f"--only {' '.join(unknown)}: no such row; the rows are {', '.join(names)}.")
    matched = [m for m in matched if not only or m[0] == "lora" or m[0] in only]
    per_type: dict[str, dict] = {name: {} for name, _, _ in matched}
    for seed in range(seeds):  # every type at one seed before the next seed: a stopped table is still balanced
        for network_type, overrides, _size in matched:
            run = Run(network_type, "networks", describe(network_type, overrides), overrides)
            folder = out / network_type / f"seed-{seed}"
            log(f"{network_type} seed {seed}: training and judging ({folder})")
            cfg = remedies.run_config(course, run, seed, folder, max_steps)
            per_type[network_type][seed] = remedies.measure_run(cfg, folder, sample_seeds, steps)
    rows = [{"name": name, "what": describe(name, overrides), "bytes": size, **remedies.summarise(per_type[name])}
            for name, overrides, size in matched]
    ranks = [r for r in RESIZED_RANKS if not only or f"lora-resized-{r}" in only]
    rows += resized_rows(out, course, seeds, sample_seeds, steps, log, ranks)
    return {"rows": rows, "conclusions": conclude(rows), "seeds": list(range(seeds)), "sample_seeds": sample_seeds,
            "steps": steps, "max_steps": max_steps}


def resized_rows(out: Path, course: Config, seeds: int, sample_seeds: list[int], steps: int, log,
                 ranks=RESIZED_RANKS) -> list[dict]:
    """The course LoRA of each seed resized to each of :data:`RESIZED_RANKS`, judged like a trained run."""
    if not ranks:
        return []
    from lora_nb.diagnose import load_training_images, toy_image_evidence
    from lora_nb.lora_io import load_lora
    from lora_nb.lora_tools import resize_lora
    from lora_nb.models import load_model_for

    model = load_model_for(course)
    model.pipe.set_progress_bar_config(disable=True)
    training = load_training_images(course)
    rows = []
    for rank in ranks:
        per_seed, size = {}, 0
        for seed in range(seeds):
            folder = out / "lora" / f"seed-{seed}"
            done = folder / f"resized-{rank}.json"
            if not done.exists():
                source = Workspace(folder).lora_file(course.save.output_name)
                target = folder / f"resized-{rank}.safetensors"
                kept = resize_lora(source, target, rank)
                log(f"lora seed {seed} resized to rank {rank}: judging")
                load_lora(model.pipe, target, adapter_name="resized")
                images = toy_image_evidence(model.pipe, training, sample_seeds, steps)
                result = {**{k: images.get(k) for k in MEASURES}, "bytes": target.stat().st_size,
                          "fro_kept": statistics.mean(m["kept"] for m in kept["modules"].values())}
                write_text_atomic(done, json.dumps(result, indent=1))
            per_seed[seed] = json.loads(done.read_text(encoding="utf-8"))
            size = per_seed[seed]["bytes"]
        row = {"name": f"lora-resized-{rank}", "what": f"the course's LoRA resized to rank {rank} (SVD)",
               "bytes": size, **remedies.summarise(per_seed)}
        row["fro_kept"] = statistics.mean(s["fro_kept"] for s in per_seed.values())
        rows.append(row)
    return rows


def conclude(rows: list[dict]) -> list[dict]:
    """Each row against the course's LoRA on fidelity and leakage: a difference only beyond the seeds' spread."""
    base = rows[0]
    out = []
    for row in rows[1:]:
        for measure in ("fidelity", "leakage"):
            a, b = base["mean"][measure], row["mean"][measure]
            spread = max(base["spread"][measure], row["spread"][measure])
            if abs(b - a) <= spread + 1e-9:  # a tie is no difference (float sums of shares can miss by 1e-17)
                word = "no difference this experiment can resolve"
            else:
                word = "higher" if b > a else "lower"
            out.append({"row": row["name"], "measure": measure, "course": a, "this": b, "difference": b - a,
                        "spread": spread, "conclusion": word})
    return out


def format_comparison(table: dict, command: str, date: str) -> str:
    """The table as Markdown (docs/network-types.md)."""
    lines = ["# Network types and resizing, measured on the toy world", "",
             f"Reproduce: `{command}` (run {date})", "",
             f"Training seeds {table['seeds']}; each final file judged on 12 colour × background prompts × sample "
             f"seeds {table['sample_seeds']} with the trigger word and the same without it (DDIM {table['steps']} "
             "steps), as the remedies table judges. Values are the mean over training seeds ± half the range "
             "between them. Generalisation is prompt adherence: the asked colour and background drawn.", "",
             "| row | what | file size | " + " | ".join(MEASURES) + " |", "|---|---|---|" + "---|" * len(MEASURES)]
    for r in table["rows"]:
        kept = f" ({r['fro_kept']:.0%} of the Frobenius norm kept)" if "fro_kept" in r else ""
        cells = [remedies._pm(r["mean"][m], r["spread"][m]) for m in MEASURES]
        lines.append(f"| {r['name']} | {r['what']}{kept} | {r['bytes'] / 1e3:.0f} kB | " + " | ".join(cells) + " |")
    lines += ["", "| row | measure | course's LoRA | this row | difference | spread between seeds | conclusion |",
              "|---|---|---|---|---|---|---|"]
    for c in table["conclusions"]:
        lines.append(f"| {c['row']} | {c['measure']} | {c['course']:.2f} | {c['this']:.2f} | {c['difference']:+.2f} | "
                     f"{c['spread']:.2f} | {c['conclusion']} |")
    return "\n".join(lines) + "\n"


def write_comparison(table: dict, out: str | Path, command: str, date: str) -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "networks.json", out / "networks.md"
    write_text_atomic(js, json.dumps({**table, "command": command, "date": date}, indent=1))
    write_text_atomic(md, format_comparison(table, command, date))
    return js, md
