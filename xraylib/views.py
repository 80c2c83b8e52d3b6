"""Views of the preprocessed cache: other splits, labels or a hidden region over the same arrays, no copies.

A view is a :class:`~xraylib.preprocess.PreprocessedData` whose images are :class:`IndexedImages` (rows
gathered on demand from the memory-mapped cache), so a view of 100,000 images costs its index arrays.
The shortcut tests (:mod:`xraylib.shortcuts`) train and evaluate on them: :func:`source_view` (labels
become sources), :func:`held_out_source_view` (leave one source out) and :func:`hidden_view` (the
centre of the film or the lung fields blacked out, :func:`hidden_region`). Anything that trains or
predicts on a cache trains or predicts on a view. No TensorFlow here.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from .errors import ConfigError
from .preprocess import PreprocessedData, PreprocessedSplit
from .sources import site_groups
from .split import SPLITS

__all__ = ["HOSPITAL_GROUPS", "CENTRAL_RECTANGLE", "HIDDEN_REGIONS", "IndexedImages", "data_view", "cache_rows",
           "source_group", "source_view", "held_out_source_view", "lung_field_mask", "hidden_region", "hidden_view"]

#: Sources that are one hospital (each record's ``site`` in ``xraylib.sources.SOURCES``). RSNA's images are
#: drawn from NIH ChestX-ray14, so holding NIH out while training on RSNA (or telling the two apart) would
#: test nothing: both tests treat them as one source, "nih+rsna". Pass ``source_groups={}`` to keep every source apart.
HOSPITAL_GROUPS: dict[str, str] = site_groups()
#: Lungs hidden, region "rectangle": the blacked-out centre as fractions of the side (top,
#: bottom, left, right). Maguolo and Nanni (2021) blacked out the centre of each film, covering
#: the lungs, heart and mediastinum, and kept only a frame, where markers, text, collimation
#: edges and the patient's outline lie. On a frontal film framed from the apices to the
#: costophrenic angles the lungs span about 15% to 85% of the width and 15% to 80% of the height
#: (:func:`lung_field_mask`), so the frame kept is 15% of each side.
CENTRAL_RECTANGLE = (0.15, 0.85, 0.15, 0.85)
#: Regions :func:`hidden_region` knows.
HIDDEN_REGIONS = ("rectangle", "lungs")

# ---------------------------------------------------------------------------------------------
# Views of the preprocessed cache: other index sets, labels or a hidden region, no copies


class IndexedImages:
    """``(N, S, S) uint8`` images gathered on demand from one or more cached arrays.

    Row ``i`` is ``parts[part_index[i]][row_index[i]]``; with ``hide`` (an ``(S, S)`` bool mask)
    those pixels read as 0 (black). Indexing with an int, a slice, an int array or a bool mask
    reads only the rows asked for (in file order, from memory-mapped arrays) and returns a new
    ``ndarray``; ``np.asarray(images)`` reads them all. Nothing is copied at construction.
    """

    def __init__(self, parts: Sequence[np.ndarray], part_index: np.ndarray, row_index: np.ndarray,
                 hide: np.ndarray | None = None):
        self.parts = list(parts)
        self.part_index = np.asarray(part_index, dtype=np.int64)
        self.row_index = np.asarray(row_index, dtype=np.int64)
        if self.part_index.shape != self.row_index.shape or self.part_index.ndim != 1:
            raise ConfigError(f"part_index and row_index must be 1-D and of one length, got "
                              f"{self.part_index.shape} and {self.row_index.shape}")
        if not self.parts:
            raise ConfigError("IndexedImages needs at least one array to read from")
        side = tuple(self.parts[0].shape[1:])
        if any(tuple(p.shape[1:]) != side for p in self.parts):
            raise ConfigError(f"all arrays must hold images of one size, got {[tuple(p.shape[1:]) for p in self.parts]}")
        for k, part in enumerate(self.parts):
            rows = self.row_index[self.part_index == k]
            if len(rows) and (rows.min() < 0 or rows.max() >= len(part)):
                raise ConfigError(f"row_index points outside array {k} ({len(part)} images)")
        if hide is not None:
            hide = np.asarray(hide, dtype=bool)
            if hide.shape != side:
                raise ConfigError(f"hide must be an (S, S) mask like the images {side}, got {hide.shape}")
        self.hide = hide
        self.dtype = self.parts[0].dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.row_index), *self.parts[0].shape[1:])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return len(self.row_index)

    def __getitem__(self, key: Any) -> np.ndarray:
        rest: tuple = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        single = isinstance(key, (int, np.integer))
        positions = np.arange(len(self))[key]
        out = self._gather(np.atleast_1d(positions))
        out = out[0] if single else out
        return out[(slice(None),) * (0 if single else 1) + rest] if rest else out

    def _gather(self, positions: np.ndarray) -> np.ndarray:
        out = np.empty((len(positions), *self.shape[1:]), dtype=self.dtype)
        parts, rows = self.part_index[positions], self.row_index[positions]
        for k in np.unique(parts):
            where = np.flatnonzero(parts == k)
            order = np.argsort(rows[where], kind="stable")  # a memmap reads fastest in file order
            out[where[order]] = self.parts[k][rows[where][order]]
        if self.hide is not None:
            out[:, self.hide] = 0
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self._gather(np.arange(len(self)))
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        hidden = f", {self.hide.mean():.0%} hidden" if self.hide is not None else ""
        return f"IndexedImages({len(self)} images of {self.shape[1:]}, from {len(self.parts)} array(s){hidden})"


def data_view(data: PreprocessedData, rows: pd.DataFrame, classes: Sequence[str] | None = None,
              hide: np.ndarray | None = None, description: str = "a view") -> PreprocessedData:
    """A :class:`PreprocessedData` over ``data``'s cached arrays with other splits, labels or pixels hidden.

    ``rows``: rows of ``data.manifest`` (their ``split`` and ``row`` columns name the cached
    image) with a ``new_split`` column ("train", "val" or "test") and a ``label`` column (the
    class each row has in the view; relabel to change the task). Rows may repeat or be left
    out. ``classes``: the view's classes in order (default: ``data.classes``); every label must
    be one of them. ``hide``: an ``(S, S)`` bool mask of pixels to black out (see
    :func:`hidden_region`). ``description`` goes into the view's key and report.

    The view's manifest rows keep the original ``split`` and ``row`` as ``cache_split`` and
    ``cache_row``; with ``hide``, a row's ``sha1`` (the identity of its content, e.g. for the
    feature cache) becomes ``<file sha1>+hidden:<mask hash>`` (the file's in ``file_sha1``). Its ``key`` is new (derived from the cache's key and the view), so a training
    run on the view is not mistaken for one on the cache. Train, evaluate and explain on it as
    on the cache; its images are :class:`IndexedImages`.
    """
    classes = tuple(classes) if classes is not None else tuple(data.classes)
    missing = {"split", "row", "new_split", "label"} - set(rows.columns)
    if missing:
        raise ConfigError(f"rows is missing column(s) {sorted(missing)}; give rows of data.manifest with 'new_split' and 'label'")
    if unknown := sorted(set(rows["new_split"].astype(str)) - set(SPLITS)):
        raise ConfigError(f"new_split value(s) {unknown} are not among {list(SPLITS)}")
    if unknown := sorted(set(rows["label"].astype(str)) - set(classes)):
        raise ConfigError(f"label(s) {unknown} of the view are not among its classes {list(classes)}")
    if unknown := sorted(set(rows["split"].astype(str)) - set(data.splits)):
        raise ConfigError(f"rows name split(s) {unknown} the cache does not have ({sorted(data.splits)})")
    parts, locate, hide = _base_arrays(data, hide)
    splits: dict[str, PreprocessedSplit] = {}
    digest = hashlib.sha1(json.dumps({"cache": data.key, "classes": list(classes), "description": description},
                                     sort_keys=True).encode())
    if hide is not None:
        digest.update(np.packbits(np.asarray(hide, dtype=bool)).tobytes())
    for name in SPLITS:
        chosen = rows[rows["new_split"].astype(str) == name]
        part_index, row_index = locate(chosen["split"].astype(str).to_numpy(), chosen["row"].to_numpy(dtype=np.int64))
        if "cache_split" in chosen.columns:  # a view of a view: keep where the image lies in the cache on disk
            manifest = chosen.drop(columns=["new_split", "split", "row"])
        else:
            manifest = chosen.drop(columns=["new_split"]).rename(columns={"split": "cache_split", "row": "cache_row"})
        manifest = manifest.assign(split=name, row=np.arange(len(chosen))).reset_index(drop=True)
        if hide is not None and "sha1" in manifest.columns:
            manifest = _hidden_content_ids(manifest, hide)
        labels = np.array([classes.index(label) for label in manifest["label"].astype(str)], dtype=np.int64)
        images = IndexedImages(parts, part_index, row_index, hide=hide)
        splits[name] = PreprocessedSplit(name, images, labels, manifest, classes)
        digest.update(name.encode() + part_index.tobytes() + row_index.tobytes() + labels.tobytes())
    report = {"view": description, "of_cache": data.key, "counts": {k: len(v) for k, v in splits.items()}}
    return PreprocessedData(data.folder, data.settings, classes, splits, digest.hexdigest(), report)


def _hidden_content_ids(manifest: pd.DataFrame, hide: np.ndarray) -> pd.DataFrame:
    """A row's ``sha1`` names its image's content (e.g. the feature cache keys on it): with pixels hidden the
    content is another, so the view's rows get ``<file sha1>+hidden:<mask hash>``; the file's stays in ``file_sha1``."""
    if "file_sha1" not in manifest.columns:
        manifest = manifest.assign(file_sha1=manifest["sha1"])
    mask_id = hashlib.sha1(np.packbits(np.asarray(hide, dtype=bool)).tobytes()).hexdigest()[:12]
    present = manifest["file_sha1"].map(lambda v: isinstance(v, str) and bool(v.strip()))
    return manifest.assign(sha1=manifest["file_sha1"].where(~present, manifest["file_sha1"].astype(str) + f"+hidden:{mask_id}"))


def _base_arrays(data: PreprocessedData, hide: np.ndarray | None):
    """The arrays a view of ``data`` reads from, a function mapping (split, row) of ``data`` to
    (array, row) in them, and the hidden mask. A view of a view reads the cache's arrays directly
    (its hidden region is the union of both)."""
    parts: list[np.ndarray] = []
    maps: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, split in data.splits.items():
        images = split.images
        if isinstance(images, IndexedImages):
            offsets = []
            for base in images.parts:
                found = next((k for k, p in enumerate(parts) if p is base), None)
                if found is None:
                    parts.append(base)
                    found = len(parts) - 1
                offsets.append(found)
            maps[name] = (np.asarray(offsets, dtype=np.int64)[images.part_index], images.row_index)
            if images.hide is not None:
                hide = images.hide if hide is None else (np.asarray(hide, dtype=bool) | images.hide)
        else:
            parts.append(images)
            maps[name] = (np.full(len(images), len(parts) - 1, dtype=np.int64), np.arange(len(images), dtype=np.int64))

    def locate(split_names: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        part_index = np.empty(len(rows), dtype=np.int64)
        row_index = np.empty(len(rows), dtype=np.int64)
        for name in np.unique(split_names):
            where = split_names == name
            part_of, row_of = maps[name]
            if len(rows[where]) and (rows[where].max() >= len(row_of) or rows[where].min() < 0):
                raise ConfigError(f"rows of split {name!r} point outside it ({len(row_of)} images)")
            part_index[where], row_index[where] = part_of[rows[where]], row_of[rows[where]]
        return part_index, row_index

    if not parts:
        raise ConfigError("the data hold no splits to view")
    return parts, locate, hide


def cache_rows(data: PreprocessedData) -> pd.DataFrame:
    """Every cached row with its ``split`` and ``row`` (where the image lies in the cache)."""
    frames = []
    for name, split in data.splits.items():
        frame = split.manifest.copy()
        frame["split"] = name
        frame["row"] = np.arange(len(frame))
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def source_group(sources: pd.Series, source_groups: Mapping[str, str] | None) -> pd.Series:
    """Each row's source after ``source_groups`` (default :data:`HOSPITAL_GROUPS`); a group with one
    source present keeps that source's name."""
    groups = site_groups() if source_groups is None else dict(source_groups)
    names = sources.astype(str)
    present = set(names)
    members: dict[str, set[str]] = {}
    for source in present:
        members.setdefault(groups.get(source, source), set()).add(source)
    return names.map(lambda s: groups.get(s, s) if len(members[groups.get(s, s)]) > 1 else s)


def source_view(data: PreprocessedData, source_groups: Mapping[str, str] | None = None) -> PreprocessedData:
    """The same images and splits, labelled by SOURCE: classes are the sources present in train.

    Each row's label becomes its source (after ``source_groups``, default :data:`HOSPITAL_GROUPS`);
    the original label is kept in the column ``disease_label``. Validation and test rows of a
    source absent from train are left out (a model cannot predict a class it never saw); their
    number is in ``view.report["left_out"]``.
    """
    rows = cache_rows(data)
    rows["disease_label"] = rows["label"]
    rows["label"] = source_group(rows["source"], source_groups)
    classes = tuple(sorted(rows.loc[rows["split"] == "train", "label"].unique()))
    if not classes:
        raise ConfigError("the train split holds no images: nothing to learn sources from")
    known = rows["label"].isin(classes)
    left_out = rows.loc[~known].groupby(["split", "label"]).size()
    view = data_view(data, rows[known].assign(new_split=rows.loc[known, "split"]), classes=classes,
                     description=f"labels: source (groups {json.dumps(dict(source_groups or HOSPITAL_GROUPS), sort_keys=True)})")
    view.report["left_out"] = {f"{s}/{g}": int(n) for (s, g), n in left_out.items()}
    return view


def held_out_source_view(data: PreprocessedData, held_out: str,
                         source_groups: Mapping[str, str] | None = None) -> PreprocessedData:
    """Leave one source out: train and validate on the other sources, test on every image of ``held_out``.

    Train and val keep the other sources' train and val rows (patient-disjoint, as split); their
    test rows are not used. The test split is all of ``held_out``'s rows (train, val and test of
    the cache): none of its patients is seen in training. ``held_out`` is a source name after
    ``source_groups`` (default :data:`HOSPITAL_GROUPS`: "nih+rsna" for NIH and RSNA).
    """
    rows = cache_rows(data)
    group = source_group(rows["source"], source_groups)
    if held_out not in set(group):
        raise ConfigError(f"held_out {held_out!r} is not a source of the data; the sources are {sorted(set(group))}")
    inside = group == held_out
    new_split = np.where(inside, "test", rows["split"].to_numpy(dtype=object))
    keep = inside | (rows["split"] != "test").to_numpy()
    chosen = rows.assign(new_split=new_split)[keep]
    return data_view(data, chosen, description=f"leave out source {held_out} "
                                                f"(groups {json.dumps(dict(source_groups or HOSPITAL_GROUPS), sort_keys=True)})")


def hidden_region(size: int, region: str | np.ndarray = "rectangle") -> np.ndarray:
    """The ``(S, S)`` bool mask of what the lungs-hidden test blacks out.

    ``region``: "rectangle" (default): the centre of the film, :data:`CENTRAL_RECTANGLE`, as
    Maguolo and Nanni did: lungs, heart and mediastinum go, a frame of 15% of each side stays;
    "lungs": the two lung-field ellipses of :func:`xraylib.explain.lung_field_mask` only (the
    mediastinum and the film outside the lungs stay visible); or an ``(S, S)`` bool array.
    """
    if isinstance(region, np.ndarray):
        if region.shape != (size, size):
            raise ConfigError(f"a region given as a mask must be ({size}, {size}) like the images, got {region.shape}")
        return region.astype(bool)
    if region == "rectangle":
        top, bottom, left, right = CENTRAL_RECTANGLE
        mask = np.zeros((size, size), dtype=bool)
        mask[int(round(top * size)):int(round(bottom * size)), int(round(left * size)):int(round(right * size))] = True
        return mask
    if region == "lungs":
        return lung_field_mask(size)
    raise ConfigError(f"region must be one of {HIDDEN_REGIONS} or an (S, S) bool mask, got {region!r}")


def hidden_view(data: PreprocessedData, region: str | np.ndarray = "rectangle") -> PreprocessedData:
    """The same images, labels and splits with ``region`` (see :func:`hidden_region`) blacked out."""
    mask = hidden_region(data.settings.image_size, region)
    rows = cache_rows(data)
    name = region if isinstance(region, str) else "custom mask"
    return data_view(data, rows.assign(new_split=rows["split"]), hide=mask, description=f"hidden: {name}")



def lung_field_mask(size: int | tuple[int, int], centre_offset: float = 0.20, centre_y: float = 0.48,
                    half_width: float = 0.15, half_height: float = 0.28) -> np.ndarray:
    """An approximate lung-field mask for a frontal (PA/AP) chest X-ray: ``(H, W) bool``.

    For when no lung segmentation is available. Two ellipses, one per lung, centred at
    ``0.5 -/+ centre_offset`` of the width and ``centre_y`` of the height, with semi-axes
    ``half_width`` (of the width) and ``half_height`` (of the height). The defaults are fitted to
    :func:`xraylib.phantoms.make_phantom` lungs resized to a square (mean IoU about 0.63) and
    match a typical adult PA film framed from the apices to the costophrenic angles: each lung
    a third of the width, from about a sixth to three quarters of the height. It ignores the
    heart and the apices' taper and fits lateral or oddly framed (e.g. paediatric) films poorly;
    use it to say "most heat is on the lungs", not to measure a lung.
    ``size``: side of a square image, or ``(height, width)``.
    """
    height, width = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    if height < 1 or width < 1:
        raise ConfigError(f"size must be positive, got {size!r}")
    # Pixel centres, as fractions of the side: the mask does not shift with the resolution.
    y = (np.arange(height, dtype=np.float64)[:, None] + 0.5) / height
    x = (np.arange(width, dtype=np.float64)[None, :] + 0.5) / width
    mask = np.zeros((height, width), dtype=bool)
    for centre_x in (0.5 - centre_offset, 0.5 + centre_offset):
        mask |= ((x - centre_x) / half_width) ** 2 + ((y - centre_y) / half_height) ** 2 <= 1.0
    return mask
