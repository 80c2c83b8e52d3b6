"""The quality benchmark script runs end to end on the real data (tiny settings: its numbers mean nothing).

The full run is a README command, not a test; this checks that the script and the library functions it
calls still fit together, and that its results file says what the README's table is built from.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.shared_data


@pytest.mark.slow
def test_the_quality_benchmark_runs_on_the_real_data(shared_data, shared_weights, tmp_path):
    env = {**os.environ, "XRAYLIB_SHARED_DATA": str(shared_data), "XRAYLIB_SHARED_WEIGHTS": str(shared_weights)}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "quality.py"), "--smoke", "--work", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((tmp_path / "smoke" / "quality_smoke.json").read_text())
    markdown = (tmp_path / "smoke" / "quality_smoke.md").read_text()
    assert not (REPO / "benchmarks" / "results" / "quality_smoke.json").exists()  # a smoke run never lands in results/

    # Every protocol and pipeline has its metrics with intervals and n.
    assert set(results["pipelines"]) == {"seeds-vgg16", "seeds-mobilenet", "xraylib"}
    for key in ("a", "b", "c"):
        for name, row in results["protocols"][key].items():
            assert row["n_images"] > 0 and row["n_patients"] > 0 and row["n_positive"] > 0 and row["n_negative"] > 0
            assert len(row["roc_auc_ci"]) == 2 and 0 <= row["accuracy"] <= 1
    assert "xraylib" not in results["protocols"]["a"]  # the recommended pipeline is not run under the seeds' protocol
    # The image-level split of (a) lets patients into both train and test; the patient-level ones do not.
    assert results["protocols"]["a"]["seeds-vgg16"]["leaks"]["test_patients_also_in_training"] > 0
    # Leave one source out: Kaggle, NIH and NLM Shenzhen are left out (normals only); ieee8023, the only COVID-19
    # source, cannot be.
    for loso in results["loso"].values():
        assert {row["source"] for row in loso["table"]} == {"kaggle", "nih", "nlm-shenzhen"}
        assert "ieee8023" in loso["skipped"]
    # The audit flags the pediatric normals and the single-source classes of the seeds' design.
    checks_a = {f["check"] for f in results["audit"]["a"]}
    assert {"single_source_class", "age_no_overlap", "source_predicts_label"} <= checks_a
    assert "age_no_overlap" not in {f["check"] for f in results["audit"]["c"]}  # adult normals: ages overlap
    # The shortcut tests ran for every pipeline.
    assert set(results["shortcuts"]["source_prediction"]) == set(results["pipelines"])
    assert set(results["shortcuts"]["lungs_hidden"]) == {"a", "b", "c"}
    assert "## Results" in markdown and "| (d) leave out kaggle |" in markdown and results["disclaimer"] in markdown
    # Out of site: every configuration over two seeds, both threshold rules, the full recipe on one fold, decisions.
    oos = results["out_of_site"]
    # (The smoke run measures one preprocessing option and no ensemble; the full run all three and an ensemble of 5.)
    assert set(oos["configs"]) == {"seeds-mobilenet", "recommended", "recommended + body crop"}
    assert oos["configs"]["recommended"]["heads"] == 1
    for name, config in oos["configs"].items():
        assert [s["seed"] for s in config["seeds"]] == [0, 1]
        for key in ("roc_auc", "specificity_validation", "specificity_out_of_site", "sensitivity"):
            assert config["summary"][key]["median"] is not None, (name, key)
        assert config["summary"]["internal_auc"]["median"] is not None
        assert len(config["seeds"][0]["folds"]) >= 2
    assert oos["configs"]["recommended"]["threshold_on"] == "out_of_site"
    assert oos["configs"]["seeds-mobilenet"]["threshold_on"] == "validation"
    assert oos["full_recipe_vs_head"]["fine_tune_epochs"] == 1
    assert set(oos["decisions"]) == {"body crop"}
    assert "## What to expect in a hospital the pipeline never saw" in markdown and "| recommended |" in markdown


@pytest.mark.slow
def test_the_speed_benchmark_runs_and_its_three_training_paths_agree(shared_data, shared_weights, tmp_path):
    """The speed script end to end (MobileNet only, tiny settings). Its timings mean nothing here; what must hold
    at any size is that the seeds' loop, xraylib's cached features and xraylib's streamed images, started from
    the same weights and drawing the same batches and dropout masks, train to the same test AUC."""
    env = {**os.environ, "XRAYLIB_SHARED_DATA": str(shared_data), "XRAYLIB_SHARED_WEIGHTS": str(shared_weights)}
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "speed.py"), "--smoke", "--backbones", "mobilenet",
                           "--only", "training", "preprocessing", "gpu", "--work", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((out / "speed.json").read_text())
    (training,) = results["training"]
    for epochs, row in training["median"].items():
        if not str(epochs).isdigit():
            continue
        assert row["speedup"] > 0
        assert abs(row["xraylib_test_auc"] - row["seeds_loop_test_auc"]) <= 0.01, (epochs, row)
        assert abs(row["xraylib_test_auc"] - row["streaming_test_auc"]) <= 0.01, (epochs, row)
    kinds = [row["kind"] for row in results["preprocessing"]]
    assert kinds[0].startswith("JPEG/PNG") and any("RSNA" in k for k in kinds) and any("uncompressed" in k for k in kinds)
    assert all(rate > 0 for row in results["preprocessing"] for rate in row["images_per_second"].values())
    # The GPU rows' code runs on the CPU in a smoke run (on a GPU machine it measures the GPU).
    rows = results["gpu"]["rows"]
    assert rows["float32"]["train_images_per_second"] > 0 and rows["mixed_float16"]["inference_images_per_second"] > 0
    assert rows["mixed_float16"]["uses_mixed_precision"] and not rows["float32"]["uses_mixed_precision"]
    markdown = (out / "speed.md").read_text()
    assert "## Training" in markdown and "| training images/s (VGG16, 224" in markdown
