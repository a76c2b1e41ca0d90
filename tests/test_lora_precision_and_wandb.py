"""``training.full_precision_lora`` (the LoRA's own weights in half precision) and ``logging.wandb_project``."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_config

from lora_nb.config import check_config
from lora_nb.lora_io import inspect_lora
from lora_nb.models import load_base_model
from lora_nb.optim import allow_fp16_gradients
from lora_nb.train import train


def _errors(cfg) -> dict[str, str]:
    return {p.setting: p.message for p in check_config(cfg, cuda_available=False) if p.level == "error"}


def test_half_precision_lora_weights_need_the_same_mixed_precision():
    cfg = make_config("m", "d", "w", **{"training.full_precision_lora": "bf16"})
    assert "training.mixed_precision=bf16" in _errors(cfg)["training.full_precision_lora"]
    assert "training.full_precision_lora" not in _errors(cfg.with_overrides({"training.mixed_precision": "bf16"}))
    assert "unknown" in _errors(cfg.with_overrides({"training.full_precision_lora": "fp8"}))["training.full_precision_lora"]


@pytest.mark.slow
def test_bf16_lora_weights_train_in_bf16_and_the_file_says_so(tiny_sd15_dir, tiny_dataset, tmp_path):
    """Also: casting the frozen weights to bf16 prints none of diffusers' empty "should be kept in float32: []"
    advice (it used to appear in every mixed-precision run)."""
    import logging

    model = load_base_model(tiny_sd15_dir)
    cfg = make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "ws", **{
        "training.mixed_precision": "bf16", "training.full_precision_lora": "bf16", "optimizer.learning_rate": 1e-3})
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    log = logging.getLogger("diffusers.models.modeling_utils")
    log.addHandler(handler)
    try:
        result = train(cfg, model=model, progress=False)
    finally:
        log.removeHandler(handler)
    assert not [m for m in seen if "should be kept in float32" in m]
    trained = [p for p in model.pipe.unet.parameters() if p.requires_grad]
    assert trained and {p.dtype for p in trained} == {torch.bfloat16}
    losses = [json.loads(l)["loss"] for l in (result.workspace / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in l]
    assert len(losses) == result.steps and all(map(torch.isfinite, torch.tensor(losses)))
    ups = [v for k, v in _tensors(result.final).items() if "lora_up" in k]
    assert max(float(v.abs().max()) for v in ups) > 0  # the bf16 weights did move
    meta = inspect_lora(result.final)["metadata"]
    assert meta["ss_full_bf16"] == "True" and meta["ss_full_fp16"] == "False"


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_the_grad_scaler_unscales_fp16_gradients_once_allowed():
    """torch's GradScaler refuses fp16 gradients; ``allow_fp16_gradients`` lets it unscale them (fp16 LoRA
    weights on a CUDA GPU), and it still finds an overflow and skips that step."""
    def backward(scaler, param, factor):
        scaler.scale((param * factor).sum()).backward()  # the gradient: factor × the scale, in fp16

    param = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    opt = torch.optim.SGD([param], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    backward(scaler, param, 2.0)
    with pytest.raises(ValueError, match="FP16 gradients"):
        scaler.unscale_(opt)
    param.grad = None
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    allow_fp16_gradients(scaler)
    backward(scaler, param, 2.0)
    scaler.unscale_(opt)
    assert torch.equal(param.grad, torch.full((4,), 2.0, dtype=torch.float16))
    scaler.step(opt)
    assert torch.allclose(param.detach().float(), torch.full((4,), 0.8), atol=1e-3)
    scaler.update()
    opt.zero_grad()
    backward(scaler, param, 1e4)  # 1e4 × 1024 overflows fp16
    before = param.detach().clone()
    scaler.step(opt)  # unscales, sees the inf, skips the step
    assert torch.equal(param.detach(), before)


@pytest.mark.slow
def test_wandb_logs_each_step_offline_into_the_workspace(tiny_sd15_dir, tiny_dataset, tmp_path, monkeypatch):
    """``WANDB_MODE=offline``: the run's records land under ``<workspace>/logs/wandb`` (for ``wandb sync``);
    each step's loss value, as metrics.jsonl has it, is in wandb's run file."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "ws", **{"logging.wandb_project": "lora-nb-test"})
    result = train(cfg, progress=False)
    runs = list((result.workspace / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    data = runs[0].read_bytes()
    steps = [json.loads(l) for l in (result.workspace / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert len(steps) == result.steps
    assert b"loss/step" in data and b"lr/unet" in data
    for record in steps:  # wandb keeps each logged value as JSON text
        assert json.dumps(record["loss"]).encode() in data, record


@pytest.mark.slow
def test_bf16_training_reads_the_frozen_parts_in_bf16_and_trains_as_casting_after_loading_did(
        tiny_sd15_dir, tiny_dataset, tmp_path):
    """The UNet and text encoder come off the disk in bf16 (no fp32 copy, the peak of a full-size run), the VAE
    in fp32; the LoRA trained so is the one trained on a model loaded in fp32 and cast, tensor for tensor."""
    model = load_base_model(tiny_sd15_dir, frozen_dtype=torch.bfloat16)
    dtypes = {name: {p.dtype for p in getattr(model.pipe, name).parameters()} for name in ("unet", "text_encoder",
                                                                                            "vae")}
    assert dtypes == {"unet": {torch.bfloat16}, "text_encoder": {torch.bfloat16}, "vae": {torch.float32}}
    fp32 = load_base_model(tiny_sd15_dir)
    for (name, a), (_, b) in zip(model.pipe.unet.state_dict().items(), fp32.pipe.unet.state_dict().items()):
        assert torch.equal(a, b.to(torch.bfloat16)), name
    settings = {"training.mixed_precision": "bf16", "training.epochs": 2, "optimizer.learning_rate": 1e-3}
    read_in_bf16 = train(make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "a", **settings), progress=False)
    cast = train(make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "b", **settings), model=fp32, progress=False)
    a, b = _tensors(read_in_bf16.final), _tensors(cast.final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_up" in k) > 0
