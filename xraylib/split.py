"""Patient-level, stratified train/validation/test splits.

A patient's images all go to one split: with several images per patient (ieee8023 has up to
a dozen), an image-level split puts the same patient in training and test and flatters every
metric. Patients are stratified by (label, source) so each split keeps the class and source
mix. Whole sources can be held out as an external test set.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd

from .errors import ConfigError, XraylibError

SPLITS = ("train", "val", "test")

# When a patient has images of several labels, the patient's stratum is the most specific one.
_LABEL_PRIORITY = {"covid": 0, "pneumonia": 1, "normal": 2}


class SplitLeakError(XraylibError):
    """A patient appears in more than one split."""


def split_by_patient(
    manifest: pd.DataFrame,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 42,
    external_test_sources: Iterable[str] = (),
) -> pd.DataFrame:
    """Return a copy of ``manifest`` with a ``split`` column ("train", "val", "test").

    Patients (``patient_id``) are grouped by their (label, source) stratum, shuffled with
    ``seed`` and cut by ``fractions`` (train, val, test), so every stratum is spread over the
    splits in those proportions (a stratum with one or two patients goes to train first).
    Rows of ``external_test_sources`` all go to test and no patient of theirs is used elsewhere.
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
    out = manifest.copy()
    out["split"] = out["patient_id"].map(assignment)
    assert_patient_disjoint(out)
    return out


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
