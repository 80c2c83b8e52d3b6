"""What to expect in a hospital the model never saw: the out-of-site estimate, and a threshold that transfers.

An internal test split comes from the same hospitals as the training images, so it measures how
well a model knows those hospitals. This module estimates what happens elsewhere, before going
there, by grouped cross-validation over *sites* (the manifest's ``site`` column: where an image was
made, as far as the data say):

- **Folds pair sites.** In the public data most sites hold one class only: COVID-19 comes from
  ieee8023's many sub-sites, while Kaggle, NIH/RSNA and the NLM hospitals are normal only. A fold
  that held out a COVID-19 site alone would test nothing about normals (and the reverse), so every
  fold holds out one group of sites with positives *and* one group of sites without, balanced by
  patients (:func:`site_folds`). Sites that hold both classes count as sites with positives.
- **Which model it describes.** Each fold trains the model's *head* on the frozen backbone's
  cached features (:mod:`xraylib.features`) of the training split outside the held-out sites, with
  the model's own training settings (epochs, batch, Adam, class weights, augmented views). That is
  the whole model when the backbone is frozen; a fine-tuned model differs by its fine-tuning,
  which costs minutes per fold instead of seconds (the quality benchmark reports how far apart
  the two are on one fold).
- **Thresholds, nested.** A threshold is scored only on sites it was not chosen on. The
  *validation* rule (xraylib's default until now) picks, in each fold, the threshold on that
  fold's own in-distribution validation images; the *out-of-site* rule picks it on the pooled
  held-out predictions of the *other* folds (:func:`transfer_threshold`: the median over patient
  bootstrap resamples of the highest threshold that keeps sensitivity >= the target, so one
  image cannot move it; its bootstrap spread is reported).
- **Intervals.** AUC, sensitivity and specificity carry 95% intervals from resampling held-out
  patients; the spread between folds is reported beside them.

:func:`estimate` runs it for a model on preprocessed data (only the train and val splits: the test
split stays untouched for the internal score); :func:`compare_with_internal` says in plain words
when the internal score and the estimate disagree, and which to believe.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import keras
import numpy as np
import pandas as pd

from . import evaluate as judge
from . import features, models
from .batches import AugmentSettings, epoch_order
from .train import THRESHOLD_ON, class_weights
from .errors import ConfigError
from .fileio import json_safe
from .preprocess import PreprocessedData
from .reporting import Finding, format_interval, format_number, markdown_table, probability_columns
from .sources import source_by_name

__all__ = ["site_of", "Fold", "site_folds", "transfer_threshold", "FoldFeatures", "fold_features", "fit_heads",
           "OutOfSiteResult", "estimate", "for_model", "compare_with_internal", "THRESHOLD_SOURCES"]

#: Where a model's decision threshold can be chosen: its validation split, or out-of-site predictions.
THRESHOLD_SOURCES = THRESHOLD_ON
#: At most this many folds (each fold holds out one group of sites with positives and one without).
MAX_FOLDS = 5
#: Patient bootstrap resamples behind the out-of-site threshold.
THRESHOLD_BOOT = 200


class OutOfSiteError(ConfigError):
    """The data cannot support an out-of-site estimate (too few sites of each kind)."""


# --------------------------------------------------------------------------------------------
# Sites and folds


def site_of(manifest: pd.DataFrame) -> pd.Series:
    """Each row's site: the manifest's ``site`` where it names one, else its source's hospital group
    (``Source.site``), else its source (your own images: one site per source)."""
    names = manifest["source"].astype(str)
    groups = {name: getattr(source_by_name(name), "site", name) for name in names.unique()}
    fallback = names.map(groups)
    if "site" not in manifest.columns:
        return fallback.rename("site")
    site = manifest["site"].astype(object)
    missing = site.isna() | (site.astype(str).str.strip() == "")
    return site.where(~missing, fallback).astype(str).rename("site")


@dataclass(frozen=True)
class Fold:
    """One fold: the sites it holds out, those with positives and those without."""

    index: int
    positive_sites: tuple[str, ...]
    negative_sites: tuple[str, ...]

    @property
    def sites(self) -> tuple[str, ...]:
        return self.positive_sites + self.negative_sites

    def describe(self, limit: int = 4) -> str:
        def names(sites: tuple[str, ...]) -> str:
            shown = ", ".join(sites[:limit])
            return shown + (f" and {len(sites) - limit} more" if len(sites) > limit else "")
        return f"{names(self.positive_sites)} | {names(self.negative_sites)}"


def fold_unit(site: str) -> str:
    """What a fold holds out together: ieee8023's sites by country (``ieee8023:italy`` and ``ieee8023:italy/brescia``
    may be one hospital under two spellings, so they never sit on both sides of a fold); a publication or web site
    (``ieee8023:doi:...``, ``ieee8023:url:...``) and every other site alone."""
    source, _, rest = site.partition(":")
    if source != "ieee8023" or not rest or rest.startswith(("doi:", "url:")):
        return site
    return f"{source}:{rest.split('/')[0]}"


def _balanced_groups(patients: pd.Series, k: int) -> list[tuple[str, ...]]:
    """``k`` groups of the sites in ``patients`` (site -> patient count), balanced by patients: largest site first
    into the group with the fewest patients so far (ties: the lower group), names sorted inside each group."""
    groups: list[list[str]] = [[] for _ in range(k)]
    totals = [0] * k
    for site, count in sorted(patients.items(), key=lambda item: (-item[1], item[0])):
        target = min(range(k), key=lambda g: (totals[g], g))
        groups[target].append(site)
        totals[target] += int(count)
    return [tuple(sorted(group)) for group in groups]


def site_folds(rows: pd.DataFrame, classes: Sequence[str], positive_class: str | None = None,
               max_folds: int = MAX_FOLDS) -> list[Fold]:
    """The folds of the out-of-site estimate for ``rows`` (a manifest with ``label``, ``patient_id``, ``source``
    and, where known, ``site``).

    Sites with images of the positive class are split into k groups, the other sites into k groups
    (k = the smaller of the two site counts, at most ``max_folds``), each balanced by patients, and
    fold i holds out positive group i with negative group i. ieee8023's sites of one country move together
    (:func:`fold_unit`). Raises :class:`OutOfSiteError` when
    there are fewer than two sites of either kind (no fold could hold one out and still train on it).
    """
    positive = judge.resolve_positive_class(classes, positive_class)
    sites = site_of(rows)
    frame = pd.DataFrame({"site": sites.to_numpy(), "unit": sites.map(fold_unit).to_numpy(),
                          "patient_id": rows["patient_id"].to_numpy(), "positive": (rows["label"] == positive).to_numpy()})
    has_positive = frame.groupby("unit")["positive"].any()
    patients = frame.groupby("unit")["patient_id"].nunique()
    positive_sites = patients[has_positive[patients.index]]
    negative_sites = patients[~has_positive[patients.index]]
    k = min(len(positive_sites), len(negative_sites), max_folds)
    if k < 2:
        raise OutOfSiteError(
            f"an out-of-site estimate needs at least two sites with {positive} images and two without, so that each "
            f"fold can hold one of each out and still train on another; these data have {len(positive_sites)} "
            f"({', '.join(positive_sites.index[:5]) or 'none'}) and {len(negative_sites)} "
            f"({', '.join(negative_sites.index[:5]) or 'none'}). Add a source from another hospital, or rebuild the "
            "manifest with this xraylib (it records each image's site)")
    members = frame.groupby("unit")["site"].unique()

    def expand(units: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(sorted({site for unit in units for site in members[unit]}))

    pairs = zip(_balanced_groups(positive_sites, k), _balanced_groups(negative_sites, k))
    return [Fold(i + 1, expand(pos), expand(neg)) for i, (pos, neg) in enumerate(pairs)]


# --------------------------------------------------------------------------------------------
# Thresholds


def transfer_threshold(y_true: np.ndarray, y_score: np.ndarray, patient_ids: np.ndarray, min_sensitivity: float,
                       n_boot: int = THRESHOLD_BOOT, seed: int = 0) -> tuple[float, tuple[float, float]]:
    """A threshold that keeps sensitivity >= ``min_sensitivity`` and does not hang on one image: the median, over
    ``n_boot`` resamples of patients, of the highest such threshold on each resample. Returns (threshold,
    (2.5th, 97.5th percentile) of the resampled thresholds)."""
    y_true = np.asarray(y_true, dtype=np.int8)
    y_score = np.asarray(y_score, dtype=np.float64)
    codes, uniques = pd.factorize(pd.Series(np.asarray(patient_ids, dtype=object)))
    members = [np.flatnonzero(codes == c) for c in range(len(uniques))]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        rows = np.concatenate([members[p] for p in rng.integers(0, len(members), len(members))])
        if y_true[rows].min() == y_true[rows].max():
            continue
        values.append(_highest_threshold(y_true[rows], y_score[rows], min_sensitivity))
    if not values:
        return 0.5, (math.nan, math.nan)
    low, high = np.percentile(values, [2.5, 97.5])
    return float(np.median(values)), (float(low), float(high))


def _highest_threshold(y_true: np.ndarray, y_score: np.ndarray, min_sensitivity: float) -> float:
    """The highest threshold with sensitivity >= ``min_sensitivity``: the k-th highest positive score, k the fewest
    positives that must be called (what :func:`xraylib.evaluate.choose_threshold` finds, without its ROC walk)."""
    positives = np.sort(y_score[y_true == 1])[::-1]
    k = max(1, math.ceil(min_sensitivity * len(positives) - 1e-9))
    return float(positives[k - 1])


# --------------------------------------------------------------------------------------------
# Features and heads


@dataclass
class FoldFeatures:
    """The rows the estimate uses (the train and val splits, ``split`` column) with their cached features:
    ``plain`` ``(N, D)`` every row's plain image; ``train_views`` K arrays ``(N_train, D)`` of the train rows
    (view 0 plain, then the augmented views training used); ``labels`` ``(N,)`` class indices."""

    rows: pd.DataFrame
    plain: np.ndarray
    train_views: list[np.ndarray]
    labels: np.ndarray
    classes: tuple[str, ...]


def fold_features(model: keras.Model, data: PreprocessedData, spec: models.ModelSpec, augment_views: int = 1,
                  augment: AugmentSettings | None = None, progress: bool = False) -> FoldFeatures:
    """The cached backbone features of ``data``'s train and val splits through ``model`` (computed where missing:
    after training they are all in the cache already)."""
    cache = features.cached_features(model, data, spec, views=augment_views, augment=augment, progress=progress)
    rows = pd.concat([data["train"].manifest.assign(split="train"), data["val"].manifest.assign(split="val")],
                     ignore_index=True)
    plain = np.concatenate([np.asarray(cache.train_views[0]), np.asarray(cache.val)])
    labels = np.concatenate([data["train"].labels, data["val"].labels]).astype(np.int64)
    return FoldFeatures(rows, plain, [np.asarray(v) for v in cache.train_views], labels, tuple(data.classes))


def fit_heads(views: Sequence[np.ndarray], labels: np.ndarray, n_classes: int, spec: models.ModelSpec,
              epochs: int, batch_size: int, learning_rate: float, class_weighting: bool = True, heads: int = 1,
              seed: int = 0) -> keras.Model:
    """Train ``heads`` copies of ``spec``'s head (each from its own initialisation) on cached features, in one
    Keras fit: each epoch every row is seen once, in the order and view :class:`xraylib.batches.FeatureBatches`
    would draw. Returns a model from ``(N, D)`` features to ``(N, heads * n_classes)`` probabilities (see
    :func:`predict_heads`)."""
    import tensorflow as tf

    n, dim = len(labels), int(views[0].shape[1])
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((dim,), name="features")
    branches = models.head(n_classes, spec.head_units, spec.dropout, heads=heads).branches  # the model's own head
    outputs = models.apply_branches(branches, inputs, keras.layers.Concatenate() if heads > 1 else None)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=models.EnsembleLoss(heads),
                  steps_per_execution=64, jit_compile=False)
    table = np.concatenate([np.asarray(v, dtype=np.float32) for v in views])
    rng = np.random.default_rng([seed, 7])
    weights = np.ones(n_classes, dtype=np.float32)
    if class_weighting:
        weights = np.asarray([class_weights(labels, n_classes)[c] for c in range(n_classes)], dtype=np.float32)
    index = np.concatenate([epoch_order(n, seed, e) + n * rng.integers(0, len(views), n) for e in range(epochs)])
    row = index % n
    dataset = (tf.data.Dataset.from_tensor_slices((index.astype(np.int64), np.eye(n_classes, dtype=np.float32)[labels[row]],
                                                   weights[labels[row]]))
               .batch(batch_size)
               .map(lambda i, y, w: (tf.gather(table, i), y, w))
               .prefetch(4))
    model.fit(dataset, epochs=1, verbose=0, shuffle=False)
    return model


def predict_heads(model: keras.Model, x: np.ndarray, n_classes: int) -> np.ndarray:
    """``(N, n_classes)`` probabilities of a :func:`fit_heads` model: the mean over its heads."""
    if len(x) == 0:
        return np.zeros((0, n_classes), dtype=np.float32)
    # One eager call (features are small): no per-model tf.function to trace, as model.predict would for every fold.
    out = np.asarray(keras.ops.convert_to_numpy(model(np.asarray(x, dtype=np.float32), training=False)), dtype=np.float32)
    return out.reshape(len(x), -1, n_classes).mean(axis=1)


# --------------------------------------------------------------------------------------------
# The estimate


@dataclass
class OutOfSiteResult:
    """The out-of-site estimate. ``predictions``: every held-out row with ``fold`` and ``prob_<class>``;
    ``folds``: one row per fold; ``metrics``: pooled over folds with ``{name}_low/_high``; ``thresholds``: the
    threshold each rule gives the model trained on everything (``out_of_site`` with its bootstrap ``spread``)."""

    classes: tuple[str, ...]
    positive_class: str
    folds: pd.DataFrame
    predictions: pd.DataFrame
    metrics: dict[str, Any]
    thresholds: dict[str, Any]
    model_rule: str
    heads: int = 1
    min_sensitivity: float = 0.95
    describes: str = "the model's head trained on the frozen backbone's cached features"
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (NaN becomes None): what ``model.json`` keeps under ``out_of_site``."""
        return json_safe({
            "describes": self.describes, "positive_class": self.positive_class, "heads": self.heads,
            "min_sensitivity": self.min_sensitivity, "model_rule": self.model_rule,
            "folds": self.folds.to_dict("records"), "metrics": self.metrics, "thresholds": self.thresholds,
            "notes": list(self.notes),
        })

    def to_markdown(self) -> list[str]:
        return markdown_lines(self.to_dict())


def _validation_threshold(y_true: np.ndarray, y_score: np.ndarray, rule: str | float,
                          min_sensitivity: float) -> float | None:
    """The validation rule's threshold (the model's ``threshold_rule``) on a fold's validation images; None where
    they hold one class only."""
    if len(y_true) == 0 or y_true.all() or not y_true.any():
        return None
    return float(judge.choose_threshold(y_true, y_score, rule=rule, min_sensitivity=min_sensitivity))


def _rates(y_true: np.ndarray, decisions: np.ndarray) -> tuple[float, float]:
    """(sensitivity, specificity) of 0/1 decisions (NaN where a class is absent)."""
    metrics = judge.binary_metrics(y_true, decisions.astype(np.float64), 0.5)
    return metrics["sensitivity"], metrics["specificity"]


def estimate(data: PreprocessedData, spec: models.ModelSpec, model: keras.Model, *, epochs: int = 25,
             batch_size: int = 8, learning_rate: float = 1e-3, class_weighting: bool = True, augment_views: int = 1,
             augment: AugmentSettings | None = None, min_sensitivity: float = 0.95, model_rule: str = "validation",
             threshold_rule: str | float = "max_specificity_at_sensitivity",
             heads: int = 1, seed: int = 0, n_boot: int = 1000, positive_class: str | None = None,
             max_folds: int = MAX_FOLDS, feats: FoldFeatures | None = None, progress: bool = False) -> OutOfSiteResult:
    """The out-of-site estimate of ``model`` (its backbone frozen) trained as given on ``data`` (see the module).

    ``model_rule``: the rule of the model's own threshold (one of :data:`THRESHOLD_SOURCES`), the one
    whose nested sensitivity and specificity are "at the model's own threshold"; ``threshold_rule``: how the
    validation rule chooses (:func:`xraylib.evaluate.choose_threshold`). ``heads`` > 1 trains
    an ensemble of heads per fold and averages them. Raises :class:`OutOfSiteError` when the data have too
    few sites, :class:`ConfigError` when the backbone is not frozen.
    """
    if model_rule not in THRESHOLD_SOURCES:
        raise ConfigError(f"model_rule must be one of {THRESHOLD_SOURCES}, got {model_rule!r}")
    feats = feats or fold_features(model, data, spec, augment_views, augment, progress)
    classes = feats.classes
    positive = judge.resolve_positive_class(classes, positive_class)
    folds = site_folds(feats.rows, classes, positive, max_folds)
    site = site_of(feats.rows).to_numpy()
    is_train = (feats.rows["split"] == "train").to_numpy()
    train_rows = np.flatnonzero(is_train)  # row i of train_views is feats.rows' i-th train row
    column = list(classes).index(positive)
    y_all = (feats.labels == column).astype(np.int8)
    patients = feats.rows["patient_id"].to_numpy(dtype=object)
    scores = np.full(len(site), np.nan)
    fold_of = np.zeros(len(site), dtype=np.int64)
    validation_thresholds: dict[int, float] = {}
    notes = [f"{len(folds)} folds; each holds out sites with {positive} images together with sites without "
             "(ieee8023's sites of one country together)"]
    for fold in folds:
        held = np.isin(site, fold.sites)
        keep = ~held[train_rows]
        y_fit = feats.labels[train_rows][keep]
        if (y_fit == column).all() or not (y_fit == column).any():
            notes.append(f"fold {fold.index} ({fold.describe()}) left out: without its sites the training split holds "
                         f"{'no' if len(y_fit) == 0 else 'one class of'} images")
            continue
        head = fit_heads([v[keep] for v in feats.train_views], y_fit, len(classes), spec,
                         epochs, batch_size, learning_rate, class_weighting, heads, seed + fold.index)
        val = ~held & ~is_train
        probabilities = predict_heads(head, feats.plain[held | val], len(classes))[:, column]
        scores[held] = probabilities[held[held | val]]
        fold_of[held] = fold.index
        validation_thresholds[fold.index] = _validation_threshold(y_all[val], probabilities[val[held | val]],
                                                                  threshold_rule, min_sensitivity)
        if validation_thresholds[fold.index] is None:
            validation_thresholds[fold.index] = 0.5
            notes.append(f"fold {fold.index}: its validation images hold one class only; the validation rule fell back "
                         "to 0.5 there")
    folds = [fold for fold in folds if fold.index in validation_thresholds]
    if len(folds) < 2:
        raise OutOfSiteError("fewer than two folds could train on both classes: " + "; ".join(notes[1:]))

    held_out = fold_of > 0
    y, score, pid, fold_ids = y_all[held_out], scores[held_out], patients[held_out], fold_of[held_out]
    decisions = {"validation": np.zeros(len(y), dtype=np.int8), "out_of_site": np.zeros(len(y), dtype=np.int8)}
    nested: dict[int, dict[str, float]] = {}
    for fold in folds:
        mine, others = fold_ids == fold.index, fold_ids != fold.index
        transfer, _ = transfer_threshold(y[others], score[others], pid[others], min_sensitivity, seed=seed)
        nested[fold.index] = {"validation": validation_thresholds[fold.index], "out_of_site": transfer}
        for rule in THRESHOLD_SOURCES:
            decisions[rule][mine] = score[mine] >= nested[fold.index][rule]

    metrics: dict[str, Any] = {"n_images": int(len(y)), "n_patients": int(pd.Series(pid).nunique()),
                               "n_positive_patients": int(pd.Series(pid[y == 1]).nunique()),
                               "n_negative_patients": int(pd.Series(pid[y == 0]).nunique())}
    auc_ci = judge.bootstrap_ci(y, score, pid, 0.5, n_boot=n_boot, seed=seed)["roc_auc"]
    metrics["roc_auc"] = judge.binary_metrics(y, score)["roc_auc"]
    metrics["roc_auc_low"], metrics["roc_auc_high"] = auc_ci
    for rule in THRESHOLD_SOURCES:
        sensitivity, specificity = _rates(y, decisions[rule])
        ci = judge.bootstrap_ci(y, decisions[rule].astype(np.float64), pid, 0.5, n_boot=n_boot, seed=seed)
        for name, value in (("sensitivity", sensitivity), ("specificity", specificity)):
            metrics[f"{name}_{rule}"] = value
            metrics[f"{name}_{rule}_low"], metrics[f"{name}_{rule}_high"] = ci[name]
    for name in ("sensitivity", "specificity"):
        metrics[name] = metrics[f"{name}_{model_rule}"]
        metrics[f"{name}_low"], metrics[f"{name}_high"] = metrics[f"{name}_{model_rule}_low"], metrics[f"{name}_{model_rule}_high"]

    table = []
    for fold in folds:
        mine = fold_ids == fold.index
        row: dict[str, Any] = {"fold": fold.index, "held_out": fold.describe(),
                               "positive_sites": len(fold.positive_sites), "negative_sites": len(fold.negative_sites),
                               "n_images": int(mine.sum()), "n_positive_patients": int(pd.Series(pid[mine & (y == 1)]).nunique()),
                               "n_negative_patients": int(pd.Series(pid[mine & (y == 0)]).nunique()),
                               "roc_auc": judge.binary_metrics(y[mine], score[mine])["roc_auc"]}
        for rule in THRESHOLD_SOURCES:
            row[f"threshold_{rule}"] = nested[fold.index][rule]
            row[f"sensitivity_{rule}"], row[f"specificity_{rule}"] = _rates(y[mine], decisions[rule][mine])
        table.append(row)
    folds_table = pd.DataFrame(table)
    for name in ("roc_auc", *(f"{metric}_{rule}" for rule in THRESHOLD_SOURCES for metric in ("sensitivity", "specificity"))):
        values = folds_table[name].dropna()
        metrics[f"{name}_fold_min"] = float(values.min()) if len(values) else math.nan
        metrics[f"{name}_fold_max"] = float(values.max()) if len(values) else math.nan

    value, spread = transfer_threshold(y, score, pid, min_sensitivity, seed=seed)
    thresholds = {"out_of_site": {"value": value, "spread": list(spread), "n_boot": THRESHOLD_BOOT,
                                  "chosen_on": f"pooled out-of-site predictions ({len(y)} images, {len(folds)} folds)"}}
    predictions = feats.rows[held_out].reset_index(drop=True).assign(fold=fold_ids)
    predictions["site"] = site[held_out]
    probability = np.zeros((len(y), len(classes)), dtype=np.float32)
    probability[:, column] = score
    predictions[probability_columns(classes)] = probability  # only the positive class's column is meaningful
    return OutOfSiteResult(classes, positive, folds_table, predictions, metrics, thresholds, model_rule, heads,
                           min_sensitivity, notes=notes)


def for_model(model: keras.Model, data: PreprocessedData, spec: models.ModelSpec, settings: Any,
              positive_class: str | None = None, n_boot: int = 1000, heads: int | None = None,
              progress: bool = False) -> tuple[OutOfSiteResult | None, str | None]:
    """:func:`estimate` with a model's own training settings (a :class:`xraylib.train.TrainSettings`) and heads
    (``spec.heads`` unless ``heads`` is given), or ``(None, why not)`` where it cannot run (the backbone is trained,
    too few sites): never raises for those."""
    if "head_pool" not in {layer.name for layer in getattr(model, "layers", [])}:
        return None, ("no out-of-site estimate: this model's layers cannot be reached (a SavedModel export); "
                      "load its model.keras instead")
    if not features.can_cache(model):
        return None, ("no out-of-site estimate: this model's backbone is trained (the small CNN, or fine-tuned), "
                      "so the estimate's heads on cached features would describe another model")
    try:
        result = estimate(data, spec, model, epochs=settings.epochs, batch_size=settings.batch_size,
                          learning_rate=settings.learning_rate, class_weighting=settings.class_weighting,
                          augment_views=settings.augment_views if settings.augment else 1, augment=settings.augment,
                          min_sensitivity=settings.min_sensitivity, model_rule=settings.threshold_on,
                          threshold_rule=settings.threshold_rule,
                          heads=heads or spec.heads, seed=settings.seed, n_boot=n_boot, positive_class=positive_class,
                          progress=progress)
    except OutOfSiteError as exc:
        return None, f"no out-of-site estimate: {exc}"
    return result, None


# --------------------------------------------------------------------------------------------
# Reporting


def compare_with_internal(internal_auc: float, estimate_dict: dict[str, Any]) -> Finding:
    """One plain-words finding: do the internal test AUC and the out-of-site estimate agree, and which to believe."""
    metrics = estimate_dict["metrics"]
    auc, low, high = metrics.get("roc_auc"), metrics.get("roc_auc_low"), metrics.get("roc_auc_high")
    numbers = {"internal_auc": internal_auc, "out_of_site_auc": auc, "out_of_site_low": low, "out_of_site_high": high}
    estimate_text = f"AUC {format_interval(auc, (low, high))}"
    if internal_auc is None or auc is None or not math.isfinite(internal_auc):
        return Finding("out_of_site", "the internal score and the out-of-site estimate cannot be compared", numbers, "caution")
    outside = low is None or high is None or not (low <= internal_auc <= high)
    if internal_auc - auc > 0.05 and outside:
        return Finding("out_of_site", (
            f"the internal test score (AUC {format_number(internal_auc)}) is higher than the out-of-site estimate "
            f"({estimate_text}): the test split comes from the same hospitals as the training images, so it measures "
            "how well the model knows them. In a hospital it never saw, expect the out-of-site estimate, and check "
            "the decision threshold there (calibrate with your own normals)."), numbers, "caution")
    if auc - internal_auc > 0.05 and outside:
        return Finding("out_of_site", (
            f"the internal test score (AUC {format_number(internal_auc)}) is lower than the out-of-site estimate "
            f"({estimate_text}): a small or unusual test split can do that. For a new hospital the out-of-site "
            "estimate, over more patients and several sites, is the better guide, but neither promises much."),
            numbers, "caution")
    return Finding("out_of_site", (
        f"the internal test score (AUC {format_number(internal_auc)}) and the out-of-site estimate ({estimate_text}) "
        "agree within 0.05 or within the estimate's interval; a new hospital may still differ from every site here."),
        numbers, "ok")


def markdown_lines(estimate_dict: dict[str, Any], internal_auc: float | None = None) -> list[str]:
    """The estimate as Markdown (model card, evaluation report, notebook 04): pooled metrics, the thresholds
    and the per-fold table."""
    m = estimate_dict["metrics"]
    rule = estimate_dict.get("model_rule", "validation")
    lines = [
        f"Estimated by holding out whole sites ({len(estimate_dict['folds'])} folds; each fold holds out sites with "
        f"{estimate_dict['positive_class']} images together with sites without), describing "
        f"{estimate_dict['describes']}"
        + (f", an ensemble of {estimate_dict['heads']} heads" if estimate_dict.get("heads", 1) > 1 else "") + ".",
        "",
    ]
    rows = [["AUC", format_interval(m["roc_auc"], (m["roc_auc_low"], m["roc_auc_high"])),
             f"{format_number(m['roc_auc_fold_min'])} to {format_number(m['roc_auc_fold_max'])}"]]
    for name in THRESHOLD_SOURCES:
        own = " (the model's own)" if name == rule else ""
        for metric in ("sensitivity", "specificity"):
            key = f"{metric}_{name}"
            spread = (f"{format_number(m[key + '_fold_min'])} to {format_number(m[key + '_fold_max'])}"
                      if key + "_fold_min" in m else "")
            rows.append([f"{metric} at the threshold chosen on {name.replace('_', '-')} predictions{own}",
                         format_interval(m[key], (m[key + "_low"], m[key + "_high"])), spread])
    if internal_auc is not None:
        rows.insert(0, ["internal test AUC (same hospitals as training)", format_number(internal_auc), ""])
    lines += markdown_table(rows, ["measure", "out-of-site (95% interval over held-out patients)", "between folds"])
    lines += ["", f"Held-out images {m['n_images']}: {m['n_positive_patients']} patients with "
              f"{estimate_dict['positive_class']}, {m['n_negative_patients']} without. Thresholds are scored nested: "
              "never on the sites they were chosen on."]
    lines += ["", *markdown_table(
        [[f["fold"], f["held_out"], f["n_positive_patients"], f["n_negative_patients"], format_number(f["roc_auc"]),
          format_number(f[f"sensitivity_{rule}"]), format_number(f[f"specificity_{rule}"])]
         for f in estimate_dict["folds"]],
        ["fold", "held out (sites with positives | without)", "positive patients", "negative patients", "AUC",
         "sensitivity", "specificity"])]
    return lines
