"""Shortcut tests: views of the cache, source prediction, lungs hidden, leave one source out, Grad-CAM heat.

The central test (issue 5's "done means"): on the built-in sample data written with a burned-in "R"
marker in every COVID-19 image (``write_sample_data(..., shortcut_marker="covid")``), the shortcut
tests find the marker, and on the same data without it they do not find it. Tiny settings: the small
CNN at 64 px, 30 epochs, 60 patients per source, fixed seeds (a few minutes on two cores). 30 epochs, not
fewer: at seed 0 the clean model sits on its loss plateau (about 0.69, chance) until about epoch 15 and
only then learns to tell the classes apart; stopped there it is a near-constant model (every probability
about 0.5) whose Grad-CAM finds no evidence for covid in any image, so there is nothing to compare.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

matplotlib.use("Agg")

from xraylib import config, explain, manifest, models, plots, shortcuts, synthetic, views
from xraylib.errors import ConfigError
from xraylib.preprocess import PreprocessedData, PreprocessedSplit, PreprocessSettings, split_and_preprocess
from xraylib.split import patients_in_several_splits
from xraylib.sources import SOURCES
from xraylib.runs import train
from xraylib.train import TrainSettings

from test_explain import evidence_model

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning",
                                        "ignore:Invalid value for VR AS")

SIZE = 64
CLASSES = ("normal", "covid")
SPEC = models.ModelSpec(backbone="small_cnn", weights=None, image_size=SIZE, classes=CLASSES)
SETTINGS = TrainSettings(epochs=30, batch_size=16, seed=0)
N_BOOT = 200


def sample_cache(root: Path, marker: str | None):
    """The sample data (60 patients per source, ``marker`` burned into that class), covid vs normal, 64 px."""
    synthetic.write_sample_data(root / "sample_data", n_patients=60, seed=0, image_size=64, shortcut_marker=marker)
    built = manifest.build_manifest(config.sample_drive_paths(root), task="covid_vs_normal", progress=False, workers=1)
    return split_and_preprocess(built.frame, root / "preprocessed", CLASSES, PreprocessSettings(image_size=SIZE),
                                fractions=(0.6, 0.2, 0.2), seed=0, workers=1, progress=False)


@pytest.fixture(scope="module")
def marked(tmp_path_factory):
    root = tmp_path_factory.mktemp("marked")
    return root, sample_cache(root, "covid")


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    return root, sample_cache(root, None)


@pytest.fixture(scope="module")
def marked_model(marked):
    root, data = marked
    train(data, SPEC, SETTINGS, run_dir=root / "models" / "run", verbose=0)
    return models.load_model(root / "models" / "run")


@pytest.fixture(scope="module")
def clean_model(clean):
    root, data = clean
    train(data, SPEC, SETTINGS, run_dir=root / "models" / "run", verbose=0)
    return models.load_model(root / "models" / "run")


# ---------------------------------------------------------------------------------------------
# Views of the cache


def test_indexed_images_read_the_cached_rows_without_copying_them(marked):
    _, data = marked
    train_images, test_images = np.asarray(data["train"].images), np.asarray(data["test"].images)
    rows = views.cache_rows(data)
    chosen = pd.concat([rows[rows["split"] == "test"].iloc[[3, 0, 3]], rows[rows["split"] == "train"].iloc[[5, 1]]])
    view = views.data_view(data, chosen.assign(new_split="train"), description="five rows")
    images = view["train"].images
    expected = np.stack([test_images[3], test_images[0], test_images[3], train_images[5], train_images[1]])
    assert isinstance(images, views.IndexedImages) and images.shape == (5, SIZE, SIZE) and len(images) == 5
    np.testing.assert_array_equal(np.asarray(images), expected)
    np.testing.assert_array_equal(images[[4, 0]], expected[[4, 0]])
    np.testing.assert_array_equal(images[1:4], expected[1:4])
    np.testing.assert_array_equal(images[np.array([True, False, False, False, True])], expected[[0, 4]])
    np.testing.assert_array_equal(images[-1], expected[-1])
    np.testing.assert_array_equal(images[2, :8, :8], expected[2, :8, :8])
    # It reads the cache's memory-mapped arrays themselves; nothing was copied to build it.
    assert any(part is data["test"].images for part in images.parts)
    assert isinstance(data["test"].images, np.memmap)
    assert view["train"].manifest[["cache_split", "cache_row"]].values.tolist() == [
        ["test", 3], ["test", 0], ["test", 3], ["train", 5], ["train", 1]]
    assert len(view["val"]) == len(view["test"]) == 0 and view.key != data.key

    # A view of a view reads the cache directly, and hidden regions add up.
    hidden = views.hidden_view(view, "rectangle")
    corner = np.zeros((SIZE, SIZE), bool)
    corner[:8, :8] = True
    twice = views.hidden_view(hidden, corner)
    again = twice["train"].images
    assert all(isinstance(part, np.memmap) for part in again.parts)
    mask = views.hidden_region(SIZE, "rectangle") | corner
    np.testing.assert_array_equal(np.asarray(again), np.where(mask, 0, expected))
    assert hidden["train"].manifest["cache_split"].tolist() == ["test", "test", "test", "train", "train"]
    # Hidden pixels are other content: the rows' content ids change (the feature cache must not reuse the
    # plain images' features), views without hidden pixels keep them.
    plain_ids = view["train"].manifest["sha1"]
    assert (plain_ids == chosen["sha1"].to_numpy()).all()
    assert (hidden["train"].manifest["file_sha1"] == plain_ids).all()
    assert hidden["train"].manifest["sha1"].str.startswith(tuple(plain_ids)).all()
    assert not (hidden["train"].manifest["sha1"] == plain_ids).any()
    assert twice["train"].manifest["sha1"].nunique() == 4  # rows 0 and 2 are one image
    assert not set(twice["train"].manifest["sha1"]) & set(hidden["train"].manifest["sha1"])
    # The lung fields lie inside the rectangle: hiding them too changes no pixel, and no content id.
    inside = views.hidden_view(hidden, "lungs")["train"].manifest["sha1"]
    assert inside.tolist() == hidden["train"].manifest["sha1"].tolist()


def test_data_view_refuses_what_it_cannot_build(marked):
    _, data = marked
    rows = views.cache_rows(data)
    with pytest.raises(ConfigError, match="new_split"):
        views.data_view(data, rows)
    with pytest.raises(ConfigError, match="holdout"):
        views.data_view(data, rows.assign(new_split="holdout"))
    with pytest.raises(ConfigError, match="pneumonia"):
        views.data_view(data, rows.assign(new_split="train", label="pneumonia"))
    with pytest.raises(ConfigError, match="outside"):
        views.data_view(data, rows.assign(new_split="train", row=rows["row"] + 10_000))
    with pytest.raises(ConfigError, match="region"):
        views.hidden_region(SIZE, "heart")


def test_source_view_labels_each_image_by_its_source(marked):
    _, data = marked
    view = views.source_view(data)
    # Only RSNA of the NIH/RSNA hospital is present, so it keeps its own name; each NLM set is a hospital of its own.
    assert view.classes == ("ieee8023", "kaggle", "nlm-montgomery", "nlm-shenzhen", "rsna")
    for name in ("train", "val", "test"):
        part, original = view[name], data[name]
        assert part.manifest["label"].tolist() == original.manifest["source"].tolist()
        assert part.manifest["disease_label"].tolist() == original.manifest["label"].tolist()
        assert [view.classes[k] for k in part.labels] == part.manifest["label"].tolist()
        np.testing.assert_array_equal(np.asarray(part.images), np.asarray(original.images))
    grouped = views.source_view(data, source_groups={"kaggle": "kaggle+rsna", "rsna": "kaggle+rsna"})
    assert grouped.classes == ("ieee8023", "kaggle+rsna", "nlm-montgomery", "nlm-shenzhen")


def test_a_held_out_source_is_the_whole_test_set_and_absent_from_training(marked):
    _, data = marked
    view = views.held_out_source_view(data, "kaggle")
    everything = data.manifest
    assert set(view["test"].manifest["source"]) == {"kaggle"}
    assert len(view["test"]) == int((everything["source"] == "kaggle").sum())
    for name in ("train", "val"):
        assert "kaggle" not in set(view[name].manifest["source"])
        assert len(view[name]) == int(((everything["source"] != "kaggle") & (everything["split"] == name)).sum())
    assert patients_in_several_splits(view.manifest) == []
    with pytest.raises(ConfigError, match="nih"):
        views.held_out_source_view(data, "nih")


def test_source_folds_say_which_sources_can_be_left_out_and_why(marked):
    _, data = marked
    folds = shortcuts.source_folds(data.manifest, CLASSES).set_index("source")
    assert not folds.loc["ieee8023", "runnable"]
    assert "no covid images" in folds.loc["ieee8023", "reason"]
    assert folds.loc["kaggle", "runnable"] and "normal images only" in folds.loc["kaggle", "reason"]
    assert folds.loc["rsna", "runnable"] and folds.loc["rsna", "images"] == (data.manifest["source"] == "rsna").sum()
    for nlm in ("nlm-shenzhen", "nlm-montgomery"):  # normals only (their tuberculosis films are not in the manifest)
        assert folds.loc[nlm, "runnable"] and "normal images only" in folds.loc[nlm, "reason"]


def test_macro_auc_is_sklearns_one_vs_rest_macro_auc_with_a_patient_interval():
    rng = np.random.default_rng(0)
    classes = ("a", "b", "c")
    labels = rng.choice(classes, size=120)
    probs = rng.dirichlet([1, 1, 1], size=120)
    probs[np.arange(120), [classes.index(l) for l in labels]] += 0.6
    probs /= probs.sum(axis=1, keepdims=True)
    table = pd.DataFrame({"label": labels, "patient_id": [f"p{i // 2}" for i in range(120)], "source": "s",
                          **{f"prob_{c}": probs[:, k] for k, c in enumerate(classes)}})
    auc, (low, high), per_class = shortcuts.macro_auc(table, classes, n_boot=300)
    assert auc == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=list(classes)))
    assert low < auc < high and high - low < 0.3 and set(per_class) == set(classes)
    assert math.isnan(shortcuts.macro_auc(table[table["label"] == "a"], classes)[0])


def test_hidden_regions():
    rectangle = views.hidden_region(100, "rectangle")
    assert rectangle.sum() == 70 * 70 and not rectangle[:15].any() and rectangle[15:85, 15:85].all()
    np.testing.assert_array_equal(views.hidden_region(64, "lungs"), explain.lung_field_mask(64))
    custom = np.zeros((64, 64), bool)
    assert views.hidden_region(64, custom) is not custom and not views.hidden_region(64, custom).any()
    with pytest.raises(ConfigError, match=r"\(64, 64\)"):
        views.hidden_region(64, np.zeros((32, 32), bool))


def test_saliency_says_in_words_when_every_grad_cam_map_of_a_class_is_zero(tmp_path):
    """A model whose Grad-CAM is known (test_explain's evidence model: class 0's evidence is brightness,
    class 1's darkness), on images chosen so that two of the four normal maps and every covid map are
    all zero: the zero maps are left out and counted, never averaged in as NaN, and a class with no
    heat at all is said to have none instead of vanishing from the verdict."""
    size = 32  # the smallest image size a cache has
    normal = np.zeros((4, size, size), np.uint8)  # black: no brightness, so no evidence for class 0 ...
    normal[2:, :2, :2] = 255                    # ... but in the last two, a white top-left corner
    covid = np.full((3, size, size), 255, np.uint8)  # white: no darkness anywhere, so no evidence for class 1
    images, labels = np.concatenate([normal, covid]), np.array([0, 0, 0, 0, 1, 1, 1])
    frame = pd.DataFrame({"label": [CLASSES[k] for k in labels]})
    test = PreprocessedSplit("test", images, labels, frame, CLASSES)
    data = PreprocessedData(tmp_path, PreprocessSettings(image_size=size), CLASSES, {"test": test}, key="hand made")

    result = shortcuts.saliency_heat_share(data, evidence_model(size), layer_name="evidence")
    table = result.table
    assert table["n_images"].tolist() == [4, 3] and table["n_no_heat"].tolist() == [2, 3]
    # normal: the two maps with heat, all of it in the top-left corner (the black maps do not dilute it).
    assert table.loc["normal", "corner_heat"] == pytest.approx(1.0) and table.loc["normal", "hottest_corner"] == "top_left"
    assert table.loc["normal", "heat_inside"] == 0.0 and table.loc["normal", "peak"].startswith("top left")
    # covid: nothing to share. NaN shares, no corner, and said so in words.
    assert table.loc["covid", ["heat_inside", "heat_outside", "ratio", "corner_heat"]].isna().all()
    assert pd.isna(table.loc["covid", "hottest_corner"]) and table.loc["covid", "peak"] == "no heat"
    assert not result.mean_maps["covid"].any() and np.isfinite(result.mean_maps["normal"]).all()
    assert "no heat at all for covid" in result.verdict, result.verdict
    assert "covid: all 3 Grad-CAM maps are zero" in result.verdict and "2 of 4 maps all zero, left out" in result.verdict
    assert "nan" not in result.verdict.lower() and "every class" not in result.verdict
    assert result.shortcut_found  # the normal class's corner
    assert "| covid | 3 (3) | n/a (area" in result.to_markdown()
    json.dumps(result.to_dict(), allow_nan=False)

    # No class with heat at all: one plain sentence, not an empty or NaN verdict.
    white = PreprocessedSplit("test", covid, np.ones(3, int), frame.iloc[4:], CLASSES)
    nothing = shortcuts.saliency_heat_share(dataclasses.replace(data, splits={"test": white}), evidence_model(size),
                                            layer_name="evidence")
    assert nothing.verdict.startswith("No heat: every Grad-CAM map is zero") and not nothing.shortcut_found
    assert "normal: no images" in nothing.verdict


# ---------------------------------------------------------------------------------------------
# The shortcut tests find a burned-in marker, and do not find it where there is none


def test_the_shortcut_tests_detect_a_burned_in_marker(marked, clean, marked_model, clean_model):
    """Two models, the same pipeline, the same sample data but for a white "R" burned into every COVID-19
    image of one copy. With the centre of the film blacked out, the marker model still separates the
    classes perfectly, the clean model falls towards chance; the marker model's Grad-CAM heat for covid
    sits outside the lungs, gathered in the marker's corner, far more than the clean model's."""
    (_, marked_data), (_, clean_data) = marked, clean
    hidden_marked = shortcuts.lungs_hidden(marked_data, marked_model, n_boot=N_BOOT)
    hidden_clean = shortcuts.lungs_hidden(clean_data, clean_model, n_boot=N_BOOT)
    heat_marked = shortcuts.saliency_heat_share(marked_data, marked_model)
    heat_clean = shortcuts.saliency_heat_share(clean_data, clean_model)
    numbers = (f"AUC with lungs visible / hidden: marker {hidden_marked.auc:.2f} / {hidden_marked.auc_hidden:.2f}, clean "
               f"{hidden_clean.auc:.2f} / {hidden_clean.auc_hidden:.2f}; covid heat outside the lungs: marker "
               f"{heat_marked.table.loc['covid', 'heat_outside']:.2f}, clean {heat_clean.table.loc['covid', 'heat_outside']:.2f}; "
               f"in the top-left corner: marker {heat_marked.table.loc['covid', 'corner_heat']:.2f}, clean "
               f"{heat_clean.table.loc['covid', 'corner_heat']:.2f}; covid maps all zero: marker "
               f"{heat_marked.table.loc['covid', 'n_no_heat']} of {heat_marked.table.loc['covid', 'n_images']}, clean "
               f"{heat_clean.table.loc['covid', 'n_no_heat']} of {heat_clean.table.loc['covid', 'n_images']}")
    print(numbers)

    # Both models learned the task: the comparison is not between a model and a coin.
    assert hidden_marked.auc >= 0.95 and hidden_clean.auc >= 0.85, numbers
    # Lungs hidden: the marker model keeps its score, the clean one loses most of it.
    assert hidden_marked.auc_hidden >= 0.9 and hidden_marked.shortcut_found, numbers
    assert hidden_marked.verdict.startswith("AUC stays") and "looks outside the lungs" in hidden_marked.verdict
    assert hidden_clean.auc_hidden <= hidden_marked.auc_hidden - 0.2, numbers
    assert hidden_clean.auc_hidden < 0.8 and not hidden_clean.verdict.startswith("AUC stays"), numbers
    # Grad-CAM: both models have covid heat to compare (a model with none would make every comparison below
    # with NaN, and fail for that reason rather than for the marker) ...
    for heat in (heat_marked, heat_clean):
        assert heat.table.loc["covid", "n_no_heat"] < heat.table.loc["covid", "n_images"], heat.verdict
    # ... and more of the marker model's lies outside the lungs, gathered in the marker's corner.
    assert heat_marked.table.loc["covid", "heat_outside"] > heat_clean.table.loc["covid", "heat_outside"], numbers
    assert heat_marked.table.loc["covid", "hottest_corner"] == "top_left", numbers
    assert heat_marked.table.loc["covid", "corner_heat"] >= shortcuts.CORNER_HEAT_WARN, numbers
    assert heat_clean.table.loc["covid", "corner_heat"] < shortcuts.CORNER_HEAT_WARN, numbers
    assert heat_marked.shortcut_found and "corner for covid (top left)" in heat_marked.verdict
    assert heat_marked.table.loc["covid", "peak"] == "top left of the image, outside the lung fields"
    # The mean maps are ready to plot: one per class, on the images' grid.
    assert set(heat_marked.mean_maps) == set(CLASSES)
    assert all(m.shape == (SIZE, SIZE) and m.dtype == np.float32 for m in heat_marked.mean_maps.values())
    figure = plots.mean_heatmaps(heat_marked.mean_maps, heat_marked.lung_mask, heat_marked.shares)
    assert len([ax for ax in figure.axes if ax.images]) == 2
    plots.save_figure(figure, marked[0] / "heat.png")


def test_source_prediction_finds_that_the_sample_sources_carry_the_labels(marked, capsys):
    root, data = marked
    result = shortcuts.source_prediction(data, SPEC, SETTINGS, root / "shortcuts" / "source", n_boot=N_BOOT)
    out, err = capsys.readouterr()
    assert f"Source prediction: 1 training to run, 30 epochs each on {len(data['train'])} training images" in out
    assert "Source prediction" in err and "1/1" in err  # the bar over the trainings (tqdm writes to stderr)
    print(result.verdict)
    assert result.sources == ("ieee8023", "kaggle", "nlm-montgomery", "nlm-shenzhen", "rsna")
    assert result.auc >= 0.9 and result.ci[0] <= result.auc <= result.ci[1]
    assert result.confounded and result.shortcut_found
    assert result.verdict.startswith(f"AUC {result.auc:.2f}") and "source alone can carry the labels" in result.verdict
    assert any("'covid' images" in reason and "ieee8023" in reason for reason in result.confound_reasons)
    assert result.n_images == len(data["test"]) and sum(result.images_per_source.values()) == result.n_images
    # The run is an ordinary, saved run folder (five sources: saved without a covid threshold) ...
    saved = models.load_model(result.run_dir)
    assert saved.classes == result.sources
    # ... and asking again loads it instead of training again.
    capsys.readouterr()
    again = shortcuts.source_prediction(data, SPEC, SETTINGS, root / "shortcuts" / "source", n_boot=N_BOOT,
                                        progress=False)
    assert again.auc == result.auc
    out, err = capsys.readouterr()
    assert "training" not in out and "Source prediction" not in err  # progress=False: silent


def test_leave_one_source_out_runs_where_the_data_allow_and_says_why_not_elsewhere(marked):
    root, data = marked
    result = shortcuts.leave_one_source_out(data, SPEC, SETTINGS, root / "shortcuts" / "loso", n_boot=N_BOOT)
    print(result.verdict)
    assert set(result.table.index) == {"kaggle", "rsna", "nlm-shenzhen", "nlm-montgomery"}
    assert "ieee8023" in result.skipped and "no covid images" in result.skipped["ieee8023"]
    for source, row in result.table.iterrows():
        assert row["n_images"] == (data.manifest["source"] == source).sum() and row["n_positive"] == 0
        assert math.isnan(row["roc_auc"]) and 0.0 <= row["specificity"] <= 1.0
        assert row["specificity_low"] <= row["specificity"] <= row["specificity_high"]
        assert (result.run_dirs[source] / "model.json").is_file()
    assert "not testable: ieee8023" in result.verdict and "specificity" in result.verdict


def test_leave_one_source_out_on_chosen_rows(marked, capsys):
    """As the benchmark uses it: some rows of the cache only (here without Kaggle's children: every adult normal source)."""
    root, data = marked
    adults = data.manifest[~data.manifest["source"].isin([source.name for source in SOURCES if source.children])]
    result = shortcuts.leave_one_source_out(data, SPEC, TrainSettings(epochs=3, batch_size=16, seed=0),
                                            root / "shortcuts" / "loso_adults", rows=adults, n_boot=N_BOOT)
    out, err = capsys.readouterr()
    assert "Leave one source out: 3 trainings to run, 3 epochs each on" in out  # rsna, nlm-shenzhen, nlm-montgomery
    assert "3/3" in err and "training" in err
    assert sorted(result.table.index) == ["nlm-montgomery", "nlm-shenzhen", "rsna"] and list(result.skipped) == ["ieee8023"]
    assert result.table.loc["rsna", "n_images"] == (adults["source"] == "rsna").sum()
    with pytest.raises(ConfigError, match="'row'"):
        shortcuts.leave_one_source_out(data, SPEC, SETTINGS, root / "unused", rows=adults.drop(columns="row"))


def test_a_model_trained_with_the_lungs_hidden_still_reads_the_marker(marked, marked_model, capsys):
    root, data = marked
    result = shortcuts.lungs_hidden(data, marked_model, train_masked=True, run_dir=root / "shortcuts" / "lungs_hidden",
                                    n_boot=N_BOOT)
    out, err = capsys.readouterr()
    assert "Training with the lungs hidden: 1 training to run, 30 epochs each" in out and "1/1" in err
    assert result.auc_trained_hidden >= 0.9
    assert "these data let the labels be read outside the lungs" in result.verdict
    table = result.table()
    assert list(table.index) == ["lungs visible", "lungs hidden", "trained and tested with lungs hidden"]
    assert (table["n_images"] == len(data["test"])).all()


def test_run_shortcut_tests_and_the_report(marked, marked_model):
    """What the CLI and notebook 04 call: the four tests from the model's own settings (the runs
    trained above are found and loaded), written as JSON and Markdown."""
    root, data = marked
    results = shortcuts.run_shortcut_tests(root / "models" / "run", data, root / "shortcuts", n_boot=N_BOOT)
    assert [r.name for r in results] == ["source prediction", "lungs hidden", "leave one source out", "saliency"]
    files = shortcuts.write_shortcut_report(results, root / "reports" / "run")
    report = json.loads(files["json"].read_text(), parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    assert [t["test"] for t in report["tests"]] == [r.name for r in results]
    assert all(t["verdict"] for t in report["tests"]) and report["tests"][0]["shortcut_found"]
    text = files["md"].read_text()
    assert "Research software, not a diagnostic device." in text
    for r in results:
        assert r.verdict in text
