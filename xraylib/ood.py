"""Out-of-distribution guard: say when an image does not look like the frontal chest X-rays a model was trained on.

A classifier answers for any input: a holiday photo, a lateral view, a CT slice or a scanned
letter gets "COVID-19, 93 %" as readily as a chest film. Before a prediction is shown, each
image goes through the checks below, and any check that fires makes it "not a chest X-ray this
model can judge":

1. **Cheap checks on the image** (no model needed):

   - *colour*: the share of pixels of the original file whose colour is strongly saturated
     (max - min of R, G, B above :data:`COLOUR_CHROMA` of 255) is above
     :data:`COLOUR_FRACTION`. Radiographs are grey; a coloured arrow or label stays far below it.
   - *shape*: the original's width / height is outside :data:`ASPECT_RANGE` (chest films are
     roughly square, 0.8 to 1.25; the range is generous).
   - *intensity statistics* of the preprocessed model input (:data:`STAT_NAMES`: mean, standard
     deviation, share of near-white and of near-black pixels, fine-texture "roughness") far
     outside the training images' range: below the 0.5th percentile or above the 99.5th
     percentile of the training split by more than :data:`STAT_MARGIN` times that range (and
     at least :data:`STAT_MIN_MARGIN`).
     A page of text is too bright and too rough, pure noise too rough, a CT slice too dark.

2. **Layout distance** (no model needed, but the reference): the model input shrunk to a
   :data:`LAYOUT_SIDE` x :data:`LAYOUT_SIDE` thumbnail, standardised, and compared with the
   training images' thumbnails by the correlation distance (1 - Pearson r) to the ``k``-th
   nearest one. A frontal film has two dark lung fields either side of a bright mediastinum; a
   lateral view, a CT slice, a page or a photo is laid out otherwise.

3. **Feature distance** (needs the model's layers; a SavedModel has none): the backbone's last
   feature map (the layer feeding the head, :func:`xraylib.models.feature_layer_name`) averaged
   over a 2 x 2 grid (so where a feature is counts, not only whether), L2-normalised, and
   compared with the training split's by the cosine distance to the ``k``-th nearest training
   image (deep nearest neighbours, Sun et al., ICML 2022).

The threshold of each distance is its ``quantile`` (default 0.99) over the validation images
plus :data:`DISTANCE_MARGIN` (25 %). The margin is there because the guard is for inputs that
are plainly not chest films, and because with a validation split of tens or a few hundred images
the 0.99 quantile is itself uncertain: without it, several checks at 1 % each flag more than 1 %
of good images, mostly ones only just beyond a threshold. With it, none of the 40 held-out
frontal phantoms of the tests and none of the 29 test images of ``make demo`` is flagged, while
every colour photo, page, CT slice, lateral view and noise image the tests make is.

:func:`fit_ood` computes the reference from the preprocessed data; the run folder writes it
beside the model (``ood.npz`` + ``ood.json``, :meth:`xraylib.runs.RunFolder.save_ood`), :func:`load_ood` reads it back.
:class:`OODGuard` checks images. A guard without a reference runs the colour and shape checks
only (and flags blank images, :data:`FLAT_STD`), and says so in every result.

These checks catch inputs that are plainly not what the model saw. They cannot tell a frontal
chest X-ray from another hospital, scanner or age group from the training ones: passing them is
not a licence to trust the prediction.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import cv2
import numpy as np

from .errors import BadFileError, ConfigError, ModelError

if TYPE_CHECKING:
    import keras

    from .models import LoadedModel
    from .preprocess import PreprocessedData

#: A pixel is "strongly coloured" when max(R, G, B) - min(R, G, B) exceeds this (of 255).
COLOUR_CHROMA = 48
#: An image is a colour image when more than this share of its pixels is strongly coloured.
COLOUR_FRACTION = 0.10
#: Width / height of the original image that a chest film can have.
ASPECT_RANGE = (0.5, 2.0)
#: A model input whose grey levels vary less than this (standard deviation, 0-255) is blank: flagged with or without a
#: reference (a black 7745 x 7745 PNG must not get a decision). A chest film varies by tens of grey levels.
FLAT_STD = 2.0
#: The intensity statistics of the model input compared with the training range.
STAT_NAMES = ("mean", "std", "white_share", "black_share", "roughness")
STAT_LABELS = {
    "mean": "mean brightness", "std": "contrast (standard deviation)", "white_share": "share of near-white pixels",
    "black_share": "share of near-black pixels", "roughness": "fine texture (roughness)",
}
#: How far outside the training range (in units of that range) a statistic must be to fire ...
STAT_MARGIN = 0.25
#: ... and at least this far (intensities and shares are in 0..1).
STAT_MIN_MARGIN = 0.05
#: The layout and feature thresholds are the validation quantile times (1 + this).
DISTANCE_MARGIN = 0.25
#: Percentiles of the training split that bound the range.
STAT_PERCENTILES = (0.5, 99.5)
#: The feature map is averaged over this grid (rows, columns).
FEATURE_GRID = (2, 2)
#: Side of the thumbnail the layout check compares.
LAYOUT_SIDE = 8

OOD_FILES = ("ood.npz", "ood.json")
_FORMAT = "xraylib ood reference v1"


@dataclass(frozen=True)
class ImageFacts:
    """What the cheap checks need from the original file: its size and how colourful it is."""

    width: int
    height: int
    colour_fraction: float

    @property
    def aspect_ratio(self) -> float:
        return self.width / max(self.height, 1)


@dataclass(frozen=True)
class OODResult:
    """The verdict for one image. ``ok``: nothing fired. ``reasons``: one plain sentence per check that fired.

    ``measures``: the values checked (``colour_fraction``, ``aspect_ratio``, the statistics,
    ``feature_distance``); ``notes``: checks that could not run (no reference, no layers).
    """

    ok: bool
    reasons: tuple[str, ...] = ()
    measures: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "reasons": list(self.reasons), "notes": list(self.notes),
                "measures": {k: (None if v is None or not np.isfinite(v) else float(v)) for k, v in self.measures.items()}}


@dataclass(frozen=True)
class OODReference:
    """The training distribution as the guard sees it.

    ``train_features``: ``(N, D) float32``, unit rows (None when the model has no reachable layers).
    ``feature_threshold``: cosine distance to the ``k``-th nearest training image above which an
    image is out of distribution. ``train_layouts`` / ``layout_threshold``: the same for the
    thumbnails of :func:`layout_vectors`. ``stat_low`` / ``stat_high``: ``(len(STAT_NAMES),)`` bounds.
    ``fingerprint``: identifies the model the reference was made for (see :func:`model_fingerprint`).
    """

    stat_low: np.ndarray
    stat_high: np.ndarray
    train_features: np.ndarray | None
    feature_threshold: float | None
    k: int
    quantile: float
    feature_layer: str | None
    fingerprint: dict[str, Any]
    n_train: int
    n_val: int
    val_distances: np.ndarray | None = None
    train_layouts: np.ndarray | None = None
    layout_threshold: float | None = None
    val_layout_distances: np.ndarray | None = None

    @property
    def has_features(self) -> bool:
        return self.train_features is not None and self.feature_threshold is not None

    @property
    def has_layout(self) -> bool:
        return self.train_layouts is not None and self.layout_threshold is not None


# --------------------------------------------------------------------------------------------
# Measuring


def image_facts(data: bytes, name: str = "<bytes>") -> ImageFacts:
    """Size and colour share of a PNG/JPEG/DICOM file's bytes. Raises :class:`BadFileError`.

    The decompression-bomb guard (:data:`xraylib.images.MAX_PIXELS`) runs before any pixel is
    decoded. A DICOM is colour when its photometric interpretation is (RGB, YBR_*).
    """
    from . import images

    info = images.inspect_bytes(data, name)
    if info.file_format == "dicom":
        photometric = (info.dicom_header.photometric or "") if info.dicom_header else ""
        colour = 1.0 if photometric.upper().startswith(("RGB", "YBR")) else 0.0
        return ImageFacts(int(info.width), int(info.height), colour)
    if info.channels is not None and info.channels < 3:
        return ImageFacts(int(info.width), int(info.height), 0.0)
    # Large images are reduced while decoding: colour is a property of large areas, and memory stays down.
    pixels = int(info.width) * int(info.height)
    reduced = (cv2.IMREAD_REDUCED_COLOR_4 if pixels > 16_000_000 else
               cv2.IMREAD_REDUCED_COLOR_2 if pixels > 4_000_000 else cv2.IMREAD_COLOR)
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), reduced)
    if bgr is None:
        raise BadFileError(name, "image data is damaged and could not be decoded")
    return ImageFacts(int(info.width), int(info.height), colour_fraction(bgr))


def colour_fraction(image: np.ndarray) -> float:
    """Share of the pixels of an ``(H, W, 3) uint8`` image whose colour is strongly saturated; 0.0 for gray ``(H, W)``."""
    image = np.asarray(image)
    if image.ndim == 2:
        return 0.0
    if image.ndim != 3 or image.shape[2] < 3:
        raise ConfigError(f"image must be (H, W) gray or (H, W, 3) colour, got shape {image.shape}")
    rgb = image[..., :3]
    chroma = rgb.max(axis=2).astype(np.int16) - rgb.min(axis=2).astype(np.int16)
    return float((chroma > COLOUR_CHROMA).mean())


def image_statistics(images_uint8: np.ndarray, chunk: int = 256) -> np.ndarray:
    """:data:`STAT_NAMES` of ``(N, S, S) uint8`` model inputs: ``(N, 5) float64``, intensities in 0..1.

    ``roughness`` is the mean absolute difference from a Gaussian blur (sigma 1 px) divided by
    the standard deviation: high for noise and text, low for the smooth shading of a radiograph.
    """
    images = images_uint8 if isinstance(images_uint8, np.ndarray) else np.asarray(images_uint8)
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3:
        raise ConfigError(f"images must be (N, S, S) uint8, got shape {images.shape}")
    out = np.zeros((len(images), len(STAT_NAMES)), dtype=np.float64)
    for begin in range(0, len(images), chunk):  # a memory-mapped cache is read a chunk at a time
        x = np.asarray(images[begin:begin + chunk], dtype=np.float32) / 255.0
        blur = np.stack([cv2.GaussianBlur(image, (0, 0), 1.0) for image in x]) if len(x) else x
        std = x.std(axis=(1, 2))
        out[begin:begin + len(x)] = np.stack([
            x.mean(axis=(1, 2)), std, (x >= 0.94).mean(axis=(1, 2)), (x <= 0.02).mean(axis=(1, 2)),
            np.abs(x - blur).mean(axis=(1, 2)) / (std + 1e-3),
        ], axis=1)
    return out


def layout_vectors(images_uint8: np.ndarray) -> np.ndarray:
    """Each ``(S, S) uint8`` image as a standardised :data:`LAYOUT_SIDE` x :data:`LAYOUT_SIDE` thumbnail:
    ``(N, LAYOUT_SIDE**2) float32`` unit rows, so that the cosine distance of two rows is 1 - Pearson r."""
    images = images_uint8 if isinstance(images_uint8, np.ndarray) else np.asarray(images_uint8)
    if images.ndim == 2:
        images = images[None]
    side = LAYOUT_SIDE
    thumbs = np.zeros((len(images), side * side), dtype=np.float64)
    for i in range(len(images)):
        thumbs[i] = cv2.resize(np.asarray(images[i]), (side, side), interpolation=cv2.INTER_AREA).reshape(-1)
    thumbs -= thumbs.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(thumbs, axis=1, keepdims=True)
    return (thumbs / np.maximum(norms, 1e-9)).astype(np.float32)  # a flat image stays all zeros: distance 1


def feature_extractor(model: "keras.Model") -> "keras.Model":
    """A model from the input to the backbone's last feature map (the layer feeding the head), ``(N, h, w, C)``.

    Raises :class:`ModelError` when the model has no such layer (e.g. a SavedModel).
    """
    import keras

    from .models import feature_layer_name

    try:
        name = feature_layer_name(model)
        output = model.get_layer(name).output
    except (ValueError, AttributeError, IndexError) as exc:
        raise ModelError(f"model {model.name!r} has no reachable backbone feature map feeding a 'head_pool' layer "
                         f"({type(exc).__name__}: {exc}); the feature-distance check needs a .keras or .h5 model") from None
    return keras.Model(model.input, output, name="ood_features")


def backbone_features(extractor: "keras.Model", images_uint8: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Unit-length grid-pooled features ``(N, C * 4) float32`` of ``(N, S, S) uint8`` images (see the module doc)."""
    images = images_uint8 if isinstance(images_uint8, np.ndarray) else np.asarray(images_uint8)
    chunks = []
    for begin in range(0, len(images), batch_size):
        x = np.asarray(images[begin:begin + batch_size], dtype=np.float32)[..., None]
        fmap = np.asarray(extractor(x, training=False), dtype=np.float32)
        chunks.append(_grid_pool(fmap))
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    features = np.concatenate(chunks)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return (features / np.maximum(norms, 1e-12)).astype(np.float32)


def _grid_pool(fmap: np.ndarray) -> np.ndarray:
    """``(N, h, w, C)`` averaged over a :data:`FEATURE_GRID` of regions (uneven sides split as evenly as possible)."""
    rows = np.array_split(np.arange(fmap.shape[1]), min(FEATURE_GRID[0], fmap.shape[1]))
    cols = np.array_split(np.arange(fmap.shape[2]), min(FEATURE_GRID[1], fmap.shape[2]))
    cells = [fmap[:, r[0]:r[-1] + 1, c[0]:c[-1] + 1, :].mean(axis=(1, 2)) for r in rows for c in cols]
    return np.concatenate(cells, axis=1)


def _threshold(train_vectors: np.ndarray, val_vectors: np.ndarray, k: int,
               quantile: float) -> tuple[float | None, np.ndarray | None]:
    """The ``quantile`` of the validation rows' ``k``-NN distances to the training rows times
    ``1 + DISTANCE_MARGIN``, and those distances.

    Without validation rows: leave-one-out distances among the training rows (None with fewer than two).
    """
    if len(val_vectors):
        distances = knn_distance(train_vectors, val_vectors, k)
    elif len(train_vectors) > 1:
        within = 1.0 - train_vectors.astype(np.float64) @ train_vectors.T.astype(np.float64)
        np.fill_diagonal(within, np.inf)
        nearest = min(int(k), len(train_vectors) - 1)
        distances = np.partition(within, nearest - 1, axis=1)[:, nearest - 1]
    else:
        return None, None
    return float(np.quantile(distances, quantile) * (1.0 + DISTANCE_MARGIN)), distances


def knn_distance(reference: np.ndarray, queries: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """Cosine distance ``(M,)`` from each unit row of ``queries`` to its ``k``-th nearest unit row of ``reference``.

    ``chunk`` queries at a time: the distance matrix of all validation images of NIH ChestX-ray14 (about 17,000)
    against a reference of 4,000 would take 540 MB at once."""
    if len(queries) == 0:
        return np.zeros(0, dtype=np.float64)
    k = max(1, min(int(k), len(reference)))
    reference = np.asarray(reference, np.float64)
    out = np.empty(len(queries), dtype=np.float64)
    for begin in range(0, len(queries), chunk):
        distances = 1.0 - np.asarray(queries[begin:begin + chunk], np.float64) @ reference.T
        out[begin:begin + len(distances)] = np.partition(distances, k - 1, axis=1)[:, k - 1]
    return out


# --------------------------------------------------------------------------------------------
# The reference


def model_fingerprint(loaded: "LoadedModel") -> dict[str, Any]:
    """What ties a reference to one trained model: its JSON's save time and training-data key."""
    return {"model_saved_at": loaded.metadata.get("saved_at"),
            "training_data_key": loaded.metadata.get("training_data", {}).get("key")}


def fit_ood(loaded: "LoadedModel", data: "PreprocessedData", quantile: float = 0.99, k: int = 5,
            max_reference: int = 4000, seed: int = 0, batch_size: int = 32) -> OODReference:
    """The reference for ``loaded`` from the preprocessed data it was trained on.

    Statistics and features come from the ``train`` split (at most ``max_reference`` images, a
    seeded random subset); the layout and feature thresholds are the ``quantile`` of the
    validation images' ``k``-NN distances plus :data:`DISTANCE_MARGIN`. Without the model's layers (a SavedModel) there are no
    features: statistics and layout only.
    Raises :class:`ConfigError` when the data's image size or classes are not the model's.
    """
    from .preprocess import PreprocessSettings

    if not 0.5 <= quantile < 1.0:
        raise ConfigError(f"quantile must be in [0.5, 1), got {quantile}")
    if isinstance(k, bool) or int(k) < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    settings = PreprocessSettings.from_dict(loaded.metadata["preprocessing"])
    if data.settings.image_size != settings.image_size or tuple(data.classes) != tuple(loaded.classes):
        raise ConfigError(
            f"{data.folder}: preprocessed at {data.settings.image_size} px for classes {list(data.classes)}, but the "
            f"model takes {settings.image_size} px for {list(loaded.classes)}: give the data the model was trained on"
        )
    train, val = data["train"], data["val"]
    if len(train) == 0:
        raise ConfigError(f"{data.folder}: the train split is empty; the guard needs training images")
    rows = np.arange(len(train))
    if len(rows) > max_reference:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=max_reference, replace=False))
    train_images = np.asarray(train.images[rows])
    stats = image_statistics(train_images)
    low_q, high_q = np.percentile(stats, STAT_PERCENTILES, axis=0)
    margin = np.maximum(STAT_MARGIN * (high_q - low_q), STAT_MIN_MARGIN)
    stat_low, stat_high = low_q - margin, high_q + margin

    train_layouts = layout_vectors(train_images)
    layout_threshold, val_layout_distances = _threshold(train_layouts, layout_vectors(np.asarray(val.images)), k, quantile)
    train_features = threshold = layer = val_distances = None
    if loaded.has_layers:
        from .models import feature_layer_name

        extractor = feature_extractor(loaded.model)
        layer = feature_layer_name(loaded.model)
        train_features = backbone_features(extractor, train_images, batch_size)
        threshold, val_distances = _threshold(train_features, backbone_features(extractor, val.images, batch_size),
                                              k, quantile)
        if threshold is None:
            train_features = None
    return OODReference(stat_low.astype(np.float64), stat_high.astype(np.float64), train_features, threshold, int(k),
                        float(quantile), layer, model_fingerprint(loaded), int(len(rows)), int(len(val)), val_distances,
                        train_layouts if layout_threshold is not None else None, layout_threshold, val_layout_distances)


def _model_dir(model_dir: str | os.PathLike) -> Path:
    path = Path(model_dir)
    if path.is_file():  # model.keras or model.h5: its folder
        return path.parent
    if (path / "saved_model.pb").is_file() and not (path / "model.json").is_file():
        return path.parent  # run/saved_model: the run folder
    return path


def reference_files(reference: OODReference) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """What ``ood.npz`` (arrays) and ``ood.json`` (settings, bounds, threshold) hold for ``reference``; the run
    folder writes them beside the model (:meth:`xraylib.runs.RunFolder.save_ood`) and :func:`load_ood` reads them."""
    arrays: dict[str, np.ndarray] = {"stat_low": reference.stat_low, "stat_high": reference.stat_high}
    if reference.train_features is not None:
        arrays["train_features"] = reference.train_features
    for name in ("val_distances", "train_layouts", "val_layout_distances"):
        if getattr(reference, name) is not None:
            arrays[name] = getattr(reference, name)
    meta = {
        "format": _FORMAT, "fingerprint": reference.fingerprint, "k": reference.k, "quantile": reference.quantile,
        "feature_layer": reference.feature_layer, "feature_threshold": reference.feature_threshold,
        "feature_grid": list(FEATURE_GRID), "layout_threshold": reference.layout_threshold, "layout_side": LAYOUT_SIDE,
        "n_train": reference.n_train, "n_val": reference.n_val,
        "stat_names": list(STAT_NAMES), "stat_low": reference.stat_low.tolist(), "stat_high": reference.stat_high.tolist(),
        "stat_margin": STAT_MARGIN, "stat_min_margin": STAT_MIN_MARGIN, "distance_margin": DISTANCE_MARGIN,
        "stat_percentiles": list(STAT_PERCENTILES),
        "colour_chroma": COLOUR_CHROMA, "colour_fraction": COLOUR_FRACTION, "aspect_range": list(ASPECT_RANGE),
    }
    return arrays, meta


def load_ood(model_dir: str | os.PathLike, loaded: "LoadedModel | None" = None) -> OODReference | None:
    """The reference saved beside a model, or None when there is none.

    With ``loaded``, a reference made for another model (retrained in the same folder) raises
    :class:`ModelError` saying to rebuild it; a damaged one does too.
    """
    folder = _model_dir(model_dir)
    json_path, npz_path = folder / "ood.json", folder / "ood.npz"
    if not json_path.is_file():
        return None
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
        if meta.get("format") != _FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {_FORMAT!r}")
        with np.load(npz_path, allow_pickle=False) as arrays:
            stored = {name: np.array(arrays[name]) for name in arrays.files}
        if list(meta["stat_names"]) != list(STAT_NAMES) or meta.get("layout_side") != LAYOUT_SIDE:
            raise ValueError(f"made by another version of the guard (statistics {meta['stat_names']}, layout side "
                             f"{meta.get('layout_side')}); expected {list(STAT_NAMES)}, {LAYOUT_SIDE}")
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{folder}: damaged out-of-distribution reference ({type(exc).__name__}: {exc}); delete "
                         "ood.json and ood.npz and rebuild it (serve --data OUTPUT_DIR/preprocessed)") from None
    reference = OODReference(
        stored["stat_low"], stored["stat_high"], stored.get("train_features"), meta.get("feature_threshold"),
        int(meta["k"]), float(meta["quantile"]), meta.get("feature_layer"), dict(meta.get("fingerprint", {})),
        int(meta["n_train"]), int(meta["n_val"]), stored.get("val_distances"),
        stored.get("train_layouts"), meta.get("layout_threshold"), stored.get("val_layout_distances"),
    )
    if loaded is not None and reference.fingerprint != model_fingerprint(loaded):
        raise ModelError(f"{json_path}: this out-of-distribution reference was made for another model "
                         f"({reference.fingerprint}, the model's is {model_fingerprint(loaded)}); delete ood.json "
                         "and ood.npz and rebuild it (serve --data OUTPUT_DIR/preprocessed)")
    return reference


# --------------------------------------------------------------------------------------------
# Checking


def check(reference: OODReference | None, images_uint8: np.ndarray, facts: Sequence[ImageFacts | None] | None = None,
          features: np.ndarray | None = None) -> list[OODResult]:
    """One :class:`OODResult` per ``(N, S, S) uint8`` model input.

    ``facts``: the originals' :func:`image_facts` (None entries skip the colour and shape checks).
    ``features``: their :func:`backbone_features` (None skips the feature check). Without a
    ``reference`` only the colour and shape checks run, and each result notes it.
    """
    images = np.asarray(images_uint8)
    if images.ndim == 2:
        images = images[None]
    n = len(images)
    facts = list(facts) if facts is not None else [None] * n
    if len(facts) != n:
        raise ConfigError(f"facts has {len(facts)} entries for {n} images; give one per image (or None)")
    stats = image_statistics(images) if reference is not None else None
    distances = layouts = None
    if reference is not None and reference.has_layout:
        layouts = knn_distance(reference.train_layouts, layout_vectors(images), reference.k)
    if reference is not None and reference.has_features and features is not None:
        distances = knn_distance(reference.train_features, features, reference.k)

    results = []
    for i in range(n):
        reasons, notes, measures = [], [], {}
        fact = facts[i]
        if fact is not None:
            measures["colour_fraction"] = fact.colour_fraction
            measures["aspect_ratio"] = fact.aspect_ratio
            if fact.colour_fraction > COLOUR_FRACTION:
                reasons.append(f"A colour image ({fact.colour_fraction:.0%} of its pixels strongly coloured): "
                               "chest X-rays are grey.")
            low, high = ASPECT_RANGE
            if not low <= fact.aspect_ratio <= high:
                reasons.append(f"Its shape ({fact.width} x {fact.height} pixels, width/height {fact.aspect_ratio:.2f}) "
                               f"is outside the {low:g} to {high:g} of chest films.")
        flat = float(images[i].std())
        if flat < FLAT_STD:  # needs no reference: a blank (black, white, one grey) image has nothing to judge
            measures["pixel_std"] = flat
            reasons.append(f"A blank image (its grey levels vary by {flat:.1f} of 255, under {FLAT_STD:g}): "
                           "there is no film in it to judge.")
        if reference is None:
            notes.append("No out-of-distribution reference for this model: only the colour and shape checks ran "
                         "(and the blank-image check).")
        else:
            for j, name in enumerate(STAT_NAMES):
                value = float(stats[i, j])
                measures[name] = value
                if not reference.stat_low[j] <= value <= reference.stat_high[j]:
                    reasons.append(f"Its {STAT_LABELS[name]} ({value:.2f}) is far outside the training images' "
                                   f"({max(reference.stat_low[j], 0):.2f} to {reference.stat_high[j]:.2f}).")
            distance_checks = (
                ("layout", layouts, reference.layout_threshold,
                 f"Its overall layout is unlike the training images', as a lateral view's, a CT slice's or a page's "
                 f"would be ({LAYOUT_SIDE} x {LAYOUT_SIDE} thumbnail distance"),
                ("feature", distances, reference.feature_threshold,
                 "The model's features for it are far from those of the training images (distance"),
            )
            for name, values, threshold, unlike in distance_checks:
                if values is None:
                    continue
                value = float(values[i])
                measures[f"{name}_distance"], measures[f"{name}_threshold"] = value, float(threshold)
                if value > threshold:
                    reasons.append(f"{unlike} {value:.3f}, above the threshold {threshold:.3f} set on validation images).")
            if distances is None:
                notes.append("The feature-distance check did not run (it needs the model's layers: a .keras or .h5 "
                             "model, and a reference made with them).")
        results.append(OODResult(not reasons, tuple(reasons), measures, tuple(notes)))
    return results


@dataclass
class OODGuard:
    """A reference with the feature extractor of its model: ``guard.check(images, facts)``.

    Not thread-safe by itself (it calls the model); the web app serialises calls.
    """

    reference: OODReference | None
    extractor: Any = None

    @classmethod
    def for_model(cls, loaded: "LoadedModel", reference: OODReference | None) -> "OODGuard":
        extractor = None
        if reference is not None and reference.has_features and loaded.has_layers:
            extractor = feature_extractor(loaded.model)
        return cls(reference, extractor)

    @property
    def level(self) -> str:
        """"full" (every check), "statistics" (no feature distance: statistics, layout, colour and shape) or
        "basic" (colour and shape only: no reference)."""
        if self.reference is None:
            return "basic"
        return "full" if self.extractor is not None else "statistics"

    def check(self, images_uint8: np.ndarray, facts: Sequence[ImageFacts | None] | None = None) -> list[OODResult]:
        features = backbone_features(self.extractor, images_uint8) if self.extractor is not None else None
        return check(self.reference, images_uint8, facts, features)
