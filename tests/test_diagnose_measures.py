"""The real-model diagnosis: DINO, CLIP-I and CLIP-T from tiny random transformers models saved to folders,
measured on real images; the labelled approximation when they cannot be loaded."""

import json

import numpy as np
import pytest
from conftest import make_config

from lora_nb.diagnose import Thresholds, embedding_measures, reference_embeddings
from lora_nb.embedders import (
    EmbeddersUnavailable,
    build_tiny_embedders,
    cosine_matrix,
    embed_images,
    embed_texts,
    find_embedders,
    load_embedders,
)


@pytest.fixture(scope="module")
def tiny_embedder_dirs(tmp_path_factory):
    return build_tiny_embedders(tmp_path_factory.mktemp("embedders"))


@pytest.fixture(scope="module")
def embedders(tiny_embedder_dirs):
    return load_embedders(*tiny_embedder_dirs)


def _squares(n, seed=0):
    """Coloured squares at random places on gray, 64×64 (the tiny dataset's kind of picture)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = np.full((64, 64, 3), 128, np.uint8)
        x, y = rng.integers(4, 36, 2)
        a[y:y + 24, x:x + 24] = rng.integers(0, 255, 3)
        out.append(a)
    return out


def _noise(n, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(n)]


def test_an_image_is_most_similar_to_itself_in_dino_and_clip(embedders):
    training = _squares(4)
    for which in ("dino", "clip"):
        emb = embed_images(embedders, training + _noise(2), which)
        sims = cosine_matrix(emb, emb[:4])
        assert emb.shape[0] == 6 and np.allclose(np.linalg.norm(emb.numpy(), axis=1), 1, atol=1e-5)
        assert np.allclose(np.diag(sims[:4]), 1, atol=1e-5)
        assert sims[4:].max() < 1 - 1e-4  # a different picture is less similar than the picture itself


def test_copies_of_the_training_images_read_as_present_and_memorized(embedders):
    training = _squares(4)
    reference = reference_embeddings(embedders, training)
    assert -1 <= reference["dino_self"] < 1
    texts = ["red square, gray background"] * 4
    copies = embedding_measures(embedders, reference, training, texts, off=[])
    assert copies["memorization"] == pytest.approx(1, abs=1e-4)
    assert copies["memorization_max"] == pytest.approx(1, abs=1e-4)
    assert copies["fidelity"] == 1.0  # each copy is at least as close to the set as the set is to itself
    assert copies["measures"] == "dino+clip" and copies["approximate"] is False
    assert copies["generalisation"] == 1.0 and copies["leakage"] is None  # the base model; no trigger-free images
    assert np.isfinite(copies["clip_t"]) and -1 <= copies["clip_t"] <= 1
    clip = embed_images(embedders, training, "clip")
    assert copies["clip_i"] == pytest.approx(float(np.mean(cosine_matrix(clip, clip))))
    others = embedding_measures(embedders, reference, _noise(4), texts, off=_noise(4, seed=2), base=copies)
    assert others["memorization"] < copies["memorization"] and others["dino"] < copies["dino"]
    assert others["generalisation"] == pytest.approx(others["clip_t"] / copies["clip_t"])
    assert others["n_images"] == 8 and 0 <= others["leakage"] <= 1


def test_the_subject_threshold_is_a_share_of_the_training_images_own_similarity(embedders):
    training = _squares(4)
    reference = reference_embeddings(embedders, training)
    texts = ["a square"] * 4
    strict = embedding_measures(embedders, reference, training, texts, off=[], t=Thresholds(subject_dino=1.5))
    loose = embedding_measures(embedders, reference, training, texts, off=[], t=Thresholds(subject_dino=-1.5))
    assert strict["dino_subject_min"] == pytest.approx(1.5 * reference["dino_self"])
    assert loose["fidelity"] == 1.0
    if reference["dino_self"] > 0:  # a copy's mean similarity stays below 1.5 × the set's own
        assert strict["fidelity"] == 0.0


def test_leakage_is_counted_above_the_base_models_share(embedders):
    training = _squares(3)
    reference = reference_embeddings(embedders, training)
    texts = ["a square"] * 3
    t = Thresholds(subject_dino=-1.5)  # every image counts as the subject: the base shows it without the trigger too
    base = embedding_measures(embedders, reference, training, texts, off=training, t=t)
    after = embedding_measures(embedders, reference, training, texts, off=training, base=base, t=t)
    assert base["subject_without_trigger"] == 1.0 and base["leakage"] == 0.0 and after["leakage"] == 0.0


def test_clip_t_compares_an_image_with_its_prompt_text(embedders):
    image = embed_images(embedders, _squares(1), "clip")
    texts = embed_texts(embedders, ["red square, gray background", "a dog on the sea"])
    sims = cosine_matrix(image, texts)
    assert sims.shape == (1, 2) and np.isfinite(sims).all() and (np.abs(sims) <= 1 + 1e-6).all()


def test_missing_embedders_give_one_line_reasons(tmp_path):
    missing = tmp_path / "no-dino"
    none, reason = find_embedders(str(missing), str(missing))
    assert none is None and str(missing) in reason and "does not exist" in reason and "\n" not in reason
    none, reason = find_embedders("lora-nb-tests/no-such-dino", "lora-nb-tests/no-such-clip")
    assert none is None and reason.startswith("DINO/CLIP not available offline: lora-nb-tests/no-such-dino not in "
                                              "the local cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmbeddersUnavailable, match="could not load"):
        load_embedders(str(tmp_path / "empty"), str(tmp_path / "empty"))


@pytest.fixture(scope="module")
def tiny_real_run(tiny_sd15_dir, tiny_dataset, tmp_path_factory):
    from lora_nb.train import train

    ws = tmp_path_factory.mktemp("real-run")
    cfg = make_config(tiny_sd15_dir, tiny_dataset, ws, **{
        "training.epochs": 1, "optimizer.learning_rate": 1e-2,
        "sample.prompts": ["sks, red square, gray background --d 1", "sks square on a blue background --d 2"]})
    train(cfg, progress=False)
    return ws


@pytest.mark.slow
def test_a_real_architecture_run_is_diagnosed_with_dino_and_clip(tiny_real_run, tiny_embedder_dirs):
    from lora_nb.diagnose import diagnose_run, format_diagnosis

    dino, clip = tiny_embedder_dirs
    result = diagnose_run(tiny_real_run, seeds=[0], steps=2, progress=False, dino=str(dino), clip=str(clip))
    assert result["measures"] == "dino+clip" and result["approximate"] is False and not result["approximate_reason"]
    base, final = result["base"], result["epochs"][-1]["images"]
    assert base["generalisation"] == 1.0 and base["leakage"] == 0.0
    assert base["n_images"] == 2 * 5  # 2 prompts + 3 variations, with and without the trigger word
    for key in ("dino", "clip_i", "clip_t", "fidelity", "memorization", "memorization_max", "leakage"):
        assert np.isfinite(final[key]), key
    assert final["generalisation"] == pytest.approx(final["clip_t"] / base["clip_t"])
    assert result["epochs"][-1]["verdict"] in ("underfit", "good", "overfit")
    text = format_diagnosis(result)
    assert "(DINO + CLIP measures)" in text and f"CLIP-T {final['clip_t']:.3f}" in text and "Ruiz et al. 2023" in text
    written = json.loads((tiny_real_run / "diagnosis.json").read_text(encoding="utf-8"))
    assert written["epochs"][-1]["images"]["clip_i"] == pytest.approx(final["clip_i"])


@pytest.mark.slow
def test_without_embedders_the_diagnosis_is_the_labelled_approximation(tiny_real_run, tmp_path):
    from lora_nb.diagnose import diagnose_run, format_diagnosis

    missing = str(tmp_path / "no-dino")
    result = diagnose_run(tiny_real_run, seeds=[0], steps=2, progress=False, only_final=True, write=False,
                          dino=missing, clip=missing)
    reason = result["approximate_reason"]
    assert result["approximate"] is True and result["measures"] == "approximate"
    assert missing in reason and reason.endswith("; measures are the approximation")
    assert result["epochs"][0]["images"]["approximate_reason"] == reason
    assert result["epochs"][0]["images"]["generalisation"] is None and "dino" not in result["epochs"][0]["images"]
    assert format_diagnosis(result).splitlines()[1] == f"  {reason}"


def test_the_command_line_names_the_embedders_defaults():
    from lora_nb.cli import build_parser
    from lora_nb.embedders import DEFAULT_CLIP, DEFAULT_DINO

    parser = build_parser()
    args = parser.parse_args(["diagnose", "runs/x", "--dino", "some/folder"])
    assert args.dino == "some/folder" and args.clip is None  # unset: diagnose_run's defaults
    diagnose = parser._subparsers._group_actions[0].choices["diagnose"]
    helps = {a.dest: a.help for a in diagnose._actions}
    assert DEFAULT_DINO in helps["dino"] and DEFAULT_CLIP in helps["clip"]
