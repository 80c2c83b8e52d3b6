"""drive_paths.yaml, the output layout and the shared-data setting (xraylib.config)."""
from __future__ import annotations

from pathlib import Path

import pytest

from xraylib import config
from xraylib.config import DrivePaths, load_drive_paths
from xraylib.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _yaml(folder: Path, text: str, name: str = "drive_paths.yaml") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _config_error(yaml_path: Path, *words: str, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_drive_paths(yaml_path, **kwargs)
    message = str(info.value)
    for word in (str(yaml_path), *words):
        assert word in message, message
    return message


# --- load_drive_paths -----------------------------------------------------------------------


def test_absolute_and_relative_paths(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths follow the YAML's folder, not the working folder
    absolute = tmp_path / "datasets" / "covid"
    yaml_path = _yaml(tmp_path / "project", f"covid_chestxray_dataset: {absolute}\nrsna_pneumonia: ../data/rsna\n"
                                            "output_dir: outputs\n")
    paths = load_drive_paths(yaml_path)
    assert paths.covid_chestxray_dataset == absolute
    assert paths.rsna_pneumonia == (tmp_path / "data" / "rsna").resolve()
    assert paths.output_dir == (tmp_path / "project" / "outputs").resolve()
    assert paths.chest_xray_pneumonia is None and paths.nih_chestxray14 is None


def test_relative_yaml_path_is_taken_from_the_working_folder(tmp_path, monkeypatch):
    _yaml(tmp_path / "cfg", "output_dir: out\n")
    monkeypatch.chdir(tmp_path)
    assert load_drive_paths("cfg/drive_paths.yaml").output_dir == (tmp_path / "cfg" / "out").resolve()


def test_home_and_environment_variables_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XRAYLIB_TEST_DATA", str(tmp_path / "drive"))
    yaml_path = _yaml(tmp_path, "covid_chestxray_dataset: ~/datasets/covid\n"
                                "rsna_pneumonia: $XRAYLIB_TEST_DATA/rsna\n"
                                "chest_xray_pneumonia: ${XRAYLIB_TEST_DATA}/kaggle\n"
                                "output_dir: ~/outputs\n")
    paths = load_drive_paths(yaml_path)
    assert paths.covid_chestxray_dataset == tmp_path / "home" / "datasets" / "covid"
    assert paths.rsna_pneumonia == tmp_path / "drive" / "rsna"
    assert paths.chest_xray_pneumonia == tmp_path / "drive" / "kaggle"
    assert paths.output_dir == tmp_path / "home" / "outputs"


def test_null_and_empty_sources_are_left_out(tmp_path):
    yaml_path = _yaml(tmp_path, "covid_chestxray_dataset: null\nrsna_pneumonia: ''\nchest_xray_pneumonia: ~\n"
                                f"nih_chestxray14: {tmp_path / 'nih'}\noutput_dir: out\n")
    paths = load_drive_paths(yaml_path)
    assert paths.covid_chestxray_dataset is None and paths.rsna_pneumonia is None
    # In YAML a bare ~ is null, not the home folder.
    assert paths.chest_xray_pneumonia is None
    assert paths.sources() == {"nih_chestxray14": tmp_path / "nih"}


def test_output_dir_argument_overrides_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    yaml_path = _yaml(tmp_path / "cfg", "output_dir: from_file\n")
    assert load_drive_paths(yaml_path, output_dir="given").output_dir == tmp_path / "given"
    # and it stands in for a missing output_dir
    bare = _yaml(tmp_path / "cfg", "rsna_pneumonia: null\n", name="bare.yaml")
    assert load_drive_paths(bare, output_dir=tmp_path / "x").output_dir == tmp_path / "x"


def test_sources_are_listed_in_source_key_order(tmp_path):
    lines = [f"{key}: /data/{key}" for key in reversed(config.SOURCE_KEYS)]
    paths = load_drive_paths(_yaml(tmp_path, "\n".join(lines) + "\noutput_dir: out\n"))
    assert list(paths.sources()) == list(config.SOURCE_KEYS)


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    # A typo users make: the Kaggle folder name instead of the key.
    yaml_path = _yaml(tmp_path, "chest_xray: /data/kaggle\noutput_dir: out\n")
    message = _config_error(yaml_path, "['chest_xray']")
    assert "chest_xray_pneumonia" in message  # the known keys are listed, so the fix is visible


def test_unknown_keys_of_mixed_types_are_reported(tmp_path):
    # YAML reads "2020: ..." as a number key; sorting it with text keys must not crash.
    _config_error(_yaml(tmp_path, "2020: /data/old\ncovid: /data/covid\noutput_dir: out\n"), "2020", "covid")


def test_missing_output_dir(tmp_path):
    _config_error(_yaml(tmp_path, "rsna_pneumonia: /data/rsna\n"), "output_dir")
    _config_error(_yaml(tmp_path, "# only comments\n", name="empty.yaml"), "output_dir")


def test_missing_file(tmp_path):
    _config_error(tmp_path / "drive_paths.yaml", "not found", "drive_paths.example.yaml")
    tmp_path.joinpath("folder.yaml").mkdir()
    _config_error(tmp_path / "folder.yaml", "not found")


@pytest.mark.parametrize(
    "text, words",
    [
        ("output_dir: [unclosed\n", ["YAML"]),
        ("output_dir: out\n\tcovid: x\n", ["YAML"]),
        ("- /data/covid\n- /data/rsna\n", ["key: path", "list"]),
        ("output_dir: 42\n", ["output_dir", "42"]),
        ("output_dir: out\nrsna_pneumonia: [a, b]\n", ["rsna_pneumonia"]),
    ],
    ids=["unclosed", "tab", "list", "number", "list-value"],
)
def test_bad_yaml_is_a_config_error_naming_the_file(tmp_path, text, words):
    _config_error(_yaml(tmp_path, text), *words)


def test_non_utf8_file_is_a_config_error(tmp_path):
    # Saved as Latin-1 by a Windows editor, with an accented folder name.
    path = tmp_path / "drive_paths.yaml"
    path.write_bytes("output_dir: /data/Données\n".encode("latin-1"))
    _config_error(path, "UTF-8")


def test_example_yaml_loads_and_points_at_drive(tmp_path):
    example = REPO / "drive_paths.example.yaml"
    if not example.is_file():
        pytest.skip(f"{example} not found")
    paths = load_drive_paths(example)
    assert all(str(folder).startswith("/content/drive/") for folder in paths.sources().values())
    assert str(paths.output_dir).startswith("/content/drive/")
    if not Path("/content/drive").exists():
        with pytest.raises(ConfigError, match="Is Google Drive mounted"):
            paths.check_sources_exist()


# --- DrivePaths -----------------------------------------------------------------------------


def test_check_sources_exist_names_the_missing_folder(tmp_path):
    (tmp_path / "covid").mkdir()
    paths = DrivePaths(output_dir=tmp_path / "out", covid_chestxray_dataset=tmp_path / "covid",
                       rsna_pneumonia=tmp_path / "no-rsna-here")
    with pytest.raises(ConfigError) as info:
        paths.check_sources_exist()
    message = str(info.value)
    assert "rsna_pneumonia" in message and str(tmp_path / "no-rsna-here") in message
    assert "covid" not in message.replace(str(tmp_path), "")
    (tmp_path / "no-rsna-here").mkdir()
    paths.check_sources_exist()  # all there now: no error


def test_a_file_is_not_a_source_folder(tmp_path):
    (tmp_path / "rsna.zip").write_bytes(b"PK\x03\x04")
    with pytest.raises(ConfigError, match="rsna.zip"):
        DrivePaths(output_dir=tmp_path, rsna_pneumonia=tmp_path / "rsna.zip").check_sources_exist()


def test_output_layout(tmp_path):
    layout = DrivePaths(output_dir=tmp_path).layout
    assert layout.manifest == tmp_path / "manifest.csv"
    assert layout.manifest_report.parent == tmp_path
    assert {layout.preprocessed, layout.models, layout.reports, layout.sample_data} == {
        tmp_path / "preprocessed", tmp_path / "models", tmp_path / "reports", tmp_path / "sample_data"}


def test_sample_drive_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = config.sample_drive_paths("out")
    assert paths.output_dir == tmp_path / "out"
    sample = tmp_path / "out" / "sample_data"
    assert paths.sources() == {
        "covid_chestxray_dataset": sample / "covid-chestxray-dataset",
        "rsna_pneumonia": sample / "rsna-pneumonia",
        "chest_xray_pneumonia": sample / "chest-xray-pneumonia",
        "nlm_shenzhen": sample / "nlm-tb" / "ChinaSet_AllFiles",
        "nlm_montgomery": sample / "nlm-tb" / "MontgomerySet",
    }
    assert paths.layout.sample_data == sample


def test_folder_drive_paths_takes_the_folders_that_are_there(tmp_path):
    (tmp_path / "data" / "rsna-pneumonia").mkdir(parents=True)
    (tmp_path / "data" / "nih-chestxray14").mkdir()
    (tmp_path / "data" / "covid-chestxray-dataset.zip").write_bytes(b"PK\x03\x04")  # not a folder
    paths = config.folder_drive_paths(tmp_path / "data", tmp_path / "out")
    assert paths.sources() == {"rsna_pneumonia": tmp_path / "data" / "rsna-pneumonia",
                               "nih_chestxray14": tmp_path / "data" / "nih-chestxray14"}
    assert paths.output_dir == tmp_path / "out"


def test_folder_drive_paths_with_no_source_folder(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(ConfigError) as info:
        config.folder_drive_paths(tmp_path / "data", tmp_path / "out")
    assert str(tmp_path / "data") in str(info.value) and "covid-chestxray-dataset" in str(info.value)


@pytest.mark.shared_data
def test_folder_drive_paths_on_the_shared_data(shared_data, tmp_path):
    paths = config.folder_drive_paths(shared_data, tmp_path)
    # The Montgomery set is not in ../shared/data: its folder is absent, so its key is left out.
    assert set(paths.sources()) == set(config.SOURCE_KEYS) - {"nlm_montgomery"}
    assert paths.nlm_shenzhen == (shared_data / "nlm-tb" / "ChinaSet_AllFiles").resolve()  # (../shared may be a link)
    paths.check_sources_exist()


# --- the shared data setting ----------------------------------------------------------------


def test_shared_data_dir_honours_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("XRAYLIB_SHARED_DATA", str(tmp_path))
    assert config.shared_data_dir() == tmp_path
    monkeypatch.setenv("XRAYLIB_SHARED_DATA", str(tmp_path / "absent"))
    assert config.shared_data_dir() is None  # callers skip with a message


def test_shared_data_dir_default_is_beside_the_repo(monkeypatch):
    monkeypatch.delenv("XRAYLIB_SHARED_DATA", raising=False)
    default = REPO.parent / "shared" / "data"
    assert config.shared_data_dir() == (default if default.is_dir() else None)


def test_shared_weights_dir_honours_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("XRAYLIB_SHARED_WEIGHTS", str(tmp_path))
    assert config.shared_weights_dir() == tmp_path
    monkeypatch.setenv("XRAYLIB_SHARED_WEIGHTS", str(tmp_path / "absent"))
    assert config.shared_weights_dir() is None


# --- the same settings in Colab and locally --------------------------------------------------


@pytest.fixture
def colab(tmp_path, monkeypatch) -> Path:
    """A Colab runtime with Drive mounted at a temporary folder: ``google.colab`` imported, ``MyDrive`` there."""
    import sys
    import types

    mount = tmp_path / "content" / "drive"
    (mount / "MyDrive").mkdir(parents=True)
    monkeypatch.setattr(config, "DRIVE_MOUNT", mount)
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.chdir(tmp_path / "content")
    return mount / "MyDrive"


def test_relative_notebook_settings_resolve_against_the_repository_not_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("XRAYLIB_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert config.repository() == REPO
    assert config.resolve_setting("drive_paths.yaml") == REPO / "drive_paths.yaml"
    assert config.default_drive_paths_file() == REPO / "drive_paths.yaml"
    assert config.resolve_paths("sample", output_dir="outputs/x").output_dir == REPO / "outputs" / "x"
    assert config.resolve_paths("sample").output_dir == REPO / "outputs" / "sample"
    copy = tmp_path / "copy_of_xraylib"  # the Colab setup cell points XRAYLIB_HOME at the copy it installed from
    monkeypatch.setenv("XRAYLIB_HOME", str(copy))
    assert config.resolve_setting("drive_paths.yaml") == copy / "drive_paths.yaml"
    assert config.resolve_setting(tmp_path / "abs") == tmp_path / "abs"
    with pytest.raises(ConfigError, match=str(copy / "drive_paths.yaml")):
        config.resolve_paths("drive")


def test_in_colab_outputs_go_to_drive_so_each_notebook_finds_the_others(colab, monkeypatch):
    monkeypatch.delenv("XRAYLIB_HOME", raising=False)
    assert config.in_colab() and config.drive_mounted()
    paths = config.resolve_paths("sample")
    assert paths.output_dir == colab / "xraylib_outputs" / "sample"
    assert paths.layout.sample_data == colab / "xraylib_outputs" / "sample" / "sample_data"
    assert config.drive_hint(paths.output_dir) == ""  # on a mounted Drive: no complaint


def test_find_trained_model_says_to_run_notebook_03_and_finds_the_demo_model(tmp_path, monkeypatch):
    monkeypatch.setenv("XRAYLIB_HOME", str(tmp_path / "xraylib"))
    layout = config.OutputLayout(tmp_path / "xraylib" / "outputs" / "sample")
    with pytest.raises(ConfigError) as info:
        config.find_trained_model(layout, "vgg16")
    assert str(info.value).startswith("No trained model yet: run notebook 03 first") and "make demo" in str(info.value)

    demo = tmp_path / "xraylib" / "outputs" / "demo" / "models" / "run"  # what `make demo` writes
    demo.mkdir(parents=True)
    (demo / "model.json").write_text("{}")
    found, note = config.find_trained_model(layout, "vgg16")
    assert found == demo and "notebook 03" in note and str(demo) in note

    own = layout.models / "vgg16"
    own.mkdir(parents=True)
    (own / "model.json").write_text("{}")
    assert config.find_trained_model(layout, "vgg16") == (own, "")
    assert config.find_trained_model(layout, "other")[0] == own  # another run of this data before the demo's
    with pytest.raises(ConfigError, match="MODEL_PATH: .*nowhere.keras not found"):
        config.find_trained_model(layout, "vgg16", model_path=tmp_path / "nowhere.keras")
