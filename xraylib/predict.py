"""Predict with a trained model on your own PNG/JPEG/DICOM files (cached splits: :func:`xraylib.models.predict_split`).

Files are preprocessed exactly as in training: the settings come from the JSON saved with
the model, never re-typed. The decision uses the model's own threshold (saved with it: chosen on the
validation split or on out-of-site predictions), or a site profile's (``site=``, made by :mod:`xraylib.calibrate`).
Every image also goes through the web page's out-of-distribution guard (:mod:`xraylib.ood`): one it flags keeps its
probabilities but gets no decision, and its row says why.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd

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


def collect_image_paths(target: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """A file, a list of files, or a folder (searched recursively for .png/.jpg/.jpeg/.dcm) as a sorted list."""
    if isinstance(target, (str, os.PathLike)):
        path = Path(target)
        if path.is_dir():
            # Hidden files and folders (macOS "._x.png", .ipynb_checkpoints, .Trash) are never the user's images.
            # Not only regular files: a named pipe or device with an image's name is reported when read, not skipped.
            found = sorted(p for p in path.rglob("*") if not p.is_dir() and p.suffix.lower() in IMAGE_SUFFIXES
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise ConfigError(f"{path}: no .png, .jpg, .jpeg or .dcm files in this folder")
            return found
        if not path.exists():
            raise ConfigError(f"{path}: no such file or folder")
        return [path]
    return [Path(p) for p in target]


def preprocess_files(loaded: LoadedModel, paths: Iterable[str | os.PathLike], with_facts: bool = False
                     ) -> tuple[np.ndarray, pd.DataFrame, list]:
    """Read and preprocess files as the model's training data was (settings from ``model.json``).

    Returns the readable files' model inputs ``(N, S, S) uint8``, a table with one row per file (``path``,
    ``ok``, ``error``: why a file was skipped) and, with ``with_facts``, the readable files'
    :func:`xraylib.ood.image_facts` (size and colour, for the out-of-distribution guard; else an empty list).
    """
    from . import ood

    settings = PreprocessSettings.from_dict(loaded.metadata["preprocessing"])
    images, rows, facts = [], [], []
    for path in paths:
        try:
            data = read_image_bytes(path)  # a FIFO, a device or a large file of another kind: refused unread
            fact = ood.image_facts(data, str(path)) if with_facts else None
            images.append(preprocess_bytes(data, str(path), settings))
        except BadFileError as exc:
            rows.append({"path": str(path), "ok": False, "error": exc.reason})
            continue
        rows.append({"path": str(path), "ok": True, "error": None})
        if with_facts:
            facts.append(fact)
    size = settings.image_size
    stacked = np.stack(images) if images else np.zeros((0, size, size), dtype=np.uint8)
    return stacked, pd.DataFrame(rows, columns=["path", "ok", "error"]), facts


#: What the ``decision`` column holds for an image the out-of-distribution guard flags: none (empty in a CSV).
NOT_JUDGEABLE = "not a chest X-ray this model can judge"


def predict_files(model: LoadedModel | str | os.PathLike, target, batch_size: int = 16,
                  site: str | None = None, data_dir: str | os.PathLike | None = None,
                  say: Callable[[str], None] = print) -> pd.DataFrame:
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
    """
    from . import ood, runs

    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    loaded = loaded.for_site(site) if site is not None else loaded  # a model already made for a site keeps its threshold
    classes = loaded.classes
    images, frame, facts = preprocess_files(loaded, collect_image_paths(target), with_facts=True)
    reference, _ = runs.prepare_ood(loaded, data_dir, say=say)
    guard = ood.OODGuard.for_model(loaded, reference)
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
    flagged = int((frame["ok"] & ~frame["judgeable"].astype(bool)).sum())
    if flagged:
        say(f"{flagged} of {int(frame['ok'].sum())} images got no decision: {NOT_JUDGEABLE} (see ood_reason)")
    return frame


def preprocess_for_model(loaded: LoadedModel, path: str | os.PathLike) -> np.ndarray:
    """One file preprocessed as the model's training data was: ``(S, S) uint8``."""
    return preprocess_file(path, PreprocessSettings.from_dict(loaded.metadata["preprocessing"]))
