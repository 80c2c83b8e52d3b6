"""Where things are: the one YAML file of paths, the output layout, and the shared test data.

Every path xraylib reads or writes comes from here. ``drive_paths.yaml`` names the source
folders (on Google Drive in Colab) and the output folder; relative paths in it are taken
relative to the YAML file's own folder. Nothing in the library hard-codes a Drive path.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from .errors import ConfigError
from .sources import SOURCES

#: The source keys of drive_paths.yaml, in the order the manifest lists sources (a view of ``sources.SOURCES``).
SOURCE_KEYS = tuple(source.drive_key for source in SOURCES)

#: Where Colab mounts Google Drive (``drive.mount("/content/drive")``); "My Drive" is ``MyDrive`` inside it.
#: ``$XRAYLIB_DRIVE_MOUNT`` moves it (the notebooks' setup cell reads the same variable; the Colab test mounts a
#: temporary "Drive" there).
DRIVE_MOUNT = Path(os.environ.get("XRAYLIB_DRIVE_MOUNT", "/content/drive"))


def my_drive() -> Path:
    """Colab's "My Drive" folder (``/content/drive/MyDrive``)."""
    return DRIVE_MOUNT / "MyDrive"


def drive_mounted() -> bool:
    """Whether Google Drive is mounted (its "My Drive" folder is there)."""
    return os.path.ismount(DRIVE_MOUNT) or my_drive().is_dir()


def drive_hint(path: str | os.PathLike) -> str:
    """A sentence for error messages about ``path``: how to mount Drive when ``path`` is on an unmounted Drive.

    Empty for paths elsewhere, or when Drive is mounted (then the path itself is wrong).
    """
    path = Path(path)
    on_drive = path == DRIVE_MOUNT or DRIVE_MOUNT in path.parents
    if not on_drive or drive_mounted():
        return ""
    return (f" Is Google Drive mounted? {DRIVE_MOUNT} is not mounted: in Colab run "
            f"`from google.colab import drive; drive.mount('{DRIVE_MOUNT}')` (the notebooks' first cell does it), "
            "then run this again.")


@dataclass(frozen=True)
class DrivePaths:
    """The source folders (``None`` where a source is not used) and the output folder.

    One field per source, named by its ``drive_key`` (:data:`xraylib.sources.SOURCES`; a test checks
    that they match), in registry order: these are the keys drive_paths.yaml accepts.
    """

    output_dir: Path
    covid_chestxray_dataset: Path | None = None
    rsna_pneumonia: Path | None = None
    chest_xray_pneumonia: Path | None = None
    nih_chestxray14: Path | None = None
    nlm_shenzhen: Path | None = None
    nlm_montgomery: Path | None = None

    def sources(self) -> dict[str, Path]:
        """The configured sources, ``{key: folder}``, in SOURCE_KEYS order."""
        folders = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "output_dir"}
        return {key: folder for key, folder in folders.items() if folder is not None}

    def check_sources_exist(self) -> None:
        """Raise :class:`ConfigError` naming the first configured source folder that is missing.

        Also refuses an ``output_dir`` on an unmounted Google Drive: written there, outputs would go
        to the runtime's own disk (and block the mount) instead of Drive, and be lost at the next disconnect.
        """
        for key, folder in self.sources().items():
            if not folder.is_dir():
                raise ConfigError(f"{key}: folder not found: {folder}.{drive_hint(folder)} "
                                  "Fix the path in drive_paths.yaml or set it to null.")
        if hint := drive_hint(self.output_dir):
            raise ConfigError(f"output_dir: {self.output_dir} is on Google Drive, which is not mounted: outputs "
                              f"written now would be lost.{hint}")

    @property
    def layout(self) -> "OutputLayout":
        return OutputLayout(self.output_dir)


@dataclass(frozen=True)
class OutputLayout:
    """Where each stage writes under the output folder. Each stage reads the previous one's files."""

    root: Path

    @property
    def sample_data(self) -> Path:
        return self.root / "sample_data"

    @property
    def sample_site(self) -> Path:
        """A deliberately shifted "new site" of sample images, to try calibration on (:func:`xraylib.synthetic.write_site_images`)."""
        return self.root / "sample_site"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.csv"

    @property
    def manifest_report(self) -> Path:
        return self.root / "manifest_report.json"

    @property
    def manifest_files(self) -> Path:
        """What each source file read for the manifest gave (:func:`xraylib.manifest.build_manifest`'s checkpoint)."""
        return self.root / "manifest_files.jsonl"

    @property
    def preprocessed(self) -> Path:
        return self.root / "preprocessed"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def reports(self) -> Path:
        return self.root / "reports"


def load_drive_paths(yaml_path: str | os.PathLike, output_dir: str | os.PathLike | None = None) -> DrivePaths:
    """Read ``drive_paths.yaml``. ``output_dir``, if given, overrides the file's ``output_dir``.

    Raises :class:`ConfigError` for a missing file, bad YAML, an unknown key, or a missing
    ``output_dir``; the message names the file and the key.
    """
    yaml_path = Path(yaml_path)
    if not yaml_path.is_file():
        raise ConfigError(
            f"{yaml_path}: file not found.{drive_hint(yaml_path)} "
            "Copy drive_paths.example.yaml to drive_paths.yaml and set your folders."
        )
    try:
        data = yaml.safe_load(yaml_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{yaml_path}: not valid YAML ({exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{yaml_path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{yaml_path}: expected 'key: path' lines, got {type(data).__name__}")
    known = {f.name for f in fields(DrivePaths)}
    unknown = sorted(str(key) for key in set(data) - known)  # keys may be numbers or null in YAML
    if unknown:
        raise ConfigError(f"{yaml_path}: unknown key(s) {unknown}; known keys are {sorted(known)}")
    base = yaml_path.resolve().parent
    resolved = {k: _resolve(v, base, yaml_path, k) for k, v in data.items()}
    if output_dir is not None:
        resolved["output_dir"] = Path(output_dir).expanduser().resolve()
    if resolved.get("output_dir") is None:
        raise ConfigError(f"{yaml_path}: 'output_dir' is not set; name the folder where xraylib writes its outputs")
    return DrivePaths(**resolved)


def _resolve(value: object, base: Path, yaml_path: Path, key: str) -> Path | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{yaml_path}: '{key}' must be a path (text), got {value!r}")
    path = Path(os.path.expandvars(value)).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def sample_drive_paths(output_dir: str | os.PathLike) -> DrivePaths:
    """Paths for the built-in sample data: the sources with a sample layout under ``output_dir/sample_data``."""
    output_dir = Path(output_dir).expanduser().resolve()
    sample = OutputLayout(output_dir).sample_data
    found = {s.drive_key: sample / s.folder for s in SOURCES if s.sample_writer is not None}
    return DrivePaths(output_dir=output_dir, **found)


def folder_drive_paths(data_root: str | os.PathLike, output_dir: str | os.PathLike) -> DrivePaths:
    """Paths for a folder laid out like ``../shared/data``: each source under its usual folder name.

    Sources whose folder is absent are left out.
    """
    data_root = Path(data_root).expanduser().resolve()
    found = {s.drive_key: data_root / s.folder for s in SOURCES if (data_root / s.folder).is_dir()}
    if not found:
        raise ConfigError(f"{data_root}: none of the source folders {sorted(s.folder for s in SOURCES)} is there")
    return DrivePaths(output_dir=Path(output_dir).expanduser().resolve(), **found)


def repository() -> Path | None:
    """The xraylib folder that relative settings resolve against: ``$XRAYLIB_HOME`` (the notebooks' Colab setup cell
    sets it to the copy on Drive it installed from), else the source checkout this package runs from (an editable
    install, or ``PYTHONPATH``); ``None`` for an installed package without either."""
    if home := os.environ.get("XRAYLIB_HOME"):
        return Path(home).expanduser().resolve()
    checkout = Path(__file__).resolve().parents[1]
    return checkout if (checkout / "pyproject.toml").is_file() else None


def resolve_setting(path: str | os.PathLike) -> Path:
    """A path setting as the notebooks and the CLI mean it: ``~`` and ``$VARIABLES`` expanded, and a relative path taken
    relative to the xraylib folder (:func:`repository`), so that it means the same whatever the working directory
    (Colab's is ``/content``); without a repository, relative to the working directory."""
    path = Path(os.path.expandvars(str(path))).expanduser()
    if path.is_absolute():
        return path
    return ((repository() or Path.cwd()) / path).resolve()


def default_output_root() -> Path:
    """The folder outputs go to unless a setting says otherwise: in Colab ``MyDrive/xraylib_outputs`` on Google Drive
    (so that every notebook, each in its own runtime, finds the others' files, and a disconnect loses nothing);
    locally ``outputs/`` in the xraylib folder, else ``./xraylib_outputs``."""
    if in_colab():
        return my_drive() / "xraylib_outputs"
    root = repository()
    return root / "outputs" if root is not None else Path.cwd() / "xraylib_outputs"


def default_sample_output_dir() -> Path:
    """Where sample-data outputs go by default: ``sample/`` in :func:`default_output_root`."""
    return default_output_root() / "sample"


def default_drive_paths_file() -> Path:
    """``drive_paths.yaml`` in the xraylib folder (:func:`repository`); without one, in Colab
    ``MyDrive/xraylib/drive_paths.yaml``, else in the working directory."""
    root = repository()
    if root is not None:
        return root / "drive_paths.yaml"
    return (my_drive() / "xraylib" if in_colab() else Path.cwd()) / "drive_paths.yaml"


#: Where ``make demo`` (``python -m xraylib demo``) writes, under :func:`default_output_root`.
DEMO_OUTPUT = "demo"


def find_trained_model(layout: "OutputLayout", run_name: str, model_path: str | os.PathLike | None = None
                       ) -> tuple[Path, str]:
    """The model a notebook should load, and a note for the user ("" when it is the one asked for).

    ``model_path`` (a run folder, ``.keras`` or ``.h5``) if given; else run ``run_name`` under ``layout.models``; else
    the most recent other run there; else the model ``make demo`` trained. Raises :class:`ConfigError` saying to run
    notebook 03 first when there is none.
    """
    if model_path is not None:
        path = resolve_setting(model_path)
        if not path.exists():
            raise ConfigError(f"MODEL_PATH: {path} not found.{drive_hint(path)} Set it to a run folder, a model.keras "
                              "or a model.h5 (with its model.json), or to None to use notebook 03's run.")
        return path, ""
    expected = layout.models / run_name
    if (expected / "model.json").is_file():
        return expected, ""
    others = sorted((p.parent for p in layout.models.glob("*/model.json")), key=lambda p: p.stat().st_mtime)
    demo = default_output_root() / DEMO_OUTPUT / "models" / "run"
    candidates = others[-1:] + ([demo] if (demo / "model.json").is_file() else [])
    if not candidates:
        raise ConfigError(f"No trained model yet: run notebook 03 first (it trains and saves run {run_name!r} in "
                          f"{layout.models}), or `make demo`, or set MODEL_PATH to a run folder, a model.keras or a "
                          f"model.h5.{drive_hint(layout.root)}")
    found = candidates[0]
    return found, (f"Run {run_name!r} is not in {layout.models} (notebook 03 trains it): using the model in {found} "
                   "instead. Set RUN_NAME or MODEL_PATH to choose another.")


def resolve_paths(data: str = "sample", drive_paths_yaml: str | os.PathLike | None = None,
                  output_dir: str | os.PathLike | None = None) -> DrivePaths:
    """The paths a notebook works with, from its ``DATA`` parameter.

    ``data``: "sample" (the built-in synthetic data under the output folder), "drive" (the folders in
    ``drive_paths_yaml``, by default :func:`default_drive_paths_file`) or a folder laid out like ``../shared/data``.
    ``output_dir`` overrides the default output folder (for "drive", the YAML's ``output_dir``). Relative paths are
    taken relative to the xraylib folder (:func:`resolve_setting`), not the working directory.
    """
    output_dir = resolve_setting(output_dir) if output_dir is not None else None
    if data == "sample":
        return sample_drive_paths(output_dir or default_sample_output_dir())
    if data == "drive":
        return load_drive_paths(resolve_setting(drive_paths_yaml or default_drive_paths_file()), output_dir=output_dir)
    folder = resolve_setting(str(data))
    if folder.is_dir():
        if output_dir is None:
            raise ConfigError(f"DATA is the folder {folder}: also set OUTPUT_DIR, where the outputs go")
        return folder_drive_paths(folder, output_dir)
    raise ConfigError(f"DATA must be 'sample', 'drive' or an existing folder, got {data!r}.{drive_hint(folder)}")


def shared_data_dir() -> Path | None:
    """The real test/benchmark data (``$XRAYLIB_SHARED_DATA``, default ``../shared/data`` beside the repo).

    Returns ``None`` when the folder is absent; callers skip with a message.
    """
    env = os.environ.get("XRAYLIB_SHARED_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return path if path.is_dir() else None


def shared_weights_dir() -> Path | None:
    """Real ImageNet weights kept beside the project (``$XRAYLIB_SHARED_WEIGHTS``, default ``../shared/weights``)."""
    env = os.environ.get("XRAYLIB_SHARED_WEIGHTS")
    path = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "weights"
    return path if path.is_dir() else None


def in_colab() -> bool:
    """True inside Google Colab."""
    return "google.colab" in sys.modules
