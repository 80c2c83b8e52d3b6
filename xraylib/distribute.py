"""Distribution strategies: one device, several GPUs, Colab's TPU, several machines (TensorFlow's ``tf.distribute``).

:func:`choose_strategy` turns a name (``TrainSettings.strategy``, ``--strategy``, ``STRATEGY`` in notebook 03)
into a ``tf.distribute.Strategy``; :func:`xraylib.train.fit` builds, compiles and trains the model under its
``scope()`` (feature extraction, the head on cached features, streamed training and fine-tuning alike):

- ``"auto"`` (default): ``TPUStrategy`` on a TPU runtime (Colab's), ``MirroredStrategy`` when more than one GPU is
  visible, else TensorFlow's default strategy (one device: what xraylib always did);
- ``"one"``: the default strategy, whatever the machine holds;
- ``"mirrored"``: ``MirroredStrategy`` over the visible GPUs, or over the logical CPU devices where there are
  several and no GPUs (how the tests run it); refused on a single device;
- ``"tpu"``: ``TPUStrategy``, refused where no TPU answers;
- ``"multi-worker"``: ``MultiWorkerMirroredStrategy`` over the machines listed in ``TF_CONFIG`` (README: "Strategies").

The batch: ``TrainSettings.batch_size`` is the GLOBAL batch. ``tf.distribute`` splits each batch across the
replicas (the seeds' 8 becomes 4 + 4 on two replicas), and :class:`GlobalBatchLoss` divides the summed loss by
the whole batch's size, so a step is the step one device takes, also for a last batch that does not split evenly.
Dropout is the exception: each replica draws its own masks, so a model with dropout trains equivalently, not
identically, on another number of devices.
"""
from __future__ import annotations

import functools
import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import keras

from .errors import ConfigError

STRATEGIES = ("auto", "one", "mirrored", "tpu", "multi-worker")

#: Environment variables that say a TPU is attached (the old Colab TPU node, a named TPU, a TPU VM).
_TPU_HINTS = ("COLAB_TPU_ADDR", "TPU_NAME", "TPU_ACCELERATOR_TYPE")

_TF_CONFIG_EXAMPLE = ('TF_CONFIG=\'{"cluster": {"worker": ["machine1:12345", "machine2:12345"]}, '
                      '"task": {"type": "worker", "index": 0}}\' (index 1 on the second machine)')


def choose_strategy(name: str = "auto", environ: Mapping[str, str] | None = None):
    """The ``tf.distribute.Strategy`` named ``name`` (one of :data:`STRATEGIES`; see the module's text).

    ``environ`` (default ``os.environ``) is where ``TF_CONFIG`` is checked and the TPU's variables are looked for
    (TensorFlow itself reads ``TF_CONFIG`` from ``os.environ``).
    Raises :class:`ConfigError` saying what is missing when the strategy cannot run here.
    """
    import tensorflow as tf

    environ = os.environ if environ is None else environ
    if name not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {STRATEGIES}, got {name!r}")
    if name == "multi-worker":
        return _multi_worker(_check_tf_config(environ.get("TF_CONFIG")))
    if name == "tpu" or (name == "auto" and on_tpu_runtime(environ)):
        try:
            return _tpu()
        except ConfigError as exc:
            if name == "tpu":
                raise
            # Not silently: on a TPU runtime the fallback trains on its CPU, many times slower than the TPU.
            warnings.warn(f"strategy 'auto': this looks like a TPU runtime, but {exc}; training on this machine's "
                          "other devices instead", RuntimeWarning, stacklevel=2)
    gpus = [device.name for device in tf.config.list_logical_devices("GPU")]
    if name == "mirrored" or (name == "auto" and len(gpus) > 1):
        return _mirrored(tuple(gpus))
    return tf.distribute.get_strategy()


def on_tpu_runtime(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this looks like a TPU runtime: a TPU's environment variable is set or a TPU device file exists."""
    environ = os.environ if environ is None else environ
    return any(environ.get(hint) for hint in _TPU_HINTS) or Path("/dev/accel0").exists()


# One per process and device list: two strategies in one process number their collective operations apart, and
# a second one's all-reduces met the first one's (a shape mismatch) in a test that trained twice.
@functools.lru_cache(maxsize=None)
def _mirrored(gpus: tuple[str, ...]):
    import tensorflow as tf

    devices = list(gpus) or [device.name for device in tf.config.list_logical_devices("CPU")]
    if len(devices) < 2:
        raise ConfigError(
            f"strategy 'mirrored' needs several devices, but this machine shows {'one GPU' if gpus else 'no GPU and one CPU device'}; "
            "use strategy 'one' or 'auto' here (a CPU can be split into logical devices with "
            "tf.config.set_logical_device_configuration before TensorFlow starts: that is how the tests run it)")
    return tf.distribute.MirroredStrategy(devices)


# One per process: TensorFlow connects to a TPU, or starts its collective ops between machines, once.
@functools.lru_cache(maxsize=None)
def _tpu():
    import tensorflow as tf

    problems = []
    for tpu in ("", "local"):  # "": Colab's TPU (COLAB_TPU_ADDR) or TPU_NAME; "local": a TPU VM
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
            if tpu != "local":
                tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
            return tf.distribute.TPUStrategy(resolver)
        except (ValueError, RuntimeError, tf.errors.OpError) as exc:
            problems.append(f"{tpu or 'default'}: {str(exc).split('.')[0] or type(exc).__name__}")
    raise ConfigError("strategy 'tpu': no TPU answered (" + "; ".join(problems) + "); in Colab choose "
                      "Runtime > Change runtime type > TPU, or use strategy 'auto'")


@functools.lru_cache(maxsize=None)
def _multi_worker(tf_config: str):
    import tensorflow as tf

    # TensorFlow reads TF_CONFIG itself; tf_config (checked) keys the cache, so one process starts one cluster.
    return tf.distribute.MultiWorkerMirroredStrategy()


def _check_tf_config(raw: str | None) -> str:
    """``raw`` (the ``TF_CONFIG`` text) when it names a cluster of workers and this process's task in it."""
    if not raw:
        raise ConfigError("strategy 'multi-worker' reads the machines from the TF_CONFIG environment variable, which "
                          f"is not set; set it on every machine before starting, e.g. {_TF_CONFIG_EXAMPLE}")
    try:
        parsed = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"TF_CONFIG is not valid JSON ({exc}); e.g. {_TF_CONFIG_EXAMPLE}") from None
    cluster = parsed.get("cluster") if isinstance(parsed, dict) else None
    task = parsed.get("task") if isinstance(parsed, dict) else None
    if not isinstance(cluster, dict) or not cluster or not all(isinstance(v, list) and v for v in cluster.values()):
        raise ConfigError(f"TF_CONFIG needs a 'cluster' mapping each task type to its 'host:port' list; e.g. {_TF_CONFIG_EXAMPLE}")
    if (not isinstance(task, dict) or task.get("type") not in cluster or not isinstance(task.get("index"), int)
            or not 0 <= task["index"] < len(cluster[task["type"]])):
        raise ConfigError(f"TF_CONFIG's 'task' must name this machine's type (one of {sorted(cluster)}) and its index "
                          f"in that list, got {task!r}; e.g. {_TF_CONFIG_EXAMPLE}")
    return raw


def replicas(strategy) -> int:
    """How many replicas share each batch."""
    return int(strategy.num_replicas_in_sync)


def worker(strategy) -> tuple[str, int] | None:
    """This process's ``(task type, index)`` in a multi-worker cluster, else None (one machine)."""
    import tensorflow as tf

    # Only MultiWorkerMirroredStrategy's processes are workers of a cluster: a TPUStrategy has a cluster resolver too,
    # whose task is ("worker", 0) for a TPU reached by address (Colab's COLAB_TPU_ADDR), but one process drives it.
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return None
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None) or not resolver.cluster_spec().as_dict():
        return None
    return str(resolver.task_type), int(resolver.task_id or 0)


def is_chief(strategy) -> bool:
    """Whether this process writes the run's files: the only one on one machine; in a cluster, the "chief"
    task, or worker 0 where there is none."""
    task = worker(strategy)
    if task is None:
        return True
    has_chief = "chief" in strategy.cluster_resolver.cluster_spec().as_dict()
    return task[0] == "chief" or (not has_chief and task == ("worker", 0))


def describe(strategy) -> dict[str, Any]:
    """For ``model.json``'s execution record: the strategy's class, the replicas and, in a cluster, this task."""
    out: dict[str, Any] = {"strategy": type(strategy).__name__, "replicas": replicas(strategy)}
    task = worker(strategy)
    if task is not None:
        out["task"] = f"{task[0]} {task[1]}"
    return out


def check_batch(batch_size: int, n_train: int, strategy) -> None:
    """Refuse a global batch whose last batch would leave a replica on a CPU device without any image: TensorFlow's
    CPU kernels (oneDNN) fail on an empty part. An uneven last batch is fine: :class:`GlobalBatchLoss` counts it."""
    n_replicas = replicas(strategy)
    if n_replicas > 1 and _on_cpus(strategy) and 0 < n_train % batch_size < n_replicas:
        raise ConfigError(f"the last batch of {n_train} training images in batches of {batch_size} holds "
                          f"{n_train % batch_size}, fewer than the {n_replicas} CPU replicas; choose another batch_size")


def validation_batch(batch_size: int, n_rows: int, strategy) -> int:
    """A batch size for validating ``n_rows`` rows: ``batch_size``, or under a strategy over CPU devices the largest
    one whose last batch leaves no replica empty (see :func:`check_batch`; validation's batch does not change the
    weights)."""
    n_replicas = replicas(strategy)
    if n_replicas < 2 or not _on_cpus(strategy):
        return batch_size
    for size in range(min(batch_size, n_rows), n_replicas - 1, -1):
        if n_rows % size == 0 or n_rows % size >= n_replicas:
            return size
    raise ConfigError(f"the validation split's {n_rows} images cannot be shared by {n_replicas} CPU replicas "
                      "(one would get none); use strategy 'one'")


def prepare(model: keras.Model, batch: tuple) -> None:
    """Before ``fit`` under a strategy of several replicas (inside its scope): build the compiled model's loss,
    metrics and optimizer on one local ``batch`` ``(x, y)``, and let ``fit`` take the strategy from the scope.

    Keras 3 otherwise builds them from the first distributed batch averaged over the replicas, which fails under
    MultiWorkerMirroredStrategy (keras-team/keras#20585: "Attempt to convert a value (PerReplica...)") and on a
    batch split unevenly. Built here in the strategy's scope, the variables are the strategy's all the same.
    """
    import tensorflow as tf

    if not tf.distribute.has_strategy():
        return
    x, y = batch
    model._symbolic_build(data_batch=(x, y, None))
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model._distribute_strategy = None  # Keras' trainer then uses tf.distribute.get_strategy(): this scope's
    if worker(tf.distribute.get_strategy()) is not None and not hasattr(model, "_xraylib_metrics"):
        # Keras averages each step's logs over the workers along axis 0, which a scalar lacks (the same bug): give it
        # each log as a vector of one.
        model._xraylib_metrics = model.compute_metrics

        def compute_metrics(*args, **kwargs):
            return {name: tf.reshape(value, [1]) for name, value in model._xraylib_metrics(*args, **kwargs).items()}

        model.compute_metrics = compute_metrics


def _on_cpus(strategy) -> bool:
    return any("CPU" in device.upper() for device in strategy.extended.worker_devices)


def check_same_epoch(strategy, epochs_done: int, where: str) -> None:
    """In a cluster, refuse to train when the workers' checkpoints stop at different epochs (a kill between two
    workers' saves): each would resume elsewhere and the steps would not pair up. Every worker calls this."""
    if worker(strategy) is None:
        return
    import tensorflow as tf

    def values() -> tuple:
        value = tf.constant(float(epochs_done))
        return value, value * value

    total, squares = (float(strategy.reduce("SUM", v, axis=None)) for v in strategy.run(values))
    n = replicas(strategy)
    # Sum and sum of squares both n times this worker's value: every replica's value is the same (no spread).
    if total != n * epochs_done or squares != n * epochs_done ** 2:
        raise ConfigError(f"{where}: this worker's checkpoint is at epoch {epochs_done}, another worker's is elsewhere "
                          "(a worker was stopped while saving); copy the chief's run folder to every worker, or "
                          "start over (--no-resume)")


def local_copy(model: keras.Model) -> keras.Model:
    """``model`` with the same weights, its variables made outside any strategy (call it outside the scope): a
    cluster's chief predicts with it alone (the distributed model's predictions would wait for every worker)."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


# --------------------------------------------------------------------------------------------
# The loss over the global batch


@keras.saving.register_keras_serializable(package="xraylib")
class GlobalBatchLoss(keras.losses.Loss):
    """``inner``'s per-example losses (weighted), summed and divided by the number of examples in the global batch.

    On one device that is ``inner``'s usual mean. Under a strategy each replica holds part of a batch; Keras
    divides each replica's mean by the number of replicas, which is the global mean only when the batch splits
    evenly (8 = 4 + 4, but a last batch of 5 = 3 + 2 is not). This loss counts the examples of all replicas
    (an all-reduce of the counts), so every step is the one-device step.
    """

    def __init__(self, inner: Any = "categorical_crossentropy", name: str | None = None, **kwargs: Any):
        kwargs.pop("reduction", None)
        inner_loss = keras.losses.get(inner) if isinstance(inner, (str, dict)) else inner
        super().__init__(name=name or f"global_{getattr(inner_loss, 'name', getattr(inner_loss, '__name__', 'loss'))}",
                         reduction="sum", **kwargs)
        self.inner = inner_loss

    def call(self, y_true, y_pred):
        if isinstance(self.inner, keras.losses.Loss):
            return self.inner.call(y_true, y_pred)
        return self.inner(y_true, y_pred)

    def __call__(self, y_true, y_pred, sample_weight=None):
        import tensorflow as tf

        # Reduction "sum": the weighted sum over this replica's examples, which Keras leaves unscaled (it divides
        # only its mean reductions by the replicas); the replicas' gradients are summed, so each divides by all.
        total = super().__call__(y_true, y_pred, sample_weight)
        n_replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if n_replicas == 1 or tf.distribute.in_cross_replica_context():
            return tf.math.divide_no_nan(total, tf.cast(tf.shape(y_true)[0], total.dtype))
        count = tf.cast(tf.shape(y_true)[0], total.dtype)
        everyone = tf.distribute.get_replica_context().all_reduce("sum", count)
        # The value Keras reports is its own (this replica's mean over the replicas: it weighs it by this replica's
        # examples, so the epoch's mean comes out right); the gradient is the global batch's.
        reported = tf.math.divide_no_nan(total, count * n_replicas)
        loss = tf.math.divide_no_nan(total, everyone)
        return loss + tf.stop_gradient(reported - loss)

    def get_config(self) -> dict[str, Any]:
        config = {k: v for k, v in super().get_config().items() if k != "reduction"}
        return {**config, "inner": keras.losses.serialize(self.inner)}
