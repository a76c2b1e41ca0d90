"""Latents cached on disk: reused by a later run, identical training, rebuilt when an image changes."""

import shutil

import numpy as np
from conftest import make_config
from PIL import Image
from safetensors.torch import load_file

from lora_nb.models import load_base_model
from lora_nb.train import train


def _count_vae_encodes(model):
    calls = []
    original = model.pipe.vae.encode

    def spy(x, *args, **kwargs):
        calls.append(x.shape[0])
        return original(x, *args, **kwargs)

    model.pipe.vae.encode = spy
    return calls


def _train(model_dir, data, ws, **overrides):
    cfg = make_config(model_dir, data, ws, **{"training.epochs": 1, "save.every_n_epochs": 0,
                                              "dataset.flip_aug": True, **overrides})
    model = load_base_model(model_dir)
    calls = _count_vae_encodes(model)
    result = train(cfg, model=model, progress=False)
    return load_file(str(result.final)), calls


def test_disk_cache_is_reused_trains_identically_and_follows_changed_images(tiny_sdxl_dir, tiny_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    cache = tmp_path / "cache"
    disk = {"dataset.cache_latents_to_disk": True, "dataset.cache_dir": str(cache)}

    in_memory, calls = _train(tiny_sdxl_dir, data, tmp_path / "mem")
    assert len(calls) == 8  # four images, each with its flipped copy (SDXL: time ids too)

    first, calls = _train(tiny_sdxl_dir, data, tmp_path / "disk1", **disk)
    files = sorted((cache / "latents").glob("*.safetensors"))
    assert len(calls) == 8 and len(files) == 4

    again, calls = _train(tiny_sdxl_dir, data, tmp_path / "disk2", **disk)
    assert calls == [], "a second run on the same images must not run the VAE"
    for name, tensor in in_memory.items():  # same seed: memory, fresh disk cache and reused cache agree
        assert (first[name] == tensor).all() and (again[name] == tensor).all(), name

    # one image edited: only that one is encoded again, under a new name; the others are reused
    img = data / "2_sks" / "img0.png"
    a = np.array(Image.open(img))
    a[:8, :8] = 0
    Image.fromarray(a).save(img)
    _, calls = _train(tiny_sdxl_dir, data, tmp_path / "disk3", **disk)
    assert len(calls) == 2
    assert len(list((cache / "latents").glob("*.safetensors"))) == 5


def test_a_damaged_cache_file_is_rebuilt_not_fatal(tiny_sd15_dir, tiny_dataset, tmp_path):
    disk = {"dataset.cache_latents_to_disk": True, "dataset.flip_aug": False}
    _train(tiny_sd15_dir, tiny_dataset, tmp_path / "ws", **disk)
    files = sorted((tmp_path / "ws" / "cache" / "latents").glob("*.safetensors"))
    assert len(files) == 4  # empty cache_dir: <save.output_dir>/cache
    files[0].write_bytes(b"not a safetensors file")
    _, calls = _train(tiny_sd15_dir, tiny_dataset, tmp_path / "ws", **disk, **{"save.save_state": False})
    assert len(calls) == 1
    assert len(load_file(str(files[0]))) == 3  # written again: mean, std, time ids
