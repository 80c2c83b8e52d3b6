"""Build one labelled image manifest from any combination of sources.

The manifest is a table with one row per image (:data:`MANIFEST_COLUMNS`): where the file is,
its label, source, site (where the image was made: :mod:`xraylib.sources`), patient, view, sex, age, original size, bit depth and content hash. Every
later stage reads it. Building it reads each file once (for the hash and a header check) and
never writes to a source folder.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple

import pandas as pd
from tqdm.auto import tqdm

from . import images
from .config import SOURCE_KEYS, DrivePaths
from .errors import BadFileError, ConfigError, SourceError
from .fileio import write_csv_atomic, write_json_atomic
from .parallel import map_ahead
from .sources import SOURCE_COLUMNS, SourceTable, fill_site, source_by_drive_key

#: Tasks and their classes; index 0 is the negative class, the last one the positive class.
TASKS: dict[str, tuple[str, ...]] = {
    "covid_vs_normal": ("normal", "covid"),
    "pneumonia_vs_normal": ("normal", "pneumonia"),
    "covid_pneumonia_normal": ("normal", "pneumonia", "covid"),
}

#: Frontal views, the seeds' filter widened from PA to AP and AP supine. Lateral ("L") is left out.
DEFAULT_VIEWS = ("PA", "AP", "AP Supine")

FILE_COLUMNS = ["file_format", "width", "height", "channels", "bit_depth", "sha1"]
MANIFEST_COLUMNS = SOURCE_COLUMNS + FILE_COLUMNS

# DICOM modalities that are plain radiographs.
_XRAY_MODALITIES = {"x-ray", "xray", "cr", "dx", "rg", "dr"}


@dataclass
class ManifestReport:
    """What went into the manifest and what was left out, per source and overall."""

    task: str
    classes: tuple[str, ...]
    views: tuple[str, ...] | None
    per_source: dict[str, dict] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "task": self.task, "classes": list(self.classes),
            "views": list(self.views) if self.views else None,
            "per_source": self.per_source,
            "problems": [{"path": p, "reason": r} for p, r in self.problems],
            "duplicates": self.duplicates,
        }

    def summary(self) -> str:
        """A few plain lines: kept images per source and what was skipped."""
        lines = []
        for source, info in self.per_source.items():
            kept = ", ".join(f"{k} {v}" for k, v in info["kept_by_label"].items()) or "none"
            lines.append(f"{source}: {info['kept']} images kept ({kept}); {info['patients']} patients")
            for reason, count in sorted(info["excluded"].items(), key=lambda kv: -kv[1]):
                lines.append(f"    left out {count}: {reason}")
        if self.problems:
            lines.append(f"skipped {len(self.problems)} unreadable or missing file(s); first ones:")
            lines += [f"    {p}: {r}" for p, r in self.problems[:5]]
        if self.duplicates:
            dropped = sum(len(d["dropped"]) for d in self.duplicates)
            lines.append(f"dropped {dropped} duplicate image(s) (same bytes), {len(self.duplicates)} group(s)")
        return "\n".join(lines)


@dataclass
class Manifest:
    frame: pd.DataFrame
    report: ManifestReport


def _source_roots(sources: DrivePaths | Mapping[str, str | os.PathLike]) -> dict[str, Path]:
    roots = sources.sources() if isinstance(sources, DrivePaths) else {k: Path(v) for k, v in sources.items() if v}
    unknown = sorted(key for key in roots if source_by_drive_key(key) is None)
    if unknown:
        raise ConfigError(f"unknown source key(s) {unknown}; known: {sorted(SOURCE_KEYS)}")
    if not roots:
        raise ConfigError("no source folders given: set at least one source in drive_paths.yaml")
    return roots


def _inspect(path: str, opener: Callable[[str, str], Any] = open) -> tuple[str, images.ImageInfo | None, str | None]:
    try:
        return path, images.inspect_file(path, opener=opener), None
    except BadFileError as exc:
        return path, None, exc.reason
    except Exception as exc:  # a reader bug on one file must not stop a folder of thousands: reported, skipped
        return path, None, f"unexpected {type(exc).__name__}: {exc}"


def inspect_files(paths: Iterable[str], workers: int = 8, progress: bool = True,
                  opener: Callable[[str, str], Any] = open) -> dict[str, images.ImageInfo | str]:
    """``{path: ImageInfo}`` for readable images and ``{path: reason}`` for bad ones, read in parallel threads.

    ``opener`` opens each file (default :func:`open`; see :func:`xraylib.fileio.read_bytes`).
    """
    return dict(_inspect_all(paths, workers, progress, opener))


def _inspect_all(paths: Iterable[str], workers: int, progress: bool, opener: Callable[[str, str], Any],
                 inspect: Callable[[str], tuple[str, Any, str | None]] | None = None) -> Iterator[tuple[str, Any]]:
    """(path, ImageInfo or reason) for each distinct path, in order, read by ``workers`` threads.

    ``inspect``: what each thread does with a path (default :func:`_inspect` with ``opener``), returning
    ``(path, result or None, reason)``. A few files per thread are in flight at a time: submitting them all at
    once would hold a future (about 1 KB) per file until the end, a cost that grows with the folder.
    """
    unique = list(dict.fromkeys(paths))
    inspect = inspect or partial(_inspect, opener=opener)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            tqdm(total=len(unique), desc="checking images", disable=not progress, unit="img") as bar:
        for result in map_ahead(pool, inspect, unique, ahead=4 * max(1, workers)):
            yield _inspected(result, bar)


def _inspected(result: tuple[str, Any, str | None], bar: tqdm) -> tuple[str, Any]:
    path, info, reason = result
    bar.update(1)
    return path, info if info is not None else reason


class _FileFacts(NamedTuple):
    """What the manifest keeps of a readable file: about 0.3 KB, where its ImageInfo and DICOM header were 1.5."""

    file_format: str
    width: int | None
    height: int | None
    channels: int | None
    bit_depth: int | None
    sha1: str
    header: tuple[str | None, str | None, float | None, str | None] | None  # a DICOM's view, sex, age, modality


def _file_facts(info: images.ImageInfo) -> _FileFacts:
    header = info.dicom_header
    if header is not None:
        # Interned: these repeat ("PA", "F", "CR"), so thousands of rows share a few strings.
        view, sex, modality = (None if v is None else sys.intern(v) for v in (_view(header.view), header.sex, header.modality))
        header = (view, sex, header.age, modality)
    return _FileFacts(info.file_format, info.width, info.height, info.channels, info.bit_depth, info.sha1, header)


#: How often (files newly read) :func:`build_manifest`'s checkpoint is flushed to its file; at most
#: :data:`CHECKPOINT_SECONDS` apart too, so a slow Drive loses little of its work to a lost runtime.
CHECKPOINT_EVERY = 256
CHECKPOINT_SECONDS = 10.0


def _inspect_with_checkpoint(paths: list[str], checkpoint: Path, workers: int, progress: bool,
                             opener: Callable[[str, str], Any]) -> dict[str, _FileFacts | str]:
    """:func:`_inspect_all` as facts, reusing the readable files ``checkpoint`` records with their size and times
    now, and appending each file newly read (one JSON line: path, size, mtime_ns, ctime_ns, the facts).

    The inode change time (ctime) is in the signature because copies that keep the modification time (``cp -p``,
    ``rsync -a``, unpacking an archive) cannot keep it: a file replaced by another of the same size is read again.
    At each flush the file is closed and opened again, so a mount that uploads on close (Google Drive) keeps it."""
    known = _read_checkpoint(checkpoint)

    def inspect(path: str) -> tuple[str, tuple[tuple[int, int, int] | None, _FileFacts | None], str | None]:
        try:
            stat = os.stat(path)
            signature = (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)  # before the read: a file changed during it is read again next time
        except OSError:
            signature = None
        entry = known.get(path)
        if signature is not None and entry is not None and entry[0] == signature:
            return path, (None, entry[1]), None
        _, info, reason = _inspect(path, opener)
        return path, (signature, None if info is None else _file_facts(info)), reason

    inspected: dict[str, _FileFacts | str] = {}
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    cut = _ends_cut(checkpoint)
    log = open(checkpoint, "a", encoding="utf-8")
    try:
        if cut:
            log.write("\n")  # a line cut by a kill: ended, so the next one stands on its own (the cut one is skipped)
        pending, flushed = 0, time.monotonic()
        for path, result in _inspect_all(paths, workers, progress, opener, inspect):
            if isinstance(result, str):
                inspected[path] = result
                continue
            signature, facts = result
            inspected[path] = facts
            if signature is None:
                continue  # from the checkpoint, or a file that could not be stat'ed
            log.write(json.dumps([path, *signature, *facts[:-1], facts.header]) + "\n")
            pending += 1
            if pending >= CHECKPOINT_EVERY or time.monotonic() - flushed > CHECKPOINT_SECONDS:
                log.close()
                log = open(checkpoint, "a", encoding="utf-8")
                pending, flushed = 0, time.monotonic()
    finally:
        log.close()
    return inspected


def _ends_cut(path: Path) -> bool:
    """Whether ``path`` ends in the middle of a line (False for a missing or empty file)."""
    try:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except OSError:
        return False


def _read_checkpoint(checkpoint: Path) -> dict[str, tuple[tuple[int, int, int], _FileFacts]]:
    """``{path: ((size, mtime_ns, ctime_ns), facts)}`` from a checkpoint file (the last line of a path wins); lines that do not
    parse (one cut by a kill, a damaged file) are skipped: their files are read again."""
    known: dict[str, tuple[tuple[int, int, int], _FileFacts]] = {}
    try:
        log = open(checkpoint, encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return known
    with log:
        for line in log:
            try:
                path, size, mtime_ns, ctime_ns, *values, header = json.loads(line)
                known[path] = ((int(size), int(mtime_ns), int(ctime_ns)),
                               _FileFacts(*values, header=None if header is None else tuple(header)))
            except (ValueError, TypeError):
                continue
    return known


def build_manifest(
    sources: DrivePaths | Mapping[str, str | os.PathLike],
    task: str = "covid_vs_normal",
    views: Iterable[str] | None = DEFAULT_VIEWS,
    keep_unknown_view: bool = True,
    xray_only: bool = True,
    workers: int = 8,
    progress: bool = True,
    opener: Callable[[str, str], Any] = open,
    checkpoint: str | os.PathLike | None = None,
) -> Manifest:
    """Read the sources, keep the task's classes, filter views and modality, check files, drop duplicates.

    ``sources`` is a :class:`DrivePaths` or ``{"covid_chestxray_dataset": folder, ...}``.
    ``views=None`` keeps every view. Images with no recorded view (Kaggle) are kept unless
    ``keep_unknown_view`` is False. Unreadable files are reported and skipped; a missing
    folder or label file raises :class:`SourceError` naming it. ``opener`` opens each image
    file (default :func:`open`; tests pass a fault-injecting one, see :func:`xraylib.fileio.read_bytes`).

    Every file is read once, whole (its hash and a header check): for all of NIH and RSNA on Drive, hours.
    ``checkpoint`` (a file, e.g. :attr:`xraylib.config.OutputLayout.manifest_files`) keeps what each readable
    file gave, as it comes: a build interrupted (a lost runtime) and run again reads only the files not yet
    read, and a later build (another task, more files) only new files and files whose size or time changed.
    """
    if task not in TASKS:
        raise ConfigError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    classes = TASKS[task]
    view_set = tuple(views) if views is not None else None
    report = ManifestReport(task=task, classes=classes, views=view_set)

    tables: list[SourceTable] = []
    for key, root in _source_roots(sources).items():
        tables.append(source_by_drive_key(key).reader(root))

    frames = []
    for table in tables:
        rows = fill_site(table.rows)  # a reader written before the site column leaves it out
        report.problems += table.problems
        off_task = ~rows["label"].isin(classes)
        for label, count in rows.loc[off_task, "label"].value_counts().items():
            table.exclude(f"label '{label}' not in task {task}", count)
        rows = rows[~off_task]
        # Unknown views stay until the files are read: a DICOM header may supply one (RSNA).
        rows = _filter_views(rows, view_set, True, table)
        if xray_only:
            not_xray = _not_radiograph(rows["modality"])
            for modality, count in rows.loc[not_xray, "modality"].value_counts().items():
                table.exclude(f"modality {modality}", count)
            rows = rows[~not_xray]
        frames.append((table, rows))

    all_paths = [p for _, rows in frames for p in rows["path"]]
    if checkpoint is None:
        inspected = {path: result if isinstance(result, str) else _file_facts(result)
                     for path, result in _inspect_all(all_paths, workers, progress, opener)}
    else:
        inspected = _inspect_with_checkpoint(all_paths, Path(checkpoint), workers, progress, opener)

    kept_frames = []
    for table, rows in frames:
        good, bad = _attach_file_facts(rows, inspected)
        for path, reason in bad:
            report.problems.append((path, reason))
            table.exclude("unreadable file", 1)
        # DICOM headers can add a view or modality that filters must see (RSNA has them only there).
        good = _filter_views(good, view_set, keep_unknown_view, table)
        if xray_only:
            not_xray = _not_radiograph(good["modality"])
            table.exclude("DICOM modality is not a radiograph", int(not_xray.sum()))
            good = good[~not_xray]
        kept_frames.append((table, good))

    # An empty frame (a source with no images left) would turn the integer columns into objects.
    non_empty = [g for _, g in kept_frames if len(g)]
    combined = pd.concat(non_empty, ignore_index=True) if non_empty else pd.DataFrame(columns=MANIFEST_COLUMNS)
    combined, report.duplicates = _drop_duplicates(combined)
    combined = combined[MANIFEST_COLUMNS].sort_values(["source", "patient_id", "path"], kind="stable").reset_index(drop=True)

    for table, _ in kept_frames:
        kept = combined[combined["source"] == table.source]
        dropped_dupes = sum(1 for d in report.duplicates for r in d["dropped"] if r["source"] == table.source)
        table.exclude("duplicate image (same bytes as a kept one)", dropped_dupes)
        report.per_source[table.source] = {
            "kept": int(len(kept)),
            "patients": int(kept["patient_id"].nunique()),
            "kept_by_label": {k: int(v) for k, v in kept["label"].value_counts().sort_index().items()},
            "excluded": dict(table.excluded),
        }
    if combined.empty:
        raise SourceError(
            "no images left after filtering: check the source folders, the task "
            f"({task}: classes {list(classes)}) and the view filter ({list(view_set) if view_set else 'all'})"
        )
    return Manifest(combined, report)


def _not_radiograph(modality: pd.Series) -> pd.Series:
    """True where a modality is recorded and is not a plain radiograph.

    Element-wise, not ``.str``: a column with no modality at all is read as float NaN, which ``.str`` refuses.
    """
    return modality.map(lambda m: isinstance(m, str) and m.strip().lower() not in _XRAY_MODALITIES).astype(bool)


def _filter_views(rows: pd.DataFrame, views: tuple[str, ...] | None, keep_unknown: bool,
                  table: SourceTable) -> pd.DataFrame:
    if views is None:
        return rows
    known = rows["view"].notna()
    wrong = known & ~rows["view"].isin(views)
    for view, count in rows.loc[wrong, "view"].value_counts().items():
        table.exclude(f"view {view}", count)
    keep = ~wrong
    if not keep_unknown:
        table.exclude("view not recorded", int((~known).sum()))
        keep &= known
    return rows[keep]


def _attach_file_facts(rows: pd.DataFrame, inspected: dict[str, _FileFacts | str]
                       ) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """``rows`` with the FILE_COLUMNS of their files, and (path, reason) for the unreadable ones.

    Column by column: a dict per row would cost about 1 KB a row at the peak.
    """
    paths = rows["path"].tolist()
    facts = [inspected[path] for path in paths]
    readable = [not isinstance(f, str) for f in facts]
    bad = [(path, f) for path, f in zip(paths, facts) if isinstance(f, str)]
    facts = [f for f, ok in zip(facts, readable) if ok]
    columns = {name: [v for v, ok in zip(rows[name].tolist(), readable) if ok] for name in SOURCE_COLUMNS}
    for name in FILE_COLUMNS:
        columns[name] = [getattr(f, name) for f in facts]
    # A DICOM header supplies what the source does not record (RSNA has view, sex and age only there).
    for position, name in enumerate(("view", "sex", "age", "modality")):
        columns[name] = [_from_header(v, f.header[position], name == "age") if f.header else v
                         for v, f in zip(columns[name], facts)]
    frame = pd.DataFrame(columns, columns=MANIFEST_COLUMNS)
    frame["age"] = pd.to_numeric(frame["age"], errors="coerce")
    return frame, bad


def _from_header(value: Any, header_value: Any, numeric: bool) -> Any:
    if numeric:
        return header_value if pd.isna(value) and header_value is not None else value
    return value if isinstance(value, str) else header_value  # NaN (pandas' missing value) is truthy: test for a string


def _view(value: str | None) -> str | None:
    from .sources import normalise_view
    return normalise_view(value)


def _drop_duplicates(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[dict]]:
    """Keep the first row of each group of identical files; drop every copy when copies disagree on the label."""
    groups = []
    drop_index = []
    copies = frame[frame["sha1"].duplicated(keep=False)]  # a frame per distinct file would cost a second per 10,000
    for sha1, group in copies.groupby("sha1", sort=False):
        labels = sorted(group["label"].unique())
        if len(labels) > 1:
            kept, dropped = None, group
        else:
            kept, dropped = group.iloc[0], group.iloc[1:]
        drop_index += list(dropped.index)
        groups.append({
            "sha1": sha1,
            "kept": None if kept is None else {"path": kept["path"], "source": kept["source"]},
            "dropped": [{"path": r["path"], "source": r["source"]} for _, r in dropped.iterrows()],
            "reason": "copies carry different labels: all dropped" if kept is None else "same bytes",
        })
    return frame.drop(index=drop_index), groups


def save_manifest(manifest: Manifest, manifest_path: str | os.PathLike, report_path: str | os.PathLike | None = None) -> None:
    """Write the manifest CSV (and the report JSON) atomically."""
    write_csv_atomic(manifest_path, manifest.frame)
    if report_path is not None:
        write_json_atomic(report_path, manifest.report.to_dict())


def load_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """Read a manifest CSV written by :func:`save_manifest`; :class:`SourceError` if it is missing or not a manifest."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: manifest not found; run notebook 01 (or `python -m xraylib manifest`) first")
    frame = read_manifest_csv(path)
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise SourceError(f"{path}: not an xraylib manifest, missing column(s) {missing}")
    return frame


def read_manifest_csv(path: str | os.PathLike) -> pd.DataFrame:
    """A manifest CSV (the stage's own or a cache's) with its id columns as text and ``site`` filled where an
    older xraylib wrote none (:func:`xraylib.sources.fill_site`)."""
    frame = pd.read_csv(path, dtype={"patient_id": str, "image_id": str, "sha1": str, "source_split": str, "site": str})
    return fill_site(frame) if "source" in frame.columns else frame


def copy_images(frame: pd.DataFrame, dest: str | os.PathLike, progress: bool = True) -> pd.DataFrame:
    """Copy the manifest's images to ``dest/<source>/<name>`` (``shutil.copy2``; sources are never moved).

    Returns a copy of the manifest whose ``path`` points at the copies. Existing copies with the
    same size are not copied again.
    """
    dest = Path(dest)
    out = frame.copy()
    new_paths = []
    for record in tqdm(frame.to_dict("records"), desc="copying", disable=not progress, unit="img"):
        source_path = Path(record["path"])
        target = dest / record["source"] / f"{record['sha1'][:12]}_{source_path.name}"
        if not (target.is_file() and target.stat().st_size == source_path.stat().st_size):
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            shutil.copy2(source_path, tmp)
            os.replace(tmp, target)
        new_paths.append(str(target))
    out["path"] = new_paths
    return out


def counts_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Images and patients per source and label (rows: source, label); per site: :func:`xraylib.audit.site_table`."""
    grouped = frame.groupby(["source", "label"])
    return pd.DataFrame({"images": grouped.size(), "patients": grouped["patient_id"].nunique()}).reset_index()


def label_counts(frame: pd.DataFrame) -> Counter:
    return Counter(frame["label"])
