"""Guidance where Colab users get lost: the CPU-only warning, the training curves' AUC panels."""
from __future__ import annotations

import matplotlib
import matplotlib.pyplot
import numpy as np
import pandas as pd

from xraylib import config, plots, train


def test_device_warning_in_colab_without_gpu_says_the_fix_first(monkeypatch):
    monkeypatch.setattr(config, "in_colab", lambda: True)
    text = train.device_warning(gpus=[])
    assert text is not None
    first = text.splitlines()[0]
    assert first.startswith("Choose a GPU: Runtime > Change runtime type > T4 GPU")
    assert "only a CPU" in text and "hours" in text
    assert len(text.splitlines()) <= 2


def test_device_warning_outside_colab_is_softer_and_none_with_a_gpu(monkeypatch):
    monkeypatch.setattr(config, "in_colab", lambda: False)
    soft = train.device_warning(gpus=[])
    assert soft is not None and "Runtime" not in soft and "CPU" in soft
    assert train.device_warning(gpus=["/physical_device:GPU:0"]) is None
    monkeypatch.setattr(config, "in_colab", lambda: True)
    assert train.device_warning(gpus=["/physical_device:GPU:0"]) is None


def _history(with_auc: bool) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = 6
    table = {"epoch": np.arange(1, n + 1), "loss": np.linspace(0.7, 0.3, n), "val_loss": 0.5 + rng.random(n) * 0.1,
             "accuracy": np.linspace(0.5, 0.9, n), "val_accuracy": np.linspace(0.5, 0.8, n)}
    if with_auc:
        table.update(auc=np.linspace(0.55, 0.95, n), val_auc=np.linspace(0.5, 0.85, n))
    return pd.DataFrame(table)


def test_training_history_draws_training_and_validation_auc():
    fig = plots.training_history(_history(with_auc=True))
    try:
        assert len(fig.axes) == 3
        auc_ax = fig.axes[2]
        assert auc_ax.get_title() == "ROC-AUC"
        labels = [line.get_label() for line in auc_ax.get_lines()]
        assert "training" in labels and "validation" in labels
        validation = next(line for line in auc_ax.get_lines() if line.get_label() == "validation")
        np.testing.assert_allclose(validation.get_ydata(), np.linspace(0.5, 0.85, 6))
        fig.savefig("/tmp/gd_training_history.png")
    finally:
        matplotlib.pyplot.close(fig)


def test_training_history_without_auc_keeps_two_panels():
    fig = plots.training_history(_history(with_auc=False))
    try:
        assert [ax.get_title() for ax in fig.axes] == ["loss", "accuracy"]
    finally:
        matplotlib.pyplot.close(fig)
