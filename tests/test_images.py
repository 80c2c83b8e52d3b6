"""Reading PNG, JPEG and DICOM files into (H, W) uint8 grayscale (xraylib.images).

Every file here is written in its real format by OpenCV, Pillow or pydicom; the expected pixels
come from those libraries (or from the pixels the test wrote), not from xraylib.
"""
from __future__ import annotations

import hashlib
import io
import struct
import zipfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import gradient_image, write_dicom, write_raster
from xraylib import images
from xraylib.errors import BadFileError

# write_dicom stores RSNA's plain ages ("43"), which pydicom warns about; the real files do the same.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR AS")


def _encode(ext: str, pixels: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buffer = cv2.imencode(ext, pixels, params or [])
    assert ok
    return buffer.tobytes()


def _colour_image(height: int = 96, width: int = 80) -> np.ndarray:
    """A BGR image whose three channels differ, so a wrong channel order or weighting shows."""
    gray = gradient_image(height, width)
    return np.dstack([gray, (255 - gray) // 2, np.roll(gray, 7, axis=1)]).astype(np.uint8)


def _assert_bad(path: Path, *words: str) -> BadFileError:
    with pytest.raises(BadFileError) as info:
        images.read_image(path)
    message = str(info.value)
    assert str(path) in message, message
    for word in words:
        assert word.lower() in message.lower(), message
    return info.value


# --- format by content, not by name ---------------------------------------------------------


def test_png_named_jpg_is_read_as_png(tmp_path):
    pixels = gradient_image(90, 70)
    path = tmp_path / "scan.jpg"
    path.write_bytes(_encode(".png", pixels))
    assert images.inspect_file(path).file_format == "png"
    np.testing.assert_array_equal(images.read_image(path), pixels)  # PNG is lossless


def test_dicom_named_png_is_read_as_dicom(tmp_path):
    pixels = gradient_image(64, 48)
    pixels[0, 0], pixels[0, 1] = 0, 255  # full range, so the 8-bit reading is the stored pixels
    dicom_path = write_dicom(tmp_path / "a.dcm", pixels)
    renamed = tmp_path / "looks_like.png"
    renamed.write_bytes(dicom_path.read_bytes())
    assert images.inspect_file(renamed).file_format == "dicom"
    np.testing.assert_array_equal(images.read_image(renamed), pixels)


def _zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("images/1.png", _encode(".png", gradient_image()))
    return buffer.getvalue()


# An ISO-BMFF 'ftyp' box as an iPhone HEIC photo starts: size, 'ftyp', major brand, version, brands.
_HEIC_HEAD = struct.pack(">I", 24) + b"ftypheic" + b"\x00\x00\x00\x00" + b"mif1heic" + b"\x00" * 200


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("notes.png", b"patientid,finding\n1,COVID-19\n", ["text file"]),
        ("archive.jpg", _zip_bytes(), ["zip"]),
        ("empty.png", b"", ["empty"]),
        ("photo.jpg", _HEIC_HEAD, ["heic"]),
        ("paper.png", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", ["pdf"]),
        ("noise.jpg", bytes(range(256)) * 4, ["not a png, jpeg or dicom"]),
    ],
    ids=["text", "zip", "empty", "heic", "pdf", "binary"],
)
def test_non_images_are_refused_naming_the_file_and_what_it_is(tmp_path, name, content, words):
    path = tmp_path / name
    path.write_bytes(content)
    error = _assert_bad(path, *words)
    assert error.path == str(path)
    with pytest.raises(BadFileError):  # inspect (the manifest's check) refuses it too
        images.inspect_file(path)


def test_missing_file_is_a_bad_file_error(tmp_path):
    _assert_bad(tmp_path / "nowhere.png", "not found")


# --- truncated files ----------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_file_cut_in_half_is_refused_as_truncated(tmp_path, ext):
    data = _encode(ext, _colour_image(120, 100))
    path = tmp_path / f"half{ext}"
    path.write_bytes(data[: len(data) // 2])
    _assert_bad(path, "truncated")


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_no_cut_point_gives_an_image(ext):
    """A file cut anywhere is refused, never returned as a half-grey image."""
    data = _encode(ext, _colour_image(64, 64))
    for length in list(range(1, 64)) + list(range(64, len(data), 23)) + [len(data) - 2, len(data) - 1]:
        with pytest.raises(BadFileError):
            images.decode_bytes(data[:length], f"cut-{length}{ext}")
    assert images.decode_bytes(data).shape == (64, 64)


def test_jpeg_with_bytes_after_end_marker_reads(tmp_path):
    """Cameras and editors append trailers after the end-of-image marker; the image is complete."""
    colour = _colour_image()
    data = _encode(".jpg", colour)
    path = tmp_path / "trailer.jpg"
    path.write_bytes(data + b"\x00\x00SEFHtrailer data from a phone" + bytes(range(256)))
    expected = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2GRAY)
    np.testing.assert_array_equal(images.read_image(path), expected)


def test_truncated_jpeg_with_embedded_thumbnail_is_still_refused(tmp_path):
    """An EXIF thumbnail holds its own end-of-image marker; it must not make a cut file look whole."""
    data = _encode(".jpg", _colour_image(120, 100))
    thumbnail = _encode(".jpg", gradient_image(16, 16))
    payload = b"Exif\x00\x00" + thumbnail
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    with_thumbnail = data[:2] + app1 + data[2:]
    whole = tmp_path / "whole.jpg"
    whole.write_bytes(with_thumbnail)
    assert images.read_image(whole).shape == (120, 100)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(with_thumbnail[: len(with_thumbnail) * 2 // 3])
    _assert_bad(cut, "truncated")


# --- bit depths and colour modes ----------------------------------------------------------


def test_16bit_png_is_scaled_to_full_8bit_range(tmp_path):
    # 12-bit detector values stored in a 16-bit PNG: dividing by 256 would give a black image.
    values = np.linspace(200, 3900, 64 * 48).reshape(64, 48).astype(np.uint16)
    path = write_raster(tmp_path / "deep.png", values)
    assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).dtype == np.uint16  # really 16-bit on disk
    info = images.inspect_file(path)
    assert (info.bit_depth, info.channels) == (16, 1)
    result = images.read_image(path)
    assert result.dtype == np.uint8 and result.shape == values.shape
    assert (result.min(), result.max()) == (0, 255)
    expected = (values.astype(np.float64) - 200) / (3900 - 200) * 255
    assert np.abs(result - expected).max() <= 1.0
    assert np.all(np.diff(result.ravel().astype(int)) >= 0)  # order of intensities kept


def test_rgb_png_grayscale_matches_opencv(tmp_path):
    colour = _colour_image()
    path = write_raster(tmp_path / "rgb.png", colour)
    assert images.inspect_file(path).channels == 3
    np.testing.assert_array_equal(images.read_image(path), cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY))


def test_colour_jpeg_grayscale_matches_opencv(tmp_path):
    path = write_raster(tmp_path / "rgb.jpg", _colour_image())
    decoded = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(images.read_image(path), cv2.cvtColor(decoded, cv2.COLOR_BGR2GRAY))


def test_rgba_png_ignores_alpha(tmp_path):
    colour = _colour_image()
    opaque = np.dstack([colour, np.full(colour.shape[:2], 255, np.uint8)])
    see_through = np.dstack([colour, gradient_image(*colour.shape[:2], seed=3)])
    first = images.read_image(write_raster(tmp_path / "opaque.png", opaque))
    second = images.read_image(write_raster(tmp_path / "alpha.png", see_through))
    assert images.inspect_file(tmp_path / "alpha.png").channels == 4
    np.testing.assert_array_equal(first, cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY))
    np.testing.assert_array_equal(second, first)


def test_palette_png_reads_as_its_colours(tmp_path):
    image_module = pytest.importorskip("PIL.Image", reason="Pillow is needed to write a palette PNG")
    rgb = cv2.cvtColor(_colour_image(), cv2.COLOR_BGR2RGB)
    palette_image = image_module.fromarray(rgb).quantize(colors=16)  # 16 colours: 4-bit indices
    path = tmp_path / "palette.png"
    palette_image.save(path)
    assert palette_image.mode == "P" and path.read_bytes()[25] == 3  # IHDR colour type 3 = palette
    expected = cv2.cvtColor(np.asarray(palette_image.convert("RGB")), cv2.COLOR_RGB2GRAY)
    np.testing.assert_array_equal(images.read_image(path), expected)
    info = images.inspect_file(path)
    assert (info.channels, info.bit_depth) == (3, 8)  # the colours are 8-bit RGB, whatever the index size


def test_gray_alpha_png_reads_its_gray_channel(tmp_path):
    image_module = pytest.importorskip("PIL.Image", reason="Pillow is needed to write a gray+alpha PNG")
    gray = gradient_image()
    alpha = gradient_image(seed=5)[:, ::-1]
    path = tmp_path / "la.png"
    image_module.fromarray(np.dstack([gray, alpha]), "LA").save(path)
    assert images.inspect_file(path).channels == 2
    np.testing.assert_array_equal(images.read_image(path), gray)


def test_cmyk_jpeg_reads_like_pillow(tmp_path):
    image_module = pytest.importorskip("PIL.Image", reason="Pillow is needed to write a CMYK JPEG")
    rgb = cv2.cvtColor(_colour_image(), cv2.COLOR_BGR2RGB)
    path = tmp_path / "cmyk.jpg"
    try:
        image_module.fromarray(rgb).convert("CMYK").save(path, "JPEG", quality=95)
    except OSError as exc:  # a Pillow built without CMYK JPEG support
        pytest.skip(f"this Pillow cannot write a CMYK JPEG: {exc}")
    assert images.inspect_file(path).channels == 4
    with image_module.open(path) as written:
        assert written.mode == "CMYK"
        expected = cv2.cvtColor(np.asarray(written.convert("RGB")), cv2.COLOR_RGB2GRAY)
    result = images.read_image(path)
    assert result.shape == expected.shape
    assert np.abs(result.astype(int) - expected).max() <= 2  # not inverted, not channel-swapped


# --- size limits --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (31, 200), (200, 31)])
def test_too_small_images_are_refused(tmp_path, shape):
    path = write_raster(tmp_path / "tiny.png", gradient_image(*shape))
    error = _assert_bad(path, "smaller than")
    assert f"{shape[1]}x{shape[0]}" in error.reason


def test_smallest_allowed_image_reads(tmp_path):
    pixels = gradient_image(images.MIN_SIDE, images.MIN_SIDE)
    np.testing.assert_array_equal(images.read_image(write_raster(tmp_path / "ok.png", pixels)), pixels)


def _png_with_size(width: int, height: int) -> bytes:
    """A real small PNG whose IHDR claims another size, with a correct CRC (as a crafted bomb has)."""
    data = bytearray(_encode(".png", gradient_image(40, 40)))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _jpeg_with_size(width: int, height: int) -> bytes:
    data = bytearray(_encode(".jpg", gradient_image(40, 40)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize("make", [_png_with_size, _jpeg_with_size], ids=["png", "jpeg"])
def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch, make):
    def decode_called(*args, **kwargs):
        raise AssertionError("the pixels were decoded before the size check")

    monkeypatch.setattr(images.cv2, "imdecode", decode_called)
    path = tmp_path / "bomb.png"
    path.write_bytes(make(20000, 20000))
    _assert_bad(path, "20000x20000", "decompression-bomb")


# --- decoding no more pixels than a resize needs (preprocessing) ------------------------------


def _mean_abs_diff(first: np.ndarray, second: np.ndarray) -> float:
    return float(np.abs(first.astype(np.float64) - second.astype(np.float64)).mean())


@pytest.mark.parametrize("at_least, factor", [(113, 8), (114, 4), (225, 4), (226, 2), (451, 1)])  # libjpeg rounds up: 900/8 -> 113
def test_large_jpeg_is_decoded_at_the_smallest_scale_that_keeps_both_sides(at_least, factor):
    colour = cv2.resize(_colour_image(96, 80), (1200, 900), interpolation=cv2.INTER_CUBIC)
    data = _encode(".jpg", colour, [cv2.IMWRITE_JPEG_QUALITY, 95])
    full = images.decode_bytes(data, "big.jpg")
    reduced = images.decode_bytes(data, "big.jpg", at_least=at_least)
    assert reduced.shape == (-(-900 // factor), -(-1200 // factor)) and min(reduced.shape) >= at_least
    if factor == 1:
        np.testing.assert_array_equal(reduced, full)
    # libjpeg's DCT scaling then INTER_AREA looks like the full decode shrunk with INTER_AREA.
    size = (min(at_least, 224), min(at_least, 224))
    assert _mean_abs_diff(cv2.resize(reduced, size, interpolation=cv2.INTER_AREA),
                          cv2.resize(full, size, interpolation=cv2.INTER_AREA)) < 1.0


def test_reduced_jpeg_keeps_its_exif_orientation(tmp_path):
    image_module = pytest.importorskip("PIL.Image", reason="Pillow is needed to write an EXIF orientation")
    upright = cv2.resize(gradient_image(96, 80), (400, 480), interpolation=cv2.INTER_CUBIC)  # 480 high, 400 wide
    stored = np.ascontiguousarray(np.rot90(upright, 1))  # stored on its side; EXIF 6: turn 90 degrees clockwise
    exif = image_module.Exif()
    exif[0x0112] = 6
    path = tmp_path / "sideways.jpg"
    image_module.fromarray(stored).save(path, "JPEG", quality=95, exif=exif)
    data = path.read_bytes()
    full = images.decode_bytes(data, str(path))
    reduced = images.decode_bytes(data, str(path), at_least=100)
    assert full.shape == (480, 400) and reduced.shape == (120, 100)
    assert _mean_abs_diff(full, upright) < 2.0
    assert _mean_abs_diff(cv2.resize(full, (100, 120), interpolation=cv2.INTER_AREA), reduced) < 2.0


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_at_least_leaves_png_and_small_jpeg_exactly_as_read(ext):
    data = _encode(ext, cv2.resize(_colour_image(), (300, 260)))
    np.testing.assert_array_equal(images.decode_bytes(data, "x", at_least=131 if ext == ".jpg" else 32),
                                  images.decode_bytes(data, "x"))


def test_reduced_decoding_keeps_the_checks():
    with pytest.raises(BadFileError, match="truncated JPEG"):
        images.decode_bytes(_encode(".jpg", gradient_image(400, 400))[:-2000], "cut.jpg", at_least=50)
    with pytest.raises(BadFileError, match="decompression-bomb"):
        images.decode_bytes(_jpeg_with_size(20000, 20000), "bomb.jpg", at_least=50)


def test_dicom_is_parsed_once(tmp_path, monkeypatch):
    path = write_dicom(tmp_path / "one.dcm", gradient_image(64, 48))
    calls = []
    real = images.dicom.read_dataset  # (pydicom's dcmread, or the fast reader for an uncompressed file)
    monkeypatch.setattr(images.dicom, "read_dataset", lambda *a, **k: calls.append(1) or real(*a, **k))
    pixels = images.read_image(path)
    assert len(calls) == 1 and pixels.flags.writeable
    view = images.decode_bytes(path.read_bytes(), str(path), writable=False)
    np.testing.assert_array_equal(view, pixels)
    assert len(calls) == 2


# --- inspect_bytes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ext, pixels, channels, bit_depth",
    [
        (".png", gradient_image(70, 50), 1, 8),
        (".png", _colour_image(70, 50), 3, 8),
        (".png", np.dstack([_colour_image(70, 50), gradient_image(70, 50)]), 4, 8),
        (".png", gradient_image(70, 50).astype(np.uint16) * 200, 1, 16),
        (".jpg", gradient_image(70, 50), 1, 8),
        (".jpg", _colour_image(70, 50), 3, 8),
    ],
    ids=["png-gray", "png-rgb", "png-rgba", "png-16bit", "jpeg-gray", "jpeg-colour"],
)
def test_inspect_bytes_reports_the_file(ext, pixels, channels, bit_depth):
    data = _encode(ext, pixels)
    info = images.inspect_bytes(data, f"x{ext}")
    assert info.file_format == {".png": "png", ".jpg": "jpeg"}[ext]
    assert (info.width, info.height) == (50, 70)  # width is the second axis
    assert (info.channels, info.bit_depth) == (channels, bit_depth)
    assert info.sha1 == hashlib.sha1(data).hexdigest()
    assert info.dicom_header is None


def test_inspect_bytes_reports_a_dicom(tmp_path):
    pixels = (np.arange(70 * 50).reshape(70, 50) % 4096).astype(np.uint16)
    data = write_dicom(tmp_path / "a.dcm", pixels, bits=16, patient_id="p-7", view="AP").read_bytes()
    info = images.inspect_bytes(data, "a.dcm")
    assert info.file_format == "dicom"
    assert (info.width, info.height, info.channels, info.bit_depth) == (50, 70, 1, 12)
    assert info.sha1 == hashlib.sha1(data).hexdigest()
    assert info.dicom_header.patient_id == "p-7" and info.dicom_header.view == "AP"


# --- the real files in ../shared/data ---------------------------------------------------------


@pytest.mark.shared_data
def test_every_real_image_is_accepted_and_its_format_agrees_with_pillow(shared_data):
    image_module = pytest.importorskip("PIL.Image", reason="Pillow is the independent format check")
    paths = [p for p in sorted(shared_data.rglob("*")) if p.suffix.lower() in {".png", ".jpg", ".jpeg"}]
    assert len(paths) >= 900  # 960 images in ../shared/data
    for path in paths:
        info = images.inspect_file(path)
        with image_module.open(path) as opened:
            assert info.file_format == {"PNG": "png", "JPEG": "jpeg"}[opened.format], path
            assert (info.width, info.height) == opened.size, path


@pytest.mark.shared_data
def test_real_pngs_named_jpg_read_like_pillow(shared_data):
    image_module = pytest.importorskip("PIL.Image", reason="Pillow is the independent decoder here")
    folder = shared_data / "covid-chestxray-dataset" / "images"
    disguised = []
    for path in sorted(folder.glob("*.jpg")):
        with image_module.open(path) as opened:
            if opened.format == "PNG":
                disguised.append(path)
    if not disguised:
        pytest.skip(f"no PNG named .jpg in {folder}")
    for path in disguised:
        with image_module.open(path) as opened:
            rgb = np.asarray(opened.convert("RGB"))
        expected = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        result = images.read_image(path)
        assert result.shape == expected.shape, path
        assert np.abs(result.astype(int) - expected).max() <= 1, path


# --- hardening round 2: what a path names is checked before it is read -----------------------


def _in_thread(call, timeout_s: float = 20.0, unblock: Path | None = None):
    """``call()`` in a daemon thread: its result or exception, or a test failure (not a hung CI) when it blocks.

    ``unblock``: a named pipe to open for writing (and close) if the call hangs, so the blocked reader ends.
    """
    import os
    import threading

    outcome: dict = {}

    def target():
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        if unblock is not None:
            os.close(os.open(unblock, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"the call was still blocked after {timeout_s} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _preprocess_as_predict(paths):
    """What ``predict_files`` does with its target before the model runs (no model needed)."""
    from types import SimpleNamespace

    from xraylib.predict import collect_image_paths, preprocess_files
    from xraylib.preprocess import PreprocessSettings

    loaded = SimpleNamespace(metadata={"preprocessing": PreprocessSettings(image_size=32).to_dict()})
    images_, frame, _ = preprocess_files(loaded, collect_image_paths(paths))
    return images_, frame


def test_a_named_pipe_is_refused_without_waiting_for_a_writer(tmp_path):
    import os

    folder = tmp_path / "xrays"
    folder.mkdir()
    write_raster(folder / "a.png", gradient_image(48, 40))
    fifo = folder / "b.png"
    os.mkfifo(fifo)
    for read in (images.read_image, images.inspect_file):
        with pytest.raises(BadFileError, match=r"b.png: is a named pipe \(FIFO\), not a regular file"):
            _in_thread(lambda: read(fifo), unblock=fifo)
    # As predict_files' single target, and inside a folder: reported in its row, the other file read.
    for target in (fifo, folder):
        stacked, frame = _in_thread(lambda: _preprocess_as_predict(target), unblock=fifo)
        row = frame.set_index("path").loc[str(fifo)]
        assert not row["ok"] and "named pipe" in row["error"]
    assert len(stacked) == 1 and frame["ok"].sum() == 1


def test_dev_zero_is_refused_without_reading_it():
    with pytest.raises(BadFileError, match=r"/dev/zero: is a character device, not a regular file"):
        _in_thread(lambda: images.read_image("/dev/zero"))
    _, frame = _in_thread(lambda: _preprocess_as_predict("/dev/zero"))
    assert frame["error"].tolist() == ["is a character device, not a regular file; it is not read"]


class _CountingOpener:
    """``open`` that counts the bytes read through it."""

    def __init__(self):
        self.read = 0
        self.opened = 0

    def __call__(self, path, mode):
        self.opened += 1
        f = open(path, mode)
        original = f.read

        def read(size=-1):
            data = original(size)
            self.read += len(data)
            return data

        f.read = read
        return f


def test_a_2gb_file_of_another_kind_is_refused_from_its_first_bytes(tmp_path, monkeypatch):
    big = tmp_path / "notes.png"
    with open(big, "wb") as f:  # sparse: 2 GB that take no disk
        f.write(b"minutes of the meeting\n" * 4)
        f.truncate(2 * 1024**3)
    monkeypatch.setattr(images, "MAX_FILE_BYTES", 4 * 1024**3)  # so the type check, not the size, refuses it
    opener = _CountingOpener()
    with pytest.raises(BadFileError, match=r"notes.png: not a PNG, JPEG or DICOM file \(unrecognised content\)"):
        images.read_image(big, opener=opener)
    assert opener.read <= 4096
    # Over the size limit, it is not even opened.
    monkeypatch.undo()
    opener = _CountingOpener()
    with pytest.raises(BadFileError, match=r"notes.png: file is 2,147,483,648 bytes, over the 536,870,912-byte limit"):
        images.inspect_file(big, opener=opener)
    assert opener.opened == 0
    _, frame = _preprocess_as_predict(big)
    assert "over the 536,870,912-byte limit" in frame["error"][0]
