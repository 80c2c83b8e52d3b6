"""Calibrate a model for your own site: a threshold set on a few dozen of your hospital's images.

A model's own threshold was chosen on its validation split, images from the hospitals it was
trained on. At another hospital the scores of normal films move (another detector curve, borders,
burned-in text) and the same threshold can call most of them positive. :func:`calibrate` predicts
images of the user's site that are known to be normal (and, optionally, known positives), sets a
site-specific threshold for a target specificity (or sensitivity), and stores it in the model's
``model.json`` as a named site profile (:meth:`xraylib.runs.RunFolder.record_site_profile`; the
model's own threshold is kept). ``predict --site NAME`` and ``serve --site NAME`` then decide at it.

How the threshold is set, and what a small sample supports:

- **Target specificity** ``s`` from ``n`` normals: the threshold is the normals' score quantile
  ``s`` with the Weibull plotting position (``np.quantile(..., method="weibull")``): between the
  ``k``-th and ``(k+1)``-th smallest score, ``k = floor(s (n + 1))``. The specificity a threshold at
  the ``k``-th smallest score gives is Beta(k, n + 1 - k) distributed, with mean k / (n + 1), so this
  aims the expected specificity at ``s``.
- **Target sensitivity** ``r`` from ``m`` positives: the same on the positives' scores, quantile ``1 - r``.
- **Intervals**: ``k`` of the ``n`` normals fall below the threshold; the specificity the threshold
  gives at the site lies between the Beta(k, n - k + 1) and Beta(k + 1, n - k) variables above, so the
  exact (Clopper-Pearson) 95 % interval of ``k / n`` covers it at least 95 % of the time. The same for
  sensitivity with the positives. These are what the sample supports, and with a few dozen images
  they are wide: 30 normals at a threshold aimed at 90 % give roughly 74 % to 98 %.
- **Promising a target**: even a threshold above all ``n`` normals only assures (95 % confidence)
  a specificity of ``0.025 ** (1 / n)``: 20 normals cannot promise 95 % (they assure 83 %); that takes
  72. The report says so, and how many normals would pin the specificity to within
  :data:`SUPPORT_MARGIN` of the target.

The images also go through the out-of-distribution guard (:mod:`xraylib.ood`): when the site's
images look unlike the training data, the report warns. A new threshold moves where the model
decides, not what it sees: its ranking at the site is only known with positives.
"""
from __future__ import annotations

import datetime
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .errors import ConfigError
from .models import LoadedModel, load_model, predict_images
from .predict import collect_image_paths, preprocess_files

__all__ = ["LEVEL", "SUPPORT_MARGIN", "OOD_WARN_SHARE", "CalibrationError", "Proportion", "Calibration",
           "exact_interval", "assured_by", "normals_to_promise", "normals_to_pin", "calibrate_scores", "calibrate"]

#: The confidence level of every interval in the report.
LEVEL = 0.95
#: The sample "supports" a target when the interval's lower end is within this of it; the report says how
#: many images that takes. 0.05: a specificity of 0.90 known to be at least 0.85 is a usable promise; the
#: interval of 30 normals (about 0.74 to 0.98) is not.
SUPPORT_MARGIN = 0.05
#: From this share of the site's images flagged by the guard the report warns; below it, it only counts them
#: (the guard's distance thresholds are set so that about 1 % of the training sites' own films would pass them).
OOD_WARN_SHARE = 0.05


class CalibrationError(ConfigError):
    """The images given cannot set the threshold asked for (too few, none readable, no positives)."""


@dataclass(frozen=True)
class Proportion:
    """``k`` of ``n`` images on the right side of the threshold: the share and its exact interval at ``level``."""

    metric: str
    k: int
    n: int
    low: float
    high: float
    level: float = LEVEL

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "k": self.k, "n": self.n, "value": self.value, "low": self.low,
                "high": self.high, "level": self.level, "method": "exact (Clopper-Pearson)"}

    def text(self) -> str:
        return (f"{self.metric} {self.value:.0%} ({self.k} of {self.n}; {self.level:.0%} interval "
                f"{self.low:.0%} to {self.high:.0%})")


def exact_interval(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """The exact (Clopper-Pearson) ``level`` interval of a proportion ``k / n``: Beta quantiles, ``(0, 1)`` for n = 0."""
    from scipy.stats import beta

    if n <= 0:
        return 0.0, 1.0
    alpha = 1.0 - level
    low = 0.0 if k <= 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k >= n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def proportion(metric: str, k: int, n: int, level: float = LEVEL) -> Proportion:
    low, high = exact_interval(int(k), int(n), level)
    return Proportion(metric, int(k), int(n), low, high, level)


def assured_by(n: int, level: float = LEVEL) -> float:
    """The most that ``n`` images can assure (lower end of the ``level`` interval) with all ``n`` on the right side."""
    return exact_interval(n, n, level)[0]


def normals_to_promise(target: float, level: float = LEVEL) -> int:
    """The fewest images whose interval's lower end can reach ``target`` at all (all of them below the threshold)."""
    return int(math.ceil(math.log((1.0 - level) / 2) / math.log(target)))


def normals_to_pin(target: float, margin: float = SUPPORT_MARGIN, level: float = LEVEL, most: int = 100_000) -> int:
    """The fewest images for which a threshold aimed at ``target`` has its interval's lower end within ``margin``."""
    def ok(n: int) -> bool:
        k = min(int(math.floor(target * (n + 1))), n)
        return exact_interval(k, n, level)[0] >= target - margin

    n = 1
    while n < most and not ok(n):
        n *= 2
    low, high = n // 2, n
    while low + 1 < high:  # the first n that is ok (nearly monotone in n; a bisection is close enough)
        middle = (low + high) // 2
        low, high = (low, middle) if ok(middle) else (middle, high)
    return high


def _quantile_threshold(scores: np.ndarray, share: float, what: str, need: str) -> float:
    """The Weibull-position quantile ``share`` of ``scores``; :class:`CalibrationError` where it falls outside them."""
    n = len(scores)
    position = share * (n + 1)
    if position < 1 or position > n:
        fewest = int(math.ceil(max(share, 1 - share) / min(share, 1 - share)))
        raise CalibrationError(f"{n} {what} cannot set a threshold for {need}: it would lie beyond every one of them. "
                               f"Give at least {fewest} {what}.")
    return float(np.quantile(np.asarray(scores, dtype=np.float64), share, method="weibull"))


@dataclass
class Calibration:
    """A site's threshold and what its sample supports; :meth:`profile` is what ``model.json`` stores.

    ``specificity``: the site's normals below the threshold, with its exact interval; ``sensitivity``: the
    positives at or above it (None without positives). ``at_model_threshold``: the same at the model's own
    threshold, to show what calibration changed. ``messages``: the report in plain words, warnings first.
    """

    site: str
    threshold: float
    model_threshold: float
    target_metric: str
    target_value: float
    positive_class: str
    specificity: Proportion
    sensitivity: Proportion | None
    at_model_threshold: dict[str, Proportion]
    normals_to_promise: int
    normals_to_pin: int
    ood: dict[str, Any] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    created: str = ""

    @property
    def interval(self) -> Proportion:
        """The interval of the metric the threshold was set for."""
        return self.specificity if self.target_metric == "specificity" else self.sensitivity  # type: ignore[return-value]

    @property
    def supported(self) -> bool:
        """Whether the sample pins the target: the interval's lower end within :data:`SUPPORT_MARGIN` of it."""
        return self.interval.low >= self.target_value - SUPPORT_MARGIN

    @property
    def n_normals(self) -> int:
        return self.specificity.n

    @property
    def n_positives(self) -> int:
        return self.sensitivity.n if self.sensitivity is not None else 0

    def profile(self) -> dict[str, Any]:
        """The site profile for ``model.json`` (schema: :func:`xraylib.models.check_site_profiles`)."""
        interval = self.interval
        return {
            "threshold": self.threshold,
            "target": {"metric": self.target_metric, "value": self.target_value},
            "n_normals": self.n_normals,
            "n_positives": self.n_positives,
            "interval": {"metric": interval.metric, "low": interval.low, "high": interval.high, "level": interval.level,
                         "method": "exact (Clopper-Pearson)"},
            "created": self.created,
            "positive_class": self.positive_class,
            "model_threshold": self.model_threshold,
            "specificity": self.specificity.to_dict(),
            "sensitivity": None if self.sensitivity is None else self.sensitivity.to_dict(),
            "supported": self.supported,
            "ood": self.ood,
            "rule": f"{self.target_metric} quantile (Weibull plotting position) of the site's "
                    f"{'normal' if self.target_metric == 'specificity' else 'positive'} scores",
        }

    def messages(self) -> list[str]:
        """The report, one plain sentence or two per line: warnings, then the threshold, then what it supports."""
        lines = [f"warning: {w}" for w in self.warnings]
        target = f"{self.target_value:.0%} {self.target_metric}"
        lines.append(f"site {self.site!r}: threshold {self.threshold:.4f} for {target} (P({self.positive_class}) at or "
                     f"above it is called {self.positive_class}); the model's own threshold is "
                     f"{self.model_threshold:.4f}.")
        spec = self.specificity
        lines.append(f"{spec.k} of the site's {spec.n} normal images fall below it: with {spec.level:.0%} confidence the "
                     f"specificity it gives at this site is between {spec.low:.0%} and {spec.high:.0%}.")
        if self.sensitivity is not None:
            sens = self.sensitivity
            lines.append(f"{sens.k} of the site's {sens.n} positive images are at or above it: with {sens.level:.0%} "
                         f"confidence the sensitivity there is between {sens.low:.0%} and {sens.high:.0%}.")
        else:
            lines.append("No positives were given, so the sensitivity at this site is unknown: a lower specificity target "
                         "or known positives (--positives) are the only ways to learn it.")
        own = self.at_model_threshold
        lines.append("At the model's own threshold: " + "; ".join(p.text() for p in own.values()) + ".")
        interval = self.interval
        count, what = (self.n_normals, "normals") if self.target_metric == "specificity" else (self.n_positives, "positives")
        if not self.supported:
            most = assured_by(count, interval.level)
            beyond = (f"Even a threshold above all {count} would assure only {most:.0%}; assuring "
                      f"{self.target_value:.0%} at all takes at least {self.normals_to_promise} {what}"
                      if most < self.target_value else
                      f"Only a stricter threshold (above more of them, so aimed beyond {target}) could assure it")
            lines.append(f"{count} {what} cannot promise {target}: with {interval.level:.0%} confidence this threshold "
                         f"gives at least {interval.low:.0%}. {beyond}; a threshold aimed at {self.target_value:.0%} "
                         f"is known to within {SUPPORT_MARGIN:.2f} (lower end at least "
                         f"{self.target_value - SUPPORT_MARGIN:.0%}) from about {self.normals_to_pin} {what}.")
        else:
            lines.append(f"{count} {what} support this: the lower end ({interval.low:.0%}) is within {SUPPORT_MARGIN:.2f} "
                         f"of the {target} asked for.")
        if self.skipped:
            lines.append(f"{len(self.skipped)} file(s) skipped: " + "; ".join(f"{p}: {r}" for p, r in self.skipped[:5]))
        return lines

    def text(self) -> str:
        return "\n".join(self.messages())


def _target(target_specificity: float | None, target_sensitivity: float | None) -> tuple[str, float]:
    """The one target given, as ``(metric, value)``; :class:`ConfigError` for none, both or a value outside [0.5, 1)."""
    if (target_specificity is None) == (target_sensitivity is None):
        raise ConfigError("give one target: target_specificity (e.g. 0.95) or target_sensitivity (e.g. 0.9), not both")
    metric, target = (("specificity", target_specificity) if target_specificity is not None
                      else ("sensitivity", target_sensitivity))
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.5 <= float(target) < 1.0:
        raise ConfigError(f"target {metric} must be at least 0.5 and below 1, got {target!r}")
    return metric, float(target)


def calibrate_scores(normal_scores: Sequence[float], positive_scores: Sequence[float] | None = None, *,
                     target_specificity: float | None = None, target_sensitivity: float | None = None,
                     model_threshold: float = 0.5, site: str = "site", positive_class: str = "positive",
                     level: float = LEVEL) -> Calibration:
    """The site threshold from the positive-class scores (probabilities, 0..1) of a site's known normals and positives.

    Give exactly one target. ``target_specificity`` needs normals only; ``target_sensitivity`` needs positives.
    A pure function of the scores (no model, no files): :func:`calibrate` predicts and calls it.
    """
    metric, target = _target(target_specificity, target_sensitivity)
    normals = np.asarray(normal_scores, dtype=np.float64).reshape(-1)
    positives = np.asarray(positive_scores if positive_scores is not None else [], dtype=np.float64).reshape(-1)
    if len(normals) == 0:
        raise CalibrationError("no normal images: calibration needs images of the site known to be normal")
    if metric == "specificity":
        threshold = _quantile_threshold(normals, target, "normals", f"{target:.0%} specificity")
    else:
        if len(positives) == 0:
            raise CalibrationError("a target sensitivity needs known positive images of the site (--positives DIR)")
        threshold = _quantile_threshold(positives, 1.0 - target, "positives", f"{target:.0%} sensitivity")

    def at(t: float) -> tuple[Proportion, Proportion | None]:
        spec = proportion("specificity", int((normals < t).sum()), len(normals), level)
        sens = proportion("sensitivity", int((positives >= t).sum()), len(positives), level) if len(positives) else None
        return spec, sens

    specificity, sensitivity = at(threshold)
    own_spec, own_sens = at(float(model_threshold))
    return Calibration(
        site=site, threshold=threshold, model_threshold=float(model_threshold), target_metric=metric,
        target_value=target, positive_class=positive_class, specificity=specificity, sensitivity=sensitivity,
        at_model_threshold={"specificity": own_spec, **({"sensitivity": own_sens} if own_sens else {})},
        normals_to_promise=normals_to_promise(target, level), normals_to_pin=normals_to_pin(target, level=level),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def _ood_summary(loaded: LoadedModel, images: np.ndarray, facts: list, data_dir: str | os.PathLike | None,
                 say: Callable[[str], None], with_positives: bool) -> tuple[dict[str, Any], str | None]:
    """The guard's verdicts on the site's images: counts by check, and a warning when too many are flagged."""
    from . import ood, runs

    reference, note = runs.prepare_ood(loaded, data_dir, say=lambda line: None)
    guard = ood.OODGuard.for_model(loaded, reference)
    verdicts = guard.check(images, facts) if len(images) else []
    flagged = [v for v in verdicts if not v.ok]
    # "Its mean brightness (0.71) is far outside ..." -> "Its mean brightness": one count per kind of check.
    kinds = Counter(reason.split(" (", 1)[0].rstrip(".:") for v in flagged for reason in v.reasons)
    summary = {"checked": len(verdicts), "flagged": len(flagged), "level": guard.level,
               "reasons": dict(kinds.most_common())}
    if note:
        say(f"note: {note}")
    if not verdicts or len(flagged) / len(verdicts) < OOD_WARN_SHARE:
        return summary, None
    common = "; ".join(f"{kind} ({count})" for kind, count in kinds.most_common(3))
    warning = (f"{len(flagged)} of the site's {len(verdicts)} images look unlike the images the model was trained on "
               f"(out-of-distribution guard: {common}). A new threshold moves where the model decides, not what it "
               "sees: on such images its ranking may be poor" + (", which the sensitivity on the site's positives below "
               "measures." if with_positives else ", and without known positives (--positives) nothing here measures "
               "it.") + " The web page gives no decision for flagged images.")
    return summary, warning


def _shown(target: Any) -> str:
    """A file or folder as given, or "N files (first, ...)" for a list."""
    if isinstance(target, (str, os.PathLike)):
        return str(target)
    paths = [str(p) for p in target]
    return f"{len(paths)} files ({paths[0]}, ...)" if len(paths) > 1 else ", ".join(paths)


def calibrate(model: LoadedModel | str | os.PathLike, normals: Any, site: str, *, positives: Any = None,
              target_specificity: float | None = None, target_sensitivity: float | None = None,
              data_dir: str | os.PathLike | None = None, save: bool = True, batch_size: int = 16,
              say: Callable[[str], None] = print) -> Calibration:
    """Set and store a threshold for site ``site`` from its images known to be normal (and optionally positive).

    ``normals`` / ``positives``: a file, a list of files or a folder of PNG/JPEG/DICOM images (as
    :func:`xraylib.predict.collect_image_paths` takes). One target: ``target_specificity`` or
    ``target_sensitivity`` (needs positives). The images are preprocessed from ``model.json``, predicted,
    and checked by the out-of-distribution guard (its reference from beside the model or ``data_dir``,
    see :func:`xraylib.runs.prepare_ood`). With ``save`` the profile goes into ``model.json``
    (:meth:`xraylib.runs.RunFolder.record_site_profile`). Unreadable files are reported and skipped.
    Returns the :class:`Calibration`; its :meth:`~Calibration.text` is the report.
    """
    from . import runs
    from .models import check_site_name

    site = check_site_name(site)
    metric, _ = _target(target_specificity, target_sensitivity)  # before any image is read
    if metric == "sensitivity" and positives is None:
        raise CalibrationError("a target sensitivity needs known positive images of the site (--positives DIR)")
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    loaded = loaded.for_site(None)  # the model's own threshold, also when given a copy made for a site
    pos = loaded.classes.index(loaded.positive_class)
    groups = {"normal": collect_image_paths(normals)}
    if positives is not None:
        groups["positive"] = collect_image_paths(positives)
    scores, skipped, all_images, all_facts = {}, [], [], []
    for group, paths in groups.items():
        images, table, facts = preprocess_files(loaded, paths, with_facts=True)
        skipped += [(row.path, row.error) for row in table.itertuples() if not row.ok]
        if len(images) == 0:
            raise CalibrationError(f"none of the {len(paths)} {group} file(s) could be read "
                                   f"({'; '.join(f'{p}: {r}' for p, r in skipped[:3])})")
        scores[group] = predict_images(loaded.model, images, batch_size)[:, pos]
        all_images.append(images)
        all_facts += facts
    try:
        result = calibrate_scores(scores["normal"], scores.get("positive"), target_specificity=target_specificity,
                                  target_sensitivity=target_sensitivity, model_threshold=loaded.threshold, site=site,
                                  positive_class=loaded.positive_class)
    except ConfigError as exc:  # name what was given: too few images in which folder
        given = "; ".join(f"{group}s: {_shown(target)}" for group, target in (("normal", normals), ("positive", positives))
                          if target is not None)
        raise type(exc)(f"{given}: {exc}") from None
    result.skipped = skipped
    result.ood, warning = _ood_summary(loaded, np.concatenate(all_images), all_facts, data_dir, say,
                                          with_positives="positive" in scores)
    if warning:
        result.warnings.append(warning)
    if save:
        runs.RunFolder.of(loaded.path).record_site_profile(site, result.profile())
    return result
