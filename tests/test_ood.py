"""Out-of-distribution guard: non-X-ray images made in code are flagged; held-out frontal films mostly are not.

The model is a small CNN trained for a few seconds on frontal phantoms (PA, AP, AP supine) at
64 px; the reference is fitted on its training split with the threshold on its validation split.
The helpers here (the trained run, the non-X-ray images) are also used by test_serve.py and
test_browser.py.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import cv2
import keras
import numpy as np
import pandas as pd
import pytest

from conftest import write_dicom, write_raster
from xraylib import models, ood, phantoms, runs
from xraylib.errors import BadFileError, ConfigError, ModelError
from xraylib.fileio import sha1_file
from xraylib.images import read_image
from xraylib.preprocess import PreprocessedData, PreprocessSettings, split_and_preprocess
from xraylib.train import TrainSettings, compile_model

pytestmark = [
    pytest.mark.filterwarnings("ignore:Invalid value for VR AS"),
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]

CLASSES = ("normal", "covid")
SIZE = 64
N_TRAIN, N_VAL, N_TEST = 80, 20, 40


# --------------------------------------------------------------------------------------------
# Images made in code


def frontal_phantom(seed: int, label: str) -> np.ndarray:
    """A frontal chest phantom of varied size, shape and view: ``(H, W) uint8``."""
    rng = np.random.default_rng(seed)
    height = int(rng.integers(200, 320))
    width = int(height * rng.uniform(0.8, 1.2))
    view = ("PA", "AP", "AP Supine")[seed % 3]
    return phantoms.make_phantom(label, rng, height, width, view=view).image


def colour_photo(seed: int) -> np.ndarray:
    """A photo-like ``(240, 320, 3) uint8`` RGB image: colour gradients with coloured discs and boxes."""
    rng = np.random.default_rng(seed)
    height, width = 240, 320
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([np.clip(rng.uniform(0, 255) + rng.uniform(-0.8, 0.8) * x + rng.uniform(-0.8, 0.8) * y, 0, 255)
                      for _ in range(3)], axis=-1).astype(np.uint8)
    for _ in range(8):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        if rng.random() < 0.5:
            cv2.circle(image, centre, int(rng.integers(10, 60)), colour, -1)
        else:
            cv2.rectangle(image, centre, (centre[0] + int(rng.integers(20, 90)), centre[1] + int(rng.integers(20, 90))), colour, -1)
    return image


def document_scan(seed: int) -> np.ndarray:
    """A scanned page: off-white with lines of black text (cv2.putText), ``(330, 250) uint8``."""
    rng = np.random.default_rng(seed)
    page = np.full((330, 250), int(rng.integers(232, 250)), np.uint8)
    y = 30
    while y < page.shape[0] - 20:
        words = " ".join("".join(chr(int(c)) for c in rng.integers(97, 123, int(rng.integers(2, 9)))) for _ in range(6))
        cv2.putText(page, words, (15, y), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 20, 1, cv2.LINE_AA)
        y += int(rng.integers(14, 20))
    return page


def ct_slice(seed: int) -> np.ndarray:
    """An axial chest CT-like slice, ``(256, 256) uint8``: body ellipse, two dark lungs, spine, table, black air."""
    rng = np.random.default_rng(seed)
    size, c = 256, 128
    image = np.zeros((size, size), np.float32)
    a, b = int(0.42 * size * rng.uniform(0.92, 1.0)), int(0.3 * size * rng.uniform(0.92, 1.05))
    cv2.ellipse(image, (c, c), (a, b), 0, 0, 360, 0.5, -1)
    for side in (-1, 1):
        cv2.ellipse(image, (int(c + side * a * 0.45), int(c - b * 0.05)), (int(a * 0.33), int(b * 0.68)), side * 8, 0, 360, 0.05, -1)
    cv2.ellipse(image, (int(c + a * 0.08), int(c - b * 0.3)), (int(a * 0.25), int(b * 0.3)), 0, 0, 360, 0.55, -1)
    cv2.circle(image, (c, int(c + b * 0.62)), int(size * 0.045), 0.95, -1)
    cv2.ellipse(image, (c, int(c + b + 0.06 * size)), (int(0.45 * size), int(0.05 * size)), 0, 180, 360, 0.3, 2)
    image += rng.standard_normal(image.shape).astype(np.float32) * 0.02
    return np.clip(cv2.GaussianBlur(image, (0, 0), 0.7) * 255, 0, 255).astype(np.uint8)


def lateral_view(seed: int) -> np.ndarray:
    return phantoms.make_phantom(CLASSES[seed % 2], np.random.default_rng(seed), 300, 280, view="L").image


def noise_image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (256, 256), dtype=np.uint8)


#: What the guard must flag: name -> image maker (seed -> gray (H, W) or RGB (H, W, 3) uint8).
NON_XRAYS = {
    "colour photo": colour_photo,
    "document scan": document_scan,
    "CT slice": ct_slice,
    "lateral view": lateral_view,
    "pure noise": noise_image,
}


def encode(image: np.ndarray, ext: str = ".png") -> bytes:
    """PNG/JPEG bytes of a gray or RGB image."""
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    ok, data = cv2.imencode(ext, bgr)
    assert ok
    return data.tobytes()


# --------------------------------------------------------------------------------------------
# A trained run (also used by test_serve.py and test_browser.py)


def build_trained_run(root: Path) -> tuple[Path, PreprocessedData]:
    """Train a small CNN on frontal phantoms and save it as training does: ``root/run`` and the preprocessed data.

    PNG files (70 % of them) and DICOMs, one patient each; 80 train, 20 val, 40 test. A few seconds.
    """
    rows = []
    for i in range(N_TRAIN + N_VAL + N_TEST):
        label = CLASSES[i % 2]
        pixels = frontal_phantom(1000 + i, label)
        if i % 10 < 7:
            path = write_raster(root / "images" / f"{i:03d}.png", pixels)
        else:
            path = write_dicom(root / "images" / f"{i:03d}.dcm", pixels, patient_id=f"p{i}")
        rows.append({"path": str(path), "label": label, "source": "synthetic", "patient_id": f"synthetic:{i}",
                     "view": "PA", "sha1": sha1_file(path), "file_format": path.suffix[1:]})
    fractions = (N_TRAIN / len(rows), N_VAL / len(rows), N_TEST / len(rows))
    data = split_and_preprocess(pd.DataFrame(rows), root / "preprocessed", CLASSES, PreprocessSettings(image_size=SIZE),
                                fractions=fractions, seed=0, workers=1, progress=False)
    spec = models.ModelSpec(backbone="small_cnn", weights=None, image_size=SIZE, classes=CLASSES)
    keras.utils.set_random_seed(0)
    model = models.build_model(spec)
    compile_model(model, 1e-3)
    train = data["train"]
    model.fit(np.asarray(train.images, np.float32)[..., None], train.one_hot, epochs=25, batch_size=16, verbose=0)
    runs.finish(model, data, spec, TrainSettings(epochs=25, batch_size=16, augment=None), runs.RunFolder(root / "run"))
    return root / "run", data


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, PreprocessedData]:
    return build_trained_run(tmp_path_factory.mktemp("ood_run"))


@pytest.fixture(scope="module")
def loaded(run) -> models.LoadedModel:
    return models.load_model(run[0])


@pytest.fixture(scope="module")
def reference(loaded, run) -> ood.OODReference:
    return ood.fit_ood(loaded, run[1])


@pytest.fixture(scope="module")
def guard(loaded, reference) -> ood.OODGuard:
    return ood.OODGuard.for_model(loaded, reference)


def verdicts(guard: ood.OODGuard, raw_images: list[np.ndarray], ext: str = ".png") -> list[ood.OODResult]:
    """The guard's verdicts on images as a user would upload them: encoded, decoded, preprocessed from model.json."""
    from xraylib.images import decode_bytes
    from xraylib.preprocess import preprocess_pixels

    files = [encode(image, ext) for image in raw_images]
    facts = [ood.image_facts(data) for data in files]
    inputs = np.stack([preprocess_pixels(decode_bytes(data), PreprocessSettings(image_size=SIZE)) for data in files])
    return guard.check(inputs, facts)


# --------------------------------------------------------------------------------------------
# What it flags


def test_non_xray_images_are_flagged_and_held_out_frontal_films_mostly_are_not(guard, run):
    _, data = run
    test_rows = data["test"].manifest
    frontal = [read_image(path) for path in test_rows["path"]]  # PNG and DICOM files of the test patients
    frontal_flagged = np.mean([not v.ok for v in verdicts(guard, frontal)])
    rates = {name: np.mean([not v.ok for v in verdicts(guard, [make(100 + i) for i in range(10)])])
             for name, make in NON_XRAYS.items()}
    print(f"\nflagged: held-out frontal phantoms {frontal_flagged:.0%} of {len(frontal)}; "
          + ", ".join(f"{name} {rate:.0%} of 10" for name, rate in rates.items()))
    assert frontal_flagged <= 0.10
    for name, rate in rates.items():
        assert rate >= 0.9, f"{name}: only {rate:.0%} flagged"


def test_each_kind_is_flagged_for_a_reason_that_names_it(guard):
    def reasons(image, ext=".png") -> str:
        (verdict,) = verdicts(guard, [image], ext)
        assert not verdict.ok and verdict.reasons
        return " ".join(verdict.reasons)

    assert "colour image" in reasons(colour_photo(1), ".jpg")
    document = reasons(document_scan(1))
    assert "brightness" in document or "near-white" in document
    assert "roughness" in reasons(noise_image(1))
    assert "layout" in reasons(lateral_view(1))
    wide = np.tile(frontal_phantom(5, "normal"), (1, 3))  # three films side by side: 3:1
    assert "shape" in reasons(wide)


def test_colour_fraction_ignores_grey_stored_as_rgb_and_small_coloured_marks():
    gray = frontal_phantom(3, "normal")
    as_rgb = np.repeat(gray[..., None], 3, axis=-1)
    assert ood.colour_fraction(as_rgb) == 0.0
    marked = as_rgb.copy()
    cv2.arrowedLine(marked, (20, 20), (80, 80), (255, 0, 0), 3)  # a red arrow, as ieee8023 images have
    assert 0 < ood.colour_fraction(marked) < ood.COLOUR_FRACTION
    assert ood.colour_fraction(colour_photo(0)) > 0.5
    assert ood.image_facts(encode(as_rgb, ".jpg")).colour_fraction < 0.01  # JPEG chroma noise stays below the bar


def test_without_a_reference_only_the_colour_and_shape_checks_run(loaded):
    bare = ood.OODGuard.for_model(loaded, None)
    assert bare.level == "basic"
    photo, page = verdicts(bare, [colour_photo(2), document_scan(2)])
    assert not photo.ok and "colour" in photo.reasons[0]
    assert page.ok  # a grey page passes the cheap checks: the statistics need the reference
    assert any("only the colour and shape checks ran" in note for note in page.notes)


def test_image_facts_refuses_a_decompression_bomb_before_decoding():
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)  # 10^10 pixels claimed, a few bytes sent
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")
    with pytest.raises(BadFileError, match="decompression-bomb"):
        ood.image_facts(bomb, "bomb.png")


# --------------------------------------------------------------------------------------------
# The reference: fitted on train, threshold on val, saved beside the model


def test_the_threshold_is_the_validation_quantile_and_the_bounds_hold_the_training_images(reference, run):
    _, data = run
    assert (reference.n_train, reference.n_val) == (len(data["train"]), len(data["val"]))
    assert reference.feature_layer == "pool4"  # the layer feeding the small CNN's head
    assert reference.train_features.shape[0] == len(data["train"])
    np.testing.assert_allclose(np.linalg.norm(reference.train_features, axis=1), 1.0, atol=1e-5)
    margin = 1 + ood.DISTANCE_MARGIN
    assert reference.feature_threshold == pytest.approx(np.quantile(reference.val_distances, 0.99) * margin)
    assert reference.layout_threshold == pytest.approx(np.quantile(reference.val_layout_distances, 0.99) * margin)
    assert reference.train_layouts.shape == (len(data["train"]), ood.LAYOUT_SIDE ** 2)
    stats = ood.image_statistics(data["train"].images)
    assert ((stats >= reference.stat_low) & (stats <= reference.stat_high)).all()


def test_save_and_load_beside_the_model(reference, loaded, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("model.json", "model.keras"):
        (folder / name).write_bytes((loaded.path.parent / name).read_bytes())
    assert ood.load_ood(folder) is None  # none yet
    files = runs.RunFolder.of(folder / "model.keras").save_ood(reference)  # a model file names its folder
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.keras", "ood.json", "ood.npz"]  # no temp files
    meta = json.loads(files["ood.json"].read_text())
    assert meta["feature_threshold"] == pytest.approx(reference.feature_threshold)
    assert meta["stat_names"] == list(ood.STAT_NAMES)
    back = ood.load_ood(folder, loaded)
    np.testing.assert_array_equal(back.train_features, reference.train_features)
    np.testing.assert_array_equal(back.stat_low, reference.stat_low)
    np.testing.assert_array_equal(back.train_layouts, reference.train_layouts)
    assert back.layout_threshold == pytest.approx(reference.layout_threshold)
    assert (back.k, back.quantile, back.feature_layer) == (reference.k, reference.quantile, reference.feature_layer)

    retrained = replace(loaded, metadata={**loaded.metadata, "saved_at": "2031-01-01T00:00:00+00:00"})
    with pytest.raises(ModelError, match="made for another model"):
        ood.load_ood(folder, retrained)
    (folder / "ood.npz").write_bytes(b"not an npz")
    with pytest.raises(ModelError, match="damaged out-of-distribution reference"):
        ood.load_ood(folder)


def test_fit_ood_refuses_data_of_another_size_or_classes(loaded, run):
    _, data = run
    other = PreprocessedData(data.folder, PreprocessSettings(image_size=32), data.classes, data.splits, data.key)
    with pytest.raises(ConfigError, match="32 px"):
        ood.fit_ood(loaded, other)
    with pytest.raises(ConfigError, match="quantile"):
        ood.fit_ood(loaded, data, quantile=1.0)


def test_a_saved_model_gets_the_statistics_checks_without_features(run, tmp_path):
    run_dir, data = run
    model = keras.models.load_model(run_dir / "model.keras", compile=False)
    model.export(run_dir / "saved_model", verbose=False)
    try:
        loaded = models.load_model(run_dir / "saved_model")
        assert loaded.file_format == "savedmodel" and not loaded.has_layers
        reference = ood.fit_ood(loaded, data)
        assert not reference.has_features and reference.feature_threshold is None
        guard = ood.OODGuard.for_model(loaded, reference)
        assert guard.level == "statistics"
        page, = verdicts(guard, [document_scan(3)])
        assert not page.ok and any("feature-distance check did not run" in n for n in page.notes)
    finally:
        import shutil

        shutil.rmtree(run_dir / "saved_model")


# --------------------------------------------------------------------------------------------
# The same guard in predict_files (the command line's predict and notebook 05)


def copy_model(run_dir: Path, folder: Path) -> Path:
    """The model's files (no ood.json/ood.npz) in a folder of its own, so what predict_files writes is the test's."""
    folder.mkdir(parents=True)
    for name in ("model.keras", "model.h5", "model.weights.h5", "model.json"):
        if (run_dir / name).is_file():
            (folder / name).write_bytes((run_dir / name).read_bytes())
    return folder


@pytest.fixture(scope="module")
def user_files(run, tmp_path_factory) -> dict[str, Path]:
    """As a user would give them: a black 7745 x 7745 PNG, a colour photo (JPEG) and held-out frontal films."""
    _, data = run
    root = tmp_path_factory.mktemp("user_files")
    files = {"black": write_raster(root / "black.png", np.zeros((7745, 7745), np.uint8)),
             "photo": write_raster(root / "photo.jpg", cv2.cvtColor(colour_photo(4), cv2.COLOR_RGB2BGR))}
    for i, path in enumerate(list(data["test"].manifest["path"])[:5]):
        files[f"film{i}"] = Path(path)
    return files


def test_predict_files_gives_no_decision_to_what_the_web_page_refuses_and_says_why(run, user_files, tmp_path):
    from xraylib.predict import decide, predict_files
    from xraylib.serve import Analyser

    folder = copy_model(run[0], tmp_path / "run")
    said: list[str] = []
    table = predict_files(folder, list(user_files.values()), say=said.append)
    rows = dict(zip(user_files, table.to_dict("records")))
    assert table["ok"].all() and set(table["ood_check"]) == {"full"}
    for name, words in (("black", "blank image"), ("photo", "colour image")):
        row = rows[name]
        assert not row["judgeable"]
        assert row["decision"] is None and words in row["ood_reason"], row
        assert 0.0 <= row["prob_covid"] <= 1.0  # the probabilities are kept
    films = [rows[name] for name in user_files if name.startswith("film")]
    assert sum(bool(r["judgeable"]) for r in films) >= 4  # held-out frontal films: at most 1 in 5 flagged
    for row in films:
        if row["judgeable"]:
            assert row["ood_reason"] is None
            assert row["decision"] == decide(np.array([row["prob_normal"], row["prob_covid"]]), CLASSES, "covid",
                                             row["threshold"])[0]
    assert any("got no decision" in line and "not a chest X-ray this model can judge" in line for line in said)

    # The same verdicts as the web page's analyser, with the same reference.
    loaded = models.load_model(folder)
    reference = ood.load_ood(folder, loaded)
    results = Analyser(loaded, reference).analyse([(p.name, p.read_bytes()) for p in user_files.values()],
                       with_images=False)
    assert [r["judgeable"] for r in results] == [bool(v) for v in table["judgeable"]]


def test_predict_files_saves_the_reference_beside_the_model_says_so_and_reuses_it(run, user_files, tmp_path):
    from xraylib.predict import predict_files

    folder = copy_model(run[0], tmp_path / "run")
    said: list[str] = []
    predict_files(folder, user_files["film0"], say=said.append)
    assert any(line.startswith(f"saved the out-of-distribution reference beside the model: {folder / 'ood.json'}")
               for line in said), said
    assert (folder / "ood.json").is_file() and (folder / "ood.npz").is_file()
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # written atomically: no temp files left
    said.clear()
    predict_files(folder, user_files["film0"], say=said.append)
    assert said == [f"out-of-distribution reference: {folder / 'ood.json'}"]  # reused, not rebuilt


def test_a_read_only_model_folder_still_gets_the_full_check_in_memory(run, user_files, tmp_path, monkeypatch):
    import os

    from xraylib.predict import predict_files

    folder = copy_model(run[0], tmp_path / "run")
    if os.geteuid() == 0:  # root writes into a read-only folder: make the write fail as it would for a user
        def refuse(self, reference):
            raise PermissionError(13, "Permission denied", str(self.root / "ood.npz"))

        monkeypatch.setattr(runs.RunFolder, "save_ood", refuse)
    else:
        folder.chmod(0o555)
    try:
        said: list[str] = []
        table = predict_files(folder, [user_files["photo"], user_files["film0"]], say=said.append)
    finally:
        folder.chmod(0o755)
    assert set(table["ood_check"]) == {"full"} and not table["judgeable"].iloc[0]
    assert any("could not save the out-of-distribution reference beside the model" in line
               and "kept in memory" in line for line in said), said
    assert not (folder / "ood.json").exists()


def test_knn_distances_in_chunks_of_queries_equal_one_matrix():
    """Fitting a reference on a full-size validation split computes its distances a chunk of queries at a time."""
    rng = np.random.default_rng(0)
    reference, queries = rng.normal(size=(300, 16)), rng.normal(size=(250, 16))
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    whole = np.partition(1.0 - queries @ reference.T, 4, axis=1)[:, 4]
    np.testing.assert_allclose(ood.knn_distance(reference, queries, 5, chunk=64), whole, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ood.knn_distance(reference, queries, 5), whole, rtol=0, atol=1e-12)
