"""The out-of-site estimate: folds that pair sites, nested thresholds, heads on cached features, and the run layer."""
from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from xraylib import evaluate, models, outofsite, phantoms, runs
from xraylib.fileio import sha1_file
from xraylib.outofsite import FoldFeatures, OutOfSiteError
from xraylib.preprocess import PreprocessSettings, split_and_preprocess
from xraylib.train import TrainSettings

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

CLASSES = ("normal", "covid")
SPEC = models.ModelSpec(backbone="vgg16", weights=None, image_size=32, classes=CLASSES, head_units=16)


def site_table(sites: dict[str, tuple[str, int]]) -> pd.DataFrame:
    """One row per patient: ``{site: (label, n_patients)}``."""
    rows = [{"site": site, "label": label, "patient_id": f"{site}:{i}", "source": "ieee8023"}
            for site, (label, n) in sites.items() for i in range(n)]
    return pd.DataFrame(rows)


# ---- sites and folds ---------------------------------------------------------------------------


def test_each_fold_holds_out_sites_with_positives_together_with_sites_without():
    table = site_table({"milan": ("covid", 30), "brescia": ("covid", 12), "wuhan": ("covid", 10), "rome": ("covid", 9),
                        "tiny": ("covid", 1), "kaggle": ("normal", 40), "nih": ("normal", 25), "shenzhen": ("normal", 20)})
    folds = outofsite.site_folds(table, CLASSES)
    assert len(folds) == 3  # three sites without positives: three folds
    assert sorted(s for f in folds for s in f.positive_sites) == ["brescia", "milan", "rome", "tiny", "wuhan"]
    assert sorted(s for f in folds for s in f.negative_sites) == ["kaggle", "nih", "shenzhen"]
    for fold in folds:
        assert fold.positive_sites and fold.negative_sites
    # Balanced by patients: the largest site alone, the rest shared out.
    patients = [sum(table["site"].isin(f.positive_sites)) for f in folds]
    assert patients == [30, 22, 10] or max(patients) - min(patients) <= 20
    assert "milan" in folds[0].describe()


def test_a_site_with_both_classes_counts_with_the_positives_and_too_few_sites_are_refused():
    mixed = pd.concat([site_table({"a": ("covid", 5), "b": ("covid", 5), "n1": ("normal", 5), "n2": ("normal", 5)}),
                       site_table({"a": ("normal", 3)}).assign(patient_id=lambda f: f["patient_id"] + "n")])
    folds = outofsite.site_folds(mixed, CLASSES)
    assert sorted(s for f in folds for s in f.positive_sites) == ["a", "b"]
    with pytest.raises(OutOfSiteError, match="two sites with covid images and two without.*have 1 \\(a\\)"):
        outofsite.site_folds(site_table({"a": ("covid", 5), "n1": ("normal", 5), "n2": ("normal", 4)}), CLASSES)


def test_a_country_named_alone_and_its_cities_are_held_out_together():
    table = site_table({"ieee8023:italy": ("covid", 10), "ieee8023:italy/brescia": ("covid", 8),
                        "ieee8023:spain/madrid": ("covid", 9), "ieee8023:doi:10.1/x": ("covid", 4),
                        "kaggle": ("normal", 20), "nih+rsna": ("normal", 20), "nlm-shenzhen": ("normal", 20)})
    folds = outofsite.site_folds(table, CLASSES)
    italy = [f.index for f in folds for s in f.positive_sites if s.startswith("ieee8023:italy")]
    assert len(italy) == 2 and len(set(italy)) == 1  # both Italian sites in one fold
    assert outofsite.fold_unit("ieee8023:italy/brescia") == "ieee8023:italy"
    assert outofsite.fold_unit("ieee8023:doi:10.1/x") == "ieee8023:doi:10.1/x"
    assert outofsite.fold_unit("nih+rsna") == "nih+rsna"


def test_a_fold_that_cannot_train_on_both_classes_is_left_out_and_said():
    feats = synthetic_features(disease=4.0, n_sites=3, per_site=6)
    # Sites 0 and 1 (COVID-19) only in validation: the fold that holds out site 2 trains on no COVID-19 image.
    rows = feats.rows.copy()
    rows.loc[rows["site"].isin(["site0", "site1"]), "split"] = "val"
    train = (rows["split"] == "train").to_numpy()
    changed = FoldFeatures(rows, feats.plain, [feats.plain[train]], feats.labels, CLASSES)
    result = run_estimate(changed, epochs=3)
    left_out = [note for note in result.notes if "left out" in note]
    assert len(left_out) == 1 and "site2" in left_out[0] and "one class of images" in left_out[0]
    assert len(result.folds) == 2 and set(result.predictions["fold"]) == set(result.folds["fold"])
    assert "site2" not in set(result.predictions["site"])


def test_without_a_site_column_each_source_is_its_hospital_group():
    frame = pd.DataFrame({"source": ["ieee8023", "nih", "rsna", "kaggle", "mine"], "site": [None, "", None, "x", None]})
    assert outofsite.site_of(frame).tolist() == ["ieee8023", "nih+rsna", "nih+rsna", "x", "mine"]
    assert outofsite.site_of(frame.drop(columns="site")).tolist()[:3] == ["ieee8023", "nih+rsna", "nih+rsna"]


# ---- thresholds ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_the_highest_threshold_at_a_sensitivity_is_the_one_choose_threshold_finds(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 80)
    y[:2] = [0, 1]
    score = np.round(rng.random(80) * 0.5 + 0.4 * y, 2)  # rounded: ties
    for target in (0.8, 0.9, 0.95, 1.0):
        assert outofsite._highest_threshold(y, score, target) == evaluate.choose_threshold(y, score, min_sensitivity=target)


def test_the_transfer_threshold_does_not_hang_on_one_image():
    # Nearly separable, as validation splits are: the rule's threshold sits on one of a few scattered positives.
    rng = np.random.default_rng(0)
    positives = np.r_[rng.uniform(0.9, 1.0, 55), [0.2, 0.4, 0.6, 0.75, 0.85]]
    negatives = rng.uniform(0.0, 0.5, 60)
    y = np.r_[np.ones(60), np.zeros(60)].astype(int)
    ids = np.arange(120)
    score = np.r_[positives, negatives]
    # Drop the positive the plain rule's threshold sits on: the plain threshold moves to the next positive.
    plain = evaluate.choose_threshold(y, score, min_sensitivity=0.95)
    drop = np.flatnonzero(score == plain)[0]
    keep = np.arange(120) != drop
    plain_moved = abs(evaluate.choose_threshold(y[keep], score[keep], min_sensitivity=0.95) - plain)
    value, (low, high) = outofsite.transfer_threshold(y, score, ids, 0.95, seed=1)
    moved, _ = outofsite.transfer_threshold(y[keep], score[keep], ids[keep], 0.95, seed=1)
    assert abs(moved - value) < plain_moved
    assert low <= value <= high and high - low > 0
    # Sensitivity on the data it was chosen on stays near the target.
    assert 0.9 <= (positives >= value).mean() <= 1.0


# ---- the estimate on cached features ----------------------------------------------------------------


def synthetic_features(disease: float, n_sites: int = 8, per_site: int = 12, seed: int = 0) -> FoldFeatures:
    """Features of ``n_sites`` COVID-19-only sites and as many normal-only sites: a site signature (strong, one per
    site) and a disease signal of strength ``disease`` shared by every site. Without the disease signal, only the
    site tells the classes apart in training."""
    rng = np.random.default_rng(seed)
    rows, plain, labels = [], [], []
    for s in range(2 * n_sites):
        label = 1 if s < n_sites else 0
        signature = rng.normal(0, 2.0, 6)
        for i in range(per_site):
            x = np.r_[signature + rng.normal(0, 0.3, 6), disease * label + rng.normal(0, 1.0, 2)]
            rows.append({"site": f"site{s}", "label": CLASSES[label], "patient_id": f"site{s}:{i}", "source": "x",
                         "split": "train" if i < per_site * 2 // 3 else "val"})
            plain.append(x)
            labels.append(label)
    frame = pd.DataFrame(rows)
    plain_array = np.asarray(plain, dtype=np.float32)
    train = (frame["split"] == "train").to_numpy()
    return FoldFeatures(frame, plain_array, [plain_array[train]], np.asarray(labels), CLASSES)


def run_estimate(feats: FoldFeatures, **kwargs) -> outofsite.OutOfSiteResult:
    return outofsite.estimate(None, SPEC, None, feats=feats, epochs=kwargs.pop("epochs", 15), batch_size=8,
                              learning_rate=3e-3, n_boot=200, seed=0, **kwargs)


@pytest.fixture(scope="module")
def shortcut_only():
    return run_estimate(synthetic_features(disease=0.0))


@pytest.fixture(scope="module")
def disease_too():
    return run_estimate(synthetic_features(disease=4.0), model_rule="out_of_site")


def test_a_model_that_learned_the_site_scores_chance_out_of_site_and_one_that_learned_the_disease_does_not(
        shortcut_only, disease_too):
    # The validation images of the same sites are told apart by site alone: internally both look perfect.
    assert shortcut_only.metrics["roc_auc"] < 0.75
    assert disease_too.metrics["roc_auc"] > 0.95
    for result in (shortcut_only, disease_too):
        assert len(result.folds) == 5 and result.metrics["n_images"] == 16 * 12
        assert result.metrics["roc_auc_low"] <= result.metrics["roc_auc"] <= result.metrics["roc_auc_high"]
        assert result.metrics["roc_auc_fold_min"] <= result.metrics["roc_auc"] + 0.2
    # The disease model keeps its sensitivity target on unseen sites with the threshold chosen out of site.
    assert disease_too.metrics["sensitivity"] == disease_too.metrics["sensitivity_out_of_site"] >= 0.85
    assert disease_too.model_rule == "out_of_site"
    spread = disease_too.thresholds["out_of_site"]["spread"]
    assert spread[0] <= disease_too.thresholds["out_of_site"]["value"] <= spread[1]


def test_thresholds_are_scored_only_on_sites_they_were_not_chosen_on(disease_too):
    predictions = disease_too.predictions
    y = (predictions["label"] == "covid").to_numpy()
    score = predictions["prob_covid"].to_numpy()
    for fold in disease_too.folds.to_dict("records"):
        others = (predictions["fold"] != fold["fold"]).to_numpy()
        expected, _ = outofsite.transfer_threshold(y[others], score[others], predictions["patient_id"].to_numpy()[others],
                                                   0.95, seed=0)
        assert fold["threshold_out_of_site"] == pytest.approx(expected)
        mine = ~others
        assert set(predictions.loc[mine, "site"]) == set(s for part in fold["held_out"].split(" | ")
                                                          for s in part.split(", ") if not s.endswith("more"))


def test_the_estimate_reads_and_compares_in_plain_words(shortcut_only, disease_too):
    saved = json.loads(json.dumps(shortcut_only.to_dict()))  # plain JSON, NaN as null
    finding = outofsite.compare_with_internal(0.99, saved)
    assert finding.level == "caution" and "higher than the out-of-site estimate" in finding.message
    assert "expect the out-of-site estimate" in finding.message
    agree = outofsite.compare_with_internal(disease_too.metrics["roc_auc"] + 0.01, disease_too.to_dict())
    assert agree.level == "ok"
    lower = outofsite.compare_with_internal(0.6, disease_too.to_dict())
    assert lower.level == "caution" and "lower than the out-of-site estimate" in lower.message
    assert "estimate (AUC 0.9" in lower.message and "(AUC  " not in lower.message
    text = "\n".join(outofsite.markdown_lines(saved, internal_auc=0.99))
    assert "5 folds" in text and "the model's own" in text and "| fold |" in text


def test_an_ensemble_of_heads_averages_heads_trained_from_different_starts():
    feats = synthetic_features(disease=1.0, n_sites=4, per_site=8)
    views = feats.train_views
    train = (feats.rows["split"] == "train").to_numpy()
    one = outofsite.fit_heads(views, feats.labels[train], 2, SPEC, 3, 8, 1e-3, heads=1, seed=3)
    three = outofsite.fit_heads(views, feats.labels[train], 2, SPEC, 3, 8, 1e-3, heads=3, seed=3)
    raw = np.asarray(three.predict(feats.plain, verbose=0)).reshape(len(feats.plain), 3, 2)
    assert not np.allclose(raw[:, 0], raw[:, 1], atol=1e-3)  # the heads differ
    np.testing.assert_allclose(outofsite.predict_heads(three, feats.plain, 2), raw.mean(axis=1), atol=1e-6)
    assert outofsite.predict_heads(one, feats.plain, 2).shape == (len(feats.plain), 2)


# ---- through the run layer ----------------------------------------------------------------------------


def write_sites(folder: Path) -> pd.DataFrame:
    """PNG phantoms of four sites (two COVID-19 only, two normal only), five patients each, one image per patient."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for s, (site, label) in enumerate([("milan", "covid"), ("wuhan", "covid"), ("kaggle", "normal"), ("nih", "normal")]):
        for i in range(5):
            image = phantoms.make_phantom(label, np.random.default_rng(10 * s + i), 64, 64, marker=label == "covid").image
            path = folder / f"{site}-{i}.png"
            assert cv2.imwrite(str(path), image)
            rows.append({"path": str(path), "label": label, "source": "x", "site": site, "patient_id": f"{site}:{i}",
                         "view": "PA", "sex": "F", "age": 40.0, "sha1": sha1_file(path)})
    return pd.DataFrame(rows)


def test_training_with_the_threshold_on_out_of_site_predictions_and_evaluating(tmp_path):
    data = split_and_preprocess(write_sites(tmp_path / "images"), tmp_path / "cache", CLASSES,
                                PreprocessSettings(image_size=32), fractions=(0.6, 0.2, 0.2), seed=0, workers=1,
                                progress=False)
    settings = TrainSettings(epochs=2, batch_size=4, augment=None, threshold_on="out_of_site")
    run_dir = tmp_path / "models" / "run"
    result = runs.train(data, SPEC, settings, run_dir=run_dir, verbose=0)
    meta = json.loads((run_dir / "model.json").read_text())
    threshold = meta["threshold"]
    assert threshold["chosen_on"].startswith("pooled out-of-site predictions") and "note" not in threshold
    assert threshold["value"] == pytest.approx(result.threshold) and len(threshold["spread"]) == 2
    assert 0 <= threshold["validation_value"] <= 1
    assert meta["out_of_site"]["thresholds"]["out_of_site"]["value"] == pytest.approx(threshold["value"])
    assert len(meta["out_of_site"]["folds"]) == 2
    card = (run_dir / "MODEL_CARD.md").read_text()
    assert "## What to expect in a hospital the model never saw" in card and "bootstrap spread" in card

    evaluated = runs.evaluate(run_dir, data, out_dir=tmp_path / "reports", n_boot=50)
    assert evaluated.out_of_site["metrics"] == meta["out_of_site"]["metrics"]  # the saved one, not a new one
    text = (tmp_path / "reports" / "out_of_site.md").read_text()
    assert "internal test AUC" in text and "| fold |" in text
    assert any(f.check == "out_of_site" for f in evaluated.evaluation.findings)

    # A model trained whole has no estimate: the threshold falls back to the validation split and says why.
    small = models.ModelSpec(backbone="small_cnn", weights=None, image_size=32, classes=CLASSES)
    runs.train(data, small, settings, run_dir=tmp_path / "models" / "small", verbose=0)
    small_meta = json.loads((tmp_path / "models" / "small" / "model.json").read_text())
    assert small_meta["threshold"]["chosen_on"] == "validation split"
    assert "backbone is trained" in small_meta["threshold"]["note"] and "out_of_site" not in small_meta
    evaluated = runs.evaluate(tmp_path / "models" / "small", data, out_dir=tmp_path / "small_reports", n_boot=50)
    assert "backbone is trained" in evaluated.out_of_site["unavailable"]


def test_a_recipe_is_one_name_for_the_model_and_the_settings(tmp_path):
    from xraylib import train

    class Data:
        classes = CLASSES
        settings = PreprocessSettings(image_size=64)

    spec, settings = train.from_recipe("recommended", Data(), spec={"weights": None}, seed=3)
    assert (spec.backbone, spec.alpha, spec.weights, spec.image_size) == ("mobilenet", 0.25, None, 64)
    assert (settings.augment_views, settings.threshold_on, settings.fine_tune_epochs, settings.seed) == (4, "out_of_site", 0, 3)
    assert train.from_recipe("seeds", Data())[0].backbone == "vgg16"
    with pytest.raises(Exception, match="unknown recipe 'best'"):
        train.from_recipe("best", Data())
    with pytest.raises(Exception, match="threshold_on must be one of"):
        TrainSettings(threshold_on="test")
    assert not math.isnan(settings.min_sensitivity)
