"""Source readers on folders written in the real layouts (ieee8023, RSNA, Kaggle, NIH, the NLM sets), and sites.

The builders at the top write each source the way users keep it on Drive: the real CSV headers,
real-style file names, PNG/JPEG images written with OpenCV and DICOMs written with pydicom.
test_manifest.py and test_preprocess.py reuse them.
"""
from __future__ import annotations

import csv
import fnmatch
import io
import tomllib
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest

from conftest import gradient_image, write_dicom, write_raster
from xraylib.errors import SourceError
from xraylib.manifest import build_manifest, load_manifest
from xraylib.sources import (
    IEEE8023_REQUIRED, IEEE8023_SITES_FILE, IEEE8023_UNKNOWN_SITE, SOURCE_COLUMNS, SOURCES, fill_site, ieee8023_label,
    ieee8023_site, ieee8023_site_table, kaggle_patient, nih_label, nlm_clinical_reading, normalise_view,
    read_chest_xray_pneumonia, read_covid_chestxray, read_nih_chestxray14, read_nlm_montgomery, read_nlm_shenzhen,
    read_rsna, read_rsna_labels,
)

# write_dicom stores RSNA's plain ages ("43"), which pydicom warns about when writing; the real files do the same.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR AS")

# The header lines of the real files, copied verbatim (ieee8023: 28 names and an empty 29th column;
# NIH's bracketed names contain commas, so pandas sees 11 columns, as in the real file).
IEEE8023_HEADER = (
    "patientid,offset,sex,age,finding,survival,intubated,intubation_present,went_icu,in_icu,"
    "needed_supplemental_O2,extubated,temperature,pO2_saturation,leukocyte_count,neutrophil_count,"
    "lymphocyte_count,view,modality,date,location,folder,filename,doi,url,license,clinical_notes,"
    "other_notes,"
)
NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
RSNA_LABELS_HEADER = "patientId,x,y,width,height,Target"
RSNA_CLASS_HEADER = "patientId,class"


def image_pixels(name: str, height: int = 72, width: int = 64):
    """Distinct pixels per file name, so no two test files share bytes by accident."""
    return gradient_image(height, width, seed=zlib.crc32(name.encode()))


# --------------------------------------------------------------------------------------------
# ieee8023 covid-chestxray-dataset


@dataclass
class IeeeRow:
    patientid: str
    finding: str
    view: str
    filename: str
    modality: str = "X-ray"
    sex: str = "M"
    age: str = "65"
    folder: str = "images"
    clinical_notes: str = ""
    write_image: bool = True
    size: tuple[int, int] = (72, 64)


DEFAULT_IEEE_ROWS = [
    IeeeRow("1", "COVID-19", "PA", "covid-1-pa.png", sex="F", age="71"),
    IeeeRow("1", "COVID-19", "AP Supine", "covid-1-day3-ap-supine.jpg", sex="F", age="71"),
    IeeeRow("2", "COVID-19, ARDS", "AP", "covid-2-ap.jpeg", sex="M", age=""),
    IeeeRow("3", "Pneumonia/Viral/COVID-19", "L", "covid-3-l.png", sex=""),
    IeeeRow("4", "No Finding", "PA", "normal-4-pa.png", age="38"),
    IeeeRow("5", "Streptococcus", "PA", "strep-5-pa.jpg"),
    IeeeRow("6", "SARS", "AP", "sars-6-ap.png"),
    IeeeRow("7", "ARDS", "PA", "ards-7-pa.png"),
    IeeeRow("8", "Tuberculosis", "PA", "tb-8-pa.png"),
    IeeeRow("9", "COVID-19", "Axial", "covid-9-ct.png", modality="CT"),
]


def write_metadata_csv(path: Path, rows: list[IeeeRow], *, bom: bool = False, crlf: bool = False,
                       encoding: str = "utf-8", extra_columns: dict[str, str] | None = None,
                       drop_columns: tuple[str, ...] = ()) -> Path:
    """ieee8023 metadata.csv with the real 29 columns plus the trailing empty one."""
    columns = IEEE8023_HEADER.split(",")  # 28 names and the empty 29th
    assert len(columns) == 29 and columns[-1] == ""
    extra = extra_columns or {}
    header = [c for c in columns[:-1] if c not in drop_columns] + list(extra) + [""]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n" if crlf else "\n")
    writer.writerow(header)
    for row in rows:
        values = {
            "patientid": row.patientid, "offset": "0", "sex": row.sex, "age": row.age, "finding": row.finding,
            "survival": "Y", "view": row.view, "modality": row.modality, "date": "January 22, 2020",
            "location": "Cho Ray Hospital, Ho Chi Minh City, Vietnam", "folder": row.folder,
            "filename": row.filename, "doi": "10.1056/nejmc2001272", "url": "https://example.org/case",
            "license": "CC BY-NC-SA 4.0", "clinical_notes": row.clinical_notes, **extra,
        }
        writer.writerow([values.get(c, "") for c in header])
    text = buffer.getvalue()
    data = text.encode(encoding)
    if bom:
        data = b"\xef\xbb\xbf" + data
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_ieee8023(root: Path, rows: list[IeeeRow] | None = None, **csv_options) -> Path:
    rows = DEFAULT_IEEE_ROWS if rows is None else rows
    for row in rows:
        if row.write_image:
            write_raster(root / row.folder / row.filename, image_pixels(row.filename, *row.size))
    write_metadata_csv(root / "metadata.csv", rows, **csv_options)
    return root


# --------------------------------------------------------------------------------------------
# RSNA Pneumonia Detection Challenge


@dataclass
class RsnaPatient:
    patient_id: str
    class_name: str
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    write_file: bool = True
    sex: str = "F"
    age: str = "43"
    view: str = "PA"
    modality: str = "CR"
    with_pixels: bool = True


DEFAULT_RSNA = [
    RsnaPatient("00436515-870c-4b36-a041-de91049b9ab4", "Lung Opacity",
                [(264.0, 152.0, 213.0, 379.0), (562.0, 152.0, 256.0, 453.0), (300.0, 500.0, 90.0, 80.0)],
                sex="F", age="58", view="PA"),
    RsnaPatient("00704310-78a8-4b38-8475-49f4573b2dbb", "Lung Opacity", [(323.0, 577.0, 160.0, 104.0)],
                sex="M", age="33", view="AP", modality="DX"),
    RsnaPatient("003d8fa0-6bf1-40ed-b54c-ac657f8495c5", "Normal", sex="M", age="61", view="PA"),
    RsnaPatient("00569f44-917d-4c86-a842-81832af98c30", "Normal", sex="F", age="45", view="AP"),
    RsnaPatient("0004cfab-14fd-4e49-80ba-63a80b6bddd6", "No Lung Opacity / Not Normal", sex="F", age="51"),
    RsnaPatient("00f08de1-517e-4652-a04f-d1dc9ee48593", "Normal", sex="M", age="50", modality="CT"),
]


def make_rsna(root: Path, patients: list[RsnaPatient] | None = None) -> Path:
    """stage_2_train_labels.csv (one row per box), stage_2_detailed_class_info.csv and DICOMs."""
    patients = DEFAULT_RSNA if patients is None else patients
    labels = [RSNA_LABELS_HEADER]
    classes = [RSNA_CLASS_HEADER]
    for patient in patients:
        target = 1 if patient.class_name == "Lung Opacity" else 0
        for box in patient.boxes or [None]:
            coords = ",".join(f"{v:.1f}" for v in box) if box else ",,,"
            labels.append(f"{patient.patient_id},{coords},{target}")
            classes.append(f"{patient.patient_id},{patient.class_name}")
        if patient.write_file:
            write_dicom(root / "stage_2_train_images" / f"{patient.patient_id}.dcm",
                        image_pixels(patient.patient_id, 64, 64), patient_id=patient.patient_id,
                        sex=patient.sex, age=patient.age, view=patient.view, modality=patient.modality,
                        with_pixels=patient.with_pixels)
    root.mkdir(parents=True, exist_ok=True)
    (root / "stage_2_train_labels.csv").write_text("\n".join(labels) + "\n")
    (root / "stage_2_detailed_class_info.csv").write_text("\n".join(classes) + "\n")
    return root


# --------------------------------------------------------------------------------------------
# Kaggle chest-xray-pneumonia (Kermany 2018)

DEFAULT_KAGGLE = {
    "train/NORMAL": ["IM-0115-0001.jpeg", "NORMAL2-IM-0115-0001.jpeg", "IM-0117-0001.jpeg"],
    "train/PNEUMONIA": ["person1_bacteria_1.jpeg", "person1_bacteria_2.jpeg", "person3_virus_15.jpeg"],
    "test/NORMAL": ["IM-0001-0001.jpeg", "NORMAL2-IM-0123-0001.jpeg"],
    "test/PNEUMONIA": ["person100_bacteria_480.jpeg"],
}


def make_kaggle(root: Path, layout: dict[str, list[str]] | None = None) -> Path:
    """``root/chest_xray/{split}/{CLASS}/<name>``; returns ``root`` (the folder holding chest_xray/)."""
    layout = DEFAULT_KAGGLE if layout is None else layout
    for folder, names in layout.items():
        for name in names:
            write_raster(root / "chest_xray" / folder / name, image_pixels(f"{folder}/{name}", 80, 96))
    return root


# --------------------------------------------------------------------------------------------
# NIH ChestX-ray14


@dataclass
class NihRow:
    image: str
    findings: str
    patient: str
    age: str
    sex: str
    view: str
    write_image: bool = True


DEFAULT_NIH = [
    NihRow("00000001_000.png", "No Finding", "1", "58", "M", "PA"),
    NihRow("00000002_000.png", "No Finding", "2", "81", "F", "AP"),
    NihRow("00000003_001.png", "Pneumonia", "3", "45", "M", "PA"),
    NihRow("00000004_000.png", "Infiltration|Pneumonia", "4", "30", "F", "AP"),
    NihRow("00000005_000.png", "Effusion", "5", "66", "M", "PA"),
    NihRow("00000006_000.png", "No Finding", "6", "40", "F", "PA", write_image=False),
]


def make_nih(root: Path, rows: list[NihRow] | None = None) -> Path:
    rows = DEFAULT_NIH if rows is None else rows
    lines = [NIH_HEADER]
    for row in rows:
        lines.append(f"{row.image},{row.findings},0,{row.patient},{row.age},{row.sex},{row.view},2500,2048,0.168,0.168")
        if row.write_image:
            write_raster(root / "images" / row.image, image_pixels(row.image, 64, 64))
    root.mkdir(parents=True, exist_ok=True)
    (root / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    return root


def make_all_sources(base: Path) -> dict[str, Path]:
    """The four sources under ``base`` in the folder names of ../shared/data, as drive_paths.yaml keys."""
    return {
        "covid_chestxray_dataset": make_ieee8023(base / "covid-chestxray-dataset"),
        "rsna_pneumonia": make_rsna(base / "rsna-pneumonia"),
        "chest_xray_pneumonia": make_kaggle(base / "chest-xray-pneumonia"),
        "nih_chestxray14": make_nih(base / "nih-chestxray14"),
    }


def by_image(table) -> pd.DataFrame:
    return table.rows.set_index("image_id")


# ============================================================================================
# Label and view mapping


@pytest.mark.parametrize("finding, label", [
    ("COVID-19", "covid"),
    ("COVID-19, ARDS", "covid"),
    ("Pneumonia/Viral/COVID-19", "covid"),
    ("covid-19 ", "covid"),
    ("No Finding", "normal"),
    ("Streptococcus", "pneumonia"),
    ("SARS", "pneumonia"),
    ("Pneumocystis", "pneumonia"),
    ("Mycoplasma Bacterial Pneumonia", "pneumonia"),
    ("Pneumonia/Bacterial/Klebsiella", "pneumonia"),
    ("E.Coli", "pneumonia"),
    ("ARDS", None),
    ("Tuberculosis", None),
    ("todo", None),
    ("", None),
    (None, None),
    (float("nan"), None),
])
def test_ieee8023_label_mapping(finding, label):
    assert ieee8023_label(finding) == label


@pytest.mark.parametrize("view, expected", [
    ("PA", "PA"), (" pa ", "PA"), ("AP", "AP"), ("AP Supine", "AP Supine"), ("AP supine", "AP Supine"),
    ("AP_Supine", "AP Supine"), ("AP semi erect", "AP"), ("L", "L"), ("Lateral", "L"), ("LL", "L"),
    ("Axial", "Axial"), ("Coronal", "Coronal"), ("", None), (None, None), (float("nan"), None),
])
def test_normalise_view(view, expected):
    assert normalise_view(view) == expected


# ============================================================================================
# ieee8023


def test_ieee8023_rows_labels_patients_and_exclusions(tmp_path):
    table = read_covid_chestxray(make_ieee8023(tmp_path / "covid-chestxray-dataset"))
    rows = by_image(table)
    assert list(table.rows.columns) == SOURCE_COLUMNS
    assert (table.rows["source"] == "ieee8023").all()
    assert rows["label"].to_dict() == {
        "covid-1-pa.png": "covid", "covid-1-day3-ap-supine.jpg": "covid", "covid-2-ap.jpeg": "covid",
        "covid-3-l.png": "covid", "normal-4-pa.png": "normal", "strep-5-pa.jpg": "pneumonia",
        "sars-6-ap.png": "pneumonia", "covid-9-ct.png": "covid",
    }
    assert rows.loc["covid-1-pa.png", "patient_id"] == rows.loc["covid-1-day3-ap-supine.jpg", "patient_id"] == "ieee8023:1"
    assert rows["view"].to_dict()["covid-1-day3-ap-supine.jpg"] == "AP Supine"
    assert rows.loc["covid-3-l.png", "view"] == "L"
    # The reader keeps every modality; the manifest filters CT.
    assert rows.loc["covid-9-ct.png", "modality"] == "CT"
    assert rows.loc["covid-1-pa.png", "sex"] == "F" and pd.isna(rows.loc["covid-3-l.png", "sex"])
    assert rows.loc["covid-1-pa.png", "age"] == 71 and pd.isna(rows.loc["covid-2-ap.jpeg", "age"])
    assert pd.api.types.is_numeric_dtype(table.rows["age"])
    assert Path(rows.loc["normal-4-pa.png", "path"]) == tmp_path / "covid-chestxray-dataset" / "images" / "normal-4-pa.png"
    assert table.excluded == {"finding not used: ARDS": 1, "finding not used: Tuberculosis": 1}
    assert table.problems == []


@pytest.mark.parametrize("variant", [
    {"bom": True},
    {"crlf": True},
    {"encoding": "cp1252"},
    {"extra_columns": {"RT_PCR_positive": "Y", "Unnamed: 30": "x"}},
    {"bom": True, "crlf": True, "encoding": "cp1252", "extra_columns": {"RT_PCR_positive": "Y"}},
], ids=["bom", "crlf", "cp1252", "extra-columns", "all-at-once"])
def test_ieee8023_metadata_variants_read_the_same(tmp_path, variant):
    # cp1252 curly quotes and a comma inside a quoted free-text note, as in the real metadata.csv.
    notes = "He had not been exposed to a \u201cwet market\u201d in Wuhan, he said."
    rows = [IeeeRow(r.patientid, r.finding, r.view, r.filename, modality=r.modality, sex=r.sex, age=r.age,
                    clinical_notes=notes) for r in DEFAULT_IEEE_ROWS]
    plain = read_covid_chestxray(make_ieee8023(tmp_path / "plain", rows))
    other = read_covid_chestxray(make_ieee8023(tmp_path / "variant", rows, **variant))
    raw = (tmp_path / "variant" / "metadata.csv").read_bytes()
    if variant.get("bom"):
        assert raw.startswith(b"\xef\xbb\xbf")
    if variant.get("encoding") == "cp1252":
        assert b"\x93wet market\x94" in raw
    if variant.get("crlf"):
        assert b"\r\n" in raw
    assert len(other.rows) == 8
    assert other.problems == [] and other.excluded == plain.excluded
    columns = [c for c in SOURCE_COLUMNS if c != "path"]
    pd.testing.assert_frame_equal(other.rows[columns], plain.rows[columns])


def test_ieee8023_written_header_is_the_real_one(tmp_path):
    make_ieee8023(tmp_path)
    assert (tmp_path / "metadata.csv").read_text().splitlines()[0] == IEEE8023_HEADER
    frame = pd.read_csv(tmp_path / "metadata.csv", dtype=str)
    assert len(frame.columns) == 29 and frame.columns[-1] == "Unnamed: 28"
    assert set(IEEE8023_REQUIRED) <= set(frame.columns)


@pytest.mark.parametrize("column", ["filename", "finding", "patientid"])
def test_ieee8023_missing_required_column_names_column_and_file(tmp_path, column):
    root = make_ieee8023(tmp_path / "covid", drop_columns=(column,))
    with pytest.raises(SourceError) as error:
        read_covid_chestxray(root)
    assert column in str(error.value)
    assert str(root / "metadata.csv") in str(error.value)


def test_ieee8023_missing_metadata_csv_names_it(tmp_path):
    (tmp_path / "covid" / "images").mkdir(parents=True)
    with pytest.raises(SourceError, match="metadata.csv"):
        read_covid_chestxray(tmp_path / "covid")


def test_ieee8023_missing_image_is_a_problem_not_an_error(tmp_path):
    rows = DEFAULT_IEEE_ROWS + [IeeeRow("10", "COVID-19", "PA", "covid-10-pa.png", write_image=False)]
    table = read_covid_chestxray(make_ieee8023(tmp_path, rows))
    missing = str(tmp_path / "images" / "covid-10-pa.png")
    assert [p for p, _ in table.problems] == [missing]
    assert "missing" in table.problems[0][1]
    assert "covid-10-pa.png" not in set(table.rows["image_id"])
    assert len(table.rows) == 8  # the other rows are all there


def test_ieee8023_folder_column_is_followed(tmp_path):
    rows = [IeeeRow("1", "COVID-19", "PA", "a.png", folder="images"),
            IeeeRow("2", "COVID-19", "PA", "b.png", folder="volumes")]
    table = read_covid_chestxray(make_ieee8023(tmp_path, rows))
    assert sorted(Path(p).parent.name for p in table.rows["path"]) == ["images", "volumes"]


@pytest.mark.parametrize("source", SOURCES, ids=lambda s: s.name)
def test_missing_source_folder_names_the_path(tmp_path, source):
    missing = tmp_path / "not-mounted" / source.drive_key
    with pytest.raises(SourceError) as error:
        source.reader(missing)
    assert str(missing) in str(error.value)


# ============================================================================================
# RSNA


def test_rsna_labels_are_aggregated_per_patient(tmp_path):
    labels = read_rsna_labels(make_rsna(tmp_path))
    assert list(labels.columns) == ["patientId", "class", "target", "n_boxes"]
    assert labels["patientId"].is_unique and len(labels) == len(DEFAULT_RSNA)
    per_patient = labels.set_index("patientId")
    three_boxes = per_patient.loc["00436515-870c-4b36-a041-de91049b9ab4"]
    assert (three_boxes["class"], three_boxes["target"], three_boxes["n_boxes"]) == ("Lung Opacity", 1, 3)
    assert per_patient.loc["00704310-78a8-4b38-8475-49f4573b2dbb", "n_boxes"] == 1
    normal = per_patient.loc["003d8fa0-6bf1-40ed-b54c-ac657f8495c5"]
    assert (normal["class"], normal["target"], normal["n_boxes"]) == ("Normal", 0, 0)


def test_rsna_conflicting_classes_raise(tmp_path):
    root = make_rsna(tmp_path)
    classes = root / "stage_2_detailed_class_info.csv"
    classes.write_text(classes.read_text() + "003d8fa0-6bf1-40ed-b54c-ac657f8495c5,Lung Opacity\n")
    with pytest.raises(SourceError, match="003d8fa0-6bf1-40ed-b54c-ac657f8495c5"):
        read_rsna_labels(root)


def test_rsna_missing_label_file_names_it(tmp_path):
    root = make_rsna(tmp_path)
    (root / "stage_2_detailed_class_info.csv").unlink()
    with pytest.raises(SourceError, match="stage_2_detailed_class_info.csv"):
        read_rsna(root)


def test_rsna_rows_classes_and_missing_files(tmp_path):
    patients = DEFAULT_RSNA + [
        RsnaPatient("0100515c-5204-4f31-98e0-f35e4b00004a", "Normal", write_file=False),
        RsnaPatient("010ccb9f-6d46-4380-af11-84f87397a1b8", "Lung Opacity", [(1.0, 2.0, 3.0, 4.0)] * 2,
                    write_file=False),
        RsnaPatient("01027bc3-dc40-4165-a6c3-d6be2cb7ca34", "No Lung Opacity / Not Normal", write_file=False),
    ]
    table = read_rsna(make_rsna(tmp_path, patients))
    rows = by_image(table)
    assert rows["label"].to_dict() == {
        "00436515-870c-4b36-a041-de91049b9ab4": "pneumonia", "00704310-78a8-4b38-8475-49f4573b2dbb": "pneumonia",
        "003d8fa0-6bf1-40ed-b54c-ac657f8495c5": "normal", "00569f44-917d-4c86-a842-81832af98c30": "normal",
        "00f08de1-517e-4652-a04f-d1dc9ee48593": "normal",
    }
    assert rows.loc["00436515-870c-4b36-a041-de91049b9ab4", "patient_id"] == "rsna:00436515-870c-4b36-a041-de91049b9ab4"
    assert rows["path"].map(lambda p: Path(p).suffix).eq(".dcm").all()
    # "No Lung Opacity / Not Normal" is left out and counted, whether or not its file exists.
    assert table.excluded == {"RSNA class not used: No Lung Opacity / Not Normal": 2}
    # The two labelled patients without a DICOM are counted in one problem, not one per file.
    assert len(table.problems) == 1
    where, reason = table.problems[0]
    assert where == str(tmp_path / "stage_2_train_images") and reason.startswith("2 labelled patientIds")


def test_rsna_without_image_folder_reports_instead_of_crashing(tmp_path):
    root = make_rsna(tmp_path, [RsnaPatient(p.patient_id, p.class_name, p.boxes, write_file=False) for p in DEFAULT_RSNA])
    table = read_rsna(root)
    assert table.rows.empty and list(table.rows.columns) == SOURCE_COLUMNS
    assert len(table.problems) == 1 and "folder not found" in table.problems[0][0]
    assert "5 labelled patientIds" in table.problems[0][1]


# ============================================================================================
# Kaggle chest-xray-pneumonia


@pytest.mark.parametrize("name, label, patient, finding", [
    ("IM-0115-0001.jpeg", "normal", "IM-0115", "NORMAL"),
    ("NORMAL2-IM-0115-0001.jpeg", "normal", "IM-0115", "NORMAL"),
    ("IM-0539-0001-0001.jpeg", "normal", "IM-0539", "NORMAL"),
    ("person1_bacteria_1.jpeg", "pneumonia", "person1", "PNEUMONIA (bacteria)"),
    ("person1_virus_6.jpeg", "pneumonia", "person1", "PNEUMONIA (virus)"),
    ("person1430_bacteria_3696.jpeg", "pneumonia", "person1430", "PNEUMONIA (bacteria)"),
    ("scan.jpeg", "normal", None, None),
])
def test_kaggle_patient_from_file_name(name, label, patient, finding):
    assert kaggle_patient(name, label) == (patient, finding)


def test_kaggle_tree_patients_and_source_split(tmp_path):
    root = make_kaggle(tmp_path / "chest-xray-pneumonia")
    table = read_chest_xray_pneumonia(root)
    rows = table.rows.assign(key=table.rows["source_split"] + "/" + table.rows["image_id"]).set_index("key")
    assert len(rows) == 9 and table.problems == []
    # NORMAL2- is ignored: both files are one patient.
    assert rows.loc["train/IM-0115-0001.jpeg", "patient_id"] == rows.loc["train/NORMAL2-IM-0115-0001.jpeg", "patient_id"] == "kaggle:IM-0115"
    assert rows.loc["train/person1_bacteria_1.jpeg", "patient_id"] == rows.loc["train/person1_bacteria_2.jpeg", "patient_id"] == "kaggle:person1"
    assert rows.loc["test/NORMAL2-IM-0123-0001.jpeg", "patient_id"] == "kaggle:IM-0123"
    assert rows["source_split"].value_counts().to_dict() == {"train": 6, "test": 3}
    assert rows.groupby(["source_split", "label"]).size().to_dict() == {
        ("test", "normal"): 2, ("test", "pneumonia"): 1, ("train", "normal"): 3, ("train", "pneumonia"): 3}
    assert rows.loc["train/person3_virus_15.jpeg", "finding"] == "PNEUMONIA (virus)"
    assert rows["view"].isna().all() and (rows["modality"] == "X-ray").all()
    # root may also be the chest_xray/ folder itself
    same = read_chest_xray_pneumonia(root / "chest_xray")
    assert sorted(same.rows["path"]) == sorted(table.rows["path"])


def test_kaggle_with_val_folder_and_stray_files(tmp_path):
    layout = {**DEFAULT_KAGGLE, "val/NORMAL": ["NORMAL2-IM-1427-0001.jpeg"], "val/PNEUMONIA": ["person1946_bacteria_4874.jpeg"]}
    root = make_kaggle(tmp_path, layout)
    (root / "chest_xray" / "train" / "NORMAL" / "notes.txt").write_text("downloaded from kaggle\n")
    (root / "chest_xray" / "train" / "PNEUMONIA" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "chest_xray" / "train" / "NORMAL" / "thumbs").mkdir()
    table = read_chest_xray_pneumonia(root)
    assert len(table.rows) == 11
    assert table.rows["source_split"].value_counts().to_dict() == {"train": 6, "test": 3, "val": 2}
    assert table.problems == [(str(root / "chest_xray" / "train" / "NORMAL" / "notes.txt"),
                               "not an image file name (.png/.jpg/.jpeg/.dcm)")]


def test_kaggle_without_split_folders_is_an_error(tmp_path):
    (tmp_path / "chest_xray" / "NORMAL").mkdir(parents=True)
    with pytest.raises(SourceError, match="no train/, test/ or val/"):
        read_chest_xray_pneumonia(tmp_path)


# ============================================================================================
# NIH ChestX-ray14


@pytest.mark.parametrize("findings, label", [
    ("No Finding", "normal"), ("Pneumonia", "pneumonia"), ("Infiltration|Pneumonia", "pneumonia"),
    ("Effusion", None), ("Effusion|Infiltration", None), (None, None),
])
def test_nih_label(findings, label):
    assert nih_label(findings) == label


def test_nih_rows(tmp_path):
    table = read_nih_chestxray14(make_nih(tmp_path))
    rows = by_image(table)
    assert rows["label"].to_dict() == {"00000001_000.png": "normal", "00000002_000.png": "normal",
                                       "00000003_001.png": "pneumonia", "00000004_000.png": "pneumonia"}
    assert rows.loc["00000002_000.png", "view"] == "AP" and rows.loc["00000002_000.png", "sex"] == "F"
    assert rows.loc["00000002_000.png", "age"] == 81
    assert rows.loc["00000003_001.png", "patient_id"] == "nih:3"
    assert table.excluded == {"NIH finding not used": 1, "NIH row without image file (subset on disk)": 1}
    assert table.problems == []


def test_nih_rows_naming_a_file_outside_the_folder_or_none_are_left_out_unread(tmp_path):
    """An ``Image Index`` of ``../x.png`` or an absolute path is reported, and the real image there never read."""
    secret = write_raster(tmp_path / "secret.png", image_pixels("secret.png", 64, 64))
    root = make_nih(tmp_path / "nih", DEFAULT_NIH + [NihRow("../../secret.png", "No Finding", "7", "40", "M", "PA", False),
                                                     NihRow(str(secret), "Pneumonia", "8", "41", "F", "PA", False),
                                                     NihRow("", "No Finding", "9", "42", "F", "PA", False)])
    table = read_nih_chestxray14(root)
    assert sorted(by_image(table).index) == ["00000001_000.png", "00000002_000.png", "00000003_001.png", "00000004_000.png"]
    assert [p for p, _ in table.problems] == [str(root / "images" / "../../secret.png"), str(secret)]
    assert all(f"names a file outside {root}; row left out, the file not read" in r for _, r in table.problems)
    assert table.excluded["NIH row without Image Index"] == 1


def test_rsna_label_tables_in_utf16_are_read(tmp_path):
    """Saved as "Unicode text" by Excel or Notepad (UTF-16 with a byte-order mark): read as the UTF-8 files are."""
    root = make_rsna(tmp_path / "rsna")
    expected = read_rsna_labels(root)
    for name in ("stage_2_train_labels.csv", "stage_2_detailed_class_info.csv"):
        (root / name).write_bytes((root / name).read_text().encode("utf-16"))
    pd.testing.assert_frame_equal(read_rsna_labels(root), expected)


# ============================================================================================
# NLM tuberculosis sets (Shenzhen, Montgomery County)


def make_nlm(root: Path, set_folder: str, prefix: str, labels: dict[str, str], readings: dict[str, str],
             extra_files: tuple[str, ...] = (), sixteen_bit: bool = False) -> Path:
    """``root/SET_FOLDER/CXR_png/PREFIX_NNNN_L.png`` (OpenCV PNGs) and ``ClinicalReadings/*.txt``, as the NLM download unpacks."""
    base = root / set_folder
    for number, suffix in labels.items():
        name = f"{prefix}_{number}_{suffix}"
        pixels = image_pixels(name)
        write_raster(base / "CXR_png" / f"{name}.png", pixels.astype("uint16") * 16 if sixteen_bit else pixels)
        if number in readings:
            (base / "ClinicalReadings").mkdir(parents=True, exist_ok=True)
            (base / "ClinicalReadings" / f"{name}.txt").write_text(readings[number])
    for name in extra_files:  # a PNG misnamed, or what Windows leaves beside the images
        if name.endswith(".png"):
            write_raster(base / "CXR_png" / name, image_pixels(name))
        else:
            (base / "CXR_png" / name).write_bytes(b"\0")
    return root


def make_shenzhen(root: Path) -> Path:
    return make_nlm(root, "ChinaSet_AllFiles", "CHNCXR", {"0001": "0", "0002": "1", "0003": "0", "0004": "0"},
                    {"0001": "male 45yrs\nnormal\n", "0002": "female 62yrs\nPTB in the right upper field\n",
                     "0003": "Female 35Y\n\nnormal\n"},
                    extra_files=("CHNCXR_0005.png", "Thumbs.db"))


def make_montgomery(root: Path) -> Path:
    return make_nlm(root, "MontgomerySet", "MCUCXR", {"0001": "0", "0104": "1", "0113": "1", "0140": "0"},
                    {"0001": "Patient's Sex: M\nPatient's Age: 040Y\nnormal\n",
                     "0104": "Patient's Sex: F\nPatient's Age: 027Y\nright upper lobe cavity, TB\n",
                     "0140": "Patient's Sex: F \r\nPatient's Age: 058Y\r\n\r\nnormal\r\n"},
                    sixteen_bit=True)


@pytest.mark.parametrize("text, sex, age, finding", [
    ("male 45yrs\nnormal\n", "M", 45.0, "normal"),
    ("Male 35Y\n\nnormal", "M", 35.0, "normal"),
    ("female 62yrs\nPTB in the right upper field\nold lesions", "F", 62.0, "PTB in the right upper field old lesions"),
    ("male 8month\nnormal", "M", 8 / 12, "normal"),
    ("Patient's Sex: M\nPatient's Age: 040Y\nnormal\n", "M", 40.0, "normal"),
    ("Patient's Sex: F\r\nPatient's Age: 006M\r\n\r\nbilateral upper lobe TB\r\n", "F", 0.5, "bilateral upper lobe TB"),
    ("normal\n", None, None, "normal"),
    ("", None, None, None),
])
def test_nlm_clinical_readings_of_both_sets(text, sex, age, finding):
    got_sex, got_age, got_finding = nlm_clinical_reading(text)
    assert (got_sex, got_finding) == (sex, finding)
    assert got_age == pytest.approx(age) if age is not None else got_age is None


def test_nlm_shenzhen_reads_normals_counts_tuberculosis_and_reports_bad_names(tmp_path):
    table = read_nlm_shenzhen(make_shenzhen(tmp_path))
    rows = by_image(table)
    assert list(rows.index) == ["CHNCXR_0001_0.png", "CHNCXR_0003_0.png", "CHNCXR_0004_0.png"]
    assert set(rows["label"]) == {"normal"} and set(rows["view"]) == {"PA"} and set(rows["site"]) == {"nlm-shenzhen"}
    assert rows["patient_id"].tolist() == ["nlm-shenzhen:0001", "nlm-shenzhen:0003", "nlm-shenzhen:0004"]
    assert rows.loc["CHNCXR_0001_0.png", ["sex", "age"]].tolist() == ["M", 45.0]
    assert rows.loc["CHNCXR_0003_0.png", ["sex", "age"]].tolist() == ["F", 35.0]
    assert pd.isna(rows.loc["CHNCXR_0004_0.png", "sex"]) and pd.isna(rows.loc["CHNCXR_0004_0.png", "age"])  # no reading
    assert table.excluded == {"tuberculosis (file name ends _1): not a class of xraylib's tasks": 1}
    assert [(Path(p).name, "CHNCXR_NNNN_L.png" in reason) for p, reason in table.problems] == [("CHNCXR_0005.png", True)]
    assert list(table.rows.columns) == SOURCE_COLUMNS


def test_nlm_montgomery_accepts_the_set_folder_itself(tmp_path):
    make_montgomery(tmp_path)
    for root in (tmp_path, tmp_path / "MontgomerySet"):  # the folder holding the set, or the set folder
        table = read_nlm_montgomery(root)
        rows = by_image(table)
        assert list(rows.index) == ["MCUCXR_0001_0.png", "MCUCXR_0140_0.png"]
        assert rows.loc["MCUCXR_0001_0.png", ["sex", "age", "finding"]].tolist() == ["M", 40.0, "normal"]
        assert rows.loc["MCUCXR_0140_0.png", ["sex", "age"]].tolist() == ["F", 58.0]
        assert set(rows["site"]) == {"nlm-montgomery"} and rows["patient_id"].str.startswith("nlm-montgomery:").all()
        assert table.excluded == {"tuberculosis (file name ends _1): not a class of xraylib's tasks": 2}
        assert table.problems == []


def test_nlm_without_its_set_names_the_folder(tmp_path):
    make_shenzhen(tmp_path)
    with pytest.raises(SourceError, match=r"MontgomerySet/CXR_png") as error:
        read_nlm_montgomery(tmp_path)  # one NLM folder holding only the Shenzhen set
    assert str(tmp_path) in str(error.value)


def test_both_nlm_keys_may_name_one_folder_and_the_manifest_counts_tuberculosis(tmp_path):
    nlm = make_montgomery(make_shenzhen(tmp_path / "NLM"))
    result = build_manifest({"nlm_shenzhen": nlm, "nlm_montgomery": nlm, **make_all_sources(tmp_path / "data")},
                            task="covid_vs_normal", workers=2, progress=False)
    frame = result.frame
    assert (frame["source"] == "nlm-shenzhen").sum() == 3 and (frame["source"] == "nlm-montgomery").sum() == 2
    montgomery = frame[frame["source"] == "nlm-montgomery"]
    assert set(montgomery["bit_depth"]) == {16} and set(montgomery["label"]) == {"normal"}
    excluded = result.report.per_source["nlm-montgomery"]["excluded"]
    assert excluded == {"tuberculosis (file name ends _1): not a class of xraylib's tasks": 2}
    assert frame["site"].notna().all()


@pytest.mark.shared_data
def test_nlm_shenzhen_on_the_real_normals(shared_data):
    table = read_nlm_shenzhen(shared_data / "nlm-tb")
    rows = table.rows
    assert len(rows) == 326 and rows["patient_id"].nunique() == 326
    assert set(rows["label"]) == {"normal"} and set(rows["view"]) == {"PA"} and set(rows["site"]) == {"nlm-shenzhen"}
    assert rows["image_id"].str.fullmatch(r"CHNCXR_\d{4}_0\.png").all()
    assert table.problems == [] and table.excluded == {}
    assert rows["age"].isna().all()  # ../shared holds no ClinicalReadings


# ============================================================================================
# Sites


@pytest.mark.parametrize("location, doi, url, site", [
    ("Italy", "", "https://www.sirm.org/x", "ieee8023:italy"),  # a bare country: the country
    ("Brescia, Italy", "10.1007/s11547-020-01200-3", "", "ieee8023:italy/brescia"),  # a city
    ("Riccione, Italy ", None, None, "ieee8023:italy/riccione"),  # spellings of one place share a site
    ("Boca Raton, Florida , USA", None, None, "ieee8023:usa/boca-raton"),
    ("Hannover Medical School, Hannover, Germany", "", "", "ieee8023:germany/hannover/hannover-medical-school"),
    ("Vivantes Klinikum Neuk\ufffdlln, Berlin, Germany", "", "", "ieee8023:germany/berlin/vivantes-klinikum-neukolln"),
    ("Vivantes Klinikum Neukölln, Berlin, Germany", "", "", "ieee8023:germany/berlin/vivantes-klinikum-neukolln"),
    ("Lyon, France", "", "", "ieee8023:france/lyon"),  # not in the table: its parts, country first
    ("", "10.1007/S00068-020-01364-7", "https://link.springer.com/x", "ieee8023:doi:10.1007/s00068-020-01364-7"),
    (None, "", "https://www.radiologyassistant.nl/chest/covid-19", "ieee8023:url:radiologyassistant.nl"),
    ("", "", "", IEEE8023_UNKNOWN_SITE),
])
def test_ieee8023_site_rule(location, doi, url, site):
    assert ieee8023_site(location, doi, url) == site


def test_the_site_table_ships_as_package_data():
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["xraylib"]
    assert any(fnmatch.fnmatch(IEEE8023_SITES_FILE, pattern) for pattern in patterns)
    table = ieee8023_site_table()
    assert len(table) > 100 and all(site.startswith("ieee8023:") for site in table.values())


def test_a_patient_at_two_locations_keeps_one_site(tmp_path):
    root = make_ieee8023(tmp_path, [IeeeRow("1", "COVID-19", "PA", "a.png"), IeeeRow("1", "COVID-19", "AP", "b.png"),
                                    IeeeRow("2", "COVID-19", "PA", "c.png")],
                         )
    metadata = pd.read_csv(root / "metadata.csv", dtype=str, keep_default_na=False)
    metadata.loc[1, "location"] = "Brescia, Italy"  # the second image of patient 1 names another place
    metadata.to_csv(root / "metadata.csv", index=False)
    rows = by_image(read_covid_chestxray(root))
    assert rows["site"].to_dict() == {"a.png": "ieee8023:vietnam/ho-chi-minh-city/cho-ray-hospital",
                                      "b.png": "ieee8023:vietnam/ho-chi-minh-city/cho-ray-hospital",
                                      "c.png": "ieee8023:vietnam/ho-chi-minh-city/cho-ray-hospital"}


@pytest.mark.shared_data
def test_sites_of_the_real_ieee8023_metadata(shared_data):
    root = shared_data / "covid-chestxray-dataset"
    raw = pd.read_csv(root / "metadata.csv", dtype=str, keep_default_na=False, encoding="utf-8-sig", encoding_errors="replace")
    known = ieee8023_site_table()
    # Every location of the real file is in the committed table (none falls to the parts rule).
    assert {ieee8023_site(v) for v in raw["location"] if v.strip()} <= set(known.values())
    rows = read_covid_chestxray(root).rows
    covid = rows[(rows["label"] == "covid") & rows["view"].isin(["PA", "AP", "AP Supine"])]
    assert len(covid) == 427 and covid["site"].notna().all()
    assert IEEE8023_UNKNOWN_SITE not in set(covid["site"])  # every one has a location, a doi or a url
    assert covid["site"].str.startswith("ieee8023:").all()
    # 89 location strings (33 rows empty) become about as many sites: spellings merge, empty ones split by paper or sharer.
    assert 60 <= covid["site"].nunique() <= 100
    assert 20 <= covid["site"].str.extract(r"^ieee8023:([^/:]+)")[0].nunique() <= 40  # countries
    assert (rows.groupby("patient_id")["site"].nunique() == 1).all()  # no patient spans sites
    by_site = covid.groupby("site")["patient_id"].nunique()
    assert by_site["ieee8023:germany/hannover/hannover-medical-school"] == 43 and by_site["ieee8023:italy"] == 46
    assert by_site["ieee8023:italy/brescia"] == 7
    # patientid 197 names Pamplona and Milan (two eurorad cases under one id): one site, the first in the file.
    assert set(rows.loc[rows["patient_id"] == "ieee8023:197", "site"]) == {"ieee8023:spain/pamplona/complejo-hospitalario-de-navarra"}


def test_fill_site_gives_an_old_manifest_its_sites(tmp_path):
    sources = make_all_sources(tmp_path)
    frame = build_manifest(sources, task="covid_pneumonia_normal", workers=2, progress=False).frame
    assert list(frame.columns[:5]) == ["path", "label", "source", "site", "patient_id"]
    old = frame.drop(columns="site")
    (tmp_path / "manifest.csv").write_text(old.to_csv(index=False))
    loaded = load_manifest(tmp_path / "manifest.csv")  # an older xraylib's manifest: no site column
    assert loaded["site"].tolist() == frame["site"].tolist()
    assert set(loaded.loc[loaded["source"] == "nih", "site"]) == {"nih+rsna"}
    assert set(loaded.loc[loaded["source"] == "ieee8023", "site"]) == {"ieee8023:vietnam/ho-chi-minh-city/cho-ray-hospital"}
    (sources["covid_chestxray_dataset"] / "metadata.csv").unlink()  # the source folder is gone: unknown
    assert set(fill_site(old).query("source == 'ieee8023'")["site"]) == {IEEE8023_UNKNOWN_SITE}
    assert fill_site(old.assign(source="my-own"))["site"].eq("my-own").all()
