"""Models: the seeds' VGG16 transfer-learning recipe, other Keras backbones, and the small CNN.

Every model takes ``(S, S, 1)`` float32 images in 0..255 (the cached uint8 grayscale, cast) and
does its own input handling with built-in Keras layers: the gray channel is copied to three
(``to_rgb``) and scaled the way the backbone was trained (``normalise``). So a saved model
carries its preprocessing, prediction cannot drift from training, and the model loads in
Keras' safe mode without any xraylib code. The backbone's layers sit directly in the model
(not nested), so Grad-CAM and feature extraction can reach any of them by name.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import warnings
from dataclasses import asdict, dataclass
from dataclasses import replace as dataclasses_replace
from pathlib import Path
from typing import Any, Iterator

import keras
import numpy as np
import pandas as pd

from .errors import ConfigError, ModelError
from .preprocess import NORMALISATION, PIXELS_VERSION, PreprocessedSplit, PreprocessSettings
from .reporting import probability_columns

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
    ``heads``: K > 1 puts K such heads (dense, dropout, softmax) on the same pooled features, each
    trained on its own from its own start, and averages their probabilities: an ensemble that costs
    almost nothing on cached features (it needs the frozen backbone; see :mod:`xraylib.train`).
    """

    backbone: str = "vgg16"
    weights: str | None = "imagenet"
    image_size: int = 224
    classes: tuple[str, ...] = ("normal", "covid")
    head_units: int = 64
    dropout: float = 0.5
    alpha: float | None = None
    pooling: str | None = None
    heads: int = 1

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
        if isinstance(self.heads, bool) or not isinstance(self.heads, int) or self.heads < 1:
            raise ModelError(f"heads must be a whole number >= 1, got {self.heads!r}")
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


def build_model(spec: ModelSpec | None = None, *, dtype_policy: str | None = None, **overrides: Any) -> keras.Model:
    """Build the (uncompiled) model: input handling, backbone (frozen), and a new head.

    ``build_model(backbone="vgg16", weights="imagenet")`` is the seeds' recipe. Keyword
    arguments override the fields of ``spec`` (or of the default :class:`ModelSpec`).
    ``dtype_policy``: "float32", "mixed_float16" or "mixed_bfloat16" (see :func:`choose_dtype_policy`); None
    keeps Keras' global policy. Output: ``(N, len(classes))`` float32 softmax probabilities
    (the last layer stays float32 under mixed precision; under "mixed_bfloat16" the whole head does, see
    :data:`HEAD_POLICY`). The spec is kept as ``model.xraylib_spec``.
    """
    spec = ModelSpec(**{**(spec.to_dict() if spec else {}), **overrides}) if overrides or spec is None else spec
    with dtype_policy_scope(dtype_policy):
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
    with dtype_policy_scope(HEAD_POLICY.get(dtype_policy, dtype_policy)):
        outputs = head(len(spec.classes), spec.head_units, spec.dropout, spec.head_pooling, spec.heads)(features)
        model = keras.Model(inputs, outputs, name=f"xraylib_{spec.backbone}")
    model.xraylib_spec = spec
    return model


# --------------------------------------------------------------------------------------------
# Precision: mixed float16 on GPUs with tensor cores, mixed bfloat16 for some backbones on CPUs with bfloat16
# units, float32 everywhere else

#: Values of the ``mixed_precision`` setting: "auto" (mixed where it is faster: see :func:`choose_dtype_policy`),
#: "on" (mixed float16), "off" (float32), "bfloat16" (mixed bfloat16).
MIXED_PRECISION_SETTINGS = ("auto", "on", "off", "bfloat16")
#: Tensor cores (Volta and newer: V100 7.0, T4 7.5, A100 8.0) are what make float16 faster.
MIN_MIXED_PRECISION_CAPABILITY = (7, 0)
#: ``/proc/cpuinfo`` flags of CPU units that compute bfloat16 (Intel AMX from Sapphire Rapids, AVX512-BF16 from Cooper
#: Lake; AMD Zen 4 has AVX512-BF16): without one, bfloat16 is emulated and slower than float32.
BFLOAT16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
#: Backbone -> whether "auto" runs its frozen forward pass in mixed bfloat16 on a CPU with bfloat16 units: where it
#: was measured faster there and the test AUC stayed within 0.005 of float32 (benchmarks/speed.py --only bfloat16,
#: on a 2-core Xeon with AMX): VGG16 ran about 7x faster; MobileNet 0.25's depthwise convolutions about half as
#: fast. Probed once at 224 px, batch 8 (speed only, random weights): ResNet50 1.3x, DenseNet121 1.1x, MobileNetV2
#: 0.8x; their AUC in bfloat16 is unchecked, so "auto" keeps them (and any backbone not listed) in float32.
BFLOAT16_FASTER: dict[str, bool] = {"vgg16": True, "mobilenet": False, "mobilenet_v2": False,
                                    "resnet50": False, "densenet121": False, "small_cnn": False}
#: The head's policy under a model's policy, where it differs: under mixed bfloat16 (8 bits of mantissa) the trained
#: head and its pooling compute in float32, at no cost beside the backbone. The float16 path keeps its head as it was.
HEAD_POLICY = {"mixed_bfloat16": "float32"}
#: Set to "0" or "1" to say whether this CPU's bfloat16 is fast instead of reading ``/proc/cpuinfo`` (e.g. "0" in a
#: container whose /proc/cpuinfo shows the host's flags but whose TensorFlow cannot use them).
CPU_BFLOAT16_ENV = "XRAYLIB_CPU_BFLOAT16"


def gpu_compute_capabilities() -> list[tuple[int, int]]:
    """The CUDA compute capability of each visible GPU, e.g. ``[(7, 5)]`` on Colab's T4; ``[]`` without one."""
    import tensorflow as tf

    capabilities = []
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            details = tf.config.experimental.get_device_details(gpu)
        except Exception:  # no details (not CUDA): treat as too old for float16
            details = {}
        capability = details.get("compute_capability")
        capabilities.append(tuple(int(v) for v in capability) if capability else (0, 0))
    return capabilities


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags from the text of ``/proc/cpuinfo`` (read when ``cpuinfo`` is None): the ``flags``
    line of x86 Linux, ``Features`` on ARM; empty where there is no such file (macOS, Windows)."""
    if cpuinfo is None:
        return _cpu_flags_here()
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@functools.lru_cache(maxsize=1)
def _cpu_flags_here() -> frozenset[str]:
    try:
        return cpu_flags(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        return frozenset()


def cpu_has_fast_bfloat16(flags: frozenset[str] | set[str] | None = None) -> bool:
    """Whether a CPU with these flags computes bfloat16 in hardware (see :data:`BFLOAT16_CPU_FLAGS`).

    ``flags`` None: this machine's, where ``$XRAYLIB_CPU_BFLOAT16`` ("0" or "1") overrides ``/proc/cpuinfo``, and
    TensorFlow must use oneDNN (its default on x86 Linux; not with ``TF_ENABLE_ONEDNN_OPTS=0``) and be Keras' backend.
    """
    if flags is not None:
        return any(flag in flags for flag in BFLOAT16_CPU_FLAGS)
    said = os.environ.get(CPU_BFLOAT16_ENV, "").strip()
    if said in ("0", "1"):
        return said == "1"
    if os.environ.get("TF_ENABLE_ONEDNN_OPTS", "").strip() == "0" or keras.backend.backend() != "tensorflow":
        return False
    return cpu_has_fast_bfloat16(_cpu_flags_here())


def choose_dtype_policy(mixed_precision: str = "auto", capabilities: list[tuple[int, int]] | None = None, *,
                        backbone: str | None = None, frozen: bool = True,
                        cpu_bfloat16: bool | None = None) -> str:
    """"mixed_float16", "mixed_bfloat16" or "float32" for the ``mixed_precision`` setting.

    "auto": on GPUs, mixed float16 when every visible GPU has compute capability >= 7.0 (T4, V100,
    A100, ...), float32 otherwise. On a CPU (no GPU visible), mixed bfloat16 where the CPU has bfloat16 units
    (``cpu_bfloat16``, default :func:`cpu_has_fast_bfloat16`), the backbone is ``frozen`` (no fine-tuning: only
    the frozen forward pass is sped up) and :data:`BFLOAT16_FASTER` lists ``backbone`` as faster in it; float32
    otherwise (float16 is slower, not faster, on a CPU). ``backbone`` None: float32 on a CPU.
    "on": mixed float16 wherever (on a CPU it works but is slow). "bfloat16": mixed bfloat16 wherever (on a CPU
    without bfloat16 units it works but is slow). "off": float32.
    ``capabilities`` defaults to :func:`gpu_compute_capabilities`.
    """
    if mixed_precision not in MIXED_PRECISION_SETTINGS:
        raise ModelError(f"mixed_precision must be one of {MIXED_PRECISION_SETTINGS}, got {mixed_precision!r}")
    if mixed_precision == "off":
        return "float32"
    if mixed_precision == "on":
        return "mixed_float16"
    if mixed_precision == "bfloat16":
        return "mixed_bfloat16"
    capabilities = gpu_compute_capabilities() if capabilities is None else capabilities
    if capabilities:
        if all(tuple(c) >= MIN_MIXED_PRECISION_CAPABILITY for c in capabilities):
            return "mixed_float16"
        return "float32"
    if backbone is None or not frozen or not BFLOAT16_FASTER.get(backbone, False):
        return "float32"
    if cpu_bfloat16 is None:
        cpu_bfloat16 = cpu_has_fast_bfloat16()
    return "mixed_bfloat16" if cpu_bfloat16 else "float32"


@contextlib.contextmanager
def dtype_policy_scope(name: str | None) -> Iterator[None]:
    """Build layers under Keras' dtype policy ``name`` (None: leave it), then restore the previous one.

    Keras reads the policy from global state when a layer is created (``keras.applications``
    take no dtype argument), so it is set only for the time of the build.
    """
    if name is None:
        yield
        return
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def uses_mixed_precision(model: keras.Model) -> bool:
    return model_dtype_policy(model) != "float32"


def model_dtype_policy(model: keras.Model) -> str:
    """The policy ``model``'s backbone computes in: "float32", "mixed_float16" or "mixed_bfloat16"."""
    for layer in model.layers:
        name = getattr(layer.dtype_policy, "name", "float32")
        if name != "float32" and layer.name != "predictions":
            return name
    return "float32"


def as_float32(model: keras.Model, spec: ModelSpec) -> keras.Model:
    """A float32 copy of a mixed-precision model (the same weights), so a model trained on a GPU in float16, or on a
    CPU with bfloat16 units in bfloat16, predicts in float32 on any CPU; a float32 model is returned as it is."""
    if not uses_mixed_precision(model):
        return model
    clone = build_model(dataclasses_replace(spec, weights=None), dtype_policy="float32")
    for layer in clone.layers:
        source = model.get_layer(layer.name)
        layer.set_weights([np.asarray(keras.ops.convert_to_numpy(w), dtype=np.float32) for w in source.weights])
        layer.trainable = source.trainable
    return clone


class _Head:
    """The classification head as layer objects, so the same weights serve the full model and a head-only model.

    One head: ``head_pool``, ``head_dense``, ``head_dropout``, ``predictions`` (softmax). K heads: ``head_pool``, then
    per head k ``head_dense_k``, ``head_dropout_k``, ``head_probs_k`` (softmax), and ``predictions`` averaging them.
    """

    def __init__(self, n_classes: int, units: int, dropout: float, pooling: str = "avg", heads: int = 1):
        pool = keras.layers.GlobalMaxPooling2D if pooling == "max" else keras.layers.GlobalAveragePooling2D
        self.pool = pool(name="head_pool")
        # float32 outputs even under mixed precision: softmax in float16 loses small probabilities.
        if heads == 1:
            self.branches = [[keras.layers.Dense(units, activation="relu", name="head_dense"),
                              keras.layers.Dropout(dropout, name="head_dropout"),
                              keras.layers.Dense(n_classes, activation="softmax", dtype="float32", name="predictions")]]
            self.average = None
        else:
            self.branches = [[keras.layers.Dense(units, activation="relu", name=f"head_dense_{k}"),
                              keras.layers.Dropout(dropout, name=f"head_dropout_{k}"),
                              keras.layers.Dense(n_classes, activation="softmax", dtype="float32", name=f"head_probs_{k}")]
                             for k in range(heads)]
            self.average = keras.layers.Average(dtype="float32", name="predictions")
        self.layers = [self.pool] + [layer for branch in self.branches for layer in branch] + (
            [self.average] if self.average is not None else [])

    def __call__(self, x: keras.KerasTensor) -> keras.KerasTensor:
        return apply_branches(self.branches, self.pool(x), self.average)


def apply_branches(branches: list[list[keras.layers.Layer]], pooled: keras.KerasTensor,
                   average: keras.layers.Layer | None) -> keras.KerasTensor:
    """Pooled features through each branch (dense, dropout, softmax); one branch's output, or ``average`` of them
    (a Concatenate layer instead gives every head's probabilities side by side, for training them one by one)."""
    outputs = []
    for branch in branches:
        y = pooled
        for layer in branch:
            y = layer(y)
        outputs.append(y)
    return outputs[0] if average is None else average(outputs)


def head(n_classes: int, units: int = 64, dropout: float = 0.5, pooling: str = "avg", heads: int = 1) -> _Head:
    return _Head(n_classes, units, dropout, pooling, heads)


def head_layer_names(heads: int = 1) -> list[str]:
    if heads == 1:
        return ["head_pool", "head_dense", "head_dropout", "predictions"]
    return ["head_pool", *[f"head_{part}_{k}" for k in range(heads) for part in ("dense", "dropout", "probs")], "predictions"]


def is_head_layer(name: str) -> bool:
    """Whether a layer belongs to the head (of one or K heads), not to the input handling or the backbone."""
    return name == "predictions" or name.startswith("head_")


def head_count(model: keras.Model) -> int:
    """K, the number of heads of a model built by :func:`build_model`."""
    return sum(1 for layer in model.layers if layer.name.startswith("head_probs_")) or 1


@keras.saving.register_keras_serializable(package="xraylib")
class EnsembleLoss(keras.losses.Loss):
    """Cross-entropy of each of K heads against the same one-hot labels, averaged over the heads: on the heads'
    probabilities side by side ``(B, K * C)``, so that each head learns on its own (the average of their
    probabilities is the ensemble's output, not what is trained)."""

    def __init__(self, heads: int, name: str = "ensemble_crossentropy", **kwargs: Any):
        super().__init__(name=name, **kwargs)
        self.heads = int(heads)

    def call(self, y_true, y_pred):
        n_classes = keras.ops.shape(y_true)[-1]
        y_pred = keras.ops.reshape(y_pred, (-1, self.heads, n_classes))
        log_p = keras.ops.log(keras.ops.clip(y_pred, 1e-7, 1.0))
        return keras.ops.mean(-keras.ops.sum(keras.ops.expand_dims(y_true, 1) * log_p, axis=-1), axis=-1)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "heads": self.heads}


class _OfTheHeadsMean:
    """Mixin for a Keras metric: measure the K heads' mean probability, from their probabilities side by side."""

    def __init__(self, heads: int, name: str, **kwargs: Any):
        super().__init__(name=name, **kwargs)
        self.heads = int(heads)

    def update_state(self, y_true, y_pred, sample_weight=None):
        n_classes = keras.ops.shape(y_true)[-1]
        mean = keras.ops.mean(keras.ops.reshape(y_pred, (-1, self.heads, n_classes)), axis=1)
        return super().update_state(y_true, mean, sample_weight)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "heads": self.heads}


@keras.saving.register_keras_serializable(package="xraylib")
class EnsembleAccuracy(_OfTheHeadsMean, keras.metrics.CategoricalAccuracy):
    """Categorical accuracy of the K heads' mean probability."""

    def __init__(self, heads: int = 1, name: str = "accuracy", **kwargs: Any):
        super().__init__(heads, name, **kwargs)


@keras.saving.register_keras_serializable(package="xraylib")
class EnsembleAUC(_OfTheHeadsMean, keras.metrics.AUC):
    """ROC-AUC of the K heads' mean probability."""

    def __init__(self, heads: int = 1, name: str = "auc", **kwargs: Any):
        super().__init__(heads, name, **kwargs)


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
# Predicting a cached split


def predict_images(model, images_uint8: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Class probabilities ``(N, C) float32`` for ``(N, S, S) uint8`` images, in chunks (memory stays flat)."""
    n = len(images_uint8)
    if n == 0:
        return np.zeros((0, int(model.output_shape[-1])), dtype=np.float32)
    chunks = []
    for begin in range(0, n, 512):
        x = np.asarray(images_uint8[begin:begin + 512], dtype=np.float32)[..., None]
        chunks.append(np.asarray(model.predict(x, batch_size=batch_size, verbose=0), dtype=np.float32))
    return np.concatenate(chunks)


def predict_split(model, split: PreprocessedSplit, batch_size: int = 32) -> pd.DataFrame:
    """The split's manifest rows with one ``prob_<class>`` column per class."""
    probs = predict_images(model, split.images, batch_size)
    out = split.manifest.copy()
    out[probability_columns(split.classes)] = probs
    return out



# --------------------------------------------------------------------------------------------
# Saving and loading

#: What :meth:`xraylib.runs.RunFolder.save_model` writes, the JSON last.
MODEL_FILES = ("model.keras", "model.h5", "model.weights.h5", "model.json")
#: The weights-only file beside ``model.keras``: with ``model.json``'s spec it loads across Keras versions
#: (:func:`load_model` rebuilds the architecture with :func:`build_model` and loads only the weights).
WEIGHTS_FILE = "model.weights.h5"
#: The longest :class:`ModelError` message :func:`load_model` gives when no file of a model loads.
MAX_LOAD_ERROR_CHARS = 300


METADATA_FORMAT = "xraylib model metadata v1"


def check_metadata(metadata: Any, where: str | os.PathLike = "model.json") -> dict[str, Any]:
    """Check a ``model.json`` against what loading and prediction need; return it, or raise :class:`ModelError`
    naming ``where`` and the field.

    The schema: ``classes`` two or more distinct names; ``input_size`` ``[S, S, 1]``; ``preprocessing`` a mapping
    with ``image_size`` S; ``model`` a mapping that :class:`ModelSpec` reads, with the same classes and size;
    ``threshold`` a mapping with a finite ``value`` in [0, 1] and a ``positive_class`` among the classes;
    ``site_profiles`` (optional, :func:`check_site_profiles`) the thresholds calibrated for named sites.
    :meth:`xraylib.runs.RunFolder.save_model` checks every ``model.json`` with it before writing.
    """
    def bad(field_name: str, what: str) -> ModelError:
        return ModelError(f"{where}: field {field_name!r} {what}")

    if not isinstance(metadata, dict):
        raise ModelError(f"{where}: expected a JSON object, got {type(metadata).__name__}")
    classes = metadata.get("classes")
    if (not isinstance(classes, list) or len(classes) < 2 or len(set(map(str, classes))) != len(classes)
            or not all(isinstance(c, str) and c for c in classes)):
        raise bad("classes", f"must list two or more distinct class names, got {classes!r}")
    preprocessing = metadata.get("preprocessing")
    if not isinstance(preprocessing, dict) or not isinstance(preprocessing.get("image_size"), int):
        raise bad("preprocessing", f"must be a mapping with a whole-number image_size, got {preprocessing!r}")
    size = preprocessing["image_size"]
    if metadata.get("input_size") != [size, size, 1]:
        raise bad("input_size", f"must be [{size}, {size}, 1] (the preprocessed size), got {metadata.get('input_size')!r}")
    try:
        PreprocessSettings.from_dict(preprocessing)
    except (ConfigError, TypeError, ValueError, KeyError, AttributeError) as exc:
        raise bad("preprocessing", f"is not a preprocessing description ({exc})") from None
    try:
        spec = ModelSpec.from_dict(metadata.get("model"))
    except (ModelError, TypeError, ValueError, KeyError, AttributeError) as exc:
        raise bad("model", f"is not a model description ({type(exc).__name__}: {exc})") from None
    if list(spec.classes) != classes or spec.image_size != size:
        raise bad("model", f"describes classes {list(spec.classes)} at {spec.image_size} px, not {classes} at {size} px")
    threshold = metadata.get("threshold")
    if threshold is None:
        # xraylib has always saved the threshold it decides at: a model.json without one was not written by it.
        raise bad("threshold", "is missing: xraylib saves the decision threshold with every model and does not guess "
                               "one (train or save the model again)")
    if not isinstance(threshold, dict):
        raise bad("threshold", f"must be a mapping with value and positive_class, got {threshold!r}")
    value = threshold.get("value")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= float(value) <= 1.0):
        raise bad("threshold.value", f"must be a number in [0, 1], got {value!r}")
    if threshold.get("positive_class") not in classes:
        raise bad("threshold.positive_class", f"must be one of {classes}, got {threshold.get('positive_class')!r}")
    if "site_profiles" in metadata:
        check_site_profiles(metadata["site_profiles"], where)
    return metadata


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``model.json`` at ``path``, parsed and checked by :func:`check_metadata`; :class:`ModelError` naming the file
    and what is wrong when it is empty, not JSON, or misses or mangles a field (never a traceback from ``json``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ModelError(f"{path}: not UTF-8 text, so not the JSON xraylib saves with a model") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not text.strip():
        raise ModelError(f"{path}: empty; xraylib needs the model's JSON (classes, preprocessing, threshold) saved "
                         "with it by training")
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    return check_metadata(metadata, path)


#: What a site profile's name may hold: it is typed on command lines and shown on the web page.
SITE_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _-.")
#: What a site's threshold can be set for.
SITE_TARGETS = ("specificity", "sensitivity")


def check_site_name(name: Any) -> str:
    """``name`` if it can name a site profile (1 to 64 letters, digits, spaces, ``_ - .``), else :class:`ConfigError`."""
    if not isinstance(name, str) or not 1 <= len(name.strip()) <= 64 or not set(name) <= SITE_NAME_CHARS:
        raise ConfigError(f"site name must be 1 to 64 letters, digits, spaces, '_', '-' or '.', got {name!r}")
    return name.strip()


def check_site_profiles(profiles: Any, where: str | os.PathLike = "model.json") -> dict[str, Any]:
    """Check ``model.json``'s ``site_profiles``: ``{name: profile}``, each profile a mapping with ``threshold`` (0 to 1),
    ``target`` ``{"metric": "specificity"|"sensitivity", "value": (0, 1)}``, ``n_normals`` (>= 1), ``n_positives``
    (>= 0), ``interval`` ``{"metric", "low", "high", "level"}`` (0 <= low <= high <= 1) and ``created`` (ISO time);
    other keys (the report's numbers) may follow. Raises :class:`ModelError` naming ``where`` and the field."""
    def bad(field_name: str, what: str) -> ModelError:
        return ModelError(f"{where}: field {field_name!r} {what}")

    def is_share(value: Any) -> bool:
        return not isinstance(value, bool) and isinstance(value, (int, float)) and 0.0 <= float(value) <= 1.0

    if not isinstance(profiles, dict):
        raise bad("site_profiles", f"must be a mapping from site name to profile, got {profiles!r}")
    for name, profile in profiles.items():
        try:
            check_site_name(name)
        except ConfigError as exc:
            raise bad("site_profiles", str(exc)) from None
        field_name = f"site_profiles.{name}"
        if not isinstance(profile, dict):
            raise bad(field_name, f"must be a mapping, got {profile!r}")
        if not is_share(profile.get("threshold")):
            raise bad(f"{field_name}.threshold", f"must be a number from 0 to 1, got {profile.get('threshold')!r}")
        target = profile.get("target")
        if (not isinstance(target, dict) or target.get("metric") not in SITE_TARGETS or not is_share(target.get("value"))
                or not 0.0 < float(target["value"]) < 1.0):
            raise bad(f"{field_name}.target", f"must be {{'metric': one of {list(SITE_TARGETS)}, 'value': above 0 and "
                                              f"below 1}}, got {target!r}")
        for count, least in (("n_normals", 1), ("n_positives", 0)):
            value = profile.get(count)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise bad(f"{field_name}.{count}", f"must be a whole number of at least {least}, got {value!r}")
        interval = profile.get("interval")
        if (not isinstance(interval, dict) or interval.get("metric") not in SITE_TARGETS
                or not all(is_share(interval.get(k)) for k in ("low", "high", "level"))
                or float(interval["low"]) > float(interval["high"])):
            raise bad(f"{field_name}.interval", f"must be {{'metric', 'low', 'high', 'level'}} with 0 <= low <= high <= 1, "
                                                f"got {interval!r}")
        if not isinstance(profile.get("created"), str):
            raise bad(f"{field_name}.created", f"must be the ISO time it was made, got {profile.get('created')!r}")
    return profiles


@dataclass
class LoadedModel:
    """A model ready to predict, with the metadata saved beside it (classes, preprocessing, threshold).

    ``file_format``: "keras" (``.keras``), "h5" or "savedmodel" (a TensorFlow SavedModel folder,
    wrapped in one :class:`keras.layers.TFSMLayer`: it predicts, but has no inner layers for
    Grad-CAM or feature extraction; see :attr:`has_layers`).
    """

    model: Any
    metadata: dict[str, Any]
    path: Path
    file_format: str = "keras"
    #: The file the weights came from: ``model.weights.h5`` beside ``path`` when the model was rebuilt from
    #: ``model.json``'s spec (:func:`rebuild_from_weights`), else ``path`` itself.
    loaded_from: Path | None = None

    @property
    def has_layers(self) -> bool:
        """Whether the model's own layers are reachable (Grad-CAM, backbone features): not for a SavedModel."""
        return self.file_format != "savedmodel"

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

    @property
    def site_profiles(self) -> dict[str, Any]:
        """The site profiles in ``model.json`` (``{name: profile}``; see :func:`check_site_profiles`)."""
        return dict(self.metadata.get("site_profiles") or {})

    @property
    def site(self) -> str | None:
        """The site whose threshold this model decides with (:meth:`for_site`), or None: the model's own threshold."""
        return self.metadata.get("threshold", {}).get("site")

    def with_site_profile(self, site: str, profile: dict[str, Any]) -> "LoadedModel":
        """The same model with site profile ``site`` added in memory (as :mod:`xraylib.calibrate` just stored it)."""
        profiles = {**self.site_profiles, site: profile}
        return dataclasses_replace(self, metadata={**self.metadata, "site_profiles": profiles})

    @property
    def model_threshold(self) -> float:
        """The model's own threshold (chosen at training), whatever site this copy decides for."""
        threshold = self.metadata.get("threshold", {})
        return float(threshold.get("model_threshold", threshold).get("value", 0.5))

    def for_site(self, site: str | None) -> "LoadedModel":
        """The same model deciding at site profile ``site``'s threshold; None: at the model's own threshold.

        The copy's ``threshold`` names the site and keeps the model's own threshold as ``model_threshold``. Raises
        :class:`ModelError` naming ``model.json`` and the known sites when there is no such profile.
        """
        own = self.metadata.get("threshold", {})
        own = own.get("model_threshold", own)  # a copy made for another site: start from the model's own
        if site is None:
            return self if self.site is None else dataclasses_replace(self, metadata={**self.metadata, "threshold": own})
        profiles = self.site_profiles
        if site not in profiles:
            known = ", ".join(repr(name) for name in sorted(profiles)) or "none yet (make one with `python -m xraylib calibrate`)"
            raise ModelError(f"{_metadata_path(self.path)}: no site profile {site!r}; known site profiles: {known}")
        profile = profiles[site]
        target = profile["target"]
        threshold = {**own, "value": float(profile["threshold"]), "site": site, "model_threshold": own,
                     "rule": f"{target['metric']} {target['value']:g} at site {site!r}",
                     "chosen_on": f"{profile['n_normals']} normal and {profile['n_positives']} positive images of "
                                  f"site {site!r} ({profile['created']})"}
        return dataclasses_replace(self, metadata={**self.metadata, "threshold": threshold})


def _metadata_path(path: Path) -> Path:
    if is_saved_model_dir(path) and not (path / "model.json").is_file():
        return path.parent / "model.json"  # an export inside the run folder: run/saved_model/
    return (path if path.is_dir() else path.parent) / "model.json"


#: The folder name :func:`load_model` looks for inside a run folder that has no ``.keras`` or ``.h5`` file.
SAVED_MODEL_DIR = "saved_model"


def is_saved_model_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a TensorFlow SavedModel folder (it holds ``saved_model.pb``)."""
    return Path(path).is_dir() and (Path(path) / "saved_model.pb").is_file()


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Load a saved model and its JSON: a ``.keras`` or ``.h5`` file, a TensorFlow SavedModel folder
    (``model.export(folder)``), or the run folder (which prefers ``model.keras``, then ``model.h5``,
    then a ``saved_model/`` folder).

    Where ``model.weights.h5`` (written by :meth:`xraylib.runs.RunFolder.save_model`) lies beside the model file,
    the model is rebuilt from ``model.json``'s spec with xraylib's own :func:`build_model` (float32, no downloaded
    weights) and only the weights are loaded (:func:`rebuild_from_weights`): this works across Keras versions
    (e.g. saved with Keras 3.15 in one place, loaded with Keras 3.10 in Colab), where Keras' full description of the
    layers in ``.keras``/``.h5`` may not load. ``path`` and ``file_format`` still name the model file asked for
    (or found in the run folder); ``loaded_from`` is the file the weights came from. Without a weights file, or
    when the rebuild fails, the full files load as before: the one asked for, then the other of the pair.

    ``.keras`` and ``.h5`` load in Keras' safe mode (no arbitrary code). A SavedModel is loaded with
    :class:`keras.layers.TFSMLayer` (endpoint ``serve``, else ``serving_default``): it runs a
    TensorFlow graph, not Python code, but graph ops can read and write files, so load only
    SavedModels you trust. Its ``model.json`` is read from the folder or, for ``run/saved_model``,
    from the run folder. Raises :class:`ModelError` naming the file, its format, the Keras version
    it was saved with (from the JSON), and what to do; when no file loads, the message starts with the fix and
    is at most :data:`MAX_LOAD_ERROR_CHARS` characters (the full errors are in its ``details``).
    """
    path = Path(path)
    if path.is_dir() and (path / "model.keras").is_file():
        model_file = path / "model.keras"
    elif path.is_dir() and (path / "model.h5").is_file():
        model_file = path / "model.h5"
    elif path.is_dir() and (path / WEIGHTS_FILE).is_file():
        model_file = path / WEIGHTS_FILE
    elif path.is_dir() and not is_saved_model_dir(path) and is_saved_model_dir(path / SAVED_MODEL_DIR):
        model_file = path / SAVED_MODEL_DIR
    else:
        model_file = path
    saved_model = is_saved_model_dir(model_file)
    if not (model_file.is_file() or saved_model):  # a missing path, or a folder without a model
        raise ModelError(f"{path}: no model file here (expected model.keras or model.h5 from xraylib's training, "
                         "or a TensorFlow SavedModel folder with saved_model.pb)")
    meta_path = _metadata_path(model_file)
    if not meta_path.is_file():
        raise ModelError(f"{meta_path}: missing; xraylib needs the model's JSON (classes, preprocessing, threshold) "
                         "saved next to it by training")
    metadata = read_metadata(meta_path)
    trained_on = metadata.get("preprocessing", {}).get("pixels_version")
    if trained_on is not None and trained_on != PIXELS_VERSION:
        warnings.warn(f"{meta_path}: the model was trained on images decoded by xraylib's pixel code version "
                      f"{trained_on}; this xraylib decodes version {PIXELS_VERSION}, so its inputs may differ by a "
                      "fraction of a grey level on average. Retrain (or use the xraylib it was trained with) for "
                      "exact agreement.", UserWarning, stacklevel=2)
    if saved_model:
        return _check_outputs(_load_saved_model(model_file, metadata), meta_path)
    saved_with = metadata.get("versions", {}).get("keras", "unknown")
    failures: list[tuple[Path, Exception]] = []
    weights_file = model_file if model_file.name.endswith(".weights.h5") else model_file.parent / WEIGHTS_FILE
    if weights_file.is_file() and isinstance(metadata.get("model"), dict):
        try:
            damage = not_a_model_file(weights_file)
            if damage:
                raise DamagedModelFile(damage)
            model = rebuild_from_weights(ModelSpec.from_dict(metadata["model"]), weights_file)
            fmt = "weights" if model_file == weights_file else ("h5" if model_file.suffix == ".h5" else "keras")
            return _check_outputs(LoadedModel(model, metadata, model_file, fmt, loaded_from=weights_file), meta_path)
        except Exception as exc:  # fall back to the full files, and say why if they fail too
            failures.append((weights_file, exc))
    if model_file != weights_file:
        # The file asked for, then the other of the pair beside it (model.keras / model.h5), in Keras' safe mode.
        others = [model_file.parent / n for n in ("model.keras", "model.h5") if model_file.name in ("model.keras", "model.h5")]
        for candidate in [model_file] + [p for p in others if p != model_file and p.is_file()]:
            damage = not_a_model_file(candidate)
            if damage:  # never handed to Keras, whose errors would then read like a version mismatch
                failures.append((candidate, DamagedModelFile(damage)))
                continue
            try:
                model = keras.models.load_model(candidate, compile=False, safe_mode=True)
            except Exception as exc:
                failures.append((candidate, exc))
                continue
            return _check_outputs(LoadedModel(model, metadata, candidate, "h5" if candidate.suffix == ".h5" else "keras",
                                              loaded_from=candidate), meta_path)
    raise load_error(failures, saved_with)


class DamagedModelFile(Exception):
    """A model file that is not what its name says (truncated, damaged, or another kind of file): no Keras could load it."""


def not_a_model_file(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be a model file of its kind, checked before Keras reads it, or None when it looks whole.

    A ``.keras`` file is a zip archive with ``config.json`` (its directory is at the end, so a truncated file has
    none); a ``.h5`` file is HDF5 (the library refuses a truncated one), and a full model's holds ``model_config``.
    A file that fails these is damaged or not a model file, whatever Keras version reads it.
    """
    import zipfile

    path = Path(path)
    name = path.name
    try:
        if name.endswith(".keras"):
            if not zipfile.is_zipfile(path):
                return "not a zip archive, as a .keras file is: truncated, or another kind of file renamed"
            with zipfile.ZipFile(path) as archive:
                if "config.json" not in archive.namelist():
                    return "a zip archive without the config.json of a .keras model"
            return None
        if name.endswith(".h5"):
            import h5py

            with open(path, "rb") as f:
                head = f.read(8)
            if head != b"\x89HDF\r\n\x1a\n":
                return "not an HDF5 file, as a .h5 model is: another kind of file renamed, or damaged"
            try:
                with h5py.File(path, "r") as h5:
                    if not name.endswith(".weights.h5") and "model_config" not in h5.attrs:
                        return "an HDF5 file without a model in it (no model_config)"
            except OSError as exc:
                return ("a truncated HDF5 file" if "truncated" in str(exc).lower()
                        else "an HDF5 file that cannot be opened: damaged")
            return None
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    return "not a .keras or .h5 file (xraylib loads those, or a SavedModel folder)"


def _check_outputs(loaded: "LoadedModel", meta_path: Path) -> "LoadedModel":
    """The model's output must give one probability per class that ``model.json`` names."""
    try:
        outputs = int(loaded.model.output_shape[-1])
    except (AttributeError, TypeError, IndexError, ValueError):
        return loaded  # a model that does not say its output size: predict_images finds out
    if outputs != len(loaded.classes):
        raise ModelError(f"{meta_path}: field 'classes' lists {len(loaded.classes)} classes {list(loaded.classes)}, "
                         f"but the model gives {outputs} probabilities")
    return loaded


def rebuild_from_weights(spec: ModelSpec, weights_file: str | os.PathLike) -> keras.Model:
    """The model of ``spec`` built by :func:`build_model` (float32, no downloaded weights) with the weights of
    ``weights_file`` (``model.save_weights``): what loads across Keras versions, since only the weights' values
    are read, not Keras' description of the layers (whose arguments change between versions).

    Keras keys a ``.weights.h5`` file by each layer's class and position in the model (not by layer name), and raises
    when a layer's weights are missing or of another shape, so a spec that does not match the weights is an error.
    Keras only *warns* where part of a file matches no layer ("Affected layers will retain their freshly-initialized
    weights"): such a load is refused here too, so that a model is never used with some layers untrained.
    """
    model = build_model(dataclasses_replace(spec, weights=None), dtype_policy="float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_weights(str(weights_file))
    partial = [str(w.message) for w in caught if "freshly-initialized" in str(w.message) or "Skipping" in str(w.message)]
    if partial:
        raise ModelError(f"{weights_file}: the weights do not match this model's layers ({partial[0][:120]})")
    return model


def load_error(failures: list[tuple[Path, Exception]], saved_with: str) -> ModelError:
    """The :class:`ModelError` when no file of a model loads: at most :data:`MAX_LOAD_ERROR_CHARS` characters,
    the fix first (install the Keras that saved it, or save it again when this is that Keras), then the files tried,
    their formats and the errors, cut short. The full errors are in the exception's ``details``."""
    here = keras.__version__
    if failures and all(isinstance(exc, DamagedModelFile) for _, exc in failures):
        # Every file is truncated or not a model file: no Keras version would load them, so none is blamed.
        fix = "; copy the model folder again from where it was saved, or train again"
        if len(failures) == 1:
            file, exc = failures[0]
            message = f"{file}: damaged or not a model file ({exc}){fix}"
        else:
            where = failures[0][0].parent
            message = f"{where}: each file is damaged or not a model file ({'; '.join(f'{f.name}: {e}' for f, e in failures)}){fix}"
            if len(message) > MAX_LOAD_ERROR_CHARS:
                message = f"{where}: each file is damaged or not a model file ({', '.join(f.name for f, _ in failures)}){fix}"
        error = ModelError(message)
        error.details = [f"{file}: damaged or not a model file: {exc}" for file, exc in failures]
        return error
    if saved_with in (None, "", "unknown"):
        fix = f"Install the Keras version that saved it (model.json does not say; this is {here}) and load again: "
    elif saved_with != here:
        fix = f"Install keras=={saved_with} (it was saved with Keras {saved_with}; this is {here}) and load again: "
    else:
        fix = (f"Copy or save the model again (it was saved with Keras {saved_with}, this Keras, so a file looks "
               "damaged): ")
    formats = {".keras": "Keras v3 (.keras)", ".h5": "HDF5 (.h5)"}
    parts = []
    for file, exc in failures:
        fmt = "weights (.weights.h5)" if file.name.endswith(".weights.h5") else formats.get(file.suffix, "unknown")
        parts.append((file, fmt, type(exc).__name__, " ".join(str(exc).split())))

    def say(name_of, detail: int) -> str:
        said = []
        for file, fmt, kind, text in parts:
            if kind == DamagedModelFile.__name__:
                said.append(f"{name_of(file)}, {fmt}, is damaged or not a model file")
                continue
            said.append(f"{name_of(file)}, {fmt}, did not load here ({kind}"
                        + (f": {text[:detail]}{'...' if len(text) > detail else ''}" if detail and text else "") + ")")
        return fix + "; ".join(said) + "."

    message = say(str, 0)
    for name_of in (str, lambda f: f.name):
        for detail in (120, 80, 40, 0):
            if len(say(name_of, detail)) <= MAX_LOAD_ERROR_CHARS:
                message = say(name_of, detail)
                break
        else:
            continue
        break
    message = message[:MAX_LOAD_ERROR_CHARS]
    error = ModelError(message)
    error.details = [f"{file}: {type(exc).__name__}: {exc}" for file, exc in failures]
    return error


def _load_saved_model(folder: Path, metadata: dict[str, Any]) -> LoadedModel:
    """A SavedModel folder as a Keras model ``(N, S, S, 1) -> (N, C)``: one TFSMLayer behind an Input."""
    versions = metadata.get("versions", {})
    saved_with = versions.get("keras", "unknown")
    tf_saved_with = versions.get("tensorflow", "unknown")
    try:
        import tensorflow as tf
        tf_here = tf.__version__
    except ImportError:
        tf_here = "not installed"
    size = int(metadata.get("input_size", [0])[0] or metadata.get("model", {}).get("image_size", 0)
               or metadata.get("preprocessing", {}).get("image_size", 0))
    try:
        if not size:
            raise ValueError("model.json gives no input size (input_size, model.image_size or preprocessing.image_size)")
        layer = None
        for endpoint in ("serve", "serving_default"):  # Keras' model.export() / tf.saved_model.save()
            try:
                layer = keras.layers.TFSMLayer(str(folder), call_endpoint=endpoint, name="saved_model")
                break
            except ValueError as exc:
                if "endpoint" not in str(exc):
                    raise
                missing = exc
        if layer is None:
            raise missing
        inputs = keras.Input((size, size, 1), name="image")
        outputs = layer(inputs)
        if isinstance(outputs, dict):  # serving_default returns {name: tensor}
            if len(outputs) != 1:
                raise ValueError(f"the SavedModel has {len(outputs)} outputs ({sorted(outputs)}); xraylib needs one")
            outputs = next(iter(outputs.values()))
        model = keras.Model(inputs, outputs, name="xraylib_saved_model")
    except Exception as exc:
        raise ModelError(
            f"{folder}: cannot load this TensorFlow SavedModel folder saved with Keras {saved_with} "
            f"(TensorFlow {tf_saved_with}) into Keras {keras.__version__} (TensorFlow {tf_here}) "
            f"({type(exc).__name__}: {exc}). Load model.keras or model.h5 from the same run instead, or install "
            f"tensorflow=={tf_saved_with}."
        ) from None
    return LoadedModel(model, metadata, folder, "savedmodel", loaded_from=folder)
