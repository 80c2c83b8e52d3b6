"""xraylib.synthetic: the sample layouts match the real ones, byte-identical for the same seed."""
from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from xraylib import sample_layouts, sources, synthetic
from xraylib.errors import ConfigError
from xraylib.synthetic import write_sample_data

# The real first line of ieee8023 metadata.csv, trailing empty column included.
COVID_HEADER = (
    "patientid,offset,sex,age,finding,survival,intubated,intubation_present,went_icu,in_icu,"
    "needed_supplemental_O2,extubated,temperature,pO2_saturation,leukocyte_count,neutrophil_count,"
    "lymphocyte_count,view,modality,date,location,folder,filename,doi,url,license,clinical_notes,"
    "other_notes,"
)
RSNA_LABELS_HEADER = "patientId,x,y,width,height,Target"
RSNA_CLASSES_HEADER = "patientId,class"
# Kaggle file names: IM-0115-0001.jpeg, NORMAL2-IM-0851-0001-0002.jpeg, person1_bacteria_1.jpeg.
KAGGLE_NORMAL = re.compile(r"^(?:NORMAL2-)?(IM-\d{4})-\d{4}(?:-\d{4})?\.jpeg$")
KAGGLE_PNEUMONIA = re.compile(r"^(person\d+)_(?:bacteria|virus)_\d+\.jpeg$")
# NLM file names: CHNCXR_0001_0.png, MCUCXR_0104_1.png (suffix 0 normal, 1 tuberculosis).
NLM_NAME = re.compile(r"^(CHNCXR|MCUCXR)_\d{4}_[01]\.png$")
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")

SMALL = dict(n_patients=12, seed=1, image_size=128)


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha1(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _display(path: Path) -> np.ndarray:
    """A DICOM the way a correct reader shows it: modality LUT, VOI LUT, MONOCHROME1 inverted, [0, 1]."""
    ds = pydicom.dcmread(path)
    pixels = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        pixels = pixels.max() - pixels
    return (pixels - pixels.min()) / max(np.ptp(pixels), 1e-9)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> synthetic.SampleData:
    return write_sample_data(tmp_path_factory.mktemp("small") / "sample", **SMALL)


@pytest.fixture(scope="module")
def default(tmp_path_factory: pytest.TempPathFactory) -> tuple[synthetic.SampleData, float]:
    start = time.perf_counter()
    sample = write_sample_data(tmp_path_factory.mktemp("default") / "sample")
    return sample, time.perf_counter() - start


# ---- ieee8023 covid-chestxray-dataset -------------------------------------------------------------


def test_covid_metadata_has_the_real_header_and_parses(small: synthetic.SampleData) -> None:
    path = small.covid_chestxray_dataset / "metadata.csv"
    assert path.read_text(encoding="utf-8").splitlines()[0] == COVID_HEADER
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert list(frame.columns) == COVID_HEADER.split(",")[:-1] + ["Unnamed: 28"]
    assert (frame["Unnamed: 28"] == "").all()
    assert frame["patientid"].str.fullmatch(r"\d+").all()
    assert frame["patientid"].nunique() == SMALL["n_patients"]
    assert frame.groupby("patientid").size().max() >= 2, "several images per patient"
    assert set(frame["finding"]) <= {"COVID-19", "No Finding", "Streptococcus", "SARS", "Pneumocystis", "Klebsiella"}
    assert "COVID-19" in set(frame["finding"])
    assert set(frame["modality"]) == {"X-ray", "CT"}
    xray = frame[frame["modality"] == "X-ray"]
    assert set(xray["view"]) <= {"PA", "AP", "AP Supine", "L"} and "PA" in set(xray["view"])
    assert set(frame["sex"]) <= {"M", "F", ""}
    ages = pd.to_numeric(frame["age"].replace("", np.nan))
    assert ages.dropna().between(25, 90).all()
    assert (frame["folder"] == "images").all()
    for _, rows in frame[frame["offset"] != ""].groupby("patientid"):
        offsets = rows["offset"].astype(int).tolist()
        assert offsets == sorted(offsets)


def test_every_covid_row_points_to_an_image_that_decodes(small: synthetic.SampleData) -> None:
    frame = pd.read_csv(small.covid_chestxray_dataset / "metadata.csv", dtype=str, keep_default_na=False)
    shapes, channels = set(), set()
    for _, row in frame.iterrows():
        path = small.covid_chestxray_dataset / row["folder"] / row["filename"]
        assert path.suffix in {".jpg", ".jpeg", ".png"}
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert image is not None, path
        shapes.add(image.shape[:2])
        channels.add(1 if image.ndim == 2 else image.shape[2])
        assert 0.8 * SMALL["image_size"] < image.shape[0] < 1.4 * SMALL["image_size"]
    assert len(shapes) > 3, "image sizes vary"
    files = {p.name for p in (small.covid_chestxray_dataset / "images").iterdir()}
    assert files == set(frame["filename"]), "no orphan files"


def test_default_covid_layout_mixes_formats_views_and_colour(default: tuple[synthetic.SampleData, float]) -> None:
    sample, _ = default
    frame = pd.read_csv(sample.covid_chestxray_dataset / "metadata.csv", dtype=str, keep_default_na=False)
    assert {Path(name).suffix for name in frame["filename"]} == {".jpg", ".jpeg", ".png"}
    assert set(frame.loc[frame["modality"] == "X-ray", "view"]) == {"PA", "AP", "AP Supine", "L"}
    assert (frame["view"] == "PA").sum() > len(frame) / 3
    per_patient = frame.drop_duplicates("patientid")["finding"].value_counts()
    assert per_patient["COVID-19"] == 21 and per_patient["No Finding"] == 3
    colour = [
        cv2.imread(str(sample.covid_chestxray_dataset / "images" / name), cv2.IMREAD_UNCHANGED).ndim == 3
        for name in frame["filename"]
    ]
    assert 0 < sum(colour) < len(colour) / 2, "mostly grayscale, some 3-channel"


# ---- RSNA ------------------------------------------------------------------------------------


def test_rsna_csvs_have_the_real_headers_and_agree(small: synthetic.SampleData) -> None:
    root = small.rsna_pneumonia
    assert (root / "stage_2_train_labels.csv").read_text().splitlines()[0] == RSNA_LABELS_HEADER
    assert (root / "stage_2_detailed_class_info.csv").read_text().splitlines()[0] == RSNA_CLASSES_HEADER
    labels = pd.read_csv(root / "stage_2_train_labels.csv")
    classes = pd.read_csv(root / "stage_2_detailed_class_info.csv")
    # One class row per label row, in the same order, as in the real files.
    assert labels["patientId"].tolist() == classes["patientId"].tolist()
    assert ((labels["Target"] == 1) == (classes["class"] == "Lung Opacity")).all()
    assert set(classes["class"]) == set(sample_layouts.RSNA_CLASSES)
    assert labels.loc[labels["Target"] == 0, ["x", "y", "width", "height"]].isna().all().all()
    assert labels.groupby("patientId").size().max() <= 2
    assert labels["patientId"].str.fullmatch(UUID4).all()


def test_rsna_dicoms_follow_the_rsna_header_layout(small: synthetic.SampleData) -> None:
    root = small.rsna_pneumonia
    labels = pd.read_csv(root / "stage_2_train_labels.csv")
    classes = pd.read_csv(root / "stage_2_detailed_class_info.csv")
    files = sorted((root / "stage_2_train_images").glob("*.dcm"))
    assert {p.stem for p in files} == set(labels["patientId"]) == set(classes["patientId"])
    photometric, bits = set(), set()
    for path in files:
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
        assert ds.PatientID == path.stem == str(ds.PatientName)
        assert (ds.Modality, ds.BodyPartExamined, ds.ConversionType) == ("CR", "CHEST", "WSD")
        assert ds.ViewPosition in {"PA", "AP"} and ds.PatientSex in {"M", "F"}
        assert ds.PatientAge.isdigit() and 18 <= int(ds.PatientAge) <= 90
        assert ds.SamplesPerPixel == 1 and ds.PixelRepresentation == 0
        assert ds.SOPInstanceUID.startswith("1.2.826.0.1.3680043.8.498.") and len(ds.SOPInstanceUID) <= 64
        pixels = ds.pixel_array
        assert pixels.shape == (SMALL["image_size"], SMALL["image_size"])
        if ds.BitsAllocated == 16:
            assert (ds.BitsStored, pixels.dtype, int(pixels.max()) <= 4095) == (12, np.uint16, True)
        photometric.add(ds.PhotometricInterpretation)
        bits.add(int(ds.BitsAllocated))
        # Decoded correctly, every file shows X-ray convention: the air above the shoulders is
        # darker than the abdomen below the diaphragm. A reader that skips MONOCHROME1 fails this.
        image = _display(path)
        n = image.shape[0]
        assert image[: n // 10, : n // 10].mean() + 0.2 < image[-n // 6 :, n // 3 : 2 * n // 3].mean()
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}
    assert bits == {8, 16}


def test_rsna_default_counts_and_windowed_16_bit_files(default: tuple[synthetic.SampleData, float]) -> None:
    sample, _ = default
    classes = pd.read_csv(sample.rsna_pneumonia / "stage_2_detailed_class_info.csv").drop_duplicates("patientId")
    assert classes["class"].value_counts().to_dict() == {
        "Normal": 11, "Lung Opacity": 9, "No Lung Opacity / Not Normal": 10,
    }
    files = (sample.rsna_pneumonia / "stage_2_train_images").glob("*.dcm")
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    assert sum(ds.PhotometricInterpretation == "MONOCHROME1" for ds in headers) == 6
    assert sum(ds.BitsAllocated == 16 for ds in headers) == 8
    assert any("RescaleSlope" in ds and "WindowCenter" in ds for ds in headers)
    assert any(ds.BitsAllocated == 16 and "RescaleSlope" not in ds for ds in headers)


def test_lung_opacity_boxes_surround_a_bright_region_inside_the_image(small: synthetic.SampleData) -> None:
    root = small.rsna_pneumonia
    labels = pd.read_csv(root / "stage_2_train_labels.csv")
    boxes = labels[labels["Target"] == 1]
    assert len(boxes) >= 1
    for _, box in boxes.iterrows():
        image = _display(root / "stage_2_train_images" / f"{box['patientId']}.dcm")
        x, y, w, h = (int(box[k]) for k in ("x", "y", "width", "height"))
        assert x >= 0 and y >= 0 and w > 5 and h > 5
        assert x + w <= image.shape[1] and y + h <= image.shape[0]
        assert image[y : y + h, x : x + w].mean() > 0.3


# ---- Kaggle chest-xray-pneumonia -------------------------------------------------------------


def _kaggle_patients(root: Path) -> dict[str, set[str]]:
    patients: dict[str, set[str]] = {}
    for path in sorted((root / "chest_xray").glob("*/*/*")):
        split, cls = path.parent.parent.name, path.parent.name
        pattern = KAGGLE_NORMAL if cls == "NORMAL" else KAGGLE_PNEUMONIA
        match = pattern.match(path.name)
        assert match, f"{cls}/{path.name} does not follow the Kaggle naming"
        patients.setdefault(split, set()).add(match.group(1))
    return patients


def test_kaggle_layout_names_and_patient_disjoint_splits(default: tuple[synthetic.SampleData, float]) -> None:
    sample, _ = default
    root = sample.chest_xray_pneumonia
    assert (root / "chest_xray").is_dir()
    assert {p.relative_to(root / "chest_xray").as_posix() for p in (root / "chest_xray").glob("*/*")} == {
        f"{split}/{cls}" for split in ("train", "test", "val") for cls in ("NORMAL", "PNEUMONIA")
    }
    patients = _kaggle_patients(root)
    assert not patients["train"] & patients["test"]
    assert not patients["train"] & patients["val"] and not patients["test"] & patients["val"]
    count = lambda folder: len(list((root / "chest_xray" / folder).iterdir()))  # noqa: E731
    assert count("train/PNEUMONIA") > count("train/NORMAL")
    assert count("val/NORMAL") + count("val/PNEUMONIA") < count("test/NORMAL") + count("test/PNEUMONIA")
    names = [p.name for p in (root / "chest_xray").glob("*/NORMAL/*")]
    assert any(n.startswith("NORMAL2-") for n in names) and any(n.startswith("IM-") for n in names)
    assert any(re.search(r"-0001-000\d\.jpeg$", n) for n in names), "a patient with several images"


def test_kaggle_images_are_jpegs_of_children_mostly_grayscale(small: synthetic.SampleData) -> None:
    files = sorted((small.chest_xray_pneumonia / "chest_xray").glob("*/*/*.jpeg"))
    images = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in files]
    assert all(image is not None for image in images)
    assert sum(image.ndim == 2 for image in images) > len(images) / 2
    assert all(image.shape[1] >= image.shape[0] for image in images), "landscape, like the Kaggle films"


# ---- NLM tuberculosis sets ---------------------------------------------------------------------


def test_nlm_layouts_hold_normals_tuberculosis_and_both_reading_formats(small: synthetic.SampleData) -> None:
    for folder, prefix, first_line, depth in (
        (small.nlm_shenzhen, "CHNCXR", re.compile(r"^(?:male|female) \d+yrs$|^(?:Male|Female) \d+Y$"), np.uint8),
        (small.nlm_montgomery, "MCUCXR", re.compile(r"^Patient's Sex: [MF]$"), np.uint16),
    ):
        names = sorted(p.name for p in (folder / "CXR_png").iterdir())
        assert all(NLM_NAME.match(name) and name.startswith(prefix) for name in names)
        suffixes = [name[-5] for name in names]
        assert suffixes.count("1") >= 1 and suffixes.count("0") >= 2 and len(names) == 4  # a third of 12 patients
        images = [cv2.imread(str(folder / "CXR_png" / name), cv2.IMREAD_UNCHANGED) for name in names]
        assert all(image is not None and image.dtype == depth for image in images)
        readings = sorted((folder / "ClinicalReadings").glob("*.txt"))
        assert readings and all(first_line.match(r.read_text().splitlines()[0]) for r in readings)
        table = next(s for s in sources.SOURCES if s.folder.endswith(folder.name)).reader(folder)
        assert len(table.rows) == suffixes.count("0") and sum(table.excluded.values()) == suffixes.count("1")
        with_reading = table.rows["image_id"].map(lambda n: (folder / "ClinicalReadings" / n.replace(".png", ".txt")).exists())
        assert table.rows.loc[with_reading, "age"].between(18, 80).all() and table.rows.loc[with_reading, "sex"].isin(["M", "F"]).all()
    assert small.counts["nlm-tb/MontgomerySet"]["patients"] == 4


# ---- writer behaviour ------------------------------------------------------------------------


def test_default_call_is_fast_and_its_json_matches_the_files(default: tuple[synthetic.SampleData, float]) -> None:
    sample, seconds = default
    assert seconds < 15, f"default sample data took {seconds:.1f} s"
    info = json.loads((sample.root / "SAMPLE_DATA.json").read_text())
    assert info["parameters"] == {"n_patients": 30, "seed": 0, "image_size": 320, "shortcut_marker": None}
    assert info["counts"] == sample.counts
    kaggle = sample.counts["chest-xray-pneumonia"]["images"]
    for folder, n in kaggle.items():
        assert len(list((sample.chest_xray_pneumonia / "chest_xray" / folder).iterdir())) == n
    covid = sample.counts["covid-chestxray-dataset"]
    assert covid["image_files"] == len(list((sample.covid_chestxray_dataset / "images").iterdir()))
    assert covid["rows"] == len(pd.read_csv(sample.covid_chestxray_dataset / "metadata.csv"))
    assert sample.counts["rsna-pneumonia"]["patients"] == 30


def test_same_arguments_write_identical_bytes_and_another_seed_differs(
    tmp_path: Path, small: synthetic.SampleData
) -> None:
    again = write_sample_data(tmp_path / "again", **SMALL)
    other = write_sample_data(tmp_path / "other", **{**SMALL, "seed": 2})
    reference = _file_hashes(small.root)
    assert len(reference) > 50
    assert _file_hashes(again.root) == reference
    different = _file_hashes(other.root)
    assert different["covid-chestxray-dataset/metadata.csv"] != reference["covid-chestxray-dataset/metadata.csv"]
    assert different["rsna-pneumonia/stage_2_train_labels.csv"] != reference["rsna-pneumonia/stage_2_train_labels.csv"]
    assert len(set(different.values()) & set(reference.values())) < 0.1 * len(reference)


def test_second_call_with_same_arguments_rewrites_nothing(tmp_path: Path) -> None:
    first = write_sample_data(tmp_path / "sample", n_patients=5, seed=3, image_size=96)
    stamps = {p: p.stat().st_mtime_ns for p in first.root.rglob("*")}
    second = write_sample_data(tmp_path / "sample", n_patients=5, seed=3, image_size=96)
    assert second == first
    assert {p: p.stat().st_mtime_ns for p in second.root.rglob("*")} == stamps
    # Other arguments replace the old sample data, and no temporary folder is left behind.
    third = write_sample_data(tmp_path / "sample", n_patients=6, seed=3, image_size=96)
    assert json.loads((third.root / "SAMPLE_DATA.json").read_text())["parameters"]["n_patients"] == 6
    assert third.counts["rsna-pneumonia"]["patients"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample"]


def test_refuses_a_folder_that_is_not_sample_data(tmp_path: Path) -> None:
    dest = tmp_path / "my_data"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        write_sample_data(dest, n_patients=4, image_size=96)
    assert [p.name for p in dest.iterdir()] == ["notes.txt"]
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigError, match="file"):
        write_sample_data(tmp_path / "a_file", n_patients=4, image_size=96)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (write_sample_data(empty, n_patients=4, image_size=96).root / "SAMPLE_DATA.json").is_file()


def test_an_interrupted_write_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args: object, **kwargs: object) -> dict:
        raise KeyboardInterrupt

    kaggle_crashes = [replace(s, sample_writer=crash) if s.name == "kaggle" else s for s in sources.SOURCES]
    monkeypatch.setattr(sources, "SOURCES", tuple(kaggle_crashes))
    with pytest.raises(KeyboardInterrupt):
        write_sample_data(tmp_path / "sample", n_patients=4, image_size=96)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "arguments",
    [{"n_patients": 0}, {"n_patients": 2.5}, {"seed": -1}, {"image_size": 16}, {"shortcut_marker": "R"}],
)
def test_bad_arguments_are_config_errors(tmp_path: Path, arguments: dict) -> None:
    with pytest.raises(ConfigError, match=next(iter(arguments))):
        write_sample_data(tmp_path / "sample", **arguments)


def test_shortcut_marker_changes_only_the_marked_class(tmp_path: Path, small: synthetic.SampleData) -> None:
    marked = write_sample_data(tmp_path / "marked", **{**SMALL, "shortcut_marker": "covid"})
    plain, with_marker = _file_hashes(small.root), _file_hashes(marked.root)
    assert plain.keys() == with_marker.keys()
    changed = {name for name in plain if plain[name] != with_marker[name]}
    frame = pd.read_csv(small.covid_chestxray_dataset / "metadata.csv", dtype=str, keep_default_na=False)
    covid_files = {f"covid-chestxray-dataset/images/{n}" for n in frame.loc[frame["finding"] == "COVID-19", "filename"]}
    assert changed == covid_files | {"SAMPLE_DATA.json"}
    for name in sorted(covid_files)[:5]:
        image = cv2.imread(str(marked.root / name), cv2.IMREAD_GRAYSCALE)
        h, w = image.shape
        assert image[: h // 5, : w // 5].max() > 240


# ---- against the real data, where ../shared/data is present ----------------------------------


@pytest.mark.shared_data
def test_headers_and_name_patterns_match_the_real_data(shared_data: Path) -> None:
    with open(shared_data / "covid-chestxray-dataset" / "metadata.csv", encoding="latin-1") as f:
        assert f.readline().rstrip("\r\n") == COVID_HEADER
    with open(shared_data / "rsna-pneumonia" / "stage_2_train_labels.csv") as f:
        assert f.readline().rstrip("\r\n") == RSNA_LABELS_HEADER
    with open(shared_data / "rsna-pneumonia" / "stage_2_detailed_class_info.csv") as f:
        assert f.readline().rstrip("\r\n") == RSNA_CLASSES_HEADER
    assert all(NLM_NAME.match(p.name) for p in (shared_data / "nlm-tb" / "ChinaSet_AllFiles" / "CXR_png").iterdir())
    patients = _kaggle_patients(shared_data / "chest-xray-pneumonia")
    assert patients["train"] and patients["test"]
    real = pydicom.dcmread(next((shared_data / "dicom-samples").glob("1.2.*.dcm")), stop_before_pixels=True)
    assert (real.Modality, real.BodyPartExamined, real.ConversionType, real.SOPClassUID) == (
        "CR", "CHEST", "WSD", pydicom.uid.SecondaryCaptureImageStorage,
    )


# --------------------------------------------------------------------------------------------
# A deliberately shifted new site (calibration's test data)


def test_a_shifted_site_is_deterministic_and_shifted(tmp_path):
    from xraylib import phantoms

    first = synthetic.write_site_images(tmp_path / "a", 4, 2, seed=3)
    again = synthetic.write_site_images(tmp_path / "b", 5, 2, seed=3)  # more images keep the first ones
    assert first.counts == {"normal": 4, "covid": 2} and first.normals == tmp_path / "a" / "normal"
    for path in sorted(first.root.rglob("*.png")):
        assert path.read_bytes() == (again.root / path.relative_to(first.root)).read_bytes(), path
    other = synthetic.write_site_images(tmp_path / "c", 4, seed=4)
    assert (other.normals / "site_normal_0000.png").read_bytes() != (first.normals / "site_normal_0000.png").read_bytes()
    image = cv2.imread(str(first.normals / "site_normal_0000.png"), cv2.IMREAD_GRAYSCALE)
    border = max(1, int(round(phantoms.SiteShift().border * image.shape[0])) - 1)
    assert image[:border].max() == 0 and image[:, :border].max() == 0 and image[-border:].max() == 0
    plain = phantoms.make_phantom("normal", np.random.default_rng(0), 120, 100).image
    assert np.array_equal(phantoms.apply_site_shift(plain, phantoms.NO_SHIFT), plain)
    brighter = phantoms.apply_site_shift(plain, phantoms.SiteShift(gamma=0.6, border=0, text=None))
    assert brighter.mean() > plain.mean() + 10
    with pytest.raises(ConfigError, match="gamma"):
        phantoms.SiteShift(gamma=0)
    with pytest.raises(ConfigError, match="positive_label"):
        synthetic.write_site_images(tmp_path / "d", 2, positive_label="normal")
