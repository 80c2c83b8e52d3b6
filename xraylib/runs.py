"""The run layer: one training run's folder, ``OUTPUT/models/RUN``, and the one module that writes into it.

A run folder holds::

    checkpoints/epoch_NNN[.head].keras, checkpoints/state.json    while training (resume after a disconnect)
    history.csv                                                     one row per epoch
    model.keras, model.h5, model.json                               the trained model and what is needed to use it
    model.weights.h5                                                its weights only: loads across Keras versions
    MODEL_CARD.md                                                   intended use, data, metrics, warnings
    ood.npz, ood.json                                               the out-of-distribution reference (serve, predict)

:class:`RunFolder` names these files and is the only code that writes them: training
(:func:`xraylib.train.fit`) writes its checkpoints through the RunFolder it is given. Above the
model layer (``models``, ``batches``, ``features``, ``train``) and the judgement it needs
(``evaluate``, ``modelcard``, ``ood``, ``plots``), this module finishes what they leave open:

- :func:`train` runs training where a run stopped, chooses the decision threshold on the
  validation split and saves the model with its ``model.json`` (built by :func:`run_metadata`,
  checked by :func:`xraylib.models.check_metadata` before it is written) and its model card;
- :func:`evaluate` predicts a held-out split, computes the metrics (:func:`xraylib.evaluate.evaluate`),
  writes the report and plots into ``OUTPUT/reports/RUN`` and records the metrics in ``model.json``;
- :func:`write_card` and :func:`prepare_ood` write the model card and the out-of-distribution reference.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import keras
import numpy as np
import pandas as pd

from . import evaluate as judge
from . import distribute, models, modelcard, ood, outofsite, preprocess
from . import train as training
from .errors import ConfigError, ModelError, XraylibError
from .fileio import atomic_path, json_safe, read_json, write_csv_atomic, write_json_atomic, write_text_atomic
from .models import LoadedModel, ModelSpec
from .preprocess import PIXELS_VERSION, PreprocessedData
from .reporting import REPORT_DISCLAIMER, probability_columns
from .train import TrainResult, TrainSettings

__all__ = ["RunFolder", "fingerprint", "run_metadata", "train", "finish", "evaluate", "ModelEvaluation",
           "write_card", "prepare_ood"]


# --------------------------------------------------------------------------------------------
# The folder


@dataclass
class RunFolder:
    """The files of one run under ``root``, and the only writer of them."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    @classmethod
    def of(cls, model_path: str | os.PathLike) -> "RunFolder":
        """The run folder of a model path: the folder itself, the folder of ``model.keras``/``model.h5``, or the
        run folder around a ``saved_model/`` export."""
        path = Path(model_path)
        if path.is_file():
            return cls(path.parent)
        if models.is_saved_model_dir(path) and not (path / "model.json").is_file():
            return cls(path.parent)
        return cls(path)

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def state(self) -> Path:
        return self.checkpoints / "state.json"

    @property
    def history(self) -> Path:
        return self.root / "history.csv"

    @property
    def model_keras(self) -> Path:
        return self.root / "model.keras"

    @property
    def model_h5(self) -> Path:
        return self.root / "model.h5"

    @property
    def model_weights(self) -> Path:
        return self.root / models.WEIGHTS_FILE

    @property
    def model_json(self) -> Path:
        return self.root / "model.json"

    @property
    def card(self) -> Path:
        return self.root / modelcard.MODEL_CARD_NAME

    @property
    def name(self) -> str:
        return self.root.name

    # Training state -------------------------------------------------------------------------

    def read_state(self) -> dict | None:
        """The last checkpoint's state (epochs done, stage, checkpoint file, fingerprint), or None."""
        return read_json(self.state)

    def history_rows(self, epochs_done: int) -> list[dict]:
        """The history rows of the epochs a resumed run keeps."""
        if not self.history.exists():
            return []
        return [r for r in pd.read_csv(self.history).to_dict("records") if r["epoch"] <= epochs_done]

    def reset(self) -> None:
        """Forget a previous run's checkpoints and history (``resume=False``)."""
        shutil.rmtree(self.checkpoints, ignore_errors=True)
        self.history.unlink(missing_ok=True)

    def is_saved(self) -> bool:
        """Whether the final model is in place (``model.json`` is written last, so it tells)."""
        return self.model_json.exists() and self.model_keras.exists()

    def load_checkpoint(self, state: dict) -> keras.Model:
        return keras.models.load_model(self.checkpoints / state["checkpoint"])

    def save_checkpoint(self, model: keras.Model, epoch: int, state: dict[str, Any], history_rows: list[dict]) -> None:
        """At an epoch's end: the model being fit (optimizer included), the history, then the state.

        Each checkpoint has its own file and the state file, written last and atomically, names the one to
        resume from, so a kill at any moment leaves a consistent checkpoint. ``state["kind"]`` "model": the full
        model (``epoch_NNN.keras``); "head": the head-only model fit on cached features (``epoch_NNN.head.keras``).
        """
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        kind = state.get("kind", "model")
        name = f"epoch_{epoch:03d}.keras" if kind == "model" else f"epoch_{epoch:03d}.{kind}.keras"
        _save_keras(model, self.checkpoints / name)
        write_csv_atomic(self.history, pd.DataFrame(history_rows))
        previous = self.read_state()
        write_json_atomic(self.state, {"epochs_done": epoch, **state, "checkpoint": name})
        if previous and previous.get("checkpoint") != name:
            (self.checkpoints / previous["checkpoint"]).unlink(missing_ok=True)

    # The saved model ------------------------------------------------------------------------

    def save_model(self, model: keras.Model, metadata: dict[str, Any]) -> dict[str, Path]:
        """Save ``model.keras``, ``model.h5`` (the seeds' format), ``model.weights.h5`` (the weights only: with the
        JSON's spec they load across Keras versions, see :func:`xraylib.models.load_model`) and ``model.json``, each
        atomically, the JSON last.

        ``metadata`` is checked against :func:`xraylib.models.check_metadata` first and written with the
        xraylib, Keras and TensorFlow versions added.
        """
        import datetime

        from . import __version__

        models.check_metadata(metadata, self.model_json)
        self.root.mkdir(parents=True, exist_ok=True)
        out = {}
        for path in (self.model_keras, self.model_h5):
            _save_keras(model, path, tmp_name=f"tmp_saving{path.suffix}")
            out[path.name] = path
        _save_weights(model, self.model_weights)
        out[self.model_weights.name] = self.model_weights
        versions = {"xraylib": __version__, "keras": keras.__version__, "backend": keras.backend.backend()}
        try:
            import tensorflow as tf

            versions["tensorflow"] = tf.__version__
        except ImportError:  # another Keras backend
            pass
        saved_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        write_json_atomic(self.model_json, {"format": models.METADATA_FORMAT, "saved_at": saved_at,
                                            "versions": versions, **metadata})
        out[self.model_json.name] = self.model_json
        return out

    def _update_metadata(self, change: Callable[[dict[str, Any]], None], check: bool = False) -> None:
        """Read ``model.json``, apply ``change`` to it, with ``check`` check it (:func:`xraylib.models.check_metadata`),
        and write it back atomically: the one way a run's JSON is changed after training."""
        metadata = read_json(self.model_json)
        if metadata is None:
            raise ModelError(f"{self.model_json}: missing or not valid JSON; it is written by training (runs.train)")
        change(metadata)
        if check:
            models.check_metadata(metadata, self.model_json)
        write_json_atomic(self.model_json, metadata)

    def record_metrics(self, metrics: dict[str, Any]) -> None:
        """Add evaluation metrics to ``model.json`` (atomically), keeping what is there."""
        self._update_metadata(lambda metadata: metadata.setdefault("metrics", {}).update(metrics))

    def record_out_of_site(self, estimate: dict[str, Any]) -> None:
        """Keep an out-of-site estimate (:meth:`xraylib.outofsite.OutOfSiteResult.to_dict`) in ``model.json``."""
        self._update_metadata(lambda metadata: metadata.__setitem__("out_of_site", estimate))

    def record_site_profile(self, name: str, profile: dict[str, Any]) -> dict[str, Any]:
        """Add (or replace) site profile ``name`` in ``model.json`` (atomically), keeping the model's own threshold and
        the other sites'. The whole file is checked (:func:`xraylib.models.check_metadata`) before it is written.
        Returns the profile as stored."""
        name = models.check_site_name(name)
        stored = json_safe(profile)
        self._update_metadata(lambda metadata: metadata.__setitem__(
            "site_profiles", {**(metadata.get("site_profiles") or {}), name: stored}), check=True)
        return stored

    def write_card(self, metadata: dict[str, Any] | None = None, evaluation: Any = None, audit_report: Any = None,
                   *, data: PreprocessedData | None = None, shortcut_results: Sequence[Any] | None = None) -> Path:
        """Write ``MODEL_CARD.md`` (atomically): :func:`xraylib.modelcard.model_card_markdown`'s arguments."""
        text = modelcard.model_card_markdown(self.root, metadata, evaluation, audit_report, data=data,
                                             shortcut_results=shortcut_results)
        write_text_atomic(self.card, text)
        return self.card

    def save_ood(self, reference: "ood.OODReference") -> dict[str, Path]:
        """Write ``ood.npz`` (arrays) and ``ood.json`` (settings, bounds, threshold), each atomically, the JSON last:
        a reference is only read when its JSON names it, so an interrupted save leaves none."""
        arrays, meta = ood.reference_files(reference)
        with atomic_path(self.root / "ood.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
        write_json_atomic(self.root / "ood.json", meta)
        return {"ood.npz": self.root / "ood.npz", "ood.json": self.root / "ood.json"}


def _save_keras(model: keras.Model, path: Path, tmp_name: str | None = None) -> None:
    """``model.save`` to a temporary name beside ``path`` (with ``path``'s suffix: Keras picks the format from it),
    then a rename onto ``path``: a kill leaves the old file or the new one, never half of one."""
    tmp = path.parent / (tmp_name or f"tmp_{path.name}")
    model.save(tmp)
    os.replace(tmp, path)


def _save_weights(model: keras.Model, path: Path) -> None:
    """``model.save_weights`` to a temporary ``*.weights.h5`` beside ``path`` (Keras needs that ending), then a
    rename onto ``path``."""
    tmp = path.parent / f"tmp_saving.{models.WEIGHTS_FILE}"
    try:
        model.save_weights(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Training a run


#: Settings that say when to stop or how to compute, not what is trained: a run may be resumed with others.
_NOT_RECIPE = ("epochs", "fine_tune_epochs", "mixed_precision", "jit_compile", "threshold_on", "strategy")


def fingerprint(data: PreprocessedData, spec: ModelSpec, settings: TrainSettings) -> str:
    """What a checkpoint was trained on and how: resuming with anything else is refused."""
    # The epoch counts only say when to stop, so a finished run can be continued for more epochs; precision and
    # XLA say how to compute, not what, so a run started on a GPU can be resumed on a CPU (and the strategy: on
    # another number of devices, the global batch being the same).
    # Where the threshold is chosen does not change the weights (threshold_on is not recipe either), and a field added
    # later is left out at its default, so that run folders made before it keep resuming.
    recipe = {k: v for k, v in settings.to_dict().items() if k not in _NOT_RECIPE}
    model = {k: v for k, v in spec.to_dict().items() if not (k == "heads" and v == 1)}
    payload = json.dumps({"data": data.key, "spec": model, "settings": recipe}, sort_keys=True)
    return hashlib.sha1(payload.encode()).hexdigest()


def train(
    data: PreprocessedData,
    spec: ModelSpec,
    settings: TrainSettings = TrainSettings(),
    run_dir: str | os.PathLike = "outputs/models/run",
    resume: bool = True,
    verbose: int | str = "auto",
    choose_threshold: bool = True,
) -> TrainResult:
    """Train ``spec`` on ``data``'s train split, validating on its val split; save everything in ``run_dir``.

    Stage 1 trains the head over the frozen backbone for ``settings.epochs``: on cached backbone
    features (``feature_cache``, the default; see :mod:`xraylib.features`) or on images streamed
    every epoch. Stage 2 (if ``fine_tune_epochs``) unfreezes the backbone's top block at
    ``fine_tune_learning_rate`` and streams the images. With ``resume`` (default) a run interrupted
    in ``run_dir`` continues at its next epoch with its optimizer state; a finished run is loaded,
    not retrained. ``resume=False`` starts over. Then the decision threshold is chosen on the
    validation split (``choose_threshold=False``: none, for models scored by AUC only) and the model
    is saved (``.keras``, ``.h5``, ``model.json``, ``MODEL_CARD.md``).

    Training runs under ``settings.strategy`` (:mod:`xraylib.distribute`). In a multi-worker cluster every worker
    calls this with the same arguments; the chief writes ``run_dir``, each other worker its checkpoints in
    ``run_dir/workers/<type>-<index>`` (to resume from: the same epochs as the chief's), and only the chief
    chooses the threshold and saves the model (the others return it with ``threshold`` None).
    """
    training.check_inputs(data, spec, settings)
    strategy = distribute.choose_strategy(settings.strategy)  # first: a cluster starts before any other TensorFlow work
    task = distribute.worker(strategy)
    chief = distribute.is_chief(strategy)
    run = RunFolder(Path(run_dir) if chief else Path(run_dir) / "workers" / f"{task[0]}-{task[1]}")
    run.root.mkdir(parents=True, exist_ok=True)
    tag = fingerprint(data, spec, settings)
    state = run.read_state()
    if state and not resume:
        run.reset()
        state = None
    if state and state.get("fingerprint") != tag:
        raise ConfigError(
            f"{run.root} holds a run trained on other data or settings; choose another run folder, "
            "or pass resume=False (--no-resume) to start this one over"
        )
    done = int(state["epochs_done"]) if state else 0
    # In a cluster every worker goes on into fit: building the model there is collective (the chief's values).
    if task is None and done >= settings.epochs + settings.fine_tune_epochs and run.is_saved():
        model = keras.models.load_model(run.model_keras)
        meta = json.loads(run.model_json.read_text())
        weights = training.class_weights(data["train"].labels, len(data.classes)) if settings.class_weighting else {}
        threshold = meta.get("threshold", {}).get("value", 0.5)
        if choose_threshold and meta.get("training", {}).get("threshold_on", "validation") != settings.threshold_on:
            # The same weights, asked for a threshold chosen elsewhere: choose it and save the model again.
            threshold = finish(model, data, spec, settings, run, execution=meta.get("execution"))
        return TrainResult(model, pd.DataFrame(run.history_rows(done)), run, weights, threshold, done)
    result = training.fit(data, spec, settings, run, state, tag, verbose, strategy=strategy)
    if not chief:
        return result
    started = time.time()
    model = result.model if task is None else distribute.local_copy(result.model)
    threshold = finish(model, data, spec, settings, run, val_probabilities=result.val_probabilities,
                       execution=result.execution, choose_threshold=choose_threshold)
    return dataclasses.replace(result, threshold=threshold, seconds=result.seconds + time.time() - started)


def _positive_class(classes: Sequence[str]) -> str:
    # 3+ classes without "covid" (e.g. source prediction over 3+ sources): the last class vs the rest.
    return judge.resolve_positive_class(classes) if len(classes) == 2 or "covid" in classes else classes[-1]


def run_metadata(data: PreprocessedData, spec: ModelSpec, settings: TrainSettings, threshold: dict[str, Any],
                 execution: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``model.json`` of a model trained on ``data`` (without the versions :meth:`RunFolder.save_model` adds):
    everything :func:`xraylib.models.load_model` and prediction need, and what it was trained on."""
    training_data: dict[str, Any] = {"key": data.key, "folder": str(data.folder),
                                     "counts": {name: len(split) for name, split in data.splits.items()}}
    if data.report.get("view") is not None:  # a view of the data made by the shortcut tests
        training_data["view"] = data.report["view"]
    metadata = {
        "classes": list(data.classes),
        "input_size": [spec.image_size, spec.image_size, 1],
        "preprocessing": {**data.settings.to_dict(), "normalisation": "inside the model (layers to_rgb, normalise)",
                          "pixels_version": PIXELS_VERSION},
        "model": spec.to_dict(),
        "training": settings.to_dict(),
        "training_data": training_data,
        "threshold": threshold,
    }
    if execution:
        metadata["execution"] = execution
    return metadata


def finish(model: keras.Model, data: PreprocessedData, spec: ModelSpec, settings: TrainSettings, run: RunFolder,
           val_probabilities: np.ndarray | None = None, execution: dict[str, Any] | None = None,
           choose_threshold: bool = True) -> float:
    """Choose the decision threshold on the validation split and save the model (.keras, .h5, JSON) and its card.

    ``val_probabilities`` ``(N_val, C)``: the model's validation predictions where they are already
    known (from cached features); otherwise the model predicts the split. A mixed-precision model is
    saved as its float32 copy, so it predicts the same on any machine. Returns the threshold.
    """
    estimate: dict[str, Any] | None = None
    if choose_threshold:
        if val_probabilities is None:
            val = models.predict_split(model, data["val"])
        else:
            val = data["val"].manifest.copy()
            val[probability_columns(data.classes)] = val_probabilities
        positive = _positive_class(data.classes)
        value = judge.threshold_from_validation(val, data.classes, positive_class=positive,
                                                rule=settings.threshold_rule, min_sensitivity=settings.min_sensitivity)
        threshold = {"value": value, "positive_class": positive, "rule": settings.threshold_rule,
                     "min_sensitivity": settings.min_sensitivity, "chosen_on": "validation split"}
        if settings.threshold_on == "out_of_site":
            threshold, estimate = _out_of_site_threshold(model, data, spec, settings, threshold)
    else:
        threshold = {"value": 0.5, "positive_class": data.classes[-1], "rule": "none (scored by AUC only)",
                     "chosen_on": "not chosen"}
    metadata = run_metadata(data, spec, settings, threshold, execution)
    if estimate is not None:
        metadata["out_of_site"] = estimate
    run.save_model(models.as_float32(model, spec), metadata)
    run.write_card(metadata, data=data)
    return float(threshold["value"])


def _out_of_site_threshold(model: keras.Model, data: PreprocessedData, spec: ModelSpec, settings: TrainSettings,
                           validation: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The threshold chosen on the out-of-site estimate's pooled held-out predictions (with its bootstrap spread and
    the validation split's threshold beside it), and the estimate; where no estimate can run, ``validation`` with a
    note saying why."""
    result, why = outofsite.for_model(model, data, spec, settings, positive_class=validation["positive_class"])
    if result is None:
        return {**validation, "note": f"asked for a threshold chosen on out-of-site predictions, but {why}; "
                                      "chosen on the validation split instead"}, None
    chosen = result.thresholds["out_of_site"]
    threshold = {**validation, "value": chosen["value"], "chosen_on": chosen["chosen_on"],
                 "spread": chosen["spread"], "validation_value": float(validation["value"])}
    return threshold, result.to_dict()


# --------------------------------------------------------------------------------------------
# Evaluating a run


@dataclass
class ModelEvaluation:
    """A saved model evaluated on a held-out split: the :class:`~xraylib.evaluate.Evaluation`, the prediction
    tables, the training history and the files written."""

    evaluation: judge.Evaluation
    val_predictions: pd.DataFrame
    test_predictions: pd.DataFrame
    history: pd.DataFrame | None
    files: dict[str, Path]
    #: The out-of-site estimate as saved in model.json (``unavailable``: why there is none), or None when not asked.
    out_of_site: dict[str, Any] | None = None


def evaluate(
    model_dir: str | os.PathLike,
    data: PreprocessedData,
    out_dir: str | os.PathLike | None = None,
    split: str = "test",
    n_boot: int = 1000,
    seed: int = 0,
    save_plots: bool = True,
    out_of_site: bool = True,
) -> ModelEvaluation:
    """Predict the validation and ``split`` sets with the model in ``model_dir`` and evaluate ``split``.

    The threshold is the one saved with the model (chosen at training on the validation split or on
    out-of-site predictions), so the numbers describe the model as it will be used. Writes into ``out_dir``
    (default: ``model_dir/evaluation``) ``evaluation.json``, ``evaluation.md``, the prediction
    CSVs and the plots, and adds the test metrics to ``model.json``.

    With ``out_of_site`` (default) it also reports the out-of-site estimate (:mod:`xraylib.outofsite`):
    the one saved at training, else computed now on ``data``'s train and val splits and kept in
    ``model.json`` (seconds per fold on cached features), with a finding that says whether the internal
    score and the estimate agree; ``out_of_site.md``/``.json`` beside the report.
    """
    from . import plots

    loaded = models.load_model(model_dir)
    if tuple(loaded.classes) != tuple(data.classes):
        raise judge.EvaluationError(f"{loaded.path}: model classes {list(loaded.classes)} differ from the data's {list(data.classes)}")
    if split not in data.splits:
        raise judge.EvaluationError(f"no split {split!r}; the preprocessed data has {sorted(data.splits)}")
    run = RunFolder.of(loaded.path)
    out = Path(out_dir) if out_dir is not None else run.root / "evaluation"
    val = models.predict_split(loaded.model, data["val"])
    test = models.predict_split(loaded.model, data[split])
    saved = loaded.metadata.get("threshold", {})
    threshold = judge.Threshold(loaded.threshold, f"{saved.get('rule', 'saved with the model')} (on the "
                                                  f"{saved.get('chosen_on', 'validation split')})")
    result = judge.evaluate(test, data.classes, threshold, positive_class=loaded.positive_class, n_boot=n_boot, seed=seed)
    estimate = _out_of_site_estimate(loaded, data, run, n_boot) if out_of_site else None
    if estimate is not None and "metrics" in estimate:
        finding = outofsite.compare_with_internal(result.metrics["roc_auc"], estimate)
        result.findings.append(finding)
        if finding.level != "ok":
            result.warnings.append(finding.message)
    files = judge.write_report(result, out)
    if estimate is not None:
        lines = ["# What to expect in a hospital the model never saw", "", REPORT_DISCLAIMER, ""]
        lines += ([estimate["unavailable"]] if "unavailable" in estimate
                  else outofsite.markdown_lines(estimate, internal_auc=result.metrics["roc_auc"]))
        write_json_atomic(out / "out_of_site.json", estimate)
        write_text_atomic(out / "out_of_site.md", "\n".join(lines) + "\n")
        files.update({"out_of_site.json": out / "out_of_site.json", "out_of_site.md": out / "out_of_site.md"})
    for name, frame in (("val_predictions.csv", val), (f"{split}_predictions.csv", test)):
        write_csv_atomic(out / name, frame)
        files[name] = out / name
    history = pd.read_csv(run.history) if run.history.exists() else None
    if save_plots:
        files.update(plots.evaluation_figures(result, test, data.classes, loaded.positive_class, history, out,
                                              split=split))
    run.record_metrics({split: result.to_dict()["metrics"], f"{split}_n_images": result.n_images,
                        f"{split}_n_patients": result.n_patients})
    return ModelEvaluation(result, val, test, history, files, estimate)


def _out_of_site_estimate(loaded: LoadedModel, data: PreprocessedData, run: RunFolder, n_boot: int) -> dict[str, Any]:
    """The model's out-of-site estimate: the one in ``model.json``, else computed now and kept there."""
    saved = loaded.metadata.get("out_of_site")
    if isinstance(saved, dict) and "metrics" in saved:
        return saved
    known = set(TrainSettings.__dataclass_fields__)
    try:
        settings = TrainSettings.from_dict({k: v for k, v in (loaded.metadata.get("training") or {}).items() if k in known})
    except (TypeError, ValueError, XraylibError) as exc:
        return {"unavailable": f"no out-of-site estimate: model.json's training settings cannot be read ({exc})"}
    result, why = outofsite.for_model(loaded.model, data, loaded.spec, settings,
                                      positive_class=loaded.positive_class, n_boot=n_boot)
    if result is None:
        return {"unavailable": why}
    estimate = result.to_dict()
    run.record_out_of_site(estimate)
    return estimate


def write_card(model_dir: str | os.PathLike, metadata: dict[str, Any] | None = None, evaluation: Any = None,
               audit_report: Any = None, *, data: PreprocessedData | None = None,
               shortcut_results: Sequence[Any] | None = None) -> Path:
    """Write ``MODEL_CARD.md`` into the run folder of ``model_dir`` and return its path (see
    :func:`xraylib.modelcard.model_card_markdown` for the arguments and their defaults)."""
    return RunFolder.of(model_dir).write_card(metadata, evaluation, audit_report, data=data,
                                              shortcut_results=shortcut_results)


# --------------------------------------------------------------------------------------------
# The out-of-distribution reference of a run


def prepare_ood(loaded: LoadedModel, data_dir: str | Path | None = None,
                say: Callable[[str], None] = print) -> tuple["ood.OODReference | None", str | None]:
    """The model's out-of-distribution reference, and a note for the page when it is missing or partial.

    Uses ``ood.json``/``ood.npz`` beside the model when they were made for it. Otherwise builds
    one from ``data_dir`` (the preprocessed folder, e.g. ``OUTPUT_DIR/preprocessed``) or, when
    not given, from the folder named in ``model.json`` if it still holds the same data, and
    saves it beside the model, in the model's folder (each file written atomically), saying so through ``say``
    ("saved the out-of-distribution reference beside the model: PATH"): the web server and ``predict`` both write
    it there on first use, and reuse it after. Where the folder is read-only it is kept in memory (rebuilt on each
    start), and ``say`` says that too. Without any, the guard runs its colour and shape checks only, and the note
    says so.
    """
    run = RunFolder.of(loaded.path)
    stale = None
    try:
        reference = ood.load_ood(run.root, loaded)
    except ModelError as exc:
        reference, stale = None, str(exc)
        say(f"warning: {exc}")
    if reference is not None:
        say(f"out-of-distribution reference: {run.root / 'ood.json'}")
        return reference, _partial_note(loaded, reference)
    training_data = loaded.metadata.get("training_data", {})
    if data_dir is None and training_data.get("folder"):
        candidate = Path(training_data["folder"])
        if preprocess.holds_preprocessed(candidate, key=training_data.get("key")):
            data_dir = candidate
            say(f"building the out-of-distribution reference from the model's training data: {candidate}")
    if data_dir is None:
        why = "it is stale" if stale else "there is none"
        note = (f"The out-of-distribution check is limited to colour and shape: this model has no reference of its "
                f"training images ({why}). Start the server (or predict) with --data OUTPUT_DIR/preprocessed to build one.")
        say(f"warning: {note}")
        return None, note
    data = preprocess.load_preprocessed(data_dir)
    if training_data.get("key") and data.key != training_data.get("key"):
        say(f"warning: {data_dir} is not the data the model was trained on (its key differs from model.json's); "
            "the reference describes these images instead")
    reference = ood.fit_ood(loaded, data)
    try:
        files = run.save_ood(reference)
        say(f"saved the out-of-distribution reference beside the model: {files['ood.json']} and {files['ood.npz'].name} "
            "(reused from now on; delete both to rebuild)")
    except OSError as exc:
        say(f"warning: could not save the out-of-distribution reference beside the model in {run.root} "
            f"({exc.strerror or exc}); kept in memory for this run only")
    return reference, _partial_note(loaded, reference)


def _partial_note(loaded: LoadedModel, reference: "ood.OODReference") -> str | None:
    if reference.has_features and loaded.has_layers:
        return None
    return ("The out-of-distribution check compares intensity statistics, layout, colour and shape, without the "
            "feature-distance check: that needs the model's layers (load model.keras or model.h5, not a SavedModel).")
