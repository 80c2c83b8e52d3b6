"""Small file helpers used by every stage: atomic writes, content hashes, bounded retries.

Outputs are written to a temporary name in the destination folder and renamed into place,
so that an interruption (a Colab disconnect, a kill) leaves either the old file or the new
one, never half of one; a whole folder is built beside its destination and swapped in with
:func:`replace_dir`. Source files are only ever opened for reading.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
import re
import select
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Collection, Iterator

import numpy as np
import pandas as pd

from .errors import BadFileError, ConfigError

#: Errors that Google Drive's FUSE mount raises transiently; reads are retried on these.
TRANSIENT_ERRNOS = {5, 11, 16, 110, 116}  # EIO, EAGAIN, EBUSY, ETIMEDOUT, ESTALE
#: :func:`read_bytes` refuses a larger file before reading it (2 GiB: far above any file xraylib reads whole;
#: image readers pass :data:`xraylib.images.MAX_FILE_BYTES`, which is smaller).
MAX_FILE_BYTES = 2 * 1024**3


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: The mode a plain ``open(path, "w")`` gives a new file. mkstemp creates its file 0600 (owner
#: only); outputs get this mode instead. Read once at import: os.umask can only be read by setting it.
_NEW_FILE_MODE = 0o666 & ~_umask()


class WriteError(ConfigError, OSError):
    """An output cannot be written: a full disk, a folder or a device where the file should go, no permission.

    One line naming the file (``path``) and what to do, instead of a traceback; still an :class:`OSError` (with
    the ``errno`` of the failure, None for a refusal up front), so callers that carry on without an optional
    output (``except OSError``) go on doing so.
    """

    def __init__(self, path: str | os.PathLike, reason: str, error_number: int | None = None):
        super().__init__(error_number, reason)
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


#: What to do about each write failure the user can fix; any other OSError is left as it is.
WRITE_ERRNO_HINTS = {
    errno.ENOSPC: "free some space, or write elsewhere",
    errno.EDQUOT: "free some space, or write elsewhere",
    errno.EISDIR: "a folder is in the way: name a file",
    errno.ENOTDIR: "part of the path is a file, not a folder",
    errno.EEXIST: "part of the path is a file, not a folder",
    errno.EACCES: "no permission to write there: write elsewhere",
    errno.EPERM: "no permission to write there: write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
}


def write_error(path: str | os.PathLike, exc: OSError) -> OSError:
    """``exc`` as a :class:`WriteError` naming ``path`` when it is a failure in :data:`WRITE_ERRNO_HINTS`, else ``exc``."""
    if isinstance(exc, WriteError) or exc.errno not in WRITE_ERRNO_HINTS:
        return exc
    return WriteError(path, f"cannot be written ({exc.strerror or exc}); {WRITE_ERRNO_HINTS[exc.errno]}", exc.errno)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was. A full disk, a folder in the
    way or a missing permission is one :class:`WriteError` naming ``path``. A ``path`` that exists and is not a
    regular file (a folder, ``/dev/null``, a FIFO) is refused before anything is written: the rename would
    replace it (run as root, as on Colab, even a device; through a symbolic link, the link).
    """
    if os.path.exists(path) and not os.path.isfile(path):
        what = "a folder" if os.path.isdir(path) else "not a regular file (a device, a FIFO or a socket)"
        raise WriteError(path, f"is {what}; name a file to write")
    try:
        with _atomic_path(path) as tmp:
            yield tmp
    except OSError as exc:
        raise write_error(path, exc) from None


@contextlib.contextmanager
def _atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _NEW_FILE_MODE)
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_csv_atomic(path: str | os.PathLike, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def make_partial_dir(dest: str | os.PathLike) -> Path:
    """A new empty folder beside ``dest`` to build its next contents in, then pass to :func:`replace_dir`.

    Named ``.<dest name>.<random>.<pid>.partial`` (hidden, and recognisable by
    :func:`remove_stale_partial_dirs` if the process is killed), mode 0755. Creates ``dest``'s parent.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=f".{os.getpid()}.partial", dir=dest.parent))
    new.chmod(0o755)  # mkdtemp makes it private; outputs are not secret
    return new


def replace_dir(new: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Rename the folder ``new`` onto ``dest`` (a sibling), replacing whatever folder ``dest`` was.

    A non-empty old ``dest`` is first renamed aside (``.<dest name>.<random>.<pid>.old``), then
    removed, so at every moment ``dest`` is either the whole old folder or the whole new one
    (absent only between the two renames).
    """
    new, dest = Path(new), Path(dest)
    if dest.exists() and any(dest.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=f".{os.getpid()}.old", dir=dest.parent))
        os.replace(dest, old / "data")
        os.replace(new, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if dest.exists():
            dest.rmdir()
        os.replace(new, dest)


def remove_stale_partial_dirs(dest: str | os.PathLike, partial_contents: Collection[str]) -> None:
    """Remove the folders that killed earlier :func:`make_partial_dir` / :func:`replace_dir` calls left beside ``dest``.

    Only folders named as those two name them, whose process is gone (a folder of a live process,
    say another notebook writing the same data right now, is left alone), and that hold nothing
    but what they would: names in ``partial_contents`` for a ``.partial`` folder, ``data`` for an
    ``.old`` one. Folders named without a pid (older xraylib versions) count as stale.
    """
    dest = Path(dest)
    if not dest.parent.is_dir():
        return
    allowed = {"partial": set(partial_contents), "old": {"data"}}
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.[a-z0-9_]{{8}}(?:\.(\d+))?\.(partial|old)$")
    for folder in dest.parent.iterdir():
        match = pattern.match(folder.name)
        if not match or folder.is_symlink() or not folder.is_dir():
            continue
        pid, kind = match.group(1), match.group(2)
        if pid is not None and _process_alive(int(pid)):
            continue
        if {p.name for p in folder.iterdir()} <= allowed[kind]:
            shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in ``path``, or None where the file is missing or not valid JSON (an interrupted or foreign write):
    for state and description files whose absence means "start again"."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def json_safe(value: Any) -> Any:
    """Plain JSON types: NaN/inf -> None, NumPy scalars -> Python, tuples -> lists, Paths -> str."""
    import math

    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return [json_safe(v) for v in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, str):
        return value
    if value is pd.NA or value is pd.NaT:
        return None
    return str(value)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


#: How much of a file :func:`read_bytes` reads first when the caller checks its type from the header.
HEAD_BYTES = 4096


def _kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, what in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a regular file"


def _check_file(path: str, max_bytes: int | None) -> None:
    """Refuse, before opening it, what is not a regular file or is larger than ``max_bytes``.

    Opening a named pipe would wait for a writer forever, and a device (``/dev/zero``) never ends, so
    neither is opened. A path that cannot be looked at (missing, or a transient error) is left to the
    opener, which says what is wrong (and retries what is transient).
    """
    try:
        info = os.stat(path)
    except OSError:
        return
    if stat.S_ISDIR(info.st_mode):
        raise BadFileError(path, "is a folder, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise BadFileError(path, f"is {_kind(info.st_mode)}, not a regular file; it is not read")
    if max_bytes is not None and info.st_size > max_bytes:
        raise BadFileError(path, f"file is {info.st_size:,} bytes, over the {max_bytes:,}-byte limit for one file "
                                 "(xraylib.fileio.MAX_FILE_BYTES or xraylib.images.MAX_FILE_BYTES)")


def read_bytes(
    path: str | os.PathLike,
    retries: int = 3,
    backoff_s: float = 0.2,
    opener: Callable[[str, str], Any] = open,
    *,
    max_bytes: int | None = None,
    check_head: Callable[[bytes], None] | None = None,
) -> bytes:
    """Read a whole file, retrying transient I/O errors (as Drive's mount gives) with backoff.

    A transient error (errno in :data:`TRANSIENT_ERRNOS`) is retried up to ``retries`` times,
    after ``backoff_s``, ``2 * backoff_s``, ``4 * backoff_s``, ... seconds. Raises
    :class:`BadFileError` naming the file when it is missing, unreadable or still failing after
    ``retries`` retries. ``opener(path, "rb")`` opens the file (default :func:`open`); every
    function that reads source files passes its own ``opener`` argument down to here
    (``images.read_image``, ``images.inspect_file``, ``manifest.build_manifest``,
    ``preprocess.preprocess_dataset``), so tests can inject faults. Those call it from several
    threads at once (their parallel readers), so it must be safe to call concurrently.

    Before opening, the path must be a regular file (a named pipe, ``/dev/zero`` or another device is
    refused: opening or reading it would never end) of at most ``max_bytes`` bytes (default
    :data:`MAX_FILE_BYTES`; also enforced while reading, for a file that grows). ``check_head``, when
    given, is called with the first :data:`HEAD_BYTES` bytes (fewer for a shorter file) before the rest
    is read, and raises :class:`BadFileError` to refuse the file without reading it whole.
    """
    path = str(path)
    limit = MAX_FILE_BYTES if max_bytes is None else int(max_bytes)
    _check_file(path, limit)
    for attempt in range(retries + 1):
        try:
            with opener(path, "rb") as f:
                if check_head is None:
                    data = _read_to_limit(f, b"", limit)
                else:
                    data = f.read(HEAD_BYTES)
                    check_head(data)
                    if len(data) == HEAD_BYTES:
                        data = _read_to_limit(f, data, limit)
            if len(data) > limit:
                raise BadFileError(path, f"file is over the {limit:,}-byte limit for one file (it grew while it was "
                                         "read, or is not a regular file)")
            return data
        except FileNotFoundError:
            raise BadFileError(path, "file not found") from None
        except IsADirectoryError:
            raise BadFileError(path, "is a folder, not a file") from None
        except PermissionError:
            raise BadFileError(path, "permission denied") from None
        except OSError as exc:
            if exc.errno in TRANSIENT_ERRNOS and attempt < retries:
                time.sleep(backoff_s * (2**attempt))
                continue
            raise BadFileError(path, f"read failed after {attempt + 1} tries: {exc.strerror or exc}") from None
    raise AssertionError("unreachable")


def _read_to_limit(f, head: bytes, limit: int) -> bytes:
    """The file ``f`` whose first bytes ``head`` were read, to its end or to ``limit + 1`` bytes, whichever is first.

    One read sized to the file where its size is known and it can seek back to its start: ``read(limit + 1)`` first
    allocates that much (512 MB for an image), and joining ``head`` to the rest copies the file; together they cost
    ten times the read itself for a 1 MB DICOM. A file that grew since its size was taken is read on to the limit.
    """
    try:
        size = os.fstat(f.fileno()).st_size
        if head:
            f.seek(0)
    except (AttributeError, OSError, ValueError):  # an opener's object without a descriptor or that cannot seek
        return head + f.read(limit + 1 - len(head))
    data = f.read(min(size, limit) + 1)
    if len(data) > size:
        data += f.read(max(0, limit + 1 - len(data)))
    return data


#: Whether :func:`map_file` maps files at all. Set it to False where other programs may rewrite or cut short the
#: source files while xraylib reads them: a mapped file cut short ends the process (see there).
MAP_FILES = True
#: Files of at least this many bytes are mapped into memory by :func:`map_file` instead of read: from about 4 MB (a
#: 16-bit DICOM of about 1450x1450 pixels and up), mapping costs less than the copy a read makes (0.2 against 1.1 ms
#: for a 12.5 MB file, which NumPy and OpenCV then read in place); for smaller files about the same or more.
MAP_MIN_BYTES = 4 * 1024**2
#: The file systems (as Linux names them in /proc/self/mountinfo) whose files :func:`map_file` maps: local disks and
#: memory. A read error in a mapped file (a network disk, or a FUSE mount such as Colab's Google Drive) is a SIGBUS
#: that ends the process, where ``read`` raises an error that is retried or reported: files elsewhere are read.
LOCAL_FILE_SYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "zfs", "tmpfs", "overlay"})
#: Where Linux lists the mounted file systems, with their device numbers and types (proc(5)).
MOUNT_INFO = "/proc/self/mountinfo"
_MOUNTS_LOCK = threading.Lock()
#: The mount table as last read: its open descriptor and poll object, (its path, the process), the types.
_MOUNTS: dict[str, Any] = {"fd": None, "poll": None, "source": None, "types": {}}


def _mount_types(text: str) -> dict[int, str]:
    """``{device number: file system type}`` from the text of a mountinfo table (a later line for a device wins)."""
    types = {}
    for line in text.splitlines():  # "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue"
        fields = line.split()  # (six fields, optional ones such as "master:1", "-", the type, the source, options)
        major, _, minor = fields[2].partition(":") if len(fields) > 2 else ("", "", "")
        if major.isdigit() and minor.isdigit() and "-" in fields[6:-1]:
            types[os.makedev(int(major), int(minor))] = fields[fields.index("-", 6) + 1]
    return types


def file_system(device: int) -> str | None:
    """The type of the file system on ``device`` (``os.stat(path).st_dev``) as Linux names it in :data:`MOUNT_INFO`
    ("ext4", "overlay", "fuse.drive", ...); None where it is not listed there (another operating system; a btrfs
    subvolume, whose files carry a number of their own).

    The table is read once per process and again only after a mount or an unmount, which the kernel marks on the
    table's open file (proc(5)): a device number that a new mount takes over is not taken for the old file system.
    """
    with _MOUNTS_LOCK:
        fd, source = _MOUNTS["fd"], (MOUNT_INFO, os.getpid())
        if fd is None or _MOUNTS["source"] != source or _MOUNTS["poll"].poll(0):  # (a mount or unmount: POLLPRI)
            if fd is not None:
                os.close(fd)  # (in a forked worker: its own copy of the parent's descriptor)
            _MOUNTS.update(fd=None, poll=None, source=None, types={})
            try:
                fd = os.open(MOUNT_INFO, os.O_RDONLY)
            except OSError:
                return None
            chunks = []
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
            poll = select.poll()  # (not select.select: it refuses a descriptor numbered 1024 or more)
            poll.register(fd, select.POLLPRI)
            _MOUNTS.update(fd=fd, poll=poll, source=source,
                           types=_mount_types(b"".join(chunks).decode("utf-8", "replace")))
        return _MOUNTS["types"].get(device)


def map_file(path: str | os.PathLike, accept_head: Callable[[bytes], bool], max_bytes: int = MAX_FILE_BYTES
             ) -> mmap.mmap | None:
    """A regular file of at least :data:`MAP_MIN_BYTES` on a local disk (:data:`LOCAL_FILE_SYSTEMS`) as a read-only
    memory map, where ``accept_head`` (called with its first :data:`HEAD_BYTES` bytes; an error it raises is
    raised) says so and :data:`MAP_FILES` is true; None for any other file and where mapping fails: the caller reads
    it with :func:`read_bytes` (whose checks, retries and messages apply).

    The map reads like ``bytes`` for slices (which are ``bytes``), ``len``, ``struct`` and ``hashlib``, and NumPy
    reads it in place (``np.frombuffer``): the pixels of an uncompressed DICOM are not copied. It lasts as long as
    a reference to it or to an array over it (xraylib's own functions keep it for one file).

    The price: a file cut short by another program while it is mapped (``cp`` over it) ends the process with
    SIGBUS, as would a read error of a failing disk, where a read reports the file and goes on. xraylib never
    writes its source files; where other programs may, set :data:`MAP_FILES` to False.
    """
    if not MAP_FILES:
        return None
    path = str(path)
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode) or not MAP_MIN_BYTES <= info.st_size <= max_bytes \
                or file_system(info.st_dev) not in LOCAL_FILE_SYSTEMS:
            return None
        with open(path, "rb") as f:
            if not accept_head(f.read(HEAD_BYTES)):
                return None
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):  # (ValueError: the file was emptied since)
        return None


def sha1_bytes(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def sha1_file(path: str | os.PathLike) -> str:
    return sha1_bytes(read_bytes(path))


def release_pages(array: np.ndarray) -> None:
    """Drop the pages of a memory-mapped ``.npy`` file (``np.load(..., mmap_mode="r" or "r+")``, ``open_memmap``) from
    this process's RSS: they stay in the page cache (written ones too: the mapping is shared with the file) and are
    mapped again when next read. A loop over a large file calls it after each chunk, so that its RSS stays that of a
    chunk instead of growing to the file's size. A copy-on-write mapping (``mmap_mode="c"``: the changes would be
    lost), an array in memory, a view of part of a mapping, or a system without ``madvise``: nothing is done."""
    base = getattr(array, "base", None)
    if (isinstance(array, np.memmap) and isinstance(base, mmap.mmap) and getattr(array, "mode", "c") != "c"
            and hasattr(base, "madvise") and hasattr(mmap, "MADV_DONTNEED")):
        base.madvise(mmap.MADV_DONTNEED)
