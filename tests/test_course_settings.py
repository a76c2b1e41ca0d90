"""The course's shared settings (course.yaml), the presets for real work, the class pictures 01 builds being
the ones training uses, and zero terminal SNR."""

import pytest
import yaml

from lora_nb import LoraNbError
from lora_nb.cli import main
from lora_nb.config import PRESET_DESCRIPTIONS, PRESETS, ModelConfig, check_config, preset
from lora_nb.course_settings import defaults_for, settle
from lora_nb.workspace import Workspace


def _ws(tmp_path) -> Workspace:
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir(parents=True)
    return ws


def test_unset_parameters_follow_the_preset_and_nothing_is_written(tmp_path):
    ws = _ws(tmp_path)
    course = settle(ws, {"resolution": "", "crop_mode": "", "repeats": -1})
    assert course["resolution"] == "64x64" and course["crop_mode"] == "focus" and course["repeats"] == 10
    assert course.sources["resolution"] == "preset toy"
    assert not ws.course_settings.exists()  # a preset's value is never frozen into the file


def test_a_value_set_in_one_notebook_is_what_the_next_notebooks_read_and_a_later_p_still_wins(tmp_path):
    ws = _ws(tmp_path)
    settle(ws, {"preset": "realistic", "resolution": "512x768", "class_name": "woman"})  # notebook 01 with -p
    stored = yaml.safe_load(ws.course_settings.read_text(encoding="utf-8"))
    assert stored == {"preset": "realistic", "resolution": "512x768", "class_name": "woman"}
    later = settle(ws, {"resolution": "", "crop_mode": ""})  # notebook 02, nothing set
    assert later["resolution"] == "512x768" and later.sources["resolution"] == "course.yaml"
    assert later["tagger"] == "blip" and later["repeats"] == 15  # what the realistic preset implies
    assert "woman" in later["sample_prompts"] and "ohwx woman" in later["sample_prompts"]
    override = settle(ws, {"resolution": "768x512"})  # notebook 04 run with -p resolution 768x512
    assert override["resolution"] == "768x512" and override.sources["resolution"] == "set here"
    assert settle(ws, {})["resolution"] == "768x512"
    assert "set here: resolution" in override.describe(["preset", "resolution"])


def test_choosing_another_preset_changes_what_follows_from_it(tmp_path):
    ws = _ws(tmp_path)
    settle(ws, {"preset": "toy"})
    assert settle(ws, {"preset": "sdxl-anime"})["resolution"] == "1024x1024"
    assert settle(ws, {})["tagger"] == "wd" and settle(ws, {})["class_name"] == "1girl"


def test_a_changed_widget_is_remembered_and_an_unchanged_one_is_not(tmp_path):
    ws = _ws(tmp_path)
    course = settle(ws, {"resolution": "", "crop_mode": ""})
    assert course.remember({"resolution": "64x64", "crop_mode": "none", "max_upscale": 2.0}) == ["crop_mode"]
    assert yaml.safe_load(ws.course_settings.read_text(encoding="utf-8")) == {"crop_mode": "none"}


def test_a_broken_or_unknown_course_file_is_named(tmp_path):
    ws = _ws(tmp_path)
    ws.course_settings.write_text("resolution: [unclosed\n", encoding="utf-8")
    with pytest.raises(LoraNbError, match="course.yaml"):
        settle(ws, {})
    ws.course_settings.write_text("resolutoin: 64x64\n", encoding="utf-8")
    with pytest.raises(LoraNbError, match="resolutoin"):
        settle(ws, {})
    with pytest.raises(LoraNbError, match="list-presets"):
        defaults_for("sd3")


def test_notebook_04_takes_buckets_class_pictures_and_prompts_from_the_course(tmp_path):
    from PIL import Image

    from lora_nb.planning import build_config, values_from_course

    ws = _ws(tmp_path)
    folder = ws.regularization / "1_woman"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (64, 64), (i * 40, 90, 200)).save(folder / f"w{i}.png")
    course = settle(ws, {"preset": "realistic", "crop_mode": "none", "trigger_word": "lnb", "class_name": "woman",
                         "regularization_dir": "photos/women"})
    values = values_from_course(course, {"enable_buckets": "", "reg_dir": "", "sample_prompts": "",
                                         "trigger_word": ""}, ws.regularization)
    cfg = build_config("realistic", values, str(tmp_path / "data"), str(ws.root))
    assert cfg.dataset.enable_buckets is True
    assert cfg.dataset.reg_dir == str(ws.regularization)
    assert cfg.dataset.trigger_word == "lnb"
    assert len(cfg.sample.prompts) == 3 and all("woman" in p for p in cfg.sample.prompts)
    assert sum("lnb" in p for p in cfg.sample.prompts) == 2  # the third prompt checks for leakage
    # "none" in the course (or in 04) trains without class pictures, even when the folder is filled
    settle(ws, {"regularization_dir": "none"})
    values = values_from_course(settle(ws, {}), {"reg_dir": ""}, ws.regularization)
    assert build_config("realistic", values, str(tmp_path / "data"), str(ws.root)).dataset.reg_dir == ""


def test_keep_tokens_chosen_in_03_is_what_training_keeps_in_place(tmp_path):
    """03's keep_tokens (a parameter or its widget) reaches 04's config; left unset it is the preset's."""
    from lora_nb.planning import build_config, values_from_course

    ws = _ws(tmp_path)
    assert settle(ws, {"keep_tokens": -1})["keep_tokens"] == 1
    assert not ws.course_settings.exists()
    settle(ws, {"preset": "anime", "keep_tokens": 0})  # 03 run with -p keep_tokens 0
    cfg = build_config("anime", values_from_course(settle(ws, {}), {}, ws.regularization), str(tmp_path / "d"),
                       str(ws.root))
    assert (cfg.dataset.keep_tokens, cfg.dataset.shuffle_caption) == (0, True)
    settle(ws, {}).remember({"keep_tokens": 2})  # the widget in 03 changed
    cfg = build_config("anime", values_from_course(settle(ws, {}), {}, ws.regularization), str(tmp_path / "d"),
                       str(ws.root))
    assert cfg.dataset.keep_tokens == 2


def test_class_pictures_keep_their_captions_and_one_without_is_trained_with_the_class_word(tmp_path):
    from PIL import Image

    from lora_nb.dataset import scan_dataset
    from lora_nb.prepare import add_regularization_images

    src = tmp_path / "class"
    src.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (200, 20 * i, 30)).save(src / f"c{i}.png")
    (src / "c0.txt").write_text("a red circle on a black background", encoding="utf-8")
    ws = _ws(tmp_path)
    folder, pictures = add_regularization_images(ws, src, "circle")
    assert (folder / "c0.txt").read_text(encoding="utf-8") == "a red circle on a black background"
    items = {i.image.name: i.caption for i in scan_dataset(ws.regularization, is_reg=True).items}
    assert items == {"c0.png": "a red circle on a black background", "c1.png": "circle"}


def test_every_preset_is_listed_with_a_line_and_checks_clean_or_names_the_file_it_needs(capsys):
    assert set(PRESET_DESCRIPTIONS) == set(PRESETS)
    assert main(["config", "--list-presets"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == list(PRESETS)
    for name in PRESETS:
        errors = [p for p in check_config(preset(name), cuda_available=True) if p.level == "error"]
        if name in ("illustrious", "pony"):  # community files: the error says to download and point at it
            assert [p.setting for p in errors] == ["model.source"] and "download" in errors[0].message
        else:
            assert not errors, (name, errors)
    for name in ("sdxl-realistic", "sdxl-anime", "noobai-vpred"):
        assert preset(name).dataset.resolution == "1024x1024" and preset(name).model.family == "sdxl"
    noob = preset("noobai-vpred")
    assert noob.model.prediction_type == "v_prediction" and noob.training.zero_terminal_snr
    assert all(p.startswith("score_9") for p in preset("pony").sample.prompts)


def test_zero_terminal_snr_and_prediction_type_reach_training_previews_and_diagnosis(tiny_sd15_dir):
    import torch
    from diffusers import DDPMScheduler

    from lora_nb.models import load_model_of
    from lora_nb.sampling import scheduler_for
    from lora_nb.steps import loss_weights

    plain = load_model_of(ModelConfig(source=str(tiny_sd15_dir)))
    model = load_model_of(ModelConfig(source=str(tiny_sd15_dir), prediction_type="v_prediction"),
                          zero_terminal_snr=True)
    assert plain.pipe.scheduler.config.prediction_type == "epsilon"
    training = DDPMScheduler.from_config(model.pipe.scheduler.config)  # what the trainer builds
    assert training.config.prediction_type == "v_prediction"
    assert float(training.alphas_cumprod[-1]) < 1e-6 < float(DDPMScheduler.from_config(
        plain.pipe.scheduler.config).alphas_cumprod[-1])
    preview = scheduler_for("Euler", model.pipe.scheduler.config)
    assert preview.config.rescale_betas_zero_snr and preview.config.prediction_type == "v_prediction"
    t = torch.tensor([0, 500, 999])
    for gamma, debiased in ((5.0, False), (0.0, True), (5.0, True)):
        w = loss_weights(training, t, gamma, "v_prediction", debiased)
        assert torch.isfinite(w).all(), (gamma, debiased, w)


def test_zero_terminal_snr_on_an_epsilon_model_is_refused_by_name(tiny_sd15_dir):
    from lora_nb.models import load_model_of

    with pytest.raises(LoraNbError, match="training.zero_terminal_snr needs v-prediction"):
        load_model_of(ModelConfig(source=str(tiny_sd15_dir)), zero_terminal_snr=True)  # the model predicts epsilon
    cfg = preset("toy").with_overrides({"model.prediction_type": "epsilon", "training.zero_terminal_snr": True})
    assert [p.setting for p in check_config(cfg) if p.level == "error"] == ["training.zero_terminal_snr"]
