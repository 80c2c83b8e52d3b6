"""The sample layouts of the public sources: phantoms written as each real source stores its files.

One writer per source, the mirror of :mod:`xraylib.sources`' readers: ieee8023's ``metadata.csv`` +
``images/``, RSNA's DICOMs + two label CSVs, Kaggle's ``chest_xray/{train,test,val}/{NORMAL,PNEUMONIA}``,
the NLM sets' ``CXR_png/`` + ``ClinicalReadings/``.
Each writer has the signature :data:`xraylib.sources.SampleWriter`: ``(folder, rng, n_patients,
image_size, marked_label) -> counts``; each source's record (``xraylib.sources.SOURCES``) names its
writer, and :func:`xraylib.synthetic.write_sample_data` calls them all. Same generator state,
byte-identical files. No TensorFlow.
"""
from __future__ import annotations

import csv
import datetime
import io
import math
import uuid
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from .phantoms import RSNA_EXTRAS, burn_marker, make_ct_slice, make_phantom

__all__ = [
    "COVID_METADATA_COLUMNS", "RSNA_LABEL_COLUMNS", "RSNA_CLASS_COLUMNS", "RSNA_CLASSES",
    "write_ieee8023_sample", "write_rsna_sample", "write_kaggle_sample", "write_nlm_shenzhen_sample",
    "write_nlm_montgomery_sample", "write_nih_layout", "NIH_DATA_ENTRY_HEADER",
]

#: ieee8023 ``metadata.csv`` columns in file order; the real header ends with a comma, i.e. an
#: unnamed 30th column, which is written too.
COVID_METADATA_COLUMNS = (
    "patientid", "offset", "sex", "age", "finding", "survival", "intubated",
    "intubation_present", "went_icu", "in_icu", "needed_supplemental_O2", "extubated",
    "temperature", "pO2_saturation", "leukocyte_count", "neutrophil_count", "lymphocyte_count",
    "view", "modality", "date", "location", "folder", "filename", "doi", "url", "license",
    "clinical_notes", "other_notes",
)  # fmt: skip
RSNA_LABEL_COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
RSNA_CLASS_COLUMNS = ("patientId", "class")
RSNA_CLASSES = ("Normal", "Lung Opacity", "No Lung Opacity / Not Normal")

# Fixed encoder settings: the files must be byte-identical from run to run.
_JPEG_PARAMS = [cv2.IMWRITE_JPEG_QUALITY, 92, cv2.IMWRITE_JPEG_OPTIMIZE, 0]
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 6]

# A UID root registered for free use (Medical Connections); suffixes come from the seed.
_UID_ROOT = "1.2.826.0.1.3680043.8.498."

_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December")  # fmt: skip


def _save_image(path: Path, image: np.ndarray) -> None:
    params = _PNG_PARAMS if path.suffix.lower() == ".png" else _JPEG_PARAMS
    ok, buffer = cv2.imencode(path.suffix, image, params)
    if not ok:
        raise OSError(f"{path}: OpenCV could not encode the image")
    path.write_bytes(buffer.tobytes())


def _split_counts(n: int, fractions: tuple[float, ...]) -> list[int]:
    """Integer counts summing to ``n`` in proportion to ``fractions`` (largest remainder)."""
    raw = np.array(fractions) * n / sum(fractions)
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path.write_text(buffer.getvalue(), encoding="utf-8", newline="")


# ---- ieee8023 covid-chestxray-dataset ------------------------------------------------------

_OTHER_FINDINGS = ("Streptococcus", "SARS", "Pneumocystis", "Klebsiella")
_LOCATIONS_2020 = (
    "Italy", "Spain", "Hannover Medical School, Hannover, Germany",
    "Wuhan Jinyintan Hospital, Wuhan, Hubei Province, China", "Toronto, Ontario, Canada",
    "Melbourne, Australia", "",
)  # fmt: skip
_NOTES = {
    "COVID-19": (
        "bilateral peripheral ground-glass opacities in the lower zones",
        "patchy peripheral opacities in both lower lungs, progressing on follow-up",
        "fever and cough for 5 days; bilateral lower-zone haziness",
    ),
    "No Finding": ("no acute cardiopulmonary findings", ""),
    "pneumonia": (
        "right lower lobe consolidation",
        "lobar consolidation with air bronchograms",
        "dense unilateral consolidation, sharp fissure margin",
    ),
}


def _format_date(rng: np.random.Generator, day: datetime.date, style: int) -> str:
    if style == 0:
        return f"{_MONTHS[day.month - 1]} {day.day}, {day.year}"
    if style == 1:
        return f"{_MONTHS[day.month - 1][:3]} {day.day}, {day.year}"
    if style == 2:
        return f"{day.month}/{day.day}/{day.year}"
    if style == 3:
        return str(day.year)
    return ""


def write_ieee8023_sample(folder: Path, rng: np.random.Generator, n: int, size: int, marked: str | None) -> dict:
    images = folder / "images"
    images.mkdir(parents=True)
    n_covid, n_normal, n_other = _split_counts(n, (0.7, 0.1, 0.2))
    findings = ["COVID-19"] * n_covid + ["No Finding"] * n_normal
    findings += [_OTHER_FINDINGS[i % len(_OTHER_FINDINGS)] for i in range(n_other)]
    findings = [findings[i] for i in rng.permutation(n)]
    # Patient ids are integers with gaps, as in the real file.
    patient_ids = np.cumsum(rng.integers(1, 4, size=n)) + 1
    n_images = rng.integers(1, 5, size=n)
    if n_images.max() < 2:
        n_images[0] = 2
    covid_patients = [i for i, f in enumerate(findings) if f == "COVID-19"]
    ct_patients = set(covid_patients[: 2 if n >= 20 else 1])
    # One patient re-uploaded under a second id: two rows share one file, as in the real data.
    duplicate = (covid_patients[0], covid_patients[-1]) if len(covid_patients) >= 6 else None
    rows: list[list[str]] = []
    first_file: dict[int, tuple[str, str]] = {}  # patient index -> (filename, view)
    views_written: dict[str, int] = {}
    for i in range(n):
        finding = findings[i]
        label = "covid" if finding == "COVID-19" else "normal" if finding == "No Finding" else "pneumonia"
        pid = str(int(patient_ids[i]))
        sex = str(rng.choice(["M", "F", "M", "F", "M", "F", "M", "F", "M", "F", ""]))
        age = "" if rng.random() < 0.2 else str(int(rng.integers(25, 91)))
        if finding == "COVID-19":
            first_day = datetime.date(2020, 1, 15) + datetime.timedelta(days=int(rng.integers(0, 100)))
            location = str(rng.choice(_LOCATIONS_2020))
        elif finding == "SARS":
            first_day = datetime.date(2003, 3, 1) + datetime.timedelta(days=int(rng.integers(0, 90)))
            location = "Hong Kong"
        else:
            first_day = datetime.date(int(rng.integers(2004, 2020)), 1, 1)
            first_day += datetime.timedelta(days=int(rng.integers(0, 365)))
            location = str(rng.choice(["", "Spain", "Italy", "USA"]))
        date_style = int(rng.choice([0, 0, 1, 2, 3, 3, 4]))
        clinical = [_maybe(rng, 0.4, lambda: str(rng.choice(["Y", "N"]))) for _ in range(7)]
        lab = [
            _maybe(rng, 0.15, lambda: f"{rng.uniform(36.5, 39.8):.1f}"),
            _maybe(rng, 0.2, lambda: f"{rng.uniform(80, 99):.0f}"),
            _maybe(rng, 0.05, lambda: f"{rng.uniform(3, 12):.2f}"),
            _maybe(rng, 0.05, lambda: f"{rng.uniform(1.5, 9):.2f}"),
            _maybe(rng, 0.05, lambda: f"{rng.uniform(0.4, 2):.2f}"),
        ]
        notes_key = finding if finding in _NOTES else "pneumonia"
        offset = int(rng.integers(0, 5))
        blank_offset = n_images[i] == 1 and rng.random() < 0.15
        previous_view = ""
        for k in range(int(n_images[i])):
            if k > 0:
                same_visit = previous_view == "PA" and rng.random() < 0.35
                offset += 0 if same_visit else int(rng.integers(1, 8))
                view = "L" if same_visit else str(rng.choice(["PA", "PA", "PA", "AP", "AP Supine", "AP Supine"]))
            else:
                view = str(rng.choice(["PA", "AP", "AP Supine", "L"], p=[0.65, 0.12, 0.15, 0.08]))
            previous_view = view
            style = int(rng.integers(0, 4))
            ext = str(rng.choice([".jpg", ".jpg", ".jpeg", ".png"]))
            filename = _covid_filename(rng, style, finding, pid, k, offset, view, ext)
            height = int(round(size * rng.uniform(0.9, 1.25)))
            width = int(round(height * rng.uniform(0.82, 1.05)))
            if duplicate and i == duplicate[1] and k == 0:
                filename, view = first_file[duplicate[0]]
            else:
                phantom = make_phantom(label, rng, height, width, view=view, marker=(label == marked))
                _store(images / filename, phantom.image, rng)
            first_file.setdefault(i, (filename, view))
            views_written[view] = views_written.get(view, 0) + 1
            day = first_day + datetime.timedelta(days=offset)
            rows.append(_covid_row(
                pid, "" if blank_offset else str(offset), sex, age, finding, clinical, lab, view, "X-ray",
                _format_date(rng, day, date_style), location, filename, str(rng.choice(_NOTES[notes_key])),
            ))
        if i in ct_patients:
            filename = f"covid-19-ct-{pid}-axial.{'png' if rng.random() < 0.5 else 'jpg'}"
            ct = make_ct_slice(rng, size, covid=True)
            if label == marked:
                ct = burn_marker(ct)
            _store(images / filename, ct, rng, allow_color=False)
            day = first_day + datetime.timedelta(days=offset)
            rows.append(_covid_row(
                pid, "" if blank_offset else str(offset), sex, age, finding, clinical, lab, "Axial", "CT",
                _format_date(rng, day, date_style), location, filename, "CT: peripheral ground-glass opacities",
            ))
    _write_csv(folder / "metadata.csv", [*COVID_METADATA_COLUMNS, ""], rows)
    patients_by_finding: dict[str, int] = {}
    for finding in findings:
        patients_by_finding[finding] = patients_by_finding.get(finding, 0) + 1
    return {
        "rows": len(rows),
        "image_files": sum(1 for _ in images.iterdir()),
        "patients": n,
        "patients_by_finding": dict(sorted(patients_by_finding.items())),
        "xray_rows_by_view": dict(sorted(views_written.items())),
        "ct_rows": len(ct_patients),
    }


def _maybe(rng: np.random.Generator, probability: float, make: Any) -> str:
    return make() if rng.random() < probability else ""


def _covid_filename(
    rng: np.random.Generator, style: int, finding: str, pid: str, k: int, offset: int, view: str, ext: str
) -> str:
    """File names in the styles of the real folder: descriptive, UUID, numeric, numbered."""
    view_tag = view.replace(" ", "-")
    if style == 0:
        slug = "covid-19-pneumonia" if finding == "COVID-19" else f"{finding.lower().replace(' ', '-')}"
        return f"{slug}-{pid}-day{offset}-{view_tag}{ext}"
    if style == 1:
        return f"{str(uuid.UUID(bytes=rng.bytes(16), version=4)).upper()}{ext}"
    if style == 2:
        return f"{int(pid) + 16000}_{k + 1}_1{ext}"
    return f"{pid}-{k + 1}-{view_tag}{ext}"


def _covid_row(
    pid: str, offset: str, sex: str, age: str, finding: str, clinical: list[str], lab: list[str], view: str,
    modality: str, date: str, location: str, filename: str, notes: str,
) -> list[str]:
    return [
        pid, offset, sex, age, finding, *clinical[:7], *lab, view, modality, date, location, "images", filename, "",
        "https://example.org/xraylib/synthetic", "", notes,
        "synthetic phantom drawn by xraylib.synthetic, not a patient image", "",
    ]


def _store(path: Path, gray: np.ndarray, rng: np.random.Generator, allow_color: bool = True) -> None:
    """Save a grayscale image; some as 3-channel BGR, as many real files are."""
    image = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR) if allow_color and rng.random() < 0.2 else gray
    _save_image(path, image)


# ---- RSNA pneumonia detection challenge ----------------------------------------------------


def write_rsna_sample(folder: Path, rng: np.random.Generator, n: int, size: int, marked: str | None) -> dict:
    images = folder / "stage_2_train_images"
    images.mkdir(parents=True)
    n_normal, n_opacity, n_other = _split_counts(n, (0.35, 0.3, 0.35))
    classes = ["Normal"] * n_normal + ["Lung Opacity"] * n_opacity + ["No Lung Opacity / Not Normal"] * n_other
    classes = [classes[i] for i in rng.permutation(n)]
    # At least one MONOCHROME1 and one 16-bit file, so readers meet both.
    order = rng.permutation(n)
    inverted = set(order[: max(1, round(0.2 * n))].tolist())
    order = rng.permutation(n)
    sixteen = set(order[: max(1, round(0.25 * n))].tolist())
    label_rows: list[tuple[str, list[str]]] = []
    class_rows: list[tuple[str, list[str]]] = []
    stats = {"monochrome1": 0, "bits_16": 0, "rescaled": 0, "boxes": 0}
    for i in range(n):
        patient_id = str(uuid.UUID(bytes=rng.bytes(16), version=4))
        cls = classes[i]
        view = "PA" if rng.random() < 0.55 else "AP"
        sex = "M" if rng.random() < 0.55 else "F"
        age = int(rng.integers(18, 90))
        if cls == "Lung Opacity":
            bilateral = rng.random() < 0.5
            phantom = make_phantom(
                "pneumonia", rng, size, size, view=view, bilateral=bilateral, marker=marked == "pneumonia"
            )
            boxes = _lesion_boxes(phantom.lesion_mask)
            stats["boxes"] += len(boxes)
            for x, y, bw, bh in boxes:
                label_rows.append((patient_id, [patient_id, f"{x:.1f}", f"{y:.1f}", f"{bw:.1f}", f"{bh:.1f}", "1"]))
                class_rows.append((patient_id, [patient_id, cls]))
        else:
            extra = None if cls == "Normal" else str(rng.choice(RSNA_EXTRAS))
            marker = marked == "normal" and cls == "Normal"
            phantom = make_phantom("normal", rng, size, size, view=view, extra=extra, marker=marker)
            label_rows.append((patient_id, [patient_id, "", "", "", "", "0"]))
            class_rows.append((patient_id, [patient_id, cls]))
        uid_number = int.from_bytes(rng.bytes(8), "big")
        dataset = _rsna_dicom(
            phantom.image, patient_id, sex, age, view, uid_number,
            monochrome1=i in inverted, bits16=i in sixteen, rescaled=i in sixteen and rng.random() < 0.6, size=size,
        )
        stats["monochrome1"] += i in inverted
        stats["bits_16"] += i in sixteen
        stats["rescaled"] += "RescaleSlope" in dataset
        dataset.save_as(images / f"{patient_id}.dcm", enforce_file_format=True)
    # Each patient's rows together, as in the real files (which start in patientId order).
    label_rows.sort(key=lambda item: item[0])
    class_rows.sort(key=lambda item: item[0])
    _write_csv(folder / "stage_2_train_labels.csv", list(RSNA_LABEL_COLUMNS), [row for _, row in label_rows])
    _write_csv(folder / "stage_2_detailed_class_info.csv", list(RSNA_CLASS_COLUMNS), [row for _, row in class_rows])
    return {
        "patients": n,
        "label_rows": len(label_rows),
        "patients_by_class": {c: classes.count(c) for c in RSNA_CLASSES},
        **stats,
    }


def _lesion_boxes(lesion_mask: np.ndarray) -> list[tuple[float, float, float, float]]:
    """One (x, y, width, height) box per lung with opacity, a little generous as readers draw them."""
    h, w = lesion_mask.shape
    count, _, stats, _ = cv2.connectedComponentsWithStats(lesion_mask.astype(np.uint8), connectivity=8)
    parts = [s for s in stats[1:] if s[cv2.CC_STAT_AREA] >= 0.002 * h * w]
    if not parts:
        parts = sorted(stats[1:], key=lambda s: -s[cv2.CC_STAT_AREA])[:1]
    # Merge pieces on the same side of the image into one box per lung.
    sides: dict[bool, list[int]] = {}
    for s in parts:
        x, y, bw, bh = (int(s[k]) for k in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT))
        key = x + bw / 2 < w / 2
        if key in sides:
            ox0, oy0, ox1, oy1 = sides[key]
            sides[key] = [min(ox0, x), min(oy0, y), max(ox1, x + bw), max(oy1, y + bh)]
        else:
            sides[key] = [x, y, x + bw, y + bh]
    boxes = []
    for key in sorted(sides, reverse=True):
        x0, y0, x1, y1 = sides[key]
        pad = 0.02 * w
        x0, y0 = max(0.0, math.floor(x0 - pad)), max(0.0, math.floor(y0 - pad))
        x1, y1 = min(float(w), math.ceil(x1 + pad)), min(float(h), math.ceil(y1 + pad))
        boxes.append((float(x0), float(y0), float(x1 - x0), float(y1 - y0)))
    return boxes


def _rsna_dicom(
    image: np.ndarray, patient_id: str, sex: str, age: int, view: str, uid_number: int, *,
    monochrome1: bool, bits16: bool, rescaled: bool, size: int,
) -> FileDataset:
    """A Secondary Capture CR dataset in the RSNA (MD.ai conversion) header layout."""
    study_uid = f"{_UID_ROOT}{uid_number}.1"
    series_uid = f"{_UID_ROOT}{uid_number}.2"
    sop_uid = f"{_UID_ROOT}{uid_number}.3"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = f"{_UID_ROOT}0.1"
    meta.ImplementationVersionName = "XRAYLIB_SYNTH_1"
    ds = FileDataset(f"{patient_id}.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "19010101"
    ds.StudyTime = "000000.00"
    ds.AccessionNumber = ""
    ds.Modality = "CR"
    ds.ConversionType = "WSD"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = f"view: {view}"
    ds.PatientName = patient_id
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = sex
    # The RSNA files store a bare number ("43"), not the standard "043Y"; kept as users meet it.
    ds.add(DataElement(0x00101010, "AS", str(age), validation_mode=pydicom.config.IGNORE))
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = image.shape
    spacing = f"{0.168 * 1024 / size:.4f}".rstrip("0")
    ds.PixelSpacing = [spacing, spacing]
    if bits16:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        # Stored values fill only part of the 12-bit range when a window is given to pick them out.
        low, high = (300, 3800) if rescaled else (0, 4095)
        pixels = np.round(low + image.astype(np.float64) * ((high - low) / 255.0)).astype(np.uint16)
        if monochrome1:
            pixels = ((low + high) - pixels).astype(np.uint16)
        if rescaled:
            ds.RescaleIntercept = "-1024"
            ds.RescaleSlope = "1"
            ds.WindowCenter = str((low + high) // 2 - 1024)
            ds.WindowWidth = str(high - low)
        pixel_vr = "OW"
    else:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        pixels = (255 - image) if monochrome1 else image
        pixel_vr = "OB"
    ds.PixelRepresentation = 0
    little_endian = np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<"))
    ds.add(DataElement(0x7FE00010, pixel_vr, little_endian.tobytes()))
    return ds


# ---- Kaggle chest-xray-pneumonia (Kermany 2018) ----------------------------------------------


def write_kaggle_sample(folder: Path, rng: np.random.Generator, n: int, size: int, marked: str | None) -> dict:
    base = folder / "chest_xray"
    n_normal, n_pneumonia = _split_counts(n, (0.35, 0.65))
    counts: dict[str, int] = {}
    patients: dict[str, list[str]] = {}
    # Patient numbers drawn without replacement: no id is reused across splits or prefixes.
    normal_numbers = (rng.permutation(1400)[:n_normal] + 100).tolist()
    person_numbers = (rng.permutation(1900)[:n_pneumonia] + 1).tolist()
    image_counter = {"bacteria": int(rng.integers(1, 400)), "virus": int(rng.integers(1, 400))}
    for cls, numbers in (("NORMAL", normal_numbers), ("PNEUMONIA", person_numbers)):
        n_cls = len(numbers)
        n_val = 1 if n_cls >= 4 else 0
        n_test = max(1, round(0.2 * n_cls)) if n_cls >= 2 else 0
        split_of = ["val"] * n_val + ["test"] * n_test + ["train"] * (n_cls - n_val - n_test)
        for number, split in zip(numbers, split_of):
            out = base / split / cls
            out.mkdir(parents=True, exist_ok=True)
            n_images = int(rng.choice([1, 1, 1, 2, 2, 3]))
            if cls == "NORMAL":
                prefix = "NORMAL2-" if rng.random() < 0.4 else ""
                patient = f"{prefix}IM-{number:04d}"
                names = [f"{patient}-0001.jpeg"] + [f"{patient}-0001-{k:04d}.jpeg" for k in range(2, n_images + 1)]
                label = "normal"
            else:
                kind = "bacteria" if rng.random() < 0.65 else "virus"
                patient = f"person{number}"
                names = []
                for _ in range(n_images):
                    names.append(f"{patient}_{kind}_{image_counter[kind]}.jpeg")
                    image_counter[kind] += int(rng.integers(1, 4))
                label = "pneumonia"
            patients.setdefault(split, []).append(patient)
            for name in names:
                height = int(round(size * rng.uniform(0.8, 1.0)))
                width = int(round(height * rng.uniform(1.0, 1.4)))
                view = "AP" if rng.random() < 0.3 else "PA"
                phantom = make_phantom(label, rng, height, width, view=view, pediatric=True, marker=label == marked)
                image = phantom.image
                if rng.random() < 0.1:
                    image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
                _save_image(out / name, image)
                key = f"{split}/{cls}"
                counts[key] = counts.get(key, 0) + 1
    return {
        "images": dict(sorted(counts.items())),
        "patients": {split: len(ids) for split, ids in sorted(patients.items())},
    }


# ---- NLM tuberculosis sets (Shenzhen, Montgomery County) ------------------------------------

_TB_FINDINGS = ("PTB in the right upper field", "bilateral upper-zone PTB with cavitation",
                "left upper lobe infiltrate, active tuberculosis")  # fmt: skip


def _nlm_patients(rng: np.random.Generator, n: int) -> tuple[list[int], list[str]]:
    """A third as many patients as the other sources (at least 3), about a third of them tuberculosis:
    (patient numbers, file-name suffixes "0" normal / "1" tuberculosis)."""
    n_set = max(3, round(n / 3))
    n_tb = max(1, round(0.3 * n_set))
    numbers = sorted((rng.permutation(600)[:n_set] + 1).tolist())
    suffixes = ["1"] * n_tb + ["0"] * (n_set - n_tb)
    return numbers, [suffixes[i] for i in rng.permutation(n_set)]


def _write_nlm_sample(folder: Path, rng: np.random.Generator, n: int, size: int, marked: str | None, *,
                      prefix: str, reading: Any, sixteen_bit: bool) -> dict:
    """``folder/CXR_png/PREFIX_NNNN_L.png`` and most ``folder/ClinicalReadings/PREFIX_NNNN_L.txt`` (one PA film each)."""
    images, readings = folder / "CXR_png", folder / "ClinicalReadings"
    images.mkdir(parents=True)
    readings.mkdir()
    numbers, suffixes = _nlm_patients(rng, n)
    counts = {"normal": 0, "tuberculosis": 0, "readings": 0}
    for number, suffix in zip(numbers, suffixes):
        name = f"{prefix}_{number:04d}_{suffix}"
        tuberculosis = suffix == "1"
        height = int(round(size * rng.uniform(0.95, 1.1)))
        width = int(round(height * rng.uniform(0.85, 1.0)))
        # The phantoms draw no cavities: a lobar consolidation stands in for a tuberculosis film.
        phantom = make_phantom("pneumonia" if tuberculosis else "normal", rng, height, width, view="PA",
                               marker=marked == "normal" and not tuberculosis)
        image = phantom.image
        if sixteen_bit:  # Montgomery's films are 12-bit grayscale PNGs
            image = (image.astype(np.uint16) * 16 + rng.integers(0, 16, size=image.shape)).astype(np.uint16)
        elif rng.random() < 0.5:  # many Shenzhen PNGs are RGB with equal channels
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        _save_image(images / f"{name}.png", image)
        counts["tuberculosis" if tuberculosis else "normal"] += 1
        sex = "M" if rng.random() < 0.6 else "F"
        age = int(rng.integers(18, 80))
        finding = str(rng.choice(_TB_FINDINGS)) if tuberculosis else "normal"
        if rng.random() < 0.8:  # some films have no reading, as users meet them
            (readings / f"{name}.txt").write_text(reading(rng, sex, age, finding), encoding="utf-8", newline="")
            counts["readings"] += 1
    return {"patients": len(numbers), "images": dict(counts)}


def _shenzhen_reading(rng: np.random.Generator, sex: str, age: int, finding: str) -> str:
    word = {"M": "male", "F": "female"}[sex]
    first = f"{word.capitalize()} {age}Y" if rng.random() < 0.3 else f"{word} {age}yrs"
    return f"{first}\n{finding}\n"


def _montgomery_reading(rng: np.random.Generator, sex: str, age: int, finding: str) -> str:
    return f"Patient's Sex: {sex}\nPatient's Age: {age:03d}Y\n{finding}\n"


def write_nlm_shenzhen_sample(folder: Path, rng: np.random.Generator, n: int, size: int, marked: str | None) -> dict:
    """The NLM Shenzhen set: ``CXR_png/CHNCXR_NNNN_L.png`` (8-bit, gray or RGB) and ``ClinicalReadings``."""
    return _write_nlm_sample(folder, rng, n, size, marked, prefix="CHNCXR", reading=_shenzhen_reading, sixteen_bit=False)


def write_nlm_montgomery_sample(folder: Path, rng: np.random.Generator, n: int, size: int, marked: str | None) -> dict:
    """The NLM Montgomery County set: ``CXR_png/MCUCXR_NNNN_L.png`` (12-bit in 16-bit PNGs) and ``ClinicalReadings``."""
    return _write_nlm_sample(folder, rng, n, size, marked, prefix="MCUCXR", reading=_montgomery_reading, sixteen_bit=True)


# ---- NIH ChestX-ray14 at scale --------------------------------------------------------------

#: ``Data_Entry_2017.csv``'s header as the real file has it (the bracketed names hold commas: 11 fields).
NIH_DATA_ENTRY_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                         "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
# Shares of NIH's labels as xraylib's tasks see them: about 54% "No Finding", 1.3% with Pneumonia, the rest other findings.
_NIH_FINDINGS = ("No Finding",) * 27 + ("Pneumonia", "Infiltration|Pneumonia") + ("Effusion",) * 11 + ("Atelectasis",) * 11


def write_nih_layout(folder: Path, n: int, size: int = 64, seed: int = 0, images_per_patient: int = 3) -> Path:
    """``n`` distinct ``size`` x ``size`` 8-bit gray PNGs in NIH ChestX-ray14's layout: ``images/00000001_000.png``
    (patient 1, follow-up 0) and ``Data_Entry_2017.csv`` with the real columns. For scale tests and benchmarks:
    a few phantoms made once, each file told apart by its first row's pixels (so no two share bytes), written
    without decoding anything. Returns ``folder``.
    """
    folder = Path(folder)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bases = [make_phantom("normal", rng, size, size).image for _ in range(4)]
    lines = [NIH_DATA_ENTRY_HEADER]
    for i in range(n):
        patient, follow_up = divmod(i, images_per_patient)
        name = f"{patient + 1:08d}_{follow_up:03d}.png"
        pixels = bases[i % len(bases)].copy()
        pixels[0, :8] = np.frombuffer(i.to_bytes(8, "big"), dtype=np.uint8)
        _save_image(images / name, pixels)
        lines.append(f"{name},{_NIH_FINDINGS[i % len(_NIH_FINDINGS)]},{follow_up},{patient + 1},"
                     f"{20 + patient % 60},{'MF'[patient % 2]},{'PA' if i % 3 else 'AP'},2500,2048,0.143,0.143")
    (folder / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    return folder
