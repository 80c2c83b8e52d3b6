"""Tests for xraylib.evaluate (metrics, threshold, patient bootstrap, report) and its figures in xraylib.plots."""
from __future__ import annotations

import io
import json
import math
import pickle
import warnings
from fractions import Fraction

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from xraylib import evaluate as ev  # noqa: E402
from xraylib import plots  # noqa: E402
from xraylib.errors import ConfigError, XraylibError  # noqa: E402

BINARY = ("normal", "covid")
THREE = ("normal", "pneumonia", "covid")


def make_predictions(
    n_patients: int,
    classes: tuple[str, ...] = BINARY,
    seed: int = 0,
    max_images: int = 3,
    separation: float = 1.5,
    sources: dict[str, str] | None = None,
) -> pd.DataFrame:
    """A prediction table in the contract's shape: patients cycle through the classes, each with
    1..max_images images, softmax probabilities that favour the true class by ``separation``."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = classes[p % len(classes)]
        source = (sources or {}).get(label, "ieee8023" if (p // len(classes)) % 2 else "nih")
        view = ("PA", "AP", None)[p % 3]
        for _ in range(int(rng.integers(1, max_images + 1))):
            logits = rng.normal(0, 1, len(classes))
            logits[classes.index(label)] += separation
            probs = np.exp(logits) / np.exp(logits).sum()
            rows.append({"label": label, "patient_id": f"{label}-{p}", "source": source, "view": view,
                         **{f"prob_{c}": probs[k] for k, c in enumerate(classes)}})
    return pd.DataFrame(rows)


# --- binary metrics against a hand-computed example -------------------------------------------

# 10 cases, threshold 0.5:
#   positives 0.9 0.8 0.6 | 0.3          -> TP = 3, FN = 1
#   negatives 0.7 0.55 | 0.4 0.2 0.1 0.05 -> FP = 2, TN = 4
HAND_TRUE = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
HAND_SCORE = [0.9, 0.8, 0.6, 0.3, 0.7, 0.55, 0.4, 0.2, 0.1, 0.05]


def test_binary_metrics_match_a_hand_computed_confusion_matrix():
    m = ev.binary_metrics(HAND_TRUE, HAND_SCORE, threshold=0.5)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 2, 4, 1)
    assert (m["n"], m["n_positive"], m["n_negative"], m["threshold"]) == (10, 4, 6, 0.5)
    expected = {
        "accuracy": Fraction(3 + 4, 10),
        "sensitivity": Fraction(3, 4),
        "specificity": Fraction(4, 6),
        "precision": Fraction(3, 5),
        "npv": Fraction(4, 5),
        "f1": Fraction(2 * 3, 2 * 3 + 2 + 1),  # = 2 * (3/5 * 3/4) / (3/5 + 3/4) = 2/3
        # AUC by pairs: negatives below each positive 6 + 6 + 5 + 3 = 20 of 4 x 6 = 24 pairs
        "roc_auc": Fraction(20, 24),
    }
    for name, value in expected.items():
        assert m[name] == pytest.approx(float(value)), name
    assert m["f1"] == pytest.approx(2 / 3)


def test_confusion_counts_by_hand_and_score_equal_to_threshold_is_positive():
    assert ev.confusion_counts([1, 1, 0, 0, 1], [1, 0, 1, 0, 1]) == {"tp": 2, "fp": 1, "tn": 1, "fn": 1}
    m = ev.binary_metrics([1, 0], [0.5, 0.4999], threshold=0.5)
    assert (m["tp"], m["tn"]) == (1, 1)


# --- degenerate cases: NaN where undefined, clear errors on bad input ----------------------------


def test_one_class_only_gives_nan_not_made_up_values():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from 0/0 either
        negatives_only = ev.binary_metrics([0, 0, 0, 0], [0.1, 0.7, 0.2, 0.3], threshold=0.5)
        positives_only = ev.binary_metrics([1, 1, 1], [0.9, 0.2, 0.8], threshold=0.5)
    assert math.isnan(negatives_only["sensitivity"])
    assert math.isnan(negatives_only["roc_auc"])
    assert math.isnan(negatives_only["f1"])
    assert negatives_only["specificity"] == pytest.approx(3 / 4)
    assert negatives_only["precision"] == 0.0  # one positive call, and it is wrong: defined, and 0
    assert math.isnan(positives_only["specificity"])
    assert math.isnan(positives_only["roc_auc"])
    assert positives_only["sensitivity"] == pytest.approx(2 / 3)
    assert positives_only["npv"] == 0.0  # one negative call (0.2), and it is a missed positive


def test_all_predictions_one_class():
    y_true = [1, 1, 0, 0, 0]
    all_negative = ev.binary_metrics(y_true, [0.1, 0.2, 0.3, 0.1, 0.2], threshold=0.5)
    assert math.isnan(all_negative["precision"])  # no positive predictions: PPV undefined
    assert all_negative["sensitivity"] == 0.0 and all_negative["specificity"] == 1.0
    assert all_negative["f1"] == 0.0  # positives exist and none is found
    all_positive = ev.binary_metrics(y_true, [0.9, 0.8, 0.7, 0.6, 0.9], threshold=0.5)
    assert math.isnan(all_positive["npv"])
    assert all_positive["sensitivity"] == 1.0 and all_positive["specificity"] == 0.0


@pytest.mark.parametrize(
    "y_true, y_score, message",
    [
        ([], [], "empty"),
        ([0, 1], [0.2], "same length"),
        ([0, 2], [0.2, 0.3], r"0 \(negative\) and 1"),
        (["covid", "normal"], [0.2, 0.3], r"0 \(negative\) and 1"),
        ([0, 1], [0.2, float("nan")], "NaN"),
    ],
)
def test_bad_input_raises_a_clear_error(y_true, y_score, message):
    with pytest.raises(ev.EvaluationError, match=message) as info:
        ev.binary_metrics(y_true, y_score)
    assert isinstance(info.value, XraylibError) and isinstance(info.value, ValueError)


def test_empty_prediction_table_is_refused():
    empty = make_predictions(4).iloc[0:0]
    with pytest.raises(ev.EvaluationError, match="no rows"):
        ev.evaluate(empty, BINARY, 0.5, n_boot=10)


# --- threshold chosen on validation ------------------------------------------------------------


def brute_force_threshold(y_true: np.ndarray, y_score: np.ndarray, min_sensitivity: float | None) -> float:
    """Scan every distinct score as a threshold (positive when score >= t)."""
    best_key, best_t = None, None
    for t in np.unique(y_score):
        predicted = y_score >= t
        sensitivity = predicted[y_true == 1].mean()
        specificity = (~predicted[y_true == 0]).mean()
        if min_sensitivity is None:
            key = (sensitivity + specificity - 1, t)
        elif sensitivity >= min_sensitivity:
            key = (specificity, t)
        else:
            continue
        if best_key is None or key > best_key:  # ties on the objective -> the higher threshold
            best_key, best_t = key, t
    return float(best_t)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("min_sensitivity", [0.8, 0.9, 0.95, 1.0])
def test_choose_threshold_maximises_specificity_at_the_sensitivity_floor(seed, min_sensitivity):
    rng = np.random.default_rng(seed)
    y_true = (rng.random(120) < 0.4).astype(int)
    y_score = np.round(np.clip(rng.normal(0.4 + 0.25 * y_true, 0.2), 0, 1), 2)  # rounding makes ties
    t = ev.choose_threshold(y_true, y_score, min_sensitivity=min_sensitivity)
    assert t == brute_force_threshold(y_true, y_score, min_sensitivity)
    assert ev.binary_metrics(y_true, y_score, t)["sensitivity"] >= min_sensitivity


@pytest.mark.parametrize("seed", range(5))
def test_choose_threshold_youden_matches_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    y_true = (rng.random(80) < 0.5).astype(int)
    y_score = np.round(rng.random(80) * 0.6 + 0.3 * y_true, 2)
    assert ev.choose_threshold(y_true, y_score, rule="youden") == brute_force_threshold(y_true, y_score, None)


def test_choose_threshold_fixed_fallback_and_bad_rule():
    assert ev.choose_threshold([0, 1], [0.2, 0.8], rule=0.3) == 0.3
    with pytest.warns(UserWarning, match="falling back to threshold 0.5"):
        assert ev.choose_threshold([0, 0, 0], [0.2, 0.8, 0.4]) == 0.5
    with pytest.raises(ConfigError, match="rule must be one of"):
        ev.choose_threshold([0, 1], [0.2, 0.8], rule="best_on_test")
    with pytest.raises(ConfigError, match="min_sensitivity"):
        ev.choose_threshold([0, 1], [0.2, 0.8], min_sensitivity=0)


def test_threshold_from_validation_records_how_and_refuses_test_rows():
    val = make_predictions(60, seed=1)
    t = ev.threshold_from_validation(val, BINARY, min_sensitivity=0.9)
    y_true, y_score, _ = ev.binary_targets(val, BINARY)
    assert t == ev.choose_threshold(y_true, y_score, min_sensitivity=0.9)
    assert isinstance(t, float) and "validation split" in t.chosen_by and "0.9" in t.chosen_by
    assert pickle.loads(pickle.dumps(t)).chosen_by == t.chosen_by
    with pytest.raises(ev.EvaluationError, match="never on test"):
        ev.threshold_from_validation(val.assign(split="test"), BINARY)


# --- bootstrap over patients -------------------------------------------------------------------


def test_weighted_auc_matches_sklearn_with_sample_weights():
    rng = np.random.default_rng(3)
    y_true = (rng.random(300) < 0.3).astype(int)
    y_score = np.round(rng.random(300) + 0.3 * y_true, 1)  # many ties
    weights = rng.integers(0, 4, size=(6, 300)).astype(float)
    order = np.argsort(y_score, kind="stable")
    sorted_scores = y_score[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    fast = ev._weighted_auc(weights[:, order], (y_true == 1)[order], starts)
    slow = [roc_auc_score(y_true, y_score, sample_weight=w) for w in weights]
    np.testing.assert_allclose(fast, slow, rtol=1e-12)


def test_bootstrap_resamples_patients_not_images():
    # 20 positive patients: 19 with one image that the model finds, one with 50 identical images
    # that it misses; 40 negative patients with one image each.
    y_true = np.r_[np.ones(19), np.ones(50), np.zeros(40)].astype(int)
    y_score = np.r_[np.full(19, 0.9), np.full(50, 0.1), np.linspace(0.0, 0.4, 40)]
    patients = np.r_[[f"pos{i}" for i in range(19)], ["pos-many"] * 50, [f"neg{i}" for i in range(40)]]
    image_level = np.array([f"img{i}" for i in range(len(y_true))])

    by_patient = ev.bootstrap_ci(y_true, y_score, patients, 0.5, n_boot=1000, seed=0)["sensitivity"]
    naive = ev.bootstrap_ci(y_true, y_score, image_level, 0.5, n_boot=1000, seed=0)["sensitivity"]
    point = ev.binary_metrics(y_true, y_score, 0.5)["sensitivity"]  # 19/69
    assert point == pytest.approx(19 / 69)
    # Whether the 50-image patient is drawn 0, 1 or 2 times swings sensitivity from 1.0 to ~0.16.
    assert by_patient[1] == 1.0 and by_patient[0] < 0.25
    assert by_patient[1] - by_patient[0] > 3 * (naive[1] - naive[0])
    assert naive[1] - naive[0] < 0.25


def test_bootstrap_ci_contains_the_estimate_narrows_with_more_patients_and_is_seeded():
    widths = {}
    for n_patients in (60, 600):
        frame = make_predictions(n_patients, seed=n_patients, separation=1.2)
        y_true, y_score, patients = ev.binary_targets(frame, BINARY)
        point = ev.binary_metrics(y_true, y_score, 0.5)
        ci = ev.bootstrap_ci(y_true, y_score, patients, 0.5, n_boot=500, seed=7)
        for name in ev.METRICS:
            assert ci[name][0] <= point[name] <= ci[name][1], (n_patients, name)
        widths[n_patients] = {name: ci[name][1] - ci[name][0] for name in ev.METRICS}
        assert ci == ev.bootstrap_ci(y_true, y_score, patients, 0.5, n_boot=500, seed=7)
        assert ci != ev.bootstrap_ci(y_true, y_score, patients, 0.5, n_boot=500, seed=8)
    for name in ev.METRICS:
        assert widths[600][name] < 0.6 * widths[60][name], name


def test_bootstrap_of_one_class_group_is_nan_where_undefined():
    ci = ev.bootstrap_ci([0, 0, 0, 0], [0.1, 0.6, 0.2, 0.3], ["a", "a", "b", "c"], 0.5, n_boot=50)
    assert all(math.isnan(v) for v in ci["sensitivity"] + ci["roc_auc"])
    assert 0 <= ci["specificity"][0] <= ci["specificity"][1] <= 1


def test_bootstrap_needs_a_patient_id_per_image():
    with pytest.raises(ev.EvaluationError, match="patient_id"):
        ev.bootstrap_ci([0, 1], [0.2, 0.8], ["a", None], 0.5, n_boot=10)


# --- multiclass ----------------------------------------------------------------------------------


def one_hot_probs(predicted: list[str], classes: tuple[str, ...]) -> np.ndarray:
    probs = np.full((len(predicted), len(classes)), 0.1)
    for i, name in enumerate(predicted):
        probs[i, classes.index(name)] = 0.8
    return probs


def test_multiclass_metrics_match_hand_computation():
    # Hand confusion matrix (rows true, columns predicted: normal, pneumonia, covid):
    #   normal    [3, 1, 0]
    #   pneumonia [1, 2, 1]
    #   covid     [0, 1, 3]
    pairs = ([("normal", "normal")] * 3 + [("normal", "pneumonia")]
             + [("pneumonia", "normal")] + [("pneumonia", "pneumonia")] * 2 + [("pneumonia", "covid")]
             + [("covid", "pneumonia")] + [("covid", "covid")] * 3)
    labels = [t for t, _ in pairs]
    probs = one_hot_probs([p for _, p in pairs], THREE)
    table = ev.multiclass_metrics(labels, probs, THREE)
    assert table["support"].tolist() == [4, 4, 4]
    assert table["n_predicted"].tolist() == [4, 4, 4]
    assert table.loc["normal", "sensitivity"] == pytest.approx(3 / 4)
    assert table.loc["pneumonia", "sensitivity"] == pytest.approx(2 / 4)
    assert table.loc["covid", "sensitivity"] == pytest.approx(3 / 4)
    assert table.loc["normal", "ppv"] == pytest.approx(3 / 4)
    assert table.loc["pneumonia", "ppv"] == pytest.approx(2 / 4)
    assert table.loc["covid", "ppv"] == pytest.approx(3 / 4)
    assert table.attrs["accuracy"] == pytest.approx(8 / 12)
    assert "pneumonia" in table.attrs["classification_report"]
    cm = ev.confusion_table(labels, ev.argmax_labels(probs, THREE), THREE)
    assert cm.to_numpy().tolist() == [[3, 1, 0], [1, 2, 1], [0, 1, 3]]
    assert (cm.index.name, cm.columns.name) == ("true", "predicted")


def test_multiclass_ppv_of_a_class_never_predicted_is_nan():
    table = ev.multiclass_metrics(["normal", "covid", "pneumonia"], one_hot_probs(["normal", "normal", "pneumonia"], THREE), THREE)
    assert math.isnan(table.loc["covid", "ppv"])
    assert table.loc["covid", "sensitivity"] == 0.0


# --- evaluate, report -----------------------------------------------------------------------------


def test_evaluate_binary_tables_and_counts():
    frame = make_predictions(80, seed=2)
    frame.loc[frame["patient_id"] == "normal-0", "source"] = "kaggle"
    threshold = ev.threshold_from_validation(make_predictions(60, seed=3), BINARY)
    result = ev.evaluate(frame, BINARY, threshold, n_boot=200)

    assert result.positive_class == "covid"
    assert result.threshold == float(threshold) and result.threshold_chosen_by == threshold.chosen_by
    assert (result.n_images, result.n_patients) == (len(frame), 80)
    y_true, y_score, _ = ev.binary_targets(frame, BINARY)
    assert result.metrics == ev.binary_metrics(y_true, y_score, threshold)
    assert int(result.confusion.to_numpy().sum()) == len(frame)
    assert result.confusion.loc["covid", "covid"] == result.metrics["tp"]
    assert result.confusion.loc["normal", "covid"] == result.metrics["fp"]

    by_source = result.by_source
    assert by_source.index.tolist() == ["ieee8023", "kaggle", "nih"]
    for source, group in frame.groupby("source"):
        row = by_source.loc[source]
        assert row["n_images"] == len(group)
        assert row["n_patients"] == group["patient_id"].nunique()
        assert row["n_positive"] == (group["label"] == "covid").sum()
        assert row["n_positive_patients"] == group.loc[group["label"] == "covid", "patient_id"].nunique()
    kaggle = by_source.loc["kaggle"]  # normals only
    assert math.isnan(kaggle["sensitivity"]) and math.isnan(kaggle["roc_auc"]) and math.isnan(kaggle["roc_auc_low"])
    assert not math.isnan(kaggle["specificity"])
    assert sorted(result.by_view.index) == ["AP", "PA", "unknown"]
    assert result.by_view["n_images"].sum() == len(frame)
    assert result.confusion_multiclass is None and result.per_class is None


def test_evaluate_three_classes_is_covid_vs_rest_plus_argmax_tables():
    frame = make_predictions(90, classes=THREE, seed=4)
    result = ev.evaluate(frame, THREE, 0.4, n_boot=100)
    assert result.positive_class == "covid"
    assert result.confusion.index.tolist() == ["not covid", "covid"]
    assert result.metrics["n_positive"] == (frame["label"] == "covid").sum()
    assert result.confusion_multiclass.index.tolist() == list(THREE)
    assert result.per_class.index.tolist() == list(THREE)
    assert "not recorded" in result.threshold_chosen_by  # a bare float says so
    pneumonia = ev.evaluate(frame, THREE, 0.4, positive_class="pneumonia", n_boot=20)
    assert pneumonia.metrics["n_positive"] == (frame["label"] == "pneumonia").sum()


def test_evaluate_warns_about_confounded_sources_and_few_positive_patients():
    frankenstein = make_predictions(40, seed=5, sources={"covid": "ieee8023", "normal": "kaggle-children"})
    result = ev.evaluate(frankenstein, BINARY, 0.5, n_boot=50)
    assert any("confounded" in w for w in result.warnings)
    assert any("only 20 covid patient" in w for w in result.warnings)
    markdown = result.to_markdown()
    assert "> **Warning:** source and class are confounded" in markdown

    fair = ev.evaluate(make_predictions(120, seed=6), BINARY, 0.5, n_boot=50)  # both sources hold both classes, 60 covid patients
    assert fair.warnings == []


def test_prediction_table_errors_name_the_problem():
    frame = make_predictions(10)
    with pytest.raises(ev.EvaluationError, match=r"missing column\(s\) \['prob_covid'\]"):
        ev.evaluate(frame.drop(columns="prob_covid"), BINARY, 0.5)
    with pytest.raises(ev.EvaluationError, match="not among classes"):
        ev.evaluate(frame.assign(label="pneumonia"), BINARY, 0.5)
    with pytest.raises(ev.EvaluationError, match="must sum to 1"):
        ev.evaluate(frame.assign(prob_covid=0.9, prob_normal=0.9), BINARY, 0.5)
    with pytest.raises(ConfigError, match="positive_class"):
        ev.evaluate(frame, BINARY, 0.5, positive_class="pneumonia")


def test_to_dict_is_strict_json_and_markdown_reads_well():
    frame = make_predictions(30, classes=THREE, seed=7)
    frame.loc[frame["source"] == "nih", "label"] = "normal"  # nih: one class only -> NaN metrics
    frame.loc[frame["source"] == "nih", ["prob_normal", "prob_pneumonia", "prob_covid"]] = [0.6, 0.3, 0.1]
    result = ev.evaluate(frame, THREE, 0.3, n_boot=100)
    as_dict = result.to_dict()
    text = json.dumps(as_dict, allow_nan=False)  # raises on any NaN left
    assert json.loads(text)["by_source"][1]["sensitivity"] is None
    assert as_dict["metrics"]["roc_auc"]["ci_low"] <= as_dict["metrics"]["roc_auc"]["value"]

    markdown = result.to_markdown()
    assert "Research software, not a diagnostic device." in markdown
    assert f"{result.n_patients} patients, {result.n_images} images" in markdown
    assert "## By source" in markdown and "## By view" in markdown
    auc_low, auc_high = result.ci["roc_auc"]
    assert f"{result.metrics['roc_auc']:.3f} (95% CI {auc_low:.3f}–{auc_high:.3f})" in markdown
    assert "n/a (undefined)" in markdown
    assert "nan" not in markdown.replace("pneumonia", "")  # undefined values print as n/a, never nan


def test_write_report_writes_json_and_markdown(tmp_path):
    result = ev.evaluate(make_predictions(40, seed=8), BINARY, 0.5, n_boot=50)
    paths = ev.write_report(result, tmp_path / "reports", name="covid_vs_normal")
    assert paths["json"] == tmp_path / "reports" / "covid_vs_normal.json"
    assert json.loads(paths["json"].read_text())["n_patients"] == 40
    assert paths["md"].read_text(encoding="utf-8") == result.to_markdown()
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["covid_vs_normal.json", "covid_vs_normal.md"]


# --- figures ----------------------------------------------------------------------------------------


def render(fig: Figure) -> bytes:
    assert isinstance(fig, Figure)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    data = buffer.getvalue()
    assert data.startswith(b"\x89PNG")
    return data


def test_evaluation_figures_render():
    open_before = set(plt.get_fignums())  # other tests may leave figures open
    frame = make_predictions(60, classes=THREE, seed=9)
    result = ev.evaluate(frame, THREE, 0.3, n_boot=50)
    y_true, y_score, _ = ev.binary_targets(frame, THREE)
    render(plots.confusion_matrix(result.confusion, "covid vs rest"))
    render(plots.confusion_matrix(result.confusion_multiclass, "three classes"))
    render(plots.roc_curve(y_true, y_score, auc_ci=result.ci["roc_auc"], threshold=result.threshold))
    render(plots.roc_curve(np.zeros(5, int), np.linspace(0, 1, 5)))  # one class: says so, no crash
    render(plots.precision_recall_curve(y_true, y_score))
    render(plots.metrics_by_group(result.by_source))
    render(plots.metrics_by_group(result.by_view, metrics=("sensitivity", "specificity")))
    history = pd.DataFrame({"epoch": [1, 2, 3], "loss": [0.9, 0.6, 0.5], "val_loss": [0.95, 0.7, 0.72],
                            "accuracy": [0.6, 0.7, 0.8], "val_accuracy": [0.55, 0.68, 0.66]})
    render(plots.training_history(history))
    render(plots.training_history(history[["loss"]]))  # no epoch, no accuracy: still draws
    assert set(plt.get_fignums()) <= open_before
