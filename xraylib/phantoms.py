"""Chest-radiograph phantoms drawn in code: lungs, heart, ribs, clavicles, diaphragm, lesions, noise.

:func:`make_phantom` draws one radiograph (frontal or a crude lateral, adult or child) with its
lung and lesion masks; :func:`burn_marker` stamps the "R" shortcut marker; :func:`make_ct_slice`
draws an axial CT-like slice (ieee8023 holds a few CT images). Everything comes from a seeded
:class:`numpy.random.Generator`, so the same generator state gives the same pixels. The
phantoms are not anatomy-accurate; they exist so that the pipeline can be exercised end to end.
Pure NumPy/OpenCV: no files, no TensorFlow. :mod:`xraylib.synthetic` writes them in the real
source layouts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .errors import ConfigError

__all__ = ["LABELS", "VIEWS", "RSNA_EXTRAS", "Phantom", "make_phantom", "burn_marker", "make_ct_slice", "SiteShift",
           "NO_SHIFT", "apply_site_shift"]

#: The class labels a phantom can carry.
LABELS = ("normal", "covid", "pneumonia")
#: Radiographic views, spelled as in ieee8023's ``view`` column.
VIEWS = ("PA", "AP", "AP Supine", "L")
#: Non-pneumonia findings a normal frontal phantom can carry (RSNA's "No Lung Opacity / Not Normal").
RSNA_EXTRAS = ("nodule", "cardiomegaly", "effusion")


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


@dataclass(frozen=True)
class SiteShift:
    """How another hospital's films differ from the training data's: a deliberate site shift.

    ``gamma``: the detector's intensity curve, ``out = in ** gamma`` on 0..1 (below 1 brightens the
    mid-tones and flattens the lungs' contrast). ``border``: a black collimation border on every side, as a
    share of the side. ``text``: a burned-in annotation (hospital name and date, white) at the top right.
    The default is a plainly different site; :data:`NO_SHIFT` changes nothing.
    """

    gamma: float = 0.6
    border: float = 0.06
    text: str | None = "ST ELSEWHERE  2026-12-05"

    def __post_init__(self) -> None:
        if not 0.2 <= float(self.gamma) <= 5.0:
            raise ConfigError(f"SiteShift.gamma must be from 0.2 to 5, got {self.gamma!r}")
        if not 0.0 <= float(self.border) <= 0.3:
            raise ConfigError(f"SiteShift.border must be a share of the side from 0 to 0.3, got {self.border!r}")


#: A site shift that changes nothing (the training site itself).
NO_SHIFT = SiteShift(gamma=1.0, border=0.0, text=None)


def apply_site_shift(image: np.ndarray, shift: SiteShift) -> np.ndarray:
    """A copy of the ``(H, W) uint8`` radiograph as ``shift``'s site would have made it (curve, border, text)."""
    levels = np.arange(256, dtype=np.float64) / 255.0
    lut = np.clip(np.round(levels ** float(shift.gamma) * 255.0), 0, 255).astype(np.uint8)
    out = cv2.LUT(np.asarray(image, dtype=np.uint8), lut)
    h, w = out.shape[:2]
    by, bx = int(round(shift.border * h)), int(round(shift.border * w))
    if by or bx:
        out[:by], out[h - by:], out[:, :bx], out[:, w - bx:] = 0, 0, 0, 0
    if shift.text:
        scale = cv2.getFontScaleFromHeight(cv2.FONT_HERSHEY_SIMPLEX, max(6, int(0.035 * h)), 1)
        (tw, th), _ = cv2.getTextSize(shift.text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        org = (max(0, w - bx - tw - int(0.02 * w)), by + th + int(0.02 * h))
        cv2.putText(out, shift.text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, 255, 1, cv2.LINE_AA)
    return out


def make_phantom(
    label: str,
    rng: np.random.Generator,
    height: int = 320,
    width: int = 288,
    *,
    view: str = "PA",
    pediatric: bool = False,
    marker: bool = False,
    extra: str | None = None,
    bilateral: bool = False,
) -> Phantom:
    """Draw one chest radiograph phantom of class ``label`` (one of :data:`LABELS`).

    ``"covid"`` adds bilateral, peripheral, lower-zone ground-glass opacities; ``"pneumonia"``
    a unilateral lobar consolidation with a sharp fissure edge (both lungs with ``bilateral``).
    ``view`` is one of :data:`VIEWS` (``"L"`` is a crude lateral). ``pediatric`` draws a small
    child's thorax. ``marker`` burns a bright "R" marker into the top-left corner (a deliberate
    shortcut). ``extra`` (one of :data:`RSNA_EXTRAS`, frontal views) adds a finding that is not
    pneumonia, as in RSNA's "No Lung Opacity / Not Normal".

    Anatomy, lesions and noise come from three streams seeded by ``rng``, so two calls with
    generators in the same state and different labels share anatomy and noise: they differ
    only where the lesion is. About 5 ms for 320x288 on one core.
    """
    if label not in LABELS:
        raise ConfigError(f"label must be one of {LABELS}, got {label!r}")
    if view not in VIEWS:
        raise ConfigError(f"view must be one of {VIEWS}, got {view!r}")
    if extra is not None and extra not in RSNA_EXTRAS:
        raise ConfigError(f"extra must be None or one of {RSNA_EXTRAS}, got {extra!r}")
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
    return density, lungs, _lesion_mask(label, lesion, lungs, h, w)


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
    return density, lungs, _lesion_mask(label, lesion, lungs, h, w)


def _lesion_mask(label: str, lesion: np.ndarray, lungs: np.ndarray, h: int, w: int) -> np.ndarray:
    """The ``(h, w)`` uint8 mask of a lesion drawn at half size (none for a normal image), inside the lungs."""
    if label == "normal":
        return np.zeros((h, w), np.uint8)
    lesion_full = cv2.resize(lesion, (w, h), interpolation=cv2.INTER_LINEAR)
    return ((lesion_full > 0.25) & (lungs > 0)).astype(np.uint8)


def _chaikin(points: np.ndarray, iterations: int) -> np.ndarray:
    """Corner-cutting smoothing of a closed polygon."""
    for _ in range(iterations):
        nxt = np.roll(points, -1, axis=0)
        points = np.concatenate([0.75 * points + 0.25 * nxt, 0.25 * points + 0.75 * nxt], axis=1).reshape(-1, 2)
    return points


def make_ct_slice(rng: np.random.Generator, size: int, covid: bool) -> np.ndarray:
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
