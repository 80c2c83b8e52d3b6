"""Batches for training: augmentation, the order of each epoch, and batches of images or cached features.

Everything random here is drawn from ``(seed, epoch, ...)``, so an epoch gives the same batches
after a resume as it did before. :class:`ImageBatches` reads only the batch it needs from the
memory-mapped uint8 cache; :class:`FeatureBatches` gives the cached backbone features
(:mod:`xraylib.features`) in the same order; :func:`as_dataset` turns either into a ``tf.data``
pipeline that reads ahead of training. :mod:`xraylib.train` and :mod:`xraylib.features` both use
this module; neither reaches into the other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import keras
import numpy as np

from .errors import ConfigError
from .preprocess import PreprocessedSplit

# A constant third seed word keeps the per-epoch view draw apart from the batch order drawn from (seed, epoch).
_VIEW_STREAM = 7919


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


def as_dataset(batches: "ImageBatches | FeatureBatches"):
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

    def __init__(self, batches: "ImageBatches | FeatureBatches"):
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.batches.on_epoch_begin()


# --------------------------------------------------------------------------------------------
# Batches of cached features, in the order ImageBatches gives the images


class FeatureBatches(keras.utils.PyDataset):
    """Batches of ``(B, D) float32`` cached features and one-hot labels.

    The order is ImageBatches' (a permutation drawn from ``(seed, epoch)``), so without augmentation
    the head meets the same batches as on the streaming path. With K views each row's view is drawn
    from ``(seed, epoch)`` too: reproducible, also after a resume (``start_epoch``).
    """

    def __init__(self, views: list[np.ndarray], labels: np.ndarray, n_classes: int, batch_size: int,
                 shuffle: bool = False, seed: int = 0, start_epoch: int = 0):
        super().__init__(workers=1, use_multiprocessing=False)
        if not views or any(len(v) != len(labels) for v in views):
            raise ConfigError(f"every view needs one row per label ({len(labels)}), got {[len(v) for v in views]}")
        self.views, self.labels = views, np.asarray(labels)
        self.n_classes, self.batch_size, self.shuffle, self.seed = n_classes, batch_size, shuffle, seed
        self.start_epoch = self.epoch = start_epoch
        self._epochs_begun = 0
        self._order, self._view_of_row = self._draw()

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (int(self.views[0].shape[1]),)

    def _draw(self) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.labels)
        order = epoch_order(n, self.seed, self.epoch, self.shuffle)
        if len(self.views) == 1:
            return order, np.zeros(n, dtype=np.int64)
        return order, np.random.default_rng([self.seed, self.epoch, _VIEW_STREAM]).integers(0, len(self.views), size=n)

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self._order[index * self.batch_size:(index + 1) * self.batch_size]
        views = self._view_of_row[rows]
        x = np.empty((len(rows), self.sample_shape[0]), dtype=np.float32)
        for view in np.unique(views):
            picked = views == view
            x[picked] = self.views[int(view)][rows[picked]]
        y = np.eye(self.n_classes, dtype=np.float32)[self.labels[rows]]
        return x, y

    def on_epoch_begin(self) -> None:
        self.epoch = self.start_epoch + self._epochs_begun
        self._epochs_begun += 1
        self._order, self._view_of_row = self._draw()
