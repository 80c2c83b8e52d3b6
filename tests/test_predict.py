"""Prediction: on cached splits and on the user's own PNG/DICOM files, with the preprocessing and threshold saved with the model."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from conftest import write_dicom, write_raster
from xraylib import models, phantoms, runs
from xraylib.errors import ConfigError
from xraylib.fileio import sha1_file
from xraylib.predict import (
    collect_image_paths, decide, predict_files, preprocess_for_model,
)
from xraylib.preprocess import PreprocessSettings, preprocess_file, split_and_preprocess
from xraylib.models import predict_images, predict_split, probability_columns
from xraylib.train import TrainSettings

pytestmark = [
    pytest.mark.filterwarnings("ignore:Invalid value for VR AS"),
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]

CLASSES = ("normal", "covid")
SIZE = 32


def phantom(seed: int, height: int = 80, width: int = 64, label: str = "normal") -> np.ndarray:
    return phantoms.make_phantom(label, np.random.default_rng(seed), height, width).image


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A cache of 12 PNG phantoms at 32 px: 6 train, 3 val, 3 test."""
    root = tmp_path_factory.mktemp("predict_data")
    rows = []
    for i, label in enumerate(["normal", "covid"] * 6):
        path = write_raster(root / "images" / f"{i:02d}.png", phantom(200 + i, 64, 64, label))
        rows.append({"path": str(path), "label": label, "source": "synthetic", "patient_id": f"synthetic:{i}",
                     "view": "PA", "sha1": sha1_file(path)})
    return split_and_preprocess(pd.DataFrame(rows), root / "cache", CLASSES, PreprocessSettings(image_size=SIZE),
                                fractions=(0.5, 0.25, 0.25), seed=0, workers=1, progress=False)


@pytest.fixture(scope="module")
def model_dir(data, tmp_path_factory) -> Path:
    """An (untrained) small CNN saved the way training saves it: model.keras, model.h5 and its JSON.

    Its JSON names no training folder: an out-of-distribution reference of 6 training images would flag most new
    phantoms, and these tests are about decisions, so the guard runs its colour, shape and blank-image checks only
    (the guard with a reference of a real size is tested on predict_files in test_ood.py)."""
    folder = tmp_path_factory.mktemp("model") / "run"
    spec = models.ModelSpec(backbone="small_cnn", weights=None, image_size=SIZE, classes=CLASSES)
    keras.utils.set_random_seed(5)
    runs.finish(models.build_model(spec), data, spec, TrainSettings(), runs.RunFolder(folder))
    meta = json.loads((folder / "model.json").read_text())
    meta["training_data"]["folder"] = str(folder.parent / "training data not here")
    (folder / "model.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="module")
def loaded(model_dir) -> models.LoadedModel:
    return models.load_model(model_dir)


def spread(probs: np.ndarray) -> float:
    return float(np.ptp(np.asarray(probs, dtype=np.float64)[:, 0]))


# --------------------------------------------------------------------------------------------
# Decisions


def test_decide_with_two_classes_uses_the_threshold_not_the_argmax():
    probs = np.array([[0.75, 0.25], [0.7, 0.3], [0.6, 0.4], [0.1, 0.9]])
    assert decide(probs, CLASSES, "covid", 0.3) == ["normal", "covid", "covid", "covid"]  # 0.3 >= 0.3 is positive
    assert decide(probs, CLASSES, "covid", 0.95) == ["normal"] * 4
    assert decide(probs[1], CLASSES, "covid", 0.3) == ["covid"]  # one row as a vector


def test_decide_with_three_classes_falls_back_to_the_likeliest_other_class():
    classes = ("normal", "pneumonia", "covid")
    probs = np.array([
        [0.5, 0.3, 0.2],     # covid reaches 0.2
        [0.2, 0.61, 0.19],   # below: the likelier of the others
        [0.61, 0.2, 0.19],
        [0.02, 0.09, 0.89],  # covid is the argmax but below a strict threshold
    ])
    assert decide(probs, classes, "covid", 0.2) == ["covid", "pneumonia", "normal", "covid"]
    assert decide(probs, classes, "covid", 0.9) == ["normal", "pneumonia", "normal", "pneumonia"]
    assert decide(probs, classes, "pneumonia", 0.3) == ["pneumonia", "pneumonia", "normal", "covid"]


# --------------------------------------------------------------------------------------------
# Finding the files


def test_collect_image_paths_searches_folders_recursively_and_skips_other_and_hidden_files(tmp_path):
    image = phantom(0)
    wanted = [write_raster(tmp_path / "a.png", image), write_raster(tmp_path / "sub" / "deeper" / "b.JPG", image),
              write_dicom(tmp_path / "sub" / "c.dcm", image)]
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub" / "labels.csv").write_text("path,label\n")
    write_raster(tmp_path / "._a.png", image)  # macOS resource fork
    write_raster(tmp_path / ".ipynb_checkpoints" / "a-checkpoint.png", image)
    assert collect_image_paths(tmp_path) == sorted(wanted)
    assert collect_image_paths(str(tmp_path / "a.png")) == [tmp_path / "a.png"]
    assert collect_image_paths([str(wanted[2]), wanted[0]]) == [wanted[2], wanted[0]]  # a list is kept as given


def test_collect_image_paths_errors_name_the_path(tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(ConfigError, match="no such file or folder") as caught:
        collect_image_paths(missing)
    assert str(missing) in str(caught.value)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ConfigError, match="no .png"):
        collect_image_paths(tmp_path / "empty")


# --------------------------------------------------------------------------------------------
# Predicting


def test_predict_split_adds_a_probability_column_per_class(loaded, data):
    split = data["test"]
    table = predict_split(loaded.model, split)
    assert probability_columns(CLASSES) == ["prob_normal", "prob_covid"]
    assert list(table.columns) == list(split.manifest.columns) + ["prob_normal", "prob_covid"]
    pd.testing.assert_frame_equal(table[split.manifest.columns], split.manifest)  # same rows, same order
    probs = table[["prob_normal", "prob_covid"]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs, loaded.model.predict(np.asarray(split.images, np.float32)[..., None], verbose=0), atol=1e-6)


def test_predict_images_in_chunks_equals_one_pass(loaded):
    images = np.random.default_rng(0).integers(0, 256, size=(520, SIZE, SIZE), dtype=np.uint8)  # more than a 512 chunk
    probs = predict_images(loaded.model, images, batch_size=64)
    assert probs.shape == (520, 2) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, loaded.model.predict(images.astype(np.float32)[..., None], verbose=0), atol=1e-6)
    assert predict_images(loaded.model, images[:0]).shape == (0, 2)


def test_png_and_dicom_of_the_same_pixels_get_the_same_probabilities(model_dir, tmp_path):
    """8-bit MONOCHROME2 DICOM pixels are used as stored, like a PNG's."""
    pixels = phantom(1, 90, 70, "covid")
    png = write_raster(tmp_path / "x.png", pixels)
    dcm = write_dicom(tmp_path / "x.dcm", pixels, bits=8, photometric="MONOCHROME2")
    other = write_raster(tmp_path / "y.png", phantom(2, 90, 70))
    table = predict_files(model_dir, [png, dcm, other])
    assert table["ok"].all() and table["error"].isna().all()
    probs = table[["prob_normal", "prob_covid"]].to_numpy(dtype=np.float64)
    np.testing.assert_allclose(probs[0], probs[1], atol=1e-7)
    assert np.abs(probs[0] - probs[2]).max() > 1e-5  # the model does tell images apart: the equality above means something
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_a_bad_file_is_reported_in_its_row_and_the_others_are_predicted(model_dir, loaded, tmp_path):
    write_raster(tmp_path / "a.png", phantom(3))
    (tmp_path / "b.png").write_text("this is a text file that someone named .png\n")
    write_dicom(tmp_path / "c" / "c.dcm", phantom(4))
    table = predict_files(model_dir, tmp_path)
    assert [Path(p).name for p in table["path"]] == ["a.png", "b.png", "c.dcm"]
    assert list(table["ok"]) == [True, False, True]
    bad = table.iloc[1]
    assert "text file" in bad["error"]
    assert np.isnan(bad["prob_normal"]) and np.isnan(bad["prob_covid"]) and bad["decision"] is None
    good = table[table["ok"]]
    np.testing.assert_allclose(good[["prob_normal", "prob_covid"]].sum(axis=1), 1.0, atol=1e-5)
    assert set(good["decision"]) <= set(CLASSES)
    assert (table["threshold"] == loaded.threshold).all()


def test_a_decoder_bug_on_one_file_is_reported_in_its_row_and_the_others_are_predicted(model_dir, tmp_path, monkeypatch):
    from xraylib import predict

    paths = [write_raster(tmp_path / f"{i}.png", phantom(20 + i)) for i in range(3)]
    decode = predict.preprocess_bytes

    def buggy(data, path, settings):  # (a decoder's bug, not a BadFileError: before, it stopped the whole batch)
        if path.endswith("1.png"):
            raise TypeError("int() argument must be a string, a bytes-like object or a real number, not 'NoneType'")
        return decode(data, path, settings)

    monkeypatch.setattr(predict, "preprocess_bytes", buggy)
    table = predict_files(model_dir, paths)
    assert list(table["ok"]) == [True, False, True]
    assert table["error"].iloc[1].startswith("unexpected TypeError: int() argument")


def test_the_decision_uses_the_threshold_saved_with_the_model(loaded, model_dir, tmp_path):
    meta = json.loads((model_dir / "model.json").read_text())
    assert meta["threshold"]["positive_class"] == "covid" and loaded.threshold == pytest.approx(meta["threshold"]["value"])
    paths = [write_raster(tmp_path / f"{i}.png", phantom(10 + i)) for i in range(3)]
    table = predict_files(loaded, paths)
    assert list(table["decision"]) == decide(table[["prob_normal", "prob_covid"]].to_numpy(), CLASSES, "covid", loaded.threshold)

    def with_threshold(value: float) -> models.LoadedModel:
        return dataclasses.replace(loaded, metadata={**loaded.metadata, "threshold": {**meta["threshold"], "value": value}})

    assert list(predict_files(with_threshold(0.0), paths)["decision"]) == ["covid"] * 3
    assert list(predict_files(with_threshold(1.01), paths)["decision"]) == ["normal"] * 3
    middle = float(np.median(table["prob_covid"]))  # between the probabilities: the decisions split
    decisions = predict_files(with_threshold(middle), paths)["decision"]
    assert list(decisions) == ["covid" if p >= middle else "normal" for p in table["prob_covid"]]


def save_untrained_model(folder: Path, settings: PreprocessSettings, seed: int) -> keras.Model:
    """A small CNN for ``settings.image_size`` px saved in ``folder`` with ``settings`` as its preprocessing."""
    size = settings.image_size
    spec = models.ModelSpec(backbone="small_cnn", weights=None, image_size=size, classes=CLASSES)
    keras.utils.set_random_seed(seed)
    model = models.build_model(spec)
    runs.RunFolder(folder).save_model(model, {"classes": list(CLASSES), "preprocessing": settings.to_dict(),
                                              "input_size": [size, size, 1], "model": spec.to_dict(),
                                              "threshold": {"value": 0.5, "positive_class": "covid"}})
    return model


def test_the_preprocessing_comes_from_the_models_json(tmp_path):
    """A model trained on 48 px padded images gets 48 px padded images at prediction, not what a caller might assume."""
    pad = PreprocessSettings(image_size=48, resize="pad")
    model = save_untrained_model(tmp_path / "run", pad, seed=6)
    tall = write_raster(tmp_path / "tall.png", phantom(7, 120, 60))  # 2:1, so padding and stretching differ
    table = predict_files(tmp_path / "run", tall)
    probs = table[["prob_normal", "prob_covid"]].to_numpy(dtype=np.float32)

    padded = preprocess_file(tall, pad)
    np.testing.assert_array_equal(preprocess_for_model(models.load_model(tmp_path / "run"), tall), padded)
    np.testing.assert_allclose(probs, predict_images(model, padded[None]), atol=1e-6)
    stretched = preprocess_file(tall, PreprocessSettings(image_size=48, resize="stretch"))
    assert np.abs(predict_images(model, stretched[None]) - probs).max() > 1e-5


def test_a_model_saved_with_clahe_and_body_crop_predicts_on_images_preprocessed_the_same_way(tmp_path):
    """The options travel in model.json: predict_files and the web page's analyser preprocess a user's file with
    them, as the training cache did (the same preprocess_file), and not as the defaults would."""
    from xraylib import serve

    options = PreprocessSettings(image_size=48, intensity="clahe", crop="body")
    model = save_untrained_model(tmp_path / "run", options, seed=7)
    saved = json.loads((tmp_path / "run" / "model.json").read_text())["preprocessing"]
    assert (saved["intensity"], saved["crop"]) == ("clahe", "body")
    framed = np.zeros((160, 140), np.uint8)  # a film with a black frame, so the crop has work to do
    framed[20:150, 15:130] = phantom(8, 130, 115)
    path = write_raster(tmp_path / "framed.png", framed)

    loaded = models.load_model(tmp_path / "run")
    as_trained = preprocess_file(path, options)
    np.testing.assert_array_equal(preprocess_for_model(loaded, path), as_trained)
    assert serve.Analyser(loaded).settings == options
    assert not np.array_equal(as_trained, preprocess_file(path, PreprocessSettings(image_size=48)))
    probs = predict_files(loaded, path)[["prob_normal", "prob_covid"]].to_numpy(dtype=np.float32)
    np.testing.assert_allclose(probs, predict_images(model, as_trained[None]), atol=1e-6)


# --------------------------------------------------------------------------------------------
# The out-of-distribution guard without a reference, and strict JSON


def test_without_a_reference_a_black_large_png_and_a_colour_photo_get_no_decision_and_say_why(model_dir, tmp_path):
    import cv2

    black = write_raster(tmp_path / "black.png", np.zeros((7745, 7745), np.uint8))  # 60 million pixels, one grey
    photo = np.zeros((240, 320, 3), np.uint8)
    photo[..., 0] = np.linspace(0, 255, 320, dtype=np.uint8)[None]
    photo[..., 2] = np.linspace(255, 0, 240, dtype=np.uint8)[:, None]
    cv2.circle(photo, (160, 120), 60, (0, 200, 0), -1)
    photo_path = write_raster(tmp_path / "photo.jpg", photo)
    film = write_raster(tmp_path / "film.png", phantom(21))
    said: list[str] = []
    table = predict_files(model_dir, [black, photo_path, film], say=said.append)
    assert table["ok"].all() and set(table["ood_check"]) == {"basic"}
    assert list(table["judgeable"]) == [False, False, True]
    assert table["decision"].iloc[0] is None and "blank image" in table["ood_reason"].iloc[0]
    assert table["decision"].iloc[1] is None and "colour image" in table["ood_reason"].iloc[1]
    assert table["decision"].iloc[2] in CLASSES and table["ood_reason"].iloc[2] is None
    assert table[["prob_normal", "prob_covid"]].notna().all().all()  # probabilities kept for every read image
    assert any("no reference" in line or "colour and shape" in line for line in said), said
    assert any("2 of 3 images got no decision" in line for line in said), said


def test_the_api_answers_strict_json_even_with_a_nan_in_memory(loaded):
    """model.json cannot hold a NaN threshold any more (test_models), and the API's JSON provider never writes NaN."""
    from xraylib import serve

    nan_model = dataclasses.replace(loaded, metadata={**loaded.metadata,
                                                      "threshold": {**loaded.metadata["threshold"], "value": float("nan")}})
    import flask

    app = serve.create_app(serve.Analyser(nan_model))
    with app.app_context():  # what every answer of the API goes through (flask.jsonify -> app.json)
        text = flask.jsonify({"threshold": nan_model.threshold, "info": serve.Analyser(nan_model).info(),
                              "probabilities": np.array([np.nan, np.inf, 0.25])}).get_data(as_text=True)

    def refuse(token):
        raise AssertionError(f"invalid JSON token {token} in {text[:200]}")

    body = json.loads(text, parse_constant=refuse)
    assert body["threshold"] is None and body["info"]["threshold"] is None
    assert body["probabilities"] == [None, None, 0.25]
