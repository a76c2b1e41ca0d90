"""Run the course's notebooks headlessly through papermill, into one workspace.

Each notebook gets only the parameters it declares; executed copies are
written to ``<workspace>/executed/`` next to the results.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from lora_nb import LoraNbError
from lora_nb.notebook import repo_root
from lora_nb.workspace import Workspace, open_workspace

NOTEBOOK_RE = re.compile(r"^(\d\d[a-z]?)_[\w-]+\.ipynb$")
# Each notebook's kernel starts on this machine, talking to papermill over localhost: ipykernel's warning that
# the connection is unencrypted came once per notebook, and nothing in it is for a learner to act on.
KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=ERROR"]


@dataclass
class NotebookRun:
    name: str
    seconds: float
    ok: bool
    output: Path
    error: str = ""


@dataclass
class CourseSummary:
    workspace: Path
    runs: list[NotebookRun] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.runs) and all(r.ok for r in self.runs)

    def describe(self) -> str:
        ws = Workspace(self.workspace)
        lines = [f"Course workspace: {ws.root}"]
        for r in self.runs:
            lines.append(f"  {'ok ' if r.ok else 'FAILED'} {r.name:<18} {r.seconds:6.1f} s  {r.output}")
            if r.error:
                lines.append(f"         {r.error}")
        finds = {
            "LoRA files": sorted(str(p) for p in ws.lora.glob("*.safetensors")),
            "sample grids": sorted(str(p) for p in ws.figures.glob("*grid*.png")),
            "diagnosis": [str(ws.diagnosis)] if ws.diagnosis.exists() else [],
        }
        for label, paths in finds.items():
            if paths:
                lines.append(f"{label}: " + ", ".join(paths[:6]) + (" …" if len(paths) > 6 else ""))
        return "\n".join(lines)


def list_notebooks(folder: Path | None = None) -> list[Path]:
    folder = folder or (repo_root() / "notebooks")
    return sorted(p for p in folder.glob("*.ipynb") if NOTEBOOK_RE.match(p.name))


def notebook_parameters(path: Path) -> dict:
    """The parameters a notebook declares, as papermill reads them (name → info)."""
    import papermill

    return papermill.inspect_notebook(str(path))


def run_course(workspace: str | Path = "runs/course", params: dict | None = None, quick: bool = False,
               params_file: str | None = None, only: list[str] | None = None, notebooks_dir: Path | None = None,
               log=print) -> CourseSummary:
    """Run 01 → 06 in order; stop at the first failing notebook (the next ones need its results)."""
    import papermill
    import yaml

    params = dict(params or {})
    if params_file:
        try:
            loaded = yaml.safe_load(Path(params_file).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise LoraNbError(f"Cannot read the parameters file {params_file}: {exc}") from None
        if not isinstance(loaded, dict):
            raise LoraNbError(f"{params_file} must hold a mapping of notebook parameters (name: value).")
        params = {**loaded, **params}
    ws = open_workspace(workspace, base=Path.cwd())
    ws.executed.mkdir(parents=True, exist_ok=True)
    notebooks = list_notebooks(notebooks_dir)
    if only:
        notebooks = [nb for nb in notebooks if any(nb.name.startswith(o) for o in only)]
    if not notebooks:
        raise LoraNbError("No notebooks to run (looked for notebooks/NN_name.ipynb).")
    declared_anywhere = set()
    summary = CourseSummary(ws.root)
    for nb in notebooks:
        declared = notebook_parameters(nb)
        declared_anywhere |= set(declared)
        mine = {"workspace": str(ws.root), "interactive": False}
        if quick:
            mine["quick"] = True
        mine.update(params)
        mine = {k: v for k, v in mine.items() if k in declared}
        out = ws.executed / nb.name
        log(f"→ {nb.stem} …", flush=True) if log is print else log(f"→ {nb.stem} …")
        t0 = time.time()
        try:
            papermill.execute_notebook(str(nb), str(out), parameters=mine, kernel_name="python3",
                                       cwd=str(nb.parent), progress_bar=False, log_output=False,
                                       extra_arguments=KERNEL_ARGUMENTS)
            run = NotebookRun(nb.stem, time.time() - t0, True, out)
        except papermill.PapermillExecutionError as exc:
            run = NotebookRun(nb.stem, time.time() - t0, False, out, f"{exc.ename}: {exc.evalue}"[:500])
        summary.runs.append(run)
        log(f"  {'done' if run.ok else 'FAILED'} in {run.seconds:.1f} s → {out}")
        if not run.ok:
            break
    unknown = set(params) - declared_anywhere
    if unknown:
        log(f"note: no notebook has the parameter(s) {', '.join(sorted(unknown))}")
    return summary
