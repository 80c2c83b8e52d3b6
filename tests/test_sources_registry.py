"""xraylib.sources.SOURCES: one record per source, read by config, manifest, audit, plots, shortcuts,
the model card and the sample data; a fifth source added as one record flows through all of them."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from xraylib import audit, config, manifest, modelcard, plots, sources, synthetic, views
from xraylib.errors import ConfigError
from xraylib.sources import SOURCE_COLUMNS, SOURCES, Source, SourceTable

# ---- the registry as it ships -----------------------------------------------------------------


def test_names_keys_and_folders_are_unique() -> None:
    for field in ("name", "drive_key", "folder"):
        values = [getattr(source, field) for source in SOURCES]
        assert len(set(values)) == len(values), field


def test_drive_paths_has_one_field_per_source_in_registry_order() -> None:
    # DrivePaths keeps explicit fields (they are drive_paths.yaml's keys): this is what ties them to the records.
    fields = [f.name for f in dataclasses.fields(config.DrivePaths)]
    assert fields == ["output_dir"] + [source.drive_key for source in SOURCES]
    assert config.SOURCE_KEYS == tuple(source.drive_key for source in SOURCES)


def test_sample_data_has_one_field_per_source_with_a_layout() -> None:
    fields = [f.name for f in dataclasses.fields(synthetic.SampleData)]
    with_layout = [source.drive_key for source in SOURCES if source.sample_writer is not None]
    assert [f for f in fields if f not in ("root", "counts")] == with_layout
    assert [source.name for source in SOURCES if source.sample_writer is None] == ["nih"]


def test_each_reader_labels_its_rows_with_its_record_name(tmp_path: Path) -> None:
    sample = synthetic.write_sample_data(tmp_path / "sample", n_patients=4, image_size=64)
    for source in SOURCES:
        if source.sample_writer is None:
            continue
        table = source.reader(sample.root / source.folder)
        assert table.source == source.name and set(table.rows["source"]) == {source.name}
        assert table.rows["patient_id"].str.startswith(f"{source.name}:").all()


def test_the_old_tables_are_views_of_the_records() -> None:
    assert audit.SOURCE_POPULATION == {"kaggle": (1.0, 5.0)}
    assert views.HOSPITAL_GROUPS == {"nih": "nih+rsna", "rsna": "nih+rsna"}
    assert list(sources.SOURCE_NOTES) == ["ieee8023", "rsna", "kaggle", "nih", "nlm-shenzhen", "nlm-montgomery"]
    assert "children aged 1 to 5" in sources.SOURCE_NOTES["kaggle"]
    assert [source.name for source in SOURCES if source.children] == ["kaggle"]


# ---- a fifth source -----------------------------------------------------------------------------

FIFTH_NOTES = "Testville chest films: adults aged 60 to 90, one hospital that shares its archive with NIH"


def _write_fifth(root: Path) -> Path:
    """``<root>/<LABEL>/<patient>_<k>.png``: six patients, two films each, real PNGs."""
    for i in range(6):
        label = ("NORMAL", "PNEUMONIA")[i % 2]
        (root / label).mkdir(parents=True, exist_ok=True)
        for k in range(2):
            rng = np.random.default_rng(10 * i + k)  # distinct bytes: the manifest drops exact copies
            image = cv2.GaussianBlur(rng.integers(0, 256, (64, 64), dtype=np.uint8), (0, 0), 2)
            assert cv2.imwrite(str(root / label / f"TV{i:03d}_{k}.png"), image)
    return root


def read_fifth(root: str | os.PathLike) -> SourceTable:
    """The fake source's reader: the folder is the label, the file name's prefix the patient."""
    rows = []
    for path in sorted(Path(root).glob("*/*.png")):
        patient = path.stem.split("_")[0]
        rows.append({"path": str(path), "label": path.parent.name.lower(), "source": "fifth",
                     "patient_id": f"fifth:{patient}", "view": "PA", "sex": None, "age": None,
                     "finding": path.parent.name, "modality": "X-ray", "source_split": None, "image_id": path.name})
    return SourceTable("fifth", pd.DataFrame(rows, columns=SOURCE_COLUMNS))


FIFTH = Source(name="fifth", drive_key="testville_chest", folder="testville-chest", reader=read_fifth,
               notes=FIFTH_NOTES, site="nih+rsna", population_ages=(60.0, 90.0))


@pytest.fixture
def with_fifth(monkeypatch: pytest.MonkeyPatch) -> Source:
    monkeypatch.setattr(sources, "SOURCES", SOURCES + (FIFTH,))
    return FIFTH


def test_a_fifth_source_flows_through_manifest_audit_plots_and_shortcuts(tmp_path: Path, with_fifth: Source) -> None:
    root = _write_fifth(tmp_path / with_fifth.folder)

    # Manifest: found by its drive key, read by its reader, files checked like any other source's.
    built = manifest.build_manifest({with_fifth.drive_key: root}, task="pneumonia_vs_normal", progress=False)
    frame = built.frame
    assert len(frame) == 12 and set(frame["source"]) == {"fifth"}
    assert frame["patient_id"].nunique() == 6 and set(frame["file_format"]) == {"png"}
    assert built.report.per_source["fifth"]["kept"] == 12

    # Audit: no per-image ages, so the age checks use the record's population; its notes are printed.
    report = audit.audit(frame)
    ages = report.tables["ages"].set_index(["label", "source"])
    assert ages.loc[("normal", "fifth"), "range_low"] == 60.0 and ages.loc[("normal", "fifth"), "range_high"] == 90.0
    assert "documented population" in ages.loc[("normal", "fifth"), "range_basis"]
    as_dict = report.to_dict()
    assert as_dict["source_notes"] == {"fifth": FIFTH_NOTES}
    assert as_dict["source_population_years"]["fifth"] == [60.0, 90.0]
    assert FIFTH_NOTES in report.to_markdown()

    # The age plot draws the documented band.
    figure = plots.age_distribution(frame)
    assert any("60-90 years" in text.get_text() for text in figure.axes[0].texts)
    plots.plt.close(figure)

    # Shortcut tests: the fifth source shares NIH/RSNA's site, so it is grouped with RSNA when both are present.
    names = pd.Series(["fifth", "rsna", "kaggle", "fifth"])
    assert views.source_group(names, None).tolist() == ["nih+rsna", "nih+rsna", "kaggle", "nih+rsna"]
    alone = pd.Series(["fifth", "kaggle"])  # a group with one source present keeps the source's name
    assert views.source_group(alone, None).tolist() == ["fifth", "kaggle"]


def test_the_model_card_warns_about_children_from_the_record(with_fifth: Source, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = pd.DataFrame({"label": ["normal", "pneumonia"], "source": ["fifth", "fifth"], "view": ["PA", "PA"]})
    assert "children against adults" not in modelcard._applies_here(rows, None, {})  # adults aged 60 to 90
    pediatric = dataclasses.replace(with_fifth, population_ages=(2.0, 12.0))
    monkeypatch.setattr(sources, "SOURCES", SOURCES + (pediatric,))
    assert pediatric.children
    assert "children against adults" in modelcard._applies_here(rows, None, {})


def test_drive_paths_does_not_grow_a_field_for_an_unregistered_key(tmp_path: Path, with_fifth: Source) -> None:
    # DrivePaths' fields are fixed when xraylib is imported: a fifth source also needs its field there,
    # which test_drive_paths_has_one_field_per_source_in_registry_order asks for.
    (tmp_path / "paths.yaml").write_text(f"output_dir: out\n{with_fifth.drive_key}: {with_fifth.folder}\n")
    with pytest.raises(ConfigError, match=f"unknown key.*{with_fifth.drive_key}"):
        config.load_drive_paths(tmp_path / "paths.yaml")
