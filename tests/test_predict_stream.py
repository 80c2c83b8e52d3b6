"""Prediction for any number of files: a batch of files at a time, the same rows as the whole folder at once.

``predict_files`` used to decode every image of a folder into one array before predicting; now ``iter_predictions``
reads, predicts and yields a batch at a time, and the command line writes each batch's rows to ``--csv`` before it
reads the next. Memory is checked by what is held (decoded images alive at once, images per prediction call), not by
timing or by the process's size.
"""
from __future__ import annotations

import json
import os
import weakref
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from conftest import write_dicom, write_raster
from xraylib import models, phantoms, predict, runs
from xraylib.fileio import sha1_file
from xraylib.preprocess import PreprocessSettings, split_and_preprocess

pytestmark = [
    pytest.mark.filterwarnings("ignore:Invalid value for VR AS"),
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]

CLASSES = ("normal", "covid")
SIZE = 32


def film(seed: int, label: str = "normal", height: int = 72, width: int = 64) -> np.ndarray:
    return phantoms.make_phantom(label, np.random.default_rng(seed), height, width).image


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """Preprocessed phantoms at 32 px: what the model's out-of-distribution reference is fitted on."""
    root = tmp_path_factory.mktemp("stream_data")
    rows = []
    for i, label in enumerate(CLASSES * 8):
        path = write_raster(root / "images" / f"{i:02d}.png", film(300 + i, label))
        rows.append({"path": str(path), "label": label, "source": "synthetic", "patient_id": f"synthetic:{i}",
                     "view": "PA", "sha1": sha1_file(path)})
    split_and_preprocess(pd.DataFrame(rows), root / "cache", CLASSES, PreprocessSettings(image_size=SIZE),
                         fractions=(0.5, 0.25, 0.25), seed=0, workers=1, progress=False)
    return root / "cache"


@pytest.fixture(scope="module")
def model_dir(cache, tmp_path_factory) -> Path:
    """An untrained small CNN saved as training saves it, with its full out-of-distribution reference beside it."""
    folder = tmp_path_factory.mktemp("stream_model") / "run"
    spec = models.ModelSpec(backbone="small_cnn", weights=None, image_size=SIZE, classes=CLASSES)
    keras.utils.set_random_seed(7)
    runs.RunFolder(folder).save_model(models.build_model(spec), {
        "classes": list(CLASSES), "model": spec.to_dict(), "input_size": [SIZE, SIZE, 1],
        "preprocessing": PreprocessSettings(image_size=SIZE).to_dict(),
        "threshold": {"value": 0.5, "positive_class": "covid"}})
    reference, _ = runs.prepare_ood(models.load_model(folder), cache, say=lambda line: None)
    assert reference is not None and (folder / "ood.json").is_file()
    return folder


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """A user's folder: PNGs, JPEGs, DICOMs (pydicom), a black image the guard flags and one file that is not an image."""
    root = tmp_path_factory.mktemp("stream_mixed")
    for i in range(3):
        write_raster(root / f"a{i}.png", film(10 + i))
        write_raster(root / "jpeg" / f"b{i}.jpg", film(20 + i, "covid"))
        write_dicom(root / "dicom" / f"c{i}.dcm", film(30 + i, "covid" if i else "normal"))
    write_raster(root / "black.png", np.zeros((90, 80), np.uint8))
    (root / "jpeg" / "notes.jpg").write_text("not an image")
    return root


N_MIXED = 11


def whole_folder_at_once(model_dir: Path, folder: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """What ``predict_files`` did before: every file decoded into one array, predicted and checked in one call."""
    loaded = models.load_model(model_dir)
    images, frame, facts = predict.preprocess_files(loaded, predict.collect_image_paths(folder), with_facts=True)
    assert len(images) == N_MIXED - 1
    probs = models.predict_images(loaded.model, images, 16)
    return frame, probs


def test_streamed_predictions_equal_the_whole_folder_at_once(model_dir, mixed):
    said: list[str] = []
    streamed = predict.predict_files(model_dir, mixed, batch_files=4, say=said.append)
    at_once = predict.predict_files(model_dir, mixed, batch_files=10_000, say=lambda line: None)  # one batch
    frame, probs = whole_folder_at_once(model_dir, mixed)

    assert len(streamed) == N_MIXED and list(streamed.index) == list(range(N_MIXED))
    assert streamed["path"].tolist() == frame["path"].tolist() == at_once["path"].tolist()
    bad = streamed.set_index("path").loc[str(mixed / "jpeg" / "notes.jpg")]
    assert not bad["ok"] and "text file" in bad["error"] and pd.isna(bad["prob_covid"]) and pd.isna(bad["decision"])
    ok = streamed["ok"].to_numpy(dtype=bool)
    assert ok.sum() == N_MIXED - 1 and (ok == frame["ok"].to_numpy(dtype=bool)).all()
    columns = ["prob_normal", "prob_covid"]
    np.testing.assert_allclose(streamed.loc[ok, columns].to_numpy(dtype=float), probs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(streamed[columns].to_numpy(dtype=float), at_once[columns].to_numpy(dtype=float),
                               atol=1e-5, rtol=0)
    # The guard compares each image with the model's reference: no statistics of the set, so no batch changes a verdict.
    assert set(streamed["ood_check"]) == {"full"}
    for column in ("ok", "error", "decision", "threshold", "judgeable", "ood_reason"):
        assert streamed[column].tolist() == at_once[column].tolist(), column
    black = streamed.set_index("path").loc[str(mixed / "black.png")]
    assert not black["judgeable"] and pd.isna(black["decision"]) and "blank image" in black["ood_reason"]
    flagged = int((streamed["ok"] & ~streamed["judgeable"].astype(bool)).sum())
    assert said[-1] == f"{flagged} of {N_MIXED - 1} images got no decision: {predict.NOT_JUDGEABLE} (see ood_reason)"


def count_reads(monkeypatch) -> list[str]:
    """The files ``predict`` has read so far, in order."""
    read: list[str] = []
    real = predict._read_for_model

    def counted(path, *args, **kwargs):
        read.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(predict, "_read_for_model", counted)
    return read


def test_each_batch_is_yielded_before_the_next_file_is_read(model_dir, mixed, monkeypatch):
    read = count_reads(monkeypatch)
    batches = predict.iter_predictions(model_dir, mixed, batch_files=4, say=lambda line: None)
    assert read == []  # the model, the file list and the reference are ready; no file read yet
    seen = []
    for frame in batches:
        seen.append((len(frame), len(read)))
        assert read[-len(frame):] == frame["path"].tolist()
    assert seen == [(4, 4), (4, 8), (3, 11)]


def test_the_command_line_writes_each_batch_to_the_csv_before_reading_the_next(model_dir, mixed, tmp_path, monkeypatch,
                                                                               capsys):
    from xraylib.cli import main

    out = tmp_path / "predictions.csv"
    read = count_reads(monkeypatch)
    real = predict.iter_predictions
    written: list[tuple[int, int]] = []  # (files read, rows in the CSV being written) as each new batch arrives

    def rows_so_far() -> int:
        partial = [p for p in tmp_path.iterdir() if p.name.startswith(".predictions.csv.")]
        assert len(partial) == 1 and not out.exists()  # a temporary file beside it, renamed at the end
        return len(pd.read_csv(partial[0])) if partial[0].stat().st_size else 0

    def small_batches(*args, **kwargs):
        for frame in real(*args, batch_files=4, **kwargs):
            written.append((len(read), rows_so_far()))
            yield frame

    monkeypatch.setattr(predict, "iter_predictions", small_batches)
    assert main(["predict", "--model", str(model_dir), str(mixed), "--csv", str(out)]) == 0
    assert written == [(4, 0), (8, 4), (11, 8)]
    printed = capsys.readouterr().out
    assert f"{mixed / 'jpeg' / 'notes.jpg'}: skipped (a text file" in printed and f"wrote {out}" in printed
    frame = pd.read_csv(out)
    monkeypatch.undo()
    expected = predict.predict_files(model_dir, mixed, say=lambda line: None)
    assert frame["path"].tolist() == expected["path"].tolist()
    np.testing.assert_allclose(frame["prob_covid"].to_numpy(float), expected["prob_covid"].to_numpy(float), atol=1e-5)
    assert frame["judgeable"].tolist() == expected["judgeable"].tolist()
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.csv"]


def test_a_folder_holds_one_batch_of_decoded_images_at_a_time(model_dir, tmp_path, monkeypatch):
    """300 files in batches of 32: at most one decoded image alive at once (copied into the batch's array), at most 32
    images per prediction call. Before, every decoded image stayed alive until all 300 were stacked."""
    n, batch = 300, 32
    base = film(1)
    for i in range(n):
        image = base.copy()
        image[0, :4] = np.frombuffer(i.to_bytes(4, "big"), np.uint8)
        write_raster(tmp_path / "many" / f"{i // 100}" / f"{i:04d}.png", image)
    alive: list[weakref.ref] = []
    most = {"decoded": 0, "predicted": 0}
    real_decode, real_predict = predict.preprocess_bytes, predict.predict_images

    def decode(*args, **kwargs):
        image = real_decode(*args, **kwargs)
        alive.append(weakref.ref(image))
        most["decoded"] = max(most["decoded"], sum(ref() is not None for ref in alive))
        return image

    def predict_images(model, images, *args, **kwargs):
        most["predicted"] = max(most["predicted"], len(images))
        return real_predict(model, images, *args, **kwargs)

    monkeypatch.setattr(predict, "preprocess_bytes", decode)
    monkeypatch.setattr(predict, "predict_images", predict_images)
    table = predict.predict_files(model_dir, tmp_path / "many", batch_files=batch, say=lambda line: None,
                                  progress=False)
    assert len(table) == n and table["ok"].all() and len(alive) == n
    assert most["decoded"] <= 2 and most["predicted"] == batch
    assert table["path"].tolist() == sorted(table["path"].tolist())


def test_collect_image_paths_walks_a_folder_as_rglob_did(tmp_path):
    """One walk of the listings (no call per file), hidden folders not entered; the same files in the same order as the
    old ``sorted(path.rglob("*"))`` filter, including names that sort differently as strings and as paths."""
    root = tmp_path / "images"
    names = ["a-b.png", "a/b.png", "a/c.PNG", "a.b/x.jpeg", "A/z.dcm", "a/deep/er/y.jpg", "a b/q.png", "notes.txt",
             ".hidden.png", "._x.png", ".ipynb_checkpoints/k.png", "sub/.Trash/t.png", "sub/u.png", "x.png.bak"]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    (root / "folder.png").mkdir()
    os.symlink(root / "sub", root / "linked")  # a link to a folder: not followed, as rglob did not

    old = sorted(p for p in root.rglob("*") if not p.is_dir() and p.suffix.lower() in {".png", ".jpg", ".jpeg", ".dcm"}
                 and not any(part.startswith(".") for part in p.relative_to(root).parts))
    found = predict.collect_image_paths(root)
    assert found == old
    assert [str(p.relative_to(root)) for p in found] == ["A/z.dcm", "a/b.png", "a/c.PNG", "a/deep/er/y.jpg",
                                                          "a b/q.png", "a-b.png", "a.b/x.jpeg", "sub/u.png"]
    assert json.dumps([str(p) for p in predict.collect_image_paths(str(root) + os.sep)]) == json.dumps(
        [str(p) for p in found])
