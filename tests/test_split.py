"""Patient-level stratified splits: no patient in two splits, whatever the seed or the manifest."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xraylib.errors import ConfigError
from xraylib.split import (
    SplitLeakError, assert_patient_disjoint, patient_groups, patients_in_several_splits, split_by_image,
    split_by_patient, split_summary,
)

SOURCE_LABELS = {"ieee8023": ("covid", "normal", "pneumonia"), "kaggle": ("normal", "pneumonia"), "nih": ("normal",)}


def random_manifest(seed: int, n_patients: int = 150, max_images: int = 8, mixed_patients: int = 0) -> pd.DataFrame:
    """Manifest-like rows: several images per patient (as ieee8023 has), in shuffled row order.

    ``mixed_patients`` of them also get an image of another label (a follow-up read as normal).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for number in range(n_patients):
        source = str(rng.choice(list(SOURCE_LABELS)))
        label = str(rng.choice(SOURCE_LABELS[source]))
        patient = f"{source}:{number}"
        for image in range(int(rng.integers(1, max_images + 1))):
            rows.append({"path": f"/drive/{source}/{number}-{image}.png", "patient_id": patient, "label": label,
                         "source": source})
        if number < mixed_patients:
            other = "normal" if label != "normal" else "covid"
            rows.append({"path": f"/drive/{source}/{number}-followup.png", "patient_id": patient, "label": other,
                         "source": source})
    frame = pd.DataFrame(rows)
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def patient_splits(frame: pd.DataFrame) -> pd.Series:
    """patient_id -> split (one value per patient; raises if a patient has several)."""
    per_patient = frame.groupby("patient_id")["split"].unique()
    assert per_patient.map(len).eq(1).all()
    return per_patient.map(lambda values: values[0])


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(manifest_seed=st.integers(0, 10_000), split_seed=st.integers(0, 2**31 - 1),
       n_patients=st.integers(1, 120), mixed=st.integers(0, 10))
def test_no_patient_is_in_two_splits(manifest_seed, split_seed, n_patients, mixed):
    manifest = random_manifest(manifest_seed, n_patients, mixed_patients=mixed)
    split = split_by_patient(manifest, seed=split_seed)
    assert len(split) == len(manifest) and split["split"].isin(["train", "val", "test"]).all()
    assert patients_in_several_splits(split) == []
    # the manifest itself is returned unchanged apart from the new column
    pd.testing.assert_frame_equal(split.drop(columns="split"), manifest)


@pytest.mark.parametrize("manifest_seed", range(4))
@pytest.mark.parametrize("fractions", [(0.7, 0.15, 0.15), (0.6, 0.2, 0.2), (0.8, 0.1, 0.1)])
def test_fractions_are_respected_per_label_and_source(manifest_seed, fractions):
    manifest = random_manifest(manifest_seed, n_patients=400)
    per_patient = manifest.drop_duplicates("patient_id").set_index("patient_id")
    split = patient_splits(split_by_patient(manifest, fractions=fractions, seed=manifest_seed))
    strata = per_patient.assign(split=split).groupby(["label", "source"])
    for stratum, group in strata:
        n = len(group)
        for name, fraction in zip(("train", "val", "test"), fractions):
            got = int((group["split"] == name).sum())
            assert abs(got - n * fraction) <= 1, (stratum, name, got, n)


def test_same_seed_same_split_other_seed_other_split_row_order_irrelevant():
    manifest = random_manifest(7, n_patients=200)
    first = split_by_patient(manifest, seed=3)
    again = split_by_patient(manifest, seed=3)
    assert first["split"].tolist() == again["split"].tolist()
    other = split_by_patient(manifest, seed=4)
    assert (patient_splits(other) != patient_splits(first)).sum() > 20
    shuffled = split_by_patient(manifest.sample(frac=1.0, random_state=1), seed=3)
    pd.testing.assert_series_equal(patient_splits(shuffled), patient_splits(first))


def test_patient_with_several_labels_is_stratified_by_the_most_specific():
    manifest = pd.DataFrame({
        "path": [f"/p{i}.png" for i in range(4)],
        "patient_id": ["ieee8023:1", "ieee8023:1", "ieee8023:2", "ieee8023:2"],
        "label": ["normal", "covid", "normal", "normal"],
        "source": "ieee8023",
    })
    split = split_by_patient(manifest, fractions=(0.5, 0.0, 0.5), seed=0)
    # Patient 1 counts as covid, so there are two strata of one patient each and both stay in train;
    # counted as normal, the normal stratum would have two patients and send one to test.
    assert split["split"].tolist() == ["train"] * 4


@pytest.mark.parametrize("n_patients, expected_train", [(1, 1), (2, 1), (3, 1)])
def test_tiny_strata_keep_a_patient_in_train(n_patients, expected_train):
    manifest = pd.DataFrame({
        "path": [f"/nih/{i}.png" for i in range(n_patients)],
        "patient_id": [f"nih:{i}" for i in range(n_patients)],
        "label": "normal", "source": "nih",
    })
    split = split_by_patient(manifest, fractions=(0.34, 0.33, 0.33), seed=0)
    assert (split["split"] == "train").sum() == expected_train
    assert (split["split"] == "val").sum() == (1 if n_patients == 3 else 0)


def test_rare_stratum_goes_to_train_with_default_fractions():
    manifest = random_manifest(11, n_patients=100)
    rare = pd.DataFrame({"path": ["/nih/pneumonia.png"], "patient_id": ["nih:999"], "label": ["pneumonia"], "source": ["nih"]})
    split = split_by_patient(pd.concat([manifest, rare], ignore_index=True), seed=5)
    assert split.loc[split["patient_id"] == "nih:999", "split"].item() == "train"


def test_external_test_sources_go_wholly_to_test():
    manifest = random_manifest(3, n_patients=200)
    split = split_by_patient(manifest, seed=0, external_test_sources=["nih"])
    assert (split.loc[split["source"] == "nih", "split"] == "test").all()
    others = split[split["source"] != "nih"]
    assert set(others["split"]) == {"train", "val", "test"}
    # the other sources keep their usual proportions (held-out rows are not counted against them)
    test_share = patient_splits(others).eq("test").mean()
    assert 0.10 < test_share < 0.20
    one_name = split_by_patient(manifest, seed=0, external_test_sources="nih")
    assert one_name["split"].tolist() == split["split"].tolist()
    with pytest.raises(ConfigError, match="padchest"):
        split_by_patient(manifest, external_test_sources=["padchest"])


@pytest.mark.parametrize("fractions", [(0.5, 0.5, 0.5), (0.8, 0.3, -0.1), (0.7, 0.3), (70, 15, 15), 0.2,
                                       ("train", "val", "test"), (float("nan"), 0.5, 0.5)])
def test_bad_fractions_are_config_errors(fractions):
    with pytest.raises(ConfigError, match="fractions"):
        split_by_patient(random_manifest(0, 20), fractions=fractions)


def test_missing_columns_are_config_errors():
    with pytest.raises(ConfigError, match="patient_id"):
        split_by_patient(random_manifest(0, 20).drop(columns="patient_id"))


def test_image_level_split_leaks_patients():
    """The seeds' protocol, kept for comparison: on ieee8023-like data it puts patients in train and test."""
    manifest = random_manifest(5, n_patients=60, max_images=8)
    by_image = split_by_image(manifest, test_fraction=0.2, seed=0)
    leaked = patients_in_several_splits(by_image)
    multi_image_patients = manifest.groupby("patient_id").size().gt(1).sum()
    assert len(leaked) > multi_image_patients / 4
    with pytest.raises(SplitLeakError, match="patient"):
        assert_patient_disjoint(by_image)
    assert patients_in_several_splits(split_by_patient(manifest, seed=0)) == []


def test_assert_patient_disjoint_names_the_patient():
    frame = pd.DataFrame({
        "patient_id": ["ieee8023:7", "ieee8023:7", "ieee8023:8", "kaggle:IM-0115"],
        "split": ["train", "test", "test", "val"],
    })
    with pytest.raises(SplitLeakError) as error:
        assert_patient_disjoint(frame)
    assert "ieee8023:7" in str(error.value) and "1 patient(s)" in str(error.value)
    assert_patient_disjoint(frame.iloc[1:])  # clean: no error


def test_split_summary_counts_images_and_patients_in_split_order():
    manifest = random_manifest(2, n_patients=80)
    split = split_by_patient(manifest, seed=1)
    summary = split_summary(split)
    assert list(summary["split"].drop_duplicates()) == ["train", "val", "test"]
    assert summary["images"].sum() == len(manifest)
    assert summary["patients"].sum() == manifest["patient_id"].nunique()


# ---------------------------------------------------------------------------------------------
# Near-duplicates: one picture filed under two patient ids links them into one group


def test_without_links_the_split_is_what_it_always_was():
    """The default (and an empty list of links) reproduce the split made before linking existed:
    the digest below is the patient -> split assignment of the previous split_by_patient."""
    import hashlib

    manifest = random_manifest(12, n_patients=60)
    for links in (None, [], pd.DataFrame(columns=["patient_a", "patient_b"])):
        split = split_by_patient(manifest, seed=12, linked_patients=links)
        digest = hashlib.sha1("".join(split["patient_id"] + "=" + split["split"] + ";").encode()).hexdigest()
        assert digest == "1ffb8eab7c96bb237f0bb5f53d60949f401e4319"


def test_patient_groups_are_transitive_and_named_by_their_first_patient():
    manifest = random_manifest(1, n_patients=12)
    ids = sorted(manifest["patient_id"].unique())
    groups = patient_groups(manifest, [(ids[3], ids[1]), (ids[1], ids[7]), (ids[9], "not-in-the-manifest")])
    assert set(groups.index) == set(ids)
    assert groups[ids[3]] == groups[ids[7]] == groups[ids[1]] == ids[1]
    alone = [i for i in ids if i not in (ids[1], ids[3], ids[7])]
    assert (groups[alone] == alone).all()
    by_name = patient_groups(manifest, {ids[0]: "re-upload", ids[5]: "re-upload", ids[6]: None})
    assert by_name[ids[5]] == ids[0] and by_name[ids[6]] == ids[6]
    with pytest.raises(ConfigError, match="pairs"):
        patient_groups(manifest, ["ieee8023:1"])
    with pytest.raises(ConfigError, match="patient_a"):
        patient_groups(manifest, pd.DataFrame({"path_a": ["x"]}))


@settings(max_examples=30, deadline=None, database=None)
@given(manifest_seed=st.integers(0, 10_000), split_seed=st.integers(0, 2**31 - 1), n_links=st.integers(1, 15))
def test_linked_patients_always_share_a_split(manifest_seed, split_seed, n_links):
    manifest = random_manifest(manifest_seed, n_patients=80)
    ids = manifest["patient_id"].unique()
    rng = np.random.default_rng(manifest_seed)
    links = [tuple(rng.choice(ids, size=2, replace=False)) for _ in range(n_links)]
    split = patient_splits(split_by_patient(manifest, seed=split_seed, linked_patients=links))
    for a, b in links:
        assert split[a] == split[b], (a, b)


def test_a_patient_linked_to_an_external_source_goes_to_test():
    manifest = random_manifest(3, n_patients=100)
    inside = manifest.loc[manifest["source"] == "ieee8023", "patient_id"].iloc[0]
    outside = manifest.loc[manifest["source"] == "nih", "patient_id"].iloc[0]
    split = patient_splits(split_by_patient(manifest, seed=0, external_test_sources=["nih"],
                                            linked_patients=[(inside, outside)]))
    assert split[inside] == split[outside] == "test"


def test_the_audits_near_duplicates_keep_re_uploaded_patients_together(tmp_path):
    """ieee8023 holds the same picture under two patient ids (patients 97 and 178 on the real data): a
    JPEG re-encode, slightly brightened, is not an exact copy, so the manifest keeps both. The audit
    finds the pair from the pixels; splitting again with its duplicates table keeps them in one split."""
    import cv2

    from xraylib import audit
    from xraylib.fileio import sha1_file
    from xraylib.preprocess import PreprocessSettings, preprocess_dataset
    from xraylib.phantoms import make_phantom

    rows = []
    for i in range(16):
        label = "covid" if i % 2 else "normal"
        image = make_phantom(label, np.random.default_rng(300 + i), 96, 96).image
        path = tmp_path / f"{i:03d}.png"
        assert cv2.imwrite(str(path), image)
        rows.append({"path": str(path), "label": label, "source": "ieee8023", "patient_id": f"ieee8023:{i}"})
    copy = cv2.imread(rows[1]["path"], cv2.IMREAD_GRAYSCALE)
    copy_path = tmp_path / "178.jpg"
    assert cv2.imwrite(str(copy_path), cv2.convertScaleAbs(copy, alpha=1.05, beta=6), [cv2.IMWRITE_JPEG_QUALITY, 85])
    rows.append({"path": str(copy_path), "label": "covid", "source": "ieee8023", "patient_id": "ieee8023:178"})
    manifest = pd.DataFrame(rows)
    manifest["sha1"] = manifest["path"].map(sha1_file)

    def apart(frame):
        splits = patient_splits(frame)
        return splits["ieee8023:1"] != splits["ieee8023:178"]

    seed = next(s for s in range(50) if apart(split_by_patient(manifest, fractions=(0.5, 0.25, 0.25), seed=s)))
    leaky = split_by_patient(manifest, fractions=(0.5, 0.25, 0.25), seed=seed)
    data = preprocess_dataset(leaky, tmp_path / "cache", ("normal", "covid"), PreprocessSettings(image_size=64),
                              workers=1, progress=False)
    report = audit.audit(None, data)
    pair = report.duplicates[report.duplicates["kind"] == "near"]
    # (Phantoms drawn alike can also pass as near-copies at 64 px; linking them costs nothing but stratification.)
    assert ("ieee8023:1", "ieee8023:178") in {tuple(sorted(p)) for p in zip(pair["patient_a"], pair["patient_b"])}
    fixed = split_by_patient(manifest, fractions=(0.5, 0.25, 0.25), seed=seed, linked_patients=report.duplicates)
    assert not apart(fixed)
    # Only linked patients moved; the split is still patient-level and complete.
    linked = set(pair["patient_a"]) | set(pair["patient_b"])
    moved = set(fixed.loc[fixed["split"] != leaky["split"], "patient_id"])
    assert moved and moved <= linked
    assert patients_in_several_splits(fixed) == [] and fixed["split"].notna().all()


def test_links_move_only_the_linked_patients_to_their_first_patients_split():
    manifest = random_manifest(4, n_patients=120)
    before = patient_splits(split_by_patient(manifest, seed=9))
    a, b = sorted(before[before == "train"].index)[0], sorted(before[before == "test"].index)[0]
    after = patient_splits(split_by_patient(manifest, seed=9, linked_patients=[(b, a)]))
    first = min(a, b)
    assert after[a] == after[b] == before[first]
    assert (after.drop([a, b]) == before.drop([a, b])).all()
