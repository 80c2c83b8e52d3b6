"""Evaluate a classifier's predictions on a held-out split, honestly.

Every metric comes with its n and a 95% bootstrap confidence interval that resamples
**patients**, not images: ieee8023 has up to a dozen images per patient, and resampling
images treats them as independent and gives intervals that are too narrow. The decision
threshold is chosen on the validation split and only applied to test. Results are broken
down by source and by view, because a classifier that recognises the hospital (or the
children of the Kaggle set) instead of the disease looks excellent on a pooled test set.

Input is a prediction table, one row per image, with columns ``label`` (class name),
``patient_id``, ``source``, ``view`` (may be NaN or absent) and one ``prob_<class>`` column
per class. The binary metrics are "positive class vs the rest": the last class of a 2-class
task, ``"covid"`` in the 3-class task. A prediction is positive when its score is
``>= threshold`` (sklearn's ``roc_curve`` convention). Point metrics count images; their
confidence intervals resample patients. This module works on arrays and imports no TensorFlow.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import (
    classification_report,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from .errors import ConfigError, XraylibError
from .fileio import write_json_atomic, write_text_atomic, json_safe
from .reporting import (
    DISCLAIMER,
    REPORT_DISCLAIMER,
    Finding,
    format_interval,
    format_number,
    markdown_table,
    probability_column,
    warning_lines,
)

#: The metrics that get a confidence interval, in report order.
METRICS = ("roc_auc", "sensitivity", "specificity", "precision", "npv", "f1", "accuracy")
METRIC_LABELS = {
    "roc_auc": "AUC",
    "sensitivity": "Sensitivity (recall)",
    "specificity": "Specificity",
    "precision": "PPV (precision)",
    "npv": "NPV",
    "f1": "F1",
    "accuracy": "Accuracy",
}
THRESHOLD_RULES = ("max_specificity_at_sensitivity", "youden")
#: Below this many positive test patients the report warns that the intervals are wide.
MIN_POSITIVE_PATIENTS = 30
#: Group name for rows whose source or view is missing.
UNKNOWN_GROUP = "unknown"
# Bootstrap work is done in chunks of at most this many (resample x image) cells (~32 MB of float64).
_BOOTSTRAP_CELLS = 4_000_000


class EvaluationError(XraylibError, ValueError):
    """Predictions cannot be evaluated as given (empty, wrong columns, labels outside the classes, ...)."""


class Threshold(float):
    """A decision threshold: a plain float that also remembers how it was chosen (``chosen_by``).

    :func:`threshold_from_validation` returns one, and :func:`evaluate` copies ``chosen_by``
    into the report, so the report says where its operating point came from.
    """

    chosen_by: str

    def __new__(cls, value: float, chosen_by: str) -> "Threshold":
        obj = super().__new__(cls, value)
        obj.chosen_by = chosen_by
        return obj

    def __getnewargs__(self) -> tuple[float, str]:  # keeps chosen_by through pickle and copy
        return float(self), self.chosen_by


# ---------------------------------------------------------------------------------------------
# Binary metrics on arrays


def _binary_inputs(y_true: Any, y_score: Any, name: str = "y_score") -> tuple[np.ndarray, np.ndarray]:
    """Check and convert ``y_true`` (N,) 0/1 and ``y_score`` (N,) finite floats."""
    y_true = np.asarray(y_true)
    if y_true.dtype == object:  # e.g. pandas' nullable integers; strings stay object and are refused below
        try:
            y_true = y_true.astype(np.float64)
        except (TypeError, ValueError):
            pass
    try:
        y_score = np.asarray(y_score, dtype=np.float64)
    except (TypeError, ValueError):
        raise EvaluationError(f"{name} must be numbers (scores or probabilities), got dtype {np.asarray(y_score).dtype}") from None
    if y_true.ndim != 1 or y_score.ndim != 1:
        raise EvaluationError(f"y_true and {name} must be 1-D arrays of shape (N,), got {y_true.shape} and {y_score.shape}")
    if len(y_true) != len(y_score):
        raise EvaluationError(f"y_true and {name} must have the same length, got {len(y_true)} and {len(y_score)}")
    if len(y_true) == 0:
        raise EvaluationError("nothing to evaluate: y_true is empty (does the split hold any images?)")
    if y_true.dtype.kind not in "biuf" or not np.isin(y_true, (0, 1)).all():
        found = pd.unique(pd.Series(y_true.ravel()))[:5].tolist()
        raise EvaluationError(f"y_true must hold 0 (negative) and 1 (positive) only, found values such as {found}")
    if not np.isfinite(y_score).all():
        bad = int((~np.isfinite(y_score)).sum())
        raise EvaluationError(f"{name} has {bad} NaN or infinite value(s); every image needs a finite score")
    return y_true.astype(np.int8), y_score


def _check_threshold(threshold: Any) -> float:
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise EvaluationError(f"threshold must be a number, got {threshold!r}") from None
    if not math.isfinite(value):
        raise EvaluationError(f"threshold must be a finite number, got {threshold!r}")
    return value


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, NaN where the denominator is 0 (the quantity is undefined)."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    safe = np.where(denominator > 0, denominator, 1.0)
    return np.where(denominator > 0, numerator / safe, np.nan)


def _rates(tp: Any, fp: Any, tn: Any, fn: Any) -> dict[str, np.ndarray]:
    """Confusion-matrix metrics from counts (scalars or arrays of any shape); NaN where undefined.

    F1 is ``2tp / (2tp + fp + fn)``: 0 when there are positives but none is found, NaN when
    the data hold no positives (recall is undefined, so is their harmonic mean).
    """
    tp, fp, tn, fn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, tn, fn))
    has_positives = (tp + fn) > 0
    return {
        "accuracy": _ratio(tp + tn, tp + fp + tn + fn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": np.where(has_positives, _ratio(2 * tp, 2 * tp + fp + fn), np.nan),
    }


def confusion_counts(y_true: Any, y_pred: Any) -> dict[str, int]:
    """``{"tp", "fp", "tn", "fn"}`` for binary arrays ``y_true`` (N,) and ``y_pred`` (N,) of 0/1."""
    y_true, y_pred_float = _binary_inputs(y_true, y_pred, name="y_pred")
    if not np.isin(y_pred_float, (0, 1)).all():
        raise EvaluationError("y_pred must hold 0 and 1 only (apply the threshold first: y_score >= threshold)")
    tn, fp, fn, tp = confusion_matrix(y_true, y_pred_float.astype(np.int8), labels=[0, 1]).ravel()
    return {"tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn)}


def binary_metrics(y_true: Any, y_score: Any, threshold: float = 0.5) -> dict[str, float | int]:
    """Metrics of the positive class at ``threshold`` (positive when ``y_score >= threshold``).

    ``y_true`` (N,) 0/1, ``y_score`` (N,) finite scores. Returns accuracy, sensitivity,
    specificity, precision (PPV), npv, f1, roc_auc, and n, n_positive, n_negative, tp, fp,
    tn, fn, threshold. A metric that the data cannot define is NaN, never a made-up 0 or 1:
    sensitivity without positives, precision without positive predictions, AUC with one class.
    """
    y_true, y_score = _binary_inputs(y_true, y_score)
    threshold = _check_threshold(threshold)
    counts = confusion_counts(y_true, (y_score >= threshold).astype(np.int8))
    rates = {name: float(value) for name, value in _rates(**counts).items()}
    n_positive = int(y_true.sum())
    n_negative = len(y_true) - n_positive
    auc = float(roc_auc_score(y_true, y_score)) if n_positive and n_negative else math.nan
    return {
        **rates,
        "roc_auc": auc,
        "n": len(y_true),
        "n_positive": n_positive,
        "n_negative": n_negative,
        **counts,
        "threshold": threshold,
    }


# ---------------------------------------------------------------------------------------------
# Threshold


def describe_threshold_rule(rule: str | float, min_sensitivity: float = 0.95) -> str:
    """One line saying what a threshold rule does, for reports."""
    if _is_number(rule):
        return f"fixed at {float(rule):g} (not chosen on data)"
    if rule == "youden":
        return "Youden's J: highest sensitivity + specificity - 1"
    if rule == "max_specificity_at_sensitivity":
        return f"highest specificity with sensitivity >= {min_sensitivity:g}"
    raise ConfigError(f"rule must be one of {THRESHOLD_RULES} or a number, got {rule!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def choose_threshold(
    y_true: Any,
    y_score: Any,
    rule: str | float = "max_specificity_at_sensitivity",
    min_sensitivity: float = 0.95,
) -> float:
    """A decision threshold from VALIDATION data (never test): positive when ``score >= threshold``.

    ``rule``: ``"max_specificity_at_sensitivity"`` (default) takes, among the thresholds whose
    sensitivity is ``>= min_sensitivity``, the one with the highest specificity; ``"youden"``
    maximises sensitivity + specificity - 1; a number is returned as it is. Ties go to the
    highest threshold. Candidates are every distinct score (sklearn's ``roc_curve``). Without
    both positives and negatives no rule can work: warns and returns 0.5.
    """
    if _is_number(rule):
        return _check_threshold(rule)
    describe_threshold_rule(rule)  # raises ConfigError on an unknown rule
    if not 0 < min_sensitivity <= 1:
        raise ConfigError(f"min_sensitivity must be in (0, 1], got {min_sensitivity}")
    y_true, y_score = _binary_inputs(y_true, y_score)
    n_positive = int(y_true.sum())
    n_negative = len(y_true) - n_positive
    if n_positive == 0 or n_negative == 0:
        warnings.warn(
            f"cannot choose a threshold by {rule!r}: the validation data hold {n_positive} positive and "
            f"{n_negative} negative image(s) and the rule needs both; falling back to threshold 0.5",
            UserWarning,
            stacklevel=2,
        )
        return 0.5
    # drop_intermediate=False: a dropped collinear point can be the highest threshold meeting the rule.
    fpr, tpr, thresholds = roc_curve(y_true, y_score, drop_intermediate=False)
    finite = np.isfinite(thresholds)  # sklearn's first point (+inf) predicts nothing positive
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    if rule == "youden":
        objective = tpr - fpr
    else:
        objective = np.where(tpr >= min_sensitivity, 1.0 - fpr, -np.inf)
    # roc_curve lists thresholds from high to low, so the first best point is the highest threshold.
    return float(thresholds[np.flatnonzero(objective == objective.max())[0]])


# ---------------------------------------------------------------------------------------------
# Bootstrap over patients


def _patient_codes(patient_ids: Any, n: int) -> np.ndarray:
    patient_ids = np.asarray(patient_ids, dtype=object)
    if patient_ids.shape != (n,):
        raise EvaluationError(f"patient_ids must have shape ({n},) like y_true, got {patient_ids.shape}")
    codes, _ = pd.factorize(pd.Series(patient_ids))
    if (codes < 0).any():
        raise EvaluationError(
            f"patient_ids has {int((codes < 0).sum())} missing value(s): the bootstrap resamples patients, "
            "so every image needs its patient_id (use the image id for single-image patients)"
        )
    return codes


def _weighted_auc(weights: np.ndarray, positive: np.ndarray, group_starts: np.ndarray) -> np.ndarray:
    """AUC for many weightings of one set of scores at once.

    ``weights`` (B, N) image weights with images sorted by score, ``positive`` (N,) bool,
    ``group_starts`` the first index of each run of tied scores. This is the Mann-Whitney form
    of the area (ties count one half), equal to ``roc_auc_score(..., sample_weight=w)`` row by
    row; sklearn takes one weighting per call, ~2 ms each, too slow for 1000 resamples x groups.
    """
    pos = np.add.reduceat(weights * positive, group_starts, axis=1)
    neg = np.add.reduceat(weights * ~positive, group_starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    numerator = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    return _ratio(numerator, pos.sum(axis=1) * neg.sum(axis=1))


def bootstrap_distribution(
    y_true: Any, y_score: Any, patient_ids: Any, threshold: float, n_boot: int = 1000, seed: int = 0
) -> dict[str, np.ndarray]:
    """Each metric of :data:`METRICS` on ``n_boot`` patient-level resamples: ``{metric: (n_boot,)}``.

    A resample draws as many patients as there are, with replacement; every image of a drawn
    patient comes along (a patient drawn twice counts twice). NaN where a resample leaves a
    metric undefined (e.g. no positive patient drawn).
    """
    y_true, y_score = _binary_inputs(y_true, y_score)
    threshold = _check_threshold(threshold)
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ConfigError(f"n_boot must be a positive integer, got {n_boot!r}")
    codes = _patient_codes(patient_ids, len(y_true))
    n_patients = int(codes.max()) + 1
    predicted = y_score >= threshold
    positive = y_true == 1
    per_patient = np.stack(
        [np.bincount(codes, weights=mask, minlength=n_patients)
         for mask in (positive & predicted, ~positive & predicted, ~positive & ~predicted, positive & ~predicted)],
        axis=1,
    )  # (P, 4): tp, fp, tn, fn per patient
    order = np.argsort(y_score, kind="stable")
    sorted_scores = y_score[order]
    group_starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    sorted_codes, sorted_positive = codes[order], positive[order]

    rng = np.random.default_rng(seed)
    counts = np.empty((n_boot, 4))
    auc = np.empty(n_boot)
    chunk = max(1, _BOOTSTRAP_CELLS // max(len(y_true), n_patients))
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        draws = rng.integers(0, n_patients, size=(m, n_patients))
        offsets = (draws + np.arange(m)[:, None] * n_patients).ravel()
        patient_weights = np.bincount(offsets, minlength=m * n_patients).reshape(m, n_patients).astype(np.float64)
        counts[start:start + m] = patient_weights @ per_patient
        auc[start:start + m] = _weighted_auc(patient_weights[:, sorted_codes], sorted_positive, group_starts)
    samples = _rates(*counts.T)
    samples["roc_auc"] = auc
    return {name: samples[name] for name in METRICS}


def bootstrap_ci(
    y_true: Any,
    y_score: Any,
    patient_ids: Any,
    threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of every metric, resampling PATIENTS: ``{metric: (low, high)}``.

    ``y_true`` (N,) 0/1, ``y_score`` (N,), ``patient_ids`` (N,) one id per image. Resamples where
    a metric is undefined are left out of that metric's interval; ``(nan, nan)`` when all are.
    Deterministic for a given ``seed``.
    """
    if not 0 < level < 1:
        raise ConfigError(f"level must be between 0 and 1 (0.95 for a 95% interval), got {level}")
    samples = bootstrap_distribution(y_true, y_score, patient_ids, threshold, n_boot=n_boot, seed=seed)
    tail = 100 * (1 - level) / 2
    out: dict[str, tuple[float, float]] = {}
    for name, values in samples.items():
        values = values[~np.isnan(values)]
        if len(values) == 0:
            out[name] = (math.nan, math.nan)
        else:
            low, high = np.percentile(values, [tail, 100 - tail])
            out[name] = (float(low), float(high))
    return out


# ---------------------------------------------------------------------------------------------
# Multiclass


def confusion_table(true_labels: Any, predicted_labels: Any, classes: Sequence[str]) -> pd.DataFrame:
    """Confusion matrix as a DataFrame: rows the true class, columns the predicted class, in ``classes`` order."""
    classes = list(classes)
    counts = confusion_matrix(np.asarray(true_labels, dtype=object), np.asarray(predicted_labels, dtype=object), labels=classes)
    return pd.DataFrame(counts, index=pd.Index(classes, name="true"), columns=pd.Index(classes, name="predicted"))


def _check_labels(labels: np.ndarray, classes: Sequence[str], where: str = "labels") -> None:
    unknown = sorted(set(pd.unique(pd.Series(labels)).tolist()) - set(classes), key=str)
    if unknown:
        raise EvaluationError(f"{where} has label(s) {unknown[:5]} that are not among classes {tuple(classes)}")


def multiclass_metrics(labels: Any, probs: Any, classes: Sequence[str]) -> pd.DataFrame:
    """Per-class metrics of the argmax prediction.

    ``labels`` (N,) class names, ``probs`` (N, C) probabilities in ``classes`` order. Returns a
    DataFrame indexed by class with ``support`` (true images), ``n_predicted``, ``sensitivity``
    (recall), ``ppv`` (precision) and ``f1``; NaN where undefined (PPV of a class never
    predicted). ``.attrs["accuracy"]`` holds the overall accuracy and
    ``.attrs["classification_report"]`` sklearn's text report. For the confusion matrix use
    :func:`confusion_table` with :func:`argmax_labels`.
    """
    classes = _check_classes(classes)
    labels = np.asarray(labels, dtype=object)
    if len(labels) == 0:
        raise EvaluationError("nothing to evaluate: labels is empty (does the split hold any images?)")
    predicted = argmax_labels(probs, classes, n=len(labels))
    _check_labels(labels, classes)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=list(classes), zero_division=np.nan
    )
    n_predicted = pd.Series(predicted).value_counts().reindex(list(classes), fill_value=0).to_numpy()
    table = pd.DataFrame(
        {"support": support.astype(int), "n_predicted": n_predicted.astype(int),
         "sensitivity": recall, "ppv": precision, "f1": f1},
        index=pd.Index(classes, name="class"),
    )
    table.attrs["accuracy"] = float(np.mean(labels == predicted))
    table.attrs["classification_report"] = classification_report(
        labels, predicted, labels=list(classes), digits=3, zero_division=np.nan
    )
    return table


def argmax_labels(probs: Any, classes: Sequence[str], n: int | None = None) -> np.ndarray:
    """The predicted class name of each row of ``probs`` (N, C): the class with the highest probability."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(classes) or (n is not None and probs.shape[0] != n):
        raise EvaluationError(f"probs must have shape (N, {len(classes)}) (one column per class{'' if n is None else f', N={n}'}), got {probs.shape}")
    return np.asarray(classes, dtype=object)[probs.argmax(axis=1)]


# ---------------------------------------------------------------------------------------------
# Prediction tables


def _check_classes(classes: Sequence[str]) -> tuple[str, ...]:
    classes = tuple(classes)
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise ConfigError(f"classes must be two or more distinct class names, got {classes}")
    return classes


def resolve_positive_class(classes: Sequence[str], positive_class: str | None = None) -> str:
    """The class the binary metrics treat as positive: ``positive_class`` if given, else the
    last class of a 2-class task, else ``"covid"`` (covid vs the rest)."""
    classes = _check_classes(classes)
    if positive_class is None:
        if len(classes) == 2:
            return classes[-1]
        if "covid" in classes:
            return "covid"
        raise ConfigError(f"with {len(classes)} classes {classes} and no 'covid', pass positive_class= (one of the classes)")
    if positive_class not in classes:
        raise ConfigError(f"positive_class {positive_class!r} is not one of classes {classes}")
    return positive_class


def check_predictions(predictions: pd.DataFrame, classes: Sequence[str], name: str = "predictions") -> pd.DataFrame:
    """Check a prediction table against the contract; return it (a copy, with ``view`` added if absent).

    Raises :class:`EvaluationError` naming the table and the problem: no rows, missing
    columns, labels outside ``classes``, missing patient ids, NaN probabilities, or rows
    whose probabilities do not sum to 1.
    """
    classes = _check_classes(classes)
    if not isinstance(predictions, pd.DataFrame):
        raise EvaluationError(f"{name} must be a pandas DataFrame (one row per image), got {type(predictions).__name__}")
    prob_columns = [probability_column(c) for c in classes]
    missing = [c for c in ("label", "patient_id", "source", *prob_columns) if c not in predictions.columns]
    if missing:
        raise EvaluationError(f"{name} is missing column(s) {missing}; it has {list(predictions.columns)}")
    if len(predictions) == 0:
        raise EvaluationError(f"{name} has no rows: nothing to evaluate (does the split hold any images?)")
    _check_labels(predictions["label"].to_numpy(dtype=object), classes, where=f"{name}['label']")
    if predictions["patient_id"].isna().any():
        raise EvaluationError(f"{name} has {int(predictions['patient_id'].isna().sum())} row(s) without patient_id; "
                              "the bootstrap resamples patients, so every image needs one")
    probs = predictions[prob_columns].to_numpy(dtype=np.float64)
    if not np.isfinite(probs).all():
        raise EvaluationError(f"{name} has {int((~np.isfinite(probs)).any(axis=1).sum())} row(s) with NaN or infinite probabilities")
    sums = probs.sum(axis=1)
    if not np.allclose(sums, 1.0, atol=1e-3):
        worst = float(sums[np.argmax(np.abs(sums - 1))])
        raise EvaluationError(f"{name}: the columns {prob_columns} must sum to 1 in every row (softmax outputs); "
                              f"{int((np.abs(sums - 1) > 1e-3).sum())} row(s) do not (e.g. {worst:.4f}). "
                              "Are the class order and the prob_ columns right?")
    frame = predictions.copy()
    if "view" not in frame.columns:
        frame["view"] = np.nan
    return frame


def binary_targets(
    predictions: pd.DataFrame, classes: Sequence[str], positive_class: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(y_true (N,) int8 0/1, y_score (N,) float, patient_ids (N,))`` of positive class vs the rest.

    ``y_score`` is the probability of the positive class, ``prob_<positive_class>``.
    """
    positive = resolve_positive_class(classes, positive_class)
    frame = check_predictions(predictions, classes)
    y_true = (frame["label"].to_numpy(dtype=object) == positive).astype(np.int8)
    y_score = frame[probability_column(positive)].to_numpy(dtype=np.float64)
    return y_true, y_score, frame["patient_id"].to_numpy(dtype=object)


def threshold_from_validation(
    val_predictions: pd.DataFrame,
    classes: Sequence[str],
    positive_class: str | None = None,
    rule: str | float = "max_specificity_at_sensitivity",
    min_sensitivity: float = 0.95,
) -> Threshold:
    """The threshold on ``prob_<positive_class>`` chosen on the validation predictions by ``rule``
    (see :func:`choose_threshold`). Returns a :class:`Threshold` (a float) that records how.

    Refuses a table whose ``split`` column (if any) holds test rows: a threshold tuned on
    test makes every test metric optimistic.
    """
    if "split" in val_predictions.columns and (val_predictions["split"] == "test").any():
        raise EvaluationError("val_predictions holds rows of the test split: choose the threshold on validation "
                              "predictions only (filter split == 'val'), never on test")
    positive = resolve_positive_class(classes, positive_class)
    y_true, y_score, patient_ids = binary_targets(val_predictions, classes, positive)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = choose_threshold(y_true, y_score, rule=rule, min_sensitivity=min_sensitivity)
    for warning in caught:
        warnings.warn(warning.message, warning.category, stacklevel=2)
    n_patients = len(pd.unique(pd.Series(patient_ids)))
    where = f"validation split ({len(y_true)} images, {n_patients} patients)"
    if caught:
        how = f"{where}: fallback 0.5, the validation data lack positives or negatives"
    else:
        how = f"{where}: {describe_threshold_rule(rule, min_sensitivity)}"
    if _is_number(rule):
        how = describe_threshold_rule(rule)
    return Threshold(value, how)


# ---------------------------------------------------------------------------------------------
# Evaluation


def _group_values(frame: pd.DataFrame, column: str) -> pd.Series:
    return frame[column].astype(object).where(frame[column].notna(), UNKNOWN_GROUP).astype(str)


def breakdown(
    predictions: pd.DataFrame,
    by: str,
    classes: Sequence[str],
    threshold: float,
    positive_class: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """Binary metrics with CIs per value of column ``by`` (``"source"``, ``"view"``, ...).

    One row per group (missing values form the group ``"unknown"``), sorted by name, with
    ``n_images``, ``n_patients``, ``n_positive``, ``n_negative`` (images), ``n_positive_patients``,
    ``tp``, ``fp``, ``tn``, ``fn`` and, for each metric of :data:`METRICS`, the value and
    ``<metric>_low`` / ``<metric>_high``. A group with one class only gets NaN where undefined.
    """
    positive = resolve_positive_class(classes, positive_class)
    frame = check_predictions(predictions, classes)
    if by not in frame.columns:
        raise EvaluationError(f"cannot break down by {by!r}: no such column (have {list(frame.columns)})")
    y_true, y_score, patient_ids = binary_targets(frame, classes, positive)
    groups = _group_values(frame, by).to_numpy()
    rows = []
    for group in sorted(set(groups)):
        mask = groups == group
        rows.append({by: group, **_metrics_row(y_true[mask], y_score[mask], patient_ids[mask], threshold, n_boot, seed, level)})
    return pd.DataFrame(rows).set_index(by)


def _metrics_row(y_true, y_score, patient_ids, threshold, n_boot, seed, level) -> dict[str, Any]:
    metrics = binary_metrics(y_true, y_score, threshold)
    ci = bootstrap_ci(y_true, y_score, patient_ids, threshold, n_boot=n_boot, seed=seed, level=level)
    row: dict[str, Any] = {
        "n_images": metrics["n"],
        "n_patients": int(pd.Series(patient_ids).nunique()),
        "n_positive": metrics["n_positive"],
        "n_negative": metrics["n_negative"],
        "n_positive_patients": int(pd.Series(patient_ids[y_true == 1]).nunique()),
        **{k: metrics[k] for k in ("tp", "fp", "tn", "fn")},
    }
    for name in METRICS:
        row[name] = metrics[name]
        row[f"{name}_low"], row[f"{name}_high"] = ci[name]
    return row


@dataclass
class Evaluation:
    """The result of :func:`evaluate`. Point metrics count images; CIs resample patients.

    ``metrics``: :func:`binary_metrics` at ``threshold``; ``ci``: ``{metric: (low, high)}``;
    ``confusion``: binary confusion matrix at the threshold (rows true, columns predicted);
    ``confusion_multiclass`` / ``per_class`` / ``accuracy_multiclass``: argmax results when
    there are more than two classes (else ``None``); ``by_source`` / ``by_view``: tables of
    :func:`breakdown`; ``warnings``: one line per problem of the test set itself, ``findings``
    the same as :class:`~xraylib.reporting.Finding` records with their numbers.
    """

    classes: tuple[str, ...]
    positive_class: str
    threshold: float
    threshold_chosen_by: str
    n_images: int
    n_patients: int
    patients_per_class: dict[str, int]
    images_per_class: dict[str, int]
    metrics: dict[str, float | int]
    ci: dict[str, tuple[float, float]]
    confusion: pd.DataFrame
    classification_report: str
    by_source: pd.DataFrame
    by_view: pd.DataFrame
    confusion_multiclass: pd.DataFrame | None = None
    per_class: pd.DataFrame | None = None
    accuracy_multiclass: float | None = None
    warnings: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    n_boot: int = 1000
    seed: int = 0
    level: float = 0.95

    @property
    def n_positive_patients(self) -> int:
        return self.patients_per_class.get(self.positive_class, 0)

    def metrics_table(self) -> pd.DataFrame:
        """One row per metric of :data:`METRICS`: ``value``, ``low``, ``high``, ``numerator``, ``denominator``."""
        fractions = _fractions(self.metrics)
        rows = [{"metric": name, "value": self.metrics[name], "low": self.ci[name][0], "high": self.ci[name][1],
                 "numerator": fractions[name][0], "denominator": fractions[name][1]} for name in METRICS]
        return pd.DataFrame(rows).set_index("metric")

    def _has_collapsed_interval(self) -> bool:
        intervals = list(self.ci.values())
        for table in (self.by_source, self.by_view):
            intervals += [(r[f"{m}_low"], r[f"{m}_high"]) for _, r in table.iterrows() for m in METRICS]
        return any(math.isfinite(low) and low == high for low, high in intervals)

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON types (NaN and infinities become ``None``)."""
        out = {
            "disclaimer": DISCLAIMER,
            "classes": list(self.classes),
            "positive_class": self.positive_class,
            "threshold": float(self.threshold),
            "threshold_chosen_by": self.threshold_chosen_by,
            "n_images": self.n_images,
            "n_patients": self.n_patients,
            "n_positive_patients": self.n_positive_patients,
            "patients_per_class": self.patients_per_class,
            "images_per_class": self.images_per_class,
            "ci": {"method": "percentile bootstrap over patients", "level": self.level, "n_boot": self.n_boot, "seed": self.seed},
            "metrics": {name: {"value": self.metrics[name], "ci_low": self.ci[name][0], "ci_high": self.ci[name][1]}
                        for name in METRICS},
            "counts": {k: self.metrics[k] for k in ("n", "n_positive", "n_negative", "tp", "fp", "tn", "fn")},
            "confusion_matrix": _confusion_dict(self.confusion),
            "confusion_matrix_multiclass": None if self.confusion_multiclass is None else _confusion_dict(self.confusion_multiclass),
            "accuracy_multiclass": self.accuracy_multiclass,
            "per_class": None if self.per_class is None else self.per_class.reset_index().to_dict(orient="records"),
            "classification_report": self.classification_report,
            "by_source": self.by_source.reset_index().to_dict(orient="records"),
            "by_view": self.by_view.reset_index().to_dict(orient="records"),
            "warnings": list(self.warnings),
            "findings": [f.to_dict() for f in self.findings],
        }
        return json_safe(out)

    def to_markdown(self) -> str:
        """A readable Markdown report: numbers with their CIs and n, per source and view, warnings."""
        pct = f"{self.level * 100:g}%"
        per_class = ", ".join(f"{c}: {self.patients_per_class.get(c, 0)} patients / {self.images_per_class.get(c, 0)} images"
                              for c in self.classes)
        binary = " vs ".join(reversed(self.confusion.index.tolist()))
        lines = [
            f"# Evaluation: {binary}",
            "",
            f"**{REPORT_DISCLAIMER}**",
            "",
            f"- Test set: **{self.n_patients} patients, {self.n_images} images** ({per_class}).",
            f"- Positive class: **{self.positive_class}**; a case is called positive when "
            f"P({self.positive_class}) >= **{float(self.threshold):.4g}**.",
            f"- Threshold chosen by: {self.threshold_chosen_by}.",
            f"- Intervals: {pct} percentile bootstrap over patients ({self.n_boot} resamples, seed {self.seed}). "
            "Point values count images.",
            "",
        ]
        if self._has_collapsed_interval():
            lines[-1:-1] = ["- An interval of zero width (such as 1.000–1.000 for 38/38) is the percentile bootstrap's "
                            "limit at 0 or 1, not certainty: read it with its n."]
        lines += warning_lines(self.warnings, quote=True)
        if self.warnings:
            lines.append("")
        fractions = _fractions(self.metrics)
        lines += ["## Metrics at the threshold", ""]
        rows = [[METRIC_LABELS[name], format_interval(self.metrics[name], self.ci[name], label=f"{pct} CI"), fractions[name][2]]
                for name in METRICS]
        lines += markdown_table(rows, ["metric", f"value ({pct} CI low–high)", "n"])
        lines += ["", "## Confusion matrix at the threshold (rows: true, columns: predicted)", ""]
        lines += _md_confusion(self.confusion)
        if self.confusion_multiclass is not None and self.per_class is not None:
            lines += ["", f"## All {len(self.classes)} classes, argmax prediction "
                          f"(accuracy {format_number(self.accuracy_multiclass)})", ""]
            lines += _md_confusion(self.confusion_multiclass)
            lines.append("")
            lines += markdown_table([[c, int(r.support), int(r.n_predicted), format_number(r.sensitivity),
                                      format_number(r.ppv), format_number(r.f1)] for c, r in self.per_class.iterrows()],
                                    ["class", "support", "predicted", "sensitivity", "PPV", "F1"])
        for title, table in (("source", self.by_source), ("view", self.by_view)):
            lines += ["", f"## By {title}", ""]
            lines += _md_group_table(table, title)
        lines += ["", "## Classification report", "", "```", self.classification_report.rstrip(), "```", ""]
        return "\n".join(lines)


def evaluate(
    test_predictions: pd.DataFrame,
    classes: Sequence[str],
    threshold: float,
    positive_class: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    *,
    threshold_chosen_by: str | None = None,
    level: float = 0.95,
) -> Evaluation:
    """Evaluate test predictions at a threshold chosen beforehand on validation.

    ``test_predictions``: one row per image (``label``, ``patient_id``, ``source``, ``view``,
    ``prob_<class>``...). ``threshold`` applies to ``prob_<positive_class>``; pass the result of
    :func:`threshold_from_validation` (it records how it was chosen) or say so in
    ``threshold_chosen_by``. Returns an :class:`Evaluation` with CIs over patients.
    """
    classes = _check_classes(classes)
    positive = resolve_positive_class(classes, positive_class)
    frame = check_predictions(test_predictions, classes, name="test_predictions")
    threshold_value = _check_threshold(threshold)
    if threshold_chosen_by is None:
        threshold_chosen_by = getattr(threshold, "chosen_by", "given as a number by the caller (how it was chosen is not recorded)")

    y_true, y_score, patient_ids = binary_targets(frame, classes, positive)
    metrics = binary_metrics(y_true, y_score, threshold_value)
    ci = bootstrap_ci(y_true, y_score, patient_ids, threshold_value, n_boot=n_boot, seed=seed, level=level)
    negative = classes[0] if len(classes) == 2 else f"not {positive}"
    names = np.array([negative, positive], dtype=object)
    confusion = confusion_table(names[y_true], names[(y_score >= threshold_value).astype(int)], (negative, positive))

    labels = frame["label"].to_numpy(dtype=object)
    confusion_multiclass = per_class = accuracy_multiclass = None
    if len(classes) > 2:
        probs = frame[[probability_column(c) for c in classes]].to_numpy(dtype=np.float64)
        per_class = multiclass_metrics(labels, probs, classes)
        confusion_multiclass = confusion_table(labels, argmax_labels(probs, classes), classes)
        accuracy_multiclass = per_class.attrs["accuracy"]
        report = per_class.attrs["classification_report"]
    else:
        report = classification_report(names[y_true], names[(y_score >= threshold_value).astype(int)],
                                       labels=[negative, positive], digits=3, zero_division=np.nan)

    patients_per_class = {c: int(frame.loc[frame["label"] == c, "patient_id"].nunique()) for c in classes}
    images_per_class = {c: int((frame["label"] == c).sum()) for c in classes}
    group_args = dict(classes=classes, threshold=threshold_value, positive_class=positive, n_boot=n_boot, seed=seed, level=level)
    findings = dataset_findings(frame, classes, positive)
    return Evaluation(
        classes=classes,
        positive_class=positive,
        threshold=threshold_value,
        threshold_chosen_by=threshold_chosen_by,
        n_images=len(frame),
        n_patients=int(frame["patient_id"].nunique()),
        patients_per_class=patients_per_class,
        images_per_class=images_per_class,
        metrics=metrics,
        ci=ci,
        confusion=confusion,
        classification_report=report,
        by_source=breakdown(frame, "source", **group_args),
        by_view=breakdown(frame, "view", **group_args),
        confusion_multiclass=confusion_multiclass,
        per_class=per_class,
        accuracy_multiclass=accuracy_multiclass,
        warnings=[f.message for f in findings],
        findings=findings,
        n_boot=n_boot,
        seed=seed,
        level=level,
    )


def dataset_findings(predictions: pd.DataFrame, classes: Sequence[str], positive_class: str | None = None) -> list[Finding]:
    """Each reason not to trust a test set's numbers, as a :class:`~xraylib.reporting.Finding`:
    ``source_class_confounded`` (no source holds more than one class; numbers: sources per class),
    ``one_source`` (every class from one source), ``few_positive_patients`` (fewer than
    :data:`MIN_POSITIVE_PATIENTS`; numbers: the count)."""
    positive = resolve_positive_class(classes, positive_class)
    frame = check_predictions(predictions, classes)
    sources = _group_values(frame, "source").to_numpy()
    labels = frame["label"].to_numpy(dtype=object)
    out = []
    sources_per_class = {c: sorted(set(sources[labels == c])) for c in classes if (labels == c).any()}
    classes_per_source = [len(set(labels[sources == s])) for s in set(sources)]
    if len(sources_per_class) > 1 and max(classes_per_source) <= 1:
        where = "; ".join(f"{c}: {', '.join(s)}" for c, s in sources_per_class.items())
        out.append(Finding("source_class_confounded", (
            f"source and class are confounded: no source holds more than one class ({where}); "
            "a model can score well here by recognising the dataset, not the disease"),
            {"sources_per_class": sources_per_class}, level="shortcut"))
    elif len(sources_per_class) > 1 and all(len(s) == 1 for s in sources_per_class.values()):
        source = next(iter(sources_per_class.values()))[0]
        out.append(Finding("one_source", (
            f"all classes come from one source ({source}): "
            "no external validation; results may not carry over to other hospitals"), {"source": source}))
    n_positive_patients = int(pd.unique(frame["patient_id"].to_numpy(dtype=object)[labels == positive]).size)
    if n_positive_patients < MIN_POSITIVE_PATIENTS:
        out.append(Finding("few_positive_patients", (
            f"only {n_positive_patients} {positive} patient(s) in the test set (fewer than {MIN_POSITIVE_PATIENTS}): "
            "the intervals are wide and the point values unstable"),
            {"positive_class": positive, "n_positive_patients": n_positive_patients,
             "min_positive_patients": MIN_POSITIVE_PATIENTS}))
    return out


def dataset_warnings(predictions: pd.DataFrame, classes: Sequence[str], positive_class: str | None = None) -> list[str]:
    """The messages of :func:`dataset_findings`: one line per reason not to trust a test set's numbers."""
    return [f.message for f in dataset_findings(predictions, classes, positive_class)]


def write_report(evaluation: Evaluation, out_dir: str | os.PathLike, name: str = "evaluation") -> dict[str, Path]:
    """Write ``<name>.json`` and ``<name>.md`` into ``out_dir`` (atomically); return ``{"json": path, "md": path}``."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md"}
    write_json_atomic(paths["json"], evaluation.to_dict())
    write_text_atomic(paths["md"], evaluation.to_markdown())
    return paths


# ---------------------------------------------------------------------------------------------
# Formatting helpers




def _confusion_dict(table: pd.DataFrame) -> dict[str, Any]:
    return {"labels": [str(c) for c in table.columns], "rows_true_columns_predicted": table.to_numpy().tolist()}


def _fractions(m: dict[str, Any]) -> dict[str, tuple[int, int, str]]:
    """(numerator, denominator, text) of each metric, in images; AUC's text gives positives x negatives."""
    tp, fp, tn, fn = m["tp"], m["fp"], m["tn"], m["fn"]
    parts = {
        "accuracy": (tp + tn, m["n"]),
        "sensitivity": (tp, tp + fn),
        "specificity": (tn, tn + fp),
        "precision": (tp, tp + fp),
        "npv": (tn, tn + fn),
        "f1": (2 * tp, 2 * tp + fp + fn),
    }
    out = {k: (a, b, f"{a}/{b} images") for k, (a, b) in parts.items()}
    out["f1"] = (2 * tp, 2 * tp + fp + fn, f"{m['n']} images")
    out["roc_auc"] = (m["n_positive"], m["n_negative"], f"{m['n_positive']} pos / {m['n_negative']} neg images")
    return out


def _md_confusion(table: pd.DataFrame) -> list[str]:
    header = ["true \\ predicted", *[str(c) for c in table.columns]]
    return markdown_table([[str(i), *[int(v) for v in row]] for i, row in zip(table.index, table.to_numpy())], header)


def _md_group_table(table: pd.DataFrame, title: str) -> list[str]:
    header = [title, "patients", "images", "positive / negative images", "AUC", "sensitivity", "specificity", "accuracy"]
    rows = [[group, int(r["n_patients"]), int(r["n_images"]), f"{int(r['n_positive'])} / {int(r['n_negative'])}",
             *[format_interval(r[m], (r[f"{m}_low"], r[f"{m}_high"])) for m in ("roc_auc", "sensitivity", "specificity", "accuracy")]]
            for group, r in table.iterrows()]
    return markdown_table(rows, header)


# --------------------------------------------------------------------------------------------
# Evaluating a saved model on the preprocessed splits (notebook 04, `python -m xraylib evaluate`)


# --------------------------------------------------------------------------------------------
# Looking at single images: true labels for files, the most confident mistakes


def _path_key(path: "str | os.PathLike") -> str:
    return os.path.normcase(os.path.normpath(os.path.abspath(os.fspath(path))))


def true_labels(paths: Sequence["str | os.PathLike"], frame: Any) -> list[str | None]:
    """The true label of each of ``paths`` from a table with ``path`` and ``label`` columns (a manifest, a split's
    ``manifest``, a prediction table) or anything with a ``.manifest`` (:class:`~xraylib.preprocess.PreprocessedData`);
    None for a path the table does not hold (an image of your own: shown as "true: unknown")."""
    table = frame.manifest if hasattr(frame, "manifest") and not isinstance(frame, pd.DataFrame) else frame
    if not isinstance(table, pd.DataFrame) or not {"path", "label"} <= set(table.columns):
        raise ConfigError("true_labels needs a table with 'path' and 'label' columns (a manifest or preprocessed data)")
    lookup = {_path_key(p): str(label) for p, label in zip(table["path"], table["label"]) if isinstance(p, str)}
    return [lookup.get(_path_key(p)) for p in paths]


def top_losses(predictions: pd.DataFrame, classes: Sequence[str], threshold: float = 0.5,
               positive_class: str | None = None, k: int = 8, mistakes_only: bool = True) -> pd.DataFrame:
    """The ``k`` images with the highest loss (cross-entropy of the positive class vs the rest), mistakes at
    ``threshold`` first: like fastai's ``plot_top_losses``. ``predictions``: a prediction table (e.g.
    ``result.test_predictions`` of :func:`xraylib.runs.evaluate`), row for row with its split's images.

    Returns a table of at most ``k`` rows, highest loss first, with ``position`` (the row in ``predictions``,
    hence in ``data[split].images``), ``path``, ``label``, ``predicted``, ``prob`` (P(positive)), ``loss`` and
    ``mistake``. ``mistakes_only``: only wrong decisions (an empty table when there is none).
    """
    positive = resolve_positive_class(classes, positive_class)
    y_true, y_score, _ = binary_targets(predictions, classes, positive)
    others = [c for c in classes if c != positive]
    negative_name = others[0] if len(others) == 1 else f"not {positive}"
    called = y_score >= float(threshold)
    p = np.clip(y_score, 1e-7, 1 - 1e-7)
    loss = np.where(y_true == 1, -np.log(p), -np.log(1 - p))
    table = pd.DataFrame({
        "position": np.arange(len(predictions)),
        "path": predictions["path"].to_numpy(dtype=object) if "path" in predictions.columns else None,
        "label": predictions["label"].to_numpy(dtype=object),
        "predicted": np.where(called, positive, negative_name),
        "prob": y_score, "loss": loss, "mistake": called != (y_true == 1)})
    if mistakes_only:
        table = table[table["mistake"]]
    table = table.sort_values(["mistake", "loss"], ascending=[False, False], kind="mergesort")
    return table.head(max(0, int(k))).reset_index(drop=True)
