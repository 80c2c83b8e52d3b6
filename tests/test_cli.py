"""``python -m xraylib`` run as a user runs it: a subprocess, a fresh output folder, small sizes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path, check: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "xraylib", *map(str, args)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def assert_user_error(result: subprocess.CompletedProcess, *words: str) -> str:
    """Exit status 2 and one ``error:`` line naming the problem, no traceback."""
    assert result.returncode == 2, f"exit {result.returncode}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "command, options",
    [
        ("sample-data", ["--n", "--seed", "--image-size", "--shortcut-marker"]),
        ("manifest", ["--paths", "--output-dir", "--data-root", "--sample", "--task", "--views", "--workers"]),
        ("preprocess", ["--output-dir", "--image-size", "--resize", "--fractions", "--seed", "--external-test-source"]),
        ("demo", ["--output-dir", "--n", "--task", "--image-size"]),
    ],
)
def test_help_of_each_command(tmp_path, command, options):
    result = run_cli(command, "--help", cwd=tmp_path, check=True)
    for option in options:
        assert option in result.stdout, f"{command} --help does not mention {option}"
    assert list(tmp_path.iterdir()) == []  # --help writes nothing


def test_no_command_is_a_usage_error(tmp_path):
    result = run_cli(cwd=tmp_path)
    assert result.returncode == 2 and "usage:" in result.stderr and "Traceback" not in result.stderr


def test_missing_paths_yaml(tmp_path):
    assert_user_error(run_cli("manifest", "--paths", "missing.yaml", "--output-dir", "X", cwd=tmp_path),
                      "missing.yaml", "not found")
    assert not (tmp_path / "X").exists()


def test_source_folder_in_yaml_missing(tmp_path):
    (tmp_path / "paths.yaml").write_text("covid_chestxray_dataset: datasets/covid\noutput_dir: out\n")
    assert_user_error(run_cli("manifest", "--paths", "paths.yaml", cwd=tmp_path),
                      "covid_chestxray_dataset", str(tmp_path / "datasets" / "covid"))


def test_data_root_with_a_metadata_csv_missing_a_column(tmp_path):
    source = tmp_path / "data" / "covid-chestxray-dataset"
    (source / "images").mkdir(parents=True)
    (source / "metadata.csv").write_text("patientid,sex,age,view,modality,folder,filename\n"
                                         "1,M,65,PA,X-ray,images,a.png\n")
    line = assert_user_error(run_cli("manifest", "--data-root", "data", "--output-dir", "out", "--quiet", cwd=tmp_path),
                             "finding", "metadata.csv")
    assert str(source / "metadata.csv") in line


def test_manifest_without_sources(tmp_path):
    assert_user_error(run_cli("manifest", "--output-dir", "out", cwd=tmp_path), "--paths", "--sample")


def test_preprocess_before_manifest(tmp_path):
    assert_user_error(run_cli("preprocess", "--output-dir", "out", cwd=tmp_path), "manifest")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """sample-data, then manifest --sample, then preprocess, as in the README; the output folder."""
    work = tmp_path_factory.mktemp("cli")
    run_cli("sample-data", "standalone", "--n", "8", "--image-size", "64", cwd=work, check=True)
    run_cli("manifest", "--sample", "--n", "8", "--output-dir", "out", "--quiet", cwd=work, check=True)
    run_cli("preprocess", "--output-dir", "out", "--image-size", "64", "--workers", "1", "--quiet", cwd=work, check=True)
    return work


def test_sample_data_writes_the_three_source_layouts(pipeline):
    root = pipeline / "standalone"
    assert (root / "covid-chestxray-dataset" / "metadata.csv").is_file()
    assert (root / "rsna-pneumonia" / "stage_2_train_labels.csv").is_file()
    assert (root / "chest-xray-pneumonia").is_dir()
    assert any(root.rglob("*.dcm"))
    assert any(root.rglob("*.jp*g")) or any(root.rglob("*.png"))


def test_manifest_sample_writes_manifest_and_report(pipeline):
    out = (pipeline / "out").resolve()
    frame = pd.read_csv(out / "manifest.csv")
    assert len(frame) > 0
    assert {"path", "label", "source", "patient_id", "sha1"} <= set(frame.columns)
    assert set(frame["label"]) <= {"normal", "covid"}  # the default task
    assert all(Path(p).is_file() and Path(p).is_relative_to(out / "sample_data") for p in frame["path"])
    report = json.loads((out / "manifest_report.json").read_text())
    assert report["task"] == "covid_vs_normal"


def test_preprocess_writes_arrays_for_every_manifest_image(pipeline):
    folder = pipeline / "out" / "preprocessed"
    meta = json.loads((folder / "preprocess.json").read_text())
    assert meta["complete"] is True and meta["settings"]["image_size"] == 64
    kept = pd.read_csv(folder / "manifest.csv")
    manifest = pd.read_csv(pipeline / "out" / "manifest.csv")
    assert len(kept) + meta["report"]["skipped"] == len(manifest)
    for split, rows in kept.groupby("split"):
        images_uint8 = np.load(folder / f"{split}_images.npy")
        labels = np.load(folder / f"{split}_labels.npy")
        assert images_uint8.shape == (len(rows), 64, 64) and images_uint8.dtype == np.uint8
        assert len(labels) == len(rows)
    # split by patient: no patient in two splits
    assert kept.groupby("patient_id")["split"].nunique().max() == 1


def test_preprocess_rerun_uses_the_cache(pipeline):
    result = run_cli("preprocess", "--output-dir", "out", "--image-size", "64", "--workers", "1", "--quiet",
                     cwd=pipeline, check=True)
    assert "0 new" in result.stdout
