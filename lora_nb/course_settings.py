"""The choices several notebooks share, kept once per workspace in ``course.yaml``.

The learner chooses the preset, model, resolution, crop mode, tagger and threshold, trigger and class
words, repeats, regularization folder and sample prompts once; every notebook reads them from here:

* a notebook parameter left *unset* (``""``, or ``-1`` for numbers) takes the value ``course.yaml``
  holds, else the default that follows from the preset (:func:`defaults_for`);
* a value set on purpose (papermill ``-p``, an edited parameters cell, a changed widget) wins and is
  written to ``course.yaml``, so the notebooks after it agree.

Only values set on purpose are stored: a preset's default is never frozen into the file, so choosing
another preset later still changes the resolution, repeats and tagger that follow from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lora_nb import LoraNbError
from lora_nb.config import ANIME_PRESETS, PRESETS, default_class_word, preset
from lora_nb.fsutil import write_text_atomic
from lora_nb.workspace import Workspace

# name → what it is (the notebooks' parameter comments say the same in fewer words)
SETTINGS = {
    "preset": "the preset every notebook starts from (lora-nb config --list-presets)",
    "model_source": "'toy', a hub id, a diffusers folder or a .safetensors checkpoint; empty: the preset's",
    "model_family": "auto / sd15 / sdxl",
    "resolution": "training size WIDTHxHEIGHT (or a named size); empty: the preset's",
    "crop_mode": "center, focus or none (none trains each picture whole in its aspect-ratio bucket)",
    "bucket_step": "side step of the aspect-ratio buckets in pixels (02 resizes into them, training uses them)",
    "tagger": "toy, toy-noisy, wd (booru tags) or blip (sentences); empty: the one that suits the preset",
    "threshold": "tag confidence kept by the tagger",
    "trigger_word": "the word that calls up the subject, first in every caption",
    "class_name": "the class the subject belongs to (circle, woman, dog, 1girl): class pictures and prompts",
    "repeats": "times each picture is learned per epoch (the <repeats>_<concept> folder name)",
    "keep_tokens": "tags kept in place at the front when the trainer shuffles them (1 keeps the trigger first)",
    "regularization_dir": "folder of class pictures 01 copies into the workspace; 'none': no class pictures",
    "sample_prompts": "preview prompts, one per line (sd-scripts options --n --w --h --d --s --l)",
}


def is_unset(value) -> bool:
    """A notebook parameter that was left at "not chosen here": empty text, None or -1."""
    return value is None or (isinstance(value, str) and not value.strip()) or \
        (isinstance(value, (int, float)) and not isinstance(value, bool) and value == -1)


def defaults_for(preset_name: str, chosen: dict | None = None) -> dict:
    """Every shared setting's default under ``preset_name``; the trigger and class words of ``chosen``
    (when set) go into the default sample prompts."""
    if preset_name not in PRESETS:
        raise LoraNbError(f"preset={preset_name!r} is not a preset: choose one of {', '.join(PRESETS)} "
                          "(lora-nb config --list-presets says what each is).")
    chosen = chosen or {}
    toy = preset_name == "toy"
    anime = preset_name in ANIME_PRESETS
    cls = chosen.get("class_name") or default_class_word(preset_name)
    cfg = preset(preset_name, chosen.get("trigger_word") or "", cls)
    return {
        "preset": preset_name, "model_source": cfg.model.source, "model_family": cfg.model.family,
        "resolution": cfg.dataset.resolution, "crop_mode": "focus", "bucket_step": cfg.dataset.bucket_step,
        "tagger": "toy" if toy else ("wd" if anime else "blip"),
        "threshold": 0.6,
        "trigger_word": "zorb" if toy else cfg.dataset.trigger_word, "class_name": cls,
        "repeats": cfg.dataset.repeats, "keep_tokens": cfg.dataset.keep_tokens, "regularization_dir": "data/toy-reg/1_circle" if toy else "none",
        "sample_prompts": "\n".join(cfg.sample.prompts),
    }


def read_course_file(path: Path) -> dict:
    """The settings stored in ``course.yaml`` ({} when there is none); a broken file is named."""
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise LoraNbError(f"{path} cannot be read ({type(exc).__name__}): fix it or delete it (the notebooks "
                          "then start from the preset again).") from None
    if not isinstance(data, dict):
        raise LoraNbError(f"{path} must hold 'name: value' lines; delete it to start from the preset again.")
    unknown = sorted(set(data) - set(SETTINGS))
    if unknown:
        raise LoraNbError(f"{path} has unknown setting(s) {', '.join(unknown)}; known: {', '.join(SETTINGS)}.")
    return data


@dataclass
class CourseSettings:
    """The shared settings as one notebook sees them: ``values`` (every setting) and where each came from."""

    path: Path
    values: dict
    sources: dict  # name → "set here", "course.yaml" or "preset <name>"
    stored: dict = field(default_factory=dict)

    def __getitem__(self, name: str):
        return self.values[name]

    def describe(self, names: list[str] | None = None) -> str:
        """Each setting this notebook uses with its value, then where the values came from."""
        names = names or list(self.values)
        shown = " · ".join(f"{n} {_short(self.values[n])}" for n in names)
        here = [n for n in names if self.sources[n] == "set here"]
        stored = [n for n in names if self.sources[n] == "course.yaml"]
        origin = ([f"set here: {', '.join(here)}"] if here else []) + \
                 ([f"from {self.path.name}: {', '.join(stored)}"] if stored else [])
        if len(here) + len(stored) < len(names):
            origin.append(("the rest follow" if origin else "all follow") + f" preset {self.values['preset']}")
        return f"Course settings: {shown}\n  ({'; '.join(origin)})"

    def remember(self, values: dict) -> list[str]:
        """Store the shared settings in ``values`` that differ from what this notebook was given (a widget
        changed them); returns their names."""
        changed = {k: v for k, v in values.items() if k in SETTINGS and v != self.values.get(k)}
        if changed:
            self.stored.update(changed)
            self.values.update(changed)
            self.sources.update({k: "set here" for k in changed})
            write_course_file(self.path, self.stored)
        return sorted(changed)


def write_course_file(path: Path, stored: dict) -> None:
    header = ("# The choices every lora-nb notebook shares (written by the notebook that set each one).\n"
              "# Delete a line to go back to the preset's value; a notebook parameter set with -p still wins.\n")
    write_text_atomic(path, header + yaml.safe_dump(stored, sort_keys=True, allow_unicode=True))


def settle(workspace: Workspace, given: dict) -> CourseSettings:
    """The shared settings for a notebook that was given ``given`` (its parameters by name; unset ones
    are "" or -1): set ones win and are stored, the rest come from ``course.yaml`` or the preset."""
    unknown = sorted(set(given) - set(SETTINGS))
    if unknown:
        raise LoraNbError(f"not a shared course setting: {', '.join(unknown)}")
    stored = read_course_file(workspace.course_settings)
    explicit = {k: (v.strip() if isinstance(v, str) else v) for k, v in given.items() if not is_unset(v)}
    chosen = {**stored, **explicit}
    defaults = defaults_for(chosen.get("preset") or "toy", chosen)
    values = {**defaults, **chosen}
    sources = {k: ("set here" if k in explicit else "course.yaml" if k in stored else f"preset {values['preset']}")
               for k in values}
    if any(stored.get(k) != v for k, v in explicit.items()):
        stored = {**stored, **explicit}
        write_course_file(workspace.course_settings, stored)
    return CourseSettings(workspace.course_settings, values, sources, dict(stored))


def prompt_lines(text) -> list[str]:
    """``sample_prompts`` as a list: one prompt per line of text (or a list as given), blank lines dropped."""
    items = text if isinstance(text, list) else str(text or "").splitlines()
    return [str(p).strip() for p in items if str(p).strip()]


def _short(value) -> str:
    text = str(value).replace("\n", " | ") or "(none)"
    return text if len(text) <= 60 else text[:57] + "…"
