"""Property-based tests (hypothesis) of the decoders, preprocessing and the manifest builder.

- Any bytes at all (random, behind a real magic number, or a real PNG/JPEG/DICOM with bytes
  flipped, cut or inserted, or a DICOM with random header values) given to
  ``images.decode_bytes``, ``images.inspect_bytes`` or ``dicom.decode_dicom`` either decode to
  ``(H, W) uint8`` or raise an :class:`~xraylib.errors.XraylibError` naming the file, on one line.
  Nothing else escapes. (These found the damaged-DICOM-header crashes fixed in ``dicom.py``.)
- Any valid image (arrays drawn by hypothesis, written as PNG, JPEG or DICOM) goes through
  ``preprocess.preprocess_file`` to ``(S, S) uint8``; lossless 8-bit files give exactly the resize
  of the pixels written.
- The manifest builder on random small ieee8023 and RSNA tables never fails with anything but an
  xraylib error, and accounts for every row: kept, left out (counted), or named as a problem.
"""
from __future__ import annotations

import csv
import io
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from conftest import gradient_image, write_dicom, write_raster
from test_sources import IEEE8023_HEADER
from xraylib import dicom, images, manifest, preprocess
from xraylib.errors import XraylibError

# A RuntimeWarning from xraylib's own code (overflow, NaN cast to uint8) would be a silently wrong image.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR AS", "ignore::UserWarning",
                                        "ignore::RuntimeWarning:pydicom", "error::RuntimeWarning:xraylib")

FUZZ_PATH = "/drive/my_xrays/fuzz.bin"
QUICK = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ============================================================================================
# Decoders: bytes in, (H, W) uint8 or an xraylib error out


def _encode(ext: str, pixels: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(ext, pixels)
    assert ok
    return buffer.tobytes()


def _dicom_bytes(pixels: np.ndarray, **kwargs) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        return write_dicom(Path(folder) / "seed.dcm", pixels, **kwargs).read_bytes()


def _seed_files() -> dict[str, bytes]:
    """Small valid files of every kind the decoders handle: the starting points of the mutations."""
    gray = gradient_image(40, 36)
    colour = np.dstack([gray, 255 - gray, np.roll(gray, 5, axis=1)])
    return {
        "png-gray": _encode(".png", gray),
        "png-16bit": _encode(".png", gray.astype(np.uint16) * 200),
        "png-rgba": _encode(".png", np.dstack([colour, gray])),
        "jpeg-gray": _encode(".jpg", gray),
        "jpeg-colour": _encode(".jpg", colour),
        "dicom-8bit": _dicom_bytes(gray),
        "dicom-12bit-windowed": _dicom_bytes(gray.astype(np.uint16) * 16, bits=16, rescale=(1.0, -1024.0),
                                             window=(500.0, 1500.0)),
        "dicom-signed-monochrome1": _dicom_bytes(gray.astype(np.int16) * 8 - 1000, bits=16, signed=True,
                                                 photometric="MONOCHROME1"),
    }


SEEDS = _seed_files()


@st.composite
def mutated_files(draw) -> bytes:
    """A real file with a few bytes changed, cut out or inserted, or cut short."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["set", "delete", "insert", "truncate", "big-number"]))
        if kind == "set":
            data[at] = draw(st.integers(0, 255))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 32))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "truncate":
            del data[at:]
        else:  # sizes, lengths and counts are where decoders trust the file
            data[at:at + 2] = draw(st.sampled_from([0, 1, 0x7FFF, 0xFFFF, 20_000])).to_bytes(2, "little")
    return bytes(data)


MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"\x00" * 128 + b"DICM", b"PK\x03\x04", b"GIF89a", b""]
with_magic = st.tuples(st.sampled_from(MAGIC), st.binary(max_size=600)).map(b"".join)

# Header values that real and broken DICOMs carry, valid or not.
DICOM_VALUES = {
    "Rows": [0, 1, 31, 40, 41, 65535, 20_000],
    "Columns": [0, 1, 36, 35, 65535],
    "BitsAllocated": [1, 8, 12, 16, 32, 0],
    "BitsStored": [0, 1, 8, 12, 16, 32, 40],
    "HighBit": [0, 7, 11, 15, 31, 40],
    "SamplesPerPixel": [0, 1, 3, 4],
    "PhotometricInterpretation": ["MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "PALETTE COLOR", "", "XYZ"],
    "PixelRepresentation": [0, 1, 2],
    "NumberOfFrames": [0, 1, 2, 1000, "abc"],
    "RescaleSlope": ["0", "-1", "abc", "1e308", ""],
    "RescaleIntercept": ["-1024", "abc", "nan"],
    "WindowCenter": ["0", "abc", "40", "nan"],
    "WindowWidth": ["0", "-5", "1", "abc", "inf"],
    "PlanarConfiguration": [0, 1, 2],
    "PatientAge": ["043Y", "", "abc", "999Y", "6M"],
}


@st.composite
def dicoms_with_random_header_values(draw) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(SEEDS[draw(st.sampled_from(["dicom-8bit", "dicom-12bit-windowed"]))]))
    for key in draw(st.lists(st.sampled_from(sorted(DICOM_VALUES)), min_size=1, max_size=5, unique=True)):
        try:
            setattr(ds, key, draw(st.sampled_from(DICOM_VALUES[key])))
        except Exception:  # pydicom refuses some values outright; the file just keeps the old one
            pass
    buffer = io.BytesIO()
    try:
        ds.save_as(buffer, enforce_file_format=False)
    except Exception:
        assume(False)
    return buffer.getvalue()


def _assert_only_xraylib_errors(data: bytes) -> None:
    for decode in (images.decode_bytes, images.inspect_bytes, dicom.decode_dicom):
        try:
            out = decode(data, FUZZ_PATH)
        except XraylibError as exc:
            message = str(exc)
            assert message.startswith(f"{FUZZ_PATH}: ") and "\n" not in message, message
            continue
        pixels = out if decode is images.decode_bytes else out[0] if decode is dicom.decode_dicom else None
        if pixels is not None:
            assert pixels.dtype == np.uint8 and pixels.ndim == 2, (decode.__name__, pixels.dtype, pixels.shape)
        else:
            assert out.file_format in ("png", "jpeg", "dicom") and len(out.sha1) == 40


@QUICK
@given(st.binary(max_size=2048))
def test_random_bytes_raise_only_xraylib_errors(data):
    _assert_only_xraylib_errors(data)


@QUICK
@given(with_magic)
def test_random_bytes_behind_a_magic_number_raise_only_xraylib_errors(data):
    _assert_only_xraylib_errors(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_files())
def test_damaged_real_files_raise_only_xraylib_errors(data):
    _assert_only_xraylib_errors(data)


@QUICK
@given(dicoms_with_random_header_values())
def test_dicoms_with_random_header_values_raise_only_xraylib_errors(data):
    _assert_only_xraylib_errors(data)


# ============================================================================================
# Any valid image round-trips through preprocessing


@st.composite
def valid_images(draw) -> tuple[str, np.ndarray, dict]:
    """(format, pixels as written, options) for a PNG, JPEG or DICOM that xraylib must accept."""
    file_format = draw(st.sampled_from(["png", "jpeg", "dicom"]))
    height, width = draw(st.integers(32, 72)), draw(st.integers(32, 72))
    options: dict = {}
    if file_format == "png":
        dtype = draw(st.sampled_from([np.uint8, np.uint16]))
        channels = draw(st.sampled_from([1, 3, 4]))
    elif file_format == "jpeg":
        dtype, channels = np.uint8, draw(st.sampled_from([1, 3]))
    else:
        dtype, channels = draw(st.sampled_from([np.uint8, np.uint16, np.int16])), 1
        options["photometric"] = draw(st.sampled_from(["MONOCHROME1", "MONOCHROME2"]))
        if dtype is not np.uint8:
            options.update(bits=16, signed=dtype is np.int16)
    shape = (height, width) if channels == 1 else (height, width, channels)
    # DICOM's 16-bit files here store 12 bits (write_dicom): keep the values in that range.
    low, high = {np.uint8: (0, 255), np.uint16: (0, 65535 if file_format == "png" else 4095),
                 np.int16: (-2048, 2047)}[dtype]
    pixels = draw(arrays(dtype, shape, elements=st.integers(low, high), fill=st.integers(low, high)))
    return file_format, pixels, options


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("valid_images")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(image=valid_images(), size=st.integers(32, 96), mode=st.sampled_from(preprocess.RESIZE_MODES))
def test_any_valid_image_round_trips_through_preprocessing(scratch, image, size, mode):
    file_format, pixels, options = image
    path = scratch / f"image.{ {'png': 'png', 'jpeg': 'jpg', 'dicom': 'dcm'}[file_format] }"
    if file_format == "dicom":
        write_dicom(path, pixels, **options)
    else:
        write_raster(path, pixels)
    out = preprocess.preprocess_file(path, preprocess.PreprocessSettings(image_size=size, resize=mode))
    assert out.shape == (size, size) and out.dtype == np.uint8
    decoded = images.read_image(path)
    assert decoded.shape == pixels.shape[:2] and decoded.dtype == np.uint8
    np.testing.assert_array_equal(out, preprocess.resize_image(decoded, size, mode))
    if pixels.dtype == np.uint8 and pixels.ndim == 2 and file_format != "jpeg":  # lossless 8-bit gray
        stored = 255 - pixels if options.get("photometric") == "MONOCHROME1" else pixels
        np.testing.assert_array_equal(decoded, stored)


# ============================================================================================
# The manifest builder on random tables

IEEE_COLUMNS = IEEE8023_HEADER.split(",")
FINDINGS = ["COVID-19", "No Finding", "Pneumonia/Viral/COVID-19", "Streptococcus", "SARS", "ARDS", "todo", ""]
VIEWS = ["PA", "AP", "AP Supine", "L", "Axial", "Coronal", "", "pa", " AP "]
MODALITIES = ["X-ray", "CT", "", "x-ray", "MRI"]
odd_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=10)


@pytest.fixture(scope="module")
def image_pool(tmp_path_factory) -> Path:
    """A folder of images the random tables name: good PNG/JPEG/DICOM files, a bad one, a copy."""
    root = tmp_path_factory.mktemp("ieee8023")
    folder = root / "images"
    write_raster(folder / "a.png", gradient_image(48, 40, seed=1))
    write_raster(folder / "b.jpg", gradient_image(48, 40, seed=2))
    write_dicom(folder / "c.dcm", gradient_image(48, 40, seed=3), view="AP", modality="CT")
    write_dicom(folder / "d.dcm", gradient_image(48, 40, seed=4), view="", modality="")
    (folder / "bad.png").write_bytes(b"<html>404</html>\n")
    (folder / "copy-of-a.png").write_bytes((folder / "a.png").read_bytes())
    return root


@st.composite
def ieee_rows(draw) -> list[list[str]]:
    names = ["a.png", "b.jpg", "c.dcm", "d.dcm", "bad.png", "copy-of-a.png", "missing.png"]
    rows = []
    for _ in range(draw(st.integers(0, 8))):
        values = {
            "patientid": draw(st.one_of(st.sampled_from(["1", "2", "3", ""]), odd_text)),
            "finding": draw(st.one_of(st.sampled_from(FINDINGS), odd_text)),
            "view": draw(st.one_of(st.sampled_from(VIEWS), odd_text)),
            "modality": draw(st.one_of(st.sampled_from(MODALITIES), odd_text)),
            "sex": draw(st.sampled_from(["M", "F", "", "U"])),
            "age": draw(st.one_of(st.sampled_from(["65", "", "5?", "-3", "1e9"]), odd_text)),
            "folder": draw(st.sampled_from(["images", "images", "images", "", "elsewhere"])),
            "filename": draw(st.one_of(st.sampled_from(names), odd_text)),
        }
        rows.append([values.get(c, "") for c in IEEE_COLUMNS])
    return rows


def _write_csv(path: Path, header: list[str], rows: list[list[str]], crlf: bool) -> None:
    buffer = io.StringIO()
    # csv quotes a field holding a character of the line terminator; with "\n" a bare "\r" would stay unquoted and
    # end the line for any CSV reader (the file would hold other rows than the test means): quote every field then.
    bare_cr = not crlf and any("\r" in field for row in rows for field in row)
    csv.writer(buffer, lineterminator="\r\n" if crlf else "\n",
               quoting=csv.QUOTE_ALL if bare_cr else csv.QUOTE_MINIMAL).writerows([header] + rows)
    path.write_text(buffer.getvalue(), encoding="utf-8")


def _check_manifest(build) -> None:
    """Build, and check every row is accounted for; an xraylib error is an acceptable answer."""
    try:
        result = build()
    except XraylibError:
        return
    frame = result.frame
    assert list(frame.columns) == manifest.MANIFEST_COLUMNS and len(frame) > 0
    assert frame["path"].map(lambda p: Path(p).is_file()).all()
    assert set(frame["label"]) <= set(result.report.classes)
    assert frame[["width", "height"]].notna().all().all() and frame["sha1"].str.len().eq(40).all()
    assert not frame["sha1"].duplicated().any()  # copies were dropped
    return result


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(rows=ieee_rows(), crlf=st.booleans(), views=st.sampled_from([None, ("PA",), manifest.DEFAULT_VIEWS]),
       task=st.sampled_from(sorted(manifest.TASKS)))
def test_manifest_builder_on_random_ieee8023_tables(image_pool, rows, crlf, views, task):
    _write_csv(image_pool / "metadata.csv", IEEE_COLUMNS, rows, crlf)
    result = _check_manifest(lambda: manifest.build_manifest({"covid_chestxray_dataset": image_pool}, task=task,
                                                             views=views, workers=2, progress=False))
    if result is None:
        return
    # Nothing lost: each metadata row is kept, left out and counted, or named as a missing file.
    source = result.report.per_source["ieee8023"]
    missing = [p for p, r in result.report.problems if r == "image file named in metadata.csv is missing"]
    assert source["kept"] + sum(source["excluded"].values()) + len(missing) == len(rows)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(st.text(max_size=300), st.binary(max_size=300).map(lambda b: b.decode("latin-1"))))
def test_manifest_builder_on_random_text_as_metadata_csv(image_pool, text):
    (image_pool / "metadata.csv").write_bytes(text.encode("utf-8", "surrogatepass"))
    _check_manifest(lambda: manifest.build_manifest({"covid_chestxray_dataset": image_pool}, progress=False,
                                                    workers=2))


@pytest.fixture(scope="module")
def rsna_pool(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rsna")
    for i, name in enumerate(["p1", "p2", "p3"]):
        write_dicom(root / "stage_2_train_images" / f"{name}.dcm", gradient_image(48, 40, seed=10 + i), patient_id=name)
    (root / "stage_2_train_images" / "p4.dcm").write_bytes(b"")
    return root


RSNA_CLASSES = ["Normal", "Lung Opacity", "No Lung Opacity / Not Normal", "", "normal"]


@st.composite
def rsna_tables(draw) -> tuple[list[list[str]], list[list[str]]]:
    labels, classes = [], []
    for _ in range(draw(st.integers(0, 8))):
        patient = draw(st.one_of(st.sampled_from(["p1", "p2", "p3", "p4", "p9", ""]), odd_text))
        box = draw(st.one_of(st.just(["", "", "", ""]), st.lists(st.sampled_from(["1.5", "300", "", "x"]),
                                                                min_size=4, max_size=4)))
        labels.append([patient, *box, draw(st.sampled_from(["0", "1", "", "2", "yes"]))])
        classes.append([patient, draw(st.one_of(st.sampled_from(RSNA_CLASSES), odd_text))])
    return labels, classes


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(tables=rsna_tables(), task=st.sampled_from(sorted(manifest.TASKS)))
def test_manifest_builder_on_random_rsna_tables(rsna_pool, tables, task):
    labels, classes = tables
    _write_csv(rsna_pool / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], labels, False)
    _write_csv(rsna_pool / "stage_2_detailed_class_info.csv", ["patientId", "class"], classes, False)
    result = _check_manifest(lambda: manifest.build_manifest({"rsna_pneumonia": rsna_pool}, task=task, views=None,
                                                             workers=2, progress=False))
    if result is not None:
        assert result.frame["patient_id"].is_unique  # one image per patient, however many rows (boxes)
