"""The setup cell of every notebook installs lora-nb on Colab/Kaggle from the notebook's repo_url only,
and leaves the platform's CUDA torch in place."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import NOTEBOOKS, code_cells

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_notebook_declares_repo_url_and_the_setup_cell_uses_it(path):
    sources, setup = code_cells(path)
    assert re.search(r'^repo_url: str = ""  # \S', sources[setup - 1], re.MULTILINE)
    assert "https://github.com" not in sources[setup] and "repo_url" in sources[setup]
    # the platform's CUDA torch stays: pip installs under a constraint pinning the installed torch
    assert '"-c", "torch-constraint.txt"' in sources[setup] and "torch==" in sources[setup]


def test_setup_cell_on_kaggle_without_repo_url_says_so_and_clones_nothing(tmp_path):
    """Run the setup cell as Kaggle would, where lora_nb is not installed (python -S: no site-packages)."""
    sources, setup = code_cells(NOTEBOOKS[0])
    program = 'repo_url = ""\nworkspace, seed, use_drive, interactive = "runs/course", 42, False, True\n' + sources[setup]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["KAGGLE_KERNEL_RUN_TYPE"] = "Interactive"
    res = subprocess.run([sys.executable, "-S", "-c", program], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 1, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1 and "set repo_url" in lines[0] and "upload the repository" in lines[0]
    assert list(tmp_path.iterdir()) == []  # nothing cloned, nothing installed


def test_hosted_checks_say_what_each_fact_means_one_line_each(tmp_path, monkeypatch):
    from lora_nb.machine_checks import MachineFacts, check_lines, gather_facts, hub_reachable

    t4 = check_lines(MachineFacts("colab", "Tesla T4", 15.0, False, 80.0, "reachable", "not asked"))
    assert len(t4) == 4 and "Tesla T4, 15.0 GiB" in t4[0] and "no bf16" in t4[0]
    assert t4[1] == "disk: 80.0 GiB free" and "hub answers" in t4[2] and "set use_drive=True" in t4[3]
    kaggle = check_lines(MachineFacts("kaggle", None, None, None, 4.0, "unreachable", "not asked"))
    assert "GPU: none" in kaggle[0] and "Accelerator" in kaggle[0]
    assert "too little for SD1.5 and SDXL" in kaggle[1]
    assert "attach" in kaggle[2] and "/kaggle/input" in kaggle[2] and len(kaggle) == 3
    lost = check_lines(MachineFacts("colab", None, None, None, 50.0, "offline", "not mounted"))
    assert "HF_HUB_OFFLINE" in lost[2] and "not mounted" in lost[3]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_reachable() == "offline"  # never probes the network when the hub is switched off
    facts = gather_facts("local", tmp_path / "not" / "made", use_drive=False, drive_mounted=False)
    assert facts.hub == "not checked" and facts.free_gib > 0 and facts.drive == "not asked"
