"""Notebook 04's speed and memory advice, and its yes/no parameters."""

from lora_nb import planning
from lora_nb.config import preset


def test_yes_no_parameters_become_the_settings_bools_and_empty_keeps_the_preset():
    on = planning.build_config("realistic", {"gradient_checkpointing": "yes", "cache_latents_to_disk": "No"}, "d", "o")
    assert on.training.gradient_checkpointing is True and on.dataset.cache_latents_to_disk is False
    kept = planning.build_config("realistic", {"gradient_checkpointing": ""}, "d", "o")
    assert kept.training.gradient_checkpointing is preset("realistic").training.gradient_checkpointing
    widget = planning.build_config("realistic", {"gradient_checkpointing": False}, "d", "o")  # a checkbox's value
    assert widget.training.gradient_checkpointing is False


def test_memory_advice_names_the_missing_savers_for_small_cards_only():
    cfg = preset("realistic").with_overrides({"training.gradient_checkpointing": False, "optimizer.optimizer": "AdamW",
                                              "training.batch_size": 4})
    small = " ".join(planning.memory_advice(cfg, "sd15", 8.0))
    for missing in ("training.gradient_checkpointing=true", "optimizer.optimizer=AdamW8bit", "training.batch_size=1–2"):
        assert missing in small
    assert "training.mixed_precision" not in small  # the preset already uses fp16
    big = " ".join(planning.memory_advice(cfg, "sd15", 80.0))
    assert "gradient_checkpointing" not in big and "needs are on" in big
    saved = cfg.with_overrides({"training.gradient_checkpointing": True, "optimizer.optimizer": "AdamW8bit",
                                "training.batch_size": 1})
    assert "needs are on" in planning.memory_advice(saved, "sd15", 8.0)[0]
    assert "optimizer.text_encoder_lr=0" in planning.memory_advice(saved, "sdxl", 16.0)[0]  # SDXL: freeze both encoders
    frozen = saved.with_overrides({"optimizer.text_encoder_lr": 0.0})
    assert "needs are on" in planning.memory_advice(frozen, "sdxl", 16.0)[0]
    assert "no CUDA GPU" in planning.memory_advice(cfg, "sd15", None)[0]


def test_speed_memory_rows_show_value_and_help_for_each_setting():
    rows = {r[0]: r for r in planning.speed_memory_rows(preset("toy"))}
    assert set(rows) == set(planning.SPEED_MEMORY_SETTINGS)
    assert all(help_text for _, _, help_text in rows.values())
    assert rows["dataset.cache_latents"][1] == "True"


def test_the_class_picture_count_finds_the_presets_folder_from_any_working_folder(tmp_path, monkeypatch):
    """04 run from another folder (a Jupyter server's root) counted 0 class pictures in data/toy-reg while the
    steps math paired every picture with one: the count resolves the path as the trainer does."""
    from lora_nb.config import preset
    from lora_nb.planning import regularization_lines

    monkeypatch.chdir(tmp_path)
    lines = regularization_lines(preset("toy"), 48, toy=True)
    assert lines[0].startswith("class pictures: 48 in ")


def test_every_toy_value_that_differs_from_the_real_presets_says_why():
    rows = planning.preset_rows()
    differing = [r for r in rows if r["toy"] not in (r["anime"], r["realistic"])]
    assert {r["setting"] for r in differing} >= {"resolution", "timesteps trained", "debiased estimation"}
    assert all(r["why the toy differs"] for r in differing), [r["setting"] for r in differing if not r["why the toy differs"]]
    timesteps = next(r for r in rows if r["setting"] == "timesteps trained")
    assert (timesteps["toy"], timesteps["anime"]) == ("500-999", "0-999")


def test_min_timestep_is_a_parameter_and_minus_one_keeps_the_preset():
    assert planning.build_config("toy", {"min_timestep": -1}, "d", "o").training.min_timestep == 500
    assert planning.build_config("toy", {"min_timestep": 0}, "d", "o").training.min_timestep == 0
