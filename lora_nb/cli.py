"""The ``lora-nb`` command line: train, inspect, resize, merge, extract, config, course, diagnose, experiments.

Errors a learner can fix are printed as one clear message (exit status 2),
never as a traceback. Each command imports the modules it runs inside its own
function, so a quick command (``inspect``, ``config``) does not pay for torch and
diffusers.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from lora_nb import LoraNbError


def cmd_train(args) -> int:
    from lora_nb.config import Config
    from lora_nb.train import train

    cfg = Config.load(args.config)
    if args.set:
        cfg = cfg.with_overrides(args.set)
    # LORA_NB_BATCH_LOG=<folder>: each process lists the images of its batches (to check data-parallel runs)
    result = train(cfg, on_event=_print_event, resume=not args.restart,
                   batch_log_dir=os.environ.get("LORA_NB_BATCH_LOG") or None)
    print(f"Done: {result.steps} steps in {result.seconds:.1f} s. Files:")
    for f in result.files:
        print(f"  {f}")
    return 0


def _print_event(event) -> None:
    if event.kind == "start":
        plan = event.data["plan"]
        print(plan.describe() + f" (precision: {event.data['precision']}, device: {event.data['device']})")
        if event.data.get("resumed_epoch_step"):
            print(f"Resuming at step {event.data['resumed_at_step']}, inside epoch "
                  f"{event.data['resumed_from_epoch'] + 1} (after {event.data['resumed_epoch_step']} of its steps), "
                  "from the saved state.")
        elif event.data["resumed_from_epoch"]:
            print(f"Resuming after epoch {event.data['resumed_from_epoch']} from the saved state.")
    elif event.kind == "warning":
        print(f"warning: {event.data['message']}", file=sys.stderr)
    elif event.kind == "info":
        print(event.data["message"])
    elif event.kind == "epoch":
        val = event.data.get("val_loss")
        train_loss = event.data.get("train_loss")
        print(f"epoch {event.epoch}: train loss {train_loss:.4f}" if train_loss is not None else f"epoch {event.epoch}",
              f"validation loss {val:.4f}" if val is not None else "")
    elif event.kind == "save":
        print(f"saved {event.data['path']}")


def cmd_inspect(args) -> int:
    from lora_nb.lora_io import format_inspection, inspect_lora

    info = inspect_lora(args.file)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(format_inspection(info))
    return 1 if info.get("problems") else 0


def cmd_resize(args) -> int:
    from lora_nb.lora_tools import format_report, resize_lora

    print(format_report(resize_lora(args.file, args.output, args.rank, args.dynamic), "resized"))
    return 0


def cmd_merge(args) -> int:
    from lora_nb.lora_tools import format_report, merge_into_checkpoint, merge_loras

    if args.into_checkpoint:
        if len(args.files) != 1 or args.ratios or args.rank:
            raise LoraNbError("merge --into-checkpoint takes one LoRA file and --ratio (not --ratios / --rank).")
        fmt = "single-file" if args.output.endswith(".safetensors") else "diffusers"
        done = merge_into_checkpoint(args.into_checkpoint, args.files[0], args.output, args.ratio, fmt, args.precision)
        print(f"merged {args.files[0]} x {args.ratio:g} into {args.into_checkpoint}: wrote {done['path']} ({fmt}; "
              + ", ".join(f"{c} {n} modules" for c, n in done["modules"].items()) + ")")
        return 0
    if len(args.files) < 2:
        raise LoraNbError("merge needs two or more LoRA files (or one with --into-checkpoint BASE).")
    print(format_report(merge_loras(args.files, args.ratios, args.output, args.rank), "merged"))
    return 0


def cmd_extract(args) -> int:
    from lora_nb.lora_tools import extract_lora, format_report

    done = extract_lora(args.base, args.tuned, args.output, args.rank, args.conv_rank, args.precision)
    print(format_report(done, "extracted"))
    return 0


def cmd_config(args) -> int:
    from lora_nb.config import PRESET_DESCRIPTIONS, Config, preset

    if args.list_presets:
        width = max(map(len, PRESET_DESCRIPTIONS))
        for name, text in PRESET_DESCRIPTIONS.items():
            print(f"{name:<{width}}  {text}")
        return 0
    cfg = preset(args.preset, args.trigger or "", args.class_word or "") if args.preset else Config()
    if args.set:
        cfg = cfg.with_overrides(args.set)
    sys.stdout.write(cfg.to_yaml())
    return 0


def cmd_course(args) -> int:
    from lora_nb.course import run_course

    params = dict(_parse_param(p) for p in (args.param or []))
    summary = run_course(args.workspace, params=params, quick=args.quick, params_file=args.params_file,
                         only=args.only)
    print(summary.describe())
    return 0 if summary.ok else 1


def cmd_diagnose(args) -> int:
    from lora_nb.diagnose import diagnose_workspace, format_diagnosis

    chosen = {k: v for k, v in (("dino", args.dino), ("clip", args.clip)) if v}  # unset: lora_nb.embedders' defaults
    result = diagnose_workspace(args.workspace, **chosen)
    print(json.dumps(result, indent=2, default=str) if args.json else format_diagnosis(result))
    return 0


def cmd_experiments(args) -> int:
    import shlex
    import time as _time

    from lora_nb.remedies import format_table, run_table, write_table

    table = run_table(args.out, seeds=args.seeds, only=args.only, steps=args.steps, measured_only=args.measured_only)
    shown, skip = [], False  # the command that reproduces the table: without the options that only report
    for a in args.argv:
        if skip or a == "--measured-only" or a.startswith("--report="):
            skip = False
            continue
        skip = a == "--report"
        if not skip:
            shown.append(a)
    command = "lora-nb experiments" + "".join(f" {shlex.quote(a)}" for a in shown)
    js, md = write_table(table, args.report or args.out, command, _time.strftime("%Y-%m-%d"))
    print(format_table(table, command))
    print(f"wrote {js} and {md}")
    return 0


def cmd_compare_networks(args) -> int:
    import time as _time

    from lora_nb.network_comparison import format_comparison, run_comparison, write_comparison

    table = run_comparison(args.out, seeds=args.seeds, steps=args.steps, max_steps=args.max_steps or None,
                           only=args.only or None)
    command = f"lora-nb compare-networks --seeds {args.seeds} --out {args.out}" + (
        f" --max-steps {args.max_steps}" if args.max_steps else "") + (f" --only {' '.join(args.only)}" if args.only else "")
    js, md = write_comparison(table, args.report or args.out, command, _time.strftime("%Y-%m-%d"))
    print(format_comparison(table, command, _time.strftime("%Y-%m-%d")))
    print(f"wrote {js} and {md}")
    return 0


def _parse_param(pair: list[str]) -> tuple[str, object]:
    import yaml

    name, value = pair
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return name, value
    if isinstance(parsed, bool) and value.lower() not in ("true", "false"):
        return name, value  # "no" / "yes" / "on" stay text (e.g. -p mixed_precision no)
    return name, parsed


def add_lora_tool_parsers(sub) -> None:
    """The ``resize``, ``merge`` and ``extract`` commands (lora_nb.lora_tools)."""
    rs = sub.add_parser("resize", help="rewrite a LoRA file at a lower rank (SVD, as sd-scripts' resize_lora)")
    rs.add_argument("file", help="a kohya-format LoRA .safetensors")
    rs.add_argument("--rank", type=int, required=True, help="the new rank (with --dynamic: the most any module gets)")
    rs.add_argument("--dynamic", metavar="fro:X", help="per module the fewest ranks keeping X of its Frobenius "
                                                      "norm, e.g. fro:0.9")
    rs.add_argument("-o", "--output", required=True, help="the .safetensors file to write")
    rs.set_defaults(func=cmd_resize)

    mg = sub.add_parser("merge", help="merge LoRA files into one (SVD), or one LoRA into a base model")
    mg.add_argument("files", nargs="+", help="LoRA .safetensors files (one with --into-checkpoint)")
    mg.add_argument("--ratios", nargs="+", type=float, help="one weight per file (default 1 each)")
    mg.add_argument("--rank", type=int, help="rank of the merged LoRA (default: the largest source rank; the sum "
                                             "of the ranks is exact)")
    mg.add_argument("--into-checkpoint", metavar="BASE", help="fuse the LoRA into this base model (folder, "
                                                              "single file or hub id)")
    mg.add_argument("--ratio", type=float, default=1.0, help="with --into-checkpoint: the LoRA's strength")
    mg.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32",
                    help="with --into-checkpoint: the saved model's precision")
    mg.add_argument("-o", "--output", required=True, help="a .safetensors LoRA; with --into-checkpoint a folder "
                                                         "(diffusers) or a .safetensors file (single file)")
    mg.set_defaults(func=cmd_merge)

    ex = sub.add_parser("extract", help="extract a LoRA from a fine-tuned model and its base (SVD of the "
                                        "difference)")
    ex.add_argument("base", help="the base model (folder, single file or hub id)")
    ex.add_argument("tuned", help="the fine-tuned model, same architecture")
    ex.add_argument("--rank", type=int, required=True)
    ex.add_argument("--conv-rank", type=int, default=0, help="also the UNet's 3x3 convolutions at this rank "
                                                             "(a LoCon: sd-scripts' conv_dim set)")
    ex.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default="fp16")
    ex.add_argument("-o", "--output", required=True, help="the .safetensors file to write")
    ex.set_defaults(func=cmd_extract)


def build_parser() -> argparse.ArgumentParser:
    from lora_nb.config import PRESETS

    p = argparse.ArgumentParser(prog="lora-nb", description="Train and inspect LoRAs for Stable Diffusion.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a LoRA from a config YAML")
    t.add_argument("config", help="config YAML (write one with `lora-nb config --preset toy`)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting, e.g. network.rank=16")
    t.add_argument("--restart", action="store_true", help="ignore saved state and start over")
    t.set_defaults(func=cmd_train)

    i = sub.add_parser("inspect", help="show what a LoRA file holds and flag problems")
    i.add_argument("file")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=cmd_inspect)

    add_lora_tool_parsers(sub)

    c = sub.add_parser("config", help="print a full config YAML")
    c.add_argument("--preset", choices=list(PRESETS), help="start from a preset (--list-presets says what each is)")
    c.add_argument("--list-presets", action="store_true", help="list the presets with a line on each")
    c.add_argument("--trigger", help="real presets: the trigger word put first in captions and used in previews")
    c.add_argument("--class-word", help="real presets: the class word of the preview prompts (person, 1girl, dog)")
    c.add_argument("--set", action="append", metavar="KEY=VALUE")
    c.set_defaults(func=cmd_config)

    r = sub.add_parser("course", help="run the notebooks headlessly through papermill")
    r.add_argument("--workspace", default="runs/course", help="folder for the results and executed notebooks")
    r.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="a notebook parameter for every notebook that has it")
    r.add_argument("--params-file", help="YAML file of notebook parameters")
    r.add_argument("--quick", action="store_true", help="the smallest meaningful run")
    r.add_argument("--only", nargs="*", help="run only these notebooks (e.g. 01 04)")
    r.set_defaults(func=cmd_course)

    e = sub.add_parser("experiments", help="the remedies table: every remedy and folk claim trained and measured "
                                           "on the toy world over several seeds (resumable)")
    e.add_argument("--seeds", type=int, default=3, help="training seeds per run (3 or more to tell effects from noise)")
    e.add_argument("--only", nargs="+", metavar="NAME", help="these runs only (their baselines come along)")
    e.add_argument("--out", default="runs/experiments", help="folder of the runs (kept; a rerun resumes)")
    e.add_argument("--report", default="", help="folder for remedies.json / remedies.md (default: --out)")
    e.add_argument("--steps", type=int, default=20, help="denoising steps of each measured image")
    e.add_argument("--measured-only", action="store_true", help="train nothing: the table of the runs measured so far")
    e.set_defaults(func=cmd_experiments)

    n = sub.add_parser("compare-networks", help="lora, locon, loha, lokr and lora with DoRA at the course LoRA's "
                                                "file size, and the course LoRA resized to rank 4 and 2, judged on the "
                                                "toy world")
    n.add_argument("--seeds", type=int, default=3, help="training seeds per type (3 or more)")
    n.add_argument("--out", default="runs/networks", help="folder of the runs (kept; a rerun resumes)")
    n.add_argument("--report", default="", help="folder for networks.json / networks.md (default: --out)")
    n.add_argument("--steps", type=int, default=20, help="denoising steps of each judged image")
    n.add_argument("--max-steps", type=int, default=0, help="cap each run's training steps (quick checks; 0 = none)")
    n.add_argument("--only", nargs="+", metavar="ROW", default=[],
                   help="these rows only (locon, loha, lokr, lora-dora, lora-resized-4, lora-resized-2); the course's "
                        "lora row comes along")
    n.set_defaults(func=cmd_compare_networks)

    d = sub.add_parser("diagnose", help="over/underfitting diagnosis of a trained workspace")
    d.add_argument("workspace")
    d.add_argument("--json", action="store_true")
    d.add_argument("--dino", help="real models: the DINO model, a hub id or a local folder (default facebook/dinov2-small)")
    d.add_argument("--clip", help="real models: the CLIP model, a hub id or a local folder "
                                  "(default openai/clip-vit-base-patch32)")
    d.set_defaults(func=cmd_diagnose)
    return p


class Terminated(BaseException):
    """SIGTERM (a job scheduler, ``kill``, a notebook host stopping): handled like Ctrl-C."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[2:] if argv is None else argv[1:])
    from lora_nb.notebook import quiet_known_noise  # each command imports only what it runs (start-up time)

    quiet_known_noise()
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return args.func(args)
    except LoraNbError as exc:
        print(f"lora-nb: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as exc:
        how = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"lora-nb: {how}; files saved so far are intact, and a rerun continues from the last save.",
              file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
