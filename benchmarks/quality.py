"""Quality benchmark: what the seeds' "96% accuracy" protocol reports, beside honest protocols, on real data.

    .venv/bin/python benchmarks/quality.py           # about 35 minutes on a 2-core CPU
    .venv/bin/python benchmarks/quality.py --smoke   # checks the script in a few minutes; its numbers mean nothing

Writes ``benchmarks/results/quality.json`` (every number, n, interval, verdict and the machine)
and ``benchmarks/results/quality.md`` (the tables). Not part of the tests. Needs ../shared/data
(or $XRAYLIB_SHARED_DATA) and, for MobileNet, ../shared/weights (or $XRAYLIB_SHARED_WEIGHTS).

The data: COVID-19 from ieee8023 (every frontal COVID-19 image xraylib's manifest keeps) against
normals from every source in ../shared/data: Kaggle (children aged one to five), NIH ChestX-ray14
(adults), the NLM Shenzhen set (mostly adults) and ieee8023's "No Finding" rows. Everything is decoded and resized once into one preprocessed cache, split by
patient; each protocol is a view of that cache (other rows, other splits), so every image is
decoded once and run through each backbone once (bottleneck features cached).

Protocols (rows of the table):
  (a) the seeds' protocol: COVID-19 against Kaggle's pediatric normals, a random IMAGE-level
      80/20 split (a patient's images on both sides); 1/8 of the training images, drawn at random,
      validate (the seeds had no validation set; xraylib needs one for its threshold).
  (b) the same images split by PATIENT (70/15/15).
  (c) adult normals only: COVID-19 against the normals of every source whose record
      (xraylib.sources.SOURCES) is not children only (NIH, NLM, ieee8023), split by patient.
  (d) leave one source out: all images; for each source that can be left out, train on the
      others and test on every image of it (sensitivity or specificity where it holds one class).
Pipelines (the seeds' design: backbone frozen, new head, Adam 1e-3, batch 8, 25 epochs, class
weights, no augmentation; ImageNet VGG16 weights cannot be downloaded here):
  seeds-vgg16      VGG16 from random initialisation (the seeds' architecture, not their weights)
  seeds-mobilenet  MobileNet(alpha=0.25) with its real ImageNet weights from ../shared/weights
  xraylib          MobileNet(alpha=0.25) ImageNet, xraylib's recommendation on a CPU: augmented
                   views cached (4 per image), then the top block fine-tuned for a few epochs
Shortcut tests (xraylib.shortcuts) on the real data: source prediction, lungs hidden (Maguolo and
Nanni), Grad-CAM heat share; and the audit's warnings (xraylib.audit) for each protocol's data.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CLASSES = ("normal", "covid")
METRICS = ("accuracy", "sensitivity", "specificity", "roc_auc")

MODES = {
    "full": {"image_size": 224, "epochs": 25, "fine_tune_epochs": 3, "views": 4, "max_per_source_label": None,
             "n_boot": 1000, "saliency_images": 40, "seeds": 5, "heads": 5,
             "preprocessing": ("equalize", "clahe", "body crop"), "ensemble": True},
    # Checks the script end to end in a few minutes; its numbers mean nothing.
    "smoke": {"image_size": 32, "epochs": 2, "fine_tune_epochs": 1, "views": 2, "max_per_source_label": 12,
              "n_boot": 50, "saliency_images": 3, "seeds": 2, "heads": 2, "preprocessing": ("body crop",),
              "ensemble": False},
}
#: The preprocessing options measured by the out-of-site estimate (xraylib.preprocess.PreprocessSettings fields).
PREPROCESSING_OPTIONS = {"equalize": {"intensity": "equalize"}, "clahe": {"intensity": "clahe"}, "body crop": {"crop": "body"}}


def log(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


# --------------------------------------------------------------------------------------------
# Data: one manifest, one preprocessed cache, one view per protocol


def build_data(data_root: Path, work: Path, mode: dict, seed: int):
    from xraylib import config, manifest, preprocess

    paths = config.folder_drive_paths(data_root, work)
    frame = manifest.build_manifest(paths, task="covid_vs_normal", progress=False).frame
    if mode["max_per_source_label"]:
        first = frame.drop_duplicates(["source", "label", "patient_id"])
        kept = first.groupby(["source", "label"]).head(mode["max_per_source_label"])["patient_id"]
        frame = frame[frame["patient_id"].isin(kept)].reset_index(drop=True)
    data = preprocess.split_and_preprocess(frame, work / "preprocessed", CLASSES,
                                           preprocess.PreprocessSettings(image_size=mode["image_size"]),
                                           fractions=(0.7, 0.15, 0.15), seed=seed, progress=False)
    return frame, data


def protocol_rows(data, seed: int) -> dict[str, pd.DataFrame]:
    """Rows of the cache's manifest with ``new_split`` for protocols (a) to (c), and all rows for (d)."""
    from xraylib.split import split_by_image

    from xraylib.sources import SOURCES

    rows = data.manifest
    covid = rows["label"] == "covid"
    children = rows["source"].isin([source.name for source in SOURCES if source.children])  # Kaggle's
    pediatric = rows[covid | children]
    adult = rows[covid | ((rows["label"] == "normal") & ~children)]
    # (a) the seeds' protocol: a random image-level 80/20 split; 1/8 of the training images validate.
    drawn = split_by_image(pediatric, test_fraction=0.2, seed=seed)["split"].to_numpy(dtype=object)
    train_at = np.flatnonzero(drawn == "train")
    rng = np.random.default_rng(seed)
    drawn[rng.choice(train_at, size=max(1, len(train_at) // 8), replace=False)] = "val"
    return {
        "a": pediatric.assign(new_split=drawn),
        "b": pediatric.assign(new_split=pediatric["split"]),
        "c": adult.assign(new_split=adult["split"]),
        "d": rows,
    }


PROTOCOLS = {
    "a": "(a) seeds' protocol: random image-level 80/20 split, pediatric (Kaggle) normals",
    "b": "(b) patient-level split, pediatric (Kaggle) normals",
    "c": "(c) patient-level split, adult normals only (every source but Kaggle's children)",
    "d": "(d) leave one source out (all normals)",
}


def leaked_patients(view) -> dict:
    """Patients with images in train (or val) and in test: what an image-level split lets through."""
    test = set(view["test"].manifest["patient_id"])
    seen = set(view["train"].manifest["patient_id"]) | set(view["val"].manifest["patient_id"])
    shared = test & seen
    images = int(view["test"].manifest["patient_id"].isin(shared).sum())
    return {"test_patients_also_in_training": len(shared), "test_patients": len(test),
            "test_images_of_those_patients": images, "test_images": len(view["test"])}


# --------------------------------------------------------------------------------------------
# Pipelines


def pipelines(mode: dict, weights_dir: Path | None) -> dict[str, tuple]:
    from xraylib import models
    from xraylib.train import AugmentSettings, TrainSettings

    size = mode["image_size"]
    seeds = TrainSettings(epochs=mode["epochs"], batch_size=8, learning_rate=1e-3, augment=None, seed=0)
    out = {"seeds-vgg16": (models.ModelSpec(backbone="vgg16", weights=None, image_size=size, classes=CLASSES), seeds,
                           "VGG16, random initialisation (ImageNet weights cannot be downloaded here), frozen, "
                           "head GAP-Dense(64)-Dropout(0.5)-softmax, Adam 1e-3, batch 8, "
                           f"{mode['epochs']} epochs, class weights, no augmentation")}
    if weights_dir is not None:
        mobilenet = models.ModelSpec(backbone="mobilenet", alpha=0.25, image_size=size, classes=CLASSES,
                                     weights=str(weights_dir / "mobilenet_2_5_224_tf_no_top.h5"))
        out["seeds-mobilenet"] = (mobilenet, seeds, "MobileNet(alpha=0.25), ImageNet weights, otherwise as seeds-vgg16")
        recommended = dataclasses.replace(seeds, augment=AugmentSettings(), augment_views=mode["views"],
                                          fine_tune_epochs=mode["fine_tune_epochs"])
        out["xraylib"] = (mobilenet, recommended,
                          f"MobileNet(alpha=0.25), ImageNet weights; stage 1 on {mode['views']} cached views per image "
                          "(the plain image + augmented copies: rotation, shift, zoom, flip, brightness, contrast); "
                          f"stage 2 fine-tunes the top block for {mode['fine_tune_epochs']} epochs at 1e-5 on "
                          "augmented streamed images")
    return out


def train_run(view, spec, settings, run_dir: Path):
    from xraylib.runs import train

    started = time.perf_counter()
    result = train(view, spec, settings, run_dir, resume=True, verbose=0)
    return result, time.perf_counter() - started


def predictions(result, view, spec, split: str = "test") -> pd.DataFrame:
    """Test predictions: from the cached features where the backbone stayed frozen (the same numbers as the full
    model within float32 rounding; the backbone runs only for images no protocol has seen), else the full model."""
    from xraylib import features, models

    if features.can_cache(result.model):
        return features.predict_split(result.model, view, spec, split)
    return models.predict_split(result.model, view[split])


def metric_row(ev) -> dict:
    row = {"n_images": ev.n_images, "n_patients": ev.n_patients,
           "n_positive": int(ev.metrics["n_positive"]), "n_negative": int(ev.metrics["n_negative"]),
           "threshold": float(ev.threshold)}
    for metric in METRICS:
        row[metric] = ev.metrics[metric]
        row[f"{metric}_ci"] = list(ev.ci[metric])
    return row


# --------------------------------------------------------------------------------------------
# The benchmark


def run(data_root: Path, weights_dir: Path | None, work: Path, mode: dict, seed: int) -> dict:
    from xraylib import audit, evaluate, shortcuts
    from xraylib.shortcuts import data_view

    timings: dict[str, float] = {}
    started = time.perf_counter()
    log("manifest and preprocessed cache (decoded once, split by patient)")
    frame, data = build_data(data_root, work, mode, seed)
    timings["manifest_and_preprocessing"] = time.perf_counter() - started
    counts = {f"{s}/{l}": {"images": int(len(g)), "patients": int(g["patient_id"].nunique())}
              for (s, l), g in data.manifest.groupby(["source", "label"])}
    rows = protocol_rows(data, seed)
    views = {key: data_view(data, r, description=f"quality benchmark protocol {key}") for key, r in rows.items() if key != "d"}
    out: dict = {"data": {"manifest_rows": len(frame), "cached_images": int(len(data.manifest)), "by_source_and_label": counts,
                          "skipped_files": data.report.get("problems", [])},
                 "protocols": {}, "loso": {}, "shortcuts": {}, "audit": {}, "pipelines": {}}
    for key in ("a", "b", "c", "d"):
        manifest = rows[key]
        out["audit"][key] = [f.to_dict() for f in audit.confound_warnings(manifest, classes=CLASSES)]
    runs = work / "runs"
    for name, (spec, settings, description) in pipelines(mode, weights_dir).items():
        out["pipelines"][name] = {"description": description, "spec": spec.to_dict(), "settings": settings.to_dict()}
        for key, view in views.items():
            if name == "xraylib" and key == "a":
                continue  # the recommended pipeline is not run under the protocol it replaces
            log(f"{name}: protocol {key}: training")
            result, seconds = train_run(view, spec, settings, runs / name / key)
            timings[f"{name}/{key}"] = seconds
            threshold = evaluate.Threshold(result.threshold, f"chosen on the protocol's validation images "
                                                             f"({settings.threshold_rule}, sensitivity >= {settings.min_sensitivity})")
            ev = evaluate.evaluate(predictions(result, view, spec), CLASSES, threshold, n_boot=mode["n_boot"], seed=seed)
            record = {"protocol": PROTOCOLS[key], "pipeline": name, **metric_row(ev),
                      "by_source": ev.by_source.reset_index().to_dict(orient="records"),
                      "splits": {s: len(view[s]) for s in ("train", "val", "test")}, "run_dir": str(result.paths.root)}
            if key == "a":
                record["leaks"] = leaked_patients(view)
            out["protocols"].setdefault(key, {})[name] = record
            if key in ("a", "b", "c"):
                log(f"{name}: protocol {key}: lungs hidden")
                t0 = time.perf_counter()
                hidden = shortcuts.lungs_hidden(view, result.paths.root, "test", n_boot=mode["n_boot"], seed=seed)
                out["shortcuts"].setdefault("lungs_hidden", {}).setdefault(key, {})[name] = hidden.to_dict()
                timings[f"{name}/{key}/lungs_hidden"] = time.perf_counter() - t0
            if key in ("b", "c") and name != "seeds-vgg16":
                log(f"{name}: protocol {key}: Grad-CAM heat share")
                t0 = time.perf_counter()
                heat = shortcuts.saliency_heat_share(view, result.paths.root, "test",
                                                     max_images_per_class=mode["saliency_images"])
                out["shortcuts"].setdefault("saliency", {}).setdefault(key, {})[name] = heat.to_dict()
                timings[f"{name}/{key}/saliency"] = time.perf_counter() - t0
        log(f"{name}: (d) leave one source out")
        t0 = time.perf_counter()
        loso = shortcuts.leave_one_source_out(data, spec, settings, runs / name / "loso", n_boot=mode["n_boot"], seed=seed)
        out["loso"][name] = loso.to_dict()
        timings[f"{name}/loso"] = time.perf_counter() - t0
        log(f"{name}: source prediction")
        t0 = time.perf_counter()
        source = shortcuts.source_prediction(data, spec, settings, runs / name / "source", n_boot=mode["n_boot"], seed=seed)
        out["shortcuts"].setdefault("source_prediction", {})[name] = {
            k: v for k, v in source.to_dict().items() if k != "predictions"}
        timings[f"{name}/source_prediction"] = time.perf_counter() - t0
    log("out of site: every normal source, sites held out")
    t0 = time.perf_counter()
    out["out_of_site"] = out_of_site(frame, data, weights_dir, work, mode, seed)
    timings["out_of_site"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started
    out["seconds"] = timings
    return out


# --------------------------------------------------------------------------------------------
# Out of site: what to expect in a hospital the pipeline never saw (xraylib.outofsite)


def out_of_site_configs(mode: dict, weights_dir: Path) -> list[tuple[str, object, object, dict]]:
    """``(name, spec, settings, preprocessing options)``: the seeds' pipeline, the recommended recipe, the recipe with
    an ensemble of ``mode["heads"]`` heads, and the recipe with each preprocessing option."""
    from xraylib import models, train
    from xraylib.batches import AugmentSettings

    spec = models.ModelSpec(**{**train.RECIPES["recommended"]["spec"], "image_size": mode["image_size"],
                               "classes": CLASSES, "weights": str(weights_dir / "mobilenet_2_5_224_tf_no_top.h5")})
    seeds = train.TrainSettings(epochs=mode["epochs"], augment=None, seed=0)
    recommended = train.TrainSettings(**{**train.RECIPES["recommended"]["settings"], "epochs": mode["epochs"],
                                         "augment_views": mode["views"], "augment": AugmentSettings()})
    configs = [("seeds-mobilenet", dataclasses.replace(spec, heads=1), seeds, {}), ("recommended", spec, recommended, {})]
    if mode["ensemble"]:  # (the smoke run leaves it out: tests/test_train.py and test_outofsite.py test the heads)
        configs.append((f"recommended + ensemble of {mode['heads']}", dataclasses.replace(spec, heads=mode["heads"]),
                        recommended, {}))
    configs += [(f"recommended + {name}", spec, recommended, PREPROCESSING_OPTIONS[name]) for name in mode["preprocessing"]]
    return configs


def internal_score(data, spec, settings, threshold: float | None, run_dir: Path, n_boot: int, seed: int) -> dict:
    """The pipeline trained on the whole training split, scored on the internal test split at ``threshold`` (None:
    the one chosen on the validation split)."""
    from xraylib import evaluate
    from xraylib.runs import train

    result = train(data, spec, dataclasses.replace(settings, threshold_on="validation"), run_dir, resume=True, verbose=0)
    threshold = result.threshold if threshold is None else threshold
    ev = evaluate.evaluate(predictions(result, data, spec), CLASSES, evaluate.Threshold(threshold, "the model's own"),
                           n_boot=n_boot, seed=seed)
    return {**metric_row(ev), "validation_threshold": result.threshold}


def full_recipe_on_one_fold(data, spec, settings, fine_tune_epochs: int, estimate, run_dir: Path) -> dict:
    """How far the full recipe (with fine-tuning) is from the head on cached features: both trained without fold 1's
    sites and scored by AUC on them."""
    from xraylib import evaluate, models, outofsite
    from xraylib.runs import train
    from xraylib.views import data_view

    fold = estimate.folds.iloc[0]
    held = set(estimate.predictions.loc[estimate.predictions["fold"] == fold["fold"], "patient_id"])
    rows = data.manifest[data.manifest["split"].isin(["train", "val"])].copy()
    rows["new_split"] = np.where(rows["patient_id"].isin(held), "test", rows["split"])
    view = data_view(data, rows, description="quality benchmark: out-of-site fold 1")
    tuned = dataclasses.replace(settings, fine_tune_epochs=fine_tune_epochs, threshold_on="validation")
    result = train(view, spec, tuned, run_dir, resume=True, verbose=0)
    y, score, _ = evaluate.binary_targets(models.predict_split(result.model, view["test"]), CLASSES)
    full_auc = float(evaluate.binary_metrics(y, score)["roc_auc"])
    return {"fold": int(fold["fold"]), "held_out": fold["held_out"], "head_on_features_auc": float(fold["roc_auc"]),
            "full_recipe_auc": full_auc, "difference": full_auc - float(fold["roc_auc"]),
            "fine_tune_epochs": fine_tune_epochs, "sites": list(outofsite.site_of(view["test"].manifest).unique())}


def _spread(values: list[float]) -> dict:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    if not finite:
        return {"median": None, "low": None, "high": None, "range": None, "values": values}
    return {"median": float(np.median(finite)), "low": float(min(finite)), "high": float(max(finite)),
            "range": float(max(finite) - min(finite)), "values": values}


def out_of_site(frame, data, weights_dir: Path | None, work: Path, mode: dict, seed: int) -> dict:
    """Every configuration of :func:`out_of_site_configs` over ``mode["seeds"]`` training seeds: the out-of-site
    estimate (every normal source, COVID-19 against normal, sites held out), the internal test score at the model's
    own threshold, the 5-seed median and range; the full recipe against the head on one fold; the decisions."""
    from xraylib import models, outofsite, preprocess

    if weights_dir is None:
        return {"skipped": "../shared/weights not found: the recommended recipe needs the MobileNet weights"}
    out: dict = {"configs": {}, "seconds": {}}
    caches = {"": data}
    for name, spec, settings, options in out_of_site_configs(mode, weights_dir):
        t0 = time.perf_counter()
        key = ",".join(f"{k}={v}" for k, v in options.items())
        if key not in caches:
            log(f"out of site: preprocessing with {key}")
            caches[key] = preprocess.split_and_preprocess(
                frame, work / f"preprocessed-{key.replace('=', '-')}", CLASSES,
                preprocess.PreprocessSettings(image_size=mode["image_size"], **options), fractions=(0.7, 0.15, 0.15),
                seed=seed, progress=False)
        view = caches[key]
        model = models.build_model(spec)
        feats = outofsite.fold_features(model, view, spec, settings.augment_views if settings.augment else 1,
                                        settings.augment)
        seeds = []
        for training_seed in range(mode["seeds"]):
            log(f"out of site: {name}, seed {training_seed}")
            estimate = outofsite.estimate(
                view, spec, model, feats=feats, epochs=settings.epochs, batch_size=settings.batch_size,
                learning_rate=settings.learning_rate, augment_views=settings.augment_views, augment=settings.augment,
                min_sensitivity=settings.min_sensitivity, model_rule=settings.threshold_on, heads=spec.heads,
                seed=training_seed, n_boot=mode["n_boot"])
            record = {"seed": training_seed, **estimate.to_dict()}
            own = estimate.thresholds["out_of_site"]["value"] if settings.threshold_on == "out_of_site" else None
            run_dir = work / "out_of_site" / name.replace(" ", "_").replace(",", "") / f"seed{training_seed}"
            run_settings = dataclasses.replace(settings, seed=training_seed)
            record["internal"] = internal_score(view, spec, run_settings, own, run_dir, mode["n_boot"], seed)
            seeds.append(record)
            if name == "recommended" and training_seed == 0:
                log("out of site: the full recipe (fine-tuned) against the head, on fold 1")
                out["full_recipe_vs_head"] = full_recipe_on_one_fold(
                    view, spec, settings, mode["fine_tune_epochs"], estimate, work / "out_of_site" / "full_recipe_fold1")
        summary = {metric: _spread([s["metrics"].get(metric) for s in seeds]) for metric in (
            "roc_auc", "sensitivity", "specificity", "sensitivity_validation", "specificity_validation",
            "sensitivity_out_of_site", "specificity_out_of_site")}
        summary["threshold"] = _spread([s["thresholds"]["out_of_site"]["value"] for s in seeds])
        summary["internal_auc"] = _spread([s["internal"]["roc_auc"] for s in seeds])
        summary["internal_sensitivity"] = _spread([s["internal"]["sensitivity"] for s in seeds])
        summary["internal_specificity"] = _spread([s["internal"]["specificity"] for s in seeds])
        out["configs"][name] = {"options": options, "heads": spec.heads, "threshold_on": settings.threshold_on,
                                "seeds": seeds, "summary": summary}
        out["seconds"][name] = time.perf_counter() - t0
    out["decisions"] = out_of_site_decisions(out["configs"], mode["heads"])
    return out


def out_of_site_decisions(configs: dict, heads: int) -> dict:
    """The issue's rules: the ensemble becomes the default if it narrows the range of out-of-site specificity at the
    model's own threshold by a third without lowering the median AUC; a preprocessing option if it raises the median
    out-of-site AUC by 0.01 without lowering the median sensitivity at the model's own threshold."""
    base = configs["recommended"]["summary"]
    decisions = {}
    ensemble = configs.get(f"recommended + ensemble of {heads}", {}).get("summary")
    if ensemble and base["specificity"]["range"] is not None and ensemble["specificity"]["range"] is not None:
        narrower = ensemble["specificity"]["range"] <= base["specificity"]["range"] * (2 / 3)
        keeps_auc = ensemble["roc_auc"]["median"] >= base["roc_auc"]["median"]
        decisions["ensemble"] = {"kept": bool(narrower and keeps_auc),
                                 "specificity_range": [base["specificity"]["range"], ensemble["specificity"]["range"]],
                                 "median_auc": [base["roc_auc"]["median"], ensemble["roc_auc"]["median"]]}
    for name in PREPROCESSING_OPTIONS:
        option = configs.get(f"recommended + {name}", {}).get("summary")
        if option and base["roc_auc"]["median"] is not None:
            gain = option["roc_auc"]["median"] - base["roc_auc"]["median"]
            sensitivity = option["sensitivity"]["median"] >= base["sensitivity"]["median"]
            decisions[name] = {"kept": bool(gain >= 0.01 and sensitivity), "auc_gain": gain,
                               "median_sensitivity": [base["sensitivity"]["median"], option["sensitivity"]["median"]]}
    return decisions


def out_of_site_markdown(results: dict) -> list[str]:
    section = results.get("out_of_site")
    if not section:
        return []
    lines = ["", "## What to expect in a hospital the pipeline never saw (out-of-site estimate)", ""]
    if "skipped" in section:
        return lines + [section["skipped"]]
    seeds = next(iter(section["configs"].values()))["seeds"]
    lines += [f"COVID-19 against every normal source, split by patient; {len(seeds[0]['folds'])} folds, each holding out "
              f"sites with COVID-19 images together with sites without; the head trained on cached features per fold. "
              f"Median and range over {len(seeds)} training seeds; sensitivity and specificity at the model's own threshold, scored nested (never on the sites "
              "it was chosen on).", ""]
    header = ["pipeline", "threshold on", "internal test AUC", "out-of-site AUC", "sensitivity (own threshold)",
              "specificity (own threshold)", "specificity, validation rule", "specificity, out-of-site rule",
              "sensitivity, validation rule", "sensitivity, out-of-site rule"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cell(summary: dict, key: str) -> str:
        s = summary.get(key)
        if not s or s["median"] is None:
            return "n/a"
        return f"{fmt(s['median'])} ({fmt(s['low'])}–{fmt(s['high'])})"

    for name, config in section["configs"].items():
        s = config["summary"]
        lines.append(f"| {name} | {config['threshold_on'].replace('_', '-')} | {cell(s, 'internal_auc')} | "
                     f"{cell(s, 'roc_auc')} | {cell(s, 'sensitivity')} | {cell(s, 'specificity')} | "
                     f"{cell(s, 'specificity_validation')} | {cell(s, 'specificity_out_of_site')} | "
                     f"{cell(s, 'sensitivity_validation')} | {cell(s, 'sensitivity_out_of_site')} |")
    recommended = section["configs"].get("recommended")
    if recommended:
        seed0 = recommended["seeds"][0]
        lines += ["", "Seed 0 of the recommended recipe, its folds:", ""]
        lines += [f"- fold {f['fold']} ({f['held_out']}): AUC {fmt(f['roc_auc'])}, sensitivity "
                  f"{fmt(f['sensitivity_out_of_site'])}, specificity {fmt(f['specificity_out_of_site'])}"
                  for f in seed0["folds"]]
        m = seed0["metrics"]
        lines += ["", f"Pooled, seed 0: AUC {fmt(m['roc_auc'])} ({fmt(m['roc_auc_low'])}–{fmt(m['roc_auc_high'])}), "
                      f"sensitivity {fmt(m['sensitivity'])} ({fmt(m['sensitivity_low'])}–{fmt(m['sensitivity_high'])}), "
                      f"specificity {fmt(m['specificity'])} ({fmt(m['specificity_low'])}–{fmt(m['specificity_high'])}), "
                      f"over {m['n_positive_patients']} COVID-19 and {m['n_negative_patients']} normal held-out patients."]
    full = section.get("full_recipe_vs_head")
    if full:
        lines += ["", f"The full recipe (with {full['fine_tune_epochs']} fine-tuning epochs) against the head on cached "
                      f"features, on fold {full['fold']} ({full['held_out']}): AUC {fmt(full['full_recipe_auc'])} against "
                      f"{fmt(full['head_on_features_auc'])} ({full['difference']:+.2f})."]
    lines += ["", "Decisions:", ""]
    for name, decision in section.get("decisions", {}).items():
        lines.append(f"- **{name}**: {'kept as the default' if decision['kept'] else 'not kept'} ("
                     + ", ".join(f"{k} {v}" for k, v in decision.items() if k != "kept") + ")")
    lines += ["", "| configuration | seconds |", "|---|---|"] + [f"| {k} | {fmt(v, 0)} |" for k, v in section["seconds"].items()]
    return lines


# --------------------------------------------------------------------------------------------
# Markdown


def fmt(value, digits: int = 2) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{value:.{digits}f}"


def fmt_ci(row: dict, metric: str) -> str:
    value, ci = row.get(metric), row.get(f"{metric}_ci") or [None, None]
    if value is None:
        return "n/a"
    return f"{fmt(value)} ({fmt(ci[0])}–{fmt(ci[1])})"


def results_table(results: dict) -> list[str]:
    """One row per protocol and pipeline: accuracy, sensitivity, specificity, AUC with 95% CIs and n."""
    lines = ["| protocol | pipeline | n test: patients / images (COVID-19 / normal) | accuracy | sensitivity | specificity | AUC |",
             "|---|---|---|---|---|---|---|"]
    for key in ("a", "b", "c"):
        for name, row in results["protocols"].get(key, {}).items():
            lines.append(f"| {PROTOCOLS[key]} | {name} | {row['n_patients']} / {row['n_images']} "
                         f"({row['n_positive']} / {row['n_negative']}) | " +
                         " | ".join(fmt_ci(row, m) for m in METRICS) + " |")
    for name, loso in results["loso"].items():
        for row in loso["table"]:
            row = {**row, **{f"{m}_ci": [row.get(f"{m}_low"), row.get(f"{m}_high")] for m in METRICS}}
            lines.append(f"| (d) leave out {row['source']} | {name} | {row['n_patients']} / {row['n_images']} "
                         f"({row['n_positive']} / {row['n_negative']}) | " +
                         " | ".join(fmt_ci(row, m) for m in METRICS) + " |")
    return lines


def shortcut_table(results: dict) -> list[str]:
    lines = ["| test | protocol | pipeline | result (95% CI) | verdict |", "|---|---|---|---|---|"]
    for name, source in results["shortcuts"].get("source_prediction", {}).items():
        ci = source.get("ci") or [None, None]
        lines.append(f"| source prediction ({' / '.join(source.get('sources', []))}) | all images, patient split | {name} | "
                     f"macro AUC {fmt(source.get('macro_auc'))} ({fmt(ci[0])}–{fmt(ci[1])}), n {source.get('n_images')} | "
                     f"{source.get('verdict')} |")
    for key, by_pipeline in results["shortcuts"].get("lungs_hidden", {}).items():
        for name, hidden in by_pipeline.items():
            auc = {r["condition"]: fmt_ci({**r, "roc_auc_ci": [r.get("roc_auc_low"), r.get("roc_auc_high")]}, "roc_auc")
                   for r in hidden.get("table", [])}
            lines.append(f"| lungs hidden | {key} | {name} | AUC visible {auc.get('lungs visible')}, hidden "
                         f"{auc.get('lungs hidden')} | {hidden.get('verdict')} |")
    for key, by_pipeline in results["shortcuts"].get("saliency", {}).items():
        for name, heat in by_pipeline.items():
            text = "; ".join(f"{r['class']}: {fmt(r.get('heat_inside'))} on the lungs (area {fmt(r.get('lung_area_share'))})"
                             for r in heat.get("table", []))
            lines.append(f"| Grad-CAM heat share | {key} | {name} | {text} | {heat.get('verdict')} |")
    return lines


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = ["# xraylib quality benchmark", "",
             f"**{results['disclaimer']}**", "",
             f"Mode `{results['mode']}`, {results['started']} to {results['finished']}, "
             f"{fmt(results['seconds'].get('total', float('nan')) / 60, 1)} minutes. Machine: {m['cpu_model']}, "
             f"{m['cores_available']} cores, TensorFlow {m['tensorflow']}, GPU: {', '.join(m['gpus']) or 'none'}; load average "
             f"{m.get('load_average_start')} at the start, {m.get('load_average_end')} at the end.", "",
             "Data (../shared/data): " + "; ".join(f"{k} {v['images']} images / {v['patients']} patients"
                                                   for k, v in results["data"]["by_source_and_label"].items()) + ".", "",
             "Every metric at the threshold chosen on the protocol's validation images; 95% intervals from "
             f"{results['n_boot']} bootstrap resamples of patients; n counts the test set. ", "",
             "## Results", ""]
    lines += results_table(results)
    leaks = [row.get("leaks") for row in results["protocols"].get("a", {}).values() if row.get("leaks")]
    if leaks:
        leak = leaks[0]
        lines += ["", f"Under (a), {leak['test_patients_also_in_training']} of the {leak['test_patients']} test patients "
                      f"also have images in training ({leak['test_images_of_those_patients']} of {leak['test_images']} "
                      "test images)."]
    skipped = {source: reason for loso in results["loso"].values() for source, reason in (loso.get("skipped") or {}).items()}
    for source, reason in skipped.items():
        lines += ["", f"(d): {source} is not left out: {reason}. Every COVID-19 image comes from that one source, so "
                      "leaving a source out tests only how a model fares on normals from a hospital it never saw."]
    lines += ["", "## Shortcut tests", ""] + shortcut_table(results)
    lines += ["", "## The audit's warnings (xraylib.audit)", ""]
    for key, findings in results["audit"].items():
        checks = pd.Series([f["check"] for f in findings], dtype=object).value_counts(sort=False)
        lines.append(f"- **{PROTOCOLS[key]}**: " + (", ".join(f"`{c}`" + (f" x{n}" if n > 1 else "")
                                                              for c, n in checks.items()) or "none"))
    first = {f["check"]: f["message"] for f in reversed(results["audit"].get("a", []))}
    lines += ["", "What the audit says of (a), in its words (one message per check):", ""]
    lines += [f"- `{check}`: {message}" for check, message in reversed(list(first.items()))]
    lines += out_of_site_markdown(results)
    lines += ["", "## Pipelines", ""] + [f"- **{n}**: {p['description']}" for n, p in results["pipelines"].items()]
    lines += ["", "## Time (s)", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {fmt(v, 0)} |" for k, v in results["seconds"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny settings that check the script; numbers mean nothing")
    parser.add_argument("--work", default=str(REPO / "outputs" / "benchmarks" / "quality"),
                        help="scratch folder, kept so that a second run resumes (default outputs/benchmarks/quality)")
    parser.add_argument("--out", default=str(RESULTS), help=f"results folder (default {RESULTS})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="delete the scratch folder first (no resume)")
    parser.add_argument("--only-out-of-site", action="store_true",
                        help="run only the out-of-site section and merge it into the existing results file")
    args = parser.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from speed import load_average, machine_info, tf_info

    from xraylib import DISCLAIMER, config
    from xraylib.fileio import json_safe, write_json_atomic, write_text_atomic

    mode_name = "smoke" if args.smoke else "full"
    mode = MODES[mode_name]
    data_root, weights_dir = config.shared_data_dir(), config.shared_weights_dir()
    if data_root is None:
        print("../shared/data not found (set XRAYLIB_SHARED_DATA): the benchmark needs the real images", file=sys.stderr)
        return 2
    if weights_dir is None:
        log("../shared/weights not found: MobileNet rows are left out (set XRAYLIB_SHARED_WEIGHTS)")
    work = Path(args.work) / mode_name
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    results = {"format": "xraylib quality benchmark v1", "mode": mode_name, "disclaimer": DISCLAIMER,
               "started": datetime.datetime.now().isoformat(timespec="seconds"), "n_boot": mode["n_boot"],
               "machine": {**machine_info(), **tf_info(), "load_average_start": load_average()}}
    out = Path(args.out) if mode_name == "full" else work  # the smoke run's numbers mean nothing: kept out of results/
    name = "quality" if mode_name == "full" else f"quality_{mode_name}"
    if args.only_out_of_site:
        previous = json.loads((out / f"{name}.json").read_text())
        t0 = time.perf_counter()
        frame, data = build_data(data_root, work, mode, args.seed)
        previous["out_of_site"] = {"started": results["started"], **out_of_site(frame, data, weights_dir, work, mode, args.seed)}
        previous["seconds"]["out_of_site"] = time.perf_counter() - t0
        results = previous
    else:
        results.update(run(data_root, weights_dir, work, mode, args.seed))
    results["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    results["machine"]["load_average_end"] = load_average()
    clean = json_safe(results)
    write_json_atomic(out / f"{name}.json", clean)
    write_text_atomic(out / f"{name}.md", markdown(clean))
    log(f"wrote {out / (name + '.json')} and {out / (name + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
