"""Diagnosis: the verdict rules, the loss evidence, a deterministic validation loss."""

import pytest
from conftest import make_config

from lora_nb.diagnose import REMEDIES, Thresholds, loss_evidence, recommend, verdict


def _images(fidelity, memorization=0.5, leakage=0.0, generalisation=0.8):
    return {"fidelity": fidelity, "memorization": memorization, "leakage": leakage, "generalisation": generalisation}


BASE = _images(0.0, 0.0, 0.0, 0.85)


def test_missing_subject_is_underfit_with_the_number_behind_it():
    label, reasons = verdict(_images(0.2), BASE, None)
    assert label == "underfit" and "20%" in reasons[0]


def test_copying_leaking_or_ignoring_the_prompt_is_overfit():
    assert verdict(_images(0.9, memorization=0.97), BASE, None)[0] == "overfit"
    assert verdict(_images(0.9, leakage=0.6), BASE, None)[0] == "overfit"
    label, reasons = verdict(_images(0.9, generalisation=0.4), BASE, None)
    assert label == "overfit" and "85%" in reasons[0] and "40%" in reasons[0]
    val = {"val_loss": 0.2, "best_epoch": 2, "rise": 0.3, "after_best": True}
    assert verdict(_images(0.9), BASE, val)[0] == "overfit"
    still_learning = {**val, "after_best": False}  # above the best before reaching it: not a sign of overfitting
    assert verdict(_images(0.9), BASE, still_learning)[0] == "good"


def test_leakage_that_later_epochs_remove_is_not_yet_learned_not_overfit():
    label, reasons = verdict(_images(0.6, leakage=0.5), BASE, None, leak_settles=True)
    assert label == "underfit" and "not yet tied to the trigger word" in reasons[0] and "50%" in reasons[0]
    assert verdict(_images(0.6, leakage=0.5), BASE, None, leak_settles=False)[0] == "overfit"


def test_the_validation_loss_is_read_against_the_judges_epoch():
    from lora_nb.diagnose import loss_versus_judge

    def result(vals, judged):
        return {"loss": {"epochs": {e: {"val_loss": v} for e, v in vals.items()},
                         "best_val_epoch": min(vals, key=vals.get)},
                "recommended": {"epoch": judged}, "epochs": [{"epoch": judged, "images": {"fidelity": 0.6}}]}

    flat = loss_versus_judge(result({1: 0.036, 4: 0.030, 7: 0.0272, 10: 0.0284}, 10))
    assert "lowest 0.0272 at epoch 7" in flat and "4.4% above its lowest" in flat and "cannot tell epochs 7–10" in flat
    same = loss_versus_judge(result({2: 0.04, 4: 0.03, 6: 0.035}, 4))
    assert "Both point to the same epoch" in same
    apart = loss_versus_judge(result({2: 0.02, 4: 0.03, 6: 0.04}, 6))
    assert "disagree by 4 epochs" in apart
    assert loss_versus_judge({"loss": {"best_val_epoch": None}, "recommended": None}).startswith("No validation loss")


def test_present_general_and_not_copied_is_good():
    label, reasons = verdict(_images(0.8, memorization=0.7, leakage=0.05), BASE, None)
    assert label == "good" and "80%" in reasons[0]


def test_thresholds_are_settings_not_constants():
    loose = Thresholds(fidelity_min=0.1)
    assert verdict(_images(0.2), BASE, None, loose)[0] == "good"


def test_recommended_epoch_is_the_best_good_one_and_remedies_map_to_settings():
    epochs = [{"epoch": 2, "verdict": "underfit", "images": _images(0.3)},
              {"epoch": 4, "verdict": "good", "images": _images(0.8, leakage=0.1)},
              {"epoch": 6, "verdict": "good", "images": _images(0.9, leakage=0.0)},
              {"epoch": 8, "verdict": "overfit", "images": _images(1.0, memorization=0.97)}]
    assert recommend(epochs)["epoch"] == 6
    from lora_nb.config import all_setting_names

    for label in ("underfit", "overfit"):
        for _remedy, setting, _change in REMEDIES[label]:
            assert setting in all_setting_names()


def test_loss_evidence_finds_the_best_validation_epoch_and_the_trend():
    records = [{"step": s, "loss": 1.0 - s / 100} for s in range(1, 41)]
    records += [{"epoch": e, "step": e * 10, "train_loss": 1 - e / 10, "val_loss": v}
                for e, v in zip(range(1, 5), [0.5, 0.4, 0.45, 0.6])]
    ev = loss_evidence(records)
    assert ev["best_val_epoch"] == 2 and ev["best_val_loss"] == 0.4
    assert ev["train_trend"] < 0
    assert ev["epochs"][4]["gap"] == pytest.approx(0.6 - 0.6)


def test_validation_loss_of_a_saved_file_is_deterministic(tiny_sd15_dir, tiny_dataset, tmp_path):
    from lora_nb.dataset import scan_dataset
    from lora_nb.diagnose import validation_loss_of_file
    from lora_nb.models import load_base_model
    from lora_nb.train import train

    cfg = make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "ws", **{"training.epochs": 1,
                                                                     "optimizer.learning_rate": 1e-2})
    result = train(cfg, progress=False)
    items = scan_dataset(tiny_dataset).items[:2]
    model = load_base_model(tiny_sd15_dir)
    args = ([i.image for i in items], [i.caption for i in items], (64, 64))
    first = validation_loss_of_file(model, result.final, *args)
    second = validation_loss_of_file(model, result.final, *args)
    base = validation_loss_of_file(model, None, *args)
    assert first == second
    assert first != base  # the LoRA is really loaded
