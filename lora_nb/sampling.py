"""Sample images: the sd-scripts prompt-line syntax, AUTOMATIC1111 sampler names
mapped to diffusers schedulers, fixed-seed generation, image grids and LoRA
strength sweeps.

Prompt lines (one per line, ``#`` starts a comment)::

    a photo of sks dog on the beach --n lowres, blurry --w 512 --h 768 --d 42 --s 28 --l 7 --ss Euler a

``--n`` negative prompt, ``--w``/``--h`` size (floored to a multiple of 8), ``--d``
seed, ``--s`` steps, ``--l`` CFG scale, ``--ss`` sampler.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

from lora_nb import LoraNbError

DEFAULT_SAMPLER = "Euler a"

# A1111 name -> (diffusers scheduler class name, extra kwargs for from_config).
SAMPLERS: dict[str, tuple[str, dict]] = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": False}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler",
                            {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    "DPM++ SDE": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": False, "lower_order_final": True}),
    "DPM++ SDE Karras": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True, "lower_order_final": True}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}

# sd-scripts' own sampler spellings (``--ss k_euler_a``) -> A1111 names.
SAMPLER_ALIASES = {
    "euler": "Euler", "k_euler": "Euler", "euler_a": "Euler a", "k_euler_a": "Euler a",
    "heun": "Heun", "k_heun": "Heun", "lms": "LMS", "k_lms": "LMS",
    "dpmsolver++": "DPM++ 2M", "dpmsolver": "DPM++ 2M", "dpmsingle": "DPM++ SDE",
    "dpm_2": "DPM2", "k_dpm_2": "DPM2", "dpm_2_a": "DPM2 a", "k_dpm_2_a": "DPM2 a",
    "ddim": "DDIM", "unipc": "UniPC",
}


@dataclass(frozen=True)
class SamplePrompt:
    """One sample image to generate. Defaults are sd-scripts' (30 steps, 512x512, CFG 7.5)
    except the seed, fixed at 0 so previews are comparable across epochs."""

    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    seed: int = 0
    steps: int = 30
    cfg_scale: float = 7.5
    sampler: str = DEFAULT_SAMPLER


# --------------------------------------------------------------------------- samplers

def canonical_sampler(name: str) -> str:
    """The A1111 name for ``name`` (A1111 names in any case, or sd-scripts' ``k_euler_a`` style)."""
    key = " ".join(str(name).split())
    for known in SAMPLERS:
        if known.lower() == key.lower():
            return known
    alias = SAMPLER_ALIASES.get(key.lower())
    if alias:
        return alias
    raise LoraNbError(f"sampler {name!r} is not known. Use one of: {', '.join(SAMPLERS)}.")


def scheduler_for(name: str, base_config):
    """A diffusers scheduler for the A1111 sampler ``name``, built from the base model's
    scheduler config (``pipe.scheduler.config``) so the noise schedule stays the model's."""
    import diffusers

    cls_name, kwargs = SAMPLERS[canonical_sampler(name)]
    return getattr(diffusers, cls_name).from_config(base_config, **kwargs)


# --------------------------------------------------------------------------- prompt lines

def size_step(size_multiple: int | None) -> int:
    """Image sides are floored to this: 8, or the least common multiple of 8 and the model's multiple."""
    return math.lcm(8, int(size_multiple)) if size_multiple else 8


def parse_prompt_line(line: str, defaults: SamplePrompt | None = None,
                      size_multiple: int | None = None) -> SamplePrompt | None:
    """Parse one sd-scripts prompt line; ``None`` for a blank line or a ``#`` comment.

    Options missing from the line come from ``defaults`` (its ``prompt`` is ignored).
    ``--w``/``--h`` are floored to multiples of :func:`size_step`. A bad value raises
    :class:`LoraNbError` naming the option.
    """
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    base = defaults or SamplePrompt(prompt="")
    parts = re.split(r"\s--", " " + text)
    prompt = parts[0].strip()
    values: dict = {}
    for part in parts[1:]:
        opt, _, value = part.strip().partition(" ")
        values.update(_parse_option(opt, value.strip(), line))
    step = size_step(size_multiple)
    for key in ("width", "height"):
        values[key] = _floor_size(values.get(key, getattr(base, key)), step, key, line)
    if not prompt:
        raise LoraNbError(f"sample prompt line {line.strip()!r} has options but no prompt text before them.")
    return replace(base, prompt=prompt, **values)


_OPTIONS = {"n": "negative_prompt", "w": "width", "h": "height", "d": "seed", "s": "steps", "l": "cfg_scale",
            "ss": "sampler"}


def _parse_option(opt: str, value: str, line: str) -> dict:
    if opt not in _OPTIONS:
        raise LoraNbError(f"sample prompt option --{opt} in {line.strip()!r} is not known. Options: "
                          + ", ".join(f"--{k}" for k in _OPTIONS) + ". (Write '--' only before an option.)")
    field = _OPTIONS[opt]
    if field == "negative_prompt":
        return {field: value}
    if field == "sampler":
        return {field: canonical_sampler(value)}
    try:
        number = float(value) if field == "cfg_scale" else int(value)
    except ValueError:
        kind = "a number" if field == "cfg_scale" else "a whole number"
        raise LoraNbError(f"sample prompt option --{opt} needs {kind}, got {value!r} in {line.strip()!r}.") from None
    if field == "seed" and number < 0:
        raise LoraNbError(f"sample prompt option --d (seed) must be 0 or more, got {number}.")
    if field == "steps" and not 1 <= number <= 1000:
        raise LoraNbError(f"sample prompt option --s (steps) must be between 1 and 1000, got {number}.")
    if field == "cfg_scale" and not (math.isfinite(number) and number >= 0):
        raise LoraNbError(f"sample prompt option --l (CFG scale) must be a number >= 0 (typical 5 to 9), "
                          f"got {value!r}.")
    return {field: number}


def _floor_size(value: int, step: int, key: str, line: str) -> int:
    floored = (int(value) // step) * step
    opt = "--w" if key == "width" else "--h"
    if floored < step or floored > 8192:
        raise LoraNbError(f"sample prompt option {opt} ({key}) must be between {step} and 8192 (a multiple of "
                          f"{step}), got {value} in {line.strip()!r}.")
    return floored


def format_prompt_line(p: SamplePrompt) -> str:
    """The sd-scripts line for ``p``, with every option written (parses back to ``p``)."""
    parts = [p.prompt]
    if p.negative_prompt:
        parts.append(f"--n {p.negative_prompt}")
    parts += [f"--w {p.width}", f"--h {p.height}", f"--d {p.seed}", f"--s {p.steps}",
              f"--l {_fmt_number(p.cfg_scale)}", f"--ss {p.sampler}"]
    return " ".join(parts)


def _fmt_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def parse_prompt_lines(text: str, defaults: SamplePrompt | None = None,
                       size_multiple: int | None = None) -> list[SamplePrompt]:
    """Every prompt in a multi-line text (comments and blank lines skipped)."""
    prompts = [parse_prompt_line(line, defaults, size_multiple) for line in text.splitlines()]
    return [p for p in prompts if p is not None]


# --------------------------------------------------------------------------- generation

def generate(pipe, prompts: list[SamplePrompt], device=None, encode=None) -> list:
    """One PIL image per prompt, each from its own ``torch.Generator`` seeded with the
    prompt's seed (CPU generator: the same noise on any device). The pipeline's scheduler
    is swapped per prompt for its sampler and restored afterwards. ``device`` moves the
    pipeline there first (default: where it is). ``encode(texts) -> (embeds, pooled)`` replaces
    the pipeline's own prompt encoding (long prompts, clip skip)."""
    import torch

    if device is not None:
        pipe.to(device)
    original = pipe.scheduler
    images = []
    try:
        for p in prompts:
            pipe.scheduler = scheduler_for(p.sampler, original.config)
            generator = torch.Generator(device="cpu").manual_seed(int(p.seed))
            with torch.no_grad():
                text = _prompt_kwargs(pipe, p, encode)
                out = pipe(**text, width=p.width, height=p.height, num_inference_steps=p.steps,
                           guidance_scale=p.cfg_scale, generator=generator, output_type="pil")
            images.append(out.images[0])
    finally:
        pipe.scheduler = original
    return images


def _prompt_kwargs(pipe, p: SamplePrompt, encode) -> dict:
    """The pipeline's text arguments: the prompt strings, or embeddings from ``encode`` (the negative prompt
    too; an empty one is zeros where the pipeline itself would use zeros, as SDXL does)."""
    if encode is None:
        return {"prompt": p.prompt, "negative_prompt": p.negative_prompt or None}
    import torch

    embeds, pooled = encode([p.prompt, p.negative_prompt or ""])
    kwargs = {"prompt_embeds": embeds[:1], "negative_prompt_embeds": embeds[1:]}
    if pooled is not None:
        kwargs.update(pooled_prompt_embeds=pooled[:1], negative_pooled_prompt_embeds=pooled[1:])
    if not p.negative_prompt and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        kwargs["negative_prompt_embeds"] = torch.zeros_like(kwargs["negative_prompt_embeds"])
        if pooled is not None:
            kwargs["negative_pooled_prompt_embeds"] = torch.zeros_like(kwargs["negative_pooled_prompt_embeds"])
    return kwargs


def sample_prompts_of(sample_cfg, size: tuple[int, int]) -> list[SamplePrompt]:
    """The preview prompts of a :class:`lora_nb.config.SampleConfig`, with its defaults (size: the training size)."""
    s = sample_cfg
    defaults = SamplePrompt(prompt="", negative_prompt=s.negative_prompt, width=s.width or size[0],
                            height=s.height or size[1], seed=s.seed, steps=s.steps, cfg_scale=s.cfg_scale,
                            sampler=s.sampler)
    return [p for p in (parse_prompt_line(line, defaults) for line in s.prompts) if p is not None]


def render_previews(model, prompts: list[SamplePrompt], clip_skip: int = 1, max_token_length: int = 75) -> list:
    """Render ``prompts`` with the model (and its LoRA) as it is now, in eval mode; training mode is restored.

    The prompts are encoded as training encodes captions (:func:`lora_nb.steps.encode_prompts`: the same
    ``clip_skip`` and 75-token chunks), so a preview sees exactly the text embedding the LoRA learned from.
    """
    from lora_nb.steps import encode_prompts  # deferred: steps imports torch, sampling alone does not

    modules = [model.pipe.unet] + list(model.text_encoders)
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()

    def encode(texts: list[str]):
        return encode_prompts(model, texts, clip_skip, model.pipe.unet.device, max_token_length=max_token_length)

    try:
        return generate(model.pipe, prompts, encode=encode)
    finally:
        for m, was in zip(modules, modes):
            m.train(was)


def strength_sweep(pipe, lora_path: str | Path, prompt: SamplePrompt, strengths: list[float],
                   adapter_name: str = "sweep") -> list:
    """The same prompt and seed at each LoRA strength (e.g. 0, 0.5, 1): one image per strength.

    The LoRA is loaded once as ``adapter_name`` and removed again afterwards, so the
    pipeline is left as it was."""
    from lora_nb.lora_io import load_lora, set_lora_strength  # deferred: lora_io imports torch

    load_lora(pipe, lora_path, adapter_name=adapter_name)
    try:
        images = []
        for s in strengths:
            set_lora_strength(pipe, adapter_name, s)
            images += generate(pipe, [prompt])
        return images
    finally:
        pipe.delete_adapters(adapter_name)


def make_grid(images: list, rows: int, cols: int, row_labels: list[str] | None = None,
              col_labels: list[str] | None = None, background: str = "white",
              cell_labels: list[str] | None = None):
    """Paste ``images`` (row by row) into a ``rows`` x ``cols`` grid, with optional labels
    left of the rows, above the columns and under each image (``cell_labels``, one per image; a
    label may hold several lines). Cells are the size of the largest image."""
    from PIL import Image, ImageDraw, ImageFont

    if rows < 1 or cols < 1 or len(images) > rows * cols:
        raise LoraNbError(f"make_grid: {len(images)} images do not fit {rows} rows x {cols} columns.")
    for labels, n, what in ((row_labels, rows, "row_labels"), (col_labels, cols, "col_labels"),
                            (cell_labels, len(images), "cell_labels")):
        if labels is not None and len(labels) != n:
            raise LoraNbError(f"make_grid: {what} has {len(labels)} entries for {n} {what.split('_')[0]}s.")
    cell_w = max((im.width for im in images), default=64)
    cell_h = max((im.height for im in images), default=64)
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(s: str) -> tuple[int, int]:
        box = probe.textbbox((0, 0), s, font=font)
        return box[2] - box[0], box[3] - box[1]

    left = max((text_size(s)[0] for s in row_labels), default=0) + 8 if row_labels else 0
    top = max((text_size(s)[1] for s in col_labels), default=0) + 8 if col_labels else 0
    line_h = text_size("Ag")[1] + 4
    under = (max(s.count("\n") + 1 for s in cell_labels) * line_h + 6) if cell_labels else 0
    cell_w = max([cell_w] + [text_size(line)[0] + 8 for s in cell_labels or [] for line in s.split("\n")])
    pitch = cell_h + under
    grid = Image.new("RGB", (left + cols * cell_w, top + rows * pitch), background)
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im.convert("RGB"), (left + c * cell_w + (cell_w - im.width) // 2, top + r * pitch))
        for k, line in enumerate((cell_labels[i] if cell_labels else "").split("\n")):
            if line:
                draw.text((left + c * cell_w + 4, top + r * pitch + cell_h + 3 + k * line_h), line, fill="black",
                          font=font)
    for r, s in enumerate(row_labels or []):
        draw.text((4, top + r * pitch + (cell_h - text_size(s)[1]) // 2), s, fill="black", font=font)
    for c, s in enumerate(col_labels or []):
        draw.text((left + c * cell_w + (cell_w - text_size(s)[0]) // 2, 4), s, fill="black", font=font)
    return grid


def sample_grid_from_folder(samples_dir: str | Path, scale: int = 1, prompts: list[str] | None = None,
                            label=None, epochs: list[int] | None = None):
    """The epoch × prompt grid of the previews written during training (``e0002-p01.png`` …), each enlarged
    ``scale`` times (nearest neighbour); only ``epochs`` when given. With ``prompts`` (the sample prompt lines)
    and ``label(prompt text, image)``, a verdict is written under each preview.

    Returns ``(grid image, epochs, prompt indices)``; ``None`` when there are no previews.
    """
    from PIL import Image

    found = {}
    for p in sorted(Path(samples_dir).glob("e*-p*.png")):
        m = re.fullmatch(r"e(\d+)-p(\d+)\.png", p.name)
        if m:
            found[(int(m.group(1)), int(m.group(2)))] = p
    if not found:
        return None
    shown = sorted({e for e, _ in found if epochs is None or e in epochs})
    if not shown:
        return None
    columns = sorted({i for _, i in found})
    images, labels = [], []
    for e in shown:
        for i in columns:
            img = Image.open(found[(e, i)]).convert("RGB") if (e, i) in found else Image.new("RGB", (64, 64))
            if label and prompts and i < len(prompts):
                labels.append(label(re.split(r"\s--", prompts[i])[0], img))
            images.append(img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img)
    grid = make_grid(images, len(shown), len(columns), row_labels=[f"epoch {e}" for e in shown],
                     col_labels=[f"prompt {i + 1}" for i in columns],
                     cell_labels=labels if labels and len(labels) == len(images) else None)
    return grid, shown, columns


def labelled_rows(rows: dict[str, list], label=None, cell: int = 192):
    """A grid with one row per entry of ``rows`` (``{row label: [(prompt text, image), …]}``), the images enlarged
    by a whole factor (nearest neighbour) to about ``cell`` pixels; ``label(prompt text, image)``, when given,
    writes a verdict under each image (the toy judge's: :func:`lora_nb.toy.quality.judge_label`)."""
    from PIL import Image

    if not rows or not any(rows.values()):
        raise LoraNbError("labelled_rows: no images to show.")
    cols = max(len(v) for v in rows.values())
    images, labels = [], []
    for examples in rows.values():
        for i in range(cols):
            prompt, img = examples[i] if i < len(examples) else ("", None)
            img = Image.fromarray(img) if img is not None and not hasattr(img, "convert") else img
            img = img.convert("RGB") if img is not None else Image.new("RGB", (64, 64), "white")
            scale = max(1, cell // max(img.size))
            labels.append(label(prompt, img) if label and prompt else "")
            images.append(img.resize((img.width * scale, img.height * scale), Image.NEAREST))
    return make_grid(images, len(rows), cols, row_labels=list(rows), cell_labels=labels if label else None)
