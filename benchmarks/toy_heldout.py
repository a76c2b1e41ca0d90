"""Judge toy LoRA files the way a learner would try them: held-out sample seeds and prompts in other wordings.

    python benchmarks/toy_heldout.py runs/course/lora/lora.safetensors [more files] [--seeds 2 3 4 5]
    python benchmarks/toy_heldout.py FILE --wordings my-prompts.txt      # one prompt per line

For each file, with the toy base model and the toy judge (DDIM 20, CFG 5, 64×64):
- the 24 colour × background prompts in the captions' sentence form, on ``--seeds`` (not the seeds the course
  samples with): zorb share with the trigger word, the same without it (leak), colour and background obeyed;
- prompts worded unlike that sentence (``--wordings``, default: 16 below), on ``--wording-seeds``: zorb share
  with the trigger, and the leak when "zorb" is taken out of each;
- of every image judged a zorb, the share whose eyes are one merged dark band (the judge counts it; a learner
  sees a band, not two eyes) and the share with two eyes that touch (a waist between two lobes), and for each
  prompt set the share of trigger-word images with two eyes (apart or touching) and with two eyes apart.
Prints one line per file and, with ``--json``, writes every figure and the per-prompt counts there.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

WORDINGS = ["a zorb", "zorb", "a zorb circle", "a red zorb", "a blue zorb on a gray background",
            "zorb, green circle", "zorb, yellow circle, beige background", "red circle, zorb, skyblue background",
            "a white zorb circle", "a zorb on a skyblue background", "a zorb circle on a black background",
            "a purple zorb circle, beige background", "zorb, white circle, gray background",
            "a green zorb circle on a skyblue background with two eyes", "blue zorb",
            "a yellow zorb on a black background"]


def without_trigger(prompt: str) -> str:
    """The prompt with the trigger word taken out ("a zorb" → "a circle", "zorb, red circle" → "red circle")."""
    p = prompt.replace("zorb circle", "circle").replace("zorb, ", "").replace(", zorb", "")
    return p.replace("zorb", "circle")


def judge_file(path: Path, seeds: list[int], wordings: list[str], wording_seeds: list[int]) -> dict:
    from lora_nb.lora_io import load_lora
    from lora_nb.models import load_base_model
    from lora_nb.toy import quality

    pipe = load_base_model("toy").pipe
    pipe.set_progress_bar_config(disable=True)
    load_lora(pipe, path)
    on = quality.measure_generations(pipe, quality.concept_prompts(True), seeds)
    off = quality.measure_generations(pipe, quality.concept_prompts(False), seeds)
    other = quality.measure_generations(pipe, wordings, wording_seeds)
    other_off = quality.measure_generations(pipe, [without_trigger(w) for w in wordings], wording_seeds)
    merged = [r for r in on["records"] + other["records"] if r["got"]["zorb"] and r["got"].get("eyes_merged")]
    zorbs = [r for r in on["records"] + other["records"] if r["got"]["zorb"]]
    touching = [r for r in zorbs if r["got"].get("eyes_touching")]
    two = lambda recs: sum(r["got"]["zorb"] and not r["got"].get("eyes_merged") for r in recs) / max(1, len(recs))
    apart = lambda recs: sum(r["got"]["zorb"] and not r["got"].get("eyes_merged") and not r["got"].get("eyes_touching")
                             for r in recs) / max(1, len(recs))
    per: dict[str, int] = {}
    for r in other["records"]:
        per[r["prompt"]] = per.get(r["prompt"], 0) + bool(r["got"]["zorb"])
    return {"file": str(path), "n": on["n"], "zorb": on["zorb"], "leak": off["zorb"], "colour": on["colour"],
            "background": on["background"], "wordings_n": other["n"], "wordings_zorb": other["zorb"],
            "wordings_leak": other_off["zorb"], "per_wording": per,
            "eyes_merged": len(merged) / max(1, len(zorbs)), "eyes_touching": len(touching) / max(1, len(zorbs)),
            "two_eyes": two(on["records"]), "wordings_two_eyes": two(other["records"]),
            "two_eyes_apart": apart(on["records"]), "wordings_two_eyes_apart": apart(other["records"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--seeds", type=int, nargs="+", default=[2, 3, 4, 5])
    p.add_argument("--wordings", type=Path, help="a text file of prompts, one per line (default: 16 built in)")
    p.add_argument("--wording-seeds", type=int, nargs="+", default=[200, 201, 202])
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    wordings = ([ln.strip() for ln in args.wordings.read_text().splitlines() if ln.strip()]
                if args.wordings else WORDINGS)
    results = []
    for f in args.files:
        r = judge_file(f, args.seeds, wordings, args.wording_seeds)
        results.append(r)
        print(f"{f}: sentence prompts zorb {r['zorb']:.2f} of {r['n']}, leak {r['leak']:.2f}, colour "
              f"{r['colour']:.2f}, background {r['background']:.2f}; other wordings zorb {r['wordings_zorb']:.2f} "
              f"of {r['wordings_n']}, leak {r['wordings_leak']:.2f}; of all zorbs, eyes one merged band: "
              f"{r['eyes_merged']:.2f}, two eyes touching: {r['eyes_touching']:.2f}; two eyes (apart or touching): "
              f"sentence {r['two_eyes']:.2f}, other wordings {r['wordings_two_eyes']:.2f}; two eyes apart: sentence "
              f"{r['two_eyes_apart']:.2f}, other wordings {r['wordings_two_eyes_apart']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
