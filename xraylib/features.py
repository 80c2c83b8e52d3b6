"""Cached bottleneck features: while the backbone is frozen, run it once per image and train the head on its output.

In stage 1 of training (the seeds' whole recipe) the backbone is frozen, so what it outputs for an
image never changes; the seeds' loop still computed it again in every epoch, 25 times per image
for 25 epochs. Here the backbone runs once per image (and per augmented view, below), the output
of the head's pooling is stored, and the head trains on the stored features in seconds. The head's
layers are the full model's own layer objects, so the trained head sits in the full model
(input -> backbone -> head), which is checkpointed and saved as usual.

The cache lives next to the preprocessed arrays (on Drive in Colab), so later runs and notebooks
reuse it::

    preprocessed/features/<key>/features.json                 what <key> stands for
    preprocessed/features/<key>/{split}.view0.npy             (N, D) float32: the plain images
    preprocessed/features/<key>/{split}.view0.json            each row's image content hash, in order
    preprocessed/features/<key>/{split}.aug-<a>.view{v}.npy   augmented view v >= 1 (augmentation settings <a>)

``<key>`` is a hash of the backbone, its weights (a hash of the frozen weight values: "imagenet",
a weights file and random weights from a seed are all told apart, and the same weights reached by
another path are recognised), alpha, input size, pooling, the preprocessing settings and the compute
precision. A row is identified by its image's content hash (the manifest's ``sha1`` of the source
file) and its view: when an image changes only its row is computed again, and the rows of
unchanged images are copied from the previous file. Features are float32 ``(N, D)``, D the
backbone's channels (512 for VGG16): 2 KB per image and view.

Views and the trade-off. View 0 is the plain image. With augmentation and ``views = K > 1``, views
1..K-1 are augmented copies drawn from (view, image hash), the same in every run; each epoch
trains every image on one of its K views, drawn from (seed, epoch, row). K views cost K backbone
passes per training image, once; the streaming path (``feature_cache=False``) costs one pass per
image in every epoch and draws fresh augmentation each time. K = 1 (the default) trains stage 1
on the plain images only: it is what makes 10 epochs more than 10x faster than the seeds' loop,
at the price of no augmentation while the backbone is frozen.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from . import models
from .batches import AugmentSettings, augment_image
from .errors import ConfigError
from .fileio import read_json, release_pages, save_npy_atomic, write_json_atomic
from .preprocess import PIXELS_VERSION, PreprocessedData, PreprocessedSplit, PreprocessSettings
from .reporting import probability_columns

FORMAT = "xraylib bottleneck features v1"
FEATURES_DIR = "features"
#: Rows extracted between two saves of progress: an interrupted extraction resumes from the last one.
CHUNK_ROWS = 512


# --------------------------------------------------------------------------------------------
# The model pieces: extractor (input -> pooled features) and head (features -> probabilities)


def can_cache(model: keras.Model) -> bool:
    """Whether only the head trains (the backbone frozen), so the features the head sees never change."""
    if "head_pool" not in {layer.name for layer in model.layers}:
        return False
    return all(models.is_head_layer(layer.name) for layer in model.layers if layer.trainable_weights)


def feature_extractor(model: keras.Model) -> keras.Model:
    """The model up to the head's pooling: ``(N, S, S, 1)`` images (0..255) to ``(N, D)`` features."""
    return keras.Model(model.inputs, model.get_layer("head_pool").output, name="feature_extractor")


def head_model(model: keras.Model, stacked: bool = False) -> keras.Model:
    """The head after its pooling as a model on ``(N, D)`` features, built from ``model``'s own layer objects:
    training it trains the full model's head (the same weights). With K heads it outputs their mean probability,
    or with ``stacked`` every head's probabilities side by side ``(N, K * C)``, to train each head on its own
    (:class:`xraylib.models.EnsembleLoss`)."""
    dim = int(model.get_layer("head_pool").output.shape[-1])
    inputs = keras.Input((dim,), name="features")
    heads = models.head_count(model)
    names = models.head_layer_names(heads)[1:]
    if heads == 1:
        branches = [[model.get_layer(name) for name in names]]
        return keras.Model(inputs, models.apply_branches(branches, inputs, None), name="head")
    branches = [[model.get_layer(f"head_{part}_{k}") for part in ("dense", "dropout", "probs")] for k in range(heads)]
    combine = keras.layers.Concatenate(name="head_stack") if stacked else model.get_layer("predictions")
    return keras.Model(inputs, models.apply_branches(branches, inputs, combine), name="head")


def backbone_sha1(model: keras.Model) -> str:
    """SHA-1 of every weight value before the head (input handling and backbone): the weights' real identity."""
    digest = hashlib.sha1()
    for layer in model.layers:
        if models.is_head_layer(layer.name):
            continue
        for i, weight in enumerate(layer.weights):
            value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
            digest.update(f"{layer.name}/{i}:{value.dtype}:{value.shape}\n".encode())
            digest.update(value.tobytes())
    return digest.hexdigest()


def content_ids(split: PreprocessedSplit) -> list[str]:
    """Each row's identity: the manifest's ``sha1`` of the source file; for a row without one, ``pixels:`` and
    the SHA-1 of its cached pixels."""
    values = split.manifest["sha1"].tolist() if "sha1" in split.manifest.columns else [None] * len(split)
    ids = []
    for row, value in enumerate(values):
        if isinstance(value, str) and value.strip():
            ids.append(value.strip())
        else:
            ids.append("pixels:" + hashlib.sha1(np.ascontiguousarray(split.images[row]).tobytes()).hexdigest())
    return ids


def view_rng(content_id: str, view: int) -> np.random.Generator:
    """The random generator of one augmented view of one image: from its content hash, not its row or the run."""
    return np.random.default_rng([view, int(hashlib.sha1(content_id.encode()).hexdigest()[:15], 16)])


def default_batch_size() -> int:
    """Images per forward pass when extracting features: 64 on a GPU, 32 on a CPU (halved on out-of-memory)."""
    import tensorflow as tf

    return 64 if tf.config.list_physical_devices("GPU") else 32


# --------------------------------------------------------------------------------------------
# The cache


def describe(model: keras.Model, spec: models.ModelSpec, preprocessing: PreprocessSettings) -> dict[str, Any]:
    """What a cache's features depend on (written as ``features.json``)."""
    return {
        "format": FORMAT,
        "backbone": spec.backbone,
        "alpha": spec.alpha,
        "image_size": int(spec.image_size),
        "pooling": spec.head_pooling,
        "feature_layer": models.feature_layer_name(model),
        "backbone_weights_sha1": backbone_sha1(model),
        "preprocessing": preprocessing.to_dict(),
        "pixels_version": PIXELS_VERSION,
        # "float32", "mixed_float16" or "mixed_bfloat16": features of different precisions never share a cache.
        "compute_dtype": models.model_dtype_policy(model),
        "stored_dtype": "float32",
        # As given, for people: the key uses the weight values above, not the path they came from.
        "weights": spec.weights if spec.weights in (None, "imagenet") else str(spec.weights),
    }


def cache_key(description: dict[str, Any]) -> str:
    keyed = {k: v for k, v in description.items() if k != "weights"}
    return hashlib.sha1(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def augment_key(augment: AugmentSettings) -> str:
    return hashlib.sha1(json.dumps(asdict(augment), sort_keys=True).encode()).hexdigest()[:10]


def view_stem(split: str, view: int, augment: AugmentSettings | None = None) -> str:
    """File name (without suffix) of one split's view: ``train.view0``, ``train.aug-<a>.view2``."""
    if view == 0:
        return f"{split}.view0"
    if augment is None:
        raise ConfigError(f"view {view} of {split} is an augmented view: it needs augmentation settings")
    return f"{split}.aug-{augment_key(augment)}.view{view}"


@dataclass
class CachedFeatures:
    """The features stage 1 trains on: ``train_views`` K arrays ``(N_train, D)`` (view 0 the plain images),
    ``val`` ``(N_val, D)``, all memory-mapped float32; ``computed`` rows run through the backbone now, per file."""

    train_views: list[np.ndarray]
    val: np.ndarray
    folder: Path
    key: str
    computed: dict[str, int] = field(default_factory=dict)
    reused: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def dim(self) -> int:
        return int(self.val.shape[1])

    def summary(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "key": self.key, "views": len(self.train_views),
                "computed_rows": dict(self.computed), "reused_rows": dict(self.reused), "seconds": round(self.seconds, 2)}


def cache_folder(data: PreprocessedData, key: str) -> Path:
    return Path(data.folder) / FEATURES_DIR / key


def cached_features(
    model: keras.Model,
    data: PreprocessedData,
    spec: models.ModelSpec,
    views: int = 1,
    augment: AugmentSettings | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> CachedFeatures:
    """Features of ``data``'s train split (``views`` views) and val split (plain) through ``model``'s frozen backbone.

    Reuses what the cache already holds (per image content hash), computes the rest, and returns
    memory-mapped arrays. ``augment`` (:class:`xraylib.batches.AugmentSettings`) is needed for
    ``views > 1``; without it only view 0 exists. Raises :class:`ConfigError` when the backbone is
    not frozen (fine-tuning trains on streamed images instead).
    """
    if not can_cache(model):
        raise ConfigError("the backbone has trainable layers (fine-tuning, or the small CNN trained whole): its features "
                          "change as it trains and cannot be cached; train on streamed images (feature_cache=False)")
    if views < 1:
        raise ConfigError(f"views must be >= 1, got {views}")
    if views > 1 and augment is None:
        views = 1  # the extra views would be copies of view 0
    started = time.perf_counter()
    description = describe(model, spec, data.settings)
    key = cache_key(description)
    folder = cache_folder(data, key)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "features.json").exists():
        write_json_atomic(folder / "features.json", description)
    extractor = feature_extractor(model)
    batch_size = batch_size or default_batch_size()
    computed: dict[str, int] = {}
    reused: dict[str, int] = {}

    def get(split: str, view: int) -> np.ndarray:
        stem = view_stem(split, view, augment)
        array, n_new = _fill(folder, stem, data[split], view, augment, extractor, batch_size, progress)
        computed[stem], reused[stem] = n_new, len(array) - n_new
        return array

    train_views = [get("train", view) for view in range(views)]
    val = get("val", 0)
    return CachedFeatures(train_views, val, folder, key, computed, reused, time.perf_counter() - started)


def split_features(model: keras.Model, data: PreprocessedData, spec: models.ModelSpec, split: str = "test",
                   batch_size: int | None = None, progress: bool = True) -> np.ndarray:
    """Plain-image features ``(N, D)`` of any split of ``data`` from the cache (computed where missing).

    The same cache as :func:`cached_features`: an image whose features another split or another
    protocol already computed is not run through the backbone again.
    """
    if not can_cache(model):
        raise ConfigError("the backbone has trainable layers: its features cannot be cached; use xraylib.models.predict_split")
    description = describe(model, spec, data.settings)
    folder = cache_folder(data, cache_key(description))
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "features.json").exists():
        write_json_atomic(folder / "features.json", description)
    array, _ = _fill(folder, view_stem(split, 0), data[split], 0, None, feature_extractor(model),
                     batch_size or default_batch_size(), progress)
    return array


def predict_split(model: keras.Model, data: PreprocessedData, spec: models.ModelSpec, split: str = "test",
                  progress: bool = False) -> pd.DataFrame:
    """What :func:`xraylib.models.predict_split` returns (the split's rows with ``prob_<class>`` columns),
    computed from cached features through the model's head: the backbone runs only for images not cached yet.
    Agrees with the full model within float32 rounding."""
    rows = data[split].manifest.copy()
    if len(rows) == 0:
        return rows.assign(**{c: np.zeros(0, dtype=np.float32) for c in probability_columns(data.classes)})
    feats = np.asarray(split_features(model, data, spec, split, progress=progress))
    probabilities = np.asarray(head_model(model).predict(feats, batch_size=256, verbose=0), dtype=np.float32)
    rows[probability_columns(data.classes)] = probabilities
    return rows


def _fill(folder: Path, stem: str, split: PreprocessedSplit, view: int, augment: AugmentSettings | None, extractor: keras.Model,
          batch_size: int, progress: bool) -> tuple[np.ndarray, int]:
    """One split's view as ``{stem}.npy``: reused when its rows' content hashes match, else filled row by row.

    Rows of images the previous file already holds are copied; the others go through the backbone
    in chunks, each chunk's progress saved (``.status.npy``), so an interrupted extraction resumes.
    Returns the memory-mapped array and the number of rows computed now.
    """
    ids = content_ids(split)
    final, meta_path = folder / f"{stem}.npy", folder / f"{stem}.json"
    meta = read_json(meta_path)
    if meta and meta.get("complete") and meta.get("ids") == ids and final.exists():
        return np.load(final, mmap_mode="r"), 0

    dim = int(extractor.output.shape[-1])
    partial, status_path, partial_meta = (folder / f"{stem}.partial.npy", folder / f"{stem}.status.npy",
                                          folder / f"{stem}.partial.json")
    previous = read_json(partial_meta)
    if previous and previous.get("ids") == ids and partial.exists() and status_path.exists():
        features = np.load(partial, mmap_mode="r+")
        done = np.load(status_path)
    else:
        features = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(len(ids), dim))
        done = np.zeros(len(ids), dtype=bool)
        for known, known_ids in _complete_files(folder, stem):
            if done.all():
                break
            _copy_known_rows(np.load(known, mmap_mode="r"), known_ids, ids, features, done)
        features.flush()
        save_npy_atomic(status_path, done)
        write_json_atomic(partial_meta, {"ids": ids})
    todo = np.flatnonzero(~done)
    bar = tqdm(total=len(ids), initial=len(ids) - len(todo), desc=f"features {stem}", unit="img",
               disable=not progress or len(todo) == 0)
    try:
        for begin in range(0, len(todo), CHUNK_ROWS):
            rows = todo[begin:begin + CHUNK_ROWS]
            features[rows] = _extract_rows(extractor, split.images, rows, ids, view, augment, batch_size)
            features.flush()  # the values reach the disk before the status that says they are there
            done[rows] = True
            save_npy_atomic(status_path, done)
            bar.update(len(rows))
            # The pages read and written so far leave this process's RSS (they stay in the page cache), so it stays
            # flat in the number of images instead of growing to the files' size (as preprocess._fill_split does).
            release_pages(split.images)
            release_pages(features)
    finally:
        bar.close()
    del features
    # The old description goes first: a kill between these steps leaves no file whose ids are wrong.
    meta_path.unlink(missing_ok=True)
    os.replace(partial, final)
    write_json_atomic(meta_path, {"format": FORMAT, "view": view, "augment": asdict(augment) if view else None,
                                  "rows": len(ids), "dim": dim, "complete": True, "ids": ids})
    status_path.unlink(missing_ok=True)
    partial_meta.unlink(missing_ok=True)
    return np.load(final, mmap_mode="r"), int(len(todo))


def _complete_files(folder: Path, stem: str) -> list[tuple[Path, list[str]]]:
    """The finished feature files that may hold rows of ``stem``, with their rows' content ids: ``stem``'s own
    previous file first, then the same view of the other splits (an image moved to another split by a new split,
    or used as a test image by another protocol, is not computed again)."""
    suffix = stem.split(".", 1)[1]  # "view0" or "aug-<a>.view<v>"
    stems = [stem] + sorted(p.name[:-len(".json")] for p in folder.glob(f"*.{suffix}.json")
                            if p.name.split(".", 1)[1] == f"{suffix}.json" and p.name != f"{stem}.json")
    found = []
    for name in stems:
        meta = read_json(folder / f"{name}.json")
        if meta and meta.get("complete") and (folder / f"{name}.npy").exists() and meta.get("ids"):
            found.append((folder / f"{name}.npy", meta["ids"]))
    return found


def _copy_known_rows(old: np.ndarray, old_ids: list[str], ids: list[str], out: np.ndarray, done: np.ndarray) -> None:
    where = {content_id: row for row, content_id in enumerate(old_ids)}
    pairs = [(row, where[content_id]) for row, content_id in enumerate(ids) if content_id in where]
    for begin in range(0, len(pairs), 4096):
        chunk = np.array(pairs[begin:begin + 4096], dtype=np.int64)
        out[chunk[:, 0]] = old[chunk[:, 1]]
        done[chunk[:, 0]] = True


def _in_cluster() -> bool:
    import tensorflow as tf

    from . import distribute

    # (distribute.worker: only a MultiWorkerMirroredStrategy's processes; a TPU predicts on the TPU as before)
    return distribute.worker(tf.distribute.get_strategy()) is not None


def _extract_locally(extractor: keras.Model, dataset) -> np.ndarray:
    """The features of ``dataset``'s batches, computed by this process alone. In a multi-worker cluster each worker
    fills its own cache: ``predict`` under the strategy is collective, so workers whose caches hold different rows
    (one machine's cache complete, the other's missing or cut by a kill) met each other's collective operations
    in another order and both failed ("Collective instance ... expected type"). The weights are the same on every
    worker (the chief's), so the features are too."""
    import tensorflow as tf

    step = tf.function(lambda x: extractor(x, training=False))
    parts = [np.asarray(keras.ops.convert_to_numpy(step(batch)), dtype=np.float32) for batch in dataset]
    return np.concatenate(parts) if parts else np.zeros((0, *extractor.output_shape[1:]), dtype=np.float32)


def _extract_rows(extractor: keras.Model, images_uint8: np.ndarray, rows: np.ndarray, ids: list[str], view: int,
                  augment: AugmentSettings | None, batch_size: int) -> np.ndarray:
    """Features ``(len(rows), D) float32`` of the given rows (augmented as view ``view``), through a tf.data pipeline:
    index batches -> parallel reads (and augmentation) from the memory-mapped uint8 array -> prefetch -> the model."""
    import tensorflow as tf

    size = images_uint8.shape[1:]
    while True:
        def load(index: np.ndarray, batch_size: int = batch_size) -> np.ndarray:
            picked = rows[int(index) * batch_size:(int(index) + 1) * batch_size]
            batch = np.asarray(images_uint8[picked])  # rows ascending: a forward read of the file
            if view:
                batch = np.stack([augment_image(image, augment, view_rng(ids[row], view))
                                  for image, row in zip(batch, picked)])
            return batch.astype(np.float32)[..., None]

        def shaped(index: tf.Tensor) -> tf.Tensor:
            x = tf.numpy_function(load, [index], tf.float32, stateful=False)
            return tf.ensure_shape(x, (None, *size, 1))

        n_batches = math.ceil(len(rows) / batch_size)
        dataset = (tf.data.Dataset.range(n_batches)
                   .map(shaped, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
                   .prefetch(tf.data.AUTOTUNE))
        try:
            if _in_cluster():
                return _extract_locally(extractor, dataset)
            return np.asarray(extractor.predict(dataset, verbose=0), dtype=np.float32)
        except tf.errors.ResourceExhaustedError:
            if batch_size == 1:
                raise
            batch_size = max(1, batch_size // 2)  # the GPU ran out of memory: the same rows in smaller batches
