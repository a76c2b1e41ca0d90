"""The package's structure, read from its code: no import cycles, every module on docs/architecture.md,
no long functions without a reason, every setting read by some code."""

import ast
import dataclasses
import re
from pathlib import Path

from lora_nb import config

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lora_nb"


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(p.relative_to(PACKAGE).with_suffix("").parts)
        out["" if name == "__init__" else name.removesuffix(".__init__")] = p
    return out


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lora_nb"):
            if node.module == "lora_nb":
                found |= {a.name for a in node.names if a.name != "LoraNbError"}
            else:
                found.add(node.module.removeprefix("lora_nb."))
    return found


def test_the_import_graph_has_no_cycle():
    mods = _modules()
    graph = {m: {d for d in _imports(p) if d in mods and d != m} for m, p in mods.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in sorted(graph[m]):
            visit(d, path + [m])
        state[m] = 2

    for m in graph:
        visit(m, [])


def test_every_module_is_on_the_architecture_page():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = [m for m in _modules() if m and m != "toy" and f"`{m}`" not in text]
    assert not missing, f"docs/architecture.md does not mention: {missing}"


def test_no_function_over_80_lines_without_a_reason_in_its_docstring():
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                doc = ast.get_docstring(node) or ""
                if length > 80 and "long because" not in doc:
                    long.append(f"{name}.{node.name} ({length} lines)")
    assert not long, long


def test_every_setting_is_read_by_code_outside_config():
    """A setting that no code reads claims what the code does not do."""
    code = " ".join(p.read_text(encoding="utf-8") for p in PACKAGE.rglob("*.py") if p.name != "config.py")
    sections = [f.type if isinstance(f.type, type) else getattr(config, f.type.split("|")[0].strip(), None)
                for f in dataclasses.fields(config.Config)]
    unread = []
    for section_cls in sections:
        for f in dataclasses.fields(section_cls):
            if not re.search(r"\." + re.escape(f.name) + r"\b", code):
                unread.append(f"{section_cls.__name__}.{f.name}")
    assert not unread, unread
