"""The course's real path on the full-size SD1.5 architecture: all six notebooks, headless, on photos.

    OMP_NUM_THREADS=2 python benchmarks/real_path.py          # CPU: 192x192, fp32, 1 repeat x 2 epochs
    python benchmarks/real_path.py --out runs/real-path        # again in the same folder: the models are reused
    python benchmarks/real_path.py --sources single-file --resolution 128x128

Builds in ``--out`` (default: a new folder under runs/):

* ``sd15-diffusers/``: a random-weight pipeline of the published SD1.5 architecture in diffusers format
  (``lora_nb.archs.random_full_size_pipeline``, fp16 on disk);
* ``single-file/random-sd15.safetensors``: the same weights in the original single-file layout
  (``lora_nb.checkpoints.write_single_file``), with ``single-file/tokenizer/vocab.json`` + ``merges.txt`` beside
  it. CLIP's own vocabulary is not available offline: both models use a placeholder with CLIP's 49,408 tokens;
* ``photos/``: six scikit-image photos of different aspect ratios, three of them with a caption file of many
  comma-separated tags (longer than CLIP's 77 tokens: the realistic preset reads up to 225).

Then, for the diffusers folder and for the single file, runs notebooks 01 to 06 with
``lora_nb.course.run_course`` (preset realistic, crop mode none so training buckets the photos), and reports
each notebook's time and result, the LoRA file's size and metadata, and notebook 06's verdict and measures
(approximate offline: there is no DINO/CLIP). Training runs in fp32 on a CPU; with CUDA the defaults are
512x512 and fp16. Random weights: the pictures are noise and the verdict says nothing about quality; what is
shown is that the path runs on full-size models. Exit status 1 when a notebook failed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")
# Booru-style tag lists, longer than CLIP's 77 tokens, beside three of the photos (03 keeps them offline).
LONG_CAPTIONS = {
    "astronaut": "photo, woman, astronaut, smiling, looking at viewer, short hair, brown hair, brown eyes, "
                 "white spacesuit, orange collar, nasa patch, name tag, american flag, space shuttle model, "
                 "helmet on table, indoors, studio portrait, upper body, soft lighting, shallow depth of field, "
                 "bokeh, dark background, blue backdrop, film grain, 1980s, official portrait, realistic, "
                 "detailed face, detailed skin, sharp focus, high resolution, color photograph, front view, "
                 "centered composition, professional photography, dslr, natural skin texture, confident pose",
    "chelsea": "photo, cat, tabby cat, orange fur, striped fur, whiskers, green eyes, looking to the side, "
               "close-up, animal focus, no humans, indoors, wooden floor, soft natural light, window light, "
               "pink nose, pointed ears, fluffy, domestic cat, sitting, head turned, detailed fur texture, "
               "shallow depth of field, blurry background, warm colors, realistic, high detail, sharp focus, "
               "pet photography, candid, daytime, landscape orientation, film look, 35mm, color photograph",
    "coffee": "photo, coffee cup, cappuccino, latte art, saucer, spoon, white porcelain, wooden table, "
              "top-down view, still life, no humans, food focus, drink, foam, brown liquid, steam, cafe, "
              "morning, natural light, soft shadows, warm tones, shallow depth of field, bokeh, blurry background, "
              "close-up, realistic, high detail, sharp focus, product photography, minimal, centered, "
              "color photograph, landscape orientation, cozy, rustic, handle on the right, breakfast",
}
PICKED_META = ("ss_output_name", "ss_sd_model_name", "ss_max_token_length", "ss_sd_model_hash",
               "ss_new_sd_model_hash", "modelspec.architecture")


def parse_args(argv=None):
    import torch

    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="work folder (default: runs/real-path-<date>-<time>)")
    p.add_argument("--sources", nargs="+", choices=("diffusers", "single-file"), default=["diffusers", "single-file"])
    p.add_argument("--resolution", default="512x512" if gpu else "192x192",
                   help="training size; sides multiples of 64 for SD1.5 (default: 512x512 with CUDA, else 192x192)")
    p.add_argument("--bucket-step", type=int, default=64, help="bucket side step (a multiple of 64 for SD1.5)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--sample-steps", type=int, default=2, help="denoising steps of 05's previews and 06's images")
    p.add_argument("--mixed-precision", default="fp16" if gpu else "no", choices=("no", "fp16", "bf16"))
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- what the course runs on

def build_models(out: Path, seed: int) -> tuple[Path, Path, float]:
    """(diffusers folder, single-file checkpoint, seconds): a random full-size SD1.5 pipeline saved both ways
    (fp16 on disk); both reused when already in ``out``."""
    import torch

    from lora_nb.archs import random_full_size_pipeline
    from lora_nb.checkpoints import write_single_file

    folder, single = out / "sd15-diffusers", out / "single-file" / "random-sd15.safetensors"
    if (folder / "model_index.json").is_file() and single.is_file():
        print(f"models: reusing {folder} and {single}")
        return folder, single, 0.0
    t0 = time.perf_counter()
    pipe = random_full_size_pipeline("sd15", single.parent / "tokenizer", seed=seed, dtype=torch.float16)
    pipe.save_pretrained(folder)
    write_single_file(pipe, "sd15", single)
    del pipe
    gc.collect()
    return folder, single, time.perf_counter() - t0


def make_photos(folder: Path, tokenizer_dir: Path) -> dict[str, int]:
    """The photos as PNG in ``folder``, long tag lists beside three of them; ``{photo: caption tokens}`` as the
    placeholder tokenizer counts them (0: no caption file)."""
    from PIL import Image
    from skimage import data as skdata
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tok = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"))
    tokens = {}
    for name in PHOTOS:
        Image.fromarray(getattr(skdata, name)()).convert("RGB").save(folder / f"{name}.png")
        caption = LONG_CAPTIONS.get(name, "")
        if caption:
            (folder / f"{name}.txt").write_text(caption, encoding="utf-8")
        tokens[name] = len(tok(caption).input_ids) - 2 if caption else 0
    return tokens


def preview_prompts(steps: int) -> str:
    """05's previews (and its strength comparison, which takes the first one) as the realistic preset builds
    them from the trigger and class words, at ``steps`` denoising steps instead of the preset's 28."""
    negative = "--n lowres, blurry, deformed, watermark"
    lines = ["a photo of lnbx thing, looking at the camera, natural light", "a photo of lnbx thing in a park, smiling",
             "a photo of a thing, looking at the camera, natural light"]
    return "\n".join(f"{line} {negative} --d {i} --s {steps}" for i, line in enumerate(lines, 1))


def course_params(source: Path, photos: Path, args) -> dict:
    """The notebooks' parameters: the realistic preset on ``source``, small and fast enough for a CPU."""
    return {"preset": "realistic", "model_source": str(source), "source_dir": str(photos),
            "resolution": args.resolution, "bucket_step": args.bucket_step, "crop_mode": "none",
            "trigger_word": "lnbx", "class_name": "thing", "repeats": args.repeats, "epochs": args.epochs,
            "optimizer": "AdamW", "mixed_precision": args.mixed_precision, "save_precision": "fp16",
            "measure_time": True, "save_every_n_epochs": 1, "sample_every_n_epochs": args.epochs,
            "sample_prompts": preview_prompts(args.sample_steps),
            "strengths": "0, 1", "seeds": 1, "sample_steps": args.sample_steps, "run_experiments": False,
            "awkward_demo": False, "try_real_taggers": False, "measure_toy": 4, "measure_photos": 2, "measure_n": 8}


# --------------------------------------------------------------------------- what the course wrote

def printed(path: Path) -> str:
    import nbformat

    if not path.is_file():
        return ""
    nb = nbformat.read(path, as_version=4)
    return "\n".join("".join(o.get("text", "")) for c in nb.cells for o in c.get("outputs", []))


def papermill_seconds(path: Path):
    import nbformat

    if not path.is_file():
        return None
    return nbformat.read(path, as_version=4).metadata.get("papermill", {}).get("duration")


def lora_report(ws: Path) -> dict:
    """The final LoRA file of the workspace: name, size, the metadata fields the report shows, its buckets."""
    from safetensors import safe_open

    final = ws / "lora" / "lnbx.safetensors"
    if not final.is_file():
        return {}
    with safe_open(str(final), "pt") as f:
        meta = f.metadata() or {}
        n_tensors = len(list(f.keys()))
    buckets = json.loads(meta.get("ss_bucket_info", "{}") or "{}").get("buckets", {})
    return {"file": final.name, "bytes": final.stat().st_size, "tensors": n_tensors,
            "meta": {k: meta.get(k, "(absent)") for k in PICKED_META},
            "buckets": {"x".join(map(str, b.get("resolution", ()))): b.get("count") for b in buckets.values()}}


def diagnosis_report(ws: Path, text06: str) -> dict:
    """06's verdict, how it measured (and why approximately), and its printed verdict and measures lines."""
    path = ws / "diagnosis.json"
    if not path.is_file():
        return {}
    d = json.loads(path.read_text(encoding="utf-8"))
    keep = ("Verdict for this run", "DINO/CLIP", "base model:", "epoch ")
    lines = [ln.strip() for ln in text06.splitlines() if any(k in ln for k in keep)]
    return {"verdict": d.get("verdict"), "measures": d.get("measures"), "approximate": d.get("approximate"),
            "reason": d.get("approximate_reason"), "lines": list(dict.fromkeys(lines))[:8]}


def tagging_line(ws: Path) -> str:
    report = ws / "reports" / "tagging_report.json"
    if not report.is_file():
        return ""
    r = json.loads(report.read_text(encoding="utf-8"))
    longest = max(r.get("captions", {"": ""}).values(), key=len)
    return f"tagger {r.get('tagger')} (asked: {r.get('tagger_requested')}); longest caption {len(longest)} characters"


# --------------------------------------------------------------------------- one model source

def run_source(label: str, source: Path, photos: Path, out: Path, args) -> dict:
    from lora_nb.course import list_notebooks, run_course

    ws = out / f"course-{label}"
    if ws.exists():  # this script's own workspace from an earlier run in the same folder
        shutil.rmtree(ws)
    print(f"\n=== {label}: {source}", flush=True)
    t0 = time.perf_counter()
    summary = run_course(ws, params=course_params(source, photos, args), quick=True)
    total = time.perf_counter() - t0
    runs = {r.name: r for r in summary.runs}
    notebooks = []
    for nb in list_notebooks():
        r = runs.get(nb.stem)
        executed = ws / "executed" / nb.name
        notebooks.append({"name": nb.stem, "result": "not run" if r is None else "ok" if r.ok else "FAILED",
                          "seconds": r.seconds if r else None, "papermill": papermill_seconds(executed) if r else None,
                          "error": r.error if r else ""})
    return {"label": label, "source": str(source), "ok": summary.ok, "seconds": total, "notebooks": notebooks,
            "lora": lora_report(ws), "diagnosis": diagnosis_report(ws, printed(ws / "executed" / "06_diagnosis.ipynb")),
            "tagging": tagging_line(ws), "workspace": str(ws)}


def describe(result: dict) -> list[str]:
    lines = [f"--- {result['label']} ({result['source']}): {'ok' if result['ok'] else 'FAILED'} in "
             f"{result['seconds']:.0f} s; workspace {result['workspace']}"]
    for nb in result["notebooks"]:
        pm = f" (papermill {nb['papermill']:.1f} s)" if nb["papermill"] is not None else ""
        secs = f"{nb['seconds']:7.1f} s{pm}" if nb["seconds"] is not None else ""
        lines.append(f"  {nb['name']:<15} {nb['result']:<8} {secs}")
        if nb["error"]:
            lines.append(f"      {nb['error']}")
    if result["tagging"]:
        lines.append(f"  03: {result['tagging']}")
    lora = result["lora"]
    if lora:
        lines.append(f"  LoRA {lora['file']}: {lora['bytes'] / 1e6:.1f} MB, {lora['tensors']} tensors")
        lines.append(f"    buckets (resolution: pictures): {lora['buckets']}")
        lines += [f"    {k}: {v}" for k, v in lora["meta"].items()]
    diag = result["diagnosis"]
    if diag:
        lines.append(f"  06: verdict {diag['verdict']}, measures {diag['measures']} (approximate: {diag['approximate']})")
        if diag["reason"]:
            lines.append(f"    reason: {diag['reason']}")
        lines += [f"    | {ln}" for ln in diag["lines"]]
    return lines


def cell(nb: dict) -> str:
    return (f"{nb['seconds']:.0f}s " if nb["seconds"] is not None else "") + nb["result"]


def table(results: list[dict]) -> list[str]:
    names = [nb["name"][:2] for nb in results[0]["notebooks"]] if results else []
    head = f"{'source':<12}" + "".join(f"{n:>11}" for n in names) + f"{'total':>9}{'LoRA MB':>9}  buckets / verdict"
    rows = [head, "-" * len(head)]
    for r in results:
        cells = "".join(f"{cell(nb):>11}" for nb in r["notebooks"])
        lora, diag = r["lora"], r["diagnosis"]
        size = f"{lora['bytes'] / 1e6:.1f}" if lora else "-"
        tail = f"{lora.get('buckets', '-')} / {diag.get('verdict', '-')} ({diag.get('measures', '-')})"
        rows.append(f"{r['label']:<12}{cells}{r['seconds']:>8.0f}s{size:>9}  {tail}")
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"  # the notebooks' kernels inherit these
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out or ROOT / "runs" / time.strftime("real-path-%Y%m%d-%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"work folder {out}; {device}; resolution {args.resolution}, bucket step {args.bucket_step}, "
          f"{args.repeats} repeat(s) x {args.epochs} epoch(s), mixed precision {args.mixed_precision}")
    folder, single, seconds = build_models(out, args.seed)
    if seconds:
        print(f"models: random full-size SD1.5 written in {seconds:.0f} s: {folder} "
              f"({sum(p.stat().st_size for p in folder.rglob('*') if p.is_file()) / 1e9:.2f} GB), "
              f"{single} ({single.stat().st_size / 1e9:.2f} GB)")
    print("tokenizer: a placeholder vocabulary with CLIP's 49,408 tokens (CLIP's own is not available offline; "
          "any vocabulary of that size fits random weights), so words split into more tokens than CLIP would")
    tokens = make_photos(out / "photos", single.parent / "tokenizer")
    print(f"photos: {out / 'photos'}; caption tokens (placeholder vocabulary, 0 = no caption file): {tokens}")
    sources = {"diffusers": folder, "single-file": single}
    results = [run_source(label, sources[label], out / "photos", out, args) for label in args.sources]
    print()
    for r in results:
        print("\n".join(describe(r)))
    print()
    print("\n".join(table(results)))
    (out / "real_path.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    print(f"\nfigures also in {out / 'real_path.json'}")
    return 0 if results and all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
