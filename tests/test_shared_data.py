"""The readers, the manifest, the split and preprocessing on the real data in ../shared/data.

The numbers are the ones /work/shared/README.md and data/PROVENANCE.md document. Every test takes
the ``shared_data`` fixture, which skips with a message where the folder is absent.
"""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from xraylib import config
from xraylib.manifest import MANIFEST_COLUMNS, Manifest, build_manifest
from xraylib.preprocess import PreprocessSettings, preprocess_dataset, preprocess_file
from xraylib.sources import read_covid_chestxray, read_rsna, read_rsna_labels
from xraylib.split import patients_in_several_splits, split_by_image, split_by_patient

pytestmark = pytest.mark.shared_data


@functools.lru_cache(maxsize=None)
def real_manifest(data_root: Path, task: str, views: tuple[str, ...] | None = None) -> Manifest:
    """Built once per session and task (about a second each); tests must not modify the frame."""
    drive_paths = config.folder_drive_paths(data_root, Path(tempfile.gettempdir()) / "xraylib-unused-output")
    return build_manifest(drive_paths, task=task, views=views, progress=False)


def source_rows(manifest: Manifest, source: str) -> pd.DataFrame:
    return manifest.frame[manifest.frame["source"] == source]


def test_ieee8023_reader_counts(shared_data):
    root = shared_data / "covid-chestxray-dataset"
    raw = pd.read_csv(root / "metadata.csv", dtype=str, encoding_errors="replace")
    assert len(raw) == 575 and len(raw.columns) == 29 and (raw["modality"] == "X-ray").all()
    table = read_covid_chestxray(root)
    assert table.problems == []
    assert table.excluded == {"finding not used: ARDS": 4}
    assert len(table.rows) == 571
    assert table.rows["path"].nunique() == 566  # 570 image files, 4 of them only named by ARDS rows


def test_covid_counts_in_the_covid_vs_normal_manifest(shared_data):
    manifest = real_manifest(shared_data, "covid_vs_normal")
    assert list(manifest.frame.columns) == MANIFEST_COLUMNS
    ieee = source_rows(manifest, "ieee8023")
    covid = ieee[ieee["label"] == "covid"]
    assert len(covid) == 451 and covid["patient_id"].nunique() == 258
    assert covid["view"].value_counts().to_dict() == {"PA": 216, "AP Supine": 120, "AP": 91, "L": 24}
    assert covid["finding"].value_counts().to_dict() == {"COVID-19": 439, "COVID-19, ARDS": 12}
    # The seeds' filter, on the manifest's own columns.
    seeds = ieee[(ieee["finding"] == "COVID-19") & (ieee["view"] == "PA")]
    assert len(seeds) == 205 and seeds["patient_id"].nunique() == 142
    normal = ieee[ieee["label"] == "normal"]
    assert len(normal) == 19 and normal["patient_id"].nunique() == 16
    assert (normal["finding"] == "No Finding").all()
    assert manifest.report.duplicates == []


def test_default_views_drop_the_lateral_covid_images(shared_data):
    manifest = real_manifest(shared_data, "covid_vs_normal", ("PA", "AP", "AP Supine"))
    covid = source_rows(manifest, "ieee8023").query("label == 'covid'")
    assert len(covid) == 451 - 24 and "L" not in set(covid["view"])
    assert manifest.report.per_source["ieee8023"]["excluded"]["view L"] == 24


def test_three_class_manifest_and_its_duplicates(shared_data):
    manifest = real_manifest(shared_data, "covid_pneumonia_normal")
    ieee = source_rows(manifest, "ieee8023")
    assert ieee["label"].value_counts().to_dict() == {"covid": 451, "pneumonia": 96, "normal": 19}
    # ieee8023 lists five pneumonia images twice, under patients 285/339 and 287/340: the same files.
    # The manifest keeps each file once; no two different files in ../shared/data share bytes.
    duplicates = manifest.report.duplicates
    assert len(duplicates) == 5
    for group in duplicates:
        assert [d["path"] for d in group["dropped"]] == [group["kept"]["path"]]
    assert manifest.frame["path"].is_unique and manifest.frame["sha1"].is_unique
    assert manifest.report.per_source["ieee8023"]["excluded"]["duplicate image (same bytes as a kept one)"] == 5
    for column in ("width", "height", "channels", "bit_depth"):
        assert pd.api.types.is_integer_dtype(manifest.frame[column])
    assert set(manifest.frame["file_format"]) == {"png", "jpeg"}


def test_kaggle_counts_per_folder(shared_data):
    kaggle = source_rows(real_manifest(shared_data, "covid_pneumonia_normal"), "kaggle")
    per_folder = kaggle.groupby(["source_split", "label"])
    assert per_folder.size().to_dict() == {("train", "normal"): 176, ("train", "pneumonia"): 46,
                                           ("test", "normal"): 44, ("test", "pneumonia"): 14}
    assert per_folder["patient_id"].nunique().to_dict() == {("train", "normal"): 158, ("train", "pneumonia"): 34,
                                                            ("test", "normal"): 40, ("test", "pneumonia"): 9}
    # Kaggle's folders are patient-disjoint once NORMAL2- is ignored.
    assert patients_in_several_splits(kaggle.rename(columns={"source_split": "split"})) == []
    assert kaggle["view"].isna().all()


def test_nih_counts(shared_data):
    nih = source_rows(real_manifest(shared_data, "covid_vs_normal"), "nih")
    assert len(nih) == 110 and nih["patient_id"].nunique() == 110
    assert (nih["label"] == "normal").all()
    assert nih["age"].min() == 18 and nih["age"].max() == 82
    assert set(nih["view"]) <= {"PA", "AP"} and set(nih[["width", "height"]].stack()) == {1024}


def test_rsna_labels_and_the_missing_dicoms(shared_data):
    root = shared_data / "rsna-pneumonia"
    labels = read_rsna_labels(root)
    assert len(labels) == 26_684 and labels["patientId"].is_unique
    assert labels["class"].value_counts().to_dict() == {
        "No Lung Opacity / Not Normal": 11_821, "Normal": 8_851, "Lung Opacity": 6_012}
    assert ((labels["class"] == "Lung Opacity") == (labels["target"] == 1)).all()
    assert labels["n_boxes"].sum() == 9_555 and labels["n_boxes"].max() > 1
    # No DICOMs are shipped: the reader says so and carries on.
    table = read_rsna(root)
    assert table.rows.empty
    assert table.excluded == {"RSNA class not used: No Lung Opacity / Not Normal": 11_821}
    [(where, reason)] = table.problems
    assert "stage_2_train_images" in where and reason == "14863 labelled patientIds have no DICOM file"


def test_patient_level_split_of_the_real_manifest(shared_data):
    frame = real_manifest(shared_data, "covid_pneumonia_normal").frame
    split = split_by_patient(frame, seed=42)
    assert patients_in_several_splits(split) == []
    assert split.groupby(["split", "source"]).size().unstack().notna().all().all()  # every source in every split
    # The seeds' image-level split of the same images puts patients on both sides.
    covid = frame[frame["label"] == "covid"]
    assert len(patients_in_several_splits(split_by_image(covid, test_fraction=0.2, seed=42))) > 20


def test_preprocess_real_images(shared_data, tmp_path):
    frame = real_manifest(shared_data, "covid_pneumonia_normal").frame
    ieee = frame[frame["source"] == "ieee8023"].sort_values("path")
    picks = [
        ieee[(ieee["file_format"] == "png") & (ieee["channels"] == 4)].head(8),   # RGBA PNG
        ieee[(ieee["file_format"] == "png") & (ieee["channels"] == 3)].head(6),   # RGB PNG
        ieee[(ieee["file_format"] == "png") & (ieee["channels"] == 1)].head(2),   # gray PNG
        ieee[(ieee["file_format"] == "jpeg") & (ieee["channels"] == 3)].head(8),  # RGB JPEG
        ieee[(ieee["file_format"] == "jpeg") & (ieee["channels"] == 1)].head(4),  # gray JPEG
        frame[frame["source"] == "kaggle"].sort_values("path").head(6),
        frame[frame["source"] == "nih"].sort_values("path").head(6),
    ]
    subset = pd.concat(picks, ignore_index=True)
    assert len(subset) == 40 and subset["path"].is_unique
    split = split_by_patient(subset, fractions=(0.6, 0.2, 0.2), seed=0)
    settings = PreprocessSettings(image_size=64, resize="pad")
    data = preprocess_dataset(split, tmp_path / "cache", ("normal", "pneumonia", "covid"), settings,
                              workers=1, progress=False)
    assert data.report["problems"] == [] and data.report["new"] == 40
    assert sum(len(s) for s in data.splits.values()) == 40
    for part in data.splits.values():
        assert part.images.dtype == np.uint8 and part.images.shape[1:] == (64, 64)
        for i, row in enumerate(part.manifest.itertuples()):
            image = np.asarray(part.images[i])
            assert image.std() > 5, f"{row.path} came out flat"
            if i < 3:
                np.testing.assert_array_equal(image, preprocess_file(row.path, settings))
