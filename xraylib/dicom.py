"""Read DICOM chest radiographs with pydicom into xraylib's array convention.

The order follows the DICOM standard's display pipeline: modality LUT (RescaleSlope /
RescaleIntercept), then VOI LUT or windowing (WindowCenter / WindowWidth), then a min-max scale
to 8 bits, then MONOCHROME1 inversion (255 - x: in MONOCHROME1 a high value is dark). Plain
8-bit pixels with no LUTs are kept as stored, exactly as a PNG of the same pixels would be.
pydicom does the LUT work; we do not re-implement it.
"""
from __future__ import annotations

import io
import re
import struct
import warnings
import zlib
from dataclasses import dataclass, field, replace

import cv2
import numpy as np
import pydicom
from pydicom.encaps import generate_frames
from pydicom.dataset import FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _at_pixel_data, _read_file_meta_info, read_preamble
from pydicom.filereader import read_dataset as read_dataset_body
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from .errors import BadFileError

#: What to install for transfer syntaxes that pydicom cannot decode on its own.
_PLUGIN_HINTS = {
    "JPEG 2000": "pip install pylibjpeg pylibjpeg-openjpeg",
    "JPEG-LS": "pip install pylibjpeg pyjpegls",
    "JPEG": "pip install pylibjpeg pylibjpeg-libjpeg",
    "RLE": "pip install pylibjpeg pylibjpeg-rle",
    "HTJ2K": "pip install pylibjpeg pylibjpeg-openjpeg",
}


#: The pixel-count limit a deflated dataset is inflated for, unless the caller gives its own
#: (:data:`xraylib.images.MAX_PIXELS`, passed down by :mod:`xraylib.images`).
DEFAULT_MAX_PIXELS = 60_000_000

#: JPEG Baseline (Process 1): the compression of the RSNA challenge's DICOMs.
JPEG_BASELINE_UID = "1.2.840.10008.1.2.4.50"

#: Elements that change how stored pixel values map to display values.
_LUT_KEYWORDS = ("RescaleSlope", "RescaleIntercept", "ModalityLUTSequence", "WindowCenter", "VOILUTSequence")


@dataclass(frozen=True)
class DicomHeader:
    """The header fields the manifest and the audit use. Missing fields are ``None``."""

    patient_id: str | None
    sex: str | None
    age: float | None
    view: str | None
    modality: str | None
    body_part: str | None
    rows: int | None
    columns: int | None
    bits_stored: int | None
    photometric: str | None
    frames: int
    has_pixels: bool
    transfer_syntax: str | None
    transfer_syntax_uid: str | None = None


def parse_age(value: object) -> float | None:
    """DICOM ``PatientAge`` ("043Y", "6M", or RSNA's plain "43") in years; None when absent or unparsable."""
    if value is None:
        return None
    text = str(value).strip().upper()
    if not text:
        return None
    unit = text[-1] if text[-1] in "YMWD" else "Y"
    digits = text[:-1] if text[-1] in "YMWD" else text
    try:
        number = float(digits)
    except ValueError:
        return None
    years = number / {"Y": 1, "M": 12, "W": 52.1775, "D": 365.25}[unit]
    return years if 0 <= years < 130 else None


# Real files break small VR rules (RSNA writes PatientAge "43", not "043Y"), and pydicom warns about each as
# it converts the element; xraylib parses leniently and reports what matters itself. One narrow filter,
# installed once: pydicom's UserWarnings only. (Switching the process-wide filters per call, as
# warnings.catch_warnings does, is not safe with decoding threads and would hide other code's warnings.)
warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")


def _read_dataset(data: bytes, path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> pydicom.Dataset:
    try:
        fp = io.BytesIO(data)
        preamble = read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        if meta.get("TransferSyntaxUID") == DEFLATED_UID:
            return _read_deflated(data[fp.tell():], preamble, meta, path, max_pixels)
        return pydicom.dcmread(io.BytesIO(data), force=False)
    except InvalidDicomError:
        raise BadFileError(path, "not a DICOM file (no 'DICM' marker)") from None
    except BadFileError:
        raise
    except Exception as exc:  # pydicom raises many types for damaged files
        raise BadFileError(path, f"damaged DICOM file ({type(exc).__name__}: {exc})") from None


#: The Deflated Explicit VR Little Endian transfer syntax: the whole dataset after the file meta is zlib-deflated.
DEFLATED_UID = "1.2.840.10008.1.2.1.99"
#: Room for the elements other than the pixel data when a deflated dataset is inflated (4 MiB).
INFLATE_SLACK_BYTES = 4 * 1024**2
#: How much of a deflated dataset is inflated first to read its image size (256 KiB).
_INFLATE_FIRST = 256 * 1024


def max_inflated_bytes(max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """The most a deflated DICOM dataset may inflate to: one frame of ``max_pixels`` 16-bit RGB pixels and slack."""
    return max_pixels * 3 * 2 + INFLATE_SLACK_BYTES


def _read_deflated(zipped: bytes, preamble: bytes | None, meta, path: str, max_pixels: int) -> pydicom.Dataset:
    """A Deflated Explicit VR Little Endian dataset, inflated with a bound (pydicom inflates it whole, unbounded).

    The first :data:`_INFLATE_FIRST` bytes are inflated and their header read: the dataset may then inflate to
    what its Rows, Columns, SamplesPerPixel, BitsAllocated and NumberOfFrames declare plus
    :data:`INFLATE_SLACK_BYTES`, and never past :func:`max_inflated_bytes`. A file that inflates past its
    bound is refused without inflating the rest (a zlib bomb: 300 MB of zeros deflate to 300 KB).
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    limit = max_inflated_bytes(max_pixels)
    what = f"the {limit:,}-byte limit for an image of at most {max_pixels:,} pixels"
    try:
        parts = [inflater.decompress(zipped, _INFLATE_FIRST)]
        size = len(parts[0])
        declared = _declared_size(parts[0])
        if declared is not None and declared + INFLATE_SLACK_BYTES < limit:
            limit = declared + INFLATE_SLACK_BYTES
            what = f"the {limit:,} bytes that its header's image size needs (with slack)"
        while not inflater.eof and size <= limit:
            part = inflater.decompress(inflater.unconsumed_tail, min(1024**2, limit + 1 - size))
            if not part:  # a stream cut short: pydicom reports what is missing
                break
            parts.append(part)
            size += len(part)
    except zlib.error as exc:
        raise BadFileError(path, f"damaged deflated DICOM file (zlib: {exc})") from None
    if size > limit:
        raise BadFileError(path, f"deflated DICOM data inflates past {what}; refused (a decompression bomb?)")
    inflated = b"".join(parts)
    del parts
    return _file_dataset(DicomBytesIO(inflated), preamble, meta, implicit=False)


def _file_dataset(fp: DicomBytesIO, preamble: bytes | None, meta, implicit: bool, stop_when=None) -> FileDataset:
    """The little-endian dataset at ``fp``'s position (after the file meta), read as :func:`pydicom.dcmread` does."""
    dataset = read_dataset_body(fp, implicit, True, stop_when=stop_when)
    ds = FileDataset(fp, dataset, preamble, meta, implicit, True)
    ds.set_original_encoding(implicit, True, dataset._character_set)
    return ds


def _declared_size(head: bytes) -> int | None:
    """The pixel data's bytes that the header at the start of an inflated dataset declares; None when not all there."""
    try:
        ds = read_dataset_body(DicomBytesIO(head), False, True, stop_when=_at_pixel_data)
        return expected_pixel_bytes(ds)
    except Exception:  # the header goes on past `head` (or is damaged): the general bound applies
        return None


def expected_pixel_bytes(ds: pydicom.Dataset, frames: int | None = None) -> int | None:
    """Rows x Columns x SamplesPerPixel x BitsAllocated/8 x frames (``NumberOfFrames`` unless given), in bytes.

    None when Rows, Columns or BitsAllocated is missing or not a positive number. 1-bit pixels are packed.
    """
    try:
        rows, cols, bits = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0), int(ds.get("BitsAllocated") or 0)
        samples = int(ds.get("SamplesPerPixel") or 1)
        frames = int(ds.get("NumberOfFrames") or 1) if frames is None else frames
    except (TypeError, ValueError):
        return None
    if min(rows, cols, bits, samples, frames) <= 0:
        return None
    return -(-rows * cols * samples * frames * bits // 8)


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or str(value).strip() == "":
        return None
    return str(value).strip()


def read_header(data: bytes, path: str = "<bytes>") -> DicomHeader:
    """The header of a DICOM file given as bytes; raises :class:`BadFileError` if it is not DICOM."""
    return read_dataset(data, path)[1]


def _checked_header(ds: pydicom.Dataset, path: str) -> DicomHeader:
    try:
        return _header(ds)
    except Exception as exc:  # pydicom parses elements lazily: a damaged one fails here, not in dcmread
        raise BadFileError(path, f"damaged DICOM header ({_one_line(exc)})") from None


def _one_line(exc: Exception) -> str:
    """``Type: message`` on one line (pydicom's messages span lines; reports want one line)."""
    text = _OBJECT_REPR.sub("the file", " ".join(str(exc).split()))
    return f"{type(exc).__name__}: {text}"


#: A Python object's repr in a decoder's message (``<_io.BytesIO object at 0x7f...>``): meaningless to a user.
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9A-Fa-f]+>")


def _header(ds: pydicom.Dataset) -> DicomHeader:
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    rows, cols = ds.get("Rows"), ds.get("Columns")
    return DicomHeader(
        patient_id=_text(ds, "PatientID"),
        sex=_text(ds, "PatientSex"),
        age=parse_age(ds.get("PatientAge")),
        view=_text(ds, "ViewPosition"),
        modality=_text(ds, "Modality"),
        body_part=_text(ds, "BodyPartExamined"),
        rows=int(rows) if rows is not None else None,
        columns=int(cols) if cols is not None else None,
        bits_stored=int(ds.BitsStored) if "BitsStored" in ds else None,
        photometric=_text(ds, "PhotometricInterpretation"),
        frames=int(ds.get("NumberOfFrames", 1) or 1),
        has_pixels="PixelData" in ds or "FloatPixelData" in ds or "DoubleFloatPixelData" in ds,
        transfer_syntax=syntax.name if syntax is not None else None,
        transfer_syntax_uid=str(syntax) if syntax is not None else None,
    )


def read_dataset(data: bytes, path: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS
                 ) -> tuple[pydicom.Dataset, DicomHeader]:
    """Parse a DICOM file's bytes once: the dataset (pixels not yet decoded) and its header.

    Raises :class:`BadFileError` for a file that is not DICOM or whose header is damaged, whose uncompressed
    pixel data is not as long as its header declares (Rows x Columns x SamplesPerPixel x BitsAllocated/8 x
    NumberOfFrames), or that is deflated and inflates past what ``max_pixels`` pixels need (see :func:`_read_deflated`).
    """
    native = read_native(data, max_pixels)
    if native is not None:
        return native
    ds = _read_dataset(data, path, max_pixels)
    header = _checked_header(ds, path)
    try:
        _check_pixel_length(ds, header, path, max_pixels)
    except BadFileError:
        raise
    except Exception as exc:  # pydicom parses PixelData's element only now: a damaged one fails here
        raise BadFileError(path, f"damaged DICOM header ({_one_line(exc)})") from None
    return ds, header


def _check_pixel_length(ds: pydicom.Dataset, header: DicomHeader, path: str, max_pixels: int) -> None:
    """Refuse uncompressed pixel data whose length is not what the header declares (one padding byte allowed).

    Checked before any pixel is decoded: a header that declares fewer pixels than the data holds is how a
    small-looking file carries a large payload, and more frames than ``NumberOfFrames`` (or frames with no
    ``NumberOfFrames``) would otherwise be decoded as one tall image of garbage.
    """
    if "PixelData" not in ds or (header.rows or 0) * (header.columns or 0) > max_pixels:
        return  # (over the pixel limit: the caller refuses it as a decompression bomb, which says more)
    syntax = getattr(getattr(ds, "file_meta", None), "get", lambda _: None)("TransferSyntaxUID")
    if syntax is not None and syntax != DEFLATED_UID and (not syntax.is_transfer_syntax or syntax.is_compressed):
        return  # encapsulated (compressed) frames: their decoder checks them
    element = ds.get_item("PixelData")
    if element is None or element.value is None or element.length == 0xFFFFFFFF:
        return
    actual = len(element.value)
    expected = expected_pixel_bytes(ds)
    if expected is None or actual in (expected, expected + 1):
        return
    rows, cols = int(ds.Rows), int(ds.Columns)
    per_frame = expected_pixel_bytes(ds, frames=1)
    if "NumberOfFrames" not in ds and per_frame and actual // per_frame > 1 and actual - (actual // per_frame) * per_frame <= 1:
        raise BadFileError(path, f"DICOM pixel data holds {actual // per_frame} frames of {cols}x{rows} pixels but "
                                 "NumberOfFrames is missing; refused (the header does not say which frame to read)")
    samples = int(ds.get("SamplesPerPixel") or 1)
    bits = int(ds.BitsAllocated)
    frames = int(ds.get("NumberOfFrames") or 1)
    raise BadFileError(path, f"DICOM pixel data is {actual:,} bytes, but the header declares {expected:,} "
                             f"({cols}x{rows} pixels x {samples} samples x {bits} bits x {frames} frame(s)); "
                             "refused (a damaged file or a wrong header)")


#: The transfer syntaxes whose pixels :func:`read_native` takes straight from the file's bytes: uncompressed little
#: endian. (Deflated, big-endian and encapsulated (compressed) files are read by pydicom as a whole.)
NATIVE_SYNTAXES = (ImplicitVRLittleEndian, ExplicitVRLittleEndian)
_SYNTAX_NAMES = {uid: uid.name for uid in NATIVE_SYNTAXES}  # (a UID checks its text each time it is made)
#: The tags pydicom stops before when it reads a file without its pixels (PixelData, FloatPixelData, DoubleFloatPixelData).
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)


@dataclass(frozen=True)
class NativePixels:
    """Where the pixels of an uncompressed one-frame grey DICOM lie in its bytes (see :func:`read_native`)."""

    buffer: bytes = field(repr=False)  # the whole file: not printed
    offset: int
    rows: int
    columns: int
    dtype: str  # "u1", "i1", "<u2" or "<i2"
    unused_bits: int  # BitsAllocated - BitsStored

    def array(self) -> np.ndarray:
        """The pixels as pydicom's ``pixel_array`` gives them: ``(rows, columns)``, a read-only view of the bytes when
        no unused high bit (above BitsStored) is set, else a copy whose unused bits are cleared (sign-extended when
        signed), as pydicom's ``correct_unused_bits`` does."""
        return self.array_and_extremes()[0]

    def array_and_extremes(self) -> tuple[np.ndarray, tuple[int, int] | None]:
        """:meth:`array`, and the least and largest pixel value where finding them was part of the work (the view
        of a file with unused high bits, none set), else None: so that scaling to 8 bits does not look again."""
        pixels = np.frombuffer(self.buffer, dtype=self.dtype, count=self.rows * self.columns, offset=self.offset)
        pixels = pixels.reshape(self.rows, self.columns)
        if not self.unused_bits:
            return pixels, None
        stored = 8 * pixels.itemsize - self.unused_bits
        signed = "i" in self.dtype
        extremes = _min_max(pixels)
        low, high = (-(1 << (stored - 1)), (1 << (stored - 1)) - 1) if signed else (0, (1 << stored) - 1)
        if low <= extremes[0] and extremes[1] <= high:
            return pixels, extremes  # no unused bit set (as most files): the correction would change nothing
        if not signed:  # unsigned: the shifts come to a mask, one pass
            return np.bitwise_and(pixels, (1 << stored) - 1), None
        pixels = np.left_shift(pixels, self.unused_bits)
        np.right_shift(pixels, self.unused_bits, out=pixels)
        return pixels, None


def _min_max(values: np.ndarray) -> tuple[int, int]:
    """The least and the largest of 8- or 16-bit integers (2-D: OpenCV's one pass, twice NumPy's speed)."""
    if values.ndim == 2 and values.size and values.dtype.isnative:
        least, most = cv2.minMaxLoc(values)[:2]
        return int(least), int(most)
    return int(values.min()), int(values.max())


def read_native(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[pydicom.Dataset, DicomHeader] | None:
    """:func:`read_dataset` for a plain uncompressed file, without copying or decoding its pixels through pydicom.

    The header of the plainest files is read by :func:`_scan_plain` (no pydicom), of the others by pydicom up to the
    pixel data (the same elements, LUTs included, as a full read); the pixels stay where they are in ``data``
    (:func:`native_pixels` says where). Only for a one-frame, one-sample MONOCHROME1/2
    image of 8- or 16-bit integers in Implicit or Explicit VR Little Endian (:data:`NATIVE_SYNTAXES`: never a
    deflated or encapsulated file), whose PixelData element is the file's last and holds exactly the bytes the
    header declares (one padding byte allowed), within ``max_pixels``. Anything else gives None, and the caller reads
    the file the general way, which refuses what is wrong with it (the same checks and messages).
    """
    scanned = _scan_plain(data, max_pixels)
    if scanned is not None:
        return scanned
    try:
        fp = DicomBytesIO(data)
        preamble = read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        syntax = meta.get("TransferSyntaxUID")
        if syntax not in NATIVE_SYNTAXES:
            return None
        implicit = syntax == ImplicitVRLittleEndian
        found: list[tuple[int, str | None, int]] = []

        def at_pixels(tag, vr, length) -> bool:
            if tag in _PIXEL_TAGS:
                found.append((tag, vr, length))
                return True
            return False

        ds = _file_dataset(fp, preamble, meta, implicit, stop_when=at_pixels)
        if not found:
            return None
        tag, vr, length = found[0]
        offset = fp.tell() + (8 if implicit else 12)  # the element's tag, (VR,) and length come first
        if tag != 0x7FE00010 or (not implicit and vr not in ("OB", "OW")) or offset + length != len(data):
            return None
        pixels = _native_layout([ds.get(keyword) for keyword in _LAYOUT_KEYWORDS], data, offset, length, max_pixels)
        if pixels is None:
            return None
        header = replace(_header(ds), has_pixels=True)
    except Exception:  # a damaged file: the general reader says what is wrong with it
        return None
    object.__setattr__(ds, "_xraylib_native", pixels)
    return ds, header


#: The elements that say how the pixels are laid out, in the order :func:`_native_layout` takes their values.
_LAYOUT_KEYWORDS = ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel",
                    "NumberOfFrames", "PhotometricInterpretation")


def _native_layout(values: list, data: bytes, offset: int, length: int, max_pixels: int) -> NativePixels | None:
    """The :class:`NativePixels` of a file read by :func:`read_native`, from the values of :data:`_LAYOUT_KEYWORDS`
    (None where absent); None where it is not a plain one-frame grey image of the length its header declares."""
    rows, columns, bits, stored, signed, samples, frames, photometric = values
    if not all(isinstance(v, int) for v in (rows, columns, bits, stored, signed, samples)):
        return None
    if (bits not in (8, 16) or not 0 < stored <= bits or signed not in (0, 1) or samples != 1
            or frames not in (None, 1, "1") or photometric not in ("MONOCHROME1", "MONOCHROME2")
            or not 0 < rows * columns <= max_pixels):
        return None
    expected = rows * columns * bits // 8
    if length not in (expected, expected + 1):
        return None
    dtype = ("i" if signed else "u") + str(bits // 8)
    return NativePixels(data, offset, rows, columns, dtype if bits == 8 else "<" + dtype, bits - stored)


#: VRs whose explicit-VR elements have a 4-byte length (after 2 reserved bytes); the others in :data:`_SHORT_VRS`.
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_SHORT_VRS = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN",
                        b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"})
#: The header's elements :func:`_scan_plain` converts itself, with their standard VRs.
_SCANNED = {0x00100020: ("PatientID", b"LO"), 0x00100040: ("PatientSex", b"CS"), 0x00101010: ("PatientAge", b"AS"),
            0x00185101: ("ViewPosition", b"CS"), 0x00080060: ("Modality", b"CS"),
            0x00180015: ("BodyPartExamined", b"CS"), 0x00280010: ("Rows", b"US"), 0x00280011: ("Columns", b"US"),
            0x00280100: ("BitsAllocated", b"US"), 0x00280101: ("BitsStored", b"US"),
            0x00280103: ("PixelRepresentation", b"US"), 0x00280002: ("SamplesPerPixel", b"US"),
            0x00280008: ("NumberOfFrames", b"IS"), 0x00280004: ("PhotometricInterpretation", b"CS")}
#: Elements of the display transform (rescale, LUTs, window): a file with any is left to pydicom's reading.
_TRANSFORM_TAGS = frozenset({0x00281050, 0x00281051, 0x00281052, 0x00281053, 0x00281054, 0x00281056, 0x00283000,
                             0x00283010})


def _scan_plain(data: bytes, max_pixels: int) -> tuple[pydicom.Dataset, DicomHeader] | None:
    """:func:`read_native` without pydicom, for the plainest files: no rescale, LUT or window element, no element of
    undefined length, ASCII header values, every element in order with the standard VR of the ones read here.

    The header's values are converted here as pydicom converts them (text stripped, US little-endian, IS a
    number); anything else (and anything odd) gives None, and pydicom reads the file. The dataset returned is empty:
    with no transform element, the display transform reads nothing from it.
    """
    if data[128:132] != b"DICM":
        return None
    meta = _scan_elements(data, 132, implicit=False, meta=True)
    if meta is None or 0x00020010 not in meta[0]:
        return None
    syntax = _ascii_value(data, meta[0][0x00020010])
    if syntax not in NATIVE_SYNTAXES:
        return None
    implicit = syntax == ImplicitVRLittleEndian
    scanned = _scan_elements(data, meta[1], implicit=implicit, meta=False)
    if scanned is None or 0x7FE00010 not in scanned[0]:
        return None
    elements = scanned[0]
    if not _TRANSFORM_TAGS.isdisjoint(elements):
        return None
    values = {}
    for tag, (keyword, standard_vr) in _SCANNED.items():
        if tag in elements:
            vr, start, length = elements[tag]
            if vr is not None and vr != standard_vr:
                return None
            if standard_vr == b"US":
                if length != 2:
                    return None
                values[keyword] = data[start] | data[start + 1] << 8
            else:
                values[keyword] = _ascii_value(data, elements[tag])
                if values[keyword] is None:
                    return None
    frames = values.get("NumberOfFrames")
    if frames is not None and frames not in ("", "1"):
        return None
    values["NumberOfFrames"] = None
    vr, offset, length = elements[0x7FE00010]
    if vr not in (None, b"OB", b"OW") or offset + length != len(data):
        return None
    pixels = _native_layout([values.get(keyword) for keyword in _LAYOUT_KEYWORDS], data, offset, length, max_pixels)
    if pixels is None:
        return None
    header = DicomHeader(
        patient_id=values.get("PatientID") or None, sex=values.get("PatientSex") or None,
        age=parse_age(values.get("PatientAge")), view=values.get("ViewPosition") or None,
        modality=values.get("Modality") or None, body_part=values.get("BodyPartExamined") or None,
        rows=values["Rows"], columns=values["Columns"], bits_stored=values["BitsStored"],
        photometric=values["PhotometricInterpretation"] or None, frames=1, has_pixels=True,
        transfer_syntax=_SYNTAX_NAMES[syntax], transfer_syntax_uid=syntax)
    ds = pydicom.Dataset()
    object.__setattr__(ds, "_xraylib_native", pixels)
    return ds, header


def _scan_elements(data: bytes, pos: int, implicit: bool, meta: bool) -> tuple[dict, int] | None:
    """``{tag: (VR or None, value offset, length)}`` of the top-level elements from ``pos``, and where they end: the
    file meta's (group 2, explicit VR) or the dataset's up to and with PixelData. None where an element has an
    undefined length, an unknown VR, runs past the end, or comes out of order (pydicom reads those)."""
    found: dict[int, tuple[bytes | None, int, int]] = {}
    end, last = len(data), -1
    while pos + 8 <= end:
        group, element = _TAG.unpack_from(data, pos)
        tag = group << 16 | element
        if meta and group != 2:
            break
        if tag <= last or (not meta and group <= 2):
            return None
        last = tag
        vr = data[pos + 4:pos + 6]
        if implicit:
            if not found and (vr in _SHORT_VRS or vr in _LONG_VRS):
                return None  # explicit VR after all? (pydicom checks and switches)
            vr, length, start = None, _LENGTH.unpack_from(data, pos + 4)[0], pos + 8
        elif vr in _SHORT_VRS:
            length, start = data[pos + 6] | data[pos + 7] << 8, pos + 8
        elif vr in _LONG_VRS and pos + 12 <= end:
            length, start = _LENGTH.unpack_from(data, pos + 8)[0], pos + 12
        else:
            return None
        if length == 0xFFFFFFFF or start + length > end:
            return None
        found[tag] = (vr, start, length)
        if tag == 0x7FE00010 and not meta:
            break
        pos = start + length
    return found, pos


_TAG = struct.Struct("<HH")
_LENGTH = struct.Struct("<I")


def _ascii_value(data: bytes, entry: tuple[bytes | None, int, int]) -> str | None:
    """A text element's value as pydicom gives it and ``str(value).strip()`` makes it; None where that is not sure
    (non-ASCII, several values, NUL bytes inside or escape bytes: pydicom's conversion decides those)."""
    _, start, length = entry
    raw = data[start:start + length].rstrip(b"\0 ")  # (pydicom strips trailing NUL padding and spaces)
    if not raw.isascii() or b"\\" in raw or b"\0" in raw or b"\x1b" in raw:
        return None
    return raw.decode("ascii").strip()


def native_pixels(ds: pydicom.Dataset) -> NativePixels | None:
    """Where :func:`read_native` found the dataset's pixels; None for a dataset read the general way."""
    return getattr(ds, "_xraylib_native", None)


def decode_dicom(data: bytes, path: str = "<bytes>") -> tuple[np.ndarray, DicomHeader]:
    """Decode a DICOM image to ``(H, W) uint8``, display-ready (MONOCHROME1 inverted), and its header.

    Multi-frame files give their first frame. Raises :class:`BadFileError` naming the file for a
    file that is not DICOM, has no pixel data, or uses a compression no installed plugin decodes
    (the message says what to ``pip install``).
    """
    ds, header = read_dataset(data, path)
    return decode_dataset(ds, header, path), header


def decode_dataset(ds: pydicom.Dataset, header: DicomHeader, path: str = "<bytes>",
                   writable: bool = True) -> np.ndarray:
    """The pixels of a dataset from :func:`read_dataset` as ``(H, W) uint8`` display values.

    ``writable=False`` lets plain 8-bit pixels come back as a read-only view of the file's bytes
    (no copy: for a caller that only resizes them). Raises :class:`BadFileError` as :func:`decode_dicom`.
    """
    if not header.has_pixels:
        raise BadFileError(path, "DICOM file has no pixel data (no PixelData element)")
    native = native_pixels(ds)
    extremes = None
    try:
        if native is not None:  # an uncompressed file: the pixels are a view of its bytes
            pixels, extremes = native.array_and_extremes()
        else:
            pixels = _pydicom_pixels(ds, header)
    except Exception as exc:
        raise BadFileError(path, _decode_failure_message(header, exc, ds)) from None
    try:
        image = _display_pixels(pixels, header, ds, extremes)
    except Exception as exc:  # a damaged LUT, rescale or window element (pydicom reads them only now)
        raise BadFileError(path, f"cannot apply the DICOM file's pixel transforms; the file may be damaged: "
                                 f"{_one_line(exc)}") from None
    if image.ndim != 2:
        raise BadFileError(path, f"unexpected DICOM pixel array shape {pixels.shape}")
    if writable and not image.flags.writeable:
        image = image.copy()
    return image


def _pydicom_pixels(ds: pydicom.Dataset, header: DicomHeader) -> np.ndarray:
    """The pixels of a dataset read by pydicom as a whole, decoded by pydicom (the first frame of several)."""
    # Decode only the first frame (the size guard checked one frame, not all of them), and let plain 8-bit
    # pixels be a view of the bytes: the copy costs more than the parsing. (Asked of other pixels, pydicom
    # copies anyway and logs a line per file.)
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    plain_8bit = (ds.get("BitsAllocated") == 8 and header.bits_stored == 8
                  and syntax is not None and not syntax.is_compressed)
    ds.pixel_array_options(index=0 if header.frames > 1 else None, view_only=plain_8bit)
    return ds.pixel_array


def _display_pixels(pixels: np.ndarray, header: DicomHeader, ds: pydicom.Dataset,
                    extremes: tuple[int, int] | None = None) -> np.ndarray:
    """Decoded pixels to ``(H, W) uint8`` display values: LUTs, 8-bit scaling, MONOCHROME1 inversion.

    Plain 8-bit pixels come back as they are (possibly a read-only view); the rest are new arrays. ``extremes``:
    the least and largest of ``pixels`` where known (see :meth:`NativePixels.array_and_extremes`).
    """
    if header.frames > 1 and pixels.ndim >= 3 and pixels.shape[0] == header.frames:
        pixels = pixels[0]
    if pixels.ndim == 3:  # colour DICOM (e.g. a secondary capture in RGB)
        return _rgb_to_uint8(pixels)
    if pixels.ndim != 2:
        return pixels  # refused by the caller, which knows the path
    if pixels.dtype == np.uint8 and not _has_luts(ds):
        # Plain 8-bit pixels are already display values: keep them as they are, as for a PNG,
        # so the same pixels give the same model input whether stored as PNG or as DICOM.
        image = pixels
    else:
        values = apply_modality_lut(pixels, ds)
        if "WindowCenter" in ds or "VOILUTSequence" in ds:
            values = apply_voi_lut(values, ds, index=0)
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            # e.g. RescaleSlope 1e308: scaling would give noise, not an image
            raise ValueError("pixel values are not finite after the rescale slope/intercept and window")
        image = _to_uint8(values, extremes if values is pixels else None)
    # Invert after scaling, so a MONOCHROME1 file reads as exactly 255 - x of the same pixels
    # labelled MONOCHROME2 (inverting before the rounding made ties round the other way).
    return invert_monochrome1(image, header)


def _has_luts(ds: pydicom.Dataset) -> bool:
    return len(ds) > 0 and any(k in ds for k in _LUT_KEYWORDS)  # (a dataset of _scan_plain's is empty)


def invert_monochrome1(image: np.ndarray, header: DicomHeader) -> np.ndarray:
    """``255 - image`` for a MONOCHROME1 file (a high value is dark there), else ``image`` itself."""
    return 255 - image if header.photometric == "MONOCHROME1" else image


def jpeg_frame(ds: pydicom.Dataset, header: DicomHeader) -> bytes | None:
    """The compressed frame of a one-frame, unsigned 8-bit, grey JPEG Baseline DICOM with no LUTs; else None.

    Such a frame is an ordinary JPEG file whose decoded values are the display values (after
    :func:`invert_monochrome1`), so :mod:`xraylib.images` decodes it as it does a JPEG: with OpenCV's
    libjpeg-turbo, without holding Python's lock, and at a reduced scale where the caller shrinks the
    image anyway. At full size that gives the pixels pydicom gives through Pillow (also libjpeg-turbo;
    tested on the real RSNA-format file); with another pydicom plugin (pylibjpeg, GDCM) installed the
    two may differ by the codecs' rounding. This is how the 26,684 RSNA files are stored. Anything else
    (and a frame that cannot be found) is left to pydicom.
    """
    if (header.transfer_syntax_uid != JPEG_BASELINE_UID or header.frames != 1 or header.bits_stored != 8
            or ds.get("BitsAllocated") != 8 or ds.get("SamplesPerPixel", 1) != 1
            or ds.get("PixelRepresentation", 0) != 0  # signed: pydicom gives int8 values, scaled by the LUT path
            or header.photometric not in ("MONOCHROME1", "MONOCHROME2") or _has_luts(ds)):
        return None
    try:
        return next(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception:  # damaged encapsulation: pydicom's decoder reports it
        return None


def missing_decoder_message(header: DicomHeader) -> str | None:
    """For pixel data compressed in a way no installed plugin decodes: what to ``pip install``; else None.

    Read from the header alone, so the manifest can refuse such a file without decoding it.
    """
    if header.transfer_syntax_uid is None or header.transfer_syntax is None:
        return None
    try:
        syntax = pydicom.uid.UID(header.transfer_syntax_uid)
        if not syntax.is_compressed or get_decoder(syntax).is_available:
            return None
    except Exception:  # an unknown or private syntax: left to the decoder, which says what it can
        return None
    for key, hint in _PLUGIN_HINTS.items():
        if key.lower() in header.transfer_syntax.lower():
            return f"cannot decode DICOM pixel data compressed as '{header.transfer_syntax}'; install a decoder: {hint}"
    return None


def _decode_failure_message(header: DicomHeader, exc: Exception, ds: pydicom.Dataset) -> str:
    syntax = header.transfer_syntax or "unknown transfer syntax"
    if not _decoder_available(ds):
        for key, hint in _PLUGIN_HINTS.items():
            if key.lower() in syntax.lower():
                return f"cannot decode DICOM pixel data compressed as '{syntax}'; install a decoder: {hint}"
    return f"cannot decode DICOM pixel data ({syntax}); the file may be damaged: {_one_line(exc)}"


def _decoder_available(ds: pydicom.Dataset) -> bool:
    """True when an installed plugin decodes the file's transfer syntax (so a failure means damaged data)."""
    meta = getattr(ds, "file_meta", None)
    syntax_uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax_uid is None:
        return False
    try:
        return bool(get_decoder(syntax_uid).is_available)
    except Exception:  # an unknown or damaged (e.g. multi-valued) UID: no decoder
        return False


def _to_uint8(values: np.ndarray, extremes: tuple[int, int] | None = None) -> np.ndarray:
    """Min-max scale any numeric image to the full 0..255 range (a constant image becomes 0); ``extremes``: its
    least and largest value where already known (8- and 16-bit integers only)."""
    values = np.asarray(values)
    if values.dtype.kind in "ui" and values.itemsize <= 2:
        return _integers_to_uint8(values, extremes)
    values = np.asarray(values, dtype=np.float64)
    low, high = float(np.min(values)), float(np.max(values))
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return _scale(values, low, high)


#: Rows converted at a time by :func:`_rgb_to_uint8`.
_RGB_CHUNK_ROWS = 256


def _rgb_to_uint8(rgb: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` colour to ``(H, W) uint8`` gray: luma (0.299 R + 0.587 G + 0.114 B), min-max scaled as by :func:`_to_uint8`.

    The same float64 arithmetic as converting the whole image at once, a band of rows at a time: a
    7745x7745 16-bit RGB image needs its uint8 result and a few MB, not 1.4 GB of float64 copies.
    """
    def gray(band: np.ndarray) -> np.ndarray:
        band = np.asarray(band, dtype=np.float64)
        return band[..., 0] * 0.299 + band[..., 1] * 0.587 + band[..., 2] * 0.114

    bands = range(0, rgb.shape[0], _RGB_CHUNK_ROWS)
    low, high = np.inf, -np.inf
    for top in bands:
        values = gray(rgb[top:top + _RGB_CHUNK_ROWS])
        low, high = min(low, float(np.min(values))), max(high, float(np.max(values)))
    out = np.zeros(rgb.shape[:2], dtype=np.uint8)
    if not high > low:  # constant (or empty) image
        return out
    for top in bands:
        out[top:top + _RGB_CHUNK_ROWS] = _scale(gray(rgb[top:top + _RGB_CHUNK_ROWS]), low, high)
    return out


def _scale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = (values - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _integers_to_uint8(values: np.ndarray, extremes: tuple[int, int] | None = None) -> np.ndarray:
    """:func:`_to_uint8` of 8- or 16-bit integers through a table: the same float64 arithmetic, once per value.

    A 16-bit image has at most 65,536 distinct values, so scaling each value once and indexing
    gives the very same bytes as scaling every pixel, at a third of the time and memory.

    The table has an entry for every value of the type (65,536 for 16 bits), a negative value's at the index
    it has as unsigned, so the pixels index it as they are: no offset array.
    """
    low, high = extremes or _min_max(values)
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    levels = _scale(np.arange(low, high + 1, dtype=np.float64), low, high)  # the 8-bit level of each value
    values = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("="))
    if values.ndim == 2 and values.itemsize == 2 and values.size >= _SCALE_VECTOR:
        scaled = _scaled_like_table(values, low, high, levels)
        if scaled is not None:
            return scaled
    size = 1 << (8 * values.itemsize)
    table = np.zeros(size, dtype=np.uint8)
    table[np.arange(low, high + 1) % size] = levels
    if values.ndim != 2:
        return np.take(table, values, mode="wrap")
    # OpenCV looks 8- and 16-bit values up in a table, as unsigned, three times as fast as NumPy indexes
    # (which converts every value to an 8-byte index first)
    return cv2.LUT(values.view(np.uint8 if values.itemsize == 1 else np.uint16), table)


#: Values :func:`_scaled_like_table` checks at least (more than OpenCV's widest vector of 16-bit values): OpenCV
#: scales shorter arrays, and the last values of longer ones, by the same vector code.
_SCALE_VECTOR = 64


def _scaled_like_table(values: np.ndarray, low: int, high: int, levels: np.ndarray) -> np.ndarray | None:
    """The table of ``levels`` (the 8-bit level of each value from ``low`` to ``high``) applied to 16-bit ``values``
    (2-D, at least :data:`_SCALE_VECTOR` of them) by OpenCV's vectorised multiply-add (``convertScaleAbs``), a third
    of the time of its table look-up, where that gives every value's level: checked on those values each time (the
    float32 arithmetic may round a value the other way than the float64 levels, and then the table is used; the
    table is only built then). None where it does not."""
    alpha = 255.0 / (high - low)
    # every value from low to high (the last repeated to fill one vector)
    offsets = np.minimum(np.arange(max(high + 1 - low, _SCALE_VECTOR)), high - low)
    span = (low + offsets).astype(values.dtype)[None]
    if not np.array_equal(cv2.convertScaleAbs(span, alpha=alpha, beta=-low * alpha)[0], levels[offsets]):
        return None
    return cv2.convertScaleAbs(values, alpha=alpha, beta=-low * alpha)
