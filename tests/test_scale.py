"""Scale without surprise (issue 8): the manifest and the cache for 5,000 small DICOMs.

RSNA's layout (one DICOM per patient, labels with one row per box) at 5,000 patients, with a few
broken files and labelled ids without a file, as a real folder has. The manifest and the cache are
built in a fresh process for 1,000 and for 5,000 patients, which reports its counts, its times and
its peak resident memory (``resource.getrusage``: the process, whose threads decode). The
counts must be exact, the time per image within a generous budget, and the memory flat: the
memory-mapped cache and chunked work mean 4,000 more images may not cost more than a few MB each
thousand.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from conftest import gradient_image

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:Invalid value for VR AS")]

REPO = Path(__file__).resolve().parents[1]
N_LARGE, N_SMALL = 5_000, 1_000
#: Per image, manifest and cache together, on a shared 2-core CI machine: about 10x what it takes.
SECONDS_PER_IMAGE = 0.05
#: Extra peak memory allowed for 4,000 more images (a manifest row and its header facts are ~1 KB).
EXTRA_MB_ALLOWED = 60

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    from pathlib import Path
    from xraylib import manifest, preprocess

    if __name__ == "__main__":
        root, out = Path(sys.argv[1]), Path(sys.argv[2])
        started = time.perf_counter()
        result = manifest.build_manifest({"rsna_pneumonia": root}, task="pneumonia_vs_normal", views=None,
                                         workers=8, progress=False)
        built = time.perf_counter()
        data = preprocess.split_and_preprocess(result.frame, out, ("normal", "pneumonia"),
                                               preprocess.PreprocessSettings(image_size=32), workers=2, progress=False)
        done = time.perf_counter()
        print("RESULT " + json.dumps({
            "manifest_rows": len(result.frame), "labels": result.frame["label"].value_counts().to_dict(),
            "problems": [reason for _, reason in result.report.problems],
            "excluded": result.report.per_source["rsna"]["excluded"],
            "cached": {name: len(split) for name, split in data.splits.items()}, "report": data.report,
            "manifest_s": built - started, "preprocess_s": done - built,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "workers_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        }), flush=True)
""")


def class_of(i: int) -> str:
    return ("Normal", "Normal", "Lung Opacity", "Lung Opacity", "No Lung Opacity / Not Normal")[i % 5]


#: Broken files among the DICOMs (empty, cut short): reported and skipped, never in the cache.
BROKEN = {17: "empty", 2_345: "cut", 4_999: "cut", 612: "empty"}


def write_rsna(root: Path, n: int) -> None:
    """``n`` small DICOMs in the RSNA layout (48x48 8-bit, each different), the two label CSVs, 25 ids without a file."""
    images = root / "stage_2_train_images"
    images.mkdir(parents=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    base = gradient_image(48, 48)
    rng = np.random.default_rng(0)
    labels, classes = ["patientId,x,y,width,height,Target"], ["patientId,class"]
    for i in range(n + 25):
        patient = f"{i:08d}-0000-4000-8000-{i:012d}"
        cls = class_of(i)
        boxes = [f"{100 + i % 7}.0,{200}.0,{50}.0,{60}.0"] * (1 + i % 2) if cls == "Lung Opacity" else [",,,"]
        for box in boxes:
            labels.append(f"{patient},{box},{int(cls == 'Lung Opacity')}")
            classes.append(f"{patient},{cls}")
        if i >= n:
            continue  # labelled, no file: as when a user copied part of the folder
        meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.{i + 1}"
        ds = FileDataset(patient, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientID, ds.PatientSex, ds.Modality, ds.ViewPosition = patient, "MF"[i % 2], "CR", ("PA", "AP")[i % 3 == 0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, ("MONOCHROME2", "MONOCHROME1")[i % 7 == 0]
        ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 48, 48, 8, 8, 7, 0
        ds.PixelData = np.clip(base.astype(np.int16) + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8).tobytes()
        path = images / f"{patient}.dcm"
        ds.save_as(path, enforce_file_format=True)
        if BROKEN.get(i) == "empty":
            path.write_bytes(b"")
        elif BROKEN.get(i) == "cut":
            path.write_bytes(path.read_bytes()[:400])
    (root / "stage_2_train_labels.csv").write_text("\n".join(labels) + "\n")
    (root / "stage_2_detailed_class_info.csv").write_text("\n".join(classes) + "\n")


def expected_counts(n: int) -> dict:
    used = [i for i in range(n) if class_of(i) != "No Lung Opacity / Not Normal"]
    good = [i for i in used if i not in BROKEN]
    return {"rows": len(good), "broken": len([i for i in used if i in BROKEN]),
            "normal": sum(class_of(i) == "Normal" for i in good),
            "pneumonia": sum(class_of(i) == "Lung Opacity" for i in good),
            # Ids of an unused class are left out before their file is looked for.
            "without_file": sum(class_of(i) != "No Lung Opacity / Not Normal" for i in range(n, n + 25)),
            "class_not_used": sum(class_of(i) == "No Lung Opacity / Not Normal" for i in range(n + 25))}


def build(root: Path, out: Path, script: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(script), str(root), str(out)], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.split("RESULT ", 1)[1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, dict]:
    base = tmp_path_factory.mktemp("scale")
    script = base / "build.py"
    script.write_text(CHILD)
    out = {}
    for n in (N_SMALL, N_LARGE):
        started = time.perf_counter()
        write_rsna(base / f"rsna-{n}", n)
        print(f"wrote {n} DICOMs in {time.perf_counter() - started:.1f} s")
        out[n] = build(base / f"rsna-{n}", base / f"cache-{n}", script)
    return out


@pytest.mark.parametrize("n", [N_SMALL, N_LARGE])
def test_counts_are_exact(runs, n):
    result, expected = runs[n], expected_counts(n)
    assert result["manifest_rows"] == expected["rows"]
    assert result["labels"] == {"normal": expected["normal"], "pneumonia": expected["pneumonia"]}
    broken = [r for r in result["problems"] if "labelled patientIds" not in r]
    assert len(broken) == expected["broken"] and all("empty file" in r or "DICOM" in r for r in broken)
    assert f"{expected['without_file']} labelled patientIds have no DICOM file" in result["problems"]
    assert result["excluded"] == {"RSNA class not used: No Lung Opacity / Not Normal": expected["class_not_used"],
                                  "unreadable file": expected["broken"]}
    assert sum(result["cached"].values()) == expected["rows"] and result["report"]["skipped"] == 0
    assert result["report"]["new"] == expected["rows"]
    shares = {name: count / expected["rows"] for name, count in result["cached"].items()}
    assert 0.6 < shares["train"] < 0.8 and 0.1 < shares["val"] < 0.2  # the patient-level split's fractions


def test_time_per_image_is_within_budget(runs):
    for n, result in runs.items():
        per_image = (result["manifest_s"] + result["preprocess_s"]) / result["manifest_rows"]
        assert per_image < SECONDS_PER_IMAGE, f"{n} images: {per_image * 1000:.1f} ms per image ({result})"
    small, large = (runs[n] for n in (N_SMALL, N_LARGE))
    rate_small = (small["manifest_s"] + small["preprocess_s"]) / small["manifest_rows"]
    rate_large = (large["manifest_s"] + large["preprocess_s"]) / large["manifest_rows"]
    assert rate_large < 3 * rate_small + 0.005  # linear, not quadratic: 5x the images, not 25x the time


def test_memory_stays_flat(runs):
    small, large = runs[N_SMALL], runs[N_LARGE]
    extra = large["peak_mb"] - small["peak_mb"]
    assert extra < EXTRA_MB_ALLOWED, f"peak {small['peak_mb']:.0f} MB for {N_SMALL}, {large['peak_mb']:.0f} MB for {N_LARGE}"
    assert large["workers_peak_mb"] - small["workers_peak_mb"] < 30  # child processes, if any, hold one chunk at a time
    print({n: {k: round(v, 1) for k, v in r.items() if k.endswith(("_s", "_mb"))} for n, r in runs.items()})
