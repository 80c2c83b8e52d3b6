"""Atomic writes and retried reads (xraylib.fileio)."""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from xraylib import fileio
from xraylib.errors import BadFileError


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- atomic writes --------------------------------------------------------------------------


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_writer_failing_midway_leaves_the_old_file(tmp_path, error):
    target = tmp_path / "manifest.csv"
    target.write_text("old,complete\n1,2\n")
    with pytest.raises(type(error)):
        with fileio.atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp != target
            with open(tmp, "w") as f:
                f.write("new,half")
                f.flush()
                raise error
    assert target.read_text() == "old,complete\n1,2\n"
    assert _files(tmp_path) == ["manifest.csv"]  # no temporary file left behind


def test_failed_first_write_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        fileio.write_json_atomic(tmp_path / "out" / "report.json", {"bad": object()})
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_write_json_atomic_replaces_and_converts_numpy(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("{}")
    value = {"n": np.int64(3), "auc": np.float32(0.5), "counts": np.array([1, 2]), "path": tmp_path}
    fileio.write_json_atomic(target, value)
    assert json.loads(target.read_text()) == {"n": 3, "auc": 0.5, "counts": [1, 2], "path": str(tmp_path)}
    assert _files(tmp_path) == ["report.json"]


def test_write_csv_and_npy_atomic(tmp_path):
    frame = pd.DataFrame({"path": ["a.png", "b.png"], "label": ["covid", "normal"]})
    fileio.write_csv_atomic(tmp_path / "deep" / "m.csv", frame)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "deep" / "m.csv"), frame)
    images_uint8 = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    fileio.save_npy_atomic(tmp_path / "x.npy", images_uint8)
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), images_uint8)
    assert _files(tmp_path) == ["deep", "x.npy"] and _files(tmp_path / "deep") == ["m.csv"]


def test_atomic_write_gives_the_permissions_of_a_plain_write(tmp_path):
    # mkstemp makes owner-only (0600) files; an output must be readable like any file the user writes.
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    fileio.write_text_atomic(tmp_path / "atomic.txt", "x")
    mode = stat.S_IMODE(os.stat(tmp_path / "atomic.txt").st_mode)
    assert mode == stat.S_IMODE(os.stat(plain).st_mode)
    assert mode & stat.S_IRUSR and mode & stat.S_IWUSR


# --- whole folders: make_partial_dir, replace_dir, remove_stale_partial_dirs ------------------


def test_partial_dir_is_a_hidden_readable_sibling_named_for_its_process(tmp_path):
    dest = tmp_path / "deep" / "sample_data"
    new = fileio.make_partial_dir(dest)
    assert new.parent == dest.parent and new.is_dir() and not any(new.iterdir())
    assert new.name.startswith(".sample_data.") and new.name.endswith(f".{os.getpid()}.partial")
    assert stat.S_IMODE(new.stat().st_mode) == 0o755


@pytest.mark.parametrize("before", ["absent", "empty", "full"])
def test_replace_dir_puts_the_new_folder_in_place_and_leaves_nothing_beside_it(tmp_path, before):
    dest = tmp_path / "data"
    if before != "absent":
        dest.mkdir()
    if before == "full":
        (dest / "old.txt").write_text("old")
        (dest / "sub").mkdir()
    new = fileio.make_partial_dir(dest)
    (new / "new.txt").write_text("new")
    fileio.replace_dir(new, dest)
    assert _files(tmp_path) == ["data"]
    assert _files(dest) == ["new.txt"] and (dest / "new.txt").read_text() == "new"


def test_remove_stale_partial_dirs_removes_only_dead_leftovers_of_its_own_making(tmp_path):
    dest = tmp_path / "sample_data"
    dest.mkdir()
    (dest / "keep.txt").write_text("the current data")

    def folder(name: str, *contents: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        for item in contents:
            (path / item).mkdir()
        return path

    dead_partial = folder(".sample_data.abcd1234.partial", "rsna-pneumonia")  # no pid: an older version's
    dead_old = folder(".sample_data.efgh5678.old", "data")
    live = folder(f".sample_data.ijkl9012.{os.getpid()}.partial", "rsna-pneumonia")
    foreign_contents = folder(".sample_data.mnop3456.partial", "my-notes")
    other_name = folder(".sample_data.backup", "rsna-pneumonia")
    other_dest = folder(".other.qrst7890.partial", "rsna-pneumonia")
    fileio.remove_stale_partial_dirs(dest, {"rsna-pneumonia", "SAMPLE_DATA.json"})
    assert not dead_partial.exists() and not dead_old.exists()
    assert all(p.is_dir() for p in (live, foreign_contents, other_name, other_dest))
    assert (dest / "keep.txt").read_text() == "the current data"
    fileio.remove_stale_partial_dirs(tmp_path / "absent" / "x", {"a"})  # no parent folder: nothing to do


# --- read_bytes -----------------------------------------------------------------------------


class FlakyOpener:
    """An ``open`` that fails ``failures`` times with ``error`` (as Drive's FUSE mount does), then works."""

    def __init__(self, data: bytes, failures: int, code: int = errno.EIO):
        self.data, self.failures, self.code, self.calls = data, failures, code, 0

    def __call__(self, path: str, mode: str):
        self.calls += 1
        assert mode == "rb"
        if self.calls <= self.failures:
            raise OSError(self.code, os.strerror(self.code), path)
        return io.BytesIO(self.data)


@pytest.mark.parametrize("code", [errno.EIO, errno.EAGAIN, errno.ESTALE, errno.ETIMEDOUT])
def test_transient_errors_are_retried(code):
    opener = FlakyOpener(b"pixels", failures=2, code=code)
    assert fileio.read_bytes("/drive/a.png", retries=3, backoff_s=0, opener=opener) == b"pixels"
    assert opener.calls == 3


def test_retries_are_bounded_and_the_error_names_the_file():
    opener = FlakyOpener(b"", failures=10**6)
    with pytest.raises(BadFileError) as info:
        fileio.read_bytes("/drive/MyDrive/covid/a.png", retries=3, backoff_s=0, opener=opener)
    assert opener.calls == 4  # the first try and three retries
    assert info.value.path == "/drive/MyDrive/covid/a.png"
    assert "/drive/MyDrive/covid/a.png" in str(info.value) and "4 tries" in str(info.value)
    assert os.strerror(errno.EIO) in str(info.value)


def test_backoff_grows_between_retries(monkeypatch):
    delays: list[float] = []
    monkeypatch.setattr(fileio.time, "sleep", delays.append)
    opener = FlakyOpener(b"ok", failures=3)
    assert fileio.read_bytes("a.png", retries=3, backoff_s=0.2, opener=opener) == b"ok"
    assert len(delays) == 3 and delays[0] == pytest.approx(0.2)
    assert delays[0] < delays[1] < delays[2]


def test_error_during_read_is_retried():
    class FailingRead(io.BytesIO):
        def read(self, *args):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    handles = iter([FailingRead(b"x"), io.BytesIO(b"whole file")])
    assert fileio.read_bytes("a.png", backoff_s=0, opener=lambda path, mode: next(handles)) == b"whole file"


def test_permanent_errors_are_not_retried():
    opener = FlakyOpener(b"", failures=10**6, code=errno.EINVAL)
    with pytest.raises(BadFileError, match="a.png"):
        fileio.read_bytes("a.png", retries=3, backoff_s=0, opener=opener)
    assert opener.calls == 1


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(BadFileError) as info:
        fileio.read_bytes(tmp_path / "gone.png", backoff_s=0)
    assert str(tmp_path / "gone.png") in str(info.value) and "not found" in str(info.value)
    with pytest.raises(BadFileError, match="folder"):
        fileio.read_bytes(tmp_path, backoff_s=0)


def test_read_bytes_and_sha1_of_a_real_file(tmp_path):
    data = bytes(range(256)) * 100
    (tmp_path / "a.bin").write_bytes(data)
    assert fileio.read_bytes(tmp_path / "a.bin") == data
    assert fileio.sha1_file(tmp_path / "a.bin") == hashlib.sha1(data).hexdigest()


def _rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssFile from Linux's /proc")
def test_release_pages_drops_a_mapped_files_pages_from_memory_and_keeps_its_data(tmp_path):
    path = tmp_path / "images.npy"
    np.save(path, (np.arange(48 * 2**20) % 251).astype(np.uint8))  # 48 MB
    mapped = np.load(path, mmap_mode="r")
    total = int(mapped.sum(dtype=np.uint64))  # every page read: now in this process's RSS
    before = _rss_file_kb()
    fileio.release_pages(mapped)
    assert before - _rss_file_kb() > 32 * 1024
    assert int(mapped.sum(dtype=np.uint64)) == total  # read again from the page cache

    writable = np.load(path, mmap_mode="r+")
    writable[:10] = 7
    fileio.release_pages(writable)  # a shared mapping: the written pages stay in the page cache, not lost
    assert (writable[:10] == 7).all()
    del writable
    assert (np.load(path)[:10] == 7).all()

    private = np.load(path, mmap_mode="c")  # copy-on-write: its changes live only in this process's pages
    private[:10] = 9
    fileio.release_pages(private)
    assert (private[:10] == 9).all()
    for other in (np.zeros(3), mapped[1:]):  # in memory, a view of part of a mapping: nothing to do
        fileio.release_pages(other)


# --- memory-mapped reading of large files on local disks ------------------------------------------------------------

_MOUNTS = ("36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"  # (an optional field)
           "40 27 0:52 / /content/drive rw,nosuid,nodev,relatime shared:9 - fuse.drive drive rw,user_id=0\n"
           "41 27 0:60 / /mnt/ram rw,relatime - tmpfs tmpfs rw\n")


posix_only = pytest.mark.skipif(not hasattr(os, "makedev"), reason="device numbers: a POSIX system's")


@posix_only
def test_mount_table_gives_each_devices_file_system_type():
    assert fileio._mount_types(_MOUNTS + "garbage\n\n12 1 x:y / / rw - ext4 /dev/x rw\n") == {
        os.makedev(98, 0): "ext3", os.makedev(0, 52): "fuse.drive", os.makedev(0, 60): "tmpfs"}


@pytest.fixture
def own_mount_table(monkeypatch):
    """A fresh table state for the test (the process's own is put back after it)."""
    monkeypatch.setattr(fileio, "_MOUNTS", {"fd": None, "poll": None, "source": None, "types": {}})
    yield
    if fileio._MOUNTS["fd"] is not None:
        os.close(fileio._MOUNTS["fd"])


@posix_only
def test_file_system_reads_the_table_once_and_again_when_it_is_another(tmp_path, monkeypatch, own_mount_table):
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_text(_MOUNTS)
    second.write_text(_MOUNTS.replace("ext3", "xfs"))
    monkeypatch.setattr(fileio, "MOUNT_INFO", str(first))
    assert fileio.file_system(os.makedev(98, 0)) == "ext3"
    assert fileio.file_system(os.makedev(0, 52)) == "fuse.drive"
    assert fileio.file_system(os.makedev(7, 7)) is None  # not mounted
    first.write_text(_MOUNTS.replace("fuse.drive", "tmpfs"))
    assert fileio.file_system(os.makedev(0, 52)) == "fuse.drive"  # read once (again only when the kernel marks a change)
    monkeypatch.setattr(fileio, "MOUNT_INFO", str(second))
    assert fileio.file_system(os.makedev(98, 0)) == "xfs"
    monkeypatch.setattr(fileio, "MOUNT_INFO", str(tmp_path / "absent"))  # no table (not Linux)
    assert fileio.file_system(os.makedev(98, 0)) is None


@pytest.mark.skipif(not Path(fileio.MOUNT_INFO).exists(), reason="reads Linux's /proc/self/mountinfo")
def test_file_system_of_a_real_mount_is_named():
    assert fileio.file_system(os.stat("/proc").st_dev) == "proc"


def _is_ok(head: bytes) -> bool:
    return head.startswith(b"OK")


def test_map_file_maps_large_files_on_local_disks_and_reads_like_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio, "MAP_MIN_BYTES", 10_000)
    monkeypatch.setattr(fileio, "file_system", lambda device: "ext4")
    data = b"OK" + bytes(range(256)) * 100
    (tmp_path / "big.bin").write_bytes(data)
    mapped = fileio.map_file(tmp_path / "big.bin", _is_ok)
    assert mapped is not None and len(mapped) == len(data)
    assert mapped[:2] == b"OK" and isinstance(mapped[10:20], bytes) and mapped[5] == data[5]
    assert fileio.sha1_bytes(mapped) == hashlib.sha1(data).hexdigest()
    np.testing.assert_array_equal(np.frombuffer(mapped, dtype=np.uint8, offset=2), np.frombuffer(data[2:], np.uint8))
    with pytest.raises(TypeError):
        mapped[0:1] = b"X"  # read-only: the source file cannot be changed through it
    assert (tmp_path / "big.bin").read_bytes() == data


def test_map_file_leaves_other_files_to_be_read(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio, "MAP_MIN_BYTES", 10_000)
    systems = {"type": "ext4"}
    monkeypatch.setattr(fileio, "file_system", lambda device: systems["type"])
    (tmp_path / "big.bin").write_bytes(b"OK" + bytes(20_000))
    (tmp_path / "small.bin").write_bytes(b"OK" + bytes(9_000))
    (tmp_path / "other.bin").write_bytes(b"NO" + bytes(20_000))
    assert fileio.map_file(tmp_path / "small.bin", _is_ok) is None  # under MAP_MIN_BYTES
    assert fileio.map_file(tmp_path / "other.bin", _is_ok) is None  # its head refused
    assert fileio.map_file(tmp_path / "big.bin", _is_ok, max_bytes=15_000) is None  # over the limit: read_bytes says so
    assert fileio.map_file(tmp_path / "absent.bin", _is_ok) is None
    assert fileio.map_file(tmp_path, _is_ok) is None  # a folder
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe")
        assert fileio.map_file(tmp_path / "pipe", _is_ok) is None  # (not opened: opening a FIFO would wait)
    for remote in ("fuse.drive", "nfs", None):  # Drive's mount, a network disk, unknown: a read error there is a SIGBUS
        systems["type"] = remote
        assert fileio.map_file(tmp_path / "big.bin", _is_ok) is None
    systems["type"] = "ext4"
    assert fileio.map_file(tmp_path / "big.bin", _is_ok) is not None
    monkeypatch.setattr(fileio, "MAP_FILES", False)  # switched off: every file read
    assert fileio.map_file(tmp_path / "big.bin", _is_ok) is None
