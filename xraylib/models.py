"""Models: the seeds' VGG16 transfer-learning recipe, other Keras backbones, and the small CNN.

Every model takes ``(S, S, 1)`` float32 images in 0..255 (the cached uint8 grayscale, cast) and
does its own input handling with built-in Keras layers: the gray channel is copied to three
(``to_rgb``) and scaled the way the backbone was trained (``normalise``). So a saved model
carries its preprocessing, prediction cannot drift from training, and the model loads in
Keras' safe mode without any xraylib code. The backbone's layers sit directly in the model
(not nested), so Grad-CAM and feature extraction can reach any of them by name.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from .errors import ModelError
from .preprocess import NORMALISATION

#: backbone name -> (keras.applications constructor name, last conv layer, top-block layer prefixes)
BACKBONES: dict[str, tuple[str | None, str, tuple[str, ...]]] = {
    "vgg16": ("VGG16", "block5_conv3", ("block5_",)),
    "resnet50": ("ResNet50", "conv5_block3_out", ("conv5_block3_",)),
    "densenet121": ("DenseNet121", "relu", ("conv5_block16_", "bn", "relu")),
    "mobilenet_v2": ("MobileNetV2", "out_relu", ("block_16_", "Conv_1", "out_relu")),
    "mobilenet": ("MobileNet", "conv_pw_13_relu", ("conv_dw_13", "conv_pw_13")),
    "small_cnn": (None, "last_conv", ()),
}

# Keras' imagenet_utils constants: caffe means (0..255, RGB order) and torch mean/std (0..1).
_CAFFE_MEAN_RGB = (123.68, 116.779, 103.939)
_TORCH_MEAN_RGB = (0.485, 0.456, 0.406)
_TORCH_STD_RGB = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """What to build. Saved (as JSON) with every model.

    ``weights``: "imagenet" (downloaded by Keras: what Colab users get), None (random
    initialisation) or the path of a local ``.h5`` weights file for the backbone without its top.
    ``alpha``: MobileNet width multiplier (e.g. 0.25). The head is global average pooling,
    a dense layer of ``head_units`` with ReLU, dropout, and a softmax over the classes.
    """

    backbone: str = "vgg16"
    weights: str | None = "imagenet"
    image_size: int = 224
    classes: tuple[str, ...] = ("normal", "covid")
    head_units: int = 64
    dropout: float = 0.5
    alpha: float | None = None
    pooling: str | None = None

    @property
    def head_pooling(self) -> str:
        """"avg" for the pretrained backbones; "max" for the small CNN, whose few filters see small
        lesions better through their strongest response than through an average over the lungs."""
        return self.pooling or ("max" if self.backbone == "small_cnn" else "avg")

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ModelError(f"backbone must be one of {sorted(BACKBONES)}, got {self.backbone!r}")
        if self.pooling not in (None, "avg", "max"):
            raise ModelError(f"pooling must be 'avg', 'max' or None, got {self.pooling!r}")
        if len(self.classes) < 2:
            raise ModelError(f"need at least two classes, got {list(self.classes)}")
        object.__setattr__(self, "classes", tuple(self.classes))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["classes"] = list(self.classes)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: (tuple(v) if k == "classes" else v) for k, v in data.items() if k in known})

    @property
    def last_conv_layer(self) -> str:
        return BACKBONES[self.backbone][1]


def input_layers(inputs: keras.KerasTensor, backbone: str) -> keras.KerasTensor:
    """Gray to RGB and the backbone's normalisation, with built-in layers only."""
    mode = NORMALISATION[backbone]
    if backbone == "small_cnn":
        return keras.layers.Rescaling(1.0 / 255.0, name="normalise")(inputs)
    rgb = keras.layers.Concatenate(axis=-1, name="to_rgb")([inputs, inputs, inputs])
    if mode == "caffe":
        # Caffe order is BGR, but all three channels are the same gray, so only the means matter.
        return keras.layers.Normalization(mean=list(_CAFFE_MEAN_RGB[::-1]), variance=[1.0, 1.0, 1.0], name="normalise")(rgb)
    if mode == "torch":
        mean = [m * 255.0 for m in _TORCH_MEAN_RGB]
        variance = [(s * 255.0) ** 2 for s in _TORCH_STD_RGB]
        return keras.layers.Normalization(mean=mean, variance=variance, name="normalise")(rgb)
    return keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="normalise")(rgb)


def _backbone(spec: ModelSpec, x: keras.KerasTensor) -> keras.Model:
    constructor = getattr(keras.applications, BACKBONES[spec.backbone][0])
    weights = spec.weights
    if isinstance(weights, (str, os.PathLike)) and weights != "imagenet":
        weights = str(weights)
        if not Path(weights).is_file():
            raise ModelError(f"weights file not found: {weights}")
    kwargs: dict[str, Any] = {"include_top": False, "weights": weights, "input_tensor": x}
    if spec.backbone == "mobilenet" and spec.alpha is not None:
        kwargs["alpha"] = spec.alpha
    if spec.backbone == "mobilenet_v2" and spec.alpha is not None:
        kwargs["alpha"] = spec.alpha
    try:
        return constructor(**kwargs)
    except ModelError:
        raise
    except Exception as exc:
        if weights == "imagenet":
            raise ModelError(
                f"could not get the ImageNet weights for {spec.backbone} ({type(exc).__name__}: {exc}). Keras downloads "
                "them on first use, which needs internet. Without it, download the 'notop' weights file elsewhere "
                f"and pass weights='/path/to/{spec.backbone}_notop.h5', put it in ~/.keras/models/, or use weights=None."
            ) from None
        if isinstance(weights, str):
            raise ModelError(
                f"{weights}: cannot load these weights into {spec.backbone} without its top "
                f"(alpha={spec.alpha}, input {spec.image_size}x{spec.image_size}): {type(exc).__name__}: {exc}"
            ) from None
        raise ModelError(f"cannot build {spec.backbone}: {type(exc).__name__}: {exc}") from None


def _small_cnn(x: keras.KerasTensor) -> keras.KerasTensor:
    """The small custom CNN the seeds compared against: four conv blocks."""
    for i, filters in enumerate((16, 32, 64, 128)):
        name = "last_conv" if i == 3 else f"conv{i + 1}"
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=name)(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool{i + 1}")(x)
    return x


def build_model(spec: ModelSpec | None = None, **overrides: Any) -> keras.Model:
    """Build the (uncompiled) model: input handling, backbone (frozen), and a new head.

    ``build_model(backbone="vgg16", weights="imagenet")`` is the seeds' recipe. Keyword
    arguments override the fields of ``spec`` (or of the default :class:`ModelSpec`).
    Output: ``(N, len(classes))`` softmax probabilities. The spec is kept as ``model.xraylib_spec``.
    """
    spec = ModelSpec(**{**(spec.to_dict() if spec else {}), **overrides}) if overrides or spec is None else spec
    size = int(spec.image_size)
    inputs = keras.Input((size, size, 1), name="image")
    x = input_layers(inputs, spec.backbone)
    if spec.backbone == "small_cnn":
        features = _small_cnn(x)
    else:
        base = _backbone(spec, x)
        for layer in base.layers:
            layer.trainable = False
        features = base.output
    outputs = head(len(spec.classes), spec.head_units, spec.dropout, spec.head_pooling)(features)
    model = keras.Model(inputs, outputs, name=f"xraylib_{spec.backbone}")
    model.xraylib_spec = spec
    return model


class _Head:
    """The classification head as layer objects, so the same weights serve the full model and a head-only model."""

    def __init__(self, n_classes: int, units: int, dropout: float, pooling: str = "avg"):
        pool = keras.layers.GlobalMaxPooling2D if pooling == "max" else keras.layers.GlobalAveragePooling2D
        self.layers = [
            pool(name="head_pool"),
            keras.layers.Dense(units, activation="relu", name="head_dense"),
            keras.layers.Dropout(dropout, name="head_dropout"),
            # float32 output even under mixed precision: softmax in float16 loses small probabilities.
            keras.layers.Dense(n_classes, activation="softmax", dtype="float32", name="predictions"),
        ]

    def __call__(self, x: keras.KerasTensor) -> keras.KerasTensor:
        for layer in self.layers:
            x = layer(x)
        return x


def head(n_classes: int, units: int = 64, dropout: float = 0.5, pooling: str = "avg") -> _Head:
    return _Head(n_classes, units, dropout, pooling)


def head_layer_names() -> list[str]:
    return ["head_pool", "head_dense", "head_dropout", "predictions"]


def trainable_summary(model: keras.Model) -> dict[str, int]:
    """Counts of trainable and frozen parameters."""
    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    frozen = int(sum(np.prod(w.shape) for w in model.non_trainable_weights))
    return {"trainable_params": trainable, "frozen_params": frozen}


def unfreeze_top(model: keras.Model, backbone: str) -> list[str]:
    """Make the backbone's top block trainable for fine-tuning (BatchNorm layers stay frozen).

    Returns the names of the layers unfrozen. Recompile the model afterwards (at a lower rate).
    """
    prefixes = BACKBONES[backbone][2]
    if not prefixes:
        raise ModelError(f"{backbone} has no pretrained backbone to fine-tune; it is trained whole")
    unfrozen = []
    for layer in model.layers:
        if layer.name.startswith(prefixes) and not isinstance(layer, keras.layers.BatchNormalization):
            if layer.weights:
                layer.trainable = True
                unfrozen.append(layer.name)
    if not unfrozen:
        raise ModelError(f"found no layers of {backbone}'s top block ({prefixes}) in the model")
    return unfrozen


def feature_layer_name(model: keras.Model) -> str:
    """Name of the layer whose output feeds the head (the backbone's last feature map)."""
    pool = model.get_layer("head_pool")
    node = pool._inbound_nodes[0]
    return node.input_tensors[0]._keras_history.operation.name


# --------------------------------------------------------------------------------------------
# Saving and loading

MODEL_FILES = ("model.keras", "model.h5", "model.json")


def save_model(model: keras.Model, folder: str | os.PathLike, metadata: dict[str, Any]) -> dict[str, Path]:
    """Save ``model.keras``, ``model.h5`` (the seeds' format) and ``model.json`` in ``folder``, each atomically.

    ``metadata`` (classes, preprocessing, model spec, training, threshold, ...) is written as the
    JSON with the xraylib, Keras and TensorFlow versions added.
    """
    import datetime

    from . import __version__
    from .fileio import write_json_atomic

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in ("model.keras", "model.h5"):
        suffix = Path(name).suffix
        tmp = folder / f"tmp_saving{suffix}"  # Keras picks the format from the suffix
        model.save(tmp)
        os.replace(tmp, folder / name)
        out[name] = folder / name
    versions = {"xraylib": __version__, "keras": keras.__version__, "backend": keras.backend.backend()}
    try:
        import tensorflow as tf

        versions["tensorflow"] = tf.__version__
    except ImportError:  # another Keras backend
        pass
    full = {"format": "xraylib model metadata v1", "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions, **metadata}
    write_json_atomic(folder / "model.json", full)
    out["model.json"] = folder / "model.json"
    return out


@dataclass
class LoadedModel:
    """A model ready to predict, with the metadata saved beside it (classes, preprocessing, threshold)."""

    model: Any
    metadata: dict[str, Any]
    path: Path

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.metadata["classes"])

    @property
    def threshold(self) -> float:
        return float(self.metadata.get("threshold", {}).get("value", 0.5))

    @property
    def positive_class(self) -> str:
        return self.metadata.get("threshold", {}).get("positive_class", self.classes[-1])

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec.from_dict(self.metadata["model"])


def _metadata_path(path: Path) -> Path:
    return (path if path.is_dir() else path.parent) / "model.json"


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Load a saved model (``.keras``, ``.h5``, or the run folder, which prefers ``model.keras``) and its JSON.

    Loads in Keras' safe mode (no arbitrary code). Raises :class:`ModelError` naming the file,
    its format, the Keras version it was saved with, and what to do.
    """
    path = Path(path)
    if path.is_dir() and (path / "model.keras").is_file():
        model_file = path / "model.keras"
    elif path.is_dir() and (path / "model.h5").is_file():
        model_file = path / "model.h5"
    else:
        model_file = path
    if not model_file.is_file():  # a missing path, or a folder without model.keras / model.h5
        raise ModelError(f"{path}: no model file here (expected model.keras or model.h5 from xraylib's training)")
    meta_path = _metadata_path(model_file)
    if not meta_path.is_file():
        raise ModelError(f"{meta_path}: missing; xraylib needs the model's JSON (classes, preprocessing, threshold) "
                         "saved next to it by training")
    metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    fmt = {".keras": "Keras v3 (.keras)", ".h5": "HDF5 (.h5)"}.get(model_file.suffix, "unknown")
    saved_with = metadata.get("versions", {}).get("keras", "unknown")
    try:
        model = keras.models.load_model(model_file, compile=False, safe_mode=True)
    except Exception as exc:
        raise ModelError(
            f"{model_file}: cannot load this {fmt} model saved with Keras {saved_with} into Keras {keras.__version__} "
            f"({type(exc).__name__}: {exc}). Try the other file of the pair (model.keras / model.h5), or install "
            f"keras=={saved_with}."
        ) from None
    return LoadedModel(model, metadata, model_file)
