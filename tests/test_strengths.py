"""lora_nb.strengths (the strength comparisons of notebooks 05 and 06) and notebook 05's LoRA file lines,
on a tiny SD1.5 model with two real LoRA files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_nb import LoraNbError
from lora_nb.config import preset
from lora_nb.notebook import lora_file_lines
from lora_nb.strengths import parse_strengths, strength_grid, strength_prompt


@pytest.fixture(scope="module")
def lora_dir(tiny_sd15_dir, tmp_path_factory):
    from lora_nb import lora_io
    from lora_nb.models import load_base_model

    folder = tmp_path_factory.mktemp("lora")
    for name, seed in (("lora-e0001", 0), ("lora", 1)):
        model = load_base_model(tiny_sd15_dir)
        torch.manual_seed(seed)
        lora_io.add_lora(model, rank=4, alpha=2.0, init="random")
        lora_io.save_lora(folder / f"{name}.safetensors", model, precision="fp32")
    return folder


def test_parse_strengths():
    assert parse_strengths("0, 0.5, 0.75, 1.0") == [0.0, 0.5, 0.75, 1.0]
    assert parse_strengths("1,") == [1.0]
    with pytest.raises(LoraNbError, match="numbers separated by commas"):
        parse_strengths("0, half")
    with pytest.raises(LoraNbError, match="at least one"):
        parse_strengths(" ")


def test_strength_prompt_comes_from_the_text_the_sample_prompts_or_the_trigger():
    cfg = preset("toy")
    first = strength_prompt(cfg)
    assert first.prompt == "a red zorb circle on a skyblue background" and first.seed == 1  # its --d 1
    assert (first.width, first.height) == (64, 64) and first.sampler == cfg.sample.sampler
    given = strength_prompt(cfg, "sks, red square --d 5 --s 3", cfg_scale=5.0)
    assert (given.prompt, given.seed, given.steps, given.cfg_scale) == ("sks, red square", 5, 3, 5.0)
    bare = cfg.with_overrides({"sample.prompts": [], "dataset.trigger_word": "sks"})
    assert strength_prompt(bare).prompt == "sks"
    assert strength_prompt(bare.with_overrides({"dataset.trigger_word": ""})).prompt == "a photo"
    assert strength_prompt(cfg, "a zorb", seed=7).seed == 7


def test_strength_grid_has_a_row_per_file_and_a_column_per_strength(tiny_sd15_dir, lora_dir):
    from lora_nb.models import load_base_model
    from lora_nb.sampling import SamplePrompt, generate

    base = load_base_model(tiny_sd15_dir)
    prompt = SamplePrompt("a red circle", width=32, height=32, seed=1, steps=2, cfg_scale=1.0, sampler="DDIM")
    [before] = generate(base.pipe, [prompt])
    files = [lora_dir / "lora-e0001.safetensors", lora_dir / "lora.safetensors"]
    grid = strength_grid(base.pipe, files, prompt, [0.0, 1.0], cell=64)
    assert grid.width > 2 * 64 and grid.height > 2 * 64  # 2 × 2 cells of 64 px (32 px enlarged 2×) plus labels
    assert grid.width < 2 * 64 + 200 and grid.height < 2 * 64 + 40
    [after] = generate(base.pipe, [prompt])
    assert np.array_equal(np.asarray(before), np.asarray(after))  # the pipeline is left as it was
    with pytest.raises(LoraNbError, match="no LoRA files"):
        strength_grid(base.pipe, [], prompt, [1.0])


def test_lora_file_lines_name_every_file_with_its_rank(lora_dir):
    lines = lora_file_lines(lora_dir)
    assert [line.split()[0] for line in lines] == ["lora-e0001.safetensors", "lora.safetensors"]
    assert all("rank 4" in line and "alpha 2" in line for line in lines)
    assert lora_file_lines(lora_dir / "nothing here") == []
