"""Resizing, settings, normalisation and the resumable uint8 cache, on PNG/JPEG/DICOM files written here."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

import xraylib.images as images_module
import xraylib.preprocess as preprocess_module
from conftest import gradient_image, write_dicom, write_raster
from test_sources import make_ieee8023
from xraylib.errors import ConfigError, SourceError
from xraylib.fileio import WriteError, sha1_file, write_csv_atomic
from xraylib.images import read_image
from xraylib.manifest import build_manifest
from xraylib.parallel import opencv_threads
from xraylib.preprocess import (
    CROP_MODES, INTENSITY_MODES, NORMALISATION, PIXELS_VERSION, PreprocessSettings, cache_key, find_body_box,
    load_preprocessed, normalise, one_hot, preprocess_dataset, preprocess_file, preprocess_pixels, resize_image,
    standardise_intensity, to_rgb_float,
)
from xraylib.split import SplitLeakError

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR AS")

CLASSES = ("normal", "pneumonia", "covid")
SETTINGS = PreprocessSettings(image_size=48, resize="pad")


# --------------------------------------------------------------------------------------------
# A small manifest of real-format files


def write_image(path_stem: Path, index: int) -> Path:
    """Cycle through the formats users have: gray PNG, RGBA PNG, RGB JPEG, MONOCHROME2 DICOM."""
    pixels = gradient_image(60 + 7 * (index % 5), 50 + 11 * (index % 3), seed=index)
    kind = index % 4
    if kind == 0:
        return write_raster(path_stem.with_suffix(".png"), pixels)
    if kind == 1:
        rgba = np.dstack([pixels, pixels, 255 - pixels, np.full_like(pixels, 255)])
        return write_raster(path_stem.with_suffix(".png"), rgba)
    if kind == 2:
        return write_raster(path_stem.with_suffix(".jpeg"), np.dstack([pixels, pixels // 2, pixels]))
    return write_dicom(path_stem.with_suffix(".dcm"), pixels, patient_id=path_stem.name)


def make_split_manifest(root: Path, sizes: dict[str, int] | None = None) -> pd.DataFrame:
    """Rows with the manifest columns preprocessing uses; two images per patient, within one split."""
    sizes = sizes or {"train": 10, "val": 6, "test": 5}
    rows, index = [], 0
    for split, n in sizes.items():
        for i in range(n):
            path = write_image(root / "images" / f"{split}-{i:03d}", index)
            rows.append({"path": str(path), "label": CLASSES[index % 3], "source": "ieee8023",
                         "patient_id": f"ieee8023:{split}-{i // 2}", "sha1": sha1_file(path), "split": split})
            index += 1
    return pd.DataFrame(rows)


def run(manifest: pd.DataFrame, out: Path, settings: PreprocessSettings = SETTINGS, **kwargs):
    kwargs.setdefault("workers", 1)
    return preprocess_dataset(manifest, out, CLASSES, settings, progress=False, **kwargs)


def arrays(data) -> dict[str, np.ndarray]:
    return {name: np.array(split.images) for name, split in data.splits.items()}


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


def assert_rows_match_files(data, settings: PreprocessSettings = SETTINGS) -> None:
    """Every cached image is its manifest row's file, preprocessed; every label is that row's label."""
    for split in data.splits.values():
        assert len(split.images) == len(split.labels) == len(split.manifest)
        for i, row in enumerate(split.manifest.itertuples()):
            np.testing.assert_array_equal(split.images[i], preprocess_file(row.path, settings))
            assert CLASSES[split.labels[i]] == row.label and row.split == split.name and row.row == i


# ============================================================================================
# resize_image


def test_stretch_fills_the_square_and_distorts():
    image = np.zeros((40, 80), np.uint8)
    image[:, 40:] = 200
    out = resize_image(image, 64, "stretch")
    assert out.shape == (64, 64) and out.dtype == np.uint8
    assert (out[:, :30] == 0).all() and (out[:, 34:] == 200).all()
    big = resize_image(gradient_image(300, 200), 64, "stretch")
    assert big.shape == (64, 64)


def test_pad_keeps_aspect_with_black_bars_top_and_bottom():
    wide = np.full((40, 80), 255, np.uint8)
    out = resize_image(wide, 64, "pad")
    assert out.shape == (64, 64) and out.dtype == np.uint8
    # 80 -> 64 wide, so 40 -> 32 high, centred: 16 black rows above and below
    assert (out[:16] == 0).all() and (out[16:48] == 255).all() and (out[48:] == 0).all()


def test_pad_tall_image_gets_bars_left_and_right_and_content_is_undistorted():
    tall = gradient_image(100, 50, seed=3)
    out = resize_image(tall, 64, "pad")
    assert (out[:, :16] == 0).all() and (out[:, 48:] == 0).all()
    expected = cv2.resize(tall, (32, 64), interpolation=cv2.INTER_AREA)
    assert np.abs(out[:, 16:48].astype(int) - expected.astype(int)).max() <= 1


def test_pad_odd_sizes_centre_within_a_pixel():
    out = resize_image(np.full((33, 100), 255, np.uint8), 64, "pad")
    content_rows = np.flatnonzero(out.max(axis=1) > 0)
    top, bottom = content_rows[0], 63 - content_rows[-1]
    assert abs(top - bottom) <= 1 and len(content_rows) == round(33 * 0.64)


def test_pad_and_stretch_agree_on_square_images():
    square = gradient_image(90, 90, seed=1)
    np.testing.assert_array_equal(resize_image(square, 48, "pad"), resize_image(square, 48, "stretch"))


def test_unknown_resize_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="crop"):
        resize_image(gradient_image(), 64, "crop")


def _structured(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A large test image with edges, thin lines and pixel noise, where a poor shrink would show."""
    image = cv2.resize(gradient_image(96, 80, seed=seed), (width, height), interpolation=cv2.INTER_CUBIC).astype(float)
    image[height // 3 : height // 3 + 3] = 255  # a thin bright line, as a rib edge or a wire
    image += np.random.default_rng(seed).normal(0, 12, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("shape, mode", [((1024, 1024), "stretch"), ((1024, 768), "stretch"), ((2048, 1600), "pad"),
                                         ((1024, 1024), "pad")])
def test_large_images_are_halved_first_and_look_like_one_inter_area(shape, mode):
    image = _structured(*shape)
    direct = cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA) if mode == "stretch" else None
    out = resize_image(image, 64, mode)
    if direct is not None:
        assert np.abs(out.astype(float) - direct).mean() < 1.0
    else:  # the same placement as a direct INTER_AREA would give: the geometry comes from the full size
        scale = 64 / max(shape)
        new_h, new_w = round(shape[0] * scale), round(shape[1] * scale)
        top, left = (64 - new_h) // 2, (64 - new_w) // 2
        expected = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
        assert (out[:top] == 0).all() and (out[top + new_h:] == 0).all()
        assert np.abs(out[top:top + new_h, left:left + new_w].astype(float) - expected).mean() < 1.0


def test_odd_sized_and_small_images_are_resized_in_one_step():
    for image in (_structured(1023, 999), _structured(200, 180)):
        np.testing.assert_array_equal(resize_image(image, 64, "stretch"),
                                      cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA))


@pytest.mark.parametrize("source, output, products", [
    ((512, 512), (224, 224), True),  # a 1024 px image (RSNA, NIH) after the halving: 16/7 on both axes
    ((512, 384), (224, 168), True), ((448, 512), (224, 224), True),  # one axis an integer factor, the other 16/7
    ((2048, 1024), (224, 112), True), ((256, 256), (224, 224), True),
    ((1000, 1000), (224, 224), False), ((600, 512), (224, 224), False),  # 125/28, 75/28: weights not exact
    ((448, 448), (224, 224), False), ((4096, 4096), (512, 512), False),  # integer factors: OpenCV's own fast path
    ((100, 200), (224, 224), False),  # enlarging: OpenCV interpolates
    ((1024, 1024), (448, 448), True), ((1024, 1024), (300, 300), False),  # 16/7; 256/75: blocks too wide
    ((1024, 1024), (480, 480), False),  # 32/15: a band's product would go over OpenBLAS's threading threshold
    ((224, 512), (224, 224), False),  # one axis kept: OpenCV's loop
])
def test_area_resize_gives_opencvs_inter_area_bytes_and_takes_the_products_only_where_they_are_exact(
        source, output, products):
    rng = np.random.default_rng(sum(source))
    noise = rng.integers(0, 256, source, dtype=np.uint8)
    # noise, a smooth picture, and black and white pixels (whose means fall on halves most often: the rounding)
    for image in (noise, cv2.GaussianBlur(noise, (0, 0), 4), np.where(noise < 128, 0, 255).astype(np.uint8),
                  _structured(*source)):
        np.testing.assert_array_equal(preprocess_module.area_resize(image, output[1], output[0]),
                                      cv2.resize(image, output[::-1], interpolation=cv2.INTER_AREA))
    assert (preprocess_module._area_plan(*source, *output) is not None) == products


def test_area_resize_leaves_to_opencv_a_size_whose_products_differ_from_it(monkeypatch):
    preprocess_module._area_plan.cache_clear()
    real = preprocess_module._area_weights

    def off_by_one_sixteenth(source, output):  # exact-looking weights that are not OpenCV's
        block = real(source, output).copy()
        block[0, 0] -= 1 / 16
        block[1, 0] += 1 / 16
        return block

    monkeypatch.setattr(preprocess_module, "_area_weights", off_by_one_sixteenth)
    try:
        image = _structured(512, 512)
        assert preprocess_module._area_plan(512, 512, 224, 224) is None
        np.testing.assert_array_equal(preprocess_module.area_resize(image, 224, 224),
                                      cv2.resize(image, (224, 224), interpolation=cv2.INTER_AREA))
    finally:
        preprocess_module._area_plan.cache_clear()


@pytest.mark.parametrize("source, output, bands", [
    ((500, 500), (224, 224), 4),  # a 1000 px side after the halving: 125/56, bands of 125 rows
    ((512, 625), (224, 224), 4),  # 2048 px high, 2500 wide, after the halvings
    ((700, 477), (224, 224), 4), ((1000, 1000), (384, 384), 4),
    ((750, 750), (384, 384), 3),  # three bands
    ((625, 512), (224, 224), None), ((1791, 1600), (224, 224), None),  # heights that share no factor with 224
    ((750, 750), (224, 224), None),  # a factor of 2 only (two bands gained too little)
    ((448, 448), (224, 224), None), ((100, 200), (224, 224), None),  # OpenCV's fast path; enlarging
    ((512, 512), (224, 224), None),  # exact weights: the matrix products (_area_plan) come first
])
def test_area_resize_shrinks_bands_side_by_side_to_opencvs_bytes(source, output, bands):
    rng = np.random.default_rng(sum(source) + 1)
    noise = rng.integers(0, 256, source, dtype=np.uint8)
    with opencv_threads(1):  # (as in the cache's workers: bands at every output size)
        for image in (noise, cv2.GaussianBlur(noise, (0, 0), 4), np.where(noise < 128, 0, 255).astype(np.uint8),
                      _structured(*source), np.full(source, 255, np.uint8)):
            np.testing.assert_array_equal(preprocess_module.area_resize(image, output[1], output[0]),
                                          cv2.resize(image, output[::-1], interpolation=cv2.INTER_AREA))
    if preprocess_module._area_plan(*source, *output) is None:
        assert preprocess_module._band_plan(*source, *output) == bands
    if bands is not None:  # and the bands themselves, whatever area_resize took
        np.testing.assert_array_equal(preprocess_module._area_bands(noise, output[1], output[0], bands),
                                      cv2.resize(noise, output[::-1], interpolation=cv2.INTER_AREA))


def test_bands_are_left_to_opencvs_threads_where_it_shares_the_whole_image_among_them(monkeypatch):
    taken = []
    real = preprocess_module._area_bands
    monkeypatch.setattr(preprocess_module, "_area_bands", lambda *args: taken.append(args[2:]) or real(*args))
    image = _structured(1000, 1000)
    expected = cv2.resize(image, (384, 384), interpolation=cv2.INTER_AREA)
    with opencv_threads(2):  # 147,456 output pixels: OpenCV's two threads share the whole image
        np.testing.assert_array_equal(preprocess_module.area_resize(image, 384, 384), expected)
        assert not taken
        np.testing.assert_array_equal(preprocess_module.area_resize(image[:500, :500], 224, 224),
                                      cv2.resize(image[:500, :500], (224, 224), interpolation=cv2.INTER_AREA))
        assert taken == [(224, 4)]  # (50,176 output pixels: one part for OpenCV anyway)
    with opencv_threads(1):
        np.testing.assert_array_equal(preprocess_module.area_resize(image, 384, 384), expected)
        assert taken[-1] == (384, 4)


def test_opencvs_area_weights_are_computed_as_opencv_computes_them():
    rng = np.random.default_rng(11)
    sizes = [(int(source), int(rng.integers(1, source + 1))) for source in rng.integers(2, 1800, 120)]
    for source, output in sizes + [(7, 7), (1791, 224), (1000, 999), (224, 1), (997, 224)]:
        np.testing.assert_array_equal(preprocess_module._area_table(source, output),
                                      preprocess_module._opencv_area_weights(source, output), err_msg=f"{source}->{output}")


def test_bands_are_refused_where_the_weights_or_opencv_differ(monkeypatch):
    image = _structured(700, 477)
    expected = cv2.resize(image, (224, 224), interpolation=cv2.INTER_AREA)
    real = preprocess_module._area_entries
    assert all(preprocess_module._same_in_bands(*size) for size in ((500, 224, 4), (700, 224, 4), (750, 384, 3)))

    def one_weight_off(source, output):  # the whole image's last weight one float32 step off: not the bands'
        sources, targets, weights = real(source, output)
        if source == 700:  # (a size the check against OpenCV, _bands_are_opencvs, does not look at)
            weights = weights.copy()
            weights[-1] = np.nextafter(weights[-1], np.float32(1))
        return sources, targets, weights

    for patch, name, refuses in ((one_weight_off, "_area_entries", "_same_in_bands"),
                                 (lambda source, output: np.ones((source, output), np.float32), "_opencv_area_weights",
                                  "_bands_are_opencvs")):
        preprocess_module._band_plan.cache_clear()
        preprocess_module._bands_are_opencvs.cache_clear()
        with monkeypatch.context() as context, opencv_threads(1):
            context.setattr(preprocess_module, name, patch)
            assert preprocess_module._bands_are_opencvs() is (refuses != "_bands_are_opencvs")
            assert preprocess_module._same_in_bands(700, 224, 4) is (refuses != "_same_in_bands")
            assert preprocess_module._band_plan(700, 477, 224, 224) is None
            np.testing.assert_array_equal(preprocess_module.area_resize(image, 224, 224), expected)
        preprocess_module._band_plan.cache_clear()
        preprocess_module._bands_are_opencvs.cache_clear()
    assert preprocess_module._band_plan(700, 477, 224, 224) == 4


def test_area_resize_is_the_same_from_several_threads():
    images = [_structured(side, side, seed=seed) for seed in range(8) for side in (512, 500)]
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda image: preprocess_module.area_resize(image, 224, 224), images * 4))
    for image, out in zip(images * 4, outs):
        np.testing.assert_array_equal(out, cv2.resize(image, (224, 224), interpolation=cv2.INTER_AREA))


def test_large_jpeg_preprocesses_like_its_full_decode(tmp_path):
    path = write_raster(tmp_path / "big.jpg", np.dstack([_structured(1100, 900, seed=s) for s in range(3)]))
    settings = PreprocessSettings(image_size=112)
    full = cv2.resize(images_module.read_image(path), (112, 112), interpolation=cv2.INTER_AREA)
    out = preprocess_file(path, settings)  # decoded at 1/4 scale: 275 x 225, at least 1.5 x 112
    assert out.shape == (112, 112) and np.abs(out.astype(float) - full).mean() < 1.0
    np.testing.assert_array_equal(preprocess_module.preprocess_bytes(path.read_bytes(), str(path), settings), out)


# ============================================================================================
# PreprocessSettings, normalise, one_hot


@pytest.mark.parametrize("kwargs, word", [
    ({"resize": "crop"}, "resize"), ({"image_size": 16}, "image_size"), ({"image_size": 4096}, "image_size"),
    ({"image_size": 224.5}, "image_size"), ({"image_size": "224"}, "image_size"),
    ({"intensity": "gamma"}, "intensity must be one of ('none', 'equalize', 'clahe'), got 'gamma'"),
    ({"crop": "lungs"}, "crop must be one of ('none', 'body'), got 'lungs'"),
])
def test_settings_validation(kwargs, word):
    with pytest.raises(ConfigError, match=re.escape(word)):
        PreprocessSettings(**kwargs)


def test_settings_round_trip():
    settings = PreprocessSettings(image_size=128, resize="pad")
    data = settings.to_dict()
    assert data["stored_as"].startswith("uint8")
    assert PreprocessSettings.from_dict(data) == settings
    from_numpy = PreprocessSettings(image_size=np.int64(64))
    assert type(from_numpy.image_size) is int and json.loads(json.dumps(from_numpy.to_dict()))["image_size"] == 64
    for intensity in INTENSITY_MODES:
        for crop in CROP_MODES:
            options = PreprocessSettings(image_size=64, intensity=intensity, crop=crop)
            assert PreprocessSettings.from_dict(json.loads(json.dumps(options.to_dict()))) == options


def test_default_options_keep_the_json_and_the_cache_key_written_before_they_existed(tmp_path):
    """Caches and model.json files written before ``intensity`` and ``crop`` stay valid and read as "none"."""
    old_json = {"image_size": 48, "resize": "pad", "stored_as": "uint8 grayscale (N, S, S)"}
    assert SETTINGS.to_dict() == old_json
    old_model_json = {**old_json, "normalisation": "inside the model (layers to_rgb, normalise)", "pixels_version": 3}
    loaded = PreprocessSettings.from_dict(old_model_json)
    assert loaded == SETTINGS and (loaded.intensity, loaded.crop) == ("none", "none") and loaded.describe() == ""

    manifest = pd.DataFrame({"path": ["a.png", "b.png"], "sha1": ["1", "2"], "label": ["covid", "normal"],
                             "split": ["train", "test"]})
    old_key = hashlib.sha1(json.dumps({"settings": old_json, "classes": list(CLASSES), "pixels_version": PIXELS_VERSION},
                                      sort_keys=True).encode())
    old_key.update(b"a.png\t1\tcovid\ttrain\nb.png\t2\tnormal\ttest\n")
    assert cache_key(manifest, CLASSES, SETTINGS) == old_key.hexdigest()
    keys = {cache_key(manifest, CLASSES, PreprocessSettings(image_size=48, resize="pad", intensity=i, crop=c))
            for i in INTENSITY_MODES for c in CROP_MODES}
    assert len(keys) == len(INTENSITY_MODES) * len(CROP_MODES)  # every option builds its own cache
    assert PreprocessSettings(intensity="clahe", crop="body").describe() == "crop=body, intensity=clahe"


def test_caffe_is_bgr_minus_the_imagenet_mean():
    rgb = np.array([[[10.0, 20.0, 30.0]]], np.float32)
    for backbone in ("vgg16", "resnet50"):
        np.testing.assert_allclose(normalise(rgb, backbone)[0, 0], [30 - 103.939, 20 - 116.779, 10 - 123.68], rtol=1e-6)


def test_tf_mode_maps_to_minus_one_one():
    values = np.array([0.0, 127.5, 255.0], np.float32)
    rgb = np.repeat(values[:, None], 3, axis=1)
    np.testing.assert_allclose(normalise(rgb, "mobilenet")[:, 0], [-1.0, 0.0, 1.0], atol=1e-6)
    assert normalise(rgb, "mobilenet_v2").min() >= -1 and normalise(rgb, "mobilenet_v2").max() <= 1


def test_torch_and_unit_modes():
    white = np.full((1, 1, 3), 255.0, np.float32)
    black = np.zeros((1, 1, 3), np.float32)
    # torch: 0..1 over the ImageNet std per channel. Only the scale is pinned here: the means must stay
    # whatever xraylib.models' Normalization layer uses, so display and model cannot drift apart.
    np.testing.assert_allclose((normalise(white, "densenet121") - normalise(black, "densenet121"))[0, 0],
                               [1 / 0.229, 1 / 0.224, 1 / 0.225], rtol=1e-5)
    assert np.all(normalise(black, "densenet121") < -1.7) and np.all(normalise(white, "densenet121") > 2.2)
    np.testing.assert_allclose(normalise(white, "small_cnn"), 1.0)
    with pytest.raises(ConfigError, match="inception"):
        normalise(white, "inception")
    assert set(NORMALISATION.values()) == {"caffe", "torch", "tf", "unit"}


def test_to_rgb_float_replicates_the_gray_channel():
    images = np.stack([gradient_image(48, 48, seed=s) for s in range(2)])
    rgb = to_rgb_float(images)
    assert rgb.shape == (2, 48, 48, 3) and rgb.dtype == np.float32
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], images)


def test_one_hot_follows_class_order_and_rejects_unknown_labels():
    np.testing.assert_array_equal(one_hot(pd.Series(["covid", "normal", "covid"]), ("normal", "covid")),
                                  [[0, 1], [1, 0], [0, 1]])
    assert one_hot(["normal"], ("normal", "covid")).dtype == np.float32
    with pytest.raises(ConfigError, match="pneumonia"):
        one_hot(["covid", "pneumonia"], ("normal", "covid"))


# ============================================================================================
# preprocess_dataset


def test_preprocess_dataset_end_to_end(tmp_path):
    manifest = make_split_manifest(tmp_path / "src")
    data = run(manifest, tmp_path / "out")
    assert data.classes == CLASSES and data.settings == SETTINGS
    for name, n in {"train": 10, "val": 6, "test": 5}.items():
        images = data[name].images
        assert isinstance(images, np.memmap) and images.shape == (n, 48, 48) and images.dtype == np.uint8
    assert_rows_match_files(data)
    assert data.report["new"] == 21 and data.report["cached"] == 0 and data.report["problems"] == []
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {
        "train_images.npy", "val_labels.npy", "manifest.csv", "preprocess.json"}
    assert not list((tmp_path / "out").glob("*partial*")) and not list((tmp_path / "out").glob(".*tmp"))
    np.testing.assert_array_equal(data["val"].one_hot.argmax(axis=1), data["val"].labels)
    # the folder can be opened alone, as notebook 03 does
    reopened = load_preprocessed(tmp_path / "out")
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(reopened[name].images, data[name].images)


def test_bad_file_is_reported_and_left_out(tmp_path):
    manifest = make_split_manifest(tmp_path / "src")
    bad = Path(manifest.loc[3, "path"])  # a train row
    bad.write_bytes(bad.read_bytes()[:100])
    data = run(manifest, tmp_path / "out")
    [problem] = data.report["problems"]
    assert problem["path"] == str(bad) and problem["reason"]
    assert data.report["skipped"] == 1
    assert len(data["train"]) == 9 and str(bad) not in set(data["train"].manifest["path"])
    assert len(data["val"]) == 6 and len(data["test"]) == 5
    assert_rows_match_files(data)  # the rows after the bad one did not shift


def test_second_call_does_no_work(tmp_path, monkeypatch):
    manifest = make_split_manifest(tmp_path / "src")
    first = run(manifest, tmp_path / "out")
    before = mtimes(tmp_path / "out")
    calls = []
    monkeypatch.setattr(preprocess_module, "_work", lambda job: calls.append(job))
    second = run(manifest, tmp_path / "out")
    assert calls == []
    assert second.report["new"] == 0 and second.report["cached"] == 21
    assert mtimes(tmp_path / "out") == before
    for name, images in arrays(first).items():
        np.testing.assert_array_equal(second[name].images, images)


def test_a_cache_made_before_the_site_column_is_reused_and_gets_sites(tmp_path, monkeypatch):
    manifest = make_split_manifest(tmp_path / "src").assign(source="nih")
    run(manifest, tmp_path / "out")
    cached = pd.read_csv(tmp_path / "out" / "manifest.csv")
    assert "site" not in cached.columns  # as an older xraylib wrote it
    calls = []
    monkeypatch.setattr(preprocess_module, "_work", lambda job: calls.append(job))
    # The manifest now has sites; the cache's key does not depend on them, so nothing is decoded again.
    again = run(manifest.assign(site="nih+rsna"), tmp_path / "out")
    assert calls == [] and again.report["new"] == 0
    for data in (again, load_preprocessed(tmp_path / "out")):
        assert (data.manifest["site"] == "nih+rsna").all()  # NIH's record: one hospital with RSNA


def test_changed_settings_rebuild(tmp_path):
    manifest = make_split_manifest(tmp_path / "src")
    run(manifest, tmp_path / "out")
    settings = PreprocessSettings(image_size=32, resize="stretch")
    data = run(manifest, tmp_path / "out", settings)
    assert data.report["new"] == 21 and data["train"].images.shape == (10, 32, 32)
    assert data.settings == settings
    assert_rows_match_files(data, settings)


def test_a_cache_built_by_other_decoding_code_is_rebuilt(tmp_path, monkeypatch):
    """When the decode-and-resize code changes what pixels it gives (PIXELS_VERSION), neither the preprocessed
    cache nor the bottleneck features built from the old pixels are reused."""
    from xraylib import features, models

    manifest = make_split_manifest(tmp_path / "src")
    run(manifest, tmp_path / "out")
    spec = models.ModelSpec(backbone="small_cnn", weights=None, image_size=SETTINGS.image_size, classes=CLASSES)
    model = models.build_model(spec)
    old_key = features.cache_key(features.describe(model, spec, SETTINGS))
    monkeypatch.setattr(preprocess_module, "PIXELS_VERSION", preprocess_module.PIXELS_VERSION + 1)
    monkeypatch.setattr(features, "PIXELS_VERSION", preprocess_module.PIXELS_VERSION)
    again = run(manifest, tmp_path / "out")
    assert again.report["new"] == 21 and again.report["cached"] == 0
    assert features.cache_key(features.describe(model, spec, SETTINGS)) != old_key


def test_changed_image_rebuilds(tmp_path):
    manifest = make_split_manifest(tmp_path / "src")
    old = arrays(run(manifest, tmp_path / "out"))
    path = Path(manifest.loc[12, "path"])  # a val row, a DICOM
    write_dicom(path, 255 - gradient_image(64, 64, seed=99))
    changed = manifest.assign(sha1=[sha1_file(p) for p in manifest["path"]])
    assert changed.loc[12, "sha1"] != manifest.loc[12, "sha1"]
    data = run(changed, tmp_path / "out")
    assert data.report["new"] == 21
    row = data["val"].manifest.index[data["val"].manifest["path"] == str(path)].item()
    np.testing.assert_array_equal(data["val"].images[row], preprocess_file(path, SETTINGS))
    assert not np.array_equal(data["val"].images[row], old["val"][row])
    assert_rows_match_files(data)


def test_a_file_replaced_after_the_manifest_was_built_is_skipped_and_named(tmp_path):
    """The manifest's SHA-1 is compared with the bytes read: a PNG replaced by another real PNG is not used silently."""
    root = make_ieee8023(tmp_path / "covid-chestxray-dataset")
    frame = build_manifest({"covid_chestxray_dataset": root}, progress=False, workers=1).frame.assign(split="train")
    replaced = Path(frame.loc[frame["path"].str.endswith(".png"), "path"].iloc[0])
    write_raster(replaced, gradient_image(80, 70, seed=4321))  # another real PNG under the same name
    assert sha1_file(replaced) != frame.loc[frame["path"] == str(replaced), "sha1"].item()

    data = run(frame, tmp_path / "cache")
    [problem] = data.report["problems"]
    assert problem["path"] == str(replaced) and data.report["skipped"] == 1
    assert problem["reason"].startswith("changed since the manifest was built (content differs: SHA-1 ")
    assert f"{replaced.stat().st_size} bytes); rebuild the manifest" in problem["reason"]
    assert sorted(data.manifest["path"]) == sorted(set(frame["path"]) - {str(replaced)})
    assert_rows_match_files(data)

    # A manifest without hashes (made by hand) is still preprocessed, every file used as it is now.
    unhashed = run(frame.drop(columns=["sha1"]), tmp_path / "cache-unhashed")
    assert unhashed.report["skipped"] == 0 and sorted(unhashed.manifest["path"]) == sorted(frame["path"])


def _done_before_interrupt(sizes: list[int], calls_ok: int, chunk: int) -> int:
    """Rows whose chunk was finished (and saved) before the call after ``calls_ok`` raised."""
    done, remaining = 0, calls_ok
    for n in sizes:
        if remaining >= n:
            done, remaining = done + n, remaining - n
        else:
            return done + (remaining // chunk) * chunk
    return done


@pytest.mark.parametrize("calls_ok", [0, 6, 13, 19])
def test_interrupted_run_resumes_where_it_stopped(tmp_path, monkeypatch, calls_ok):
    manifest = make_split_manifest(tmp_path / "src")
    bad = Path(manifest.loc[1, "path"])  # unreadable, in the first chunk: its reason must survive the resume
    bad.write_text("not an image\n")
    reference = run(manifest, tmp_path / "reference")

    real_work = preprocess_module._work
    calls = []

    def interrupted(job):
        if len(calls) == calls_ok:
            raise KeyboardInterrupt
        calls.append(job[0])
        return real_work(job)

    monkeypatch.setattr(preprocess_module, "_work", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(manifest, tmp_path / "out", chunk_size=4)
    with pytest.raises(SourceError, match="no finished"):
        load_preprocessed(tmp_path / "out")

    resumed_calls = []
    monkeypatch.setattr(preprocess_module, "_work", lambda job: resumed_calls.append(job[0]) or real_work(job))
    data = run(manifest, tmp_path / "out", chunk_size=4)
    done = _done_before_interrupt([10, 6, 5], calls_ok, 4)
    assert len(resumed_calls) == 21 - done  # nothing finished before is decoded again
    good_done = done - (1 if done > 1 else 0)  # row 1, the unreadable file, is not "new" or "cached"
    assert data.report["new"] == 20 - good_done and data.report["cached"] == good_done
    assert data.report["problems"] == reference.report["problems"] and data.report["problems"][0]["path"] == str(bad)
    for name, images in arrays(reference).items():
        np.testing.assert_array_equal(data[name].images, images)
    pd.testing.assert_frame_equal(data.manifest, reference.manifest)


def test_two_workers_give_the_same_arrays_as_one_from_one_pool_per_call(tmp_path, monkeypatch):
    manifest = make_split_manifest(tmp_path / "src", {"train": 40, "val": 2, "test": 3})
    pools = []
    real_pool = preprocess_module._pool
    monkeypatch.setattr(preprocess_module, "_pool",
                        lambda workers, processes: pools.append(real_pool(workers, processes)) or pools[-1])
    one = run(manifest, tmp_path / "one", workers=1)
    assert pools == [None]  # one worker: decoded in the calling thread
    threads = []
    real_work = preprocess_module._work
    monkeypatch.setattr(preprocess_module, "_work", lambda job: threads.append(threading.current_thread()) or real_work(job))
    two = run(manifest, tmp_path / "two", workers=2)
    # One pool for the whole call, not one per split: its start-up is paid once.
    assert len(pools) == 2 and isinstance(pools[1], ThreadPoolExecutor) and pools[1]._max_workers == 2
    assert len(threads) == 45 and threading.main_thread() not in threads and len(set(threads)) <= 2
    for name, images in arrays(one).items():
        np.testing.assert_array_equal(two[name].images, images)
    pd.testing.assert_frame_equal(two.manifest, one.manifest)


def test_worker_processes_give_what_threads_give_and_report_the_same_bad_files(tmp_path, monkeypatch):
    manifest = make_split_manifest(tmp_path / "src", {"train": 24, "val": 4, "test": 4})
    # A damaged file and a file changed since the manifest was built, in the middle of the stream.
    Path(manifest.loc[5, "path"]).write_bytes(b"not an image at all")
    manifest.loc[9, "sha1"] = "0" * 40
    pools = []
    real_pool = preprocess_module._pool
    monkeypatch.setattr(preprocess_module, "_pool",
                        lambda workers, processes: pools.append(real_pool(workers, processes)) or pools[-1])
    threads = run(manifest, tmp_path / "threads", workers=2, processes=False, chunk_size=5)
    processes = run(manifest, tmp_path / "processes", workers=2, processes=True, chunk_size=5)
    assert isinstance(pools[0], ThreadPoolExecutor) and isinstance(pools[1], ProcessPoolExecutor)
    for name, images in arrays(threads).items():
        np.testing.assert_array_equal(arrays(processes)[name], images)
    pd.testing.assert_frame_equal(processes.manifest, threads.manifest)
    assert processes.report["problems"] == threads.report["problems"] and processes.report["skipped"] == 2
    reasons = {Path(p["path"]).name: p["reason"] for p in processes.report["problems"]}
    assert "changed since the manifest was built" in reasons[Path(manifest.loc[9, "path"]).name]
    assert len(processes.manifest) == len(manifest) - 2


def test_worker_processes_resume_an_interrupted_cache_at_the_right_rows(tmp_path, monkeypatch):
    """Stopped after the train split's first chunk was saved (rows 0-3), then resumed in worker processes, which
    write the rows left into the partial file at their offsets: the same cache as one uninterrupted run."""
    manifest = make_split_manifest(tmp_path / "src")  # 10 train, 6 val, 5 test
    reference = run(manifest, tmp_path / "reference", workers=1)
    real_save = preprocess_module.save_npy_atomic
    saves = []

    def stop_at_the_second_chunk(path, array):
        if Path(path).name == "train_status.npy":
            saves.append(int((array == 1).sum()))
            if len(saves) == 3:  # made, first chunk saved, then interrupted before the second is
                raise KeyboardInterrupt
        real_save(path, array)

    monkeypatch.setattr(preprocess_module, "save_npy_atomic", stop_at_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        run(manifest, tmp_path / "out", workers=2, processes=True, chunk_size=4)
    monkeypatch.setattr(preprocess_module, "save_npy_atomic", real_save)
    assert saves[:2] == [0, 4] and np.load(tmp_path / "out" / "train_status.npy").tolist()[:5] == [1, 1, 1, 1, 0]
    # The rows not recorded as done hold junk (the interrupted run may have written them): the resumed run's workers
    # must write every one of them again.
    for split, first in (("train", 4), ("val", 0), ("test", 0)):
        partial = np.load(tmp_path / "out" / f"{split}_images.partial.npy", mmap_mode="r+")
        partial[first:] = 0xAB
        partial.flush()
        del partial
    pools = []
    real_pool = preprocess_module._pool
    monkeypatch.setattr(preprocess_module, "_pool",
                        lambda workers, processes: pools.append(real_pool(workers, processes)) or pools[-1])
    data = run(manifest, tmp_path / "out", workers=2, processes=True, chunk_size=4)
    assert len(pools) == 1 and isinstance(pools[0], ProcessPoolExecutor)
    assert data.report["cached"] == 4 and data.report["new"] == 17
    for name, images in arrays(reference).items():
        np.testing.assert_array_equal(data[name].images, images)
    pd.testing.assert_frame_equal(data.manifest, reference.manifest)


def test_a_worker_writes_only_its_own_row_and_refuses_a_wrong_size_or_a_replaced_cache_file(tmp_path):
    path = tmp_path / "train_images.partial.npy"
    cache = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(3, 4, 4))
    offset, stride = cache.offset, cache.strides[0]
    del cache
    identity = (path.stat().st_dev, path.stat().st_ino)
    preprocess_module._write_row((str(path), offset + stride, stride, identity), np.full((4, 4), 7, np.uint8))
    assert np.load(path).reshape(3, 16).tolist() == [[0] * 16, [7] * 16, [0] * 16]

    with pytest.raises(ValueError, match=r"does not fit a cache row of 16 bytes"):
        preprocess_module._write_row((str(path), offset, stride, identity), np.full((5, 4), 9, np.uint8))
    # Another call replaced the file under the same name (a fresh cache): a worker of the old call must not write
    # into it.
    np.save(tmp_path / "other.npy", np.zeros((3, 4, 4), np.uint8))
    os.replace(tmp_path / "other.npy", path)
    with pytest.raises(FileNotFoundError, match="replaced while preprocessing"):
        preprocess_module._write_row((str(path), offset, stride, identity), np.full((4, 4), 9, np.uint8))
    assert not np.load(path).any()


def test_the_default_takes_processes_for_many_files_in_a_notebook_only(tmp_path, monkeypatch):
    manifest = make_split_manifest(tmp_path / "src", {"train": 4, "val": 2, "test": 2})
    chosen = []
    monkeypatch.setattr(preprocess_module, "_pool", lambda workers, processes: chosen.append(processes))
    monkeypatch.setattr(preprocess_module, "PROCESS_MIN_FILES", 8)
    run(manifest, tmp_path / "a", workers=2)  # under pytest, __main__ is a script: threads
    monkeypatch.setattr(preprocess_module, "script_safe_for_processes", lambda: True)  # as in a notebook
    run(manifest, tmp_path / "b", workers=2)
    run(manifest.iloc[:7], tmp_path / "c", workers=2)  # fewer files than PROCESS_MIN_FILES
    run(manifest, tmp_path / "d", workers=2, opener=lambda path, mode: open(path, mode))  # an opener: threads
    assert chosen == [False, True, False, False]
    with pytest.raises(ConfigError, match="processes=True"):
        run(manifest, tmp_path / "e", workers=2, processes=True, opener=lambda path, mode: open(path, mode))


def test_inputs_are_checked_before_any_work(tmp_path):
    manifest = make_split_manifest(tmp_path / "src", {"train": 2, "val": 2, "test": 2})
    with pytest.raises(ConfigError, match="split"):
        run(manifest.drop(columns="split"), tmp_path / "out")
    renamed = manifest.replace({"split": {"val": "validation"}})
    with pytest.raises(ConfigError, match="validation"):
        run(renamed, tmp_path / "out")
    leaky = manifest.assign(patient_id="ieee8023:same-patient")
    with pytest.raises(SplitLeakError, match="ieee8023:same-patient"):
        run(leaky, tmp_path / "out")
    with pytest.raises(ConfigError, match="pneumonia"):
        preprocess_dataset(manifest, tmp_path / "out", ("normal", "covid"), SETTINGS, workers=1, progress=False)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.npy"))


def test_empty_split_is_allowed(tmp_path):
    manifest = make_split_manifest(tmp_path / "src", {"train": 3, "test": 2})
    data = run(manifest, tmp_path / "out")
    assert data["val"].images.shape == (0, 48, 48) and len(data["val"]) == 0
    assert len(data["train"]) == 3 and len(data["test"]) == 2


def test_load_preprocessed_without_cache_is_a_source_error(tmp_path):
    with pytest.raises(SourceError, match="preprocess"):
        load_preprocessed(tmp_path)


def test_deleting_preprocess_json_forces_a_rebuild(tmp_path):
    manifest = make_split_manifest(tmp_path / "src")
    run(manifest, tmp_path / "out")
    (tmp_path / "out" / "preprocess.json").unlink()  # what a user does to "start again"
    settings = PreprocessSettings(image_size=32, resize="stretch")
    data = run(manifest, tmp_path / "out", settings)
    assert data.report["new"] == 21
    assert all(split.images.shape[1:] == (32, 32) for split in data.splits.values())
    assert_rows_match_files(data, settings)


# ============================================================================================
# Intensity standardisation and the body crop


BODY = (40, 265, 30, 230)  # top, bottom, left, right of the body in the framed test image (58% of it)


def framed_chest(frame_value: int = 0) -> np.ndarray:
    """A 300x260 image: a textured body (grey 40..215) on a uniform frame, white text and a white marker
    block in the frame near the edges, as scanned films and exported JPEGs have them."""
    image = np.full((300, 260), frame_value, dtype=np.uint8)
    top, bottom, left, right = BODY
    image[top:bottom, left:right] = (gradient_image(bottom - top, right - left, seed=3) * 0.7 + 40).astype(np.uint8)
    image[8:30, 175:250] = 255  # a burned-in label block, top right
    cv2.putText(image, "R L", (6, 290), cv2.FONT_HERSHEY_SIMPLEX, 0.6, 255, 2)  # letters, bottom left
    return image


@pytest.mark.parametrize("frame_value", [0, 128, 255])
def test_body_crop_keeps_the_body_and_drops_the_frame_and_the_text(tmp_path, frame_value):
    path = write_raster(tmp_path / "framed.png", framed_chest(frame_value))
    box = find_body_box(read_image(path))
    top, bottom, left, right = BODY
    slack = 10  # the safety margin (2% of the body's side) and rounding
    assert top - slack <= box.top <= top and bottom <= box.bottom <= bottom + slack
    assert left - slack <= box.left <= left and right <= box.right <= right + slack

    cropped = preprocess_file(path, PreprocessSettings(image_size=64, crop="body"))
    whole = preprocess_file(path, PreprocessSettings(image_size=64))
    inside_margin = cropped[2:-2, 2:-2]  # the safety margin may keep a pixel of the frame
    assert (whole == 255).sum() > 20 and inside_margin.max() < 240  # the text is gone: the body's brightest is 215
    if frame_value == 0:
        assert (whole < 10).mean() > 0.3 and (cropped < 10).mean() < 0.1  # the body fills all but the safety margin


@pytest.mark.parametrize("resize", ["stretch", "pad"])
@pytest.mark.parametrize("pixels", [
    np.zeros((200, 180), np.uint8), np.full((200, 180), 255, np.uint8), np.full((40, 40), 90, np.uint8),
    np.zeros((1, 1), np.uint8), np.full((2, 300), 200, np.uint8), np.arange(300, dtype=np.uint8).reshape(300, 1),
    np.random.default_rng(0).integers(0, 256, (33, 1000), dtype=np.uint8),
], ids=["black", "white", "grey", "1x1", "2x300", "300x1", "noise"])
def test_blank_tiny_and_odd_images_never_crash(pixels, resize):
    box = find_body_box(pixels)
    if np.ptp(pixels) == 0 or min(pixels.shape) < 8:  # nothing to find: the whole image
        assert box == (0, pixels.shape[0], 0, pixels.shape[1])
    assert (box.bottom - box.top) * (box.right - box.left) >= 0.5 * pixels.size
    for intensity in INTENSITY_MODES:
        out = preprocess_pixels(pixels, PreprocessSettings(image_size=32, resize=resize, intensity=intensity, crop="body"))
        assert out.shape == (32, 32) and out.dtype == np.uint8


def test_equalize_and_clahe_spread_a_low_contrast_image():
    low = (100 + gradient_image(120, 100, seed=1) // 5).astype(np.uint8)  # grey 100..150
    spread = np.ptp(np.percentile(low, (1, 99)))
    equalized = standardise_intensity(low, "equalize")
    assert equalized.min() == 0 and equalized.max() == 255
    assert np.ptp(np.percentile(equalized, (1, 99))) > 4 * spread
    order = np.argsort(low, axis=None, kind="stable")
    assert np.all(np.diff(equalized.ravel()[order].astype(int)) >= 0)  # a global mapping keeps the order of grey levels
    assert np.ptp(np.percentile(standardise_intensity(low, "clahe"), (1, 99))) > 1.25 * spread  # clipped: less than global
    np.testing.assert_array_equal(standardise_intensity(low, "none"), low)


def test_intensity_applies_to_the_picture_not_its_padding():
    tall = (60 + gradient_image(120, 60, seed=2) // 3).astype(np.uint8)
    for intensity in ("equalize", "clahe"):
        out = preprocess_pixels(tall, PreprocessSettings(image_size=64, resize="pad", intensity=intensity))
        assert (out[:, :16] == 0).all() and (out[:, 48:] == 0).all()  # the bars stay black
        expected = standardise_intensity(cv2.resize(tall, (32, 64), interpolation=cv2.INTER_AREA), intensity)
        np.testing.assert_array_equal(out[:, 16:48], expected)


def test_the_cache_preprocesses_with_the_options(tmp_path):
    """The cache stores what preprocess_file (the function prediction uses) gives with the same settings."""
    settings = PreprocessSettings(image_size=32, intensity="clahe", crop="body")
    data = run(make_split_manifest(tmp_path / "src", {"train": 4, "val": 2, "test": 2}), tmp_path / "out", settings)
    assert data.settings == settings and load_preprocessed(tmp_path / "out").settings == settings
    assert_rows_match_files(data, settings)


@pytest.mark.shared_data
def test_body_crop_on_real_images_cuts_only_background(shared_data):
    """On a real ieee8023 JPEG with black bands above and below the film, the crop removes them; on NIH PNGs,
    which fill their frame, it keeps nearly everything. Whatever is cut is dark."""
    banded = shared_data / "covid-chestxray-dataset" / "images" / "covid-19-pneumonia-8.jpg"
    nih = sorted((shared_data / "nih-chestxray14" / "images").glob("*.png"))[:3]
    if not banded.is_file() or not nih:
        pytest.skip(f"{banded} or NIH PNGs not in {shared_data}")
    for path in [banded, *nih]:
        pixels = read_image(path)
        box = find_body_box(pixels)
        kept = (box.bottom - box.top) * (box.right - box.left) / pixels.size
        removed = np.ones(pixels.shape, bool)
        removed[box.top:box.bottom, box.left:box.right] = False
        if path == banded:
            assert kept < 0.8, f"{path.name}: the black bands were kept ({box})"
        else:
            assert kept > 0.9, f"{path.name}: a full-frame image lost {1 - kept:.0%} ({box})"
        assert not removed.any() or np.percentile(pixels[removed], 95) < 40, f"{path.name}: bright pixels cut ({box})"
        for intensity in INTENSITY_MODES:
            out = preprocess_file(path, PreprocessSettings(image_size=64, intensity=intensity, crop="body"))
            assert out.shape == (64, 64) and np.ptp(out) > 100


# ============================================================================================
# A full disk: the memory-mapped cache is checked before it is allocated


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 2 MB file system (tmpfs) mounted for the test and unmounted after it, even when the test fails;
    the test is skipped where mounting is not permitted (not root, or a container without the capability)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs to fill up here ({exc})")
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up here (needs root): {result.stderr.strip() or result.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


# Run in a child process: should the check fail, writing the array on the full disk kills with SIGBUS, and that
# must not be the test process. Exit 3 and one line on a WriteError.
_PREPROCESS_CHILD = """
import sys
import pandas as pd
from xraylib import preprocess
from xraylib.fileio import WriteError
manifest, out, mode, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
opened = []
def opener(path, how):  # "fill-during": another program fills the disk while the second image is read
    opened.append(path)
    if mode == "fill-during" and len(opened) == 2:
        with open(sys.argv[5], "wb") as filler:
            try:
                while True:
                    filler.write(bytes(65536))
                    filler.flush()
            except OSError:
                pass
    return open(path, how)
if mode != "checked":
    preprocess._check_free_space = lambda *args: None
# "processes": the rows are written by worker processes (with write(), not through the memory map)
workers = {"processes": {"workers": 2, "processes": True}}.get(mode, {"workers": 1, "opener": opener})
try:
    preprocess.preprocess_dataset(pd.read_csv(manifest, dtype=str), out, ("normal", "pneumonia", "covid"),
                                  preprocess.PreprocessSettings(image_size=size), progress=False, **workers)
except WriteError as exc:
    print(exc)
    sys.exit(3)
print("finished")
"""


def _preprocess_in_child(manifest_csv: Path, out: Path, mode: str = "checked", size: int = 512,
                         filler: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                      os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", _PREPROCESS_CHILD, str(manifest_csv), str(out), mode, str(size),
                           str(filler)], capture_output=True, text=True, timeout=120, env=env)


def test_a_cache_larger_than_the_free_space_is_refused_before_anything_is_allocated(tmp_path):
    """On any disk: more images than fit (rows only; no file is read before the check) is one clear error."""
    free = shutil.disk_usage(tmp_path).free
    size = 2048
    n = free // (size * size) + 2
    rows = pd.DataFrame({"path": [str(tmp_path / f"{i}.png") for i in range(n)], "label": "normal", "source": "mine",
                         "patient_id": [f"mine:{i}" for i in range(n)], "sha1": "0" * 40, "split": "train"})
    with pytest.raises(WriteError) as info:
        run(rows, tmp_path / "out", PreprocessSettings(image_size=size))
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'out'}: not enough free space for the preprocessed {n} images of 2048x2048: ")
    assert f"needs {(128 + n * size * size) / 2**20:.1f} MB" in message and " MB free; free some space" in message
    assert isinstance(info.value, ConfigError) and "\n" not in message
    assert not any((tmp_path / "out").glob("*.npy"))


def test_a_full_disk_is_refused_before_the_memory_mapped_cache_gets_sigbus(tmp_path, small_tmpfs):
    """On a real 2 MB tmpfs, 12 images of 512x512 (3 MB): refused up front with the folder, the space needed and
    free, no partial file left; without the check the same run dies of SIGBUS (exit 135 in a shell), no message."""
    manifest = make_split_manifest(tmp_path / "src", {"train": 12, "val": 0, "test": 0})
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    out = small_tmpfs / "cache"

    checked = _preprocess_in_child(tmp_path / "manifest.csv", out)
    assert checked.returncode == 3, checked.stdout + checked.stderr
    message = checked.stdout.strip()
    assert message.startswith(f"{out}: not enough free space for the preprocessed 12 images of 512x512: needs 3.0 MB")
    assert "MB free; free some space or choose another output folder" in message and "\n" not in message
    assert not list(out.glob("*.npy"))

    unchecked = _preprocess_in_child(tmp_path / "manifest.csv", small_tmpfs / "unchecked", "unchecked")
    assert unchecked.returncode == -signal.SIGBUS, unchecked.stdout + unchecked.stderr[-2000:]


def test_a_disk_filled_after_the_check_is_one_clear_error_and_leaves_no_partial_file(tmp_path, small_tmpfs, monkeypatch):
    """The disk fills up between the space check and the writes (another program): ENOSPC on the first file written
    is one clear error naming it, and no partial file is left; so is an atomic CSV write on the full disk."""
    monkeypatch.setattr(preprocess_module, "_check_free_space", lambda *args: None)  # passed, then the disk filled up
    manifest = make_split_manifest(tmp_path / "src", {"train": 2, "val": 0, "test": 0})
    out = small_tmpfs / "cache"
    out.mkdir()
    with open(small_tmpfs / "filler", "wb") as filler:  # fill the file system to the last byte
        block = b"\xff" * 65536
        try:
            while True:
                filler.write(block)
                filler.flush()
        except OSError:
            pass
    with pytest.raises(WriteError) as info:
        run(manifest, out, PreprocessSettings(image_size=32))
    assert "No space left on device" in str(info.value) and "free some space" in str(info.value)
    assert str(info.value).startswith(str(out / "preprocess.json")) and info.value.errno == 28
    assert not [p.name for p in out.iterdir() if p.name.endswith((".npy", ".tmp"))]

    with pytest.raises(WriteError) as info:
        write_csv_atomic(small_tmpfs / "predictions.csv", manifest)
    assert str(info.value) == (f"{small_tmpfs / 'predictions.csv'}: cannot be written (No space left on device); "
                               "free some space, or write elsewhere")
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["cache", "filler"]


def test_a_disk_filling_up_during_preprocessing_removes_the_partial_files(tmp_path, small_tmpfs):
    """The disk fills up while the train images are decoded (the array's one page is already allocated, so no
    SIGBUS): the next write fails with ENOSPC, and the partial array and status, which hold space, are removed."""
    manifest = make_split_manifest(tmp_path / "src", {"train": 2, "val": 0, "test": 0})
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    out = small_tmpfs / "cache"
    result = _preprocess_in_child(tmp_path / "manifest.csv", out, "fill-during", 32, small_tmpfs / "filler")
    assert result.returncode == 3, result.stdout + result.stderr[-2000:]
    assert result.stdout.strip() == (f"{out}: the disk filled up while preprocessing the train images (No space left on "
                                     "device); their partial files were removed: free some space or choose another "
                                     "output folder")
    assert sorted(p.name for p in out.iterdir()) == ["preprocess.json"]  # says "not complete": the next run starts again


def test_worker_processes_that_fill_the_disk_stop_the_call_with_one_clear_error(tmp_path, small_tmpfs):
    """Unchecked, 12 images of 512x512 (3 MB) on a 2 MB tmpfs, written by worker processes: their writes fail with
    ENOSPC (no SIGBUS: they do not write through a memory map), and the call ends with the disk-full error, its
    partial files removed, not with a worker's traceback or a "bad file" per row."""
    manifest = make_split_manifest(tmp_path / "src", {"train": 12, "val": 0, "test": 0})
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    out = small_tmpfs / "cache"
    result = _preprocess_in_child(tmp_path / "manifest.csv", out, "processes")
    assert result.returncode == 3, result.stdout + result.stderr[-2000:]
    assert result.stdout.strip() == (f"{out}: the disk filled up while preprocessing the train images (No space left on "
                                     "device); their partial files were removed: free some space or choose another "
                                     "output folder")
    assert sorted(p.name for p in out.iterdir()) == ["preprocess.json"]
