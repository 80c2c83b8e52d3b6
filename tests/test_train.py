"""Training: batches, augmentation, class weights, checkpoints, resume (also after a SIGKILL), fine-tuning, the saved JSON.

Trains the small CNN (and VGG16 with weights=None) at 32 px on a cache of 24 synthetic PNG phantoms.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import keras
import numpy as np
import pandas as pd
import pytest

from xraylib import evaluate, models, phantoms
from xraylib import train as train_module
from xraylib.errors import ConfigError
from xraylib.fileio import sha1_file
from xraylib.preprocess import PreprocessSettings, split_and_preprocess
from xraylib.batches import AugmentSettings, ImageBatches, augment_image
from xraylib.runs import train
from xraylib.train import TrainSettings, class_weights

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("normal", "covid")
SIZE = 32
BATCH = 4
SPEC = models.ModelSpec(backbone="small_cnn", weights=None, image_size=SIZE, classes=CLASSES)
NO_AUGMENT = AugmentSettings(rotation_deg=0, shift=0, zoom=0, brightness=0, contrast=0)


def write_manifest(root: Path, n_normal: int = 14, n_covid: int = 10) -> pd.DataFrame:
    """PNG phantoms (64 px) and the manifest columns preprocessing and the split use; one image per patient."""
    rows = []
    for i, label in enumerate(["normal"] * n_normal + ["covid"] * n_covid):
        # The covid phantoms carry the burnt-in "R" marker: a shortcut, but one a few steps can learn.
        image = phantoms.make_phantom(label, np.random.default_rng(100 + i), 64, 64, marker=label == "covid").image
        path = root / f"{label}-{i:02d}.png"
        assert cv2.imwrite(str(path), image)
        rows.append({"path": str(path), "label": label, "source": "synthetic", "patient_id": f"synthetic:{i:02d}",
                     "view": "PA", "sex": "F", "age": 40.0, "sha1": sha1_file(path)})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The cache: train 14 images (8 normal, 6 covid: 4 batches of 4, the last one of 2), val 5, test 5."""
    root = tmp_path_factory.mktemp("train_data")
    (root / "images").mkdir()
    manifest = write_manifest(root / "images")
    out = split_and_preprocess(manifest, root / "cache", CLASSES, PreprocessSettings(image_size=SIZE),
                               fractions=(0.6, 0.2, 0.2), seed=0, workers=1, progress=False)
    assert {name: len(split) for name, split in out.splits.items()} == {"train": 14, "val": 5, "test": 5}
    return out


def steps(data) -> int:
    return -(-len(data["train"]) // BATCH)


def digest(x: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest()


def mean_loss(model: keras.Model, images_uint8: np.ndarray, labels: np.ndarray) -> float:
    """Cross-entropy in inference mode (no dropout, no augmentation)."""
    x = images_uint8.astype(np.float32)[..., None]
    probs = model(x, training=False)
    return float(np.mean(keras.losses.categorical_crossentropy(np.eye(len(CLASSES))[labels], probs).numpy()))


class Recorder:
    """What train() did, seen from inside: every batch fit read, and the run folder after every epoch."""

    def __init__(self):
        self.train_batches: list[tuple[int, int, str]] = []  # (epoch, batch index, digest of x), in the order fit read them
        self.val_batches: list[tuple[int, np.ndarray, np.ndarray]] = []  # (batch index, x, y)
        self.after_epoch: list[tuple[int, dict, list[str], int]] = []  # (epoch, state, checkpoint files, history rows)


def recorded_train(monkeypatch: pytest.MonkeyPatch, recorder: Recorder, *args, **kwargs):
    """train() with ImageBatches and EpochCheckpoint replaced by recording subclasses."""

    class RecordingBatches(ImageBatches):
        def on_epoch_begin(self):
            super().on_epoch_begin()
            self.in_epoch = True

        def __getitem__(self, index):
            x, y = super().__getitem__(index)
            if not self.shuffle:
                recorder.val_batches.append((index, x, y))
            elif getattr(self, "in_epoch", False):  # not Keras' look at the first batches for their shapes
                recorder.train_batches.append((self.epoch, index, digest(x)))
            return x, y

    class RecordingCheckpoint(train_module.EpochCheckpoint):
        def on_epoch_end(self, epoch, logs=None):
            super().on_epoch_end(epoch, logs)
            state = json.loads(self.run.state.read_text())
            files = sorted(p.name for p in self.run.checkpoints.iterdir())
            recorder.after_epoch.append((epoch + 1, state, files, len(pd.read_csv(self.run.history))))

    monkeypatch.setattr(train_module, "ImageBatches", RecordingBatches)
    monkeypatch.setattr(train_module, "EpochCheckpoint", RecordingCheckpoint)
    return train(*args, **kwargs)


@pytest.fixture(scope="module")
def run4(data, tmp_path_factory):
    """An uninterrupted 4-epoch run of the small CNN (the seeds' settings but batch 4), recorded."""
    recorder = Recorder()
    run_dir = tmp_path_factory.mktemp("run4") / "run"
    with pytest.MonkeyPatch.context() as mp:
        result = recorded_train(mp, recorder, data, SPEC, TrainSettings(epochs=4, batch_size=BATCH), run_dir, verbose=0)
    return result, recorder


@pytest.fixture(scope="module")
def resumed(data, tmp_path_factory):
    """train(epochs=2), then train(epochs=4) in the same folder, recorded."""
    recorder = Recorder()
    run_dir = tmp_path_factory.mktemp("resumed") / "run"
    with pytest.MonkeyPatch.context() as mp:
        first = recorded_train(mp, recorder, data, SPEC, TrainSettings(epochs=2, batch_size=BATCH), run_dir, verbose=0)
        first_history = pd.read_csv(run_dir / "history.csv")
        second = recorded_train(mp, recorder, data, SPEC, TrainSettings(epochs=4, batch_size=BATCH), run_dir, verbose=0)
    return first, first_history, second, recorder


# --------------------------------------------------------------------------------------------
# Class weights and settings


def test_class_weights_by_hand():
    # 3 normal, 1 covid: n / (classes * count) = 4 / (2 * 3) and 4 / (2 * 1)
    assert class_weights(np.array([0, 0, 0, 1]), 2) == pytest.approx({0: 2 / 3, 1: 2.0})
    # A class absent from training gets 0, not a division by zero; the others use n_classes = 3.
    assert class_weights(np.array([0, 1, 1, 1, 1, 0]), 3) == pytest.approx({0: 1.0, 1: 0.5, 2: 0.0})
    weights = class_weights(np.array([0] * 8 + [1] * 6), 2)
    assert 8 * weights[0] == pytest.approx(6 * weights[1])  # each class carries the same total weight


def test_train_settings_refuse_nonsense_and_round_trip():
    with pytest.raises(ConfigError):
        TrainSettings(epochs=0)
    with pytest.raises(ConfigError):
        TrainSettings(batch_size=0)
    with pytest.raises(ConfigError):
        TrainSettings(fine_tune_epochs=-1)
    settings = TrainSettings(epochs=3, augment=AugmentSettings(rotation_deg=5, horizontal_flip=True))
    assert TrainSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings


def test_train_refuses_a_model_that_does_not_match_the_data(data, tmp_path):
    with pytest.raises(ConfigError, match="classes"):
        train(data, dataclasses.replace(SPEC, classes=("normal", "pneumonia")), TrainSettings(epochs=1), tmp_path)
    with pytest.raises(ConfigError, match="64 px"):
        train(data, dataclasses.replace(SPEC, image_size=64), TrainSettings(epochs=1), tmp_path)
    # The small CNN has no pretrained top block: a fine-tuning stage is refused before stage 1 runs, not after.
    with pytest.raises(ConfigError, match="fine_tune_epochs=0"):
        train(data, SPEC, TrainSettings(epochs=1, fine_tune_epochs=1), tmp_path)
    assert not (tmp_path / "history.csv").exists() and not (tmp_path / "checkpoints").exists()


# --------------------------------------------------------------------------------------------
# Batches


def test_batches_have_the_right_shapes_and_labels_stay_with_their_images(data):
    split = data["train"]
    batches = ImageBatches(split, BATCH, shuffle=True, seed=7)
    assert len(batches) == 4
    seen = []
    for index in range(len(batches)):
        x, y = batches[index]
        expected = 2 if index == 3 else BATCH  # 14 images: the last batch holds the remaining 2
        assert x.shape == (expected, SIZE, SIZE, 1) and x.dtype == np.float32
        assert y.shape == (expected, len(CLASSES)) and y.dtype == np.float32
        np.testing.assert_array_equal(y.sum(axis=1), 1.0)
        for image, one_hot in zip(x[..., 0], y):
            (row,) = [r for r in range(len(split)) if np.array_equal(split.images[r], image)]
            assert split.labels[row] == one_hot.argmax()
            seen.append(row)
    assert sorted(seen) == list(range(len(split)))  # every image once an epoch
    assert seen != sorted(seen)  # and shuffled


def order(batches: ImageBatches) -> list[str]:
    return [digest(batches[i][0]) for i in range(len(batches))]


def test_batch_order_is_set_by_seed_and_epoch(data):
    split = data["train"]
    first = ImageBatches(split, BATCH, shuffle=True, seed=1)
    first.on_epoch_begin()  # what fit() calls at the start of each epoch
    epoch0 = order(first)
    assert order(ImageBatches(split, BATCH, shuffle=True, seed=1, start_epoch=0)) == epoch0
    first.on_epoch_end()
    first.on_epoch_begin()
    epoch1 = order(first)
    assert epoch1 != epoch0
    assert order(ImageBatches(split, BATCH, shuffle=True, seed=1, start_epoch=1)) == epoch1  # as after a resume
    assert order(ImageBatches(split, BATCH, shuffle=True, seed=2)) != epoch0
    unshuffled = ImageBatches(split, BATCH)
    np.testing.assert_array_equal(np.concatenate([unshuffled[i][0] for i in range(4)])[..., 0], split.images)


def test_augmentation_depends_only_on_seed_epoch_and_image(data):
    split = data["train"]
    settings = AugmentSettings()
    batches = ImageBatches(split, BATCH, shuffle=True, augment=settings, seed=3, start_epoch=5)
    x, _ = batches[0]
    rows = batches._order[:BATCH]
    for image, row in zip(x[..., 0], rows):
        expected = augment_image(split.images[row], settings, np.random.default_rng([3, 5, int(row)]))
        np.testing.assert_array_equal(image, expected)
        assert not np.array_equal(image, split.images[row])
    again = ImageBatches(split, BATCH, shuffle=True, augment=settings, seed=3, start_epoch=5)
    np.testing.assert_array_equal(again[0][0], x)
    assert not np.array_equal(ImageBatches(split, BATCH, shuffle=True, augment=settings, seed=3, start_epoch=6)[0][0], x)
    # Without augmentation (as for validation) the images are the cached ones.
    plain = ImageBatches(split, BATCH, shuffle=True, seed=3, start_epoch=5)
    np.testing.assert_array_equal(plain[0][0][..., 0], np.asarray(split.images)[rows])


def test_augment_settings_effects():
    image = phantoms.make_phantom("covid", np.random.default_rng(0), 48, 48).image
    rng = lambda i: np.random.default_rng([0, 0, i])  # noqa: E731
    for i in range(20):  # zero settings (and the default: no flip) leave the image as it is
        np.testing.assert_array_equal(augment_image(image, NO_AUGMENT, rng(i)), image)
    assert AugmentSettings().horizontal_flip is False

    flipping = dataclasses.replace(NO_AUGMENT, horizontal_flip=True)
    outputs = [augment_image(image, flipping, rng(i)) for i in range(20)]
    assert any(np.array_equal(out, image[:, ::-1]) for out in outputs)
    assert all(np.array_equal(out, image[:, ::-1]) or np.array_equal(out, image) for out in outputs)

    rotated = augment_image(image, dataclasses.replace(NO_AUGMENT, rotation_deg=20), rng(1))
    assert rotated.shape == image.shape and rotated.dtype == np.uint8
    assert np.abs(rotated.astype(int) - image).mean() > 2
    angle = np.random.default_rng([0, 0, 1]).uniform(-20, 20)
    by_hand = cv2.warpAffine(image, cv2.getRotationMatrix2D((24, 24), angle, 1.0), (48, 48), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    np.testing.assert_array_equal(rotated, by_hand)

    # Brightness alone adds one offset to every pixel (up to rounding and clipping at 0 and 255).
    brighter = augment_image(image, dataclasses.replace(NO_AUGMENT, brightness=0.2), rng(2)).astype(int)
    inside = (image > 60) & (image < 190)
    shifts = brighter[inside] - image[inside]
    assert shifts.max() - shifts.min() <= 1 and abs(shifts.mean()) > 0.5


# --------------------------------------------------------------------------------------------
# A training run


def test_training_lowers_the_loss(data, tmp_path):
    settings = TrainSettings(epochs=5, batch_size=2, learning_rate=3e-3, augment=None)  # 35 steps
    keras.utils.set_random_seed(settings.seed)  # what train() does before building the model
    initial = models.build_model(SPEC)
    result = train(data, SPEC, settings, tmp_path / "run", verbose=0)
    split = data["train"]
    assert mean_loss(result.model, split.images, split.labels) < mean_loss(initial, split.images, split.labels) - 0.02


def test_class_weights_of_the_run_come_from_the_training_split(run4):
    result, _ = run4
    assert result.class_weights == pytest.approx({0: 14 / (2 * 8), 1: 14 / (2 * 6)})  # train: 8 normal, 6 covid


def test_a_checkpoint_every_epoch_and_a_history_row_per_epoch(run4):
    result, recorder = run4
    assert [epoch for epoch, *_ in recorder.after_epoch] == [1, 2, 3, 4]
    for epoch, state, files, history_rows in recorder.after_epoch:
        assert state["epochs_done"] == epoch and state["stage"] == 1
        assert files == sorted([f"epoch_{epoch:03d}.keras", "state.json"])  # the previous one removed once this one is in
        assert history_rows == epoch
    history = pd.read_csv(result.paths.history)
    assert list(history["epoch"]) == [1, 2, 3, 4]
    assert set(history["stage"]) == {1} and np.allclose(history["learning_rate"], 1e-3)
    assert {"loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc"} <= set(history.columns)
    pd.testing.assert_frame_equal(history, result.history.reset_index(drop=True), check_dtype=False)
    checkpoint = keras.models.load_model(result.paths.checkpoints / "epoch_004.keras")
    assert int(checkpoint.optimizer.iterations.numpy()) == 4 * 4  # the optimizer state is in the checkpoint


def test_fit_trains_on_the_batches_of_seed_and_epoch_and_validates_on_plain_images(run4, data):
    _, recorder = run4
    for epoch in range(4):
        seen = [(index, d) for e, index, d in recorder.train_batches if e == epoch]
        expected = ImageBatches(data["train"], BATCH, shuffle=True, augment=AugmentSettings(), seed=42, start_epoch=epoch)
        assert [index for index, _ in seen] == [0, 1, 2, 3]  # fit does not reorder the batches
        assert [d for _, d in seen] == order(expected)
    assert recorder.val_batches
    val_images = np.asarray(data["val"].images)
    for index, x, y in recorder.val_batches:  # no augmentation, no shuffling for validation
        rows = slice(index * BATCH, (index + 1) * BATCH)
        np.testing.assert_array_equal(x[..., 0], val_images[rows])
        np.testing.assert_array_equal(y.argmax(axis=1), data["val"].labels[rows])


def test_model_json_records_what_is_needed_to_use_the_model(run4, data):
    result, _ = run4
    meta = json.loads(result.paths.model_json.read_text())
    assert meta["classes"] == list(CLASSES)
    assert meta["input_size"] == [SIZE, SIZE, 1]
    assert meta["preprocessing"]["image_size"] == SIZE and meta["preprocessing"]["resize"] == "stretch"
    assert meta["model"]["backbone"] == "small_cnn"
    assert meta["training_data"]["key"] == data.key
    assert meta["training_data"]["counts"] == {"train": 14, "val": 5, "test": 5}
    assert meta["training"]["epochs"] == 4 and meta["training"]["batch_size"] == BATCH
    threshold = meta["threshold"]
    assert threshold["chosen_on"] == "validation split" and threshold["positive_class"] == "covid"
    # The threshold is the one the rule picks on the validation predictions of the saved model.
    loaded = models.load_model(result.paths.root)
    val = models.predict_split(loaded.model, data["val"])
    expected = evaluate.threshold_from_validation(val, CLASSES, positive_class="covid", rule=threshold["rule"],
                                                  min_sensitivity=threshold["min_sensitivity"])
    assert threshold["value"] == pytest.approx(float(expected))
    assert result.threshold == pytest.approx(threshold["value"]) and loaded.threshold == pytest.approx(threshold["value"])


# --------------------------------------------------------------------------------------------
# Resume


def test_resume_continues_at_the_next_epoch_with_the_optimizer_state(resumed, data):
    first, first_history, second, _ = resumed
    assert first.resumed_from_epoch == 0 and second.resumed_from_epoch == 2
    history = pd.read_csv(second.paths.history)
    assert list(history["epoch"]) == [1, 2, 3, 4]
    pd.testing.assert_frame_equal(history.iloc[:2].reset_index(drop=True), first_history)  # epochs 1-2 not retrained
    assert int(second.model.optimizer.iterations.numpy()) == 4 * steps(data)
    state = json.loads(second.paths.state.read_text())
    assert state["epochs_done"] == 4 and state["checkpoint"] == "epoch_004.keras"


def test_a_resumed_run_trains_on_the_same_batches_as_an_uninterrupted_one(resumed, run4):
    _, _, _, resumed_recorder = resumed
    _, uninterrupted = run4
    assert [d for *_, d in resumed_recorder.train_batches] == [d for *_, d in uninterrupted.train_batches]
    assert len(resumed_recorder.train_batches) == 4 * 4


def test_a_finished_run_is_loaded_not_retrained(run4, data, monkeypatch):
    result, _ = run4
    state_before = result.paths.state.read_text()

    def no_fit(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(keras.Model, "fit", no_fit)
    started = time.perf_counter()
    again = train(data, SPEC, TrainSettings(epochs=4, batch_size=BATCH), result.paths.root, verbose=0)
    assert time.perf_counter() - started < 10
    assert again.resumed_from_epoch == 4
    assert list(again.history["epoch"]) == [1, 2, 3, 4]
    assert again.threshold == pytest.approx(result.threshold)
    for before, after in zip(result.model.weights, again.model.weights):
        np.testing.assert_array_equal(before.numpy(), after.numpy())
    assert result.paths.state.read_text() == state_before


def test_resume_refuses_other_data_or_settings_and_resume_false_starts_over(data, tmp_path):
    run_dir = tmp_path / "run"
    train(data, SPEC, TrainSettings(epochs=2, batch_size=BATCH), run_dir, verbose=0)
    with pytest.raises(ConfigError, match="resume=False"):
        train(data, SPEC, TrainSettings(epochs=3, batch_size=BATCH, learning_rate=5e-4), run_dir, verbose=0)
    with pytest.raises(ConfigError, match="other data or settings"):
        train(dataclasses.replace(data, key="another cache"), SPEC, TrainSettings(epochs=3, batch_size=BATCH), run_dir, verbose=0)
    with pytest.raises(ConfigError):
        train(data, dataclasses.replace(SPEC, head_units=32), TrainSettings(epochs=3, batch_size=BATCH), run_dir, verbose=0)

    again = train(data, SPEC, TrainSettings(epochs=1, batch_size=BATCH, learning_rate=5e-4), run_dir, resume=False, verbose=0)
    assert again.resumed_from_epoch == 0
    history = pd.read_csv(run_dir / "history.csv")
    assert list(history["epoch"]) == [1] and history["learning_rate"].iloc[0] == pytest.approx(5e-4)
    assert int(again.model.optimizer.iterations.numpy()) == steps(data)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch_001.keras", "state.json"]


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from xraylib import models, preprocess, runs, train
    cache, run_dir, mode = sys.argv[1:]
    data = preprocess.load_preprocessed(cache)

    class KilledInEpoch3(train.EpochCheckpoint):
        # SIGKILL: no exception, no cleanup, no atexit, as when Colab's runtime is taken away.
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
        def on_train_batch_end(self, batch, logs=None):
            if self.epoch == 2 and batch == 1:
                os.kill(os.getpid(), signal.SIGKILL)

    if mode == "kill":
        train.EpochCheckpoint = KilledInEpoch3
    spec = models.ModelSpec(backbone="small_cnn", weights=None, image_size=32, classes=tuple(data.classes))
    result = runs.train(data, spec, train.TrainSettings(epochs=5, batch_size=4), run_dir=run_dir, verbose=0)
    print("RESUMED_FROM", result.resumed_from_epoch)
""")


@pytest.mark.slow
def test_training_killed_mid_epoch_resumes_in_a_new_process(data, tmp_path):
    script = tmp_path / "train_and_die.py"
    script.write_text(KILL_SCRIPT)
    run_dir = tmp_path / "run"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}

    def run(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), str(data.folder), str(run_dir), mode],
                              capture_output=True, text=True, env=env, timeout=180, cwd=tmp_path)

    killed = run("kill")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    state = json.loads((run_dir / "checkpoints" / "state.json").read_text())
    assert state["epochs_done"] == 2 and (run_dir / "checkpoints" / state["checkpoint"]).is_file()
    assert list(pd.read_csv(run_dir / "history.csv")["epoch"]) == [1, 2]
    assert not (run_dir / "model.keras").exists()
    history_before = pd.read_csv(run_dir / "history.csv")

    finished = run("resume")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "RESUMED_FROM 2" in finished.stdout
    history = pd.read_csv(run_dir / "history.csv")
    assert list(history["epoch"]) == [1, 2, 3, 4, 5]
    pd.testing.assert_frame_equal(history.iloc[:2], history_before)
    state = json.loads((run_dir / "checkpoints" / "state.json").read_text())
    assert state["epochs_done"] == 5
    model = keras.models.load_model(run_dir / "model.keras")
    assert int(model.optimizer.iterations.numpy()) == 5 * steps(data)
    assert (run_dir / "model.h5").is_file() and (run_dir / "model.json").is_file()


# --------------------------------------------------------------------------------------------
# Fine-tuning


@pytest.mark.slow
def test_fine_tuning_stage_unfreezes_the_top_block_at_the_lower_rate(data, tmp_path):
    spec = models.ModelSpec(backbone="vgg16", weights=None, image_size=SIZE, classes=CLASSES)
    settings = TrainSettings(epochs=1, fine_tune_epochs=1, batch_size=BATCH, fine_tune_learning_rate=1e-5)
    result = train(data, spec, settings, tmp_path / "run", verbose=0)

    history = result.history
    assert list(history["epoch"]) == [1, 2] and list(history["stage"]) == [1, 2]
    assert list(history["learning_rate"]) == pytest.approx([1e-3, 1e-5])
    for name in ("block5_conv1", "block5_conv2", "block5_conv3"):
        assert result.model.get_layer(name).trainable
    assert not result.model.get_layer("block4_conv3").trainable
    # Stage 2 really trained block 5 (and only block 5 of the backbone).
    keras.utils.set_random_seed(settings.seed)
    initial = models.build_model(spec)
    kernel = lambda model, name: model.get_layer(name).kernel.numpy()  # noqa: E731
    assert not np.array_equal(kernel(result.model, "block5_conv3"), kernel(initial, "block5_conv3"))
    np.testing.assert_array_equal(kernel(result.model, "block4_conv3"), kernel(initial, "block4_conv3"))
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["training"]["fine_tune_epochs"] == 1 and meta["model"]["backbone"] == "vgg16"


# --------------------------------------------------------------------------------------------
# An ensemble of heads


def test_an_ensemble_of_heads_trains_each_head_on_its_own_saves_loads_and_resumes(data, tmp_path):
    spec = models.ModelSpec(backbone="mobilenet", alpha=0.25, weights=None, image_size=SIZE, classes=CLASSES, heads=3)
    settings = TrainSettings(epochs=2, batch_size=BATCH, augment=None)
    straight = train(data, spec, settings, tmp_path / "straight", verbose=0)
    model = straight.model
    assert models.head_count(model) == 3
    # The output is the mean of three heads that differ (each from its own start, trained on its own loss).
    from xraylib import features

    feats = np.asarray(features.feature_extractor(model).predict(np.asarray(data["test"].images), verbose=0))
    heads = [np.asarray(model.get_layer(f"head_probs_{k}")(model.get_layer(f"head_dense_{k}")(feats))) for k in range(3)]
    assert not np.allclose(heads[0], heads[1], atol=1e-4)
    mean = np.mean(heads, axis=0)
    np.testing.assert_allclose(models.predict_images(model, np.asarray(data["test"].images)), mean, atol=1e-5)
    history = pd.read_csv(straight.paths.history)
    assert {"loss", "val_loss", "accuracy", "val_auc"} <= set(history.columns)
    # Saved and loaded (safe mode) it predicts the same; model.json records the heads.
    loaded = models.load_model(tmp_path / "straight")
    assert loaded.spec.heads == 3
    np.testing.assert_allclose(models.predict_images(loaded.model, np.asarray(data["test"].images)), mean, atol=1e-5)
    # Stopped after one epoch and resumed from the head checkpoint: the same model as the uninterrupted run.
    train(data, spec, dataclasses.replace(settings, epochs=1), tmp_path / "resumed", verbose=0)
    resumed = train(data, spec, settings, tmp_path / "resumed", verbose=0)
    assert resumed.resumed_from_epoch == 1
    for k in range(3):
        for a, b in zip(resumed.model.get_layer(f"head_dense_{k}").get_weights(), model.get_layer(f"head_dense_{k}").get_weights()):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_an_ensemble_of_heads_needs_the_frozen_backbone():
    spec = models.ModelSpec(backbone="mobilenet", alpha=0.25, weights=None, image_size=SIZE, classes=CLASSES, heads=2)

    class Data:
        classes = CLASSES
        settings = PreprocessSettings(image_size=SIZE)
        splits = {"train": [1], "val": [1]}

        def __getitem__(self, name):
            return self.splits[name]

    with pytest.raises(ConfigError, match="heads=2: an ensemble of heads .* fine_tune_epochs=0"):
        train_module.check_inputs(Data(), spec, TrainSettings(epochs=1, fine_tune_epochs=1))
    with pytest.raises(models.ModelError, match="heads must be a whole number >= 1"):
        models.ModelSpec(heads=0)


def test_run_folders_made_before_new_settings_keep_resuming():
    """The fingerprint of a run with the defaults is what it was before ``heads`` and ``threshold_on`` existed
    (computed with the earlier code), so a finished run is reused and an interrupted one resumes after an upgrade."""
    from xraylib import runs

    class Data:
        key = "data-key"

    assert runs.fingerprint(Data(), models.ModelSpec(), TrainSettings()) == "baeac555e690ce464a64fcccce37a4d9f11f9121"
    mobilenet = models.ModelSpec(backbone="mobilenet", alpha=0.25, weights=None)
    assert (runs.fingerprint(Data(), mobilenet, TrainSettings(epochs=3, augment_views=2))
            == "36d2b3d835fe0839950e0e7e34853308009b6eb0")
    # Where the threshold is chosen does not change the weights; the number of heads does.
    assert runs.fingerprint(Data(), mobilenet, TrainSettings(threshold_on="out_of_site")) == runs.fingerprint(
        Data(), mobilenet, TrainSettings())
    assert runs.fingerprint(Data(), dataclasses.replace(mobilenet, heads=2), TrainSettings()) != runs.fingerprint(
        Data(), mobilenet, TrainSettings())
