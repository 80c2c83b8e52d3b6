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


# ---------------------------------------------------------------------------------------------
# True labels, Grad-CAM titles, the most confident mistakes

from xraylib import evaluate  # noqa: E402

CLASSES = ("normal", "covid")


def _predictions(probs, labels) -> pd.DataFrame:
    probs = np.asarray(probs, dtype=float)
    return pd.DataFrame({"path": [f"/data/img_{i}.png" for i in range(len(probs))], "label": labels,
                         "patient_id": [f"p{i}" for i in range(len(probs))], "source": "s",
                         "prob_covid": probs, "prob_normal": 1 - probs})


def test_true_labels_come_from_the_manifest_and_unknown_paths_are_none(tmp_path):
    frame = pd.DataFrame({"path": [str(tmp_path / "a.png"), str(tmp_path / "b.png")], "label": ["covid", "normal"]})
    found = evaluate.true_labels([tmp_path / "b.png", str(tmp_path / "sub" / ".." / "a.png"), tmp_path / "mine.png"],
                                 frame)
    assert found == ["normal", "covid", None]


def test_gradcam_grid_titles_show_the_true_label_or_unknown_and_one_colour_bar():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 32), dtype=np.uint8)
    heatmaps = rng.random((3, 32, 32))
    predictions = _predictions([0.9, 0.2, 0.7], ["covid", "covid", "normal"]).assign(
        decision=["covid", "normal", "covid"])
    fig = plots.gradcam_grid(images, heatmaps, predictions=predictions, positive_class="covid",
                             true_labels=["covid", "normal", None], ncols=3)
    try:
        titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
        assert titles[0] == "img_0.png\ncovid, P(covid)=0.90\ntrue: covid"
        assert titles[1].endswith("normal, P(covid)=0.20\ntrue: normal")
        assert titles[2].endswith("true: unknown")
        colorbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
        assert len(colorbars) == 1 and "heat" in colorbars[0].get_ylabel()
        fig.savefig("/tmp/gd_gradcam_grid.png")
    finally:
        matplotlib.pyplot.close(fig)


def test_top_losses_puts_the_most_confident_mistakes_first():
    # covid=positive. Mistakes at 0.5: row 1 (covid, P=0.05: loss 3.0), row 3 (normal, P=0.8: loss 1.6),
    # row 4 (covid, P=0.4: loss 0.9). Rows 0, 2 are right.
    predictions = _predictions([0.9, 0.05, 0.1, 0.8, 0.4], ["covid", "covid", "normal", "normal", "covid"])
    top = evaluate.top_losses(predictions, CLASSES, threshold=0.5, k=2)
    assert list(top["position"]) == [1, 3]
    assert list(top["predicted"]) == ["normal", "covid"] and top["mistake"].all()
    np.testing.assert_allclose(top["loss"], [-np.log(0.05), -np.log(0.2)])
    everything = evaluate.top_losses(predictions, CLASSES, threshold=0.5, k=5, mistakes_only=False)
    assert list(everything["position"]) == [1, 3, 4, 0, 2]  # mistakes first, then the right ones by loss
    # At threshold 0.3 row 4 is called covid: right, so no longer a mistake.
    assert list(evaluate.top_losses(predictions, CLASSES, threshold=0.3, k=9)["position"]) == [1, 3]


def test_top_mistakes_gallery_has_k_panels_with_the_titles_and_says_when_there_is_none(capsys):
    rng = np.random.default_rng(1)
    predictions = _predictions([0.9, 0.05, 0.1, 0.8, 0.4], ["covid", "covid", "normal", "normal", "covid"])
    images = rng.integers(0, 256, (5, 32, 32), dtype=np.uint8)
    fig = plots.top_mistakes(images, predictions, CLASSES, threshold=0.5, k=2)
    try:
        titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
        assert len(titles) == 2
        assert titles[0] == "img_1.png\ntrue: covid | pred: normal\nP(covid)=0.05, loss 3.00"
        assert titles[1].startswith("img_3.png\ntrue: normal | pred: covid")
        np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), images[1])
        assert "2 shown; 3 mistake(s) among 5 images" in fig._suptitle.get_text()
        fig.savefig("/tmp/gd_top_mistakes.png")
    finally:
        matplotlib.pyplot.close(fig)
    # With Grad-CAM overlays: the same panels and a colour bar.
    fig = plots.top_mistakes(images, predictions, CLASSES, threshold=0.5, k=3,
                             explain_with=lambda x: np.random.default_rng(2).random(x.shape))
    try:
        assert len([ax for ax in fig.axes if ax.get_title()]) == 3
        assert any(ax.get_label() == "<colorbar>" for ax in fig.axes)
        fig.savefig("/tmp/gd_top_mistakes_gradcam.png")
    finally:
        matplotlib.pyplot.close(fig)
    right = _predictions([0.9, 0.1], ["covid", "normal"])
    capsys.readouterr()
    assert plots.top_mistakes(images[:2], right, CLASSES, threshold=0.5) is None
    assert "No mistakes at threshold 0.500 among 2 images" in capsys.readouterr().out
