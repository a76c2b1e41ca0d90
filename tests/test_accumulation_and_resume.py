"""Gradient accumulation and saves inside an epoch, on real training runs of the tiny SD1.5 model.

Each sample's random draws (flip, noise, timestep, caption changes) come from its own position in the run,
not from the batch it lands in; these tests check what that promises: batch 4 trains what batch 2 × 2
accumulated trains, and a run killed inside an epoch and resumed ends where the uninterrupted run ends.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import kill_train_when_paused, make_config
from safetensors.torch import load_file

from lora_nb import cli
from lora_nb.config import check_config, plan_steps
from lora_nb.lora_io import inspect_lora
from lora_nb.optim import lr_curve
from lora_nb.train import train

pytestmark = pytest.mark.slow

# Batch 4 in one pass and 2 × 2 accumulated sum the same per-sample losses in another order: float32
# rounding leaves a relative difference (Frobenius norm over the whole file) of this size at most
# (measured: 1e-7 to 1e-6). SGD without clipping, whose step is proportional to the gradient, so a wrong
# weighting of the accumulated batches (a sum instead of a mean) would show as a factor of 2.
ACCUMULATION_TOLERANCE = 1e-5


def _relative_difference(a, b) -> float:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    num = sum(float((ta[k].float() - tb[k].float()).norm()) ** 2 for k in ta)
    return (num / sum(float(ta[k].float().norm()) ** 2 for k in ta)) ** 0.5


def _worst_difference(a, b) -> float:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    return max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta)


def _step_records(ws) -> list[dict]:
    return [json.loads(l) for l in (ws / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def test_steps_math_counts_optimizer_steps():
    # 10 images × 3 repeats, batch 2: 15 batches an epoch; 4 per step → 4 steps (the last sums 3 batches)
    plan = plan_steps([(10, 3)], batch_size=2, epochs=5, accumulation=4)
    assert (plan.batches_per_epoch, plan.steps_per_epoch, plan.total_steps, plan.effective_batch) == (15, 4, 20, 8)
    assert "an effective batch of 8" in plan.describe()
    assert plan_steps([(10, 3)], 2, 5, accumulation=4, max_steps=6).epochs == 2
    buckets = plan_steps([(10, 3)], 2, 2, batches_of_epochs=[16, 17], accumulation=4)
    assert (buckets.steps_per_epoch, buckets.total_steps) == (4, 9)
    bad = {p.setting for p in check_config(make_config("m", "d", "w", **{"training.gradient_accumulation_steps": 0}))}
    assert "training.gradient_accumulation_steps" in bad


def test_batch_4_trains_what_batch_2_accumulated_twice_trains(tiny_sd15_dir, tiny_dataset, tmp_path):
    """Same data order and seed, flips and shuffled captions on: after 3 optimizer steps the LoRA files agree
    within ACCUMULATION_TOLERANCE, and both ran 3 optimizer steps on a 3-step LR schedule."""
    common = {"training.epochs": 3, "save.precision": "fp32", "dataset.flip_aug": True,
              "dataset.shuffle_caption": True, "optimizer.lr_scheduler": "linear", "optimizer.learning_rate": 1.0,
              "optimizer.optimizer": "SGD", "optimizer.max_grad_norm": 0.0}
    one = train(make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "b4", **common, **{"training.batch_size": 4}),
                progress=False)
    two = train(make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "b2x2", **common,
                            **{"training.batch_size": 2, "training.gradient_accumulation_steps": 2}), progress=False)
    assert one.steps == two.steps == two.plan.total_steps == 3
    assert _relative_difference(one.final, two.final) <= ACCUMULATION_TOLERANCE
    # the schedule ran over optimizer steps: the LR of each logged step is the linear schedule's over 3 steps
    expected = [lrs[0] for lrs in lr_curve("linear", [1.0], 0, 3)]
    logged = [r["lr"]["unet"] for r in _step_records(two.workspace)]
    assert logged == pytest.approx(expected)
    # the LoRA moved, and 3 steps of batch 2 without accumulation (half the data) train something else
    assert max(float(v.abs().max()) for k, v in load_file(str(two.final)).items() if "lora_up" in k) > 1e-4
    half = train(make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "b2", **common,
                             **{"training.batch_size": 2, "training.max_steps": 3}), progress=False)
    assert _relative_difference(one.final, half.final) > 100 * ACCUMULATION_TOLERANCE
    meta = inspect_lora(two.final)["metadata"]
    assert meta["ss_gradient_accumulation_steps"] == "2" and meta["ss_total_batch_size"] == "4"
    assert meta["ss_num_batches_per_epoch"] == "2" and meta["ss_max_train_steps"] == "3"


def test_a_run_killed_inside_an_epoch_resumes_to_the_uninterrupted_result(tiny_sd15_dir, tiny_dataset, tmp_path,
                                                                          capsys):
    """4 images, batch 1, 2 epochs (8 steps), the state saved after every step, a LoRA file every 3 steps.
    ``lora-nb train`` in a subprocess is SIGKILLed while it replaces step 6's state (a test hook pauses
    there): the state on disk is step 5's, one step into epoch 2. The rerun continues from step 5 and its
    files equal those of an uninterrupted run (≤ 1e-6); epoch 2's mean loss counts all four of its steps."""
    overrides = {"training.batch_size": 1, "save.precision": "fp32", "save.state_every_n_steps": 1,
                 "save.every_n_steps": 3, "dataset.flip_aug": True, "dataset.shuffle_caption": True}
    ref = train(make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "reference", **overrides), progress=False)
    assert sorted(p.name for p in (ref.workspace / "lora").iterdir()) == [
        "lora-e0001.safetensors", "lora-step00000003.safetensors", "lora-step00000006.safetensors",
        "lora.safetensors"]

    ws = tmp_path / "killed"
    cfg_path = make_config(tiny_sd15_dir, tiny_dataset, ws, **overrides).write_yaml(tmp_path / "train.yaml")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               LORA_NB_TEST_PAUSE_BEFORE_REPLACE="training_state.pt",
               LORA_NB_TEST_PAUSE_BEFORE_REPLACE_SKIP="4")  # states 1 (new), 2–5 replace; pause replacing 5 by 6
    kill_train_when_paused(cfg_path, env)
    state = torch.load(ws / "state" / "training_state.pt", map_location="cpu", weights_only=True)
    assert (state["epoch"], state["step"], state["epoch_step"]) == (1, 5, 1), "killed one step into epoch 2"

    capsys.readouterr()
    assert cli.main(["train", str(cfg_path)]) == 0
    assert "Resuming at step 5, inside epoch 2 (after 1 of its steps), from the saved state." in capsys.readouterr().out
    for name in ("lora-e0001.safetensors", "lora-step00000003.safetensors", "lora-step00000006.safetensors",
                 "lora.safetensors"):
        assert _worst_difference(ws / "lora" / name, ref.workspace / "lora" / name) <= 1e-6, name
    assert [r["step"] for r in _step_records(ws)] == list(range(1, 9)), "the killed step is replaced, not doubled"
    epochs = {json.loads(l)["epoch"]: json.loads(l) for l in (ws / "metrics.jsonl").read_text().splitlines()
              if '"train_loss"' in l}
    ref_epochs = {json.loads(l)["epoch"]: json.loads(l) for l in (ref.workspace / "metrics.jsonl").read_text()
                  .splitlines() if '"train_loss"' in l}
    assert epochs[2]["train_loss"] == pytest.approx(ref_epochs[2]["train_loss"], abs=1e-6)
