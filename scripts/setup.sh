#!/usr/bin/env bash
# Create .venv and install lora-nb with its pinned dependencies (CPU torch first).
# Idempotent: a second run only reinstalls when pyproject.toml or constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# The browser test (tests/test_browser_widgets.py) drives JupyterLab in Debian's chromium
# through Playwright (no browser download). Install it once when apt is there; otherwise say so.
CHROMIUM=${LORA_NB_CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$CHROMIUM" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
      if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi
    fi
    if [ "$SUDO" = none ]; then
      echo "== note: chromium is missing and installing it needs root: sudo apt-get install chromium (the browser test is skipped until then)"
    else
      echo "== installing chromium (Debian package) for the browser test"
      if ! { $SUDO apt-get update -qq >/dev/null && \
             $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; then
        echo "== note: apt-get install chromium failed; the browser test will report it"
      fi
    fi
  else
    echo "== note: no apt-get here: install Chromium yourself and set LORA_NB_CHROMIUM to its path to run the browser test (skipped until then)"
  fi
fi
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.lora-nb-installed"
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "== $VENV is up to date"
  exit 0
fi
echo "== installing torch (CPU build) first"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$(grep '^torch==' constraints.txt)"
echo "== installing lora-nb and its dependencies"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
"$VENV/bin/python" -m ipykernel install --sys-prefix --name python3 >/dev/null
echo "$want" > "$stamp"
echo "== ready: $VENV"
