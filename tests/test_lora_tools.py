"""LoRA tools on real tiny models and LoRA files: resize is the SVD truncation of every module's update,
merge sums the updates, extract recovers a LoRA fused into a model, merge --into-checkpoint gives the base
with the LoRA loaded; bad inputs give one clear line and exit status 2."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_nb import networks, LoraNbError, cli, lora_io, lora_tools
from lora_nb.models import load_base_model

TOL = 1e-4


def _product(tensors: dict, name: str) -> torch.Tensor:
    """(alpha/r)·up@down of one module, written out here (not lora_tools') so the tools are checked against it."""
    down, up = tensors[f"{name}.lora_down.weight"].float(), tensors[f"{name}.lora_up.weight"].float()
    r = down.shape[0]
    alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else r
    return (alpha / r) * (up.flatten(1) @ down.flatten(1))


def _modules(tensors: dict) -> list[str]:
    return sorted(k.removesuffix(".lora_down.weight") for k in tensors if k.endswith(".lora_down.weight"))


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return float((got.flatten(1) - want.flatten(1)).abs().max()) <= TOL * max(1.0, float(want.abs().max()))


def _unet_output(pipe) -> torch.Tensor:
    """The UNet's prediction on a fixed random latent, timestep and text embedding."""
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 16, 16, generator=gen)
    text = torch.randn(1, 5, pipe.unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return pipe.unet(latent, 10, encoder_hidden_states=text).sample


def _lora_file(folder, path, rank, alpha, seed, text_encoder=True):
    model = load_base_model(folder)
    torch.manual_seed(seed)
    lora_io.add_lora(model, rank=rank, alpha=alpha, init="random", train_text_encoder=text_encoder)
    return lora_io.save_lora(path, model, precision="fp32")


@pytest.fixture(scope="module")
def files(tiny_sd15_dir, tmp_path_factory):
    """SD1.5 LoRAs: ``a`` rank 16 / alpha 8 on UNet and text encoder, ``b`` rank 4 / alpha 1 on the UNet only."""
    out = tmp_path_factory.mktemp("lora-tools")
    return SimpleNamespace(out=out, a=_lora_file(tiny_sd15_dir, out / "a.safetensors", 16, 8.0, seed=1),
                           b=_lora_file(tiny_sd15_dir, out / "b.safetensors", 4, 1.0, seed=2, text_encoder=False))


# --------------------------------------------------------------------------- resize

def test_resize_is_the_svd_truncation_of_every_module_with_its_kept_share(files, tmp_path):
    src = load_file(files.a)
    report = lora_tools.resize_lora(files.a, tmp_path / "r8.safetensors", 8)
    got = load_file(tmp_path / "r8.safetensors")
    assert _modules(got) == _modules(src) and len(report["modules"]) == len(_modules(src))
    for name in _modules(src):
        u, s, vh = torch.linalg.svd(_product(src, name), full_matrices=False)
        assert _close(_product(got, name), u[:, :8] @ torch.diag(s[:8]) @ vh[:8]), name
        assert got[f"{name}.lora_down.weight"].shape[0] == 8 and got[f"{name}.lora_up.weight"].dtype == torch.float32
        assert report["modules"][name]["kept"] == pytest.approx(float((s[:8].square().sum() / s.square().sum()).sqrt()),
                                                                abs=1e-6)
    meta = report["metadata"]
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("8", "4")  # the source's alpha/r = 0.5 kept
    tool = json.loads(meta["lora_nb_tool"])
    assert tool["tool"] == "resize" and tool["from"] == "a.safetensors" and tool["rank"] == 8
    shares = [v["kept"] for v in report["modules"].values()]
    assert tool["fro_kept_mean"] == pytest.approx(sum(shares) / len(shares)) and 0 < min(shares) < 1
    assert meta["ss_base_model_version"] == "sd_v1"  # the rest of the source's metadata is kept
    assert report["size_after"] < report["size_before"]


def test_resize_to_the_same_rank_reproduces_the_weights(files, tmp_path):
    src = load_file(files.a)
    lora_tools.resize_lora(files.a, tmp_path / "r16.safetensors", 16)
    got = load_file(tmp_path / "r16.safetensors")
    assert all(_close(_product(got, n), _product(src, n)) for n in _modules(src))


def test_dynamic_fro_picks_the_fewest_ranks_reaching_the_share_under_the_cap(files, tmp_path):
    report = lora_tools.resize_lora(files.a, tmp_path / "dyn.safetensors", 12, dynamic="fro:0.9")
    src = load_file(files.a)
    for name, row in report["modules"].items():
        s = torch.linalg.svd(_product(src, name)).S
        shares = (s.square().cumsum(0) / s.square().sum()).sqrt()
        assert row["rank"] <= 12
        assert row["kept"] >= 0.9 or row["rank"] == 12
        assert row["rank"] == 1 or shares[row["rank"] - 2] < 0.9  # one rank fewer would not reach 0.9
    ranks = {row["rank"] for row in report["modules"].values()}
    assert len(ranks) > 1 and report["metadata"]["ss_network_dim"] == "Dynamic"


def test_resize_refuses_a_diffusers_format_file_saying_what_to_do(tiny_sd15_dir, tmp_path):
    model = load_base_model(tiny_sd15_dir)
    lora_io.add_lora(model, rank=2, alpha=2, init="random", train_text_encoder=False)
    path = lora_io.save_lora(tmp_path / "d.safetensors", model, fmt="diffusers", precision="fp32")
    with pytest.raises(LoraNbError, match="save.formats kohya"):
        lora_tools.resize_lora(path, tmp_path / "out.safetensors", 1)


# --------------------------------------------------------------------------- merge LoRA files

def test_merge_with_ratios_1_0_gives_the_first_file_back(files, tmp_path):
    report = lora_tools.merge_loras([files.a, files.b], [1.0, 0.0], tmp_path / "m.safetensors")
    a, got = load_file(files.a), load_file(tmp_path / "m.safetensors")
    assert _modules(got) == _modules(a)  # b's modules are all in a too
    assert all(_close(_product(got, n), _product(a, n)) for n in _modules(a))
    assert {row["rank"] for row in report["modules"].values()} == {16}  # the largest source rank


def test_merge_half_and_half_is_the_average_update_when_the_rank_suffices(files, tmp_path):
    report = lora_tools.merge_loras([files.a, files.b], [0.5, 0.5], tmp_path / "m.safetensors", rank=20)
    a, b, got = load_file(files.a), load_file(files.b), load_file(tmp_path / "m.safetensors")
    for name in _modules(a):
        want = 0.5 * _product(a, name) + (0.5 * _product(b, name) if name in _modules(b) else 0)
        assert _close(_product(got, name), want), name
    assert any(n.startswith("lora_te_") for n in _modules(got))  # modules of a only are merged too
    tool = json.loads(report["metadata"]["lora_nb_tool"])
    assert tool["from"] == ["a.safetensors", "b.safetensors"] and tool["ratios"] == [0.5, 0.5]
    assert tool["fro_kept_min"] == pytest.approx(1.0, abs=1e-5)
    assert report["metadata"]["ss_network_dim"] == report["metadata"]["ss_network_alpha"] == "20"


def test_merging_an_sd15_and_an_sdxl_lora_names_both(files, tiny_sdxl_dir, tmp_path):
    xl = _lora_file(tiny_sdxl_dir, tmp_path / "xl.safetensors", 2, 2.0, seed=3)
    with pytest.raises(LoraNbError, match=r"a\.safetensors \(sd15\).*xl\.safetensors \(sdxl\)"):
        lora_tools.merge_loras([files.a, xl], [1, 1], tmp_path / "m.safetensors")


# --------------------------------------------------------------------------- merge into a base model

@pytest.mark.parametrize("fmt", lora_tools.CHECKPOINT_FORMATS)
def test_merge_into_checkpoint_equals_the_base_with_the_lora_loaded(files, tiny_sd15_dir, tmp_path, fmt):
    dst = tmp_path / ("merged" if fmt == "diffusers" else "merged.safetensors")
    lora_tools.merge_into_checkpoint(tiny_sd15_dir, files.a, dst, ratio=0.7, fmt=fmt)
    merged = load_base_model(dst, single_file_config=tiny_sd15_dir)
    reference = load_base_model(tiny_sd15_dir)
    base_out = _unet_output(reference.pipe)
    lora_io.load_lora(reference.pipe, files.a, strength=0.7)
    want = _unet_output(reference.pipe)
    assert float((_unet_output(merged.pipe) - want).abs().max()) <= TOL
    assert float((want - base_out).abs().max()) > 100 * TOL  # the LoRA does change the output
    if fmt == "diffusers":
        record = json.loads((dst / "lora_nb_merge.json").read_text(encoding="utf-8"))
    else:
        with safe_open(str(dst), framework="pt") as f:
            record = json.loads(f.metadata()["lora_nb_merge"])
    assert record["lora"] == "a.safetensors" and record["ratio"] == 0.7 and record["modules"]["text_encoder"] > 0


# --------------------------------------------------------------------------- extract

@pytest.fixture(scope="module")
def tuned(files, tiny_sd15_dir):
    """The tiny SD1.5 with LoRA ``a`` fused in and a rank-2 change to two 3×3 convolutions, saved as a folder."""
    model = load_base_model(tiny_sd15_dir)
    lora_io.load_lora(model.pipe, files.a)
    model.pipe.fuse_lora(lora_scale=1.0, adapter_names=["lora"])
    model.pipe.unload_lora_weights()
    convs = networks.unet_extra_modules(model.pipe.unet, "locon", 1)[1][:2]  # two 3×3 convolutions
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name in convs:
            w = model.pipe.unet.get_submodule(name).weight
            w += (0.05 * torch.randn(w.shape[0], 2, generator=gen) @ torch.randn(2, w[0].numel(), generator=gen)
                  ).reshape(w.shape)
    model.pipe.save_pretrained(files.out / "tuned")
    return SimpleNamespace(folder=files.out / "tuned", pipe=model.pipe, convs=convs)


def test_extract_recovers_the_fused_lora_and_reproduces_the_tuned_unet(files, tiny_sd15_dir, tuned, tmp_path):
    dst = tmp_path / "x.safetensors"
    report = lora_tools.extract_lora(tiny_sd15_dir, tuned.folder, dst, rank=16, conv_rank=2, precision="fp32")
    a, got = load_file(files.a), load_file(dst)
    for name in _modules(a):  # the kohya names of the fused LoRA, every one; its updates back
        assert _close(_product(got, name), _product(a, name)), name
    conv_names = [lora_io.kohya_module_name("unet", p, "sd15") for p in tuned.convs]
    assert all(got[f"{n}.lora_down.weight"].shape[0] == 2 and report["modules"][n]["kept"] > 1 - 1e-5
               for n in conv_names)
    base = load_base_model(tiny_sd15_dir)
    loaded = lora_io.load_lora(base.pipe, dst)  # raises unless every module in the file loads
    assert loaded["unet"] == sum(1 for n in _modules(got) if n.startswith("lora_unet_"))
    assert float((_unet_output(base.pipe) - _unet_output(tuned.pipe)).abs().max()) <= TOL
    meta = report["metadata"]
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2"}
    assert json.loads(meta["lora_nb_tool"])["tuned"] == "tuned" and meta["ss_text_encoder_trained"] == "True"


def test_extract_leaves_out_a_text_encoder_that_did_not_change(files, tiny_sd15_dir, tmp_path):
    model = load_base_model(tiny_sd15_dir)
    lora_io.load_lora(model.pipe, files.b)  # UNet only
    model.pipe.fuse_lora(lora_scale=1.0, adapter_names=["lora"])
    model.pipe.unload_lora_weights()
    model.pipe.save_pretrained(tmp_path / "tuned")
    report = lora_tools.extract_lora(tiny_sd15_dir, tmp_path / "tuned", tmp_path / "x.safetensors", rank=4,
                                     precision="fp32")
    got, b = load_file(tmp_path / "x.safetensors"), load_file(files.b)
    assert _modules(got) == _modules(b) and all(_close(_product(got, n), _product(b, n)) for n in _modules(b))
    assert report["notes"] == ["text_encoder unchanged: not extracted"]


def test_extract_refuses_models_of_two_families(tiny_sd15_dir, tiny_sdxl_dir, tmp_path):
    with pytest.raises(LoraNbError, match="sd15 model.*sdxl"):
        lora_tools.extract_lora(tiny_sd15_dir, tiny_sdxl_dir, tmp_path / "x.safetensors", rank=4)


# --------------------------------------------------------------------------- the command line

def _cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_line_error(capsys, *argv) -> str:
    rc, _, err = _cli(capsys, *argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("lora-nb: ") and "Traceback" not in err, err
    return lines[0]


def test_cli_resize_of_a_missing_file_or_a_loha_file_is_one_line_and_exit_2(capsys, tmp_path):
    out = tmp_path / "o.safetensors"
    line = _one_line_error(capsys, "resize", tmp_path / "missing.safetensors", "--rank", 4, "-o", out)
    assert "does not exist" in line
    loha = {"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.randn(32, 4),
            "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_b": torch.randn(4, 32),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}
    save_file(loha, str(tmp_path / "loha.safetensors"))
    line = _one_line_error(capsys, "resize", tmp_path / "loha.safetensors", "--rank", 2, "-o", out)
    assert "LoHa/LoKr" in line and "hada_w1_a" in line
    assert not out.exists()


def test_cli_resize_merge_and_bad_dynamic(files, capsys, tmp_path):
    rc, out, _ = _cli(capsys, "resize", files.a, "--rank", 4, "-o", tmp_path / "r.safetensors")
    assert rc == 0 and "modules at rank 4" in out
    assert "Frobenius norm kept per module: min" in out and "MB ->" in out
    dst = tmp_path / "m.safetensors"
    rc, out, _ = _cli(capsys, "merge", files.a, files.b, "--ratios", 0.7, 0.3, "--rank", 8, "-o", dst)
    assert rc == 0 and "modules at rank 8" in out
    assert "fro:X" in _one_line_error(capsys, "resize", files.a, "--rank", 4, "--dynamic", "sv:2", "-o", dst)
    assert "one ratio per file" in _one_line_error(capsys, "merge", files.a, files.b, "--ratios", 1, "-o", dst)


def test_the_tools_never_overwrite_an_input_and_refuse_what_would_do_nothing(files, tiny_sd15_dir, capsys, tmp_path):
    """``-o`` naming an input is refused (the input stays byte-identical); a resize above the file's rank and an
    extract from a model and itself are refused by name instead of writing a file that changes nothing."""
    import hashlib

    digest = hashlib.sha256(files.a.read_bytes()).hexdigest()
    line = _one_line_error(capsys, "merge", files.a, files.b, "--ratios", 0.5, 0.5, "-o", files.a)
    assert "is one of the input files" in line
    assert "is one of the input files" in _one_line_error(capsys, "resize", files.a, "--rank", 4, "-o", files.a)
    assert hashlib.sha256(files.a.read_bytes()).hexdigest() == digest
    line = _one_line_error(capsys, "resize", files.a, "--rank", 64, "-o", tmp_path / "r.safetensors")
    assert "--rank 64 is above the file's rank (16)" in line and not (tmp_path / "r.safetensors").exists()
    rc, _, err = _cli(capsys, "extract", tiny_sd15_dir, tiny_sd15_dir, "--rank", 4, "-o", tmp_path / "e.safetensors")
    assert rc == 2 and "Traceback" not in err  # (diffusers' loading bars are on stderr too)
    assert "have the same weights" in err.splitlines()[-1] and not (tmp_path / "e.safetensors").exists()
