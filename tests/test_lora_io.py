"""LoRA files: kohya's module set, kohya/diffusers files that reload into a fresh
pipeline with identical images, kohya naming (text_model, SDXL LDM block names),
the real alpha, save precision, atomic saves, inspection and clear load errors."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_nb import LoraNbError
from lora_nb import lora_io
from lora_nb.models import load_base_model

RANK, ALPHA = 4, 2.0  # alpha != rank: a file that loses alpha gives different images




def _load(folder):
    model = load_base_model(folder)
    model.pipe.set_progress_bar_config(disable=True)
    return model


def _images(pipe):
    """2 fp32 inference steps at 64x64 with a fixed generator, as a numpy array."""
    gen = torch.Generator().manual_seed(0)
    return pipe("a red circle on a blue background", negative_prompt="blurry", num_inference_steps=2,
                guidance_scale=5.0, height=64, width=64, generator=gen, output_type="np").images


def _transformer_block_counts(unet):
    """(transformers, transformer blocks) in a UNet, counted without lora_io."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    ts = [m for m in unet.modules() if isinstance(m, Transformer2DModel)]
    return len(ts), sum(len(t.transformer_blocks) for t in ts)


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def adapted(request, tiny_sd15_dir, tiny_sdxl_dir, tmp_path_factory):
    """A tiny model with random non-zero LoRA weights on UNet and text encoder(s), its
    images, and the LoRA saved in both formats (fp32)."""
    folder = tiny_sd15_dir if request.param == "sd15" else tiny_sdxl_dir
    model = _load(folder)
    torch.manual_seed(1)
    counts = lora_io.add_lora(model, rank=RANK, alpha=ALPHA, init="random")
    out = tmp_path_factory.mktemp(f"lora-{request.param}")
    files = {fmt: lora_io.save_lora(out / f"{fmt}.safetensors", model, fmt=fmt, precision="fp32",
                                    metadata={"ss_num_epochs": "3", "ss_tag_frequency": {"sks": {"dog": 2}}})
             for fmt in lora_io.FORMATS}
    return SimpleNamespace(family=request.param, folder=folder, model=model, counts=counts,
                           images=_images(model.pipe), files=files)


def test_kohya_module_set_matches_what_the_tiny_transformers_contain(adapted):
    """12 modules per transformer block incl. proj_in/out (2 per transformer + 10 per block) and
    6 per text-encoder layer; SDXL's second text encoder too."""
    n_transformers, n_blocks = _transformer_block_counts(adapted.model.pipe.unet)
    assert adapted.counts["unet"] == 2 * n_transformers + 10 * n_blocks
    for name, enc in zip(["text_encoder", "text_encoder_2"], adapted.model.text_encoders):
        assert adapted.counts[name] == 6 * enc.config.num_hidden_layers
    assert set(adapted.counts) == ({"unet", "text_encoder", "text_encoder_2"} if adapted.family == "sdxl"
                                   else {"unet", "text_encoder"})


@pytest.mark.parametrize("fmt", lora_io.FORMATS)
def test_saved_lora_reloads_into_a_fresh_pipeline_with_identical_images(adapted, fmt):
    """A fresh pipeline + load_lora gives the in-memory adapted model's images (max diff <= 1e-4,
    fp32) with every module loaded; the LoRA visibly changes the base model's images."""
    fresh = _load(adapted.folder)
    base = _images(fresh.pipe)
    loaded = lora_io.load_lora(fresh.pipe, adapted.files[fmt])
    assert loaded == adapted.counts  # no module left unloaded, none extra
    after = _images(fresh.pipe)
    assert np.abs(after - adapted.images).max() <= 1e-4
    assert np.abs(base - adapted.images).max() > 1e-2  # the comparison means something


def test_kohya_keys_follow_the_names_a1111_and_comfyui_load(adapted):
    """lora_unet_/lora_te_ keys with text_model; SDXL UNet in LDM block names; the real alpha as a 0-dim tensor."""
    tensors = load_file(adapted.files["kohya"])
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert len(modules) == sum(adapted.counts.values())
    for m in modules:
        assert {f"{m}.lora_down.weight", f"{m}.lora_up.weight", f"{m}.alpha"} <= set(tensors)
        alpha = tensors[f"{m}.alpha"]
        assert alpha.dim() == 0 and float(alpha) == ALPHA
        assert tensors[f"{m}.lora_down.weight"].shape[0] == RANK
    te = [m for m in modules if m.startswith("lora_te")]
    unet = [m for m in modules if m.startswith("lora_unet_")]
    assert len(te) + len(unet) == len(modules)
    if adapted.family == "sd15":
        assert all(m.startswith("lora_te_text_model_encoder_layers_") for m in te)
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in unet
        assert "lora_unet_down_blocks_0_attentions_0_proj_in" in unet
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in te
        assert "lora_te_text_model_encoder_layers_0_mlp_fc1" in te
    else:
        assert all(re.match(r"lora_te[12]_text_model_encoder_layers_\d+_", m) for m in te)
        assert {m[:9] for m in te} == {"lora_te1_", "lora_te2_"}
        assert all(re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_\d", m) for m in unet)
        # the tiny SDXL's cross-attention down block sits where real SDXL's first one does
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in unet
        assert "lora_unet_middle_block_1_transformer_blocks_1_ff_net_2" in unet
        assert "lora_unet_output_blocks_0_1_proj_out" in unet


def test_metadata_holds_ss_keys_in_both_formats(adapted):
    """ss_network_dim/alpha/module/base model version plus what the caller passed (dicts as JSON)."""
    for fmt, path in adapted.files.items():
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        assert meta["ss_network_dim"] == str(RANK)
        assert meta["ss_network_alpha"] == "2"
        assert meta["ss_network_module"] == "networks.lora"
        assert meta["ss_base_model_version"] == {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}[adapted.family]
        assert meta["ss_num_epochs"] == "3"
        assert meta["ss_tag_frequency"] == '{"sks": {"dog": 2}}'
        if fmt == "diffusers":  # without diffusers' own LoRA metadata, alpha is lost on reload
            assert '"unet.lora_alpha": 2.0' in meta["lora_adapter_metadata"]


def test_inspect_reports_format_family_rank_alpha_and_counts(adapted):
    for fmt, path in adapted.files.items():
        info = lora_io.inspect_lora(path)
        assert info["format"] == fmt
        assert info["family"] == adapted.family
        assert info["rank"] == RANK and info["alpha"] == ALPHA
        assert info["modules"] == adapted.counts
        assert info["dtype"] == "float32"
        assert info["problems"] == []
        text = lora_io.format_inspection(info)
        assert f"format:   {fmt}" in text and "ss_network_dim: 4" in text and "problems: none" in text


def test_fp16_precision_writes_fp16_tensors(adapted, tmp_path):
    for fmt in lora_io.FORMATS:
        path = lora_io.save_lora(tmp_path / f"{fmt}16.safetensors", adapted.model, fmt=fmt, precision="fp16")
        assert {t.dtype for t in load_file(path).values()} == {torch.float16}
        assert lora_io.inspect_lora(path)["dtype"] == "float16"
    path = lora_io.save_lora(tmp_path / "bf16.safetensors", adapted.model, precision="bf16")
    assert {t.dtype for t in load_file(path).values()} == {torch.bfloat16}


def test_lora_from_one_family_is_refused_by_the_other(adapted, tiny_sd15_dir, tiny_sdxl_dir):
    """An SDXL LoRA on SD1.5 (and the reverse) gives a LoraNbError naming both families, before diffusers runs."""
    other = _load(tiny_sdxl_dir if adapted.family == "sd15" else tiny_sd15_dir)
    for path in adapted.files.values():
        with pytest.raises(LoraNbError, match=f"made for {adapted.family} .*this pipeline is"):
            lora_io.load_lora(other.pipe, path)


# --------------------------------------------------------------------------- module sets at full size

def test_kohya_module_counts_on_full_size_architectures():
    """sd-scripts' counts: SD1.5 UNet 192 + text encoder 72; SDXL UNet 722, TE1 72, TE2 192
    (architectures built on the meta device: no weights allocated)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        sd15 = UNet2DConditionModel(**SD15_UNET)
        sdxl = UNet2DConditionModel(**SDXL_UNET)
        clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                            num_hidden_layers=32, num_attention_heads=20,
                                                            projection_dim=1280))
    assert len(lora_io.unet_target_modules(sd15, "kohya")) == 192
    assert len(lora_io.unet_target_modules(sd15, "attention")) == 128
    assert len(lora_io.unet_target_modules(sdxl, "kohya")) == 722
    assert len(lora_io.text_encoder_target_modules(clip_l)) == 72
    assert len(lora_io.text_encoder_target_modules(clip_l, "attention")) == 48
    assert len(lora_io.text_encoder_target_modules(clip_g)) == 192
    # every SDXL module gets an LDM name, and diffusers' own loader maps it back to the module
    from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key, _maybe_map_sgm_blocks_to_diffusers

    assert lora_io.sdxl_ldm_path("down_blocks.1.attentions.0.proj_in", sdxl.config) == "input_blocks.4.1.proj_in"
    assert lora_io.sdxl_ldm_path("down_blocks.2.attentions.1.proj_in", sdxl.config) == "input_blocks.8.1.proj_in"
    assert lora_io.sdxl_ldm_path("up_blocks.1.attentions.2.proj_in", sdxl.config) == "output_blocks.5.1.proj_in"
    names = lora_io.unet_target_modules(sdxl, "kohya")
    fake = {f"{lora_io.kohya_module_name('unet', n, 'sdxl', sdxl.config)}.lora_down.weight": torch.zeros(1)
            for n in names}
    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(fake), sdxl.config)
    as_loaded = {_convert_unet_lora_key(k) for k in mapped}
    assert as_loaded == {_convert_unet_lora_key("lora_unet_" + n.replace(".", "_") + ".lora_down.weight")
                         for n in names}
    assert len(as_loaded) == 722


SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL_UNET = dict(sample_size=128, cross_attention_dim=2048, attention_head_dim=[5, 10, 20],
                 block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)


# --------------------------------------------------------------------------- sd15-only checks

def test_attention_targets_and_unet_only(tiny_sd15_dir, tmp_path):
    """target 'attention' = to_q/k/v/out.0 only (8 per block); without the text encoder the file has UNet keys only."""
    model = _load(tiny_sd15_dir)
    n_transformers, n_blocks = _transformer_block_counts(model.pipe.unet)
    counts = lora_io.add_lora(model, RANK, ALPHA, unet_targets="attention", train_text_encoder=False)
    assert counts == {"unet": 8 * n_blocks}
    path = lora_io.save_lora(tmp_path / "a.safetensors", model)
    keys = load_file(path).keys()
    assert all(k.startswith("lora_unet_") and re.search(r"attn[12]_to_(q|k|v|out_0)\.", k) for k in keys)
    fresh = _load(tiny_sd15_dir)
    assert lora_io.load_lora(fresh.pipe, path) == counts


def test_inspect_flags_all_zero_ups_and_nan(tiny_sd15_dir, tmp_path):
    """Gaussian init (B = 0) -> every module flagged all-zero; a NaN anywhere is flagged with its key."""
    model = _load(tiny_sd15_dir)
    counts = lora_io.add_lora(model, RANK, ALPHA, init="gaussian")
    path = lora_io.save_lora(tmp_path / "zero.safetensors", model, precision="fp32")
    info = lora_io.inspect_lora(path)
    zero = [p for p in info["problems"] if p.startswith("all-zero up weight")]
    assert len(zero) == sum(counts.values())
    assert "PROBLEMS" in lora_io.format_inspection(info)
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[key] = torch.ones_like(tensors[key])
    down = key.replace("lora_up", "lora_down")
    tensors[down][0, 0] = float("nan")
    save_file(tensors, tmp_path / "nan.safetensors")
    problems = lora_io.inspect_lora(tmp_path / "nan.safetensors")["problems"]
    assert any("NaN/Inf" in p and down in p for p in problems)
    assert len([p for p in problems if p.startswith("all-zero")]) == len(zero) - 1


def test_save_is_atomic_and_checks_its_settings(tiny_sd15_dir, tmp_path, monkeypatch):
    """A failing write leaves the previous file intact and no temp file behind; bad settings are named."""
    sd15 = _load(tiny_sd15_dir)
    with pytest.raises(LoraNbError, match="add_lora"):
        lora_io.save_lora(tmp_path / "none.safetensors", sd15)
    lora_io.add_lora(sd15, RANK, ALPHA, init="random")
    path = lora_io.save_lora(tmp_path / "x.safetensors", sd15)
    before = path.read_bytes()
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError):
        lora_io.save_lora(path, sd15)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]
    with pytest.raises(LoraNbError, match="alpha=8"):
        lora_io.save_lora(tmp_path / "y.safetensors", sd15, alpha=8)
    with pytest.raises(LoraNbError, match="save format 'ckpt'"):
        lora_io.save_lora(tmp_path / "y.safetensors", sd15, fmt="ckpt")
    with pytest.raises(LoraNbError, match="save_precision='fp8'"):
        lora_io.save_lora(tmp_path / "y.safetensors", sd15, precision="fp8")
    with pytest.raises(LoraNbError, match=r"\.safetensors"):
        lora_io.save_lora(tmp_path / "y.pt", sd15)
    with pytest.raises(LoraNbError, match="target_modules='all'"):
        lora_io.add_lora(_load(sd15.source), RANK, ALPHA, unet_targets="all")
    with pytest.raises(LoraNbError, match="rank=0"):
        lora_io.add_lora(_load(sd15.source), 0, ALPHA)


def test_load_errors_name_the_file_and_the_fix(tiny_sd15_dir, tmp_path):
    """Pickle, missing, truncated and mismatched files give LoraNbError; a failed load leaves no adapter behind."""
    sd15 = _load(tiny_sd15_dir)
    lora_io.add_lora(sd15, RANK, ALPHA, init="random")
    good = lora_io.save_lora(tmp_path / "good.safetensors", sd15, precision="fp32")
    fresh = _load(sd15.source)
    with pytest.raises(LoraNbError, match="pickle"):
        (tmp_path / "l.ckpt").write_bytes(b"\x80\x04")
        lora_io.load_lora(fresh.pipe, tmp_path / "l.ckpt")
    with pytest.raises(LoraNbError, match="does not exist"):
        lora_io.load_lora(fresh.pipe, tmp_path / "missing.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:1000])
    with pytest.raises(LoraNbError, match="not a readable .safetensors"):
        lora_io.load_lora(fresh.pipe, tmp_path / "cut.safetensors")
    # a module name this UNet does not have: diffusers skips it silently, load_lora does not
    tensors = load_file(good)
    renamed = {k.replace("lora_unet_up_blocks_1_attentions_2_", "lora_unet_up_blocks_1_attentions_7_"): v
               for k, v in tensors.items()}
    save_file(renamed, tmp_path / "renamed.safetensors")
    with pytest.raises(LoraNbError, match="not loaded.*unet"):
        lora_io.load_lora(fresh.pipe, tmp_path / "renamed.safetensors")
    assert lora_io._loaded_counts(fresh.pipe, "lora") == {}
    # after the failed load, the good file still loads cleanly, and loading twice replaces
    assert lora_io.load_lora(fresh.pipe, good) == lora_io.load_lora(fresh.pipe, good)


def test_inspect_says_in_one_line_when_a_file_is_not_a_lora_and_names_odd_tensors(tmp_path, capsys):
    """A safetensors file without LoRA keys is refused by name (exit 2, no traceback); a down weight of the wrong
    rank of dimensions, an alpha of several values and adapter metadata of the wrong type are listed as
    problems, not crashes."""
    import torch
    from safetensors.torch import save_file

    from lora_nb import cli

    save_file({"x": torch.zeros(3)}, str(tmp_path / "weights.safetensors"))
    assert cli.main(["inspect", str(tmp_path / "weights.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "is not a LoRA file: no lora_down/lora_up" in err and "Traceback" not in err
    save_file({"lora_unet_a.lora_down.weight": torch.ones(4), "lora_unet_a.lora_up.weight": torch.ones(3, 4),
               "lora_unet_b.lora_down.weight": torch.ones(2, 3), "lora_unet_b.lora_up.weight": torch.ones(3, 2),
               "lora_unet_b.alpha": torch.ones(2)}, str(tmp_path / "odd.safetensors"),
              metadata={"lora_adapter_metadata": '["abc"]'})
    info = lora_io.inspect_lora(tmp_path / "odd.safetensors")
    assert any("has shape [4]" in p for p in info["problems"]) and any("alpha has 2 values" in p for p in info["problems"])
    assert any("lora_adapter_metadata is not a mapping" in p for p in info["problems"])
    for value in ("abc", [1, 2]):
        save_file({"unet.a.lora_A.weight": torch.ones(2, 3), "unet.a.lora_B.weight": torch.ones(3, 2)},
                  str(tmp_path / "meta.safetensors"),
                  metadata={"lora_adapter_metadata": json.dumps({"unet.lora_alpha": value})})
        info = lora_io.inspect_lora(tmp_path / "meta.safetensors")
        assert info["alpha"] is None
        assert [p for p in info["problems"] if "unet.lora_alpha" in p] == [
            f"metadata lora_adapter_metadata unet.lora_alpha is {value!r}, not a number: a loader fails on it or "
            "ignores it (alpha = rank)"]


def test_a_base_model_given_as_a_file_is_named_and_hashed_as_sd_scripts_does(tmp_path):
    import hashlib

    from lora_nb.lora_io import base_model_hashes, ss_metadata

    ckpt = tmp_path / "models" / "myModel_v2.safetensors"
    ckpt.parent.mkdir()
    data = bytes(range(256)) * (3 * 4096)  # 3 MiB, different at every offset
    ckpt.write_bytes(data)
    meta = base_model_hashes(str(ckpt))
    assert meta["ss_sd_model_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert meta["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()
    assert ss_metadata("sd15", str(ckpt), 8, 4, False)["ss_sd_model_name"] == "myModel_v2.safetensors"
    assert base_model_hashes(str(tmp_path / "models")) == {}  # a diffusers folder or hub id: no single file
    assert set(base_model_hashes("org/model", vae=str(ckpt))) == {"ss_vae_hash", "ss_new_vae_hash", "ss_vae_name"}


def test_modelspec_keys_follow_sd_scripts_for_each_family():
    from lora_nb.lora_io import modelspec_metadata

    sdxl = modelspec_metadata("sdxl", "mine", (1024, 1024), "v_prediction", "zorb", clip_skip=1, timesteps=(0, 1000))
    assert sdxl["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert sdxl["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert (sdxl["modelspec.prediction_type"], sdxl["modelspec.trigger_phrase"]) == ("v", "zorb")
    assert "modelspec.timestep_range" not in sdxl  # every step trained: no range to state
    sd15 = modelspec_metadata("sd15", "mine", (512, 768), timesteps=(100, 900))
    assert (sd15["modelspec.implementation"], sd15["modelspec.resolution"]) == ("diffusers", "512x768")
    assert sd15["modelspec.timestep_range"] == "100,900" and "modelspec.encoder_layer" not in sd15
