"""Figures the notebooks show. Each function takes data and returns a matplotlib Figure."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence


import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
import seaborn as sns
from sklearn import metrics as skm  # as a module: the figures below are named roc_curve, confusion_matrix, ...

from .errors import BadFileError
from .evaluate import METRIC_LABELS, binary_metrics, binary_targets, top_losses
from .images import read_image

if TYPE_CHECKING:
    import os
    from pathlib import Path


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str] | None = None, ncols: int = 4,
               size: float = 2.6) -> Figure:
    """Show ``(H, W)`` uint8 images in a grid, gray colour map, one optional title each."""
    n = max(1, len(images))
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, image in enumerate(images):
        ax = axes.flat[i]
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    return fig


def example_images(manifest: pd.DataFrame, per_group: int = 3, seed: int = 0, ncols: int = 6) -> Figure:
    """A few images of every (source, label) group of a manifest, read from their files."""
    rng = np.random.default_rng(seed)
    images, titles = [], []
    for (source, label), group in manifest.groupby(["source", "label"], sort=True):
        picks = group.iloc[rng.permutation(len(group))[:per_group]]
        for row in picks.itertuples():
            try:
                images.append(read_image(row.path))
            except BadFileError:
                continue
            titles.append(f"{source} / {label}\n{row.view if isinstance(row.view, str) else 'view not recorded'}")
    return image_grid(images, titles, ncols=ncols)


def split_counts(summary: pd.DataFrame, value: str = "patients") -> Figure:
    """Bar chart of patients (or images) per split and label, from :func:`xraylib.split.split_summary`."""
    table = summary.pivot(index="split", columns="label", values=value).fillna(0)
    table = table.reindex([s for s in ("train", "val", "test") if s in table.index])
    fig, ax = plt.subplots(figsize=(5, 3))
    table.plot.bar(ax=ax, rot=0)
    ax.set_ylabel(value)
    ax.set_title(f"{value} per split and label")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Evaluation figures: data from xraylib.evaluate (confusion_table, binary_targets, breakdown).


def confusion_matrix(cm: pd.DataFrame, title: str = "Confusion matrix") -> Figure:
    """Heatmap of a confusion matrix (rows true, columns predicted, as :func:`xraylib.evaluate.confusion_table`
    gives it), each cell annotated with its count and its share of the true class's row."""
    counts = cm.to_numpy().astype(int)
    row_totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, row_totals, out=np.zeros(counts.shape), where=row_totals > 0)
    annotations = np.array([[f"{c}\n{s:.0%}" for c, s in zip(crow, srow)] for crow, srow in zip(counts, shares)])
    side = 1.3 + 1.1 * max(len(cm.columns), 2)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    sns.heatmap(shares, annot=annotations, fmt="", cmap="Blues", vmin=0, vmax=1, cbar=True, square=True,
                linewidths=0.5, linecolor="white", annot_kws={"fontsize": 11}, ax=ax,
                xticklabels=[str(c) for c in cm.columns], yticklabels=[str(i) for i in cm.index],
                cbar_kws={"label": "share of true class", "shrink": 0.8})
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.tick_params(axis="y", rotation=0)
    ax.set_title(f"{title}\n(n = {counts.sum()} images)", fontsize=11)
    fig.tight_layout()
    return fig


def roc_curve(y_true: np.ndarray, y_score: np.ndarray, auc_ci: tuple[float, float] | None = None,
              threshold: float | None = None, title: str = "ROC curve") -> Figure:
    """ROC curve of ``y_true`` (N,) 0/1 against ``y_score`` (N,), with the AUC (and its CI, if given)
    in the legend and the operating point at ``threshold`` marked (positive when score >= threshold)."""
    y_true = np.asarray(y_true)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
    if len(np.unique(y_true)) < 2:
        ax.text(0.5, 0.5, "ROC undefined:\nonly one class in y_true", ha="center", va="center")
    else:
        fpr, tpr, _ = skm.roc_curve(y_true, y_score)
        auc = skm.roc_auc_score(y_true, y_score)
        label = f"AUC {auc:.3f}"
        if auc_ci is not None and all(np.isfinite(auc_ci)):
            label += f" (95% CI {auc_ci[0]:.3f}–{auc_ci[1]:.3f})"
        ax.plot(fpr, tpr, color="C0", linewidth=2, label=label)
        if threshold is not None:
            point = binary_metrics(y_true, y_score, threshold)
            ax.plot(1 - point["specificity"], point["sensitivity"], "o", color="C3", markersize=8,
                    label=f"threshold {threshold:.3g}: sens {point['sensitivity']:.2f}, spec {point['specificity']:.2f}")
        ax.set_title(f"{title}\n({int(y_true.sum())} positive / {int((y_true == 0).sum())} negative images)", fontsize=11)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def precision_recall_curve(y_true: np.ndarray, y_score: np.ndarray, title: str = "Precision-recall curve") -> Figure:
    """Precision (PPV) against recall (sensitivity), with the average precision and the prevalence
    (what a classifier without skill gets) for reference."""
    y_true = np.asarray(y_true)
    fig, ax = plt.subplots(figsize=(5, 5))
    if y_true.sum() == 0:
        ax.text(0.5, 0.5, "precision-recall undefined:\nno positives in y_true", ha="center", va="center")
    else:
        precision, recall, _ = skm.precision_recall_curve(y_true, y_score)
        average_precision = skm.average_precision_score(y_true, y_score)
        prevalence = float(np.mean(y_true))
        ax.step(recall, precision, where="post", color="C0", linewidth=2, label=f"average precision {average_precision:.3f}")
        ax.axhline(prevalence, linestyle="--", color="0.6", linewidth=1, label=f"prevalence {prevalence:.3f} (no skill)")
        ax.set_title(f"{title}\n({int(y_true.sum())} positive / {int((y_true == 0).sum())} negative images)", fontsize=11)
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision (PPV)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig


def training_history(history: pd.DataFrame, title: str = "Training history") -> Figure:
    """Loss, accuracy and ROC-AUC per epoch, training vs validation, from a table with columns ``epoch``,
    ``loss``, ``val_loss``, ``accuracy``, ``val_accuracy``, ``auc``, ``val_auc`` (any may be absent: the AUC
    panel is left out when neither AUC column is there). The epoch with the lowest validation loss is marked."""
    epochs = history["epoch"].to_numpy() if "epoch" in history.columns else np.arange(1, len(history) + 1)
    panels = ["loss", "accuracy"]
    if {"auc", "val_auc"} & set(history.columns):
        panels.append("auc")
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8))
    best_epoch = None
    if "val_loss" in history.columns and history["val_loss"].notna().any():
        best_epoch = epochs[int(np.nanargmin(history["val_loss"].to_numpy(dtype=float)))]
    for ax, metric in zip(axes, panels):
        drawn = False
        for column, style, name in ((metric, "-o", "training"), (f"val_{metric}", "-s", "validation")):
            if column in history.columns and history[column].notna().any():
                ax.plot(epochs, history[column].to_numpy(dtype=float), style, markersize=3, label=name)
                drawn = True
        if best_epoch is not None and drawn:
            ax.axvline(best_epoch, color="0.5", linestyle=":", linewidth=1, label=f"lowest val loss (epoch {best_epoch})")
        if not drawn:
            ax.text(0.5, 0.5, f"no {metric} recorded", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.legend(fontsize=8)
        ax.set_xlabel("epoch")
        name = "ROC-AUC" if metric == "auc" else metric
        ax.set_ylabel(name)
        ax.set_title(name)
        ax.grid(alpha=0.3)
    if len(epochs) and np.issubdtype(np.asarray(epochs).dtype, np.integer):
        for ax in axes:
            ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def metrics_by_group(table: pd.DataFrame, metrics: Sequence[str] = ("roc_auc", "sensitivity", "specificity"),
                     title: str | None = None) -> Figure:
    """Each metric per group with its CI as an error bar, one panel per metric, from a table of
    :func:`xraylib.evaluate.breakdown` (``by_source`` or ``by_view``). Undefined values say "n/a"."""
    groups = [str(g) for g in table.index]
    labels = [f"{g}\n{int(r['n_patients'])} patients\n{int(r['n_positive'])} pos / {int(r['n_negative'])} neg images"
              for g, (_, r) in zip(groups, table.iterrows())]
    y = np.arange(len(groups))
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.4 + 2.8 * len(metrics), 1.0 + 0.75 * max(len(groups), 2)),
                             sharey=True, squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        values = table[metric].to_numpy(dtype=float)
        low = table[f"{metric}_low"].to_numpy(dtype=float)
        high = table[f"{metric}_high"].to_numpy(dtype=float)
        for i in range(len(groups)):
            if not np.isfinite(values[i]):
                ax.text(0.5, y[i], "n/a (undefined)", ha="center", va="center", color="0.35", fontsize=8,
                        bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
                continue
            if np.isfinite(low[i]) and np.isfinite(high[i]):
                ax.errorbar(values[i], y[i], xerr=[[values[i] - low[i]], [high[i] - values[i]]], fmt="o",
                            color=f"C{i % 10}", capsize=4, markersize=6)
            else:
                ax.plot(values[i], y[i], "o", color=f"C{i % 10}")
        if metric == "roc_auc":
            ax.axvline(0.5, color="0.6", linestyle="--", linewidth=1)
        ax.set_xlim(-0.02, 1.02)
        ax.set_title(METRIC_LABELS.get(metric, metric))
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(y)
    axes[0][0].set_yticklabels(labels, fontsize=8)
    axes[0][0].set_ylim(len(groups) - 0.5, -0.5)
    by = table.index.name or "group"
    fig.suptitle(title or f"Metrics by {by} (95% CI, bootstrap over patients)", fontsize=11)
    fig.tight_layout()
    return fig


def save_figure(figure: Figure, path: "str | os.PathLike", dpi: int = 110) -> "Path":
    """Save a figure as PNG atomically, close it, and return the path."""
    from pathlib import Path

    from .fileio import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(figure)
    return path


def evaluation_figures(result, predictions: pd.DataFrame, classes: Sequence[str], positive_class: str,
                       history: pd.DataFrame | None, out_dir: "str | os.PathLike", split: str = "test") -> "dict[str, Path]":
    """Draw and save an evaluation's figures into ``out_dir``: confusion matrix, ROC and precision-recall curves,
    metrics by source, and the training history when given. ``result`` is the
    :class:`xraylib.evaluate.Evaluation` of ``predictions``. Returns ``{file name: path}``."""
    from pathlib import Path

    y_true, y_score, _ = binary_targets(predictions, classes, positive_class)
    figures = {
        "confusion_matrix.png": confusion_matrix(result.confusion, title=f"Confusion matrix ({split})"),
        "roc.png": roc_curve(y_true, y_score, auc_ci=result.ci["roc_auc"], threshold=float(result.threshold)),
        "precision_recall.png": precision_recall_curve(y_true, y_score),
        "by_source.png": metrics_by_group(result.by_source),
    }
    if history is not None:
        figures["training_history.png"] = training_history(history)
    return {name: save_figure(figure, Path(out_dir) / name) for name, figure in figures.items()}


# ---------------------------------------------------------------------------------------------
# Grad-CAM: heatmaps from xraylib.explain.gradcam.


def prediction_titles(predictions: pd.DataFrame, positive_class: str,
                      true_labels: Sequence[str | None] | None = None, width: int = 28) -> list[str]:
    """One title per row of ``predictions`` (``path``, ``decision``, ``prob_<positive_class>``): the file name, the
    decision with P(positive) and, when ``true_labels`` is given, "true: LABEL" ("true: unknown" for None)."""
    from pathlib import Path

    if true_labels is not None and len(true_labels) != len(predictions):
        raise ValueError(f"need one true label per prediction, got {len(true_labels)} for {len(predictions)}")
    titles = []
    for i, row in enumerate(predictions.itertuples(index=False)):
        row = row._asdict()
        name = Path(str(row.get("path", ""))).name
        name = name if len(name) <= width else name[:width - 1] + "…"
        title = f"{name}\n{row.get('decision', '?')}, P({positive_class})={float(row[f'prob_{positive_class}']):.2f}"
        if true_labels is not None:
            title += f"\ntrue: {true_labels[i] if true_labels[i] is not None else 'unknown'}"
        titles.append(title)
    return titles


def gradcam_grid(images: Sequence[np.ndarray], heatmaps: Sequence[np.ndarray], titles: Sequence[str] | None = None,
                 ncols: int = 4, alpha: float = 0.4, outlines: Sequence[np.ndarray] | None = None,
                 size: float = 2.6, *, predictions: pd.DataFrame | None = None, positive_class: str | None = None,
                 true_labels: Sequence[str | None] | None = None) -> Figure:
    """Grad-CAM overlays in a grid: each ``(S, S)`` uint8 image with its ``(S, S)`` heatmap in [0, 1]
    (from :func:`xraylib.explain.gradcam`) in colour on top, one optional title each, and one colour bar.

    ``predictions`` (one row per image: ``path``, ``decision``, ``prob_<positive_class>``, e.g. the ok rows of
    :func:`xraylib.predict.predict_files`) with ``positive_class``: titles from :func:`prediction_titles`
    instead of ``titles``; ``true_labels`` (from :func:`xraylib.evaluate.true_labels`, None for unknown) adds
    "true: LABEL" and colours the title red where the decision differs from a known label.

    ``outlines``: optional ``(S, S)`` bool masks, one per image, drawn as white contours (a lesion's
    ground truth, :func:`xraylib.views.lung_field_mask`), so the eye can judge where the heat is.
    The colour bar reads relative heat: each map is scaled to its own maximum, so colours compare
    regions within one image, not images with each other.
    """
    from matplotlib import cm, colors

    from .explain import overlay  # NumPy/OpenCV only: keeps this module free of TensorFlow

    if len(images) != len(heatmaps):
        raise ValueError(f"need one heatmap per image, got {len(images)} images and {len(heatmaps)} heatmaps")
    wrong = [False] * len(images)
    if predictions is not None:
        if positive_class is None:
            raise ValueError("predictions= needs positive_class= (the class whose probability the titles show)")
        if len(predictions) != len(images):
            raise ValueError(f"need one prediction per image, got {len(predictions)} for {len(images)} images")
        titles = prediction_titles(predictions, positive_class, true_labels)
        if true_labels is not None and "decision" in predictions.columns:
            wrong = [t is not None and str(d) != str(t) for d, t in zip(predictions["decision"], true_labels)]
    for name, extra in (("title", titles), ("outline", outlines)):
        if extra is not None and len(extra) != len(images):
            raise ValueError(f"need one {name} per image, got {len(extra)} for {len(images)} images")
    n = max(1, len(images))
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols + 0.8, size * nrows + 0.3), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for i, (image, heatmap) in enumerate(zip(images, heatmaps)):
        ax = axes.flat[i]
        ax.imshow(overlay(image, heatmap, alpha=alpha))
        if outlines is not None and np.asarray(outlines[i]).any():
            ax.contour(np.asarray(outlines[i], dtype=float), levels=[0.5], colors="white", linewidths=0.8)
        if titles is not None:
            ax.set_title(titles[i], fontsize=8, color="tab:red" if wrong[i] else "black")
    # OpenCV's COLORMAP_JET (what overlay uses) and matplotlib's "jet" are the same map.
    mappable = cm.ScalarMappable(norm=colors.Normalize(0, 1), cmap="jet")
    fig.colorbar(mappable, ax=axes, shrink=0.8, label="relative heat (per image)")
    return fig


def top_mistakes(images: np.ndarray, predictions: pd.DataFrame, classes: Sequence[str], threshold: float = 0.5,
                 positive_class: str | None = None, k: int = 8, ncols: int = 4, explain_with=None,
                 size: float = 2.8, mistakes_only: bool = True) -> Figure | None:
    """The ``k`` most confident mistakes (:func:`xraylib.evaluate.top_losses`) as a gallery, each image with its
    file name, true label, decision, P(positive) and loss, like fastai's ``plot_top_losses``.

    ``images``: the split's ``(N, S, S)`` uint8 images, row for row with ``predictions`` (``data["test"].images``
    with ``result.test_predictions``). ``explain_with``: optionally a function from a ``(n, S, S)`` uint8 batch to
    its heatmaps (e.g. ``lambda x: explain.gradcam(model, x)``): the panels become Grad-CAM overlays with a colour
    bar. With no mistake at ``threshold`` it prints so and returns None instead of an empty figure.
    """
    from pathlib import Path

    from .evaluate import resolve_positive_class

    positive = resolve_positive_class(classes, positive_class)
    if len(images) != len(predictions):
        raise ValueError(f"images and predictions differ in length ({len(images)} vs {len(predictions)}): "
                         "pass the images of the split the predictions were made on")
    top = top_losses(predictions, classes, threshold, positive, k=k, mistakes_only=mistakes_only)
    if top.empty:
        print(f"No mistakes at threshold {float(threshold):.3f} among {len(predictions)} images: nothing to show.")
        return None
    chosen = np.stack([np.asarray(images[i]) for i in top["position"]])
    def short(name: str, width: int = 26) -> str:
        return name if len(name) <= width else name[:width - 1] + "…"

    titles = [f"{short(Path(str(r.path)).name)}\ntrue: {r.label} | pred: {r.predicted}\n"
              f"P({positive})={r.prob:.2f}, loss {r.loss:.2f}" for r in top.itertuples()]
    if explain_with is not None:
        fig = gradcam_grid(chosen, np.asarray(explain_with(chosen)), titles, ncols=ncols, size=size)
    else:
        n = len(chosen)
        ncols = max(1, min(ncols, n))
        nrows = int(np.ceil(n / ncols))
        fig, axes = plt.subplots(nrows, ncols, figsize=(max(size * ncols, 5.0), size * nrows + 0.6), squeeze=False,
                                 layout="constrained")
        for ax in axes.flat:
            ax.axis("off")
        for ax, image, title in zip(axes.flat, chosen, titles):
            ax.imshow(image, cmap="gray", vmin=0, vmax=255)
            ax.set_title(title, fontsize=8)
    for ax, mistake in zip(fig.axes, top["mistake"]):
        ax.title.set_color("tab:red" if mistake else "black")
    n_mistakes = len(top_losses(predictions, classes, threshold, positive, k=len(predictions)))
    fig.suptitle(f"Highest-loss {'mistakes' if mistakes_only else 'images'} (threshold {float(threshold):.3f})\n"
                 f"{len(top)} shown; {n_mistakes} mistake(s) among {len(predictions)} images", fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------
# Data audit figures: data from xraylib.audit (a manifest, the border table, the mean images).


def age_distribution(manifest: pd.DataFrame, title: str = "Age per class and source") -> Figure:
    """Ages (years) of every (class, source) group of a manifest: a box plot over the recorded ages
    with each image as a dot. A group whose files record no ages shows its source's documented
    population (its record's ``population_ages`` in :data:`xraylib.sources.SOURCES`, hatched band) or says that
    the ages are unknown.
    The dashed line marks 18 years."""
    from .sources import ADULT_AGE, source_populations

    populations = source_populations()

    ages = pd.to_numeric(manifest["age"], errors="coerce") if "age" in manifest.columns else pd.Series(np.nan, index=manifest.index)
    frame = manifest.assign(_age=ages)
    groups = list(frame.groupby(["label", "source"], sort=True))
    labels = sorted(frame["label"].astype(str).unique())
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    rng = np.random.default_rng(0)
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * max(len(groups), 2), 4.6))
    top = 100.0
    notes = []
    for x, ((label, source), group) in enumerate(groups):
        values = group["_age"].dropna().to_numpy(dtype=float)
        colour = colours[str(label)]
        if len(values):
            ax.boxplot([values], positions=[x], widths=0.55, showfliers=False, patch_artist=True,
                       boxprops={"facecolor": colour, "alpha": 0.25, "edgecolor": colour},
                       medianprops={"color": colour, "linewidth": 2}, whiskerprops={"color": colour},
                       capprops={"color": colour})
            ax.scatter(x + rng.uniform(-0.18, 0.18, len(values)), values, s=7, color=colour, alpha=0.5, linewidths=0)
            top = max(top, float(values.max()) + 5)
            note = f"{len(values)} of {len(group)} aged"
        elif source in populations:
            low, high = populations[source]
            ax.add_patch(plt.Rectangle((x - 0.28, low), 0.56, high - low, facecolor=colour, alpha=0.25,
                                       edgecolor=colour, hatch="///"))
            ax.text(x, high + 3, f"no per-image ages:\ndocumented\n{low:g}-{high:g} years", ha="center", va="bottom", fontsize=7)
            note = f"0 of {len(group)} aged"
        else:
            ax.text(x, 50, "ages not\nrecorded", ha="center", va="center", fontsize=8, color="0.35")
            note = f"0 of {len(group)} aged"
        notes.append(note)
    ax.axhline(ADULT_AGE, color="0.5", linestyle="--", linewidth=1)
    ax.text(len(groups) - 0.5, ADULT_AGE + 1, f"{ADULT_AGE:g} years", ha="right", va="bottom", fontsize=7, color="0.4")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{label}\n{source}\n({note})" for ((label, source), _), note in zip(groups, notes)], fontsize=8)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylim(0, top)
    ax.set_ylabel("age (years)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def border_profiles_plot(table: pd.DataFrame, title: str = "Mean intensity near the edges, per group") -> Figure:
    """One 3x3 map per group of :func:`xraylib.audit.border_summary` (``audit(...).tables["border"]``):
    the mean intensity (0-255) of each corner, each edge band and the centre, laid out where they
    are on the film, with the share of images with a burned-in mark in the title. A group whose
    corners or bands are much brighter than the others' may carry text or markers."""
    layout = [["top_left", "top", "top_right"], ["left", "centre", "right"], ["bottom_left", "bottom", "bottom_right"]]
    key_columns = [c for c in ("source", "label") if c in table.columns]
    n = max(1, len(table))
    ncols = min(4, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols + 0.9, 2.9 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    image = None
    for ax, (_, row) in zip(axes.flat, table.iterrows()):
        values = np.array([[float(row[c]) for c in line] for line in layout])
        image = ax.imshow(values, cmap="gray", vmin=0, vmax=255)
        for (i, j), value in np.ndenumerate(values):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=9, color="black" if value > 128 else "white")
        name = " / ".join(str(row[c]) for c in key_columns) or "all"
        mark = f"marks {float(row['marker_share']):.0%}" if "marker_share" in row else ""
        if mark and isinstance(row.get("marker_zone"), str) and row["marker_zone"]:
            mark += f" ({row['marker_zone'].replace('_', '-')})"
        ax.set_title(f"{name} (n={int(row['images'])})\n{mark}", fontsize=9)
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="mean intensity (0-255)")
    fig.suptitle(title, fontsize=11)
    return fig


def mean_image_grid(mean_images: "dict[str, np.ndarray]", ncols: int = 4, size: float = 2.6,
                    title: str = "Average image per group") -> Figure:
    """The average image of each group (``audit(...).mean_images``, ``{"source / label": (S, S)}``):
    anatomy blurs away, while a marker or text burned in at the same place stays sharp."""
    names = list(mean_images)
    fig = image_grid([np.clip(mean_images[k], 0, 255).astype(np.uint8) for k in names], names, ncols=ncols, size=size)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Shortcut tests: data from xraylib.shortcuts.


def mean_heatmaps(mean_maps: "dict[str, np.ndarray]", lung_mask: np.ndarray | None = None,
                  shares: "dict[str, float] | None" = None, size: float = 3.0,
                  title: str = "Mean Grad-CAM map per class") -> Figure:
    """The mean Grad-CAM map of each class (``shortcuts.saliency_heat_share(...).mean_maps``,
    ``{class: (S, S)}`` in [0, 1]) side by side, on one colour scale, with the lung-field mask
    (``lung_mask``, ``(S, S)`` bool) drawn as a white contour and, where given, each class's
    share of heat on the lung fields (``shares``, ``{class: 0..1}``) in its title. Heat that
    gathers in a corner or along an edge is heat on a marker, text or the film's border."""
    from matplotlib import cm, colors

    names = list(mean_maps)
    n = max(1, len(names))
    fig, axes = plt.subplots(1, n, figsize=(size * n + 0.9, size + 0.5), squeeze=False, layout="constrained")
    top = max([float(np.nanmax(mean_maps[k])) for k in names if np.size(mean_maps[k])] + [1e-6])
    for ax in axes.flat:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        ax.imshow(np.asarray(mean_maps[name], dtype=float), cmap="jet", vmin=0.0, vmax=top)
        if lung_mask is not None and np.asarray(lung_mask).any():
            ax.contour(np.asarray(lung_mask, dtype=float), levels=[0.5], colors="white", linewidths=1.0)
        share = None if shares is None else shares.get(name)
        ax.set_title(name if share is None or not np.isfinite(share) else f"{name}\n{share:.0%} of the heat on the lung fields",
                     fontsize=9)
    fig.colorbar(cm.ScalarMappable(norm=colors.Normalize(0, top), cmap="jet"), ax=axes, shrink=0.8,
                 label="mean Grad-CAM heat")
    fig.suptitle(title, fontsize=11)
    return fig
