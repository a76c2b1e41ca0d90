"""Network types (lora, locon, loha, lokr): what each trains, the tensors its file holds, that the file
reloads to the in-memory model, and that the trainer runs each one."""

import json
import os

import pytest
import torch
from conftest import make_config
from safetensors import safe_open
from safetensors.torch import load_file

from lora_nb import LoraNbError, lora_io
from lora_nb.archs import build_architecture
from lora_nb.config import check_config, preset
from lora_nb.estimate import estimate_lora_file_size
from lora_nb.models import load_base_model
from lora_nb.train import train, unet_param_groups

TYPES = [("lora", 0), ("locon", 4), ("loha", 0), ("loha", 4), ("lokr", 0), ("lokr", 4)]
NAMES = {"lora": {"lora_down.weight", "lora_up.weight", "alpha"},
         "locon": {"lora_down.weight", "lora_up.weight", "alpha"},
         "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
         "lokr": {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"}}


def _outputs(pipe, family):
    """The UNet's prediction and every text encoder's hidden states on fixed random inputs."""
    g = torch.Generator().manual_seed(1)
    unet = pipe.unet
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    extra = {}
    if family == "sdxl":
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.zeros(1, 6)}
    ids = torch.randint(0, 90, (1, 77), generator=g)
    with torch.no_grad():
        outs = [unet(x, 10, ctx, **extra).sample]
        for enc in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
            if enc is not None:
                outs.append(enc(ids, output_hidden_states=True).hidden_states[-2])
    return outs


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_every_type_saves_the_tensor_names_the_uis_read_and_reloads_to_the_same_model(family, tiny_sd15_dir,
                                                                                     tiny_sdxl_dir, tmp_path):
    folder = tiny_sd15_dir if family == "sd15" else tiny_sdxl_dir
    base = _outputs(load_base_model(folder).pipe, family)
    for network_type, conv_rank in TYPES:
        model = load_base_model(folder)
        torch.manual_seed(0)
        counts = lora_io.add_lora(model, 4, 2.0, init="random", network_type=network_type, conv_rank=conv_rank,
                                  conv_alpha=1.0)
        trained = _outputs(model.pipe, family)
        path = lora_io.save_lora(tmp_path / f"{network_type}{conv_rank}.safetensors", model, precision="fp32")
        tensors = load_file(str(path))
        tails = {k.split(".", 1)[1] for k in tensors}
        assert tails <= NAMES[network_type] and {"alpha"} < tails, (network_type, tails)
        info = lora_io.inspect_lora(path)
        assert info["network"] == network_type and info["modules"] == counts and not info["problems"]
        assert (info["conv_modules"] > 0) == (conv_rank > 0)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        args = json.loads(meta["ss_network_args"])
        assert meta["ss_network_module"] == ("lycoris.kohya" if network_type in ("loha", "lokr") else "networks.lora")
        assert args.get("algo") == (network_type if network_type in ("loha", "lokr") else None)
        assert args.get("conv_dim") == (str(conv_rank) if conv_rank else None)

        fresh = load_base_model(folder)
        assert lora_io.load_lora(fresh.pipe, path, adapter_name="back") == counts
        for mine, loaded, untouched in zip(trained, _outputs(fresh.pipe, family), base):
            assert (mine - untouched).abs().max() > 1e-3  # the network changes every part ...
            assert (mine - loaded).abs().max() <= 1e-4  # ... and the file gives that change back
        lora_io.set_lora_strength(fresh.pipe, "back", 0.0)
        assert (_outputs(fresh.pipe, family)[0] - base[0]).abs().max() <= 1e-5
        assert estimate_lora_file_size(load_base_model(folder), 4, 2.0, "kohya", True, "fp32", None,
                                       {"network_type": network_type, "conv_rank": conv_rank}) == os.path.getsize(path)


@pytest.mark.parametrize("factor", [2, 4])
def test_a_lokr_file_made_with_a_factor_is_loaded_back_with_that_factor(factor, tiny_sd15_dir, tmp_path):
    """The factor is read from the file's shapes (peft's automatic split would give other ones)."""
    model = load_base_model(tiny_sd15_dir)
    torch.manual_seed(0)
    lora_io.add_lora(model, 6, 3.0, init="random", network_type="lokr", conv_rank=4, lokr_factor=factor)
    mine = _outputs(model.pipe, "sd15")
    path = lora_io.save_lora(tmp_path / "k.safetensors", model, precision="fp32")
    fresh = load_base_model(tiny_sd15_dir)
    lora_io.load_lora(fresh.pipe, path)
    assert all((a - b).abs().max() <= 1e-4 for a, b in zip(mine, _outputs(fresh.pipe, "sd15")))


def test_inspect_names_dora_and_load_refuses_it_with_where_it_loads(tiny_sd15_dir, tmp_path):
    from safetensors.torch import save_file

    model = load_base_model(tiny_sd15_dir)
    lora_io.add_lora(model, 4, 2.0, init="random", train_text_encoder=False)
    path = lora_io.save_lora(tmp_path / "plain.safetensors", model, precision="fp32")
    tensors = load_file(str(path))
    name = next(k for k in tensors if k.endswith(".lora_down.weight")).split(".")[0]
    tensors[f"{name}.dora_scale"] = torch.ones(1, tensors[f"{name}.lora_down.weight"].shape[1])
    save_file(tensors, str(tmp_path / "dora.safetensors"))
    info = lora_io.inspect_lora(tmp_path / "dora.safetensors")
    assert info["dora"] == 1 and "DoRA on 1 modules" in lora_io.format_inspection(info)
    with pytest.raises(LoraNbError, match="DoRA"):
        lora_io.load_lora(load_base_model(tiny_sd15_dir).pipe, tmp_path / "dora.safetensors")


def _dora_paper_weight(weight, parts):
    """The weight DoRA defines (Liu et al. 2024; LyCORIS's ``wd_on_out``) from one module's file tensors,
    written out independently of peft: W' = m ⊙ (W + ΔW) / ‖W + ΔW‖, the norm over each output row."""
    down, up = parts["lora_down.weight"].double(), parts["lora_up.weight"].double()
    scale = float(parts["alpha"]) / down.shape[0]
    delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * scale
    merged = weight.double() + delta
    norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (merged.dim() - 1))
    return (merged * (parts["dora_scale"].double() / norm)).to(weight.dtype)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_dora_files_hold_a_magnitude_per_output_row_and_reload_and_merge_to_the_trained_model(
        family, tiny_sd15_dir, tiny_sdxl_dir, tmp_path):
    from lora_nb import networks

    folder = tiny_sd15_dir if family == "sd15" else tiny_sdxl_dir
    for network_type, conv_rank in (("lora", 0), ("locon", 4)):
        model = load_base_model(folder)
        torch.manual_seed(0)
        counts = lora_io.add_lora(model, 4, 2.0, init="random", network_type=network_type, conv_rank=conv_rank,
                                  dora=True)
        with torch.no_grad():  # move the magnitudes away from their start (the norm of W + ΔW)
            for comp in lora_io.lora_components(model).values():
                for layer in networks.adapter_layers(comp, "default").values():
                    m = networks.dora_magnitude(layer, "default")
                    m.mul_(1 + 0.3 * torch.rand(m.shape))
        trained = _outputs(model.pipe, family)
        path = lora_io.save_lora(tmp_path / f"dora-{network_type}.safetensors", model, precision="fp32")
        tensors = load_file(str(path))
        modules = networks.group_file_tensors(tensors)
        assert all(set(parts) == NAMES[network_type] | {"dora_scale"} for parts in modules.values())
        assert all(networks.dora_axis(parts) == "per output row" for parts in modules.values())
        info = lora_io.inspect_lora(path)
        assert info["dora"] == sum(counts.values()) and info["dora_axis"] == "per output row" and not info["problems"]
        meta = info["metadata"]
        assert meta["ss_network_module"] == "lycoris.kohya"
        assert json.loads(meta["ss_network_args"])["dora_wd"] == "True"
        assert estimate_lora_file_size(load_base_model(folder), 4, 2.0, "kohya", True, "fp32", None,
                                       {"network_type": network_type, "conv_rank": conv_rank,
                                        "dora": True}) == os.path.getsize(path)

        fresh = load_base_model(folder)
        assert lora_io.load_lora(fresh.pipe, path, adapter_name="back") == counts
        assert all((a - b).abs().max() <= 1e-4 for a, b in zip(trained, _outputs(fresh.pipe, family)))

        merged = load_base_model(folder)  # the file's weights by DoRA's definition, merged by hand
        comps = lora_io._pipe_components(merged.pipe)
        names = lora_io.kohya_names(family, merged.pipe.unet.config, comps)
        with torch.no_grad():
            for name, parts in modules.items():
                comp, mod_path = names[name]
                mod = comps[comp].get_submodule(mod_path)
                mod.weight.copy_(_dora_paper_weight(mod.weight, parts))
        assert all((a - b).abs().max() <= 1e-4 for a, b in zip(trained, _outputs(merged.pipe, family)))


def test_dora_is_refused_where_it_is_not_built():
    for overrides, setting in (({"network.type": "loha", "network.dora": True}, "network.dora"),
                               ({"network.dora": True, "save.formats": ["kohya", "diffusers"]}, "save.formats")):
        problems = [p for p in check_config(preset("toy").with_overrides(overrides)) if p.level == "error"]
        assert [p.setting for p in problems] == [setting], problems


def test_the_trainer_trains_dora_magnitudes_and_the_file_reloads(tiny_sd15_dir, tiny_dataset, tmp_path):
    from lora_nb import networks

    cfg = make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "d", **{
        "network.dora": True, "optimizer.text_encoder_lr": 1e-4, "optimizer.learning_rate": 1e-3,
        "training.epochs": 1, "save.precision": "fp32"})
    result = train(cfg, resume=False, progress=False)
    final = [f for f in result.files if f.suffix == ".safetensors"][-1]
    modules = networks.group_file_tensors(load_file(str(final)))
    base = load_base_model(tiny_sd15_dir)
    comps = lora_io._pipe_components(base.pipe)
    names = lora_io.kohya_names("sd15", base.pipe.unet.config, comps)
    moved = 0
    for name, parts in modules.items():  # trained: no longer the norm of W + ΔW the magnitudes start at
        comp, mod_path = names[name]
        w = comps[comp].get_submodule(mod_path).weight
        start = (w + (parts["lora_up.weight"].flatten(1) @ parts["lora_down.weight"].flatten(1)).reshape(w.shape)
                 * float(parts["alpha"]) / parts["lora_down.weight"].shape[0])
        start = start.reshape(start.shape[0], -1).norm(dim=1)
        moved += not torch.allclose(parts["dora_scale"].flatten(), start, atol=1e-6)
    assert moved > len(modules) // 2 and "text_encoder" in lora_io.inspect_lora(final)["modules"]
    lora_io.load_lora(load_base_model(tiny_sd15_dir).pipe, final)


def test_module_sets_match_sd_scripts_and_lycoris_at_full_size():
    """sd-scripts: SD1.5 UNet 192 modules, 278 with conv_dim (its 22 ResNet blocks give 3 each, 14 of them a
    1x1 shortcut, plus 3 down- and 3 upsamplers); SDXL 722 and 788. LyCORIS's full preset adds conv_in,
    conv_out and the two time-embedding linears; without conv_dim it keeps the ResNets' linears and 1x1s."""
    from lora_nb import networks

    sd15, sdxl = build_architecture("sd15", "meta").pipe.unet, build_architecture("sdxl", "meta").pipe.unet
    for unet, base in ((sd15, 192), (sdxl, 722)):
        transformer = len(lora_io.unet_target_modules(unet, "kohya"))
        assert transformer == base
        lin, conv = networks.unet_extra_modules(unet, "locon", 8)
        full_lin, full_conv = networks.unet_extra_modules(unet, "loha", 8)
        assert len(full_lin) == len(lin) + 2 and len(full_conv) == len(conv) + 2
        assert networks.unet_extra_modules(unet, "loha", 0) == (full_lin, [])
        assert networks.unet_extra_modules(unet, "lora", 8) == ([], [])
    assert len(lora_io.unet_target_modules(sd15)) + sum(map(len, networks.unet_extra_modules(sd15, "locon", 8))) == 278
    assert len(lora_io.unet_target_modules(sdxl)) + sum(map(len, networks.unet_extra_modules(sdxl, "locon", 8))) == 788


def test_sdxl_resnet_and_sampler_modules_get_their_ldm_names():
    unet = build_architecture("sdxl", "meta").pipe.unet
    name = lambda p: lora_io.kohya_module_name("unet", p, "sdxl", unet.config)  # noqa: E731
    assert name("down_blocks.1.resnets.0.conv1") == "lora_unet_input_blocks_4_0_in_layers_2"
    assert name("down_blocks.0.downsamplers.0.conv") == "lora_unet_input_blocks_3_0_op"
    assert name("mid_block.resnets.1.time_emb_proj") == "lora_unet_middle_block_2_emb_layers_1"
    assert name("up_blocks.0.resnets.2.conv_shortcut") == "lora_unet_output_blocks_2_0_skip_connection"
    assert name("up_blocks.0.upsamplers.0.conv") == "lora_unet_output_blocks_2_2_conv"
    assert name("up_blocks.2.resnets.0.conv2") == "lora_unet_output_blocks_6_0_out_layers_3"
    assert name("conv_in") == "lora_unet_input_blocks_0_0" and name("time_embedding.linear_2") == "lora_unet_time_embed_2"


def test_wrong_combinations_are_refused_with_the_fix():
    def errors(**net):
        cfg = preset("toy").with_overrides({f"network.{k}": v for k, v in net.items()})
        return {p.setting: p.message for p in check_config(cfg, cuda_available=False) if p.level == "error"}

    assert "locon" in errors(conv_rank=4)["network.conv_rank"]
    assert "give them a rank" in errors(type="locon")["network.conv_rank"]
    assert "rank_dropout" in errors(type="loha", dropout=0.1)["network.dropout"]
    assert "network.dropout" in errors(type="lora", module_dropout=0.1)["network.module_dropout"]
    assert "lokr" in errors(type="loha", lokr_factor=4)["network.lokr_factor"]
    assert "one of lora, locon, loha, lokr" in errors(type="dora")["network.type"]
    assert "three multipliers" in errors(block_lr_weights=[1.0, 0.5])["network.block_lr_weights"]
    cfg = preset("toy").with_overrides({"network.type": "lokr", "save.formats": ["kohya", "diffusers"]})
    assert any(p.setting == "save.formats" for p in check_config(cfg, cuda_available=False))
    assert not errors(type="lokr", conv_rank=4, lokr_factor=8, rank_dropout=0.1, block_lr_weights=[1, 0.5, 2])


def test_block_lr_weights_give_each_unet_block_its_own_learning_rate(tiny_sd15_dir):
    model = load_base_model(tiny_sd15_dir)
    lora_io.add_lora(model, 4, 2.0, network_type="locon", conv_rank=2)
    unet = model.pipe.unet
    groups = {g["name"]: g for g in unet_param_groups(unet, 1e-4, [2.0, 0.5, 1.0])}
    assert groups["unet_down"]["lr"] == pytest.approx(2e-4) and groups["unet_mid"]["lr"] == pytest.approx(5e-5)
    assert groups["unet_up"]["lr"] == pytest.approx(1e-4)
    trained = [p for p in unet.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups.values()) == len(trained)
    assert [g["name"] for g in unet_param_groups(unet, 1e-4, [])] == ["unet"]


@pytest.mark.parametrize("network_type", ["loha", "lokr"])
def test_the_trainer_trains_lycoris_types_and_continues_their_files(network_type, tiny_sd15_dir, tiny_dataset,
                                                                    tmp_path):
    cfg = make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "a", **{
        "network.type": network_type, "network.conv_rank": 2, "network.rank_dropout": 0.1,
        "optimizer.text_encoder_lr": 1e-4, "optimizer.learning_rate": 1e-3, "training.epochs": 1,
        "network.block_lr_weights": [1.0, 0.5, 1.0], "save.precision": "fp32"})
    result = train(cfg, resume=False, progress=False)
    final = [f for f in result.files if f.suffix == ".safetensors"][-1]
    info = lora_io.inspect_lora(final)
    assert info["network"] == network_type and info["conv_modules"] > 0 and "text_encoder" in info["modules"]
    assert not info["problems"]  # every module moved away from its no-op start
    args = json.loads(info["metadata"]["ss_network_args"])  # LyCORIS's algo, sd-scripts' block LR weights
    assert args["algo"] == network_type and (args["down_lr_weight"], args["mid_lr_weight"]) == ("1", "0.5")
    again = make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "b", **{
        "network.type": network_type, "network.conv_rank": 2, "network.init_from": str(final),
        "training.max_steps": 1, "save.precision": "fp32", "optimizer.learning_rate": 1e-12,
        "optimizer.text_encoder_lr": 1e-12})
    wrong = again.with_overrides({"network.type": "lora", "network.conv_rank": 0})
    with pytest.raises(LoraNbError, match="network.init_from"):
        train(wrong, resume=False, progress=False)
    out = train(again, resume=False, progress=False)
    first, second = load_file(str(final)), load_file(str([f for f in out.files if f.suffix == ".safetensors"][-1]))
    assert first.keys() == second.keys()
    assert all(torch.allclose(first[k], second[k], atol=1e-6) for k in first)  # LR 1e-12: the file came back whole


def test_every_full_size_sdxl_name_maps_back_to_its_module_through_diffusers_own_converter():
    """diffusers' SGM → diffusers key conversion (written independently of lora-nb, for kohya SDXL files)
    gives each LoCon / LoHa module's diffusers path back: 788 + the full preset's 4 on SDXL."""
    from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key, _maybe_map_sgm_blocks_to_diffusers

    arch = build_architecture("sdxl", "meta")
    unet = arch.pipe.unet
    for network_type, expected in (("locon", 788), ("loha", 792)):
        (_, _, paths, conv), *_ = lora_io.network_modules(arch, "kohya", False, network_type, 8)
        fake = {f"{lora_io.kohya_module_name('unet', p, 'sdxl', unet.config)}.lora_down.weight": torch.zeros(1)
                for p in paths + conv}
        mapped = {_convert_unet_lora_key(k) for k in _maybe_map_sgm_blocks_to_diffusers(dict(fake), unet.config)}
        wanted = {_convert_unet_lora_key("lora_unet_" + p.replace(".", "_") + ".lora_down.weight") for p in paths + conv}
        assert mapped == wanted and len(mapped) == expected
