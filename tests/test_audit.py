"""The data audit: counts, confound warnings, burned-in marks and duplicates, on files written here
(OpenCV PNG/JPEG, the built-in sample data) and on ../shared/data where it is present."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

from conftest import write_raster
from xraylib import audit as audit_module
from xraylib import config, plots
from xraylib.audit import (
    NEAR_DUPLICATE_MAX_DISTANCE, SOURCE_POPULATION, AuditReport, audit, border_profiles, detect_marker,
    hamming_pairs, perceptual_hashes, write_audit,
)
from xraylib.errors import ConfigError
from xraylib.fileio import sha1_file
from xraylib.manifest import MANIFEST_COLUMNS, build_manifest
from xraylib.preprocess import PreprocessSettings, preprocess_dataset, split_and_preprocess
from xraylib.phantoms import burn_marker, make_phantom
from xraylib.sources import SOURCES
from xraylib.synthetic import write_sample_data

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR AS")


# ---------------------------------------------------------------------------------------------
# Hand-made manifests


def group(label: str, source: str, n: int, *, ages=None, view="PA", sex=None, size=(1024, 1024),
          split=None, start: int = 0, images_per_patient: int = 1, site=None) -> list[dict]:
    """``n`` manifest rows of one (label, source) group; ``ages``/``sex``/``site`` a value, a list, or None
    (``site``: the source's name)."""
    rows = []
    for i in range(n):
        pick = lambda v: v[i % len(v)] if isinstance(v, (list, tuple)) else v  # noqa: E731
        patient = f"{source}:{label}-{start + i // images_per_patient}"
        rows.append({
            "path": f"/data/{source}/{label}-{start + i}.png", "label": label, "source": source,
            "site": pick(site) if site is not None else source, "patient_id": patient,
            "view": pick(view), "sex": pick(sex), "age": pick(ages), "finding": label, "modality": "X-ray",
            "source_split": None, "image_id": f"{label}-{start + i}.png", "file_format": "png",
            "width": pick(size[0]) if isinstance(size[0], list) else size[0],
            "height": pick(size[1]) if isinstance(size[1], list) else size[1],
            "channels": 1, "bit_depth": 8, "sha1": hashlib.sha1(f"{source}/{label}-{start + i}".encode()).hexdigest(),
            "split": pick(split),
        })
    return rows


def frame(*groups: list[dict]) -> pd.DataFrame:
    rows = [row for g in groups for row in g]
    out = pd.DataFrame(rows)
    assert set(MANIFEST_COLUMNS) <= set(out.columns)
    if out["split"].isna().all():
        out = out.drop(columns="split")
    return out


ADULT_AGES = [31, 38, 44, 52, 57, 61, 66, 70, 74, 79]


def findings(report: AuditReport, check: str) -> list[str]:
    return [f.message for f in report.findings if f.check == check]


# ---------------------------------------------------------------------------------------------
# Counts


def test_counts_per_class_source_and_split():
    manifest = frame(
        group("covid", "ieee8023", 6, ages=ADULT_AGES, images_per_patient=2, split=["train", "train", "test", "test", "val", "val"]),
        group("normal", "kaggle", 4, split=["train", "train", "test", "val"]),
        group("normal", "nih", 2, ages=ADULT_AGES, split="train"),
    )
    report = audit(manifest)
    counts = report.tables["counts"].set_index(["label", "source"])
    assert counts.loc[("covid", "ieee8023"), "images"] == 6
    assert counts.loc[("covid", "ieee8023"), "patients"] == 3
    assert counts.loc[("normal", "all"), "images"] == 6
    assert counts.loc[("normal", "kaggle"), "share_of_class"] == pytest.approx(4 / 6, abs=1e-3)
    by_split = report.tables["counts_by_split"].set_index(["split", "label", "source"])
    assert by_split.loc[("train", "normal", "all"), "images"] == 4
    assert by_split.loc[("test", "covid", "ieee8023"), "patients"] == 1
    assert list(report.tables["counts_by_split"]["split"].drop_duplicates()) == ["train", "val", "test"]
    assert report.summary["patients_per_class"] == {"covid": 3, "normal": 6}
    ages = report.tables["ages"].set_index(["label", "source"])
    assert ages.loc[("covid", "ieee8023"), "with_age"] == 6
    assert ages.loc[("normal", "kaggle"), "with_age"] == 0
    assert ages.loc[("normal", "kaggle"), "range_low"] == SOURCE_POPULATION["kaggle"][0]
    assert report.tables["views"].set_index(["label", "source"]).loc[("normal", "kaggle"), "PA"] == 4
    assert report.tables["sex"].set_index(["label", "source"]).loc[("normal", "nih"), "not recorded"] == 2


def test_site_table_counts_images_and_patients_per_site_and_class(tmp_path):
    manifest = frame(
        group("covid", "ieee8023", 6, images_per_patient=2, site=["ieee8023:italy", "ieee8023:italy", "ieee8023:italy/brescia",
                                                                  "ieee8023:italy/brescia", "ieee8023:italy", "ieee8023:italy"]),
        group("normal", "ieee8023", 1, site="ieee8023:italy/brescia", start=10),
        group("normal", "nih", 3), group("normal", "nlm-shenzhen", 2),
    )
    report = audit(manifest)
    sites = report.tables["sites"].set_index("site")
    assert list(sites.columns) == ["source", "images", "patients", "normal_images", "normal_patients",
                                   "covid_images", "covid_patients"]
    assert sites.loc["ieee8023:italy", ["images", "patients", "covid_images", "normal_images"]].tolist() == [4, 2, 4, 0]
    assert sites.loc["ieee8023:italy/brescia", ["covid_patients", "normal_patients"]].tolist() == [1, 1]
    assert list(sites.index) == ["ieee8023:italy", "ieee8023:italy/brescia", "nih", "nlm-shenzhen"]
    assert report.summary["n_sites"] == 4 and report.summary["sites_per_class"] == {"normal": 3, "covid": 2}
    markdown = report.to_markdown()
    assert "## Images and patients per site and class" in markdown and "- Sites (where the images were made): 4;" in markdown
    # A manifest from before the site column: each source's record gives its site (NIH's is "nih+rsna").
    old = audit(manifest.drop(columns="site")).tables["sites"]
    assert set(old["site"]) == {"ieee8023:unknown", "nih+rsna", "nlm-shenzhen"}


def test_audit_refuses_a_table_that_is_not_a_manifest():
    with pytest.raises(ConfigError, match="patient_id"):
        audit(pd.DataFrame({"path": ["a.png"], "label": ["covid"], "source": ["ieee8023"]}))
    with pytest.raises(ConfigError, match="neither"):
        audit(None)


# ---------------------------------------------------------------------------------------------
# Confound warnings


def test_single_source_class_is_flagged_only_when_a_class_has_one_source():
    covid = group("covid", "ieee8023", 10, ages=ADULT_AGES) + group("covid", "rsna", 10, ages=ADULT_AGES)
    kaggle_only = audit(frame(covid, group("normal", "kaggle", 12)))
    messages = findings(kaggle_only, "single_source_class")
    assert len(messages) == 1
    assert "all 12 'normal' images" in messages[0] and "kaggle" in messages[0]
    assert "learn the source" in messages[0]

    two_sources = audit(frame(covid, group("normal", "kaggle", 6), group("normal", "nih", 6, ages=ADULT_AGES)))
    assert findings(two_sources, "single_source_class") == []


def test_source_that_predicts_the_label_is_flagged():
    confounded = audit(frame(group("covid", "ieee8023", 20, ages=ADULT_AGES), group("normal", "nih", 20, ages=ADULT_AGES)))
    assert any("label of 100% of the images" in m for m in findings(confounded, "source_predicts_label"))
    mixed = audit(frame(group("covid", "ieee8023", 10, ages=ADULT_AGES), group("normal", "ieee8023", 10, ages=ADULT_AGES),
                        group("covid", "rsna", 10, ages=ADULT_AGES), group("normal", "rsna", 10, ages=ADULT_AGES)))
    assert "source_predicts_label" not in mixed.checks()
    assert "single_source_class" not in mixed.checks()


def test_pediatric_kaggle_normals_against_adult_covid_are_flagged_without_per_image_ages():
    covid = group("covid", "ieee8023", 30, ages=ADULT_AGES)
    kaggle = audit(frame(covid, group("normal", "kaggle", 20)))  # Kaggle files carry no ages
    messages = findings(kaggle, "age_no_overlap")
    assert len(messages) == 1
    assert "kaggle" in messages[0] and "children aged 1 to 5" in messages[0]
    assert "child versus adult" in messages[0]

    adults = audit(frame(covid, group("normal", "nih", 20, ages=[22, 35, 47, 58, 63, 71, 80])))
    assert "age_no_overlap" not in adults.checks()
    # Adult normals beside the children: the children are still flagged, as a share of the class.
    mixed = audit(frame(covid, group("normal", "kaggle", 20), group("normal", "nih", 20, ages=ADULT_AGES)))
    assert any("20 of 40 'normal' images" in m for m in findings(mixed, "age_no_overlap"))


def test_a_source_without_ages_or_documented_population_is_said_to_be_unknown():
    report = audit(frame(group("covid", "ieee8023", 10, ages=ADULT_AGES), group("normal", "mystery", 10)))
    assert any("mystery" in m for m in findings(report, "ages_unknown"))
    assert "age_no_overlap" not in report.checks()


def test_view_found_in_one_class_is_flagged():
    covid_views = ["PA", "AP Supine", "PA", "AP Supine", "AP"]
    report = audit(frame(group("covid", "ieee8023", 20, ages=ADULT_AGES, view=covid_views),
                         group("normal", "ieee8023", 20, ages=ADULT_AGES, view=["PA", "AP"])))
    messages = findings(report, "view_in_one_class")
    assert len(messages) == 1
    assert "AP Supine" in messages[0] and "all 8 images are 'covid'" in messages[0]

    balanced = audit(frame(group("covid", "ieee8023", 20, ages=ADULT_AGES, view=["PA", "AP"]),
                           group("normal", "ieee8023", 20, ages=ADULT_AGES, view=["AP", "PA"])))
    assert "view_in_one_class" not in balanced.checks() and "view_differs" not in balanced.checks()


def test_sex_mostly_in_one_class_and_image_sizes_that_separate_classes_are_flagged():
    report = audit(frame(
        group("covid", "ieee8023", 20, ages=ADULT_AGES, sex=["M", "M", "M", "M", "F"], size=([700, 800, 900], [650, 750])),
        group("normal", "ieee8023", 20, ages=ADULT_AGES, sex=["F", "F", "M"], size=(1024, 1024)),
    ))
    assert any("'covid' M 80%" in m for m in findings(report, "sex_imbalance"))
    assert any("width" in m and "height" in m for m in findings(report, "image_size"))
    same = audit(frame(group("covid", "ieee8023", 20, ages=ADULT_AGES, sex=["M", "F"]),
                       group("normal", "ieee8023", 20, ages=ADULT_AGES, sex=["F", "M"])))
    assert not {"sex_imbalance", "image_size"} & same.checks()


def test_exact_duplicates_by_sha1_across_splits_and_patients():
    manifest = frame(group("covid", "ieee8023", 4, ages=ADULT_AGES, split=["train", "train", "test", "val"]),
                     group("normal", "nih", 4, ages=ADULT_AGES, split="train"))
    manifest.loc[2, "sha1"] = manifest.loc[0, "sha1"]  # the same file in train and test, two patients
    manifest.loc[5, "sha1"] = manifest.loc[4, "sha1"]  # the same file under two patients of train
    report = audit(manifest)
    exact = report.duplicates[report.duplicates["kind"] == "exact"]
    assert len(exact) == 2
    across = exact[exact["cross_split"]].iloc[0]
    assert {across["split_a"], across["split_b"]} == {"train", "test"}
    assert across["distance"] == 0
    assert {"exact_duplicates_across_splits", "exact_duplicates_across_patients"} <= report.checks()
    assert list(report.duplicates.columns[:8]) == ["kind", "distance", "correlation", "path_a", "split_a", "patient_a",
                                                   "label_a", "source_a"]


# ---------------------------------------------------------------------------------------------
# Pixels: borders, burned-in marks, hashes


def phantom(seed: int, label: str = "normal", size: int = 224, marker: bool = False) -> np.ndarray:
    return make_phantom(label, np.random.default_rng(seed), size, size, marker=marker).image


def test_border_profiles_measure_the_edges_and_find_a_burned_in_marker():
    plain = np.stack([phantom(seed) for seed in range(6)])
    marked = np.stack([burn_marker(image) for image in plain])
    profile_plain, profile_marked = border_profiles(plain), border_profiles(marked)
    assert not profile_plain["marker"].any()
    assert profile_marked["marker"].all()
    assert set(profile_marked["marker_zone"]) == {"top_left"}
    # The marker brightens the top-left corner and nothing on the opposite side.
    assert (profile_marked["top_left"] - profile_plain["top_left"]).min() > 10
    assert np.allclose(profile_marked["bottom_right"], profile_plain["bottom_right"])
    bright_top = plain.copy()
    bright_top[:, :round(audit_module.BORDER_FRACTION * 224)] = 255
    bright = border_profiles(bright_top)
    assert (bright["top"] == 255).all() and (bright["bottom"] == profile_plain["bottom"]).all()
    assert detect_marker(np.zeros((64, 64), np.uint8)) == (False, "", 0.0)


def test_hamming_pairs_match_brute_force_in_small_blocks(monkeypatch):
    rng = np.random.default_rng(3)
    hashes = rng.integers(0, 2**63, size=150, dtype=np.uint64)
    hashes[10] = hashes[99] ^ np.uint64(0b10101)  # 3 bits apart
    hashes[120] = hashes[5]
    monkeypatch.setattr(audit_module, "_PAIR_BLOCK", 1000)  # several blocks
    i, j, distance = hamming_pairs(hashes, max_distance=20)
    bits = np.array([[bin(int(a) ^ int(b)).count("1") for b in hashes] for a in hashes])
    expected = {(a, b) for a in range(150) for b in range(a + 1, 150) if bits[a, b] <= 20}
    assert set(zip(i.tolist(), j.tolist())) == expected
    assert dict(zip(zip(i.tolist(), j.tolist()), distance.tolist()))[(10, 99)] == 3


def test_perceptual_hash_survives_jpeg_and_brightening_but_not_another_patient():
    originals = [phantom(seed) for seed in range(12)]
    copies = []
    for image in originals[:4]:
        brighter = np.clip(image.astype(np.int16) + 12, 0, 255).astype(np.uint8)
        ok, data = cv2.imencode(".jpg", brighter, [cv2.IMWRITE_JPEG_QUALITY, 60])
        copies.append(cv2.imdecode(data, cv2.IMREAD_GRAYSCALE))
    hashes = perceptual_hashes(np.stack(originals + copies))
    same = [bin(int(hashes[k]) ^ int(hashes[12 + k])).count("1") for k in range(4)]
    assert max(same) <= NEAR_DUPLICATE_MAX_DISTANCE // 2
    i, j, _ = hamming_pairs(hashes[:12], max_distance=NEAR_DUPLICATE_MAX_DISTANCE // 2)
    assert len(i) == 0  # twelve different phantoms: none close


def test_near_duplicates_across_splits_found_on_files_and_unrelated_images_not(tmp_path):
    rows = []

    def add(path: Path, label: str, patient: str, split: str) -> None:
        rows.append({"path": str(path), "label": label, "source": "ieee8023", "patient_id": patient,
                     "sha1": sha1_file(path), "split": split})

    for k in range(14):  # unrelated phantoms, both classes, all splits
        label = "covid" if k % 2 else "normal"
        path = write_raster(tmp_path / f"p{k}.png", phantom(100 + k, label, size=160))
        add(path, label, f"ieee8023:{k}", ("train", "val", "test")[k % 3])
    original = phantom(7, "covid", size=160)
    add(write_raster(tmp_path / "original.png", original), "covid", "ieee8023:orig", "train")
    brighter = np.clip(original.astype(np.int16) + 10, 0, 255).astype(np.uint8)
    jpeg = tmp_path / "copy.jpg"
    assert cv2.imwrite(str(jpeg), brighter, [cv2.IMWRITE_JPEG_QUALITY, 70])
    add(jpeg, "covid", "ieee8023:copy", "test")
    exact = tmp_path / "exact.png"
    exact.write_bytes((tmp_path / "original.png").read_bytes())
    add(exact, "covid", "ieee8023:exact", "val")
    manifest = pd.DataFrame(rows)
    data = preprocess_dataset(manifest, tmp_path / "cache", ("normal", "covid"), PreprocessSettings(64), workers=1,
                              progress=False)
    report = audit(manifest, data)
    pairs = {frozenset((Path(r.path_a).name, Path(r.path_b).name)): r for r in report.duplicates.itertuples()}
    assert set(pairs) == {frozenset(("original.png", "copy.jpg")), frozenset(("original.png", "exact.png")),
                          frozenset(("copy.jpg", "exact.png"))}
    near = pairs[frozenset(("original.png", "copy.jpg"))]
    assert near.kind == "near" and near.cross_split and near.distance <= NEAR_DUPLICATE_MAX_DISTANCE
    assert pairs[frozenset(("original.png", "exact.png"))].kind == "exact"
    assert {"near_duplicates_across_splits", "exact_duplicates_across_splits"} <= report.checks()


# ---------------------------------------------------------------------------------------------
# The built-in sample data, end to end


@pytest.fixture(scope="module")
def sample_audits(tmp_path_factory):
    """Audits of tiny sample data (64 px) written without and with a burned-in marker on covid."""
    out = {}
    for marker in (None, "covid"):
        root = tmp_path_factory.mktemp(f"sample-{marker}")
        sample = write_sample_data(root / "data", n_patients=10, seed=0, image_size=64, shortcut_marker=marker)
        sources = {s.drive_key: getattr(sample, s.drive_key) for s in SOURCES if s.sample_writer is not None}
        manifest = build_manifest(sources, task="covid_vs_normal", progress=False).frame
        data = split_and_preprocess(manifest, root / "cache", ("normal", "covid"), PreprocessSettings(64), workers=1,
                                    progress=False)
        out[marker] = (manifest, data, audit(manifest, data))
    return out


def test_sample_data_with_a_burned_in_marker_flags_the_covid_class(sample_audits):
    _, _, marked = sample_audits["covid"]
    messages = findings(marked, "burned_in_marker")
    assert len(messages) == 1 and "'covid'" in messages[0]
    by_class = marked.tables["border_by_class"].set_index("label")
    assert by_class.loc["covid", "marker_share"] >= 0.8
    assert by_class.loc["covid", "marker_zone"] == "top_left"
    assert by_class.loc["normal", "marker_share"] == 0

    _, _, plain = sample_audits[None]
    assert "burned_in_marker" not in plain.checks()
    assert (plain.tables["border_by_class"]["marker_share"] == 0).all()
    # Same seed, same pictures: only the marker differs, and it lights up covid's top-left corner.
    plain_covid = plain.tables["border_by_class"].set_index("label").loc["covid"]
    assert by_class.loc["covid", "top_left"] > plain_covid["top_left"] + 25
    assert by_class.loc["normal", "top_left"] == plain.tables["border_by_class"].set_index("label").loc["normal", "top_left"]


def test_sample_data_audit_finds_the_designed_confounds_and_writes_its_report(sample_audits, tmp_path):
    manifest, data, report = sample_audits[None]
    assert any("ieee8023" in m and "'covid'" in m for m in findings(report, "single_source_class"))
    assert any("kaggle" in m for m in findings(report, "age_no_overlap"))
    assert report.summary["n_images_checked_for_pixels"] == sum(len(s) for s in data.splits.values())
    assert report.duplicates.empty
    assert set(report.mean_images) == {f"{s} / {l}" for s, l in data.manifest[["source", "label"]].drop_duplicates().itertuples(index=False)}
    assert all(m.shape == (64, 64) for m in report.mean_images.values())

    paths = write_audit(report, tmp_path / "reports")
    written = json.loads(paths["json"].read_text())
    assert written["warnings"] == report.warnings
    assert written["tables"]["counts"][0]["label"] == "covid"
    assert written["thresholds"]["near_duplicate_max_distance"] == NEAR_DUPLICATE_MAX_DISTANCE
    json.dumps(report.to_dict(), allow_nan=False)  # strict JSON: no NaN
    markdown = paths["md"].read_text()
    assert "Research software, not a diagnostic device." in markdown
    assert "## Warnings" in markdown and "| label | source | images | patients |" in markdown
    assert not list(paths["json"].parent.glob(".*.tmp"))
    # Sites: several for covid (ieee8023's locations), one for each hospital of normals.
    sites = report.tables["sites"].set_index("site")
    covid_sites = sites[sites["covid_images"] > 0]
    assert len(covid_sites) >= 3 and covid_sites.index.str.startswith("ieee8023:").all()
    assert {"kaggle", "nih+rsna", "nlm-shenzhen", "nlm-montgomery"} <= set(sites.index)
    assert sites["images"].sum() == len(manifest) and written["summary"]["n_sites"] == len(sites)


def test_audit_plots(sample_audits, tmp_path):
    manifest, _, report = sample_audits["covid"]
    for name, figure in (("ages", plots.age_distribution(manifest)),
                         ("borders", plots.border_profiles_plot(report.tables["border"])),
                         ("means", plots.mean_image_grid(report.mean_images))):
        path = plots.save_figure(figure, tmp_path / f"{name}.png")
        assert cv2.imread(str(path)) is not None
    # Kaggle has no ages: its documented population is drawn instead of a box.
    axis = plots.age_distribution(manifest).axes[0]
    assert any("1-5 years" in text.get_text() for text in axis.texts)


# ---------------------------------------------------------------------------------------------
# ../shared/data


@pytest.mark.shared_data
def test_real_data_pediatric_normals_and_single_source_covid_are_flagged(shared_data, tmp_path):
    paths = config.folder_drive_paths(shared_data, tmp_path)
    sources = {k: v for k, v in paths.sources().items()
               if k in ("covid_chestxray_dataset", "chest_xray_pneumonia", "nih_chestxray14")}
    manifest = build_manifest(sources, task="covid_vs_normal", progress=False).frame
    report = audit(manifest)
    single = findings(report, "single_source_class")
    assert len(single) == 1 and "'covid'" in single[0] and "ieee8023" in single[0]
    ages = findings(report, "age_no_overlap")
    assert len(ages) == 1 and "kaggle" in ages[0] and "children aged 1 to 5" in ages[0]
    assert "source_predicts_label" in report.checks()
    assert any("AP Supine" in m for m in findings(report, "view_in_one_class"))
    counts = report.tables["counts"].set_index(["label", "source"])
    assert counts.loc[("normal", "kaggle"), "images"] == 220
    assert counts.loc[("normal", "nih"), "patients"] == 110

    # Adult normals only (NIH): no age confound, but covid still comes from one source.
    adults = audit(manifest[manifest["source"] != "kaggle"])
    assert "age_no_overlap" not in adults.checks()
    assert "single_source_class" in adults.checks()


@pytest.mark.shared_data
def test_real_data_sites_per_class(shared_data, tmp_path):
    paths = config.folder_drive_paths(shared_data, tmp_path)
    sources = {k: v for k, v in paths.sources().items() if k in ("covid_chestxray_dataset", "nlm_shenzhen")}
    manifest = build_manifest(sources, task="covid_vs_normal", progress=False).frame
    report = audit(manifest)
    sites = report.tables["sites"].set_index("site")
    covid = sites[sites["covid_images"] > 0]
    assert covid["covid_images"].sum() == (manifest["label"] == "covid").sum() and 60 <= len(covid) <= 100
    assert sites.loc["ieee8023:germany/hannover/hannover-medical-school", "covid_patients"] == 43
    assert sites.loc["nlm-shenzhen", ["normal_images", "normal_patients", "covid_images"]].tolist() == [326, 326, 0]
    assert report.summary["sites_per_class"]["covid"] == len(covid)
    assert "ieee8023:unknown" not in sites.index


@pytest.mark.shared_data
def test_real_data_same_picture_under_two_ieee8023_patients_is_found(shared_data, tmp_path):
    paths = config.folder_drive_paths(shared_data, tmp_path)
    manifest = build_manifest({"covid_chestxray_dataset": paths.covid_chestxray_dataset}, task="covid_vs_normal",
                              progress=False).frame
    # Patients 97 and 178 of the real metadata share pictures (different files, same image); a few others beside.
    pair = manifest[manifest["patient_id"].isin(["ieee8023:97", "ieee8023:178"])]
    others = manifest[~manifest.index.isin(pair.index)].iloc[:30]
    subset = pd.concat([pair, others])
    assert pair["patient_id"].nunique() == 2
    data = split_and_preprocess(subset, tmp_path / "cache", ("normal", "covid"), PreprocessSettings(64), workers=1,
                                progress=False)
    report = audit(subset, data)
    found = report.duplicates[report.duplicates["patient_a"].isin(pair["patient_id"])
                              & report.duplicates["patient_b"].isin(pair["patient_id"])]
    assert len(found) >= 1 and (found["kind"] == "near").all() and found["cross_patient"].all()
    unrelated = report.duplicates[~report.duplicates.index.isin(found.index)]
    assert unrelated.empty


def test_three_classes_name_each_confounded_class():
    report = audit(frame(group("covid", "ieee8023", 20, ages=ADULT_AGES, view=["PA", "AP Supine"]),
                         group("pneumonia", "kaggle", 20), group("normal", "kaggle", 10), group("normal", "nih", 10, ages=ADULT_AGES)),
                   classes=("normal", "pneumonia", "covid"))
    assert report.summary["classes"] == ["normal", "pneumonia", "covid"]
    single = findings(report, "single_source_class")
    assert len(single) == 2 and any("'covid'" in m for m in single) and any("'pneumonia'" in m for m in single)
    ages = findings(report, "age_no_overlap")
    assert any("'pneumonia' images from kaggle" in m and "'covid'" in m for m in ages)
    assert any("'normal' images from kaggle" in m and "'covid'" in m for m in ages)
    assert any("AP Supine" in m for m in findings(report, "view_in_one_class"))
