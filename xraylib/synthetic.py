"""Built-in sample data: chest-radiograph phantoms drawn in code, written in the real layouts.

Real datasets cannot ship with the project and the machines it runs on have no internet, so
this module draws chest X-ray phantoms (lungs, heart, ribs, clavicles, diaphragm, noise) with
OpenCV and writes them in the three source layouts the pipeline reads:

* ``covid-chestxray-dataset/`` (ieee8023: ``metadata.csv`` + ``images/``),
* ``rsna-pneumonia/`` (``stage_2_train_images/*.dcm`` + the two label CSVs),
* ``chest-xray-pneumonia/chest_xray/{train,test,val}/{NORMAL,PNEUMONIA}/`` (Kaggle, children).

Everything is drawn from a seeded :class:`numpy.random.Generator`, so the same arguments give
byte-identical files. The phantoms are not anatomy-accurate; they exist so that the manifest
builder, the DICOM reader, the patient-level split and a small CNN can be exercised end to end.
This module imports no TensorFlow.
"""
from __future__ import annotations

import csv
import datetime
import io
import json
import math
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from .errors import ConfigError

__all__ = [
    "LABELS",
    "VIEWS",
    "COVID_METADATA_COLUMNS",
    "RSNA_LABEL_COLUMNS",
    "RSNA_CLASS_COLUMNS",
    "RSNA_CLASSES",
    "Phantom",
    "SampleData",
    "make_phantom",
    "burn_marker",
    "write_sample_data",
]

#: The class labels a phantom can carry.
LABELS = ("normal", "covid", "pneumonia")
#: Radiographic views, spelled as in ieee8023's ``view`` column.
VIEWS = ("PA", "AP", "AP Supine", "L")

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

SAMPLE_DATA_FILE = "SAMPLE_DATA.json"
_GENERATOR_NAME = "xraylib.synthetic"
_FORMAT_VERSION = 1

# Fixed encoder settings: the files must be byte-identical from run to run.
_JPEG_PARAMS = [cv2.IMWRITE_JPEG_QUALITY, 92, cv2.IMWRITE_JPEG_OPTIMIZE, 0]
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 6]

# A UID root registered for free use (Medical Connections); suffixes come from the seed.
_UID_ROOT = "1.2.826.0.1.3680043.8.498."

_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December")  # fmt: skip


# --------------------------------------------------------------------------------------------
# Phantoms
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Phantom:
    """One synthetic radiograph with its ground truth.

    ``image``: (H, W) uint8, X-ray convention (air dark, bone and soft tissue bright).
    ``lung_mask``: (H, W) bool, the lung fields. ``lesion_mask``: (H, W) bool, where an
    opacity was added (inside ``lung_mask``; all False for ``"normal"``). Arrays are read-only.
    """

    image: np.ndarray
    lung_mask: np.ndarray
    lesion_mask: np.ndarray
    label: str
    view: str
    pediatric: bool


def make_phantom(
    label: str,
    rng: np.random.Generator,
    height: int = 320,
    width: int = 288,
    *,
    view: str = "PA",
    pediatric: bool = False,
    marker: bool = False,
) -> Phantom:
    """Draw one chest radiograph phantom of class ``label`` (one of :data:`LABELS`).

    ``"covid"`` adds bilateral, peripheral, lower-zone ground-glass opacities; ``"pneumonia"``
    a unilateral lobar consolidation with a sharp fissure edge. ``view`` is one of
    :data:`VIEWS` (``"L"`` is a crude lateral). ``pediatric`` draws a small child's thorax.
    ``marker`` burns a bright "R" marker into the top-left corner (a deliberate shortcut).

    Anatomy, lesions and noise come from three streams seeded by ``rng``, so two calls with
    generators in the same state and different labels share anatomy and noise: they differ
    only where the lesion is. About 5 ms for 320x288 on one core.
    """
    return _make_phantom(label, rng, height, width, view=view, pediatric=pediatric, marker=marker)


def burn_marker(image: np.ndarray) -> np.ndarray:
    """Return a copy of ``image`` ((H, W) or (H, W, 3) uint8) with a white "R" box at top left.

    The marker is drawn without randomness, at the same relative place and size in every
    image, so that a model can learn it as a shortcut.
    """
    out = np.array(image, dtype=np.uint8, copy=True)
    h, w = out.shape[:2]
    side = min(h, w)
    box = max(9, int(round(0.085 * side)))
    x0, y0 = int(round(0.035 * w)), int(round(0.035 * h))
    thickness = max(1, box // 9)
    color = (255, 255, 255) if out.ndim == 3 else 255
    cv2.rectangle(out, (x0, y0), (x0 + box, y0 + box), color, thickness, cv2.LINE_8)
    scale = cv2.getFontScaleFromHeight(cv2.FONT_HERSHEY_SIMPLEX, int(box * 0.62), thickness + 1)
    (tw, th), _ = cv2.getTextSize("R", cv2.FONT_HERSHEY_SIMPLEX, scale, thickness + 1)
    org = (x0 + (box - tw) // 2 + 1, y0 + (box + th) // 2)
    cv2.putText(out, "R", org, cv2.FONT_HERSHEY_SIMPLEX, scale, color, thickness + 1, cv2.LINE_AA)
    return out


def _make_phantom(
    label: str,
    rng: np.random.Generator,
    height: int,
    width: int,
    *,
    view: str = "PA",
    pediatric: bool = False,
    marker: bool = False,
    extra: str | None = None,
    bilateral: bool = False,
) -> Phantom:
    """:func:`make_phantom` plus the RSNA variants: ``extra`` ("nodule", "cardiomegaly",
    "effusion") for "No Lung Opacity / Not Normal", ``bilateral`` consolidation."""
    if label not in LABELS:
        raise ConfigError(f"label must be one of {LABELS}, got {label!r}")
    if view not in VIEWS:
        raise ConfigError(f"view must be one of {VIEWS}, got {view!r}")
    if not (32 <= int(height) <= 8192 and 32 <= int(width) <= 8192):
        raise ConfigError(f"height and width must be 32..8192 pixels, got {height}x{width}")
    h, w = int(height), int(width)
    # Separate streams: anatomy and noise must not depend on the label, so that a normal and a
    # diseased phantom from the same seed differ only by the lesion.
    seeds = rng.integers(0, 2**63 - 1, size=3)
    rng_anatomy, rng_lesion, rng_noise = (np.random.default_rng(int(s)) for s in seeds)
    acq = _Acquisition.draw(rng_anatomy, h, w, pediatric)

    if view == "L":
        density, lungs, lesion = _draw_lateral(h, w, label, pediatric, rng_anatomy, rng_lesion)
    else:
        density, lungs, lesion = _draw_frontal(
            h, w, label, view, pediatric, rng_anatomy, rng_lesion, extra=extra, bilateral=bilateral
        )
    image, lung_mask, lesion_mask = _expose(density, lungs, lesion, acq, rng_noise)
    if marker:
        image = burn_marker(image)
    for array in (image, lung_mask, lesion_mask):
        array.flags.writeable = False
    return Phantom(image, lung_mask, lesion_mask, label, view, bool(pediatric))


@dataclass(frozen=True)
class _Acquisition:
    """Exposure and positioning: what differs between two films of the same chest."""

    angle_deg: float
    shift_x: float
    shift_y: float
    gamma: float
    contrast: float
    brightness: float
    noise_sigma: float
    blur_sigma: float
    heel: float

    @staticmethod
    def draw(rng: np.random.Generator, h: int, w: int, pediatric: bool) -> _Acquisition:
        shift = 0.07 if pediatric else 0.04
        return _Acquisition(
            angle_deg=float(rng.uniform(-5.0, 5.0)),
            shift_x=float(rng.uniform(-shift, shift) * w),
            shift_y=float(rng.uniform(-shift, shift) * h),
            gamma=float(rng.uniform(0.8, 1.25)),
            contrast=float(rng.uniform(0.85, 1.2)),
            brightness=float(rng.uniform(-0.06, 0.06)),
            noise_sigma=float(rng.uniform(0.008, 0.03)),
            blur_sigma=float(rng.uniform(0.45, 0.9)) * max(1.0, min(h, w) / 320),
            heel=float(rng.uniform(-0.08, 0.08)),
        )


def _expose(
    density: np.ndarray, lungs: np.ndarray, lesion: np.ndarray, acq: _Acquisition, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Density map -> uint8 radiograph: exponential attenuation, positioning, noise, blur, LUT."""
    h, w = density.shape
    # Detector response: dense paths saturate, as on film.
    intensity = 1.0 - cv2.exp(density * np.float32(-1.5))
    # Heel effect: one side of the field slightly brighter.
    ramp = 1.0 + acq.heel * (np.arange(w, dtype=np.float32) / w - 0.5)
    intensity *= ramp[None, :]
    matrix = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), acq.angle_deg, 1.0)
    matrix[0, 2] += acq.shift_x
    matrix[1, 2] += acq.shift_y
    intensity = cv2.warpAffine(intensity, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    masks = cv2.merge([lungs, lesion, np.zeros_like(lungs)])
    masks = cv2.warpAffine(masks, matrix, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT)
    lung_mask = masks[:, :, 0] > 0
    lesion_mask = (masks[:, :, 1] > 0) & lung_mask
    # Uniform noise scaled to unit variance: after the blur it is as good as Gaussian and five
    # times cheaper to draw.
    noise = rng.random((h, w), dtype=np.float32) - np.float32(0.5)
    # Quantum noise grows with the signal; a floor keeps the dark areas grainy too.
    intensity += noise * (np.float32(acq.noise_sigma * 3.4641) * (0.5 + 0.5 * intensity))
    intensity = cv2.GaussianBlur(intensity, (0, 0), acq.blur_sigma)
    np.maximum(intensity, 0.0, out=intensity)
    image = cv2.convertScaleAbs(intensity, alpha=255.0)
    levels = np.arange(256, dtype=np.float64) / 255.0
    lut = (levels**acq.gamma - 0.5) * acq.contrast + 0.5 + acq.brightness
    lut = np.clip(np.round(lut * 255.0), 0, 255).astype(np.uint8)
    return cv2.LUT(image, lut), lung_mask, lesion_mask


def _ellipse_profile(ratio: np.ndarray) -> np.ndarray:
    """Chord length through a cylinder, sqrt(1 - ratio**2), 0 outside; float32."""
    inner = np.float32(1.0) - ratio * ratio
    np.maximum(inner, 0.0, out=inner)
    return cv2.sqrt(inner)


def _bump(v: np.ndarray | float, center: float, width: float) -> np.ndarray:
    return np.exp(-(((np.asarray(v) - center) / width) ** 2))


def _blur_coarse(layer: np.ndarray, sigma_px: float, factor: int = 4) -> np.ndarray:
    """Wide Gaussian blur computed at 1/``factor`` resolution: same look, a fraction of the time."""
    h, w = layer.shape
    small = cv2.resize(layer, (max(1, w // factor), max(1, h // factor)), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), max(0.5, sigma_px / factor))
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _coarse_noise(rng: np.random.Generator, h: int, w: int, cells: int = 10) -> np.ndarray:
    """Smooth random texture in about [0, 1], (h, w) float32."""
    grid = rng.random((cells, max(2, round(cells * w / h))), dtype=np.float32)
    # Cubic up to quarter size, then linear: smooth, at a fraction of a full-size cubic resize.
    quarter = cv2.resize(grid, (max(2, w // 4), max(2, h // 4)), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(quarter, (w, h), interpolation=cv2.INTER_LINEAR)


class _Frame:
    """Maps thorax coordinates to pixels.

    ``m`` runs from the midline outwards in units of the half thorax width ``tw`` (negative =
    image left = patient's right); ``v`` runs from the lung apex (0) to the right diaphragm
    dome (1) in units of the lung height ``lh``. Drawing uses 4 fractional bits (``shift=4``).
    """

    def __init__(self, cx: float, y_apex: float, tw: float, lh: float):
        self.cx, self.y_apex, self.tw, self.lh = cx, y_apex, tw, lh

    def xy(self, m: np.ndarray, v: np.ndarray) -> np.ndarray:
        """(..., 2) float64 pixel coordinates."""
        x = self.cx + np.asarray(m, dtype=np.float64) * self.tw
        y = self.y_apex + np.asarray(v, dtype=np.float64) * self.lh
        return np.stack(np.broadcast_arrays(x, y), axis=-1)

    def fixed(self, m: np.ndarray, v: np.ndarray) -> np.ndarray:
        """(..., 2) int32 points in 1/16 pixel."""
        return np.rint(self.xy(m, v) * 16.0).astype(np.int32)

    def px(self, m: float, v: float) -> tuple[int, int]:
        return int(round((self.cx + m * self.tw) * 16.0)), int(round((self.y_apex + v * self.lh) * 16.0))

    def resized(self, sx: float, sy: float) -> _Frame:
        """The same anatomy on a grid resized by (sx, sy), pixel centres aligned as cv2.resize does."""
        return _Frame((self.cx + 0.5) * sx - 0.5, (self.y_apex + 0.5) * sy - 0.5, self.tw * sx, self.lh * sy)

    def axes(self, am: float, av: float) -> tuple[int, int]:
        return max(1, int(round(am * self.tw * 16.0))), max(1, int(round(av * self.lh * 16.0)))

    def rows(self, h: int) -> np.ndarray:
        return ((np.arange(h, dtype=np.float32) - np.float32(self.y_apex)) / np.float32(self.lh))

    def cols(self, w: int) -> np.ndarray:
        return ((np.arange(w, dtype=np.float32) - np.float32(self.cx)) / np.float32(self.tw))


def _fill_ribbons(layer: np.ndarray, centre: np.ndarray, width: float, value: float) -> None:
    """Fill bands of ``width`` pixels around centre lines ((N, K, 2) pixel coordinates).

    Filled polygons instead of thick polylines: the same look, several times faster.
    """
    tangent = np.gradient(centre, axis=1)
    normal = np.stack([-tangent[..., 1], tangent[..., 0]], axis=-1)
    normal *= (0.5 * width) / np.maximum(np.linalg.norm(normal, axis=-1, keepdims=True), 1e-6)
    outline = np.concatenate([centre + normal, (centre - normal)[:, ::-1]], axis=1)
    cv2.fillPoly(layer, list(np.rint(outline * 16).astype(np.int32)), value, cv2.LINE_8, 4)


def _polyline(layer: np.ndarray, pts: np.ndarray | list, value: float, thickness: float) -> None:
    pts = pts if isinstance(pts, list) else [pts]
    cv2.polylines(layer, pts, False, value, max(1, int(round(thickness))), cv2.LINE_8, 4)


def _ellipse(
    layer: np.ndarray, frame: _Frame, m: float, v: float, am: float, av: float, angle: float, value: float
) -> None:
    cv2.ellipse(layer, frame.px(m, v), frame.axes(am, av), angle, 0, 360, value, -1, cv2.LINE_8, 4)


def _draw_frontal(
    h: int,
    w: int,
    label: str,
    view: str,
    pediatric: bool,
    rng: np.random.Generator,
    rng_lesion: np.random.Generator,
    *,
    extra: str | None = None,
    bilateral: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PA/AP chest: density (h, w) float32, lung mask and lesion mask (h, w) uint8 {0, 1}.

    Smooth structures (body, air, heart, vessels, lesions) are computed at half resolution
    and upsampled; only the bones, whose edges carry the fine detail, are drawn at full size.
    """
    if pediatric:
        scale = rng.uniform(0.82, 0.94)
        heart = rng.uniform(1.08, 1.22)
        rib_contrast = rng.uniform(0.55, 0.75)
        lung_height = 0.92
        rib_rise, rib_drop = rng.uniform(0.03, 0.06), rng.uniform(0.08, 0.12)
    else:
        scale = rng.uniform(0.88, 1.02)
        heart = rng.uniform(0.88, 1.08)
        rib_contrast = rng.uniform(0.8, 1.15)
        lung_height = 1.0
        rib_rise, rib_drop = rng.uniform(0.1, 0.15), rng.uniform(0.2, 0.28)
    if view in ("AP", "AP Supine"):
        # The heart is far from the detector on an AP film and is magnified.
        heart *= 1.1 if view == "AP" else 1.15
    if extra == "cardiomegaly":
        heart *= 1.35
    aspect = rng.uniform(0.93, 1.07)
    tw = (0.40 if not pediatric else 0.42) * min(w, (0.95 if not pediatric else 1.2) * h) * scale * aspect
    lh = 0.56 * min(h, 1.15 * w) * scale * lung_height * rng.uniform(0.95, 1.05)
    # A child is imaged with more of the neck and the abdomen in the field.
    frame = _Frame(w / 2.0, h * 0.5 - (0.62 if not pediatric else 0.72) * lh, tw, lh)
    hh, wh = (h + 1) // 2, (w + 1) // 2
    half = frame.resized(wh / w, hh / h)
    fat = rng.uniform(0.04, 0.2)
    lung_dark = rng.uniform(0.6, 0.68)
    dome_left = rng.uniform(0.03, 0.08)
    m_lat_max = rng.uniform(0.9, 0.96)
    apex_round = 0.75 if not pediatric else 0.6

    # Body outline as half-width per row: neck, sloping shoulders, chest wall, abdomen.
    if pediatric:
        levels = np.array([-0.8, -0.35, -0.15, 0.0, 0.2, 0.7, 1.1, 1.5, 3.0])
        widths = np.array([0.42, 0.46, 0.75, 1.0, 1.1, 1.15, 1.1, 1.06, 1.04])
    else:
        levels = np.array([-1.0, -0.3, -0.2, -0.1, 0.0, 0.6, 1.05, 1.5, 3.0])
        widths = np.array([0.3, 0.34, 0.6, 1.0, 1.2, 1.1, 1.04, 1.0, 0.98])
    rows, cols = half.rows(hh), half.cols(wh)
    half_width = np.interp(rows, levels, widths + fat * np.clip(levels, 0, 1))
    depth = np.interp(rows, [-1.0, -0.15, 0.15, 1.0, 1.3, 2.0], [0.6, 0.72, 0.95, 1.0, 1.12, 1.15]).astype(np.float32)
    thickness = _ellipse_profile(cols[None, :] / half_width.astype(np.float32)[:, None]) * depth[:, None]
    inside = (thickness > 0).astype(np.float32)

    # Lung fields: exact masks at full size, anti-aliased copies at half size.
    lungs = np.zeros((h, w), np.uint8)
    side_masks: dict[int, np.ndarray] = {}
    for side in (-1, 1):
        dome = 1.0 if side < 0 else 1.0 + dome_left
        poly = _lung_polygon(side, dome, m_lat_max, apex_round, heart, pediatric)
        mask = np.zeros((h, w), np.uint8)
        cv2.fillPoly(mask, [frame.fixed(poly[:, 0], poly[:, 1])], 1, cv2.LINE_8, 4)
        lungs |= mask
        side_masks[side] = cv2.resize(mask.astype(np.float32), (wh, hh), interpolation=cv2.INTER_AREA)
    lung_h = side_masks[-1] + side_masks[1]
    soft = cv2.GaussianBlur(lung_h, (0, 0), 0.014 * half.lh)
    wide = _blur_coarse(lung_h, 0.07 * half.lh, 2)
    # Air is thickest in the middle of each lung: its edges are lighter than its core.
    air = (0.55 + 0.45 * np.minimum(1.0, 1.6 * wide)) * soft
    air *= lung_dark * (0.9 + 0.2 * _coarse_noise(rng, hh, wh, 24))
    density = thickness * (0.82 - air)

    # Mediastinum, spine and heart: soft tissue in front of and behind the air.
    tissue = np.zeros((hh, wh), np.float32)
    cv2.rectangle(tissue, half.px(-0.2, -0.1), half.px(0.2, 0.7), 0.1, -1, cv2.LINE_8, 4)
    cv2.rectangle(tissue, half.px(-0.08, -0.3), half.px(0.08, 3.0), 0.12, -1, cv2.LINE_8, 4)
    _ellipse(tissue, half, 0.12 * heart, 0.8, 0.42 * heart, 0.25, -12, 0.16)
    # Trachea: an air column down to the carina.
    cv2.rectangle(tissue, half.px(-0.045, -3.0), half.px(0.045, 0.3), -0.02, -1, cv2.LINE_8, 4)
    if rng.random() < 0.6:
        # Gastric air bubble under the left dome.
        _ellipse(tissue, half, 0.45, 1.0 + dome_left + 0.1, 0.13, 0.05, 0, -0.3)
    density += cv2.GaussianBlur(tissue, (0, 0), 0.015 * half.lh) * thickness
    if pediatric:
        # Children are held with their arms up beside the head: soft tissue in the top corners.
        arms = np.zeros((hh, wh), np.float32)
        for side in (-1, 1):
            arm = half.fixed(side * np.array([1.02, 1.0, 0.95]), np.array([0.1, -0.3, -1.5]))
            _polyline(arms, arm, 0.45, 0.3 * half.tw)
        density += _blur_coarse(arms, 0.05 * half.lh, 2)

    # Vessels fanning out from the hila (seen only against air) and vertebral bodies.
    vessels = np.zeros((hh, wh), np.float32)
    for side in (-1, 1):
        hilum_m, hilum_v = (0.24, 0.44) if side < 0 else (0.3, 0.4)
        _ellipse(vessels, half, side * hilum_m, hilum_v, 0.1, 0.09, 20 * side, 0.6)
        _draw_vessel_tree(vessels, half, rng, side * hilum_m, hilum_v, side, 0.008 * half.lh, depth=2, roots=8)
    spine = np.zeros((hh, wh), np.float32)
    for i in range(-5, 18):
        cv2.rectangle(spine, half.px(-0.065, i * 0.09), half.px(0.065, i * 0.09 + 0.072), 0.1, -1, cv2.LINE_8, 4)
    detail = cv2.GaussianBlur(0.12 * vessels * soft + spine, (0, 0), 0.004 * half.lh + 0.5)
    density += detail * inside

    lesion = np.zeros((hh, wh), np.float32)
    if label == "covid":
        lesion = _ground_glass(half, soft, rng_lesion, hh, wh, m_lat_max)
        density += rng_lesion.uniform(0.42, 0.55) * lesion * np.maximum(thickness, 0.5)
    elif label == "pneumonia":
        for side in (-1, 1) if bilateral else (None,):
            lesion = np.maximum(lesion, _consolidation(half, side_masks, rng_lesion, hh, wh, side))
        texture = 0.8 + 0.2 * _coarse_noise(rng_lesion, hh, wh, 16)
        bronchi = np.zeros((hh, wh), np.float32)
        for side in (-1, 1):
            _draw_vessel_tree(bronchi, half, rng_lesion, side * 0.28, 0.45, side, 0.004 * half.lh, depth=2)
        texture -= 0.3 * cv2.GaussianBlur(bronchi, (0, 0), 0.6)
        density += rng_lesion.uniform(0.6, 0.75) * lesion * texture
    if extra == "nodule":
        nodule = np.zeros((hh, wh), np.float32)
        side = -1 if rng_lesion.random() < 0.5 else 1
        m, v = side * rng_lesion.uniform(0.45, 0.7), rng_lesion.uniform(0.3, 0.7)
        _ellipse(nodule, half, m, v, 0.03 * lh / tw, 0.03, 0, 1.0)
        density += 0.5 * cv2.GaussianBlur(nodule, (0, 0), 0.006 * half.lh + 0.5)
    elif extra == "effusion":
        fluid = np.zeros((hh, wh), np.float32)
        side = -1 if rng_lesion.random() < 0.5 else 1
        level = rng_lesion.uniform(0.62, 0.75)
        mm = np.linspace(0.1, 1.2, 12)
        top = half.fixed(side * mm, level + 0.25 - 0.22 * mm**3)
        meniscus = np.concatenate([top, half.fixed(side * mm[::-1], np.full(12, 1.4))])
        cv2.fillPoly(fluid, [meniscus], 1.0, cv2.LINE_8, 4)
        # Fluid layers at the base: densest at the bottom, fading up the meniscus.
        gradient = np.clip((half.rows(hh) - level) / 0.25, 0.3, 1.0)[:, None]
        density += 0.6 * _blur_coarse(fluid * gradient, 0.025 * half.lh, 2) * side_masks[side]

    # Full size from here: upsample the smooth part, then add the bones.
    bone_weight = (rib_contrast * 0.2) * inside * (0.45 + 0.55 * soft)
    bone_weight = cv2.resize(bone_weight, (w, h), interpolation=cv2.INTER_LINEAR)
    density = cv2.resize(density, (w, h), interpolation=cv2.INTER_LINEAR)
    bones = _draw_frontal_bones(frame, h, w, pediatric, view, rng, rib_rise, rib_drop, m_lat_max, widths.max())
    # Bone over thick soft tissue shows less than bone over lung.
    density += bones * bone_weight
    if label == "normal":
        lesion_mask = np.zeros((h, w), np.uint8)
    else:
        lesion_full = cv2.resize(lesion, (w, h), interpolation=cv2.INTER_LINEAR)
        lesion_mask = ((lesion_full > 0.25) & (lungs > 0)).astype(np.uint8)
    return density, lungs, lesion_mask


def _draw_frontal_bones(
    frame: _Frame, h: int, w: int, pediatric: bool, view: str, rng: np.random.Generator,
    rib_rise: float, rib_drop: float, m_lat_max: float, shoulder: float,
) -> np.ndarray:
    """Posterior ribs (arches), anterior ribs (faint), clavicles, scapulae, humeral heads; (h, w) float32."""
    lh, tw = frame.lh, frame.tw
    bones = np.zeros((h, w), np.float32)
    rib_width = (0.036 if not pediatric else 0.032) * lh
    spacing = rng.uniform(0.094, 0.106) if not pediatric else rng.uniform(0.1, 0.112)
    # Posterior ribs rise from the spine, arch at about 60 % of their reach and drop steeply
    # along the lateral chest wall.
    along = np.linspace(0.0, 1.0, 18)
    arch = rib_rise * (np.clip(0.6 - along, 0, None) / 0.6) ** 2
    arch += rib_drop * (np.clip(along - 0.6, 0, None) / 0.4) ** 1.7
    index = np.arange(10 if not pediatric else 9)[:, None]
    reach = (m_lat_max + 0.08) * (0.55 + 0.45 * np.minimum(1.0, (index + 1) / 3.0))
    mm = 0.05 + reach * along
    vv = -0.07 + index * spacing + arch * np.where(index < 2, 1.3, 1.0)
    centre = np.concatenate([frame.xy(-mm, vv), frame.xy(mm, vv)])
    _fill_ribbons(bones, centre, rib_width, 1.0)
    # Marrow is less dense than cortex: the rib edges stand out.
    _fill_ribbons(bones, centre, rib_width * 0.45, 0.6 if not pediatric else 0.85)
    ma = np.linspace(0.95, 0.3, 10) * m_lat_max
    va = 0.1 + np.arange(6)[:, None] * spacing * 1.2 + 0.2 * ((0.95 * m_lat_max - ma) / (0.65 * m_lat_max)) ** 1.4
    _fill_ribbons(bones, np.concatenate([frame.xy(-ma, va), frame.xy(ma, va)]), rib_width * 1.3, 0.5)
    clav_raise = 0.06 if view != "PA" else 0.0
    mc = np.linspace(0.06, 0.9, 12)
    vc = -0.02 - clav_raise - 0.12 * mc + 0.045 * np.sin(np.pi * mc)
    ms = np.linspace(0.0, 1.0, 8)
    for side in (-1, 1):
        _polyline(bones, frame.fixed(side * mc, vc), 1.3, 0.045 * lh)
        _polyline(bones, frame.fixed(side * (0.72 + 0.16 * ms**0.7), -0.06 + 0.5 * ms), 0.45, 0.018 * lh)
        if not pediatric:  # a child's arms are up, its humeral heads out of the field
            cv2.circle(bones, frame.px(side * shoulder * 0.86, -0.03), int(0.11 * tw * 16), 0.6, -1, cv2.LINE_8, 4)
    return cv2.GaussianBlur(bones, (0, 0), 0.004 * lh + 0.5)


def _lung_polygon(
    side: int, dome: float, m_lat_max: float, apex_round: float, heart: float, pediatric: bool
) -> np.ndarray:
    """Outline of one lung field as (N, 2) points in frame coordinates (m, v)."""
    # Lateral border: rounded apex, then the chest wall down to the costophrenic angle.
    v_cp = dome + 0.1
    v_lat = np.linspace(0.0, v_cp, 18)
    m_lat = m_lat_max - 0.5 * (1.0 - np.minimum(v_lat / apex_round, 1.0)) ** 2
    # Medial border: mediastinum, aortic knob and heart on the left, right atrium on the right.
    v_med = np.linspace(dome + 0.06, 0.0, 22)
    m_med = 0.15 + 0.2 * (1.0 - np.minimum(v_med / 0.28, 1.0)) ** 2
    if pediatric:
        m_med = m_med + 0.05 * _bump(v_med, 0.3, 0.12)  # the thymus widens the upper mediastinum
    if side < 0:
        m_med = m_med + 0.11 * heart * _bump(v_med, 0.82, 0.22)
    else:
        m_med = m_med + 0.04 * _bump(v_med, 0.26, 0.07) + 0.4 * heart * _bump(v_med, 0.92, 0.36)
    # Diaphragm dome, convex upwards, from the costophrenic to the cardiophrenic angle.
    t = np.linspace(0.0, 1.0, 16)[1:-1]
    m_dia = m_lat[-1] + (m_med[0] - m_lat[-1]) * t
    peak = 0.45
    v_dia = dome + np.where(t < peak, 0.1 * ((peak - t) / peak) ** 2, 0.06 * ((t - peak) / (1 - peak)) ** 2)
    m_all = np.concatenate([[(m_lat[0] + m_med[-1]) / 2], m_lat, m_dia, m_med])
    v_all = np.concatenate([[-0.035], v_lat, v_dia, v_med])
    return np.stack([side * m_all, v_all], axis=1)


def _draw_vessel_tree(
    layer: np.ndarray, frame: _Frame, rng: np.random.Generator, m0: float, v0: float, side: int,
    width_px: float, depth: int = 3, roots: int = 6,
) -> None:
    """Branching lines from a hilum outwards, each generation thinner and fainter."""
    m = np.full(roots, m0)
    v = np.full(roots, v0)
    angle = rng.uniform(-1.25, 1.15, roots)  # radians from horizontal, towards the chest wall
    length = rng.uniform(0.16, 0.26, roots)
    stretch = frame.tw / frame.lh
    for level in range(depth, -1, -1):
        m1 = m + side * np.cos(angle) * length
        v1 = v + np.sin(angle) * length * stretch
        segments = list(frame.fixed(np.stack([m, m1], axis=1), np.stack([v, v1], axis=1)))
        _polyline(layer, segments, 0.45 + 0.55 * level / max(depth, 1), width_px * (level + 1) / (depth + 1))
        if level:
            n = len(m1) * 2
            m, v = np.repeat(m1, 2), np.repeat(v1, 2)
            angle = np.repeat(angle, 2) + rng.uniform(-0.5, 0.5, n)
            length = np.repeat(length, 2) * rng.uniform(0.6, 0.8, n)


def _ground_glass(
    frame: _Frame, soft: np.ndarray, rng: np.random.Generator, h: int, w: int, m_lat_max: float
) -> np.ndarray:
    """COVID-19 pattern: hazy patches along the lateral edges of both lower lungs, [0, 1] float32."""
    patches = np.zeros((h, w), np.float32)
    for side in (-1, 1):
        for _ in range(int(rng.integers(2, 5))):
            _ellipse(
                patches, frame, side * (m_lat_max - rng.uniform(0.1, 0.24)), rng.uniform(0.5, 0.92),
                rng.uniform(0.12, 0.2), rng.uniform(0.1, 0.17), rng.uniform(0, 180), rng.uniform(0.8, 1.0),
            )
    haze = _blur_coarse(patches, 0.03 * frame.lh, 2)
    texture = 0.7 + 0.6 * _coarse_noise(rng, h, w, 18)
    return np.minimum(1.25 * haze * texture, 1.0) * soft


def _consolidation(
    frame: _Frame, side_masks: dict[int, np.ndarray], rng: np.random.Generator, h: int, w: int, side: int | None
) -> np.ndarray:
    """Lobar pneumonia: a dense opacity in part of one lobe, [0, 1] float32.

    On a frontal film only the horizontal fissure is seen edge-on, so right middle and right
    upper lobe opacities end at a sharp straight line; the others fade out.
    """
    lobes = {  # side, blob centre (m, v), blob axes, horizontal fissure level v and which side of it
        "RLL": (-1, (0.58, 0.82), (0.34, 0.24), None, None),
        "RML": (-1, (0.45, 0.72), (0.34, 0.2), 0.48, "below"),
        "RUL": (-1, (0.52, 0.28), (0.36, 0.26), 0.48, "above"),
        "LLL": (1, (0.7, 0.84), (0.28, 0.24), None, None),
        "LUL": (1, (0.58, 0.32), (0.34, 0.26), None, None),
    }
    weights = {"RLL": 0.3, "RML": 0.2, "RUL": 0.2, "LLL": 0.2, "LUL": 0.1}
    names = [n for n in lobes if side is None or lobes[n][0] == side]
    p = np.array([weights[n] for n in names])
    lobe_side, (mc, vc), (am, av), fissure, below = lobes[names[int(rng.choice(len(names), p=p / p.sum()))]]
    blob = np.zeros((h, w), np.float32)
    _ellipse(
        blob, frame, lobe_side * (mc + rng.uniform(-0.05, 0.05)), vc + rng.uniform(-0.05, 0.05),
        am * rng.uniform(1.0, 1.25), av * rng.uniform(1.0, 1.3), rng.uniform(-20, 20), 1.0,
    )
    blob = np.minimum(1.3 * _blur_coarse(blob, 0.045 * frame.lh, 2), 1.0)
    lung = cv2.GaussianBlur(side_masks[lobe_side], (0, 0), 0.004 * frame.lh + 0.3)
    if fissure is None:
        return blob * lung
    # The fissure is a straight, slightly tilted line.
    level = fissure + rng.uniform(-0.04, 0.04) + rng.uniform(-0.08, 0.08) * (lobe_side * frame.cols(w))
    rows = frame.rows(h)[:, None]
    edge = (rows > level[None, :]) if below == "below" else (rows < level[None, :])
    return blob * edge * lung


def _draw_lateral(
    h: int, w: int, label: str, pediatric: bool, rng: np.random.Generator, rng_lesion: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crude lateral view, patient facing image left: one lung field, heart in front, spine behind.

    Drawn at half resolution (a lateral has no fine detail worth the time) except the masks.
    """
    scale = rng.uniform(0.72, 0.86) if pediatric else rng.uniform(0.88, 1.0)
    tw = 0.42 * min(w, 0.95 * h) * scale * rng.uniform(0.93, 1.07)
    lh = 0.58 * min(h, 1.15 * w) * scale * (0.85 if pediatric else 1.0)
    frame = _Frame(w / 2.0 - 0.1 * tw, h * 0.5 - 0.6 * lh, tw, lh)
    hh, wh = (h + 1) // 2, (w + 1) // 2
    half = frame.resized(wh / w, hh / h)
    rows, cols = half.rows(hh), half.cols(wh)
    half_width = np.interp(rows, [-1.0, -0.2, 0.1, 0.6, 1.2, 3.0], [0.55, 0.7, 0.98, 1.08, 1.08, 1.02])
    half_width = half_width.astype(np.float32)
    depth = np.interp(rows, [-1.0, 0.0, 1.0, 1.4], [0.8, 0.95, 1.05, 1.2]).astype(np.float32)
    thickness = _ellipse_profile((cols[None, :] - 0.1) / half_width[:, None]) * depth[:, None]

    outline = np.array([
        (0.0, -0.04), (-0.3, 0.06), (-0.55, 0.3), (-0.7, 0.58), (-0.72, 0.78), (-0.62, 0.9),
        (-0.25, 0.84), (0.15, 0.9), (0.45, 1.02), (0.64, 1.12), (0.7, 0.85), (0.66, 0.45),
        (0.5, 0.15), (0.22, -0.01),
    ])  # fmt: skip
    outline = _chaikin(outline + rng.uniform(-0.03, 0.03, outline.shape), 3)
    field = np.zeros((h, w), np.uint8)
    cv2.fillPoly(field, [frame.fixed(outline[:, 0], outline[:, 1])], 1, cv2.LINE_8, 4)
    heart = np.zeros((h, w), np.uint8)
    cv2.ellipse(heart, frame.px(-0.3, 0.72), frame.axes(0.36, 0.22), -25, 0, 360, 1, -1, cv2.LINE_8, 4)
    lungs = field & (1 - heart)
    field_h = cv2.resize(field.astype(np.float32), (wh, hh), interpolation=cv2.INTER_AREA)
    heart_h = cv2.resize(heart.astype(np.float32), (wh, hh), interpolation=cv2.INTER_AREA)
    soft = cv2.GaussianBlur(field_h, (0, 0), 0.015 * half.lh)
    heart_soft = _blur_coarse(heart_h, 0.04 * half.lh, 2)
    # The heart overlaps the lungs on a lateral film: it dims the air rather than replacing it.
    air = soft * (1.0 - 0.4 * heart_soft) * rng.uniform(0.58, 0.66) * (0.9 + 0.2 * _coarse_noise(rng, hh, wh, 24))
    density = thickness * (0.82 - air)

    extra = np.zeros((hh, wh), np.float32)
    for i in range(-3, 15):
        # Vertebral bodies along a slight kyphosis, behind the lung.
        v0 = i * 0.09
        mc = 0.8 + 0.06 * math.sin((v0 + 0.3) * 1.8)
        cv2.rectangle(extra, half.px(mc - 0.11, v0), half.px(mc + 0.11, v0 + 0.078), 0.22, -1, cv2.LINE_8, 4)
    cv2.rectangle(extra, half.px(-0.9, -0.05), half.px(-0.82, 0.6), 0.12, -1, cv2.LINE_8, 4)  # sternum
    _polyline(extra, half.fixed(np.array([0.05, 0.12, 0.2]), np.array([-1.0, 0.0, 0.35])), -0.08, 0.09 * half.tw)
    ribs = []
    mr = np.linspace(0.95, 0.1, 10)
    for i in range(8):
        ribs.append(half.fixed(mr, 0.05 + i * 0.11 + 0.22 * (0.95 - mr) + 0.05 * np.sin(np.pi * mr)))
    _polyline(extra, ribs, 0.05, 0.03 * half.lh)
    density += cv2.GaussianBlur(extra, (0, 0), 0.008 * half.lh + 0.5) * (thickness > 0)

    lesion = np.zeros((hh, wh), np.float32)
    if label == "covid":
        patches = np.zeros((hh, wh), np.float32)
        for _ in range(int(rng_lesion.integers(3, 6))):
            _ellipse(
                patches, half, rng_lesion.uniform(0.15, 0.5), rng_lesion.uniform(0.55, 0.95),
                rng_lesion.uniform(0.12, 0.2), rng_lesion.uniform(0.08, 0.14), 0, 1.0,
            )
        haze = _blur_coarse(patches, 0.03 * half.lh, 2) * (0.7 + 0.6 * _coarse_noise(rng_lesion, hh, wh, 18))
        lesion = np.minimum(1.25 * haze, 1.0) * soft
        density += rng_lesion.uniform(0.32, 0.42) * lesion
    elif label == "pneumonia":
        # Lower lobe behind the oblique fissure, which runs from back-top to front-bottom.
        fissure = 0.3 + (0.5 - cols[None, :]) * rng_lesion.uniform(0.5, 0.65)
        blob = np.zeros((hh, wh), np.float32)
        _ellipse(blob, half, 0.3, 0.85, 0.35, 0.25, 0, 1.0)
        lesion = np.minimum(1.3 * _blur_coarse(blob, 0.045 * half.lh, 2), 1.0) * (rows[:, None] > fissure) * soft
        density += rng_lesion.uniform(0.55, 0.7) * lesion
    density = cv2.resize(density, (w, h), interpolation=cv2.INTER_LINEAR)
    if label == "normal":
        lesion_mask = np.zeros((h, w), np.uint8)
    else:
        lesion_full = cv2.resize(lesion, (w, h), interpolation=cv2.INTER_LINEAR)
        lesion_mask = ((lesion_full > 0.25) & (lungs > 0)).astype(np.uint8)
    return density, lungs, lesion_mask


def _chaikin(points: np.ndarray, iterations: int) -> np.ndarray:
    """Corner-cutting smoothing of a closed polygon."""
    for _ in range(iterations):
        nxt = np.roll(points, -1, axis=0)
        points = np.concatenate([0.75 * points + 0.25 * nxt, 0.25 * points + 0.75 * nxt], axis=1).reshape(-1, 2)
    return points


def _make_ct_slice(rng: np.random.Generator, size: int, covid: bool) -> np.ndarray:
    """Axial chest CT-like slice, (size, size) uint8: body disc, two dark lungs, spine, table."""
    img = np.zeros((size, size), np.float32)
    c = size / 2.0
    body_a, body_b = 0.42 * size * rng.uniform(0.92, 1.0), 0.3 * size * rng.uniform(0.92, 1.05)
    cv2.ellipse(img, (int(c), int(c)), (int(body_a), int(body_b)), 0, 0, 360, 0.45, -1)
    cv2.ellipse(img, (int(c), int(c)), (int(body_a * 0.93), int(body_b * 0.9)), 0, 0, 360, 0.52, -1)
    lung_layer = np.zeros((size, size), np.float32)
    for side in (-1, 1):
        center = (int(c + side * body_a * 0.45), int(c - body_b * 0.05))
        cv2.ellipse(lung_layer, center, (int(body_a * 0.33), int(body_b * 0.68)), side * 8, 0, 360, 1.0, -1)
    heart_center = (int(c + body_a * 0.08), int(c - body_b * 0.3))
    cv2.ellipse(lung_layer, heart_center, (int(body_a * 0.25), int(body_b * 0.3)), 0, 0, 360, 0.0, -1)
    lung_layer = cv2.GaussianBlur(lung_layer, (0, 0), 1.0)
    img = img * (1.0 - 0.9 * lung_layer)
    for _ in range(40):  # vessels seen end-on
        x, y = rng.uniform(0, size, 2)
        if lung_layer[int(y), int(x)] > 0.9:
            cv2.circle(img, (int(x), int(y)), 1, 0.35, -1)
    if covid:
        ggo = np.zeros((size, size), np.float32)
        for side in (-1, 1):
            for _ in range(2):
                center = (int(c + side * body_a * rng.uniform(0.6, 0.72)), int(c + body_b * rng.uniform(0.1, 0.4)))
                cv2.ellipse(ggo, center, (int(size * 0.06), int(size * 0.04)), rng.uniform(0, 180), 0, 360, 1.0, -1)
        img += 0.2 * cv2.GaussianBlur(ggo, (0, 0), size * 0.015) * lung_layer
    cv2.circle(img, (int(c), int(c + body_b * 0.62)), int(size * 0.045), 0.95, -1)  # vertebral body
    cv2.ellipse(img, (int(c), int(c + body_b * 0.62)), (int(size * 0.05), int(size * 0.05)), 0, 200, 340, 0.9, 3)
    cv2.ellipse(img, (int(c), int(c + body_b + 0.06 * size)), (int(0.45 * size), int(0.05 * size)), 0, 180, 360, 0.3, 2)
    img += rng.standard_normal(img.shape, dtype=np.float32) * 0.02
    img = cv2.GaussianBlur(img, (0, 0), 0.7)
    return cv2.convertScaleAbs(np.clip(img, 0, 1), alpha=255.0)


# --------------------------------------------------------------------------------------------
# Layout writers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleData:
    """Where :func:`write_sample_data` put each source, and what it wrote.

    ``chest_xray_pneumonia`` is the folder that contains ``chest_xray/``.
    """

    root: Path
    covid_chestxray_dataset: Path
    rsna_pneumonia: Path
    chest_xray_pneumonia: Path
    counts: dict


def write_sample_data(
    dest: str | os.PathLike,
    n_patients: int = 30,
    seed: int = 0,
    image_size: int = 320,
    shortcut_marker: str | None = None,
) -> SampleData:
    """Write the three sample sources under ``dest`` and return their paths and counts.

    Each source gets ``n_patients`` patients. Images are about ``image_size`` pixels high.
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
    _remove_stale_temporaries(dest)
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
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=f".{os.getpid()}.partial", dir=dest.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the data are not secret
        counts = _write_all(tmp, params)
        info = {"generator": _GENERATOR_NAME, "format_version": _FORMAT_VERSION, "parameters": params, "counts": counts}
        # Written last: its presence is what marks the folder as complete sample data.
        (tmp / SAMPLE_DATA_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _replace_dir(tmp, dest)
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


def _replace_dir(new: Path, dest: Path) -> None:
    """Rename ``new`` onto ``dest``; an old ``dest`` is moved aside first and removed after."""
    if dest.exists() and any(dest.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=f".{os.getpid()}.old", dir=dest.parent))
        os.replace(dest, old / "data")
        os.replace(new, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if dest.exists():
            dest.rmdir()
        os.replace(new, dest)


#: What the temporary folders beside ``dest`` may hold: a partial write, or an old ``dest`` moved aside.
_TEMPORARY_CONTENTS = {
    "partial": {"covid-chestxray-dataset", "rsna-pneumonia", "chest-xray-pneumonia", SAMPLE_DATA_FILE},
    "old": {"data"},
}


def _remove_stale_temporaries(dest: Path) -> None:
    """Remove the ``.<dest name>.<random>.<pid>.partial`` and ``.old`` folders of killed earlier calls.

    Only folders of this module's making (the names :func:`write_sample_data` and :func:`_replace_dir`
    give them, holding only what they put there) whose process is gone: a folder of a live process
    (another notebook writing the same data right now) is left alone. Folders of xraylib versions
    that did not put the pid in the name count as stale.
    """
    if not dest.parent.is_dir():
        return
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.[a-z0-9_]{{8}}(?:\.(\d+))?\.(partial|old)$")
    for folder in dest.parent.iterdir():
        match = pattern.match(folder.name)
        if not match or folder.is_symlink() or not folder.is_dir():
            continue
        pid, kind = match.group(1), match.group(2)
        if pid is not None and _process_alive(int(pid)):
            continue
        if {p.name for p in folder.iterdir()} <= _TEMPORARY_CONTENTS[kind]:
            shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def _sample_data(root: Path, counts: dict) -> SampleData:
    return SampleData(
        root=root,
        covid_chestxray_dataset=root / "covid-chestxray-dataset",
        rsna_pneumonia=root / "rsna-pneumonia",
        chest_xray_pneumonia=root / "chest-xray-pneumonia",
        counts=counts,
    )


def _write_all(root: Path, params: dict) -> dict:
    seed, n, size, marked = params["seed"], params["n_patients"], params["image_size"], params["shortcut_marker"]
    # One independent stream per source: adding a column to one layout leaves the others' bytes alone.
    writers = (
        ("covid-chestxray-dataset", _write_covid),
        ("rsna-pneumonia", _write_rsna),
        ("chest-xray-pneumonia", _write_kaggle),
    )
    return {
        name: write(root / name, np.random.default_rng([seed, k]), n, size, marked)
        for k, (name, write) in enumerate(writers, start=1)
    }


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


def _write_covid(folder: Path, rng: np.random.Generator, n: int, size: int, marked: str | None) -> dict:
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
            ct = _make_ct_slice(rng, size, covid=True)
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


def _write_rsna(folder: Path, rng: np.random.Generator, n: int, size: int, marked: str | None) -> dict:
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
            phantom = _make_phantom(
                "pneumonia", rng, size, size, view=view, bilateral=bilateral, marker=marked == "pneumonia"
            )
            boxes = _lesion_boxes(phantom.lesion_mask)
            stats["boxes"] += len(boxes)
            for x, y, bw, bh in boxes:
                label_rows.append((patient_id, [patient_id, f"{x:.1f}", f"{y:.1f}", f"{bw:.1f}", f"{bh:.1f}", "1"]))
                class_rows.append((patient_id, [patient_id, cls]))
        else:
            extra = None if cls == "Normal" else str(rng.choice(["nodule", "cardiomegaly", "effusion"]))
            marker = marked == "normal" and cls == "Normal"
            phantom = _make_phantom("normal", rng, size, size, view=view, extra=extra, marker=marker)
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


def _write_kaggle(folder: Path, rng: np.random.Generator, n: int, size: int, marked: str | None) -> dict:
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
