"""Nothing lost (issue 8): sources are never touched, outputs are never half-written, work is never redone.

- The whole pipeline (notebooks 01 to 05, with the tiny parameters of tests/notebook_runner.py) on
  sample data kept in its own source folder changes, adds and removes nothing there.
- Processes killed with SIGKILL at random moments (no exception, no cleanup: a Colab runtime taken
  away) while preprocessing, training, saving the manifest or writing the sample data: the next
  run resumes and ends with exactly what an uninterrupted run gives, and an output file is always
  the old one or the new one, never half of one.
- A second preprocessing run on unchanged data does no work ("N cached, 0 new").

The random kill points come from a seed printed in every failure message; set XRAYLIB_KILL_SEED
to replay one.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import nbformat
import numpy as np
import pandas as pd
import pytest

from conftest import gradient_image, write_dicom, write_raster
from notebook_runner import NOTEBOOKS, PARAMETERS, inject_parameters
from xraylib import cli, config, manifest, phantoms, preprocess, synthetic
from xraylib.fileio import sha1_file

pytestmark = pytest.mark.filterwarnings(
    "ignore:Invalid value for VR AS",
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning",  # Keras 3.15 with NumPy 2
)

REPO = Path(__file__).resolve().parents[1]
#: Hidden temporary files that a kill inside fileio.atomic_path leaves behind (never under the final name).
ATOMIC_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")


def _seed() -> int:
    return int(os.environ.get("XRAYLIB_KILL_SEED") or random.SystemRandom().randrange(2**32))


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
            "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore", "MPLBACKEND": "Agg"}


def tree_state(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: files by (sha1, size, mtime_ns, mode), folders by mode."""
    state = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        key = str(path.relative_to(root))
        state[key] = (hashlib.sha1(path.read_bytes()).hexdigest(), info.st_size, info.st_mtime_ns, info.st_mode) \
            if path.is_file() else ("dir", info.st_mode)
    return state


def _spawn(args: list[str], **kwargs) -> subprocess.Popen:
    # A session of its own: the kill takes the whole process group (worker processes too), as a lost runtime does.
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            start_new_session=True, **kwargs)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_for_line(process: subprocess.Popen, marker: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise AssertionError(f"child ended before printing {marker!r}: {process.stderr.read()[-3000:]}")
        if line.strip() == marker:
            return
    raise AssertionError(f"no {marker!r} within {timeout} s")


# ============================================================================================
# The whole pipeline leaves the source folders as they were


@pytest.mark.slow
def test_notebooks_01_to_05_change_nothing_in_the_source_folders(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    sources = tmp_path / "drive" / "datasets"  # laid out like ../shared/data, as users keep it on Drive
    synthetic.write_sample_data(sources, n_patients=PARAMETERS["01_dataset_creation"]["SAMPLE_PATIENTS"],
                                seed=PARAMETERS["01_dataset_creation"]["SEED"])
    outputs = tmp_path / "drive" / "xraylib_outputs"
    before = tree_state(sources)
    assert sum(1 for v in before.values() if v[0] != "dir") > 100

    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        inject_parameters(notebook, {**PARAMETERS[path.stem], "DATA": str(sources), "OUTPUT_DIR": str(outputs)})
        client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                         resources={"metadata": {"path": str(tmp_path)}})
        client.execute()
        assert tree_state(sources) == before, f"{path.name} changed the source folder"

    layout = config.OutputLayout(outputs)
    run = layout.models / PARAMETERS["03_training"]["RUN_NAME"]
    for produced in (layout.manifest, layout.preprocessed / "preprocess.json", run / "model.keras", run / "model.json",
                     layout.reports / PARAMETERS["04_evaluation"]["RUN_NAME"] / "evaluation.json"):
        assert produced.is_file(), f"the pipeline did not write {produced}"
    assert json.loads((layout.preprocessed / "preprocess.json").read_text())["complete"] is True
    assert manifest.load_manifest(layout.manifest)["path"].str.startswith(f"{sources}{os.sep}").all()  # read from there
    leftovers = [p for p in outputs.rglob("*") if ATOMIC_TEMP.match(p.name) or "partial" in p.name
                 or p.name.startswith("tmp_")]
    assert leftovers == [], f"temporary files left in the outputs: {leftovers}"


# ============================================================================================
# Preprocessing: a second run does no work; a killed run resumes where it stopped


def test_second_preprocess_run_reports_all_cached_none_new(tmp_path, capsys):
    out = tmp_path / "outputs"
    assert cli.main(["manifest", "--sample", "--n", "5", "--output-dir", str(out), "--quiet", "--workers", "2"]) == 0
    argv = ["preprocess", "--output-dir", str(out), "--image-size", "32", "--workers", "1", "--quiet"]
    capsys.readouterr()
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    folder = out / "preprocessed"
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    n = sum(len(split) for split in preprocess.load_preprocessed(folder).splits.values())
    assert f"(0 cached, {n} new, 0 skipped)" in first
    assert cli.main(argv) == 0
    second = capsys.readouterr().out
    assert f"({n} cached, 0 new, 0 skipped)" in second, second
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps  # nothing rewritten


PREPROCESS_CHILD = textwrap.dedent("""
    import json, sys
    import pandas as pd
    from xraylib import preprocess

    if __name__ == "__main__":
        frame = pd.read_csv(sys.argv[1], dtype=str)
        print("READY", flush=True)
        data = preprocess.preprocess_dataset(frame, sys.argv[2], ("normal", "pneumonia", "covid"),
                                             preprocess.PreprocessSettings(image_size=32, resize="pad"),
                                             workers=2, chunk_size=4, progress=False)
        print("REPORT " + json.dumps({k: data.report[k] for k in ("cached", "new", "skipped")}), flush=True)
""")


def _preprocess_manifest(root: Path) -> Path:
    """140 rows in every format users have (three unreadable), 2 images per patient, patient-disjoint splits."""
    rows = []
    for i in range(140):
        split = "train" if i < 100 else "val" if i < 120 else "test"
        pixels = gradient_image(40 + i % 17, 36 + i % 11, seed=i)
        stem = root / "images" / f"img-{i:03d}"
        if i in (5, 61, 117):
            path = stem.with_suffix(".png")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"<html>404</html>\n")
        elif i % 4 == 3:
            path = write_dicom(stem.with_suffix(".dcm"), pixels, photometric="MONOCHROME1" if i % 8 == 3 else "MONOCHROME2")
        else:
            path = write_raster(stem.with_suffix(".png" if i % 4 else ".jpg"), pixels)
        rows.append({"path": str(path), "label": ("normal", "pneumonia", "covid")[i % 3], "source": "ieee8023",
                     "patient_id": f"ieee8023:{i // 2}", "sha1": sha1_file(path), "split": split})
    csv = root / "split_manifest.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def _cache_files(folder: Path) -> tuple[dict[str, bytes], list[str]]:
    """The cache's files by name (preprocess.json without its cached/new counts), and hidden temporaries left."""
    files, temporaries = {}, []
    for path in sorted(folder.iterdir()):
        if ATOMIC_TEMP.match(path.name):
            temporaries.append(path.name)
            continue
        data = path.read_bytes()
        if path.name == "preprocess.json":
            meta = json.loads(data)
            meta["report"] = {k: v for k, v in meta["report"].items() if k not in ("cached", "new")}
            data = json.dumps(meta, sort_keys=True).encode()
        files[path.name] = data
    return files, temporaries


def _rows_done(folder: Path) -> int:
    """Rows whose decoded image is on disk (status 1), as a resumed run will trust them."""
    meta = folder / "preprocess.json"
    if not meta.is_file():
        return 0
    return sum(int((np.load(p) == 1).sum()) for p in folder.glob("*_status.npy"))


def test_preprocessing_killed_at_random_points_resumes_to_the_same_cache(tmp_path):
    seed = _seed()
    rng = random.Random(seed)
    csv = _preprocess_manifest(tmp_path / "src")
    script = tmp_path / "preprocess_child.py"
    script.write_text(PREPROCESS_CHILD)

    reference = _spawn([sys.executable, str(script), str(csv), str(tmp_path / "reference")])
    _wait_for_line(reference, "READY")
    ready = time.monotonic()
    out, err = reference.communicate(timeout=300)
    duration = time.monotonic() - ready
    assert reference.returncode == 0, err[-3000:]
    expected, _ = _cache_files(tmp_path / "reference")

    folder = tmp_path / "killed"
    history = []
    for attempt in range(12):
        done_before = _rows_done(folder)  # read while no process writes there
        child = _spawn([sys.executable, str(script), str(csv), str(folder)])
        _wait_for_line(child, "READY")
        # Anywhere in the run, or late in it (past the workers' start-up, into the chunks and the finishing writes).
        delay = (rng.uniform(0.0, duration) if attempt % 2 == 0 else rng.uniform(0.5 * duration, 1.1 * duration)) \
            if attempt < 6 else None  # then let it finish
        try:
            out, err = child.communicate(timeout=delay if delay is not None else 300)
        except subprocess.TimeoutExpired:
            _kill_group(child)
            child.communicate()
            history.append(f"killed after {delay:.2f}s ({done_before} rows done before)")
            continue
        assert child.returncode == 0, f"seed {seed}, {history}: {err[-3000:]}"
        report = json.loads(out.split("REPORT ", 1)[1])
        history.append(f"finished: {report}")
        break
    else:
        raise AssertionError(f"seed {seed}: never finished: {history}")
    kills = sum(h.startswith("killed") for h in history)
    assert kills >= 1 or duration < 0.5, f"seed {seed}: no kill landed ({history})"
    # Resumed, not started over: the finished run decoded only the rows not already on disk.
    assert report["cached"] == done_before and report["cached"] + report["new"] == 137, f"seed {seed}: {history}"
    assert report["skipped"] == 3
    got, temporaries = _cache_files(folder)
    assert sorted(got) == sorted(expected), f"seed {seed}, {history}"
    for name in expected:
        assert got[name] == expected[name], f"seed {seed}, {history}: {name} differs from the uninterrupted run's"
    data = preprocess.load_preprocessed(folder)
    assert {name: len(s) for name, s in data.splits.items()} == {"train": 98, "val": 19, "test": 20}
    print(f"seed {seed}: {history}; temporaries left by kills: {temporaries}; uninterrupted run {duration:.2f}s")


# ============================================================================================
# Outputs written atomically: the manifest, killed mid-write


SAVE_CHILD = textwrap.dedent("""
    import sys
    import pandas as pd
    from xraylib import manifest
    frames = [pd.read_csv(sys.argv[1], dtype=str), pd.read_csv(sys.argv[2], dtype=str)]
    print("READY", flush=True)
    i = 0
    while True:
        manifest.save_manifest(manifest.Manifest(frames[i % 2], None), sys.argv[3])
        i += 1
""")


def test_manifest_killed_while_being_saved_is_the_old_or_the_new_file(tmp_path):
    seed = _seed()
    rng = random.Random(seed)
    big = pd.DataFrame({column: [f"{column}-{i}" for i in range(40_000)] for column in manifest.MANIFEST_COLUMNS})
    versions = []
    for name, frame in (("a.csv", big), ("b.csv", big.assign(label="covid").iloc[::-1])):
        frame.to_csv(tmp_path / name, index=False)
        versions.append((tmp_path / name).read_bytes())
    script = tmp_path / "save_child.py"
    script.write_text(SAVE_CHILD)
    target = tmp_path / "out" / "manifest.csv"
    for attempt in range(5):
        child = _spawn([sys.executable, str(script), str(tmp_path / "a.csv"), str(tmp_path / "b.csv"), str(target)])
        _wait_for_line(child, "READY")
        time.sleep(rng.uniform(0.05, 1.5))
        _kill_group(child)
        child.communicate()
        if target.exists():
            assert target.read_bytes() in versions, f"seed {seed}, kill {attempt}: manifest.csv is half written"
        visible = [p.name for p in target.parent.iterdir() if not ATOMIC_TEMP.match(p.name)]
        assert visible in ([], ["manifest.csv"]), f"seed {seed}: {visible}"


# ============================================================================================
# Sample data: a killed write leaves no folder that looks complete, and the next call cleans up


def test_sample_data_killed_mid_write_is_cleaned_up_by_the_next_call(tmp_path):
    seed = _seed()
    rng = random.Random(seed)
    dest = tmp_path / "sample_data"
    code = "import sys; from xraylib import synthetic; print('READY', flush=True); " \
           "synthetic.write_sample_data(sys.argv[1], n_patients=40, seed=0)"
    child = _spawn([sys.executable, "-c", code, str(dest)])
    _wait_for_line(child, "READY")
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".sample_data.*.partial")) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 1.0))
    _kill_group(child)
    child.communicate()
    stale = list(tmp_path.glob(".sample_data.*.partial"))
    assert len(stale) == 1 and not dest.exists(), f"seed {seed}: {sorted(p.name for p in tmp_path.iterdir())}"

    # Beside it: the partial folder of a writer that is still running, and a folder of the user's.
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        live = tmp_path / f".sample_data.abcd1234.{writer.pid}.partial"
        (live / "rsna-pneumonia").mkdir(parents=True)
        users = tmp_path / ".sample_data.backup"
        users.mkdir()
        (users / "notes.txt").write_text("mine\n")
        older_version = tmp_path / ".sample_data.zyxw9876.partial"  # no pid: written by an older xraylib
        (older_version / "covid-chestxray-dataset").mkdir(parents=True)

        sample = synthetic.write_sample_data(dest, n_patients=4, seed=0)
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted([dest.name, live.name, users.name]), left
        assert (dest / synthetic.SAMPLE_DATA_FILE).is_file() and sample.counts
        assert (users / "notes.txt").read_text() == "mine\n"
    finally:
        writer.kill()
        writer.wait()


# ============================================================================================
# Training: killed at random points, resumed, identical to an uninterrupted run

TRAIN_CHILD = textwrap.dedent("""
    # Train the small CNN; SIGKILL self at the KILL_AT-th event (a training batch ending, or an os.replace
    # of a checkpoint, history or state file, just before or just after it). Events inside runs.finish
    # (saving the final model) are counted only with FINISH_EVENTS=1.
    import hashlib, json, os, signal, sys
    cache, run_dir, epochs, dropout, kill_at, finish_events = sys.argv[1:7]
    kill_at, finish_events = int(kill_at), finish_events == "1"
    import keras
    import numpy as np
    from xraylib import models, preprocess, runs, train

    state = {"events": 0, "finishing": False, "log": []}

    def event(what):
        if state["finishing"] and not finish_events:
            return
        state["events"] += 1
        state["log"].append(what)
        if state["events"] == kill_at:
            print("KILLED AT " + what, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    real_replace = os.replace
    def replace(src, dst, *args, **kwargs):
        event(f"before replace {os.path.basename(dst)}")
        real_replace(src, dst, *args, **kwargs)
        event(f"after replace {os.path.basename(dst)}")
    os.replace = replace

    class KillableCheckpoint(train.EpochCheckpoint):
        def on_train_batch_end(self, batch, logs=None):
            event(f"batch {batch} ended")
    train.EpochCheckpoint = KillableCheckpoint

    real_finish = runs.finish
    def finish(*args, **kwargs):
        state["finishing"] = True
        return real_finish(*args, **kwargs)
    runs.finish = finish

    data = preprocess.load_preprocessed(cache)
    spec = models.ModelSpec(backbone="small_cnn", weights=None, image_size=data.settings.image_size,
                            classes=data.classes, dropout=float(dropout))
    result = runs.train(data, spec, train.TrainSettings(epochs=int(epochs), batch_size=4), run_dir=run_dir, verbose=0)
    digest = lambda model: hashlib.sha1(b"".join(np.asarray(w).tobytes() for w in model.get_weights())).hexdigest()
    saved = keras.models.load_model(os.path.join(run_dir, "model.keras"))
    print("RESULT " + json.dumps({"events": state["events"], "weights": digest(result.model),
                                  "saved_weights": digest(saved), "resumed_from": result.resumed_from_epoch,
                                  "iterations": int(saved.optimizer.iterations.numpy())}), flush=True)
""")

TRAIN_EPOCHS = 4


@pytest.fixture(scope="module")
def train_cache(tmp_path_factory) -> Path:
    """24 phantoms (14 normal, 10 covid with a burnt-in marker), one per patient, cached at 32 px."""
    root = tmp_path_factory.mktemp("train_cache")
    rows = []
    for i, label in enumerate(["normal"] * 14 + ["covid"] * 10):
        image = phantoms.make_phantom(label, np.random.default_rng(100 + i), 64, 64, marker=label == "covid").image
        path = root / "images" / f"{label}-{i:02d}.png"
        path.parent.mkdir(exist_ok=True)
        assert cv2.imwrite(str(path), image)
        rows.append({"path": str(path), "label": label, "source": "synthetic", "patient_id": f"synthetic:{i:02d}",
                     "sha1": sha1_file(path)})
    preprocess.split_and_preprocess(pd.DataFrame(rows), root / "cache", ("normal", "covid"),
                                    preprocess.PreprocessSettings(image_size=32), fractions=(0.6, 0.2, 0.2), seed=0,
                                    workers=1, progress=False)
    return root / "cache"


def _train(script: Path, cache: Path, run_dir: Path, *, kill_at: int = 0, dropout: float = 0.0,
           epochs: int = TRAIN_EPOCHS, finish_events: bool = False) -> tuple[int, str, str]:
    result = subprocess.run([sys.executable, str(script), str(cache), str(run_dir), str(epochs), str(dropout),
                             str(kill_at), "1" if finish_events else "0"],
                            capture_output=True, text=True, env=_env(), timeout=400)
    return result.returncode, result.stdout, result.stderr


def _result(stdout: str) -> dict:
    return json.loads(stdout.split("RESULT ", 1)[1])


def _run_files(run_dir: Path) -> dict[str, object]:
    """What a finished run leaves that must not depend on interruptions (model.json without its timestamp
    and without ``execution``, which says how the last call ran, e.g. which stages it streamed or cached)."""
    meta = json.loads((run_dir / "model.json").read_text())
    meta.pop("saved_at", None)
    meta.pop("execution", None)
    return {"history": pd.read_csv(run_dir / "history.csv").to_dict("list"),
            "state": json.loads((run_dir / "checkpoints" / "state.json").read_text()),
            "model.json": meta, "model.h5": (run_dir / "model.h5").is_file()}


@pytest.fixture(scope="module")
def train_script(tmp_path_factory) -> Path:
    script = tmp_path_factory.mktemp("train_child") / "train_child.py"
    script.write_text(TRAIN_CHILD)
    return script


@pytest.fixture(scope="module")
def uninterrupted(train_script, train_cache, tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    code, out, err = _train(train_script, train_cache, run_dir)
    assert code == 0, err[-3000:]
    return run_dir, _result(out)


@pytest.mark.slow
def test_training_killed_at_random_points_resumes_to_the_uninterrupted_weights(train_script, train_cache,
                                                                               uninterrupted, tmp_path):
    """The small CNN without dropout (see the xfail test below for dropout): bit-identical weights after kills."""
    seed = _seed()
    rng = random.Random(seed)
    reference_dir, reference = uninterrupted
    events = reference["events"]
    assert events > 3 * TRAIN_EPOCHS  # batches and file replaces, so kills land between and inside epochs
    run_dir = tmp_path / "run"
    history = []
    for attempt in range(4):
        state = run_dir / "checkpoints" / "state.json"
        epochs_done = json.loads(state.read_text())["epochs_done"] if state.exists() else 0
        remaining = max(1, events * (TRAIN_EPOCHS - epochs_done) // TRAIN_EPOCHS)  # about the events still to come
        kill_at = rng.randint(1, remaining) if attempt < 3 else 0
        code, out, err = _train(train_script, train_cache, run_dir, kill_at=kill_at)
        if code == -signal.SIGKILL:
            history.append(out.strip().splitlines()[-1])
            if state.exists():  # always a checkpoint the state names, never a half one
                assert (run_dir / "checkpoints" / json.loads(state.read_text())["checkpoint"]).is_file()
            continue
        assert code == 0, f"seed {seed}, {history}: {err[-3000:]}"
        history.append(f"finished, resumed from epoch {_result(out)['resumed_from']}")
        break
    assert any(h.startswith("KILLED") for h in history), history
    result = _result(out)
    assert result["weights"] == reference["weights"] == result["saved_weights"], f"seed {seed}: {history}"
    assert result["iterations"] == reference["iterations"]
    assert _run_files(run_dir) == _run_files(reference_dir), f"seed {seed}: {history}"
    litter = sorted(set(p.name for p in (run_dir / "checkpoints").iterdir())
                    - set(p.name for p in (reference_dir / "checkpoints").iterdir()))
    print(f"seed {seed}: {history}; checkpoint files left by the kills: {litter}")


@pytest.mark.slow
def test_training_killed_while_saving_the_final_model_is_finished_by_the_next_run(train_script, train_cache,
                                                                                  uninterrupted, tmp_path):
    reference_dir, reference = uninterrupted
    run_dir = tmp_path / "run"
    # Every epoch done, no model saved yet: the uninterrupted run without its model files.
    shutil.copytree(reference_dir, run_dir)
    for name in ("model.keras", "model.h5", "model.json"):
        (run_dir / name).unlink()
    # The next runs only finish: their events are runs.finish's. Kill at each in turn until model.keras is in place.
    for kill_at in range(1, 8):
        code, out, err = _train(train_script, train_cache, run_dir, kill_at=kill_at, finish_events=True)
        assert code == -signal.SIGKILL, f"finished without a kill after model.keras: {out} {err[-2000:]}"
        if "KILLED AT after replace model.keras" in out:
            break
    else:
        pytest.fail(f"no kill after model.keras was replaced: {out}")
    assert (run_dir / "model.keras").is_file() and not (run_dir / "model.json").exists()
    code, out, err = _train(train_script, train_cache, run_dir)
    assert code == 0, err[-3000:]
    assert (run_dir / "model.json").is_file() and (run_dir / "model.h5").is_file()
    assert _run_files(run_dir) == _run_files(reference_dir)


@pytest.mark.slow
def test_training_with_dropout_resumed_ends_like_an_uninterrupted_run(train_cache, tmp_path):
    from xraylib import models, runs, train  # TensorFlow: imported only by the tests that train

    data = preprocess.load_preprocessed(train_cache)
    spec = models.ModelSpec(backbone="small_cnn", weights=None, image_size=32, classes=data.classes, dropout=0.5)

    def run(folder: str, epochs: int):
        return runs.train(data, spec, train.TrainSettings(epochs=epochs, batch_size=4), run_dir=tmp_path / folder,
                           verbose=0)

    straight = run("straight", TRAIN_EPOCHS)
    run("resumed", 2)
    resumed = run("resumed", TRAIN_EPOCHS)
    assert resumed.resumed_from_epoch == 2
    for a, b in zip(resumed.model.get_weights(), straight.model.get_weights()):
        np.testing.assert_array_equal(a, b)
