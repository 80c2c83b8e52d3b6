"""Training: augmentation, batches from the memory-mapped cache, class weights, checkpoints and resume.

``train()`` runs the seeds' recipe by default (frozen backbone, new head, Adam 1e-3, batch 8,
25 epochs) with what they lacked: class weights from the training split, a checkpoint at the
end of every epoch (on Drive in Colab), resume after a disconnect at the next epoch with the
optimizer state, the history as CSV, an optional fine-tuning stage, and the model saved as
``.keras`` and ``.h5`` with a JSON of everything needed to use it again.
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

from . import models
from .errors import ConfigError
from .fileio import write_csv_atomic, write_json_atomic
from .preprocess import PreprocessedData, PreprocessedSplit


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

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.fine_tune_epochs < 0:
            raise ConfigError(f"epochs and batch_size must be >= 1 and fine_tune_epochs >= 0, got {self}")

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
    ``on_epoch_begin`` (Keras calls it at the start of every epoch of ``fit``): the first begun
    epoch is ``start_epoch``.
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

    def _permutation(self) -> np.ndarray:
        n = len(self.labels)
        return np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)

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


class EpochCheckpoint(keras.callbacks.Callback):
    """At each epoch's end: save the whole model (optimizer included), the history row, then the state.

    Each checkpoint has its own file and the state file, written last and atomically, names the
    one to resume from, so a kill at any moment leaves a consistent checkpoint to resume from.
    """

    def __init__(self, paths: RunPaths, fingerprint: str, stage: int, history_rows: list[dict]):
        super().__init__()
        self.paths, self.fingerprint, self.stage, self.history_rows = paths, fingerprint, stage, history_rows

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.paths.checkpoints.mkdir(parents=True, exist_ok=True)
        name = f"epoch_{epoch + 1:03d}.keras"
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
                                             "fingerprint": self.fingerprint})
        if previous and previous.get("checkpoint") != name:
            (self.paths.checkpoints / previous["checkpoint"]).unlink(missing_ok=True)


def _read_state(paths: RunPaths) -> dict | None:
    try:
        return json.loads(paths.state.read_text()) if paths.state.exists() else None
    except json.JSONDecodeError:
        return None


def fingerprint(data: PreprocessedData, spec: models.ModelSpec, settings: TrainSettings) -> str:
    """What a checkpoint was trained on and how: resuming with anything else is refused."""
    # The epoch counts only say when to stop, so a finished run can be continued for more epochs.
    recipe = {k: v for k, v in settings.to_dict().items() if k not in ("epochs", "fine_tune_epochs")}
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


def compile_model(model: keras.Model, learning_rate: float) -> None:
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="categorical_crossentropy",
                  metrics=["accuracy", keras.metrics.AUC(name="auc")])


def train(
    data: PreprocessedData,
    spec: models.ModelSpec,
    settings: TrainSettings = TrainSettings(),
    run_dir: str | os.PathLike = "outputs/models/run",
    resume: bool = True,
    verbose: int | str = "auto",
) -> TrainResult:
    """Train ``spec`` on ``data``'s train split, validating on its val split; save everything in ``run_dir``.

    Stage 1 trains the head over the frozen backbone for ``settings.epochs``; stage 2 (if
    ``fine_tune_epochs``) unfreezes the backbone's top block at ``fine_tune_learning_rate``.
    With ``resume`` (default) a run interrupted in ``run_dir`` continues at its next epoch with
    its optimizer state; a finished run is loaded, not retrained. ``resume=False`` starts over.
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

    if done >= total and paths.model_keras.exists():
        model = keras.models.load_model(paths.model_keras)
        meta = json.loads(paths.model_json.read_text()) if paths.model_json.exists() else {}
        return TrainResult(model, pd.DataFrame(history_rows), paths, weights or {}, meta.get("threshold", {}).get("value", 0.5), done)

    if state:
        model = keras.models.load_model(paths.checkpoints / state["checkpoint"])
    else:
        model = models.build_model(spec)
        compile_model(model, settings.learning_rate)

    val_batches = ImageBatches(data["val"], settings.batch_size)
    stages = [(1, 0, settings.epochs)]
    if settings.fine_tune_epochs:
        stages.append((2, settings.epochs, total))
    for stage, first_epoch, end_epoch in stages:
        if done >= end_epoch:
            continue
        if stage == 2 and done == first_epoch:
            # Entering fine-tuning (a resume inside stage 2 loads an already unfrozen, compiled model).
            models.unfreeze_top(model, spec.backbone)
            compile_model(model, settings.fine_tune_learning_rate)
        train_batches = ImageBatches(data["train"], settings.batch_size, shuffle=True, augment=settings.augment,
                                     seed=settings.seed, start_epoch=done)
        # shuffle=False: ImageBatches already shuffles from (seed, epoch); Keras' own shuffle would reorder
        # the batches with Python's global RNG, so a resumed epoch would not see the batches it saw before.
        model.fit(train_batches, validation_data=val_batches, epochs=end_epoch, initial_epoch=done,
                  class_weight=weights, verbose=verbose, shuffle=False,
                  callbacks=[EpochCheckpoint(paths, print_fingerprint, stage, history_rows)])
        done = end_epoch

    threshold = finish_run(model, data, spec, settings, paths)
    return TrainResult(model, pd.DataFrame(history_rows), paths, weights or {}, threshold,
                       int(state["epochs_done"]) if state else 0, time.time() - started)


def finish_run(model: keras.Model, data: PreprocessedData, spec: models.ModelSpec, settings: TrainSettings,
               paths: RunPaths) -> float:
    """Choose the decision threshold on the validation split and save the model (.keras, .h5, JSON)."""
    from . import evaluate, predict  # evaluate is TF-free; predict needs the model

    val = predict.predict_split(model, data["val"])
    positive = evaluate.resolve_positive_class(data.classes)
    threshold = evaluate.threshold_from_validation(val, data.classes, positive_class=positive,
                                                   rule=settings.threshold_rule, min_sensitivity=settings.min_sensitivity)
    metadata = {
        "classes": list(data.classes),
        "input_size": [spec.image_size, spec.image_size, 1],
        "preprocessing": {**data.settings.to_dict(), "normalisation": "inside the model (layers to_rgb, normalise)"},
        "model": spec.to_dict(),
        "training": settings.to_dict(),
        "training_data": {"key": data.key, "folder": str(data.folder),
                          "counts": {name: len(split) for name, split in data.splits.items()}},
        "threshold": {"value": threshold, "positive_class": positive, "rule": settings.threshold_rule,
                      "min_sensitivity": settings.min_sensitivity, "chosen_on": "validation split"},
    }
    models.save_model(model, paths.root, metadata)
    return threshold
