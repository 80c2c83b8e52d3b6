"""build_manifest over all four sources written in their real layouts, and what it reports."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from conftest import write_dicom, write_raster
from test_sources import (
    DEFAULT_IEEE_ROWS, DEFAULT_KAGGLE, DEFAULT_RSNA, IeeeRow, RsnaPatient, image_pixels, make_all_sources,
    make_ieee8023, make_kaggle, make_rsna,
)
from xraylib import config
from xraylib.errors import ConfigError, SourceError
from xraylib.manifest import (
    MANIFEST_COLUMNS, build_manifest, copy_images, counts_table, load_manifest, save_manifest,
)

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR AS")

RSNA_P1, RSNA_P2, RSNA_N1, RSNA_N2, RSNA_X1, RSNA_CT = (p.patient_id for p in DEFAULT_RSNA)

# (source, label) -> images in the default tree with views=None, 3-class task.
ALL_COUNTS = {
    ("ieee8023", "covid"): 4, ("ieee8023", "normal"): 1, ("ieee8023", "pneumonia"): 2,
    ("kaggle", "normal"): 5, ("kaggle", "pneumonia"): 4,
    ("nih", "normal"): 2, ("nih", "pneumonia"): 2,
    ("rsna", "normal"): 2, ("rsna", "pneumonia"): 2,
}


@pytest.fixture
def sources(tmp_path) -> dict[str, Path]:
    return make_all_sources(tmp_path / "drive")


def build(sources, **kwargs):
    kwargs.setdefault("task", "covid_pneumonia_normal")
    kwargs.setdefault("views", None)
    return build_manifest(sources, progress=False, workers=4, **kwargs)


def counts(frame: pd.DataFrame) -> dict:
    return frame.groupby(["source", "label"]).size().to_dict()


def as_values(frame: pd.DataFrame) -> pd.DataFrame:
    """Every cell as a Python object, missing values as None."""
    return frame.astype(object).where(frame.notna(), None)


def tree_snapshot(root: Path) -> dict[str, tuple]:
    """Every file under ``root``: (sha1, size, mtime_ns)."""
    return {str(p.relative_to(root)): (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_manifest_from_all_sources(sources):
    manifest = build(sources)
    frame = manifest.frame
    assert list(frame.columns) == MANIFEST_COLUMNS
    assert counts(frame) == ALL_COUNTS
    assert frame["path"].is_unique and frame["sha1"].str.fullmatch(r"[0-9a-f]{40}").all()
    assert frame["path"].map(lambda p: Path(p).is_file()).all()
    assert frame.groupby("source")["file_format"].unique().map(sorted).to_dict() == {
        "ieee8023": ["jpeg", "png"], "kaggle": ["jpeg"], "nih": ["png"], "rsna": ["dicom"]}
    assert frame.set_index("image_id").loc["IM-0115-0001.jpeg", ["width", "height", "channels", "bit_depth"]].tolist() == [96, 80, 1, 8]
    # Sorted by source, patient, path, so that a rebuilt manifest diffs cleanly.
    assert frame.equals(frame.sort_values(["source", "patient_id", "path"]).reset_index(drop=True))
    report = manifest.report
    assert report.per_source["kaggle"]["kept"] == 9 and report.per_source["kaggle"]["patients"] == 7
    assert report.per_source["ieee8023"]["kept_by_label"] == {"covid": 4, "normal": 1, "pneumonia": 2}
    assert report.per_source["ieee8023"]["excluded"] == {
        "finding not used: ARDS": 1, "finding not used: Tuberculosis": 1, "modality CT": 1}
    assert report.problems == [] and report.duplicates == []
    assert counts_table(frame).set_index(["source", "label"])["patients"].to_dict()[("kaggle", "normal")] == 4


def test_file_columns_are_numbers_even_when_a_source_has_no_images(sources):
    # As in ../shared/data: the RSNA label files without the images folder.
    rsna = sources["rsna_pneumonia"]
    shutil.rmtree(rsna / "stage_2_train_images")
    manifest = build(sources)
    frame = manifest.frame
    assert "rsna" not in set(frame["source"]) and manifest.report.per_source["rsna"]["kept"] == 0
    for column in ("width", "height", "channels", "bit_depth"):
        assert pd.api.types.is_integer_dtype(frame[column]), (column, frame[column].dtype)
    assert pd.api.types.is_float_dtype(frame["age"])
    [(where, reason)] = manifest.report.problems
    assert "folder not found" in where and "5 labelled patientIds have no DICOM file" in reason


def test_drive_paths_and_a_plain_mapping_give_the_same_manifest(sources, tmp_path):
    drive_paths = config.folder_drive_paths(tmp_path / "drive", tmp_path / "out")
    pd.testing.assert_frame_equal(build(drive_paths).frame, build(sources).frame)


@pytest.mark.parametrize("task, expected", [
    ("covid_vs_normal", {("ieee8023", "covid"): 4, ("ieee8023", "normal"): 1, ("kaggle", "normal"): 5,
                         ("nih", "normal"): 2, ("rsna", "normal"): 2}),
    ("pneumonia_vs_normal", {("ieee8023", "normal"): 1, ("ieee8023", "pneumonia"): 2, ("kaggle", "normal"): 5,
                             ("kaggle", "pneumonia"): 4, ("nih", "normal"): 2, ("nih", "pneumonia"): 2,
                             ("rsna", "normal"): 2, ("rsna", "pneumonia"): 2}),
    ("covid_pneumonia_normal", ALL_COUNTS),
])
def test_task_keeps_only_its_classes(sources, task, expected):
    manifest = build(sources, task=task)
    assert counts(manifest.frame) == expected
    if task == "covid_vs_normal":
        assert manifest.report.per_source["kaggle"]["excluded"] == {"label 'pneumonia' not in task covid_vs_normal": 4}
        assert manifest.report.classes == ("normal", "covid")


def test_default_views_drop_lateral_and_views_none_keeps_it(sources):
    default = build(sources, views=("PA", "AP", "AP Supine")).frame
    assert "covid-3-l.png" not in set(default["image_id"])
    assert "covid-3-l.png" in set(build(sources, views=None).frame["image_id"])


def test_pa_only_filters_csv_views_and_dicom_header_views(sources):
    manifest = build(sources, views=("PA",))
    frame = manifest.frame
    assert set(frame["view"].dropna()) == {"PA"}
    assert set(frame.loc[frame["source"] == "ieee8023", "image_id"]) == {"covid-1-pa.png", "normal-4-pa.png", "strep-5-pa.jpg"}
    # RSNA's view is only in the DICOM header: the AP ones go after the header is read.
    assert set(frame.loc[frame["source"] == "rsna", "image_id"]) == {RSNA_P1, RSNA_N1}
    assert manifest.report.per_source["rsna"]["excluded"]["view AP"] == 2
    # Kaggle records no view: kept by default.
    assert (frame["source"] == "kaggle").sum() == 9


def test_keep_unknown_view_false_drops_kaggle_but_not_rsna(sources):
    manifest = build(sources, views=("PA",), keep_unknown_view=False)
    frame = manifest.frame
    assert "kaggle" not in set(frame["source"])
    assert manifest.report.per_source["kaggle"]["excluded"]["view not recorded"] == 9
    # RSNA images do have a view (in their header): PA ones stay.
    assert set(frame.loc[frame["source"] == "rsna", "image_id"]) == {RSNA_P1, RSNA_N1}
    assert frame["view"].notna().all()


def test_modality_filter_drops_ct_rows_and_ct_dicoms(sources):
    manifest = build(sources)
    ids = set(manifest.frame["image_id"])
    assert "covid-9-ct.png" not in ids and RSNA_CT not in ids
    assert manifest.report.per_source["ieee8023"]["excluded"]["modality CT"] == 1
    assert manifest.report.per_source["rsna"]["excluded"]["DICOM modality is not a radiograph"] == 1
    everything = set(build(sources, xray_only=False).frame["image_id"])
    assert {"covid-9-ct.png", RSNA_CT} <= everything


def test_rsna_sex_age_view_come_from_the_dicom_header(sources):
    rows = build(sources).frame.set_index("image_id")
    assert rows.loc[RSNA_P1, ["sex", "age", "view", "modality"]].tolist() == ["F", 58.0, "PA", "CR"]
    assert rows.loc[RSNA_P2, ["sex", "age", "view", "modality"]].tolist() == ["M", 33.0, "AP", "DX"]
    assert rows.loc[RSNA_N2, ["sex", "age", "view"]].tolist() == ["F", 45.0, "AP"]


def test_dicom_in_ieee8023_without_a_view_gets_the_header_view(tmp_path):
    rows = [IeeeRow("1", "COVID-19", "PA", "covid-1-pa.png"),
            IeeeRow("11", "COVID-19", "", "covid-11.dcm", sex="", age="", write_image=False)]
    root = make_ieee8023(tmp_path / "ieee", rows)
    write_dicom(root / "images" / "covid-11.dcm", image_pixels("covid-11"), sex="M", age="062Y", view="AP")
    frame = build({"covid_chestxray_dataset": root}, task="covid_vs_normal").frame.set_index("image_id")
    assert frame.loc["covid-11.dcm", ["view", "sex", "age"]].tolist() == ["AP", "M", 62.0]
    # ...and the view filter sees it.
    pa_only = build({"covid_chestxray_dataset": root}, task="covid_vs_normal", views=("PA",)).frame
    assert list(pa_only["image_id"]) == ["covid-1-pa.png"]


def test_same_bytes_in_two_sources_keeps_one(sources):
    ieee = sources["covid_chestxray_dataset"]
    kaggle_copy = sources["chest_xray_pneumonia"] / "chest_xray" / "test" / "NORMAL" / "IM-0001-0001.jpeg"
    shutil.copyfile(kaggle_copy, ieee / "images" / "normal-12-pa.jpeg")
    make_ieee8023(ieee, DEFAULT_IEEE_ROWS + [IeeeRow("12", "No Finding", "PA", "normal-12-pa.jpeg", write_image=False)])
    manifest = build(sources)
    assert counts(manifest.frame) == ALL_COUNTS | {("ieee8023", "normal"): 2, ("kaggle", "normal"): 4}
    assert str(kaggle_copy) not in set(manifest.frame["path"])
    [group] = manifest.report.duplicates
    assert group["kept"] == {"path": str(ieee / "images" / "normal-12-pa.jpeg"), "source": "ieee8023"}
    assert group["dropped"] == [{"path": str(kaggle_copy), "source": "kaggle"}]
    assert group["sha1"] == hashlib.sha1(kaggle_copy.read_bytes()).hexdigest()
    assert manifest.report.per_source["kaggle"]["excluded"] == {"duplicate image (same bytes as a kept one)": 1}
    assert "dropped 1 duplicate image(s)" in manifest.report.summary()


def test_copies_with_conflicting_labels_are_all_dropped(sources):
    ieee = sources["covid_chestxray_dataset"]
    kaggle_normal = sources["chest_xray_pneumonia"] / "chest_xray" / "train" / "NORMAL" / "IM-0117-0001.jpeg"
    shutil.copyfile(kaggle_normal, ieee / "images" / "covid-13-pa.jpeg")
    make_ieee8023(ieee, DEFAULT_IEEE_ROWS + [IeeeRow("13", "COVID-19", "PA", "covid-13-pa.jpeg", write_image=False)])
    manifest = build(sources)
    paths = set(manifest.frame["path"])
    assert str(kaggle_normal) not in paths and str(ieee / "images" / "covid-13-pa.jpeg") not in paths
    assert counts(manifest.frame) == ALL_COUNTS | {("kaggle", "normal"): 4}
    [group] = manifest.report.duplicates
    assert group["kept"] is None and "different labels" in group["reason"]
    assert sorted(d["source"] for d in group["dropped"]) == ["ieee8023", "kaggle"]


def test_bad_files_are_reported_and_skipped(sources):
    kaggle = sources["chest_xray_pneumonia"] / "chest_xray"
    good_jpeg = (kaggle / "train" / "NORMAL" / "IM-0117-0001.jpeg").read_bytes()
    truncated = kaggle / "train" / "NORMAL" / "IM-0200-0001.jpeg"
    truncated.write_bytes(good_jpeg[: len(good_jpeg) // 2])
    empty = kaggle / "train" / "PNEUMONIA" / "person5_bacteria_17.jpeg"
    empty.write_bytes(b"")
    ieee = sources["covid_chestxray_dataset"]
    text_png = ieee / "images" / "covid-14-pa.png"
    text_png.write_text("<html><body>404 Not Found</body></html>\n")
    make_ieee8023(ieee, DEFAULT_IEEE_ROWS + [IeeeRow("14", "COVID-19", "PA", "covid-14-pa.png", write_image=False)])
    no_pixels_id = "0a0f91dc-6015-4342-b809-d19610854a21"
    make_rsna(sources["rsna_pneumonia"], DEFAULT_RSNA + [RsnaPatient(no_pixels_id, "Normal", with_pixels=False)])
    no_pixels = sources["rsna_pneumonia"] / "stage_2_train_images" / f"{no_pixels_id}.dcm"

    manifest = build(sources)
    reasons = dict(manifest.report.problems)
    assert set(reasons) == {str(truncated), str(empty), str(text_png), str(no_pixels)}
    assert "truncated JPEG" in reasons[str(truncated)]
    assert "empty file" in reasons[str(empty)]
    assert "text file" in reasons[str(text_png)]
    assert "no pixel data" in reasons[str(no_pixels)]
    assert counts(manifest.frame) == ALL_COUNTS  # everything else is kept
    assert manifest.report.per_source["kaggle"]["excluded"] == {"unreadable file": 2}
    summary = manifest.report.summary()
    assert "skipped 4 unreadable" in summary
    for path in reasons:
        assert path in summary
    assert json.loads(json.dumps(manifest.report.to_dict()))["problems"][0].keys() == {"path", "reason"}


def test_missing_image_row_is_reported_and_the_rest_kept(sources):
    ieee = sources["covid_chestxray_dataset"]
    make_ieee8023(ieee, DEFAULT_IEEE_ROWS + [IeeeRow("10", "COVID-19", "PA", "covid-10-pa.png", write_image=False)])
    manifest = build(sources)
    assert manifest.report.problems == [(str(ieee / "images" / "covid-10-pa.png"),
                                         "image file named in metadata.csv is missing")]
    assert counts(manifest.frame) == ALL_COUNTS


def test_building_saving_and_copying_never_modify_the_sources(sources, tmp_path):
    drive = tmp_path / "drive"
    before = tree_snapshot(drive)
    manifest = build(sources)
    save_manifest(manifest, tmp_path / "out" / "manifest.csv", tmp_path / "out" / "manifest_report.json")
    copy_images(manifest.frame, tmp_path / "out" / "images", progress=False)
    assert tree_snapshot(drive) == before


def test_save_and_load_round_trip(sources, tmp_path):
    manifest = build(sources)
    save_manifest(manifest, tmp_path / "manifest.csv", tmp_path / "manifest_report.json")
    loaded = load_manifest(tmp_path / "manifest.csv")
    # A missing value is None in memory and NaN once read back; compare values, not that spelling.
    pd.testing.assert_frame_equal(as_values(loaded), as_values(manifest.frame))
    assert loaded["patient_id"].map(type).eq(str).all() and loaded["image_id"].map(type).eq(str).all()
    assert loaded["age"].dtype == float and loaded["width"].dtype == int
    report = json.loads((tmp_path / "manifest_report.json").read_text())
    assert report["task"] == "covid_pneumonia_normal" and report["per_source"]["rsna"]["kept"] == 4
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))


def test_load_manifest_rejects_other_csvs(sources, tmp_path):
    metadata = sources["covid_chestxray_dataset"] / "metadata.csv"
    with pytest.raises(SourceError) as error:
        load_manifest(metadata)
    message = str(error.value)
    assert str(metadata) in message and "not an xraylib manifest" in message
    for column in ("'path'", "'label'", "'source'", "'patient_id'", "'sha1'"):
        assert column in message
    with pytest.raises(SourceError, match="manifest not found"):
        load_manifest(tmp_path / "nowhere" / "manifest.csv")


def test_copy_images_copies_with_metadata_and_leaves_sources(sources, tmp_path):
    frame = build(sources).frame
    dest = tmp_path / "copies"
    copied = copy_images(frame, dest, progress=False)
    assert len(copied) == len(frame)
    assert copied.drop(columns="path").equals(frame.drop(columns="path"))
    for original, copy in zip(frame["path"], copied["path"]):
        original, copy = Path(original), Path(copy)
        assert original.is_file(), "copy_images must not move the source file"
        assert copy.is_relative_to(dest) and copy.read_bytes() == original.read_bytes()
        assert copy.stat().st_mtime_ns == original.stat().st_mtime_ns  # shutil.copy2
    # Same file name in two Kaggle folders would collide without the hash prefix.
    assert copied["path"].is_unique
    inodes = {p: Path(p).stat().st_ino for p in copied["path"]}
    again = copy_images(frame, dest, progress=False)
    assert {p: Path(p).stat().st_ino for p in again["path"]} == inodes  # nothing copied twice


def test_no_images_left_is_a_helpful_error(tmp_path):
    kaggle = make_kaggle(tmp_path / "kaggle", {"train/PNEUMONIA": DEFAULT_KAGGLE["train/PNEUMONIA"]})
    with pytest.raises(SourceError) as error:
        build({"chest_xray_pneumonia": kaggle}, task="covid_vs_normal")
    message = str(error.value)
    assert "no images left" in message and "covid_vs_normal" in message and "'covid'" in message


def test_a_reader_bug_on_one_file_is_reported_and_the_rest_kept(sources, monkeypatch):
    from xraylib import images

    kaggle = sources["chest_xray_pneumonia"] / "chest_xray"
    victim = str(kaggle / "train" / "NORMAL" / "IM-0117-0001.jpeg")
    real = images.inspect_file

    def buggy(path, opener=open):
        if str(path) == victim:
            raise RuntimeError("a decoder bug")
        return real(path, opener=opener)

    monkeypatch.setattr(images, "inspect_file", buggy)
    manifest = build(sources)
    reasons = dict(manifest.report.problems)
    assert reasons == {victim: "unexpected RuntimeError: a decoder bug"}
    assert victim not in set(manifest.frame["path"]) and len(manifest.frame) > 0


def test_bad_arguments_are_config_errors(sources):
    with pytest.raises(ConfigError, match="covid_vs_pneumonia"):
        build(sources, task="covid_vs_pneumonia")
    with pytest.raises(ConfigError, match="padchest"):
        build({**sources, "padchest": sources["nih_chestxray14"]})
    with pytest.raises(ConfigError, match="no source folders"):
        build({})


def test_missing_source_folder_stops_the_build_naming_it(sources, tmp_path):
    missing = tmp_path / "drive" / "not-synced-yet"
    with pytest.raises(SourceError, match=str(missing)):
        build({**sources, "nih_chestxray14": missing})


# --------------------------------------------------------------------------------------------
# The checkpoint: a build interrupted or run again reads only what it has not read


def _counting_reads(monkeypatch) -> list[str]:
    import xraylib.images as images_module
    reads: list[str] = []
    real = images_module.inspect_file
    monkeypatch.setattr(images_module, "inspect_file", lambda path, opener=open: reads.append(str(path)) or real(path, opener))
    return reads


def test_a_checkpointed_build_equals_a_plain_one_and_a_second_build_reads_no_file(sources, tmp_path, monkeypatch):
    plain = build_manifest(sources, task="covid_pneumonia_normal", views=None, progress=False).frame
    checkpoint = tmp_path / "out" / "manifest_files.jsonl"
    reads = _counting_reads(monkeypatch)
    first = build_manifest(sources, task="covid_pneumonia_normal", views=None, progress=False, checkpoint=checkpoint)
    pd.testing.assert_frame_equal(first.frame, plain)
    read_first = len(reads)
    assert read_first > len(plain)  # the unreadable files too (RSNA's CT, ...): reported, never checkpointed
    reads.clear()
    second = build_manifest(sources, task="covid_pneumonia_normal", views=None, progress=False, checkpoint=checkpoint)
    pd.testing.assert_frame_equal(second.frame, plain)
    assert second.report.to_dict() == first.report.to_dict()
    assert set(reads) == {p for p, _ in first.report.problems if Path(p).is_file()}  # only the bad files, again


def test_a_changed_file_and_a_line_cut_by_a_kill_are_read_again(sources, tmp_path, monkeypatch):
    checkpoint = tmp_path / "manifest_files.jsonl"
    first = build_manifest(sources, task="pneumonia_vs_normal", views=None, progress=False, checkpoint=checkpoint).frame
    changed = Path(first.loc[first["source"] == "nih", "path"].iloc[0])
    write_raster(changed, image_pixels("replaced", 64, 64))  # other bytes, a new mtime
    lines = checkpoint.read_text().splitlines(keepends=True)
    cut = lines[-1]
    checkpoint.write_text("".join(lines[:-1]) + cut[: len(cut) // 2])  # a kill mid-line
    reads = _counting_reads(monkeypatch)
    again = build_manifest(sources, task="pneumonia_vs_normal", views=None, progress=False, checkpoint=checkpoint).frame
    cut_path = json.loads(cut)[0]
    assert {str(changed), cut_path} <= set(reads) and len(reads) <= 2 + 3  # and the few unreadable files
    assert again.loc[again["path"] == str(changed), "sha1"].item() == hashlib.sha1(changed.read_bytes()).hexdigest()
    # appended after the cut line (ended first): a third build reads nothing new
    reads.clear()
    third = build_manifest(sources, task="pneumonia_vs_normal", views=None, progress=False, checkpoint=checkpoint).frame
    pd.testing.assert_frame_equal(third, again)
    assert str(changed) not in reads and cut_path not in reads


def test_a_file_replaced_by_one_of_the_same_size_and_time_is_read_again(sources, tmp_path, monkeypatch):
    """As ``cp -p``, ``rsync -a`` or unpacking an archive replace a file: same size, same modification time. Only the
    inode change time (which no copy can set) tells, and the checkpoint keeps it."""
    checkpoint = tmp_path / "manifest_files.jsonl"
    first = build_manifest(sources, task="pneumonia_vs_normal", views=None, progress=False, checkpoint=checkpoint).frame
    replaced = Path(first.loc[first["source"] == "nih", "path"].iloc[0])
    before = replaced.stat()
    data = bytearray(replaced.read_bytes())
    data[len(data) // 2] ^= 0xFF  # other bytes, the same size
    replaced.write_bytes(bytes(data))
    os.utime(replaced, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (replaced.stat().st_size, replaced.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    reads = _counting_reads(monkeypatch)
    build_manifest(sources, task="pneumonia_vs_normal", views=None, progress=False, checkpoint=checkpoint)
    assert str(replaced) in reads
