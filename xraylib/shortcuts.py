"""Shortcut tests after training: did the model learn the disease, or the data set?

The 2020 COVID-19 classifiers scored near-perfectly on test images drawn like their training
images and fell towards chance in a new hospital (DeGrave et al., Nature Machine Intelligence
2021); they kept much of their score with the lungs blacked out (Maguolo and Nanni, 2021). A
pooled test score cannot tell a model that reads the disease from one that reads the hospital,
the patient's age or a burned-in marker. Each function here asks one such question, returns a
small result with its numbers (intervals and n included) and a verdict in plain words, and runs
through the same code as training and evaluation:

* :func:`source_prediction`: train the same pipeline to predict each image's *source* instead
  of its label. An AUC near 1 where classes and sources are confounded means the source alone
  can carry the labels.
* :func:`lungs_hidden`: evaluate (and optionally train) with the centre of the film blacked
  out. Performance far above chance says the model finds its answer outside the lungs.
* :func:`leave_one_source_out`: for each source, train on the others and test on the one left
  out: the nearest these data come to a new hospital.
* :func:`saliency_heat_share`: Grad-CAM maps averaged over the test set per class, and the
  share of their heat on the lung fields.

The per-test data sets are *views* of the preprocessed cache (:func:`data_view`): the same
memory-mapped arrays read through other index sets, other labels or a blacked-out region, so
no image is decoded or copied again. Retraining writes an ordinary run folder (resumable;
a finished run is loaded, not retrained).

Thresholds that turn numbers into verdicts are module constants, documented where defined.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence, Union

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from . import evaluate
from .reporting import DISCLAIMER, REPORT_DISCLAIMER, Finding, format_interval, format_number, markdown_table, probability_column
from .errors import ConfigError
from .fileio import write_json_atomic, write_text_atomic, json_safe
from .preprocess import PreprocessedData
from .views import (
    CENTRAL_RECTANGLE, HOSPITAL_GROUPS, cache_rows, data_view, held_out_source_view, hidden_region, hidden_view,
    lung_field_mask, source_group, source_view,
)

if TYPE_CHECKING:  # the data views need no TensorFlow; the tests that train import it when called
    import keras

    from .models import LoadedModel, ModelSpec
    from .train import TrainResult, TrainSettings

#: What the shortcut tests that run a trained model take as it: a loaded model, its folder or file, or a Keras model.
ModelLike = Union["LoadedModel", str, os.PathLike, "keras.Model"]

__all__ = [
    "SOURCE_AUC_WARN", "HIDDEN_AUC_WARN", "CHANCE_AUC", "WIDE_INTERVAL", "LUNG_HEAT_RATIO_OK", "CORNER_HEAT_WARN",
    "source_folds", "macro_auc", "training_recipe",
    "SourcePredictionResult", "LungsHiddenResult", "LeaveOneSourceOutResult", "SaliencyResult",
    "source_prediction", "lungs_hidden", "leave_one_source_out", "saliency_heat_share",
    "run_shortcut_tests", "shortcut_report_markdown", "write_shortcut_report",
]

# ---- thresholds and settings ------------------------------------------------------------------
#: Source prediction: a macro one-vs-rest AUC at least this high means the sources are easy to
#: tell apart from the pixels (where classes come from different sources, so are the classes).
SOURCE_AUC_WARN = 0.90
#: Lungs hidden: an AUC at least this high, with the lower end of its interval above 0.5, means
#: the model still finds the label with the centre of the film blacked out.
HIDDEN_AUC_WARN = 0.70
#: Lungs hidden: at or below this AUC (or with 0.5 inside the interval) the model is near chance.
CHANCE_AUC = 0.60
#: Saliency: the heat share on the lung fields divided by their share of the image area (what an
#: evenly spread map would get). At least this ratio: the heat is concentrated on the lungs; at
#: most 1: no more heat on the lungs than chance would put there.
LUNG_HEAT_RATIO_OK = 1.5
#: Saliency: at least this share of a class's heat in one corner square (of
#: :data:`xraylib.audit.CORNER_FRACTION` of the side, about 2% of the image) means the heat
#: gathers where markers and labels are burned in.
CORNER_HEAT_WARN = 0.20
#: An AUC interval wider than this is too wide to rest a verdict on: the verdict says so.
WIDE_INTERVAL = 0.4


# ---------------------------------------------------------------------------------------------
# Shared pieces


def macro_auc(predictions: pd.DataFrame, classes: Sequence[str], n_boot: int = 1000, seed: int = 0,
              level: float = 0.95) -> tuple[float, tuple[float, float], dict[str, float]]:
    """Macro one-vs-rest AUC with a bootstrap interval over patients: ``(auc, (low, high), {class: auc})``.

    ``predictions``: one row per image (``label``, ``patient_id``, ``source``, ``prob_<class>``).
    Each class present in the labels is scored against the rest and the AUCs averaged. The
    interval comes from :func:`xraylib.evaluate.bootstrap_distribution` with one seed for every
    class, so each resample draws the same patients for all of them (a paired bootstrap);
    resamples that leave a class without images are left out. NaN with fewer than two classes.
    """
    frame = evaluate.check_predictions(predictions, classes)
    labels = frame["label"].to_numpy(dtype=object)
    present = [c for c in classes if (labels == c).any()]
    if len(present) < 2:
        return math.nan, (math.nan, math.nan), {}
    patient_ids = frame["patient_id"].to_numpy(dtype=object)
    per_class: dict[str, float] = {}
    samples = []
    for name in present:
        y_true = (labels == name).astype(np.int8)
        y_score = frame[probability_column(name)].to_numpy(dtype=np.float64)
        per_class[name] = float(evaluate.binary_metrics(y_true, y_score)["roc_auc"])
        samples.append(evaluate.bootstrap_distribution(y_true, y_score, patient_ids, 0.5, n_boot=n_boot, seed=seed)["roc_auc"])
    stacked = np.vstack(samples)
    complete = ~np.isnan(stacked).any(axis=0)
    macro = stacked[:, complete].mean(axis=0)
    tail = 100 * (1 - level) / 2
    ci = tuple(float(v) for v in np.percentile(macro, [tail, 100 - tail])) if len(macro) else (math.nan, math.nan)
    return float(np.mean(list(per_class.values()))), ci, per_class


def _fmt_ci(value: float, ci: tuple[float, float]) -> str:
    """An AUC, sensitivity or specificity with its interval, as the shortcut reports write them."""
    return format_interval(value, ci, 2, label="95% CI")


def _metric_ci(row: Any, metric: str) -> str:
    """``_fmt_ci`` of a :func:`xraylib.evaluate.breakdown`-style row's ``metric``, ``metric_low``, ``metric_high``."""
    return _fmt_ci(row[metric], (row[f"{metric}_low"], row[f"{metric}_high"]))


def _finding(result: Any, numbers: dict[str, Any]) -> Finding:
    """A shortcut test's verdict as a record: level "shortcut" when it found one, "ok" when it did not,
    "caution" for a test without a pass/fail (leave one source out)."""
    found = getattr(result, "shortcut_found", None)
    level = "caution" if found is None else "shortcut" if found else "ok"
    return Finding(result.name.replace(" ", "_"), result.verdict, numbers, level=level)


def _resolve_model(model: ModelLike) -> tuple["keras.Model", "LoadedModel | None"]:
    """(Keras model, LoadedModel or None) from a LoadedModel, a model folder or file, or a Keras model."""
    from .models import LoadedModel, load_model

    if isinstance(model, LoadedModel):
        return model.model, model
    if isinstance(model, (str, os.PathLike)):
        loaded = load_model(model)
        return loaded.model, loaded
    return model, None


def _check_model_classes(loaded: "LoadedModel | None", data: PreprocessedData) -> None:
    if loaded is not None and tuple(loaded.classes) != tuple(data.classes):
        raise ConfigError(f"{loaded.path}: model classes {list(loaded.classes)} differ from the data's {list(data.classes)}")


def _announce(what: str, n_trainings: int, settings: "TrainSettings", n_train_images: Sequence[int],
              run_dir: Path, progress: bool) -> tqdm:
    """Print one line saying how many trainings will run (epochs, training images) and return a bar over them
    (:mod:`tqdm.auto`: a widget in a notebook, text in a terminal; silent without ``progress``)."""
    if progress and n_trainings:
        epochs = settings.epochs + settings.fine_tune_epochs
        images = (f"{min(n_train_images)}-{max(n_train_images)}" if min(n_train_images) != max(n_train_images)
                  else f"{n_train_images[0]}") if n_train_images else "?"
        print(f"{what}: {n_trainings} training{'s' if n_trainings != 1 else ''} to run, {epochs} epochs each on "
              f"{images} training images (about as long as your own model's training each; runs already saved "
              f"under {run_dir} are loaded instead). The bar shows the time left after the first one.", flush=True)
    return tqdm(total=n_trainings, desc=what, unit="training", disable=not progress or not n_trainings)


def _train_same_pipeline(view: PreprocessedData, spec: "ModelSpec", settings: "TrainSettings", run_dir: Path,
                         verbose: int | str) -> "TrainResult":
    """:func:`xraylib.runs.train` on a view, with the model's classes set to the view's. A view of 3+ sources
    (source prediction) has no "positive class vs the rest" threshold to choose: it is scored by AUC only."""
    from . import runs

    spec = dataclasses.replace(spec, classes=tuple(view.classes))
    return runs.train(view, spec, settings, run_dir=run_dir, resume=True, verbose=verbose,
                      choose_threshold=not _threshold_refused(view.classes))


def _threshold_refused(classes: Sequence[str]) -> bool:
    try:
        evaluate.resolve_positive_class(classes)
    except ConfigError:
        return True
    return False


def training_recipe(model: "LoadedModel | str | os.PathLike") -> tuple["ModelSpec", "TrainSettings"]:
    """The ``(ModelSpec, TrainSettings)`` a saved model was trained with, read from its ``model.json``:
    what the shortcut tests retrain with, so that they test "the same pipeline"."""
    from .models import LoadedModel, load_model
    from .train import TrainSettings

    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    training = dict(loaded.metadata.get("training", {}))
    known = {f.name for f in dataclasses.fields(TrainSettings)}
    return loaded.spec, TrainSettings.from_dict({k: v for k, v in training.items() if k in known})


# ---------------------------------------------------------------------------------------------
# 1. Source prediction


@dataclass
class SourcePredictionResult:
    """What :func:`source_prediction` found.

    ``auc``/``ci``: macro one-vs-rest AUC of the source on the test split and its 95% interval
    over patients; ``per_source_auc``: each source against the rest; ``confounded``: whether
    the classes and sources are confounded in the data (``confound_reasons``: the audit's words).
    """

    sources: tuple[str, ...]
    auc: float
    ci: tuple[float, float]
    per_source_auc: dict[str, float]
    n_images: int
    n_patients: int
    images_per_source: dict[str, int]
    confounded: bool
    confound_reasons: list[str]
    verdict: str
    run_dir: Path | None = None
    predictions: pd.DataFrame | None = field(default=None, repr=False)
    left_out: dict[str, int] = field(default_factory=dict)

    name = "source prediction"

    @property
    def shortcut_found(self) -> bool:
        """The source is recognisable and carries the labels."""
        return bool(self.confounded and math.isfinite(self.auc) and self.auc >= SOURCE_AUC_WARN)

    def to_dict(self) -> dict[str, Any]:
        return json_safe({"test": self.name, "sources": list(self.sources), "macro_auc": self.auc, "ci": list(self.ci),
                           "per_source_auc": self.per_source_auc, "n_images": self.n_images, "n_patients": self.n_patients,
                           "images_per_source": self.images_per_source, "confounded": self.confounded,
                           "confound_reasons": self.confound_reasons, "shortcut_found": self.shortcut_found,
                           "verdict": self.verdict, "run_dir": self.run_dir, "left_out": self.left_out,
                           "finding": self.finding().to_dict()})

    def finding(self) -> Finding:
        """The verdict with its numbers (macro AUC, interval, n, per-source AUCs, confounded)."""
        return _finding(self, {"macro_auc": self.auc, "ci_low": self.ci[0], "ci_high": self.ci[1],
                               "per_source_auc": dict(self.per_source_auc), "n_images": self.n_images,
                               "n_patients": self.n_patients, "confounded": self.confounded})

    def to_markdown(self) -> str:
        rows = pd.DataFrame([{"source": s, "test images": self.images_per_source.get(s, 0),
                              "AUC (this source vs the rest)": format_number(self.per_source_auc.get(s, math.nan), 2)}
                             for s in self.sources])
        lines = ["## Source prediction", "", f"**{self.verdict}**", "",
                 f"The same pipeline trained to predict each image's source ({', '.join(self.sources)}) instead of its "
                 f"label. Test split: {self.n_patients} patients, {self.n_images} images; macro one-vs-rest AUC "
                 f"{_fmt_ci(self.auc, self.ci)}.", ""]
        lines += markdown_table(rows) + [""]
        lines += [f"- {reason}" for reason in self.confound_reasons]
        return "\n".join(lines).rstrip() + "\n"


def source_prediction(
    data: PreprocessedData,
    spec: "ModelSpec",
    settings: "TrainSettings",
    run_dir: str | os.PathLike,
    *,
    split: str = "test",
    source_groups: Mapping[str, str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    verbose: int | str = 0,
    progress: bool = True,
) -> SourcePredictionResult:
    """Train the same pipeline (``spec``, ``settings``, :func:`xraylib.train.train`) to predict each
    image's SOURCE instead of its label, and score it on ``split``.

    The data are :func:`source_view` of ``data`` (same images and patient-level splits; classes
    are the sources present in train, grouped by ``source_groups``). The run is saved in
    ``run_dir`` (resumed or loaded if it is there). Returns a :class:`SourcePredictionResult`:
    the macro one-vs-rest AUC with its 95% interval over patients (``n_boot`` resamples) and a
    verdict. An AUC near 1 matters where classes come from different sources: the audit's source
    checks (:func:`xraylib.audit.confound_warnings`) say whether they do.
    """
    from . import audit
    from .models import predict_split

    view = source_view(data, source_groups)
    reasons = [f.message for f in audit.confound_warnings(data.manifest, classes=data.classes)
               if f.check in ("single_source_class", "source_predicts_label")]
    confounded = bool(reasons)
    if len(view.classes) < 2:
        verdict = (f"not run: the training split holds one source only ({view.classes[0]}), so source and label "
                   "cannot be confounded here; nothing shows the model works on another hospital either")
        return SourcePredictionResult(view.classes, math.nan, (math.nan, math.nan), {}, 0, 0, {}, confounded, reasons,
                                      verdict, left_out=view.report.get("left_out", {}))
    with _announce("Source prediction", 1, settings, [len(view["train"])], Path(run_dir), progress) as bar:
        trained = _train_same_pipeline(view, spec, settings, Path(run_dir), verbose)
        bar.update(1)
    predictions = predict_split(trained.model, view[split])
    auc, ci, per_source = macro_auc(predictions, view.classes, n_boot=n_boot, seed=seed)
    counts = predictions["label"].value_counts()
    images_per_source = {s: int(counts.get(s, 0)) for s in view.classes}
    verdict = _source_verdict(auc, ci, confounded, images_per_source)
    return SourcePredictionResult(
        sources=view.classes, auc=auc, ci=ci, per_source_auc=per_source, n_images=len(predictions),
        n_patients=int(predictions["patient_id"].nunique()), images_per_source=images_per_source,
        confounded=confounded, confound_reasons=reasons, verdict=verdict, run_dir=trained.paths.root,
        predictions=predictions, left_out=view.report.get("left_out", {}))


def _source_verdict(auc: float, ci: tuple[float, float], confounded: bool, images_per_source: dict[str, int]) -> str:
    if not math.isfinite(auc):
        present = [s for s, n in images_per_source.items() if n]
        return (f"AUC undefined: the test split holds images of {len(present)} source(s) only ({', '.join(present)}); "
                "use a larger test split")
    text = f"AUC {format_interval(auc, ci, 2)}"
    if auc >= SOURCE_AUC_WARN and confounded:
        return (f"{text}: source alone can carry the labels. The pipeline tells the sources apart from the pixels, and "
                "the classes come from different sources, so a high score on these data may mean it recognises the "
                "hospital, not the disease. Test it on a source it never saw (leave one source out).")
    if auc >= SOURCE_AUC_WARN:
        return (f"{text}: the sources are easy to tell apart, but no class comes from a single source and the source "
                "does not predict the label (the audit's checks), so the source alone does not give the label away "
                "here. Still report results per source.")
    wide = _wide_note(ci)
    if confounded:
        return (f"{text}: the sources are not easily told apart from the pixels by this pipeline, although the classes "
                f"come from different sources; the source shortcut is weaker than feared, but not ruled out{wide}.")
    return (f"{text}: the sources are not easily told apart, and classes are spread over sources: no source shortcut "
            f"found{wide}.")


def _wide_note(ci: tuple[float, float]) -> str:
    """A warning to add to a verdict whose AUC interval is too wide to rest a conclusion on."""
    low, high = ci
    if math.isfinite(low) and math.isfinite(high) and high - low > WIDE_INTERVAL:
        return (f" (but the interval, {format_number(low, 2)}–{format_number(high, 2)}, is too wide to be sure: "
                "too few test patients)")
    return ""


# ---------------------------------------------------------------------------------------------
# 2. Lungs hidden


@dataclass
class LungsHiddenResult:
    """What :func:`lungs_hidden` found: the evaluation with the lungs visible, with them hidden, and
    (``train_masked=True``) of a model trained and tested with them hidden."""

    region: str
    hidden_share: float
    visible: evaluate.Evaluation
    hidden: evaluate.Evaluation
    trained_hidden: evaluate.Evaluation | None
    verdict: str
    run_dir: Path | None = None

    name = "lungs hidden"

    @property
    def auc(self) -> float:
        return float(self.visible.metrics["roc_auc"])

    @property
    def auc_hidden(self) -> float:
        return float(self.hidden.metrics["roc_auc"])

    @property
    def auc_trained_hidden(self) -> float:
        return math.nan if self.trained_hidden is None else float(self.trained_hidden.metrics["roc_auc"])

    @property
    def shortcut_found(self) -> bool:
        """Performance stays well above chance with the lungs hidden (tested, or trained and tested)."""
        return any(_above_chance(e) for e in (self.hidden, self.trained_hidden) if e is not None)

    def table(self) -> pd.DataFrame:
        """One row per condition: AUC, sensitivity, specificity with their intervals, and n."""
        rows = []
        conditions = [("lungs visible", self.visible), ("lungs hidden", self.hidden)]
        if self.trained_hidden is not None:
            conditions.append(("trained and tested with lungs hidden", self.trained_hidden))
        for name, ev in conditions:
            row = {"condition": name, "n_images": ev.n_images, "n_patients": ev.n_patients}
            for metric in ("roc_auc", "sensitivity", "specificity"):
                row[metric] = ev.metrics[metric]
                row[f"{metric}_low"], row[f"{metric}_high"] = ev.ci[metric]
            rows.append(row)
        return pd.DataFrame(rows).set_index("condition")

    def to_dict(self) -> dict[str, Any]:
        return json_safe({"test": self.name, "region": self.region, "hidden_share": self.hidden_share,
                           "shortcut_found": self.shortcut_found, "verdict": self.verdict, "run_dir": self.run_dir,
                           "table": self.table().reset_index().to_dict(orient="records"),
                           "finding": self.finding().to_dict()})

    def finding(self) -> Finding:
        """The verdict with its numbers (AUC visible, hidden with its interval, trained hidden)."""
        low, high = self.hidden.ci["roc_auc"]
        return _finding(self, {"region": self.region, "hidden_share": self.hidden_share, "auc": self.auc,
                               "auc_hidden": self.auc_hidden, "auc_hidden_low": low, "auc_hidden_high": high,
                               "auc_trained_hidden": self.auc_trained_hidden})

    def to_markdown(self) -> str:
        table = self.table()
        rows = pd.DataFrame([{"condition": name, "AUC": _metric_ci(r, "roc_auc"), "sensitivity": _metric_ci(r, "sensitivity"),
                              "specificity": _metric_ci(r, "specificity"),
                              "n": f"{int(r['n_patients'])} patients / {int(r['n_images'])} images"}
                             for name, r in table.iterrows()])
        lines = ["## Lungs hidden", "", f"**{self.verdict}**", "",
                 f"Region blacked out: {self.region} ({self.hidden_share:.0%} of the image). Sensitivity and specificity "
                 "use the threshold chosen on validation with the lungs visible; the AUC needs no threshold.", ""]
        return "\n".join(lines + markdown_table(rows)) + "\n"


def _above_chance(ev: evaluate.Evaluation) -> bool:
    auc, low = float(ev.metrics["roc_auc"]), float(ev.ci["roc_auc"][0])
    return math.isfinite(auc) and auc >= HIDDEN_AUC_WARN and (not math.isfinite(low) or low > 0.5)


def _near_chance(ev: evaluate.Evaluation) -> bool:
    auc, (low, high) = float(ev.metrics["roc_auc"]), ev.ci["roc_auc"]
    return math.isfinite(auc) and (abs(auc - 0.5) <= CHANCE_AUC - 0.5 or (math.isfinite(low) and low <= 0.5 <= high))


def lungs_hidden(
    data: PreprocessedData,
    model: ModelLike,
    split: str = "test",
    region: str | np.ndarray = "rectangle",
    *,
    train_masked: bool = False,
    spec: "ModelSpec | None" = None,
    settings: "TrainSettings | None" = None,
    run_dir: str | os.PathLike | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    verbose: int | str = 0,
    progress: bool = True,
) -> LungsHiddenResult:
    """Evaluate ``model`` on ``split`` with the lungs visible and with ``region`` blacked out.

    ``model``: a :class:`~xraylib.models.LoadedModel`, a model folder/file, or a Keras model
    (then the threshold is 0.5). ``region``: see :func:`hidden_region` (default: the central
    rectangle of Maguolo and Nanni). With ``train_masked`` a model is also trained with the
    region hidden (the same pipeline: ``spec`` and ``settings``, by default those saved with
    ``model``) into ``run_dir`` (announced with a bar unless ``progress=False``) and tested with it hidden: a model that never sees the lungs
    cannot read the disease, so what it scores comes from elsewhere. Returns a
    :class:`LungsHiddenResult` whose verdict rests on the AUC (threshold-free; the blacked-out
    images may shift the scores, so the validation threshold may not fit them).
    """
    from .models import predict_split

    keras_model, loaded = _resolve_model(model)
    _check_model_classes(loaded, data)
    if split not in data.splits or len(data[split]) == 0:
        raise ConfigError(f"split {split!r} is missing or empty; the data have {sorted(data.splits)}")
    positive = loaded.positive_class if loaded is not None else evaluate.resolve_positive_class(data.classes)
    threshold = evaluate.Threshold(loaded.threshold if loaded is not None else 0.5,
                                   "the model's threshold, chosen on validation with the lungs visible"
                                   if loaded is not None else "0.5 (a bare Keras model carries no threshold)")
    hidden_data = hidden_view(data, region)
    args = dict(positive_class=positive, n_boot=n_boot, seed=seed)
    visible = evaluate.evaluate(predict_split(keras_model, data[split]), data.classes, threshold, **args)
    hidden = evaluate.evaluate(predict_split(keras_model, hidden_data[split]), data.classes, threshold, **args)
    trained_hidden = None
    trained_dir = None
    if train_masked:
        if loaded is None and (spec is None or settings is None):
            raise ConfigError("train_masked=True with a bare Keras model needs spec= and settings= (the pipeline to retrain)")
        if run_dir is None:
            raise ConfigError("train_masked=True needs run_dir= (where the model trained with the lungs hidden is saved)")
        default_spec, default_settings = training_recipe(loaded) if loaded is not None else (spec, settings)
        settings = settings or default_settings
        with _announce("Training with the lungs hidden", 1, settings, [len(hidden_data["train"])], Path(run_dir),
                       progress) as bar:
            trained = _train_same_pipeline(hidden_data, spec or default_spec, settings, Path(run_dir), verbose)
            bar.update(1)
        trained_dir = trained.paths.root
        masked_threshold = evaluate.Threshold(trained.threshold, "chosen on validation with the lungs hidden")
        trained_hidden = evaluate.evaluate(predict_split(trained.model, hidden_data[split]), data.classes,
                                           masked_threshold, **args)
    mask = hidden_region(data.settings.image_size, region)
    name = region if isinstance(region, str) else "custom mask"
    verdict = _hidden_verdict(visible, hidden, trained_hidden)
    return LungsHiddenResult(name, float(mask.mean()), visible, hidden, trained_hidden, verdict, trained_dir)


def _hidden_verdict(visible: evaluate.Evaluation, hidden: evaluate.Evaluation,
                    trained_hidden: evaluate.Evaluation | None) -> str:
    auc, auc_hidden = float(visible.metrics["roc_auc"]), float(hidden.metrics["roc_auc"])
    low, high = hidden.ci["roc_auc"]
    if not math.isfinite(auc_hidden):
        return "AUC undefined: the test split lacks positives or negatives"
    shown = format_interval(auc_hidden, (low, high), 2)
    if not math.isfinite(auc) or auc < CHANCE_AUC:
        parts = [f"Uninformative: the model is near chance even with the lungs visible (AUC {format_number(auc, 2)}), so hiding "
                 f"them (AUC {shown}) cannot show where it looks"]
    elif _above_chance(hidden):
        parts = [f"AUC stays {shown} with the lungs hidden (from {format_number(auc, 2)} with them visible): the model looks outside "
                 "the lungs (markers, text, borders, body shape), so its score is not evidence that it reads the disease"]
    elif _near_chance(hidden):
        parts = [f"AUC falls from {format_number(auc, 2)} to {shown} with the lungs hidden, near chance: the model needs the centre "
                 "of the film, as it should"]
    elif auc_hidden < 0.5:
        parts = [f"AUC falls from {format_number(auc, 2)} to {shown} with the lungs hidden, below chance: the blacked-out images are "
                 "unlike anything the model saw; train with the lungs hidden (train_masked=True) for a fair test"]
    else:
        parts = [f"AUC falls from {format_number(auc, 2)} to {shown} with the lungs hidden: part of what the model uses lies outside "
                 "the lungs"]
    parts[0] += _wide_note((low, high))
    if trained_hidden is not None:
        reached = ("a model trained and tested without the lungs reaches AUC "
                   + format_interval(trained_hidden.metrics["roc_auc"], trained_hidden.ci["roc_auc"], 2))
        if _above_chance(trained_hidden):
            parts.append(f"{reached}: these data let the labels be read outside the lungs")
        else:
            parts.append(f"{reached}: little of the label can be read outside the lungs")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# 3. Leave one source out


def source_folds(manifest: pd.DataFrame, classes: Sequence[str],
                 source_groups: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Which sources can be left out, and why not where they cannot: one row per source (after ``source_groups``).

    ``manifest``: rows with ``label``, ``source`` and ``split`` (a cache's manifest). Columns:
    ``source``, ``images``, ``classes`` (held by the source), ``runnable`` and ``reason``. A
    source is skipped when the other sources' training rows lack a class (the fold's model could
    not learn it) or when the other sources hold no validation rows (no threshold). A source
    holding one class is run: its AUC is undefined but its sensitivity or specificity says how a
    new hospital's images of that class fare.
    """
    classes = tuple(classes)
    frame = manifest.assign(_group=source_group(manifest["source"], source_groups))
    rows = []
    for group in sorted(frame["_group"].unique()):
        inside = frame[frame["_group"] == group]
        others = frame[frame["_group"] != group]
        held = [c for c in classes if (inside["label"] == c).any()]
        train_classes = set(others.loc[others["split"] == "train", "label"])
        missing = [c for c in classes if c not in train_classes]
        if missing:
            runnable, reason = False, (f"without {group} the training data hold no {' or '.join(missing)} images, so the "
                                       "fold's model could not learn " + ("that class" if len(missing) == 1 else "those classes"))
        elif not (others["split"] == "val").any():
            runnable, reason = False, f"without {group} no validation images are left to choose the threshold on"
        elif len(held) == 1:
            runnable, reason = True, f"holds {held[0]} images only: AUC undefined, the rate of correct calls is reported"
        else:
            runnable, reason = True, ""
        rows.append({"source": group, "images": len(inside), "patients": int(inside["patient_id"].nunique()),
                     "classes": ", ".join(held), "runnable": runnable, "reason": reason})
    return pd.DataFrame(rows)


@dataclass
class LeaveOneSourceOutResult:
    """What :func:`leave_one_source_out` found: ``table`` one row per source left out (metrics with
    intervals and n), ``folds`` the plan (:func:`source_folds`, with why sources were skipped),
    ``evaluations`` the full :class:`~xraylib.evaluate.Evaluation` per fold."""

    table: pd.DataFrame
    folds: pd.DataFrame
    evaluations: dict[str, evaluate.Evaluation]
    verdict: str
    run_dirs: dict[str, Path] = field(default_factory=dict)

    name = "leave one source out"

    @property
    def skipped(self) -> dict[str, str]:
        return {r.source: r.reason for r in self.folds.itertuples() if not r.runnable}

    def to_dict(self) -> dict[str, Any]:
        return json_safe({"test": self.name, "verdict": self.verdict, "skipped": self.skipped,
                           "table": self.table.reset_index().to_dict(orient="records"),
                           "folds": self.folds.to_dict(orient="records"), "run_dirs": self.run_dirs,
                           "finding": self.finding().to_dict()})

    def finding(self) -> Finding:
        """The verdict with its numbers: per source left out, AUC and its interval; the sources skipped."""
        auc = {source: {"auc": r["roc_auc"], "ci_low": r["roc_auc_low"], "ci_high": r["roc_auc_high"]}
               for source, r in self.table.iterrows()}
        return _finding(self, {"auc_by_source_left_out": auc, "skipped": sorted(self.skipped)})

    def to_markdown(self) -> str:
        lines = ["## Leave one source out", "", f"**{self.verdict}**", "",
                 "Each row: a model trained on the other sources (same pipeline), tested on every image of the source "
                 "left out, at the threshold chosen on the other sources' validation images.", ""]
        if len(self.table):
            t = self.table
            rows = pd.DataFrame([{
                "source left out": source,
                "n": f"{int(r['n_patients'])} patients / {int(r['n_images'])} images "
                     f"({int(r['n_positive'])} pos, {int(r['n_negative'])} neg)",
                "AUC": _metric_ci(r, "roc_auc"),
                "sensitivity": _metric_ci(r, "sensitivity"),
                "specificity": _metric_ci(r, "specificity"),
            } for source, r in t.iterrows()])
            lines += markdown_table(rows) + [""]
        lines += [f"- {source} not left out: {reason}" for source, reason in self.skipped.items()]
        return "\n".join(lines).rstrip() + "\n"


def leave_one_source_out(
    data: PreprocessedData | str | os.PathLike,
    spec: "ModelSpec",
    settings: "TrainSettings",
    run_dir: str | os.PathLike,
    *,
    rows: pd.DataFrame | None = None,
    source_groups: Mapping[str, str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    verbose: int | str = 0,
    progress: bool = True,
) -> LeaveOneSourceOutResult:
    """For each source where the data allow, train on the other sources and test on the one left out.

    ``data``: the preprocessed cache (or its folder). ``rows``: optionally a subset of
    ``data.manifest`` to use (e.g. adult normals only); by default all. Each fold is a
    :func:`held_out_source_view` of the cache (no image decoded again), trained with the same
    pipeline into ``run_dir/without_<source>`` (resumed or loaded if there). Sources that cannot
    be left out are listed with the reason (:func:`source_folds`). Returns a
    :class:`LeaveOneSourceOutResult`: AUC, sensitivity, specificity with 95% intervals over
    patients and n per source left out, and a verdict.
    """
    from .models import predict_split
    from .preprocess import load_preprocessed

    if isinstance(data, (str, os.PathLike)):
        data = load_preprocessed(data)
    if rows is not None:
        if not {"split", "row"} <= set(rows.columns):
            raise ConfigError("rows must be rows of data.manifest (with its 'split' and 'row' columns), e.g. "
                              "data.manifest[data.manifest['source'] != 'kaggle']")
        base = cache_rows(data)
        wanted = pd.MultiIndex.from_arrays([rows["split"].astype(str), rows["row"].astype(np.int64)])
        chosen = base[pd.MultiIndex.from_arrays([base["split"].astype(str), base["row"].astype(np.int64)]).isin(wanted)]
        digest = hashlib.sha1(pd.util.hash_pandas_object(chosen[["split", "row"]], index=False).to_numpy().tobytes())
        data = data_view(data, chosen.assign(new_split=chosen["split"]),
                         description=f"{len(chosen)} chosen rows ({digest.hexdigest()[:12]})")
    folds = source_folds(data.manifest, data.classes, source_groups)
    positive = evaluate.resolve_positive_class(data.classes)
    records, evaluations, run_dirs = [], {}, {}
    runnable = [fold for fold in folds.itertuples() if fold.runnable]
    views = {fold.source: held_out_source_view(data, fold.source, source_groups) for fold in runnable}
    bar = _announce("Leave one source out", len(runnable), settings, [len(v["train"]) for v in views.values()],
                    Path(run_dir), progress)
    for fold in runnable:
        view = views[fold.source]
        bar.set_postfix_str(f"without {fold.source}")
        trained = _train_same_pipeline(view, spec, settings, Path(run_dir) / f"without_{_safe_name(fold.source)}", verbose)
        bar.update(1)
        threshold = evaluate.Threshold(trained.threshold, "chosen on the other sources' validation images")
        ev = evaluate.evaluate(predict_split(trained.model, view["test"]), data.classes, threshold,
                               positive_class=positive, n_boot=n_boot, seed=seed)
        evaluations[fold.source] = ev
        run_dirs[fold.source] = trained.paths.root
        record = {"source": fold.source, "n_images": ev.n_images, "n_patients": ev.n_patients,
                  "n_positive": ev.metrics["n_positive"], "n_negative": ev.metrics["n_negative"]}
        for metric in ("roc_auc", "sensitivity", "specificity", "accuracy"):
            record[metric] = ev.metrics[metric]
            record[f"{metric}_low"], record[f"{metric}_high"] = ev.ci[metric]
        record["note"] = fold.reason
        records.append(record)
    bar.close()
    table = pd.DataFrame(records).set_index("source") if records else pd.DataFrame(
        columns=["n_images", "n_patients", "roc_auc", "roc_auc_low", "roc_auc_high"])
    return LeaveOneSourceOutResult(table, folds, evaluations, _loso_verdict(table, folds, positive), run_dirs)


def _safe_name(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


def _loso_verdict(table: pd.DataFrame, folds: pd.DataFrame, positive: str) -> str:
    if table.empty:
        return "not run: no source can be left out (" + "; ".join(f"{r.source}: {r.reason}" for r in folds.itertuples()) + ")"
    parts = []
    for source, r in table.iterrows():
        if math.isfinite(r["roc_auc"]):
            parts.append(f"{source}: AUC {_metric_ci(r, 'roc_auc')}")
        elif r["n_positive"] > 0:
            parts.append(f"{source} ({positive} only): sensitivity {_metric_ci(r, 'sensitivity')}")
        else:
            parts.append(f"{source} (no {positive}): specificity {_metric_ci(r, 'specificity')}")
    skipped = [r.source for r in folds.itertuples() if not r.runnable]
    tail = f"; not testable: {', '.join(skipped)} (see the reasons)" if skipped else ""
    return "On sources the model never saw: " + "; ".join(parts) + tail


# ---------------------------------------------------------------------------------------------
# 4. Saliency: where the heat is


@dataclass
class SaliencyResult:
    """What :func:`saliency_heat_share` found.

    ``mean_maps``: ``{class: (S, S) float32}`` mean Grad-CAM map over the class's images.
    ``table``, one row per class: ``n_images``, ``n_no_heat`` (all-zero maps: no positive evidence
    anywhere in the image, so no heat to share; left out of the shares, counted here),
    ``heat_inside`` (mean share of each map's heat on the lung fields),
    ``heat_outside``, ``lung_area_share`` (the mask's share of the image: what an evenly spread
    map would put there), ``ratio`` (heat_inside / lung_area_share), ``heat_frame`` (share
    outside the :data:`CENTRAL_RECTANGLE`, where markers and text lie), ``hottest_corner`` and
    ``corner_heat`` (the corner square of :data:`xraylib.audit.CORNER_FRACTION` of the side
    holding most heat, and its share), ``corner_area_share``, ``peak`` (where the mean map
    peaks, in words). ``lung_mask``: the mask used. Where every map of a class is zero (or the
    class has no images) its shares are NaN, ``hottest_corner`` is missing (NaN) and ``peak`` says
    "no heat": the verdict then says so in words, and leaves the class out of every comparison.
    """

    classes: tuple[str, ...]
    mean_maps: dict[str, np.ndarray]
    table: pd.DataFrame
    lung_mask: np.ndarray
    verdict: str
    explained: str = "true"

    name = "saliency"

    @property
    def shortcut_found(self) -> bool:
        """Some class's heat gathers in a corner, or lies on the lungs no more than an even spread would put it."""
        ratios, corners = self.table["ratio"].dropna(), self.table["corner_heat"].dropna()
        return bool((len(ratios) and (ratios <= 1.0).any()) or (len(corners) and (corners >= CORNER_HEAT_WARN).any()))

    @property
    def shares(self) -> dict[str, float]:
        """``{class: heat share on the lung fields}`` (for :func:`xraylib.plots.mean_heatmaps`)."""
        return {c: float(v) for c, v in self.table["heat_inside"].items()}

    def to_dict(self) -> dict[str, Any]:
        return json_safe({"test": self.name, "explained": self.explained, "verdict": self.verdict,
                           "shortcut_found": self.shortcut_found, "table": self.table.reset_index().to_dict(orient="records"),
                           "finding": self.finding().to_dict()})

    def finding(self) -> Finding:
        """The verdict with its numbers: per class, the heat share on the lung fields, its ratio to their area,
        and the heat in the hottest corner."""
        per_class = {c: {k: r[k] for k in ("heat_inside", "ratio", "hottest_corner", "corner_heat")}
                     for c, r in self.table.iterrows()}
        return _finding(self, {"explained": self.explained, "by_class": per_class})

    def to_markdown(self) -> str:
        def pct(value: float) -> str:
            return format_number(value, 0, style="percent")

        def corner(r: pd.Series) -> str:  # no corner where every map of the class is zero
            if not isinstance(r["hottest_corner"], str):
                return "n/a"
            return f"{r['hottest_corner'].replace('_', ' ')}: {pct(r['corner_heat'])} (area {pct(r['corner_area_share'])})"

        rows = pd.DataFrame([{"class": c, "images (no heat)": f"{int(r['n_images'])} ({int(r['n_no_heat'])})",
                              "heat on the lung fields": f"{pct(r['heat_inside'])} (area {pct(r['lung_area_share'])})",
                              "heat in the frame": f"{pct(r['heat_frame'])} (area {pct(r['frame_area_share'])})",
                              "hottest corner": corner(r), "mean map peaks": r["peak"]} for c, r in self.table.iterrows()])
        lines = ["## Saliency (Grad-CAM)", "", f"**{self.verdict}**", "",
                 f"Grad-CAM for each test image's {'own' if self.explained == 'true' else 'predicted'} class, averaged per "
                 "class. Lung fields: the approximate mask of xraylib.views.lung_field_mask; frame: outside the central "
                 "rectangle the lungs-hidden test blacks out. Each share is compared with its region's share of the image.", ""]
        return "\n".join(lines + markdown_table(rows)) + "\n"


def _where(mean_map: np.ndarray, lung_mask: np.ndarray) -> str:
    """Where a map peaks, in words: "top left of the image, outside the lung fields"."""
    if not np.isfinite(mean_map).all() or mean_map.max() <= 0:
        return "no heat"
    y, x = np.unravel_index(int(np.argmax(mean_map)), mean_map.shape)
    h, w = mean_map.shape
    vertical = "top" if y < h / 3 else "bottom" if y >= 2 * h / 3 else "middle"
    horizontal = "left" if x < w / 3 else "right" if x >= 2 * w / 3 else "centre"
    place = "centre" if (vertical, horizontal) == ("middle", "centre") else f"{vertical} {horizontal}".replace("middle ", "")
    return f"{place} of the image, {'on' if lung_mask[y, x] else 'outside'} the lung fields"


def _corner_masks(size: int) -> dict[str, np.ndarray]:
    from .audit import CORNER_FRACTION

    side = max(1, int(round(CORNER_FRACTION * size)))
    masks = {}
    for name, (rows, cols) in {"top_left": (slice(0, side), slice(0, side)),
                               "top_right": (slice(0, side), slice(size - side, size)),
                               "bottom_left": (slice(size - side, size), slice(0, side)),
                               "bottom_right": (slice(size - side, size), slice(size - side, size))}.items():
        mask = np.zeros((size, size), dtype=bool)
        mask[rows, cols] = True
        masks[name] = mask
    return masks


def saliency_heat_share(
    data: PreprocessedData,
    model: ModelLike,
    split: str = "test",
    *,
    explain_class: str = "true",
    lung_mask: np.ndarray | None = None,
    layer_name: str | None = None,
    max_images_per_class: int | None = None,
    batch_size: int = 32,
) -> SaliencyResult:
    """Grad-CAM (:func:`xraylib.explain.gradcam`) over ``split``, averaged per class, and the share of
    the heat on the lung fields (:func:`xraylib.explain.heat_share_inside`), in the frame and in
    each corner.

    ``model``: a LoadedModel, a model folder/file or a Keras model. ``explain_class``: "true"
    (each image's own class: where the evidence for what it is lies; default) or "predicted".
    ``lung_mask``: ``(S, S)`` bool, default :func:`xraylib.views.lung_field_mask`.
    ``layer_name``: the feature map (default: the backbone's last). ``max_images_per_class``: the
    first N of each class (default all). Images are read and explained ``batch_size`` at a time.
    Returns a :class:`SaliencyResult`: the mean map per class (for
    :func:`xraylib.plots.mean_heatmaps`), the shares, and a verdict. Grad-CAM is coarse (the
    last feature map is 1/16 to 1/32 of the image) and only a hint: read it with the
    lungs-hidden test, which measures rather than points.
    """
    from . import explain

    keras_model, loaded = _resolve_model(model)
    _check_model_classes(loaded, data)
    if explain_class not in ("true", "predicted"):
        raise ConfigError(f"explain_class must be 'true' or 'predicted', got {explain_class!r}")
    if split not in data.splits:
        raise ConfigError(f"no split {split!r}; the data have {sorted(data.splits)}")
    part = data[split]
    size = data.settings.image_size
    mask = lung_field_mask(size) if lung_mask is None else np.asarray(lung_mask, dtype=bool)
    if mask.shape != (size, size):
        raise ConfigError(f"lung_mask must be ({size}, {size}) like the images, got {mask.shape}")
    frame = ~hidden_region(size, "rectangle")
    corners = _corner_masks(size)
    labels = np.asarray(part.labels)
    chosen = np.arange(len(labels))
    if max_images_per_class is not None:
        chosen = np.sort(np.concatenate([np.flatnonzero(labels == k)[:max_images_per_class]
                                         for k in range(len(data.classes))]))
    sums = {c: np.zeros((size, size), dtype=np.float64) for c in data.classes}
    shares: dict[str, list[np.ndarray]] = {c: [] for c in data.classes}
    regions = [mask, frame, *corners.values()]
    for begin in range(0, len(chosen), batch_size):
        rows = chosen[begin:begin + batch_size]
        images = np.asarray(part.images[rows])
        wanted = labels[rows].astype(int).tolist() if explain_class == "true" else None
        maps = explain.gradcam(keras_model, images, class_index=wanted, layer_name=layer_name, batch_size=batch_size)
        per_region = np.stack([explain.heat_share_inside(maps, region) for region in regions], axis=1)  # (B, regions)
        for k, heat, share in zip(labels[rows], maps, per_region):
            name = data.classes[int(k)]
            sums[name] += heat
            shares[name].append(share)
    records, mean_maps = [], {}
    for name in data.classes:
        n = len(shares[name])
        mean_maps[name] = (sums[name] / n).astype(np.float32) if n else np.zeros((size, size), dtype=np.float32)
        values = np.array(shares[name], dtype=np.float64).reshape(n, len(regions))
        has_heat = np.isfinite(values[:, 0])
        means = values[has_heat].mean(axis=0) if has_heat.any() else np.full(len(regions), np.nan)
        corner_names = list(corners)
        hottest = int(np.nanargmax(means[2:])) if has_heat.any() else None
        records.append({
            "class": name, "n_images": n, "n_no_heat": int(n - has_heat.sum()),
            "heat_inside": means[0], "heat_outside": 1.0 - means[0], "lung_area_share": float(mask.mean()),
            "ratio": means[0] / float(mask.mean()), "heat_frame": means[1], "frame_area_share": float(frame.mean()),
            "hottest_corner": None if hottest is None else corner_names[hottest],
            "corner_heat": np.nan if hottest is None else means[2 + hottest],
            "corner_area_share": float(corners[corner_names[hottest or 0]].mean()),  # all four squares are alike
            "peak": _where(mean_maps[name], mask) if n else "no images",
        })
    table = pd.DataFrame(records).set_index("class")
    return SaliencyResult(tuple(data.classes), mean_maps, table, mask, _saliency_verdict(table, explain_class),
                          explain_class)


def _saliency_verdict(table: pd.DataFrame, explained: str = "true") -> str:
    parts, outside, cornered, no_heat, with_heat = [], [], [], [], []
    for name, r in table.iterrows():
        n, n_zero = int(r["n_images"]), int(r["n_no_heat"])
        if n == 0:
            parts.append(f"{name}: no images")
        elif n_zero == n:
            # Every map zero: its shares are NaN, which must not pass for "no heat outside the lungs".
            no_heat.append(name)
            evidence = name if explained == "true" else "the predicted class"
            parts.append(f"{name}: all {n} Grad-CAM maps are zero (no positive evidence for {evidence} anywhere in the "
                         "image), so where the model looks cannot be said")
        else:
            with_heat.append(name)
            left_out = f" ({n_zero} of {n} maps all zero, left out)" if n_zero else ""
            corner = r["hottest_corner"].replace("_", " ")
            pct = {k: format_number(r[k], 0, style="percent")
                   for k in ("heat_inside", "lung_area_share", "corner_heat", "corner_area_share")}
            parts.append(f"{name}: {pct['heat_inside']} of the heat on the lung fields ({pct['lung_area_share']} of "
                         f"the image), {pct['corner_heat']} in the {corner} corner ({pct['corner_area_share']} of the "
                         f"image), peak at the {r['peak']}{left_out}")
            if r["corner_heat"] >= CORNER_HEAT_WARN:
                cornered.append(f"{name} ({corner})")
            if r["ratio"] <= 1.0:
                outside.append(name)
    if not with_heat:
        if not no_heat:
            return "no heat: there were no images to explain"
        return ("No heat: every Grad-CAM map is zero; the model found no positive evidence anywhere in any image, so "
                "this test cannot say where it looks. " + "; ".join(parts) + ".")
    heads = []
    if cornered:
        heads.append(f"Heat gathers in a corner for {', '.join(cornered)}: a marker, text or label burned in there may be "
                     "what the model reads")
    if outside:
        heads.append(f"for {', '.join(outside)} the heat lies on the lungs no more than an even spread would put it: the "
                     "model looks outside the lungs")
    if not heads:
        every = f"for {', '.join(with_heat)}" if no_heat else "for every class"
        heads.append(f"The heat is concentrated on the lung fields {every}"
                     if (table["ratio"].dropna() >= LUNG_HEAT_RATIO_OK).all()
                     else "The heat is only loosely concentrated on the lung fields")
    if no_heat:
        heads.append(f"no heat at all for {', '.join(no_heat)}: every map is zero, so this test says nothing about where "
                     "the model looks for " + ("it" if len(no_heat) == 1 else "them"))
    head = "; ".join(heads)
    return head[0].upper() + head[1:] + ". " + "; ".join(parts) + "."


# ---------------------------------------------------------------------------------------------
# All four, and the report


def run_shortcut_tests(
    model_dir: str | os.PathLike,
    data: PreprocessedData,
    work_dir: str | os.PathLike,
    tests: Sequence[str] = ("source", "lungs", "loso", "saliency"),
    *,
    split: str = "test",
    train_masked: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
    verbose: int | str = 0,
    progress: bool = True,
) -> list[Any]:
    """Run the shortcut tests for the model in ``model_dir`` on ``data`` (notebook 04, the CLI).

    Retraining (source prediction, leave one source out, lungs hidden with ``train_masked``)
    uses the model's own spec and training settings, read from its ``model.json``, and writes
    run folders under ``work_dir`` (``source/``, ``lungs_hidden/``, ``loso/``): re-running
    loads them. ``tests``: any of "source", "lungs", "loso", "saliency". Returns the results in
    that order (pass them to :func:`write_shortcut_report`). ``progress``: each retraining test prints how many
    trainings it runs and shows a bar over them (False: silent).
    """
    from .models import load_model

    unknown = sorted(set(tests) - {"source", "lungs", "loso", "saliency"})
    if unknown:
        raise ConfigError(f"unknown shortcut test(s) {unknown}; choose from source, lungs, loso, saliency")
    loaded = load_model(model_dir)
    spec, settings = training_recipe(loaded)
    work_dir = Path(work_dir)
    results: list[Any] = []
    for test in tests:
        if test == "source":
            results.append(source_prediction(data, spec, settings, work_dir / "source", split=split, n_boot=n_boot,
                                             seed=seed, verbose=verbose, progress=progress))
        elif test == "lungs":
            results.append(lungs_hidden(data, loaded, split, train_masked=train_masked, run_dir=work_dir / "lungs_hidden",
                                        n_boot=n_boot, seed=seed, verbose=verbose, progress=progress))
        elif test == "loso":
            results.append(leave_one_source_out(data, spec, settings, work_dir / "loso", n_boot=n_boot, seed=seed,
                                                verbose=verbose, progress=progress))
        else:
            results.append(saliency_heat_share(data, loaded, split))
    return results


def shortcut_report_markdown(results: Sequence[Any], title: str = "Shortcut tests") -> str:
    """The results of the shortcut tests as one Markdown report, verdicts first."""
    lines = [f"# {title}", "", f"**{REPORT_DISCLAIMER}**", "",
             "Did the model learn the disease or the data set? Each test below asks it a different way.", "",
             "## Verdicts", ""]
    lines += [f"- **{r.name}**: {r.finding().message}" for r in results]
    lines.append("")
    for r in results:
        lines.append(r.to_markdown())
    return "\n".join(lines).rstrip() + "\n"


def write_shortcut_report(results: Sequence[Any], out_dir: str | os.PathLike, name: str = "shortcuts") -> dict[str, Path]:
    """Write ``<name>.json`` and ``<name>.md`` into ``out_dir`` atomically; return ``{"json": path, "md": path}``."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md"}
    write_json_atomic(paths["json"], {"disclaimer": DISCLAIMER, "thresholds": {
        "source_auc_warn": SOURCE_AUC_WARN, "hidden_auc_warn": HIDDEN_AUC_WARN, "chance_auc": CHANCE_AUC,
        "wide_interval": WIDE_INTERVAL, "lung_heat_ratio_ok": LUNG_HEAT_RATIO_OK, "corner_heat_warn": CORNER_HEAT_WARN,
        "central_rectangle": list(CENTRAL_RECTANGLE),
        "hospital_groups": HOSPITAL_GROUPS}, "tests": [r.to_dict() for r in results]})
    write_text_atomic(paths["md"], shortcut_report_markdown(results))
    return paths
