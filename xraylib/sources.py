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

Every row also has a ``site``: where the image was made, as far as the data say. A source from
one hospital gives all its rows its record's ``site`` (``"kaggle"``, ``"nih+rsna"`` for NIH and
RSNA, ``"nlm-shenzhen"``, ``"nlm-montgomery"``). ieee8023 is a collection of many hospitals and
papers: :func:`ieee8023_site` derives each row's site from its ``location``, ``doi`` and ``url``:

* a ``location`` in the committed table ``xraylib/data/ieee8023_sites.csv`` takes the table's
  site, ``ieee8023:COUNTRY[/CITY[/INSTITUTION]]``: the institution where the location names one,
  else the city (or region), else the country alone. Spellings of one place share a site
  ("Riccione, Italy" with a trailing space, the ``\ufffd`` that a cp1252 byte becomes). A bare
  country ("Italy") is one site, ``ieee8023:italy``: the data do not say which hospital, so it may
  share hospitals with that country's named sites ("Brescia, Italy" is ``ieee8023:italy/brescia``);
  group by the part before the first ``/`` to hold out whole countries.
* a ``location`` not in the table: its comma-separated parts, country first, as above
  ("Lyon, France" -> ``ieee8023:france/lyon``).
* no ``location``: the publication, ``ieee8023:doi:DOI`` (one paper's cases mostly come from one
  hospital), else the web site that shared the case, ``ieee8023:url:HOST`` (a collection such as
  radiopaedia.org is one site: its hospitals cannot be told apart), else ``ieee8023:unknown``.
* a patient with rows at two sites (the real file reuses patientid 197 for cases from Pamplona
  and Milan) takes the site of most of their rows, the first in the file on a tie: a patient is
  never split, so a split by patient stays a split by site.

:func:`fill_site` gives old manifests and caches, made before the ``site`` column, their sites.
"""
from __future__ import annotations

import csv
import functools
import os
import re
import unicodedata
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import numpy as np
import pandas as pd

from .dicom import parse_age
from .errors import SourceError
from .sample_layouts import (
    write_ieee8023_sample, write_kaggle_sample, write_nlm_montgomery_sample, write_nlm_shenzhen_sample, write_rsna_sample,
)

LABELS = ("normal", "covid", "pneumonia")

#: Columns every source reader returns (the manifest adds file facts such as size and hash).
SOURCE_COLUMNS = [
    "path", "label", "source", "site", "patient_id", "view", "sex", "age", "finding", "modality",
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
    encoding = _csv_encoding(path, what)
    try:
        with warnings.catch_warnings():
            # index_col=False: a first row with a field too many must not make column 1 the index (every column
            # would shift by one); pandas then drops the extra field with a ParserWarning, made an error here.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            # utf-8-sig drops a BOM; the real metadata.csv has a few cp1252 bytes in free-text columns.
            frame = pd.read_csv(path, dtype=str, encoding=encoding, encoding_errors="replace", keep_default_na=False,
                                index_col=False)
    except pd.errors.ParserWarning:
        raise SourceError(_too_many_fields(path, encoding, what)) from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeError) as exc:
        detail = " ".join(str(exc).split())  # pandas' tokenizer messages end in a newline; errors are one line
        if fields := re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", detail):
            header, line, saw = fields.groups()
            raise SourceError(f"{path}: line {line} has {saw} fields, the header has {header} ({what}); "
                              "a value with a comma needs quotes: fix that line") from None
        raise SourceError(f"{path}: cannot be read as CSV ({detail})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    # "patientid" and "patientid " are two columns to pandas but one once stripped: the later would win silently.
    # Two exact "finding" columns pandas renames "finding", "finding.1": the same mistake.
    mangled = {re.sub(r"\.\d+$", "", c) for c in frame.columns if re.fullmatch(r".+\.\d+", c)}
    twice = sorted({c for c in required if list(frame.columns).count(c) > 1 or (c in mangled and c in frame.columns)})
    if twice:
        raise SourceError(f"{path}: column(s) {twice} appear more than once ({what}); keep one of each")
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise SourceError(f"{path}: missing column(s) {missing} ({what}); found {list(frame.columns)[:12]}")
    return frame.replace({"": np.nan})


def _csv_encoding(path: Path, what: str) -> str:
    """The encoding to read a label table in: UTF-8 (a BOM dropped), or UTF-16/32 as its byte-order mark (or,
    for UTF-16 without one, its NUL bytes) says: Excel and Notepad save "Unicode" text so. Other NUL bytes
    (not a text file) are refused, naming the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as exc:
        raise SourceError(f"{path}: cannot be read ({exc.strerror or exc}) ({what})") from None
    if head.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        return "utf-32"
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    if b"\x00" not in head:
        return "utf-8-sig"
    pairs = head[:len(head) // 2 * 2]
    even, odd = pairs[0::2], pairs[1::2]
    if even and odd.count(0) > 0.9 * len(odd) and even.count(0) < 0.1 * len(even):
        return "utf-16-le"
    if even and even.count(0) > 0.9 * len(even) and odd.count(0) < 0.1 * len(odd):
        return "utf-16-be"
    raise SourceError(f"{path}: cannot be read as CSV (it holds NUL bytes: not a text file, or UTF-32 without a "
                      f"byte-order mark) ({what}); save it as CSV in UTF-8")


def _too_many_fields(path: Path, encoding: str, what: str) -> str:
    """The message for a row with more fields than the header (pandas' ParserWarning does not say which)."""
    with open(path, encoding=encoding, errors="replace", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        for record in reader:
            if len(record) > len(header):
                return (f"{path}: line {reader.line_num} has {len(record)} fields, the header has {len(header)} "
                        f"({what}); a value with a comma needs quotes: fix that line")
    return f"{path}: cannot be read as CSV (a row has more fields than the header) ({what})"


def _inside(root: Path, *parts: str) -> Path | None:
    """``root / parts``, or None when the parts leave ``root`` (``..``, an absolute path): a label table names
    files of its own folder only, and nothing outside it is ever opened. Checked on the names as written
    (not through symbolic links, which the folder's owner may have made on purpose)."""
    relative = os.path.normpath(os.path.join(*parts))
    if os.path.isabs(relative) or relative == os.pardir or relative.startswith(os.pardir + os.sep):
        return None
    return root.joinpath(*parts)


def _finish(rows: list[dict] | dict[str, list], source: str) -> pd.DataFrame:
    """The reader's rows (a dict per row, or a list per column) as a SOURCE_COLUMNS frame; ``site`` filled where unset."""
    frame = pd.DataFrame(rows, columns=SOURCE_COLUMNS)
    frame["source"] = source
    frame["age"] = pd.to_numeric(frame["age"], errors="coerce")
    return fill_site(frame)


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
    for number, record in enumerate(meta.to_dict("records"), start=1):
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
        path = _inside(root, folder, filename)
        if path is None:
            table.problems.append((str(root / folder / filename),
                                   f"row {number} of metadata.csv names a file outside {root} (folder {folder!r}, "
                                   f"filename {filename!r}); row left out, the file not read"))
            continue
        if not path.is_file():
            table.problems.append((str(path), "image file named in metadata.csv is missing"))
            continue
        age = record.get("age")
        rows.append({
            "path": str(path),
            "label": label,
            "site": ieee8023_site(record.get("location"), record.get("doi"), record.get("url")),
            "patient_id": f"ieee8023:{record['patientid']}",
            "view": normalise_view(record.get("view")),
            "sex": record.get("sex") if record.get("sex") in ("M", "F") else None,
            "age": age,
            "finding": record.get("finding"),
            "modality": record.get("modality"),
            "source_split": None,
            "image_id": filename,
        })
    table.rows = _finish(_one_site_per_patient(rows), "ieee8023")
    return table


# ---- ieee8023 sites ---------------------------------------------------------------------------

#: The committed table of ieee8023 ``location`` strings and their sites (package data).
IEEE8023_SITES_FILE = "data/ieee8023_sites.csv"
#: The site of an ieee8023 row with no location, doi or url.
IEEE8023_UNKNOWN_SITE = "ieee8023:unknown"


def _location_key(location: object) -> str:
    """How a location is looked up: whitespace collapsed, no space before a comma, case folded."""
    if not isinstance(location, str):
        return ""
    return " ".join(location.split()).replace(" ,", ",").casefold()


def _slug(text: str) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")


@functools.cache
def ieee8023_site_table() -> dict[str, str]:
    """``{location key: site}`` from ``xraylib/data/ieee8023_sites.csv`` (columns location, site, country, city, institution)."""
    text = resources.files("xraylib").joinpath(IEEE8023_SITES_FILE).read_text(encoding="utf-8")
    return {_location_key(row["location"]): row["site"] for row in csv.DictReader(text.splitlines())}


def ieee8023_site(location: object, doi: object = None, url: object = None) -> str:
    """The site of an ieee8023 row: its location's (table, else its parts), else its doi's or url's; see the module doc."""
    key = _location_key(location)
    if key:
        known = ieee8023_site_table().get(key)
        if known is not None:
            return known
        parts = [_slug(part) for part in reversed(key.replace(".", ",").split(","))]
        return "ieee8023:" + "/".join(part for part in parts if part)
    if isinstance(doi, str) and doi.strip():
        return f"ieee8023:doi:{doi.strip().lower()}"
    host = urlparse(url.strip()).netloc.lower() if isinstance(url, str) else ""
    host = host[4:] if host.startswith("www.") else host
    return f"ieee8023:url:{host}" if host else IEEE8023_UNKNOWN_SITE


def _one_site_per_patient(rows: list[dict]) -> list[dict]:
    """Each patient's rows at the site of most of them (the first in the file on a tie)."""
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        sites = counts.setdefault(row["patient_id"], {})
        sites[row["site"]] = sites.get(row["site"], 0) + 1
    chosen = {patient: max(sites, key=sites.__getitem__) for patient, sites in counts.items()}  # max keeps the first
    return [{**row, "site": chosen[row["patient_id"]]} for row in rows]


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
    """NIH ChestX-ray14: ``Data_Entry_2017.csv`` + ``images/*.png`` (adult normals: the fair comparison).

    The images may also lie as Kaggle's copy of the set has them, ``images_001/images/`` to ``images_012/images/``.
    Each folder is listed once, not each of the 112,120 files looked up: on a Drive folder a lookup costs a round
    trip. Column by column, not a dict per row.
    """
    root = Path(root)
    _require_dir(root, "NIH ChestX-ray14: expected Data_Entry_2017.csv and images/ (or Kaggle's images_001/images/, ...)")
    entries = _read_csv(root / "Data_Entry_2017.csv", "NIH data entry",
                        ("Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position"))
    table = SourceTable("nih", pd.DataFrame(columns=SOURCE_COLUMNS))
    images = root / "images"
    # name -> the folder holding it ("images/" first, then Kaggle's "images_NNN/images/" in order)
    present: dict[str, str] = {}
    for folder in [images] + sorted(root.glob("images_*/images")):
        prefix = os.path.join(folder, "")
        for file_name in _file_names(folder):
            present.setdefault(file_name, prefix)
    columns: dict[str, list] = {name: [] for name in ("path", "label", "patient_id", "view", "sex", "age", "finding",
                                                      "image_id")}
    for name, findings, patient, age, sex, view in zip(*(entries[c].tolist() for c in (
            "Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position"))):
        label = nih_label(findings)
        if label is None:
            table.exclude("NIH finding not used", 1)
            continue
        if not isinstance(name, str):
            table.exclude("NIH row without Image Index", 1)
            continue
        if _plain_name(name):
            exists = name in present
            path = present[name] + name if exists else None
        else:  # a name with a folder in it: checked to stay inside, then looked up
            path = _inside(root, "images", name)
            if path is None:
                table.problems.append((str(images / name), f"Image Index in Data_Entry_2017.csv names a file "
                                                           f"outside {root}; row left out, the file not read"))
                continue
            exists = path.is_file()
        if not exists:
            table.exclude("NIH row without image file (subset on disk)", 1)
            continue
        for column, value in (("path", str(path)), ("label", label), ("patient_id", f"nih:{patient}"),
                              ("view", normalise_view(view)), ("sex", sex), ("age", parse_age(age)),
                              ("finding", findings), ("image_id", name)):
            columns[column].append(value)
    unset = [None] * len(columns["path"])
    table.rows = _finish({**columns, "modality": ["X-ray"] * len(unset), "source_split": unset}, "nih")
    return table


def _file_names(folder: Path) -> set[str]:
    """The names in ``folder`` (one listing, no lookup per name: a FUSE mount such as Drive's may give no file
    types, and telling them would cost a round trip each; a folder listed here is reported when read); empty when
    ``folder`` is not a folder."""
    try:
        return set(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return set()


def _plain_name(name: str) -> bool:
    """Whether ``name`` is a file name alone (no folder, not ``.`` or ``..``): it names a file of its folder."""
    return not any(sep in name for sep in (os.sep, os.altsep) if sep) and name not in (os.curdir, os.pardir, "")


# ---- NLM tuberculosis sets (Shenzhen, Montgomery) -------------------------------------------


@dataclass(frozen=True)
class NlmSet:
    """One NLM tuberculosis set as its download unpacks: ``SET_FOLDER/CXR_png/PREFIX_NNNN_L.png``
    (L: 0 normal, 1 tuberculosis) and ``SET_FOLDER/ClinicalReadings/PREFIX_NNNN_L.txt``."""

    source: str
    set_folder: str
    prefix: str


NLM_SHENZHEN = NlmSet("nlm-shenzhen", "ChinaSet_AllFiles", "CHNCXR")
NLM_MONTGOMERY = NlmSet("nlm-montgomery", "MontgomerySet", "MCUCXR")
#: The label of each file-name suffix; tuberculosis (1) is no class of xraylib's tasks and is counted, not kept.
NLM_LABELS = {"0": "normal", "1": "tuberculosis"}
# Windows and macOS leave these in the unpacked folders; they are not images and not problems.
_SYSTEM_FILES = {"thumbs.db", "desktop.ini", ".ds_store"}

# Shenzhen's first line: "male 45yrs", "Male 35Y", "female 62yrs", "male 8month"; Montgomery's lines:
# "Patient's Sex: M", "Patient's Age: 040Y".
_SHENZHEN_READING = re.compile(r"^\s*(?P<sex>male|female|m|f)(?![a-z])[\s,]*(?P<age>\d+(?:\.\d+)?)\s*(?P<unit>[a-z]*)", re.IGNORECASE)
_MONTGOMERY_FIELD = re.compile(r"^\s*patient'?s\s+(?P<field>sex|age)\s*:\s*(?P<value>\S*)", re.IGNORECASE)


def nlm_clinical_reading(text: str) -> tuple[str | None, float | None, str | None]:
    """(sex "M"/"F", age in years, finding) from a ClinicalReadings file of either set; None where absent."""
    sex = age = None
    finding_lines = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if field_match := _MONTGOMERY_FIELD.match(line):
            value = field_match.group("value")
            if field_match.group("field").lower() == "sex":
                sex = value[:1].upper() if value[:1].upper() in ("M", "F") else None
            else:
                age = parse_age(value)
        elif sex is None and age is None and not finding_lines and (reading := _SHENZHEN_READING.match(line)):
            sex = reading.group("sex")[0].upper()
            number = float(reading.group("age"))
            age = number / 12 if reading.group("unit").lower().startswith("mon") else number
            age = age if 0 <= age < 130 else None
        else:
            finding_lines.append(line.strip())
    return sex, age, " ".join(finding_lines) or None


def _nlm_base(root: Path, nlm: NlmSet) -> Path:
    """The set folder: ``root`` itself, or ``root/SET_FOLDER`` (the folder the NLM download unpacks into)."""
    for base in (root / nlm.set_folder, root):
        if (base / "CXR_png").is_dir():
            return base
    raise SourceError(f"{root}: no {nlm.set_folder}/CXR_png/ or CXR_png/ folder ({nlm.source}: expected "
                      f"{nlm.set_folder}/CXR_png/{nlm.prefix}_NNNN_L.png as the NLM download unpacks); "
                      "point its drive_paths.yaml key at the folder that holds it")


def _read_nlm(root: str | os.PathLike, nlm: NlmSet) -> SourceTable:
    root = Path(root)
    _require_dir(root, f"{nlm.source}: expected {nlm.set_folder}/CXR_png/")
    base = _nlm_base(root, nlm)
    name_pattern = re.compile(rf"^{nlm.prefix}_(\d+)_([01])\.png$", re.IGNORECASE)
    readings = base / "ClinicalReadings"
    table = SourceTable(nlm.source, pd.DataFrame(columns=SOURCE_COLUMNS))
    rows = []
    for path in sorted((base / "CXR_png").iterdir()):
        if path.name.startswith(".") or path.name.lower() in _SYSTEM_FILES or not path.is_file():
            continue
        match = name_pattern.match(path.name)
        if match is None:
            table.problems.append((str(path), f"file name is not {nlm.prefix}_NNNN_L.png (L: 0 normal, 1 tuberculosis)"))
            continue
        number, suffix = match.groups()
        label = NLM_LABELS[suffix]
        if label != "normal":
            table.exclude(f"{label} (file name ends _{suffix}): not a class of xraylib's tasks", 1)
            continue
        sex = age = finding = None
        reading = readings / f"{path.stem}.txt"
        if reading.is_file():
            try:
                sex, age, finding = nlm_clinical_reading(reading.read_text(encoding="utf-8", errors="replace"))
            except OSError as exc:
                table.problems.append((str(reading), f"clinical reading cannot be read ({exc.strerror or exc}); "
                                                     "the image is kept without sex and age"))
        rows.append({
            "path": str(path), "label": label, "patient_id": f"{nlm.source}:{number}", "view": "PA",
            "sex": sex, "age": age, "finding": finding or label, "modality": "X-ray", "source_split": None,
            "image_id": path.name,
        })
    table.rows = _finish(rows, nlm.source)
    return table


def read_nlm_shenzhen(root: str | os.PathLike) -> SourceTable:
    """NLM Shenzhen set: ``ChinaSet_AllFiles/CXR_png/CHNCXR_NNNN_L.png`` (``root`` holds ``ChinaSet_AllFiles/`` or is it).

    Normals (L = 0) are kept, PA, patient NNNN; tuberculosis films (L = 1) are counted and left out;
    sex and age from ``ClinicalReadings/CHNCXR_NNNN_L.txt`` where present ("male 45yrs").
    A file name not in that form is reported and skipped.
    """
    return _read_nlm(root, NLM_SHENZHEN)


def read_nlm_montgomery(root: str | os.PathLike) -> SourceTable:
    """NLM Montgomery County set: ``MontgomerySet/CXR_png/MCUCXR_NNNN_L.png``, as :func:`read_nlm_shenzhen`.

    Sex and age from ``ClinicalReadings/MCUCXR_NNNN_L.txt`` ("Patient's Sex: M", "Patient's Age: 040Y").
    """
    return _read_nlm(root, NLM_MONTGOMERY)


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
    in drive_paths.yaml, a :class:`~xraylib.config.DrivePaths` field. ``folder``: its folder (a
    relative path) in the built-in sample data and in ``../shared/data``. ``reader``: root folder ->
    :class:`SourceTable`. ``notes``: what a reader of a result should know about its patients
    (the audit and the model card print it). ``site``: its hospital group for the shortcut tests;
    sources of one hospital share a site, so holding one out or telling them apart tests nothing.
    It is also the manifest's ``site`` of every row of a one-hospital source; a collection of many
    hospitals (ieee8023) gives each row a site of its own under it (``"ieee8023:italy/brescia"``).
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
    Source(
        # Jaeger et al., Quant Imaging Med Surg 2014. One key per set: both may name the folder that holds the two sets.
        name="nlm-shenzhen", drive_key="nlm_shenzhen", folder="nlm-tb/ChinaSet_AllFiles",
        reader=read_nlm_shenzhen, site="nlm-shenzhen", sample_writer=write_nlm_shenzhen_sample,
        notes="NLM Shenzhen tuberculosis set: mostly adults, Shenzhen No. 3 People's Hospital, China (one hospital); "
              "normals only (tuberculosis films left out)",
    ),
    Source(
        name="nlm-montgomery", drive_key="nlm_montgomery", folder="nlm-tb/MontgomerySet",
        reader=read_nlm_montgomery, site="nlm-montgomery", sample_writer=write_nlm_montgomery_sample,
        notes="NLM Montgomery County tuberculosis set: adults, Montgomery County, Maryland, USA (one hospital); "
              "normals only (tuberculosis films left out)",
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


def fill_site(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with ``site`` set where it is missing: for manifests and caches made before the column.

    A row of a one-hospital source takes its record's ``site``; an ieee8023 row takes
    :func:`ieee8023_site` of its ``location``, ``doi`` and ``url`` columns where the frame has them,
    else of the ``metadata.csv`` its image sits under (read once per folder; a patient keeps one site),
    else :data:`IEEE8023_UNKNOWN_SITE`; a row of any other source (your own images) takes its source name.
    Returns a new frame with ``site`` right after ``source``; a frame with every site set comes back as it is.
    """
    if "site" in frame.columns and frame["site"].notna().all():
        return frame
    out = frame.copy()
    names = out["source"].astype(str).tolist()
    site = [s if isinstance(s, str) and s else None for s in out["site"]] if "site" in out.columns else [None] * len(out)
    ieee = [i for i, (name, value) in enumerate(zip(names, site)) if value is None and name == "ieee8023"]
    if ieee:
        for i, value in zip(ieee, _ieee8023_sites_of(out.iloc[ieee])):
            site[i] = value
    site = [value if value is not None else getattr(source_by_name(name), "site", name) for name, value in zip(names, site)]
    if "site" in out.columns:
        out["site"] = pd.Series(site, index=out.index, dtype=object)
    else:
        out.insert(list(out.columns).index("source") + 1, "site", pd.Series(site, index=out.index, dtype=object))
    return out


def _ieee8023_sites_of(rows: pd.DataFrame) -> list[str]:
    """Sites of ieee8023 rows without one: from their own location/doi/url columns, else their metadata.csv."""
    if {"location", "doi", "url"} & set(rows.columns):
        return [ieee8023_site(*(row.get(c) for c in ("location", "doi", "url"))) for row in rows.to_dict("records")]
    found: dict[str, str] = {}
    for metadata_root in sorted({Path(str(path)).parent.parent for path in rows["path"]}):
        try:
            table = read_covid_chestxray(metadata_root)
        except SourceError:
            continue
        found.update(zip(table.rows["path"], table.rows["site"]))
    return [found.get(str(path), IEEE8023_UNKNOWN_SITE) for path in rows["path"]]


#: ``{name: notes}``: a view of :data:`SOURCES`, kept for the callers that read it.
SOURCE_NOTES: dict[str, str] = source_notes()
