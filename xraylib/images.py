"""Read any supported image file (PNG, JPEG, DICOM) into one array convention.

The convention: ``(H, W) uint8`` grayscale, display-ready (air dark, bone bright), whatever
the file held: 8- or 16-bit, gray, RGB, RGBA or palette PNG, CMYK JPEG, MONOCHROME1 DICOM.
The file type is decided by content, never by the file name, and every failure is a
:class:`~xraylib.errors.BadFileError` that names the file and the problem.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any, Callable

import cv2
import numpy as np

from . import dicom
from .errors import BadFileError
from .fileio import map_file, read_bytes, sha1_bytes

#: Images larger than this many pixels are refused before decoding (decompression-bomb guard).
MAX_PIXELS = 60_000_000
#: Image files larger than this are refused before they are read (the largest legitimate one, an uncompressed
#: 16-bit RGB DICOM of MAX_PIXELS pixels, is 360 MB).
MAX_FILE_BYTES = 512 * 1024**2
#: Images smaller than this on either side are refused: nothing can be judged at that size.
MIN_SIDE = 32

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"

# Recognised formats we do not read, so the message can say what the file really is.
_OTHER_MAGIC = [
    (b"PK\x03\x04", "a ZIP archive"),
    (b"%PDF", "a PDF document"),
    (b"GIF8", "a GIF image (convert it to PNG)"),
    (b"BM", "a BMP image (convert it to PNG)"),
    (b"II*\x00", "a TIFF image (convert it to PNG)"),
    (b"MM\x00*", "a TIFF image (convert it to PNG)"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"RIFF", "a RIFF/WebP file (convert it to PNG)"),
]


@dataclass(frozen=True)
class ImageInfo:
    """What a file is, read from its bytes without decoding the pixels."""

    file_format: str  # "png", "jpeg" or "dicom"
    width: int | None
    height: int | None
    channels: int | None
    bit_depth: int | None
    sha1: str
    dicom_header: dicom.DicomHeader | None = None


def detect_format(data: bytes, path: str = "<bytes>") -> str:
    """``"png"``, ``"jpeg"`` or ``"dicom"`` from the file's first bytes; :class:`BadFileError` otherwise."""
    data = data[:512]  # (bytes, also of a memory map: see read_image_bytes)
    if len(data) == 0:
        raise BadFileError(path, "empty file (0 bytes)")
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypmsf1", b"ftypavif"):
        raise BadFileError(path, "a HEIC/AVIF photo, not a PNG, JPEG or DICOM file (export it as JPEG or PNG)")
    for magic, what in _OTHER_MAGIC:
        if data.startswith(magic):
            raise BadFileError(path, f"{what}, not a PNG, JPEG or DICOM file")
    head = data[:512]
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        raise BadFileError(path, "a text file, not a PNG, JPEG or DICOM image")
    raise BadFileError(path, "not a PNG, JPEG or DICOM file (unrecognised content)")


@dataclass(frozen=True)
class _Checked:
    """A file that passed the header checks: what :func:`inspect_bytes` reports (less the hash) and,
    for a DICOM, the parsed dataset, so that decoding does not parse the file a second time."""

    file_format: str
    width: int | None
    height: int | None
    channels: int | None
    bit_depth: int | None
    dicom_header: dicom.DicomHeader | None = None
    dataset: Any = None


def _check_bytes(data: bytes, path: str) -> _Checked:
    fmt = detect_format(data, path)
    if fmt == "png":
        checked = _Checked("png", *_png_header(data, path))
    elif fmt == "jpeg":
        checked = _Checked("jpeg", *_jpeg_header(data, path))
    else:
        dataset, header = dicom.read_dataset(data, path, MAX_PIXELS)
        if not header.has_pixels:
            raise BadFileError(path, "DICOM file has no pixel data (no PixelData element)")
        if (missing := dicom.missing_decoder_message(header)) is not None:
            raise BadFileError(path, missing)
        if header.rows is None or header.columns is None:  # (pydicom fails to decode it; the size is needed first)
            raise BadFileError(path, "damaged DICOM header: no image size (the Rows or Columns element is missing)")
        checked = _Checked("dicom", header.columns, header.rows, 1, header.bits_stored, header, dataset)
    _check_size(checked.width, checked.height, path)
    return checked


def inspect_bytes(data: bytes, path: str = "<bytes>") -> ImageInfo:
    """Format, size, channels, bit depth and SHA-1 of an image file's bytes, without decoding pixels.

    Checks that the file is complete (a JPEG ends with its end marker, a PNG has its IEND
    chunk, a DICOM has pixel data that an installed plugin can decode) and not a decompression
    bomb. Raises :class:`BadFileError`.
    """
    checked = _check_bytes(data, path)
    return ImageInfo(checked.file_format, checked.width, checked.height, checked.channels, checked.bit_depth,
                     sha1_bytes(data), checked.dicom_header)


def read_image_bytes(path: str | os.PathLike, opener: Callable[[str, str], Any] = open, *,
                     map_dicoms: bool = False) -> bytes | mmap.mmap:
    """The bytes of an image file, checked before they are read: a regular file (not a named pipe or a
    device) of at most :data:`MAX_FILE_BYTES`, whose first bytes are a PNG, JPEG or DICOM header
    (:func:`detect_format`), so a large file of another kind is refused without being read whole.
    Read with retries on transient I/O errors; ``opener``: as for :func:`inspect_file`.

    ``map_dicoms``: a DICOM of at least :data:`xraylib.fileio.MAP_MIN_BYTES` on a local disk, opened with the
    built-in ``open``, comes as a read-only memory map instead (:func:`xraylib.fileio.map_file`): every function
    here that takes a file's bytes takes it too, and the pixels of an uncompressed file are then read where they lie.
    """
    path = str(path)
    if map_dicoms and opener is open:
        mapped = map_file(path, lambda head: detect_format(head, path) == "dicom", max_bytes=MAX_FILE_BYTES)
        if mapped is not None:
            return mapped
    return read_bytes(path, opener=opener, max_bytes=MAX_FILE_BYTES, check_head=lambda head: detect_format(head, path))


def inspect_file(path: str | os.PathLike, opener: Callable[[str, str], Any] = open) -> ImageInfo:
    """:func:`inspect_bytes` of a file (read with :func:`read_image_bytes`: retries on transient I/O errors).

    ``opener`` opens the file (``opener(path, "rb")``, default :func:`open`), as in
    :func:`xraylib.fileio.read_bytes`: tests pass a fault-injecting one.
    """
    return inspect_bytes(read_image_bytes(path, opener=opener, map_dicoms=True), str(path))


#: OpenCV's flags for a JPEG decoded by libjpeg straight to gray (its luma) at 1/2, 1/4 and 1/8 of its size.
_REDUCED_GRAYSCALE = {2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
                      8: cv2.IMREAD_REDUCED_GRAYSCALE_8}


def decode_bytes(data: bytes, path: str = "<bytes>", *, at_least: int | None = None,
                 writable: bool = True) -> np.ndarray:
    """Decode PNG/JPEG/DICOM bytes to ``(H, W) uint8`` grayscale. Raises :class:`BadFileError`.

    The file is checked as by :func:`inspect_bytes` (complete, not a decompression bomb) and
    parsed once. For a caller that shrinks the image anyway: ``at_least`` lets a large 8-bit JPEG
    (or the JPEG frame of a JPEG Baseline DICOM, as the RSNA files are) be decoded at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT-domain scaling, Pillow's draft mode),
    straight to gray (its luma: the same for gray content, a few grey levels off a conversion of
    the decoded colours on saturated ones), while both its sides stay at least ``at_least``
    pixels (a side that does not divide is rounded up: the aspect ratio may change by a fraction
    of a pixel). Any other file decodes exactly as without ``at_least``. ``writable=False`` lets
    plain 8-bit DICOM pixels come back as a read-only view of the file's bytes instead of a copy.
    """
    checked = _check_bytes(data, path)
    factor = _jpeg_reduction(checked.width, checked.height, at_least) \
        if at_least and checked.file_format == "jpeg" and checked.bit_depth == 8 else 1
    if factor > 1:  # the header's size was checked, and the reduced image keeps `at_least`
        return _decode_raster(data, path, _REDUCED_GRAYSCALE[factor])
    if checked.file_format == "dicom":
        pixels = _decode_dicom_jpeg(checked, at_least)
        if pixels is None:
            pixels = dicom.decode_dataset(checked.dataset, checked.dicom_header, path, writable=writable)
    else:
        pixels = _decode_raster(data, path)
    if pixels.shape[0] < MIN_SIDE or pixels.shape[1] < MIN_SIDE:
        raise BadFileError(path, f"image is {pixels.shape[1]}x{pixels.shape[0]} pixels, smaller than {MIN_SIDE}x{MIN_SIDE}")
    return pixels


def _jpeg_reduction(width: int, height: int, at_least: int | None) -> int:
    """The largest of 1, 2, 4, 8 that keeps both sides of an 8-bit JPEG (libjpeg rounds them up) at ``at_least`` or more.

    (Only for 8-bit JPEGs: a 12-bit one keeps its depth, which the reduced flags cut to 8 bits.)
    """
    if not at_least:
        return 1
    shorter = min(width, height)
    factor = 1
    while factor < 8 and -(-shorter // (2 * factor)) >= at_least:
        factor *= 2
    return factor


def _decode_dicom_jpeg(checked: _Checked, at_least: int | None) -> np.ndarray | None:
    """A JPEG Baseline DICOM's frame decoded as a JPEG file (see :func:`xraylib.dicom.jpeg_frame`).

    None, to leave the file to pydicom, for any other DICOM and for a frame whose own header
    disagrees with the DICOM header (size, one 8-bit component) or that OpenCV cannot decode.
    """
    frame = dicom.jpeg_frame(checked.dataset, checked.dicom_header)
    if frame is None:
        return None
    try:
        width, height, components, depth = _jpeg_header(frame, "<frame>")
    except BadFileError:
        return None
    if (width, height, components, depth) != (checked.width, checked.height, 1, 8):
        return None
    factor = _jpeg_reduction(width, height, at_least)
    # DICOM has its own orientation: an EXIF tag inside the frame is not applied (pydicom ignores it too).
    flags = _REDUCED_GRAYSCALE.get(factor, cv2.IMREAD_GRAYSCALE) | cv2.IMREAD_IGNORE_ORIENTATION
    pixels = cv2.imdecode(np.frombuffer(frame, dtype=np.uint8), flags)
    if pixels is None or pixels.ndim != 2 or (factor == 1 and pixels.shape != (height, width)):
        return None
    return dicom.invert_monochrome1(pixels, checked.dicom_header)


def read_image(path: str | os.PathLike, opener: Callable[[str, str], Any] = open) -> np.ndarray:
    """Read one image file to ``(H, W) uint8`` grayscale. Raises :class:`BadFileError` naming the file.

    ``opener``: as for :func:`inspect_file`.
    """
    return decode_bytes(read_image_bytes(path, opener=opener, map_dicoms=True), str(path))


def _decode_raster(data: bytes, path: str,
                   flags: int = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR) -> np.ndarray:
    buffer = np.frombuffer(data, dtype=np.uint8)
    # ANYDEPTH keeps 16-bit PNGs at 16 bits; ANYCOLOR keeps gray as gray and applies EXIF orientation.
    image = cv2.imdecode(buffer, flags)
    if image is None:
        raise BadFileError(path, "image data is damaged and could not be decoded")
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code)
    if image.dtype != np.uint8:
        image = dicom._to_uint8(image)
    return np.ascontiguousarray(image)


def _check_size(width: int | None, height: int | None, path: str) -> None:
    if width is None or height is None:
        return
    if width * height > MAX_PIXELS:
        raise BadFileError(
            path, f"image is {width}x{height} pixels, over the {MAX_PIXELS:,}-pixel limit (decompression-bomb guard)"
        )
    if width < MIN_SIDE or height < MIN_SIDE:
        raise BadFileError(path, f"image is {width}x{height} pixels, smaller than {MIN_SIDE}x{MIN_SIDE}")


def _png_header(data: bytes, path: str) -> tuple[int, int, int, int]:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise BadFileError(path, "truncated PNG file (no image header)")
    width, height, depth, colour_type = struct.unpack(">IIBB", data[16:26])
    if b"IEND" not in data[-64:] and b"IEND" not in data:
        raise BadFileError(path, "truncated PNG file (no IEND chunk: the file was cut short)")
    channels = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(colour_type)
    if channels is None:
        raise BadFileError(path, f"PNG with invalid colour type {colour_type}")
    if colour_type == 3:  # palette: IHDR's depth is the index size; the colours are 8-bit RGB
        depth = 8
    return width, height, channels, depth


# JPEG start-of-frame markers: baseline, extended, progressive, lossless (not DHT/JPG/DAC).
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_header(data: bytes, path: str) -> tuple[int, int, int, int]:
    """Width, height, components and bits per sample from the frame header; truncation is refused."""
    frame = None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise BadFileError(path, "damaged JPEG file (bad marker structure)")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker == 0xD9:  # end of image before any scan
            break
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in _SOF_MARKERS and frame is None:
            if pos + 10 > len(data):
                raise BadFileError(path, "truncated JPEG file (it ends inside its frame header)")
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            frame = (width, height, data[pos + 9], data[pos + 4])  # components, sample precision
        elif marker == 0xDA:  # start of scan: entropy-coded data follows
            if frame is None:
                break
            # An FF byte inside entropy-coded data is always followed by 00, so a complete file has
            # an end-of-image marker after its first scan. Bytes after that marker (camera or
            # editor trailers) do not make a file truncated, so the marker need not be last.
            if data.rfind(b"\xff\xd9") < pos + 2 + length:  # from the end: a whole file's marker is found at once
                raise BadFileError(path, "truncated JPEG file (no end-of-image marker: the file was cut short)")
            return frame
        pos += 2 + length
    if pos + 4 > len(data):
        raise BadFileError(path, "truncated JPEG file (it ends inside its headers: the file was cut short)")
    raise BadFileError(path, "damaged JPEG file (no frame header)")
