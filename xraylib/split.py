"""Patient-level, stratified train/validation/test splits.

A patient's images all go to one split: with several images per patient (ieee8023 has up to
a dozen), an image-level split puts the same patient in training and test and flatters every
metric. Patients are stratified by (label, source) so each split keeps the class and source
mix. Whole sources can be held out as an external test set. The same picture filed under two
patient ids (a near-duplicate found by the audit) can link those patients into one group.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping, Union

import numpy as np
import pandas as pd

from .errors import ConfigError, XraylibError

SPLITS = ("train", "val", "test")

#: What :func:`split_by_patient` and :func:`patient_groups` accept as links between patients: the
#: audit's duplicates table, pairs of patient ids, or a mapping patient_id -> group name.
LinkedPatients = Union[pd.DataFrame, Mapping[Any, Any], Iterable[tuple[Any, Any]], None]

# When a patient has images of several labels, the patient's stratum is the most specific one.
_LABEL_PRIORITY = {"covid": 0, "pneumonia": 1, "normal": 2}


class SplitLeakError(XraylibError):
    """A patient appears in more than one split."""


def split_by_patient(
    manifest: pd.DataFrame,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 42,
    external_test_sources: Iterable[str] = (),
    linked_patients: LinkedPatients = None,
) -> pd.DataFrame:
    """Return a copy of ``manifest`` with a ``split`` column ("train", "val", "test").

    Patients (``patient_id``) are grouped by their (label, source) stratum, shuffled with
    ``seed`` and cut by ``fractions`` (train, val, test), so every stratum is spread over the
    splits in those proportions (a stratum with one or two patients goes to train first).
    Rows of ``external_test_sources`` all go to test and no patient of theirs is used elsewhere.

    ``linked_patients``: patients that must share a split, because the same picture is filed
    under each of them (ieee8023 has such re-uploads; finding them needs the pixels, see
    :func:`patient_groups`). After the split, each group of linked patients moves to the split of
    its first patient (to test if any of them is from an external test source); every other
    patient keeps its split, so adding links moves only the linked patients. ``None`` (default)
    splits exactly as before.
    """
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):  # a single number or text: not three fractions
        values = ()
    if len(values) != 3 or any(f < 0 for f in values) or not np.isclose(sum(values), 1.0):
        raise ConfigError(f"fractions must be three non-negative numbers summing to 1 (train, val, test), got {fractions!r}")
    fractions = values
    required = {"patient_id", "label", "source"}
    if missing := required - set(manifest.columns):
        raise ConfigError(f"manifest is missing column(s) {sorted(missing)}")
    # One name given as text would otherwise be read as a set of letters.
    external = {external_test_sources} if isinstance(external_test_sources, str) else set(external_test_sources)
    if unknown := external - set(manifest["source"]):
        raise ConfigError(f"external_test_sources {sorted(unknown)} not in the manifest's sources {sorted(set(manifest['source']))}")

    patients = _patient_strata(manifest)
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for _, group in patients.groupby(["label", "source"], sort=True):
        ids = group["patient_id"].to_numpy()
        if group["source"].iloc[0] in external:
            assignment.update({pid: "test" for pid in ids})
            continue
        ids = ids[rng.permutation(len(ids))]
        n_val, n_test = _counts(len(ids), fractions)
        n_train = len(ids) - n_val - n_test
        assignment.update({pid: "train" for pid in ids[:n_train]})
        assignment.update({pid: "val" for pid in ids[n_train:n_train + n_val]})
        assignment.update({pid: "test" for pid in ids[n_train + n_val:]})
    if linked_patients is not None:
        assignment = _pull_groups_together(manifest, assignment, patient_groups(manifest, linked_patients), external)
    out = manifest.copy()
    out["split"] = out["patient_id"].map(assignment)
    assert_patient_disjoint(out)
    return out


def _pull_groups_together(manifest: pd.DataFrame, assignment: dict, group_of: pd.Series, external: set) -> dict:
    """Move every patient of a linked group to the split of the group's first patient (to test if
    any of them is from an external test source). Unlinked patients keep their split, so links
    change as little of the split as they can."""
    out = dict(assignment)
    in_external = set(manifest.loc[manifest["source"].isin(external), "patient_id"])
    members: dict[Any, list] = {}
    for patient, group in group_of.items():
        members.setdefault(group, []).append(patient)
    for group, patients in members.items():
        if len(patients) > 1:
            target = "test" if in_external.intersection(patients) else assignment[group]
            out.update({pid: target for pid in patients})
    return out


def patient_groups(manifest: pd.DataFrame, linked_patients: LinkedPatients = None) -> pd.Series:
    """``patient_id -> group id`` for every patient of ``manifest``: linked patients share a group.

    ``linked_patients`` is one of: the duplicates table of :func:`xraylib.audit.find_duplicates`
    (``AuditReport.duplicates``: columns ``patient_a``, ``patient_b``; its rows between two
    images of one patient are ignored); pairs ``(patient_a, patient_b)``; a mapping
    ``patient_id -> group name`` (patients with the same name are linked); or None. Links are
    transitive (A~B and B~C put A, B and C together). A group is named by its smallest patient
    id, so an unlinked patient's group is its own id. Patients named in the links but absent from
    ``manifest`` (e.g. dropped by a filter) are ignored.

    Finding near-duplicates needs the pixels: build the cache once, run
    ``xraylib.audit.audit(None, data)``, and split again with
    ``linked_patients=report.duplicates`` (the audit found ieee8023 patients 97 and 178 sharing
    pictures, which a plain patient-level split can put on both sides).
    """
    ids = pd.unique(manifest["patient_id"])
    key = {str(pid): pid for pid in ids}
    parent = {name: name for name in key}

    def find(name: str) -> str:
        root = name
        while parent[root] != root:
            root = parent[root]
        while parent[name] != root:  # path compression
            parent[name], name = root, parent[name]
        return root

    def union(a: str, b: str) -> None:
        if a in parent and b in parent:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)

    for a, b in _link_pairs(linked_patients):
        union(str(a), str(b))
    return pd.Series({key[name]: key[find(name)] for name in key}, name="group", dtype=object)


def _link_pairs(linked_patients: LinkedPatients) -> Iterator[tuple[Any, Any]]:
    if linked_patients is None:
        return
    if isinstance(linked_patients, pd.DataFrame):
        if missing := {"patient_a", "patient_b"} - set(linked_patients.columns):
            raise ConfigError(f"linked_patients as a table needs the columns patient_a and patient_b (the audit's "
                              f"duplicates table); it lacks {sorted(missing)}")
        yield from zip(linked_patients["patient_a"], linked_patients["patient_b"])
        return
    if isinstance(linked_patients, Mapping):
        first_of: dict[Any, Any] = {}
        for patient, group in linked_patients.items():
            if group is None or (isinstance(group, float) and np.isnan(group)):
                continue
            yield patient, first_of.setdefault(group, patient)
        return
    for pair in linked_patients:
        if isinstance(pair, str) or len(pair) != 2:
            raise ConfigError(f"linked_patients must hold pairs (patient_a, patient_b), got {pair!r}")
        yield pair[0], pair[1]


def _counts(n: int, fractions: tuple[float, float, float]) -> tuple[int, int]:
    """(n_val, n_test) for a stratum of ``n`` patients, rounding to the nearest patient."""
    _, f_val, f_test = fractions
    n_test = int(round(n * f_test))
    n_val = int(round(n * f_val))
    # Small strata: keep at least one patient for training before filling val and test.
    while n_val + n_test > max(n - 1, 0) and (n_val or n_test):
        if n_val >= n_test and n_val:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def _patient_strata(manifest: pd.DataFrame) -> pd.DataFrame:
    """One row per patient with the patient's stratum label and source."""
    ranked = manifest.assign(_rank=manifest["label"].map(_LABEL_PRIORITY).fillna(9))
    first = ranked.sort_values(["patient_id", "_rank"], kind="stable").drop_duplicates("patient_id")
    return first[["patient_id", "label", "source"]].sort_values("patient_id").reset_index(drop=True)


def split_by_image(manifest: pd.DataFrame, test_fraction: float = 0.2, seed: int = 42) -> pd.DataFrame:
    """The seeds' protocol, for comparison only: a random image-level train/test split.

    It ignores patients, so the same patient can be in train and test. Never use it for a
    result you report as a model's performance; xraylib's benchmark shows how much it flatters.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(manifest))
    n_test = int(round(len(manifest) * test_fraction))
    split = np.full(len(manifest), "train", dtype=object)
    split[order[:n_test]] = "test"
    return manifest.assign(split=split)


def patients_in_several_splits(frame: pd.DataFrame) -> list[str]:
    """Patient ids that appear in more than one split (empty when the split is clean)."""
    counts = frame.groupby("patient_id")["split"].nunique()
    return sorted(counts[counts > 1].index)


def assert_patient_disjoint(frame: pd.DataFrame) -> None:
    """Raise :class:`SplitLeakError` naming the first patients found in two splits."""
    leaked = patients_in_several_splits(frame)
    if leaked:
        raise SplitLeakError(f"{len(leaked)} patient(s) are in more than one split, e.g. {leaked[:5]}")


def split_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Images and patients per split and label (rows: split, label; split in train/val/test order)."""
    grouped = frame.groupby(["split", "label"])
    table = pd.DataFrame({"images": grouped.size(), "patients": grouped["patient_id"].nunique()}).reset_index()
    table["split"] = pd.Categorical(table["split"], categories=SPLITS, ordered=True)
    return table.sort_values(["split", "label"]).reset_index(drop=True)
