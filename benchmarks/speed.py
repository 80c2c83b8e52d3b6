"""Speed benchmark: xraylib against the seeds' way of doing the same jobs, side by side in one script.

    .venv/bin/python benchmarks/speed.py            # the full benchmark (hours on a 2-core CPU: VGG16 at 224 px)
    .venv/bin/python benchmarks/speed.py --quick    # a short run (about 20 minutes on a 2-core CPU)

Writes ``benchmarks/results/speed.json`` (every timing, the medians, the ratios, the machine) and
``benchmarks/results/speed.md`` (the tables). Each figure is the median of ``--repeats`` runs, and
the two sides of a comparison alternate inside each repeat, so a noisy machine slows both alike.

1. Training wall time, same data, same model and head, same epochs (10 and 25), same class
   weights, no augmentation on either side: the seeds' loop (every image as float32 in memory,
   ``model.fit`` through the frozen backbone every epoch, the model saved as .h5) against
   ``xraylib.runs.train`` with its default settings (features cached once, checkpoints, model
   saved as .keras + .h5 + JSON), with the test AUC of both. VGG16 runs with weights=None: its
   ImageNet weights cannot be downloaded on this machine; the timing does not depend on the
   weights' values. MobileNet(alpha=0.25) runs with its real ImageNet weights from ../shared/weights.
2. Preprocessing throughput (images/s), JPEG/PNG (real files from ../shared/data) and DICOM
   (copies of the real RSNA-format file in ../shared/data/dicom-samples, JPEG Baseline 1024x1024
   as all RSNA files are, and 1024x1024 uncompressed synthetic files written with pydicom):
   ``preprocess_dataset`` with 1 and 2 workers
   (decoding threads, one pool per call) against a plain loop of ``cv2.imread`` + ``cv2.resize``
   (``pydicom.dcmread`` + ``cv2.resize`` for DICOM), the seeds' way.
3. Inference throughput (images/s) for a folder of image files: ``xraylib.predict.predict_files``
   (batched) against one ``model.predict`` per image, as the seeds' "check your own images" did.
4. Peak memory (RSS) of building the manifest and the preprocessed cache for 1,000 and 8,000
   synthetic 256x256 JPEG Baseline DICOMs in the RSNA layout, each in a fresh process.
5. GPU rows: VGG16 training (frozen backbone, streamed) and inference images/s, float32 and
   mixed float16, measured where a GPU is visible; otherwise marked "not measured".
6. Scale (``--only scale``): the manifest and the cache for 1,000 and 50,000 small synthetic PNGs in NIH
   ChestX-ray14's layout (``Data_Entry_2017.csv`` with the real columns), each in a fresh process: time per
   file, peak RSS, and a second build (the resume after a lost runtime) that finds every file in the
   manifest's checkpoint and every row in the cache.
7. Peak memory (RSS) of ``xraylib.predict.predict_files`` on folders of 1,000 and 20,000 synthetic 256x256 PNGs,
   each in a fresh process: in batches (today) and as one batch of the whole folder (as before).
8. Distribution strategies (``--only distribute``): the same run (the small CNN streamed, real images at 64 px,
   the seeds' global batch of 8) on one device and mirrored on two logical CPU devices, alternating, in a fresh
   process (logical devices are set before TensorFlow starts); the wall-time ratio and that both give the same
   model. Where several GPUs are visible, the same rows across them.
9. bfloat16 on the CPU (``--only bfloat16``): the frozen backbone's feature extraction in float32 against mixed
   bfloat16 (images/s, interleaved), on real images, per backbone, with how close the features are and the test
   AUC of a head trained by ``xraylib.runs.train`` on each (``mixed_precision="off"`` and ``"bfloat16"``).
10. Uncompressed DICOMs (``--only dicom_fast``): uncompressed 8- and 16-bit DICOMs through xraylib's fast reader against the plain
   loop and the general path (pydicom's full read), every cached image checked against the general path's.

Not part of the tests. Needs ../shared/data (or $XRAYLIB_SHARED_DATA) and ../shared/weights.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CLASSES = ("normal", "covid")

# --quick and the full run: the same measurements, fewer images and repeats.
MODES = {
    "quick": {"repeats": 3, "train_repeats": {"vgg16": 1, "mobilenet": 3}, "train_images": {"vgg16": 240, "mobilenet": 200},
              "test_images": {"vgg16": 120, "mobilenet": 200},
              # Preprocessing as in the full run: per-call costs (cache key, status files, manifest) weigh as at scale.
              "raster_files": 960, "dicom_files": 1000, "infer_files": {"vgg16": 24, "mobilenet": 96},
              "memory_sizes": (1000, 8000), "scale_sizes": (1000, 50000), "memory_repeats": 1, "streaming": ("mobilenet",), "epochs": (10, 25),
              "gpu_images": 512, "distribute_images": 300, "distribute_epochs": 3,
              # bfloat16: (train + val, test) images per backbone, and the images timed per repeat.
              "bfloat16_images": {"vgg16": (200, 160), "mobilenet": (300, 300)}, "bfloat16_timed": {"vgg16": 48, "mobilenet": 192}},
    "full": {"repeats": 3, "train_repeats": {"vgg16": 3, "mobilenet": 3}, "train_images": {"vgg16": 400, "mobilenet": 400}, "test_images": {"vgg16": 300, "mobilenet": 300},
             "raster_files": 960, "dicom_files": 1000, "infer_files": {"vgg16": 100, "mobilenet": 400},
             "memory_sizes": (1000, 8000), "scale_sizes": (1000, 50000), "memory_repeats": 3, "streaming": ("vgg16", "mobilenet"), "epochs": (10, 25),
             "gpu_images": 2048, "distribute_images": 300, "distribute_epochs": 3,
             # bfloat16: (train + val, test) images per backbone, and the images timed per repeat.
             "bfloat16_images": {"vgg16": (240, 160), "mobilenet": (400, 300)}, "bfloat16_timed": {"vgg16": 64, "mobilenet": 256}},
    # Checks the script itself in a few minutes; its numbers mean nothing.
    "smoke": {"repeats": 1, "train_repeats": {"vgg16": 1, "mobilenet": 1}, "train_images": {"vgg16": 16, "mobilenet": 40}, "test_images": {"vgg16": 16, "mobilenet": 20},
              "raster_files": 40, "dicom_files": 40, "infer_files": {"vgg16": 4, "mobilenet": 8},
              "memory_sizes": (100, 300), "scale_sizes": (100, 300), "memory_repeats": 1, "streaming": ("mobilenet",), "epochs": (2, 3),
              "gpu_images": 16, "distribute_images": 40, "distribute_epochs": 1,
              # bfloat16: (train + val, test) images per backbone, and the images timed per repeat.
              "bfloat16_images": {"vgg16": (16, 16), "mobilenet": (40, 20)}, "bfloat16_timed": {"vgg16": 8, "mobilenet": 16}},
}
EPOCHS = (10, 25)  # set from the mode in main()
BATCH_SIZE = 8  # the seeds'
FULL_RSNA_IMAGES = 26_684 + 600  # RSNA stage 2 training patients plus the COVID-19 sets (ieee8023: 575 rows)


def median(values: list[float]) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))]
    return float(statistics.median(values)) if values else float("nan")


def log(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


# --------------------------------------------------------------------------------------------
# The machine


def machine_info() -> dict:
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu_model = platform.processor() or "unknown"
    quota = None
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        quota = None if text[0] == "max" else round(int(text[0]) / int(text[1]), 2)
    except (OSError, ValueError, IndexError):
        pass
    memory_gb = None
    try:
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {
        "cpu_model": cpu_model,
        "cores_logical": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cgroup_cpu_quota": quota,
        "memory_gb": memory_gb,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def tf_info() -> dict:
    import keras
    import tensorflow as tf

    from xraylib import models

    gpus = tf.config.list_physical_devices("GPU")
    return {"tensorflow": tf.__version__, "keras": keras.__version__,
            "gpus": [g.name for g in gpus], "gpu_compute_capabilities": models.gpu_compute_capabilities(),
            "dtype_policy_auto": models.choose_dtype_policy("auto")}


# --------------------------------------------------------------------------------------------
# 1. Training


def training_manifest(data_root: Path, work: Path, n_images: int, seed: int) -> pd.DataFrame:
    """``n_images`` rows, half COVID-19 (ieee8023), half normal (NIH adults first, then Kaggle), whole patients."""
    from xraylib import config, manifest

    paths = config.folder_drive_paths(data_root, work)
    frame = manifest.build_manifest(paths, task="covid_vs_normal", progress=False).frame
    rng = np.random.default_rng(seed)
    picked = []
    for label, source_order in (("covid", None), ("normal", ("nih", "kaggle", "ieee8023"))):
        rows = frame[frame["label"] == label]
        patients = list(rows["patient_id"].unique())
        rng.shuffle(patients)
        if source_order:
            first_source = rows.groupby("patient_id")["source"].first()
            rank = {s: i for i, s in enumerate(source_order)}
            patients.sort(key=lambda p: rank.get(first_source[p], len(rank)))  # stable: random within a source
        count = 0
        for patient in patients:
            if count >= n_images // 2:
                break
            group = rows[rows["patient_id"] == patient]
            picked.append(group)
            count += len(group)
    return pd.concat(picked, ignore_index=True)


def training_data(data_root: Path, work: Path, n_images: int, n_test: int, seed: int = 0):
    """About ``n_images`` images for train + val (70/15 of them, as a 70/15/15 split would give) and ``n_test`` more
    for test, split by patient: the training cost is that of ``n_images``; the larger test set makes the AUC precise."""
    from xraylib.preprocess import PreprocessSettings, split_and_preprocess

    rows = training_manifest(data_root, work, n_images + n_test, seed)
    share = n_images / (n_images + n_test)
    return split_and_preprocess(rows, work / "preprocessed", CLASSES, PreprocessSettings(image_size=224),
                                fractions=(0.7 * share, 0.15 * share, 1 - 0.85 * share), seed=seed, workers=2,
                                progress=False)


def test_auc(model, data, spec) -> float:
    """Test AUC. The backbone is frozen on both sides, so its test features are computed once per backbone (the
    feature cache, keyed by the backbone's weight values) and each model's head is applied to them."""
    from sklearn.metrics import roc_auc_score

    from xraylib import features

    labels = data["test"].labels
    if len(set(labels)) < 2:
        return float("nan")
    probabilities = features.predict_split(model, data, spec, "test")[f"prob_{CLASSES[1]}"].to_numpy()
    return float(roc_auc_score(labels == CLASSES.index("covid"), probabilities))


def seeds_loop(data, spec, work: Path, seed: int) -> dict:
    """The seeds' loop: every image as float32 in memory, ``model.fit`` through the frozen backbone every epoch.

    One change, so that the test AUCs compare the two computations rather than two shuffles: the batches
    are drawn in the order xraylib draws them (``batches.epoch_order`` from ``(seed, epoch)``, where the seeds
    let Keras shuffle), with dropout reseeded per epoch as xraylib does. It costs nothing measurable.
    """
    import keras

    from xraylib import models
    from xraylib import train as xt
    from xraylib.batches import epoch_order

    class InMemoryBatches(keras.utils.PyDataset):
        """Batches of the in-memory float32 arrays, in xraylib's order for each epoch."""

        def __init__(self, x: np.ndarray, y: np.ndarray):
            super().__init__()
            self.x, self.y, self.epochs_begun = x, y, 0
            self.order = epoch_order(len(x), seed, 0)  # fit() reads a batch for the shapes before epoch 0 begins

        def __len__(self) -> int:
            return -(-len(self.x) // BATCH_SIZE)

        def __getitem__(self, index: int):
            rows = self.order[index * BATCH_SIZE:(index + 1) * BATCH_SIZE]
            return self.x[rows], self.y[rows]

        def on_epoch_begin(self) -> None:  # called by fit() at each epoch's start (as for xraylib's ImageBatches)
            self.order = epoch_order(len(self.x), seed, self.epochs_begun)
            self.epochs_begun += 1

    started = time.perf_counter()
    x_train = np.asarray(data["train"].images, dtype=np.float32)[..., None]
    x_val = np.asarray(data["val"].images, dtype=np.float32)[..., None]
    keras.utils.set_random_seed(seed)
    model = models.build_model(spec)
    xt.compile_model(model, 1e-3)
    weights = xt.class_weights(data["train"].labels, len(CLASSES))
    at_mark: dict[int, float] = {}
    heads: dict[int, dict] = {}
    paused = [0.0]

    class Marks(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 in EPOCHS:
                at_mark[epoch + 1] = time.perf_counter() - started - paused[0]
                copy_started = time.perf_counter()  # keeping the head for its AUC is not the seeds' work
                heads[epoch + 1] = {n: model.get_layer(n).get_weights() for n in models.head_layer_names()}
                paused[0] += time.perf_counter() - copy_started

    model.fit(InMemoryBatches(x_train, data["train"].one_hot), epochs=max(EPOCHS),
              validation_data=(x_val, data["val"].one_hot), validation_batch_size=BATCH_SIZE, class_weight=weights,
              shuffle=False, verbose=0, callbacks=[Marks(), xt.ReseedDropout(seed)])  # shuffle=True would reorder the batches
    save_started = time.perf_counter()
    model.save(work / "seeds_model.h5")  # the seeds saved their model as .h5
    save_seconds = time.perf_counter() - save_started
    out = {"seconds": {}, "test_auc": {}}
    for epochs in EPOCHS:
        for name, values in heads[epochs].items():
            model.get_layer(name).set_weights(values)
        out["seconds"][epochs] = at_mark[epochs] + save_seconds
        out["test_auc"][epochs] = test_auc(model, data, spec)
    return out


def xraylib_run(data, spec, epochs: int, run_dir: Path, seed: int, fresh_cache: bool = True,
                feature_cache: bool = True) -> dict:
    """``xraylib.runs.train`` with its default settings (a fresh run, and a fresh feature cache unless told)."""
    from xraylib.features import FEATURES_DIR
    from xraylib.runs import train
    from xraylib.train import TrainSettings

    if fresh_cache:  # the run extracts the train and val features again; the test features (for the AUC) stay
        for path in (Path(data.folder) / FEATURES_DIR).glob("*/*"):
            if not path.name.startswith("test."):
                path.unlink()
    shutil.rmtree(run_dir, ignore_errors=True)
    # No augmentation, as in the seeds' loop here. (With the cache and augment_views=1, the default, stage 1 trains on
    # the plain images anyway; the streaming path would augment, and cached and streamed would not be comparable.)
    settings = TrainSettings(epochs=epochs, seed=seed, feature_cache=feature_cache, augment=None)
    started = time.perf_counter()
    result = train(data, spec, settings, run_dir, resume=False, verbose=0)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "test_auc": test_auc(result.model, data, spec), "execution": result.execution}


def bench_training(backbone: str, data_root: Path, weights_dir: Path | None, work: Path, mode: dict, seed: int) -> dict:
    from xraylib import models

    if backbone == "vgg16":
        spec_kwargs = {"backbone": "vgg16", "weights": None}
        weights_note = "none (random): ImageNet VGG16 weights cannot be downloaded on this machine"
    else:
        if weights_dir is None:
            return {"backbone": backbone, "status": "not measured: ../shared/weights not found"}
        spec_kwargs = {"backbone": "mobilenet", "alpha": 0.25, "weights": str(weights_dir / "mobilenet_2_5_224_tf_no_top.h5")}
        weights_note = "ImageNet (../shared/weights/mobilenet_2_5_224_tf_no_top.h5)"
    folder = work / f"train_{backbone}"
    data = training_data(data_root, folder, mode["train_images"][backbone], mode["test_images"][backbone], seed)
    spec = models.ModelSpec(image_size=224, classes=CLASSES, **spec_kwargs)
    manifest = data.manifest
    out = {
        "backbone": backbone + (" (alpha 0.25)" if backbone == "mobilenet" else ""),
        "weights": weights_note,
        "image_size": 224,
        "images": {name: len(split) for name, split in data.splits.items()},
        "images_by_source_and_label": {f"{s}/{l}": int(n) for (s, l), n in manifest.groupby(["source", "label"]).size().items()},
        "batch_size": BATCH_SIZE,
        "augmentation": "none on either side (xraylib's default caches one plain view per image: augment_views=1)",
        "repeats": mode["train_repeats"][backbone],
        "runs": [],
    }
    streaming = backbone in mode["streaming"]
    for repeat in range(mode["train_repeats"][backbone]):
        log(f"training {backbone}, repeat {repeat + 1}: the seeds' loop ({max(EPOCHS)} epochs)")
        run = {"seeds_loop": seeds_loop(data, spec, folder, seed)}
        for epochs in EPOCHS:
            log(f"training {backbone}, repeat {repeat + 1}: xraylib default, {epochs} epochs")
            run[f"xraylib_{epochs}"] = xraylib_run(data, spec, epochs, folder / f"run_{epochs}", seed)
        log(f"training {backbone}, repeat {repeat + 1}: xraylib, features already cached (a second run), {EPOCHS[0]} epochs")
        run["xraylib_cached_10"] = xraylib_run(data, spec, EPOCHS[0], folder / "run_cached", seed, fresh_cache=False)
        if streaming and repeat == 0:
            for epochs in EPOCHS:
                log(f"training {backbone}: xraylib streaming (feature_cache=False), {epochs} epochs")
                run[f"streaming_{epochs}"] = xraylib_run(data, spec, epochs, folder / f"run_stream_{epochs}", seed,
                                                         feature_cache=False)
        out["runs"].append(run)
    summary = {}
    for epochs in EPOCHS:
        seeds_s = median([r["seeds_loop"]["seconds"][epochs] for r in out["runs"]])
        ours_s = median([r[f"xraylib_{epochs}"]["seconds"] for r in out["runs"]])
        seeds_auc = median([r["seeds_loop"]["test_auc"][epochs] for r in out["runs"]])
        ours_auc = median([r[f"xraylib_{epochs}"]["test_auc"] for r in out["runs"]])
        row = {"seeds_loop_seconds": seeds_s, "xraylib_seconds": ours_s, "speedup": seeds_s / ours_s,
               "seeds_loop_test_auc": seeds_auc, "xraylib_test_auc": ours_auc, "auc_difference": ours_auc - seeds_auc,
               "train_images_per_second": {"seeds_loop": epochs * len(data["train"]) / seeds_s,
                                           "xraylib": epochs * len(data["train"]) / ours_s}}
        if streaming:
            stream = out["runs"][0][f"streaming_{epochs}"]
            row["streaming_seconds"] = stream["seconds"]
            row["streaming_test_auc"] = stream["test_auc"]
            row["cached_minus_streaming_auc"] = ours_auc - stream["test_auc"]
        summary[epochs] = row
    summary["xraylib_cached_10_seconds"] = median([r["xraylib_cached_10"]["seconds"] for r in out["runs"]])
    # Both sides are a fixed cost plus a cost per image: the seeds' loop almost all per image; xraylib's fixed part
    # (build, head training, saving) is what a second run with the features cached costs.
    n_images = len(data["train"]) + len(data["val"])
    target = 400 * 0.85  # train + val of 400 images split 70/15/15
    if n_images < target:
        fixed = summary["xraylib_cached_10_seconds"]
        extraction = max(summary[EPOCHS[0]]["xraylib_seconds"] - fixed, 0.0)
        seeds = summary[EPOCHS[0]]["seeds_loop_seconds"] * target / n_images
        ours = fixed + extraction * target / n_images
        summary["extrapolated_400_images"] = {
            "epochs": EPOCHS[0], "seeds_loop_seconds": seeds, "xraylib_seconds": ours, "speedup": seeds / ours,
            "how": f"measured on {n_images} train+val images; seeds' loop scaled by images; xraylib = the second run's "
                   "time (features cached: the fixed part) + the first run's extra time (the extraction) scaled by images"}
    out["median"] = summary
    return out


# --------------------------------------------------------------------------------------------
# 2. Preprocessing throughput


def raster_files(data_root: Path, n: int, seed: int) -> list[Path]:
    files = sorted(p for p in data_root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg") and p.is_file())
    rng = np.random.default_rng(seed)
    return [files[i] for i in sorted(rng.choice(len(files), size=min(n, len(files)), replace=False))]


#: The RSNA files are JPEG Baseline DICOMs of about 130 KB (the real one in ../shared/data/dicom-samples:
#: 127 KB for 1024x1024); OpenCV's quality 90 gives the synthetic phantoms a similar size.
RSNA_JPEG_QUALITY = 90


def write_dicom(path: Path, pixels: np.ndarray, patient_id: str, jpeg_quality: int | None = RSNA_JPEG_QUALITY) -> None:
    """A DICOM in the RSNA header layout: JPEG Baseline as the RSNA files (``jpeg_quality=None``: uncompressed)."""
    import cv2
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if jpeg_quality is None else JPEGBaseline8Bit
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientName, ds.PatientSex, ds.PatientAge = patient_id, patient_id, "F", "045Y"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if pixels.dtype == np.uint16:  # (uncompressed only) 12 bits stored in 16, as CR/DX archives mostly hold them
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    if jpeg_quality is None:
        ds.PixelData = np.ascontiguousarray(pixels, dtype=pixels.dtype if ds.BitsAllocated == 16 else np.uint8).tobytes()
    else:
        ok, encoded = cv2.imencode(".jpg", np.ascontiguousarray(pixels, dtype=np.uint8),
                                   [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
        assert ok, path
        ds.PixelData = encapsulate([encoded.tobytes()])
        ds["PixelData"].VR = "OB"
        ds.LossyImageCompression = "01"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def phantoms(n: int, size: int, seed: int) -> list[np.ndarray]:
    from xraylib import phantoms

    return [phantoms.make_phantom(("normal", "pneumonia")[i % 2], np.random.default_rng(seed + i), size, size).image
            for i in range(n)]


def dicom_files(folder: Path, n: int, size: int, seed: int, jpeg_quality: int | None = RSNA_JPEG_QUALITY,
                bits: int = 8) -> list[Path]:
    """``n`` synthetic chest DICOMs; ``bits=16`` (uncompressed only): 12-bit values, the phantom's 8 and 4 noise bits."""
    bases = phantoms(8, size, seed)
    if bits == 16:
        rng = np.random.default_rng(seed)
        bases = [(base.astype(np.uint16) << 4) | rng.integers(0, 16, base.shape, dtype=np.uint16) for base in bases]
    paths = []
    for i in range(n):
        path = folder / f"image_{i:05d}.dcm"
        pixels = bases[i % len(bases)].copy()
        pixels[0, :8] = np.frombuffer(i.to_bytes(8, "big"), dtype=np.uint8)  # every file's pixels differ
        write_dicom(path, pixels, f"patient-{i:05d}", jpeg_quality)
        paths.append(path)
    return paths


def rsna_dicom_copies(data_root: Path, folder: Path, n: int) -> list[Path]:
    """``n`` copies of the real RSNA-format DICOM in ``dicom-samples`` (JPEG Baseline, 1024x1024), each with
    its own patient ID and UIDs (the pixel data untouched); [] when the sample is absent."""
    import pydicom
    from pydicom.uid import JPEGBaseline8Bit, generate_uid

    samples = sorted((data_root / "dicom-samples").glob("*.dcm"))
    real = [p for p in samples if (ds := pydicom.dcmread(p, stop_before_pixels=True)).file_meta.TransferSyntaxUID
            == JPEGBaseline8Bit and ds.get("PhotometricInterpretation") == "MONOCHROME2"]
    if not real:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        ds = pydicom.dcmread(real[0])
        ds.PatientID = ds.PatientName = f"copy-{i:05d}"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = folder / f"image_{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def plain_loop(files: list[Path], size: int = 224) -> None:
    """The seeds' way: read and resize each file in turn."""
    import cv2
    import pydicom

    for path in files:
        if path.suffix.lower() == ".dcm":
            image = pydicom.dcmread(path).pixel_array
        else:
            image = cv2.imread(str(path))
        cv2.resize(image, (size, size))


def keep_freed_buffers() -> bool:
    """Ask the C library (glibc) to keep freed buffers of up to 64 MB for the next allocation instead of handing them
    back to the system. Without it, the plain loop's 1 MB pixel buffers went back after each file in some processes
    (about 470 page faults per 8-bit 1024x1024 file, the loop up to 1.9x slower, varying from run to run): with it the
    loop runs at its best, the harder comparison for xraylib (whose decoding did not fault either way). False where
    there is no glibc. The setting stays for the rest of the process (dicom_fast, which calls this, runs last) and
    does not reach the worker processes (their fork server is a fresh program)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # (glibc's malloc.h)
    return bool(mallopt(m_mmap_threshold, 64 << 20)) and bool(mallopt(m_trim_threshold, 128 << 20))


def minor_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def xraylib_preprocess(files: list[Path], out_dir: Path, workers: int, processes: bool | None = False,
                       hashes: list[str] | None = None) -> None:
    """``preprocess_dataset`` of ``files`` into ``out_dir`` (which the caller empties before it starts its clock).
    ``hashes``: the files' SHA-1s, as a manifest made by ``build_manifest`` has them, checked against each file's
    bytes (default: none, as in a manifest made by hand)."""
    from xraylib.preprocess import PreprocessSettings, preprocess_dataset

    frame = pd.DataFrame({"path": [str(p) for p in files], "label": [CLASSES[i % 2] for i in range(len(files))],
                          "patient_id": [f"p{i}" for i in range(len(files))], "sha1": hashes or "",
                          "split": [("train", "val", "test")[i % 3] for i in range(len(files))]})
    data = preprocess_dataset(frame, out_dir, CLASSES, PreprocessSettings(image_size=224), workers=workers, progress=False,
                              processes=processes)
    if data.report.get("skipped"):
        log(f"  ({data.report['skipped']} unreadable files skipped)")


def bench_preprocessing(kind: str, files: list[Path], work: Path, repeats: int) -> dict:
    times: dict[str, list[float]] = {"plain_loop": [], "xraylib_1_worker": [], "xraylib_2_workers": []}
    for repeat in range(repeats):
        log(f"preprocessing {kind}, repeat {repeat + 1}: {len(files)} files")
        for name, run in (("plain_loop", lambda: plain_loop(files)),
                          ("xraylib_1_worker", lambda: xraylib_preprocess(files, work / "prep1", 1)),
                          ("xraylib_2_workers", lambda: xraylib_preprocess(files, work / "prep2", 2))):
            for out in (work / "prep1", work / "prep2"):
                shutil.rmtree(out, ignore_errors=True)  # the last repeat's cache: not part of the time
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    rates = {name: len(files) / median(values) for name, values in times.items()}
    return {"kind": kind, "files": len(files), "repeats": repeats, "seconds": times, "images_per_second": rates,
            "speedup_1_worker_vs_plain_loop": rates["xraylib_1_worker"] / rates["plain_loop"],
            "speedup_2_workers_vs_plain_loop": rates["xraylib_2_workers"] / rates["plain_loop"],
            "speedup_2_workers_vs_1_worker": rates["xraylib_2_workers"] / rates["xraylib_1_worker"]}


def bench_dicom_fast(bits: int, n: int, work: Path, repeats: int, seed: int, size: int = 1024) -> dict:
    """Uncompressed DICOMs (``bits`` 8 or 16) through xraylib's fast reader against the plain loop and against
    xraylib's general path (pydicom reads each file whole and decodes ``pixel_array``; the reader before the fast
    one), interleaved in each repeat; then every cached image of the fast run against the general path's. One more
    run gives xraylib's processes a manifest with the files' SHA-1s (as ``build_manifest`` makes it), each file's
    bytes hashed and checked: a cost of its own, that the plain loop does not pay."""
    from xraylib import dicom
    from xraylib.fileio import sha1_file
    from xraylib.preprocess import load_preprocessed

    folder = work / f"dicoms_raw{bits}_{size}px_{n}"  # (the size in the name: a folder of another size is not reused)
    measured = datetime.datetime.now().isoformat(timespec="minutes")
    log(f"uncompressed {bits}-bit DICOMs: writing {n} files of {size}x{size}")
    files = sorted(folder.glob("*.dcm")) if len(list(folder.glob("*.dcm"))) == n else \
        dicom_files(folder, n, size, seed, jpeg_quality=None, bits=bits)
    fast_reader = dicom.read_native
    hashes = [sha1_file(path) for path in files]  # (a manifest's: build_manifest's)

    def general_path(workers: int) -> None:
        dicom.read_native = lambda *args, **kwargs: None
        try:
            xraylib_preprocess(files, work / "fast_general", workers)
        finally:
            dicom.read_native = fast_reader

    runs = (("plain_loop", None, lambda: plain_loop(files, size=224)),
            ("xraylib_2_workers", "fast_2", lambda: xraylib_preprocess(files, work / "fast_2", 2)),
            ("xraylib_2_processes", "fast_2p", lambda: xraylib_preprocess(files, work / "fast_2p", 2, processes=True)),
            ("xraylib_2_processes_hashes", "fast_2ph",
             lambda: xraylib_preprocess(files, work / "fast_2ph", 2, processes=True, hashes=hashes)),
            ("xraylib_1_worker", "fast_1", lambda: xraylib_preprocess(files, work / "fast_1", 1)),
            ("general_path_2_workers", "fast_general", lambda: general_path(2)))
    times: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    # This process's CPU seconds, all its threads (not the worker processes': the processes' row has none).
    cpu: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    faults: dict[str, list[float]] = {name: [] for name, _, _ in runs}  # this process's page faults per file
    kept = keep_freed_buffers()
    # One untimed round first: the files just written are still being flushed to disk, which slowed whichever run
    # came first (the plain loop: 4 s against 0.8 s for 1,000 files), and the fork server starts.
    log(f"uncompressed {bits}-bit DICOMs, warm-up round (not timed): {n} files")
    for _, out, run in runs:
        if out:
            shutil.rmtree(work / out, ignore_errors=True)  # (a cache left by an earlier run would load, not decode)
        run()
    loads = [load_average()]
    for repeat in range(repeats):
        log(f"uncompressed {bits}-bit DICOMs, repeat {repeat + 1}: {n} files")
        for name, out, run in runs:
            if out:
                shutil.rmtree(work / out, ignore_errors=True)  # the last repeat's cache: not part of the time
            started, cpu_started, faults_before = time.perf_counter(), time.process_time(), minor_faults()
            run()
            times[name].append(time.perf_counter() - started)
            cpu[name].append(time.process_time() - cpu_started)
            faults[name].append((minor_faults() - faults_before) / n)
        loads.append(load_average())
    scaling = resize_thread_scaling(files[0])
    general = load_preprocessed(work / "fast_general")
    same = all(np.array_equal(load_preprocessed(work / out).splits[s].images, general.splits[s].images)
               for out in ("fast_2", "fast_2p", "fast_2ph", "fast_1") for s in general.splits)
    compared = sum(len(split) for split in general.splits.values())
    rates = {name: n / median(values) for name, values in times.items()}
    return {"bits": bits, "files": n, "size": size, "repeats": repeats, "warm_up_rounds": 1, "seconds": times,
            "images_per_second": rates,
            "cpu_ms_per_file": {name: 1000 * median(values) / n for name, values in cpu.items()
                                if not name.startswith("xraylib_2_processes")},
            "speedup_2_workers_vs_plain_loop": rates["xraylib_2_workers"] / rates["plain_loop"],
            "speedup_2_processes_vs_plain_loop": rates["xraylib_2_processes"] / rates["plain_loop"],
            "speedup_2_processes_hashes_checked_vs_plain_loop": rates["xraylib_2_processes_hashes"] / rates["plain_loop"],
            "speedup_2_workers_vs_general_path": rates["xraylib_2_workers"] / rates["general_path_2_workers"],
            "same_pixels_as_general_path": same, "images_compared": compared, "load_averages": loads,
            "resize_2_threads_vs_1": scaling, "measured": measured, "freed_buffers_kept": kept,
            "page_faults_per_file": {name: median(values) for name, values in faults.items()}}


def process_pool_start(work: Path) -> dict[str, float]:
    """What worker processes add to a ``preprocess_dataset`` call of 8 small files over threads: the first call in a
    process (which starts the fork server, importing xraylib's decoding modules) and a later one (which forks the
    workers from it). The dicom_fast rows' process times are later calls."""
    files = dicom_files(work / "start", 8, 64, 0, jpeg_quality=None)
    seconds = {}
    for name, processes in (("first_call", True), ("later_call", True), ("threads", False)):
        shutil.rmtree(work / "start_out", ignore_errors=True)
        started = time.perf_counter()
        xraylib_preprocess(files, work / "start_out", 2, processes=processes)
        seconds[name] = time.perf_counter() - started
    log(f"worker processes' start: first call {seconds['first_call']:.2f} s, later {seconds['later_call']:.3f} s "
        f"(threads: {seconds['threads']:.3f} s)")
    return seconds


def resize_thread_scaling(path: Path, n: int = 400) -> float:
    """The rate of ``n`` preprocessings of one decoded image in two threads over one thread's: how many cores two
    threads find free (2.0 on two free cores) while the shrink was OpenCV's alone, without Python's lock; less since
    it is matrix products for dyadic sizes (:func:`xraylib.preprocess.area_resize`), whose Python holds the lock."""
    from concurrent.futures import ThreadPoolExecutor

    from xraylib.images import read_image
    from xraylib.preprocess import PreprocessSettings, preprocess_pixels

    pixels, settings = read_image(path), PreprocessSettings(image_size=224)
    started = time.perf_counter()
    for _ in range(n):
        preprocess_pixels(pixels, settings)
    one = time.perf_counter() - started
    with ThreadPoolExecutor(2) as pool:
        started = time.perf_counter()
        list(pool.map(lambda _: preprocess_pixels(pixels, settings), range(n)))
        two = time.perf_counter() - started
    return one / two


# --------------------------------------------------------------------------------------------
# 3. Inference throughput


def bench_inference(backbone: str, run_dir: Path, files: list[Path], repeats: int) -> dict:
    from xraylib import models, predict
    from xraylib.preprocess import PreprocessSettings, preprocess_file

    loaded = models.load_model(run_dir)
    settings = PreprocessSettings.from_dict(loaded.metadata["preprocessing"])
    folder = run_dir.parent / f"infer_{backbone}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i, path in enumerate(files):
        shutil.copy(path, folder / f"{i:04d}{path.suffix.lower()}")
    predict.predict_files(loaded, folder)  # warm-up: both sides then run with a built predict function
    times: dict[str, list[float]] = {"one_predict_per_image": [], "xraylib_batched": []}
    for repeat in range(repeats):
        log(f"inference {backbone}, repeat {repeat + 1}: {len(files)} files")
        started = time.perf_counter()
        for path in sorted(folder.iterdir()):
            x = preprocess_file(path, settings).astype(np.float32)[None, ..., None]
            loaded.model.predict(x, verbose=0)
        times["one_predict_per_image"].append(time.perf_counter() - started)
        started = time.perf_counter()
        frame = predict.predict_files(loaded, folder)
        times["xraylib_batched"].append(time.perf_counter() - started)
        assert int(frame["ok"].sum()) == len(files)
    rates = {name: len(files) / median(values) for name, values in times.items()}
    return {"backbone": backbone, "files": len(files), "repeats": repeats, "seconds": times, "images_per_second": rates,
            "speedup": rates["xraylib_batched"] / rates["one_predict_per_image"],
            "note": "both sides decode and preprocess each file the same way (from the model's JSON); "
                    "the difference is one model.predict per image against batches"}


# --------------------------------------------------------------------------------------------
# 5. GPU: training and inference images/s with and without mixed precision


def bench_accelerator(n_images: int, repeats: int, seed: int) -> dict:
    """VGG16 (random weights: the speed does not depend on them) at 224 px on the default device, float32 and
    mixed float16: training images/s through the frozen backbone (the streaming path: fine-tuning and
    ``feature_cache=False``), batch 32; inference images/s (``predict``), features.default_batch_size().
    XLA as xraylib compiles (``jit_compile="auto"``: on a GPU). Random images: decoding is not measured here."""
    import keras

    from xraylib import features, models
    from xraylib import train as xt

    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n_images, 224, 224, 1), dtype=np.uint8).astype(np.float32)
    y = np.eye(2, dtype=np.float32)[rng.integers(0, 2, size=n_images)]
    capabilities = models.gpu_compute_capabilities()
    out = {"images": n_images, "repeats": repeats, "train_batch_size": 32,
           "inference_batch_size": features.default_batch_size(), "compute_capabilities": capabilities, "rows": {}}
    for policy in ("float32", "mixed_float16"):
        if policy == "mixed_float16" and capabilities and models.choose_dtype_policy("auto", capabilities) != policy:
            out["rows"][policy] = {"status": f"not supported: compute capability {capabilities} < 7.0"}
            continue
        keras.utils.set_random_seed(seed)
        model = models.build_model(backbone="vgg16", weights=None, image_size=224, dtype_policy=policy)
        xt.compile_model(model, 1e-3)
        model.fit(x[:64], y[:64], batch_size=32, epochs=1, verbose=0)  # build and compile the steps (XLA) first
        model.predict(x[:out["inference_batch_size"]], batch_size=out["inference_batch_size"], verbose=0)
        train_s, infer_s = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            model.fit(x, y, batch_size=32, epochs=1, verbose=0)
            train_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            model.predict(x, batch_size=out["inference_batch_size"], verbose=0)
            infer_s.append(time.perf_counter() - started)
        out["rows"][policy] = {"train_seconds": train_s, "inference_seconds": infer_s,
                               "train_images_per_second": n_images / median(train_s),
                               "inference_images_per_second": n_images / median(infer_s),
                               "uses_mixed_precision": models.uses_mixed_precision(model)}
        keras.backend.clear_session()
    return out


# --------------------------------------------------------------------------------------------
# 8. Distribution strategies: one device against mirrored, in fresh processes


def bench_distribute(data_root: Path, work: Path, n_images: int, epochs: int, repeats: int, seed: int,
                     gpus: list[str]) -> dict:
    """``xraylib.runs.train`` (the small CNN, streamed, batch 8, ``epochs``) with strategy "one" and "mirrored",
    alternating ``repeats`` times in one process per device kind (tests/distribute_worker.py, the tests' runner):
    two logical CPU devices, and, where several GPUs are visible, the GPUs. The first pair warms up (tracing) and
    is not counted. Same model: the largest difference of test-split probabilities and of the last epoch's loss."""
    from xraylib.preprocess import PreprocessSettings, split_and_preprocess

    rows = training_manifest(data_root, work, n_images, seed)
    data = split_and_preprocess(rows, work / "preprocessed", CLASSES, PreprocessSettings(image_size=64),
                                fractions=(0.7, 0.15, 0.15), seed=seed, workers=2, progress=False)
    out = {"images": {name: len(split) for name, split in data.splits.items()}, "epochs": epochs, "batch_size": 8,
           "image_size": 64, "repeats": repeats, "rows": {}}
    kinds = {"2 logical CPU devices": {"cpus": 2}}
    if len(gpus) > 1:
        kinds[f"{len(gpus)} GPUs"] = {"cpus": 1}  # "mirrored" takes every visible GPU
    for kind, extra in kinds.items():
        folder = work / "distribute" / kind.replace(" ", "_")
        runs = [{"run_dir": str(folder / f"{strategy}_{i}"), "strategy": strategy, "out": str(folder / f"{strategy}_{i}.npy"),
                 "epochs": epochs} for i in range(repeats + 1) for strategy in ("one", "mirrored")]
        log(f"distribute: {kind}, {len(runs)} runs of {out['images']['train']} images x {epochs} epochs")
        done = subprocess.run([sys.executable, str(REPO / "tests" / "distribute_worker.py"),
                               json.dumps({"data": str(data.folder), "runs": runs, **extra})],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        results = [json.loads(line.split(" ", 1)[1]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or len(results) != len(runs):
            out["rows"][kind] = {"status": "failed: " + (done.stderr.strip().splitlines() or ["no output"])[-1]}
            continue
        seconds = {strategy: [r["seconds"] for run, r in zip(runs[2:], results[2:]) if run["strategy"] == strategy]
                   for strategy in ("one", "mirrored")}
        probabilities = {run["strategy"]: np.load(run["out"]) for run in runs[-2:]}
        losses = {run["strategy"]: r["loss"] for run, r in zip(runs[-2:], results[-2:])}
        out["rows"][kind] = {
            "seconds": seconds, "median_seconds": {k: median(v) for k, v in seconds.items()},
            "mirrored_over_one": median(seconds["mirrored"]) / median(seconds["one"]),
            "replicas": results[-1]["replicas"], "peak_rss_mb": results[-1]["peak_rss_mb"],
            "max_probability_difference": float(np.abs(probabilities["one"] - probabilities["mirrored"]).max()),
            "loss_difference": abs(losses["one"] - losses["mirrored"])}
    if len(gpus) < 2:
        out["rows"]["GPUs"] = {"status": "not measured: " + ("one GPU" if gpus else "no GPU on this machine")}
    return out


# --------------------------------------------------------------------------------------------
# 9. bfloat16 on the CPU: feature extraction in float32 and mixed bfloat16, and the test AUC of each


def backbone_spec_kwargs(backbone: str, weights_dir: Path | None) -> tuple[dict, str] | None:
    """The :class:`ModelSpec` fields and a note on the weights for ``backbone`` here; None without MobileNet's weights."""
    if backbone == "vgg16":
        return {"backbone": "vgg16", "weights": None}, "none (random): ImageNet VGG16 weights cannot be downloaded on this machine"
    if weights_dir is None:
        return None
    return ({"backbone": "mobilenet", "alpha": 0.25, "weights": str(weights_dir / "mobilenet_2_5_224_tf_no_top.h5")},
            "ImageNet (../shared/weights/mobilenet_2_5_224_tf_no_top.h5)")


def bench_bfloat16(backbone: str, data_root: Path, weights_dir: Path | None, work: Path, mode: dict, seed: int) -> dict:
    """Feature extraction (the frozen backbone up to the head's pooling, batch ``features.default_batch_size()``) in
    float32 and in mixed bfloat16, images/s interleaved over ``mode["repeats"]`` repeats on the same real images;
    then two ``xraylib.runs.train`` runs (10 epochs, no augmentation), ``mixed_precision="off"`` and ``"bfloat16"``,
    each extracting its own feature cache, with their test AUCs (each head on its own precision's test features)
    and how close the two caches' test features are."""
    import keras

    from xraylib import features, models
    from xraylib.runs import train
    from xraylib.train import TrainSettings

    found = backbone_spec_kwargs(backbone, weights_dir)
    if found is None:
        return {"backbone": backbone, "status": "not measured: ../shared/weights not found"}
    spec_kwargs, weights_note = found
    n_images, n_test = mode["bfloat16_images"][backbone]
    folder = work / f"bfloat16_{backbone}"
    log(f"bfloat16 {backbone}: preprocessing {n_images} + {n_test} real images")
    data = training_data(data_root, folder, n_images, n_test, seed)
    spec = models.ModelSpec(image_size=224, classes=CLASSES, **spec_kwargs)
    policies = ("float32", "mixed_bfloat16")
    out = {"backbone": backbone + (" (alpha 0.25)" if backbone == "mobilenet" else ""), "weights": weights_note,
           "image_size": 224, "images": {name: len(split) for name, split in data.splits.items()},
           "cpu_has_bfloat16_units": models.cpu_has_fast_bfloat16(models.cpu_flags()),
           "cpu_bfloat16_flags": sorted(set(models.BFLOAT16_CPU_FLAGS) & models.cpu_flags()),
           "auto_chooses": models.choose_dtype_policy("auto", backbone=spec.backbone),
           "batch_size": features.default_batch_size(), "repeats": mode["repeats"]}

    # Speed: the same weights in both precisions, the same images, the two alternating inside each repeat.
    keras.utils.set_random_seed(seed)
    built = {"float32": models.build_model(spec, dtype_policy="float32")}
    built["mixed_bfloat16"] = models.build_model(spec, dtype_policy="mixed_bfloat16")
    built["mixed_bfloat16"].set_weights(built["float32"].get_weights())
    extractors = {policy: features.feature_extractor(built[policy]) for policy in policies}
    timed = min(mode["bfloat16_timed"][backbone], len(data["train"]))
    x = np.asarray(data["train"].images[:timed], dtype=np.float32)[..., None]
    batch = out["batch_size"]
    for policy in policies:
        extractors[policy].predict(x[:batch], batch_size=batch, verbose=0)  # build the predict step first
    seconds = {policy: [] for policy in policies}
    loads = []
    for repeat in range(mode["repeats"]):
        log(f"bfloat16 {backbone}: timing repeat {repeat + 1} ({timed} images each)")
        for policy in policies:
            started = time.perf_counter()
            extractors[policy].predict(x, batch_size=batch, verbose=0)
            seconds[policy].append(time.perf_counter() - started)
        loads.append(load_average())
    out["timed_images"] = timed
    out["extraction_seconds"] = seconds
    out["load_average_during_timing"] = loads
    out["images_per_second"] = {policy: timed / median(seconds[policy]) for policy in policies}
    out["speedup"] = out["images_per_second"]["mixed_bfloat16"] / out["images_per_second"]["float32"]
    keras.backend.clear_session()

    # Quality: the whole training path once per precision, each with its own feature cache.
    from sklearn.metrics import roc_auc_score

    runs, test_features = {}, {}
    for policy, setting in (("float32", "off"), ("mixed_bfloat16", "bfloat16")):
        log(f"bfloat16 {backbone}: xraylib.runs.train with mixed_precision={setting!r}")
        settings = TrainSettings(epochs=10, seed=seed, augment=None, mixed_precision=setting)
        started = time.perf_counter()
        result = train(data, spec, settings, folder / f"run_{policy}", resume=False, verbose=0)
        train_seconds = time.perf_counter() - started
        predicted = features.predict_split(result.model, data, spec, "test")
        labels = data["test"].labels == CLASSES.index("covid")
        auc = float(roc_auc_score(labels, predicted[f"prob_{CLASSES[1]}"])) if len(set(labels)) > 1 else float("nan")
        test_features[policy] = np.asarray(features.split_features(result.model, data, spec, "test", progress=False))
        cache = result.execution["feature_cache"]
        runs[policy] = {"dtype_policy": result.execution["dtype_policy"], "train_seconds": train_seconds,
                        "feature_cache_key": cache["key"], "feature_cache_seconds": cache["seconds"],
                        "backbone_weights_sha1": features.backbone_sha1(result.model), "test_auc": auc}
        keras.backend.clear_session()
    out["runs"] = runs
    a, b = test_features["float32"], test_features["mixed_bfloat16"]
    cosine = np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    out["test_features"] = {"mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min()),
                            "relative_difference": float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12))}
    out["same_backbone_weights"] = runs["float32"]["backbone_weights_sha1"] == runs["mixed_bfloat16"]["backbone_weights_sha1"]
    out["separate_caches"] = runs["float32"]["feature_cache_key"] != runs["mixed_bfloat16"]["feature_cache_key"]
    out["auc_difference"] = runs["mixed_bfloat16"]["test_auc"] - runs["float32"]["test_auc"]
    out["train_speedup"] = runs["float32"]["train_seconds"] / runs["mixed_bfloat16"]["train_seconds"]
    return out


# --------------------------------------------------------------------------------------------
# 4. Peak memory of manifest + cache, in fresh processes


def write_rsna(folder: Path, n: int, seed: int) -> None:
    """``n`` 256x256 JPEG Baseline DICOMs in the RSNA layout (half Normal, half Lung Opacity) with the two label CSVs."""
    images = folder / "stage_2_train_images"
    images.mkdir(parents=True, exist_ok=True)
    bases = phantoms(8, 256, seed)
    labels, classes = [], []
    for i in range(n):
        patient = f"{i:08d}-0000-4000-8000-{seed:012d}"
        pixels = bases[i % len(bases)].copy()
        pixels[0, :8] = np.frombuffer(i.to_bytes(8, "big"), dtype=np.uint8)
        write_dicom(images / f"{patient}.dcm", pixels, patient)
        opacity = i % 2 == 1
        labels.append(f"{patient},{'10,10,50,50,1' if opacity else ',,,,0'}")
        classes.append(f"{patient},{'Lung Opacity' if opacity else 'Normal'}")
    (folder / "stage_2_train_labels.csv").write_text("patientId,x,y,width,height,Target\n" + "\n".join(labels) + "\n")
    (folder / "stage_2_detailed_class_info.csv").write_text("patientId,class\n" + "\n".join(classes) + "\n")


def _status_kb(pid: int | str, keys: tuple[str, ...]) -> dict[str, int]:
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in keys:
                values[key] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return values


def _children() -> list[str]:
    pids = []
    for task in Path("/proc/self/task").glob("*"):
        try:
            pids += (task / "children").read_text().split()
        except OSError:
            pass
    return pids


def memory_child(source: Path, out: Path, workers: int) -> dict:
    """Run in a fresh process: manifest + split + preprocessed cache.

    Peaks: ``VmHWM`` (the kernel's peak RSS of this process; ``ru_maxrss`` would also count the parent's
    pages from before the exec), and sampled every 20 ms: this process's anonymous and file-backed RSS,
    and the RSS of this process plus any child processes together (decoding runs in threads: normally none).
    """
    peaks = {"RssAnon": 0, "RssFile": 0, "total": 0, "workers": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            own = _status_kb("self", ("VmRSS", "RssAnon", "RssFile"))
            workers_kb = sum(_status_kb(pid, ("VmRSS",)).get("VmRSS", 0) for pid in _children())
            peaks["RssAnon"] = max(peaks["RssAnon"], own.get("RssAnon", 0))
            peaks["RssFile"] = max(peaks["RssFile"], own.get("RssFile", 0))
            peaks["workers"] = max(peaks["workers"], workers_kb)
            peaks["total"] = max(peaks["total"], own.get("VmRSS", 0) + workers_kb)
            stop.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    from xraylib import manifest, preprocess

    built = manifest.build_manifest({"rsna_pneumonia": source}, task="pneumonia_vs_normal", progress=False)
    data = preprocess.split_and_preprocess(built.frame, out, ("normal", "pneumonia"),
                                           preprocess.PreprocessSettings(image_size=224), workers=workers, progress=False)
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    return {
        "images": int(sum(len(s) for s in data.splits.values())),
        "seconds": seconds,
        "peak_rss_mb": _status_kb("self", ("VmHWM",))["VmHWM"] / 1024,
        "peak_anonymous_mb": peaks["RssAnon"] / 1024,
        "peak_file_backed_mb": peaks["RssFile"] / 1024,
        "peak_rss_workers_mb": peaks["workers"] / 1024,
        "peak_rss_with_workers_mb": peaks["total"] / 1024,
    }


def bench_memory(work: Path, sizes: tuple[int, ...], repeats: int, seed: int) -> dict:
    runs: dict[int, list[dict]] = {}
    for n in sizes:
        source = work / f"rsna_{n}"
        if not (source / "stage_2_detailed_class_info.csv").exists():
            log(f"memory: writing {n} synthetic 256x256 DICOMs")
            shutil.rmtree(source, ignore_errors=True)
            write_rsna(source, n, seed)
        runs[n] = []
        for repeat in range(repeats):
            log(f"memory: manifest + cache for {n} DICOMs in a fresh process, repeat {repeat + 1}")
            out = work / f"cache_{n}"
            shutil.rmtree(out, ignore_errors=True)
            child = subprocess.run([sys.executable, __file__, "--memory-child", str(source), str(out)],
                                   capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            if child.returncode != 0:
                raise RuntimeError(f"memory child failed:\n{child.stderr[-3000:]}")
            runs[n].append(json.loads(child.stdout.strip().splitlines()[-1]))
            shutil.rmtree(out, ignore_errors=True)
    small, large = min(sizes), max(sizes)
    peak = {n: median([r["peak_rss_mb"] for r in runs[n]]) for n in sizes}
    anonymous = {n: median([r["peak_anonymous_mb"] for r in runs[n]]) for n in sizes}
    with_workers = {n: median([r["peak_rss_with_workers_mb"] for r in runs[n]]) for n in sizes}
    slope = (peak[large] - peak[small]) / (large - small)
    return {
        "image_size_on_disk": "256x256 8-bit JPEG Baseline DICOM (pydicom), as the RSNA files are stored; cached at 224x224",
        "workers": 2, "repeats": repeats, "runs": {str(n): r for n, r in runs.items()},
        "peak_rss_mb": {str(n): v for n, v in peak.items()},
        "peak_anonymous_mb": {str(n): v for n, v in anonymous.items()},
        "peak_rss_with_workers_mb": {str(n): v for n, v in with_workers.items()},
        "growth_percent": 100 * (peak[large] / peak[small] - 1),
        "with_workers_growth_percent": 100 * (with_workers[large] / with_workers[small] - 1),
        "anonymous_growth_percent": 100 * (anonymous[large] / anonymous[small] - 1),
        "mb_per_1000_images": 1000 * slope,
        "extrapolated_full_rsna": {"images": FULL_RSNA_IMAGES, "peak_rss_mb": peak[large] + slope * (FULL_RSNA_IMAGES - large)},
        "seeds_float32_rgb_arrays_gb": {"8000": 8000 * 224 * 224 * 3 * 4 / 1e9,
                                        str(FULL_RSNA_IMAGES): FULL_RSNA_IMAGES * 224 * 224 * 3 * 4 / 1e9},
    }


# --------------------------------------------------------------------------------------------
# 6. Scale: manifest + cache of many NIH-layout PNGs, in fresh processes

#: All of NIH ChestX-ray14 and RSNA stage 2: the files a manifest of both reads.
FULL_NIH_RSNA_FILES = 112_120 + 26_684
SCALE_PNG_SIDE = 64
SCALE_CACHE_SIDE = 224


def scale_child(source: Path, out: Path, workers: int) -> dict:
    """Run in a fresh process: manifest (with its checkpoint) + split + cache of the NIH-layout ``source``, then
    both again as a resumed run finds them. Peak RSS is the kernel's ``VmHWM`` after the first build."""
    from xraylib import manifest, preprocess

    task, classes = "pneumonia_vs_normal", ("normal", "pneumonia")
    settings = preprocess.PreprocessSettings(image_size=SCALE_CACHE_SIDE)
    checkpoint = out / "manifest_files.jsonl"
    started = time.perf_counter()
    built = manifest.build_manifest({"nih_chestxray14": source}, task=task, workers=8, progress=False,
                                    checkpoint=checkpoint)
    manifest.save_manifest(built, out / "manifest.csv")
    manifest_s = time.perf_counter() - started
    started = time.perf_counter()
    data = preprocess.split_and_preprocess(built.frame, out / "preprocessed", classes, settings, workers=workers,
                                           progress=False)
    cache_s = time.perf_counter() - started
    peak = _status_kb("self", ("VmHWM",))["VmHWM"] / 1024
    started = time.perf_counter()
    again = manifest.build_manifest({"nih_chestxray14": source}, task=task, workers=8, progress=False,
                                    checkpoint=checkpoint)
    manifest_again_s = time.perf_counter() - started
    started = time.perf_counter()
    cached = preprocess.split_and_preprocess(again.frame, out / "preprocessed", classes, settings, workers=workers,
                                             progress=False)
    cache_again_s = time.perf_counter() - started
    cache_bytes = sum(p.stat().st_size for p in (out / "preprocessed").glob("*_images.npy"))
    started = time.perf_counter()
    preprocess.copy_preprocessed(out / "preprocessed", out / "local_copy", progress=False)  # to a runtime's own disk; here disk to disk
    copy_s = time.perf_counter() - started
    return {
        "files": int(len(pd.read_csv(source / "Data_Entry_2017.csv", usecols=[0]))), "rows": int(len(built.frame)),
        "images": int(sum(len(s) for s in data.splits.values())), "manifest_s": manifest_s, "cache_s": cache_s,
        "peak_rss_mb": peak, "manifest_again_s": manifest_again_s, "cache_again_s": cache_again_s,
        "cache_again_new": int(cached.report["new"]), "cache_mb": cache_bytes / 2**20, "copy_s": copy_s,
    }


def bench_scale(work: Path, sizes: tuple[int, ...], seed: int) -> dict:
    from xraylib.sample_layouts import write_nih_layout

    runs = {}
    for n in sizes:
        source, out = work / f"nih_{n}", work / f"out_{n}"
        shutil.rmtree(source, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        log(f"scale: writing {n} synthetic {SCALE_PNG_SIDE}x{SCALE_PNG_SIDE} PNGs in the NIH layout")
        started = time.perf_counter()
        write_nih_layout(source, n, size=SCALE_PNG_SIDE, seed=seed)
        write_s = time.perf_counter() - started
        log(f"scale: manifest + cache of {n} files in a fresh process")
        out.mkdir(parents=True)
        child = subprocess.run([sys.executable, __file__, "--scale-child", str(source), str(out)],
                               capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        if child.returncode != 0:
            raise RuntimeError(f"scale child failed:\n{child.stderr[-3000:]}")
        runs[n] = {**json.loads(child.stdout.strip().splitlines()[-1]), "write_s": write_s,
                   "load_average": load_average()}
        shutil.rmtree(source, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    small, large = min(sizes), max(sizes)
    slope = (runs[large]["peak_rss_mb"] - runs[small]["peak_rss_mb"]) / (large - small)
    per_image = runs[large]["cache_mb"] * 2**20 / max(1, runs[large]["images"])
    return {
        "files_on_disk": f"{SCALE_PNG_SIDE}x{SCALE_PNG_SIDE} 8-bit gray PNGs, NIH layout; task pneumonia_vs_normal "
                         f"(about 57% of NIH's rows); cached at {SCALE_CACHE_SIDE}x{SCALE_CACHE_SIDE}; 2 decoding threads, "
                         "8 manifest readers; local disk",
        "runs": {str(n): r for n, r in runs.items()},
        "peak_rss_growth_percent": 100 * (runs[large]["peak_rss_mb"] / runs[small]["peak_rss_mb"] - 1),
        "mb_per_1000_files": 1000 * slope,
        "extrapolated_nih_and_rsna": {"files": FULL_NIH_RSNA_FILES,
                                      "peak_rss_mb": runs[large]["peak_rss_mb"] + slope * (FULL_NIH_RSNA_FILES - large),
                                      "cache_gb_every_file_224": FULL_NIH_RSNA_FILES * per_image / 1e9,
                                      "cache_gb_every_file_512": FULL_NIH_RSNA_FILES * (128 + 512 * 512) / 1e9},
    }
# 7. Peak memory of predict_files for a folder, in fresh processes

#: Files in the two folders of the predict_memory part, per mode.
PREDICT_MEMORY_SIZES = {"quick": (1000, 20000), "full": (1000, 20000), "smoke": (40, 120)}


def write_png_folder(folder: Path, n: int, seed: int) -> None:
    """``n`` 256x256 PNG phantoms written with OpenCV (every file's pixels differ), 1,000 per subfolder."""
    import cv2

    bases = phantoms(8, 256, seed)
    for i in range(n):
        path = folder / f"part_{i // 1000:03d}" / f"image_{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = bases[i % len(bases)].copy()
        pixels[0, :8] = np.frombuffer(i.to_bytes(8, "big"), dtype=np.uint8)
        assert cv2.imwrite(str(path), pixels), path


def predict_memory_model(folder: Path, image_size: int = 224) -> Path:
    """An untrained small CNN at ``image_size`` saved as training saves a model (its memory per image is what is
    measured, not its answers). It has no out-of-distribution reference: the guard runs its colour, shape and
    blank-image checks."""
    from xraylib import models, runs
    from xraylib.preprocess import PreprocessSettings

    spec = models.ModelSpec(backbone="small_cnn", weights=None, image_size=image_size, classes=CLASSES)
    runs.RunFolder(folder).save_model(models.build_model(spec), {
        "classes": list(CLASSES), "model": spec.to_dict(), "input_size": [image_size, image_size, 1],
        "preprocessing": PreprocessSettings(image_size=image_size).to_dict(),
        "threshold": {"value": 0.5, "positive_class": CLASSES[1]}})
    return folder


def predict_memory_child(model_dir: Path, folder: Path, batch_files: int) -> dict:
    """Run in a fresh process: ``predict_files`` on ``folder``, ``batch_files`` files at a time.

    ``VmHWM`` is the kernel's peak RSS of this process; the anonymous RSS (what the arrays take, without the mapped
    libraries) is sampled every 20 ms. ``rss_before_mb``: after TensorFlow, the model and one prediction (a file of
    the folder) are loaded, before the folder is read.
    """
    from xraylib import models, predict

    loaded = models.load_model(model_dir)
    def quiet(line: str) -> None:
        pass

    predict.predict_files(loaded, next(folder.rglob("*.png")), say=quiet, progress=False)
    before = _status_kb("self", ("VmRSS", "RssAnon"))
    most = [before.get("RssAnon", 0)]
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.02):
            most[0] = max(most[0], _status_kb("self", ("RssAnon",)).get("RssAnon", 0))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.perf_counter()
    table = predict.predict_files(loaded, folder, batch_files=batch_files, say=quiet, progress=False)
    seconds = time.perf_counter() - started
    stop.set()
    watcher.join()
    return {"files": len(table), "predicted": int(table["ok"].sum()), "batch_files": batch_files, "seconds": seconds,
            "rss_before_mb": before["VmRSS"] / 1024, "peak_rss_mb": _status_kb("self", ("VmHWM",))["VmHWM"] / 1024,
            "peak_anonymous_mb": most[0] / 1024}


def bench_predict_memory(work: Path, sizes: tuple[int, int], seed: int) -> dict:
    """``predict_files`` on folders of ``sizes`` 256x256 PNGs, each run in a fresh process: in batches of
    :data:`xraylib.predict.FILES_PER_BATCH` files (today's way) and as one batch of the whole folder (the way before:
    every image decoded into one array first)."""
    from xraylib.predict import FILES_PER_BATCH

    model_dir = work / "model"
    if not (model_dir / "model.json").exists():
        predict_memory_model(model_dir)
    small, large = sizes
    folders = {large: work / f"png_{large}", small: work / f"png_{small}"}
    if not (folders[large] / "done").exists():
        log(f"predict_memory: writing {large} synthetic 256x256 PNGs")
        shutil.rmtree(folders[large], ignore_errors=True)
        write_png_folder(folders[large], large, seed)
        (folders[large] / "done").write_text("")
    if not (folders[small] / "done").exists():  # the first files of the large folder, linked
        shutil.rmtree(folders[small], ignore_errors=True)
        for path in sorted(folders[large].rglob("*.png"))[:small]:
            target = folders[small] / path.relative_to(folders[large])
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
        (folders[small] / "done").write_text("")
    runs: dict[str, dict[int, dict]] = {"batches": {}, "one_batch": {}}
    for n in sizes:
        for way, batch_files in (("batches", FILES_PER_BATCH), ("one_batch", n)):
            log(f"predict_memory: predict_files on {n} PNGs, {batch_files} files per batch, in a fresh process")
            child = subprocess.run([sys.executable, __file__, "--predict-memory-child", str(model_dir), str(folders[n]),
                                    str(batch_files)], capture_output=True, text=True,
                                   env={**os.environ, "PYTHONPATH": str(REPO)})
            if child.returncode != 0:
                raise RuntimeError(f"predict_memory child failed:\n{child.stderr[-3000:]}")
            runs[way][n] = json.loads(child.stdout.strip().splitlines()[-1])
            assert runs[way][n]["predicted"] == n, runs[way][n]
    growth = {way: 100 * (r[large]["peak_rss_mb"] / r[small]["peak_rss_mb"] - 1) for way, r in runs.items()}
    return {"files": "256x256 8-bit PNG phantoms written with OpenCV, 1,000 per subfolder; model: untrained small CNN at "
                     "224 px saved with xraylib (no out-of-distribution reference: colour, shape and blank checks)",
            "files_per_batch": FILES_PER_BATCH, "sizes": list(sizes), "runs": runs,
            "peak_rss_growth_percent": growth, "flat_within_20_percent": growth["batches"] <= 20}


# --------------------------------------------------------------------------------------------
# Results


def fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _plain_faults(row: dict) -> str:
    """A dicom_fast row's page faults per file in the plain loop, and whether freed buffers were kept ('-' for rows
    measured before this was recorded)."""
    faults = row.get("page_faults_per_file", {}).get("plain_loop")
    if faults is None:
        return "-"
    return f"{faults:.1f}" + ("" if row.get("freed_buffers_kept") else " (buffers not kept)")


def markdown(results: dict) -> str:
    machine = results["machine"]
    lines = [
        "# xraylib speed benchmark",
        "",
        f"Mode `{results['mode']}`, {results['started']} to {results['finished']}. Machine: {machine['cpu_model']}, "
        f"{machine['cores_available']} cores available ({machine['cores_logical']} logical), {machine.get('memory_gb')} GB, "
        f"TensorFlow {machine['tensorflow']}, Keras {machine['keras']}, Python {machine['python']}, "
        f"GPU: {', '.join(machine['gpus']) or 'none'}.",
    ]
    provenance = results.get("provenance", {})
    if len({p["started"] for p in provenance.values()}) > 1:
        lines += ["", "Parts measured in separate runs of this script on the same machine: " + "; ".join(
            f"{part} from the run started {p['started']} (load average {p['load_average_start']} to {p['load_average_end']})"
            for part, p in sorted(provenance.items())) + "."]
    if results.get("loaded_machine_note"):
        lines += ["", f"**{results['loaded_machine_note']}** Load average at start {machine['load_average_start']}, "
                      f"at end {machine['load_average_end']}. Ratios are measured side by side and hold better than the "
                      "absolute times."]
    lines += ["", "## Training (frozen backbone, same data, head and epochs; test AUC of both)", "",
              "| backbone | weights | images train/val/test | epochs | seeds' loop (s) | xraylib default (s) | speedup | "
              "AUC seeds' loop | AUC xraylib | AUC xraylib streaming | runs |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["training"]:
        if "median" not in row:
            lines.append(f"| {row['backbone']} | {row.get('status')} | | | | | | | | | |")
            continue
        counts = row["images"]
        for epochs in EPOCHS:
            m = row["median"][epochs] if epochs in row["median"] else row["median"][str(epochs)]
            lines.append(
                f"| {row['backbone']} | {row['weights'].split(':')[0].split(' (')[0]} | {counts['train']}/{counts['val']}/{counts['test']} | "
                f"{epochs} | {fmt(m['seeds_loop_seconds'])} | {fmt(m['xraylib_seconds'])} | **{fmt(m['speedup'])}x** | "
                f"{fmt(m['seeds_loop_test_auc'], 3)} | {fmt(m['xraylib_test_auc'], 3)} | {fmt(m.get('streaming_test_auc'), 3)} | "
                f"{row['repeats']} |")
    lines += ["", f"A second xraylib run on the same data (features already cached), {EPOCHS[0]} epochs: " + ", ".join(
        f"{row['backbone']} {fmt(row['median']['xraylib_cached_10_seconds'])} s" for row in results["training"] if "median" in row) + "."]
    for row in results["training"]:
        extra = row.get("median", {}).get("extrapolated_400_images")
        if extra:
            lines.append(f"Extrapolated to 400 images ({row['backbone']}, {extra['epochs']} epochs): seeds' loop "
                         f"{fmt(extra['seeds_loop_seconds'])} s, xraylib {fmt(extra['xraylib_seconds'])} s, "
                         f"**{fmt(extra['speedup'])}x** ({extra['how']}).")
    lines += ["", "Test AUC: both sides' heads applied to the same test images (the frozen backbone's test features computed "
                  "once). All three runs (the seeds' loop, xraylib cached, xraylib streamed) start from the same weights and draw "
                  "the same batches and dropout masks (the seeds' loop here takes xraylib's order for each epoch instead "
                  "of Keras' own shuffle), so their AUCs compare the computation paths (target: within 0.01). With "
                  "different shuffles two runs of the same loop differ by more than that on these small sets: VGG16 with "
                  "random weights, 10 epochs, Keras' shuffle gave 0.828 where xraylib's order gave 0.793 (2026-11-24)."]
    lines += ["", "The seeds' loop runs the backbone over every training and validation image in every epoch; xraylib runs it "
                  "once per image. At 10 epochs that is 10 times fewer backbone passes, so the ratio approaches 10x as the "
                  "data grows (fixed costs: building the model, training the head, saving .keras + .h5) and grows with the epochs."]
    lines += ["", "## Preprocessing throughput (images/s, decode + resize to 224)", "",
              "| files | n | plain loop (cv2/pydicom) | xraylib 1 worker | xraylib 2 workers | 1 worker vs plain loop | "
              "2 workers vs plain loop | runs |",
              "|---|---|---|---|---|---|---|---|"]
    for row in results["preprocessing"]:
        rates = row["images_per_second"]
        lines.append(f"| {row['kind']} | {row['files']} | {fmt(rates['plain_loop'])} | {fmt(rates['xraylib_1_worker'])} | "
                     f"{fmt(rates['xraylib_2_workers'])} | {fmt(row.get('speedup_1_worker_vs_plain_loop'), 2)}x | "
                     f"**{fmt(row['speedup_2_workers_vs_plain_loop'], 2)}x** | {row['repeats']} |")
    if results["preprocessing"]:
        lines += ["", "xraylib's figures are whole `preprocess_dataset` calls: the cache key, three splits, the status "
                      "files and the manifest written, on one pool of decoding threads for the call (OpenCV decodes and "
                      "resizes without holding Python's lock; pydicom's parsing holds it). Per file it does more than the "
                      "plain loop: it checks the file type, completeness and size from the bytes, applies DICOM LUTs and "
                      "MONOCHROME1, and shrinks with `INTER_AREA` (after exact 2x2 halvings while the image stays twice the "
                      "output, and JPEGs decoded at 1/2-1/8 scale by libjpeg under the same rule) where the plain loop's "
                      "`INTER_LINEAR` skips pixels (aliasing). A JPEG Baseline DICOM (as every RSNA file is) has its JPEG "
                      "frame decoded the same way by OpenCV, where the plain loop's `pixel_array` decodes it in full "
                      "through Pillow. An uncompressed DICOM is mostly pydicom's parsing, which holds Python's lock on "
                      "both sides: there the plain loop's cheaper resize wins, and a second thread adds little."]
    fast_rows = results.get("dicom_fast") or []
    if fast_rows:
        lines += ["", "## Uncompressed DICOMs: the fast reader (images/s, decode + resize to 224, 2 workers unless said)", "",
                  "| DICOMs (1024x1024 unless said) | n | plain loop (pydicom + cv2) | xraylib 1 worker | xraylib 2 workers | "
                  "xraylib 2 processes | general path, 2 workers (before) | 2 workers vs plain loop | "
                  "2 processes vs plain loop | 2 processes, the manifest's SHA-1s checked, vs plain loop | "
                  "2 workers vs general path | same pixels | "
                  "load average (start .. end) | CPU ms per file: plain loop / xraylib 2 workers | "
                  "plain loop's page faults per file | resize alone, 2 threads vs 1 | runs | measured |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in sorted(fast_rows, key=lambda row: (row["size"], row["files"], row["bits"])):
            rates = row["images_per_second"]
            what = f"{row['bits']}-bit" + ("" if row["size"] == 1024 else f", {row['size']}x{row['size']}")
            loads, cpu = row["load_averages"], row.get("cpu_ms_per_file", {})
            processes = rates.get("xraylib_2_processes")
            hashed = row.get("speedup_2_processes_hashes_checked_vs_plain_loop")  # (rows measured before: none)
            lines.append(f"| {what} | {row['files']} | {fmt(rates['plain_loop'])} | {fmt(rates['xraylib_1_worker'])} | "
                         f"{fmt(rates['xraylib_2_workers'])} | {fmt(processes) if processes else '-'} | "
                         f"{fmt(rates['general_path_2_workers'])} | "
                         f"{fmt(row['speedup_2_workers_vs_plain_loop'], 2)}x | "
                         f"{'**' + fmt(row['speedup_2_processes_vs_plain_loop'], 2) + 'x**' if processes else '-'} | "
                         f"{fmt(hashed, 2) + 'x' if hashed else '-'} | "
                         f"{fmt(row['speedup_2_workers_vs_general_path'], 2)}x | "
                         f"{'all ' + str(row['images_compared']) if row['same_pixels_as_general_path'] else 'NO'} | "
                         f"{loads[0][0]:.1f} .. {loads[-1][0]:.1f} | {fmt(cpu['plain_loop'], 2)} / "
                         f"{fmt(cpu['xraylib_2_workers'], 2)} | {_plain_faults(row)} | "
                         f"{fmt(row.get('resize_2_threads_vs_1'), 2)}x | "
                         f"{row['repeats']} | {row.get('measured', '')} |")
        lines += ["", "Synthetic phantoms written with pydicom, Explicit VR Little Endian, MONOCHROME2 (16-bit: 12 bits "
                      "stored). The fast reader (`xraylib.dicom.read_native`) reads the header itself (these plain files; "
                      "with pydicom up to the pixel data where there is a rescale, LUT or window) and takes the "
                      "pixels as a NumPy view of the file's bytes (of a memory map of the file from 4 MB on a local "
                      "disk: the 2500 px rows); the general path is the "
                      "reader before it (pydicom's full read and `pixel_array`), run in the same repeats. Same pixels: "
                      "every cached image of the fast run equals the general path's. The plain loop does less per file "
                      "(no display transform, `INTER_LINEAR` straight to 224); the ratios are medians of interleaved "
                      "runs on a shared 2-core machine (load average in the table), after one untimed round of each."
                      " CPU ms per file: this process's "
                      "CPU time (all threads) per file, which the load changes little; with two free cores the 2 "
                      "workers' rate approaches 2000 / that figure per second. Resize alone: the same image shrunk "
                      "400 times (`preprocess_pixels`) in two threads against one, after the repeats: 2.0x where two "
                      "cores are free while the shrink was OpenCV's alone; since it is two matrix products for the "
                      "sizes with exact weights, or OpenCV's on bands of rows merged and split again for some others "
                      "(2026-12-06), the Python around them holds the lock, and the figure is lower. "
                      "2 processes: `preprocess_dataset(..., processes=True)`, a later call in the process (the "
                      "workers forked from a running fork server); each output directory is emptied before its clock "
                      "starts. The process keeps its freed buffers (glibc's mmap and trim thresholds raised, see "
                      "`keep_freed_buffers`): without it the plain loop's 1 MB buffers went back to the system after "
                      "each file in some runs (the page faults column; rows without it are from runs before it), and the "
                      "loop ran up to 1.9x slower."]
    starts = next((row["process_pool_start_seconds"] for row in fast_rows if "process_pool_start_seconds" in row), None)
    if starts:
        lines += ["", f"Worker processes' start, on 8 small files: the first call in a process "
                      f"{fmt(starts['first_call'], 2)} s (it starts the fork server, which imports xraylib's decoding "
                      f"modules), a later call {fmt(starts['later_call'], 3)} s, threads {fmt(starts['threads'], 3)} s."]
    lines += ["", "## Inference throughput for a folder of files (images/s, decode + preprocess + predict)", "",
              "| model | files | one model.predict per image | xraylib predict_files (batched) | speedup | runs |",
              "|---|---|---|---|---|---|"]
    for row in results["inference"]:
        rates = row["images_per_second"]
        lines.append(f"| {row['backbone']} | {row['files']} | {fmt(rates['one_predict_per_image'])} | "
                     f"{fmt(rates['xraylib_batched'])} | **{fmt(row['speedup'])}x** | {row['repeats']} |")
    memory = results.get("memory")
    if memory:
        sizes = list(memory["peak_rss_mb"])
        lines += ["", "## Peak memory: manifest + preprocessed cache (fresh process each, 2 decoding threads)", "",
                  "| DICOMs (256x256) | peak RSS, main process (MB) | of which anonymous (MB) | peak RSS with any child processes (MB) | seconds | seeds' float32 RGB arrays |",
                  "|---|---|---|---|---|---|"]
        for n in sizes:
            runs = memory["runs"][n]
            lines.append(f"| {n} | {fmt(memory['peak_rss_mb'][n])} | {fmt(memory['peak_anonymous_mb'][n])} | "
                         f"{fmt(memory['peak_rss_with_workers_mb'][n])} | {fmt(median([r['seconds'] for r in runs]))} | "
                         f"{fmt(int(n) * 224 * 224 * 3 * 4 / 1e9, 2)} GB |")
        extra = memory["extrapolated_full_rsna"]
        lines += ["", f"Peak RSS of the main process grows {fmt(memory['growth_percent'])}% from {sizes[0]} to {sizes[-1]} images "
                      f"(with any child processes: {fmt(memory['with_workers_growth_percent'])}%; decoding runs in threads "
                      f"of the main process; "
                      f"{fmt(memory['mb_per_1000_images'])} MB per 1,000 images). Extrapolated to {extra['images']:,} images "
                      f"(RSNA stage 2 plus the COVID-19 sets): about {fmt(extra['peak_rss_mb'], 0)} MB, against "
                      f"{fmt(memory['seeds_float32_rgb_arrays_gb'][str(extra['images'])], 1)} GB for the seeds' float32 RGB arrays."]
    scale = results.get("scale")
    if scale:
        lines += ["", f"## Scale: manifest + cache of NIH-layout files (fresh process each; {scale['files_on_disk']})", "",
                  "| files | rows kept | manifest s (ms/file) | cache s (ms/image) | peak RSS MB | resumed: manifest s / cache s | cache MB | copy of the cache s | load average |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for n, r in scale["runs"].items():
            lines.append(f"| {int(n):,} | {r['rows']:,} | {fmt(r['manifest_s'])} ({fmt(1000 * r['manifest_s'] / r['files'], 3)}) | "
                         f"{fmt(r['cache_s'])} ({fmt(1000 * r['cache_s'] / max(1, r['rows']), 3)}) | {fmt(r['peak_rss_mb'])} | "
                         f"{fmt(r['manifest_again_s'])} / {fmt(r['cache_again_s'])} ({r['cache_again_new']} new) | "
                         f"{fmt(r['cache_mb'])} | {fmt(r['copy_s'], 2)} | {fmt(r['load_average'][0], 2)} |")
        extra = scale["extrapolated_nih_and_rsna"]
        lines += ["", f"Peak RSS grows {fmt(scale['peak_rss_growth_percent'])}% from the smallest to the largest run "
                      f"({fmt(scale['mb_per_1000_files'])} MB per 1,000 files); extrapolated to all of NIH and RSNA "
                      f"({extra['files']:,} files): about {fmt(extra['peak_rss_mb'], 0)} MB. A cache of every one of those "
                      f"files takes {fmt(extra['cache_gb_every_file_224'])} GB at 224 px, "
                      f"{fmt(extra['cache_gb_every_file_512'])} GB at 512 px. Measured on local disk: a Drive folder "
                      "adds its latency to every file read (not measured here)."]
    lines += predict_memory_markdown(results.get("predict_memory"))
    lines += bfloat16_markdown(results.get("bfloat16"))
    gpu = results.get("gpu", {})
    lines += ["", "## GPU", "", "| measurement | float32 | mixed float16 |", "|---|---|---|"]
    if gpu.get("status") == "measured":
        rows = gpu["rows"]

        def cell(policy: str, key: str) -> str:
            row = rows.get(policy, {})
            return fmt(row[key]) if key in row else row.get("status", "not measured")

        lines.append(f"| training images/s (VGG16, 224, frozen backbone streamed, batch {gpu['train_batch_size']}) | "
                     f"{cell('float32', 'train_images_per_second')} | {cell('mixed_float16', 'train_images_per_second')} |")
        lines.append(f"| inference images/s (VGG16, 224, batch {gpu['inference_batch_size']}) | "
                     f"{cell('float32', 'inference_images_per_second')} | {cell('mixed_float16', 'inference_images_per_second')} |")
        lines += ["", f"Device: {gpu['device']} (compute capability {gpu['compute_capabilities'] or 'n/a'}); "
                      f"{gpu['images']} random images, median of {gpu['repeats']}; XLA as xraylib compiles (on a GPU)."]
    else:
        for name in ("training images/s (VGG16, 224)", "inference images/s (VGG16, 224)"):
            lines.append(f"| {name} | not measured | not measured |")
        lines += ["", f"Not measured: {gpu.get('reason', 'not part of this run')}."]
    lines += distribute_markdown(results.get("distribute"))
    return "\n".join(lines) + "\n"


def predict_memory_markdown(part: dict | None) -> list[str]:
    if not part:
        return []
    lines = ["", "## Peak memory: predict_files on a folder (fresh process each)", "",
             f"| PNGs (256x256) | peak RSS, batches of {part['files_per_batch']} files (MB) | of which anonymous (MB) | "
             "RSS before the folder (MB) | seconds | peak RSS, whole folder as one batch (MB) | seconds |",
             "|---|---|---|---|---|---|---|"]
    for n in map(str, part["sizes"]):
        batches, whole = part["runs"]["batches"][n], part["runs"]["one_batch"][n]
        lines.append(f"| {int(n):,} | {fmt(batches['peak_rss_mb'])} | {fmt(batches['peak_anonymous_mb'])} | "
                     f"{fmt(batches['rss_before_mb'])} | {fmt(batches['seconds'])} | {fmt(whole['peak_rss_mb'])} | "
                     f"{fmt(whole['seconds'])} |")
    growth = part["peak_rss_growth_percent"]
    small, large = (f"{n:,}" for n in part["sizes"])
    lines += ["", f"From {small} to {large} files the peak RSS grows {fmt(growth['batches'])}% in batches (flat within "
                  f"20%: {'yes' if part['flat_within_20_percent'] else 'no'}) and {fmt(growth['one_batch'])}% with the "
                  f"whole folder as one batch, as `predict_files` did before (every image decoded into one array; the old "
                  f"code also held the list of decoded images while stacking it). {part['files']}."]
    return lines
def distribute_markdown(dist: dict | None) -> list[str]:
    lines = ["", "## Distribution strategies (one device against mirrored)", ""]
    if not dist:
        return lines + ["Not part of this run (`--only distribute`)."]
    images = dist["images"]
    lines += [f"`xraylib.runs.train`, the small CNN streamed, {images['train']} training and {images['val']} validation "
              f"images (real, 64 px), global batch {dist['batch_size']}, {dist['epochs']} epochs, median of "
              f"{dist['repeats']} alternating runs after one warm-up pair, in one fresh process per row.", "",
              "| devices | one device, s | mirrored, s | mirrored / one | largest probability difference | loss difference "
              "| peak RSS, MB |", "|---|---|---|---|---|---|---|"]
    for kind, row in dist["rows"].items():
        if "status" in row:
            lines.append(f"| {kind} | {row['status']} | | | | | |")
            continue
        lines.append(f"| {kind} ({row['replicas']} replicas) | {fmt(row['median_seconds']['one'], 2)} | "
                     f"{fmt(row['median_seconds']['mirrored'], 2)} | {fmt(row['mirrored_over_one'], 2)} | "
                     f"{row['max_probability_difference']:.1e} | {row['loss_difference']:.1e} | {fmt(row['peak_rss_mb'], 0)} |")
    return lines + ["", "Two logical devices share the same two cores, so mirrored training cannot be faster on a CPU: "
                        "the row shows what the strategy costs and that it gives the model one device gives."]


def bfloat16_markdown(rows: list | None) -> list[str]:
    """The bfloat16 section of speed.md (none when the part was not measured)."""
    if not rows:
        return []
    lines = ["", "## bfloat16 on the CPU: frozen feature extraction, float32 against mixed bfloat16", "",
             "| backbone | weights | images train/val/test | float32 (images/s) | bfloat16 (images/s) | speedup | "
             "train run speedup | test features: mean cosine, relative difference | test AUC float32 | test AUC bfloat16 | "
             "AUC difference | auto chooses |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "runs" not in row:
            lines.append(f"| {row['backbone']} | {row.get('status')} | | | | | | | | | | |")
            continue
        counts, rates, runs = row["images"], row["images_per_second"], row["runs"]
        lines.append(f"| {row['backbone']} | {row['weights'].split(':')[0].split(' (')[0]} | "
                     f"{counts['train']}/{counts['val']}/{counts['test']} | {fmt(rates['float32'])} | "
                     f"{fmt(rates['mixed_bfloat16'])} | **{fmt(row['speedup'], 2)}x** | {fmt(row['train_speedup'], 2)}x | "
                     f"{fmt(row['test_features']['mean_cosine'], 6)}, {fmt(100 * row['test_features']['relative_difference'])}% | "
                     f"{fmt(runs['float32']['test_auc'], 3)} | "
                     f"{fmt(runs['mixed_bfloat16']['test_auc'], 3)} | {row['auc_difference']:+.4f} | {row['auto_chooses']} |")
    first = next((row for row in rows if "runs" in row), None)
    if first:
        flags = ", ".join(first["cpu_bfloat16_flags"]) or "none"
        lines += ["", f"CPU bfloat16 units (/proc/cpuinfo): {flags}. Images/s: the frozen backbone up to the head's pooling "
                      f"(`features.feature_extractor`), batch {first['batch_size']}, the same weights and the same real "
                      f"images in both precisions, alternating inside each of {first['repeats']} repeats (median; load "
                      "averages in speed.json). Train run speedup: the whole `xraylib.runs.train` call (feature extraction "
                      "of train and val, 10 epochs of the head, saving) with `mixed_precision=\"off\"` against "
                      "`\"bfloat16\"`; each run extracts its own feature cache (the precision is part of its key), and "
                      "each head is scored on the test features of its own precision. VGG16 has random weights here (its "
                      "ImageNet weights cannot be downloaded on this machine); MobileNet 0.25 has its real ImageNet weights."]
    return lines


def jsonable(value):
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if np.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


#: The parts of the benchmark (``--only``), in the order they run; ``--merge`` keeps the ones a run does not measure.
PARTS = ("training", "preprocessing", "inference", "memory", "gpu", "scale", "predict_memory", "distribute", "bfloat16",
         "dicom_fast")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images and repeats (about 20 minutes on 2 cores)")
    parser.add_argument("--only", nargs="+", choices=PARTS,
                        help="run only these parts")
    parser.add_argument("--backbones", nargs="+", default=["vgg16", "mobilenet"], choices=("vgg16", "mobilenet"))
    parser.add_argument("--loaded", default="",
                        help="a note that the machine was busy with other work during the run (goes into the results)")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary folder, removed after)")
    parser.add_argument("--out", default=str(RESULTS), help=f"results folder (default {RESULTS})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--merge", action="store_true",
                        help="keep the parts of an existing results file that this run does not measure")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-sizes", type=int, nargs=2, default=None, metavar=("SMALL", "LARGE"),
                        help="numbers of DICOMs for the memory part (default 1000 8000)")
    parser.add_argument("--dicom-fast-files", type=int, nargs="+", default=None, metavar="N",
                        help="numbers of uncompressed DICOMs for the dicom_fast part (default 1000; smoke: 12)")
    parser.add_argument("--dicom-fast-side", type=int, default=1024, metavar="PX",
                        help="rows and columns of the dicom_fast part's files (default 1024; smoke: 128)")
    parser.add_argument("--dicom-fast-bits", type=int, nargs="+", default=[8, 16], choices=(8, 16),
                        help="bit depths for the dicom_fast part (default 8 16)")
    parser.add_argument("--memory-child", nargs=2, metavar=("SOURCE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--scale-sizes", type=int, nargs="+", default=None, metavar="N",
                        help="numbers of NIH-layout PNGs for the scale part (default 1000 50000)")
    parser.add_argument("--scale-child", nargs=2, metavar=("SOURCE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--predict-memory-sizes", type=int, nargs=2, default=None, metavar=("SMALL", "LARGE"),
                        help="numbers of PNGs for the predict_memory part (default 1000 20000)")
    parser.add_argument("--predict-memory-child", nargs=3, metavar=("MODEL", "FOLDER", "BATCH_FILES"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.scale_child:
        print(json.dumps(scale_child(Path(args.scale_child[0]), Path(args.scale_child[1]), workers=2)))
        return 0
    if args.memory_child:
        print(json.dumps(memory_child(Path(args.memory_child[0]), Path(args.memory_child[1]), workers=2)))
        return 0
    if args.predict_memory_child:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        model_dir, folder, batch_files = args.predict_memory_child
        print(json.dumps(predict_memory_child(Path(model_dir), Path(folder), int(batch_files))))
        return 0

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(REPO))
    from xraylib import config

    mode_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    mode = MODES[mode_name]
    global EPOCHS
    EPOCHS = tuple(mode["epochs"])
    parts = set(args.only or PARTS)
    data_root, weights_dir = config.shared_data_dir(), config.shared_weights_dir()
    if data_root is None and parts & {"training", "preprocessing", "inference", "gpu"}:  # memory, scale: synthetic files
        print("../shared/data not found (set XRAYLIB_SHARED_DATA): the benchmark needs the real images", file=sys.stderr)
        return 2
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="xraylib_speed_"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"format": "xraylib speed benchmark v1", "mode": mode_name,
               "started": datetime.datetime.now().isoformat(timespec="seconds"),
               "machine": {**machine_info(), "load_average_start": load_average()},
               "loaded_machine_note": args.loaded, "training": [], "preprocessing": [], "inference": []}
    results["machine"].update(tf_info())
    try:
        if "memory" in parts:  # first: the fresh processes it starts do not share this one's memory
            sizes = tuple(args.memory_sizes or mode["memory_sizes"])
            results["memory"] = bench_memory(work / "memory", sizes, mode["memory_repeats"], args.seed)
        if "scale" in parts:
            results["scale"] = bench_scale(work / "scale", tuple(args.scale_sizes or mode["scale_sizes"]), args.seed)
        if "predict_memory" in parts:  # fresh processes too
            sizes = tuple(args.predict_memory_sizes or PREDICT_MEMORY_SIZES[mode_name])
            results["predict_memory"] = bench_predict_memory(work / "predict_memory", sizes, args.seed)
        if "preprocessing" in parts:
            rasters = raster_files(data_root, mode["raster_files"], args.seed)
            results["preprocessing"].append(bench_preprocessing("JPEG/PNG (real, ../shared/data)", rasters,
                                                                work / "prep_raster", mode["repeats"]))
            dicoms = rsna_dicom_copies(data_root, work / "dicoms_rsna", mode["dicom_files"])
            kind = "DICOM, real RSNA file (JPEG Baseline 1024x1024, ../shared/data/dicom-samples, copied)"
            if not dicoms:
                log("no RSNA-format DICOM in dicom-samples: synthetic JPEG Baseline DICOMs instead")
                dicoms = dicom_files(work / "dicoms_jpeg", mode["dicom_files"], 1024, args.seed)
                kind = "DICOM, JPEG Baseline as the RSNA files (synthetic 1024x1024)"
            results["preprocessing"].append(bench_preprocessing(kind, dicoms, work / "prep_dicom_rsna", mode["repeats"]))
            dicoms = dicom_files(work / "dicoms_raw", mode["dicom_files"], 1024, args.seed, jpeg_quality=None)
            results["preprocessing"].append(bench_preprocessing("DICOM, uncompressed (synthetic 1024x1024, 8-bit)", dicoms,
                                                                work / "prep_dicom_raw", mode["repeats"]))
        if "dicom_fast" in parts:
            sizes = args.dicom_fast_files or ([12] if mode_name == "smoke" else [1000])
            side = 128 if mode_name == "smoke" else args.dicom_fast_side
            started = process_pool_start(work / "dicom_fast")
            results["dicom_fast"] = [{**bench_dicom_fast(bits, n, work / "dicom_fast", mode["repeats"], args.seed, side),
                                      "process_pool_start_seconds": started}
                                     for n in sizes for bits in args.dicom_fast_bits]
        if "training" in parts or "inference" in parts:
            for backbone in args.backbones:
                if "training" in parts:
                    results["training"].append(bench_training(backbone, data_root, weights_dir, work, mode, args.seed))
                run_dir = work / f"train_{backbone}" / f"run_{EPOCHS[0]}"
                if "inference" in parts and (run_dir / "model.keras").exists():
                    files = raster_files(data_root, mode["infer_files"][backbone], args.seed + 1)
                    results["inference"].append(bench_inference(backbone, run_dir, files, mode["repeats"]))
        if "bfloat16" in parts:
            results["bfloat16"] = [bench_bfloat16(backbone, data_root, weights_dir, work, mode, args.seed)
                                   for backbone in args.backbones]
        if "gpu" in parts and (results["machine"]["gpus"] or mode_name == "smoke"):
            # (The smoke run measures these rows on the CPU too, to check the code; its numbers mean nothing.)
            log("accelerator rows: VGG16 training and inference, float32 and mixed float16")
            results["gpu"] = {"status": "measured", "device": ", ".join(results["machine"]["gpus"]) or "CPU (smoke run)",
                              **bench_accelerator(mode["gpu_images"], mode["repeats"], args.seed)}
        elif "gpu" in parts:
            results["gpu"] = {"status": "not measured", "reason": "no GPU on this machine (none was lent to this task)"}
        if "distribute" in parts:
            results["distribute"] = bench_distribute(data_root, work / "distribute_data", mode["distribute_images"],
                                                     mode["distribute_epochs"], mode["repeats"], args.seed,
                                                     results["machine"]["gpus"])
    finally:
        results["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        results["machine"]["load_average_end"] = load_average()
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        this_run = {"started": results["started"], "load_average_start": results["machine"]["load_average_start"],
                    "load_average_end": results["machine"]["load_average_end"]}
        results["provenance"] = {part: this_run for part in sorted(parts)}
        if args.merge and (out / "speed.json").exists():
            previous = json.loads((out / "speed.json").read_text())
            for part in PARTS:
                if part not in parts and part in previous:
                    results[part] = previous[part]
                    results["provenance"][part] = previous.get("provenance", {}).get(part, {
                        "started": previous.get("started"),
                        "load_average_start": previous.get("machine", {}).get("load_average_start"),
                        "load_average_end": previous.get("machine", {}).get("load_average_end")})
            if "dicom_fast" in parts:  # rows of other sizes or bit depths, measured in earlier runs, are kept
                done = {(row["bits"], row["files"], row["size"]) for row in results.get("dicom_fast", [])}
                results["dicom_fast"] = results.get("dicom_fast", []) + [
                    row for row in previous.get("dicom_fast", []) if (row["bits"], row["files"], row["size"]) not in done]
        clean = jsonable(results)
        (out / "speed.json").write_text(json.dumps(clean, indent=2) + "\n")
        (out / "speed.md").write_text(markdown(clean))
        log(f"wrote {out / 'speed.json'} and {out / 'speed.md'}")
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
