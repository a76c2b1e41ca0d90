"""The remedies table: distinct runs, conclusions only beyond the seed spread, resumable runs."""

from __future__ import annotations

import json

import pytest

from lora_nb import LoraNbError
from lora_nb.config import preset
from lora_nb.models import load_model_for
from lora_nb.remedies import conclude, format_table, remedy_runs, run_config, run_table, select_runs, summarise


def _runs():
    return remedy_runs(preset("toy"), "few", "varied")


def test_no_two_runs_have_the_same_settings(tmp_path):
    course = preset("toy")
    yamls = {}
    for run in _runs():
        text = run_config(course, run, 0, tmp_path / "same").to_yaml()
        assert text not in yamls, f"{run.name} has the settings of {yamls.get(text)}"
        yamls[text] = run.name


def test_each_remedy_starts_from_a_baseline_in_its_regime():
    runs = {r.name: r for r in _runs()}
    for r in runs.values():
        if r.regime == "baseline":
            continue
        assert r.goal[0] in "+-" and r.goal[1:] in ("fidelity", "generalisation", "memorization", "leakage")
        base = runs[r.regime]
        changed = {k for k in set(r.overrides) | set(base.overrides) if r.overrides.get(k) != base.overrides.get(k)}
        assert changed, r.name
    assert runs["overfit"].overrides["dataset.reg_dir"] == "" and runs["overfit"].overrides["dataset.dir"] == "few"
    assert runs["underfit"].overrides["optimizer.learning_rate"] < preset("toy").optimizer.learning_rate


def test_only_brings_the_baseline_along_and_unknown_names_are_refused():
    picked = [r.name for r in select_runs(_runs(), ["overfit-lower-lr", "underfit-more-data"])]
    assert picked == ["overfit", "underfit", "overfit-lower-lr", "underfit-more-data"]
    with pytest.raises(LoraNbError, match="--only nope: no such run"):
        select_runs(_runs(), ["nope"])


def _measures(values):
    return {i: {"fidelity": v, "generalisation": 1.0, "memorization": 0.5, "leakage": 0.0} for i, v in enumerate(values)}


def test_a_remedy_works_only_beyond_the_spread_between_seeds():
    def table(base, remedy, regime="underfit", goal="+fidelity"):
        runs = {"underfit": {"regime": "baseline", "what": "", "goal": "", **summarise(_measures(base))},
                "overfit": {"regime": "baseline", "what": "", "goal": "", **summarise(_measures(base))},
                "r": {"regime": regime, "what": "x", "goal": goal, **summarise(_measures(remedy))}}
        return conclude(runs)[0]

    worked = table([0.10, 0.15, 0.20], [0.60, 0.70, 0.65])
    assert worked["conclusion"] == "worked" and worked["spread"] == pytest.approx(0.10)
    assert worked["difference"] == pytest.approx(0.5)
    assert table([0.10, 0.30, 0.20], [0.35, 0.25, 0.30])["conclusion"] == "no difference this experiment can resolve"
    assert table([0.60, 0.65, 0.70], [0.10, 0.15, 0.20])["conclusion"] == "made it worse"
    assert table([0.6, 0.6, 0.6], [0.1, 0.1, 0.1], "overfit", "-fidelity")["conclusion"] == "worked"
    assert table([0.6], [0.1])["conclusion"].startswith("one seed")
    # a difference equal to the spread is a tie, whatever the float sums round to (the remedies table's
    # underfit-higher-lr of 2026-12-04: 2, 1, 4 zorbs in 24 against 7, 5, 10 — a difference of 5/24 as large as the
    # remedy's own spread)
    tie = table([2 / 24, 1 / 24, 4 / 24], [7 / 24, 5 / 24, 10 / 24])
    assert tie["difference"] == pytest.approx(tie["spread"])
    assert tie["conclusion"] == "no difference this experiment can resolve"


@pytest.mark.slow
def test_the_table_trains_measures_and_resumes(tmp_path, monkeypatch):
    """Also: every run loads its own model only after the run before it has let go of its own (one pipeline
    in memory at a time, as notebook 06's experiments need on a small machine)."""
    import gc

    from diffusers import UNet2DConditionModel

    import lora_nb.diagnose
    import lora_nb.train

    def unets() -> int:
        gc.collect()
        return sum(isinstance(o, UNet2DConditionModel) for o in gc.get_objects())

    before, alive_at_load = unets(), []  # other tests' session-wide models may be alive already

    def counting_load(cfg, *args, **kwargs):
        alive_at_load.append(unets() - before)
        return load_model_for(cfg, *args, **kwargs)

    monkeypatch.setattr(lora_nb.train, "load_model_for", counting_load)
    monkeypatch.setattr(lora_nb.diagnose, "load_model_for", counting_load)
    course = preset("toy").with_overrides({"training.max_steps": 3, "training.epochs": 1})
    lines = []
    table = run_table(tmp_path, seeds=2, only=["underfit-higher-lr"], sample_seeds=[0], steps=4, course=course,
                      log=lines.append)
    assert list(table["runs"]) == ["underfit", "underfit-higher-lr"] and len(lines) == 4
    assert alive_at_load == [0] * 8  # 4 runs, each trained then judged, nothing left over from the one before
    row = table["rows"][0]
    assert row["run"] == "underfit-higher-lr" and row["n"] == 2 and row["measure"] == "fidelity"
    saved = json.loads((tmp_path / "underfit" / "seed-1" / "measures.json").read_text())
    assert 0 <= saved["fidelity"] <= 1 and saved["n_images"] == 24
    from lora_nb.remedies import load_examples

    examples = load_examples(tmp_path / "underfit" / "seed-1")
    assert len(examples) == 6 and "zorb" in examples[0][0] and examples[0][1].size == (64, 64)
    cfg = (tmp_path / "underfit" / "seed-1" / "train_config.yaml").read_text()
    assert "seed: 1" in cfg
    lora = tmp_path / "underfit" / "seed-1" / "lora" / "lora.safetensors"
    before = lora.stat().st_mtime_ns
    again = run_table(tmp_path, seeds=2, only=["underfit-higher-lr"], sample_seeds=[0], steps=4, course=course,
                      log=lambda _: None)
    assert lora.stat().st_mtime_ns == before and again["rows"] == table["rows"]
    so_far = run_table(tmp_path, seeds=3, only=["underfit-higher-lr"], sample_seeds=[0], steps=4, course=course,
                       log=lambda _: None, measured_only=True)  # trains nothing: says what is missing
    assert so_far["missing"] == ["underfit seed 2", "underfit-higher-lr seed 2"]
    assert not (tmp_path / "underfit" / "seed-2").exists()
    assert "Not measured yet (2 runs)" in format_table(so_far)


def test_a_table_measured_on_other_concept_pictures_says_so(tmp_path):
    import shutil

    from lora_nb.experiments import describe_committed
    from lora_nb.remedies import concept_fingerprint

    concept = tmp_path / "concept"
    shutil.copytree(preset("toy").dataset.dir, concept)
    table = {"date": "2026-12-02", "command": "lora-nb experiments --seeds 3", "seeds": [0, 1, 2], "rows": [],
             "concept": concept_fingerprint(concept)}
    assert "other concept pictures" not in describe_committed(table, concept)
    picture = sorted(concept.rglob("*.png"))[0]
    picture.write_bytes(picture.read_bytes() + b"\0")  # one picture changed
    note = describe_committed(table, concept)
    assert "other concept pictures" in note and table["concept"] in note and concept_fingerprint(concept) in note
    assert "not recorded" in describe_committed({**table, "concept": None}, concept)
