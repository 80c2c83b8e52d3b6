"""A short model card, ``MODEL_CARD.md``, written next to every saved model.

After Mitchell et al., "Model Cards for Model Reporting" (FAT* 2019), cut to what a reader of
a chest X-ray classifier needs before trusting any number: what it is for (research and
teaching, never diagnosis), what it was trained on (sources, classes, counts), how images are
preprocessed, how well it did on held-out patients (with intervals and n, or "not evaluated
yet"), what the data audit and the shortcut tests warned about, and how such models are known
to fail.

The card is built from the model's ``model.json`` and whatever else is at hand: the
preprocessed data (counts per source and class), an evaluation, an audit report, shortcut test
results. Where they are not passed, it looks for them where xraylib's stages write them (the
output folder's ``reports/audit.json`` and ``reports/<run>/{evaluation,shortcuts}.json``).
Re-writing the card after each stage keeps it current. NumPy/pandas only: no TensorFlow.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import pandas as pd

from .fileio import read_json
from .reporting import DISCLAIMER, format_interval, format_number, markdown_table, warning_lines

if TYPE_CHECKING:
    from .preprocess import PreprocessedData

__all__ = ["MODEL_CARD_NAME", "KNOWN_FAILURE_MODES", "model_card_markdown", "training_data_table"]

#: The card's file name, next to ``model.keras`` / ``model.h5`` / ``model.json``.
MODEL_CARD_NAME = "MODEL_CARD.md"

#: How chest X-ray classifiers like this one are known to fail, in plain words (each line is a
#: heading and its explanation). Lines that the training data make especially likely are marked
#: "applies here" on the card.
KNOWN_FAILURE_MODES: dict[str, str] = {
    "shortcut learning": (
        "a model can score well by recognising where an image comes from (hospital, scanner, processing, burned-in "
        "markers and text, the patient's position) instead of the disease (DeGrave et al., Nature Machine Intelligence "
        "2021; Maguolo and Nanni 2021). A high internal test score is not evidence against it: run the shortcut tests."),
    "children against adults": (
        "Kaggle's chest-xray-pneumonia images are children aged one to five; compared with adult COVID-19 patients, "
        "a model can learn age and body size. Its score says nothing about adults."),
    "new hospitals": (
        "performance measured on patients drawn like the training patients does not carry over to another hospital, "
        "scanner or population; expect it to fall, sometimes towards chance, until tested on a source left out."),
    "lateral and unusual views": (
        "the model was trained on the views in its training data (frontal PA/AP by default); lateral films, "
        "rotated, cropped or paediatric films and photographs of screens are outside what it knows."),
    "findings it never saw": (
        "it knows only its classes; tuberculosis, effusions, tumours, devices or other pneumonias are forced into one "
        "of them, often with high confidence."),
    "prevalence and threshold": (
        "the threshold was chosen on the validation split at a sensitivity target; where the disease is rarer or more "
        "common than in these data, PPV and NPV change, and the threshold may no longer fit."),
    "small test sets": (
        "a few dozen test patients give wide intervals; a point value without its interval and n is not a result."),
    "Grad-CAM": (
        "heatmaps are coarse hints where the model looked, not findings; a model that learned a shortcut lights up "
        "the shortcut, and a plausible map does not show that the model is right."),
}

#: Fewer test patients than this: the card marks "small test sets" as applying.
SMALL_TEST_PATIENTS = 50

_STRONG_WARNING = (
    "**NOT FOR DIAGNOSIS.** This model is research and teaching software. It is not a medical device, has not "
    "been clinically validated, and must not be used to diagnose, treat, triage or reassure anyone."
)


def model_card_markdown(
    model_dir: str | os.PathLike,
    metadata: dict[str, Any] | None = None,
    evaluation: Any = None,
    audit_report: Any = None,
    *,
    data: "PreprocessedData | None" = None,
    shortcut_results: Sequence[Any] | None = None,
) -> str:
    """The card's Markdown (what :meth:`xraylib.runs.RunFolder.write_card` writes into the run folder).

    ``metadata``: the model's metadata (default: ``model_dir/model.json``; when given, it is laid
    over the JSON on disk, so :func:`xraylib.runs.finish` can pass the dict it saved).
    ``evaluation``: an :class:`xraylib.evaluate.Evaluation`, a
    :class:`~xraylib.runs.ModelEvaluation` or the dict of ``evaluation.json``; default: the
    output folder's ``reports/<run>/evaluation.json``, else the test metrics recorded in
    ``model.json``, else "not evaluated yet". ``audit_report``: an
    :class:`xraylib.audit.AuditReport`, its dict or the path of ``audit.json``; default: the
    output folder's ``reports/audit.json``. ``data``: the
    :class:`~xraylib.preprocess.PreprocessedData` trained on, for counts per source and class
    (default: the ``manifest.csv`` of the cache named in the JSON). ``shortcut_results``: the
    results of :mod:`xraylib.shortcuts` (default: ``reports/<run>/shortcuts.json``).
    """
    model_dir = Path(model_dir)
    meta = _metadata(model_dir, metadata)
    root, run = _output_root(model_dir)
    rows = _training_rows(meta, data)
    evaluation_dict, evaluation_from = _evaluation(evaluation, meta, root, run)
    audit_dict, audit_from = _audit(audit_report, root)
    shortcuts, shortcuts_from = _shortcuts(shortcut_results, root, run)

    spec = meta.get("model", {})
    classes = list(meta.get("classes", []))
    threshold = meta.get("threshold", {})
    lines = [f"# Model card: {model_dir.name}", "", f"> {_STRONG_WARNING}", "", f"_{DISCLAIMER}_", ""]

    lines += ["## Intended use", "",
              "- **For:** research and teaching: learning how chest X-ray classifiers are built, and finding out honestly "
              "whether one learned the disease or the data set.",
              "- **Not for:** diagnosis, screening, triage or any decision about a person. Not a medical device.",
              "- **Users:** students, researchers and engineers who read the rest of this card.", ""]

    lines += ["## Model", ""]
    backbone = spec.get("backbone", "unknown")
    weights = spec.get("weights")
    lines.append(f"- Backbone: {backbone} (weights: {'random initialisation' if weights is None else weights}"
                 + (f", alpha {spec['alpha']}" if spec.get("alpha") else "") + ").")
    lines.append(f"- Classes: {', '.join(classes) or 'unknown'}; positive class for the binary metrics: "
                 f"{threshold.get('positive_class', classes[-1] if classes else 'unknown')}.")
    if threshold:
        lines.append(f"- Decision threshold: {format_number(threshold.get('value'), 4)} "
                     f"({threshold.get('rule', 'rule not recorded')}, chosen on the {threshold.get('chosen_on', 'validation split')}"
                     + (f"; bootstrap spread {format_number(threshold['spread'][0], 3)} to {format_number(threshold['spread'][1], 3)}, "
                        f"the validation split alone would give {format_number(threshold.get('validation_value'), 4)}"
                        if threshold.get("spread") else "") + ").")
        if threshold.get("note"):
            lines.append(f"- Note: {threshold['note']}.")
    versions = meta.get("versions", {})
    if versions or meta.get("saved_at"):
        lines.append(f"- Saved {meta.get('saved_at', '')} with " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".")
    lines.append("- Files: model.keras, model.h5, model.weights.h5 (the weights only, which load across Keras versions), "
                 "model.json (classes, preprocessing, threshold) in this folder.")
    lines.append("")

    lines += ["## Training data", ""]
    training_data = meta.get("training_data", {})
    counts = training_data.get("counts")
    if training_data.get("view"):
        lines.append(f"- Trained on a view of the cache: {training_data['view']}.")
    if counts:
        lines.append("- Images per split: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + ".")
    if rows is not None and len(rows):
        table = training_data_table(rows)
        lines += ["", "Images (patients) per source and class:", ""]
        lines += markdown_table(table.reset_index())
        lines.append("")
        lines += _source_notes(rows)
    else:
        lines.append("- Counts per source and class: not available (the training cache's manifest was not found).")
    lines.append("")

    lines += ["## Preprocessing", ""]
    prep = meta.get("preprocessing", {})
    if prep:
        side = prep.get("image_size", "?")
        aspect = "aspect ratio kept, padded with black" if prep.get("resize") == "pad" else "aspect ratio not kept"
        lines.append(f"- Images decoded to 8-bit grayscale, resized to {side}x{side} by {prep.get('resize', '?')} ({aspect}), "
                     f"stored as {prep.get('stored_as', 'uint8')}.")
        options = _preprocessing_options(prep)
        if options:
            lines.append(f"- Options beyond the defaults: {'; '.join(options)}. Images from another site must go through "
                         "xraylib's prediction (which applies them) to look like the training images.")
        lines.append(f"- Normalisation: {prep.get('normalisation', 'inside the model')}. Prediction reads these settings "
                     "from model.json, so it preprocesses exactly as training did.")
    else:
        lines.append("- Not recorded in model.json.")
    training = meta.get("training", {})
    if training:
        augment = training.get("augment")
        lines.append(f"- Training: {training.get('epochs', '?')} epochs"
                     + (f" + {training['fine_tune_epochs']} fine-tuning" if training.get("fine_tune_epochs") else "")
                     + f", batch {training.get('batch_size', '?')}, learning rate {training.get('learning_rate', '?')}, "
                     f"class weighting {'on' if training.get('class_weighting') else 'off'}, "
                     f"augmentation {'off' if not augment else ', '.join(f'{k} {v}' for k, v in augment.items())}, "
                     f"seed {training.get('seed', '?')}.")
    lines.append("")

    lines += ["## Evaluation", ""]
    if evaluation_dict is None:
        lines += ["**Not evaluated yet** — run notebook 04 (or `python -m xraylib evaluate`) and write this card again.", ""]
    else:
        lines += _evaluation_lines(evaluation_dict, evaluation_from)

    lines += ["## What to expect in a hospital the model never saw", ""]
    lines += _out_of_site_lines(meta.get("out_of_site"), evaluation_dict)

    lines += ["## Shortcut tests", ""]
    if not shortcuts:
        lines += ["Not run yet — run the shortcut cells of notebook 04 (or `python -m xraylib shortcuts`). Until then, "
                  "nothing here shows that the model learned the disease rather than the data set.", ""]
    else:
        lines += [f"From {shortcuts_from}:", ""] + [f"- **{name}**: {verdict}" for name, verdict in shortcuts] + [""]

    lines += ["## Data audit warnings", ""]
    if audit_dict is None:
        lines += ["The data audit was not run (or its report was not found): run `python -m xraylib audit`.", ""]
    elif not audit_dict.get("warnings"):
        lines += [f"The audit ({audit_from}) raised no warning. That is not proof that no confound exists.", ""]
    else:
        lines += [f"From {audit_from}:", ""] + [f"- {w}" for w in audit_dict["warnings"]] + [""]

    lines += ["## Known failure modes", ""]
    applies = _applies_here(rows, audit_dict, meta, evaluation_dict)
    for name, text in KNOWN_FAILURE_MODES.items():
        mark = " **(applies here)**" if name in applies else ""
        lines.append(f"- **{name[0].upper() + name[1:]}**{mark}: {text}")
    lines.append("")
    return "\n".join(lines)


def _out_of_site_lines(estimate: dict[str, Any] | None, evaluation: dict[str, Any] | None) -> list[str]:
    if not estimate:
        return ["Not estimated yet: run notebook 04 (or `python -m xraylib evaluate`), which holds out whole sites "
                "to estimate it. Until then, the internal test score says how well the model knows the hospitals it "
                "was trained on, not others.", ""]
    if "unavailable" in estimate:
        return [f"Not available: {estimate['unavailable']}.", ""]
    from . import outofsite  # TensorFlow comes with it: only when there is an estimate to show

    internal = (evaluation or {}).get("metrics", {}).get("roc_auc")
    lines = outofsite.markdown_lines(estimate, internal_auc=internal)
    if internal is not None:
        lines += ["", f"- {outofsite.compare_with_internal(internal, estimate).message}"]
    return lines + [""]


def training_data_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Images (patients) per source and class and split: one row per (source, class), one column per split and "all"."""
    frame = rows.assign(split=rows["split"].astype(str) if "split" in rows.columns else "all")
    splits = [s for s in ("train", "val", "test") if (frame["split"] == s).any()]
    out = {}
    for split in splits + ["all"]:
        part = frame if split == "all" else frame[frame["split"] == split]
        grouped = part.groupby(["source", "label"])
        out[split] = grouped.size().astype(int).astype(str) + " (" + grouped["patient_id"].nunique().astype(str) + ")"
    table = pd.DataFrame(out).fillna("0 (0)")
    table.index.names = ["source", "class"]
    return table


# ---------------------------------------------------------------------------------------------
# Gathering the pieces


def _metadata(model_dir: Path, metadata: dict[str, Any] | None) -> dict[str, Any]:
    path = model_dir / "model.json"
    on_disk: dict[str, Any] = {}
    if path.is_file():
        try:
            on_disk = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            on_disk = {}
    return {**on_disk, **(metadata or {})}


def _output_root(model_dir: Path) -> tuple[Path | None, str]:
    """(the output folder, the run name) when ``model_dir`` is ``OUTPUT/models/RUN``; else (None, name)."""
    if model_dir.parent.name == "models":
        return model_dir.parent.parent, model_dir.name
    return None, model_dir.name


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return read_json(path)
    except OSError:  # an unreadable file: the card says the value is unknown
        return None


def _training_rows(meta: dict[str, Any], data: "PreprocessedData | None") -> pd.DataFrame | None:
    """The rows trained on (all splits), or None where they cannot be found or lack source/label/patient."""
    rows = None
    if data is not None:
        rows = data.manifest
    else:
        folder = meta.get("training_data", {}).get("folder")
        path = Path(folder) / "manifest.csv" if folder and meta.get("training_data", {}).get("view") is None else None
        if path is not None and path.is_file():
            try:
                rows = pd.read_csv(path, dtype={"patient_id": str})
            except (OSError, ValueError):
                rows = None
    if rows is None or not {"source", "label", "patient_id"} <= set(rows.columns):
        return None
    return rows


def _evaluation(evaluation: Any, meta: dict[str, Any], root: Path | None, run: str) -> tuple[dict | None, str]:
    if evaluation is not None:
        inner = getattr(evaluation, "evaluation", evaluation)  # a ModelEvaluation holds its Evaluation
        return (inner.to_dict() if hasattr(inner, "to_dict") else dict(inner)), "the evaluation passed in"
    if root is not None:
        found = _read_json(root / "reports" / run / "evaluation.json")
        if found is not None:
            return found, f"reports/{run}/evaluation.json"
    recorded = meta.get("metrics", {})
    for split in ("test", "val"):
        if isinstance(recorded.get(split), dict):
            return ({"metrics": recorded[split], "n_images": recorded.get(f"{split}_n_images"),
                     "n_patients": recorded.get(f"{split}_n_patients"), "split": split},
                    f"the {split} metrics recorded in model.json")
    return None, ""


def _audit(audit_report: Any, root: Path | None) -> tuple[dict | None, str]:
    if audit_report is not None:
        if isinstance(audit_report, (str, os.PathLike)):
            return _read_json(Path(audit_report)), str(audit_report)
        if hasattr(audit_report, "to_dict"):
            return audit_report.to_dict(), "the audit passed in"
        return dict(audit_report), "the audit passed in"
    if root is not None:
        found = _read_json(root / "reports" / "audit.json")
        if found is not None:
            return found, "reports/audit.json"
    return None, ""


def _shortcuts(results: Sequence[Any] | None, root: Path | None, run: str) -> tuple[list[tuple[str, str]], str]:
    if results:
        return [(getattr(r, "name", "test"), r.verdict) for r in results], "the shortcut tests passed in"
    if root is not None:
        found = _read_json(root / "reports" / run / "shortcuts.json")
        if found is not None:
            return [(t.get("test", "test"), t.get("verdict", "")) for t in found.get("tests", [])], f"reports/{run}/shortcuts.json"
    return [], ""


# ---------------------------------------------------------------------------------------------
# Formatting


_METRIC_NAMES = {"roc_auc": "AUC", "sensitivity": "Sensitivity", "specificity": "Specificity", "precision": "PPV",
                 "npv": "NPV", "f1": "F1", "accuracy": "Accuracy"}


def _evaluation_lines(ev: dict[str, Any], source: str) -> list[str]:
    split = ev.get("split", "test")
    lines = [f"From {source}. Held-out {split} set: {ev.get('n_patients', '?')} patients, {ev.get('n_images', '?')} images"
             + (f" ({', '.join(f'{c}: {n} patients' for c, n in ev['patients_per_class'].items())})"
                if ev.get("patients_per_class") else "") + ".", ""]
    if ev.get("threshold_chosen_by"):
        lines += [f"Threshold {format_number(ev.get('threshold'), 4)}, chosen by {ev['threshold_chosen_by']}.", ""]
    counts = ev.get("counts", {})
    n_text = {"roc_auc": f"{counts.get('n_positive', '?')} pos / {counts.get('n_negative', '?')} neg images",
              "sensitivity": f"{counts.get('tp', '?')}/{_sum(counts, 'tp', 'fn')}",
              "specificity": f"{counts.get('tn', '?')}/{_sum(counts, 'tn', 'fp')}",
              "precision": f"{counts.get('tp', '?')}/{_sum(counts, 'tp', 'fp')}",
              "npv": f"{counts.get('tn', '?')}/{_sum(counts, 'tn', 'fn')}",
              "accuracy": f"{_sum(counts, 'tp', 'tn')}/{counts.get('n', '?')}", "f1": f"{counts.get('n', '?')} images"}
    rows = []
    for name, label in _METRIC_NAMES.items():
        m = ev.get("metrics", {}).get(name)
        if not isinstance(m, dict):
            continue
        shown = format_interval(m.get("value"), (m.get("ci_low"), m.get("ci_high")))
        rows.append([label, shown, n_text[name] if counts else ""])
    lines += markdown_table(rows, ["metric", "value (95% CI over patients)", "n"]) + [""]
    per_class = ev.get("per_class")
    if per_class:
        lines += ["Per class (argmax prediction):", ""]
        lines += markdown_table([[r.get("class"), r.get("support"), format_number(r.get("sensitivity")),
                                  format_number(r.get("ppv"))] for r in per_class], ["class", "support", "sensitivity", "PPV"])
        lines.append("")
    by_source = ev.get("by_source")
    if by_source:
        lines += ["By source:", ""]
        lines += markdown_table([[r.get("source"), r.get("n_patients"), r.get("n_images"), format_number(r.get("roc_auc")),
                                  format_number(r.get("sensitivity")), format_number(r.get("specificity"))] for r in by_source],
                                ["source", "patients", "images", "AUC", "sensitivity", "specificity"])
        lines.append("")
    lines += warning_lines(ev.get("warnings", []), quote=True)
    if ev.get("warnings"):
        lines.append("")
    return lines


def _sum(counts: dict[str, Any], a: str, b: str) -> str:
    try:
        return str(int(counts[a]) + int(counts[b]))
    except (KeyError, TypeError, ValueError):
        return "?"


def _preprocessing_options(prep: dict[str, Any]) -> list[str]:
    """The non-default preprocessing options of a ``model.json`` in words ([] for a model without any)."""
    from .preprocess import BODY_MIN_AREA_FRACTION, CLAHE_CLIP_LIMIT, CLAHE_TILES

    words = {
        ("crop", "body"): "crop=body (uniform borders, frames and burned-in text at the edges cut before resizing; "
                          f"the whole image kept when the body found covers under {BODY_MIN_AREA_FRACTION:.0%} of it)",
        ("intensity", "equalize"): "intensity=equalize (global histogram equalisation of the resized image)",
        ("intensity", "clahe"): f"intensity=clahe (CLAHE of the resized image, clip limit {CLAHE_CLIP_LIMIT}, "
                                f"{CLAHE_TILES[0]}x{CLAHE_TILES[1]} tiles)",
    }
    return [words.get((key, prep[key]), f"{key}={prep[key]}") for key in ("crop", "intensity")
            if prep.get(key, "none") != "none"]


def _source_notes(rows: pd.DataFrame) -> list[str]:
    from .sources import SOURCE_NOTES

    present = sorted(set(rows["source"].astype(str)))
    return [f"- {source}: {SOURCE_NOTES[source]}" for source in present if source in SOURCE_NOTES]


def _applies_here(rows: pd.DataFrame | None, audit: dict | None, meta: dict[str, Any],
                  evaluation: dict | None = None) -> set[str]:
    """Failure modes these training data make especially likely."""
    out = {"new hospitals", "findings it never saw", "Grad-CAM"}
    findings = (audit or {}).get("findings", [])
    checks = {str(f.get("check")) for f in findings}
    # The audit marks each finding's level: "shortcut" where something besides the disease tells the classes apart.
    if any(f.get("level") == "shortcut" for f in findings):
        out.add("shortcut learning")
    if rows is not None and len(rows):
        per_class = rows.groupby("label")["source"].nunique()
        if len(per_class) > 1 and (per_class == 1).any():
            out.add("shortcut learning")
        if _children_in(rows):
            out.add("children against adults")
    if "age_no_overlap" in checks:
        out.add("children against adults")
    if rows is not None and "view" in rows.columns and (rows["view"].astype(str) == "L").any():
        out.add("lateral and unusual views")
    n_patients = (evaluation or {}).get("n_patients")
    if isinstance(n_patients, (int, float)) and n_patients < SMALL_TEST_PATIENTS:
        out.add("small test sets")
    return out


def _children_in(rows: pd.DataFrame) -> bool:
    """True when some rows come from a source whose documented population is children (Kaggle's)."""
    from .sources import source_by_name

    records = (source_by_name(name) for name in set(rows["source"].astype(str)))
    return any(source is not None and source.children for source in records)
