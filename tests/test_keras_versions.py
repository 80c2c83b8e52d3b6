"""Models saved with one Keras version load and predict the same with another (marker ``keras_versions``).

``make test`` runs these in .venv (xraylib's development versions) and in .venv-colab (Colab's, from
colab-versions.txt), with ``XRAYLIB_OTHER_PYTHON`` naming the other environment's python: the model is saved here
through :meth:`xraylib.runs.RunFolder.save_model` and loaded there by :func:`xraylib.models.load_model`, so both
directions are tested (e.g. Keras 3.15 -> 3.10 and 3.10 -> 3.15).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

from xraylib import models, runs
from xraylib.errors import ModelError
from xraylib.preprocess import PreprocessSettings

pytestmark = pytest.mark.keras_versions

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
CLASSES = ("normal", "covid")
SPECS = {
    "small_cnn": models.ModelSpec(backbone="small_cnn", weights=None, image_size=SIZE, classes=CLASSES),
    "mobilenet": models.ModelSpec(backbone="mobilenet", weights=None, alpha=0.25, image_size=SIZE, classes=CLASSES,
                                  heads=2),
}

LOAD_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import keras, numpy as np
    from xraylib import models
    folder, x_file, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    x = np.load(x_file)
    said = {"keras": keras.__version__}
    for name in sys.argv[4:]:
        loaded = models.load_model(folder / name)
        np.save(out / f"{name}.npy", loaded.model.predict(x, verbose=0))
        said[name] = str(loaded.loaded_from)
    print("RESULT" + json.dumps(said))
""")


def save_run(folder: Path, spec: models.ModelSpec, seed: int) -> keras.Model:
    """A model of ``spec`` with random weights, saved the way training saves it."""
    keras.utils.set_random_seed(seed)
    model = models.build_model(spec)
    # Untrained batch normalisation (mean 0, variance 1) and zero biases make a random MobileNet's features vanish
    # (every image 0.5): small variances and random biases give every image its own probabilities, as training would.
    rng = np.random.default_rng(seed)
    for v in model.weights:
        if "moving_variance" in v.path:
            v.assign(rng.uniform(0.01, 0.05, v.shape).astype("float32"))
        elif v.path.endswith("bias") or v.path.endswith("beta"):
            v.assign(rng.normal(0, 0.1, v.shape).astype("float32"))
    metadata = {"classes": list(CLASSES), "model": spec.to_dict(), "input_size": [SIZE, SIZE, 1],
                "preprocessing": PreprocessSettings(image_size=SIZE).to_dict(),
                "threshold": {"value": 0.5, "positive_class": "covid"}}
    runs.RunFolder(folder).save_model(model, metadata)
    return model


def images(n: int = 6) -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, size=(n, SIZE, SIZE, 1)).astype("float32")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("versions")
    x = images()
    np.save(root / "x.npy", x)
    probs = {}
    for name, spec in SPECS.items():
        model = save_run(root / name, spec, seed=3)
        probs[name] = model.predict(x, verbose=0)
        assert np.ptp(probs[name][:, 1]) > 1e-4, "the images must get different probabilities"
    return {"root": root, "x": x, "probs": probs}


def test_a_model_saved_here_predicts_the_same_in_the_other_keras(saved, tmp_path):
    other = os.environ.get("XRAYLIB_OTHER_PYTHON")
    if not other:
        pytest.skip("XRAYLIB_OTHER_PYTHON is not set: run `make test`, which builds .venv-colab (Colab's TensorFlow/Keras, "
                    "colab-versions.txt) and loads models across the two environments")
    script = tmp_path / "load_in_other_keras.py"
    script.write_text(LOAD_SCRIPT)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
    for name in SPECS:
        out = tmp_path / name
        out.mkdir()
        done = subprocess.run([other, str(script), str(saved["root"] / name), str(saved["root"] / "x.npy"), str(out),
                               "", "model.keras", "model.h5"],
                              capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        said = json.loads(done.stdout.split("RESULT", 1)[1])
        assert said["keras"] != keras.__version__, f"{other} runs Keras {said['keras']}, the same as here: no crossing"
        for target in ("", "model.keras", "model.h5"):
            assert said[target] == str(saved["root"] / name / "model.weights.h5"), said
            np.testing.assert_allclose(np.load(out / f"{target}.npy"), saved["probs"][name], atol=1e-5, rtol=0,
                                       err_msg=f"{name} {target or 'run folder'}: Keras {keras.__version__} -> {said['keras']}")


def test_the_weights_file_is_what_loads_a_model_whose_full_file_cannot(saved, tmp_path):
    """A .keras file that cannot load (as from a newer Keras), beside a good weights file and model.json, still loads."""
    folder = tmp_path / "run"
    shutil.copytree(saved["root"] / "mobilenet", folder)
    (folder / "model.keras").write_bytes(b"PK\x03\x04 not a model any Keras can read")
    (folder / "model.h5").unlink()
    loaded = models.load_model(folder)
    assert loaded.path == folder / "model.keras" and loaded.file_format == "keras"
    assert loaded.loaded_from == folder / "model.weights.h5"
    assert loaded.model.get_layer("predictions") is not None and models.head_count(loaded.model) == 2
    np.testing.assert_allclose(loaded.model.predict(saved["x"], verbose=0), saved["probs"]["mobilenet"], atol=1e-6)


def test_without_the_weights_file_the_full_files_load_as_before(saved, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(saved["root"] / "small_cnn", folder)
    (folder / "model.weights.h5").unlink()
    for target, name in (("", "model.keras"), ("model.h5", "model.h5")):
        loaded = models.load_model(folder / target if target else folder)
        assert loaded.path == folder / name and loaded.loaded_from == folder / name
        np.testing.assert_allclose(loaded.model.predict(saved["x"], verbose=0), saved["probs"]["small_cnn"], atol=1e-6)
    # a damaged .keras file: the other file of the pair loads
    (folder / "model.keras").write_bytes(b"PK\x03\x04 damaged")
    assert models.load_model(folder).loaded_from == folder / "model.h5"


def test_weights_of_another_architecture_fall_back_to_the_full_file(saved, tmp_path):
    """model.json's spec must match the weights: a mismatch is not loaded silently."""
    folder = tmp_path / "run"
    shutil.copytree(saved["root"] / "small_cnn", folder)
    shutil.copy(saved["root"] / "mobilenet" / "model.weights.h5", folder / "model.weights.h5")
    loaded = models.load_model(folder)
    assert loaded.loaded_from == folder / "model.keras"
    np.testing.assert_allclose(loaded.model.predict(saved["x"], verbose=0), saved["probs"]["small_cnn"], atol=1e-6)


def as_from_another_keras(folder: Path, other_weights: Path) -> None:
    """Whole files that this Keras cannot read, as a Keras of another version writes them: ``model.keras`` and
    ``model.h5`` describe the model with a class this Keras does not know, ``model.weights.h5`` holds another
    architecture's weights (damaged files are another case: they are "damaged or not a model file", test_models)."""
    import zipfile

    import h5py

    future = json.dumps({"class_name": "FutureFunctional", "module": "keras.src.models.future", "config": {}})
    with zipfile.ZipFile(folder / "model.keras") as old:
        members = {name: old.read(name) for name in old.namelist()}
    members["config.json"] = future.encode()
    with zipfile.ZipFile(folder / "model.keras", "w") as new:
        for name, data in members.items():
            new.writestr(name, data)
    with h5py.File(folder / "model.h5", "r+") as h5:
        h5.attrs["model_config"] = future
    shutil.copy(other_weights, folder / "model.weights.h5")


@pytest.mark.parametrize("saved_with", ["3.4.1", "same", "unknown"])
def test_when_nothing_loads_the_error_is_short_and_starts_with_the_fix(saved, tmp_path, saved_with):
    folder = tmp_path / ("a_rather_long_folder_name_" * 4) / "run"
    shutil.copytree(saved["root"] / "small_cnn", folder)
    as_from_another_keras(folder, saved["root"] / "mobilenet" / "model.weights.h5")
    meta = json.loads((folder / "model.json").read_text())
    if saved_with == "unknown":
        del meta["versions"]["keras"]
    else:
        meta["versions"]["keras"] = keras.__version__ if saved_with == "same" else saved_with
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError) as caught:
        models.load_model(folder)
    message = str(caught.value)
    assert len(message) <= models.MAX_LOAD_ERROR_CHARS, (len(message), message)
    start = {"3.4.1": f"Install keras==3.4.1 (it was saved with Keras 3.4.1; this is {keras.__version__}) and load again: ",
             "same": "Copy or save the model again",
             "unknown": "Install the Keras version that saved it"}[saved_with]
    assert message.startswith(start), message
    assert "model.keras" in message and "did not load here" in message
    assert len(caught.value.details) == 3  # weights, model.keras, model.h5: the full errors are kept
