"""Predict with a trained model on your own PNG/JPEG/DICOM files (cached splits: :func:`xraylib.models.predict_split`).

Files are preprocessed exactly as in training: the settings come from the JSON saved with
the model, never re-typed. The decision uses the model's own threshold (saved with it: chosen on the
validation split or on out-of-site predictions), or a site profile's (``site=``, made by :mod:`xraylib.calibrate`).
Every image also goes through the web page's out-of-distribution guard (:mod:`xraylib.ood`): one it flags keeps its
probabilities but gets no decision, and its row says why.

Any number of files: :func:`iter_predictions` reads, preprocesses and predicts :data:`FILES_PER_BATCH` files at a time
and yields each batch's rows before reading the next, so a folder of 100,000 images needs the memory of one batch
(``python -m xraylib predict --csv`` writes them as they come); :func:`predict_files` collects them into one table.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .errors import BadFileError, ConfigError
from .images import read_image_bytes
from .models import LoadedModel, load_model, predict_images
from .preprocess import PreprocessSettings, preprocess_bytes, preprocess_file
from .reporting import probability_columns
from .sources import IMAGE_SUFFIXES


def decide(probs: np.ndarray, classes: tuple[str, ...], positive_class: str, threshold: float) -> list[str]:
    """The decision per row: the positive class when its probability reaches ``threshold``, else the likeliest other class."""
    probs = np.atleast_2d(probs)
    pos = classes.index(positive_class)
    others = [i for i in range(len(classes)) if i != pos]
    decisions = []
    for row in probs:
        if row[pos] >= threshold:
            decisions.append(classes[pos])
        else:
            decisions.append(classes[others[int(np.argmax(row[others]))]])
    return decisions


#: Files read, preprocessed and predicted together by :func:`iter_predictions` (and :func:`predict_files`): the
#: memory a folder needs is that of one batch (256 model inputs of 224 x 224: 13 MB), whatever its number of files.
FILES_PER_BATCH = 256


def collect_image_paths(target: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """A file, a list of files, or a folder (searched recursively for .png/.jpg/.jpeg/.dcm) as a sorted list."""
    if isinstance(target, (str, os.PathLike)):
        path = Path(target)
        if path.is_dir():
            found = _image_files(path)
            if not found:
                raise ConfigError(f"{path}: no .png, .jpg, .jpeg or .dcm files in this folder")
            return found
        if not path.exists():
            raise ConfigError(f"{path}: no such file or folder")
        return [path]
    return [Path(p) for p in target]


def _image_files(folder: Path) -> list[Path]:
    """The image files under ``folder`` in path order, from one walk of its directory listings (the entries' types come
    with the listing: no call per file, which counts on a Drive folder of 100,000 images).

    Hidden files and folders (macOS "._x.png", .ipynb_checkpoints, .Trash) are never the user's images, and hidden
    folders are not entered. Not only regular files: a named pipe or device with an image's name is reported when read,
    not skipped. A link to a folder is not followed (as ``Path.rglob``).
    """
    found = []
    for root, folders, files in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(".")]
        found += [os.path.join(root, name) for name in files
                  if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES]
    return [Path(p) for p in sorted(found, key=lambda p: p.split(os.sep))]  # as Paths sort: part by part


def _read_for_model(path: str | os.PathLike, settings: PreprocessSettings, with_facts: bool):
    """One file: its model input ``(S, S) uint8`` (None when unreadable), its row (``path``, ``ok``, ``error``) and,
    with ``with_facts``, its :func:`xraylib.ood.image_facts`."""
    from . import ood

    try:
        data = read_image_bytes(path, map_dicoms=True)  # a FIFO, a device or a large file of another kind: refused unread
        fact = ood.image_facts(data, str(path)) if with_facts else None
        image = preprocess_bytes(data, str(path), settings)
    except BadFileError as exc:
        return None, {"path": str(path), "ok": False, "error": exc.reason}, None
    except Exception as exc:  # a decoder bug must not stop a folder of thousands (as preprocess._work)
        return None, {"path": str(path), "ok": False, "error": f"unexpected {type(exc).__name__}: {exc}"}, None
    return image, {"path": str(path), "ok": True, "error": None}, fact


def _preprocess_batch(paths: list, settings: PreprocessSettings, with_facts: bool) -> tuple[np.ndarray, pd.DataFrame, list]:
    size = settings.image_size
    images = np.empty((len(paths), size, size), dtype=np.uint8)  # each decoded image copied in and dropped
    rows, facts, kept = [], [], 0
    for path in paths:
        image, row, fact = _read_for_model(path, settings, with_facts)
        rows.append(row)
        if image is not None:
            images[kept] = image
            kept += 1
            if with_facts:
                facts.append(fact)
        del image
    frame = pd.DataFrame(rows, columns=["path", "ok", "error"])
    # None for a file read, in every batch (pandas would make it NaN in a batch with a bad file, None in one without)
    frame["error"] = pd.Series([row["error"] for row in rows], index=frame.index, dtype=object)
    return images[:kept], frame, facts


def preprocess_files(loaded: LoadedModel, paths: Iterable[str | os.PathLike], with_facts: bool = False
                     ) -> tuple[np.ndarray, pd.DataFrame, list]:
    """Read and preprocess files as the model's training data was (settings from ``model.json``), all at once.

    Returns the readable files' model inputs ``(N, S, S) uint8``, a table with one row per file (``path``,
    ``ok``, ``error``: why a file was skipped) and, with ``with_facts``, the readable files'
    :func:`xraylib.ood.image_facts` (size and colour, for the out-of-distribution guard; else an empty list).
    For many files, :func:`iter_preprocessed` gives the same a batch at a time.
    """
    return _preprocess_batch(list(paths), PreprocessSettings.from_dict(loaded.metadata["preprocessing"]), with_facts)


def _batch_files(batch_files: int) -> int:
    """``batch_files`` checked: a positive whole number of files per batch."""
    if isinstance(batch_files, bool) or int(batch_files) < 1:
        raise ConfigError(f"batch_files must be a positive integer, got {batch_files!r}")
    return int(batch_files)


def iter_preprocessed(loaded: LoadedModel, paths: Iterable[str | os.PathLike], with_facts: bool = False,
                      batch_files: int = FILES_PER_BATCH) -> Iterator[tuple[np.ndarray, pd.DataFrame, list]]:
    """:func:`preprocess_files` ``batch_files`` files at a time: each batch is read only when the one before is taken."""
    batch_files = _batch_files(batch_files)
    settings = PreprocessSettings.from_dict(loaded.metadata["preprocessing"])
    batch: list = []
    for path in paths:
        batch.append(path)
        if len(batch) == batch_files:
            yield _preprocess_batch(batch, settings, with_facts)
            batch = []
    if batch:
        yield _preprocess_batch(batch, settings, with_facts)


#: What the ``decision`` column holds for an image the out-of-distribution guard flags: none (empty in a CSV).
NOT_JUDGEABLE = "not a chest X-ray this model can judge"


def predict_files(model: LoadedModel | str | os.PathLike, target, batch_size: int = 16,
                  site: str | None = None, data_dir: str | os.PathLike | None = None,
                  say: Callable[[str], None] = print, batch_files: int = FILES_PER_BATCH,
                  progress: bool | None = None) -> pd.DataFrame:
    """Predict PNG/JPEG/DICOM files (a file, a list or a folder) with a saved model.

    Returns one row per file: ``path``, ``ok``, ``error`` (why a file was skipped), one
    ``prob_<class>`` column per class, ``decision``, ``threshold`` (the one decided at) and ``site``, then
    ``judgeable``, ``ood_reason`` and ``ood_check``: the web page's out-of-distribution guard (:mod:`xraylib.ood`) on
    every image. An image it flags (a colour photo, a black square, a lateral film, ...) keeps its probabilities but
    gets no decision (empty), ``judgeable`` False and ``ood_reason`` saying why; ``ood_check`` is how thorough the
    check was ("full", "statistics", or "basic": colour and shape only, for a model without a reference).
    The reference comes from :func:`xraylib.runs.prepare_ood`, as for the web page: ``ood.json``/``ood.npz`` beside the
    model, else built from ``data_dir`` (the preprocessed folder) or the training data named in ``model.json`` and saved
    beside the model (kept in memory when that folder is read-only); ``say`` gets its one-line messages.
    ``site`` names a site profile of the model (:mod:`xraylib.calibrate`): decisions at its threshold;
    None (default): at ``model``'s threshold (a loaded model made for a site with :meth:`LoadedModel.for_site` keeps that
    site's; otherwise the model's own, saved with it, and ``site`` is empty).
    A bad file is reported in its row, not fatal; an unknown site raises :class:`ModelError` naming the known ones.
    The files are read ``batch_files`` at a time (:func:`iter_predictions`, which gives the rows as they come): only
    the table grows with their number. ``progress``: a progress bar (None: for more than one batch of files).
    """
    frames = list(iter_predictions(model, target, batch_size, site, data_dir, say, batch_files, progress))
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def iter_predictions(model: LoadedModel | str | os.PathLike, target, batch_size: int = 16,
                     site: str | None = None, data_dir: str | os.PathLike | None = None,
                     say: Callable[[str], None] = print, batch_files: int = FILES_PER_BATCH,
                     progress: bool | None = None) -> Iterator[pd.DataFrame]:
    """:func:`predict_files`' rows as they come: one table per ``batch_files`` files, in file order.

    Each batch is read, preprocessed, predicted and checked by the out-of-distribution guard, and its table yielded
    before the next file is read: memory is that of one batch, whatever the number of files. The guard needs no
    statistics of the set (each image is compared with the model's reference of its training images), so its verdicts
    are those of the whole folder at once. The model, the site, the list of files and the reference are settled when
    this is called (their errors are raised here, before any file is read); ``say`` gets the count of images that got
    no decision after the last batch. Always yields at least one table (empty for no files).
    """
    from . import ood, runs

    batch_files = _batch_files(batch_files)
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    loaded = loaded.for_site(site) if site is not None else loaded  # a model already made for a site keeps its threshold
    paths = collect_image_paths(target)
    reference, _ = runs.prepare_ood(loaded, data_dir, say=say)
    guard = ood.OODGuard.for_model(loaded, reference)
    shown = len(paths) > batch_files if progress is None else bool(progress)
    return _prediction_batches(loaded, guard, paths, batch_size, batch_files, say, shown)


def _prediction_batches(loaded: LoadedModel, guard, paths: list[Path], batch_size: int, batch_files: int,
                        say: Callable[[str], None], progress: bool) -> Iterator[pd.DataFrame]:
    flagged = readable = 0
    with tqdm(total=len(paths), desc="predicting", unit="file", disable=not progress) as bar:
        batches = iter_preprocessed(loaded, paths, with_facts=True, batch_files=batch_files)
        if not paths:  # one empty table all the same
            settings = PreprocessSettings.from_dict(loaded.metadata["preprocessing"])
            batches = iter([_preprocess_batch([], settings, with_facts=True)])
        for images, frame, facts in batches:
            frame = _predicted(loaded, guard, images, frame, facts, batch_size)
            del images, facts  # only the rows wait for the caller
            flagged += int((frame["ok"] & ~frame["judgeable"].astype(bool)).sum())
            readable += int(frame["ok"].sum())
            bar.update(len(frame))
            yield frame
    if flagged:
        say(f"{flagged} of {readable} images got no decision: {NOT_JUDGEABLE} (see ood_reason)")


def _predicted(loaded: LoadedModel, guard, images: np.ndarray, frame: pd.DataFrame, facts: list,
               batch_size: int) -> pd.DataFrame:
    """``frame`` (one batch's ``path``, ``ok``, ``error``) with the predictions, decisions and guard columns."""
    classes = loaded.classes
    columns = probability_columns(classes)
    for column in columns:
        frame[column] = np.nan
    frame["decision"] = None
    frame["threshold"] = loaded.threshold
    frame["site"] = loaded.site
    frame["judgeable"] = False
    frame["ood_reason"] = None
    frame["ood_check"] = guard.level
    if len(images):
        probs = predict_images(loaded.model, images, batch_size)
        verdicts = guard.check(images, facts)
        judgeable = np.array([v.ok for v in verdicts], dtype=bool)
        decisions = decide(probs, classes, loaded.positive_class, loaded.threshold)
        ok = frame["ok"].to_numpy(dtype=bool)
        frame.loc[ok, columns] = probs
        frame.loc[ok, "decision"] = [d if fine else None for d, fine in zip(decisions, judgeable)]
        frame.loc[ok, "judgeable"] = judgeable
        frame.loc[ok, "ood_reason"] = [None if v.ok else " ".join(v.reasons) for v in verdicts]
    return frame


def preprocess_for_model(loaded: LoadedModel, path: str | os.PathLike) -> np.ndarray:
    """One file preprocessed as the model's training data was: ``(S, S) uint8``."""
    return preprocess_file(path, PreprocessSettings.from_dict(loaded.metadata["preprocessing"]))
