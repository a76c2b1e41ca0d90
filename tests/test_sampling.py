"""Sample prompts in the sd-scripts syntax, A1111 sampler names -> diffusers schedulers,
fixed-seed generation, grids and LoRA strength sweeps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_nb import LoraNbError
from lora_nb import sampling as s
from lora_nb.sampling import SamplePrompt




@pytest.fixture(scope="module")
def pipe(tiny_sd15_dir):
    from lora_nb.models import load_base_model

    p = load_base_model(tiny_sd15_dir).pipe
    p.set_progress_bar_config(disable=True)
    return p


# --------------------------------------------------------------------------- prompt lines

def test_parse_reads_every_option():
    p = s.parse_prompt_line("a photo of sks dog, beach --n lowres, blurry --w 512 --h 768 --d 42 --s 28 "
                            "--l 6.5 --ss DPM++ 2M Karras")
    assert p == SamplePrompt("a photo of sks dog, beach", "lowres, blurry", 512, 768, 42, 28, 6.5, "DPM++ 2M Karras")


def test_defaults_fill_missing_options_and_match_sd_scripts():
    """sd-scripts' defaults (512x512, 30 steps, CFG 7.5); caller defaults override them; prompt of defaults ignored."""
    p = s.parse_prompt_line("a cat")
    assert (p.width, p.height, p.steps, p.cfg_scale, p.negative_prompt) == (512, 512, 30, 7.5, "")
    mine = SamplePrompt("ignored", negative_prompt="ugly", width=64, height=64, seed=7, steps=2, sampler="DDIM")
    p = s.parse_prompt_line("a cat --s 4", mine)
    assert p == SamplePrompt("a cat", "ugly", 64, 64, 7, 4, 7.5, "DDIM")


@pytest.mark.parametrize("line", ["", "   ", "# a comment --w 64", "  #indented comment"])
def test_blank_and_comment_lines_give_none(line):
    assert s.parse_prompt_line(line) is None


def test_sizes_are_floored_to_8_and_to_the_model_multiple():
    p = s.parse_prompt_line("x --w 517 --h 770")
    assert (p.width, p.height) == (512, 768)
    p = s.parse_prompt_line("x --w 517 --h 770", size_multiple=64)
    assert (p.width, p.height) == (512, 768)
    p = s.parse_prompt_line("x --w 100 --h 100", size_multiple=64)
    assert (p.width, p.height) == (64, 64)
    p = s.parse_prompt_line("x --w 100 --h 100", size_multiple=4)
    assert (p.width, p.height) == (96, 96)


@pytest.mark.parametrize("p", [
    SamplePrompt("a cat"),
    SamplePrompt("a red circle, best quality", "blurry, lowres", 64, 128, 123, 2, 1.0, "Euler"),
    SamplePrompt("portrait", "", 768, 512, 0, 50, 12.25, "DPM++ 2M SDE Karras"),
])
def test_format_then_parse_round_trips(p):
    line = s.format_prompt_line(p)
    assert s.parse_prompt_line(line) == p
    assert s.format_prompt_line(s.parse_prompt_line(line)) == line


def test_multi_line_text_skips_comments():
    text = "# previews\na cat --d 1\n\na dog --d 2 --ss euler_a\n"
    ps = s.parse_prompt_lines(text)
    assert [(p.prompt, p.seed, p.sampler) for p in ps] == [("a cat", 1, "Euler a"), ("a dog", 2, "Euler a")]


@pytest.mark.parametrize("line, match", [
    ("a cat --w abc", "--w needs a whole number"),
    ("a cat --h 3", r"--h \(height\) must be between 8"),
    ("a cat --w 99999", r"--w \(width\) must be between"),
    ("a cat --d -1", r"--d \(seed\) must be 0 or more"),
    ("a cat --s 0", r"--s \(steps\)"),
    ("a cat --s 2.5", "--s needs a whole number"),
    ("a cat --l high", "--l needs a number"),
    ("a cat --l -3", r"--l \(CFG scale\)"),
    ("a cat --ss Euler b", "sampler 'Euler b' is not known. Use one of: Euler, Euler a"),
    ("a cat --x 1", "option --x .* is not known"),
    ("--w 64", "no prompt text"),
])
def test_bad_values_name_the_option(line, match):
    with pytest.raises(LoraNbError, match=match):
        s.parse_prompt_line(line)


# --------------------------------------------------------------------------- samplers

def test_sampler_names_cover_a1111_and_sd_scripts_spellings():
    required = {"Euler", "Euler a", "Heun", "LMS", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE", "DPM++ SDE",
                "DPM2", "DPM2 a", "DDIM"}
    assert required <= set(s.SAMPLERS)
    assert s.canonical_sampler("euler A") == "Euler a"
    assert s.canonical_sampler("k_dpm_2_a") == "DPM2 a"
    with pytest.raises(LoraNbError, match="DPM\\+\\+ 2M Karras"):
        s.scheduler_for("Euler z", {})


@pytest.mark.parametrize("name", list(s.SAMPLERS))
def test_every_sampler_builds_from_the_model_config_and_generates(pipe, name):
    """The scheduler keeps the model's noise schedule, has the A1111 variant's settings, and 2 steps give an image."""
    sched = s.scheduler_for(name, pipe.scheduler.config)
    cls_name, kwargs = s.SAMPLERS[name]
    assert type(sched).__name__ == cls_name
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.beta_end == pipe.scheduler.config.beta_end
    for key, value in kwargs.items():
        assert sched.config[key] == value
    prompt = SamplePrompt("a red circle", width=64, height=64, seed=3, steps=2, cfg_scale=1.0, sampler=name)
    [image] = s.generate(pipe, [prompt])
    arr = np.asarray(image)
    assert image.size == (64, 64) and np.isfinite(arr).all() and arr.std() > 0


def test_generate_is_reproducible_per_seed_and_restores_the_scheduler(pipe):
    before = pipe.scheduler
    a = SamplePrompt("a blue square", "blurry", 64, 64, seed=5, steps=2, cfg_scale=4.0, sampler="Euler a")
    b = SamplePrompt("a blue square", "blurry", 64, 64, seed=6, steps=2, cfg_scale=4.0, sampler="Euler a")
    first, again, other = s.generate(pipe, [a, a, b])
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(other))
    assert pipe.scheduler is before


def test_make_grid_places_images_and_leaves_room_for_labels():
    from PIL import Image

    colors = ["red", "green", "blue", "yellow", "white"]
    images = [Image.new("RGB", (32, 24), c) for c in colors]
    grid = s.make_grid(images, rows=2, cols=3)
    assert grid.size == (96, 48)
    assert grid.getpixel((40, 5)) == (0, 128, 0)  # second cell, first row
    assert grid.getpixel((5, 30)) == (255, 255, 0)  # first cell, second row
    labelled = s.make_grid(images, 2, 3, row_labels=["epoch 1", "epoch 2"], col_labels=["0", "0.5", "1"])
    assert labelled.width > 96 and labelled.height > 48
    with pytest.raises(LoraNbError, match="do not fit"):
        s.make_grid(images, 1, 2)
    with pytest.raises(LoraNbError, match="row_labels has 1 entries"):
        s.make_grid(images, 2, 3, row_labels=["x"])


def test_make_grid_writes_a_label_under_each_image():
    from PIL import Image

    images = [Image.new("RGB", (32, 24), c) for c in ("red", "green")]
    plain = s.make_grid(images, 1, 2)
    labelled = s.make_grid(images, 1, 2, cell_labels=["zorb: yes\nred ok", "zorb: no\ngreen ok"])
    assert labelled.height > plain.height + 20  # two lines of text under the images
    strip = np.asarray(labelled)[26:, :, :]
    assert (strip < 100).all(axis=2).any()  # dark text drawn on the white strip
    assert labelled.getpixel((labelled.width // 4, 5)) == (255, 0, 0)  # the image still on top, centred
    with pytest.raises(LoraNbError, match="cell_labels has 1 entries for 2"):
        s.make_grid(images, 1, 2, cell_labels=["x"])


def test_strength_sweep_goes_from_base_model_to_full_lora(pipe, tiny_sd15_dir, tmp_path):
    """Strength 0 reproduces the base model, 1 the LoRA, 0.5 lies between; the pipeline is left without the LoRA."""
    from lora_nb import lora_io
    from lora_nb.models import load_base_model

    trained = load_base_model(tiny_sd15_dir)
    torch.manual_seed(0)
    lora_io.add_lora(trained, rank=4, alpha=2.0, init="random")
    path = lora_io.save_lora(tmp_path / "lora.safetensors", trained, precision="fp32")
    prompt = SamplePrompt("a red circle", width=64, height=64, seed=1, steps=2, cfg_scale=1.0, sampler="DDIM")
    [base] = s.generate(pipe, [prompt])
    [full] = s.generate(trained.pipe, [prompt])
    zero, half, one = (np.asarray(im).astype(int) for im in s.strength_sweep(pipe, path, prompt, [0.0, 0.5, 1.0]))
    assert np.abs(zero - np.asarray(base)).max() <= 1
    assert np.abs(one - np.asarray(full)).max() <= 1
    assert np.abs(half - zero).mean() > 0 and np.abs(half - one).mean() > 0
    assert np.abs(np.asarray(base).astype(int) - np.asarray(full)).mean() > 1
    [after] = s.generate(pipe, [prompt])
    assert np.array_equal(np.asarray(after), np.asarray(base))
