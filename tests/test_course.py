"""`lora-nb course`: notebooks run in order into one workspace; notebook 05 resumes after an interruption."""

import nbformat
import pytest
from conftest import make_config
from safetensors.torch import load_file

from lora_nb.course import list_notebooks, run_course


def test_course_lists_the_six_notebooks_in_order():
    names = [p.name for p in list_notebooks()]
    assert names == sorted(names) and names[0].startswith("01_") and len(names) == 6


@pytest.mark.slow
def test_course_passes_parameters_to_the_notebooks_that_declare_them(tmp_path, capfd):
    lines = []
    summary = run_course(tmp_path / "ws", params={"preset": "realistic", "repeats": 10, "epochs": 10,
                                                  "measure_time": False, "no_such_parameter": 1},
                         only=["04"], log=lines.append)
    assert summary.ok, summary.describe()
    executed = tmp_path / "ws" / "executed" / "04_parameters.ipynb"
    assert executed.exists()
    nb = nbformat.read(executed, as_version=4)
    text = "\n".join("".join(o.get("text", "")) for c in nb.cells for o in c.get("outputs", []))
    assert "total steps: 480 × 10 epochs = 4800" in text  # 48 bundled pictures × 10 repeats, batch 1
    assert any("04_parameters" in l for l in lines)
    assert any("no_such_parameter" in l for l in lines)  # told, not silently dropped
    assert "ok " in summary.describe()
    assert "without encryption" not in capfd.readouterr().err  # the kernel's start-up warning, once per notebook


@pytest.mark.slow
def test_interrupted_training_resumes_in_notebook_05_to_the_same_final_lora(fault_before_step, tiny_sd15_dir,
                                                                          tiny_dataset, tmp_path):
    from lora_nb.train import train

    overrides = {"training.epochs": 3, "save.every_n_epochs": 1, "training.batch_size": 2}
    interrupted = tmp_path / "interrupted"
    cfg = make_config(tiny_sd15_dir, tiny_dataset, interrupted, **overrides)
    interrupted.mkdir()
    cfg.write_yaml(interrupted / "config.yaml")

    def stop_after_first_epoch(step):
        if step == 2:  # 4 images / batch 2 = 2 steps per epoch: epoch 1 is saved
            raise KeyboardInterrupt

    with fault_before_step(stop_after_first_epoch), pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    assert (interrupted / "lora" / "lora-e0001.safetensors").exists()
    assert not (interrupted / "lora" / "lora.safetensors").exists()

    run_course(interrupted, only=["05"], params={"strengths": "0, 1"}, log=lambda *_: None)
    nb = nbformat.read(interrupted / "executed" / "05_training.ipynb", as_version=4)
    assert "continued from step 2" in "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))

    straight = tmp_path / "straight"
    train(make_config(tiny_sd15_dir, tiny_dataset, straight, **overrides), progress=False)
    a = load_file(interrupted / "lora" / "lora.safetensors")
    b = load_file(straight / "lora" / "lora.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6


def test_headless_progress_bars_leave_one_summary_line_each(monkeypatch):
    """An executed notebook keeps every redraw of a bar: a headless bar draws nothing and prints one line at
    its end; unnamed bars (a sampler's steps) and loaders print nothing."""
    import io
    import time

    import tqdm.auto

    from lora_nb.notebook import use_summary_progress_bars

    monkeypatch.setattr(tqdm.auto, "tqdm", tqdm.auto.tqdm)  # restored after the test
    monkeypatch.setattr(tqdm.auto, "trange", tqdm.auto.trange)
    out = io.StringIO()
    use_summary_progress_bars(stream=out)
    for _ in tqdm.auto.tqdm(range(60), desc="Caching latents"):
        time.sleep(0.005)
    assert sum(1 for _ in tqdm.auto.trange(3)) == 3  # unnamed: silent
    with tqdm.auto.tqdm(total=5, desc="Loading pipeline components...") as bar:
        bar.update(5)
    bar = tqdm.auto.tqdm(total=10, desc="Generating")
    bar.update(4)
    bar.close()
    bar.close()  # closed twice: still one line
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("Caching latents: 60/60 in ") and lines[0].endswith(" s")
    assert lines[1].startswith("Generating: 4/10 in ")
    assert "\r" not in out.getvalue()


def test_known_import_noise_is_dropped_and_other_messages_kept(caplog):
    import logging

    from lora_nb.notebook import KNOWN_NOISE, quiet_known_noise

    quiet_known_noise()
    quiet_known_noise()  # idempotent: one filter per message
    for name, part in KNOWN_NOISE:
        logger = logging.getLogger(name)
        assert len(logger.filters) >= 1
        with caplog.at_level(logging.WARNING, logger=name):
            logger.warning("prefix %s suffix", part)
            logger.warning("a message that matters")
    texts = [r.getMessage() for r in caplog.records]
    assert texts.count("a message that matters") == len(KNOWN_NOISE)
    assert not any(part in t for t in texts for _, part in KNOWN_NOISE)


def test_headless_training_bar_leaves_one_line(tiny_sd15_dir, tiny_dataset, tmp_path, monkeypatch, capsys):
    """The loss shown beside the bar must not force a redraw per step (it did: 1,200 bar lines in notebook 05):
    a headless run prints the training bar once, when it ends."""
    import tqdm.auto

    from lora_nb.notebook import use_summary_progress_bars
    from lora_nb.train import train

    monkeypatch.setattr(tqdm.auto, "tqdm", tqdm.auto.tqdm)
    monkeypatch.setattr(tqdm.auto, "trange", tqdm.auto.trange)
    use_summary_progress_bars()
    cfg = make_config(tiny_sd15_dir, tiny_dataset, tmp_path / "ws", **{"training.epochs": 4, "save.every_n_epochs": 0})
    capsys.readouterr()
    train(cfg, progress=True)
    out = capsys.readouterr()
    bar = [line for line in (out.out + out.err).splitlines() if line.startswith("Training")]
    assert len(bar) == 1 and bar[0].startswith("Training: 8/8 in "), bar  # 4 images, batch 2, 4 epochs
    assert "\r" not in out.out + out.err
