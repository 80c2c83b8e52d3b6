"""The public chest X-ray sources: one :class:`Source` record each, and their readers.

Every reader takes the source's root folder (as users keep it on Drive) and returns a
:class:`SourceTable`: one row per image with the columns in :data:`SOURCE_COLUMNS`, plus the
problems it met and what it left out and why. Nothing downstream looks at a source's layout.

Everything else xraylib knows about a source (its drive_paths.yaml key, its folder name, what to
say about its patients, their ages when the files carry none, its hospital group, its sample
layout) is in its record in :data:`SOURCES`, and every module reads it from there. Adding a source
is one reader here, one record in :data:`SOURCES`, and one field in
:class:`xraylib.config.DrivePaths` (a test checks that the fields match the records).

Labels are ``"normal"``, ``"covid"`` (COVID-19) and ``"pneumonia"`` (other pneumonia).
Patient ids are prefixed with the source (``"ieee8023:12"``) so two sources cannot collide.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from .dicom import parse_age
from .errors import SourceError
from .sample_layouts import write_ieee8023_sample, write_kaggle_sample, write_rsna_sample

LABELS = ("normal", "covid", "pneumonia")

#: Columns every source reader returns (the manifest adds file facts such as size and hash).
SOURCE_COLUMNS = [
    "path", "label", "source", "patient_id", "view", "sex", "age", "finding", "modality",
    "source_split", "image_id",
]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}

# Metadata columns the ieee8023 reader needs.
IEEE8023_REQUIRED = ("patientid", "finding", "view", "modality", "folder", "filename")

_PNEUMONIA_WORDS = (
    "pneumonia", "sars", "mers", "pneumocystis", "streptococcus", "klebsiella", "mycoplasma",
    "legionella", "varicella", "e.coli", "bacterial", "influenza", "lipoid", "viral", "fungal",
    "chlamydophila", "aspergillosis", "nocardia", "herpes", "staphylococcus",
)


@dataclass
class SourceTable:
    """A reader's result: ``rows`` (SOURCE_COLUMNS), ``problems`` [(path, reason)], ``excluded`` {reason: count}."""

    source: str
    rows: pd.DataFrame
    problems: list[tuple[str, str]] = field(default_factory=list)
    excluded: dict[str, int] = field(default_factory=dict)

    def exclude(self, reason: str, count: int) -> None:
        if count:
            self.excluded[reason] = self.excluded.get(reason, 0) + int(count)


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise SourceError(f"{path}: folder not found ({what})")


def _read_csv(path: Path, what: str, required: tuple[str, ...]) -> pd.DataFrame:
    if not path.is_file():
        raise SourceError(f"{path}: file not found ({what})")
    try:
        # utf-8-sig drops a BOM; the real metadata.csv has a few cp1252 bytes in free-text columns.
        frame = pd.read_csv(path, dtype=str, encoding="utf-8-sig", encoding_errors="replace", keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeError) as exc:
        detail = " ".join(str(exc).split())  # pandas' tokenizer messages end in a newline; errors are one line
        raise SourceError(f"{path}: cannot be read as CSV ({detail})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    # "patientid" and "patientid " are two columns to pandas but one once stripped: the later would win silently.
    twice = sorted({c for c in required if list(frame.columns).count(c) > 1})
    if twice:
        raise SourceError(f"{path}: column(s) {twice} appear more than once ({what}); keep one of each")
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise SourceError(f"{path}: missing column(s) {missing} ({what}); found {list(frame.columns)[:12]}")
    return frame.replace({"": np.nan})


def _finish(rows: list[dict] | dict[str, list], source: str) -> pd.DataFrame:
    """The reader's rows (a dict per row, or a list per column) as a SOURCE_COLUMNS frame."""
    frame = pd.DataFrame(rows, columns=SOURCE_COLUMNS)
    frame["source"] = source
    frame["age"] = pd.to_numeric(frame["age"], errors="coerce")
    return frame


def ieee8023_label(finding: object) -> str | None:
    """Label of an ieee8023 ``finding``: "covid", "normal", "pneumonia", or None (other findings)."""
    if not isinstance(finding, str) or not finding.strip():
        return None
    text = finding.strip().lower()
    if "covid" in text:
        return "covid"
    if text == "no finding":
        return "normal"
    if any(word in text for word in _PNEUMONIA_WORDS):
        return "pneumonia"
    return None


def normalise_view(view: object) -> str | None:
    """Canonical view names: "PA", "AP", "AP Supine", "L" (lateral); None when unknown."""
    if not isinstance(view, str) or not view.strip():
        return None
    text = " ".join(view.replace("_", " ").split()).upper()
    if text in ("PA", "AP"):
        return text
    if text.startswith("AP") and "SUPINE" in text:
        return "AP Supine"
    if text.startswith("AP"):
        return "AP"
    if text in ("L", "LL", "LATERAL", "LAT", "RL"):
        return "L"
    return view.strip()


def read_covid_chestxray(root: str | os.PathLike) -> SourceTable:
    """ieee8023 covid-chestxray-dataset: ``metadata.csv`` + the folder named in its ``folder`` column.

    Every row with a known label becomes a row (all views and modalities: the manifest filters);
    rows whose finding is not a label we use, or whose image file is missing, are counted.
    """
    root = Path(root)
    _require_dir(root, "covid-chestxray-dataset: expected metadata.csv and images/")
    meta = _read_csv(root / "metadata.csv", "ieee8023 metadata", IEEE8023_REQUIRED)
    table = SourceTable("ieee8023", pd.DataFrame(columns=SOURCE_COLUMNS))
    rows = []
    for record in meta.to_dict("records"):
        finding = record.get("finding")
        label = ieee8023_label(finding)
        if label is None:
            # A blank cell is NaN here: say so rather than "finding not used: nan".
            table.exclude(f"finding not used: {finding}" if isinstance(finding, str) else "no finding recorded", 1)
            continue
        folder = record.get("folder") if isinstance(record.get("folder"), str) else "images"
        filename = record.get("filename")
        if not isinstance(filename, str):
            table.exclude("no filename", 1)
            continue
        path = root / folder / filename
        if not path.is_file():
            table.problems.append((str(path), "image file named in metadata.csv is missing"))
            continue
        age = record.get("age")
        rows.append({
            "path": str(path),
            "label": label,
            "patient_id": f"ieee8023:{record['patientid']}",
            "view": normalise_view(record.get("view")),
            "sex": record.get("sex") if record.get("sex") in ("M", "F") else None,
            "age": age,
            "finding": record.get("finding"),
            "modality": record.get("modality"),
            "source_split": None,
            "image_id": filename,
        })
    table.rows = _finish(rows, "ieee8023")
    return table


RSNA_CLASS_LABELS = {"Normal": "normal", "Lung Opacity": "pneumonia", "No Lung Opacity / Not Normal": None}


def read_rsna_labels(root: str | os.PathLike) -> pd.DataFrame:
    """One row per RSNA patientId: ``patientId, class, target, n_boxes`` from the two label CSVs.

    The labels CSV has one row per box (several per pneumonia patient); the class file repeats
    the class on each. Raises :class:`SourceError` for missing files, columns or conflicting classes.
    """
    root = Path(root)
    labels = _read_csv(root / "stage_2_train_labels.csv", "RSNA labels", ("patientId", "Target"))
    classes = _read_csv(root / "stage_2_detailed_class_info.csv", "RSNA class info", ("patientId", "class"))
    per_patient = labels.assign(target=pd.to_numeric(labels["Target"], errors="coerce").fillna(0).astype(int),
                                box=labels.get("x", pd.Series(index=labels.index, dtype=object)).notna())
    per_patient = per_patient.groupby("patientId").agg(target=("target", "max"), n_boxes=("box", "sum")).reset_index()
    class_per_patient = classes.drop_duplicates(["patientId", "class"])
    conflicts = class_per_patient["patientId"].duplicated(keep=False)
    if conflicts.any():
        example = class_per_patient.loc[conflicts, "patientId"].iloc[0]
        raise SourceError(f"{root / 'stage_2_detailed_class_info.csv'}: patientId {example} has more than one class")
    merged = per_patient.merge(class_per_patient, on="patientId", how="left")
    return merged[["patientId", "class", "target", "n_boxes"]]


def read_rsna(root: str | os.PathLike) -> SourceTable:
    """RSNA Pneumonia Detection Challenge: ``stage_2_train_images/<patientId>.dcm`` + the two label CSVs.

    "Normal" is normal, "Lung Opacity" is pneumonia; "No Lung Opacity / Not Normal" is counted and
    left out. Sex, age and view come from each DICOM header when the manifest reads the file.
    """
    root = Path(root)
    _require_dir(root, "RSNA pneumonia: expected stage_2_train_images/ and the label CSVs")
    per_patient = read_rsna_labels(root)
    images = root / "stage_2_train_images"
    # Names, not Path objects, and columns, not a dict per row: RSNA has 26,684 patients.
    present = {os.path.splitext(name)[0] for name in os.listdir(images) if name.endswith(".dcm")} if images.is_dir() else set()
    table = SourceTable("rsna", pd.DataFrame(columns=SOURCE_COLUMNS))
    patient_ids, labels, classes = [], [], []
    missing = 0
    for patient_id, rsna_class in zip(per_patient["patientId"].tolist(), per_patient["class"].tolist()):
        label = RSNA_CLASS_LABELS.get(rsna_class)
        if label is None:
            table.exclude(f"RSNA class not used: {rsna_class}", 1)
        elif patient_id not in present:
            missing += 1
        else:
            patient_ids.append(patient_id)
            labels.append(label)
            classes.append(rsna_class)
    if missing:
        where = images if images.is_dir() else f"{images} (folder not found)"
        table.problems.append((str(where), f"{missing} labelled patientIds have no DICOM file"))
    unknown = [None] * len(patient_ids)  # sex, age and view come from each DICOM header
    table.rows = _finish({
        "path": [str(images / f"{p}.dcm") for p in patient_ids], "label": labels,
        "patient_id": [f"rsna:{p}" for p in patient_ids], "view": unknown, "sex": unknown, "age": unknown,
        "finding": classes, "modality": unknown, "source_split": unknown, "image_id": patient_ids,
    }, "rsna")
    return table


# The NORMAL2- prefix is ignored: IM-0696-... and NORMAL2-IM-0696-... count as one patient
# (the conservative choice: a wrong merge costs a little data, a wrong split leaks a patient).
_KAGGLE_NORMAL = re.compile(r"^(?:NORMAL2-)?(IM-\d+)", re.IGNORECASE)
_KAGGLE_PNEUMONIA = re.compile(r"^(person\d+)_(bacteria|virus)", re.IGNORECASE)


def kaggle_patient(filename: str, label: str) -> tuple[str | None, str | None]:
    """(patient id, finding) from a Kaggle file name; (None, None) when the name does not follow the scheme."""
    if label == "normal":
        match = _KAGGLE_NORMAL.match(filename)
        return (match.group(1), "NORMAL") if match else (None, None)
    match = _KAGGLE_PNEUMONIA.match(filename)
    return (match.group(1), f"PNEUMONIA ({match.group(2).lower()})") if match else (None, None)


def read_chest_xray_pneumonia(root: str | os.PathLike) -> SourceTable:
    """Kaggle chest-xray-pneumonia: ``chest_xray/{train,test,val}/{NORMAL,PNEUMONIA}/*.jpeg``.

    ``root`` may be the folder holding ``chest_xray/`` or ``chest_xray/`` itself; a missing split
    folder (``val/`` is often absent) is fine. Kaggle's own split is kept in ``source_split``.
    """
    root = Path(root)
    _require_dir(root, "chest-xray-pneumonia: expected chest_xray/{train,test,val}/{NORMAL,PNEUMONIA}")
    base = root / "chest_xray" if (root / "chest_xray").is_dir() else root
    split_dirs = [base / s for s in ("train", "test", "val") if (base / s).is_dir()]
    if not split_dirs:
        raise SourceError(f"{base}: no train/, test/ or val/ folder (expected chest_xray/{{train,test,val}}/{{NORMAL,PNEUMONIA}})")
    table = SourceTable("kaggle", pd.DataFrame(columns=SOURCE_COLUMNS))
    rows = []
    for split_dir in split_dirs:
        for class_name, label in (("NORMAL", "normal"), ("PNEUMONIA", "pneumonia")):
            class_dir = split_dir / class_name
            if not class_dir.is_dir():
                continue
            for path in sorted(class_dir.iterdir()):
                if path.name.startswith(".") or not path.is_file():
                    continue
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    table.problems.append((str(path), "not an image file name (.png/.jpg/.jpeg/.dcm)"))
                    continue
                patient, finding = kaggle_patient(path.name, label)
                if patient is None:
                    # Still usable: one patient per unrecognised file, said so in the report.
                    patient, finding = path.stem, class_name
                rows.append({
                    "path": str(path), "label": label, "patient_id": f"kaggle:{patient}", "view": None,
                    "sex": None, "age": None, "finding": finding, "modality": "X-ray",
                    "source_split": split_dir.name, "image_id": path.name,
                })
    table.rows = _finish(rows, "kaggle")
    return table


def nih_label(finding_labels: object) -> str | None:
    """Label of an NIH ``Finding Labels`` value: "normal" for "No Finding", "pneumonia" if listed, else None."""
    if not isinstance(finding_labels, str):
        return None
    parts = {p.strip().lower() for p in finding_labels.split("|")}
    if parts == {"no finding"}:
        return "normal"
    if "pneumonia" in parts:
        return "pneumonia"
    return None


def read_nih_chestxray14(root: str | os.PathLike) -> SourceTable:
    """NIH ChestX-ray14: ``Data_Entry_2017.csv`` + ``images/*.png`` (adult normals: the fair comparison)."""
    root = Path(root)
    _require_dir(root, "NIH ChestX-ray14: expected Data_Entry_2017.csv and images/")
    entries = _read_csv(root / "Data_Entry_2017.csv", "NIH data entry",
                        ("Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position"))
    table = SourceTable("nih", pd.DataFrame(columns=SOURCE_COLUMNS))
    rows = []
    for record in entries.to_dict("records"):
        label = nih_label(record["Finding Labels"])
        if label is None:
            table.exclude("NIH finding not used", 1)
            continue
        path = root / "images" / record["Image Index"]
        if not path.is_file():
            table.exclude("NIH row without image file (subset on disk)", 1)
            continue
        rows.append({
            "path": str(path), "label": label, "patient_id": f"nih:{record['Patient ID']}",
            "view": normalise_view(record["View Position"]), "sex": record["Patient Gender"],
            "age": parse_age(record["Patient Age"]), "finding": record["Finding Labels"], "modality": "X-ray",
            "source_split": None, "image_id": record["Image Index"],
        })
    table.rows = _finish(rows, "nih")
    return table


# ---- the registry -------------------------------------------------------------------------

#: Under this age (years) a patient is a child.
ADULT_AGE = 18.0

#: ``(folder, rng, n_patients, image_size, marked_label) -> counts``: writes a source's layout of
#: the built-in sample data into ``folder`` (see :mod:`xraylib.sample_layouts`).
SampleWriter = Callable[[Path, np.random.Generator, int, int, str | None], dict]


@dataclass(frozen=True)
class Source:
    """One public source: everything xraylib knows about it, read by every module that needs it.

    ``name``: the manifest's ``source`` value (and its patient-id prefix). ``drive_key``: its key
    in drive_paths.yaml, a :class:`~xraylib.config.DrivePaths` field. ``folder``: its folder name
    in the built-in sample data and in ``../shared/data``. ``reader``: root folder ->
    :class:`SourceTable`. ``notes``: what a reader of a result should know about its patients
    (the audit and the model card print it). ``site``: its hospital group for the shortcut tests;
    sources of one hospital share a site, so holding one out or telling them apart tests nothing.
    ``population_ages``: the documented (low, high) age range in years where the files carry no
    per-image age, else None. ``sample_writer``: writes its layout in the built-in sample data,
    None where there is none.
    """

    name: str
    drive_key: str
    folder: str
    reader: Callable[[str | os.PathLike], SourceTable]
    notes: str
    site: str
    population_ages: tuple[float, float] | None = None
    sample_writer: SampleWriter | None = None

    @property
    def children(self) -> bool:
        """True when the documented population is children only (all under :data:`ADULT_AGE`)."""
        return self.population_ages is not None and self.population_ages[1] < ADULT_AGE


#: The sources, in the order the manifest lists them. Sample-data streams follow this order among
#: the sources with a ``sample_writer``: add new sources at the end.
SOURCES: tuple[Source, ...] = (
    Source(
        name="ieee8023", drive_key="covid_chestxray_dataset", folder="covid-chestxray-dataset",
        reader=read_covid_chestxray, site="ieee8023", sample_writer=write_ieee8023_sample,
        notes="ieee8023 covid-chestxray-dataset: adults, many hospitals, includes figures from papers",
    ),
    Source(
        # RSNA's images are drawn from NIH ChestX-ray14: one hospital with NIH.
        name="rsna", drive_key="rsna_pneumonia", folder="rsna-pneumonia",
        reader=read_rsna, site="nih+rsna", sample_writer=write_rsna_sample,
        notes="RSNA Pneumonia Detection Challenge: adults, NIH ChestX-ray14 images (one hospital)",
    ),
    Source(
        # Kermany et al., Cell 2018: "pediatric patients of one to five years old" from Guangzhou
        # Women and Children's Medical Center; the files carry no ages.
        name="kaggle", drive_key="chest_xray_pneumonia", folder="chest-xray-pneumonia",
        reader=read_chest_xray_pneumonia, site="kaggle", population_ages=(1.0, 5.0),
        sample_writer=write_kaggle_sample,
        notes="Kaggle chest-xray-pneumonia (Kermany 2018): children aged 1 to 5, one hospital in Guangzhou",
    ),
    Source(
        name="nih", drive_key="nih_chestxray14", folder="nih-chestxray14",
        reader=read_nih_chestxray14, site="nih+rsna",
        notes="NIH ChestX-ray14: adults, NIH Clinical Center (the same hospital source as RSNA)",
    ),
)


def source_by_name(name: str) -> Source | None:
    """The record whose manifest ``source`` value is ``name``; None for any other name (your own images)."""
    return next((source for source in SOURCES if source.name == name), None)


def source_by_drive_key(key: str) -> Source | None:
    """The record of drive_paths.yaml key ``key``; None for an unknown key."""
    return next((source for source in SOURCES if source.drive_key == key), None)


def source_notes() -> dict[str, str]:
    """``{name: notes}`` of every source, in registry order."""
    return {source.name: source.notes for source in SOURCES}


def source_populations() -> dict[str, tuple[float, float]]:
    """``{name: (low, high) years}`` of the sources whose population is documented instead of per-image ages."""
    return {source.name: source.population_ages for source in SOURCES if source.population_ages is not None}


def site_groups() -> dict[str, str]:
    """``{name: site}``, by name, of the sources whose site is not their own name (``{"nih": "nih+rsna", ...}``)."""
    return {source.name: source.site for source in sorted(SOURCES, key=lambda s: s.name) if source.site != source.name}


#: ``{name: notes}``: a view of :data:`SOURCES`, kept for the callers that read it.
SOURCE_NOTES: dict[str, str] = source_notes()
