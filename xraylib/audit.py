"""Audit a data set before training: who is in each class, and what besides the disease tells them apart.

The 2020 COVID-19 classifiers this project descends from compared adult COVID-19 patients from
one collection with pediatric "normal" images from another hospital, and scored well by telling
the data sets apart. This module looks for that before any model is trained. From the manifest
(and, when given, the preprocessed uint8 images) it builds tables per class and source (images,
patients, ages, sex, views, original sizes, file types, image borders, duplicates) and turns
what it finds into plain-words warnings:

* a class that comes from a single source, or sources that each hold (almost) one class;
* a class whose ages do not overlap another class's, using the documented population of a
  source whose files carry no ages (:data:`SOURCE_POPULATION`: Kaggle's children aged 1 to 5);
* a view, sex, file format or bit depth found (almost) only in one class, original image sizes
  that separate the classes;
* image borders that differ between classes, and small bright marks burned in near the edges
  (letters, "R"/"L" markers, text) found in one class more than in the others;
* the same image (exact bytes, or a re-encoded / brightened copy) in two splits or under two
  patients.

Every threshold is a module constant documented where it is defined, and the report lists them.
The data side: NumPy, pandas and OpenCV only, no TensorFlow.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import cv2
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .reporting import DISCLAIMER, REPORT_DISCLAIMER, Finding, format_number, markdown_table, warning_lines
from .errors import ConfigError
from .fileio import write_json_atomic, write_text_atomic, json_safe
from .preprocess import PreprocessedData
from .sources import ADULT_AGE, fill_site, source_notes, source_populations

__all__ = [
    "SOURCE_POPULATION", "THRESHOLDS", "AuditReport", "Finding", "audit", "write_audit",
    "counts_table", "site_table", "age_table", "category_table", "image_size_table", "border_profiles", "border_summary",
    "detect_marker", "group_mean_images", "perceptual_hashes", "hamming_pairs", "find_duplicates",
    "confound_warnings", "class_order", "source_label_accuracy",
]

#: Documented age range (years) of sources whose files carry no per-image age. A (class, source)
#: group without recorded ages takes this range in the age checks. Kaggle chest-xray-pneumonia
#: (Kermany et al., Cell 2018) is "pediatric patients of one to five years old" from Guangzhou
#: Women and Children's Medical Center; see ``xraylib.sources.SOURCE_NOTES``.
SOURCE_POPULATION: dict[str, tuple[float, float]] = source_populations()  # a view of sources.SOURCES

# ---- thresholds (each one is reported in the audit's JSON and Markdown) --------------------
#: Age ranges compared are the 5th to 95th percentiles of the recorded ages ...
AGE_PERCENTILES = (5.0, 95.0)
#: ... when a group has at least this many recorded ages (fewer: their min and max).
MIN_AGES_FOR_PERCENTILES = 10
#: A group with recorded ages is compared only with at least this many (a documented population always is).
MIN_AGES_TO_COMPARE = 5
#: The source alone predicts the label (majority label of each source) for at least this share
#: of images, and beats always guessing the commonest class by at least SOURCE_ACCURACY_GAIN.
SOURCE_ACCURACY_WARN = 0.9
SOURCE_ACCURACY_GAIN = 0.1
#: A category (a view, a file format, ...) counts as "found in one class" when at least this
#: share of its images are of one class, it has at least MIN_CATEGORY_IMAGES images, and that
#: class is not itself almost all the data.
CATEGORY_ONE_CLASS_SHARE = 0.95
MIN_CATEGORY_IMAGES = 5
#: Total variation distance (half the summed absolute difference of the category shares)
#: between one class's distribution and the others' above which a distribution "differs".
CATEGORY_TV_WARN = 0.5
#: The same for sex, among images with a recorded sex (0.3: e.g. 80% male against 50%).
SEX_TV_WARN = 0.3
#: Original width, height or aspect ratio separates a class from the others with an AUC at
#: least this far from 0.5 (0.3: AUC >= 0.8 or <= 0.2).
SIZE_AUC_DISTANCE_WARN = 0.3
#: Border bands: the outer BORDER_FRACTION of each side; corners: squares of CORNER_FRACTION
#: of the side; centre: the middle square of CENTRE_FRACTION of the side.
BORDER_FRACTION = 0.08
CORNER_FRACTION = 0.15
CENTRE_FRACTION = 0.5
#: Standardised mean difference (Cohen's d, pooled SD) of a border region's mean intensity
#: between one class and the others above which the borders "differ" (1.0: a large effect).
BORDER_SMD_WARN = 1.0
#: Burned-in marks are searched in the outer MARKER_ZONE_FRACTION of each side: pixels at least
#: MARKER_MIN_LEVEL bright (uint8) and MARKER_MIN_TOPHAT brighter than a morphological opening
#: of side MARKER_KERNEL_FRACTION (white top-hat: thin bright strokes such as letters), forming
#: a connected blob of at least MARKER_MIN_AREA of the image area whose bounding box is at most
#: MARKER_MAX_EXTENT of the side (small: not a bright band along a whole edge), and whose
#: brightest pixels exceed the median of their surroundings by MARKER_MIN_CONTRAST (a letter
#: on film stands out by 100 or more; a rib or clavicle against soft tissue by much less).
MARKER_ZONE_FRACTION = 0.2
MARKER_MIN_LEVEL = 160
MARKER_MIN_TOPHAT = 40
MARKER_MIN_CONTRAST = 110
MARKER_KERNEL_FRACTION = 0.08
MARKER_MIN_AREA = 0.0003
MARKER_MAX_EXTENT = 0.25
#: Warn when the share of images with a mark (anywhere, or in one zone) differs between a class
#: and the others by at least this much.
MARKER_SHARE_GAP_WARN = 0.25
#: Near-duplicates: 64-bit DCT perceptual hashes (pHash) at Hamming distance <= NEAR_DUPLICATE_MAX_DISTANCE
#: are candidates, confirmed when the Pearson correlation of their 32x32 thumbnails is at least
#: NEAR_DUPLICATE_MIN_CORRELATION. On the real data a JPEG re-encode plus brightening moves the
#: hash by at most 4 bits (correlation > 0.99), while unrelated chest films of one hospital come
#: as close as 6 bits (correlation up to 0.95): the hash alone would call them duplicates.
NEAR_DUPLICATE_MAX_DISTANCE = 8
NEAR_DUPLICATE_MIN_CORRELATION = 0.97
#: Hamming comparisons are done in blocks of at most this many pairs (~32 MB of uint64).
_PAIR_BLOCK = 4_000_000

THRESHOLDS = {
    "age_percentiles": list(AGE_PERCENTILES), "min_ages_for_percentiles": MIN_AGES_FOR_PERCENTILES,
    "min_ages_to_compare": MIN_AGES_TO_COMPARE,
    "adult_age": ADULT_AGE, "source_population_years": {k: list(v) for k, v in SOURCE_POPULATION.items()},
    "source_accuracy_warn": SOURCE_ACCURACY_WARN, "source_accuracy_gain": SOURCE_ACCURACY_GAIN,
    "category_one_class_share": CATEGORY_ONE_CLASS_SHARE, "min_category_images": MIN_CATEGORY_IMAGES,
    "category_tv_warn": CATEGORY_TV_WARN, "sex_tv_warn": SEX_TV_WARN, "size_auc_distance_warn": SIZE_AUC_DISTANCE_WARN,
    "border_fraction": BORDER_FRACTION, "corner_fraction": CORNER_FRACTION, "centre_fraction": CENTRE_FRACTION,
    "border_smd_warn": BORDER_SMD_WARN, "marker_zone_fraction": MARKER_ZONE_FRACTION,
    "marker_min_level": MARKER_MIN_LEVEL, "marker_min_tophat": MARKER_MIN_TOPHAT, "marker_min_contrast": MARKER_MIN_CONTRAST,
    "marker_kernel_fraction": MARKER_KERNEL_FRACTION, "marker_min_area": MARKER_MIN_AREA,
    "marker_max_extent": MARKER_MAX_EXTENT, "marker_share_gap_warn": MARKER_SHARE_GAP_WARN,
    "near_duplicate_hash": "pHash, 64 bits (8x8 low frequencies of the DCT of a 32x32 thumbnail)",
    "near_duplicate_max_distance": NEAR_DUPLICATE_MAX_DISTANCE,
    "near_duplicate_min_correlation": NEAR_DUPLICATE_MIN_CORRELATION,
}

#: Regions whose mean intensity :func:`border_profiles` measures, besides the centre.
BORDER_REGIONS = ("top", "bottom", "left", "right", "top_left", "top_right", "bottom_left", "bottom_right")
#: Zones a burned-in mark is placed in (by the centre of its blob).
MARKER_ZONES = ("top_left", "top", "top_right", "left", "right", "bottom_left", "bottom", "bottom_right")

NOT_RECORDED = "not recorded"
_REQUIRED = ("path", "label", "source", "patient_id")


# ---------------------------------------------------------------------------------------------
# The report


@dataclass
class AuditReport:
    """What :func:`audit` found.

    ``tables``: name -> DataFrame (``counts``, ``sites``, ``ages``, ``sex``, ``views``, ``image_sizes``,
    ``file_types``, and with images ``border``, ``border_by_class``). ``warnings``: plain-words
    sentences, most serious first; ``findings`` the same as :class:`~xraylib.reporting.Finding`
    records: the check that raised each, its level and its numbers. ``duplicates``: one row per pair of images that are the same picture across splits or
    patients. ``border_images``: the per-image border table (not written to JSON);
    ``mean_images``: ``{"source / label": (S, S) float32}`` average image per group.
    """

    tables: dict[str, pd.DataFrame]
    warnings: list[str]
    duplicates: pd.DataFrame
    findings: list[Finding] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    border_images: pd.DataFrame | None = None
    mean_images: dict[str, np.ndarray] = field(default_factory=dict)

    def checks(self) -> set[str]:
        """Names of the checks that raised a warning."""
        return {f.check for f in self.findings}

    def to_dict(self) -> dict[str, Any]:
        """Everything but the per-image tables as plain JSON types (NaN becomes ``None``)."""
        return json_safe({
            "disclaimer": DISCLAIMER,
            "summary": self.summary,
            "warnings": list(self.warnings),
            "findings": [f.to_dict() for f in self.findings],
            "tables": {name: table.to_dict(orient="records") for name, table in self.tables.items()},
            "duplicates": self.duplicates.to_dict(orient="records"),
            "source_population_years": {k: list(v) for k, v in source_populations().items()},
            "source_notes": {k: v for k, v in source_notes().items() if k in self.summary.get("sources", [])},
            "thresholds": THRESHOLDS,
        })

    def to_markdown(self, max_duplicate_rows: int = 50) -> str:
        """A readable Markdown report: the warnings first, then every table."""
        s = self.summary
        lines = [
            "# Data audit", "",
            f"**{REPORT_DISCLAIMER}**", "",
            f"- {s.get('n_images', 0)} images of {s.get('n_patients', 0)} patients; classes: "
            + ", ".join(f"{c} ({n} images)" for c, n in s.get("images_per_class", {}).items()) + ".",
            f"- Sites (where the images were made): {s.get('n_sites', 0)}; "
            + ", ".join(f"{c} from {n}" for c, n in s.get("sites_per_class", {}).items()) + ".",
            f"- Sources: {', '.join(s.get('sources', [])) or 'none'}."
            + (" Pixel checks on the preprocessed images." if s.get("pixel_checks") else
               " No preprocessed images given: border, marker and near-duplicate checks were not run."),
            "",
        ]
        if self.warnings:
            lines += ["## Warnings", ""] + warning_lines(self.findings or self.warnings) + [""]
        else:
            lines += ["## Warnings", "", "None of the checks found a confound. That is not proof that none "
                      "exists: read the tables, and test the trained model (source prediction, lungs hidden).", ""]
        titles = {
            "counts": "Images and patients per class and source",
            "counts_by_split": "Images and patients per split",
            "sites": "Images and patients per site and class",
            "ages": "Age (years) per class and source",
            "sex": "Sex per class and source (images)",
            "views": "Views per class and source (images)",
            "image_sizes": "Original image sizes per class and source (pixels)",
            "file_types": "File format, bit depth and channels per class and source (images)",
            "border_by_class": "Border intensity per class (mean of 0-255; marks = share of images with a burned-in mark)",
            "border": "Border intensity per source and class",
        }
        for name, table in self.tables.items():
            lines += [f"## {titles.get(name, name)}", ""]
            lines += markdown_table(table) + [""]
        lines += ["## Duplicates across splits or patients", ""]
        if self.duplicates.empty:
            lines += ["No exact or near-duplicate images across splits or patients were found"
                      + ("." if s.get("pixel_checks") else " (exact copies only: no images given)."), ""]
        else:
            shown = self.duplicates.head(max_duplicate_rows)
            columns = ["kind", "distance", "path_a", "split_a", "patient_a", "path_b", "split_b", "patient_b"]
            lines += markdown_table(shown[[c for c in columns if c in shown.columns]].assign(
                path_a=shown["path_a"].map(lambda p: Path(str(p)).name),
                path_b=shown["path_b"].map(lambda p: Path(str(p)).name)))
            if len(self.duplicates) > max_duplicate_rows:
                lines.append(f"... and {len(self.duplicates) - max_duplicate_rows} more pairs (all in audit.json).")
            lines.append("")
        notes = [f"- {k}: {v}" for k, v in source_notes().items() if k in s.get("sources", [])]
        if notes:
            lines += ["## About the sources", ""] + notes + [""]
        lines += ["## Thresholds", ""] + [f"- {k}: {v}" for k, v in THRESHOLDS.items()] + [""]
        return "\n".join(lines)


def write_audit(report: AuditReport, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``audit.json`` and ``audit.md`` into ``out_dir`` atomically; return ``{"json": path, "md": path}``."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "audit.json", "md": out_dir / "audit.md"}
    write_json_atomic(paths["json"], report.to_dict())
    write_text_atomic(paths["md"], report.to_markdown())
    return paths


# ---------------------------------------------------------------------------------------------
# The audit


def audit(manifest: pd.DataFrame | None, data: PreprocessedData | None = None, *, classes: Sequence[str] | None = None,
          progress: bool = False) -> AuditReport:
    """Audit a manifest (and, optionally, its preprocessed images) for confounds and duplicates.

    ``manifest``: rows with at least ``path, label, source, patient_id`` (the other
    :data:`xraylib.manifest.MANIFEST_COLUMNS` are used where present; a ``split`` column adds
    per-split counts and cross-split duplicate checks). ``data``: a
    :class:`xraylib.preprocess.PreprocessedData`; with it, the border, burned-in-mark and
    near-duplicate checks run on its ``(N, S, S) uint8`` images and its rows' splits. With
    ``manifest=None`` the data's own manifest is used. ``classes``: the task's classes, negative
    first (``xraylib.manifest.TASKS[task]``; default: the data's classes, else "normal" first).
    ``progress`` shows a bar over the images. About 2 ms per 224x224 image on one core.
    Returns an :class:`AuditReport`.
    """
    if manifest is None:
        if data is None:
            raise ConfigError("audit needs a manifest, preprocessed data, or both; got neither")
        manifest = data.manifest
    frame = _check_manifest(manifest)
    if data is not None and "split" not in frame.columns:
        split_of = dict(zip(data.manifest["path"].astype(str), data.manifest["split"]))
        frame = frame.assign(split=frame["path"].astype(str).map(split_of))

    order = class_order(frame["label"], classes if classes is not None else getattr(data, "classes", None))
    tables: dict[str, pd.DataFrame] = {"counts": counts_table(frame)}
    if "split" in frame.columns and frame["split"].notna().any():
        tables["counts_by_split"] = counts_table(frame, by_split=True)
    tables["sites"] = site_table(frame, order)
    tables["ages"] = age_table(frame)
    tables["sex"] = category_table(frame, "sex")
    tables["views"] = category_table(frame, "view")
    tables["image_sizes"] = image_size_table(frame)
    tables["file_types"] = _file_types_table(frame)

    border_images = None
    mean_images: dict[str, np.ndarray] = {}
    hashes = thumbnails = None
    pixel_rows = None
    if data is not None:
        pixel_rows, images_by_split = _data_rows(data)
        parts, hash_parts, thumb_parts = [], [], []
        with tqdm(total=len(pixel_rows), desc="auditing images", unit="img", disable=not progress) as bar:
            for images in images_by_split:
                parts.append(border_profiles(images))
                h, t = perceptual_hashes(images, return_thumbnails=True)
                hash_parts.append(h)
                thumb_parts.append(t)
                bar.update(len(images))
        border_images = pd.concat([pixel_rows[["path", "label", "source", "split"]].reset_index(drop=True),
                                   pd.concat(parts, ignore_index=True)], axis=1)
        hashes = np.concatenate(hash_parts) if hash_parts else np.zeros(0, dtype=np.uint64)
        thumbnails = np.concatenate(thumb_parts) if thumb_parts else np.zeros((0, 32, 32), dtype=np.uint8)
        tables["border_by_class"] = border_summary(border_images, by=("label",))
        tables["border"] = border_summary(border_images, by=("source", "label"))
        mean_images = group_mean_images(images_by_split, pixel_rows)

    duplicates = find_duplicates(frame, pixel_rows=pixel_rows, hashes=hashes, thumbnails=thumbnails)
    findings = confound_warnings(frame, border_images=border_images, duplicates=duplicates, classes=order)
    labels = frame["label"].astype(str)
    summary = {
        "n_images": int(len(frame)),
        "n_patients": int(frame["patient_id"].nunique()),
        "classes": order,
        "sources": sorted(frame["source"].astype(str).unique()),
        "images_per_class": {k: int((labels == k).sum()) for k in order},
        "patients_per_class": {k: int(frame.loc[labels == k, "patient_id"].nunique()) for k in order},
        "n_sites": int(frame["site"].nunique()),
        "sites_per_class": {k: int(frame.loc[labels == k, "site"].nunique()) for k in order},
        "pixel_checks": data is not None,
        "n_images_checked_for_pixels": 0 if pixel_rows is None else int(len(pixel_rows)),
        "n_duplicate_pairs": int(len(duplicates)),
    }
    return AuditReport(tables=tables, warnings=[f.message for f in findings], duplicates=duplicates,
                       findings=findings, summary=summary, border_images=border_images, mean_images=mean_images)


def _check_manifest(manifest: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(manifest, pd.DataFrame):
        raise ConfigError(f"manifest must be a pandas DataFrame, got {type(manifest).__name__}")
    missing = [c for c in _REQUIRED if c not in manifest.columns]
    if missing:
        raise ConfigError(f"manifest is missing column(s) {missing}; build it with xraylib.manifest.build_manifest")
    if manifest.empty:
        raise ConfigError("the manifest has no rows: nothing to audit")
    frame = manifest.reset_index(drop=True).copy()
    for column in ("view", "sex", "age", "width", "height", "bit_depth", "channels", "file_format", "sha1"):
        if column not in frame.columns:
            frame[column] = np.nan
    frame["age"] = pd.to_numeric(frame["age"], errors="coerce")
    frame["label"] = frame["label"].astype(str)
    frame["source"] = frame["source"].astype(str)
    frame["patient_id"] = frame["patient_id"].astype(str)
    return fill_site(frame)  # a manifest made before the site column


def _data_rows(data: PreprocessedData) -> tuple[pd.DataFrame, list[np.ndarray]]:
    """The preprocessed rows (with ``split``) in the order of the concatenated split images."""
    rows, images = [], []
    for name, split in data.splits.items():
        if len(split) == 0:
            continue
        part = split.manifest.copy()
        part["split"] = name
        rows.append(part)
        images.append(split.images)
    frame = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=list(_REQUIRED) + ["split"])
    for column in ("label", "source", "patient_id"):
        frame[column] = frame[column].astype(str)
    return frame, images


# ---------------------------------------------------------------------------------------------
# Tables


def counts_table(manifest: pd.DataFrame, by_split: bool = False) -> pd.DataFrame:
    """Images and patients per class and source (and per split with ``by_split``), with class totals.

    Columns: [``split``,] ``label``, ``source``, ``images``, ``patients``, ``share_of_class``
    (the share of the class's images this source gives; 1.0 means a single-source class).
    A row with ``source == "all"`` gives each class's total.
    """
    keys = (["split"] if by_split else []) + ["label"]
    rows = []
    for key, group in manifest.groupby(keys, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        total = len(group)
        for source, part in group.groupby("source", sort=True):
            rows.append({**dict(zip(keys, key)), "source": source, "images": len(part),
                         "patients": part["patient_id"].nunique(), "share_of_class": round(len(part) / total, 3)})
        rows.append({**dict(zip(keys, key)), "source": "all", "images": total,
                     "patients": group["patient_id"].nunique(), "share_of_class": 1.0})
    table = pd.DataFrame(rows)
    if by_split and not table.empty:
        order = {"train": 0, "val": 1, "test": 2}
        table = table.sort_values(["split", "label"], key=lambda s: s.map(order).fillna(9) if s.name == "split" else s,
                                  kind="stable").reset_index(drop=True)
    return table


def site_table(manifest: pd.DataFrame, classes: Sequence[str] | None = None) -> pd.DataFrame:
    """Images and patients per site (where the images were made) and class: one row per site.

    Columns: ``site``, ``source``, ``images``, ``patients``, then ``<class>_images`` and
    ``<class>_patients`` for each class (``classes`` order, default :func:`class_order`). Rows by
    source, then most images first. A site of one class only is the common case here (ieee8023's
    sub-sites hold COVID-19, the hospitals of normals hold normals): a model cannot be tested on
    an unseen site of both classes, only on an unseen site of each.
    """
    frame = fill_site(manifest)
    order = class_order(frame["label"].astype(str), classes)
    rows = []
    for (source, site), group in frame.groupby(["source", "site"], sort=True):
        labels = group["label"].astype(str)
        row = {"site": site, "source": source, "images": len(group), "patients": group["patient_id"].nunique()}
        for label in order:
            row[f"{label}_images"] = int((labels == label).sum())
            row[f"{label}_patients"] = int(group.loc[labels == label, "patient_id"].nunique())
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    return table.sort_values(["source", "images", "site"], ascending=[True, False, True], kind="stable").reset_index(drop=True)


def _age_range(ages: np.ndarray, source: str) -> tuple[float, float, str]:
    """(low, high, basis) of a group's ages: percentiles, min-max, the source's documented population, or unknown."""
    if len(ages) >= MIN_AGES_FOR_PERCENTILES:
        low, high = np.percentile(ages, AGE_PERCENTILES)
        return float(low), float(high), f"{AGE_PERCENTILES[0]:g}th-{AGE_PERCENTILES[1]:g}th percentile of {len(ages)} recorded ages"
    if len(ages):
        return float(ages.min()), float(ages.max()), f"min-max of {len(ages)} recorded age(s)"
    if source in (populations := source_populations()):
        low, high = populations[source]
        return low, high, "documented population of the source (no per-image ages)"
    return math.nan, math.nan, "unknown (no ages recorded, population not documented)"


def age_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """Age per class and source: ``images``, ``with_age``, ``median``, ``q1``, ``q3``, ``min``, ``max``,
    ``children`` (share of recorded ages under 18), and ``range_low``/``range_high``/``range_basis``:
    the range the age checks compare (percentiles of recorded ages, or the documented population
    of a source without ages, :data:`SOURCE_POPULATION`)."""
    rows = []
    for (label, source), group in manifest.groupby(["label", "source"], sort=True):
        ages = group["age"].dropna().to_numpy(dtype=float)
        low, high, basis = _age_range(ages, source)
        has = len(ages) > 0
        rows.append({
            "label": label, "source": source, "images": len(group), "with_age": len(ages),
            "median": float(np.median(ages)) if has else math.nan,
            "q1": float(np.percentile(ages, 25)) if has else math.nan,
            "q3": float(np.percentile(ages, 75)) if has else math.nan,
            "min": float(ages.min()) if has else math.nan, "max": float(ages.max()) if has else math.nan,
            "children": round(float((ages < ADULT_AGE).mean()), 3) if has else math.nan,
            "range_low": low, "range_high": high, "range_basis": basis,
        })
    return pd.DataFrame(rows)


def _category(series: pd.Series) -> pd.Series:
    """Category values as text, missing ones as "not recorded" (NaN never groups in pandas)."""
    def text(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
            return NOT_RECORDED
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            return str(int(value))
        return str(value)
    return series.map(text)


def category_table(manifest: pd.DataFrame, column: str) -> pd.DataFrame:
    """Images per class and source (rows) and value of ``column`` (columns; missing = "not recorded")."""
    values = _category(manifest[column])
    table = pd.crosstab([manifest["label"], manifest["source"]], values).reset_index()
    table.columns.name = None
    return table


def image_size_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """Original width and height per class and source: median, min and max (pixels), median aspect (w/h)."""
    rows = []
    for (label, source), group in manifest.groupby(["label", "source"], sort=True):
        width = pd.to_numeric(group["width"], errors="coerce")
        height = pd.to_numeric(group["height"], errors="coerce")
        rows.append({
            "label": label, "source": source, "images": len(group),
            "width_median": width.median(), "width_min": width.min(), "width_max": width.max(),
            "height_median": height.median(), "height_min": height.min(), "height_max": height.max(),
            "aspect_median": round(float((width / height).median()), 3) if width.notna().any() else math.nan,
        })
    return pd.DataFrame(rows)


def _file_types_table(manifest: pd.DataFrame) -> pd.DataFrame:
    kinds = (_category(manifest["file_format"]) + ", " + _category(manifest["bit_depth"]) + "-bit, "
             + _category(manifest["channels"]) + " channel(s)")
    table = pd.crosstab([manifest["label"], manifest["source"]], kinds).reset_index()
    table.columns.name = None
    return table


# ---------------------------------------------------------------------------------------------
# Pixels: borders, burned-in marks, mean images


def _iter_chunks(images: np.ndarray, chunk_size: int) -> Iterable[tuple[int, np.ndarray]]:
    for begin in range(0, len(images), chunk_size):
        yield begin, np.asarray(images[begin:begin + chunk_size])


def _check_images(images: np.ndarray) -> np.ndarray:
    if not hasattr(images, "shape") or len(images.shape) != 3:
        raise ConfigError(f"images must be an (N, H, W) uint8 array, got shape {getattr(images, 'shape', None)}")
    if images.dtype != np.uint8:
        raise ConfigError(f"images must be uint8 (the preprocessed cache), got dtype {images.dtype}")
    return images


def border_profiles(images: np.ndarray, chunk_size: int = 256) -> pd.DataFrame:
    """Per image: mean intensity (0-255) of the edge bands, the corners and the centre, and burned-in marks.

    ``images``: ``(N, H, W) uint8`` (a memory map is read in chunks). Columns: ``top``,
    ``bottom``, ``left``, ``right`` (outer :data:`BORDER_FRACTION` of each side), ``top_left``
    ... ``bottom_right`` (corner squares of :data:`CORNER_FRACTION`), ``centre`` (middle square of
    :data:`CENTRE_FRACTION`), ``border`` (the four bands together), ``border_minus_centre``,
    ``marker`` (a small bright blob such as a letter near an edge, see :data:`MARKER_MIN_LEVEL`),
    ``marker_zone`` (where the largest one is; "" when none) and ``marker_area`` (its share of the image).
    """
    images = _check_images(images)
    n, h, w = images.shape
    band_h, band_w = max(1, round(BORDER_FRACTION * h)), max(1, round(BORDER_FRACTION * w))
    corner_h, corner_w = max(1, round(CORNER_FRACTION * h)), max(1, round(CORNER_FRACTION * w))
    centre_h, centre_w = max(1, round(CENTRE_FRACTION * h)), max(1, round(CENTRE_FRACTION * w))
    c_top, c_left = (h - centre_h) // 2, (w - centre_w) // 2
    columns: dict[str, list] = {k: [] for k in (*BORDER_REGIONS, "centre", "border")}
    marks: list[tuple[bool, str, float]] = []
    band_mask = np.zeros((h, w), dtype=bool)
    band_mask[:band_h] = band_mask[-band_h:] = True
    band_mask[:, :band_w] = band_mask[:, -band_w:] = True
    for _, chunk in _iter_chunks(images, chunk_size):
        x = chunk.astype(np.float32)
        columns["top"].append(x[:, :band_h].mean(axis=(1, 2)))
        columns["bottom"].append(x[:, -band_h:].mean(axis=(1, 2)))
        columns["left"].append(x[:, :, :band_w].mean(axis=(1, 2)))
        columns["right"].append(x[:, :, -band_w:].mean(axis=(1, 2)))
        columns["top_left"].append(x[:, :corner_h, :corner_w].mean(axis=(1, 2)))
        columns["top_right"].append(x[:, :corner_h, -corner_w:].mean(axis=(1, 2)))
        columns["bottom_left"].append(x[:, -corner_h:, :corner_w].mean(axis=(1, 2)))
        columns["bottom_right"].append(x[:, -corner_h:, -corner_w:].mean(axis=(1, 2)))
        columns["centre"].append(x[:, c_top:c_top + centre_h, c_left:c_left + centre_w].mean(axis=(1, 2)))
        columns["border"].append(x[:, band_mask].mean(axis=1))
        marks += [detect_marker(image) for image in chunk]
    out = pd.DataFrame({k: np.concatenate(v) if v else np.zeros(0, dtype=np.float32) for k, v in columns.items()})
    out = out.astype(np.float64).round(2)
    out["border_minus_centre"] = (out["border"] - out["centre"]).round(2)
    out["marker"] = [m[0] for m in marks]
    out["marker_zone"] = [m[1] for m in marks]
    out["marker_area"] = [round(m[2], 5) for m in marks]
    return out


def _zone(cx: float, cy: float, h: int, w: int) -> str:
    vertical = "top" if cy < MARKER_ZONE_FRACTION * h else "bottom" if cy >= (1 - MARKER_ZONE_FRACTION) * h else ""
    horizontal = "left" if cx < MARKER_ZONE_FRACTION * w else "right" if cx >= (1 - MARKER_ZONE_FRACTION) * w else ""
    return "_".join(p for p in (vertical, horizontal) if p) or "centre"


def detect_marker(image: np.ndarray) -> tuple[bool, str, float]:
    """(found, zone, area share) of the largest burned-in mark near an edge of one ``(H, W) uint8`` image.

    A burned-in letter or marker ("R", "L", text, a box) is bright, thin and small, and stands
    out from what lies around it far more than bone does from soft tissue. Candidates are pixels
    in the outer :data:`MARKER_ZONE_FRACTION` of the image that are bright (>= :data:`MARKER_MIN_LEVEL`)
    and thin (white top-hat with a square of :data:`MARKER_KERNEL_FRACTION` of the side >=
    :data:`MARKER_MIN_TOPHAT`). Each connected blob of them counts as a mark when its area is at
    least :data:`MARKER_MIN_AREA` of the image, its bounding box at most :data:`MARKER_MAX_EXTENT`
    of the side, and its brightest pixels (90th percentile) exceed the median of the pixels
    around it (its box widened by a margin) by :data:`MARKER_MIN_CONTRAST`: ribs, clavicles and
    the edges of the shoulders fail this last test.
    """
    h, w = image.shape
    side = max(3, int(round(MARKER_KERNEL_FRACTION * min(h, w))) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (side, side))
    tophat = cv2.morphologyEx(image, cv2.MORPH_TOPHAT, kernel)
    candidate = (image >= MARKER_MIN_LEVEL) & (tophat >= MARKER_MIN_TOPHAT)
    zh, zw = int(round(MARKER_ZONE_FRACTION * h)), int(round(MARKER_ZONE_FRACTION * w))
    candidate[zh:h - zh, zw:w - zw] = False
    if not candidate.any():
        return False, "", 0.0
    # Join the strokes of one letter into one blob.
    mask = cv2.dilate(candidate.astype(np.uint8), np.ones((3, 3), np.uint8))
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    best = (False, "", 0.0)
    min_area = MARKER_MIN_AREA * h * w
    margin = max(2, int(round(0.03 * min(h, w))))
    for k in range(1, count):
        x, y, bw, bh, area = (int(v) for v in stats[k])
        if area < min_area or bw > MARKER_MAX_EXTENT * w or bh > MARKER_MAX_EXTENT * h or area / (h * w) <= best[2]:
            continue
        y0, y1, x0, x1 = max(0, y - margin), min(h, y + bh + margin), max(0, x - margin), min(w, x + bw + margin)
        window, inside = image[y0:y1, x0:x1], labels[y0:y1, x0:x1] == k
        strokes = window[inside & candidate[y0:y1, x0:x1]]
        around = window[~inside]
        if len(strokes) and len(around) and np.percentile(strokes, 90) - np.median(around) >= MARKER_MIN_CONTRAST:
            best = (True, _zone(*centroids[k], h, w), float(area / (h * w)))
    return best


def border_summary(border_images: pd.DataFrame, by: Sequence[str] = ("source", "label")) -> pd.DataFrame:
    """Per group: ``images``, the mean of each border region, ``centre``, ``border_minus_centre``,
    ``border_sd`` (SD of the per-image border mean), ``marker_share`` (share of images with a
    burned-in mark) and ``marker_zone`` (the commonest zone of the marks, "" when none)."""
    rows = []
    for key, group in border_images.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        zones = group.loc[group["marker"], "marker_zone"]
        row = {**dict(zip(by, key)), "images": len(group)}
        row.update({c: round(float(group[c].mean()), 1) for c in (*BORDER_REGIONS, "centre", "border_minus_centre")})
        row["border_sd"] = round(float(group["border"].std(ddof=1)), 1) if len(group) > 1 else math.nan
        row["marker_share"] = round(float(group["marker"].mean()), 3)
        row["marker_zone"] = zones.value_counts().index[0] if len(zones) else ""
        rows.append(row)
    return pd.DataFrame(rows)


def group_mean_images(images_by_split: Sequence[np.ndarray], rows: pd.DataFrame,
                      by: Sequence[str] = ("source", "label"), chunk_size: int = 256) -> dict[str, np.ndarray]:
    """``{"source / label": (S, S) float32}``: the average image of each group (0-255).

    ``rows`` lists the images of the concatenated ``images_by_split`` in order. A mark burned into
    every image of a group stands out in its average, where anatomy blurs away.
    """
    keys = rows[list(by)].astype(str).agg(" / ".join, axis=1).to_numpy()
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    offset = 0
    for images in images_by_split:
        for begin, chunk in _iter_chunks(images, chunk_size):
            chunk_keys = keys[offset + begin: offset + begin + len(chunk)]
            for key in np.unique(chunk_keys):
                selected = chunk[chunk_keys == key].astype(np.float64)
                sums[key] = sums.get(key, 0.0) + selected.sum(axis=0)
                counts[key] = counts.get(key, 0) + len(selected)
        offset += len(images)
    return {k: (sums[k] / counts[k]).astype(np.float32) for k in sorted(sums)}


# ---------------------------------------------------------------------------------------------
# Duplicates


def perceptual_hashes(images: np.ndarray, chunk_size: int = 512,
                      return_thumbnails: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """64-bit pHash of each ``(H, W) uint8`` image: ``(N,) uint64`` (and ``(N, 32, 32) uint8`` thumbnails).

    The image is shrunk to 32x32 (area averaging), its 2-D DCT taken, and the 8x8 lowest
    frequencies compared with their median (the DC term left out of the median): one bit each.
    Re-encoding, mild brightening or contrast changes move few bits; see
    :data:`NEAR_DUPLICATE_MAX_DISTANCE` for what the distances mean on chest films.
    """
    images = _check_images(images)
    hashes = np.zeros(len(images), dtype=np.uint64)
    thumbnails = np.zeros((len(images), 32, 32), dtype=np.uint8)
    weights = (np.uint64(1) << np.arange(63, -1, -1, dtype=np.uint64))
    for begin, chunk in _iter_chunks(images, chunk_size):
        for i, image in enumerate(chunk):
            small = cv2.resize(image, (32, 32), interpolation=cv2.INTER_AREA)
            thumbnails[begin + i] = small
            low = cv2.dct(small.astype(np.float32))[:8, :8].ravel()
            bits = (low > np.median(low[1:])).astype(np.uint64)
            hashes[begin + i] = np.bitwise_or.reduce(bits * weights)
    return (hashes, thumbnails) if return_thumbnails else hashes


if hasattr(np, "bitwise_count"):  # NumPy >= 2.0
    def _popcount(x: np.ndarray) -> np.ndarray:
        return np.bitwise_count(x)
else:  # pragma: no cover - NumPy 1.26
    _BYTE_BITS = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)

    def _popcount(x: np.ndarray) -> np.ndarray:
        return _BYTE_BITS[np.ascontiguousarray(x).view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1, dtype=np.uint8)


def hamming_pairs(hashes: np.ndarray, max_distance: int = NEAR_DUPLICATE_MAX_DISTANCE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs ``i < j`` of ``(N,) uint64`` hashes within ``max_distance`` bits: ``(i, j, distance)`` arrays.

    Every pair is compared (O(N^2) time: 30,000 images are 4.5e8 pairs, a few seconds with a
    vectorised popcount), in blocks of about :data:`_PAIR_BLOCK` pairs, so memory stays near
    32 MB whatever N is.
    """
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(hashes)
    found_i, found_j, found_d = [], [], []
    rows_per_block = max(1, _PAIR_BLOCK // max(n, 1))
    for begin in range(0, n, rows_per_block):
        end = min(n, begin + rows_per_block)
        # Compare rows [begin, end) with columns [begin, n); keep j > i.
        distance = _popcount(hashes[begin:end, None] ^ hashes[None, begin:])
        close = distance <= max_distance
        close &= np.arange(begin, n)[None, :] > np.arange(begin, end)[:, None]
        i, j = np.nonzero(close)
        found_i.append(i + begin)
        found_j.append(j + begin)
        found_d.append(distance[i, j])
    if not found_i:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    return (np.concatenate(found_i).astype(np.int64), np.concatenate(found_j).astype(np.int64),
            np.concatenate(found_d).astype(np.int64))


def _correlation(thumbnails: np.ndarray, i: np.ndarray, j: np.ndarray, chunk: int = 16384) -> np.ndarray:
    """Pearson correlation of thumbnails ``i[k]`` and ``j[k]``; 1.0 for two flat (constant) images that are equal.

    Pairs are taken ``chunk`` at a time (~270 MB of float64 at most), however many candidates there are.
    """
    if len(i) > chunk:
        return np.concatenate([_correlation(thumbnails, i[k:k + chunk], j[k:k + chunk], chunk)
                               for k in range(0, len(i), chunk)])
    a = thumbnails[i].reshape(len(i), -1).astype(np.float64)
    b = thumbnails[j].reshape(len(j), -1).astype(np.float64)
    a -= a.mean(axis=1, keepdims=True)
    b -= b.mean(axis=1, keepdims=True)
    norm = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    dot = (a * b).sum(axis=1)
    flat_equal = (norm == 0) & (np.abs(thumbnails[i].astype(int) - thumbnails[j].astype(int)).reshape(len(i), -1).max(axis=1) <= 2)
    return np.where(norm > 0, dot / np.where(norm > 0, norm, 1.0), np.where(flat_equal, 1.0, 0.0))


DUPLICATE_COLUMNS = ["kind", "distance", "correlation", "path_a", "split_a", "patient_a", "label_a", "source_a",
                     "path_b", "split_b", "patient_b", "label_b", "source_b", "cross_split", "cross_patient", "label_conflict"]


def find_duplicates(manifest: pd.DataFrame, pixel_rows: pd.DataFrame | None = None, hashes: np.ndarray | None = None,
                    thumbnails: np.ndarray | None = None) -> pd.DataFrame:
    """Pairs of images that are the same picture in different splits or under different patients.

    Exact copies: same ``sha1`` in ``manifest``. Near copies (with ``pixel_rows``, ``hashes`` and
    ``thumbnails`` of the same preprocessed images, from :func:`perceptual_hashes`): pHash
    distance <= :data:`NEAR_DUPLICATE_MAX_DISTANCE` and thumbnail correlation >=
    :data:`NEAR_DUPLICATE_MIN_CORRELATION`. Only pairs with a different ``split`` (where there is
    a split column) or a different ``patient_id`` are kept: a patient's own repeated films in one
    split do not leak. Columns: :data:`DUPLICATE_COLUMNS` (``kind`` "exact" or "near", ``distance``
    in bits, 0 for exact copies).
    """
    records: dict[tuple[str, str], dict] = {}

    def add(a: dict, b: dict, kind: str, distance: int, correlation: float) -> None:
        if str(a["path"]) > str(b["path"]):
            a, b = b, a
        split_a, split_b = a.get("split"), b.get("split")
        cross_split = _present(split_a) and _present(split_b) and split_a != split_b
        cross_patient = str(a["patient_id"]) != str(b["patient_id"])
        if not (cross_split or cross_patient):
            return
        key = (str(a["path"]), str(b["path"]))
        if key in records and records[key]["kind"] == "exact":
            return
        records[key] = {
            "kind": kind, "distance": int(distance), "correlation": round(float(correlation), 4),
            "path_a": str(a["path"]), "split_a": split_a if _present(split_a) else None, "patient_a": str(a["patient_id"]),
            "label_a": str(a["label"]), "source_a": str(a["source"]),
            "path_b": str(b["path"]), "split_b": split_b if _present(split_b) else None, "patient_b": str(b["patient_id"]),
            "label_b": str(b["label"]), "source_b": str(b["source"]),
            "cross_split": bool(cross_split), "cross_patient": bool(cross_patient),
            "label_conflict": str(a["label"]) != str(b["label"]),
        }

    if "sha1" in manifest.columns:
        known = manifest[manifest["sha1"].map(_present)]
        for _, group in known.groupby("sha1", sort=False):
            if len(group) < 2:
                continue
            members = group.to_dict("records")
            for x in range(len(members)):
                for y in range(x + 1, len(members)):
                    add(members[x], members[y], "exact", 0, 1.0)
    if pixel_rows is not None and hashes is not None and thumbnails is not None and len(hashes) > 1:
        if len(pixel_rows) != len(hashes) or len(thumbnails) != len(hashes):
            raise ConfigError(f"pixel_rows, hashes and thumbnails must have one entry per image, got "
                              f"{len(pixel_rows)}, {len(hashes)}, {len(thumbnails)}")
        i, j, distance = hamming_pairs(hashes)
        if len(i):
            correlation = _correlation(thumbnails, i, j)
            keep = correlation >= NEAR_DUPLICATE_MIN_CORRELATION
            members = pixel_rows.to_dict("records")
            sha = pixel_rows["sha1"].to_numpy() if "sha1" in pixel_rows.columns else np.full(len(pixel_rows), None)
            for a, b, d, r in zip(i[keep], j[keep], distance[keep], correlation[keep]):
                same_bytes = _present(sha[a]) and sha[a] == sha[b]
                add(members[a], members[b], "exact" if same_bytes else "near", 0 if same_bytes else d, r)
    table = pd.DataFrame(list(records.values()), columns=DUPLICATE_COLUMNS)
    return table.sort_values(["kind", "distance", "path_a", "path_b"], kind="stable").reset_index(drop=True)


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and value is not pd.NA and str(value) != ""


# ---------------------------------------------------------------------------------------------
# Warnings


def class_order(labels: Iterable[str], classes: Sequence[str] | None = None) -> list[str]:
    """The classes in report order: ``classes`` where given (a task's, negative class first), else
    "normal" first and the others sorted, so that with two classes the last one is the disease."""
    present = sorted({str(label) for label in labels})
    if classes:
        return [c for c in classes if c in present] + [c for c in present if c not in classes]
    return sorted(present, key=lambda c: (c != "normal", c))


def confound_warnings(manifest: pd.DataFrame, border_images: pd.DataFrame | None = None,
                      duplicates: pd.DataFrame | None = None, classes: Sequence[str] | None = None) -> list[Finding]:
    """Every check's findings, most serious first: each a :class:`~xraylib.reporting.Finding` with its
    numbers (shares, counts, AUCs, the class and source concerned), its level ("shortcut", "leak" or
    "caution") and a plain-words message rendered from them.

    ``classes``: the task's classes, negative first (see :func:`class_order`); with two classes
    the symmetric checks speak of the last one.
    """
    frame = _check_manifest(manifest)
    classes = class_order(frame["label"], classes)
    findings: list[Finding] = []
    if len(classes) < 2:
        findings.append(Finding("one_class", f"the data hold one class only ({classes[0]}): there is nothing to "
                                             "tell apart, and none of the confound checks can run", {"class": classes[0]}))
        return findings
    findings += _source_checks(frame, classes)
    findings += _age_checks(frame, classes)
    findings += _category_checks(frame, classes, "view", "view", tv_warn=CATEGORY_TV_WARN)
    findings += _sex_checks(frame, classes)
    findings += _size_checks(frame, classes)
    for column, what in (("file_format", "file format"), ("bit_depth", "bit depth"), ("channels", "number of channels")):
        findings += _category_checks(frame, classes, column, what, tv_warn=CATEGORY_TV_WARN, missing_is_category=False)
    if border_images is not None and len(border_images):
        findings += _border_checks(border_images, classes)
    findings += _leak_checks(frame, duplicates)
    return findings


def _pct(x: float) -> str:
    return format_number(x, 0, style="percent")


def _sources_text(counts: pd.Series) -> str:
    return ", ".join(f"{source} {count}" for source, count in counts.items())


def _source_checks(frame: pd.DataFrame, classes: list[str]) -> list[Finding]:
    out = []
    sources = sorted(frame["source"].unique())
    if len(sources) == 1:
        out.append(Finding("one_source", (
            f"all images come from one source ({sources[0]}): source and class are not confounded here, but nothing "
            "shows that a model trained on them works on images from another hospital; test it on another source "
            "before trusting it elsewhere."), {"source": sources[0]}))
        return out
    for label in classes:
        part = frame[frame["label"] == label]
        in_class = part["source"].unique()
        if len(in_class) == 1:
            source = in_class[0]
            out.append(Finding("single_source_class", (
                f"all {len(part)} '{label}' images ({part['patient_id'].nunique()} patients) come from one source, "
                f"{source}: a model can learn the source (hospital, scanner, processing, population) instead of the "
                f"disease, and nothing in these data can tell the two apart. Add '{label}' images from another source, "
                "or test on a source the model never saw."),
                {"class": label, "source": source, "images": len(part), "patients": int(part["patient_id"].nunique())},
                level="shortcut"))
    accuracy, baseline, table = source_label_accuracy(frame)
    if accuracy >= SOURCE_ACCURACY_WARN and accuracy - baseline >= SOURCE_ACCURACY_GAIN:
        detail = "; ".join(
            f"{source}: " + (f"only {row.idxmax()}" if (row > 0).sum() == 1 else f"{_pct(row.max() / row.sum())} {row.idxmax()}")
            for source, row in table.iterrows())
        out.append(Finding("source_predicts_label", (
            f"the source alone tells the label of {_pct(accuracy)} of the images (guessing the commonest class "
            f"gives {_pct(baseline)}): {detail}. A classifier can reach that accuracy by recognising where an "
            "image comes from; use sources that hold every class, report results per source, and run the "
            "leave-one-source-out and source-prediction tests."), {"accuracy": accuracy, "baseline": baseline},
            level="shortcut"))
    return out


def source_label_accuracy(manifest: pd.DataFrame) -> tuple[float, float, pd.DataFrame]:
    """How far the source alone gets: ``(accuracy, baseline, table)``.

    ``accuracy``: the share of images whose label is their source's commonest label;
    ``baseline``: the share of the commonest class (always guessing it); ``table``: images per
    source (rows) and label (columns).
    """
    table = pd.crosstab(manifest["source"], manifest["label"])
    accuracy = float(table.max(axis=1).sum() / len(manifest))
    baseline = float(manifest["label"].value_counts().max() / len(manifest))
    return accuracy, baseline, table


def _age_checks(frame: pd.DataFrame, classes: list[str]) -> list[Finding]:
    """Groups (class, source) whose age range lies wholly outside another class's range.

    A class's range spans all its groups with recorded ages or a documented population; a group
    is itself tested when it has at least :data:`MIN_AGES_TO_COMPARE` recorded ages or a
    documented population. Said from the younger side first, and once for two one-group classes.
    """
    ages = age_table(frame)
    out: list[Finding] = []
    reference = ages[ages["range_low"].notna()]
    tested = reference[(reference["with_age"] >= MIN_AGES_TO_COMPARE) | (reference["with_age"] == 0)]
    class_range = {label: (g["range_low"].min(), g["range_high"].max(), g) for label, g in reference.groupby("label")}
    candidates = []
    for row in tested.itertuples():
        for other in classes:
            if other == row.label or other not in class_range:
                continue
            low, high, other_groups = class_range[other]
            if row.range_low > high or low > row.range_high:
                candidates.append((row, other, low, high, other_groups))
    candidates.sort(key=lambda c: c[0].range_high)  # the younger side speaks first
    reported: set[frozenset] = set()
    for row, other, low, high, other_groups in candidates:
        class_size = int((frame["label"] == row.label).sum())
        whole = row.images == class_size and len(other_groups) == 1
        key = frozenset({row.label, other}) if whole else frozenset({(row.label, row.source), other})
        if key in reported:
            continue
        reported.add(key)
        younger = row.range_high < low
        contrast = _age_contrast(row.range_high, low) if younger else _age_contrast(high, row.range_low)
        out.append(Finding("age_no_overlap", (
            f"'{row.label}' images from {row.source} ({row.images} of {class_size} '{row.label}' images) are "
            f"{_age_words(row)}, while '{other}' patients are aged {low:.0f} to {high:.0f} "
            f"({_basis_words(other_groups)}): the ages do not overlap, so a model can learn {contrast} instead of "
            f"the disease. Compare '{row.label}' and '{other}' patients of the same ages"
            f"{' (e.g. adult normals such as NIH ChestX-ray14)' if younger and row.range_high < ADULT_AGE else ''}."),
            {"class": row.label, "source": row.source, "images": int(row.images), "class_images": class_size,
             "range_low": row.range_low, "range_high": row.range_high, "other_class": other, "other_low": low,
             "other_high": high}, level="shortcut"))
    for row in ages[ages["range_low"].isna()].itertuples():
        share = row.images / int((frame["label"] == row.label).sum())
        if share >= 0.2:
            out.append(Finding("ages_unknown", (
                f"no ages are recorded for the {row.images} '{row.label}' images from {row.source} ({_pct(share)} of "
                "the class) and the source's population is not documented in xraylib.audit.SOURCE_POPULATION: "
                "the age balance between classes cannot be checked."),
                {"class": row.label, "source": row.source, "images": int(row.images), "share": share}))
    return out


def _age_contrast(younger_high: float, older_low: float) -> str:
    """'child versus adult' when the younger group is all children and the older all adults, else 'age'."""
    return "child versus adult" if younger_high < ADULT_AGE <= older_low else "age"


def _age_words(row: Any) -> str:
    if row.with_age == 0:
        kind = "children" if row.range_high < ADULT_AGE else "patients"
        return f"{kind} aged {row.range_low:.0f} to {row.range_high:.0f} (the documented population of {row.source}; its files record no ages)"
    return f"aged {row.range_low:.0f} to {row.range_high:.0f} ({row.range_basis})"


def _basis_words(groups: pd.DataFrame) -> str:
    parts = []
    for row in groups.itertuples():
        parts.append(f"{row.source}: " + (f"{row.with_age} recorded ages, {AGE_PERCENTILES[0]:g}th-{AGE_PERCENTILES[1]:g}th percentile"
                                          if row.with_age >= MIN_AGES_FOR_PERCENTILES else row.range_basis))
    return "; ".join(parts)


def _distribution(values: pd.Series) -> pd.Series:
    counts = values.value_counts()
    return counts / counts.sum() if counts.sum() else counts


def _total_variation(a: pd.Series, b: pd.Series) -> float:
    index = a.index.union(b.index)
    return float(0.5 * (a.reindex(index, fill_value=0) - b.reindex(index, fill_value=0)).abs().sum())


def _category_checks(frame: pd.DataFrame, classes: list[str], column: str, what: str, tv_warn: float | None,
                     missing_is_category: bool = True) -> list[Finding]:
    """Categories of ``column`` found (almost) only in one class; else, unless ``tv_warn`` is None,
    a class whose distribution of ``column`` differs from the others' by total variation >= ``tv_warn``."""
    values = _category(frame[column])
    if not missing_is_category:
        keep = values != NOT_RECORDED
        values, labels, sources = values[keep], frame.loc[keep, "label"], frame.loc[keep, "source"]
    else:
        labels, sources = frame["label"], frame["source"]
    if values.nunique() < 2:  # one value for every image: it cannot tell classes apart
        return []
    out = []
    table = pd.crosstab(values, labels)
    class_share = labels.value_counts() / len(labels)
    flagged = False
    for category, row in table.iterrows():
        total = int(row.sum())
        top = row.idxmax()
        if total < MIN_CATEGORY_IMAGES or row.max() / total < CATEGORY_ONE_CLASS_SHARE or class_share[top] >= CATEGORY_ONE_CLASS_SHARE:
            continue
        flagged = True
        where = _sources_text(sources[(values == category) & (labels == top)].value_counts())
        name = f"{what} {category}" if category != NOT_RECORDED else f"{what} not recorded"
        amount = f"all {total} images are" if row.max() == total else f"{int(row.max())} of {total} images ({_pct(row.max() / total)}) are"
        if column in _FILE_TRAITS:
            consequence = (f"the '{top}' files were made differently (e.g. screenshots or figures from papers); "
                           f"converting to 8-bit grayscale hides the {what} itself, but the processing behind it "
                           "(compression, resampling, annotations) can stay visible to a model")
        else:
            consequence = (f"the {what} is a shortcut a model can use to pick '{top}' without looking at the "
                           f"lungs{_category_hint(column, category)}")
        out.append(Finding(f"{column}_in_one_class", f"{name}: {amount} '{top}' ({where}): {consequence}.",
                           {"column": column, "category": category, "class": top, "images": total,
                            "class_images": int(row.max()), "share": float(row.max() / total)}, level="shortcut"))
    if not flagged and tv_warn is not None:
        for label in (classes[-1:] if len(classes) == 2 else classes):
            inside, rest = _distribution(values[labels == label]), _distribution(values[labels != label])
            tv = _total_variation(inside, rest) if len(inside) and len(rest) else math.nan
            if tv >= tv_warn:
                pair, others = _versus(label, classes)
                out.append(Finding(f"{column}_differs", (
                    f"the {what} differs between {pair} (total variation {format_number(tv, 2)}): "
                    f"'{label}' {_shares_text(inside)}; {others} {_shares_text(rest)}. A model can use the {what} "
                    "as a shortcut."), {"column": column, "class": label, "total_variation": tv,
                                        "shares": inside.to_dict(), "other_shares": rest.to_dict()}, level="shortcut"))
    return out


_FILE_TRAITS = ("file_format", "bit_depth", "channels")


def _category_hint(column: str, category: str) -> str:
    if column == "view" and category == "AP Supine":
        return " (supine films are taken of patients too ill to stand, often in intensive care)"
    if column == "view" and category == NOT_RECORDED:
        return " (and the view balance of those images cannot be checked)"
    return ""


def _versus(label: str, classes: list[str]) -> tuple[str, str]:
    """("'covid' and 'normal'", "'normal'") with two classes; ("'covid' and the other classes", "others") with more."""
    if len(classes) == 2:
        other = next(c for c in classes if c != label)
        return f"'{label}' and '{other}'", f"'{other}'"
    return f"'{label}' and the other classes", "others"


def _others_words(label: str, classes: list[str]) -> str:
    """"'normal'" (the other class) with two classes, "the other classes'" (possessive) with more."""
    return f"'{next(c for c in classes if c != label)}'" if len(classes) == 2 else "the other classes'"


def _shares_text(shares: pd.Series) -> str:
    return ", ".join(f"{k} {_pct(v)}" for k, v in shares.sort_values(ascending=False).items())


def _sex_checks(frame: pd.DataFrame, classes: list[str]) -> list[Finding]:
    sex = _category(frame["sex"])
    known = sex != NOT_RECORDED
    out = []
    for label in (classes[-1:] if len(classes) == 2 else classes):
        inside = _distribution(sex[known & (frame["label"] == label)])
        rest = _distribution(sex[known & (frame["label"] != label)])
        if len(inside) == 0 or len(rest) == 0:
            continue
        tv = _total_variation(inside, rest)
        if tv >= SEX_TV_WARN:
            pair, others = _versus(label, classes)
            out.append(Finding("sex_imbalance", (
                f"sex is unbalanced between {pair} (among images with a recorded sex): "
                f"'{label}' {_shares_text(inside)}; {others} {_shares_text(rest)}. A model can partly learn sex "
                "(body shape, breast shadows) instead of the disease."),
                {"class": label, "total_variation": tv, "shares": inside.to_dict(), "other_shares": rest.to_dict()},
                level="shortcut"))
    out += _category_checks(frame, classes, "sex", "sex", tv_warn=None)
    return out


def _auc(values: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney AUC of ``values`` separating ``positive`` from the rest (ties count half); NaN values dropped."""
    ok = np.isfinite(values)
    values, positive = values[ok], positive[ok]
    n1, n0 = int(positive.sum()), int((~positive).sum())
    if n1 == 0 or n0 == 0:
        return math.nan
    ranks = pd.Series(values).rank(method="average").to_numpy()
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _size_checks(frame: pd.DataFrame, classes: list[str]) -> list[Finding]:
    width = pd.to_numeric(frame["width"], errors="coerce").to_numpy(dtype=float)
    height = pd.to_numeric(frame["height"], errors="coerce").to_numpy(dtype=float)
    measures = {"width": width, "height": height, "aspect ratio (width / height)": width / height}
    out = []
    for label in (classes[-1:] if len(classes) == 2 else classes):
        positive = (frame["label"] == label).to_numpy()
        separating, aucs = [], {}
        for name, values in measures.items():
            auc = _auc(values, positive)
            if math.isfinite(auc) and abs(auc - 0.5) >= SIZE_AUC_DISTANCE_WARN:
                aucs[name.split(" ")[0]] = auc
                digits = 2 if name.startswith("aspect") else 0
                separating.append(f"{name}, {'larger' if auc > 0.5 else 'smaller'} in '{label}' (AUC {max(auc, 1 - auc):.2f}; "
                                  f"median {np.nanmedian(values[positive]):.{digits}f} against "
                                  f"{np.nanmedian(values[~positive]):.{digits}f})")
        if separating:
            out.append(Finding("image_size", (
                f"the original image size alone separates '{label}' from {_versus(label, classes)[1].replace('others', 'the other classes')}: {'; '.join(separating)}. "
                "Resizing to one size does not remove it: stretching distorts the anatomy by the aspect ratio and "
                "downscaling blurs large and small files differently, which a model can pick up."),
                {"class": label, "auc": aucs}, level="shortcut"))
    return out


def _smd(a: np.ndarray, b: np.ndarray) -> float:
    """Standardised mean difference (a - b) / pooled SD; NaN when either group has fewer than 2 images."""
    if len(a) < 2 or len(b) < 2:
        return math.nan
    pooled = math.sqrt((np.var(a, ddof=1) + np.var(b, ddof=1)) / 2)
    if pooled == 0:
        return 0.0 if np.mean(a) == np.mean(b) else math.copysign(math.inf, np.mean(a) - np.mean(b))
    return float((np.mean(a) - np.mean(b)) / pooled)


_REGION_WORDS = {"top": "top band", "bottom": "bottom band", "left": "left band", "right": "right band",
                 "top_left": "top-left corner", "top_right": "top-right corner", "bottom_left": "bottom-left corner",
                 "bottom_right": "bottom-right corner", "border_minus_centre": "border-minus-centre difference"}


def _border_checks(border_images: pd.DataFrame, classes: list[str]) -> list[Finding]:
    """Burned-in marks and border intensity, each class against the others.

    Marks are compared anywhere near the edges and per zone (marks on the left in one class and
    on the right in another separate them too); a class is flagged for having MORE marks. For
    two classes the border difference is said once, from the side of the brighter class.
    """
    out = []
    labels = border_images["label"].astype(str).to_numpy()
    marker = border_images["marker"].to_numpy(dtype=bool)
    zones = border_images["marker_zone"].astype(str).to_numpy()
    border_candidates = []
    for label in classes:
        inside, rest = labels == label, labels != label
        if inside.sum() < 2 or rest.sum() < 2:
            continue
        gaps = {"near the edges": (marker[inside].mean(), marker[rest].mean())}
        for zone in MARKER_ZONES:
            hit = marker & (zones == zone)
            gaps[f"in the {zone.replace('_', '-')} zone"] = (hit[inside].mean(), hit[rest].mean())
        where, (share_in, share_rest) = max(gaps.items(), key=lambda kv: kv[1][0] - kv[1][1])
        if share_in - share_rest >= MARKER_SHARE_GAP_WARN:
            common = pd.Series(zones[inside & marker]).value_counts()
            most = f" (most often {common.index[0].replace('_', '-')})" if where == "near the edges" and len(common) else ""
            out.append(Finding("burned_in_marker", (
                f"a small bright mark (a burned-in letter, marker or text) is found {where}{most} in "
                f"{_pct(share_in)} of '{label}' images against {_pct(share_rest)} of {_others_words(label, classes)} images: "
                f"a model can find '{label}' by the mark. Look at the mean image per class, and crop or mask the "
                "edges before training."),
                {"class": label, "where": where, "share": float(share_in), "other_share": float(share_rest)},
                level="shortcut"))
        smds = {}
        for region in (*BORDER_REGIONS, "border_minus_centre"):
            values = border_images[region].to_numpy(dtype=float)
            smds[region] = _smd(values[inside], values[rest])
        finite = {k: v for k, v in smds.items() if not math.isnan(v)}
        if finite:
            region, d = max(finite.items(), key=lambda kv: abs(kv[1]))
            if abs(d) >= BORDER_SMD_WARN:
                values = border_images[region].to_numpy(dtype=float)
                border_candidates.append((label, region, d, values[inside].mean(), values[rest].mean()))
    if len(classes) == 2:
        border_candidates = [c for c in border_candidates if c[2] > 0][:1] or border_candidates[:1]
    for label, region, d, mean_in, mean_rest in border_candidates:
        out.append(Finding("border_intensity", (
            f"the image borders of '{label}' differ from {_others_words(label, classes)}: {_REGION_WORDS[region]} mean "
            f"intensity {mean_in:.0f} against {mean_rest:.0f} (of 255), standardised difference {d:+.1f} "
            f"(warning at |d| >= {BORDER_SMD_WARN:g}). Edges carry collimation, text and markers that differ by "
            "hospital, not by disease: a model can use them."),
            {"class": label, "region": region, "smd": d, "mean": float(mean_in), "other_mean": float(mean_rest)},
            level="shortcut"))
    return out


def _leak_checks(frame: pd.DataFrame, duplicates: pd.DataFrame | None) -> list[Finding]:
    out = []
    if "split" in frame.columns and frame["split"].notna().any():
        per_patient = frame.dropna(subset=["split"]).groupby("patient_id")["split"].nunique()
        leaked = sorted(per_patient[per_patient > 1].index)
        if leaked:
            out.append(Finding("patient_in_several_splits", (
                f"{len(leaked)} patient(s) have images in more than one split (e.g. {', '.join(leaked[:3])}): the test "
                "set holds patients seen in training. Split by patient (xraylib.split.split_by_patient)."),
                {"patients": len(leaked)}, level="leak"))
    if duplicates is None or duplicates.empty:
        return out
    for kind, words in (("exact", "identical files (same SHA-1)"), ("near", "near-identical images (perceptual hash)")):
        part = duplicates[duplicates["kind"] == kind]
        if part.empty:
            continue
        cross_split = part[part["cross_split"]]
        cross_patient = part[part["cross_patient"] & ~part["cross_split"]]
        conflicts = int(part["label_conflict"].sum())
        if len(cross_split):
            pairs = cross_split.apply(lambda r: f"{r['split_a']}/{r['split_b']}", axis=1).value_counts()
            out.append(Finding(f"{kind}_duplicates_across_splits", (
                f"{len(cross_split)} pair(s) of {words} sit in different splits ({_sources_text(pairs)}): the model "
                "is tested on pictures it trained on. Remove the copies or give them one patient id so they share "
                "a split."), {"pairs": len(cross_split)}, level="leak"))
        if len(cross_patient):
            out.append(Finding(f"{kind}_duplicates_across_patients", (
                f"{len(cross_patient)} pair(s) of {words} are filed under different patients in the same split "
                "(the same picture reused, e.g. by two papers): a patient-level split cannot keep them together; "
                "merge their patient ids."), {"pairs": len(cross_patient)}, level="leak"))
        if conflicts:
            out.append(Finding(f"{kind}_duplicates_label_conflict", (
                f"{conflicts} pair(s) of {words} carry different labels: at least one label of each pair is wrong."),
                {"pairs": conflicts}))
    return out


