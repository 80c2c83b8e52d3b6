"""The layers of xraylib (README, "The library"): data -> model -> judge -> run -> use.

- No import circles among xraylib's modules (imports inside functions count too).
- The model layer (models, batches, features, train) imports neither judgement (evaluate, shortcuts, explain, ood)
  nor use (predict, serve), nor the run layer above it.
- The data side imports no TensorFlow (checked at run time, in a fresh interpreter).
- Only the run layer (xraylib.runs) writes into a run folder ``OUTPUT/models/RUN``: checked at run time by recording
  every file opened for writing, renamed or removed while training, evaluation, the shortcut tests, prediction and
  the web server and a site calibration run on sample data, with the xraylib module that did it.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "xraylib"

#: The data side, with the helpers every layer may use (errors, fileio, reporting: no TensorFlow, no xraylib layer).
DATA = {"config", "errors", "fileio", "reporting", "sources", "dicom", "images", "manifest", "split", "preprocess",
        "parallel", "phantoms", "sample_layouts", "synthetic", "views"}
MODEL = {"models", "batches", "features", "train", "distribute"}
JUDGE = {"evaluate", "shortcuts", "explain", "ood", "outofsite"}
USE = {"predict", "calibrate", "serve", "cli"}
RUN = {"runs"}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def xraylib_imports(path: Path) -> set[str]:
    """The xraylib modules ``path`` imports anywhere (module level or inside functions), except under TYPE_CHECKING."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .models import x
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import models, train
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("xraylib"):
                parts = node.module.split(".")
                found.update([parts[1]] if len(parts) > 1 else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("xraylib."):
                    found.add(alias.name.split(".")[1])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    return {name for name in found if name in modules and name != path.stem}


def import_graph() -> dict[str, set[str]]:
    return {p.stem: xraylib_imports(p) for p in sorted(PACKAGE.glob("*.py")) if p.stem not in ("__init__", "__main__")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_reader_sees_deferred_and_relative_imports(tmp_path):
    module = tmp_path / "example.py"
    module.write_text(textwrap.dedent("""
        from typing import TYPE_CHECKING
        from . import models, train
        from .evaluate import evaluate
        import xraylib.predict
        if TYPE_CHECKING:
            from .serve import Analyser
        def later():
            from xraylib import explain
    """))
    assert xraylib_imports(module) == {"models", "train", "evaluate", "predict", "explain"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_every_module_has_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    judged = {"audit", "modelcard", "plots"}
    unplaced = modules - DATA - MODEL - JUDGE - USE - RUN - judged
    assert not unplaced, f"modules without a layer in tests/test_layers.py and the README: {sorted(unplaced)}"


def test_no_import_circles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_model_layer_imports_neither_judgement_nor_use():
    graph = import_graph()
    for module in sorted(MODEL):
        wrong = graph[module] & (JUDGE | USE | RUN)
        assert not wrong, f"xraylib.{module} (model layer) imports {sorted(wrong)}"
    for module in sorted(DATA):
        if module in graph:
            wrong = graph[module] & (MODEL | JUDGE | USE | RUN)
            assert not wrong, f"xraylib.{module} (data layer) imports {sorted(wrong)}"


def test_the_data_side_imports_no_tensorflow():
    modules = sorted(m for m in DATA | {"audit", "evaluate", "modelcard"} if (PACKAGE / f"{m}.py").is_file())
    code = (f"import sys; import {', '.join('xraylib.' + m for m in modules)}; "
            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == "[]", result.stdout


# --------------------------------------------------------------------------------------------
# Who writes into a run folder: recorded at run time

WRITERS_CHILD = textwrap.dedent("""
    # Record every file opened for writing, renamed or removed under OUTPUT/models, with the first xraylib module
    # on the stack that is not xraylib.fileio (the atomic-write helpers every module uses).
    import json, os, sys
    out, report = sys.argv[1:3]
    models_dir = os.path.realpath(os.path.join(out, "models"))
    package = os.path.realpath(os.path.join(sys.argv[3], "xraylib"))
    events = []
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def writer():
        frame = sys._getframe(2)
        while frame is not None:
            path = os.path.realpath(frame.f_code.co_filename)
            if path.startswith(package + os.sep) and not path.endswith(os.sep + "fileio.py"):
                return os.path.splitext(os.path.basename(path))[0]
            frame = frame.f_back
        return None

    def record(kind, path):
        if isinstance(path, (str, bytes, os.PathLike)):
            path = os.path.realpath(os.fsdecode(path))
            if path.startswith(models_dir + os.sep):
                events.append((kind, os.path.relpath(path, models_dir), writer()))

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (mode is None and flags & WRITE_FLAGS):
                record("open", path)
        elif event in ("os.rename", "os.replace"):
            record("rename", args[1])
        elif event in ("os.remove", "os.unlink", "os.rmdir", "shutil.rmtree"):
            record("remove", args[0])
    sys.addaudithook(hook)

    import numpy as np
    from xraylib import config, manifest, models, predict, preprocess, runs, serve, shortcuts, synthetic, train
    from xraylib.serve import ServeSettings, create_app, Analyser

    from pathlib import Path
    layout = config.OutputLayout(Path(out))
    synthetic.write_sample_data(layout.sample_data, n_patients=24, seed=0, image_size=64)
    built = manifest.build_manifest(config.sample_drive_paths(out), task="covid_vs_normal", progress=False, workers=1)
    data = preprocess.split_and_preprocess(built.frame, layout.preprocessed, ("normal", "covid"),
                                           preprocess.PreprocessSettings(image_size=32), fractions=(0.6, 0.2, 0.2),
                                           seed=0, workers=1, progress=False)
    run_dir = layout.models / "run"
    spec = models.ModelSpec(backbone="small_cnn", weights=None, image_size=32, classes=data.classes)
    runs.train(data, spec, train.TrainSettings(epochs=2, batch_size=8, seed=0), run_dir=run_dir, verbose=0)
    runs.evaluate(run_dir, data, out_dir=layout.reports / "run", n_boot=20)
    results = shortcuts.run_shortcut_tests(run_dir, data, run_dir / "shortcut_runs", tests=("source", "lungs", "saliency"),
                                           n_boot=20)
    runs.write_card(run_dir, data=data, shortcut_results=results)
    files = sorted(str(p) for p in (layout.sample_data / "chest-xray-pneumonia").rglob("*.jpeg"))[:3]
    table = predict.predict_files(run_dir, files)
    assert table["ok"].all(), table
    from xraylib import calibrate
    calibrate.calibrate(run_dir, files, "site-a", target_specificity=0.5, say=lambda line: None)  # a site profile
    assert predict.predict_files(run_dir, files, site="site-a")["ok"].all()
    server = serve.build_server(run_dir, ServeSettings(port=0), say=lambda line: None)  # builds ood.json/ood.npz
    client = create_app(Analyser(models.load_model(run_dir), *runs.prepare_ood(models.load_model(run_dir),
                        say=lambda line: None)), ServeSettings()).test_client()
    with open(files[0], "rb") as f:
        response = client.post("/api/predict", data={"files": (f, "x.jpeg")}, headers={"X-Xraylib": "1"})
    assert response.status_code == 200, response.get_data(as_text=True)
    server.close()
    with open(report, "w") as f:
        json.dump(events, f)
""")


@pytest.mark.slow
def test_only_the_run_layer_writes_into_a_run_folder(tmp_path):
    report = tmp_path / "events.json"
    script = tmp_path / "writers.py"
    script.write_text(WRITERS_CHILD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "MPLBACKEND": "Agg", "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "out"), str(report), str(ROOT)],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]
    events = json.loads(report.read_text())
    written = {path for kind, path, _ in events if kind != "remove"}
    # What the pipeline wrote: the run's checkpoints, model files, card and OOD reference, and the shortcut runs'.
    for name in ("run/model.keras", "run/model.h5", "run/model.json", "run/MODEL_CARD.md", "run/history.csv",
                 "run/checkpoints/state.json", "run/ood.json", "run/ood.npz"):
        assert name in written, f"{name} was not written: the recording missed it ({sorted(written)[:20]})"
    assert any(p.startswith("run/shortcut_runs/") and p.endswith("model.json") for p in written)
    wrong = sorted({(kind, path, who) for kind, path, who in events if who != "runs"})
    assert not wrong, f"written into a run folder by other modules than xraylib.runs: {wrong[:20]}"
