"""Comparing LoRA strengths (notebooks 05 and 06): the prompt, the strengths, the grid of files × strengths."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from lora_nb import LoraNbError
from lora_nb.config import parse_resolution
from lora_nb.sampling import SamplePrompt, make_grid, parse_prompt_line, strength_sweep


def parse_strengths(text: str) -> list[float]:
    """``"0, 0.5, 1"`` → ``[0.0, 0.5, 1.0]``: the LoRA strengths to compare."""
    try:
        levels = [float(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise LoraNbError(f"strengths={text!r}: give numbers separated by commas, e.g. '0, 0.5, 0.75, 1.0'.") from None
    if not levels:
        raise LoraNbError(f"strengths={text!r}: give at least one strength, e.g. '0, 1.0'.")
    return levels


def strength_prompt(cfg, text: str = "", **overrides):
    """The prompt of a strength comparison, a :class:`~lora_nb.sampling.SamplePrompt`.

    ``text`` is an sd-scripts prompt line (options such as ``--d 7`` allowed); empty: the first sample
    prompt of ``cfg``, else its trigger word, else "a photo". Size and sample settings come from ``cfg``;
    ``overrides`` (``seed=7``, ``steps=20`` …) replace them.
    """
    w, h = parse_resolution(cfg.dataset.resolution)
    s = cfg.sample
    defaults = SamplePrompt(prompt="", width=w, height=h, seed=s.seed, steps=s.steps, cfg_scale=s.cfg_scale,
                            sampler=s.sampler, negative_prompt=s.negative_prompt)
    line = text or next((p for p in s.prompts if p.strip() and not p.strip().startswith("#")), "") \
        or cfg.dataset.trigger_word or "a photo"
    prompt = parse_prompt_line(line, defaults)
    if prompt is None:
        raise LoraNbError(f"test prompt {line!r} is blank or a comment: give a prompt such as 'a photo of sks'.")
    return replace(prompt, **overrides)


def strength_grid(pipe, files: list[str | Path], prompt, levels: list[float], cell: int = 256, label=None):
    """One row per LoRA file, one column per strength, the same prompt and seed everywhere; each image
    enlarged by a whole factor (nearest neighbour) to about ``cell`` pixels. ``label(prompt text, image)``, when
    given, writes a verdict under each image (the toy judge's: :func:`lora_nb.toy.quality.judge_label`). The
    pipeline is left as it was."""
    files = [Path(f) for f in files]
    if not files:
        raise LoraNbError("strength_grid: no LoRA files to compare (train first: notebook 05).")
    scale = max(1, cell // max(prompt.width, prompt.height))
    from PIL import Image

    raw = [im for f in files for im in strength_sweep(pipe, f, prompt, levels)]
    images = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in raw]
    return make_grid(images, len(files), len(levels), row_labels=[f.stem for f in files],
                     col_labels=[f"strength {s:g}" for s in levels],
                     cell_labels=[label(prompt.prompt, im) for im in raw] if label else None)
