"""Trains runs for tests/test_distribute.py and benchmarks/speed.py in a fresh process: TensorFlow's logical devices
must be set before it starts.

Usage: python distribute_worker.py CONFIG_JSON, CONFIG: ``data`` (a preprocessed folder), ``cpus`` (logical CPU
devices, default 2) and ``runs``, each: ``run_dir``, ``strategy``, ``out`` (an .npy for the test split's
probabilities), optionally ``batch_size`` (8), ``epochs`` (3), ``fine_tune_epochs`` (0; with it, MobileNet 0.25 from
random weights: its features are cached, then its top block fine-tuned), ``kill_at`` ([epoch, batch]: SIGKILL this process
there, as when a machine is taken away) and ``plain_loss`` (Keras' own loss, not the global-batch one). Prints one
``RESULT {json}`` line per run: the last epoch's loss, epochs, the epoch resumed from, the strategy, seconds, the process's peak memory.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time

config = json.loads(sys.argv[1])
import tensorflow as tf  # noqa: E402

tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],  # GPUs are left as they are
                                           [tf.config.LogicalDeviceConfiguration()] * int(config.get("cpus", 2)))

from xraylib import distribute, models, preprocess, runs, train  # noqa: E402
from xraylib.fileio import save_npy_atomic  # noqa: E402

data = preprocess.load_preprocessed(config["data"])
# The small CNN, streamed: its features are not frozen, so every step tests the split of the batch.
spec = models.ModelSpec(backbone="small_cnn", weights=None, image_size=data.settings.image_size,
                        classes=tuple(data.classes), dropout=0.0, head_units=16)  # dropout masks differ per replica
mobilenet = models.dataclasses_replace(spec, backbone="mobilenet", alpha=0.25)
GlobalBatchLoss, EpochCheckpoint = distribute.GlobalBatchLoss, train.EpochCheckpoint

for run in config["runs"]:
    settings = train.TrainSettings(epochs=run.get("epochs", 3), batch_size=run.get("batch_size", 8), augment=None,
                                   strategy=run["strategy"], learning_rate=1e-2, seed=3,
                                   fine_tune_epochs=run.get("fine_tune_epochs", 0), fine_tune_learning_rate=1e-3)
    distribute.GlobalBatchLoss = (lambda loss: loss) if run.get("plain_loss") else GlobalBatchLoss
    train.EpochCheckpoint = EpochCheckpoint
    if run.get("kill_at"):
        kill_epoch, kill_batch = run["kill_at"]

        class KilledMidEpoch(EpochCheckpoint):
            def on_epoch_begin(self, epoch, logs=None):
                self.epoch = epoch

            def on_train_batch_end(self, batch, logs=None):
                if self.epoch == kill_epoch and batch == kill_batch:
                    os.kill(os.getpid(), signal.SIGKILL)

        train.EpochCheckpoint = KilledMidEpoch
    started = time.perf_counter()
    result = runs.train(data, mobilenet if settings.fine_tune_epochs else spec, settings, run_dir=run["run_dir"], verbose=0)
    seconds = time.perf_counter() - started
    save_npy_atomic(run["out"], models.predict_images(distribute.local_copy(result.model), data["test"].images))
    print("RESULT", json.dumps({"loss": float(result.history["loss"].iloc[-1]), "epochs": len(result.history),
                                "resumed_from": result.resumed_from_epoch, "seconds": round(seconds, 2),
                                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                                **result.execution}), flush=True)
