"""DICOM decoding and header reading (xraylib.dicom) on files written with pydicom.

Expected values come from the pixels each test stores and from the DICOM standard's rules
(modality LUT, window, MONOCHROME1 = inverted), and on the real files in ../shared/data from
the fact that Fake_MONOHR1.dcm is the other file relabelled without inverting its pixels.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.encaps import encapsulate

from conftest import gradient_image, write_dicom
from xraylib import dicom, images
from xraylib.errors import BadFileError

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR AS")

REAL_NAME = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
FAKE_NAME = "Fake_MONOHR1.dcm"


def _full_range_8bit(height: int = 72, width: int = 56, seed: int = 0) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width), dtype=np.uint8)
    pixels[0, 0], pixels[-1, -1] = 0, 255
    return pixels


def _resave(path: Path, change) -> Path:
    """Open a file write_dicom wrote, let ``change(ds)`` edit it, and save it again."""
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path, enforce_file_format=True)
    return path


# --- pixels ---------------------------------------------------------------------------------


def test_monochrome2_8bit_round_trips_exactly(tmp_path):
    pixels = _full_range_8bit()
    path = write_dicom(tmp_path / "m2.dcm", pixels)
    result = images.read_image(path)
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, pixels)
    decoded, header = dicom.decode_dicom(path.read_bytes(), str(path))
    np.testing.assert_array_equal(decoded, pixels)
    assert header.photometric == "MONOCHROME2"


@pytest.mark.parametrize("low, high", [(0, 255), (10, 200), (3, 130)])
def test_monochrome1_reads_as_the_exact_inverse_of_monochrome2(tmp_path, low, high):
    # Plain 8-bit pixels are kept as stored (as a PNG would be); the inverse must stay exact.
    pixels = np.random.default_rng(1).integers(low, high + 1, size=(64, 64), dtype=np.uint8)
    pixels[0, 0], pixels[0, 1] = low, high
    as_m2 = images.read_image(write_dicom(tmp_path / "m2.dcm", pixels, photometric="MONOCHROME2"))
    as_m1 = images.read_image(write_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(as_m2, pixels)
    np.testing.assert_array_equal(as_m1.astype(int), 255 - as_m2.astype(int))
    # In MONOCHROME1 a high stored value is dark: the highest stored pixel reads darkest.
    assert as_m1[0, 1] == 255 - high and as_m1[0, 0] == 255 - low


def test_12bit_in_16bit_is_scaled_to_full_range(tmp_path):
    pixels = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)
    path = write_dicom(tmp_path / "b12.dcm", pixels, bits=16)
    assert pydicom.dcmread(path).BitsStored == 12
    result = images.read_image(path)
    assert (result.min(), result.max()) == (0, 255)  # not 0..15 as a divide by 256 would give
    expected = pixels.astype(np.float64) * 255 / 4095
    assert np.abs(result - expected).max() <= 0.5 + 1e-9


def test_signed_16bit_keeps_negative_values_dark(tmp_path):
    pixels = np.linspace(-2000, 2000, 48 * 40).reshape(48, 40).astype(np.int16)
    pixels[24, :3] = [-1, 0, 1]  # the first and last pixels keep the range -2000..2000
    path = write_dicom(tmp_path / "signed.dcm", pixels, bits=16, signed=True)
    assert pydicom.dcmread(path).PixelRepresentation == 1
    result = images.read_image(path)
    assert (result.min(), result.max()) == (0, 255)
    expected = (pixels.astype(np.float64) + 2000) * 255 / 4000
    assert np.abs(result - expected).max() <= 0.5 + 1e-9
    # Read as unsigned, -1 would be 65535: the brightest pixel instead of a mid-grey one.
    assert 120 < result[24, 0] <= result[24, 1] <= result[24, 2] < 135


def test_negative_rescale_slope_is_applied(tmp_path):
    pixels = (np.arange(40 * 40).reshape(40, 40) * 2).astype(np.uint16)
    plain = images.read_image(write_dicom(tmp_path / "plain.dcm", pixels, bits=16))
    flipped = images.read_image(write_dicom(tmp_path / "slope.dcm", pixels, bits=16, rescale=(-1.0, 3000.0)))
    np.testing.assert_array_equal(flipped.astype(int), 255 - plain.astype(int))


def test_rescale_then_window_clips_outside_the_window(tmp_path):
    stored = np.linspace(0, 1000, 64 * 50).reshape(64, 50).astype(np.uint16)
    path = write_dicom(tmp_path / "win.dcm", stored, bits=16, rescale=(2.0, -1000.0), window=(0.0, 200.0))
    result = images.read_image(path).astype(np.float64)
    values = stored * 2.0 - 1000.0  # the modality LUT: -1000 .. 1000
    # DICOM PS3.3 C.11.2.1.2: below c - 0.5 - (w-1)/2 is the minimum, above c - 0.5 + (w-1)/2 the maximum.
    assert np.all(result[values <= -100.0] == 0)
    assert np.all(result[values > 99.5] == 255)
    inside = (values > -99.0) & (values < 99.0)
    assert inside.sum() > 100
    expected = ((values[inside] + 0.5) / 199.0 + 0.5) * 255
    assert np.abs(result[inside] - expected).max() <= 1.0
    assert 0 < result[inside].min() and result[inside].max() < 255
    # Without the intercept the whole image (0..2000) would sit above the window: all white.
    assert (result == 0).mean() > 0.4


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_plain_8bit_fast_path_gives_the_pixels_of_the_general_path(tmp_path, photometric):
    # Full-range 8-bit pixels: the LUT path's min-max scale is then the identity, so both paths must agree.
    pixels = _full_range_8bit(seed=4)
    plain = images.read_image(write_dicom(tmp_path / "plain.dcm", pixels, photometric=photometric))
    identity = write_dicom(tmp_path / "identity.dcm", pixels, photometric=photometric, rescale=(1.0, 0.0))
    np.testing.assert_array_equal(images.read_image(identity), plain)
    np.testing.assert_array_equal(plain, pixels if photometric == "MONOCHROME2" else 255 - pixels)
    view = images.decode_bytes(identity.read_bytes(), str(identity), writable=False)
    np.testing.assert_array_equal(view, plain)


@pytest.mark.parametrize("dtype, low, high", [(np.uint16, 0, 4095), (np.uint16, 300, 65535), (np.int16, -2000, 2000),
                                              (np.int16, -32768, 32767), (np.uint8, 10, 200), (np.int8, -100, 50)])
def test_integer_scaling_table_gives_the_float64_arithmetic(dtype, low, high):
    values = np.random.default_rng(5).integers(low, high + 1, size=(300, 200)).astype(dtype)
    values[0, 0], values[-1, -1] = low, high
    as_float = values.astype(np.float64)
    expected = np.clip(np.rint((as_float - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(dicom._to_uint8(values), expected)
    np.testing.assert_array_equal(dicom._to_uint8(as_float), expected)
    assert not dicom._to_uint8(np.full((4, 4), 7, dtype=dtype)).any()  # a constant image is black


def test_16_bit_scaling_by_multiply_add_is_taken_only_where_it_gives_the_table_and_falls_back_where_not(monkeypatch):
    taken = []
    real = dicom._scaled_like_table
    monkeypatch.setattr(dicom, "_scaled_like_table", lambda *args: taken.append(real(*args) is not None) or real(*args))
    rng = np.random.default_rng(11)
    for case in range(120):  # 12-bit ranges, wide ones, and signed (CT-like) ones
        dtype = np.int16 if case % 3 == 2 else np.uint16
        low = int(rng.integers(-1024, 0)) if dtype == np.int16 else int(rng.integers(0, 300))
        high = low + int(rng.integers(1000, 4096 if case % 3 == 0 else 30000))
        values = rng.integers(low, high + 1, size=(96, 80)).astype(dtype)
        values[0, 0], values[-1, -1] = low, high
        expected = np.clip(np.rint((values.astype(np.float64) - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(dicom._to_uint8(values), expected)
    # both ways were taken: the multiply-add where it matched the table on every value, the table where a value
    # (a tie between two grey levels) rounds the other way in float32
    assert len(taken) == 120 and 0 < sum(taken) < 120
    taken.clear()
    small = np.array([[0, 1000], [2000, 4095]], dtype=np.uint16)  # fewer values than one vector: the table
    np.testing.assert_array_equal(dicom._to_uint8(small), [[0, 62], [125, 255]])
    assert taken == []


def test_decoding_in_threads_leaves_the_warning_filters_as_they_were(tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    import warnings

    data = write_dicom(tmp_path / "a.dcm", gradient_image(64, 48)).read_bytes()
    before = list(warnings.filters)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: dicom.decode_dicom(data, "a.dcm"), range(200)))
    assert warnings.filters == before


def test_multiframe_returns_the_first_frame(tmp_path):
    first = _full_range_8bit(seed=2)
    second = 255 - _full_range_8bit(seed=3)

    def two_frames(ds):
        ds.NumberOfFrames = 2
        ds.PixelData = np.stack([first, second]).tobytes()

    path = _resave(write_dicom(tmp_path / "frames.dcm", first), two_frames)
    assert pydicom.dcmread(path).pixel_array.shape == (2, *first.shape)
    np.testing.assert_array_equal(images.read_image(path), first)
    assert images.inspect_file(path).dicom_header.frames == 2


def test_rgb_dicom_reads_as_gray(tmp_path):
    rgb = np.dstack([_full_range_8bit(seed=4), _full_range_8bit(seed=5), _full_range_8bit(seed=6)])

    def make_rgb(ds):
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.PixelData = rgb.tobytes()

    path = _resave(write_dicom(tmp_path / "rgb.dcm", rgb[..., 0]), make_rgb)
    result = images.read_image(path).astype(np.float64)
    luma = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    expected = (luma - luma.min()) * 255 / (luma.max() - luma.min())
    assert np.abs(result - expected).max() <= 0.5 + 1e-9


# --- JPEG Baseline DICOMs (how the RSNA files are stored) -----------------------------------


def _pydicom_not_called(monkeypatch) -> None:
    """Make pydicom's pixel decoding fail the test: what follows must take the JPEG frame path."""
    def refuse(*args, **kwargs):
        raise AssertionError("pydicom's decoder was called")

    monkeypatch.setattr(dicom, "decode_dataset", refuse)


def _with_frame(path: Path, frame: bytes) -> Path:
    """Replace a JPEG Baseline DICOM's frame with ``frame``."""
    def change(ds):
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"

    return _resave(path, change)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_jpeg_baseline_dicom_gives_pydicoms_pixels(tmp_path, monkeypatch, photometric):
    # xraylib decodes the JPEG frame with OpenCV; pydicom with Pillow: both are libjpeg, the pixels must agree.
    pixels = gradient_image(300, 260, seed=7)
    path = write_dicom(tmp_path / "rsna.dcm", pixels, photometric=photometric, jpeg_quality=90)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == uid.JPEGBaseline8Bit
    stored = pydicom.dcmread(path).pixel_array
    assert 0 < np.abs(stored.astype(int) - pixels).max() < 40  # JPEG loss: stored as given less the loss
    via_pydicom = dicom.decode_dicom(path.read_bytes(), str(path))[0]
    _pydicom_not_called(monkeypatch)
    result = images.read_image(path)
    np.testing.assert_array_equal(result, stored if photometric == "MONOCHROME2" else 255 - stored)
    np.testing.assert_array_equal(result, via_pydicom)


def test_jpeg_baseline_dicom_ignores_an_exif_orientation_in_its_frame(tmp_path, monkeypatch):
    # DICOM has its own orientation; pydicom does not apply an EXIF tag inside the frame, and neither may OpenCV.
    import io

    from PIL import Image

    pixels = gradient_image(120, 100, seed=10)
    exif = Image.Exif()
    exif[0x0112] = 3  # Orientation: rotate 180
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    path = _with_frame(write_dicom(tmp_path / "exif.dcm", pixels, jpeg_quality=95), buffer.getvalue())
    stored = pydicom.dcmread(path).pixel_array
    assert np.abs(stored.astype(int) - pixels).mean() < 2  # as stored, not rotated
    _pydicom_not_called(monkeypatch)
    np.testing.assert_array_equal(images.read_image(path), stored)


def test_signed_jpeg_baseline_dicom_goes_through_the_luts(tmp_path):
    # PixelRepresentation 1: pydicom gives int8 values, which the LUT path scales; a plain JPEG decode would not.
    pixels = gradient_image(120, 100, seed=11)
    path = write_dicom(tmp_path / "signed.dcm", pixels, jpeg_quality=95, signed=True)
    stored = pydicom.dcmread(path).pixel_array
    assert stored.dtype == np.int8
    np.testing.assert_array_equal(images.read_image(path), dicom._to_uint8(stored))


def test_jpeg_baseline_dicom_is_preprocessed_as_the_same_jpeg_file(tmp_path):
    # The frame of a JPEG Baseline DICOM is a JPEG file: stored either way, the same model input,
    # decoded at a reduced scale for a large image (1024 px at 224: 1/2) exactly as the JPEG file is.
    from xraylib.preprocess import PreprocessSettings, preprocess_bytes, resize_image

    pixels = cv2.resize(gradient_image(256, 256, seed=8), (1024, 1024), interpolation=cv2.INTER_CUBIC)
    path = write_dicom(tmp_path / "large.dcm", pixels, jpeg_quality=95)
    frame = next(pydicom.encaps.generate_frames(pydicom.dcmread(path).PixelData, number_of_frames=1))
    settings = PreprocessSettings(image_size=224)
    as_dicom = preprocess_bytes(path.read_bytes(), str(path), settings)
    np.testing.assert_array_equal(as_dicom, preprocess_bytes(frame, "frame.jpg", settings))
    full = resize_image(pydicom.dcmread(path).pixel_array, 224)
    assert 0 < np.abs(as_dicom.astype(int) - full).mean() < 1.0  # reduced, and within a grey level of a full decode


def test_jpeg_baseline_dicom_with_a_window_goes_through_the_luts(tmp_path):
    pixels = gradient_image(120, 100, seed=9)
    plain = images.read_image(write_dicom(tmp_path / "plain.dcm", pixels, jpeg_quality=95))
    windowed = images.read_image(write_dicom(tmp_path / "window.dcm", pixels, jpeg_quality=95, window=(100, 80)))
    stored = plain.astype(float)
    inside = (stored > 70) & (stored < 130)
    assert (windowed[stored <= 55] == 0).all() and (windowed[stored >= 145] == 255).all()
    assert windowed[inside].std() > plain[inside].std()  # the window stretches its range


def _without_segments(jpeg: bytes, marker: int) -> bytes:
    """``jpeg`` with every header segment of type ``marker`` (e.g. 0xDB, the quantisation tables) removed."""
    out, pos = bytearray(jpeg[:2]), 2
    while jpeg[pos + 1] != 0xDA:  # up to the start of scan
        length = int.from_bytes(jpeg[pos + 2:pos + 4], "big")
        if jpeg[pos + 1] != marker:
            out += jpeg[pos:pos + 2 + length]
        pos += 2 + length
    return bytes(out + jpeg[pos:])


def test_jpeg_baseline_dicom_whose_frame_opencv_refuses_is_reported(tmp_path):
    # Headers complete (frame size, end marker) but no quantisation tables: OpenCV refuses the frame, pydicom is
    # asked, and its failure is reported as a damaged file, naming it.
    path = write_dicom(tmp_path / "no_tables.dcm", gradient_image(64, 64), jpeg_quality=90)
    frame = next(pydicom.encaps.generate_frames(pydicom.dcmread(path).PixelData, number_of_frames=1))
    broken = _without_segments(frame, 0xDB)
    assert len(broken) < len(frame) and cv2.imdecode(np.frombuffer(broken, np.uint8), cv2.IMREAD_GRAYSCALE) is None
    _with_frame(path, broken)
    with pytest.raises(BadFileError) as info:
        images.read_image(path)
    message = str(info.value)
    assert str(path) in message and "JPEG Baseline" in message and "damaged" in message, message


def test_jpeg_baseline_dicom_whose_size_disagrees_with_its_frame_is_left_to_pydicom(tmp_path, monkeypatch):
    path = write_dicom(tmp_path / "rows.dcm", gradient_image(64, 64), jpeg_quality=90)

    def taller(ds):
        ds.Rows = 80

    _resave(path, taller)
    called = []
    real_decode = dicom.decode_dataset
    monkeypatch.setattr(dicom, "decode_dataset", lambda *a, **k: called.append(1) or real_decode(*a, **k))
    with pytest.raises(BadFileError) as info:
        images.read_image(path)
    assert called and str(path) in str(info.value)


def test_jpeg_baseline_dicom_with_a_damaged_frame_is_reported(tmp_path):
    path = write_dicom(tmp_path / "damaged.dcm", gradient_image(64, 64), jpeg_quality=90)
    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xc0" + b"not a JPEG frame" * 8])
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(BadFileError) as info:
        images.read_image(path)
    message = str(info.value)
    assert str(path) in message and "JPEG Baseline" in message and "damaged" in message, message


def test_a_decoders_message_names_no_python_object(tmp_path):
    """pydicom's Pillow plugin says "cannot identify image file <_io.BytesIO object at 0x7f...>" for a frame that is
    not JPEG: the message says "the file" instead, in every caller (predict, manifest, the web page)."""
    path = write_dicom(tmp_path / "frame.dcm", gradient_image(64, 64), jpeg_quality=90)
    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate([b"\xff\xd8 not a JPEG frame \xff\xd9"])
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(BadFileError) as info:
        images.read_image(path)
    assert "object at 0x" not in str(info.value) and "BytesIO" not in str(info.value), str(info.value)


def test_a_damaged_pixel_data_element_is_a_damaged_header_not_a_crash(tmp_path):
    """One flipped byte in PixelData's value representation: pydicom fails only when the element is read (by the
    pixel-length check, before decoding); found by fuzzing the header bytes."""
    path = write_dicom(tmp_path / "vr.dcm", gradient_image(64, 64), bits=16)
    data = bytearray(path.read_bytes())
    at = data.rfind(b"\xe0\x7f\x10\x00")  # the (7FE0,0010) tag, then its two VR bytes
    data[at + 4:at + 6] = b"\x4f\xfd"
    path.write_bytes(bytes(data))
    with pytest.raises(BadFileError, match=r"damaged DICOM header \(NotImplementedError: Unknown Value Representation"):
        images.read_image(path)


# --- files that cannot be decoded ---------------------------------------------------------


def test_dicom_without_pixel_data_is_refused(tmp_path):
    path = write_dicom(tmp_path / "header_only.dcm", _full_range_8bit(), with_pixels=False)
    for call in (images.read_image, lambda p: dicom.decode_dicom(Path(p).read_bytes(), str(p))):
        with pytest.raises(BadFileError) as info:
            call(path)
        assert "no pixel data" in str(info.value) and str(path) in str(info.value)
    assert dicom.read_header(path.read_bytes()).has_pixels is False


def _with_fake_compressed_pixels(path: Path, syntax: uid.UID) -> Path:
    def compress(ds):
        ds.file_meta.TransferSyntaxUID = syntax
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51 not a real codestream" * 8])
        ds["PixelData"].VR = "OB"

    return _resave(path, compress)


def _decoder_installed(syntax: uid.UID) -> bool:
    return pydicom.pixels.get_decoder(syntax).is_available


@pytest.mark.parametrize(
    "syntax, package",
    [
        (uid.JPEG2000Lossless, "pylibjpeg-openjpeg"),
        (uid.JPEGLSLossless, "pyjpegls"),
        (uid.HTJ2KLossless, "pylibjpeg-openjpeg"),
    ],
    ids=["jpeg2000", "jpeg-ls", "htj2k"],
)
def test_compression_without_a_decoder_names_the_package_to_install(tmp_path, monkeypatch, syntax, package):
    decoder = pydicom.pixels.get_decoder(syntax)
    if decoder.is_available:
        # Pillow with OpenJPEG decodes JPEG 2000 here; hide it, as on a machine without it.
        if not isinstance(getattr(decoder, "_available", None), dict):
            pytest.skip(f"a decoder for {syntax.name} is installed and this pydicom's cannot be hidden")
        monkeypatch.setattr(decoder, "_available", {})
        monkeypatch.setitem(decoder._unavailable, "pillow", ("pillow with OpenJPEG",))
    assert not _decoder_installed(syntax)
    path = _with_fake_compressed_pixels(write_dicom(tmp_path / "compressed.dcm", _full_range_8bit()), syntax)
    with pytest.raises(BadFileError) as info:
        images.read_image(path)
    message = str(info.value)
    assert str(path) in message and syntax.name in message
    assert "pip install" in message and package in message, message


def test_damaged_data_with_an_installed_decoder_is_not_blamed_on_a_missing_package(tmp_path):
    # pydicom decodes RLE itself, so a failure means the data is damaged: "pip install" would mislead.
    assert _decoder_installed(uid.RLELossless)
    path = _with_fake_compressed_pixels(write_dicom(tmp_path / "rle.dcm", _full_range_8bit()), uid.RLELossless)
    with pytest.raises(BadFileError) as info:
        images.read_image(path)
    message = str(info.value)
    assert str(path) in message and "damaged" in message and "pip install" not in message
    assert "\n" not in message  # one line, for reports and the CLI


def test_dicom_cut_short_is_refused(tmp_path):
    data = write_dicom(tmp_path / "whole.dcm", _full_range_8bit(200, 200)).read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadFileError) as info:
        images.read_image(path)
    assert str(path) in str(info.value)


def test_decode_dicom_refuses_other_files(tmp_path):
    png = tmp_path / "a.png"
    cv2.imwrite(str(png), gradient_image())
    with pytest.raises(BadFileError) as info:
        dicom.decode_dicom(png.read_bytes(), str(png))
    assert "not a DICOM" in str(info.value) and str(png) in str(info.value)


# --- header -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, years",
    [
        ("043Y", 43.0), ("6M", 0.5), ("43", 43.0), (" 62 ", 62.0), ("104W", 104 / 52.1775), ("365D", 365 / 365.25),
        ("", None), ("   ", None), (None, None), ("garbage", None), ("Y", None), ("200Y", None), ("-5", None),
    ],
)
def test_parse_age(value, years):
    result = dicom.parse_age(value)
    if years is None:
        assert result is None
    else:
        assert result == pytest.approx(years)


def test_header_fields_are_read(tmp_path):
    pixels = (np.arange(70 * 50).reshape(70, 50) % 4096).astype(np.uint16)
    path = write_dicom(tmp_path / "h.dcm", pixels, bits=16, patient_id="abc-123", sex="M", age="071Y", view="AP",
                       modality="DX", photometric="MONOCHROME1")
    header = dicom.read_header(path.read_bytes(), str(path))
    assert (header.patient_id, header.sex, header.age, header.view) == ("abc-123", "M", 71.0, "AP")
    assert (header.modality, header.body_part, header.photometric) == ("DX", "CHEST", "MONOCHROME1")
    assert (header.rows, header.columns, header.bits_stored, header.frames) == (70, 50, 12, 1)
    assert header.has_pixels and header.transfer_syntax == "Explicit VR Little Endian"


def test_missing_header_fields_are_none(tmp_path):
    def strip(ds):
        for keyword in ("PatientSex", "PatientAge", "ViewPosition"):
            delattr(ds, keyword)
        ds.PatientID = ""

    path = _resave(write_dicom(tmp_path / "bare.dcm", _full_range_8bit()), strip)
    header = dicom.read_header(path.read_bytes())
    assert (header.patient_id, header.sex, header.age, header.view) == (None, None, None, None)


# --- the real files in ../shared/data -------------------------------------------------------


@pytest.fixture
def real_dicoms(shared_data) -> tuple[Path, Path]:
    folder = shared_data / "dicom-samples"
    real, fake = folder / REAL_NAME, folder / FAKE_NAME
    if not (real.is_file() and fake.is_file()):
        pytest.skip(f"{folder} does not hold {REAL_NAME} and {FAKE_NAME}")
    return real, fake


@pytest.mark.shared_data
def test_real_monochrome2_dicom(real_dicoms):
    real, _ = real_dicoms
    result = images.read_image(real)
    assert result.shape == (1024, 1024) and result.dtype == np.uint8
    header = images.inspect_file(real).dicom_header
    assert (header.age, header.view, header.photometric, header.rows, header.columns) == (62.0, "PA", "MONOCHROME2", 1024, 1024)
    assert header.patient_id and header.sex in ("M", "F")
    # Plain 8-bit MONOCHROME2 without LUTs: the stored pixels themselves, nothing inverted or stretched
    # (JPEG Baseline, as all RSNA files: decoded by OpenCV to pydicom's pixels).
    assert pydicom.dcmread(real, stop_before_pixels=True).file_meta.TransferSyntaxUID == uid.JPEGBaseline8Bit
    np.testing.assert_array_equal(result, pydicom.dcmread(real).pixel_array)


@pytest.mark.shared_data
def test_fake_monochrome1_reads_as_the_exact_inverse(real_dicoms):
    real, fake = real_dicoms
    real_header, fake_header = (images.inspect_file(p).dicom_header for p in (real, fake))
    assert fake_header.photometric == "MONOCHROME1" and real_header.photometric == "MONOCHROME2"
    as_real, as_fake = images.read_image(real), images.read_image(fake)
    assert as_fake.shape == (1024, 1024)
    np.testing.assert_array_equal(as_fake.astype(int), 255 - as_real.astype(int))
    assert (fake_header.age, fake_header.view) == (62.0, "PA")


# --- hardening round 2: deflated files, pixel data length, frames ---------------------------


def _deflated(path: Path, pixel_data: bytes | None = None, rows_cols: tuple[int, int] | None = None) -> Path:
    """Resave a write_dicom file as Deflated Explicit VR Little Endian (pydicom deflates it), optionally with
    other pixel data or another declared size."""
    def change(ds):
        ds.file_meta.TransferSyntaxUID = uid.DeflatedExplicitVRLittleEndian
        if pixel_data is not None:
            ds.PixelData = pixel_data
        if rows_cols is not None:
            ds.Rows, ds.Columns = rows_cols
    return _resave(path, change)


def test_a_deflated_dicom_reads_as_its_pixels(tmp_path):
    pixels = _full_range_8bit(96, 80, seed=11)
    path = _deflated(write_dicom(tmp_path / "deflated.dcm", pixels))
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == uid.DeflatedExplicitVRLittleEndian
    np.testing.assert_array_equal(images.read_image(path), pixels)
    info = images.inspect_file(path)
    assert (info.width, info.height) == (80, 96)
    assert info.dicom_header.transfer_syntax_uid == uid.DeflatedExplicitVRLittleEndian


def test_a_deflated_dicom_bomb_is_refused_without_inflating_it(tmp_path):
    """512x512 declared, 64 MB of zeros deflated to about 64 KB: refused after inflating a few MB, not 64 MB."""
    import tracemalloc

    path = _deflated(write_dicom(tmp_path / "bomb.dcm", np.zeros((512, 512), np.uint8)), pixel_data=bytes(64 * 1024**2))
    data = path.read_bytes()
    assert len(data) < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(BadFileError, match="inflates past the 4,456,448 bytes that its header's image size needs"):
            images.inspect_bytes(data, "bomb.dcm")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024**2, f"peak {peak:,} bytes while refusing a deflate bomb"


def test_a_deflated_dicom_is_never_inflated_past_the_pixel_limit(tmp_path, monkeypatch):
    """A header that does not fit the first inflated block leaves the general bound: MAX_PIXELS 16-bit RGB pixels."""
    monkeypatch.setattr(dicom, "_INFLATE_FIRST", 64)  # the header no longer fits: only the general bound applies
    monkeypatch.setattr(dicom, "INFLATE_SLACK_BYTES", 1024)
    monkeypatch.setattr(images, "MAX_PIXELS", 500_000)  # so the bound is 3 MB, not 360 MB
    path = _deflated(write_dicom(tmp_path / "bomb.dcm", np.zeros((512, 512), np.uint8)), pixel_data=bytes(8 * 1024**2))
    with pytest.raises(BadFileError, match=r"inflates past the 3,001,024-byte limit for an image of at most 500,000 pix"):
        images.read_image(path)
    ok = _deflated(write_dicom(tmp_path / "ok.dcm", _full_range_8bit(64, 64)))
    np.testing.assert_array_equal(images.read_image(ok), _full_range_8bit(64, 64))


def _dataset_offset(data: bytes) -> int:
    """Where the (deflated) dataset starts: after the preamble and the file meta."""
    import io

    from pydicom.filereader import _read_file_meta_info, read_preamble

    fp = io.BytesIO(data)
    read_preamble(fp, False)
    _read_file_meta_info(fp)
    return fp.tell()


def test_a_damaged_deflated_stream_is_reported(tmp_path):
    path = _deflated(write_dicom(tmp_path / "d.dcm", _full_range_8bit(64, 64)))
    data = path.read_bytes()
    start = _dataset_offset(data)
    with pytest.raises(BadFileError, match="damaged deflated DICOM file .zlib: .*invalid block type"):
        images.inspect_bytes(data[:start] + b"\xff" * 8 + data[start + 8:], "d.dcm")
    with pytest.raises(BadFileError, match="DICOM pixel data is .* bytes, but the header declares 4,096"):  # cut short
        images.inspect_bytes(data[:-1500], "d.dcm")


@pytest.mark.parametrize("deflate", [False, True])
def test_pixel_data_that_is_not_the_declared_size_is_refused_naming_both(tmp_path, deflate):
    pixels = np.zeros((64, 64), np.uint16)
    path = write_dicom(tmp_path / "short.dcm", pixels, bits=16)
    path = _resave(path, lambda ds: setattr(ds, "PixelData", bytes(64 * 64 * 2 - 100)))
    if deflate:
        path = _deflated(path)
    message = (r"DICOM pixel data is 8,092 bytes, but the header declares 8,192 \(64x64 pixels x 1 samples x 16 bits "
               r"x 1 frame\(s\)\)")
    with pytest.raises(BadFileError, match=message):
        images.inspect_file(path)
    with pytest.raises(BadFileError, match=message):
        images.read_image(path)


def test_odd_length_pixel_data_with_its_padding_byte_is_read(tmp_path):
    pixels = _full_range_8bit(33, 33, seed=12)  # 1,089 bytes, stored padded to 1,090
    path = write_dicom(tmp_path / "odd.dcm", pixels)
    assert len(pydicom.dcmread(path).PixelData) in (1089, 1090)
    np.testing.assert_array_equal(images.read_image(path), pixels)


def test_frames_without_number_of_frames_are_refused_saying_so(tmp_path):
    """Was: "image is 512x20 pixels, smaller than 32x32". xraylib refuses the file (it does not guess a frame)."""
    frames = np.zeros((20, 512, 512), np.uint8)
    path = _resave(write_dicom(tmp_path / "frames.dcm", frames[0]), lambda ds: setattr(ds, "PixelData", frames.tobytes()))
    with pytest.raises(BadFileError, match="pixel data holds 20 frames of 512x512 pixels but NumberOfFrames is missing"):
        images.read_image(path)


def test_manifest_and_preprocessing_report_a_deflate_bomb_and_go_on(tmp_path):
    from xraylib import manifest, preprocess

    good = write_dicom(tmp_path / "good.dcm", _full_range_8bit(64, 64))
    bomb = _deflated(write_dicom(tmp_path / "bomb.dcm", np.zeros((64, 64), np.uint8)), pixel_data=bytes(32 * 1024**2))
    found = manifest.inspect_files([str(good), str(bomb)], workers=1, progress=False)
    assert isinstance(found[str(good)], images.ImageInfo)
    assert "inflates past" in found[str(bomb)]
    settings = preprocess.PreprocessSettings(image_size=32)
    assert preprocess.preprocess_file(good, settings).shape == (32, 32)
    with pytest.raises(BadFileError, match="inflates past"):
        preprocess.preprocess_file(bomb, settings)


def test_a_16bit_rgb_dicom_is_made_gray_without_float64_copies_of_the_whole_image(tmp_path):
    """1024x1024 16-bit RGB is 6 MB as stored (parsing and pydicom's decoding take about 4 times that); whole-image
    float64 copies took about 40 MB more."""
    import tracemalloc

    rng = np.random.default_rng(13)
    rgb = rng.integers(0, 65536, size=(1024, 1024, 3), dtype=np.uint16)

    def make_rgb(ds):
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsStored, ds.HighBit = 16, 15
        ds.PixelData = rgb.tobytes()

    data = _resave(write_dicom(tmp_path / "rgb16.dcm", rgb[..., 0], bits=16), make_rgb).read_bytes()
    tracemalloc.start()
    try:
        gray = images.decode_bytes(data, "rgb16.dcm")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    luma = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    expected = np.clip(np.rint((luma - luma.min()) * (255.0 / (luma.max() - luma.min()))), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(gray, expected)  # the same arithmetic as converting the whole image at once
    assert peak < 6 * rgb.nbytes, f"peak {peak:,} bytes for a {rgb.nbytes:,}-byte image"
