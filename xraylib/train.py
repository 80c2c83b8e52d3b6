"""Training (the model layer): class weights, checkpoints each epoch, resume, the optional fine-tuning stage.

:func:`fit` runs the seeds' recipe by default (frozen backbone, new head, Adam 1e-3, batch 8,
25 epochs) with what they lacked: class weights from the training split, a checkpoint at the
end of every epoch (on Drive in Colab), resume after a disconnect at the next epoch with the
optimizer state, the history as CSV, and an optional fine-tuning stage. It writes nothing itself:
checkpoints go through the run folder it is given. Users call :func:`xraylib.runs.train`, which
decides where to start, chooses the decision threshold and saves the model (``.keras``, ``.h5``,
``model.json``). Augmentation and batches live in :mod:`xraylib.batches`.

Speed: while the backbone is frozen, the head trains on cached backbone features
(:mod:`xraylib.features`): the backbone runs once per image instead of once per image per epoch.
Fine-tuning, the small CNN and ``feature_cache=False`` stream the images from the memory-mapped
cache through ``tf.data`` instead; memory stays flat in the number of images either way. On a
GPU with tensor cores (compute capability >= 7.0) the model computes in mixed float16
(``mixed_precision="auto"``) and Keras compiles the steps with XLA. On a CPU with bfloat16 units (AMX,
AVX512-BF16) a frozen VGG16 backbone computes in mixed bfloat16 (the head in float32; see
:func:`xraylib.models.choose_dtype_policy`); everything else on a CPU is float32.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import keras
import numpy as np
import pandas as pd

from . import config, distribute, features, models
from .batches import AugmentSettings, FeatureBatches, ImageBatches, StartEpoch, as_dataset
from .errors import ConfigError
from .preprocess import PreprocessedData


#: Where a decision threshold can be chosen (see :attr:`TrainSettings.threshold_on`).
THRESHOLD_ON = ("validation", "out_of_site")


@dataclass(frozen=True)
class TrainSettings:
    """How to train. The defaults are the seeds' recipe: Adam 1e-3, batch 8, 25 epochs, frozen base.

    ``batch_size`` is the GLOBAL batch: on several replicas (``strategy``) each step still trains on
    ``batch_size`` images, split across them (the seeds' 8 is 4 per replica on 2 GPUs, 1 per core on
    Colab's 8-core TPU), so a run gives the model one device gives (see :mod:`xraylib.distribute`).
    """

    epochs: int = 25
    #: The global batch, split across the replicas of ``strategy``.
    batch_size: int = 8
    learning_rate: float = 1e-3
    fine_tune_epochs: int = 0
    fine_tune_learning_rate: float = 1e-5
    augment: AugmentSettings | None = field(default_factory=AugmentSettings)
    class_weighting: bool = True
    seed: int = 42
    threshold_rule: str = "max_specificity_at_sensitivity"
    min_sensitivity: float = 0.95
    #: Where the threshold is chosen: "validation" (the validation split: the seeds' way) or "out_of_site" (the
    #: pooled held-out predictions of the out-of-site estimate, :mod:`xraylib.outofsite`: where unseen hospitals fall).
    threshold_on: str = "validation"
    #: Stage 1 (backbone frozen) trains the head on cached backbone features; False streams the images every epoch.
    feature_cache: bool = True
    #: With augmentation and the feature cache: views cached per training image (1: the plain image only).
    augment_views: int = 1
    #: "auto" (mixed float16 on a GPU of compute capability >= 7.0; mixed bfloat16 for a frozen backbone that is faster
    #: in it on a CPU with bfloat16 units; else float32), "on" (float16), "bfloat16" or "off" (float32).
    mixed_precision: str = "auto"
    #: XLA: "auto" (Keras' rule: on a GPU, not on a CPU), "on" or "off".
    jit_compile: str = "auto"
    #: Where training runs (:func:`xraylib.distribute.choose_strategy`): "auto" (Colab's TPU, several GPUs, else one
    #: device), "one", "mirrored", "tpu" or "multi-worker" (from TF_CONFIG). How to compute, not what: not part of a
    #: run's fingerprint, so a run resumes on another number of devices.
    strategy: str = "auto"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.fine_tune_epochs < 0:
            raise ConfigError(f"epochs and batch_size must be >= 1 and fine_tune_epochs >= 0, got {self}")
        if isinstance(self.augment_views, bool) or not isinstance(self.augment_views, int) or self.augment_views < 1:
            raise ConfigError(f"augment_views must be a whole number >= 1, got {self.augment_views!r}")
        if self.mixed_precision not in models.MIXED_PRECISION_SETTINGS:
            raise ConfigError(f"mixed_precision must be one of {models.MIXED_PRECISION_SETTINGS}, got {self.mixed_precision!r}")
        if self.jit_compile not in ("auto", "on", "off"):
            raise ConfigError(f"jit_compile must be 'auto', 'on' or 'off', got {self.jit_compile!r}")
        if self.strategy not in distribute.STRATEGIES:
            raise ConfigError(f"strategy must be one of {distribute.STRATEGIES}, got {self.strategy!r}")
        if self.threshold_on not in THRESHOLD_ON:
            raise ConfigError(f"threshold_on must be one of {THRESHOLD_ON}, got {self.threshold_on!r}")
        if self.threshold_on == "out_of_site" and self.threshold_rule != "max_specificity_at_sensitivity":
            raise ConfigError("threshold_on='out_of_site' chooses the highest threshold that keeps sensitivity >= "
                              f"min_sensitivity; it cannot use threshold_rule={self.threshold_rule!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainSettings":
        data = dict(data)
        if data.get("augment") is not None:
            data["augment"] = AugmentSettings(**data["augment"])
        return cls(**data)


#: Named recipes: the model and training settings that differ from the defaults (``spec``: :class:`ModelSpec`
#: fields, ``settings``: :class:`TrainSettings` fields). "seeds": the 2020 projects' VGG16 recipe (the defaults).
#: "recommended": MobileNet 0.25 on ImageNet weights (small, fast on a CPU, and what ``../shared`` can test), four
#: cached augmented views, no fine-tuning, and the threshold chosen on out-of-site predictions. No fine-tuning
#: because the out-of-site estimate and its threshold describe the head on the frozen backbone: a fine-tuned
#: model would be scored and thresholded by a model it no longer is. One head: an ensemble of five (``heads=5``)
#: did not narrow the spread between training seeds in the quality benchmark, so it is offered, not the default.
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "seeds": {"spec": {"backbone": "vgg16", "weights": "imagenet"}, "settings": {}},
    "recommended": {
        "spec": {"backbone": "mobilenet", "alpha": 0.25, "weights": "imagenet"},
        "settings": {"epochs": 25, "augment_views": 4, "fine_tune_epochs": 0, "threshold_on": "out_of_site"},
    },
}


def from_recipe(name: str, data: PreprocessedData, spec: dict[str, Any] | None = None,
                **settings: Any) -> tuple[models.ModelSpec, "TrainSettings"]:
    """The :class:`ModelSpec` and :class:`TrainSettings` of recipe ``name`` (see :data:`RECIPES`) for ``data``
    (its classes and image size), with ``spec`` and ``settings`` overriding single fields (e.g. ``weights`` a
    local file, ``seed``)."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    recipe = RECIPES[name]
    model_spec = models.ModelSpec(**{**recipe["spec"], **(spec or {}), "image_size": data.settings.image_size,
                                     "classes": tuple(data.classes)})
    return model_spec, TrainSettings(**{**recipe["settings"], **settings})


def device_warning(gpus: "list | None" = None) -> str | None:
    """A warning text when training would run without a GPU, else None (print it when it is not None).

    In Colab (:func:`xraylib.config.in_colab`) without a GPU: how to get one first, then why. Outside Colab
    without a GPU: a softer note. ``gpus``: the GPU list (default ``tf.config.list_physical_devices("GPU")``).
    """
    if gpus is None:
        import tensorflow as tf
        gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return None
    if config.in_colab():
        return ("Choose a GPU: Runtime > Change runtime type > T4 GPU, then run all cells again.\n"
                "This Colab runtime has only a CPU: training VGG16 or another pretrained backbone will take hours "
                "instead of minutes.")
    return ("Note: no GPU found, training runs on the CPU: the small CNN is fine, a pretrained backbone "
            "(VGG16, ...) will be slow.")


def class_weights(labels: np.ndarray, n_classes: int) -> dict[int, float]:
    """Balanced class weights ``n / (n_classes * count)`` from the training labels (absent classes get 0)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes)
    total = counts.sum()
    return {c: (float(total / (n_classes * counts[c])) if counts[c] else 0.0) for c in range(n_classes)}


# --------------------------------------------------------------------------------------------
# Checkpoints: written through the run folder training is given (xraylib.runs.RunFolder)


class RunStore(Protocol):
    """Where training reads and writes its checkpoints and history: :class:`xraylib.runs.RunFolder`."""

    root: Path

    def history_rows(self, epochs_done: int) -> list[dict]: ...

    def load_checkpoint(self, state: dict) -> keras.Model: ...

    def save_checkpoint(self, model: keras.Model, epoch: int, state: dict[str, Any], history_rows: list[dict]) -> None: ...


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
    """At each epoch's end: the history row, then the model being fit (optimizer included) and the state, saved by
    ``run.save_checkpoint`` (see :meth:`xraylib.runs.RunFolder.save_checkpoint`).

    ``kind`` "model": the full model; "head": the head-only model fit on cached features (kilobytes instead of the
    backbone's megabytes on every epoch), with ``state_extra`` (the frozen backbone's hash and dtype policy) to
    rebuild the full model from.
    """

    def __init__(self, run: RunStore, fingerprint: str, stage: int, history_rows: list[dict],
                 kind: str = "model", state_extra: dict | None = None):
        super().__init__()
        self.run, self.fingerprint, self.stage, self.history_rows = run, fingerprint, stage, history_rows
        self.kind, self.state_extra = kind, dict(state_extra or {})

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        row = {"epoch": epoch + 1, "stage": self.stage,
               "learning_rate": float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
               **{k: float(v) for k, v in (logs or {}).items() if k != "learning_rate"}}
        self.history_rows[:] = [r for r in self.history_rows if r["epoch"] < epoch + 1] + [row]
        self.run.save_checkpoint(self.model, epoch + 1, {"stage": self.stage, "fingerprint": self.fingerprint,
                                                         "kind": self.kind, **self.state_extra}, self.history_rows)


# --------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainResult:
    """What a training run gives: the model, its history, its run folder (:class:`xraylib.runs.RunFolder`) and
    the decision threshold chosen on the validation split (``None`` until the run layer has chosen it)."""

    model: keras.Model
    history: pd.DataFrame
    paths: RunStore
    class_weights: dict[int, float]
    threshold: float | None = None
    resumed_from_epoch: int = 0
    seconds: float = 0.0
    #: How this call computed: dtype policy, and for stage 1 on cached features the cache's folder, key and
    #: rows computed or reused (see :meth:`xraylib.features.CachedFeatures.summary`).
    execution: dict[str, Any] = field(default_factory=dict)
    #: ``(N_val, C)`` validation probabilities where training already computed them (from cached features), else None.
    val_probabilities: np.ndarray | None = None


def _jit(setting: str) -> bool | str:
    return {"auto": "auto", "on": True, "off": False}[setting]


def compile_model(model: keras.Model, learning_rate: float, jit_compile: str = "auto",
                  optimizer: keras.optimizers.Optimizer | None = None, stacked_heads: int = 1) -> None:
    """Adam at ``learning_rate`` (or ``optimizer``, shared with another model), categorical cross-entropy,
    accuracy and ROC-AUC. ``jit_compile``: "auto" (XLA on a GPU), "on", "off". ``stacked_heads`` K > 1: the
    model outputs K heads' probabilities side by side (:func:`xraylib.features.head_model` with ``stacked``):
    each head's cross-entropy, averaged, and the metrics of their mean. Under a strategy of several replicas (call it
    inside its ``scope()``) the loss is averaged over the global batch (:class:`xraylib.distribute.GlobalBatchLoss`)."""
    import tensorflow as tf

    if stacked_heads > 1:
        loss, metrics = models.EnsembleLoss(stacked_heads), [models.EnsembleAccuracy(stacked_heads),
                                                             models.EnsembleAUC(stacked_heads)]
    else:
        loss, metrics = "categorical_crossentropy", ["accuracy", keras.metrics.AUC(name="auc")]
    if distribute.replicas(tf.distribute.get_strategy()) > 1:
        loss = distribute.GlobalBatchLoss(loss)
    model.compile(optimizer=optimizer or keras.optimizers.Adam(learning_rate), loss=loss, metrics=metrics,
                  jit_compile=_jit(jit_compile))


def uses_feature_cache(model: keras.Model, settings: TrainSettings) -> bool:
    """Whether this stage trains on cached features: the setting is on and only the head is trainable."""
    return settings.feature_cache and features.can_cache(model)


def check_inputs(data: PreprocessedData, spec: models.ModelSpec, settings: TrainSettings) -> None:
    """Refuse, before anything runs, what cannot train: other classes or image size than the data's, fine-tuning a
    model without a pretrained top block, an empty train or validation split."""
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
    if spec.heads > 1 and (spec.backbone == "small_cnn" or settings.fine_tune_epochs or not settings.feature_cache):
        raise ConfigError(f"heads={spec.heads}: an ensemble of heads is trained on the frozen backbone's cached features, "
                          "each head on its own; it needs a pretrained backbone, fine_tune_epochs=0 and feature_cache=True "
                          "(to fine-tune, set heads=1: --heads 1, HEADS = 1)")


def fit(
    data: PreprocessedData,
    spec: models.ModelSpec,
    settings: TrainSettings,
    run: RunStore,
    state: dict | None = None,
    fingerprint: str = "",
    verbose: int | str = "auto",
    strategy: Any = None,
) -> TrainResult:
    """Train ``spec`` on ``data``'s train split, validating on its val split, from ``state`` (the last checkpoint's,
    or None to start), checkpointing every epoch into ``run`` (a :class:`xraylib.runs.RunFolder`).

    Stage 1 trains the head over the frozen backbone for ``settings.epochs``: on cached backbone
    features (``feature_cache``, the default; see :mod:`xraylib.features`) or on images streamed
    every epoch. Stage 2 (if ``fine_tune_epochs``) unfreezes the backbone's top block at
    ``fine_tune_learning_rate`` and streams the images. Checkpoints are the full model
    (input -> backbone -> head) on either path. Users call :func:`xraylib.runs.train`, which
    decides where to start, then chooses the threshold and saves the model.

    Everything runs under ``strategy``'s scope (default: :func:`xraylib.distribute.choose_strategy` of
    ``settings.strategy``), each batch of ``settings.batch_size`` split across its replicas.
    """
    check_inputs(data, spec, settings)
    strategy = strategy if strategy is not None else distribute.choose_strategy(settings.strategy)
    with strategy.scope():
        return _fit(data, spec, settings, run, state, fingerprint, verbose, strategy)


def _fit(data: PreprocessedData, spec: models.ModelSpec, settings: TrainSettings, run: RunStore, state: dict | None,
         fingerprint: str, verbose: int | str, strategy: Any) -> TrainResult:
    keras.utils.set_random_seed(settings.seed)
    weights = class_weights(data["train"].labels, len(data.classes)) if settings.class_weighting else None
    total = settings.epochs + settings.fine_tune_epochs
    done = int(state["epochs_done"]) if state else 0
    history_rows = run.history_rows(done) if state else []
    started = time.time()

    if state and state.get("kind", "model") == "head":
        model = model_from_head_checkpoint(run.load_checkpoint(state), state, spec, settings, where=str(run.root))
    elif state:
        # A checkpoint keeps the precision it was trained in (its layers' dtype policies are saved with it).
        model = run.load_checkpoint(state)
        if distribute.replicas(strategy) > 1:  # its own optimizer (and state), the loss over the global batch
            compile_model(model, settings.learning_rate, settings.jit_compile, optimizer=model.optimizer)
    else:
        policy = models.choose_dtype_policy(settings.mixed_precision, backbone=spec.backbone,
                                            frozen=settings.fine_tune_epochs == 0)
        model = models.build_model(spec, dtype_policy=policy)
        compile_model(model, settings.learning_rate, settings.jit_compile)
    execution: dict[str, Any] = {"dtype_policy": models.model_dtype_policy(model), **distribute.describe(strategy)}
    # Every worker of a cluster, also one whose checkpoint is at the end: skipping it there left the others alone in
    # its all-reduce (a worker killed between the last epoch's saves: a gRPC error or a hang instead of this message).
    distribute.check_same_epoch(strategy, done, str(run.root))

    distribute.check_batch(settings.batch_size, len(data["train"]), strategy)
    val_batch_size = distribute.validation_batch(settings.batch_size, len(data["val"]), strategy)
    val_batches = ImageBatches(data["val"], val_batch_size)
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
                model, data, spec, settings, stage, done, end_epoch, weights, (run, fingerprint, history_rows),
                verbose)
            execution[f"stage_{stage}_input"] = "cached features"
        else:
            checkpoint = EpochCheckpoint(run, fingerprint, stage, history_rows)
            train_batches = ImageBatches(data["train"], settings.batch_size, shuffle=True, augment=settings.augment,
                                         seed=settings.seed, start_epoch=done)
            # ImageBatches shuffles from (seed, epoch); the dataset keeps its order (no Keras shuffle), so a resumed
            # epoch sees the batches it saw before.
            distribute.prepare(model, val_batches[0])
            model.fit(as_dataset(train_batches), validation_data=as_dataset(val_batches), epochs=end_epoch,
                      initial_epoch=done, class_weight=weights, verbose=verbose, shuffle=False,
                      callbacks=[StartEpoch(train_batches), ReseedDropout(settings.seed), checkpoint])
            val_probabilities = None
            execution[f"stage_{stage}_input"] = "streamed images"
        done = end_epoch

    return TrainResult(model, pd.DataFrame(history_rows), run, weights or {}, None,
                       int(state["epochs_done"]) if state else 0, time.time() - started, execution, val_probabilities)


def _fit_head_on_features(model: keras.Model, data: PreprocessedData, spec: models.ModelSpec, settings: TrainSettings,
                          stage: int, done: int, end_epoch: int, weights: dict[int, float] | None,
                          run: tuple[RunStore, str, list[dict]], verbose: int | str) -> tuple[np.ndarray, dict[str, Any]]:
    """Stage 1 on cached features: the head-only model (the full model's own head layers) fits on the cache with the
    full model's optimizer, so the full model ends up trained and holds the optimizer state. Checkpoints are the
    head-only model (see :class:`EpochCheckpoint`). Returns the validation probabilities (from the cached features)
    and the cache's summary."""
    cache = features.cached_features(model, data, spec, views=settings.augment_views, augment=settings.augment,
                                     progress=verbose != 0)
    heads = models.head_count(model)
    head = features.head_model(model, stacked=heads > 1)
    compile_model(head, settings.learning_rate, settings.jit_compile, optimizer=model.optimizer, stacked_heads=heads)
    folder, print_fingerprint, history_rows = run
    description = json.loads((cache.folder / "features.json").read_text())
    checkpoint = EpochCheckpoint(folder, print_fingerprint, stage, history_rows, kind="head",
                                 state_extra={"backbone_weights_sha1": description["backbone_weights_sha1"],
                                              "dtype_policy": description["compute_dtype"]})
    n_classes = len(data.classes)
    train_batches = FeatureBatches(cache.train_views, data["train"].labels, n_classes, settings.batch_size,
                                   shuffle=True, seed=settings.seed, start_epoch=done)
    import tensorflow as tf

    val_batch_size = distribute.validation_batch(settings.batch_size, len(data["val"]), tf.distribute.get_strategy())
    val_batches = FeatureBatches([cache.val], data["val"].labels, n_classes, val_batch_size)
    distribute.prepare(head, val_batches[0])
    head.fit(as_dataset(train_batches), validation_data=as_dataset(val_batches), epochs=end_epoch, initial_epoch=done,
             class_weight=weights, verbose=verbose, shuffle=False, callbacks=[StartEpoch(train_batches), ReseedDropout(settings.seed), checkpoint])
    probabilities = np.asarray(features.head_model(model).predict(np.asarray(cache.val), batch_size=256, verbose=0),
                               dtype=np.float32)
    return probabilities, cache.summary()


def model_from_head_checkpoint(saved: keras.Model, state: dict, spec: models.ModelSpec, settings: TrainSettings,
                               where: str = "the run") -> keras.Model:
    """The full model of a run checkpointed on cached features: the backbone built again (and checked against the
    hash the checkpoint's ``state`` recorded), the head's weights and the optimizer's state from ``saved`` (the
    head-only checkpoint). ``where`` names the run in errors."""
    keras.utils.set_random_seed(settings.seed)  # as at the run's start: a randomly initialised backbone comes back the same
    model = models.build_model(spec, dtype_policy=state.get("dtype_policy", "float32"))
    compile_model(model, settings.learning_rate, settings.jit_compile)
    if features.backbone_sha1(model) != state.get("backbone_weights_sha1"):
        raise ConfigError(
            f"{where}: the backbone built now ({spec.backbone}, weights={spec.weights}) has other weights than the "
            "one this run started with (was the weights file replaced?); restore them, or pass resume=False "
            "(--no-resume) to start the run over")
    for layer in saved.layers:
        if models.is_head_layer(layer.name) and layer.weights:
            model.get_layer(layer.name).set_weights(layer.get_weights())
    # The optimizer's slots follow the trainable variables in order: the head's, in the same order in both models.
    model.optimizer.build(model.trainable_variables)
    if len(model.optimizer.variables) != len(saved.optimizer.variables):
        raise ConfigError(f"{where}/checkpoints/{state['checkpoint']}: its optimizer state does not fit this model; "
                          "pass resume=False (--no-resume) to start the run over")
    for target, value in zip(model.optimizer.variables, saved.optimizer.variables):
        target.assign(value)
    return model
