"""Shared test fixtures: files in real formats written in code, and the real data in ../shared."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, SecondaryCaptureImageStorage, generate_uid

from xraylib import config

# The suite's numbers must not depend on the CPU that runs it: "auto" precision sees a CPU without bfloat16 units
# (float32), here and in the processes the tests start. tests/test_cpu_bfloat16.py asks for bfloat16 itself.
os.environ.setdefault("XRAYLIB_CPU_BFLOAT16", "0")


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (or $XRAYLIB_SHARED_DATA); the test is skipped with a message where it is absent."""
    path = config.shared_data_dir()
    if path is None:
        pytest.skip("../shared/data not found (set XRAYLIB_SHARED_DATA to the real data folder to run this test)")
    return path


@pytest.fixture
def shared_weights() -> Path:
    path = config.shared_weights_dir()
    if path is None:
        pytest.skip("../shared/weights not found (set XRAYLIB_SHARED_WEIGHTS to run this test)")
    return path


def gradient_image(height: int = 96, width: int = 80, seed: int = 0) -> np.ndarray:
    """A ``(H, W) uint8`` test image with structure (a gradient plus a bright disc), so resizes are checkable."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = (x * 200 / max(width - 1, 1)).astype(np.float64)
    cy, cx = height * 0.4, width * 0.6
    image[(y - cy) ** 2 + (x - cx) ** 2 < (min(height, width) / 5) ** 2] = 250
    image += rng.normal(0, 2, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_dicom(
    path: str | os.PathLike,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits: int = 8,
    patient_id: str = "patient-1",
    sex: str = "F",
    age: str = "43",
    view: str = "PA",
    modality: str = "CR",
    with_pixels: bool = True,
    signed: bool = False,
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    jpeg_quality: int | None = None,
) -> Path:
    """Write a chest X-ray DICOM with pydicom in the RSNA header layout. ``pixels`` are stored as given.

    ``jpeg_quality``: store 8-bit pixels as the RSNA files do, JPEG Baseline compressed (encoded
    by OpenCV at that quality, so they are stored as given less the JPEG loss).
    """
    path = Path(path)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if jpeg_quality is None else JPEGBaseline8Bit
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientName, ds.PatientSex, ds.PatientAge = patient_id, patient_id, sex, age
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition, ds.ConversionType = modality, "CHEST", view, "WSD"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = bits
    ds.BitsStored = 8 if bits == 8 else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if with_pixels and jpeg_quality is not None:
        assert bits == 8, "JPEG Baseline holds 8-bit pixels"
        ok, encoded = cv2.imencode(".jpg", pixels.astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
        assert ok
        ds.PixelData = encapsulate([encoded.tobytes()])
        ds["PixelData"].VR = "OB"
        ds.LossyImageCompression = "01"
    elif with_pixels:
        dtype = {8: np.uint8, 16: np.int16 if signed else np.uint16}[bits]
        ds.PixelData = np.ascontiguousarray(pixels.astype(dtype)).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_raster(path: str | os.PathLike, pixels: np.ndarray, **params) -> Path:
    """Write a PNG or JPEG with OpenCV (format from the suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), pixels), path
    return path
