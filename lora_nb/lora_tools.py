"""LoRA tools: resize a LoRA file to another rank, merge LoRA files into one, merge a LoRA into a base model,
and extract a LoRA from a fine-tuned model and its base — the jobs of kohya's sd-scripts ``networks/
resize_lora.py``, ``svd_merge_lora.py`` / ``merge_lora.py`` and ``extract_lora_from_models.py``.

They share one idea. A LoRA module adds ``W = (alpha/r)·up@down`` to the module's weight (convolutions
flattened to ``[out, in·kh·kw]``). The SVD ``W = U·diag(S)·Vh`` orders W's directions by strength, and its
first k terms are the best rank-k approximation of W; the share of the Frobenius norm kept,
``sqrt(Σ kept S²) / sqrt(Σ S²)``, says how much of the update survives (1.0: all of it).

What the files written here hold:

- S goes into the up weight (``up = U·diag(S)``, ``down = Vh``), as sd-scripts does: down's rows are
  orthonormal (every value within ±1, safe in fp16), and a file compares one to one with sd-scripts' output.
- ``resize`` keeps the source's scale ``alpha/r`` (new alpha = scale × new rank, as sd-scripts), so a
  rank-16 / alpha-8 file becomes rank-8 / alpha-4 and still applies its truncated W exactly; ``merge`` and
  ``extract`` write alpha = rank (scale 1), as the sources' scales differ or there are none.
- Plain LoRA only: LoHa/LoKr (LyCORIS ``hada_*`` / ``lokr_*``) and diffusers-format files are refused with
  what to do.

Heavy libraries (diffusers through ``lora_nb.models``) are imported inside the functions that load models,
so ``lora-nb resize`` and ``lora-nb merge`` of LoRA files start without them.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import torch

from lora_nb import LoraNbError
from lora_nb.lora_io import (PRECISIONS, _atomic_save_file, _down_keys, _module_of, _up_key, file_format,
                             guess_family, read_lora_file)

DYNAMIC_METHODS = ("fro",)
UNCHANGED = 1e-6  # a text encoder whose every targeted weight moved less than this was not trained
CHECKPOINT_FORMATS = ("diffusers", "single-file")


# --------------------------------------------------------------------------- the maths of one module

def module_update(down: torch.Tensor, up: torch.Tensor, alpha: float | None = None) -> torch.Tensor:
    """What one LoRA module adds to its weight, ``(alpha/r)·up@down`` in float32: ``[out, in]`` or, for a
    convolution, ``[out, in, kh, kw]``. No alpha means alpha = r (scale 1), as the loaders read it."""
    r = down.shape[0]
    scale = (r if alpha is None else float(alpha)) / r
    w = up.float().flatten(1) @ down.float().flatten(1)
    if down.ndim == 4:
        w = w.reshape(up.shape[0], *down.shape[1:])
    return w * scale


def kept_share(s: torch.Tensor, k: int) -> float:
    """The share of the Frobenius norm that the first ``k`` singular values ``s`` keep (1.0 for a zero W)."""
    total = float(s.double().pow(2).sum())
    if total == 0.0:
        return 1.0
    return math.sqrt(float(s[:k].double().pow(2).sum()) / total)


def choose_rank(s: torch.Tensor, cap: int, fro: float | None = None) -> int:
    """How many singular values to keep: ``cap`` (at most as many as there are), or with ``fro`` the fewest
    whose share of the Frobenius norm reaches ``fro``, never more than ``cap``; at least 1."""
    cap = max(1, min(int(cap), len(s)))
    if fro is None:
        return cap
    energy = s.double().pow(2)
    total = float(energy.sum())
    if total == 0.0:
        return 1
    shares = (energy.cumsum(0) / total).sqrt()
    reached = torch.nonzero(shares >= fro - 1e-12)
    k = int(reached[0]) + 1 if len(reached) else len(s)
    return max(1, min(k, cap))


def decompose(w: torch.Tensor, rank: int, fro: float | None = None, scale: float = 1.0) -> dict:
    """A LoRA pair for the update ``w`` by SVD: ``{"down", "up", "rank", "alpha", "kept"}``.

    ``rank`` caps the rank (``fro``: the Frobenius share to reach, see :func:`choose_rank`). S goes into up;
    ``scale`` is the alpha/r the pair will be read with (alpha = scale × rank), so ``up`` is divided by it
    and ``scale·up@down`` is the truncated ``w``. Convolutions: down ``[k, in, kh, kw]``, up ``[out, k, 1, 1]``.
    """
    flat = w.float().flatten(1)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    k = choose_rank(s, rank, fro)
    up = (u[:, :k] * s[:k]) / scale
    down = vh[:k]
    if w.ndim == 4:
        down = down.reshape(k, *w.shape[1:])
        up = up.reshape(w.shape[0], k, 1, 1)
    return {"down": down.contiguous(), "up": up.contiguous(), "rank": k, "alpha": scale * k,
            "kept": kept_share(s, k)}


def pair_tensors(name: str, pair: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The three kohya tensors of one module (``<name>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``)."""
    return {f"{name}.lora_down.weight": pair["down"].to(dtype).contiguous(),
            f"{name}.lora_up.weight": pair["up"].to(dtype).contiguous(),
            f"{name}.alpha": torch.tensor(float(pair["alpha"]), dtype=dtype)}


# --------------------------------------------------------------------------- reading LoRA files

def check_plain_lora(path: Path, tensors: dict) -> None:
    """Refuse, with what to do, a file these tools cannot rewrite: LoHa/LoKr, diffusers format, no LoRA."""
    variant = [k for k in tensors if ".hada_" in k or ".lokr_" in k]
    if variant:
        raise LoraNbError(f"{path.name} is a LoHa/LoKr (LyCORIS) file (keys such as {variant[0]}): resize and "
                          "merge handle plain LoRA (lora_down/lora_up) only; use LyCORIS' own tools for it.")
    fmt = file_format(tensors)
    if fmt == "diffusers":
        raise LoraNbError(f"{path.name} is a diffusers-format LoRA (keys such as {next(iter(tensors))}): these "
                          "tools read the kohya format; save the LoRA with save.formats kohya and use that file.")
    if fmt != "kohya" or not _down_keys(tensors):
        raise LoraNbError(f"{path.name} is not a kohya LoRA file (keys such as {next(iter(tensors), '<none>')}).")
    other = [k for k in tensors if not k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))]
    if other:
        raise LoraNbError(f"{path.name} holds tensors a plain LoRA does not (e.g. {other[0]}; DoRA or another "
                          "variant): these tools rewrite plain LoRA files only.")


def lora_modules(path: str | Path) -> tuple[dict[str, dict], dict[str, str], torch.dtype]:
    """A plain kohya LoRA file as ``{module: {"down", "up", "alpha"}}``, its metadata and its dtype."""
    path = Path(path)
    tensors, meta = read_lora_file(path)
    check_plain_lora(path, tensors)
    modules = {}
    for key in _down_keys(tensors):
        name = _module_of(key)
        up = tensors.get(_up_key(key))
        if up is None:
            raise LoraNbError(f"{path.name}: {name} has a lora_down weight but no lora_up weight (a broken file).")
        alpha = tensors.get(f"{name}.alpha")
        modules[name] = {"down": tensors[key], "up": up, "alpha": None if alpha is None else float(alpha.float())}
    return modules, meta, tensors[_down_keys(tensors)[0]].dtype


def parse_dynamic(text: str | None) -> float | None:
    """``fro:0.9`` -> 0.9 (the Frobenius share to keep per module); None or '' -> None."""
    if not text:
        return None
    method, _, value = str(text).partition(":")
    try:
        share = float(value)
    except ValueError:
        share = -1.0
    if method not in DYNAMIC_METHODS or not 0.0 < share <= 1.0:
        raise LoraNbError(f"dynamic={text!r}: use fro:X with X the share of each module's Frobenius norm to keep, "
                          "0 < X <= 1 (e.g. fro:0.9).")
    return share


def _check_rank(rank: int | None) -> None:
    if rank is not None and (isinstance(rank, bool) or int(rank) != rank or rank < 1):
        raise LoraNbError(f"rank={rank} must be a positive whole number (typical: 4 to 128).")


def _check_lora_dst(dst: Path, inputs: list | None = None) -> None:
    """The output must be a new .safetensors path, never one of ``inputs`` (a tool never changes its inputs)."""
    for src in inputs or []:
        if Path(src).exists() and dst.exists() and dst.resolve() == Path(src).resolve():
            raise LoraNbError(f"-o {dst} is one of the input files: name a new file (the inputs are never "
                              "overwritten).")
    if dst.suffix != ".safetensors":
        raise LoraNbError(f"{dst}: LoRA files are written as .safetensors; change the output name's extension.")
    if dst.is_dir():
        raise LoraNbError(f"{dst} is a folder: name the .safetensors file to write.")


# --------------------------------------------------------------------------- resize

def resize_lora(src: str | Path, dst: str | Path, rank: int, dynamic: str | None = None) -> dict:
    """Write ``src`` at rank ``rank`` (or, with ``dynamic`` ``fro:X``, each module at the fewest ranks that keep
    X of its Frobenius norm, at most ``rank``) to ``dst``, in the source's dtype.

    Per module: SVD of the full update, the top singular values kept, the source's alpha/r kept (see the
    module's docstring). A module never gets more ranks than its source has (the rest would be zeros).
    Returns a report: per module its new rank and kept share, file sizes, the metadata written.
    """
    src, dst = Path(src), Path(dst)
    _check_rank(rank)
    fro = parse_dynamic(dynamic)
    _check_lora_dst(dst, [src])
    modules, meta, dtype = lora_modules(src)
    top = max(m["down"].shape[0] for m in modules.values())
    if fro is None and rank > top:
        raise LoraNbError(f"--rank {rank} is above the file's rank ({top}): resizing only lowers the rank (a "
                          f"higher one would add zeros). Give a rank under {top}, or --dynamic fro:X to let each "
                          "module keep what it needs.")
    tensors, report = {}, {}
    for name, m in modules.items():
        r = m["down"].shape[0]
        scale = (r if m["alpha"] is None else m["alpha"]) / r
        pair = decompose(module_update(m["down"], m["up"], m["alpha"]), min(rank, r), fro, scale)
        tensors.update(pair_tensors(name, pair, dtype))
        report[name] = {"rank": pair["rank"], "alpha": pair["alpha"], "kept": pair["kept"], "from_rank": r}
    tool = {"tool": "resize", "from": src.name, "rank": int(rank), "dynamic": dynamic or None,
            **kept_summary(report)}
    new_meta = resized_metadata(meta, report, tool)
    _atomic_save_file(tensors, dst, new_meta)
    return {"path": str(dst), "modules": report, "size_before": src.stat().st_size,
            "size_after": dst.stat().st_size, "metadata": new_meta, **kept_summary(report)}


def kept_summary(report: dict[str, dict]) -> dict[str, float]:
    """Min, median and mean of the modules' kept Frobenius shares."""
    shares = sorted(v["kept"] for v in report.values())
    mid = len(shares) // 2
    median = shares[mid] if len(shares) % 2 else (shares[mid - 1] + shares[mid]) / 2
    return {"fro_kept_min": shares[0], "fro_kept_median": median, "fro_kept_mean": sum(shares) / len(shares)}


def resized_metadata(meta: dict[str, str], report: dict[str, dict], tool: dict) -> dict[str, str]:
    """The source's metadata with the new ``ss_network_dim`` / ``ss_network_alpha`` ("Dynamic" when modules
    differ, as sd-scripts writes) and ``lora_nb_tool``; the source's ``sshs_*`` hashes are dropped (stale)."""
    from lora_nb.lora_io import _fmt_number

    ranks = {v["rank"] for v in report.values()}
    alphas = {round(v["alpha"], 6) for v in report.values()}
    out = {k: v for k, v in meta.items() if not k.startswith("sshs_")}
    out["ss_network_dim"] = str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic"
    out["ss_network_alpha"] = _fmt_number(next(iter(alphas))) if len(alphas) == 1 else "Dynamic"
    out["lora_nb_tool"] = json.dumps(tool)
    return out


def format_report(report: dict, what: str) -> str:
    """A few lines on a tool's result: modules, ranks, the kept shares, the file sizes."""
    ranks = sorted({v["rank"] for v in report["modules"].values()})
    rank_text = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]} to {ranks[-1]}"
    lines = [f"{what} {report['path']}: {len(report['modules'])} modules at {rank_text}",
             f"  Frobenius norm kept per module: min {report['fro_kept_min']:.4f}, median "
             f"{report['fro_kept_median']:.4f}, mean {report['fro_kept_mean']:.4f}"]
    if "size_before" in report:
        lines.append(f"  size: {report['size_before'] / 1e6:.2f} MB -> {report['size_after'] / 1e6:.2f} MB")
    else:
        lines.append(f"  size: {report['size_after'] / 1e6:.2f} MB")
    lines += [f"  {note}" for note in report.get("notes", [])]
    return "\n".join(lines)


# --------------------------------------------------------------------------- merge LoRA files

def merge_loras(srcs: list, ratios: list[float] | None, dst: str | Path, rank: int | None = None) -> dict:
    """Merge LoRA files into one: per module ``W = Σ ratio_i·(alpha_i/r_i)·up_i@down_i`` over the files that
    have it, re-decomposed by SVD to ``rank`` (default: the largest source rank) with alpha = rank. Exact
    when ``rank`` reaches the sum of the sources' ranks. All files must be for one model family."""
    srcs, dst = [Path(s) for s in srcs], Path(dst)
    ratios = [1.0] * len(srcs) if not ratios else [float(r) for r in ratios]
    if len(ratios) != len(srcs):
        raise LoraNbError(f"{len(srcs)} LoRA files but {len(ratios)} ratios: give one ratio per file.")
    _check_rank(rank)
    _check_lora_dst(dst, srcs)
    files = [lora_modules(s) for s in srcs]
    _check_one_family(srcs, files)
    rank = rank or max(m["down"].shape[0] for mods, _, _ in files for m in mods.values())
    dtype = files[0][2]
    tensors, report = {}, {}
    for name, w in summed_updates(srcs, files, ratios).items():
        pair = decompose(w, rank)
        tensors.update(pair_tensors(name, pair, dtype))
        report[name] = {"rank": pair["rank"], "alpha": pair["alpha"], "kept": pair["kept"]}
    tool = {"tool": "merge", "from": [s.name for s in srcs], "ratios": ratios, "rank": int(rank),
            **kept_summary(report)}
    meta = merged_metadata(files, report, rank, tool)
    _atomic_save_file(tensors, dst, meta)
    return {"path": str(dst), "modules": report, "size_after": dst.stat().st_size, "metadata": meta,
            **kept_summary(report)}


def _check_one_family(srcs: list[Path], files: list) -> None:
    families = [guess_family(_as_tensors(mods), meta) for mods, meta, _ in files]
    if len(set(families)) > 1:
        named = ", ".join(f"{s.name} ({f})" for s, f in zip(srcs, families))
        raise LoraNbError(f"These LoRAs are for different model families: {named}. Only LoRAs of one family "
                          "(all SD1.5 or all SDXL) can be merged.")


def _as_tensors(mods: dict[str, dict]) -> dict[str, torch.Tensor]:
    """The down/up tensors under their kohya keys (what :func:`lora_io.guess_family` reads)."""
    out = {}
    for name, m in mods.items():
        out[f"{name}.lora_down.weight"] = m["down"]
        out[f"{name}.lora_up.weight"] = m["up"]
    return out


def summed_updates(srcs: list[Path], files: list, ratios: list[float]) -> dict[str, torch.Tensor]:
    """``{module: Σ ratio_i·W_i}`` over every module of any file (a module only some files have: their sum)."""
    total: dict[str, torch.Tensor] = {}
    for src, (mods, _, _), ratio in zip(srcs, files, ratios):
        for name, m in mods.items():
            w = ratio * module_update(m["down"], m["up"], m["alpha"])
            if name in total and total[name].shape != w.shape:
                raise LoraNbError(f"{name} has shape {list(w.shape)} in {src.name} but {list(total[name].shape)} "
                                  "in the file before it: these LoRAs are for different models.")
            total[name] = total[name] + w if name in total else w
    return total


def merged_metadata(files: list, report: dict[str, dict], rank: int, tool: dict) -> dict[str, str]:
    """``ss_*`` metadata of a merged file (family and base model name from the first file) + ``lora_nb_tool``."""
    from lora_nb.lora_io import ss_metadata

    mods, meta, _ = files[0]
    family = guess_family(_as_tensors(mods), meta)
    te = any(not name.startswith("lora_unet_") for name in report)
    extra = {"lora_nb_tool": json.dumps(tool), "ss_training_comment": "merged with lora-nb from "
             + ", ".join(f"{n} x {r:g}" for n, r in zip(tool["from"], tool["ratios"]))}
    return ss_metadata(family, meta.get("ss_sd_model_name", "merged"), rank, float(rank), te, extra)


# --------------------------------------------------------------------------- merge into a base model

def merge_into_checkpoint(base: str | Path, lora: str | Path, dst: str | Path, ratio: float = 1.0,
                          fmt: str = "diffusers", precision: str = "fp32") -> dict:
    """Fuse ``lora`` at ``ratio`` into the base model ``base`` (a diffusers folder, a single file, a hub id)
    and save the result: ``fmt`` ``diffusers`` (a folder, with ``lora_nb_merge.json`` saying what was done)
    or ``single-file`` (one ``.safetensors`` in the original layout, the same record in its metadata)."""
    from lora_nb.lora_io import load_lora
    from lora_nb.models import load_base_model

    dst = Path(dst)
    if fmt not in CHECKPOINT_FORMATS:
        raise LoraNbError(f"checkpoint format {fmt!r} is not known: use one of {', '.join(CHECKPOINT_FORMATS)}.")
    if precision not in PRECISIONS:
        raise LoraNbError(f"precision={precision!r} is not known: use one of {', '.join(PRECISIONS)}.")
    _check_checkpoint_dst(dst, fmt, Path(base))
    model = load_base_model(base)
    loaded = load_lora(model.pipe, lora, adapter_name="merge")
    components = [c for c in ("unet", "text_encoder", "text_encoder_2") if c in loaded]
    model.pipe.fuse_lora(components=components, lora_scale=float(ratio), adapter_names=["merge"])
    model.pipe.unload_lora_weights()
    record = {"tool": "merge", "base": Path(str(base)).name, "lora": Path(lora).name, "ratio": float(ratio),
              "modules": loaded, "precision": precision}
    if fmt == "single-file":
        _save_single_file(model, dst, PRECISIONS[precision], record)
    else:
        _save_diffusers_folder(model.pipe, dst, PRECISIONS[precision], record)
    return {"path": str(dst), "format": fmt, **record}


def _check_checkpoint_dst(dst: Path, fmt: str, base: Path) -> None:
    if dst.resolve() == base.expanduser().resolve():
        raise LoraNbError(f"-o {dst} is the base model itself: write the merged model somewhere else.")
    if fmt == "single-file" and dst.suffix != ".safetensors":
        raise LoraNbError(f"{dst}: a single-file checkpoint is written as .safetensors; change the name.")
    if fmt == "diffusers" and dst.is_file():
        raise LoraNbError(f"{dst} is a file: a diffusers model is a folder; name a folder (or a .safetensors "
                          "file for a single-file checkpoint).")
    if fmt == "diffusers" and dst.is_dir() and any(dst.iterdir()) and not (dst / "model_index.json").exists():
        raise LoraNbError(f"{dst} is a folder with other files in it: name a new or empty folder (an earlier "
                          "merged model folder is replaced).")


def _save_single_file(model, dst: Path, dtype: torch.dtype, record: dict) -> None:
    from lora_nb.checkpoints import single_file_state_dict

    sd = single_file_state_dict(model.pipe, model.family)
    sd = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    _atomic_save_file(sd, dst, {"lora_nb_merge": json.dumps(record)})


def _save_diffusers_folder(pipe, dst: Path, dtype: torch.dtype, record: dict) -> None:
    """``save_pretrained`` into a temporary folder beside ``dst``, then swapped in (an earlier one replaced)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        if pipe.unet.dtype != dtype:
            pipe.to(dtype=dtype)
        pipe.save_pretrained(tmp)
        (tmp / "lora_nb_merge.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# --------------------------------------------------------------------------- extract

def extract_targets(model, conv: bool) -> list[tuple[str, str]]:
    """``(component, module path)`` of every module kohya trains (:func:`lora_nb.lora_io.network_modules`): the
    UNet's transformer modules and both text encoders', and with ``conv`` the rest of sd-scripts' LoCon set
    (the ResNet blocks' and samplers' layers, 3×3 convolutions included)."""
    from lora_nb.lora_io import network_modules

    targets = []
    for comp, _module, paths, conv_paths in network_modules(model, "kohya", True, "locon" if conv else "lora",
                                                           1 if conv else 0):
        targets += [(comp, p) for p in list(paths) + list(conv_paths)]
    return targets


def weight_diffs(base, tuned, targets: list[tuple[str, str]]) -> dict[tuple[str, str], torch.Tensor]:
    """``W_tuned − W_base`` (float32) of every target; a clear error when the two are not one architecture."""
    diffs = {}
    for comp, path in targets:
        w0 = getattr(base.pipe, comp).get_submodule(path).weight
        try:
            w1 = getattr(tuned.pipe, comp).get_submodule(path).weight
        except AttributeError:
            w1 = None
        if w1 is None or w1.shape != w0.shape:
            raise LoraNbError(f"{comp} module {path} differs between the two models ({tuple(w0.shape)} vs "
                              f"{None if w1 is None else tuple(w1.shape)}): a LoRA is extracted from a fine-tune "
                              "of the same base architecture.")
        diffs[(comp, path)] = w1.detach().float() - w0.detach().float()
    return diffs


def unchanged_text_encoders(diffs: dict[tuple[str, str], torch.Tensor]) -> list[str]:
    """The text encoders whose every targeted weight moved less than 1e-6 (not trained: sd-scripts leaves
    them out of the LoRA too)."""
    moved: dict[str, float] = {}
    for (comp, _), d in diffs.items():
        if comp != "unet":
            moved[comp] = max(moved.get(comp, 0.0), float(d.abs().max()))
    return [comp for comp, m in moved.items() if m < UNCHANGED]


def extract_lora(base: str | Path, tuned: str | Path, dst: str | Path, rank: int, conv_rank: int = 0,
                 precision: str = "fp16") -> dict:
    """Extract a LoRA of rank ``rank`` from a fine-tuned model ``tuned`` and its ``base`` (folders, single files
    or hub ids): per module kohya trains, SVD of ``W_tuned − W_base``, alpha = rank. ``conv_rank`` > 0 also
    extracts the UNet's 3×3 convolutions at that rank (a LoCon: sd-scripts' conv_dim module set). A text encoder that did not change is left out. Unlike
    sd-scripts, the factors are not clamped to their 99th percentile: the file applies the truncated difference
    exactly (a fine-tune's rare large values are kept, at the rank asked for)."""
    from lora_nb.lora_io import kohya_module_name
    from lora_nb.models import load_base_model

    dst = Path(dst)
    _check_rank(rank)
    _check_rank(conv_rank or None)
    if precision not in PRECISIONS:
        raise LoraNbError(f"precision={precision!r} is not known: use one of {', '.join(PRECISIONS)}.")
    _check_lora_dst(dst, [base, tuned])
    base_model, tuned_model = load_base_model(base), load_base_model(tuned)
    if base_model.family != tuned_model.family:
        raise LoraNbError(f"{base} is an {base_model.family} model and {tuned} an {tuned_model.family} one: "
                          "extract a LoRA from a fine-tune and the base model it was trained from.")
    diffs = weight_diffs(base_model, tuned_model, extract_targets(base_model, bool(conv_rank)))
    if all(float(d.abs().max()) < UNCHANGED for d in diffs.values()):
        raise LoraNbError(f"{base} and {tuned} have the same weights (no targeted weight differs by {UNCHANGED:g} "
                          "or more): there is nothing to extract. Give the fine-tuned model second.")
    skipped = unchanged_text_encoders(diffs)
    tensors, report = {}, {}
    for (comp, path), d in diffs.items():
        if comp in skipped:
            continue
        name = kohya_module_name(comp, path, base_model.family, base_model.pipe.unet.config)
        pair = decompose(d, conv_rank if d.ndim == 4 and d.shape[-1] > 1 else rank)
        tensors.update(pair_tensors(name, pair, PRECISIONS[precision]))
        report[name] = {"rank": pair["rank"], "alpha": pair["alpha"], "kept": pair["kept"]}
    meta = extracted_metadata(base_model, Path(str(tuned)).name, rank, conv_rank, report, skipped)
    _atomic_save_file(tensors, dst, meta)
    notes = [f"{comp} unchanged: not extracted" for comp in skipped]
    return {"path": str(dst), "modules": report, "size_after": dst.stat().st_size, "metadata": meta,
            "notes": notes, "skipped": skipped, **kept_summary(report)}


def extracted_metadata(base_model, tuned_name: str, rank: int, conv_rank: int, report: dict,
                       skipped: list[str]) -> dict[str, str]:
    """``ss_*`` metadata of an extracted LoRA (``conv_dim``/``conv_alpha`` in ``ss_network_args`` for a
    LoCon, as sd-scripts writes) + ``lora_nb_tool``."""
    from lora_nb.lora_io import ss_metadata

    tool = {"tool": "extract", "base": Path(base_model.source).name, "tuned": tuned_name, "rank": int(rank),
            "conv_rank": int(conv_rank), "not_extracted": skipped, **kept_summary(report)}
    args = {"conv_dim": str(conv_rank), "conv_alpha": str(conv_rank)} if conv_rank else {}
    te = any(not name.startswith("lora_unet_") for name in report)
    extra = {"lora_nb_tool": json.dumps(tool), "ss_network_args": json.dumps(args),
             "ss_training_comment": f"extracted with lora-nb from {tuned_name}"}
    return ss_metadata(base_model.family, base_model.source, rank, float(rank), te, extra)
