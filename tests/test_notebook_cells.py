"""Notebook code cells are calls plus print/show: the logic lives in lora_nb, where it is tested.

After the setup cell every code cell is short; no cell defines a function, deletes a folder tree or
loops over the files of a folder.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import NOTEBOOKS, code_cells

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 15
FORBIDDEN = {
    "a function definition": re.compile(r"^\s*(async\s+)?def\s", re.MULTILINE),
    "rmtree": re.compile(r"rmtree"),
    "a loop over files": re.compile(r"\bfor\b[^\n]*\bin\b[^\n]*\.(glob|rglob|iterdir|listdir|scandir|walk)\("),
    "a listing of files": re.compile(r"\bos\.(listdir|scandir|walk)\("),
}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_code_cells_after_setup_are_short(path):
    sources, setup = code_cells(path)
    long = {i: len(s.splitlines()) for i, s in enumerate(sources) if i > setup and len(s.splitlines()) > MAX_LINES}
    assert not long, f"{path.name}: code cells longer than {MAX_LINES} lines (index: lines): {long}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_cell_defines_functions_deletes_trees_or_loops_over_files(path):
    sources, _ = code_cells(path)
    found = [(i, what) for i, s in enumerate(sources) for what, rx in FORBIDDEN.items() if rx.search(s)]
    assert not found, f"{path.name}: move this logic into lora_nb: {found}"


def test_the_checks_catch_what_they_forbid():
    assert FORBIDDEN["a function definition"].search("x = 1\ndef helper(a):\n    return a")
    assert FORBIDDEN["rmtree"].search("shutil.rmtree(folder)")
    assert FORBIDDEN["a loop over files"].search("for old in list(folder.iterdir()):")
    assert FORBIDDEN["a loop over files"].search("sizes = [p.stat() for p in sorted(ws.lora.glob('*.safetensors'))]")
    assert not FORBIDDEN["a loop over files"].search("for name, r in at.items():")
    assert not FORBIDDEN["a function definition"].search('print("undefined")')
