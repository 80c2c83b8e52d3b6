"""``python -m xraylib`` run as a user runs it: a subprocess, a fresh output folder, small sizes."""
from __future__ import annotations

import json
import os
import shutil
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


def _is_tensorflow_startup_log(line: str) -> bool:
    """TensorFlow's C++ start-up messages (absl logging, not ours, and not silenced by TF_CPP_MIN_LOG_LEVEL)."""
    return line.startswith(("WARNING: All log messages before absl", "I0000 ", "W0000 ", "E0000 ", "To enable the following"))


def assert_user_error(result: subprocess.CompletedProcess, *words: str) -> str:
    """Exit status 2 and one ``error:`` line naming the problem, no traceback."""
    assert result.returncode == 2, f"exit {result.returncode}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = [l for l in result.stderr.strip().splitlines() if not _is_tensorflow_startup_log(l)]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "command, options",
    [
        ("sample-data", ["--n", "--seed", "--image-size", "--shortcut-marker"]),
        ("manifest", ["--paths", "--output-dir", "--data-root", "--sample", "--task", "--views", "--workers"]),
        ("preprocess", ["--output-dir", "--image-size", "--resize", "--intensity", "--crop", "--fractions", "--seed",
                        "--external-test-source"]),
        ("demo", ["--output-dir", "--n", "--task", "--image-size", "--backbone", "--epochs"]),
        ("train", ["--output-dir", "--run", "--backbone", "--weights", "--alpha", "--epochs", "--batch-size",
                   "--learning-rate", "--fine-tune-epochs", "--fine-tune-learning-rate", "--no-augment", "--flip",
                   "--no-class-weights", "--seed", "--resume", "--no-resume", "--recipe", "--threshold-on", "--heads"]),
        ("evaluate", ["--output-dir", "--run", "--split", "--n-boot", "--out-of-site", "--no-out-of-site"]),
        ("predict", ["--model", "--csv", "--site"]),
        ("calibrate", ["--model", "--normals", "--positives", "--site", "--target-specificity", "--target-sensitivity",
                       "--data"]),
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


def test_preprocess_options_are_saved_with_the_cache(pipeline):
    """--intensity and --crop reach the settings saved in preprocess.json (and from there model.json)."""
    other = pipeline / "out_options"
    other.mkdir()
    shutil.copy(pipeline / "out" / "manifest.csv", other / "manifest.csv")  # its paths are absolute
    result = run_cli("preprocess", "--output-dir", "out_options", "--image-size", "32", "--intensity", "clahe",
                     "--crop", "body", "--workers", "1", "--quiet", cwd=pipeline, check=True)
    assert "crop=body, intensity=clahe" in result.stdout
    settings = json.loads((other / "preprocessed" / "preprocess.json").read_text())["settings"]
    assert (settings["intensity"], settings["crop"]) == ("clahe", "body")
    bad = run_cli("preprocess", "--output-dir", "out_options", "--intensity", "gamma", cwd=pipeline)
    assert bad.returncode == 2 and "--intensity" in bad.stderr and "'clahe'" in bad.stderr


# --------------------------------------------------------------------------------------------
# The model stages: train, evaluate, predict, and the demo that chains everything


@pytest.fixture(scope="module")
def trained(pipeline):
    """Train the small CNN for two epochs on the module's tiny preprocessed sample."""
    out = pipeline / "out"
    result = run_cli("train", "--output-dir", out, "--backbone", "small_cnn", "--weights", "none", "--epochs", "1",
                     "--quiet", "--run", "cli", cwd=out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    result = run_cli("train", "--output-dir", out, "--backbone", "small_cnn", "--weights", "none", "--epochs", "2",
                     "--quiet", "--run", "cli", "--resume", cwd=out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"out": out, "run": out / "models" / "cli", "resume_stdout": result.stdout}


def test_train_resume_continues_at_the_next_epoch(trained):
    assert "resumed after epoch 1" in trained["resume_stdout"]
    history = pd.read_csv(trained["run"] / "history.csv")
    assert history["epoch"].tolist() == [1, 2]
    for name in ("model.keras", "model.h5", "model.json"):
        assert (trained["run"] / name).is_file()
    metadata = json.loads((trained["run"] / "model.json").read_text())
    assert metadata["model"]["backbone"] == "small_cnn" and metadata["classes"] == ["normal", "covid"]


def test_train_with_other_settings_in_the_same_run_is_refused(trained):
    result = run_cli("train", "--output-dir", trained["out"], "--backbone", "small_cnn", "--weights", "none",
                     "--epochs", "2", "--learning-rate", "0.01", "--run", "cli", cwd=trained["out"])
    assert_user_error(result, "other data or settings", "--no-resume")


def test_train_with_missing_weights_file(trained):
    result = run_cli("train", "--output-dir", trained["out"], "--backbone", "vgg16", "--weights", "nowhere.h5",
                     "--epochs", "1", "--run", "bad", cwd=trained["out"])
    assert_user_error(result, "nowhere.h5", "not found")


def test_train_on_several_machines_without_tf_config_says_what_to_set(trained):
    result = run_cli("train", "--output-dir", trained["out"], "--backbone", "small_cnn", "--weights", "none",
                     "--epochs", "1", "--run", "cluster", "--strategy", "multi-worker", cwd=trained["out"])
    assert_user_error(result, "TF_CONFIG", "not set", '"cluster"')


def test_evaluate_writes_the_report(trained):
    result = run_cli("evaluate", "--output-dir", trained["out"], "--run", "cli", "--n-boot", "50", cwd=trained["out"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Research software, not a diagnostic device" in result.stdout
    report = trained["out"] / "reports" / "cli"
    data = json.loads((report / "evaluation.json").read_text())
    assert data["n_images"] > 0 and set(data["metrics"]) >= {"roc_auc", "sensitivity", "specificity"}
    for name in ("evaluation.md", "confusion_matrix.png", "roc.png", "test_predictions.csv"):
        assert (report / name).is_file(), name
    assert "test" in json.loads((trained["run"] / "model.json").read_text())["metrics"]


def test_the_recommended_recipe_chooses_its_threshold_out_of_site_and_evaluate_reports_the_estimate(pipeline):
    out = pipeline / "out"
    # The recipe's options, except those given on the command line (no ImageNet download here; a tiny run).
    result = run_cli("train", "--output-dir", out, "--recipe", "recommended", "--weights", "none", "--epochs", "2",
                     "--augment-views", "2", "--quiet", "--run", "recipe", cwd=out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    meta = json.loads((out / "models" / "recipe" / "model.json").read_text())
    assert (meta["model"]["backbone"], meta["model"]["alpha"], meta["model"]["weights"]) == ("mobilenet", 0.25, None)
    assert (meta["training"]["epochs"], meta["training"]["augment_views"]) == (2, 2)
    assert meta["training"]["threshold_on"] == "out_of_site" and meta["training"]["fine_tune_epochs"] == 0
    assert "chosen on the pooled out-of-site predictions" in result.stdout, result.stdout[-2000:]
    result = run_cli("evaluate", "--output-dir", out, "--run", "recipe", "--n-boot", "50", cwd=out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "What to expect in a hospital the model never saw" in result.stdout
    assert "internal test AUC" in (out / "reports" / "recipe" / "out_of_site.md").read_text()


def test_predict_a_folder_with_a_bad_file(trained, tmp_path):
    images = tmp_path / "mine"
    images.mkdir()
    sample = sorted((trained["out"] / "sample_data" / "chest-xray-pneumonia").rglob("*.jpeg"))[:2]
    for path in sample:
        (images / path.name).write_bytes(path.read_bytes())
    (images / "notes.png").write_text("not an image")
    result = run_cli("predict", "--model", trained["run"], images, "--csv", tmp_path / "out.csv", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "notes.png: skipped (a text file" in result.stdout
    frame = pd.read_csv(tmp_path / "out.csv")
    assert frame["ok"].tolist().count(True) == 2
    # A decision for each image the out-of-distribution guard judges (its reference: this tiny sample), a reason for
    # each it does not (the sample's viral pneumonia films are no class of this covid-vs-normal model).
    judged = frame["ok"] & frame["judgeable"].astype(bool)
    assert judged.any() and frame.loc[judged, "decision"].isin(["normal", "covid"]).all()
    assert frame.loc[frame["ok"] & ~judged, "ood_reason"].notna().all()


def _one_sample_image(trained) -> Path:
    return sorted((trained["out"] / "sample_data" / "chest-xray-pneumonia").rglob("*.jpeg"))[0]


def test_predict_csv_naming_a_folder_is_refused_before_predicting(tmp_path, capsys):
    """Checked first (in-process: no model is needed, as none is loaded), not after printing the predictions."""
    from xraylib.cli import main

    (tmp_path / "out").mkdir()
    assert main(["predict", "--model", str(tmp_path / "model"), str(tmp_path / "a.png"), "--csv", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.err == (f"error: {tmp_path / 'out'}: --csv names a folder; name a file, such as "
                            f"{tmp_path / 'out' / 'predictions.csv'}\n")
    assert captured.out == "" and list((tmp_path / "out").iterdir()) == []


@pytest.mark.skipif(not Path("/dev/full").is_char_device(), reason="needs Linux's /dev/full (every write: ENOSPC)")
def test_predict_csv_onto_a_full_disk_is_one_error_after_the_predictions(trained, tmp_path):
    """``/dev/full``: a real ENOSPC on writing (before the fix: a traceback after the predictions)."""
    image = _one_sample_image(trained)
    result = run_cli("predict", "--model", trained["run"], image, "--csv", "/dev/full", cwd=tmp_path)
    assert_user_error(result, "error: /dev/full: cannot be written (No space left on device); free some space, or write "
                              "elsewhere; the predictions above were not saved")
    assert "decisions at threshold" in result.stdout and f"{image}: " in result.stdout
    assert Path("/dev/full").is_char_device()  # written to, never replaced by a file (run as root, a rename would)


def test_predictions_csv_onto_dev_stdout_is_written_there_not_replaced(capfd):
    """``--csv /dev/stdout`` (a link to the terminal, a pipe or a redirected file) gets the CSV; the link stays."""
    from xraylib.cli import _write_predictions_csv

    _write_predictions_csv(Path("/dev/stdout"), pd.DataFrame({"path": ["a.png"], "decision": ["normal"]}))
    assert capfd.readouterr().out == "path,decision\na.png,normal\n"
    assert Path("/dev/stdout").is_symlink() or Path("/dev/stdout").is_char_device()


def test_predict_with_a_missing_model(tmp_path):
    assert_user_error(run_cli("predict", "--model", tmp_path / "nope", tmp_path, cwd=tmp_path), "nope")


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("demo", "--output-dir", out, "--n", "12", "--image-size", "48", "--epochs", "2", "--n-boot", "50",
                     "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = result.stdout
    for needle in ("not a diagnostic device", "roc_auc", "95% CI", "threshold", "model.keras", "model.h5",
                   "evaluation.md", "roc.png", "predictions for a few sample files"):
        assert needle in text, needle
    assert (out / "models" / "run" / "model.keras").is_file() and (out / "reports" / "run" / "evaluation.json").is_file()


# --------------------------------------------------------------------------------------------
# Model files checked before they are trusted, and predict's out-of-distribution check (in-process: xraylib.cli.main)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """An untrained small CNN (32 px) saved the way training saves it, with no training data beside it."""
    import keras

    from xraylib import models, runs
    from xraylib.preprocess import PreprocessSettings

    folder = tmp_path_factory.mktemp("cli_model") / "run"
    spec = models.ModelSpec(backbone="small_cnn", weights=None, image_size=32, classes=("normal", "covid"))
    keras.utils.set_random_seed(2)
    runs.RunFolder(folder).save_model(models.build_model(spec), {
        "classes": ["normal", "covid"], "model": spec.to_dict(), "input_size": [32, 32, 1],
        "preprocessing": PreprocessSettings(image_size=32).to_dict(),
        "threshold": {"value": 0.5, "positive_class": "covid"}})
    return folder


def one_error_line(capsys, code: int) -> str:
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert "Traceback" not in captured.err
    lines = [line for line in captured.err.strip().splitlines() if not _is_tensorflow_startup_log(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


@pytest.mark.parametrize("case, content, words", [
    ("empty", "", "empty"),
    ("a list", "[1, 2]", "expected a JSON object, got list"),
    ("threshold 'high'", {"threshold": {"value": "high", "positive_class": "covid"}},
     "field 'threshold.value' must be a number in [0, 1], got 'high'"),
    ("NaN threshold", {"threshold": {"value": float("nan"), "positive_class": "covid"}}, "got nan"),
    ("no threshold", {"threshold": None}, "field 'threshold' is missing"),
])
@pytest.mark.parametrize("command", ["predict", "serve"])
def test_predict_and_serve_refuse_a_bad_model_json_in_one_line(small_model, tmp_path, capsys, command, case,
                                                               content, words):
    from xraylib.cli import main

    folder = tmp_path / "run"
    shutil.copytree(small_model, folder)
    if not isinstance(content, str):
        meta = json.loads((folder / "model.json").read_text())
        meta.update(content)
        content = json.dumps({k: v for k, v in meta.items() if v is not None})
    (folder / "model.json").write_text(content)
    args = ["predict", "--model", str(folder), str(tmp_path)] if command == "predict" else [
        "serve", "--model", str(folder), "--port", "0"]
    line = one_error_line(capsys, main(args))
    assert f"{folder / 'model.json'}: " in line and words in line, line


@pytest.mark.parametrize("case", ["truncated .keras", "truncated .h5", "PNG named .keras"])
def test_predict_says_a_damaged_model_file_is_damaged_in_one_line(small_model, tmp_path, capsys, case):
    import cv2

    from xraylib.cli import main

    name = "model.h5" if case.endswith(".h5") else "model.keras"
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "model.json").write_bytes((small_model / "model.json").read_bytes())
    data = (small_model / name).read_bytes()
    (folder / name).write_bytes(cv2.imencode(".png", np.zeros((16, 16), np.uint8))[1].tobytes()
                                if case.startswith("PNG") else data[: len(data) // 2])
    line = one_error_line(capsys, main(["predict", "--model", str(folder / name), str(tmp_path)]))
    assert f"{folder / name}: damaged or not a model file" in line and "keras==" not in line, line


def test_predict_on_the_command_line_gives_no_decision_to_a_black_image_or_a_photo(small_model, tmp_path, capsys):
    import cv2

    from xraylib.cli import main
    from xraylib.phantoms import make_phantom

    images = tmp_path / "mine"
    images.mkdir()
    cv2.imwrite(str(images / "black.png"), np.zeros((7745, 7745), np.uint8))
    photo = np.zeros((200, 260, 3), np.uint8)
    photo[..., 1] = 220
    cv2.circle(photo, (130, 100), 50, (0, 0, 255), -1)
    cv2.imwrite(str(images / "photo.jpg"), photo)
    cv2.imwrite(str(images / "film.png"), make_phantom("normal", np.random.default_rng(3), 90, 80).image)
    assert main(["predict", "--model", str(small_model), str(images), "--csv", str(tmp_path / "out.csv")]) == 0
    out = capsys.readouterr().out
    assert "black.png: no decision, not a chest X-ray this model can judge (A blank image" in out
    assert "photo.jpg: no decision, not a chest X-ray this model can judge (A colour image" in out
    assert "2 of 3 images got no decision" in out
    frame = pd.read_csv(tmp_path / "out.csv").set_index(pd.Series(["black", "film", "photo"]))
    assert frame.loc["film", "decision"] in ("normal", "covid") and bool(frame.loc["film", "judgeable"])
    for name in ("black", "photo"):
        assert pd.isna(frame.loc[name, "decision"]) and not frame.loc[name, "judgeable"]
        assert frame.loc[name, "ood_reason"] and 0 <= frame.loc[name, "prob_covid"] <= 1
    assert set(frame["ood_check"]) == {"basic"}
