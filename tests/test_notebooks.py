"""The numbered notebooks, run top to bottom as a Colab user runs them, under nbval.

Each notebook runs in its own fresh runtime (a new virtual environment without xraylib, a stand-in for
``google.colab`` and a temporary Drive holding a copy of this repository: see ``tests/notebook_runner.py``). Its setup
cell installs xraylib from that copy, its tagged ``parameters`` cell is followed by an injected cell with small
settings (the papermill convention), and the notebooks share nothing but Drive: 02 finds 01's manifest there, and so
on. nbval (``--nbval-lax``) executes every cell and compares the outputs of the cells marked ``# NBVAL_CHECK_OUTPUT``
with the outputs stored in the committed notebook.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from notebook_runner import CHECK_MARK, NOTEBOOK_DIR, NOTEBOOKS, PARAMETERS, ROOT, ColabStandIn, inject_parameters

#: Set to "0" where the stored outputs are not compared (the second test environment, with Colab's Keras: see Makefile).
COMPARE_OUTPUTS = os.environ.get("XRAYLIB_COMPARE_NOTEBOOK_OUTPUTS", "1") != "0"


def _setup_cell(notebook: nbformat.NotebookNode) -> str:
    return next(c.source for c in notebook.cells[:3] if c.cell_type == "code" and "drive.mount" in c.source)


def test_every_notebook_has_parameters_and_the_same_setup_cell():
    assert [p.name[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(1, len(NOTEBOOKS) + 1)]
    setups = set()
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
        assert PARAMETERS.get(path.stem) is not None, f"{path.name}: add its test parameters to PARAMETERS"
        setups.add(_setup_cell(notebook))
    assert len(setups) == 1, "the notebooks' setup cells differ: keep them identical"
    setup = setups.pop()
    ast.parse(setup)  # plain Python: it runs before anything is installed
    # Never PyPI's xraylib (another project): pip installs only XRAYLIB_SOURCE, never the bare name.
    assert "pip install xraylib" not in setup and '"install", "-q", XRAYLIB_SOURCE]' in setup and '"xraylib"]' not in setup.replace('sys.modules["xraylib"]', "")
    assert "xraylib-cxr" in setup and "raise RuntimeError" in setup


def test_checked_cells_hold_stored_outputs():
    """A cell nbval checks without a stored output compares nothing: that check could not fail."""
    checked = 0
    for path in NOTEBOOKS:
        for index, cell in enumerate(nbformat.read(path, as_version=4).cells):
            if cell.cell_type == "code" and CHECK_MARK in cell.source:
                checked += 1
                text = "".join(o.get("text", "") for o in cell.outputs) + "".join(
                    "".join(o.get("data", {}).get("text/plain", "")) for o in cell.outputs)
                assert text.strip(), f"{path.name} cell {index} is checked by nbval but has no stored output"
    assert checked >= 2


def test_notebooks_on_github_show_their_results():
    """The committed notebooks are executed (``make notebooks``): every code cell ran, and there are figures."""
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        code = [c for c in notebook.cells if c.cell_type == "code"]
        assert all(c.execution_count for c in code), f"{path.name}: not executed; run `make notebooks`"
        figures = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
        assert figures >= (0 if path.stem.startswith("02") else 1), f"{path.name}: no figure stored"
        assert "Traceback" not in json.dumps([c.outputs for c in code]), f"{path.name}: a stored output is an error"


@pytest.fixture(scope="module")
def colab(tmp_path_factory) -> ColabStandIn:
    return ColabStandIn(tmp_path_factory.mktemp("colab"))


@pytest.mark.keras_versions  # also run with Colab's TensorFlow/Keras (make test-colab), outputs not compared there
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_as_in_colab(path: Path, colab: ColabStandIn):
    result = colab.run_nbval(path, {"DATA": "sample", **PARAMETERS[path.stem]}, compare_outputs=COMPARE_OUTPUTS)
    assert result.returncode == 0, f"{path.name} failed under nbval:\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
    runtime = colab.root / f"runtime{colab.runtimes}"
    assert list(runtime.glob("lib/python*/site-packages/xraylib/__init__.py")), "the setup cell did not install xraylib"
    outputs = colab.my_drive / "xraylib_outputs" / "sample"
    expected = {"01": "manifest.csv", "02": "preprocessed", "03": "models/nbtest/model.json",
                "04": "reports/nbtest/evaluation.md", "05": "sample_site"}[path.stem[:2]]
    assert (outputs / expected).exists(), f"{path.name} wrote nothing to Drive at {outputs / expected}"
    if path.stem.startswith("05"):  # notebook 05 calibrated the model for a site: its profile is in model.json
        metadata = json.loads((outputs / "models" / "nbtest" / "model.json").read_text())
        assert "sample-site" in metadata.get("site_profiles", {}), sorted(metadata)


def test_the_setup_cell_stops_with_one_clear_message_when_xraylib_is_not_on_drive(tmp_path):
    """No copy of xraylib on Drive: the cell fails itself, saying what to do, never with a later ModuleNotFoundError."""
    colab = ColabStandIn(tmp_path)
    import shutil

    shutil.rmtree(colab.clone)
    python = colab.new_runtime()
    setup = _setup_cell(nbformat.read(NOTEBOOKS[0], as_version=4))
    env = colab.environment()
    result = subprocess.run([str(python), "-c", setup], capture_output=True, text=True, cwd=colab.content, env=env)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: xraylib is not installed. In Colab: put your copy of xraylib in My Drive"), last
    assert "XRAYLIB_SOURCE" in last


def test_notebook_01_on_the_real_data_matches_the_documented_counts(shared_data, tmp_path):
    """Notebook 01 pointed at ../shared/data (all views) builds the manifest whose counts ../shared/README.md gives."""
    notebook = nbformat.read(NOTEBOOK_DIR / "01_dataset_creation.ipynb", as_version=4)  # locally, in this kernel
    out = tmp_path / "real"
    inject_parameters(notebook, {"DATA": str(shared_data), "OUTPUT_DIR": str(out), "VIEWS": None, "WORKERS": 4})
    for cell in notebook.cells:  # the checked cells hold the sample data's numbers: not compared on the real data
        cell.source = cell.source.replace(CHECK_MARK, "# (stored output not compared here)")
    target = tmp_path / "01_real.ipynb"
    nbformat.write(notebook, target)
    result = subprocess.run([sys.executable, "-m", "pytest", "--nbval-lax", "-p", "no:cacheprovider", "-q",
                             "--rootdir", str(tmp_path), str(target)], capture_output=True, text=True, cwd=NOTEBOOK_DIR,
                            timeout=900)
    assert result.returncode == 0 and (out / "manifest.csv").is_file(), result.stdout[-4000:]
    import pandas as pd

    manifest = pd.read_csv(out / "manifest.csv", dtype={"patient_id": str})
    covid = manifest[manifest["label"] == "covid"]
    assert (len(covid), covid["patient_id"].nunique()) == (451, 258)
    assert covid["view"].value_counts().to_dict() == {"PA": 216, "AP Supine": 120, "AP": 91, "L": 24}
    normal = manifest[manifest["label"] == "normal"]
    assert normal.groupby("source").size().to_dict() == {"ieee8023": 19, "kaggle": 220, "nih": 110, "nlm-shenzhen": 326}
    assert manifest["site"].notna().all() and (manifest.loc[manifest["source"] == "nlm-shenzhen", "site"] == "nlm-shenzhen").all()


def test_the_setup_cell_installs_a_wheel_uploaded_to_my_drive(tmp_path):
    """The README's other way onto Drive: `make wheel`, upload the wheel to My Drive; the setup cell finds it."""
    import shutil

    colab = ColabStandIn(tmp_path)
    shutil.rmtree(colab.clone)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "--wheel-dir", str(colab.my_drive), str(ROOT)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    assert [p.name for p in colab.my_drive.glob("*.whl")] == ["xraylib_cxr-0.1.0-py3-none-any.whl"]
    python = colab.new_runtime()
    setup = _setup_cell(nbformat.read(NOTEBOOKS[0], as_version=4))
    result = subprocess.run([str(python), "-c", setup], capture_output=True, text=True, cwd=colab.content,
                            env=colab.environment())
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "installing xraylib from " + str(colab.my_drive / "xraylib_cxr-0.1.0-py3-none-any.whl") in result.stdout
    check = subprocess.run([str(python), "-c", "import xraylib; print(xraylib.DISTRIBUTION, xraylib.__file__)"],
                           capture_output=True, text=True, cwd=colab.content, env=colab.environment())
    assert check.stdout.startswith("xraylib-cxr " + str(python.parents[1])), check.stdout + check.stderr[-2000:]
