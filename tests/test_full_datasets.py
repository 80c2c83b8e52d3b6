"""The full public data sets' layouts (issue 18, point 4): manifest and cache of an NIH-layout folder
plus RSNA DICOMs, killed with SIGKILL part-way (as a lost Colab runtime) and resumed, end exactly where an
uninterrupted build ends. The sizes are small; ``benchmarks/speed.py --only scale`` measures 50,000 files."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from test_nothing_lost import _cache_files, _kill_group, _spawn, _wait_for_line
from xraylib import preprocess
from xraylib.errors import SourceError
from xraylib.sample_layouts import write_nih_layout, write_rsna_sample
from xraylib.sources import read_nih_chestxray14

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR AS")
REPO = Path(__file__).resolve().parents[1]

# Each file's open waits a few milliseconds (a slow Drive): the kills land while files are being read, not after.
BUILD_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from xraylib import manifest, preprocess, split

    def slow_open(path, mode):
        time.sleep(0.004)
        return open(path, mode)

    if __name__ == "__main__":
        nih, rsna, out = map(Path, sys.argv[1:4])
        manifest.CHECKPOINT_EVERY = 8
        print("READY", flush=True)
        built = manifest.build_manifest({"nih_chestxray14": nih, "rsna_pneumonia": rsna}, task="pneumonia_vs_normal",
                                        workers=2, progress=False, opener=slow_open,
                                        checkpoint=out / "manifest_files.jsonl")
        manifest.save_manifest(built, out / "manifest.csv")
        # split_and_preprocess's two steps, with chunks small enough for a kill to land between them
        data = preprocess.preprocess_dataset(split.split_by_patient(built.frame, seed=42), out / "preprocessed",
                                             ("normal", "pneumonia"), preprocess.PreprocessSettings(image_size=32),
                                             workers=2, progress=False, chunk_size=8, opener=slow_open)
        print("REPORT", data.report["cached"], data.report["new"], flush=True)
""")


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("scale")
    nih = write_nih_layout(root / "nih-chestxray14", 300, size=32)
    rsna = root / "rsna-pneumonia"
    write_rsna_sample(rsna, np.random.default_rng(0), 24, 64, None)
    script = root / "build_child.py"
    script.write_text(BUILD_CHILD)
    return nih, rsna, script


def test_the_nih_layout_is_read_as_the_real_one(layout):
    nih, _, _ = layout
    table = read_nih_chestxray14(nih)
    assert len(table.rows) + table.excluded["NIH finding not used"] == 300 and not table.problems
    assert set(table.rows["label"]) == {"normal", "pneumonia"} and table.rows["path"].map(lambda p: Path(p).is_file()).all()
    assert table.rows.groupby("patient_id").size().max() == 3  # follow-ups: several images per patient
    assert table.rows[["view", "sex", "age"]].notna().all().all()


def test_kaggles_copy_of_nih_in_images_nnn_folders_is_read_as_the_flat_one(layout, tmp_path):
    nih, _, _ = layout
    flat = read_nih_chestxray14(nih).rows
    kaggle = tmp_path / "nih-kaggle"
    shutil.copy(nih / "Data_Entry_2017.csv", kaggle.mkdir() or kaggle)
    for i, image in enumerate(sorted((nih / "images").iterdir())):  # 100 files per folder (Kaggle: 10,000)
        folder = kaggle / f"images_{i // 100 + 1:03d}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, folder)
    table = read_nih_chestxray14(kaggle)
    assert not table.problems and table.excluded == read_nih_chestxray14(nih).excluded
    assert table.rows["path"].str.contains("/images_00[123]/images/").all()
    assert [Path(p).read_bytes() for p in table.rows["path"]] == [Path(p).read_bytes() for p in flat["path"]]
    assert table.rows.drop(columns="path").equals(flat.drop(columns="path"))


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def _decoded(folder: Path) -> int:
    done = 0
    for status in folder.glob("*_status.npy"):
        try:
            done += int((np.load(status) == 1).sum())
        except (OSError, ValueError, EOFError):  # being replaced this instant
            pass
    return done


def _run_until(script: Path, layout_dirs: tuple[Path, Path], out: Path, ready) -> subprocess.Popen | None:
    """Start a build; SIGKILL it as soon as ``ready()`` (polled); None when killed, else the finished process."""
    child = _spawn([sys.executable, str(script), *map(str, layout_dirs), str(out)])
    _wait_for_line(child, "READY")
    deadline = time.monotonic() + 120
    while child.poll() is None and time.monotonic() < deadline:
        if ready():
            _kill_group(child)
            child.communicate()
            return None
        time.sleep(0.005)
    return child


def test_a_build_killed_while_reading_and_while_caching_resumes_to_the_uninterrupted_result(layout, tmp_path):
    nih, rsna, script = layout
    reference = _spawn([sys.executable, str(script), str(nih), str(rsna), str(tmp_path / "reference")])
    out, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-3000:]
    files = _lines(tmp_path / "reference" / "manifest_files.jsonl")

    folder = tmp_path / "killed"
    # 1. killed while the manifest's files are read: part of them checkpointed
    assert _run_until(script, (nih, rsna), folder, lambda: _lines(folder / "manifest_files.jsonl") >= 40) is None
    read_before = _lines(folder / "manifest_files.jsonl")
    assert 40 <= read_before < files and not (folder / "manifest.csv").exists()
    # 2. the manifest resumed and finished (the files read before not read again); killed while caching
    assert _run_until(script, (nih, rsna), folder, lambda: _decoded(folder / "preprocessed") >= 24) is None
    # a file in flight at the kill may be read twice; none read before the last flush is
    assert files <= _lines(folder / "manifest_files.jsonl") <= files + 8
    # 3. finished: the cache resumed
    finished = _run_until(script, (nih, rsna), folder, lambda: False)
    out, err = finished.communicate(timeout=60)
    assert finished.returncode == 0, err[-3000:]
    cached, new = map(int, out.split("REPORT", 1)[1].split())
    assert cached >= 24 and new > 0

    assert (folder / "manifest.csv").read_bytes() == (tmp_path / "reference" / "manifest.csv").read_bytes()
    expected, _ = _cache_files(tmp_path / "reference" / "preprocessed")
    got, _ = _cache_files(folder / "preprocessed")
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name] == expected[name], f"{name} differs from the uninterrupted build's"
    data = preprocess.load_preprocessed(folder / "preprocessed")
    assert sum(len(s) for s in data.splits.values()) == cached + new


def test_the_scale_benchmark_runs_at_tiny_sizes(tmp_path):
    """``speed.py --only scale`` end to end at 40 and 80 files: its timings mean nothing here; the counts must hold
    and the resumed build must find everything done."""
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "speed.py"), "--smoke", "--only", "scale",
                           "--scale-sizes", "40", "80", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    scale = json.loads((out / "speed.json").read_text())["scale"]
    for n, run in scale["runs"].items():
        assert run["files"] == int(n) and 0 < run["images"] == run["rows"] < int(n)
        assert run["cache_again_new"] == 0 and run["peak_rss_mb"] > 0
    assert "## Scale" in (out / "speed.md").read_text()


def test_the_cache_copied_to_local_disk_loads_the_same_and_a_cut_copy_resumes(tmp_path, monkeypatch):
    from test_preprocess import SETTINGS, arrays, make_split_manifest, run
    import xraylib.preprocess as preprocess_module

    frame = make_split_manifest(tmp_path / "src")
    original = run(frame, tmp_path / "drive" / "preprocessed")
    local = tmp_path / "local" / "preprocessed"
    real_atomic_path, written = preprocess_module.atomic_path, []

    def cut_at(name):
        def atomic_path(path):
            if Path(path).name == name:
                raise KeyboardInterrupt  # the runtime lost while copying this file
            written.append(Path(path).name)
            return real_atomic_path(path)
        return atomic_path

    monkeypatch.setattr(preprocess_module, "atomic_path", cut_at("val_images.npy"))
    with pytest.raises(KeyboardInterrupt):
        preprocess.copy_preprocessed(original.folder, local, progress=False)
    with pytest.raises(SourceError, match="no finished"):
        preprocess.load_preprocessed(local)
    copied_before, written[:] = list(written), []
    monkeypatch.setattr(preprocess_module, "atomic_path", cut_at(None))
    assert preprocess.copy_preprocessed(original.folder, local, progress=False) == local
    assert "train_images.npy" in copied_before and not set(written) & set(copied_before)  # kept, not copied again
    copy = preprocess.load_preprocessed(local)
    assert copy.key == original.key and copy.settings == SETTINGS
    for name, images in arrays(original).items():
        np.testing.assert_array_equal(copy[name].images, images)
    written.clear()
    preprocess.copy_preprocessed(original.folder, local, progress=False)
    assert written == []  # complete: nothing to do

    other = run(frame, tmp_path / "drive" / "other", preprocess.PreprocessSettings(image_size=40))
    preprocess.copy_preprocessed(other.folder, local, progress=False)  # over a copy of another cache
    assert preprocess.load_preprocessed(local).key == other.key and preprocess.load_preprocessed(local)["train"].images.shape[1] == 40
