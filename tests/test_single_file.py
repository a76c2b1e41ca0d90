"""Single-file checkpoints load offline: the shipped SD1.5/SDXL configurations describe the published
full-size models, tiny checkpoints written in the single-file layout load back weight for weight with no
hub access, and what is still missing (the CLIP vocabulary) is named file by file."""

import fnmatch
import json
import shutil
import tomllib
from pathlib import Path

import pytest
import torch

from lora_nb import LoraNbError, checkpoints
from lora_nb.models import build_tiny_sdxl, load_base_model, load_model_of

ROOT = Path(__file__).resolve().parents[1]
PARTS = {"sd15": ("unet", "vae", "text_encoder"), "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2")}


@pytest.fixture(scope="module")
def tiny_sdxl_two_widths(tmp_path_factory):
    """A tiny SDXL whose text encoders differ in width, as SDXL's do (32 and 48)."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl-2w"), text_encoder_2_width=48)


@pytest.fixture
def no_hub(monkeypatch):
    """Any attempt to reach the hub for configurations or tokenizers fails the test."""
    import diffusers.loaders.single_file as single_file

    def refuse(*args, **kwargs):
        raise AssertionError(f"the hub was asked: {args} {kwargs}")

    monkeypatch.setattr(single_file, "_download_diffusers_model_config_from_hub", refuse)
    monkeypatch.setattr(checkpoints, "_hub_tokenizer_files", refuse)


def _config_only_copy(model_dir: Path, dest: Path) -> Path:
    """The JSON files of a diffusers folder (no weights, no vocabulary): a configuration folder like the
    shipped ones."""
    for f in model_dir.rglob("*.json"):
        if f.name in ("vocab.json", "tokenizer.json"):
            continue
        target = dest / f.relative_to(model_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, target)
    return dest


def _write_tiny_checkpoint(model_dir: Path, family: str, folder: Path, extra=None) -> tuple[Path, object]:
    """The tiny model as ``folder/model.safetensors`` with its vocabulary in ``folder/tokenizer/``."""
    original = load_base_model(model_dir)
    path = checkpoints.write_single_file(original.pipe, family, folder / "model.safetensors", extra=extra)
    (folder / "tokenizer").mkdir()
    for name in checkpoints.TOKENIZER_FILES:
        shutil.copy(model_dir / "tokenizer" / name, folder / "tokenizer" / name)
    return path, original


def _assert_same_weights(loaded, original, family):
    for part in PARTS[family]:
        want, got = getattr(original.pipe, part).state_dict(), getattr(loaded.pipe, part).state_dict()
        assert want.keys() == got.keys(), part
        different = [k for k in want if not torch.equal(want[k], got[k])]
        assert not different, f"{part}: {different[:5]}"


# --------------------------------------------------------------------------- the shipped configurations

@pytest.mark.parametrize("family, sizes", [
    ("sd15", {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}),
    ("sdxl", {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
              "text_encoder_2": 694_659_840}),
])
def test_the_shipped_configurations_build_the_published_full_size_models(family, sizes):
    """On the meta device (no memory): SD1.5's UNet has 859.5 M parameters, SDXL's 2.567 B, the VAE 83.7 M,
    CLIP ViT-L 123.1 M, SDXL's OpenCLIP ViT-bigG with projection 694.7 M."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = checkpoints.shipped_config_dir(family)
    build = {"unet": lambda c: UNet2DConditionModel.from_config(c), "vae": lambda c: AutoencoderKL.from_config(c),
             "text_encoder": lambda c: CLIPTextModel(CLIPTextConfig.from_dict(c)),
             "text_encoder_2": lambda c: CLIPTextModelWithProjection(CLIPTextConfig.from_dict(c))}
    with torch.device("meta"):
        counts = {part: sum(p.numel() for p in build[part](checkpoints.read_config(folder, part)).parameters())
                  for part in sizes}
    assert counts == sizes
    index = StableDiffusionPipeline.load_config(folder)
    assert index["_class_name"] == ("StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline")
    assert checkpoints.read_config(folder, "scheduler")["prediction_type"] == "epsilon"
    assert checkpoints.read_config(folder, "vae")["scaling_factor"] == (0.13025 if family == "sdxl" else 0.18215)
    for sub in checkpoints.TOKENIZER_FOLDERS[family]:
        settings = json.loads((folder / sub / "tokenizer_config.json").read_text())
        assert settings["model_max_length"] == 77
        assert settings["pad_token"] == ("!" if sub == "tokenizer_2" else "<|endoftext|>")


def test_the_shipped_configurations_are_installed_as_package_data():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["lora_nb"]
    shipped = [f.relative_to(ROOT / "lora_nb").as_posix() for f in checkpoints.CONFIG_ROOT.rglob("*") if f.is_file()]
    assert len(shipped) == 17
    assert [f for f in shipped if not any(fnmatch.fnmatch(f, g) and f.count("/") == g.count("/") for g in globs)] == []


# --------------------------------------------------------------------------- tiny checkpoints, offline

@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_a_tiny_single_file_checkpoint_loads_offline_with_the_weights_it_was_written_with(
        family, tiny_sd15_dir, tiny_sdxl_two_widths, tmp_path, no_hub):
    """Written in the original key layout, read back with a configuration folder that holds no weights and
    no vocabulary (like the shipped ones); the vocabulary comes from ``tokenizer/`` beside the checkpoint
    (SDXL's second tokenizer too)."""
    model_dir = tiny_sd15_dir if family == "sd15" else tiny_sdxl_two_widths
    config = _config_only_copy(model_dir, tmp_path / "config")
    path, original = _write_tiny_checkpoint(model_dir, family, tmp_path / "models")
    loaded = load_base_model(path, single_file_config=config)
    assert loaded.family == family and loaded.source == str(path)
    _assert_same_weights(loaded, original, family)
    for want, got in zip(original.tokenizers, loaded.tokenizers):
        assert got.get_vocab() == want.get_vocab() and got("a photo").input_ids == want("a photo").input_ids
    assert loaded.pipe.scheduler.config.prediction_type == "epsilon"


@pytest.mark.slow
def test_a_pickle_checkpoint_and_the_v_pred_marker(tiny_sd15_dir, tmp_path, no_hub):
    """The pickle path is read with the same configuration; a checkpoint with the ``v_pred`` marker gets a
    v-prediction scheduler, also through ``load_model_of`` with ``model.prediction_type: auto``."""
    config = _config_only_copy(tiny_sd15_dir, tmp_path / "config")
    path, original = _write_tiny_checkpoint(tiny_sd15_dir, "sd15", tmp_path / "models",
                                            extra={"v_pred": torch.tensor([])})
    pickled = tmp_path / "models" / "model.ckpt"
    torch.save({"state_dict": checkpoints.single_file_state_dict(original.pipe, "sd15")}, pickled)
    from_pickle = load_base_model(pickled, allow_pickle=True, single_file_config=config)
    _assert_same_weights(from_pickle, original, "sd15")
    assert from_pickle.pipe.scheduler.config.prediction_type == "epsilon"  # the pickle has no marker

    v_pred = load_base_model(path, single_file_config=config)
    _assert_same_weights(v_pred, original, "sd15")
    assert v_pred.pipe.scheduler.config.prediction_type == "v_prediction"

    from lora_nb.config import Config

    cfg = Config()
    cfg.model.source = str(path)
    assert cfg.model.prediction_type == "auto"
    with pytest.MonkeyPatch.context() as mp:  # the shipped configuration, read as the tiny one
        mp.setattr(checkpoints, "shipped_config_dir", lambda family: config)
        assert load_model_of(cfg.model).pipe.scheduler.config.prediction_type == "v_prediction"


# --------------------------------------------------------------------------- which configuration, what is missing

def _fake_checkpoint(path: Path, family: str, sd2: bool = False, in_channels: int = 4) -> Path:
    """A few tensors with the names (not the sizes) of a real checkpoint: enough to pick a configuration."""
    from safetensors.torch import save_file

    keys = {checkpoints.UNET_IN: torch.zeros(8, in_channels, 1, 1)}
    if family == "sdxl":
        keys["conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"] = torch.zeros(1)
        keys["conditioner.embedders.1.model.positional_embedding"] = torch.zeros(1)
    elif sd2:
        keys["cond_stage_model.model.token_embedding.weight"] = torch.zeros(1)
    else:
        keys["cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"] = torch.zeros(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(keys, str(path))
    return path


def _spy_on_from_single_file(monkeypatch):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    seen = []

    def from_single_file(path, **kwargs):
        seen.append(kwargs)
        raise OSError("stopped here")

    for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline):
        monkeypatch.setattr(cls, "from_single_file", from_single_file)
    return seen


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_a_standard_checkpoint_is_read_with_the_shipped_configuration_and_nothing_from_the_hub(
        family, tmp_path, monkeypatch):
    seen = _spy_on_from_single_file(monkeypatch)
    monkeypatch.setattr(checkpoints, "load_tokenizers", lambda fam, *a: {"tokenizer": f"tok-{fam}"})
    path = _fake_checkpoint(tmp_path / "model.safetensors", family)
    with pytest.raises(LoraNbError, match=rf"It was read with the shipped {family} configuration"):
        load_base_model(path)
    assert seen == [{"dtype": torch.float32, "config": str(checkpoints.shipped_config_dir(family)),
                     "local_files_only": True, "tokenizer": f"tok-{family}"}]


def test_other_layouts_are_left_to_diffusers_and_the_error_says_why(tmp_path, monkeypatch):
    """SD2.x and inpainting checkpoints are not what the shipped configurations describe."""
    seen = _spy_on_from_single_file(monkeypatch)
    for path, why in ((_fake_checkpoint(tmp_path / "sd2.safetensors", "sd15", sd2=True), "SD2.x"),
                      (_fake_checkpoint(tmp_path / "inpaint.safetensors", "sd15", in_channels=9), "9 input channels")):
        with pytest.raises(LoraNbError, match=rf"(?s){why}.*convert the checkpoint to a diffusers folder"):
            load_base_model(path)
    assert seen == [{"dtype": torch.float32}] * 2


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_a_missing_vocabulary_is_named_file_by_file(family, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "_hub_tokenizer_files", lambda *a: None)  # as offline with an empty cache
    path = _fake_checkpoint(tmp_path / "models" / "model.safetensors", family)
    with pytest.raises(LoraNbError) as err:
        load_base_model(path)
    message = str(err.value)
    for name in ("vocab.json", "merges.txt"):
        assert str(tmp_path / "models" / "tokenizer" / name) in message
    assert ("tokenizer_2" in message) == (family == "sdxl")
    assert "openai/clip-vit-large-patch14" in message


def test_a_vocabulary_of_the_wrong_size_is_refused_by_name(tiny_sd15_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "_hub_tokenizer_files", lambda *a: None)
    path = _fake_checkpoint(tmp_path / "models" / "model.safetensors", "sd15")
    shutil.copytree(tiny_sd15_dir / "tokenizer", tmp_path / "models" / "tokenizer")
    with pytest.raises(LoraNbError, match=r"tokens but the text_encoder of .* expects 49408"):
        load_base_model(path)
