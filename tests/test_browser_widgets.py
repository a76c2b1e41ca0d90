"""Notebook 04's widgets in a real browser: JupyterLab on localhost, driven in Chromium by Playwright.

The headless tests prove the numbers; this one proves the controls work for a person: the form
appears, and changing the repeats field or the preset dropdown re-prints the consequences.
Chromium is Debian's package (``scripts/setup.sh`` installs it when apt is there); Playwright
only drives it, it downloads no browser.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT / "data" / "toy-concept"
CHROMIUM = os.environ.get("LORA_NB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 60_000  # generous: 2 shared cores, and the first refresh imports torch/diffusers in the kernel


@pytest.fixture
def chromium() -> str:
    """Debian's Chromium (or LORA_NB_CHROMIUM): skipped where it cannot be installed, an error where it should be."""
    if Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    if shutil.which("apt-get") and os.geteuid() == 0:
        pytest.fail(f"{CHROMIUM} is missing although apt-get is available: run `make setup` "
                    "(scripts/setup.sh installs Debian's chromium package).")
    pytest.skip(f"no Chromium at {CHROMIUM} and no root apt-get to install it: install Chromium and set "
                "LORA_NB_CHROMIUM to its path to run the browser test.")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _expected_total_line(preset_name: str, repeats: int | None = None) -> str:
    """The "total steps" line notebook 04 prints for the toy concept set under ``preset_name``."""
    from lora_nb.config import plan_steps, preset
    from lora_nb.dataset import scan_dataset

    cfg = preset(preset_name)
    reps = repeats if repeats is not None else cfg.dataset.repeats
    folders = [(n, reps if reps is not None else r) for n, r in scan_dataset(DATASET).folders]
    plan = plan_steps(folders, cfg.training.batch_size, cfg.training.epochs, cfg.save.every_n_epochs,
                      with_regularization=bool(cfg.dataset.reg_dir))
    return f"total steps: {plan.steps_per_epoch} × {plan.epochs} epochs = {plan.total_steps}"


def _write_notebook(folder: Path) -> str:
    """A copy of notebook 04 with its parameters set for a fast widget run (no time warm-up)."""
    nb = nbformat.read(ROOT / "notebooks" / "04_parameters.ipynb", as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", []))
    overrides = {"workspace": str(folder / "ws"), "interactive": True, "preset": "toy",
                 "dataset_dir": str(DATASET), "measure_time": False}
    source = "# Parameters for the browser test\n" + "".join(f"{k} = {v!r}\n" for k, v in overrides.items())
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    name = "04_parameters_browser.ipynb"
    nbformat.write(nb, folder / name)
    return name


@pytest.fixture
def playwright_api():
    return pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extras: run `make setup`")


@pytest.fixture
def lab(tmp_path):
    """JupyterLab on 127.0.0.1 (random port, token, offline), serving ``tmp_path``; stopped afterwards."""
    port, token = _free_port(), secrets.token_hex(16)
    home = tmp_path / "jupyter"
    settings = home / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false",
                                                                           "checkForUpdates": False}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"), "JUPYTER_CONFIG_DIR": str(home / "config"),
           "IPYTHONDIR": str(home / "ipython"), "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    log_path = tmp_path / "jupyterlab.log"
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}",
           "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           "--LabApp.extension_manager=readonly", "--ServerApp.terminals_enabled=False"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")  # CI and containers run as root
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer within 90 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"base": base, "token": token, "root": tmp_path, "log": log_path}
    finally:
        proc.terminate()  # the server shuts its kernels down on SIGTERM
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.parametrize("preset_name", ["toy", "anime", "realistic"])
def test_the_forms_initial_values_give_back_the_preset(preset_name):
    """The form starts filled with every preset value (text included: mixed_precision "no" stays "no")."""
    from lora_nb.config import preset
    from lora_nb.planning import build_config, widget_values

    cfg = preset(preset_name)
    values = {"preset": preset_name, **widget_values(cfg)}
    built = build_config(preset_name, values, cfg.dataset.dir, cfg.save.output_dir)
    assert built.to_dict() == cfg.to_dict()


@pytest.mark.slow
def test_notebook_04_widgets_update_the_printed_steps_in_chromium(chromium, playwright_api, lab, tmp_path):
    sync_api = playwright_api
    expect = sync_api.expect
    name = _write_notebook(lab["root"])
    first = _expected_total_line("toy")
    fewer_repeats = _expected_total_line("toy", repeats=4)
    realistic = _expected_total_line("realistic")
    worked_example = _expected_total_line("realistic", repeats=10)
    assert len({first, fewer_repeats, realistic, worked_example}) == 4
    assert worked_example == "total steps: 480 × 10 epochs = 4800"  # the 48 bundled pictures × 10 repeats × 10 epochs

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=chromium, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000})
        page = browser.new_page()
        page.set_default_timeout(WAIT_MS)
        try:
            page.goto(f"{lab['base']}/lab/tree/{name}?token={lab['token']}", wait_until="domcontentloaded")
            # The notebook is open and its kernel connected before anything runs.
            page.locator(".jp-Notebook .jp-Cell").first.wait_for()
            expect(page.locator(".jp-NotebookPanel-toolbar .jp-KernelName")).to_contain_text("Python 3")
            # Run → Run All Cells, as a person would; again if no cell started (a click that lands before the
            # kernel has finished connecting runs nothing, and a person would click again too).
            started = page.locator(".jp-InputPrompt", has_text=re.compile(r"\[(\*|\d+)\]"))
            for attempt in range(3):
                page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
                page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
                try:
                    started.first.wait_for(timeout=WAIT_MS // 2)
                    break
                except sync_api.TimeoutError:
                    if attempt == 2:
                        raise

            form = page.locator(".jp-OutputArea .widget-vbox", has=page.locator("b", has_text="Training settings"))
            output = form.locator(".widget-output")
            expect(output).to_contain_text(first, timeout=3 * WAIT_MS)  # kernel start + imports + meta SD1.5
            # the rest of Run All finished (its last cell writes config.yaml) before a field is changed, as a
            # person reading down the page would: a change made while cells still run waits for them
            written = f"wrote {lab['root'] / 'ws' / 'config.yaml'}"
            expect(page.locator(".jp-Notebook")).to_contain_text(written, timeout=3 * WAIT_MS)

            def field(label: str, kind: str):
                return form.locator(f".widget-inline-hbox:has(> label:text-is('{label}')) {kind}")

            repeats = field("repeats", "input")
            expect(repeats).to_have_value("10")
            repeats.fill("4")
            repeats.press("Enter")  # IntText syncs to the kernel on Enter / blur
            expect(output).to_contain_text(fewer_repeats)

            field("preset", "select").select_option("realistic")
            expect(output).to_contain_text(realistic)  # every field refilled from the preset
            expect(repeats).to_have_value("15")
            expect(field("batch size", "input")).to_have_value("1")

            repeats.fill("10")
            repeats.press("Tab")
            expect(output).to_contain_text(worked_example)
            assert output.inner_text().count("total steps:") == 1  # each change replaces the report
            form.screenshot(path=str(tmp_path / "form.png"))  # what a person sees, kept for a look
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            print(f"screenshot: {tmp_path / 'failure.png'}; server log: {lab['log']}")
            raise
        finally:
            browser.close()
