"""Noise, loss and caption options: each changes what it should and nothing else."""

import json
import math
import random

import pytest
import torch
from conftest import make_config
from diffusers import DDPMScheduler
from safetensors import safe_open
from safetensors.torch import load_file

from lora_nb import steps
from lora_nb.captions import dress_caption, drop_tags
from lora_nb.config import check_config, preset
from lora_nb.train import train


def _scheduler():
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def test_huber_is_the_squared_error_for_small_residuals_and_grows_linearly_for_large_ones():
    pred = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    small = pred + 1e-3 * torch.randn(pred.shape, generator=torch.Generator().manual_seed(1))
    c = torch.full((3,), 0.1)
    l2, huber = steps.diffusion_loss(pred, small), steps.diffusion_loss(pred, small, "huber", c)
    assert torch.allclose(huber, l2, rtol=1e-3)
    far = pred + 10.0
    assert steps.diffusion_loss(pred, far, "huber", c)[0] == pytest.approx(2 * 0.1 * (100.01 ** 0.5 - 0.1), rel=1e-4)
    assert steps.diffusion_loss(pred, far, "huber", c)[0] < steps.diffusion_loss(pred, far)[0] / 40
    assert torch.allclose(steps.diffusion_loss(pred, far, "smooth_l1", c), steps.diffusion_loss(pred, far, "huber", c) / 0.1)


def test_huber_c_schedules_follow_their_formulas():
    s, t = _scheduler(), torch.tensor([0, 250, 500, 999])
    assert torch.allclose(steps.huber_c_of(s, t, 0.1, "constant"), torch.full((4,), 0.1))
    exp = steps.huber_c_of(s, t, 0.1, "exponential")
    assert exp[0] == pytest.approx(1.0) and exp[-1] == pytest.approx(0.1 ** (999 / 1000), rel=1e-5)
    snr = steps.huber_c_of(s, t, 0.1, "snr")
    alphas = s.alphas_cumprod[t]
    assert torch.allclose(snr, 0.9 / (1 + ((1 - alphas) / alphas) ** 0.5) ** 2 + 0.1)
    assert (snr[:-1] > snr[1:]).all() and snr[-1] < 0.11  # large c at low noise, about c at high noise


def test_multires_noise_moves_power_to_coarse_scales_and_keeps_unit_variance():
    shape = torch.zeros(32, 4, 32, 32)
    white = steps.noise_like(shape, torch.Generator().manual_seed(0))
    pyramid = steps.noise_like(shape, torch.Generator().manual_seed(0), multires_iterations=6, multires_discount=0.5)
    coarse = lambda x: torch.nn.functional.avg_pool2d(x, 8).var().item() / x.var().item()  # noqa: E731
    assert coarse(white) < 0.03 < 0.05 < coarse(pyramid)  # white noise: 1/64 of its power in 8×8 means
    assert pyramid.std().item() == pytest.approx(1.0, abs=1e-3)
    again = steps.noise_like(shape, torch.Generator().manual_seed(0), multires_iterations=6, multires_discount=0.5)
    assert torch.equal(pyramid, again)  # from the step's generator alone: a resumed run draws the same


def test_input_perturbation_adds_gamma_scaled_noise_and_is_nothing_at_zero():
    noise = torch.randn(8, 4, 16, 16)
    assert steps.perturbed_noise(noise, torch.Generator(), 0.0) is noise
    extra = steps.perturbed_noise(noise, torch.Generator().manual_seed(3), 0.1) - noise
    assert extra.std().item() == pytest.approx(0.1, rel=0.05)


def test_tag_dropout_keeps_the_leading_tags_and_the_prefix_and_suffix_go_around():
    caption = "sks, " + ", ".join(f"tag{i}" for i in range(200))
    dropped = drop_tags(caption, 0.5, keep_tokens=1, rng=random.Random(0))
    tags = dropped.split(", ")
    assert tags[0] == "sks" and 70 < len(tags) - 1 < 130
    assert drop_tags(caption, 0.0, 1, random.Random(0)) == caption
    assert dress_caption("sks, red", "masterpiece,", "4k") == "masterpiece, sks, red 4k"


def test_options_train_and_are_written_to_the_file_and_the_captions_are_dressed(tiny_sd15_dir, tiny_dataset,
                                                                               tmp_path, captions_seen):
    base = train(make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "plain", **{"training.epochs": 1}),
                 progress=False)
    options = {"training.epochs": 1, "training.multires_noise_iterations": 6, "training.ip_noise_gamma": 0.1,
               "training.loss_type": "huber", "dataset.caption_prefix": "masterpiece,",
               "dataset.caption_suffix": "4k", "dataset.tag_dropout": 0.2}
    result = train(make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "opts", **options), progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "opts" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses and all(math.isfinite(v) for v in losses)
    a, b = load_file(base.final), load_file(result.final)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    with safe_open(str(result.final), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_loss_type"], meta["ss_multires_noise_iterations"], meta["ss_ip_noise_gamma"]) == ("huber", "6", "0.1")
    assert meta["ss_caption_prefix"] == "masterpiece," and meta["ss_caption_tag_dropout_rate"] == "0.2"
    trained = [c for c in captions_seen if c.startswith("masterpiece, ")]
    assert trained and all(c.endswith(" 4k") for c in trained)


def test_training_draws_its_timesteps_inside_min_and_max_timestep(tiny_sd15_dir, tiny_dataset, tmp_path,
                                                                  monkeypatch):
    from lora_nb import steps as steps_module

    drawn: list[int] = []
    original = steps_module.sample_timesteps

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        drawn.extend(out.tolist())
        return out

    monkeypatch.setattr(steps_module, "sample_timesteps", spy)
    options = {"training.epochs": 2, "training.min_timestep": 900, "training.max_timestep": 950}
    result = train(make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "late", **options), progress=False)
    assert len(drawn) >= 8 and min(drawn) >= 900 and max(drawn) < 950 and len(set(drawn)) > 1
    with safe_open(str(result.final), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_min_timestep"], meta["ss_max_timestep"]) == ("900", "950")
    full = [original(FakeSchedule, 1, torch.Generator().manual_seed(i), "cpu").item() for i in range(400)]
    assert min(full) < 100 and max(full) >= 900  # the defaults draw from the whole schedule


def test_the_validation_loss_is_measured_inside_the_trained_timesteps():
    assert steps.validation_timesteps() == (100, 300, 500, 700, 900)  # the whole schedule: as before the option
    assert steps.validation_timesteps(500, 1000) == (550, 650, 750, 850, 950)
    assert steps.validation_timesteps(900, 950, 2) == (912, 937)


class FakeSchedule:  # a schedule of 1000 steps, as every SD model's
    class config:
        num_train_timesteps = 1000


def test_bad_option_values_are_refused_by_name():
    cfg = preset("toy").with_overrides({"training.loss_type": "l1", "training.huber_c": 0.0,
                                        "training.multires_noise_discount": 1.5, "dataset.tag_dropout": 1.0,
                                        "training.ip_noise_gamma": -0.1, "training.max_timestep": 0})
    bad = {p.setting for p in check_config(cfg) if p.level == "error"}
    assert bad == {"training.loss_type", "training.huber_c", "training.multires_noise_discount",
                   "dataset.tag_dropout", "training.ip_noise_gamma", "training.max_timestep"}
    late = preset("toy").with_overrides({"training.min_timestep": 1000})
    assert [p.setting for p in check_config(late) if p.level == "error"] == ["training.min_timestep"]


def test_a_warm_up_given_both_ways_is_refused():
    cfg = preset("toy").with_overrides({"optimizer.lr_warmup_ratio": 0.1})  # the toy preset warms up 20 steps
    assert [p.setting for p in check_config(cfg) if p.level == "error"] == ["optimizer.lr_warmup_ratio"]


def test_tensorboard_event_files_hold_the_runs_loss_lr_validation_and_samples(tiny_sd15_dir, tiny_dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "ws", **{
        "logging.tensorboard": True, "dataset.validation_split": 1, "sample.every_n_epochs": 2,
        "sample.prompts": ["sks, red square --d 1 --s 2"]})
    result = train(cfg, progress=False)
    logs = EventAccumulator(str(tmp_path / "ws" / "logs"))  # tensorboard's own reader
    logs.Reload()
    tags = logs.Tags()
    assert len(logs.Scalars("loss/step")) == result.steps
    assert {"loss/train_loss", "loss/val_loss"} <= set(tags["scalars"]) and any(t.startswith("lr/") for t in tags["scalars"])
    assert tags["images"] == ["samples/p00"]


@pytest.mark.parametrize("name", ["AdamWScheduleFree", "CAME"])
def test_the_trainer_runs_the_newer_optimizers(name, tiny_sd15_dir, tiny_dataset, tmp_path):
    cfg = make_config(tiny_sd15_dir, tiny_dataset, tmp_path / name, **{
        "optimizer.optimizer": name, "optimizer.lr_scheduler": "constant", "training.epochs": 1})
    result = train(cfg, progress=False)
    assert result.final.exists() and result.steps == 2


def test_init_from_continues_an_existing_lora_and_refuses_one_it_cannot(tiny_sd15_dir, tiny_sdxl_dir, tiny_dataset,
                                                                       tmp_path):
    from lora_nb import LoraNbError

    first = train(make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "first", **{"training.epochs": 1}),
                  progress=False)
    # continue it with a vanishing LR: the continued file is the first one (to rounding), not a fresh LoRA
    again = train(make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "again", **{
        "training.epochs": 1, "network.init_from": str(first.final), "optimizer.learning_rate": 1e-12,
        "optimizer.text_encoder_lr": 1e-12, "optimizer.weight_decay": 0.0}), progress=False)
    a, b = load_file(first.final), load_file(again.final)
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert any(a[k].abs().max() > 1e-3 for k in a if "lora_up" in k)  # and the first one did learn something
    with safe_open(str(again.final), "pt") as f:
        assert f.metadata()["ss_network_weights"] == first.final.name
    for overrides, reason in ((dict(), "is an sd15 LoRA and the base model is sdxl"),
                              ({"network.rank": 4}, "rank 8 / alpha 8 at .*, this run rank 4")):
        model_dir = tiny_sdxl_dir if not overrides else tiny_sd15_dir
        cfg = make_config(model_dir, tiny_dataset, tmp_path / f"bad{len(overrides)}", **{
            "training.epochs": 1, "network.init_from": str(first.final), **overrides})
        with pytest.raises(LoraNbError, match=reason):
            train(cfg, progress=False)


def test_masked_loss_ignores_what_the_mask_leaves_out():
    """Changing the prediction only where the mask is 0 leaves the loss as it was (l2 and huber)."""
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 1:5] = 1.0
    changed = torch.where(mask.bool(), pred, pred + 5 * torch.randn(pred.shape, generator=g))
    for loss_type in ("l2", "huber"):
        a = steps.diffusion_loss(pred, target, loss_type, torch.full((2,), 0.1), mask)
        b = steps.diffusion_loss(changed, target, loss_type, torch.full((2,), 0.1), mask)
        assert torch.allclose(a, b) and not torch.allclose(a, steps.diffusion_loss(changed, target, loss_type,
                                                                                      torch.full((2,), 0.1)))
    assert torch.equal(steps.diffusion_loss(pred, target, mask=torch.zeros(2, 1, 8, 8)), torch.zeros(2))


def test_masks_come_from_a_mask_file_or_the_alpha_channel_cropped_as_the_image_is(tmp_path):
    import numpy as np
    from PIL import Image

    from lora_nb import LoraNbError
    from lora_nb.dataset import load_training_mask
    from lora_nb.folders import list_images

    Image.new("RGB", (96, 64), (200, 10, 10)).save(tmp_path / "a.jpg")
    m = np.zeros((64, 96), np.uint8)
    m[:, :48] = 255  # the left half is the subject
    Image.fromarray(m).save(tmp_path / "a.mask.png")
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[16:48, 16:48, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "b.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "c.png")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.png", "c.png"]  # a mask is no training image
    a = load_training_mask(tmp_path / "a.jpg", (64, 64))  # cover-resized to 96x64, centre-cropped to 64x64
    assert a.shape == (64, 64) and a[:, :16].min() == 1.0 and a[:, 48:].max() == 0.0
    assert load_training_mask(tmp_path / "a.jpg", (64, 64), flip=True)[:, 48:].min() == 1.0
    b = load_training_mask(tmp_path / "b.png", (32, 32))
    assert b[10:22, 10:22].min() > 0.99 and b[:4].max() < 0.01  # halved: the opaque square is 8..24
    assert load_training_mask(tmp_path / "c.png", (64, 64)) is None
    Image.fromarray(m[:32]).save(tmp_path / "a.mask.png")
    with pytest.raises(LoraNbError, match="save the mask at the image's size"):
        load_training_mask(tmp_path / "a.jpg", (64, 64))


def test_masked_training_runs_writes_its_metadata_and_says_when_no_image_has_a_mask(tiny_sd15_dir, tiny_dataset,
                                                                                  tmp_path):
    events = []
    cfg = make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "ws", **{"dataset.masked_loss": True,
                                                                        "training.max_steps": 2})
    result = train(cfg, resume=False, progress=False, on_event=events.append)
    with safe_open(str(result.files[-1]), framework="pt") as f:
        assert f.metadata()["ss_masked_loss"] == "True"
    assert any("none of the 4 training images has a mask" in e.data.get("message", "") for e in events
               if e.kind == "warning")
