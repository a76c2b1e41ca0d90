"""Data-parallel training: `accelerate launch` with 2 CPU processes (gloo) on the tiny model."""

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import make_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_split_the_batches_and_write_one_set_of_files(tiny_sd15_dir, tiny_dataset, tmp_path):
    from safetensors.torch import load_file

    from lora_nb.lora_io import inspect_lora, load_lora
    from lora_nb.models import load_base_model
    from lora_nb.train import train

    ws = tmp_path / "ws"
    cfg = make_config(tiny_sd15_dir, tiny_dataset, ws, **{"training.batch_size": 2, "training.epochs": 2,
                                                          "dataset.repeats": 1})
    cfg.write_yaml(tmp_path / "cfg.yaml")
    logs = tmp_path / "batches"
    logs.mkdir()
    env = dict(os.environ, LORA_NB_BATCH_LOG=str(logs), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "lora_nb.cli", "train", str(tmp_path / "cfg.yaml")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    names = sorted(p.name for p in (ws / "lora").iterdir())
    assert names == ["lora-e0001.safetensors", "lora.safetensors"]  # written once, by the main process
    ranks = {r: [json.loads(l) for l in (logs / f"batches-rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)}
    assert [e["step"] for e in ranks[0]] == [e["step"] for e in ranks[1]] == [1, 2, 3, 4]
    for a, b in zip(ranks[0], ranks[1]):
        assert set(a["images"]).isdisjoint(b["images"]), (a, b)  # each process trained on different images
    seen = sorted(n for r in ranks.values() for e in r for n in e["images"])
    assert seen == sorted(["img0.png", "img1.png", "img2.png", "img3.png"] * 2)  # 2 epochs, every image once each
    assert inspect_lora(ws / "lora" / "lora.safetensors")["problems"] == []
    load_lora(load_base_model(tiny_sd15_dir).pipe, ws / "lora" / "lora.safetensors")
    # each sample draws its noise and timestep from its place in the epoch, not from the process it lands on:
    # one process with the same batch trains the same LoRA (the two processes' gradients are averaged)
    single = train(cfg.with_overrides({"save.output_dir": str(tmp_path / "single")}), progress=False)
    a, b = load_file(str(single.final)), load_file(str(ws / "lora" / "lora.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= 1e-3 * max(float(v.abs().max()) for v in a.values()), worst
