"""Training: augmentation, batches from the memory-mapped cache, class weights, checkpoints and resume.

``train()`` runs the seeds' recipe by default (frozen backbone, new head, Adam 1e-3, batch 8,
25 epochs) with what they lacked: class weights from the training split, a checkpoint at the
end of every epoch (on Drive in Colab), resume after a disconnect at the next epoch with the
optimizer state, the history as CSV, an optional fine-tuning stage, and the model saved as
``.keras`` and ``.h5`` with a JSON of everything needed to use it again.

Speed: while the backbone is frozen, the head trains on cached backbone features
(:mod:`xraylib.features`): the backbone runs once per image instead of once per image per epoch.
Fine-tuning, the small CNN and ``feature_cache=False`` stream the images from the memory-mapped
cache through ``tf.data`` instead; memory stays flat in the number of images either way. On a
GPU with tensor cores (compute capability >= 7.0) the model computes in mixed float16
(``mixed_precision="auto"``) and Keras compiles the steps with XLA; on a CPU everything is float32.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import keras
import numpy as np
import pandas as pd

from . import features, models
from .errors import ConfigError
from .fileio import write_csv_atomic, write_json_atomic
from .preprocess import PIXELS_VERSION, PreprocessedData, PreprocessedSplit


@dataclass(frozen=True)
class AugmentSettings:
    """Random changes applied to each training image, each epoch.

    Small rotations, shifts, zoom and brightness/contrast changes mimic positioning and exposure
    differences. ``horizontal_flip`` is off by default: a chest X-ray is not left-right symmetric
    (the heart is on the patient's left), so a flipped image is not a plausible radiograph.
    """

    rotation_deg: float = 10.0
    shift: float = 0.1
    zoom: float = 0.1
    brightness: float = 0.1
    contrast: float = 0.1
    horizontal_flip: bool = False


@dataclass(frozen=True)
class TrainSettings:
    """How to train. The defaults are the seeds' recipe: Adam 1e-3, batch 8, 25 epochs, frozen base."""

    epochs: int = 25
    batch_size: int = 8
    learning_rate: float = 1e-3
    fine_tune_epochs: int = 0
    fine_tune_learning_rate: float = 1e-5
    augment: AugmentSettings | None = field(default_factory=AugmentSettings)
    class_weighting: bool = True
    seed: int = 42
    threshold_rule: str = "max_specificity_at_sensitivity"
    min_sensitivity: float = 0.95
    #: Stage 1 (backbone frozen) trains the head on cached backbone features; False streams the images every epoch.
    feature_cache: bool = True
    #: With augmentation and the feature cache: views cached per training image (1: the plain image only).
    augment_views: int = 1
    #: "auto" (mixed float16 on a GPU of compute capability >= 7.0, else float32), "on" or "off".
    mixed_precision: str = "auto"
    #: XLA: "auto" (Keras' rule: on a GPU, not on a CPU), "on" or "off".
    jit_compile: str = "auto"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.fine_tune_epochs < 0:
            raise ConfigError(f"epochs and batch_size must be >= 1 and fine_tune_epochs >= 0, got {self}")
        if isinstance(self.augment_views, bool) or not isinstance(self.augment_views, int) or self.augment_views < 1:
            raise ConfigError(f"augment_views must be a whole number >= 1, got {self.augment_views!r}")
        if self.mixed_precision not in models.MIXED_PRECISION_SETTINGS:
            raise ConfigError(f"mixed_precision must be one of {models.MIXED_PRECISION_SETTINGS}, got {self.mixed_precision!r}")
        if self.jit_compile not in ("auto", "on", "off"):
            raise ConfigError(f"jit_compile must be 'auto', 'on' or 'off', got {self.jit_compile!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainSettings":
        data = dict(data)
        if data.get("augment") is not None:
            data["augment"] = AugmentSettings(**data["augment"])
        return cls(**data)


# --------------------------------------------------------------------------------------------
# Augmentation (NumPy/OpenCV, seeded per image: the same epoch gives the same images after a resume)


def augment_image(image: np.ndarray, settings: AugmentSettings, rng: np.random.Generator) -> np.ndarray:
    """One random augmentation of ``(S, S) uint8``: rotation, shift, zoom, flip, brightness, contrast."""
    size = image.shape[0]
    angle = rng.uniform(-settings.rotation_deg, settings.rotation_deg)
    scale = 1.0 + rng.uniform(-settings.zoom, settings.zoom)
    shift = rng.uniform(-settings.shift, settings.shift, size=2) * size
    matrix = cv2.getRotationMatrix2D((size / 2, size / 2), angle, scale)
    matrix[:, 2] += shift
    out = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if settings.horizontal_flip and rng.random() < 0.5:
        out = out[:, ::-1]
    values = out.astype(np.float32)
    gain = 1.0 + rng.uniform(-settings.contrast, settings.contrast)
    offset = rng.uniform(-settings.brightness, settings.brightness) * 255.0
    values = (values - 127.5) * gain + 127.5 + offset
    return np.clip(values, 0, 255).astype(np.uint8)


class ImageBatches(keras.utils.PyDataset):
    """Batches of ``(B, S, S, 1) float32`` images (0..255) and one-hot labels from a cached split.

    Reads only the batch it needs from the memory-mapped array, so memory does not grow with the
    data set. With ``shuffle`` the order is a new permutation each epoch, drawn from
    ``(seed, epoch)``; with ``augment`` each image is augmented from ``(seed, epoch, index)``.
    Both are reproducible, also after a resume (``start_epoch``). The epoch advances at each
    ``on_epoch_begin`` (called at the start of every epoch of ``fit``: by Keras for the PyDataset
    itself, by :class:`StartEpoch` for :func:`as_dataset`): the first begun epoch is ``start_epoch``.
    """

    def __init__(self, split: PreprocessedSplit, batch_size: int, shuffle: bool = False,
                 augment: AugmentSettings | None = None, seed: int = 0, start_epoch: int = 0):
        super().__init__(workers=1, use_multiprocessing=False)
        self.images, self.labels = split.images, split.labels
        self.n_classes = len(split.classes)
        self.batch_size, self.shuffle, self.augment, self.seed = batch_size, shuffle, augment, seed
        self.start_epoch = self.epoch = start_epoch
        self._epochs_begun = 0
        self._order = self._permutation()

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (*self.images.shape[1:], 1)

    def _permutation(self) -> np.ndarray:
        return epoch_order(len(self.labels), self.seed, self.epoch, self.shuffle)

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self._order[index * self.batch_size:(index + 1) * self.batch_size]
        ordered = np.sort(rows)  # memmap reads in file order, then back to the shuffled order
        batch = np.asarray(self.images[ordered])[np.argsort(np.argsort(rows))]
        if self.augment is not None:
            batch = np.stack([
                augment_image(image, self.augment, np.random.default_rng([self.seed, self.epoch, int(row)]))
                for image, row in zip(batch, rows)
            ])
        x = batch.astype(np.float32)[..., None]
        y = np.eye(self.n_classes, dtype=np.float32)[self.labels[rows]]
        return x, y

    def on_epoch_begin(self) -> None:
        # Count the epochs begun rather than ended: Keras' fit() also calls on_epoch_end once before
        # the first epoch, which would shift every epoch's permutation by one.
        self.epoch = self.start_epoch + self._epochs_begun
        self._epochs_begun += 1
        self._order = self._permutation()


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order of the ``n`` rows in one epoch: a permutation drawn from ``(seed, epoch)``, or 0..n-1."""
    return np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)


def as_dataset(batches: ImageBatches | features.FeatureBatches):
    """A ``tf.data.Dataset`` of ``batches``' batches (one epoch), read ahead of training with ``prefetch``.

    The Python stage calls ``batches[0]``, ``batches[1]``, ... in order, one at a time, so every
    batch is exactly the one ``batches`` defines for its (seed, epoch) and resume semantics do not
    change; it runs in tf.data's own thread, ahead of the training step. Only the batch being read
    is in memory. Keras iterates the dataset afresh each epoch; :class:`StartEpoch` moves
    ``batches`` to the next epoch first.
    """
    import tensorflow as tf

    x_shape, n_classes = (None, *batches.sample_shape), int(batches.n_classes)

    def load(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, y = batches[int(index)]
        return np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.float32)

    def read(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x, y = tf.numpy_function(load, [index], (tf.float32, tf.float32), stateful=True)
        return x, y

    def shaped(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return tf.ensure_shape(x, x_shape), tf.ensure_shape(y, (None, n_classes))

    return (tf.data.Dataset.range(len(batches))
            .map(read)  # in order: see above
            .map(shaped, num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE))


class StartEpoch(keras.callbacks.Callback):
    """Calls ``batches.on_epoch_begin()`` at the start of each epoch of ``fit`` (Keras does it itself only for a
    PyDataset, not for the ``tf.data`` pipeline of :func:`as_dataset`)."""

    def __init__(self, batches: ImageBatches | features.FeatureBatches):
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.batches.on_epoch_begin()


def class_weights(labels: np.ndarray, n_classes: int) -> dict[int, float]:
    """Balanced class weights ``n / (n_classes * count)`` from the training labels (absent classes get 0)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes)
    total = counts.sum()
    return {c: (float(total / (n_classes * counts[c])) if counts[c] else 0.0) for c in range(n_classes)}


# --------------------------------------------------------------------------------------------
# Checkpoints and resume


@dataclass
class RunPaths:
    """Files of one training run under ``run_dir``."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def state(self) -> Path:
        return self.checkpoints / "state.json"

    @property
    def history(self) -> Path:
        return self.root / "history.csv"

    @property
    def model_keras(self) -> Path:
        return self.root / "model.keras"

    @property
    def model_h5(self) -> Path:
        return self.root / "model.h5"

    @property
    def model_json(self) -> Path:
        return self.root / "model.json"


class ReseedDropout(keras.callbacks.Callback):
    """At each epoch's start, set every dropout layer's random state from ``(seed, epoch, layer)``.

    Keras does not save a SeedGenerator's state in a ``.keras`` checkpoint, so without this a
    resumed run would draw other dropout masks than an uninterrupted one and end with other weights.
    """

    def __init__(self, seed: int):
        super().__init__()
        self.seed = seed

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        for layer in self.model.layers:
            generator = getattr(layer, "seed_generator", None)
            if generator is None or getattr(generator, "state", None) is None:
                continue
            # By the layer's name, not its position: the head-only model fit on cached features (whose dropout layer
            # sits elsewhere than in the full model) must draw the same masks as the full model would.
            name_key = int.from_bytes(hashlib.sha1(layer.name.encode()).digest()[:4], "big")
            state = np.random.default_rng([self.seed, epoch, name_key]).integers(1, 2**30, size=2)
            generator.state.assign(keras.ops.convert_to_tensor(state, dtype=generator.state.dtype))


class EpochCheckpoint(keras.callbacks.Callback):
    """At each epoch's end: save the model being fit (optimizer included), the history row, then the state.

    Each checkpoint has its own file and the state file, written last and atomically, names the
    one to resume from, so a kill at any moment leaves a consistent checkpoint to resume from.
    ``kind`` "model": the full model (``epoch_NNN.keras``); "head": the head-only model fit on cached
    features (``epoch_NNN.head.keras``, kilobytes instead of the backbone's megabytes on every epoch),
    with ``state_extra`` (the frozen backbone's hash and dtype policy) to rebuild the full model from.
    """

    def __init__(self, paths: RunPaths, fingerprint: str, stage: int, history_rows: list[dict],
                 kind: str = "model", state_extra: dict | None = None):
        super().__init__()
        self.paths, self.fingerprint, self.stage, self.history_rows = paths, fingerprint, stage, history_rows
        self.kind, self.state_extra = kind, dict(state_extra or {})

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.paths.checkpoints.mkdir(parents=True, exist_ok=True)
        name = f"epoch_{epoch + 1:03d}.keras" if self.kind == "model" else f"epoch_{epoch + 1:03d}.{self.kind}.keras"
        tmp = self.paths.checkpoints / f"tmp_{name}"
        self.model.save(tmp)
        os.replace(tmp, self.paths.checkpoints / name)
        row = {"epoch": epoch + 1, "stage": self.stage,
               "learning_rate": float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
               **{k: float(v) for k, v in (logs or {}).items() if k != "learning_rate"}}
        self.history_rows[:] = [r for r in self.history_rows if r["epoch"] < epoch + 1] + [row]
        write_csv_atomic(self.paths.history, pd.DataFrame(self.history_rows))
        previous = _read_state(self.paths)
        write_json_atomic(self.paths.state, {"epochs_done": epoch + 1, "stage": self.stage, "checkpoint": name,
                                             "fingerprint": self.fingerprint, "kind": self.kind, **self.state_extra})
        if previous and previous.get("checkpoint") != name:
            (self.paths.checkpoints / previous["checkpoint"]).unlink(missing_ok=True)


def _read_state(paths: RunPaths) -> dict | None:
    try:
        return json.loads(paths.state.read_text()) if paths.state.exists() else None
    except json.JSONDecodeError:
        return None


_NOT_RECIPE = ("epochs", "fine_tune_epochs", "mixed_precision", "jit_compile")


def fingerprint(data: PreprocessedData, spec: models.ModelSpec, settings: TrainSettings) -> str:
    """What a checkpoint was trained on and how: resuming with anything else is refused."""
    # The epoch counts only say when to stop, so a finished run can be continued for more epochs; precision and
    # XLA say how to compute, not what, so a run started on a GPU can be resumed on a CPU.
    recipe = {k: v for k, v in settings.to_dict().items() if k not in _NOT_RECIPE}
    payload = json.dumps({"data": data.key, "spec": spec.to_dict(), "settings": recipe}, sort_keys=True)
    return hashlib.sha1(payload.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainResult:
    model: keras.Model
    history: pd.DataFrame
    paths: RunPaths
    class_weights: dict[int, float]
    threshold: float
    resumed_from_epoch: int = 0
    seconds: float = 0.0
    #: How this call computed: dtype policy, and for stage 1 on cached features the cache's folder, key and
    #: rows computed or reused (see :meth:`xraylib.features.CachedFeatures.summary`).
    execution: dict[str, Any] = field(default_factory=dict)


def _jit(setting: str) -> bool | str:
    return {"auto": "auto", "on": True, "off": False}[setting]


def compile_model(model: keras.Model, learning_rate: float, jit_compile: str = "auto",
                  optimizer: keras.optimizers.Optimizer | None = None) -> None:
    """Adam at ``learning_rate`` (or ``optimizer``, shared with another model), categorical cross-entropy,
    accuracy and ROC-AUC. ``jit_compile``: "auto" (XLA on a GPU), "on", "off"."""
    model.compile(optimizer=optimizer or keras.optimizers.Adam(learning_rate), loss="categorical_crossentropy",
                  metrics=["accuracy", keras.metrics.AUC(name="auc")], jit_compile=_jit(jit_compile))


def uses_feature_cache(model: keras.Model, settings: TrainSettings) -> bool:
    """Whether this stage trains on cached features: the setting is on and only the head is trainable."""
    return settings.feature_cache and features.can_cache(model)


def train(
    data: PreprocessedData,
    spec: models.ModelSpec,
    settings: TrainSettings = TrainSettings(),
    run_dir: str | os.PathLike = "outputs/models/run",
    resume: bool = True,
    verbose: int | str = "auto",
) -> TrainResult:
    """Train ``spec`` on ``data``'s train split, validating on its val split; save everything in ``run_dir``.

    Stage 1 trains the head over the frozen backbone for ``settings.epochs``: on cached backbone
    features (``feature_cache``, the default; see :mod:`xraylib.features`) or on images streamed
    every epoch. Stage 2 (if ``fine_tune_epochs``) unfreezes the backbone's top block at
    ``fine_tune_learning_rate`` and streams the images. With ``resume`` (default) a run interrupted
    in ``run_dir`` continues at its next epoch with its optimizer state; a finished run is loaded,
    not retrained. ``resume=False`` starts over. Checkpoints and the saved model are the full model
    (input -> backbone -> head) on either path.
    """
    if tuple(spec.classes) != tuple(data.classes):
        raise ConfigError(f"model classes {list(spec.classes)} differ from the data's {list(data.classes)}")
    if spec.image_size != data.settings.image_size:
        raise ConfigError(f"model input {spec.image_size} px differs from the preprocessed images' {data.settings.image_size} px")
    if settings.fine_tune_epochs and not models.BACKBONES[spec.backbone][2]:
        # Refused now, not after stage 1 has run for hours.
        raise ConfigError(f"fine_tune_epochs={settings.fine_tune_epochs}, but {spec.backbone} has no pretrained top block "
                          "to fine-tune (it is trained whole); set fine_tune_epochs=0")
    if len(data["train"]) == 0 or len(data["val"]) == 0:
        raise ConfigError("the train and validation splits must both hold images; use more data or other fractions")
    paths = RunPaths(Path(run_dir))
    paths.root.mkdir(parents=True, exist_ok=True)
    print_fingerprint = fingerprint(data, spec, settings)
    state = _read_state(paths)
    if state and not resume:
        shutil.rmtree(paths.checkpoints, ignore_errors=True)
        paths.history.unlink(missing_ok=True)
        state = None
    if state and state.get("fingerprint") != print_fingerprint:
        raise ConfigError(
            f"{paths.root} holds a run trained on other data or settings; choose another run folder, "
            "or pass resume=False (--no-resume) to start this one over"
        )
    keras.utils.set_random_seed(settings.seed)
    weights = class_weights(data["train"].labels, len(data.classes)) if settings.class_weighting else None
    total = settings.epochs + settings.fine_tune_epochs
    history_rows = pd.read_csv(paths.history).to_dict("records") if state and paths.history.exists() else []
    done = int(state["epochs_done"]) if state else 0
    history_rows = [r for r in history_rows if r["epoch"] <= done]
    started = time.time()

    # model.json is written last by models.save_model: without it the final save was interrupted.
    if done >= total and paths.model_json.exists() and paths.model_keras.exists():
        model = keras.models.load_model(paths.model_keras)
        meta = json.loads(paths.model_json.read_text()) if paths.model_json.exists() else {}
        return TrainResult(model, pd.DataFrame(history_rows), paths, weights or {}, meta.get("threshold", {}).get("value", 0.5), done)

    if state and state.get("kind", "model") == "head":
        model = _model_from_head_checkpoint(paths, state, spec, settings)
    elif state:
        # A checkpoint keeps the precision it was trained in (its layers' dtype policies are saved with it).
        model = keras.models.load_model(paths.checkpoints / state["checkpoint"])
    else:
        model = models.build_model(spec, dtype_policy=models.choose_dtype_policy(settings.mixed_precision))
        compile_model(model, settings.learning_rate, settings.jit_compile)
    execution: dict[str, Any] = {"dtype_policy": "mixed_float16" if models.uses_mixed_precision(model) else "float32"}

    val_batches = ImageBatches(data["val"], settings.batch_size)
    val_probabilities = None
    stages = [(1, 0, settings.epochs)]
    if settings.fine_tune_epochs:
        stages.append((2, settings.epochs, total))
    for stage, first_epoch, end_epoch in stages:
        if done >= end_epoch:
            continue
        if stage == 2 and done == first_epoch:
            # Entering fine-tuning (a resume inside stage 2 loads an already unfrozen, compiled model).
            models.unfreeze_top(model, spec.backbone)
            compile_model(model, settings.fine_tune_learning_rate, settings.jit_compile)
        if uses_feature_cache(model, settings):
            val_probabilities, execution["feature_cache"] = _fit_head_on_features(
                model, data, spec, settings, stage, done, end_epoch, weights, (paths, print_fingerprint, history_rows),
                verbose)
            execution[f"stage_{stage}_input"] = "cached features"
        else:
            checkpoint = EpochCheckpoint(paths, print_fingerprint, stage, history_rows)
            train_batches = ImageBatches(data["train"], settings.batch_size, shuffle=True, augment=settings.augment,
                                         seed=settings.seed, start_epoch=done)
            # ImageBatches shuffles from (seed, epoch); the dataset keeps its order (no Keras shuffle), so a resumed
            # epoch sees the batches it saw before.
            model.fit(as_dataset(train_batches), validation_data=as_dataset(val_batches), epochs=end_epoch,
                      initial_epoch=done, class_weight=weights, verbose=verbose, shuffle=False,
                      callbacks=[StartEpoch(train_batches), ReseedDropout(settings.seed), checkpoint])
            val_probabilities = None
            execution[f"stage_{stage}_input"] = "streamed images"
        done = end_epoch

    threshold = finish_run(model, data, spec, settings, paths, val_probabilities=val_probabilities, execution=execution)
    return TrainResult(model, pd.DataFrame(history_rows), paths, weights or {}, threshold,
                       int(state["epochs_done"]) if state else 0, time.time() - started, execution)


def _fit_head_on_features(model: keras.Model, data: PreprocessedData, spec: models.ModelSpec, settings: TrainSettings,
                          stage: int, done: int, end_epoch: int, weights: dict[int, float] | None,
                          run: tuple[RunPaths, str, list[dict]], verbose: int | str) -> tuple[np.ndarray, dict[str, Any]]:
    """Stage 1 on cached features: the head-only model (the full model's own head layers) fits on the cache with the
    full model's optimizer, so the full model ends up trained and holds the optimizer state. Checkpoints are the
    head-only model (see :class:`EpochCheckpoint`). Returns the validation probabilities (from the cached features)
    and the cache's summary."""
    cache = features.cached_features(model, data, spec, views=settings.augment_views, augment=settings.augment,
                                     progress=verbose != 0)
    head = features.head_model(model)
    compile_model(head, settings.learning_rate, settings.jit_compile, optimizer=model.optimizer)
    paths, print_fingerprint, history_rows = run
    description = json.loads((cache.folder / "features.json").read_text())
    checkpoint = EpochCheckpoint(paths, print_fingerprint, stage, history_rows, kind="head",
                                 state_extra={"backbone_weights_sha1": description["backbone_weights_sha1"],
                                              "dtype_policy": description["compute_dtype"]})
    n_classes = len(data.classes)
    train_batches = features.FeatureBatches(cache.train_views, data["train"].labels, n_classes, settings.batch_size,
                                            shuffle=True, seed=settings.seed, start_epoch=done)
    val_batches = features.FeatureBatches([cache.val], data["val"].labels, n_classes, settings.batch_size)
    head.fit(as_dataset(train_batches), validation_data=as_dataset(val_batches), epochs=end_epoch, initial_epoch=done,
             class_weight=weights, verbose=verbose, shuffle=False, callbacks=[StartEpoch(train_batches), ReseedDropout(settings.seed), checkpoint])
    probabilities = np.asarray(head.predict(np.asarray(cache.val), batch_size=256, verbose=0), dtype=np.float32)
    return probabilities, cache.summary()


def _model_from_head_checkpoint(paths: RunPaths, state: dict, spec: models.ModelSpec,
                                settings: TrainSettings) -> keras.Model:
    """The full model of a run checkpointed on cached features: the backbone built again (and checked against the
    hash the checkpoint recorded), the head's weights and the optimizer's state from the checkpoint."""
    model = models.build_model(spec, dtype_policy=state.get("dtype_policy", "float32"))
    compile_model(model, settings.learning_rate, settings.jit_compile)
    if features.backbone_sha1(model) != state.get("backbone_weights_sha1"):
        raise ConfigError(
            f"{paths.root}: the backbone built now ({spec.backbone}, weights={spec.weights}) has other weights than the "
            "one this run started with (was the weights file replaced?); restore them, or pass resume=False "
            "(--no-resume) to start the run over")
    saved = keras.models.load_model(paths.checkpoints / state["checkpoint"])
    for name in models.head_layer_names():
        if name in {layer.name for layer in saved.layers}:
            model.get_layer(name).set_weights(saved.get_layer(name).get_weights())
    # The optimizer's slots follow the trainable variables in order: the head's, in the same order in both models.
    model.optimizer.build(model.trainable_variables)
    if len(model.optimizer.variables) != len(saved.optimizer.variables):
        raise ConfigError(f"{paths.checkpoints / state['checkpoint']}: its optimizer state does not fit this model; "
                          "pass resume=False (--no-resume) to start the run over")
    for target, value in zip(model.optimizer.variables, saved.optimizer.variables):
        target.assign(value)
    return model


def finish_run(model: keras.Model, data: PreprocessedData, spec: models.ModelSpec, settings: TrainSettings,
               paths: RunPaths, val_probabilities: np.ndarray | None = None,
               execution: dict[str, Any] | None = None) -> float:
    """Choose the decision threshold on the validation split and save the model (.keras, .h5, JSON).

    ``val_probabilities`` ``(N_val, C)``: the model's validation predictions where they are already
    known (from cached features); otherwise the model predicts the split. A mixed-precision model is
    saved as its float32 copy, so it predicts the same on any machine.
    """
    from . import evaluate, predict  # evaluate is TF-free; predict needs the model

    if val_probabilities is None:
        val = predict.predict_split(model, data["val"])
    else:
        val = data["val"].manifest.copy()
        val[predict.probability_columns(data.classes)] = val_probabilities
    # 3+ classes without "covid" (e.g. source prediction over 3+ sources): the last class vs the rest.
    positive = (evaluate.resolve_positive_class(data.classes) if len(data.classes) == 2 or "covid" in data.classes
                else data.classes[-1])
    threshold = evaluate.threshold_from_validation(val, data.classes, positive_class=positive,
                                                   rule=settings.threshold_rule, min_sensitivity=settings.min_sensitivity)
    metadata = {
        "classes": list(data.classes),
        "input_size": [spec.image_size, spec.image_size, 1],
        "preprocessing": {**data.settings.to_dict(), "normalisation": "inside the model (layers to_rgb, normalise)",
                          "pixels_version": PIXELS_VERSION},
        "model": spec.to_dict(),
        "training": settings.to_dict(),
        "training_data": {"key": data.key, "folder": str(data.folder),
                          "counts": {name: len(split) for name, split in data.splits.items()}},
        "threshold": {"value": threshold, "positive_class": positive, "rule": settings.threshold_rule,
                      "min_sensitivity": settings.min_sensitivity, "chosen_on": "validation split"},
    }
    if execution:
        metadata["execution"] = execution
    models.save_model(models.as_float32(model, spec), paths.root, metadata)
    from . import modelcard  # TF-free: the card sits next to every saved model

    modelcard.write_model_card(paths.root, metadata, data=data)
    return threshold
