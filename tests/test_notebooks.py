"""Run the numbered notebooks top to bottom under nbval, with tiny parameters.

Each notebook's tagged ``parameters`` cell is followed by an injected cell that overrides
settings (the papermill convention), so the same notebooks users run in Colab run here on
the built-in sample data. nbval (``--nbval-lax``) executes every cell and compares the
outputs of the cells marked ``# NBVAL_CHECK_OUTPUT`` with the outputs stored in the notebook.
The notebooks run in order and share one output folder, as a user's session would.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))

#: Overrides per notebook (merged over COMMON); the defaults are what a Colab user runs.
COMMON = {"DATA": "sample"}
PARAMETERS = {
    "01_dataset_creation": {"SAMPLE_PATIENTS": 30, "SEED": 0, "WORKERS": 4},
    "02_preprocessing": {"IMAGE_SIZE": 64, "WORKERS": 2},
    "03_training": {"RUN_NAME": "nbtest", "BACKBONE": "small_cnn", "WEIGHTS": None, "EPOCHS": 2},
    "04_evaluation": {"RUN_NAME": "nbtest", "N_BOOT": 100},
    "05_check_your_own_images": {"RUN_NAME": "nbtest", "MAX_IMAGES": 4, "SITE": "sample-site", "SITE_NORMALS": "sample"},
}


def inject_parameters(notebook: nbformat.NotebookNode, values: dict) -> nbformat.NotebookNode:
    """Insert a cell tagged ``injected-parameters`` after the ``parameters`` cell (papermill's convention)."""
    for index, cell in enumerate(notebook.cells):
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            break
    else:
        raise AssertionError("notebook has no cell tagged 'parameters'")
    source = "# Parameters injected by tests/test_notebooks.py\n" + "\n".join(f"{k} = {v!r}" for k, v in values.items())
    injected = nbformat.v4.new_code_cell(source)
    injected.metadata["tags"] = ["injected-parameters"]
    notebook.cells.insert(index + 1, injected)
    return notebook


@pytest.fixture(scope="module")
def notebook_outputs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("notebook_outputs")


def test_every_notebook_has_parameters_and_setup_cells():
    assert [p.name[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(1, len(NOTEBOOKS) + 1)]
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
        assert any("google.colab" in c.source and "drive.mount" in c.source for c in notebook.cells[:3]), path.name
        assert PARAMETERS.get(path.stem) is not None, f"{path.name}: add its test parameters to PARAMETERS"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_under_nbval(path: Path, notebook_outputs: Path, tmp_path: Path):
    notebook = nbformat.read(path, as_version=4)
    values = {**COMMON, "OUTPUT_DIR": str(notebook_outputs), **PARAMETERS[path.stem]}
    inject_parameters(notebook, values)
    # nbval runs the kernel in the copy's folder; every path the tests need is injected as absolute.
    target = tmp_path / path.name
    nbformat.write(notebook, target)
    env = {**os.environ, "MPLBACKEND": "module://matplotlib_inline.backend_inline", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", "-p", "no:cacheprovider", "-q", "--rootdir", str(tmp_path),
         "--nbval-cell-timeout", "900", str(target)],
        capture_output=True, text=True, cwd=NOTEBOOK_DIR, env=env, timeout=1800,
    )
    assert result.returncode == 0, f"{path.name} failed under nbval:\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
    if values.get("SITE"):  # notebook 05 calibrated the model for a site: its profile is in model.json
        import json

        metadata = json.loads((notebook_outputs / "models" / values["RUN_NAME"] / "model.json").read_text())
        assert values["SITE"] in metadata.get("site_profiles", {}), sorted(metadata)


def test_notebook_01_on_the_real_data_matches_the_documented_counts(shared_data, tmp_path):
    """Notebook 01 pointed at ../shared/data (all views) builds the manifest whose counts ../shared/README.md gives."""
    notebook = nbformat.read(NOTEBOOK_DIR / "01_dataset_creation.ipynb", as_version=4)
    out = tmp_path / "real"
    inject_parameters(notebook, {"DATA": str(shared_data), "OUTPUT_DIR": str(out), "VIEWS": None, "WORKERS": 4})
    target = tmp_path / "01_real.ipynb"
    nbformat.write(notebook, target)
    result = subprocess.run([sys.executable, "-m", "pytest", "--nbval-lax", "-p", "no:cacheprovider", "-q",
                             "--rootdir", str(tmp_path), str(target)], capture_output=True, text=True, cwd=NOTEBOOK_DIR,
                            timeout=900)
    # The checked counts cell holds the sample data's numbers, so it differs here: only execution errors count.
    assert "Traceback" not in result.stdout and (out / "manifest.csv").is_file(), result.stdout[-4000:]
    import pandas as pd

    manifest = pd.read_csv(out / "manifest.csv", dtype={"patient_id": str})
    covid = manifest[manifest["label"] == "covid"]
    assert (len(covid), covid["patient_id"].nunique()) == (451, 258)
    assert covid["view"].value_counts().to_dict() == {"PA": 216, "AP Supine": 120, "AP": 91, "L": 24}
    normal = manifest[manifest["label"] == "normal"]
    assert normal.groupby("source").size().to_dict() == {"ieee8023": 19, "kaggle": 220, "nih": 110, "nlm-shenzhen": 326}
    assert manifest["site"].notna().all() and (manifest.loc[manifest["source"] == "nlm-shenzhen", "site"] == "nlm-shenzhen").all()
