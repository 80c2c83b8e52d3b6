"""The fast reader for uncompressed DICOMs (xraylib.dicom.read_native) against the general path, on files written
with pydicom.

The general path (pydicom reads the whole file and decodes ``pixel_array``) is the reference: every file here is read
both ways and must give the same header and the same display pixels, or, where the fast reader does not apply, go
the general way (``native_pixels`` is None) with the general path's message.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.dataset import Dataset

from conftest import gradient_image, write_dicom
from xraylib import dicom, fileio, images, ood, predict, preprocess
from xraylib.errors import BadFileError

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR AS")


def _resave(path: Path, change) -> Path:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path, enforce_file_format=True)
    return path


def _general(data: bytes, path: str, monkeypatch) -> tuple[np.ndarray, dicom.DicomHeader]:
    """What the general path (pydicom's full read and ``pixel_array``) gives for the file."""
    with monkeypatch.context() as patch:
        patch.setattr(dicom, "read_native", lambda *args, **kwargs: None)
        ds, header = dicom.read_dataset(data, path)
        assert dicom.native_pixels(ds) is None
        return dicom.decode_dataset(ds, header, path), header


def _same_both_ways(path: Path, monkeypatch, scanned: bool | None = None) -> np.ndarray:
    """The file is read by the fast reader, and gives the general path's header and pixels. ``scanned``: whether
    the fast reader's own scan (no pydicom) must read it, or pydicom's reading up to the pixels."""
    data = path.read_bytes()
    if scanned is not None:
        assert (dicom._scan_plain(data, dicom.DEFAULT_MAX_PIXELS) is not None) is scanned
    ds, header = dicom.read_dataset(data, str(path))
    assert dicom.native_pixels(ds) is not None, "the fast reader was not used"
    fast = dicom.decode_dataset(ds, header, str(path))
    general, general_header = _general(data, str(path), monkeypatch)
    assert header == general_header
    assert fast.dtype == general.dtype == np.uint8 and fast.flags.writeable
    np.testing.assert_array_equal(fast, general)
    view = images.decode_bytes(data, str(path), writable=False)  # as the cache decodes it
    np.testing.assert_array_equal(view, general)
    return fast


def _garbage_high_bits(values: np.ndarray, stored: int, bits: int, seed: int = 0) -> np.ndarray:
    """``values`` (BitsStored ``stored``, two's complement when negative) with random bits above ``stored`` set."""
    unsigned = values.astype(np.int64) & ((1 << stored) - 1)
    noise = np.random.default_rng(seed).integers(0, 1 << (bits - stored), size=values.shape) << stored
    return (unsigned | noise).astype(np.uint16 if bits == 16 else np.uint8)


def _as_stored(ds: Dataset, raw: np.ndarray, stored: int, signed: bool) -> None:
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = stored, stored - 1, int(signed)
    ds.PixelData = raw.tobytes()


GRADIENT = gradient_image(40, 48, seed=3)
TWELVE_BIT = (GRADIENT.astype(np.int32) * 16 + np.arange(48) % 16).astype(np.uint16)  # 0..4095 range, 12 bits


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("case", ["8bit", "8bit-signed", "8bit-7stored", "16bit", "12in16-garbage",
                                  "12in16-signed-garbage", "rescale", "negative-slope", "window", "rescale-window",
                                  "voi-lut-sequence", "modality-lut-sequence"])
@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
@pytest.mark.parametrize("scan", [True, False], ids=["scan", "pydicom-header"])
def test_fast_reader_gives_the_general_paths_pixels(tmp_path, monkeypatch, case, photometric, implicit, scan):
    """Both ways of the fast reader (its own scan for plain files; pydicom's reading up to the pixels for files with
    a display transform, or with the scan switched off here) against the general path."""
    path = tmp_path / f"{case}.dcm"
    bits = 8 if case.startswith("8bit") else 16
    source = GRADIENT if bits == 8 else TWELVE_BIT
    rescale = {"rescale": (0.5, -100.0), "negative-slope": (-2.0, 3000.0), "rescale-window": (1.0, -1024.0)}.get(case)
    window = {"window": (2000.0, 1500.0), "rescale-window": (1000.0, 1200.0)}.get(case)
    write_dicom(path, source, bits=bits, photometric=photometric, rescale=rescale, window=window)

    def change(ds: Dataset) -> None:
        if implicit:
            ds.file_meta.TransferSyntaxUID = uid.ImplicitVRLittleEndian
        if case == "8bit-signed":
            _as_stored(ds, GRADIENT, 8, signed=True)
        elif case == "8bit-7stored":
            _as_stored(ds, _garbage_high_bits(GRADIENT >> 1, 7, 8), 7, signed=False)
        elif case == "16bit":
            _as_stored(ds, (TWELVE_BIT.astype(np.uint32) * 15).astype(np.uint16), 16, signed=False)
        elif case == "12in16-garbage":
            _as_stored(ds, _garbage_high_bits(TWELVE_BIT, 12, 16), 12, signed=False)
        elif case == "12in16-signed-garbage":
            _as_stored(ds, _garbage_high_bits(TWELVE_BIT.astype(np.int32) - 2048, 12, 16), 12, signed=True)
        elif case == "voi-lut-sequence":
            item = Dataset()
            item.LUTDescriptor = [256, 1000, 8]
            item.LUTData = np.array([(i * 7) % 256 for i in range(256)], np.uint16).tobytes()  # not monotonic
            ds.VOILUTSequence = [item]
        elif case == "modality-lut-sequence":
            item = Dataset()
            item.LUTDescriptor, item.ModalityLUTType = [4096, 0, 16], "US"
            item.LUTData = (4095 - np.arange(4096) // 2).astype(np.uint16).tobytes()
            ds.ModalityLUTSequence = [item]

    _resave(path, change)
    assert pydicom.dcmread(path).is_implicit_VR is implicit
    if not scan:
        monkeypatch.setattr(dicom, "_scan_plain", lambda *args: None)
    transformed = rescale or window or "sequence" in case
    _same_both_ways(path, monkeypatch, scanned=scan and not transformed)


@pytest.mark.parametrize("change", ["non-ascii-name", "two-values", "other-vr", "sequence", "frames-1", "nul-padding",
                                    "empty-values"])
def test_headers_the_scan_leaves_to_pydicom_read_the_same(tmp_path, monkeypatch, change):
    """The scan converts plain ASCII values itself; the rest goes to pydicom, with the same header either way."""
    path = write_dicom(tmp_path / f"{change}.dcm", GRADIENT, patient_id="patient 7 ")

    def edit(ds: Dataset) -> None:
        if change == "non-ascii-name":
            ds.SpecificCharacterSet, ds.PatientID = "ISO_IR 100", "M\xfcller"
        elif change == "two-values":
            ds.BodyPartExamined = ["CHEST", "ABDOMEN"]
        elif change == "other-vr":
            ds["PatientID"].VR = "SH"
        elif change == "sequence":
            item = Dataset()
            item.ReferencedSOPInstanceUID = uid.generate_uid()
            ds.ReferencedStudySequence = [item]
            ds["ReferencedStudySequence"].is_undefined_length = True
        elif change == "frames-1":
            ds.NumberOfFrames = 1
        elif change == "nul-padding":  # (some writers pad text with NUL, not a space)
            ds.add_new(0x00100040, "CS", b"F\0")
        elif change == "empty-values":
            ds.PatientAge, ds.ViewPosition = "", ""

    _resave(path, edit)
    if change == "nul-padding":
        assert b"F\0" in path.read_bytes()
    scanned = change in ("frames-1", "nul-padding", "empty-values")
    _same_both_ways(path, monkeypatch, scanned=scanned)


def test_unused_high_bits_are_cleared_as_pydicom_clears_them(tmp_path, monkeypatch):
    """12 bits stored in 16 with the top 4 bits set at random: read as the 12-bit values (sign-extended when signed)."""
    for signed, values in ((False, TWELVE_BIT.astype(np.int32)), (True, TWELVE_BIT.astype(np.int32) - 2048)):
        path = write_dicom(tmp_path / f"g{signed}.dcm", np.zeros((40, 48), np.uint16), bits=16)
        _resave(path, lambda ds: _as_stored(ds, _garbage_high_bits(values, 12, 16, seed=5), 12, signed=signed))
        ds, _ = dicom.read_dataset(path.read_bytes(), str(path))
        np.testing.assert_array_equal(dicom.native_pixels(ds).array(), values)
        np.testing.assert_array_equal(pydicom.dcmread(path).pixel_array, values)


def test_odd_length_8bit_pixels_with_their_padding_byte_are_read_fast(tmp_path, monkeypatch):
    pixels = gradient_image(33, 35, seed=4)
    np.testing.assert_array_equal(_same_both_ways(write_dicom(tmp_path / "odd.dcm", pixels), monkeypatch), pixels)


def _native_or_none(path: Path):
    return dicom.read_native(path.read_bytes())


def test_deflated_and_compressed_files_are_never_read_by_offset(tmp_path, monkeypatch):
    deflated = _resave(write_dicom(tmp_path / "deflated.dcm", GRADIENT),
                       lambda ds: setattr(ds.file_meta, "TransferSyntaxUID", uid.DeflatedExplicitVRLittleEndian))
    jpeg = write_dicom(tmp_path / "jpeg.dcm", GRADIENT, jpeg_quality=95)
    calls = []
    real = dicom._file_dataset
    monkeypatch.setattr(dicom, "_file_dataset", lambda *a, **k: calls.append(k.get("stop_when")) or real(*a, **k))
    for path in (deflated, jpeg):
        assert _native_or_none(path) is None
        ds, header = dicom.read_dataset(path.read_bytes(), str(path))
        assert dicom.native_pixels(ds) is None
        assert images.read_image(path).shape == GRADIENT.shape
    assert all(stop is None for stop in calls), "a deflated or compressed dataset was parsed for the fast reader"
    np.testing.assert_array_equal(images.read_image(deflated), GRADIENT)


@pytest.mark.parametrize("change", ["frames", "rgb", "after-pixels", "float-pixels", "palette", "32bit"])
def test_unusual_files_go_the_general_way(tmp_path, monkeypatch, change):
    path = write_dicom(tmp_path / f"{change}.dcm", GRADIENT)

    def edit(ds: Dataset) -> None:
        if change == "frames":
            ds.NumberOfFrames = 2
            ds.PixelData = np.concatenate([GRADIENT, 255 - GRADIENT]).tobytes()
        elif change == "rgb":
            ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
            ds.PixelData = np.dstack([GRADIENT] * 3).tobytes()
        elif change == "after-pixels":
            ds.DataSetTrailingPadding = b"\0" * 16
        elif change == "float-pixels":
            del ds.PixelData
            ds.BitsAllocated, ds.BitsStored = 32, 32
            ds.FloatPixelData = GRADIENT.astype(np.float32).tobytes()
        elif change == "palette":
            ds.PhotometricInterpretation = "PALETTE COLOR"
        elif change == "32bit":
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
            ds.PixelData = GRADIENT.astype(np.uint32).tobytes()

    _resave(path, edit)
    assert _native_or_none(path) is None
    data = path.read_bytes()
    try:
        expected = _general(data, str(path), monkeypatch)[0]
    except BadFileError as exc:
        with pytest.raises(BadFileError) as got:
            images.decode_bytes(data, str(path))
        assert got.value.reason == exc.reason
        return
    np.testing.assert_array_equal(images.decode_bytes(data, str(path)), expected)


def _messages(data: bytes, path: str, monkeypatch) -> tuple[str, str]:
    """The BadFileError reasons of the fast path and of the general path for the same bytes."""
    with pytest.raises(BadFileError) as fast:
        images.decode_bytes(data, path)
    with monkeypatch.context() as patch:
        patch.setattr(dicom, "read_native", lambda *args, **kwargs: None)
        with pytest.raises(BadFileError) as general:
            images.decode_bytes(data, path)
    return fast.value.reason, general.value.reason


def test_pixel_data_of_the_wrong_length_is_refused_as_before(tmp_path, monkeypatch):
    path = write_dicom(tmp_path / "short.dcm", np.zeros((64, 64), np.uint16), bits=16)
    _resave(path, lambda ds: setattr(ds, "PixelData", bytes(64 * 64 * 2 - 100)))
    assert _native_or_none(path) is None
    fast, general = _messages(path.read_bytes(), str(path), monkeypatch)
    assert fast == general and "DICOM pixel data is 8,092 bytes, but the header declares 8,192" in fast
    # one byte more than the image, at an even length: not its padding
    _resave(path, lambda ds: setattr(ds, "PixelData", bytes(64 * 64 * 2 + 2)))
    assert _native_or_none(path) is None
    fast, general = _messages(path.read_bytes(), str(path), monkeypatch)
    assert fast == general and "8,194 bytes" in fast


def test_a_file_cut_short_is_refused_as_before(tmp_path, monkeypatch):
    data = write_dicom(tmp_path / "cut.dcm", GRADIENT).read_bytes()
    for cut in (data[:-1], data[:-500], data[:-len(GRADIENT.tobytes()) - 4], data[:400]):
        assert dicom.read_native(cut) is None
        fast, general = _messages(cut, "cut.dcm", monkeypatch)
        assert fast == general


def test_the_pixel_limit_still_applies(tmp_path, monkeypatch):
    path = write_dicom(tmp_path / "big.dcm", gradient_image(64, 64))
    assert dicom.read_native(path.read_bytes(), max_pixels=64 * 64) is not None
    assert dicom.read_native(path.read_bytes(), max_pixels=64 * 64 - 1) is None
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    with pytest.raises(BadFileError, match="over the 1,000-pixel limit"):
        images.read_image(path)


def test_preprocessing_uncompressed_dicoms_gives_the_general_paths_cache(tmp_path, monkeypatch):
    import pandas as pd

    paths = [write_dicom(tmp_path / f"{i}.dcm", np.roll(TWELVE_BIT, 7 * i, axis=1), bits=16,
                         photometric=("MONOCHROME1", "MONOCHROME2")[i % 2], patient_id=f"p{i}") for i in range(6)]
    frame = pd.DataFrame({"path": [str(p) for p in paths], "label": ["a", "b"] * 3, "patient_id": [f"p{i}" for i in range(6)],
                          "split": ["train", "train", "val", "val", "test", "test"]})
    settings = preprocess.PreprocessSettings(image_size=32)
    fast = preprocess.preprocess_dataset(frame, tmp_path / "fast", ("a", "b"), settings, workers=2, progress=False)
    monkeypatch.setattr(dicom, "read_native", lambda *args, **kwargs: None)
    general = preprocess.preprocess_dataset(frame, tmp_path / "general", ("a", "b"), settings, workers=1, progress=False)
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(fast.splits[split].images, general.splits[split].images)


def test_large_dicoms_on_a_local_disk_are_mapped_and_give_the_pixels_a_read_gives(tmp_path, monkeypatch):
    import hashlib
    import mmap

    import pandas as pd

    monkeypatch.setattr(fileio, "MAP_MIN_BYTES", 8192)  # (the files here: 20 to 90 KB)
    monkeypatch.setattr(fileio, "file_system", lambda device: "ext4")  # (whatever disk the tests run on)
    paths = [write_dicom(tmp_path / "twelve_bit.dcm", np.tile(TWELVE_BIT, (3, 2)), bits=16),
             write_dicom(tmp_path / "eight_bit_m1.dcm", gradient_image(300, 260), photometric="MONOCHROME1"),
             write_dicom(tmp_path / "jpeg.dcm", gradient_image(300, 260, seed=3), jpeg_quality=95)]
    settings = preprocess.PreprocessSettings(image_size=64)
    maps = []  # what each call of map_file gave

    def spy(*args, **kwargs):
        maps.append(fileio.map_file(*args, **kwargs))
        return maps[-1]

    def mapped_once(result):  # the call took one map of its file
        assert len(maps) == 1 and isinstance(maps.pop(), mmap.mmap)
        return result

    monkeypatch.setattr(images, "map_file", spy)
    for path in paths:
        data = path.read_bytes()
        assert len(data) >= fileio.MAP_MIN_BYTES
        assert mapped_once(images.read_image_bytes(path, map_dicoms=True))[:] == data
        assert images.read_image_bytes(path) == data and not maps  # (not asked for: read)
        np.testing.assert_array_equal(mapped_once(preprocess.preprocess_file(path, settings)),
                                      preprocess.preprocess_bytes(data, str(path), settings))
        np.testing.assert_array_equal(mapped_once(images.read_image(path)), images.decode_bytes(data, str(path)))
        # (the SHA-1 is the map's: the file's)
        assert mapped_once(images.inspect_file(path)) == images.inspect_bytes(data, str(path))
        image, row, facts = mapped_once(predict._read_for_model(path, settings, with_facts=True))
        assert row["ok"] and facts == ood.image_facts(data, str(path))
        np.testing.assert_array_equal(image, preprocess.preprocess_bytes(data, str(path), settings))
    png = tmp_path / "large.png"
    assert cv2.imwrite(str(png), np.random.default_rng(0).integers(0, 256, (200, 200), dtype=np.uint8))
    assert isinstance(images.read_image_bytes(png, map_dicoms=True), bytes)  # PNGs and JPEGs are read
    assert maps.pop() is None
    assert isinstance(images.read_image_bytes(paths[0], opener=lambda p, m: open(p, m), map_dicoms=True), bytes)
    assert not maps  # (another opener, which may inject faults: never mapped)

    frame = pd.DataFrame({"path": [str(p) for p in paths], "label": ["a", "b", "a"], "patient_id": ["p0", "p1", "p2"],
                          "split": ["train", "val", "test"],
                          "sha1": [hashlib.sha1(p.read_bytes()).hexdigest() for p in paths]})
    cached = preprocess.preprocess_dataset(frame, tmp_path / "mapped", ("a", "b"), settings, workers=2, progress=False)
    assert len(maps) == 3 and all(isinstance(m, mmap.mmap) for m in maps)
    assert cached.report.get("skipped", 0) == 0  # (each file's hash checked against the manifest's, on the map)
    monkeypatch.setattr(fileio, "file_system", lambda device: "fuse.drive")
    read = preprocess.preprocess_dataset(frame, tmp_path / "read", ("a", "b"), settings, workers=2, progress=False)
    assert len(maps) == 6 and all(m is None for m in maps[3:])
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(cached.splits[split].images, read.splits[split].images)


# --- the real files in ../shared/data/dicom-samples, stored uncompressed -------------------------------------------


def test_real_files_stored_uncompressed_read_fast_and_monochrome1_is_the_inverse(shared_data, tmp_path, monkeypatch):
    samples = shared_data / "dicom-samples"
    real, fake = samples / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm", samples / "Fake_MONOHR1.dcm"
    if not (real.exists() and fake.exists()):
        pytest.skip("the two sample DICOMs are not in ../shared/data/dicom-samples")
    decoded = {}
    for source in (real, fake):
        ds = pydicom.dcmread(source)
        ds.decompress()  # JPEG Baseline as stored: the same pixels, uncompressed (Explicit VR Little Endian)
        path = tmp_path / source.name
        ds.save_as(path, enforce_file_format=True)
        assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == uid.ExplicitVRLittleEndian
        decoded[source.name] = _same_both_ways(path, monkeypatch)
    np.testing.assert_array_equal(decoded[fake.name], 255 - decoded[real.name])


def test_the_dicom_fast_benchmark_part_runs_on_a_few_small_files(tmp_path):
    """benchmarks/speed.py's dicom_fast part at a tiny size: its timings mean nothing; its pixel check must pass."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import speed
    finally:
        sys.path.pop(0)
    for bits in (8, 16):
        row = speed.bench_dicom_fast(bits, 6, tmp_path, repeats=1, seed=0, size=64)
        assert row["same_pixels_as_general_path"] and row["images_compared"] == 6
        assert set(row["images_per_second"]) == {"plain_loop", "xraylib_1_worker", "xraylib_2_workers",
                                                 "xraylib_2_processes", "xraylib_2_processes_hashes",
                                                 "general_path_2_workers"}  # (same pixels: the hashed run's cache too)
        assert dicom.read_native is not None and dicom.read_native.__name__ == "read_native"  # put back
    assert "Uncompressed DICOMs: the fast reader" in speed.markdown({
        "machine": {"cpu_model": "x", "cores_available": 2, "cores_logical": 2, "tensorflow": "-", "keras": "-",
                    "python": "-", "gpus": []}, "mode": "smoke", "started": "-", "finished": "-", "training": [],
        "preprocessing": [], "inference": [], "dicom_fast": [row]})
