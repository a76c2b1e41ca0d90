"""Config: presets, YAML round trip, overrides, validation messages and the steps math."""

import pytest

from lora_nb.config import (Config, ConfigError, all_setting_names, check_against_dataset, check_against_model,
                            check_config, parse_resolution, plan_steps, preset, raise_for_errors)


@pytest.mark.parametrize("name", ["anime", "realistic", "toy"])
def test_presets_round_trip_through_yaml_unchanged(name):
    cfg = preset(name)
    assert Config.from_yaml(cfg.to_yaml()) == cfg


def test_presets_carry_the_courses_recommended_values():
    anime, real = preset("anime"), preset("realistic")
    assert (anime.dataset.repeats, anime.training.epochs) == (8, 20)
    assert (real.dataset.repeats, real.training.epochs) == (15, 10)
    assert real.network.rank in (64, 128) and anime.network.rank in (8, 16, 32)
    for c in (anime, real):
        assert c.network.alpha == c.network.rank / 2
        assert c.optimizer.optimizer == "AdamW8bit" and c.optimizer.unet_lr == 1e-4
        assert c.optimizer.unet_lr / 10 <= c.optimizer.text_encoder_lr <= c.optimizer.unet_lr / 2
        assert c.training.mixed_precision == "fp16" and c.save.precision == "fp16"


def test_worked_example_20_images_repeat_10_gives_200_steps_per_epoch_and_2000_total():
    plan = plan_steps([(20, 10)], batch_size=1, epochs=10, save_every=2)
    assert (plan.steps_per_epoch, plan.total_steps) == (200, 2000)
    assert plan.saves == 5  # e2, e4, e6, e8 and the final file after epoch 10


def test_steps_math_rounds_up_partial_batches_and_doubles_with_regularization():
    assert plan_steps([(21, 1)], batch_size=2, epochs=1).steps_per_epoch == 11
    assert plan_steps([(20, 10)], batch_size=4, epochs=1, with_regularization=True).steps_per_epoch == 100
    assert plan_steps([(10, 2), (5, 4)], batch_size=1, epochs=3).total_steps == 120
    assert plan_steps([(20, 10)], 1, 10, save_every=0).saves == 1
    assert plan_steps([(20, 10)], 1, 10, save_every=3).saves == 4  # e3, e6, e9 + final


def test_overrides_by_dotted_or_bare_name_and_type_checked():
    cfg = preset("toy").with_overrides(["network.rank=16", "epochs=3", "optimizer.unet_lr=2e-4"])
    assert (cfg.network.rank, cfg.training.epochs, cfg.optimizer.unet_lr) == (16, 3, 2e-4)
    with pytest.raises(ConfigError, match="network.rank must be a whole number"):
        preset("toy").with_overrides(["network.rank=sixteen"])
    with pytest.raises(ConfigError, match="Unknown setting 'network.rnak'"):
        preset("toy").with_overrides(["network.rnak=4"])


def test_yaml_with_unknown_keys_wrong_types_or_not_a_mapping_names_the_setting():
    with pytest.raises(ConfigError, match="'learning_rte' in optimizer"):
        Config.from_yaml("optimizer:\n  learning_rte: 1e-4\n")
    with pytest.raises(ConfigError, match="training.epochs must be a whole number"):
        Config.from_yaml("training:\n  epochs: ten\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        Config.from_yaml("- a\n- b\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Config.from_yaml("model: [unclosed\n")
    with pytest.raises(ConfigError, match="does not exist"):
        Config.load("/nonexistent/config.yaml")


def _messages(cfg, **kw):
    return {(p.level, p.setting): p.message for p in check_config(cfg, **kw)}


@pytest.mark.parametrize("override, level, setting, fragment", [
    ({"network.rank": 0}, "error", "network.rank", "positive whole number"),
    ({"network.rank": 4, "network.alpha": 8}, "warning", "network.alpha", "alpha 8 > rank 4"),
    ({"optimizer.optimizer": "Adam"}, "error", "optimizer.optimizer", "AdamW, AdamW8bit, Lion"),
    ({"optimizer.lr_scheduler": "cosine_annealing"}, "error", "optimizer.lr_scheduler", "cosine_with_restarts"),
    ({"sample.sampler": "Euler b"}, "error", "sample.sampler", "Euler a"),
    ({"dataset.resolution": "500x500"}, "error", "dataset.resolution", "multiples of 8"),
    ({"dataset.resolution": "big"}, "error", "dataset.resolution", "WIDTHxHEIGHT"),
    ({"training.mixed_precision": "fp8"}, "error", "training.mixed_precision", "no, fp16 or bf16"),
    ({"optimizer.optimizer": "Lion", "optimizer.learning_rate": 1e-4}, "warning", "optimizer.learning_rate", "10× smaller"),
    ({"optimizer.optimizer": "Prodigy", "optimizer.learning_rate": 1e-4}, "warning", "optimizer.learning_rate", "set every LR to 1"),
    ({"optimizer.unet_lr": 1e-4, "optimizer.text_encoder_lr": 1e-3}, "warning", "optimizer.text_encoder_lr", "above the UNet LR"),
    ({"save.precision": "fp8"}, "error", "save.precision", "fp16, bf16 or fp32"),
    ({"save.formats": ["ckpt"]}, "error", "save.formats", "kohya"),
    ({"dataset.caption_extension": "txt"}, "error", "dataset.caption_extension", "start with a dot"),
    ({"training.epochs": 0}, "error", "training.epochs", "at least 1"),
    ({"network.unet_targets": "everything"}, "error", "network.unet_targets", "kohya, attention"),
])
def test_each_wrong_value_gets_one_message_naming_the_setting_and_the_fix(override, level, setting, fragment):
    msgs = _messages(preset("toy").with_overrides(override), cuda_available=False)
    assert (level, setting) in msgs, msgs
    assert fragment in msgs[(level, setting)]


def test_bf16_on_a_cpu_warns_only_where_bf16_is_emulated(monkeypatch):
    from lora_nb import config as config_module

    bf16 = preset("toy").with_overrides({"training.mixed_precision": "bf16"})
    monkeypatch.setattr(config_module, "cpu_has_native_bf16", lambda: False)
    assert "emulated" in _messages(bf16, cuda_available=False)[("warning", "training.mixed_precision")]
    assert ("warning", "training.mixed_precision") not in _messages(bf16, cuda_available=True)
    monkeypatch.setattr(config_module, "cpu_has_native_bf16", lambda: True)
    assert ("warning", "training.mixed_precision") not in _messages(bf16, cuda_available=False)


def test_fp16_without_a_cuda_gpu_warns_that_training_runs_in_fp32():
    msgs = _messages(preset("anime"), cuda_available=False)
    assert "runs in fp32" in msgs[("warning", "training.mixed_precision")]
    assert ("warning", "training.mixed_precision") not in _messages(preset("anime"), cuda_available=True)


def test_resolution_the_model_cannot_take_and_batch_larger_than_dataset():
    cfg = preset("toy").with_overrides({"dataset.resolution": "72x64"})
    (p,) = check_against_model(cfg, size_multiple=16, family="sd15")
    assert p.setting == "dataset.resolution" and "multiples of 16" in p.message and "Try" in p.message
    (p,) = check_against_dataset(preset("toy").with_overrides({"training.batch_size": 8}), 5, "data/x")
    assert p.setting == "training.batch_size" and "at most 5" in p.message
    (p,) = check_against_dataset(preset("toy"), 0, "data/empty")
    assert p.setting == "dataset.dir" and "no training images" in p.message


def test_raise_for_errors_lists_every_error_and_returns_warnings():
    cfg = preset("toy").with_overrides({"network.rank": 0, "optimizer.optimizer": "Adam"})
    with pytest.raises(ConfigError) as info:
        raise_for_errors(check_config(cfg, cuda_available=False))
    assert "network.rank" in str(info.value) and "optimizer.optimizer" in str(info.value)
    warnings = raise_for_errors(check_config(preset("anime"), cuda_available=False))
    assert [w.setting for w in warnings] == ["training.mixed_precision"]


def test_named_and_explicit_resolutions():
    assert parse_resolution("512x768") == (512, 768)
    assert parse_resolution("portrait") == (512, 768)
    assert parse_resolution("toy-landscape") == (96, 64)
    assert parse_resolution("1024") == (1024, 1024)


def test_every_setting_has_a_one_line_help_text():
    from lora_nb.config import setting_help

    helps = setting_help()
    missing = [n for n in all_setting_names() if not helps.get(n)]
    assert not missing
    assert "alpha / rank" in helps["network.alpha"]


def test_text_settings_keep_yaml_lookalike_words_as_text():
    cfg = preset("toy").with_overrides(["training.mixed_precision=no", "dataset.trigger_word=yes", "network.rank=16"])
    assert (cfg.training.mixed_precision, cfg.dataset.trigger_word, cfg.network.rank) == ("no", "yes", 16)
