"""Models: every backbone's output, frozen layers, fine-tuning, input handling, weights files, saving and loading.

Everything is built with ``weights=None`` at 32-64 px, except MobileNet(alpha=0.25) with the real
ImageNet weights from ../shared/weights (skipped where they are absent).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from xraylib import models, runs
from xraylib.preprocess import PreprocessSettings
from xraylib.errors import ModelError
from xraylib.phantoms import make_phantom
from xraylib.preprocess import NORMALISATION, normalise, to_rgb_float
from xraylib.train import compile_model

# Keras' own conversions trip NumPy 2's copy-keyword deprecation; nothing for xraylib to act on.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("normal", "pneumonia", "covid")
HEAD_WEIGHT_LAYERS = {"head_dense", "predictions"}  # the head layers that hold weights
SIZE = 32


def phantoms(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(n, size, size) uint8`` synthetic radiographs and their labels 0/1 (normal/covid, alternating)."""
    labels = np.arange(n) % 2
    images = np.stack([
        make_phantom(("normal", "covid")[label], np.random.default_rng(seed + i), size, size).image
        for i, label in enumerate(labels)
    ])
    return images, labels


def as_input(images_uint8: np.ndarray) -> np.ndarray:
    return images_uint8.astype(np.float32)[..., None]


def weight_values(model: keras.Model) -> dict[str, np.ndarray]:
    """Every variable of the model (trainable or not, BatchNorm statistics included) by its path."""
    return {w.path: np.array(w.numpy()) for w in model.weights}


def mean_loss(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    """Cross-entropy in inference mode (dropout off), so two calls on the same batch are comparable."""
    return float(np.mean(keras.losses.categorical_crossentropy(y, model(x, training=False)).numpy()))


def layer_of(path: str) -> str:
    return path.split("/")[0]


@pytest.fixture(scope="module")
def built() -> dict[str, keras.Model]:
    """One model per backbone (weights=None, 32 px, three classes), built on first use and shared by the tests."""

    class Models(dict):
        def __missing__(self, backbone: str) -> keras.Model:
            keras.utils.set_random_seed(0)
            self[backbone] = models.build_model(backbone=backbone, weights=None, image_size=SIZE, classes=CLASSES)
            return self[backbone]

    return Models()


@pytest.fixture(scope="module")
def images32() -> np.ndarray:
    return phantoms(4, SIZE)[0]


# --------------------------------------------------------------------------------------------
# Building


@pytest.mark.parametrize("backbone", sorted(models.BACKBONES))
def test_every_backbone_gives_softmax_rows_and_trains_only_its_head(backbone, built, images32):
    model = built[backbone]
    probs = model.predict(as_input(images32), verbose=0)
    assert probs.shape == (4, len(CLASSES))
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (probs >= 0).all()
    assert model.xraylib_spec.backbone == backbone
    assert model.get_layer(models.BACKBONES[backbone][1]) is not None  # the Grad-CAM layer is reachable by name

    trainable_layers = {layer_of(w.path) for w in model.trainable_weights}
    if backbone == "small_cnn":  # no pretrained part: trained whole
        assert trainable_layers == HEAD_WEIGHT_LAYERS | {"conv1", "conv2", "conv3", "last_conv"}
    else:
        assert trainable_layers == HEAD_WEIGHT_LAYERS
        assert models.trainable_summary(model)["frozen_params"] > 10 * models.trainable_summary(model)["trainable_params"]
    for name in models.head_layer_names():
        assert model.get_layer(name).trainable


@pytest.mark.parametrize("backbone", ["vgg16", "densenet121", "mobilenet", "small_cnn"])
def test_the_models_input_handling_equals_numpy_normalisation(backbone, built, images32):
    """caffe (vgg16), torch (densenet121), tf (mobilenet) and unit (small_cnn): the layers inside the model
    compute what preprocess.normalise computes on the gray image copied to RGB."""
    model = built[backbone]
    upto = keras.Model(model.input, model.get_layer("normalise").output)
    inside = upto.predict(as_input(images32), verbose=0)
    expected = normalise(to_rgb_float(images32), backbone)
    if NORMALISATION[backbone] == "unit":
        expected = expected[..., :1]  # the small CNN takes the gray channel as it is
    assert inside.shape == expected.shape
    np.testing.assert_allclose(inside, expected, rtol=1e-5, atol=1e-4)


def changed_layers(model: keras.Model, x: np.ndarray, y: np.ndarray, learning_rate: float = 1e-2, epochs: int = 1) -> set[str]:
    """Compile, train (two steps an epoch), and return the layers whose variables changed."""
    before = weight_values(model)
    compile_model(model, learning_rate)
    model.fit(x, y, batch_size=len(x) // 2, epochs=epochs, verbose=0)
    after = weight_values(model)
    return {layer_of(path) for path in before if not np.array_equal(before[path], after[path])}


def test_a_training_step_changes_only_the_head_until_the_top_block_is_unfrozen():
    keras.utils.set_random_seed(1)
    model = models.build_model(backbone="vgg16", weights=None, image_size=SIZE)
    images, labels = phantoms(4, SIZE)
    x, y = as_input(images), np.eye(2)[labels]
    assert changed_layers(model, x, y) == HEAD_WEIGHT_LAYERS
    # The same step after unfreeze_top does move the backbone: the check above is not vacuous.
    models.unfreeze_top(model, "vgg16")
    assert changed_layers(model, x, y, 1e-3) == HEAD_WEIGHT_LAYERS | {"block5_conv1", "block5_conv2", "block5_conv3"}


def test_unfreeze_top_of_vgg16_and_resnet50():
    vgg = models.build_model(backbone="vgg16", weights=None, image_size=SIZE)
    assert models.unfreeze_top(vgg, "vgg16") == ["block5_conv1", "block5_conv2", "block5_conv3"]
    block5 = {"block5_conv1", "block5_conv2", "block5_conv3"}
    assert {layer_of(w.path) for w in vgg.trainable_weights} == HEAD_WEIGHT_LAYERS | block5
    assert not vgg.get_layer("block4_conv3").trainable

    resnet = models.build_model(backbone="resnet50", weights=None, image_size=SIZE)
    models.unfreeze_top(resnet, "resnet50")
    convs = {f"conv5_block3_{i}_conv" for i in (1, 2, 3)}
    assert {layer_of(w.path) for w in resnet.trainable_weights} == HEAD_WEIGHT_LAYERS | convs
    batchnorms = [layer for layer in resnet.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert any(layer.name.startswith("conv5_block3_") for layer in batchnorms)
    assert not any(layer.trainable for layer in batchnorms)

    with pytest.raises(ModelError, match="small_cnn"):
        models.unfreeze_top(models.build_model(backbone="small_cnn", weights=None, image_size=SIZE), "small_cnn")


def test_bad_backbone_and_bad_settings_raise_model_error():
    with pytest.raises(ModelError, match="vgg19"):
        models.build_model(backbone="vgg19", weights=None)
    with pytest.raises(ModelError, match="vgg19"):
        models.ModelSpec(backbone="vgg19")
    with pytest.raises(ModelError, match="two classes"):
        models.ModelSpec(classes=("covid",))
    with pytest.raises(ModelError, match="pooling"):
        models.ModelSpec(pooling="median")


# --------------------------------------------------------------------------------------------
# Weights


def test_missing_weights_file_names_the_file(tmp_path):
    missing = tmp_path / "nowhere" / "vgg16_notop.h5"
    with pytest.raises(ModelError, match="not found") as caught:
        models.build_model(backbone="vgg16", weights=str(missing), image_size=SIZE)
    assert str(missing) in str(caught.value)


def test_imagenet_weights_offline_says_how_to_pass_a_local_file(monkeypatch):
    def offline_vgg16(*args, **kwargs):
        # What keras.utils.get_file raises when the download fails (urllib.error.URLError inside).
        raise Exception("URL fetch failure on https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
                        "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5: None -- [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(keras.applications, "VGG16", offline_vgg16)
    with pytest.raises(ModelError) as caught:
        models.build_model(backbone="vgg16", weights="imagenet", image_size=SIZE)
    message = str(caught.value)
    assert "URL fetch failure" in message  # the cause is kept
    assert "weights='/path/to/vgg16_notop.h5'" in message
    assert "weights=None" in message


def test_mobilenet_loads_the_real_imagenet_weights_from_a_path_and_trains_its_head(shared_weights):
    weights_file = shared_weights / "mobilenet_2_5_224_tf_no_top.h5"
    keras.utils.set_random_seed(3)
    model = models.build_model(backbone="mobilenet", alpha=0.25, weights=str(weights_file), image_size=64)
    with h5py.File(weights_file, "r") as saved:
        # (Keras 3 names the depthwise kernel "kernel"; the Keras 2 file "depthwise_kernel:0".)
        for layer, ours, theirs in [("conv1", "kernel", "kernel"), ("conv_dw_7", "kernel", "depthwise_kernel"),
                                    ("conv_pw_13", "kernel", "kernel"), ("conv_pw_13_bn", "moving_mean", "moving_mean")]:
            (loaded,) = [w for w in model.get_layer(layer).weights if w.path == f"{layer}/{ours}"]
            np.testing.assert_array_equal(loaded.numpy(), saved[f"{layer}/{layer}/{theirs}:0"][()], err_msg=layer)

    images, labels = phantoms(8, 64, seed=10)
    x, y = as_input(images), np.eye(2)[labels]
    loss_before = mean_loss(model, x, y)
    # Real weights (random ones make MobileNet's activations vanish, so nothing would move anyway): the head
    # trains, the backbone and its BatchNorm moving statistics do not.
    assert changed_layers(model, x, y, 1e-3, epochs=4) == HEAD_WEIGHT_LAYERS
    assert mean_loss(model, x, y) < loss_before
    # After unfreeze_top the top block's convolutions train; its BatchNorm layers (conv_dw_13_bn, conv_pw_13_bn) do not.
    assert set(models.unfreeze_top(model, "mobilenet")) == {"conv_dw_13", "conv_pw_13"}
    assert changed_layers(model, x, y, 1e-4) == HEAD_WEIGHT_LAYERS | {"conv_dw_13", "conv_pw_13"}


def test_weights_file_of_the_wrong_architecture_is_a_model_error(shared_weights):
    with_top = shared_weights / "mobilenet_2_5_224_tf.h5"  # has the classifier: does not fit the model without top
    with pytest.raises(ModelError, match="cannot load these weights"):
        models.build_model(backbone="mobilenet", alpha=0.25, weights=str(with_top), image_size=64)


# --------------------------------------------------------------------------------------------
# Saving and loading


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """A VGG16 (weights=None, 32 px) saved by the run folder, its inputs and the probabilities before saving."""
    folder = tmp_path_factory.mktemp("saved") / "run"
    keras.utils.set_random_seed(4)
    model = models.build_model(backbone="vgg16", weights=None, image_size=SIZE, classes=CLASSES)
    x = as_input(phantoms(4, SIZE, seed=20)[0])
    probs = model.predict(x, verbose=0)
    metadata = {"classes": list(CLASSES), "model": model.xraylib_spec.to_dict(), "input_size": [SIZE, SIZE, 1],
                "preprocessing": PreprocessSettings(image_size=SIZE).to_dict(),
                "threshold": {"value": 0.3, "positive_class": "covid"}}
    files = runs.RunFolder(folder).save_model(model, metadata)
    np.save(folder.parent / "x.npy", x)
    return {"folder": folder, "files": files, "x": x, "probs": probs}


def test_save_model_writes_keras_h5_and_json_with_versions(saved):
    folder = saved["folder"]
    assert sorted(p.name for p in folder.iterdir()) == ["model.h5", "model.json", "model.keras", "model.weights.h5"]
    assert saved["files"] == {name: folder / name for name in models.MODEL_FILES}
    meta = json.loads((folder / "model.json").read_text())
    assert meta["versions"]["keras"] == keras.__version__
    assert meta["versions"]["backend"] == keras.backend.backend()
    assert "tensorflow" in meta["versions"] and "xraylib" in meta["versions"]
    assert meta["classes"] == list(CLASSES)
    assert meta["model"]["backbone"] == "vgg16"


def test_a_model_trained_on_other_decoded_pixels_loads_with_a_warning(saved, tmp_path):
    import shutil
    import warnings

    from xraylib.preprocess import PIXELS_VERSION

    folder = tmp_path / "run"
    shutil.copytree(saved["folder"], folder)
    meta = json.loads((folder / "model.json").read_text())
    for version, warns in ((PIXELS_VERSION, False), (PIXELS_VERSION - 1, True)):
        meta["preprocessing"] = {"image_size": SIZE, "resize": "stretch", "pixels_version": version}
        (folder / "model.json").write_text(json.dumps(meta))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            models.load_model(folder)
        messages = [str(w.message) for w in caught if "pixel code version" in str(w.message)]
        assert len(messages) == int(warns), messages
        if warns:
            assert str(folder / "model.json") in messages[0] and "Retrain" in messages[0]


@pytest.mark.parametrize("target", ["", "model.keras", "model.h5"])
def test_load_model_gives_the_same_probabilities(saved, target):
    loaded = models.load_model(saved["folder"] / target if target else saved["folder"])
    assert loaded.path.name == (target or "model.keras")  # the folder prefers the .keras file
    assert loaded.file_format == ("h5" if target == "model.h5" else "keras")
    assert loaded.loaded_from == saved["folder"] / "model.weights.h5"  # rebuilt from model.json's spec
    assert loaded.classes == CLASSES
    assert loaded.threshold == 0.3 and loaded.positive_class == "covid"
    assert loaded.spec.backbone == "vgg16" and loaded.spec.image_size == SIZE
    probs = loaded.model.predict(saved["x"], verbose=0)
    np.testing.assert_allclose(probs, saved["probs"], atol=1e-6)


def test_the_comparison_is_not_vacuous(saved):
    """Images get different probabilities, and a freshly built model gives others: equal outputs mean equal weights."""
    assert np.ptp(saved["probs"][:, 0]) > 1e-4
    keras.utils.set_random_seed(99)
    other = models.build_model(backbone="vgg16", weights=None, image_size=SIZE, classes=CLASSES)
    assert not np.allclose(other.predict(saved["x"], verbose=0), saved["probs"], atol=1e-6)


LOAD_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import keras, numpy as np
    from xraylib import models
    folder, x_file = Path(sys.argv[1]), sys.argv[2]
    x = np.load(x_file)
    out = {name: models.load_model(folder / name).model.predict(x, verbose=0).tolist() for name in ("model.keras", "model.h5")}
    # No xraylib code is needed to use the model: plain Keras in safe mode.
    plain = keras.models.load_model(folder / "model.keras", compile=False, safe_mode=True)
    out["plain keras"] = plain.predict(x, verbose=0).tolist()
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.slow
def test_saved_model_gives_the_same_probabilities_in_a_new_process(saved, tmp_path):
    script = tmp_path / "load_in_new_process.py"
    script.write_text(LOAD_SCRIPT)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(script), str(saved["folder"]), str(saved["folder"].parent / "x.npy")],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT", 1)[1])
    assert set(result) == {"model.keras", "model.h5", "plain keras"}
    for name, probs in result.items():
        np.testing.assert_allclose(np.array(probs), saved["probs"], atol=1e-6, err_msg=name)


def test_load_model_without_its_json_is_a_model_error(saved, tmp_path):
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "model.keras").write_bytes((saved["folder"] / "model.keras").read_bytes())
    with pytest.raises(ModelError, match="model.json"):
        models.load_model(lone)
    with pytest.raises(ModelError, match="model.json"):
        models.load_model(lone / "model.keras")


def test_load_model_of_a_folder_without_a_model_is_a_model_error(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps({"classes": ["normal", "covid"]}))
    with pytest.raises(ModelError, match="no model file"):
        models.load_model(tmp_path)
    with pytest.raises(ModelError, match="no model file"):
        models.load_model(tmp_path / "missing.keras")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """A small CNN (2 classes, 32 px) saved by the run folder: model.keras, model.h5, model.weights.h5, model.json."""
    folder = tmp_path_factory.mktemp("small") / "run"
    spec = models.ModelSpec(backbone="small_cnn", weights=None, image_size=SIZE, classes=("normal", "covid"))
    keras.utils.set_random_seed(8)
    runs.RunFolder(folder).save_model(models.build_model(spec), {
        "classes": ["normal", "covid"], "model": spec.to_dict(), "input_size": [SIZE, SIZE, 1],
        "preprocessing": PreprocessSettings(image_size=SIZE).to_dict(),
        "threshold": {"value": 0.4, "positive_class": "covid"}})
    return folder


def from_another_keras(source: Path, target: Path) -> None:
    """A whole model file (``source``'s, copied to ``target``) that describes the model with a class this Keras does
    not know, as a Keras of another version may write it."""
    import zipfile

    future = json.dumps({"class_name": "FutureFunctional", "module": "keras.src.models.future", "config": {}})
    if source.suffix == ".keras":
        with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
            for name in old.namelist():
                new.writestr(name, future.encode() if name == "config.json" else old.read(name))
    else:
        target.write_bytes(source.read_bytes())
        with h5py.File(target, "r+") as h5:
            h5.attrs["model_config"] = future


@pytest.mark.parametrize("name, fmt", [("model.keras", "Keras v3 (.keras)"), ("model.h5", "HDF5 (.h5)")])
def test_a_model_file_of_another_keras_names_the_format_and_the_keras_version_it_was_saved_with(tmp_path, small_run,
                                                                                               name, fmt):
    meta = json.loads((small_run / "model.json").read_text())
    meta["versions"]["keras"] = "3.4.1"  # as if saved elsewhere: the message must quote the JSON, not this Keras
    (tmp_path / "model.json").write_text(json.dumps(meta))
    from_another_keras(small_run / name, tmp_path / name)
    with pytest.raises(ModelError) as caught:
        models.load_model(tmp_path / name)
    message = str(caught.value)
    assert str(tmp_path / name) in message
    assert fmt in message
    assert "saved with Keras 3.4.1" in message
    assert "keras==3.4.1" in message


def truncated(path: Path, target: Path) -> None:
    data = path.read_bytes()
    target.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("case", ["truncated .keras", "truncated .h5", "PNG named .keras"])
def test_a_damaged_or_renamed_model_file_says_so_and_blames_no_keras_version(tmp_path, small_run, case):
    import cv2

    meta = json.loads((small_run / "model.json").read_text())
    meta["versions"]["keras"] = "3.4.1"  # another Keras saved it: still, a damaged file is not a version problem
    (tmp_path / "model.json").write_text(json.dumps(meta))
    name = "model.h5" if case.endswith(".h5") else "model.keras"
    if case.startswith("PNG"):
        ok, png = cv2.imencode(".png", np.full((64, 64), 128, np.uint8))
        (tmp_path / name).write_bytes(png.tobytes())
    else:
        truncated(small_run / name, tmp_path / name)
    for target in (tmp_path / name, tmp_path):
        with pytest.raises(ModelError) as caught:
            models.load_model(target)
        message = str(caught.value)
        assert message.startswith(f"{tmp_path / name}: damaged or not a model file ("), message
        assert "keras==" not in message and "Install" not in message
        assert len(message) <= models.MAX_LOAD_ERROR_CHARS


def test_when_every_file_of_a_run_is_truncated_each_is_named_as_damaged(tmp_path, small_run):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "model.json").write_bytes((small_run / "model.json").read_bytes())
    for name in ("model.keras", "model.h5", "model.weights.h5"):
        truncated(small_run / name, folder / name)
    with pytest.raises(ModelError) as caught:
        models.load_model(folder)
    message = str(caught.value)
    assert message.startswith(f"{folder}: each file is damaged or not a model file ("), message
    assert all(name in message for name in ("model.keras", "model.h5", "model.weights.h5"))
    assert "keras==" not in message and len(caught.value.details) == 3


def test_a_truncated_keras_file_beside_whole_weights_still_loads(tmp_path, small_run):
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(small_run, folder)
    truncated(small_run / "model.keras", folder / "model.keras")
    assert models.load_model(folder).loaded_from == folder / "model.weights.h5"


# --------------------------------------------------------------------------------------------
# model.json checked on load

#: model.json contents that must be refused, and the words the one-line message must hold (the file is always named).
BAD_MODEL_JSON = {
    "empty": ("", "empty"),
    "invalid JSON": ('{"classes": ["normal", "covid"],', "not valid JSON"),
    "a list": ('["normal", "covid"]', "expected a JSON object, got list"),
    "no classes": ({"classes": None}, "'classes'"),
    "no preprocessing": ({"preprocessing": None}, "'preprocessing'"),
    "threshold 'high'": ({"threshold": {"value": "high", "positive_class": "covid"}},
                         "'threshold.value' must be a number in [0, 1], got 'high'"),
    "threshold is a word": ({"threshold": "high"}, "'threshold' must be a mapping"),
    "no threshold": ({"threshold": None}, "'threshold' is missing"),
    "NaN threshold": ({"threshold": {"value": float("nan"), "positive_class": "covid"}},
                      "'threshold.value' must be a number in [0, 1], got nan"),
    "infinite threshold": ({"threshold": {"value": float("inf"), "positive_class": "covid"}}, "got inf"),
    "one class": ({"classes": ["covid"]}, "'classes' must list two or more"),
    "three classes": ({"classes": ["normal", "covid", "other"]}, "'model' describes classes"),
    "positive class unknown": ({"threshold": {"value": 0.5, "positive_class": "pneumonia"}},
                               "'threshold.positive_class' must be one of"),
    "NaN site threshold": ({"site_profiles": {"ward-3": {"threshold": float("nan")}}},
                           "'site_profiles.ward-3.threshold' must be a number from 0 to 1, got nan"),
    "unknown resize": ({"preprocessing": {"image_size": SIZE, "resize": "squash"}}, "'preprocessing'"),
    "unknown backbone": ({"model": {"backbone": "vgg99", "image_size": SIZE, "classes": ["normal", "covid"]}},
                         "'model'"),
}


def bad_model_json(small_run: Path, change) -> str:
    if isinstance(change, str):
        return change
    meta = json.loads((small_run / "model.json").read_text())
    for key, value in change.items():
        if value is None:
            del meta[key]
        else:
            meta[key] = value
    return json.dumps(meta)  # NaN and Infinity as Python's json writes them (not valid strict JSON)


@pytest.mark.parametrize("case", list(BAD_MODEL_JSON))
def test_a_bad_model_json_is_refused_with_one_line_naming_the_file_and_the_field(tmp_path, small_run, case):
    change, words = BAD_MODEL_JSON[case]
    (tmp_path / "model.json").write_text(bad_model_json(small_run, change))
    (tmp_path / "model.keras").write_bytes((small_run / "model.keras").read_bytes())
    with pytest.raises(ModelError) as caught:
        models.load_model(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'model.json'}: "), message
    assert words in message, message
    assert "\n" not in message and "Traceback" not in message


def test_model_json_must_name_as_many_classes_as_the_model_gives_probabilities(tmp_path, small_run):
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(small_run, folder)
    meta = json.loads((folder / "model.json").read_text())
    classes = ["normal", "covid", "other"]  # edited in both places: the JSON agrees with itself, not with the model
    meta.update(classes=classes, model={**meta["model"], "classes": classes})
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=r"model.json: field 'classes' lists 3 classes .* the model gives 2 probabilities"):
        models.load_model(folder)


def test_check_metadata_is_what_the_run_folder_checks_before_writing(tmp_path, small_run):
    """The same schema guards writing: a NaN threshold is never written into model.json."""
    meta = json.loads((small_run / "model.json").read_text())
    meta["threshold"] = {**meta["threshold"], "value": float("nan")}
    with pytest.raises(ModelError, match="threshold.value"):
        runs.RunFolder(tmp_path / "run").save_model(keras.Sequential([keras.Input((1,))]), meta)
    assert not (tmp_path / "run" / "model.json").exists()
