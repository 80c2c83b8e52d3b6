"""Decode, convert, resize and cache images as uint8 arrays, one memory-mapped ``.npy`` per split.

The cache stores ``(N, S, S) uint8`` grayscale images: a quarter of the memory of the seeds'
float32 RGB arrays. Replicating to three channels and the backbone's normalisation happen
inside the model (see :mod:`xraylib.models`), so training and prediction cannot drift apart.
The cache is keyed by the settings and the manifest (paths, hashes, labels, splits): a re-run
on unchanged data does no work, and an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import itertools
import json
import math
import os
import shutil
import threading
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import cv2
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .errors import BadFileError, ConfigError, SourceError
from .fileio import (
    WriteError, atomic_path, read_json, save_npy_atomic, sha1_bytes, write_csv_atomic, write_error, write_json_atomic,
)
from .fileio import release_pages
from .images import decode_bytes, read_image_bytes
from .manifest import read_manifest_csv
from .parallel import map_batched, opencv_threads, process_pool, script_safe_for_processes
from .split import SPLITS, assert_patient_disjoint, split_by_patient

RESIZE_MODES = ("stretch", "pad")
#: The version of the decode-and-resize code. Part of the cache key here and of the feature cache's key, so a
#: cache built by code that gave other pixels is built again, not reused. 2: reduced-scale JPEG decoding and
#: 2x2 halving before INTER_AREA. 3: JPEG Baseline DICOMs (the RSNA files) decoded by OpenCV, reduced as JPEGs are.
PIXELS_VERSION = 3

#: How each backbone expects its input scaled (Keras' ``imagenet_utils`` modes), applied inside the model.
NORMALISATION = {
    "vgg16": "caffe", "resnet50": "caffe", "densenet121": "torch",
    "mobilenet": "tf", "mobilenet_v2": "tf", "small_cnn": "unit",
}
# Keras' imagenet_utils constants: caffe means (0..255, RGB order) and torch mean/std (0..1).
_CAFFE_MEAN_RGB = np.array([123.68, 116.779, 103.939], dtype=np.float32)
_TORCH_MEAN_RGB = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_TORCH_STD_RGB = np.array([0.229, 0.224, 0.225], dtype=np.float32)


INTENSITY_MODES = ("none", "equalize", "clahe")
CROP_MODES = ("none", "body")


@dataclass(frozen=True)
class PreprocessSettings:
    """How raw images become model inputs. Saved with every model and read back at prediction.

    ``image_size``: side of the square output in pixels. ``resize``: "stretch" (the seeds' plain
    resize, distorts the aspect ratio) or "pad" (keep the aspect ratio, pad with black).
    ``intensity``: "none" (the decoded grey levels), "equalize" (global histogram equalisation) or
    "clahe" (contrast-limited adaptive equalisation, :data:`CLAHE_CLIP_LIMIT`, :data:`CLAHE_TILES`),
    both applied to the resized image (see :func:`standardise_intensity`). ``crop``: "none" or
    "body" (cut uniform borders, frames and burned-in text at the edges before resizing; see
    :func:`find_body_box`). The options are measured by the out-of-site estimate of
    ``benchmarks/quality.py``; the defaults give the same pixels and the same cache keys as before they existed.
    """

    image_size: int = 224
    resize: str = "stretch"
    intensity: str = "none"
    crop: str = "none"

    def __post_init__(self) -> None:
        for name, allowed in (("resize", RESIZE_MODES), ("intensity", INTENSITY_MODES), ("crop", CROP_MODES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, (int, np.integer)):
            raise ConfigError(f"image_size must be a whole number of pixels, got {self.image_size!r}")
        object.__setattr__(self, "image_size", int(self.image_size))  # a NumPy integer would not go into JSON
        if not 32 <= self.image_size <= 2048:
            raise ConfigError(f"image_size must be between 32 and 2048 pixels, got {self.image_size}")

    def to_dict(self) -> dict:
        """The JSON form (cache keys, ``model.json``). An option at "none" is left out, so that the keys and the
        ``model.json`` of the default settings are the ones written before the option existed."""
        data = {key: value for key, value in asdict(self).items()
                if not (key in ("intensity", "crop") and value == "none")}
        return {**data, "stored_as": "uint8 grayscale (N, S, S)"}

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessSettings":
        """Settings from :meth:`to_dict`'s form; a ``model.json`` written before ``intensity``/``crop`` reads as "none"."""
        return cls(image_size=int(data["image_size"]), resize=str(data["resize"]),
                   intensity=str(data.get("intensity", "none")), crop=str(data.get("crop", "none")))

    def describe(self) -> str:
        """The non-default options in words ("" for the defaults), for summaries and the model card."""
        parts = []
        if self.crop != "none":
            parts.append(f"crop={self.crop}")
        if self.intensity != "none":
            parts.append(f"intensity={self.intensity}")
        return ", ".join(parts)


#: Before the final INTER_AREA step, an image is halved (an exact 2x2 mean, OpenCV's fast path) while
#: it stays at least this many times the output size: Pillow's ``reducing_gap``, whose docs call the
#: result "indistinguishable from fair resampling in most cases".
REDUCING_GAP = 2
#: Large JPEGs are decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling: Pillow's draft mode) while
#: they stay at least this many times the output size. The DCT scaling is a smoother low-pass than 2x2
#: means, so it may come closer: on the 206 real JPEGs of ../shared/data at 224 px, the mean absolute
#: difference from a full decode + INTER_AREA is 0.36 grey levels (0.13 at 2; worst image 1.04 at both).
JPEG_REDUCING_GAP = 1.5


def resize_image(pixels: np.ndarray, size: int, mode: str = "stretch") -> np.ndarray:
    """Resize ``(H, W) uint8`` to ``(size, size) uint8`` by stretching or by aspect-preserving padding."""
    return _place(_resize_content(pixels, size, mode), size)


def _resize_content(pixels: np.ndarray, size: int, mode: str) -> np.ndarray:
    """The image part of :func:`resize_image`'s output: ``(size, size)`` when stretching, the unpadded picture when padding."""
    if mode not in RESIZE_MODES:
        raise ConfigError(f"resize must be one of {RESIZE_MODES}, got {mode!r}")
    height, width = pixels.shape[:2]
    if mode == "stretch":
        pixels = _halve_while_large(pixels, size, size)
        if height > size or width > size:
            return area_resize(pixels, size, size)
        return cv2.resize(pixels, (size, size), interpolation=cv2.INTER_LINEAR)
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    if scale < 1:
        return area_resize(_halve_while_large(pixels, new_w, new_h), new_w, new_h)
    return cv2.resize(pixels, (new_w, new_h), interpolation=cv2.INTER_LINEAR)


def _place(content: np.ndarray, size: int) -> np.ndarray:
    """``content`` centred on a black ``(size, size)`` square (itself when it fills the square)."""
    if content.shape == (size, size):
        return content
    new_h, new_w = content.shape
    out = np.zeros((size, size), dtype=np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top:top + new_h, left:left + new_w] = content
    return out


def _halve_while_large(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Halve ``pixels`` (2x2 means) while both sides are even and stay :data:`REDUCING_GAP` times ``width, height``."""
    while (pixels.shape[0] % 2 == 0 and pixels.shape[1] % 2 == 0
           and pixels.shape[0] >= 2 * REDUCING_GAP * height and pixels.shape[1] >= 2 * REDUCING_GAP * width):
        pixels = cv2.resize(pixels, (pixels.shape[1] // 2, pixels.shape[0] // 2), interpolation=cv2.INTER_AREA)
    return pixels


def area_resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """``cv2.resize(pixels, (width, height), interpolation=cv2.INTER_AREA)``: the very same bytes, for a 2-D uint8
    image, in less time: in two matrix products where the factor's weights make OpenCV's arithmetic exact, or as
    OpenCV's own shrink of four or three bands of rows at once for some other factors.

    OpenCV shrinks by a non-integer factor in a scalar loop: 0.42 ms of the 0.75 ms in which a 1024x1024 DICOM
    becomes 224x224 (512 -> 224, after the halving). Along an axis whose sides are p/q in lowest terms with p a
    power of two (up to 256: 512 -> 224 is 16/7, which covers RSNA's and NIH's 1024 px images and every 2048 or
    4096 px side), each of OpenCV's weights is a multiple of 1/p, so every product and sum it forms in float32 is
    exact: its result is the exact weighted mean, rounded half to even, whatever the order of the arithmetic. Two
    float32 matrix products then give the same bytes in a quarter of the time (checked against OpenCV once per size,
    see :func:`_area_plan`).

    Other factors (500 -> 224 from a 1000 px side) are OpenCV's loop, on four or three bands of rows at once where
    the image's height and the output's are both divisible by 4 (or 3) (see :func:`_band_plan`): 1.3 to 1.5 times
    as fast with four (0.43 against 0.60 ms for 500 -> 224), the same bytes; not from 65,536 output pixels while
    OpenCV has several threads (it shares a whole image's shrink among them). The integer factors (OpenCV's own
    fast path), other heights (625 -> 224, from 2500 px), and anything else go to OpenCV as it is.
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 2:
        return cv2.resize(pixels, (width, height), interpolation=cv2.INTER_AREA)
    plan = _area_plan(pixels.shape[0], pixels.shape[1], height, width)
    if plan is not None:
        return _area_products(pixels, *plan)
    # (OpenCV shares a whole image's shrink among its threads from 65,536 output pixels: not the bands')
    bands = _band_plan(pixels.shape[0], pixels.shape[1], height, width)
    if bands is not None and (height * width < _OPENCV_STRIPE_PIXELS or cv2.getNumThreads() <= 1):
        return _area_bands(pixels, width, height, bands)
    return cv2.resize(pixels, (width, height), interpolation=cv2.INTER_AREA)


#: Output pixels per part in which OpenCV shares a resize among its threads (``dst.total() / (1 << 16)`` parts).
_OPENCV_STRIPE_PIXELS = 1 << 16


def _area_bands(pixels: np.ndarray, width: int, height: int, count: int) -> np.ndarray:
    """:func:`area_resize` of ``pixels`` cut into ``count`` bands of rows, shrunk together as the channels of one
    image and put back one above the other (see :func:`_band_plan`)."""
    side = pixels.shape[0] // count
    stacked = cv2.merge([pixels[i * side:(i + 1) * side] for i in range(count)])
    return np.concatenate(cv2.split(cv2.resize(stacked, (width, height // count), interpolation=cv2.INTER_AREA)))


@functools.lru_cache(maxsize=256)
def _band_plan(source_h: int, source_w: int, height: int, width: int) -> int | None:
    """The number of bands of rows for :func:`_area_bands`, or None where OpenCV shrinks the image whole.

    OpenCV's general INTER_AREA loop adds each source pixel's share into its output pixel one after the other, each
    addition waiting for the one before (a chain through memory); for an image of 3 or 4 channels it makes each
    channel's addition in the same step. Where the image's height and the output's are both divisible by 4 or 3
    (``count``), the image cut into that many bands of rows is that many images of the same ratio whose weights down
    the columns are the whole image's, block by block (checked: :func:`_same_in_bands`): shrunk as the channels of
    one image, each band gets the very operations, in the same order, that it gets in the whole image. Never for
    integer factors on both axes (OpenCV's fast path) or where the image is enlarged, nor where OpenCV was found to
    compute otherwise (:func:`_bands_are_opencvs`). Not bands of columns (their merge, of strided views, cost
    more than it saved at many sizes) nor two bands (1.07 times the speed)."""
    if not (source_h >= height >= 1 and source_w >= width >= 1) or (source_h % height == 0 and source_w % width == 0):
        return None
    for count in (4, 3):
        if math.gcd(source_h, height) % count == 0 and _bands_are_opencvs() and _same_in_bands(source_h, height,
                                                                                                  count):
            return count
    return None


def _area_entries(source: int, output: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's INTER_AREA weights for ``source`` -> ``output`` pixels along an axis as its table of entries (source
    pixel, output pixel, float32 weight) in its order, computed as OpenCV computes them (``computeResizeAreaTab`` in
    ``imgproc/src/resize.cpp``: the same double arithmetic, each weight rounded to float32): a tenth of a millisecond,
    where taking them from OpenCV (:func:`_opencv_area_weights`) takes 3 to 30 ms, too long for each size of a
    folder of JPEGs of a thousand sizes. :func:`_bands_are_opencvs` checks it against OpenCV's own."""
    scale = 1.0 / (output / source)  # (as OpenCV: the inverse of the inverse scale)
    start = np.arange(output) * scale
    end = start + scale
    cell = np.minimum(scale, source - start)
    last = np.minimum(np.floor(end).astype(np.intp), source - 1)
    first = np.minimum(np.ceil(start).astype(np.intp), last)
    left = first - start > 1e-3  # the part of a pixel before the first whole one
    counts = last - first  # the whole pixels
    right = end - last > 1e-3  # the part of a pixel after the last whole one
    sizes = left + counts + right  # each output's entries: its left part, whole pixels, right part, in that order
    begins = np.cumsum(sizes) - sizes
    sources = np.repeat(first - left - begins, sizes) + np.arange(sizes.sum())  # (consecutive source pixels)
    targets = np.repeat(np.arange(output), sizes)
    weights = np.repeat(1.0 / cell, sizes)
    weights[begins[left]] = ((first - start) / cell)[left]
    weights[(begins + sizes - 1)[right]] = (np.minimum(np.minimum(end - last, 1.0), cell) / cell)[right]
    return sources, targets, weights.astype(np.float32)


def _area_table(source: int, output: int) -> np.ndarray:
    """:func:`_area_entries` as a ``(source, output)`` float32 matrix (as :func:`_opencv_area_weights` gives it)."""
    sources, targets, weights = _area_entries(source, output)
    table = np.zeros((source, output), dtype=np.float32)
    table[sources, targets] = weights
    return table


def _same_in_bands(source: int, output: int, count: int) -> bool:
    """Whether the weights of ``source`` -> ``output`` are those of ``source // count`` -> ``output // count``,
    repeated ``count`` times along the diagonal: the same entries, in the same order, with the same weights."""
    whole, band = _area_entries(source, output), _area_entries(source // count, output // count)
    offsets = np.repeat(np.arange(count), len(band[0]))
    return len(whole[0]) == count * len(band[0]) and all(
        np.array_equal(w, np.tile(s, count) + offsets * step)
        for w, s, step in zip(whole[:2], band[:2], (source // count, output // count))
    ) and np.array_equal(whole[2], np.tile(band[2], count))


@functools.lru_cache(maxsize=1)
def _bands_are_opencvs() -> bool:
    """Whether this OpenCV computes as :func:`_band_plan` takes it to, checked once per process: its weights are
    :func:`_area_table`'s at a few sizes, and bands of random images shrink to the bytes of the whole."""
    sizes = ((500, 224), (625, 224), (477, 299), (1000, 224), (750, 384), (129, 64))
    if not all(np.array_equal(_area_table(source, output), _opencv_area_weights(source, output))
               for source, output in sizes):
        return False
    rng = np.random.default_rng(7)
    for shape, output, count in (((500, 512), (224, 224), 4), ((700, 477), (224, 224), 4), ((750, 600), (384, 300), 3)):
        probe = rng.integers(0, 256, shape, dtype=np.uint8)
        if not np.array_equal(_area_bands(probe, output[1], output[0], count),
                              cv2.resize(probe, output[::-1], interpolation=cv2.INTER_AREA)):
            return False
    return True


#: Multiply-adds per matrix product in :func:`_area_products`: below OpenBLAS's threshold for splitting one product
#: across threads (4 x 65,536), whose threads would take the cores from the decoding workers.
_AREA_PRODUCT_MACS = 1 << 17
#: The most output pixels per block of an axis (q of p/q) for which :func:`area_resize` takes the products: their
#: dense (p, q) blocks cost q multiply-adds per source pixel, against OpenCV's two or so. 16/7 (224 px) is 2.5 times
#: OpenCV's speed; 256/75 (300 px from 1024) was ten times slower.
_AREA_MAX_OUTPUTS = 16


def _area_products(pixels: np.ndarray, across_block: np.ndarray, down_block: np.ndarray) -> np.ndarray:
    """:func:`area_resize` by the weights of :func:`_area_plan`: each row's blocks of p pixels times the (p, q) block,
    then each band of p rows times the down block (each weight applied once: the exact sums of OpenCV's loop)."""
    (p_x, q_x), (p_y, q_y) = across_block.shape, down_block.shape
    height, width = pixels.shape
    blocks = _scratch(0, (height * width // p_x, p_x))
    np.copyto(blocks.reshape(height, width), pixels)
    across = _scratch(1, (blocks.shape[0], q_x))
    step = max(1, _AREA_PRODUCT_MACS // (p_x * q_x))
    for top in range(0, blocks.shape[0], step):
        np.matmul(blocks[top:top + step], across_block, out=across[top:top + step])
    down = _scratch(2, (height // p_y, q_y, width // p_x * q_x))
    np.matmul(down_block.T, across.reshape(height // p_y, p_y, -1), out=down)  # one product per band of p_y rows
    return np.rint(down, out=down).reshape(height // p_y * q_y, -1).astype(np.uint8)  # (exact means in 0..255)


_SCRATCH = threading.local()


def _scratch(slot: int, shape: tuple[int, ...]) -> np.ndarray:
    """This thread's float32 work array number ``slot``, of ``shape``, kept from one call to the next: allocated anew
    for each image, the few MB of :func:`_area_products` cost more than the products (in a process without
    TensorFlow, glibc gave them back to the system each time: 690 page faults and 1.2 ms more per image)."""
    arrays = _SCRATCH.__dict__.setdefault("arrays", {})
    if slot not in arrays or arrays[slot].shape != shape:
        arrays[slot] = np.empty(shape, dtype=np.float32)
    return arrays[slot]


@functools.lru_cache(maxsize=64)
def _area_plan(source_h: int, source_w: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The weight blocks (across, down) with which :func:`_area_products` gives OpenCV's INTER_AREA bytes for this
    size, or None where it would not: enlarging (OpenCV then interpolates), integer factors on both axes (OpenCV's
    fast path), weights that are not exact, and any size where the products differ from OpenCV on a test image
    (an OpenCV build that computes otherwise); or where they would be slower: an axis kept as it is, blocks of more
    than :data:`_AREA_MAX_OUTPUTS` outputs, a band's product over :data:`_AREA_PRODUCT_MACS`."""
    if not (source_h >= height >= 1 and source_w >= width >= 1) or (source_h % height == 0 and source_w % width == 0):
        return None
    if source_h == height or source_w == width:  # one axis kept as it is: OpenCV's loop does less than a product
        return None
    across, down = _area_weights(source_w, width), _area_weights(source_h, height)
    if across is None or down is None:
        return None
    if down.shape[0] * down.shape[1] * width > _AREA_PRODUCT_MACS:  # (each band's product: see _AREA_PRODUCT_MACS)
        return None
    probe = np.random.default_rng(source_h * 100_003 + source_w).integers(0, 256, (source_h, source_w), dtype=np.uint8)
    expected = cv2.resize(probe, (width, height), interpolation=cv2.INTER_AREA)
    return (across, down) if np.array_equal(_area_products(probe, across, down), expected) else None


def _area_weights(source: int, output: int) -> np.ndarray | None:
    """OpenCV's INTER_AREA weights for ``source`` -> ``output`` pixels along one axis, as the ``(p, q)`` block that
    repeats along the diagonal of the full ``(source, output)`` matrix (p/q: the sides' ratio in lowest terms); None
    unless p is a power of two up to 256 and OpenCV's weights are exactly that block, repeated.

    The weights are OpenCV's own: rows of an identity image shrunk along the axis (one row at a time, each source
    pixel's weight in every output pixel)."""
    common = math.gcd(source, output)
    p, q = source // common, output // common
    if p & (p - 1) or p > 256 or q > _AREA_MAX_OUTPUTS:
        return None
    weights = _opencv_area_weights(source, output)
    block = weights[:p, :q]
    if not np.array_equal(block * p, np.rint(block * p)):  # not multiples of 1/p: not exact
        return None
    if not np.array_equal(np.kron(np.eye(common, dtype=np.float32), block), weights):  # not one block, repeated
        return None
    return np.ascontiguousarray(block)


def _opencv_area_weights(source: int, output: int) -> np.ndarray:
    """OpenCV's INTER_AREA weights for ``source`` -> ``output`` pixels along an axis, ``(source, output)`` float32:
    each row the shares of one source pixel, from OpenCV itself (rows of a float32 identity image shrunk along the
    axis, the other kept: exactly its weights, 1 times each). The same for rows and columns (one function)."""
    weights = np.empty((source, output), dtype=np.float32)
    for top in range(0, source, 256):
        rows = min(256, source - top)
        identity = np.zeros((rows, source), dtype=np.float32)
        identity[np.arange(rows), top + np.arange(rows)] = 1
        weights[top:top + rows] = cv2.resize(identity, (output, rows), interpolation=cv2.INTER_AREA)
    return weights


# The CLAHE and body-crop constants below decide the pixels of a saved model's inputs: a change to any of them
# must raise PIXELS_VERSION, so that caches are rebuilt and older models warn at loading.
#: CLAHE's clip limit (OpenCV's ``clipLimit``: a tile's histogram is clipped at this many times its mean bin
#: count). 2.0 is the value most chest X-ray CLAHE studies use (and scikit-image's default 0.01 of a 256-bin
#: tile is about 2.6): it lifts the lung texture without OpenCV's default of 40 amplifying noise.
CLAHE_CLIP_LIMIT = 2.0
#: CLAHE's tile grid (columns, rows) over the resized picture: 8x8, as in OpenCV's and scikit-image's defaults,
#: makes a tile 28 px at 224 px, about a rib space wide. Applied at the output size, not the file's, so that
#: the same chest gives the same result whether it came as a 3000 px DICOM or a 500 px JPEG.
CLAHE_TILES = (8, 8)


def standardise_intensity(pixels: np.ndarray, mode: str) -> np.ndarray:
    """``(H, W) uint8`` with its grey levels standardised: "none" (unchanged), "equalize" or "clahe".

    "equalize" is :func:`cv2.equalizeHist` (the darkest grey level present stays 0, the cumulative histogram
    maps the rest onto 0..255); "clahe" is :func:`cv2.createCLAHE` with :data:`CLAHE_CLIP_LIMIT` and
    :data:`CLAHE_TILES` (fewer tiles on a side shorter than 8 px per tile). A uniform image stays uniform.
    """
    if mode not in INTENSITY_MODES:
        raise ConfigError(f"intensity must be one of {INTENSITY_MODES}, got {mode!r}")
    if mode == "none" or pixels.size == 0:
        return pixels
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    if mode == "equalize":
        return cv2.equalizeHist(pixels)
    height, width = pixels.shape
    tiles = (max(1, min(CLAHE_TILES[0], width // 8)), max(1, min(CLAHE_TILES[1], height // 8)))
    return cv2.createCLAHE(clipLimit=CLAHE_CLIP_LIMIT, tileGridSize=tiles).apply(pixels)


#: The body crop works on a copy whose longer side is at most this many pixels: enough to find the field of
#: view, and the cost stays a few milliseconds whatever the file's size.
BODY_WORK_SIDE = 256
#: Pixels at or below this fraction of the image's brightest (its 99th percentile) are background: black
#: borders and the air beside the body. Lungs sit well above it in every source we read; a background that is
#: not near black stays in, so the crop errs towards keeping the whole image.
BODY_DARK_FRACTION = 0.08
#: Pixels at or above this grey level are frames and burned-in text (saturated white), not anatomy.
BODY_SATURATED = 250
#: An edge row or column whose grey levels vary less than this (standard deviation) is a uniform frame.
BODY_UNIFORM_STD = 2.0
#: The image's outermost pixels are a frame when at least this share of them has one grey level.
BODY_FRAME_SHARE = 0.6
#: Opening with a square this fraction of the working side breaks thin strokes (letters, rulers) off the body.
BODY_OPENING_FRACTION = 0.02
#: Connected regions at least this fraction of the largest one are body too (two lung fields split by a
#: saturated mediastinum); a block of text is far smaller.
BODY_PART_FRACTION = 0.25
#: The box found is widened by this fraction of each side, so the crop never shaves the edge of the body.
BODY_MARGIN_FRACTION = 0.02
#: A box smaller than this fraction of the image is not believed (a detection gone wrong): the whole image is
#: kept. So a crop keeps at least half of each side, which :func:`preprocess_bytes` relies on.
BODY_MIN_AREA_FRACTION = 0.5


class Box(NamedTuple):
    """A crop in pixels of the image it was found on: rows ``top:bottom``, columns ``left:right``."""

    top: int
    bottom: int
    left: int
    right: int


def find_body_box(pixels: np.ndarray) -> Box:
    """Where the body is in an ``(H, W) uint8`` chest X-ray: the box that leaves out uniform borders, black and
    white frames and burned-in text or markers outside the body.

    Classical, no learned weights: on a copy at most :data:`BODY_WORK_SIDE` px, uniform edge rows and columns
    are cut; the remaining pixels that are neither background nor saturated are opened (thin strokes break
    off) and the largest connected region (with any region at least :data:`BODY_PART_FRACTION` of it) gives
    the box, widened by :data:`BODY_MARGIN_FRACTION`. When that box is implausible (under
    :data:`BODY_MIN_AREA_FRACTION` of the image, or nothing found: a blank or tiny image), the whole image.
    """
    height, width = pixels.shape[:2]
    whole = Box(0, height, 0, width)
    if height < 8 or width < 8:
        return whole
    scale = min(1.0, BODY_WORK_SIDE / max(height, width))
    work_w, work_h = max(1, round(width * scale)), max(1, round(height * scale))
    work = np.ascontiguousarray(pixels, dtype=np.uint8)
    if scale < 1:
        work = cv2.resize(_halve_while_large(work, work_w, work_h), (work_w, work_h), interpolation=cv2.INTER_AREA)

    top, bottom, left, right = _trim_uniform_edges(work)
    inner = work[top:bottom, left:right]
    if inner.size == 0:
        return whole
    mask = (inner > BODY_DARK_FRACTION * np.percentile(inner, 99)) & (inner < BODY_SATURATED)
    frame = _frame_grey(inner)
    if frame is not None:  # a uniform frame of any grey, interrupted by text where trimming had to stop
        mask &= np.abs(inner.astype(np.int16) - frame) > BODY_UNIFORM_STD
    mask = mask.astype(np.uint8)
    side = max(1, round(BODY_OPENING_FRACTION * max(work_h, work_w)))
    square = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * side + 1, 2 * side + 1))
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, square)
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count < 2:  # nothing but background
        return whole
    areas = stats[1:, cv2.CC_STAT_AREA]
    parts = stats[1:][areas >= BODY_PART_FRACTION * areas.max()]
    x0 = int(parts[:, cv2.CC_STAT_LEFT].min())
    y0 = int(parts[:, cv2.CC_STAT_TOP].min())
    x1 = int((parts[:, cv2.CC_STAT_LEFT] + parts[:, cv2.CC_STAT_WIDTH]).max())
    y1 = int((parts[:, cv2.CC_STAT_TOP] + parts[:, cv2.CC_STAT_HEIGHT]).max())
    margin_x, margin_y = BODY_MARGIN_FRACTION * (x1 - x0), BODY_MARGIN_FRACTION * (y1 - y0)
    # back to the full image's pixels, rounded outwards
    box = Box(top=max(0, math.floor((top + y0 - margin_y) / scale)),
              bottom=min(height, math.ceil((top + y1 + margin_y) / scale)),
              left=max(0, math.floor((left + x0 - margin_x) / scale)),
              right=min(width, math.ceil((left + x1 + margin_x) / scale)))
    if (box.bottom - box.top) * (box.right - box.left) < BODY_MIN_AREA_FRACTION * height * width:
        return whole
    return box


def _trim_uniform_edges(work: np.ndarray) -> tuple[int, int, int, int]:
    """``top, bottom, left, right`` of ``work`` without its uniform edge rows and columns (frames of any grey)."""
    row_std, col_std = work.std(axis=1), work.std(axis=0)
    top, bottom, left, right = 0, work.shape[0], 0, work.shape[1]
    while top < bottom and row_std[top] < BODY_UNIFORM_STD:
        top += 1
    while bottom > top and row_std[bottom - 1] < BODY_UNIFORM_STD:
        bottom -= 1
    while left < right and col_std[left] < BODY_UNIFORM_STD:
        left += 1
    while right > left and col_std[right - 1] < BODY_UNIFORM_STD:
        right -= 1
    return top, bottom, left, right


def _frame_grey(work: np.ndarray) -> int | None:
    """The grey level of a uniform frame: the median of the outermost pixels when at least
    :data:`BODY_FRAME_SHARE` of them lie within :data:`BODY_UNIFORM_STD` of it; None when the edge is not uniform."""
    edge = np.concatenate([work[0], work[-1], work[:, 0], work[:, -1]]).astype(np.int16)
    grey = int(np.median(edge))
    return grey if np.mean(np.abs(edge - grey) <= BODY_UNIFORM_STD) >= BODY_FRAME_SHARE else None


def crop_image(pixels: np.ndarray, mode: str) -> np.ndarray:
    """``(H, W) uint8`` cropped: "none" (unchanged) or "body" (to :func:`find_body_box`)."""
    if mode not in CROP_MODES:
        raise ConfigError(f"crop must be one of {CROP_MODES}, got {mode!r}")
    if mode == "none":
        return pixels
    box = find_body_box(pixels)
    return pixels[box.top:box.bottom, box.left:box.right]


def preprocess_pixels(pixels: np.ndarray, settings: PreprocessSettings) -> np.ndarray:
    """A decoded ``(H, W) uint8`` image to the cached model input ``(S, S) uint8``.

    Cropped (``settings.crop``), resized (``settings.resize``), then its grey levels standardised
    (``settings.intensity``) on the resized picture without the black padding, so that the padding's share
    of the square does not shift the histogram.
    """
    content = _resize_content(crop_image(pixels, settings.crop), settings.image_size, settings.resize)
    return _place(standardise_intensity(content, settings.intensity), settings.image_size)


def preprocess_bytes(data: bytes, path: str, settings: PreprocessSettings) -> np.ndarray:
    """PNG/JPEG/DICOM bytes to the model input ``(S, S) uint8``; :class:`BadFileError` naming ``path``.

    The one way files become model inputs (the cache, :mod:`xraylib.predict`, the web page). When
    stretching, it decodes no more pixels than the resize needs: a large JPEG (or a JPEG Baseline DICOM) at a
    reduced scale that keeps it :data:`JPEG_REDUCING_GAP` times the output size (twice that with ``crop="body"``,
    which may keep only half of a side), so the result may differ from
    resizing :func:`xraylib.images.read_image`'s full-size pixels by a fraction of a grey level
    on average (a few at sharp edges); any other file gives exactly that. Padding keeps the full
    decode: its placement depends on the exact aspect ratio.
    """
    return preprocess_pixels(decode_for_model(data, path, settings), settings)


def decode_for_model(data: bytes, path: str, settings: PreprocessSettings) -> np.ndarray:
    """The decoded ``(H, W) uint8`` pixels (possibly read-only) that :func:`preprocess_bytes` preprocesses:
    reduced while decoding where the settings allow it (see there)."""
    at_least = None
    if settings.resize == "stretch":
        kept = BODY_MIN_AREA_FRACTION if settings.crop == "body" else 1  # the least of a side a crop keeps
        at_least = math.ceil(JPEG_REDUCING_GAP * settings.image_size / kept)
    return decode_bytes(data, path, at_least=at_least, writable=False)


def preprocess_file(path: str | os.PathLike, settings: PreprocessSettings,
                    opener: Callable[[str, str], Any] = open) -> np.ndarray:
    """Read any PNG/JPEG/DICOM file and preprocess it: ``(S, S) uint8``. Raises :class:`BadFileError`.

    ``opener`` opens the file (default :func:`open`; see :func:`xraylib.fileio.read_bytes`).
    """
    return preprocess_bytes(read_image_bytes(path, opener=opener, map_dicoms=True), str(path), settings)


def to_rgb_float(images_uint8: np.ndarray) -> np.ndarray:
    """``(N, S, S) uint8`` to ``(N, S, S, 3) float32`` in 0..255, the input the models take."""
    images = np.asarray(images_uint8, dtype=np.float32)
    return np.repeat(images[..., None], 3, axis=-1)


def normalise(images_rgb: np.ndarray, backbone: str) -> np.ndarray:
    """Apply a backbone's input normalisation in NumPy (for display; models do it internally).

    ``images_rgb``: ``(..., 3)`` float32 in 0..255. "caffe": BGR minus the ImageNet mean;
    "torch": 0..1 then ImageNet mean/std; "tf": -1..1; "unit": 0..1.
    """
    if backbone not in NORMALISATION:
        raise ConfigError(f"unknown backbone {backbone!r}; known: {sorted(NORMALISATION)}")
    mode = NORMALISATION[backbone]
    x = np.asarray(images_rgb, dtype=np.float32)
    if mode == "caffe":
        return x[..., ::-1] - _CAFFE_MEAN_RGB[::-1]
    if mode == "torch":
        return (x / 255.0 - _TORCH_MEAN_RGB) / _TORCH_STD_RGB
    if mode == "tf":
        return x / 127.5 - 1.0
    return x / 255.0


def one_hot(labels: pd.Series | np.ndarray, classes: tuple[str, ...] | list[str]) -> np.ndarray:
    """Label strings to ``(N, C) float32`` one-hot rows in ``classes`` order; :class:`ConfigError` on unknown labels."""
    index = {c: i for i, c in enumerate(classes)}
    labels = list(labels)
    unknown = sorted({l for l in labels if l not in index})
    if unknown:
        raise ConfigError(f"label(s) {unknown} not among the classes {list(classes)}")
    out = np.zeros((len(labels), len(classes)), dtype=np.float32)
    out[np.arange(len(labels)), [index[l] for l in labels]] = 1.0
    return out


# --------------------------------------------------------------------------------------------
# The on-disk cache


@dataclass
class PreprocessedSplit:
    """One split: ``images`` ``(N, S, S) uint8`` (memory-mapped), ``labels`` ``(N,)`` class indices, its manifest rows."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    manifest: pd.DataFrame
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def one_hot(self) -> np.ndarray:
        return np.eye(len(self.classes), dtype=np.float32)[self.labels]


@dataclass
class PreprocessedData:
    """The cache folder's contents: settings, classes, and the three splits."""

    folder: Path
    settings: PreprocessSettings
    classes: tuple[str, ...]
    splits: dict[str, PreprocessedSplit]
    key: str
    report: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> PreprocessedSplit:
        return self.splits[name]

    @property
    def manifest(self) -> pd.DataFrame:
        return pd.concat([s.manifest for s in self.splits.values()], ignore_index=True)


def cache_key(split_manifest: pd.DataFrame, classes: tuple[str, ...], settings: PreprocessSettings) -> str:
    """SHA-1 of the settings, the classes and every row's (path, content hash, label, split)."""
    h = hashlib.sha1()
    h.update(json.dumps({"settings": settings.to_dict(), "classes": list(classes), "pixels_version": PIXELS_VERSION},
                        sort_keys=True).encode())
    for row in split_manifest.reindex(columns=["path", "sha1", "label", "split"]).itertuples(index=False):
        h.update("\t".join(map(str, row)).encode() + b"\n")
    return h.hexdigest()


#: The fewest rows for which :func:`preprocess_dataset` decodes in worker processes by default (see there). On the
#: 2-core test machine, two processes preprocessed uncompressed DICOMs 0.96x to 2.1x as fast as two threads, and
#: their first start in a Python process cost 0.55 s to 1.1 s (later calls 0.06 to 0.14 s): 5,000 to 10,000 files
#: pay that back.
PROCESS_MIN_FILES = 10_000
#: Files a decoding thread reads and preprocesses before it hands their results over (see
#: :func:`xraylib.parallel.map_batched`): about 0.8 MB of pixels at 224 px, and a few milliseconds of work.
DECODE_BATCH = 16


def _work(job: tuple[str, PreprocessSettings, Callable[[str, str], Any], str | None, tuple | None]
          ) -> tuple[bool, np.ndarray | str | None]:
    """(True, pixels) or (False, the reason a file is left out); (True, None) where the job names its row of the
    cache file (worker processes write their rows themselves: see :func:`_write_row`)."""
    path, settings, opener, sha1, row = job
    try:
        if sha1 is None:  # a manifest without hashes (made by hand): nothing to compare
            pixels = preprocess_file(path, settings, opener)
        else:
            data = read_image_bytes(path, opener=opener, map_dicoms=True)
            # The manifest's sha1 is of the file's bytes (images.inspect_file): hashing them again here costs about
            # 0.6 ms per MB on the 2-core test machine, more than decoding an uncompressed DICOM takes (see the README's
            # Speed), and tells a file replaced since the manifest was built.
            if (now := sha1_bytes(data)) != sha1:
                return False, (f"changed since the manifest was built (content differs: SHA-1 {sha1[:12]}... in the "
                               f"manifest, {now[:12]}... now, {len(data)} bytes); rebuild the manifest")
            pixels = preprocess_bytes(data, str(path), settings)
    except BadFileError as exc:
        return False, exc.reason
    except Exception as exc:  # a decoder bug must not kill a run of thousands of files
        return False, f"unexpected {type(exc).__name__}: {exc}"
    if row is None:
        return True, pixels
    _write_row(row, pixels)  # (outside the try: a full disk stops the call, it is not a bad file)
    return True, None


def _write_row(row: tuple[str, int, int, tuple[int, int]], pixels: np.ndarray) -> None:
    """Write one decoded row into the cache file, from a worker process: ``row`` is the file's path, the row's byte
    offset and size, and the file's (device, inode). Handing 50 KB of pixels back to the calling process instead
    cost a fifth of the throughput on 2 cores. The file is opened and closed for each row (about 20 us): a file held
    open could not be renamed or removed on Windows, and a removed one would keep its space until the call's end.
    The caller syncs the file before it records the rows as done (:func:`_sync_rows`). A full disk is an
    ``OSError`` here (ENOSPC), not the SIGBUS a memory map gets."""
    path, offset, size, identity = row
    view = memoryview(np.ascontiguousarray(pixels, dtype=np.uint8)).cast("B")
    if view.nbytes != size:  # (a wrong shape would overwrite the next row; the memory map's assignment refuses it)
        raise ValueError(f"a preprocessed image of {pixels.shape} does not fit a cache row of {size} bytes")
    fd = os.open(path, os.O_WRONLY | getattr(os, "O_BINARY", 0))
    try:
        status = os.fstat(fd)
        if (status.st_dev, status.st_ino) != identity:  # another call's file by that name: not ours to write
            raise FileNotFoundError(errno.ENOENT, "the cache file was replaced while preprocessing", path)
        os.lseek(fd, offset, os.SEEK_SET)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _sync_rows(path: Path) -> None:
    """Sync the rows worker processes wrote into ``path`` to the disk (``fsync``: guaranteed for data written by
    any process, where a memory map's flush is only on Linux)."""
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for begin in range(0, n, size):
        yield begin, min(n, begin + size)


def preprocess_dataset(
    split_manifest: pd.DataFrame,
    out_dir: str | os.PathLike,
    classes: tuple[str, ...] | list[str],
    settings: PreprocessSettings = PreprocessSettings(),
    workers: int | None = None,
    progress: bool = True,
    chunk_size: int = 256,
    opener: Callable[[str, str], Any] = open,
    processes: bool | None = None,
) -> PreprocessedData:
    """Decode and resize every image of ``split_manifest`` (with a ``split`` column) into ``out_dir``.

    Writes ``{split}_images.npy`` ``(N, S, S) uint8``, ``{split}_labels.npy``, ``manifest.csv``
    (the rows kept, with ``split`` and ``row``) and ``preprocess.json``. Unreadable files are
    reported (``report["problems"]``) and left out. Re-running with the same inputs loads the
    cache; a run interrupted part-way resumes from its last finished chunk.

    ``workers`` decode in parallel (default: the number of CPU cores; 1: all here), one pool for the whole call:
    threads, or worker processes with ``processes=True``. The default (None) takes processes for
    :data:`PROCESS_MIN_FILES` files or more, where their first start (about 1 s, see
    :func:`xraylib.parallel.process_pool`) is paid back, in a notebook or the CLI (a script passes
    ``processes=True`` itself: see :func:`xraylib.parallel.script_safe_for_processes`). OpenCV decodes and resizes
    without holding Python's lock, but the parsing holds it: two threads keep 2 cores about 80% busy, and two
    processes, which write their rows into the cache file themselves, were 0.96x to 2.1x as fast on uncompressed
    DICOMs (the speed benchmark's dicom_fast rows: the smaller the files, the more). The pixels are the same either
    way. ``opener`` opens each image file (default :func:`open`; called from the decoding threads; see
    :func:`xraylib.fileio.read_bytes`); processes need the default.
    """
    classes = tuple(classes)
    if "split" not in split_manifest.columns:
        raise ConfigError("the manifest has no 'split' column: split it first (xraylib.split.split_by_patient)")
    if unknown_splits := sorted(set(split_manifest["split"].astype(str)) - set(SPLITS)):
        raise ConfigError(f"split value(s) {unknown_splits} in the manifest are not among {list(SPLITS)}; those rows would be lost")
    if unknown := sorted(set(split_manifest["label"].astype(str)) - set(classes)):
        raise ConfigError(f"label(s) {unknown} in the manifest are not among the classes {list(classes)}")
    assert_patient_disjoint(split_manifest)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(split_manifest, classes, settings)
    existing = _read_meta(out_dir)
    if existing and existing.get("key") == key and existing.get("complete"):
        data = load_preprocessed(out_dir)
        data.report = {**existing.get("report", {}), "cached": int(sum(len(s) for s in data.splits.values())), "new": 0}
        return data
    if not existing or existing.get("key") != key:
        # Without preprocess.json nothing says what the arrays here were built from: start again.
        _clear(out_dir)
    # The arrays are memory-mapped files: writing pages of one on a full disk kills the process with SIGBUS,
    # with no message. So the space they need is checked before any is allocated.
    sizes = {split: int((split_manifest["split"] == split).sum()) for split in SPLITS}
    _check_free_space(out_dir, sum(_unallocated(out_dir, split, n, settings.image_size) for split, n in sizes.items()),
                      f"{sum(sizes.values())} images of {settings.image_size}x{settings.image_size}")
    write_json_atomic(out_dir / "preprocess.json", {"key": key, "complete": False, "settings": settings.to_dict(),
                                                    "classes": list(classes)})
    workers = workers or os.cpu_count() or 1
    if processes and opener is not open:
        raise ConfigError("processes=True decodes in worker processes, which open files themselves: pass no opener, "
                          "or decode in threads (processes=False)")
    if processes is None:
        processes = opener is open and len(split_manifest) >= PROCESS_MIN_FILES and script_safe_for_processes()
    problems: list[dict] = []
    kept_frames = []
    decoded_new = 0
    pool = _pool(workers, processes)
    with pool or contextlib.nullcontext(), opencv_threads(1 if isinstance(pool, ThreadPoolExecutor) else None):
        opened = [_open_split(split_manifest[split_manifest["split"] == split].reset_index(drop=True), out_dir, split,
                              settings) for split in SPLITS]
        # One stream of files through the splits, so the workers go on with the next split's first files while one
        # split's last are written: no pause at each split's end. Files not started yet when an error or an
        # interrupt stops the call are not decoded (closing the stream cancels them).
        jobs = itertools.chain.from_iterable(_split_jobs(split, settings, opener, isinstance(pool, ProcessPoolExecutor))
                                             for split in opened)
        results = map_batched(pool, _work, jobs, batch=DECODE_BATCH, ahead=2 * workers) if pool else map(_work, jobs)
        try:
            for split in opened:
                ok_mask, new, split_problems = _fill_split(split, results, progress, chunk_size)
                decoded_new += new
                problems += split_problems
                kept = split.rows[ok_mask].reset_index(drop=True)
                _finalise_split(out_dir, split.split, ok_mask)
                labels = np.array([classes.index(l) for l in kept["label"]], dtype=np.int64)
                save_npy_atomic(out_dir / f"{split.split}_labels.npy", labels)
                kept_frames.append(kept.assign(row=np.arange(len(kept))))
        finally:
            if hasattr(results, "close"):
                results.close()
    kept_all = pd.concat(kept_frames, ignore_index=True)
    write_csv_atomic(out_dir / "manifest.csv", kept_all)
    report = {"problems": problems, "skipped": len(problems), "cached": int(len(kept_all) - decoded_new), "new": decoded_new}
    write_json_atomic(out_dir / "preprocess.json", {"key": key, "complete": True, "settings": settings.to_dict(),
                                                    "classes": list(classes), "report": report,
                                                    "counts": {s: int((kept_all["split"] == s).sum()) for s in SPLITS}})
    data = load_preprocessed(out_dir)
    data.report = report
    return data


#: Space kept free beside the arrays for the small files written with them (status, labels, manifest, JSON).
FREE_SPACE_MARGIN = 8 * 2**20


def _array_bytes(n: int, size: int) -> int:
    """The size of an ``(n, size, size) uint8`` ``.npy`` file: its header (at most 128 bytes here) and the pixels."""
    return 128 + n * size * size


def _unallocated(out_dir: Path, split: str, n: int, size: int) -> int:
    """Bytes still to allocate for ``split``'s array: all of it, none when finished, the unwritten (sparse) part of
    a partial array an interrupted run left."""
    if (out_dir / f"{split}_images.npy").exists() and not (out_dir / f"{split}_images.partial.npy").exists():
        return 0
    try:
        allocated = (out_dir / f"{split}_images.partial.npy").stat().st_blocks * 512
    except OSError:
        allocated = 0
    return max(0, _array_bytes(n, size) - allocated)


def _check_free_space(out_dir: Path, needed: int, what: str) -> None:
    """:class:`WriteError` naming ``out_dir`` when it has less than ``needed`` bytes (and :data:`FREE_SPACE_MARGIN`) free."""
    usage = shutil.disk_usage(out_dir)
    if needed <= 0 or usage.total == 0:  # a file system that reports no sizes (some FUSE mounts): nothing to compare
        return
    free = usage.free
    if needed + FREE_SPACE_MARGIN > free:
        raise WriteError(out_dir, f"not enough free space for the preprocessed {what}: needs {_megabytes(needed)} "
                                  f"(and {_megabytes(FREE_SPACE_MARGIN)} to spare), {_megabytes(free)} free; free some "
                                  "space or choose another output folder", errno.ENOSPC)


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{math.ceil(n / 1024)} KB"


def _disk_full(out_dir: Path, split: str, exc: OSError) -> OSError:
    """A write of ``split``'s cache that failed: on a full disk its partial array and status are removed (they hold
    the space the disk lacks), with the other unfinished splits' (opened with it: the files are decoded in one
    stream), and one :class:`WriteError` says so; any other failure is returned as it is."""
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return write_error(out_dir, exc)
    for name in SPLITS:
        if name == split or (out_dir / f"{name}_images.partial.npy").exists():
            for path in (f"{name}_images.partial.npy", f"{name}_status.npy", f"{name}_problems.json"):
                (out_dir / path).unlink(missing_ok=True)
    return WriteError(out_dir, f"the disk filled up while preprocessing the {split} images ({os.strerror(exc.errno)}); "
                               f"their partial files were removed: free some space or choose another output folder",
                      exc.errno)


def split_and_preprocess(
    manifest: pd.DataFrame,
    out_dir: str | os.PathLike,
    classes: tuple[str, ...] | list[str],
    settings: PreprocessSettings = PreprocessSettings(),
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 42,
    external_test_sources: tuple[str, ...] | list[str] = (),
    workers: int | None = None,
    progress: bool = True,
    opener: Callable[[str, str], Any] = open,
    processes: bool | None = None,
) -> PreprocessedData:
    """Keep the rows of ``classes``, split them by patient, and fill the cache (notebook 02 and the CLI)."""
    classes = tuple(classes)
    rows = manifest[manifest["label"].isin(classes)]
    if rows.empty:
        raise ConfigError(f"the manifest has no images of the classes {list(classes)}; rebuild it for this task")
    split_frame = split_by_patient(rows, fractions=fractions, seed=seed, external_test_sources=external_test_sources)
    return preprocess_dataset(split_frame, out_dir, classes, settings, workers=workers, progress=progress, opener=opener,
                              processes=processes)


@dataclass
class _OpenSplit:
    """One split's cache as :func:`_open_split` found or made it: ``images`` is None for a split finished earlier."""

    rows: pd.DataFrame
    out_dir: Path
    split: str
    images: np.memmap | None
    status: np.ndarray  # per row: 0 to do, 1 decoded, 2 unreadable
    reasons: dict[str, str]
    todo_start: int  # the first row to decode; every row from there on is decoded (again)


def _open_split(rows: pd.DataFrame, out_dir: Path, split: str, settings: PreprocessSettings) -> _OpenSplit:
    """``{split}_images.partial.npy`` and ``{split}_status.npy`` opened to resume, or made (after a free-space check)."""
    n, size = len(rows), settings.image_size
    partial = out_dir / f"{split}_images.partial.npy"
    status_path = out_dir / f"{split}_status.npy"
    final = out_dir / f"{split}_images.npy"
    if final.exists() and status_path.exists():  # finished earlier in an interrupted run
        status = np.load(status_path)
        if len(status) == n and (status > 0).all():
            return _OpenSplit(rows, out_dir, split, None, status, _load_reasons(out_dir, split), n)
    if partial.exists() and status_path.exists() and len(np.load(status_path)) == n:
        images = np.load(partial, mmap_mode="r+")
        status = np.load(status_path)
    else:
        _check_free_space(out_dir, _array_bytes(n, size), f"{split} images ({n} of {size}x{size})")
        try:
            images = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=(n, size, size))
            status = np.zeros(n, dtype=np.int8)
            save_npy_atomic(status_path, status)
        except OSError as exc:
            raise _disk_full(out_dir, split, exc) from None
    todo_start = int(np.argmin(status > 0)) if (status == 0).any() else n
    return _OpenSplit(rows, out_dir, split, images, status, _load_reasons(out_dir, split), todo_start)


def _split_jobs(opened: _OpenSplit, settings: PreprocessSettings, opener: Callable[[str, str], Any],
                writes_rows: bool) -> Iterator[tuple]:
    """:func:`_work`'s jobs for the rows of ``opened`` still to decode, in order; with ``writes_rows`` (worker
    processes) each names its row of the partial array file, which the worker writes itself."""
    rows, start = opened.rows, opened.todo_start
    # The content hash each file had when the manifest was built; None where the manifest holds none.
    hashes = rows["sha1"].tolist()[start:] if "sha1" in rows.columns else [None] * (len(rows) - start)
    if writes_rows and start < len(rows):
        partial = opened.out_dir / f"{opened.split}_images.partial.npy"
        identity = (partial.stat().st_dev, partial.stat().st_ino)
        first, stride = opened.images.offset, opened.images.strides[0]
    for i, path, sha1 in zip(itertools.count(start), rows["path"].tolist()[start:], hashes):
        row = (str(partial), first + i * stride, stride, identity) if writes_rows else None
        yield path, settings, opener, sha1 if isinstance(sha1, str) and sha1 else None, row


def _fill_split(opened: _OpenSplit, results: Iterator[tuple[bool, Any]], progress: bool,
                chunk_size: int) -> tuple[np.ndarray, int, list[dict]]:
    """Fill one split's ``{split}_images.partial.npy`` from ``results`` (the call's :func:`_work` results, in order:
    this split's after the splits before it), taking exactly its rows to decode: each decoded row written here, or
    already written by a worker process (``None``).

    Every ``chunk_size`` rows the pixels are flushed, then the status saved. Returns (ok mask, rows decoded now,
    problems).
    """
    rows, out_dir, split, status, reasons = opened.rows, opened.out_dir, opened.split, opened.status, opened.reasons
    n, images, new = len(rows), opened.images, 0
    if images is None:
        return status == 1, 0, _problems(rows, status, reasons)
    status_path = out_dir / f"{split}_status.npy"
    bar = tqdm(total=n, initial=opened.todo_start, desc=f"preprocessing {split}", unit="img",
               disable=not progress or n == 0)
    target = images.view(np.ndarray)  # rows written through a plain view: np.memmap's bookkeeping costs 0.05 ms a row
    written_reasons, by_workers = -1, False
    try:
        for i, (ok, value) in zip(range(opened.todo_start, n), results):  # (range first: no result taken past n)
            if ok:
                if value is None:  # a worker process wrote the row itself
                    by_workers = True
                else:
                    target[i] = value
                status[i] = 1
                new += 1
            else:
                status[i] = 2
                reasons[str(i)] = value
            bar.update(1)
            if (i + 1 - opened.todo_start) % chunk_size and i + 1 < n:
                continue
            images.flush()  # pixels reach the disk before the status that says they are there
            if by_workers:
                _sync_rows(out_dir / f"{split}_images.partial.npy")
            if len(reasons) != written_reasons:  # (only ever added to)
                write_json_atomic(out_dir / f"{split}_problems.json", reasons)
                written_reasons = len(reasons)
            save_npy_atomic(status_path, status)
            # The pages written so far leave this process's RSS (they stay in the page cache), so memory stays flat
            # in the number of images instead of growing to the file's size.
            release_pages(images)
    except OSError as exc:
        images = target = opened.images = None  # unmapped before its file is removed
        raise _disk_full(out_dir, split, exc) from None
    finally:
        bar.close()
    opened.images = None
    del images, target
    return status == 1, new, _problems(rows, status, reasons)


def _pool(workers: int, processes: bool) -> Executor | None:
    """The decoding threads or processes of one :func:`preprocess_dataset` call; None for one worker (decode in this
    thread)."""
    if workers <= 1:
        return None
    if processes:
        return process_pool(workers, preload=(__name__,))
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="xraylib-decode")


def _load_reasons(out_dir: Path, split: str) -> dict[str, str]:
    path = out_dir / f"{split}_problems.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _problems(rows: pd.DataFrame, status: np.ndarray, reasons: dict[str, str]) -> list[dict]:
    return [{"path": rows["path"].iloc[i], "reason": reasons.get(str(i), "unreadable")} for i in np.flatnonzero(status == 2)]


def _finalise_split(out_dir: Path, split: str, ok_mask: np.ndarray) -> None:
    """Move the decoded rows into ``{split}_images.npy``: a rename when all are good, a chunked copy otherwise."""
    partial = out_dir / f"{split}_images.partial.npy"
    final = out_dir / f"{split}_images.npy"
    if not partial.exists():
        return  # already finalised
    if ok_mask.all():
        os.replace(partial, final)
        return
    source = np.load(partial, mmap_mode="r")
    tmp = out_dir / f".{split}_images.npy.tmp"
    # The copy is a second memory-mapped array beside the partial one: checked as they are (SIGBUS on a full disk).
    _check_free_space(out_dir, _array_bytes(int(ok_mask.sum()), source.shape[1]),
                      f"{split} images (the copy without the unreadable ones)")
    target = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(int(ok_mask.sum()),) + source.shape[1:])
    keep = np.flatnonzero(ok_mask)
    for begin, end in _chunks(len(keep), 512):
        target[begin:end] = source[keep[begin:end]]
        release_pages(source)  # RSS stays that of a chunk, not the two files' (11 GB for NIH ChestX-ray14 at 224 px)
        release_pages(target)
    target.flush()
    del target, source
    os.replace(tmp, final)
    partial.unlink()


def _read_meta(out_dir: Path) -> dict | None:
    return read_json(out_dir / "preprocess.json")


def holds_preprocessed(folder: str | os.PathLike, key: str | None = None) -> bool:
    """Whether ``folder`` holds a finished cache (with the data ``key``, when given); False for an unreadable folder."""
    try:
        meta = _read_meta(Path(folder)) if Path(folder).is_dir() else None
    except OSError:
        return False
    return bool(meta and meta.get("complete") and (key is None or meta.get("key") == key))


def _clear(out_dir: Path) -> None:
    """Remove a cache built from other inputs or settings (only xraylib's own cache files)."""
    for split in SPLITS:
        for name in (f"{split}_images.npy", f"{split}_images.partial.npy", f"{split}_status.npy",
                     f"{split}_labels.npy", f"{split}_problems.json"):
            (out_dir / name).unlink(missing_ok=True)
    (out_dir / "manifest.csv").unlink(missing_ok=True)


def _cache_files(folder: Path) -> list[Path]:
    """The files of a finished cache that :func:`load_preprocessed` reads; ``preprocess.json`` last (it says "complete")."""
    return ([folder / "manifest.csv"] + [folder / f"{split}_{kind}.npy" for split in SPLITS for kind in ("labels", "images")]
            + [folder / "preprocess.json"])


#: Bytes read and written at a time by :func:`copy_preprocessed` (its progress bar moves this often).
COPY_BLOCK = 16 * 2**20


def copy_preprocessed(folder: str | os.PathLike, dest: str | os.PathLike, progress: bool = True) -> Path:
    """Copy the finished cache in ``folder`` to ``dest`` (say ``/content/preprocessed``, the runtime's own disk) and
    return ``dest``: training that reads random batches (streamed, fine-tuning) reads them there instead of from a
    Drive folder. One file per split and array, so a copy is a few long sequential reads.

    Resumable: ``dest`` is marked as a copy of this cache first and marked complete last, so an interrupted copy is
    never loaded, and run again it keeps the files already copied whole (renamed into place when done). A ``dest``
    holding another cache is emptied of it first. The feature cache (``features/``) is not copied: training on the
    copy builds its own there, lost with the runtime. :class:`SourceError` when ``folder`` holds no finished cache.
    """
    folder, dest = Path(folder), Path(dest)
    meta = _read_meta(folder)
    if not meta or not meta.get("complete"):
        raise SourceError(f"{folder}: no finished preprocessed data to copy; run notebook 02 (or `python -m xraylib preprocess`)")
    existing = _read_meta(dest) if dest.is_dir() else None
    if existing and existing.get("key") == meta["key"] and existing.get("complete"):
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    if not existing or existing.get("key") != meta["key"]:
        _clear(dest)
        write_json_atomic(dest / "preprocess.json", {"key": meta["key"], "complete": False, "copy_of": str(folder)})
    sources = _cache_files(folder)
    todo = [path for path in sources[:-1]
            if not ((dest / path.name).is_file() and (dest / path.name).stat().st_size == path.stat().st_size)]
    total = sum(path.stat().st_size for path in todo)
    _check_free_space(dest, total, f"copy of the preprocessed images ({len(todo)} files)")
    with tqdm(total=total, desc="copying the cache", unit="B", unit_scale=True, disable=not progress) as bar:
        for path in todo:
            with atomic_path(dest / path.name) as tmp, open(path, "rb") as source, open(tmp, "wb") as target:
                while block := source.read(COPY_BLOCK):
                    target.write(block)
                    bar.update(len(block))
    with atomic_path(dest / "preprocess.json") as tmp:  # the last step: the copy is complete
        shutil.copyfile(folder / "preprocess.json", tmp)
    return dest


def load_preprocessed(folder: str | os.PathLike) -> PreprocessedData:
    """Open a finished cache (images memory-mapped read-only). :class:`SourceError` if there is none."""
    folder = Path(folder)
    meta = _read_meta(folder)
    if not meta or not meta.get("complete"):
        raise SourceError(f"{folder}: no finished preprocessed data; run notebook 02 (or `python -m xraylib preprocess`)")
    classes = tuple(meta["classes"])
    # A cache made before the site column gets its sites here: its key (and arrays) do not depend on them.
    manifest = read_manifest_csv(folder / "manifest.csv")
    splits = {}
    for split in SPLITS:
        images = np.load(folder / f"{split}_images.npy", mmap_mode="r")
        labels = np.load(folder / f"{split}_labels.npy")
        rows = manifest[manifest["split"] == split].reset_index(drop=True)
        if len(rows) != len(images) or len(labels) != len(images):
            raise SourceError(f"{folder}: {split} arrays and manifest disagree ({len(images)} images, {len(rows)} rows); delete the folder and preprocess again")
        splits[split] = PreprocessedSplit(split, images, labels, rows, classes)
    return PreprocessedData(folder, PreprocessSettings.from_dict(meta["settings"]), classes, splits, meta["key"], meta.get("report", {}))
