"""Built-in sample data: chest-radiograph phantoms written in the real source layouts.

Real datasets cannot ship with the project and the machines it runs on have no internet, so
:func:`write_sample_data` writes the phantoms of :mod:`xraylib.phantoms` in the layout of every
source whose record (:data:`xraylib.sources.SOURCES`) has a ``sample_writer``
(:mod:`xraylib.sample_layouts`), each in the source's ``folder``:

* ``covid-chestxray-dataset/`` (ieee8023: ``metadata.csv`` + ``images/``),
* ``rsna-pneumonia/`` (``stage_2_train_images/*.dcm`` + the two label CSVs),
* ``chest-xray-pneumonia/chest_xray/{train,test,val}/{NORMAL,PNEUMONIA}/`` (Kaggle, children),
* ``nlm-tb/ChinaSet_AllFiles/`` and ``nlm-tb/MontgomerySet/`` (the NLM tuberculosis sets: ``CXR_png/``
  + ``ClinicalReadings/``; a third as many patients as the others, normals and tuberculosis films).

Everything is drawn from a seeded :class:`numpy.random.Generator`, so the same arguments give
byte-identical files: the manifest builder, the DICOM reader, the patient-level split and a
small CNN can be exercised end to end. This module imports no TensorFlow.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .fileio import make_partial_dir, remove_stale_partial_dirs, replace_dir
from .phantoms import LABELS, SiteShift, apply_site_shift, make_phantom
from . import sources
from .sources import Source

__all__ = ["LABELS", "SAMPLE_DATA_FILE", "SampleData", "write_sample_data", "SiteImages", "write_site_images"]

SAMPLE_DATA_FILE = "SAMPLE_DATA.json"
_GENERATOR_NAME = "xraylib.synthetic"
#: 2: the NLM Shenzhen and Montgomery sets (the earlier sources' bytes are unchanged).
_FORMAT_VERSION = 2


@dataclass(frozen=True)
class SampleData:
    """Where :func:`write_sample_data` put each source, and what it wrote.

    One field per source with a sample layout, named by its ``drive_key`` (as
    :class:`~xraylib.config.DrivePaths`); ``chest_xray_pneumonia`` is the folder that contains ``chest_xray/``,
    ``nlm_shenzhen`` and ``nlm_montgomery`` the set folders (``ChinaSet_AllFiles/``, ``MontgomerySet/``).
    """

    root: Path
    covid_chestxray_dataset: Path
    rsna_pneumonia: Path
    chest_xray_pneumonia: Path
    nlm_shenzhen: Path
    nlm_montgomery: Path
    counts: dict


def write_sample_data(
    dest: str | os.PathLike,
    n_patients: int = 30,
    seed: int = 0,
    image_size: int = 320,
    shortcut_marker: str | None = None,
) -> SampleData:
    """Write the sample sources under ``dest`` and return their paths and counts.

    Each source gets ``n_patients`` patients (each NLM set a third as many, at least 3). Images are about ``image_size`` pixels high.
    ``shortcut_marker`` (None or a label) burns a white "R" marker into every image of that
    label (for RSNA: "Normal" for ``"normal"``, "Lung Opacity" for ``"pneumonia"``).

    Same arguments, byte-identical files. If ``dest`` already holds sample data written with
    the same arguments nothing is rewritten; sample data written with other arguments is
    replaced. The data are written into a temporary sibling folder and renamed into place,
    so an interrupted run never leaves a complete-looking ``dest``; the temporary folders that a
    killed earlier call left beside ``dest`` are removed by the next call. Raises
    :class:`~xraylib.errors.ConfigError` for bad arguments or when ``dest`` is a non-empty
    folder that is not xraylib sample data.
    """
    params = _check_params(n_patients, seed, image_size, shortcut_marker)
    dest = Path(dest)
    # A source's folder may be nested ("nlm-tb/MontgomerySet"): a partial folder holds its first part.
    remove_stale_partial_dirs(dest, {SAMPLE_DATA_FILE, *(Path(source.folder).parts[0] for source in _sample_sources())})
    existing = _read_sample_marker(dest)
    # Bump _FORMAT_VERSION whenever the output changes, so that old sample data is redrawn.
    current = existing is not None and existing.get("format_version") == _FORMAT_VERSION
    if current and existing.get("parameters") == params:
        return _sample_data(dest, existing.get("counts", {}))
    if dest.exists() and existing is None:
        if not dest.is_dir():
            raise ConfigError(f"{dest}: exists and is a file; sample data needs a folder. Pass another dest.")
        if any(dest.iterdir()):
            raise ConfigError(
                f"{dest}: folder is not empty and holds no {SAMPLE_DATA_FILE}, so it is not xraylib "
                "sample data; refusing to overwrite it. Pass an empty or new folder as dest."
            )
    tmp = make_partial_dir(dest)
    try:
        counts = _write_all(tmp, params)
        info = {"generator": _GENERATOR_NAME, "format_version": _FORMAT_VERSION, "parameters": params, "counts": counts}
        # Written last: its presence is what marks the folder as complete sample data.
        (tmp / SAMPLE_DATA_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _sample_data(dest, counts)


def _check_params(n_patients: int, seed: int, image_size: int, shortcut_marker: str | None) -> dict:
    if isinstance(n_patients, bool) or not isinstance(n_patients, (int, np.integer)) or not 3 <= n_patients <= 100_000:
        raise ConfigError(f"n_patients must be an integer from 3 to 100000, got {n_patients!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or not 64 <= image_size <= 4096:
        raise ConfigError(f"image_size must be an integer from 64 to 4096, got {image_size!r}")
    if shortcut_marker is not None and shortcut_marker not in LABELS:
        raise ConfigError(f"shortcut_marker must be None or one of {LABELS}, got {shortcut_marker!r}")
    return {
        "n_patients": int(n_patients),
        "seed": int(seed),
        "image_size": int(image_size),
        "shortcut_marker": shortcut_marker,
    }


def _read_sample_marker(dest: Path) -> dict | None:
    """The parsed ``SAMPLE_DATA.json`` of ``dest`` if it is xraylib sample data, else None."""
    try:
        info = json.loads((dest / SAMPLE_DATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(info, dict) and info.get("generator") == _GENERATOR_NAME:
        return info
    return None


def _sample_sources() -> list[Source]:
    """The sources with a sample layout, in registry order."""
    return [source for source in sources.SOURCES if source.sample_writer is not None]


def _sample_data(root: Path, counts: dict) -> SampleData:
    folders = {source.drive_key: root / source.folder for source in _sample_sources()}
    return SampleData(root=root, counts=counts, **folders)


def _write_all(root: Path, params: dict) -> dict:
    seed, n, size, marked = params["seed"], params["n_patients"], params["image_size"], params["shortcut_marker"]
    # One independent stream per source: adding a column to one layout leaves the others' bytes alone.
    # The stream number is the source's place among those with a layout: add new sources at the end.
    return {
        source.folder: source.sample_writer(root / source.folder, np.random.default_rng([seed, k]), n, size, marked)
        for k, source in enumerate(_sample_sources(), start=1)
    }


# --------------------------------------------------------------------------------------------
# A new site: the images a user brings to calibrate a model for their own hospital


@dataclass(frozen=True)
class SiteImages:
    """Where :func:`write_site_images` put a site's images: one folder of PNGs per label, and how many."""

    root: Path
    normals: Path
    positives: Path
    counts: dict


def write_site_images(dest: str | os.PathLike, n_normal: int, n_positive: int = 0, shift: SiteShift = SiteShift(),
                      seed: int = 0, positive_label: str = "covid", height: int = 256, width: int = 240) -> SiteImages:
    """Write frontal adult phantoms as a "new site" made them: ``dest/normal/*.png`` and ``dest/<positive_label>/*.png``.

    Every image goes through :func:`xraylib.phantoms.apply_site_shift` (``shift``: another intensity
    curve, borders, burned-in text); sizes vary by up to 10 % around ``height`` x ``width``. One
    generator per image, seeded by ``(seed, label, index)``: the same arguments write the same bytes,
    and more images keep the first ones. The folder is built beside ``dest`` and renamed into place.
    """
    import cv2

    if positive_label not in LABELS or positive_label == "normal":
        raise ConfigError(f"positive_label must be one of {[l for l in LABELS if l != 'normal']}, got {positive_label!r}")
    for name, value in (("n_normal", n_normal), ("n_positive", n_positive)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= 100_000:
            raise ConfigError(f"{name} must be a whole number from 0 to 100000, got {value!r}")
    dest = Path(dest)
    tmp = make_partial_dir(dest)
    counts = {}
    try:
        for k, (label, n) in enumerate((("normal", n_normal), (positive_label, n_positive))):
            folder = tmp / label
            folder.mkdir()
            for i in range(int(n)):
                rng = np.random.default_rng([seed, 7919, k, i])
                h, w = (int(round(side * rng.uniform(0.9, 1.1))) for side in (height, width))
                view = ("PA", "AP")[int(rng.integers(0, 2))]
                image = apply_site_shift(make_phantom(label, rng, h, w, view=view).image, shift)
                if not cv2.imwrite(str(folder / f"site_{label}_{i:04d}.png"), image):
                    raise ConfigError(f"{folder}: could not write PNG files here")
            counts[label] = int(n)
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SiteImages(dest, dest / "normal", dest / positive_label, counts)
