"""Re-record the outputs that nbval checks (cells marked ``# NBVAL_CHECK_OUTPUT``).

Runs each notebook with the test parameters of tests/test_notebooks.py (one shared temporary
output folder, in order), then writes back into notebooks/*.ipynb the outputs of the checked
cells only; all other outputs are cleared so the committed notebooks stay small.
Run after changing a notebook or anything that changes a checked output:

    .venv/bin/python tools/refresh_notebook_outputs.py [01 02 ...]
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_notebooks import COMMON, NOTEBOOKS, PARAMETERS, inject_parameters  # noqa: E402

MARK = "NBVAL_CHECK_OUTPUT"


def main(selected: list[str]) -> None:
    with tempfile.TemporaryDirectory() as out:
        for path in NOTEBOOKS:
            original = nbformat.read(path, as_version=4)
            run = inject_parameters(nbformat.read(path, as_version=4), {**COMMON, "OUTPUT_DIR": out, **PARAMETERS[path.stem]})
            with tempfile.TemporaryDirectory() as cwd:
                NotebookClient(run, timeout=1800, kernel_name="python3", resources={"metadata": {"path": cwd}}).execute()
            if selected and path.name[:2] not in selected:
                continue
            executed = [c for c in run.cells if "injected-parameters" not in c.metadata.get("tags", [])]
            for cell, done in zip(original.cells, executed):
                if cell.cell_type != "code":
                    continue
                checked = MARK in cell.source
                # nbval only compares cells that were run (have an execution count).
                cell.execution_count = done.execution_count if checked else None
                cell.outputs = [_clean(o) for o in done.outputs] if checked else []
            nbformat.write(original, path)
            print("refreshed", path.name)


def _clean(output):
    if "execution_count" in output:
        output["execution_count"] = None
    return output


if __name__ == "__main__":
    main(sys.argv[1:])
