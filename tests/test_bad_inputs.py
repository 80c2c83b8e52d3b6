"""The catalogue of bad inputs (issue 8): what users really put in their folders, and what xraylib does.

Every image-file entry of :data:`FILE_CASES` is checked three ways:

- a single-file call (``images.read_image``, ``images.inspect_file``, ``preprocess.preprocess_file``)
  refuses it with a :class:`BadFileError` whose message names the file and the problem, or reads
  it to ``(H, W) uint8`` pixels that match what the file holds;
- bulk work skips it, names it with the same reason and counts it, and keeps every other file:
  ``build_manifest`` over a folder (its report and summary) and ``preprocess_dataset`` over a
  manifest (its report: problems and ``skipped``);
- nothing but xraylib's own errors escapes.

The label tables (ieee8023 ``metadata.csv``, RSNA CSVs) have their own entries, and transient I/O
errors (Google Drive's FUSE mount) are injected with a fault-injecting ``opener``.
``tests/BAD_INPUTS.md`` is the catalogue as a table; a test checks it lists every entry here.
"""
from __future__ import annotations

import dataclasses
import errno
import io
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom import uid
from pydicom.encaps import encapsulate

from conftest import gradient_image, write_dicom, write_raster
from test_sources import IeeeRow, RsnaPatient, make_ieee8023, make_rsna
from xraylib import config, images, manifest, preprocess
from xraylib.errors import BadFileError, ConfigError, SourceError
from xraylib.fileio import sha1_file

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR AS")

CATALOGUE_TABLE = Path(__file__).with_name("BAD_INPUTS.md")
SETTINGS = preprocess.PreprocessSettings(image_size=40, resize="pad")


# ============================================================================================
# Writers of the bad (and the merely unusual) files


def _encode(ext: str, pixels: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(ext, pixels)
    assert ok
    return buffer.tobytes()


def _colour(height: int = 96, width: int = 80) -> np.ndarray:
    """BGR whose channels differ, so a wrong channel order or weighting shows."""
    gray = gradient_image(height, width)
    return np.dstack([gray, (255 - gray) // 2, np.roll(gray, 7, axis=1)]).astype(np.uint8)


def _pil():
    return pytest.importorskip("PIL.Image", reason="Pillow writes palette PNGs and CMYK JPEGs (dev extra)")


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def empty_file(stem: Path) -> Path:
    return _write(stem.with_suffix(".jpeg"), b"")


def truncated_jpeg(stem: Path) -> Path:
    data = _encode(".jpg", _colour(120, 100))
    return _write(stem.with_suffix(".jpeg"), data[: len(data) // 2])


def truncated_png(stem: Path) -> Path:
    data = _encode(".png", _colour(120, 100))
    return _write(stem.with_suffix(".png"), data[: len(data) * 2 // 3])


def text_named_jpg(stem: Path) -> Path:
    return _write(stem.with_suffix(".jpg"), b"patientid,finding,filename\n1,COVID-19,covid-1.png\n")


def html_error_page_named_png(stem: Path) -> Path:
    """What a failed Drive or web download saves under the image's name."""
    return _write(stem.with_suffix(".png"), b"<!DOCTYPE html><html><body>Too many users have viewed this file</body></html>\n")


def zip_named_jpg(stem: Path) -> Path:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("covid/1.png", _encode(".png", gradient_image()))
    return _write(stem.with_suffix(".jpg"), buffer.getvalue())


def heic_photo_named_jpg(stem: Path) -> Path:
    """An iPhone photo: an ISO-BMFF 'ftyp' box with the HEIC brand."""
    head = struct.pack(">I", 24) + b"ftypheic" + b"\x00" * 4 + b"mif1heic" + bytes(range(256)) * 4
    return _write(stem.with_suffix(".jpg"), head)


def png_16bit(stem: Path) -> Path:
    values = np.linspace(200, 3900, 64 * 48).reshape(64, 48).astype(np.uint16)  # 12-bit detector values
    return write_raster(stem.with_suffix(".png"), values)


def rgba_png(stem: Path) -> Path:
    """A screenshot: RGBA with a see-through alpha channel."""
    return write_raster(stem.with_suffix(".png"), np.dstack([_colour(), gradient_image(96, 80, seed=3)]))


def palette_png(stem: Path) -> Path:
    rgb = cv2.cvtColor(_colour(), cv2.COLOR_BGR2RGB)
    path = stem.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    _pil().fromarray(rgb).quantize(colors=16).save(path)
    return path


def cmyk_jpeg(stem: Path) -> Path:
    rgb = cv2.cvtColor(_colour(), cv2.COLOR_BGR2RGB)
    path = stem.with_suffix(".jpeg")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _pil().fromarray(rgb).convert("CMYK").save(path, "JPEG", quality=95)
    except OSError as exc:  # a Pillow built without CMYK JPEG support
        pytest.skip(f"this Pillow cannot write a CMYK JPEG: {exc}")
    return path


def png_named_jpg(stem: Path) -> Path:
    return _write(stem.with_suffix(".jpg"), _encode(".png", gradient_image(90, 70)))


@lru_cache(maxsize=None)
def _png_bomb_bytes(width: int = 20_000, height: int = 20_000) -> bytes:
    """A real, valid 8-bit gray PNG of ``width`` x ``height`` black pixels: 400 MB of pixels in ~400 KB.

    Written chunk by chunk: the test never holds the image itself.
    """
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor = zlib.compressobj(9)
    rows = (b"\x00" * (width + 1)) * 100  # filter byte + a black row, 100 rows at a time
    body = b"".join(compressor.compress(rows) for _ in range(height // 100)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def png_20000x20000(stem: Path) -> Path:
    return _write(stem.with_suffix(".png"), _png_bomb_bytes())


def jpeg_20000x20000(stem: Path) -> Path:
    """A small real JPEG whose frame header says 20000x20000 (what a crafted bomb looks like)."""
    data = bytearray(_encode(".jpg", gradient_image(40, 40)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = struct.pack(">HH", 20_000, 20_000)
    return _write(stem.with_suffix(".jpeg"), bytes(data))


def dicom_20000x20000(stem: Path) -> Path:
    path = write_dicom(stem.with_suffix(".dcm"), gradient_image(64, 64))
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 20_000  # the pixel data stays 64x64: only the header claims the size
    ds.save_as(path, enforce_file_format=True)
    return path


def one_by_one_png(stem: Path) -> Path:
    return write_raster(stem.with_suffix(".png"), np.full((1, 1), 128, np.uint8))


def dicom_without_pixel_data(stem: Path) -> Path:
    return write_dicom(stem.with_suffix(".dcm"), gradient_image(64, 64), with_pixels=False)


def dicom_without_rows(stem: Path) -> Path:
    """A DICOM whose Rows element is gone (a damaged tag: found by a review; ``ood.image_facts`` raised TypeError)."""
    path = write_dicom(stem.with_suffix(".dcm"), gradient_image(64, 64))
    ds = pydicom.dcmread(path)
    del ds.Rows
    ds.save_as(path, enforce_file_format=True)
    return path


#: The compressed transfer syntax of the catalogue; no decoder is installed for it by default
#: (the test hides one if a machine has it: see :func:`hide_jpeg_lossless_decoder`).
UNDECODABLE_SYNTAX = uid.JPEGLosslessSV1


def dicom_jpeg_lossless_without_decoder(stem: Path) -> Path:
    path = write_dicom(stem.with_suffix(".dcm"), gradient_image(64, 64))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = UNDECODABLE_SYNTAX
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + b"lossless JPEG codestream" * 8])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def dicom_damaged_header(stem: Path) -> Path:
    """A flipped byte in PatientSex's value representation: pydicom only notices when the element is read."""
    path = write_dicom(stem.with_suffix(".dcm"), gradient_image(64, 64))
    data = bytearray(path.read_bytes())
    at = data.index(b"\x10\x00\x40\x00CS")  # (0010,0040) PatientSex, explicit VR little endian
    data[at + 5] = ord("0")
    return _write(path, bytes(data))


def _full_range(height: int = 72, width: int = 56, seed: int = 0) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width), dtype=np.uint8)
    pixels[0, 0], pixels[-1, -1] = 0, 255
    return pixels


def dicom_monochrome1(stem: Path) -> Path:
    return write_dicom(stem.with_suffix(".dcm"), _full_range(), photometric="MONOCHROME1")


_SIGNED = np.linspace(-2000, 2000, 48 * 40).reshape(48, 40).astype(np.int16)


def dicom_signed_16bit(stem: Path) -> Path:
    return write_dicom(stem.with_suffix(".dcm"), _SIGNED, bits=16, signed=True)


def dicom_multiframe(stem: Path) -> Path:
    path = write_dicom(stem.with_suffix(".dcm"), _full_range(seed=2))
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 3
    ds.PixelData = np.stack([_full_range(seed=2), 255 - _full_range(seed=3), _full_range(seed=4)]).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


# ============================================================================================
# What each file must read as, when xraylib accepts it


def _gray_of(colour_bgr: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(colour_bgr, cv2.COLOR_BGR2GRAY)


def check_png_16bit(pixels: np.ndarray, path: Path) -> None:
    assert (pixels.min(), pixels.max()) == (0, 255)  # scaled to the full range, not divided by 256
    assert np.all(np.diff(pixels.ravel().astype(int)) >= 0)  # the order of intensities is kept


def check_rgba_png(pixels: np.ndarray, path: Path) -> None:
    np.testing.assert_array_equal(pixels, _gray_of(_colour()))  # alpha ignored


def check_palette_png(pixels: np.ndarray, path: Path) -> None:
    with _pil().open(path) as opened:
        expected = cv2.cvtColor(np.asarray(opened.convert("RGB")), cv2.COLOR_RGB2GRAY)
    np.testing.assert_array_equal(pixels, expected)


def check_cmyk_jpeg(pixels: np.ndarray, path: Path) -> None:
    with _pil().open(path) as opened:
        assert opened.mode == "CMYK"
        expected = cv2.cvtColor(np.asarray(opened.convert("RGB")), cv2.COLOR_RGB2GRAY)
    assert np.abs(pixels.astype(int) - expected).max() <= 2  # not inverted, not channel-swapped


def check_png_named_jpg(pixels: np.ndarray, path: Path) -> None:
    np.testing.assert_array_equal(pixels, gradient_image(90, 70))  # read as the PNG it is: lossless


def check_monochrome1(pixels: np.ndarray, path: Path) -> None:
    np.testing.assert_array_equal(pixels, 255 - _full_range())  # a high stored value is dark


def check_signed_16bit(pixels: np.ndarray, path: Path) -> None:
    expected = (_SIGNED.astype(np.float64) + 2000) * 255 / 4000  # -2000 black, +2000 white
    assert np.abs(pixels - expected).max() <= 0.5 + 1e-9


def check_multiframe(pixels: np.ndarray, path: Path) -> None:
    np.testing.assert_array_equal(pixels, _full_range(seed=2))  # the first frame


# ============================================================================================
# The catalogue


@dataclass(frozen=True)
class FileCase:
    """One catalogue entry: ``write(stem)`` writes the file (choosing its suffix) and returns its path.

    Refused files list the ``words`` their message holds; accepted ones have a pixel ``check``.
    ``header_only``: refused from the header alone, without decoding any pixel.
    ``refused_by_manifest``: bulk manifest building (which reads headers, not pixels) refuses it too.
    """

    id: str
    write: Callable[[Path], Path]
    words: tuple[str, ...] = ()
    check: Callable[[np.ndarray, Path], None] | None = None
    header_only: bool = False
    refused_by_manifest: bool = True

    @property
    def refused(self) -> bool:
        return self.check is None


FILE_CASES = [
    FileCase("empty-file", empty_file, ("empty file",), header_only=True),
    FileCase("truncated-jpeg", truncated_jpeg, ("truncated JPEG", "cut short"), header_only=True),
    FileCase("truncated-png", truncated_png, ("truncated PNG", "cut short"), header_only=True),
    FileCase("text-named-jpg", text_named_jpg, ("a text file", "not a PNG, JPEG or DICOM"), header_only=True),
    FileCase("html-page-named-png", html_error_page_named_png, ("a text file",), header_only=True),
    FileCase("zip-named-jpg", zip_named_jpg, ("a ZIP archive", "not a PNG, JPEG or DICOM"), header_only=True),
    FileCase("heic-named-jpg", heic_photo_named_jpg, ("HEIC", "export it as JPEG or PNG"), header_only=True),
    FileCase("png-16bit", png_16bit, check=check_png_16bit),
    FileCase("png-rgba", rgba_png, check=check_rgba_png),
    FileCase("png-palette", palette_png, check=check_palette_png),
    FileCase("jpeg-cmyk", cmyk_jpeg, check=check_cmyk_jpeg),
    FileCase("png-named-jpg", png_named_jpg, check=check_png_named_jpg),
    FileCase("png-20000x20000", png_20000x20000, ("20000x20000", "decompression-bomb"), header_only=True),
    FileCase("jpeg-20000x20000", jpeg_20000x20000, ("20000x20000", "decompression-bomb"), header_only=True),
    FileCase("dicom-20000x20000", dicom_20000x20000, ("20000x20000", "decompression-bomb"), header_only=True),
    FileCase("png-1x1", one_by_one_png, ("1x1 pixels", "smaller than 32x32"), header_only=True),
    FileCase("dicom-no-pixel-data", dicom_without_pixel_data, ("no pixel data",), header_only=True),
    FileCase("dicom-no-rows", dicom_without_rows, ("damaged DICOM header", "no image size"), header_only=True),
    FileCase("dicom-compressed-no-decoder", dicom_jpeg_lossless_without_decoder,
             ("JPEG Lossless", "install a decoder", "pip install pylibjpeg pylibjpeg-libjpeg"), header_only=True),
    FileCase("dicom-damaged-header", dicom_damaged_header, ("damaged DICOM header", "(0010,0040)"), header_only=True),
    FileCase("dicom-monochrome1", dicom_monochrome1, check=check_monochrome1),
    FileCase("dicom-signed-16bit", dicom_signed_16bit, check=check_signed_16bit),
    FileCase("dicom-multiframe", dicom_multiframe, check=check_multiframe),
]


@pytest.fixture(autouse=True)
def hide_jpeg_lossless_decoder(monkeypatch):
    """Make sure no plugin decodes :data:`UNDECODABLE_SYNTAX`, as on a fresh Colab runtime."""
    decoder = pydicom.pixels.get_decoder(UNDECODABLE_SYNTAX)
    if decoder.is_available:
        if not isinstance(getattr(decoder, "_available", None), dict):
            pytest.skip(f"a decoder for {UNDECODABLE_SYNTAX.name} is installed and this pydicom's cannot be hidden")
        monkeypatch.setattr(decoder, "_available", {})
    assert not decoder.is_available


@pytest.fixture
def forbid_decoding(monkeypatch):
    """``forbid_decoding(path)``: decoding that file's pixels fails the test (it must be refused from its header)."""
    def forbid(path: Path) -> None:
        def guarded(original):
            def decode(data, where="<bytes>"):
                if where == str(path):
                    raise AssertionError(f"{where}: pixels were decoded; the file should be refused from its header")
                return original(data, where)
            return decode

        monkeypatch.setattr(images, "_decode_raster", guarded(images._decode_raster))
        monkeypatch.setattr(images.dicom, "decode_dicom", guarded(images.dicom.decode_dicom))

    return forbid


def _assert_message(error: BadFileError, path: Path, words: tuple[str, ...]) -> None:
    message = str(error)
    assert error.path == str(path) and message.startswith(f"{path}: "), message
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"
    assert "\n" not in message  # one line, for reports and the CLI


def _case_ids(cases) -> list[str]:
    return [c.id for c in cases]


# --------------------------------------------------------------------------------------------
# A single file: refused or read


@pytest.mark.parametrize("case", FILE_CASES, ids=_case_ids(FILE_CASES))
def test_single_file_call_refuses_or_reads_it(case: FileCase, tmp_path, forbid_decoding):
    path = case.write(tmp_path / "my_xrays" / "scan")
    if case.header_only:
        forbid_decoding(path)
    if case.refused:
        for call in (images.read_image, images.inspect_file, lambda p: preprocess.preprocess_file(p, SETTINGS)):
            with pytest.raises(BadFileError) as info:
                call(path)
            _assert_message(info.value, path, case.words)
        return
    pixels = images.read_image(path)
    assert pixels.dtype == np.uint8 and pixels.ndim == 2
    case.check(pixels, path)
    info = images.inspect_file(path)
    assert (info.height, info.width) == pixels.shape
    cached = preprocess.preprocess_file(path, SETTINGS)
    assert cached.shape == (40, 40) and cached.dtype == np.uint8
    np.testing.assert_array_equal(cached, preprocess.resize_image(pixels, 40, "pad"))


# --------------------------------------------------------------------------------------------
# Bulk work: a folder (manifest) and a manifest (preprocessing)

GOOD_KAGGLE = {
    "NORMAL": ["IM-0001-0001.jpeg", "IM-0002-0001.jpeg", "IM-0003-0001.png"],
    "PNEUMONIA": ["person1_bacteria_1.jpeg", "person2_virus_2.jpeg", "person3_bacteria_3.png"],
}


def kaggle_folder_with(case: FileCase, root: Path) -> tuple[Path, list[Path]]:
    """A Kaggle tree of six good images plus the case's file among the NORMAL ones."""
    good = []
    for k, (cls, names) in enumerate(GOOD_KAGGLE.items()):
        for i, name in enumerate(names):
            good.append(write_raster(root / "chest_xray" / "train" / cls / name, gradient_image(48, 40, seed=10 * k + i)))
    bad = case.write(root / "chest_xray" / "train" / "NORMAL" / "IM-0900-0001")
    return bad, good


@pytest.mark.parametrize("case", FILE_CASES, ids=_case_ids(FILE_CASES))
def test_bulk_manifest_skips_and_counts_it(case: FileCase, tmp_path, forbid_decoding):
    path, good = kaggle_folder_with(case, tmp_path / "chest-xray-pneumonia")
    forbid_decoding(path)  # the manifest reads headers only, whatever the file
    result = manifest.build_manifest({"chest_xray_pneumonia": tmp_path / "chest-xray-pneumonia"},
                                     task="pneumonia_vs_normal", views=None, workers=2, progress=False)
    kept = set(result.frame["path"])
    assert {str(p) for p in good} <= kept  # every good file is kept
    summary = result.report.summary()
    if case.refused and case.refused_by_manifest:
        [(where, reason)] = result.report.problems
        assert where == str(path) and str(path) not in kept
        _assert_message(BadFileError(where, reason), path, case.words)
        assert result.report.per_source["kaggle"]["excluded"] == {"unreadable file": 1}
        assert result.report.per_source["kaggle"]["kept"] == len(good)
        assert "skipped 1 unreadable or missing file(s)" in summary and f"{path}: {reason}" in summary
    else:
        assert result.report.problems == [] and str(path) in kept
        assert "skipped" not in summary and result.report.per_source["kaggle"]["kept"] == len(good) + 1


def split_manifest_with(case: FileCase, root: Path) -> tuple[Path, pd.DataFrame]:
    """Seven rows, one patient each: the case's file in train, two good files in each split."""
    rows = []
    bad = case.write(root / "train-bad")
    for i, split in enumerate(["train", "train", "val", "val", "test", "test"]):
        path = write_raster(root / f"{split}-{i}.png", gradient_image(56, 48, seed=i))
        rows.append((path, split))
    rows.insert(1, (bad, "train"))
    return bad, pd.DataFrame([
        {"path": str(p), "label": ("normal", "covid")[i % 2], "source": "ieee8023",
         "patient_id": f"ieee8023:{i}", "sha1": sha1_file(p), "split": split}
        for i, (p, split) in enumerate(rows)
    ])


@pytest.mark.parametrize("case", FILE_CASES, ids=_case_ids(FILE_CASES))
def test_bulk_preprocessing_skips_and_counts_it(case: FileCase, tmp_path, forbid_decoding):
    path, rows = split_manifest_with(case, tmp_path / "src")
    if case.header_only:
        forbid_decoding(path)
    data = preprocess.preprocess_dataset(rows, tmp_path / "cache", ("normal", "covid"), SETTINGS, workers=1, progress=False)
    kept = set(data.manifest["path"])
    assert set(rows["path"]) - {str(path)} <= kept
    if case.refused:
        [problem] = data.report["problems"]
        assert problem["path"] == str(path) and str(path) not in kept
        _assert_message(BadFileError(problem["path"], problem["reason"]), path, case.words)
        assert data.report["skipped"] == 1 and data.report["new"] == 6
        assert {name: len(s) for name, s in data.splits.items()} == {"train": 2, "val": 2, "test": 2}
    else:
        assert data.report["problems"] == [] and data.report["skipped"] == 0 and data.report["new"] == 7
        row = data["train"].manifest.index[data["train"].manifest["path"] == str(path)].item()
        np.testing.assert_array_equal(data["train"].images[row], preprocess.preprocess_file(path, SETTINGS))


def test_unreadable_files_in_a_kaggle_folder_do_not_stop_the_build_or_shift_rows(tmp_path):
    """All the refused entries at once in one folder: every one named, the good ones all kept."""
    root = tmp_path / "chest-xray-pneumonia"
    refused = [c for c in FILE_CASES if c.refused and c.refused_by_manifest]
    paths = {c.id: c.write(root / "chest_xray" / "test" / "NORMAL" / f"IM-{900 + i:04d}-0001") for i, c in enumerate(refused)}
    _, good = kaggle_folder_with(FILE_CASES[-1], root)
    result = manifest.build_manifest({"chest_xray_pneumonia": root}, task="pneumonia_vs_normal", views=None,
                                     workers=4, progress=False)
    reasons = dict(result.report.problems)
    assert set(reasons) == {str(p) for p in paths.values()}
    for case in refused:
        _assert_message(BadFileError(str(paths[case.id]), reasons[str(paths[case.id])]), paths[case.id], case.words)
    assert result.report.per_source["kaggle"]["kept"] == len(good) + 1  # + the accepted multi-frame DICOM
    assert f"skipped {len(refused)} unreadable or missing file(s)" in result.report.summary()


# ============================================================================================
# ieee8023 metadata.csv


BASE_ROWS = [
    IeeeRow("1", "COVID-19", "PA", "covid-1-pa.png", sex="F", age="71"),
    IeeeRow("1", "COVID-19", "AP", "covid-1-day3-ap.jpg", sex="F", age="71"),
    IeeeRow("2", "No Finding", "PA", "normal-2-pa.png"),
    IeeeRow("3", "COVID-19", "AP Supine", "covid-3-ap-supine.jpeg"),
]


@dataclass(frozen=True)
class TableCase:
    """A metadata.csv entry: extra rows and CSV options; the expected exclusions and problems, or a refusal."""

    id: str
    extra_rows: tuple[IeeeRow, ...] = ()
    csv_options: dict = field(default_factory=dict)
    excluded: dict = field(default_factory=dict)
    missing_files: tuple[str, ...] = ()
    duplicates: int = 0
    refused_words: tuple[str, ...] = ()
    raw_csv: bytes | None = None
    not_compared: tuple[str, ...] = ()  # manifest columns that legitimately differ from the plain table's
    modality: str | None = None  # written in every row instead of "X-ray"
    edit: Callable[[bytes], bytes] | None = None  # applied to the written metadata.csv
    outside: tuple[tuple[str, str], ...] = ()  # (folder, filename) of rows naming a file outside the source folder


def _extra_field(line: int) -> Callable[[bytes], bytes]:
    """An edit giving line ``line`` (1: the header) of metadata.csv one field too many."""
    def edit(data: bytes) -> bytes:
        lines = data.split(b"\n")
        lines[line - 1] += b",Ho Chi Minh City"
        return b"\n".join(lines)
    return edit


TABLE_CASES = [
    TableCase("missing-column-finding", csv_options={"drop_columns": ("finding",)},
              refused_words=("metadata.csv", "missing column", "'finding'", "ieee8023 metadata")),
    TableCase("missing-column-filename", csv_options={"drop_columns": ("filename", "folder")},
              refused_words=("metadata.csv", "missing column", "'folder'", "'filename'")),
    TableCase("extra-columns", csv_options={"extra_columns": {"ct_scan": "no", "finding_detail": "x", "Unnamed: 30": "9"}}),
    TableCase("duplicate-column", csv_options={"extra_columns": {"patientid ": "9"}},
              refused_words=("metadata.csv", "['patientid'] appear more than once")),
    TableCase("unknown-findings", extra_rows=(IeeeRow("4", "Tuberculosis", "PA", "tb-4-pa.png"),
                                              IeeeRow("5", "todo", "PA", "todo-5-pa.png"),
                                              IeeeRow("6", "", "PA", "blank-6-pa.png")),
              excluded={"finding not used: Tuberculosis": 1, "finding not used: todo": 1, "no finding recorded": 1}),
    TableCase("rows-whose-image-is-missing", extra_rows=(IeeeRow("7", "COVID-19", "PA", "covid-7-pa.png", write_image=False),
                                                         IeeeRow("8", "No Finding", "AP", "normal-8.jpg", write_image=False)),
              missing_files=("covid-7-pa.png", "normal-8.jpg")),
    TableCase("windows-line-endings", csv_options={"crlf": True}),
    TableCase("byte-order-mark", csv_options={"bom": True}),
    TableCase("bom-crlf-and-cp1252-notes", extra_rows=(IeeeRow("9", "COVID-19", "PA", "covid-9.png",
                                                               clinical_notes="fièvre, toux; SpO2 à 88 %"),),
              csv_options={"bom": True, "crlf": True, "encoding": "cp1252"}),
    TableCase("no-modality-recorded", modality="", not_compared=("modality",)),
    TableCase("ct-and-lateral-rows", extra_rows=(IeeeRow("10", "COVID-19", "Axial", "covid-10-ct.png", modality="CT"),
                                                 IeeeRow("11", "COVID-19", "Coronal", "covid-11-ct.png", modality="CT"),
                                                 IeeeRow("1", "COVID-19", "L", "covid-1-l.png")),
              excluded={"view Axial": 1, "view Coronal": 1, "view L": 1}),
    TableCase("two-rows-name-one-file", extra_rows=(IeeeRow("1", "COVID-19", "PA", "covid-1-pa.png", write_image=False),),
              duplicates=1),
    TableCase("empty-metadata-file", raw_csv=b"", refused_words=("metadata.csv", "cannot be read as CSV")),
    TableCase("not-a-csv", raw_csv=b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)),
              refused_words=("metadata.csv", "cannot be read as CSV", "NUL bytes", "save it as CSV in UTF-8")),
    # Before the fix pandas made column 1 the index, every column shifted by one: "no images left after filtering".
    TableCase("extra-field-in-first-row", edit=_extra_field(2),
              refused_words=("metadata.csv", "line 2 has 30 fields, the header has 29", "ieee8023 metadata", "quotes")),
    TableCase("extra-field-in-a-later-row", edit=_extra_field(4),
              refused_words=("metadata.csv", "line 4 has 30 fields, the header has 29", "fix that line")),
    TableCase("duplicate-finding-column", csv_options={"extra_columns": {"finding": "COVID-19"}},
              refused_words=("metadata.csv", "['finding'] appear more than once", "keep one of each")),
    TableCase("path-outside-the-source-folder",  # {base}: the folder that holds the source folder, an absolute path
              extra_rows=(IeeeRow("12", "COVID-19", "PA", "../../secret.png", write_image=False),
                          IeeeRow("13", "No Finding", "PA", "{base}/secret.png", write_image=False),
                          IeeeRow("14", "COVID-19", "PA", "secret.png", folder="images/../..", write_image=False)),
              outside=(("images", "../../secret.png"), ("images", "{base}/secret.png"), ("images/../..", "secret.png"))),
    TableCase("utf-16-with-bom", csv_options={"encoding": "utf-16"}),  # Excel's and Notepad's "Unicode"
    TableCase("utf-16-without-bom", csv_options={"encoding": "utf-16-be"}),
]


def _ieee_root(case: TableCase, base: Path) -> Path:
    root = base / "covid-chestxray-dataset"
    options = dict(case.csv_options)
    drop = options.pop("drop_columns", ())
    rows = BASE_ROWS + list(case.extra_rows)
    if case.modality is not None:
        rows = [dataclasses.replace(row, modality=case.modality) for row in rows]
    if case.outside:
        rows = [dataclasses.replace(row, filename=row.filename.format(base=base)) for row in rows]
        write_raster(base / "secret.png", gradient_image(72, 64, seed=7))  # a real image, where the rows point
    make_ieee8023(root, rows, drop_columns=drop, **options)
    if case.raw_csv is not None:
        (root / "metadata.csv").write_bytes(case.raw_csv)
    if case.edit is not None:
        (root / "metadata.csv").write_bytes(case.edit((root / "metadata.csv").read_bytes()))
    return root


def _base_rows(frame: pd.DataFrame, not_compared: tuple[str, ...] = ()) -> pd.DataFrame:
    """The manifest rows of :data:`BASE_ROWS`, without the columns that depend on where the folder is."""
    rows = frame[frame["image_id"].isin([r.filename for r in BASE_ROWS])].sort_values("image_id")
    rows = rows.drop(columns=["path", *not_compared]).reset_index(drop=True)
    return rows.astype(object).where(rows.notna(), None)


@pytest.mark.parametrize("case", TABLE_CASES, ids=_case_ids(TABLE_CASES))
def test_metadata_csv_catalogue(case: TableCase, tmp_path):
    root = _ieee_root(case, tmp_path / "drive")
    opened = []

    def opener(path, mode):
        opened.append(path)
        return open(path, mode)

    build = lambda: manifest.build_manifest({"covid_chestxray_dataset": root}, progress=False, workers=2,  # noqa: E731
                                            opener=opener)
    if case.refused_words:
        with pytest.raises(SourceError) as info:
            build()
        message = str(info.value)
        assert message.startswith(str(root / "metadata.csv")) and "\n" not in message, message
        for word in case.refused_words:
            assert word.lower() in message.lower(), message
        return
    result = build()
    source = result.report.per_source["ieee8023"]
    summary = result.report.summary()
    # The four good rows are always kept, with the same facts whatever the CSV's spelling.
    baseline = manifest.build_manifest({"covid_chestxray_dataset": _ieee_root(TableCase("base"), tmp_path / "base")},
                                       progress=False, workers=2)
    pd.testing.assert_frame_equal(_base_rows(result.frame, case.not_compared), _base_rows(baseline.frame, case.not_compared))
    extra_kept = [r for r in case.extra_rows if r.write_image and not any(f"view {r.view}" == k for k in case.excluded)
                  and r.finding in ("COVID-19", "No Finding")]
    assert source["kept"] == len(BASE_ROWS) + len(extra_kept)
    excluded = {k: v for k, v in source["excluded"].items() if not k.startswith("duplicate")}
    assert excluded == case.excluded
    for reason, count in case.excluded.items():
        assert f"left out {count}: {reason}" in summary
    missing = [str(root / "images" / name) for name in case.missing_files]
    outside = [str(root / folder / name.format(base=tmp_path / "drive")) for folder, name in case.outside]
    assert [p for p, _ in result.report.problems] == missing + outside
    reasons = [r for _, r in result.report.problems]
    assert all(r == "image file named in metadata.csv is missing" for r in reasons[:len(missing)])
    for (path, reason), row in zip(result.report.problems[len(missing):], case.extra_rows):
        assert f"row {len(BASE_ROWS) + case.extra_rows.index(row) + 1} of metadata.csv names a file outside {root}" in reason
        assert reason.endswith("row left out, the file not read") and "\n" not in reason
    assert all(Path(p).resolve().is_relative_to(root.resolve()) for p in opened)  # nothing outside is ever opened
    if missing or outside:
        assert f"skipped {len(missing) + len(outside)} unreadable or missing file(s)" in summary
        assert all(p in summary for p in missing + outside)
    assert len(result.report.duplicates) == case.duplicates
    if case.duplicates:
        assert f"dropped {case.duplicates} duplicate image(s)" in summary


def test_missing_columns_stop_the_build_even_beside_good_sources(tmp_path):
    """A label table without its columns cannot be half-used: the build stops, naming the file and columns."""
    ieee = _ieee_root(TABLE_CASES[0], tmp_path / "drive")
    kaggle = tmp_path / "drive" / "chest-xray-pneumonia"
    kaggle_folder_with(FILE_CASES[7], kaggle)
    with pytest.raises(SourceError, match=re.escape(str(ieee / "metadata.csv"))):
        manifest.build_manifest({"covid_chestxray_dataset": ieee, "chest_xray_pneumonia": kaggle}, progress=False)


# ============================================================================================
# RSNA label CSVs

RSNA_WITH_FILES = [
    RsnaPatient("00436515-870c-4b36-a041-de91049b9ab4", "Lung Opacity",
                [(264.0, 152.0, 213.0, 379.0), (562.0, 152.0, 256.0, 453.0), (300.0, 500.0, 90.0, 80.0)]),
    RsnaPatient("00704310-78a8-4b38-8475-49f4573b2dbb", "Lung Opacity", [(323.0, 577.0, 160.0, 104.0)] * 2, view="AP"),
    RsnaPatient("003d8fa0-6bf1-40ed-b54c-ac657f8495c5", "Normal"),
    RsnaPatient("00569f44-917d-4c86-a842-81832af98c30", "Normal", view="AP"),
]
RSNA_WITHOUT_FILES = [
    RsnaPatient("0100515c-5204-4f31-98e0-f35e4b00004a", "Normal", write_file=False),
    RsnaPatient("010ccb9f-6d46-4380-af11-84f87397a1b8", "Lung Opacity", [(1.0, 2.0, 3.0, 4.0)] * 4, write_file=False),
    RsnaPatient("01027bc3-dc40-4165-a6c3-d6be2cb7ca34", "Lung Opacity", write_file=False),
]


def test_rsna_several_rows_per_patient_give_one_image_per_patient(tmp_path):
    root = make_rsna(tmp_path / "rsna-pneumonia", RSNA_WITH_FILES)
    assert len(pd.read_csv(root / "stage_2_train_labels.csv")) == 3 + 2 + 1 + 1  # one row per box
    result = manifest.build_manifest({"rsna_pneumonia": root}, task="pneumonia_vs_normal", progress=False)
    frame = result.frame
    assert len(frame) == 4 and frame["patient_id"].is_unique
    assert frame.groupby("label").size().to_dict() == {"normal": 2, "pneumonia": 2}
    assert result.report.problems == [] and result.report.duplicates == []


def test_rsna_patient_ids_without_a_file_are_counted_in_the_summary(tmp_path):
    root = make_rsna(tmp_path / "rsna-pneumonia", RSNA_WITH_FILES + RSNA_WITHOUT_FILES)
    result = manifest.build_manifest({"rsna_pneumonia": root}, task="pneumonia_vs_normal", progress=False)
    assert len(result.frame) == 4  # the patients with a file are all kept
    folder = root / "stage_2_train_images"
    assert result.report.problems == [(str(folder), "3 labelled patientIds have no DICOM file")]
    assert f"{folder}: 3 labelled patientIds have no DICOM file" in result.report.summary()


# ============================================================================================
# Transient I/O errors (Google Drive's FUSE mount), with a fault-injecting opener

ALWAYS = -1


class FlakyOpener:
    """``opener(path, mode)`` that fails with EIO the first ``failures[name]`` times a file is opened.

    ``ALWAYS`` fails every time. The counts are kept in files under ``state_dir``, so that every
    reader (the threads of the manifest and of preprocessing) sees them; it pickles as a plain object.
    """

    def __init__(self, state_dir: Path, failures: dict[str, int]):
        self.state_dir, self.failures = Path(state_dir), dict(failures)
        self.state_dir.mkdir(parents=True, exist_ok=True)

    def opened(self, name: str) -> int:
        counter = self.state_dir / f"{name}.count"
        return int(counter.read_text()) if counter.exists() else 0

    def __call__(self, path: str, mode: str = "rb"):
        name = Path(path).name
        count = self.opened(name)
        (self.state_dir / f"{name}.count").write_text(str(count + 1))
        wanted = self.failures.get(name, 0)
        if wanted == ALWAYS or count < wanted:
            raise OSError(errno.EIO, "Input/output error", path)
        return open(path, mode)


def test_transient_errors_of_a_single_file_are_retried_then_reported(tmp_path):
    good = write_raster(tmp_path / "a.png", gradient_image(48, 40))
    broken = write_raster(tmp_path / "b.png", gradient_image(48, 40, seed=1))
    opener = FlakyOpener(tmp_path / "state", {"a.png": 3, "b.png": ALWAYS})  # 3 failures: within the 3 retries
    np.testing.assert_array_equal(images.read_image(good, opener=opener), gradient_image(48, 40))
    assert opener.opened("a.png") == 4
    with pytest.raises(BadFileError) as info:
        images.read_image(broken, opener=opener)
    _assert_message(info.value, broken, ("read failed after 4 tries", "Input/output error"))
    assert opener.opened("b.png") == 4  # bounded: 1 try and 3 retries


def test_manifest_reads_through_transient_errors_and_skips_a_file_that_keeps_failing(tmp_path):
    root = tmp_path / "chest-xray-pneumonia"
    _, good = kaggle_folder_with(FILE_CASES[7], root)  # six good files and a 16-bit PNG
    flaky, dead = good[0], good[4]
    opener = FlakyOpener(tmp_path / "state", {flaky.name: 2, dead.name: ALWAYS})
    result = manifest.build_manifest({"chest_xray_pneumonia": root}, task="pneumonia_vs_normal", views=None,
                                     workers=4, progress=False, opener=opener)
    assert str(flaky) in set(result.frame["path"]) and opener.opened(flaky.name) == 3
    [(where, reason)] = result.report.problems
    assert where == str(dead) and "read failed after 4 tries: Input/output error" in reason
    assert result.report.per_source["kaggle"]["kept"] == 6  # everything else
    assert "skipped 1 unreadable or missing file(s)" in result.report.summary()


@pytest.mark.parametrize("workers", [1, 2], ids=["in-process", "two-worker-threads"])
def test_preprocessing_reads_through_transient_errors_and_skips_a_file_that_keeps_failing(tmp_path, workers):
    rows = []
    for i in range(36):  # a train split of 34, several files per decoding thread
        split = "train" if i < 34 else ("val", "test")[i - 34]
        path = write_raster(tmp_path / "src" / f"img-{i:02d}.png", gradient_image(40, 40, seed=i))
        rows.append({"path": str(path), "label": ("normal", "covid")[i % 2], "source": "ieee8023",
                     "patient_id": f"ieee8023:{i}", "sha1": sha1_file(path), "split": split})
    frame = pd.DataFrame(rows)
    opener = FlakyOpener(tmp_path / "state", {"img-03.png": 1, "img-20.png": 3, "img-07.png": ALWAYS})
    data = preprocess.preprocess_dataset(frame, tmp_path / "cache", ("normal", "covid"), SETTINGS, workers=workers,
                                         progress=False, opener=opener)
    [problem] = data.report["problems"]
    assert problem["path"].endswith("img-07.png") and "read failed after 4 tries: Input/output error" in problem["reason"]
    assert data.report["skipped"] == 1 and len(data["train"]) == 33 and data.report["new"] == 35
    assert (opener.opened("img-03.png"), opener.opened("img-20.png"), opener.opened("img-07.png")) == (2, 4, 4)
    for name in ("img-03.png", "img-20.png"):
        row = data["train"].manifest.index[data["train"].manifest["path"].str.endswith(name)].item()
        np.testing.assert_array_equal(data["train"].images[row],
                                      preprocess.preprocess_file(tmp_path / "src" / name, SETTINGS))


# ============================================================================================
# The table in tests/BAD_INPUTS.md


def test_the_catalogue_table_lists_every_entry():
    text = CATALOGUE_TABLE.read_text(encoding="utf-8")
    listed = set(re.findall(r"`([a-z0-9-]+)`", text))
    ids = set(_case_ids(FILE_CASES)) | set(_case_ids(TABLE_CASES))
    assert ids <= listed, f"add to {CATALOGUE_TABLE.name}: {sorted(ids - listed)}"
    for name in ("test_single_file_call_refuses_or_reads_it", "test_bulk_manifest_skips_and_counts_it",
                 "test_bulk_preprocessing_skips_and_counts_it", "test_metadata_csv_catalogue",
                 "test_rsna_several_rows_per_patient_give_one_image_per_patient",
                 "test_rsna_patient_ids_without_a_file_are_counted_in_the_summary"):
        assert name in text


# ============================================================================================
# Google Drive not mounted (docs/TROUBLESHOOTING.md)


@pytest.fixture
def unmounted_drive(tmp_path, monkeypatch) -> Path:
    """A stand-in for /content/drive that is not a mount point, as before ``drive.mount``."""
    mount = tmp_path / "content" / "drive"
    monkeypatch.setattr(config, "DRIVE_MOUNT", mount)
    return mount


def test_paths_on_an_unmounted_drive_say_how_to_mount_it(unmounted_drive, tmp_path):
    yaml_on_drive = unmounted_drive / "MyDrive" / "xraylib" / "drive_paths.yaml"
    with pytest.raises(ConfigError) as info:
        config.load_drive_paths(yaml_on_drive)
    assert str(info.value).startswith(f"{yaml_on_drive}: file not found. Is Google Drive mounted?")
    assert "drive.mount(" in str(info.value)

    sources_on_drive = config.DrivePaths(output_dir=tmp_path / "out",
                                         covid_chestxray_dataset=unmounted_drive / "MyDrive" / "covid")
    with pytest.raises(ConfigError, match=r"covid_chestxray_dataset: folder not found: .*Is Google Drive mounted\?"):
        sources_on_drive.check_sources_exist()

    # Outputs on an unmounted Drive would land on the runtime's own disk and be lost: refused.
    (tmp_path / "covid").mkdir()
    outputs_on_drive = config.DrivePaths(output_dir=unmounted_drive / "MyDrive" / "outputs",
                                         covid_chestxray_dataset=tmp_path / "covid")
    with pytest.raises(ConfigError, match="is on Google Drive, which is not mounted: outputs written now would be lost"):
        outputs_on_drive.check_sources_exist()
    assert not unmounted_drive.exists()  # nothing was created where Drive should be

    with pytest.raises(ConfigError, match="Is Google Drive mounted"):
        config.resolve_paths(str(unmounted_drive / "MyDrive" / "datasets"), output_dir=tmp_path / "out")


def test_a_wrong_path_on_a_mounted_drive_has_no_mount_hint(unmounted_drive, tmp_path, monkeypatch):
    monkeypatch.setattr(config.os.path, "ismount", lambda path: Path(path) == unmounted_drive)
    (unmounted_drive / "MyDrive").mkdir(parents=True)
    paths = config.DrivePaths(output_dir=unmounted_drive / "MyDrive" / "outputs",
                              covid_chestxray_dataset=unmounted_drive / "MyDrive" / "Covid")
    with pytest.raises(ConfigError) as info:
        paths.check_sources_exist()
    assert "folder not found" in str(info.value) and "Is Google Drive mounted" not in str(info.value)
    paths = dataclasses.replace(paths, covid_chestxray_dataset=unmounted_drive / "MyDrive")
    paths.check_sources_exist()  # sources there and Drive mounted: fine
