"""Run the numbered notebooks as a Colab user runs them, for the tests and for ``make notebooks``.

What Colab does, and how this reproduces it without Colab:

- **Drive.** A temporary folder stands in for ``/content/drive`` (``XRAYLIB_DRIVE_MOUNT`` moves the mount point, for
  the notebooks' setup cell and :mod:`xraylib.config` alike); ``MyDrive/xraylib`` holds a copy of this repository,
  as a user puts it there (the files git tracks, or would track). Only Drive is shared between notebooks.
- **A fresh runtime per notebook.** Each notebook runs in its own kernel, in its own new virtual environment where
  ``xraylib`` is *not* importable: it sees the test environment's packages (TensorFlow, pandas, ...) through a
  ``.pth`` line, which does not run that environment's own ``.pth`` files, so the editable install under test stays
  invisible. The notebook's setup cell must find xraylib on "Drive" and ``pip install`` it, as in Colab (offline here:
  ``--no-deps``, no build isolation, through pip's own environment variables).
- **google.colab.** A stand-in package ``google.colab`` with ``drive.mount``, imported at start-up as Colab's runtime
  does, so ``"google.colab" in sys.modules`` is true.
- **Working directory** ``/content`` (here: the temporary ``content`` folder), not the repository.

The kernels run under nbval (``--nbval-lax``): every cell must run, and the cells marked ``# NBVAL_CHECK_OUTPUT`` must
print what the committed notebook shows (volatile parts sanitised by ``tests/nbval_sanitize.cfg``).
``python tests/notebook_runner.py`` (``make notebooks``) executes the same way and stores the outputs in
``notebooks/*.ipynb``, with the temporary Drive shown as ``/content/drive``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
SANITIZE = ROOT / "tests" / "nbval_sanitize.cfg"
CHECK_MARK = "# NBVAL_CHECK_OUTPUT"
KERNEL_NAME = "xraylib-colab-test"

#: Overrides per notebook, injected after its ``parameters`` cell (papermill's convention); the defaults are what a
#: Colab user runs (``DATA = "sample"``: the README's Colab quick path). Small, so that the five run in minutes.
PARAMETERS = {
    "01_dataset_creation": {"SAMPLE_PATIENTS": 30, "SEED": 0, "WORKERS": 4},
    "02_preprocessing": {"IMAGE_SIZE": 64, "WORKERS": 2},
    "03_training": {"RUN_NAME": "nbtest", "BACKBONE": "small_cnn", "WEIGHTS": None, "EPOCHS": 2},
    "04_evaluation": {"RUN_NAME": "nbtest", "N_BOOT": 100},
    "05_check_your_own_images": {"RUN_NAME": "nbtest", "MAX_IMAGES": 4, "SITE": "sample-site", "SITE_NORMALS": "sample"},
}
#: ``make notebooks`` trains longer, so that the stored curves and figures show a model that learned something.
#: Only unchecked cells depend on it (the checked cells of 01 and 02 come before training).
REFRESH_OVERRIDES = {"02_preprocessing": {"IMAGE_SIZE": 128}, "03_training": {"EPOCHS": 30}}

#: ``google.colab`` as far as the notebooks use it. Drive is already in place: ``mount`` checks the mount point.
STANDIN_DRIVE = '''"""Stand-in for google.colab.drive (tests/notebook_runner.py): the test's Drive folder is already in place."""
import os


def mount(mountpoint, force_remount=False, timeout_ms=120000, readonly=False):
    expected = os.environ["XRAYLIB_DRIVE_MOUNT"]
    if os.path.realpath(mountpoint) != os.path.realpath(expected) or not os.path.isdir(os.path.join(expected, "MyDrive")):
        raise ValueError(f"mount point {mountpoint!r}: the test's Drive is at {expected!r}")
    print(f"Mounted at {mountpoint}")
'''


def inject_parameters(notebook: nbformat.NotebookNode, values: dict) -> nbformat.NotebookNode:
    """Insert a cell tagged ``injected-parameters`` after the ``parameters`` cell (papermill's convention)."""
    for index, cell in enumerate(notebook.cells):
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            break
    else:
        raise AssertionError("notebook has no cell tagged 'parameters'")
    source = "# Parameters injected by tests/notebook_runner.py\n" + "\n".join(f"{k} = {v!r}" for k, v in values.items())
    injected = nbformat.v4.new_code_cell(source)
    injected.metadata["tags"] = ["injected-parameters"]
    notebook.cells.insert(index + 1, injected)
    return notebook


def repository_files() -> list[str]:
    """The repository's files as a user would copy them: what git tracks or would track (not .venv, outputs, ...)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, text=True)
    if listed.returncode == 0 and listed.stdout:
        return [name for name in listed.stdout.split("\0") if name and (ROOT / name).is_file()]
    skip = {".git", ".venv", ".venv-colab", "outputs", "__pycache__", ".pytest_cache", ".hypothesis", "build", "dist"}
    return [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
            if p.is_file() and not skip.intersection(p.relative_to(ROOT).parts)]


class ColabStandIn:
    """A temporary ``/content`` with a Drive holding a copy of xraylib, and fresh runtimes on demand."""

    def __init__(self, root: Path, base_python: str = sys.executable):
        self.root = Path(root)
        self.content = self.root / "content"
        self.mount = self.content / "drive"
        self.my_drive = self.mount / "MyDrive"
        self.clone = self.my_drive / "xraylib"
        self.base_python = base_python
        self.standin = self.root / "colab_standin"
        self.jupyter = self.root / "jupyter"
        self.runtimes = 0
        for name in repository_files():
            (self.clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, self.clone / name)
        package = self.standin / "google" / "colab"  # `google` stays a namespace package (protobuf lives there too)
        package.mkdir(parents=True)
        (package / "__init__.py").write_text('"""Stand-in for Google Colab (tests/notebook_runner.py)."""\n')
        (package / "drive.py").write_text(STANDIN_DRIVE)

    def site_packages(self) -> list[str]:
        """The base environment's package folders (where TensorFlow and the rest are installed)."""
        code = "import json, sysconfig; print(json.dumps(sorted({sysconfig.get_path('purelib'), sysconfig.get_path('platlib')})))"
        if self.base_python == sys.executable:
            return sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
        out = subprocess.run([self.base_python, "-c", code], capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    def new_runtime(self) -> Path:
        """A fresh virtual environment without xraylib, as a new Colab runtime; returns its python."""
        self.runtimes += 1
        venv = self.root / f"runtime{self.runtimes}"
        subprocess.run([self.base_python, "-m", "venv", "--without-pip", str(venv)], check=True)
        python = venv / "bin" / "python"
        purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        lines = [str(self.standin), *self.site_packages(), "import google.colab  # Colab's runtime has it imported"]
        Path(purelib, "xraylib_colab_standin.pth").write_text("\n".join(lines) + "\n")
        kernel = self.jupyter / "kernels" / KERNEL_NAME
        kernel.mkdir(parents=True, exist_ok=True)
        (kernel / "kernel.json").write_text(json.dumps({
            "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Colab stand-in", "language": "python",
        }))
        return python

    def environment(self) -> dict[str, str]:
        """The environment of the notebook's kernel: Colab's, plus pip offline and the Drive's place."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XRAYLIB_HOME", "VIRTUAL_ENV")}
        env.update({
            "XRAYLIB_DRIVE_MOUNT": str(self.mount), "JUPYTER_PATH": str(self.jupyter),
            "MPLBACKEND": "module://matplotlib_inline.backend_inline", "PYTHONWARNINGS": "ignore",
            "TF_CPP_MIN_LOG_LEVEL": "3",  # TensorFlow's C++ start-up log (no CUDA here, oneDNN, CPU flags)
            # pip's own settings: offline, with the build tools of the base environment (Colab has internet).
            "PIP_NO_DEPS": "1", "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        })
        return env

    def prepare(self, path: Path, values: dict, compare_outputs: bool = True) -> Path:
        """The notebook as the user opens it from Drive, with ``values`` injected, written to ``/content``."""
        notebook = nbformat.read(self.clone / "notebooks" / path.name, as_version=4)
        inject_parameters(notebook, values)
        if not compare_outputs:
            for cell in notebook.cells:
                cell.source = cell.source.replace(CHECK_MARK, "# (stored output not compared here)")
        target = self.content / path.name
        nbformat.write(notebook, target)
        return target

    def run_nbval(self, path: Path, values: dict, compare_outputs: bool = True,
                  timeout: float = 1800) -> subprocess.CompletedProcess:
        """Run notebook ``path`` under nbval in a fresh runtime, working directory ``/content``."""
        self.new_runtime()
        target = self.prepare(path, values, compare_outputs)
        return subprocess.run(
            [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-kernel-name", KERNEL_NAME,
             "--nbval-sanitize-with", str(SANITIZE), "--nbval-cell-timeout", "900", "-p", "no:cacheprovider",
             "-q", "--rootdir", str(self.content), str(target)],
            capture_output=True, text=True, cwd=self.content, env=self.environment(), timeout=timeout)

    def execute(self, path: Path, values: dict) -> nbformat.NotebookNode:
        """Execute notebook ``path`` in a fresh runtime and return it with its outputs (for ``make notebooks``)."""
        from nbclient import NotebookClient

        self.new_runtime()
        target = self.prepare(path, values)
        notebook = nbformat.read(target, as_version=4)
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(self.environment())  # the kernel inherits it
        try:
            NotebookClient(notebook, kernel_name=KERNEL_NAME, timeout=1800,
                           resources={"metadata": {"path": str(self.content)}}).execute()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        return notebook

    def as_colab_shows_it(self, text: str) -> str:
        """Output text with this stand-in's folders written as Colab's: ``/content/drive/MyDrive/...``."""
        return text.replace(str(self.mount), "/content/drive").replace(str(self.content), "/content")


def _is_noise(output: dict) -> bool:
    """An empty stderr line (tqdm's last) or TensorFlow's own log lines, which Colab users do not need to see."""
    if output.get("output_type") != "stream" or output.get("name") != "stderr":
        return False
    lines = [line for line in output.get("text", "").splitlines() if line.strip()]
    return all(line[:5] in ("I0000", "W0000", "E0000") or line.startswith(("WARNING: All log messages", "To enable the"))
               for line in lines)


def strip_injected(notebook: nbformat.NotebookNode, stand_in: ColabStandIn) -> nbformat.NotebookNode:
    """Remove the injected cell and show paths as Colab would; execution counts renumbered from 1."""
    notebook.cells = [c for c in notebook.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    count = 0
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        count += 1
        cell.execution_count = count
        cell.outputs = [o for o in cell.get("outputs", []) if not _is_noise(o)]
        for output in cell.outputs:
            if "execution_count" in output:
                output["execution_count"] = count
            if "text" in output:
                output["text"] = stand_in.as_colab_shows_it(output["text"])
            for key, value in output.get("data", {}).items():
                if key.startswith("text/") and isinstance(value, str):
                    output["data"][key] = stand_in.as_colab_shows_it(value)
        cell.metadata.pop("execution", None)
    return notebook


def refresh(work: Path, names: list[str] | None = None) -> None:
    """Execute the notebooks in order as in Colab and store their outputs in ``notebooks/`` (``make notebooks``)."""
    stand_in = ColabStandIn(work)
    for path in NOTEBOOKS:
        values = {"DATA": "sample", **PARAMETERS[path.stem], **REFRESH_OVERRIDES.get(path.stem, {})}
        started = time.monotonic()
        executed = stand_in.execute(path, values)
        if names and path.stem[:2] not in names and path.stem not in names:
            continue  # run (later notebooks need its outputs) but keep the committed file
        notes = ", ".join(f"{k} = {v!r}" for k, v in values.items() if k != "DATA")
        executed.metadata["xraylib_outputs"] = (f"stored by `make notebooks` on the built-in sample data ({notes}), "
                                                "in a Colab stand-in (tests/notebook_runner.py)")
        nbformat.write(strip_injected(executed, stand_in), path)
        print(f"{path.name}: {time.monotonic() - started:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", help="numbers (01 ... 05) to store; default: all (all are run)")
    parser.add_argument("--work", default=None, help="a folder for the stand-in (default: a temporary one)")
    args = parser.parse_args()
    if args.work:
        refresh(Path(args.work), args.notebooks)
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="xraylib_notebooks_") as work:
        refresh(Path(work), args.notebooks)


if __name__ == "__main__":
    main()
