"""The model card next to a saved model, and the 3-class task (COVID-19 / other pneumonia / normal)
end to end: train, evaluate with per-class sensitivity and PPV, and a card that reports them.

A tiny model: the small CNN at 48 px, 3 epochs, on 30 sample patients per source.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from xraylib import audit, config, manifest, models, runs, synthetic
from xraylib.modelcard import KNOWN_FAILURE_MODES, MODEL_CARD_NAME, model_card_markdown
from xraylib.runs import train, write_card
from xraylib.preprocess import PreprocessSettings, split_and_preprocess
from xraylib.train import TrainSettings

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning",
                                        "ignore:Invalid value for VR AS")

THREE = manifest.TASKS["covid_pneumonia_normal"]
SIZE = 48


@pytest.fixture(scope="module")
def three_class(tmp_path_factory):
    """Output folder laid out as the pipeline writes it: sample_data/, preprocessed/, models/run/."""
    root = tmp_path_factory.mktemp("three_class")
    synthetic.write_sample_data(root / "sample_data", n_patients=30, seed=1, image_size=64)
    built = manifest.build_manifest(config.sample_drive_paths(root), task="covid_pneumonia_normal", progress=False, workers=1)
    data = split_and_preprocess(built.frame, root / "preprocessed", THREE, PreprocessSettings(image_size=SIZE),
                                fractions=(0.6, 0.2, 0.2), seed=0, workers=1, progress=False)
    spec = models.ModelSpec(backbone="small_cnn", weights=None, image_size=SIZE, classes=THREE)
    train(data, spec, TrainSettings(epochs=3, batch_size=16, seed=0), run_dir=root / "models" / "run", verbose=0)
    return root, data


def test_three_classes_train_and_evaluate_with_per_class_sensitivity_and_ppv(three_class):
    root, data = three_class
    assert data.classes == ("normal", "pneumonia", "covid")
    assert set(data["test"].manifest["label"]) == set(THREE)
    result = runs.evaluate(root / "models" / "run", data, out_dir=root / "reports" / "run", n_boot=100,
                                     save_plots=False)
    ev = result.evaluation
    assert ev.positive_class == "covid" and ev.confusion.index.tolist() == ["not covid", "covid"]
    per_class, confusion = ev.per_class, ev.confusion_multiclass
    assert list(per_class.index) == list(THREE) and list(confusion.index) == list(THREE)
    counts = confusion.to_numpy()
    for k, name in enumerate(THREE):
        assert per_class.loc[name, "support"] == counts[k].sum() == (data["test"].manifest["label"] == name).sum()
        assert per_class.loc[name, "sensitivity"] == pytest.approx(counts[k, k] / counts[k].sum())
        if counts[:, k].sum():
            assert per_class.loc[name, "ppv"] == pytest.approx(counts[k, k] / counts[:, k].sum())
        else:
            assert np.isnan(per_class.loc[name, "ppv"])  # never predicted: PPV undefined, not 0
    report = json.loads((root / "reports" / "run" / "evaluation.json").read_text())
    assert [row["class"] for row in report["per_class"]] == list(THREE)
    assert {"sensitivity", "ppv"} <= set(report["per_class"][0])
    text = (root / "reports" / "run" / "evaluation.md").read_text()
    assert "| class | support | predicted | sensitivity | PPV | F1 |" in text


def test_a_card_before_evaluation_says_what_the_model_is_for_and_what_it_was_trained_on(three_class, tmp_path):
    root, data = three_class
    # A copy of the run outside the output folder: nothing to discover there but the model and its JSON.
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    metadata = json.loads((root / "models" / "run" / "model.json").read_text())
    metadata.pop("metrics", None)
    (model_dir / "model.json").write_text(json.dumps(metadata))
    path = write_card(model_dir, data=data)
    assert path == model_dir / MODEL_CARD_NAME and path.is_file()
    card = path.read_text()
    assert card.index("**NOT FOR DIAGNOSIS.**") < card.index("## Intended use")
    assert "research and teaching" in card and "Not a medical device" in card
    assert "**Not evaluated yet** — run notebook 04" in card
    assert "The data audit was not run" in card and "Shortcut tests" in card
    # Counts per source and class, with patients, from the data trained on.
    manifest_rows = data.manifest
    for (source, label), group in manifest_rows.groupby(["source", "label"]):
        n_train = int(((group["split"] == "train")).sum())
        train_patients = group.loc[group["split"] == "train", "patient_id"].nunique()
        assert f"| {source} | {label} | {n_train} ({train_patients}) |" in card
    assert "kaggle: Kaggle chest-xray-pneumonia (Kermany 2018): children aged 1 to 5" in card
    assert f"resized to {SIZE}x{SIZE} by stretch" in card and "small_cnn" in card
    for name in KNOWN_FAILURE_MODES:
        assert f"**{name[0].upper() + name[1:]}**" in card
    assert "**Children against adults** **(applies here)**" in card  # Kaggle's children are in the training data
    assert "**Shortcut learning** **(applies here)**" in card  # covid comes from ieee8023 only


def test_the_card_in_the_output_folder_gathers_evaluation_audit_and_warnings(three_class):
    root, data = three_class
    model_dir = root / "models" / "run"
    result = runs.evaluate(model_dir, data, out_dir=root / "reports" / "run", n_boot=100, save_plots=False)
    report = audit.audit(None, data, classes=THREE)
    audit.write_audit(report, root / "reports")
    # As training calls it: the metadata it saved, nothing else; the rest is found where the stages wrote it.
    path = write_card(model_dir, json.loads((model_dir / "model.json").read_text()))
    card = path.read_text()
    ev = result.evaluation
    assert "From reports/run/evaluation.json" in card
    assert f"{ev.n_patients} patients, {ev.n_images} images" in card
    auc, (low, high) = ev.metrics["roc_auc"], ev.ci["roc_auc"]
    n_text = f"{ev.metrics['n_positive']} pos / {ev.metrics['n_negative']} neg images"
    assert f"| AUC | {auc:.3f} ({low:.3f}–{high:.3f}) | {n_text} |" in card
    tp, fn = ev.metrics["tp"], ev.metrics["fn"]
    assert "| Sensitivity | " in card and f"| {tp}/{tp + fn} |" in card
    assert "Per class (argmax prediction):" in card and "| class | support | sensitivity | PPV |" in card
    covid = ev.per_class.loc["covid"]
    assert f"| covid | {int(covid.support)} | {covid.sensitivity:.3f} |" in card
    assert "From reports/audit.json:" in card
    for warning in report.warnings:
        assert warning in card
    # Passed explicitly, an evaluation wins over what is on disk, and the file is replaced atomically.
    card_again = model_card_markdown(model_dir, evaluation=result)
    assert "From the evaluation passed in" in card_again
    assert not list(model_dir.glob(f".{MODEL_CARD_NAME}.*"))


def test_a_card_from_the_metrics_recorded_in_the_json_only(tmp_path):
    metadata = {"classes": ["normal", "covid"], "model": {"backbone": "vgg16", "weights": "imagenet"},
                "threshold": {"value": 0.42, "positive_class": "covid", "rule": "youden", "chosen_on": "validation split"},
                "metrics": {"test": {"roc_auc": {"value": 0.91, "ci_low": 0.85, "ci_high": 0.96}},
                            "test_n_images": 40, "test_n_patients": 30}}
    card = write_card(tmp_path, metadata).read_text()
    assert "the test metrics recorded in model.json" in card and "30 patients, 40 images" in card
    assert "| AUC | 0.910 (0.850–0.960) |" in card
    assert "**Small test sets** **(applies here)**" in card
    assert "Counts per source and class: not available" in card


def test_the_card_names_preprocessing_options_beyond_the_defaults(tmp_path):
    base = {"classes": ["normal", "covid"], "model": {"backbone": "small_cnn", "weights": None}}
    defaults = PreprocessSettings(image_size=64).to_dict()
    card = write_card(tmp_path / "a", {**base, "preprocessing": defaults}).read_text()
    assert "Options beyond the defaults" not in card
    options = PreprocessSettings(image_size=64, intensity="clahe", crop="body").to_dict()
    card = write_card(tmp_path / "b", {**base, "preprocessing": options}).read_text()
    assert "Options beyond the defaults: crop=body (" in card and "; intensity=clahe (CLAHE" in card
