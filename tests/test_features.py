"""Cached bottleneck features and the faster training paths.

- the feature cache: the same training as on streamed images, reuse across runs, invalidation
  when the backbone, the weights, the preprocessing or an image changes, augmented views,
  resume of an interrupted extraction, a training run killed mid-epoch and resumed;
- the tf.data input of the streaming path (the batches of ImageBatches, epoch by epoch);
- the precision setting (mixed float16 only on a GPU of compute capability >= 7.0; the device
  list is mocked, so this runs on a CPU).

VGG16 with weights=None at 32 px on a cache of 24 synthetic PNG phantoms (MobileNet where a
second backbone is needed).
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import keras
import numpy as np
import pandas as pd
import pytest

from xraylib import features, models, phantoms
from xraylib import train as train_module
from xraylib.errors import ConfigError, ModelError
from xraylib.fileio import sha1_file
from xraylib.preprocess import PreprocessSettings, preprocess_dataset, split_and_preprocess
from xraylib.batches import AugmentSettings, FeatureBatches, ImageBatches, as_dataset, augment_image
from xraylib.runs import train
from xraylib.train import TrainSettings

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("normal", "covid")
SIZE = 32
BATCH = 4
VGG = models.ModelSpec(backbone="vgg16", weights=None, image_size=SIZE, classes=CLASSES)
PLAIN = TrainSettings(epochs=3, batch_size=BATCH, augment=None)


def write_images(folder: Path, n_normal: int = 14, n_covid: int = 10) -> pd.DataFrame:
    """PNG phantoms (64 px), one per patient, and the manifest columns preprocessing and the split use."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, label in enumerate(["normal"] * n_normal + ["covid"] * n_covid):
        image = phantoms.make_phantom(label, np.random.default_rng(100 + i), 64, 64, marker=label == "covid").image
        path = folder / f"{label}-{i:02d}.png"
        assert cv2.imwrite(str(path), image)
        rows.append({"path": str(path), "label": label, "source": "synthetic", "patient_id": f"synthetic:{i:02d}",
                     "view": "PA", "sex": "F", "age": 40.0, "sha1": sha1_file(path)})
    return pd.DataFrame(rows)


def make_data(root: Path, settings: PreprocessSettings = PreprocessSettings(image_size=SIZE)):
    manifest = write_images(root / "images")
    return split_and_preprocess(manifest, root / "cache", CLASSES, settings, fractions=(0.6, 0.2, 0.2), seed=0,
                                workers=1, progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """train 14 images, val 5, test 5."""
    out = make_data(tmp_path_factory.mktemp("features_data"))
    assert {name: len(split) for name, split in out.splits.items()} == {"train": 14, "val": 5, "test": 5}
    return out


@pytest.fixture
def fresh_data(tmp_path):
    """A cache of its own, for tests that change images or preprocessing."""
    return make_data(tmp_path)


def built(spec: models.ModelSpec = VGG, seed: int = 42) -> keras.Model:
    keras.utils.set_random_seed(seed)  # what train() does before building
    return models.build_model(spec)


def as_input(images_uint8: np.ndarray) -> np.ndarray:
    return np.asarray(images_uint8, dtype=np.float32)[..., None]


# --------------------------------------------------------------------------------------------
# The cached path trains what the streaming path trains


@pytest.fixture(scope="module")
def both_paths(data, tmp_path_factory):
    """The same 3-epoch run without augmentation on cached features and on streamed images."""
    root = tmp_path_factory.mktemp("both_paths")
    cached = train(data, VGG, PLAIN, root / "cached", verbose=0)
    streamed = train(data, VGG, dataclasses.replace(PLAIN, feature_cache=False), root / "streamed", verbose=0)
    return cached, streamed


def test_cached_and_streamed_training_give_the_same_model(both_paths, data):
    cached, streamed = both_paths
    assert cached.execution["stage_1_input"] == "cached features"
    assert streamed.execution["stage_1_input"] == "streamed images"
    test_images = as_input(data["test"].images)
    from_cache = models.load_model(cached.paths.root).model.predict(test_images, verbose=0)
    from_stream = models.load_model(streamed.paths.root).model.predict(test_images, verbose=0)
    np.testing.assert_allclose(from_cache, from_stream, atol=1e-5)
    # Same head initialisation, same batches, same class weights, same dropout draws: the same losses each epoch.
    np.testing.assert_allclose(cached.history["loss"], streamed.history["loss"], rtol=1e-4)
    np.testing.assert_allclose(cached.history["val_loss"], streamed.history["val_loss"], rtol=1e-4)
    assert cached.threshold == pytest.approx(streamed.threshold, abs=1e-5)
    # ... and training did something: the head moved away from its initialisation.
    initial = built().predict(test_images, verbose=0)
    assert np.abs(from_cache - initial).max() > 1e-3


def test_the_cached_path_saves_the_full_model_as_the_streaming_path_does(both_paths, data):
    cached, _ = both_paths
    for name in ("model.keras", "model.h5", "model.json", "history.csv"):
        assert (cached.paths.root / name).is_file(), name
    loaded = models.load_model(cached.paths.root)
    assert loaded.model.input_shape == (None, SIZE, SIZE, 1)  # images in, not features
    assert {"block5_conv3", "head_pool", "head_dense", "predictions"} <= {layer.name for layer in loaded.model.layers}
    h5 = models.load_model(cached.paths.model_h5).model
    np.testing.assert_allclose(h5.predict(as_input(data["val"].images), verbose=0),
                               loaded.model.predict(as_input(data["val"].images), verbose=0), atol=1e-6)
    meta = json.loads(cached.paths.model_json.read_text())
    assert meta["execution"]["stage_1_input"] == "cached features"
    assert meta["training"]["feature_cache"] is True and meta["training"]["augment_views"] == 1
    # The threshold was chosen on validation probabilities from the cache; the saved model gives the same ones.
    val = models.predict_split(loaded.model, data["val"])
    from xraylib import evaluate

    expected = evaluate.threshold_from_validation(val, CLASSES, positive_class="covid", rule=meta["threshold"]["rule"],
                                                  min_sensitivity=meta["threshold"]["min_sensitivity"])
    assert meta["threshold"]["value"] == pytest.approx(float(expected), abs=1e-5)
    # The checkpoint is the head alone (kilobytes, not the backbone's megabytes every epoch) with its optimizer
    # state, 3 epochs of 4 steps, and the state records the backbone to rebuild the full model from.
    state = json.loads(cached.paths.state.read_text())
    assert state["kind"] == "head" and state["checkpoint"] == "epoch_003.head.keras"
    assert state["backbone_weights_sha1"] == features.backbone_sha1(loaded.model)
    checkpoint = keras.models.load_model(cached.paths.checkpoints / "epoch_003.head.keras")
    assert checkpoint.input_shape == (None, 512)
    assert int(checkpoint.optimizer.iterations.numpy()) == 3 * 4
    assert (cached.paths.checkpoints / "epoch_003.head.keras").stat().st_size < cached.paths.model_keras.stat().st_size / 100


def test_a_second_run_reuses_the_cache(both_paths, data, tmp_path):
    cached, _ = both_paths
    again = train(data, VGG, dataclasses.replace(PLAIN, epochs=1), tmp_path / "again", verbose=0)
    summary = again.execution["feature_cache"]
    assert summary["key"] == cached.execution["feature_cache"]["key"]
    assert summary["computed_rows"] == {"train.view0": 0, "val.view0": 0}
    assert summary["reused_rows"] == {"train.view0": 14, "val.view0": 5}


def test_a_resumed_cached_run_ends_where_an_uninterrupted_one_does(data, tmp_path):
    spec = VGG  # with dropout: its masks are drawn per (seed, epoch, layer name), also after a resume
    settings = dataclasses.replace(PLAIN, epochs=4)
    whole = train(data, spec, settings, tmp_path / "whole", verbose=0)
    train(data, spec, dataclasses.replace(settings, epochs=2), tmp_path / "resumed", verbose=0)
    resumed = train(data, spec, settings, tmp_path / "resumed", verbose=0)
    assert resumed.resumed_from_epoch == 2
    assert list(resumed.history["epoch"]) == [1, 2, 3, 4]
    np.testing.assert_allclose(resumed.history["loss"], whole.history["loss"], rtol=1e-4)
    test_images = as_input(data["test"].images)
    np.testing.assert_allclose(models.load_model(resumed.paths.root).model.predict(test_images, verbose=0),
                               models.load_model(whole.paths.root).model.predict(test_images, verbose=0), atol=1e-5)
    assert int(resumed.model.optimizer.iterations.numpy()) == 4 * 4


def test_resuming_a_cached_run_with_other_backbone_weights_is_refused(data, tmp_path):
    weights = tmp_path / "vgg16_notop.weights.h5"
    for seed, epochs in ((5, 1), (6, 2)):
        keras.utils.set_random_seed(seed)
        keras.applications.VGG16(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3)).save_weights(weights)
        spec = dataclasses.replace(VGG, weights=str(weights))
        if epochs == 1:
            train(data, spec, dataclasses.replace(PLAIN, epochs=1), tmp_path / "run", verbose=0)
        else:  # the same path, other weights in it: the head was trained on other features
            with pytest.raises(ConfigError, match="other weights"):
                train(data, spec, dataclasses.replace(PLAIN, epochs=2), tmp_path / "run", verbose=0)


def test_fine_tuning_and_the_small_cnn_stream_the_images(data):
    model = built()
    assert features.can_cache(model)
    models.unfreeze_top(model, "vgg16")
    assert not features.can_cache(model)
    with pytest.raises(ConfigError, match="feature_cache=False"):
        features.cached_features(model, data, VGG)
    small = built(dataclasses.replace(VGG, backbone="small_cnn"))
    assert not features.can_cache(small)
    assert not train_module.uses_feature_cache(built(), dataclasses.replace(PLAIN, feature_cache=False))


# --------------------------------------------------------------------------------------------
# What the cache holds and when it is invalidated


def test_cached_features_are_the_backbone_outputs_and_are_reused(fresh_data):
    model = built()
    first = features.cached_features(model, fresh_data, VGG, progress=False)
    assert first.computed == {"train.view0": 14, "val.view0": 5}
    assert first.folder.parent == fresh_data.folder / "features" and first.folder.name == first.key
    assert first.train_views[0].shape == (14, 512) and first.train_views[0].dtype == np.float32
    expected = features.feature_extractor(model).predict(as_input(fresh_data["train"].images), verbose=0)
    np.testing.assert_allclose(first.train_views[0], expected, rtol=1e-5, atol=1e-6)
    description = json.loads((first.folder / "features.json").read_text())
    assert description["backbone"] == "vgg16" and description["preprocessing"]["image_size"] == SIZE
    rows = json.loads((first.folder / "train.view0.json").read_text())
    assert rows["ids"] == fresh_data["train"].manifest["sha1"].tolist()  # each row keyed by its image's content hash

    # The same backbone and weights, rebuilt (as a new run or a new notebook does): nothing computed again.
    again = features.cached_features(built(), fresh_data, VGG, progress=False)
    assert again.key == first.key and again.computed == {"train.view0": 0, "val.view0": 0}
    np.testing.assert_array_equal(again.train_views[0], first.train_views[0])


def test_another_backbone_gets_another_cache(fresh_data):
    vgg = features.cached_features(built(), fresh_data, VGG, progress=False)
    mobilenet_spec = dataclasses.replace(VGG, backbone="mobilenet", alpha=0.25)
    mobilenet = features.cached_features(built(mobilenet_spec), fresh_data, mobilenet_spec, progress=False)
    assert mobilenet.key != vgg.key
    assert mobilenet.computed == {"train.view0": 14, "val.view0": 5}
    assert mobilenet.dim == 256 and vgg.dim == 512


def test_other_weights_get_another_cache_and_the_same_weights_from_another_path_do_not(fresh_data, tmp_path):
    first = features.cached_features(built(seed=1), fresh_data, VGG, progress=False)
    other = features.cached_features(built(seed=2), fresh_data, VGG, progress=False)  # weights=None, other values
    assert other.key != first.key and other.computed == {"train.view0": 14, "val.view0": 5}
    assert not np.allclose(other.train_views[0], first.train_views[0])

    # A weights file: the key follows its values, not its path.
    keras.utils.set_random_seed(3)
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    weights_a = tmp_path / "a" / "vgg16_notop.weights.h5"
    weights_a.parent.mkdir()
    base.save_weights(weights_a)
    weights_b = tmp_path / "b" / weights_a.name
    weights_b.parent.mkdir()
    weights_b.write_bytes(weights_a.read_bytes())
    spec_a, spec_b = dataclasses.replace(VGG, weights=str(weights_a)), dataclasses.replace(VGG, weights=str(weights_b))
    from_a = features.cached_features(built(spec_a), fresh_data, spec_a, progress=False)
    from_b = features.cached_features(built(spec_b, seed=4), fresh_data, spec_b, progress=False)
    assert from_a.key not in (first.key, other.key)
    assert from_b.key == from_a.key and from_b.computed == {"train.view0": 0, "val.view0": 0}


def test_other_preprocessing_gets_another_cache(fresh_data):
    before = features.cached_features(built(), fresh_data, VGG, progress=False)
    # The same images preprocessed again into the same folder, padded instead of stretched.
    padded = preprocess_dataset(fresh_data.manifest.drop(columns=["row"]), fresh_data.folder, CLASSES,
                                PreprocessSettings(image_size=SIZE, resize="pad"), workers=1, progress=False)
    assert padded.settings.resize == "pad" and padded.folder == fresh_data.folder
    after = features.cached_features(built(), padded, VGG, progress=False)
    assert after.key != before.key and after.computed == {"train.view0": 14, "val.view0": 5}
    assert json.loads((after.folder / "features.json").read_text())["preprocessing"]["resize"] == "pad"


def test_each_preprocessing_option_gets_its_own_feature_key_and_the_defaults_keep_theirs():
    model = built()
    description = features.describe(model, VGG, PreprocessSettings(image_size=SIZE))
    assert description["preprocessing"] == {"image_size": SIZE, "resize": "stretch", "stored_as": "uint8 grayscale (N, S, S)"}
    keys = {features.cache_key(features.describe(model, VGG, PreprocessSettings(image_size=SIZE, intensity=i, crop=c)))
            for i in ("none", "equalize", "clahe") for c in ("none", "body")}
    assert len(keys) == 6 and features.cache_key(description) in keys


def test_a_changed_image_is_computed_again_and_only_it(fresh_data):
    before = features.cached_features(built(), fresh_data, VGG, progress=False)
    old_train = np.array(before.train_views[0])
    manifest = fresh_data.manifest.drop(columns=["row"])
    changed = manifest.index[manifest["split"] == "train"][3]
    path = Path(manifest.at[changed, "path"])
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    assert cv2.imwrite(str(path), cv2.flip(image, 1))  # the same file name, other pixels
    manifest.at[changed, "sha1"] = sha1_file(path)
    updated = preprocess_dataset(manifest, fresh_data.folder, CLASSES, fresh_data.settings, workers=1, progress=False)

    after = features.cached_features(built(), updated, VGG, progress=False)
    assert after.key == before.key  # backbone, weights and preprocessing unchanged
    assert after.computed == {"train.view0": 1, "val.view0": 0}
    row = int(np.flatnonzero(updated["train"].manifest["sha1"] == manifest.at[changed, "sha1"])[0])
    others = [r for r in range(14) if r != row]
    np.testing.assert_array_equal(np.asarray(after.train_views[0])[others], old_train[others])
    fresh = features.feature_extractor(built()).predict(as_input(updated["train"].images[row:row + 1]), verbose=0)
    np.testing.assert_allclose(after.train_views[0][row], fresh[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(after.train_views[0][row], old_train[row])


def test_features_computed_for_one_split_are_reused_for_another(fresh_data):
    """A new split (or another protocol's test set) over the same images runs the backbone only for new images."""
    from xraylib import views

    model = built()
    first = features.cached_features(model, fresh_data, VGG, progress=False)
    assert first.computed == {"train.view0": 14, "val.view0": 5}
    rows = fresh_data.manifest
    swapped = rows.assign(new_split=rows["split"].map({"train": "test", "val": "train", "test": "val"}))
    view = views.data_view(fresh_data, swapped, description="splits rotated")
    again = features.cached_features(built(), view, VGG, progress=False)
    # The new train split is the old val split (cached); the new val split is the old test split (never computed).
    assert again.computed == {"train.view0": 0, "val.view0": 5}
    test = features.split_features(built(), view, VGG, "test", progress=False)
    assert test.shape == (14, 512)
    assert json.loads((first.folder / "test.view0.json").read_text())["ids"] == view["test"].manifest["sha1"].tolist()
    np.testing.assert_array_equal(np.asarray(test), np.asarray(first.train_views[0]))  # copied, not recomputed


def test_predictions_from_cached_features_match_the_full_model(data):
    model = built()
    from_features = features.predict_split(model, data, VGG, "test")
    full = models.predict_split(model, data["test"])
    assert list(from_features.columns) == list(full.columns) and len(from_features) == 5
    np.testing.assert_allclose(from_features[["prob_normal", "prob_covid"]].to_numpy(),
                               full[["prob_normal", "prob_covid"]].to_numpy(), rtol=1e-4, atol=1e-5)


def test_an_interrupted_extraction_resumes_where_it_stopped(fresh_data, monkeypatch):
    monkeypatch.setattr(features, "CHUNK_ROWS", 4)
    real = features._extract_rows
    calls = []

    def dies_on_the_third_chunk(*args, **kwargs):
        calls.append(len(args[2]))
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a Colab disconnect would
        return real(*args, **kwargs)

    monkeypatch.setattr(features, "_extract_rows", dies_on_the_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        features.cached_features(built(), fresh_data, VGG, progress=False)
    monkeypatch.setattr(features, "_extract_rows", real)
    resumed = features.cached_features(built(), fresh_data, VGG, progress=False)
    assert resumed.computed == {"train.view0": 14 - 8, "val.view0": 5}  # two chunks of 4 were kept
    expected = features.feature_extractor(built()).predict(as_input(fresh_data["train"].images), verbose=0)
    np.testing.assert_allclose(resumed.train_views[0], expected, rtol=1e-5, atol=1e-6)
    assert not list(resumed.folder.glob("*.partial.*")) and not list(resumed.folder.glob("*.status.npy"))


def test_extraction_halves_the_batch_when_the_gpu_runs_out_of_memory(data):
    import tensorflow as tf

    model = built()
    extractor = features.feature_extractor(model)
    seen = []

    class SmallGpu:
        output = extractor.output

        def predict(self, dataset, verbose=0):
            batch = next(iter(dataset))
            seen.append(int(batch.shape[0]))
            if batch.shape[0] > 4:
                raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
            return extractor.predict(dataset, verbose=0)

    rows = np.arange(14)
    ids = features.content_ids(data["train"])
    out = features._extract_rows(SmallGpu(), data["train"].images, rows, ids, 0, None, batch_size=16)
    assert seen == [14, 8, 4]
    np.testing.assert_allclose(out, extractor.predict(as_input(data["train"].images), verbose=0), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Augmented views


def test_augmented_views_are_fixed_per_image_and_view(fresh_data):
    augment = AugmentSettings()
    model = built()
    cached = features.cached_features(model, fresh_data, VGG, views=3, augment=augment, progress=False)
    assert len(cached.train_views) == 3
    assert set(cached.computed) == {"train.view0", f"train.aug-{features.augment_key(augment)}.view1",
                                    f"train.aug-{features.augment_key(augment)}.view2", "val.view0"}
    plain = features.cached_features(model, fresh_data, VGG, progress=False)
    np.testing.assert_array_equal(cached.train_views[0], plain.train_views[0])  # view 0 is the plain image, shared
    assert plain.computed == {"train.view0": 0, "val.view0": 0}
    view1, view2 = np.asarray(cached.train_views[1]), np.asarray(cached.train_views[2])
    assert not np.allclose(view1, cached.train_views[0]) and not np.allclose(view1, view2)
    # View v of an image is the augmentation drawn from (v, its content hash), whatever the run.
    split = fresh_data["train"]
    ids = features.content_ids(split)
    by_hand = np.stack([augment_image(split.images[r], augment, features.view_rng(ids[r], 2))
                        for r in range(len(split))])
    expected = features.feature_extractor(model).predict(as_input(by_hand), verbose=0)
    np.testing.assert_allclose(view2, expected, rtol=1e-5, atol=1e-6)
    # Other augmentation settings: views 1+ computed again, view 0 reused.
    other = features.cached_features(model, fresh_data, VGG, views=2, augment=AugmentSettings(rotation_deg=20),
                                     progress=False)
    assert other.computed["train.view0"] == 0 and sum(other.computed.values()) == 14


def test_without_augmentation_there_is_one_view(data):
    cached = features.cached_features(built(), data, VGG, views=4, augment=None, progress=False)
    assert len(cached.train_views) == 1
    with pytest.raises(ConfigError, match="augment_views"):
        TrainSettings(augment_views=0)


def test_feature_batches_follow_the_image_batches_order_and_draw_views_per_epoch(data):
    split = data["train"]
    row_ids = np.arange(len(split), dtype=np.float32)[:, None]  # "features" that say which row they are
    views = [row_ids, row_ids + 1000, row_ids + 2000]
    for epoch in (0, 3):
        images = ImageBatches(split, BATCH, shuffle=True, seed=5, start_epoch=epoch)
        batches = FeatureBatches(views, split.labels, 2, BATCH, shuffle=True, seed=5, start_epoch=epoch)
        assert len(batches) == len(images) == 4
        rows = np.concatenate([batches[i][0][:, 0] % 1000 for i in range(4)]).astype(int)
        np.testing.assert_array_equal(rows, images._order)  # the same permutation of (seed, epoch)
        for i in range(4):
            x, y = batches[i]
            np.testing.assert_array_equal(y.argmax(axis=1), split.labels[(x[:, 0] % 1000).astype(int)])
    drawn = lambda epoch: np.concatenate([FeatureBatches(  # noqa: E731
        views, split.labels, 2, BATCH, shuffle=True, seed=5, start_epoch=epoch)[i][0][:, 0] // 1000 for i in range(4)])
    assert set(drawn(0)) == {0, 1, 2}  # 14 rows see all three views
    np.testing.assert_array_equal(drawn(1), drawn(1))  # reproducible (as after a resume)
    assert not np.array_equal(drawn(1), drawn(2))


def test_training_on_augmented_views(data, tmp_path):
    settings = dataclasses.replace(PLAIN, epochs=2, augment=AugmentSettings(), augment_views=2)
    result = train(data, VGG, settings, tmp_path / "run", verbose=0)
    assert result.execution["feature_cache"]["views"] == 2
    assert list(result.history["epoch"]) == [1, 2] and (tmp_path / "run" / "model.keras").is_file()


# --------------------------------------------------------------------------------------------
# Resume on the cached path

KILL_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    from xraylib import models, preprocess, runs, train
    cache, run_dir, mode = sys.argv[1:]
    data = preprocess.load_preprocessed(cache)

    class KilledInEpoch3(train.EpochCheckpoint):
        # SIGKILL: no exception, no cleanup, as when Colab's runtime is taken away.
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
        def on_train_batch_end(self, batch, logs=None):
            if self.epoch == 2 and batch == 1:
                os.kill(os.getpid(), signal.SIGKILL)

    if mode == "kill":
        train.EpochCheckpoint = KilledInEpoch3
    spec = models.ModelSpec(backbone="vgg16", weights=None, image_size=32, classes=tuple(data.classes))
    result = runs.train(data, spec, train.TrainSettings(epochs=5, batch_size=4, augment=None), run_dir=run_dir, verbose=0)
    print("RESUMED_FROM", result.resumed_from_epoch)
    print("EXECUTION", json.dumps(result.execution))
""")


@pytest.mark.slow
def test_cached_training_killed_mid_epoch_resumes_in_a_new_process(data, tmp_path):
    script = tmp_path / "train_and_die.py"
    script.write_text(KILL_SCRIPT)
    run_dir = tmp_path / "run"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}

    def run(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), str(data.folder), str(run_dir), mode],
                              capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)

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
    execution = json.loads(finished.stdout.split("EXECUTION", 1)[1].strip().splitlines()[0])
    assert execution["stage_1_input"] == "cached features"
    assert sum(execution["feature_cache"]["computed_rows"].values()) == 0  # the features of the killed run, reused
    history = pd.read_csv(run_dir / "history.csv")
    assert list(history["epoch"]) == [1, 2, 3, 4, 5]
    pd.testing.assert_frame_equal(history.iloc[:2], history_before)
    model = keras.models.load_model(run_dir / "model.keras")
    assert int(model.optimizer.iterations.numpy()) == 5 * 4  # epochs 3-5 continued the optimizer of epochs 1-2
    assert model.input_shape == (None, 32, 32, 1)
    assert (run_dir / "model.h5").is_file() and (run_dir / "model.json").is_file()


# --------------------------------------------------------------------------------------------
# The streaming path's tf.data input


def test_the_dataset_gives_the_batches_of_image_batches_epoch_by_epoch(data):
    split = data["train"]
    batches = ImageBatches(split, BATCH, shuffle=True, augment=AugmentSettings(), seed=9, start_epoch=2)
    dataset = as_dataset(batches)
    assert dataset.element_spec[0].shape.as_list() == [None, SIZE, SIZE, 1]
    assert dataset.element_spec[1].shape.as_list() == [None, 2]
    for epoch in (2, 3):
        batches.on_epoch_begin()  # what StartEpoch does when fit starts an epoch
        got = [(x.numpy(), y.numpy()) for x, y in dataset]
        expected = ImageBatches(split, BATCH, shuffle=True, augment=AugmentSettings(), seed=9, start_epoch=epoch)
        assert len(got) == len(expected) == 4
        for index, (x, y) in enumerate(got):
            want_x, want_y = expected[index]
            np.testing.assert_array_equal(x, want_x)
            np.testing.assert_array_equal(y, want_y)


# --------------------------------------------------------------------------------------------
# Precision


class FakeGpu:
    device_type = "GPU"

    def __init__(self, name: str):
        self.name = name


@pytest.fixture
def gpus(monkeypatch):
    """Set the visible GPUs and their compute capabilities: ``gpus([(7, 5)])``."""
    import tensorflow as tf

    def set_gpus(capabilities):
        devices = [FakeGpu(f"/physical_device:GPU:{i}") for i in range(len(capabilities))]
        details = {d.name: ({"compute_capability": c} if c else {}) for d, c in zip(devices, capabilities)}
        monkeypatch.setattr(tf.config, "list_physical_devices",
                            lambda kind=None: list(devices) if kind in ("GPU", None) else [])
        monkeypatch.setattr(tf.config.experimental, "get_device_details", lambda device: details[device.name])

    return set_gpus


@pytest.mark.parametrize("capabilities, expected", [
    ([], "float32"),                       # a CPU
    ([(7, 5)], "mixed_float16"),           # Colab's T4
    ([(8, 0)], "mixed_float16"),           # A100
    ([(7, 0)], "mixed_float16"),           # V100: the threshold itself
    ([(6, 0)], "float32"),                 # P100: no tensor cores, float16 is not faster
    ([(3, 7)], "float32"),                 # K80
    ([(8, 0), (6, 1)], "float32"),         # one old GPU among new ones
    ([None], "float32"),                   # no compute capability reported
])
def test_auto_precision_is_mixed_only_on_gpus_of_compute_capability_7_or_more(gpus, capabilities, expected):
    gpus(capabilities)
    assert models.gpu_compute_capabilities() == [tuple(c) if c else (0, 0) for c in capabilities]
    assert models.choose_dtype_policy("auto") == expected
    assert models.choose_dtype_policy("off") == "float32"
    assert models.choose_dtype_policy("on") == "mixed_float16"


def test_precision_settings_refuse_nonsense():
    with pytest.raises(ModelError, match="mixed_precision"):
        models.choose_dtype_policy("fast")
    with pytest.raises(ConfigError, match="mixed_precision"):
        TrainSettings(mixed_precision="yes")
    with pytest.raises(ConfigError, match="jit_compile"):
        TrainSettings(jit_compile="xla")


def test_training_on_this_cpu_is_float32(data, tmp_path):
    assert models.choose_dtype_policy("auto") == "float32"  # this machine has no GPU
    result = train(data, VGG, dataclasses.replace(PLAIN, epochs=1), tmp_path / "run", verbose=0)
    assert result.execution["dtype_policy"] == "float32"
    assert all(layer.dtype_policy.name == "float32" for layer in result.model.layers)


def test_a_mixed_precision_model_computes_in_float16_and_is_saved_in_float32(data):
    keras.utils.set_random_seed(0)
    mixed = models.build_model(VGG, dtype_policy="mixed_float16")
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored after the build
    assert mixed.get_layer("block1_conv1").compute_dtype == "float16"
    assert mixed.get_layer("predictions").compute_dtype == "float32"  # softmax in float32
    assert models.uses_mixed_precision(mixed)
    images = as_input(data["val"].images)
    probabilities = mixed.predict(images, verbose=0)
    assert probabilities.dtype == np.float32

    plain = models.as_float32(mixed, VGG)
    assert not models.uses_mixed_precision(plain)
    assert all(layer.dtype_policy.name == "float32" for layer in plain.layers)
    np.testing.assert_allclose(plain.predict(images, verbose=0), probabilities, atol=1e-2)
    for name in ("block5_conv3", "head_dense", "predictions"):
        for a, b in zip(plain.get_layer(name).weights, mixed.get_layer(name).weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert models.as_float32(plain, VGG) is plain


def test_extraction_releases_each_chunks_pages_and_gives_the_same_features(fresh_data, monkeypatch):
    """The cache's images and the features file are memory-mapped: after each chunk their pages leave the process's
    RSS (:func:`xraylib.fileio.release_pages`), which would otherwise grow to the files' size (5.6 GB of images for
    NIH ChestX-ray14 at 224 px). The features are those of one pass over all images."""
    monkeypatch.setattr(features, "CHUNK_ROWS", 4)
    released: list[str] = []
    real = features.release_pages

    def counted(array):
        released.append(Path(array.filename).name)
        real(array)

    monkeypatch.setattr(features, "release_pages", counted)
    model = built()
    got = features.split_features(model, fresh_data, VGG, "train", progress=False)
    assert released.count("train_images.npy") == 4 and released.count("train.view0.partial.npy") == 4  # 14 rows
    expected = features.feature_extractor(model).predict(as_input(fresh_data["train"].images), verbose=0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_in_a_multi_worker_cluster_each_worker_extracts_on_its_own(fresh_data, monkeypatch):
    """Under MultiWorkerMirroredStrategy ``predict`` is collective: workers whose caches held different rows (one
    complete, the other's missing or cut by a kill) failed with "Collective instance ... expected type". In a cluster
    the extraction runs in this process alone (checked by hand with two local workers, one cache complete and the
    other empty: both finished, the model the same as one device's). Here: the same features, ``predict`` unused."""
    model = built()
    expected = features.feature_extractor(model).predict(as_input(fresh_data["train"].images), verbose=0)

    def no_predict(*args, **kwargs):
        raise AssertionError("predict is collective in a cluster")

    monkeypatch.setattr(features, "_in_cluster", lambda: True)
    monkeypatch.setattr(keras.Model, "predict", no_predict)
    got = features.split_features(model, fresh_data, VGG, "train", progress=False)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
