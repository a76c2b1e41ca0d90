"""Training end to end on tiny models: the files it writes load elsewhere and give the same images."""

import json

import pytest
import torch
from conftest import make_config
from safetensors import safe_open

from lora_nb import LoraNbError
from lora_nb.lora_io import inspect_lora, load_lora
from lora_nb.models import load_base_model
from lora_nb.train import train


def _images(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pipe("sks, red square", num_inference_steps=2, height=64, width=64, guidance_scale=5.0,
                output_type="np", generator=g).images


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_trained_lora_reloads_in_a_fresh_pipeline_with_identical_images(family, request, tiny_dataset, tmp_path):
    model_dir = request.getfixturevalue(f"tiny_{family}_dir")
    cfg = make_config(model_dir, tiny_dataset, tmp_path / "ws", **{
        "network.rank": 4, "network.alpha": 2.0, "optimizer.learning_rate": 1e-2,
        "optimizer.text_encoder_lr": 5e-3, "save.precision": "fp32", "save.formats": ["kohya", "diffusers"]})
    model = load_base_model(model_dir)
    base_images = _images(load_base_model(model_dir).pipe)
    result = train(cfg, model=model, progress=False)
    trained_images = _images(model.pipe)
    assert abs(trained_images - base_images).max() > 1e-3, "training should change the output"

    kohya = tmp_path / "ws" / "lora" / "lora.safetensors"
    diffusers_file = tmp_path / "ws" / "lora" / "lora.diffusers.safetensors"
    assert result.final == kohya
    for path in (kohya, diffusers_file):
        fresh = load_base_model(model_dir).pipe
        counts = load_lora(fresh, path)  # raises when any key is not loaded
        assert counts["unet"] > 0 and sum(v for k, v in counts.items() if k.startswith("text_encoder")) > 0
        assert abs(_images(fresh) - trained_images).max() <= 1e-4, path.name

    info = inspect_lora(kohya)
    assert info["format"] == "kohya" and info["family"] == family
    assert (info["rank"], info["alpha"]) == (4, 2.0)
    with safe_open(str(kohya), "pt") as f:
        keys = list(f.keys())
        alphas = {float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
        meta = f.metadata()
    assert alphas == {2.0}
    te_prefixes = ("lora_te_text_model_encoder_layers_",) if family == "sd15" else \
        ("lora_te1_text_model_encoder_layers_", "lora_te2_text_model_encoder_layers_")
    for prefix in te_prefixes:
        assert any(k.startswith(prefix) for k in keys), prefix
    if family == "sdxl":
        assert any(k.startswith("lora_unet_input_blocks_") for k in keys)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2" or float(meta["ss_network_alpha"]) == 2.0
    assert meta["ss_num_epochs"] == "2" and json.loads(meta["ss_tag_frequency"])["2_sks"]["sks"] == 4


@pytest.mark.slow
def test_save_every_2_epochs_over_10_leaves_5_files_in_fp16(tiny_sd15_dir, tiny_dataset, tmp_path):
    cfg = make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "ws", **{
        "training.epochs": 10, "training.batch_size": 4, "save.every_n_epochs": 2, "save.precision": "fp16",
        "save.save_state": False})
    result = train(cfg, progress=False)
    names = sorted(p.name for p in (tmp_path / "ws" / "lora").iterdir())
    assert names == ["lora-e0002.safetensors", "lora-e0004.safetensors", "lora-e0006.safetensors",
                     "lora-e0008.safetensors", "lora.safetensors"]
    assert result.plan.saves == 5 and result.steps == 10
    with safe_open(str(result.final), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys() if not k.endswith(".alpha")}
    assert dtypes == {torch.float16}


@pytest.mark.slow
def test_metrics_and_events_report_every_step_and_epoch(tiny_sd15_dir, tiny_dataset, tmp_path):
    events = []
    cfg = make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "ws", **{"dataset.validation_split": 1})
    train(cfg, on_event=events.append, progress=False)
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert kinds.count("step") == 4 and kinds.count("epoch") == 2  # 3 training images × 1 repeat / batch 2
    lines = [json.loads(l) for l in (tmp_path / "ws" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "loss" in l] == [1, 2, 3, 4]
    epoch_lines = [l for l in lines if "val_loss" in l]
    assert len(epoch_lines) == 2 and all(l["val_loss"] > 0 for l in epoch_lines)


def test_a_validation_folder_gives_the_validation_loss_without_taking_training_images(tiny_sd15_dir, tiny_dataset,
                                                                                       tmp_path):
    import shutil

    val = tmp_path / "val" / "1_sks"
    val.mkdir(parents=True)
    for name in ("img0", "img1"):
        shutil.copy(tiny_dataset / "2_sks" / f"{name}.png", val / f"{name}.png")
        shutil.copy(tiny_dataset / "2_sks" / f"{name}.txt", val / f"{name}.txt")
    cfg = make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "ws", **{
        "dataset.validation_dir": str(tmp_path / "val"), "training.epochs": 1})
    events = []
    train(cfg, on_event=events.append, progress=False)
    assert [e.kind for e in events].count("step") == 2  # all 4 training images (× 1 repeat) / batch 2
    lines = [json.loads(l) for l in (tmp_path / "ws" / "metrics.jsonl").read_text().splitlines()]
    assert [l["val_loss"] > 0 for l in lines if "val_loss" in l] == [True]


def test_captions_that_reach_the_text_encoder_start_with_the_trigger_word(tiny_sd15_dir, tiny_dataset, tmp_path,
                                                                         captions_seen):
    cfg = make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "ws", **{
        "training.epochs": 1, "training.max_steps": 2, "dataset.shuffle_caption": True, "dataset.keep_tokens": 1})
    train(cfg, progress=False)
    seen = captions_seen
    assert len(seen) == 4
    assert all(c.split(", ")[0] == "sks" for c in seen), seen


def test_a_multi_line_caption_trains_one_form_per_step_with_enable_wildcard(tiny_sd15_dir, tiny_dataset, tmp_path,
                                                                          captions_seen):
    """With ``dataset.enable_wildcard`` each step trains one line of a caption file (and one option of each
    ``{a|b}``); without it the lines are joined as tags, as before. The metadata counts every form's tags."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    for txt in (data / "2_sks").glob("*.txt"):
        colour = txt.read_text().split()[0]
        txt.write_text(f"a {colour} sks square\nsks, {colour} square, {{gray|plain}} background\n")
    cfg = make_config(tiny_sd15_dir, data, tmp_path / "ws", **{
        "training.epochs": 4, "dataset.enable_wildcard": True, "dataset.trigger_word": "sks"})
    train(cfg, progress=False)
    forms = set(captions_seen)
    assert len(captions_seen) == 16 and all(c.count("\n") == 0 and "{" not in c for c in forms)
    assert any(c.startswith("a ") for c in forms) and any(c.startswith("sks, ") for c in forms)
    assert any(c.endswith("gray background") for c in forms) and any(c.endswith("plain background") for c in forms)
    with safe_open(str(tmp_path / "ws" / "lora" / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    freq = json.loads(meta["ss_tag_frequency"])["2_sks"]
    assert freq["a red sks square"] == 1 and freq["red square"] == 1 and freq["sks"] == 4
    assert json.loads(meta["ss_datasets"])[0]["subsets"][0]["enable_wildcard"] is True
    captions_seen.clear()
    train(make_config(tiny_sd15_dir, data, tmp_path / "ws-off", **{"training.epochs": 1, "dataset.enable_wildcard": False}),
          progress=False)
    assert captions_seen and all(c.startswith("a ") and "{gray|plain} background" in c for c in captions_seen), captions_seen


def test_caption_extension_mismatch_is_refused_with_the_fix(tiny_dataset, tiny_sd15_dir, tmp_path):
    cfg = make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "ws", **{"dataset.caption_extension": ".caption"})
    with pytest.raises(LoraNbError, match=r"dataset.caption_extension='.txt'"):
        train(cfg, progress=False)


def test_non_finite_loss_stops_at_once_and_keeps_the_saved_files(fault_before_step, tiny_sd15_dir, tiny_dataset,
                                                                 tmp_path):
    from lora_nb.train import TrainingStopped

    cfg = make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "ws", **{"training.epochs": 3})
    model = load_base_model(tiny_sd15_dir)

    def poison(step):
        if step == 2:  # after epoch 1 was saved: make the UNet output NaN
            with torch.no_grad():
                model.pipe.unet.conv_out.bias.fill_(float("nan"))

    with fault_before_step(poison), pytest.raises(TrainingStopped, match="step 3: the loss became NaN") as info:
        train(cfg, model=model, progress=False)
    assert "lora-e0001.safetensors" in str(info.value)
    assert inspect_lora(tmp_path / "ws" / "lora" / "lora-e0001.safetensors")["problems"] == []


def test_cached_text_encoder_is_done_before_the_first_step_so_it_can_leave_the_gpu(tiny_sd15_dir, tiny_dataset,
                                                                                  tmp_path, captions_seen):
    """With frozen text encoders every caption (and the empty one of caption dropout) is encoded up front:
    the loop never calls them, which is what lets the trainer move them (and the VAE) off the GPU."""
    from lora_nb.train import frozen_parts

    seen_at_first_step = []
    cfg = make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "ws", **{
        "training.epochs": 2, "dataset.caption_dropout": 0.5, "optimizer.text_encoder_lr": 0.0,
        "dataset.enable_wildcard": False})  # a caption of several forms is encoded per step
    model = load_base_model(tiny_sd15_dir)
    train(cfg, model=model, progress=False,
          on_event=lambda e: seen_at_first_step.append(len(captions_seen)) if e.kind == "step" else None)
    assert seen_at_first_step[0] == seen_at_first_step[-1] == 5  # four captions and "", once each
    assert "" in captions_seen and all(c.startswith("sks") for c in captions_seen if c)
    assert frozen_parts(model, True, True) == [model.pipe.vae, model.text_encoders[0]]
    assert frozen_parts(model, True, False) == [model.pipe.vae]


def test_a_run_with_other_settings_moves_the_earlier_results_aside_instead_of_overwriting(tiny_sd15_dir, tiny_dataset,
                                                                                           tmp_path):
    ws = tmp_path / "ws"
    first = make_config(tiny_sd15_dir, tiny_dataset, ws, **{"training.epochs": 2, "optimizer.learning_rate": 1e-3})
    train(first, progress=False)
    before = {p.name: p.read_bytes() for p in (ws / "lora").glob("*.safetensors")}
    assert set(before) == {"lora-e0001.safetensors", "lora.safetensors"}

    warnings = []
    second = first.with_overrides({"optimizer.learning_rate": 2e-3})
    train(second, progress=False, on_event=lambda e: warnings.append(e.data["message"]) if e.kind == "warning" else None)
    (archive,) = (ws / "previous").iterdir()
    assert {p.name: p.read_bytes() for p in (archive / "lora").glob("*.safetensors")} == before
    assert (archive / "metrics.jsonl").read_text() and (archive / "train_config.yaml").is_file()
    assert any(str(archive) in w and "nothing is overwritten" in w for w in warnings)
    assert len([l for l in (ws / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]) == 4  # the new run's only

    train(second, progress=False, resume=False)  # the same settings started over: replaces its own files
    assert len(list((ws / "previous").iterdir())) == 1


def test_a_failing_preview_costs_no_epoch_the_files_and_state_come_first(tiny_sd15_dir, tiny_dataset, tmp_path,
                                                                         monkeypatch):
    """Previews that fail at epoch 2 (here: the renderer raises) leave that epoch's LoRA file and state saved,
    say why in a warning, and training goes on to the end."""
    from lora_nb import train as train_module

    real_render = train_module.render_previews
    calls = []

    def render_failing_at_epoch_2(*args, **kwargs):
        calls.append(len(calls) + 1)
        if len(calls) == 2:
            raise RuntimeError("sampler exploded")
        return real_render(*args, **kwargs)

    monkeypatch.setattr(train_module, "render_previews", render_failing_at_epoch_2)
    cfg = make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "ws", **{
        "training.epochs": 3, "sample.every_n_epochs": 1, "sample.steps": 2, "sample.prompts": ["sks, red square"]})
    events = []
    result = train(cfg, progress=False, on_event=events.append)
    ws = tmp_path / "ws"
    assert calls == [1, 2, 3]
    assert (ws / "lora" / "lora-e0002.safetensors").is_file() and result.final == ws / "lora" / "lora.safetensors"
    assert sorted(p.name for p in (ws / "samples").glob("*.png")) == ["e0001-p00.png", "e0003-p00.png"]
    failed = [e for e in events if e.kind == "warning" and "Previews of epoch 2 failed" in e.data["message"]]
    assert failed and "sampler exploded" in failed[0].data["message"] and failed[0].data["message"] in result.warnings
    state = torch.load(ws / "state" / "training_state.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 3


def test_sample_steps_below_one_are_refused_before_any_work(tiny_sd15_dir, tiny_dataset, tmp_path):
    cfg = make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "ws", **{"sample.steps": 0})
    with pytest.raises(LoraNbError, match=r"sample\.steps"):
        train(cfg, progress=False)
    assert not (tmp_path / "ws").exists()


def test_saved_files_name_themselves_hold_no_local_path_and_are_readable_by_others(tiny_sd15_dir, tiny_dataset,
                                                                                   tmp_path):
    """Every file's ``ss_output_name`` and ``modelspec.title`` is its own name (AUTOMATIC1111's alias), no
    metadata value holds the local path of the base model or dataset, the sd-scripts and model-spec keys UIs
    read are there, and the files are 0644 under the usual umask."""
    import os

    old = os.umask(0o022)
    try:
        cfg = make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "ws", **{"training.epochs": 2,
                                                                            "training.min_timestep": 200,
                                                                            "network.clip_skip": 2})
        result = train(cfg, progress=False)
    finally:
        os.umask(old)
    assert [f.name for f in result.files] == ["lora-e0001.safetensors", "lora.safetensors"]
    session = set()
    for path in result.files:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        assert meta["ss_output_name"] == meta["modelspec.title"] == path.name.removesuffix(".safetensors")
        assert meta["ss_sd_model_name"] == tiny_sd15_dir.name
        for value in meta.values():
            assert str(tiny_sd15_dir) not in value and str(tiny_dataset) not in value and str(tmp_path) not in value
        assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["ss_v2"] == "False"
        # as sd-scripts writes them: an SD1.5 LoRA follows diffusers' names, clip skip and the trained steps
        assert meta["modelspec.implementation"] == "diffusers"
        assert (meta["modelspec.encoder_layer"], meta["modelspec.timestep_range"]) == ("2", "200,1000")
        assert json.loads(meta["ss_dataset_dirs"]) == {"2_sks": {"n_repeats": 1, "img_count": 4}}
        for key in ("ss_shuffle_caption", "ss_flip_aug", "ss_cache_latents", "ss_training_started_at",
                    "ss_training_finished_at", "modelspec.resolution", "modelspec.date", "ss_datasets"):
            assert key in meta, key
        session.add(meta["ss_session_id"])
        assert path.stat().st_mode & 0o777 == 0o644
    assert len(session) == 1  # the files of one run share its session id


def test_model_vae_replaces_the_vae_the_trainer_encodes_with(tiny_sd15_dir, tiny_dataset, tmp_path):
    """``model.vae`` (a VAE folder or a single .safetensors file) is the VAE training and previews use: the
    loaded model holds its weights, and the LoRA trained through it differs from one trained through the
    model's own VAE. A missing path is refused before any work."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from lora_nb.models import load_model_of

    own = load_base_model(tiny_sd15_dir).pipe.vae
    torch.manual_seed(5)
    other = AutoencoderKL.from_config(own.config)
    other.save_pretrained(tmp_path / "other-vae")
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "other-vae.safetensors"))
    results = {}
    for name, vae in (("own", ""), ("folder", str(tmp_path / "other-vae")),
                      ("file", str(tmp_path / "other-vae.safetensors"))):
        cfg = make_config(tiny_sd15_dir, tiny_dataset, tmp_path / name, **{"model.vae": vae, "training.epochs": 1,
                                                                           "save.precision": "fp32"})
        loaded = load_model_of(cfg.model).pipe.vae.state_dict()
        expected = (own if not vae else other).state_dict()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected), name
        results[name] = train(cfg, progress=False).final
    tensors = {n: safe_open(str(p), "pt") for n, p in results.items()}
    key = next(k for k in tensors["own"].keys() if k.startswith("lora_unet") and k.endswith("lora_up.weight"))
    assert torch.equal(tensors["folder"].get_tensor(key), tensors["file"].get_tensor(key))
    assert not torch.equal(tensors["own"].get_tensor(key), tensors["folder"].get_tensor(key))

    missing = make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "missing",
                          **{"model.vae": str(tmp_path / "nowhere.safetensors")})
    with pytest.raises(LoraNbError, match=r"model\.vae: .*nowhere\.safetensors' does not exist"):
        train(missing, progress=False)


def test_a_family_that_does_not_match_the_model_folder_is_named(tiny_sd15_dir, tiny_dataset, tmp_path):
    cfg = make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "ws", **{"model.family": "sdxl"})
    with pytest.raises(LoraNbError, match=r"model\.family='sdxl' but .* holds an sd15 model"):
        train(cfg, progress=False)


def test_a_tag_past_token_77_reaches_the_unet_with_long_captions(tiny_sd15_dir):
    """Two captions that differ only in a tag after the 77th token: with max_token_length 225 the UNet gets
    different text embeddings (75-token chunks, BOS/EOS each); with 75 they are cut to the same. One chunk is
    exactly the pipeline's own encoding, and previews encode prompts through the same function."""
    from lora_nb import steps

    model = load_base_model(tiny_sd15_dir)
    tok = model.pipe.tokenizer
    head = ", ".join(["red square"] * 40)
    a, b = f"{head}, blue circle", f"{head}, green star"
    assert steps.count_tokens(tok, head) > 77
    with torch.no_grad():
        long_a, _ = steps.encode_prompts(model, [a], max_token_length=225)
        long_b, _ = steps.encode_prompts(model, [b], max_token_length=225)
        short_a, _ = steps.encode_prompts(model, [a], max_token_length=75)
        short_b, _ = steps.encode_prompts(model, [b], max_token_length=75)
        own = model.pipe.encode_prompt(a, "cpu", 1, False)[0]
    assert long_a.shape[1] == 3 * (tok.model_max_length - 2) + 2
    assert not torch.allclose(long_a, long_b)
    assert torch.equal(short_a, short_b) and torch.allclose(short_a, own, atol=1e-6)
    ids = steps.tokenize(tok, [a], 3)[0]
    assert all(int(c[0]) == tok.bos_token_id and int(c[-1]) == tok.eos_token_id for c in ids)


def test_captions_past_the_limit_are_named_in_a_warning(tiny_sd15_dir, tmp_path):
    from PIL import Image

    folder = tmp_path / "data" / "1_sks"
    folder.mkdir(parents=True)
    for i, caption in enumerate(["red square", ", ".join(["red square"] * 40)]):
        Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption, encoding="utf-8")
    cfg = make_config(tiny_sd15_dir, tmp_path / "data", tmp_path / "ws", **{"training.epochs": 1,
                                                                           "dataset.max_token_length": 75})
    result = train(cfg, progress=False)
    said = [w for w in result.warnings if "more than 75 tokens" in w]
    assert said and "img1.txt" in said[0] and "img0.txt" not in said[0] and "max_token_length" in said[0]


def _three_shape_dataset(root, per_shape=2):
    """Pictures in three aspect ratios (landscape, square, portrait), a red bar at each picture's left and
    right edge: a centre crop would cut the bars of the wide ones."""
    from PIL import Image

    folder = root / "1_sks"
    folder.mkdir(parents=True)
    for shape in ((160, 96), (128, 128), (96, 160)):
        for i in range(per_shape):
            img = Image.new("RGB", shape, (128, 128, 128))
            for x in (0, 1, 2, shape[0] - 3, shape[0] - 2, shape[0] - 1):
                for y in range(shape[1]):
                    img.putpixel((x, y), (230, 20, 20))
            name = f"{shape[0]}x{shape[1]}-{i}"
            img.save(folder / f"{name}.png")
            (folder / f"{name}.txt").write_text("red bars, gray", encoding="utf-8")
    return root


@pytest.mark.slow
def test_no_crop_trains_every_picture_whole_in_its_aspect_bucket(tiny_sd15_dir, tmp_path, monkeypatch):
    """``dataset.enable_buckets`` (crop mode none): three aspect ratios train at three bucket sizes, every batch
    from one bucket, the latents of each bucket's shape; no picture loses its edges; the bucket table is
    announced, stored as ``ss_bucket_info`` and the steps math counts one partial batch per bucket."""
    from lora_nb import steps as steps_module
    from lora_nb.dataset import load_training_image

    data = _three_shape_dataset(tmp_path / "data")
    shapes_seen = []
    real = steps_module.latents_of

    def spy(model, samples, *args, **kwargs):
        lat = real(model, samples, *args, **kwargs)
        shapes_seen.append((tuple(lat.shape[2:]), {s.item.size for s in samples}))
        return lat

    monkeypatch.setattr(steps_module, "latents_of", spy)
    events = []
    cfg = make_config(tiny_sd15_dir, data, tmp_path / "ws", **{
        "dataset.enable_buckets": True, "dataset.bucket_step": 32, "dataset.resolution": "128x128",
        "training.batch_size": 4, "training.epochs": 1, "dataset.cache_latents": False})
    result = train(cfg, progress=False, on_event=events.append)
    buckets = {(160, 96): 2, (128, 128): 2, (96, 160): 2}
    assert result.plan.total_steps == 3  # 3 buckets of 2 at batch 4: a partial batch each
    assert len(shapes_seen) == 3 and all(len(sizes) == 1 for _, sizes in shapes_seen)
    scale = load_base_model(tiny_sd15_dir).vae_scale
    assert {shape for shape, _ in shapes_seen} == {(h // scale, w // scale) for w, h in buckets}
    assert any(e.kind == "info" and "aspect-ratio buckets" in e.data["message"] and "160x96: 2" in e.data["message"]
               for e in events)
    with safe_open(str(result.final), "pt") as f:
        info = json.loads(f.metadata()["ss_bucket_info"])
    assert {tuple(b["resolution"]): b["count"] for b in info["buckets"].values()} == buckets
    for path in sorted((data / "1_sks").glob("*.png")):
        w, h = map(int, path.stem.split("-")[0].split("x"))
        arr, _, crop = load_training_image(path, (w, h))
        assert crop == (0, 0) and arr[0, :, 0].mean() > 0.5 and arr[0, :, -1].mean() > 0.5, path.name  # bars kept


@pytest.mark.slow
def test_without_buckets_a_picture_of_another_shape_is_said_to_be_cropped(tiny_sd15_dir, tmp_path):
    data = _three_shape_dataset(tmp_path / "data", per_shape=1)
    cfg = make_config(tiny_sd15_dir, data, tmp_path / "ws", **{"dataset.resolution": "128x128", "training.epochs": 1})
    result = train(cfg, progress=False)
    assert any("2 of 3 images have another shape" in w and "dataset.enable_buckets=true" in w for w in result.warnings)
