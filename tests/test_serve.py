"""The web app: predictions equal ``predict_files``; bad requests get clean JSON errors; nothing reaches the disk;
50 parallel uploads on a real server; and model files that load anywhere (.keras, .h5, SavedModel).

Most requests go through Flask's test client; the parallel uploads go to a real threaded server on
a free loopback port. The model is test_ood's small CNN trained on frontal phantoms.
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import shutil
import tempfile
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest

from test_ood import build_trained_run, colour_photo, encode, frontal_phantom
from xraylib import DISCLAIMER, models, ood, runs, serve
from xraylib.errors import ConfigError, ModelError
from xraylib.models import predict_images
from xraylib.predict import predict_files

pytestmark = [
    pytest.mark.filterwarnings("ignore:Invalid value for VR AS"),
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]

MAX_MB = 1.0
MAX_FILES = 8
HEADER = {"X-Xraylib": "1"}  # what the page and curl send: a cross-site form cannot


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return build_trained_run(tmp_path_factory.mktemp("serve_run"))


@pytest.fixture(scope="module")
def run_dir(run) -> Path:
    return run[0]


@pytest.fixture(scope="module")
def loaded(run_dir) -> models.LoadedModel:
    return models.load_model(run_dir)


@pytest.fixture(scope="module")
def analyser(loaded, run) -> serve.Analyser:
    return serve.Analyser(loaded, ood.fit_ood(loaded, run[1]))


@pytest.fixture(scope="module")
def app(analyser):
    app = serve.create_app(analyser, serve.ServeSettings(max_upload_mb=MAX_MB, max_files=MAX_FILES))
    app.testing = False  # the production error handling, not Flask's test-mode exception propagation
    return app


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture(scope="module")
def samples(run, tmp_path_factory) -> dict[str, Path]:
    """Test-split files as a user has them: a PNG, a DICOM and a JPEG of held-out patients, and a colour photo."""
    folder = tmp_path_factory.mktemp("samples")
    paths = list(run[1]["test"].manifest["path"])
    png = next(Path(p) for p in paths if p.endswith(".png"))
    dcm = next(Path(p) for p in paths if p.endswith(".dcm"))
    jpeg = folder / "held_out.jpg"
    jpeg.write_bytes(encode(frontal_phantom(7001, "covid"), ".jpg"))
    photo = folder / "holiday.jpg"
    photo.write_bytes(encode(colour_photo(5), ".jpg"))
    return {"png": png, "dicom": dcm, "jpeg": jpeg, "photo": photo}


def upload(client, *files: tuple[str, bytes], query: str = ""):
    data = {"files": [(io.BytesIO(content), name) for name, content in files]}
    return client.post("/api/predict" + query, data=data, content_type="multipart/form-data", headers=HEADER)


def assert_json_error(response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    assert response.mimetype == "application/json"
    body = response.get_json()
    error = body["error"]
    assert error["status"] == status and error["title"] and error["message"]
    text = response.get_data(as_text=True)
    assert "Traceback" not in text and 'File "' not in text
    for word in words:
        assert word in error["message"], error["message"]
    return body


def decode_data_uri(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    return cv2.imdecode(np.frombuffer(base64.b64decode(uri.split(",", 1)[1]), np.uint8), cv2.IMREAD_UNCHANGED)


# --------------------------------------------------------------------------------------------
# The page and the API


def test_the_page_shows_the_disclaimer_the_model_and_the_limits(client, loaded):
    response = client.get("/")
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert "Research software, not a diagnostic device." in page and DISCLAIMER.split(". ", 1)[1] in page
    assert f"{loaded.threshold:.3f}" in page and "small_cnn" in page
    assert f"data-max-files=\"{MAX_FILES}\"" in page and "1 MB per upload" in page
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert client.get("/static/app.js").status_code == 200 and client.get("/static/style.css").status_code == 200


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "model": "run", "backbone": "small_cnn",
                                   "classes": ["normal", "covid"], "ood_check": "full"}


def test_the_api_gives_what_predict_files_gives_for_png_dicom_and_jpeg(client, run_dir, samples):
    names = ["png", "dicom", "jpeg"]
    response = upload(client, *[(samples[n].name, samples[n].read_bytes()) for n in names])
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    results = response.get_json()["results"]
    expected = predict_files(run_dir, [samples[n] for n in names])
    for result, (_, row) in zip(results, expected.iterrows()):
        assert result["ok"] and result["judgeable"], result["ood"]
        assert result["name"] == Path(row["path"]).name
        np.testing.assert_allclose([result["probabilities"]["normal"], result["probabilities"]["covid"]],
                                   [row["prob_normal"], row["prob_covid"]], atol=1e-5)
        assert result["decision"] == row["decision"] and result["threshold"] == pytest.approx(row["threshold"])
        assert decode_data_uri(result["images"]["overlay"]).shape == (320, 320, 3)  # Grad-CAM over the model input
        original = decode_data_uri(result["images"]["original"])
        assert max(original.shape[:2]) == 320 and original.ndim == 2
    lean = upload(client, (samples["png"].name, samples["png"].read_bytes()), query="?images=0").get_json()["results"][0]
    # Another request runs the model through other batches and code paths, which changes the last float digits:
    # compare with a tolerance far below what a preprocessing difference moves (about 1e-2 and more).
    assert "images" not in lean and lean["probabilities"].keys() == results[0]["probabilities"].keys()
    for name, probability in lean["probabilities"].items():
        assert probability == pytest.approx(results[0]["probabilities"][name], abs=1e-5)


def test_notebook_helpers_tabulate_and_show_the_results(analyser, samples):
    results = analyser.analyse([("<i>x.png", samples["png"].read_bytes()), ("photo.jpg", samples["photo"].read_bytes()),
                                ("notes.txt", b"hello")])
    table = serve.results_frame(results)
    assert list(table.columns) == ["name", "ok", "judgeable", "decision", "prob_normal", "prob_covid", "problem"]
    assert list(table["ok"]) == [True, True, False] and list(table["judgeable"]) == [True, False, False]
    assert "colour" in table["problem"][1] and "text file" in table["problem"][2]
    page = serve.results_html(results)
    assert page.count("<figure") == 3 and "&lt;i&gt;x.png" in page and "<i>" not in page
    assert serve.NOT_JUDGEABLE in page and page.count("data:image/png;base64,") == 2


def test_a_colour_photo_gets_no_decision_and_says_why(client, samples):
    response = upload(client, ("holiday.jpg", samples["photo"].read_bytes()), (samples["png"].name, samples["png"].read_bytes()))
    assert response.status_code == 200
    photo, xray = response.get_json()["results"]
    assert photo["ok"] and not photo["judgeable"] and photo["decision"] is None
    assert not photo["ood"]["ok"] and any("colour" in reason for reason in photo["ood"]["reasons"])
    assert photo["images"]["overlay"] is None and photo["images"]["original"]
    assert xray["judgeable"] and xray["decision"] in ("normal", "covid")


# --------------------------------------------------------------------------------------------
# Bad requests: each a clean JSON error


class LazyZeros(io.RawIOBase):
    """A request body of ``size`` zero bytes made as it is read, counting what was read."""

    def __init__(self, size: int):
        self.size, self.bytes_read = size, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.size - self.bytes_read)
        buffer[:n] = b"\0" * n
        self.bytes_read += n
        return n


def post_stream(app, body: LazyZeros, sized: bool):
    """POST ``body`` as a multipart request straight to the WSGI app, with or without a Content-Length."""
    from werkzeug.test import create_environ
    from werkzeug.wrappers import Response

    environ = create_environ("/api/predict", method="POST", content_type="multipart/form-data; boundary=xraylib",
                             headers=HEADER)
    environ["wsgi.input"] = body
    if sized:
        environ["CONTENT_LENGTH"] = str(body.size)
    else:  # chunked: the server knows where the body ends, the app does not know its size
        environ.pop("CONTENT_LENGTH", None)
        environ["wsgi.input_terminated"] = True
    return Response.from_app(app, environ)


def test_a_100_mb_upload_is_refused_with_413_before_it_is_read(app):
    body = LazyZeros(100_000_000)
    assert_json_error(post_stream(app, body, sized=True), 413, "100.0 MB", "1 MB limit", "--max-upload-mb")
    assert body.bytes_read == 0
    # A client that does not say the size (chunked): read only up to the limit, then refused.
    unsized = LazyZeros(100_000_000)
    assert_json_error(post_stream(app, unsized, sized=False), 413, "limit")
    assert unsized.bytes_read <= 2 * MAX_MB * 1_000_000


def test_a_file_that_is_not_an_image_is_a_422(client):
    body = assert_json_error(upload(client, ("notes.png", b"this is a text file that someone named .png\n")), 422,
                             "notes.png", "text file")
    assert body["results"] == [{"name": "notes.png", "ok": False,
                                "error": "a text file, not a PNG, JPEG or DICOM image"}]
    assert_json_error(upload(client, ("archive.dcm", b"PK\x03\x04" + b"\0" * 200)), 422, "ZIP archive")


def test_a_truncated_dicom_is_a_422(client, samples):
    data = samples["dicom"].read_bytes()
    assert_json_error(upload(client, ("cut.dcm", data[: len(data) // 2])), 422, "cut.dcm", "DICOM")
    assert_json_error(upload(client, ("header_only.dcm", data[:200])), 422, "no pixel data")


def test_a_decompression_bomb_is_refused_before_decoding(client):
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 50_000, 50_000, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 5000)) + chunk(b"IEND", b""))
    assert_json_error(upload(client, ("bomb.png", bomb)), 422, "decompression-bomb")


def test_a_path_like_filename_is_shown_never_used(client, samples, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = Path("/etc/passwd").stat().st_mtime if Path("/etc/passwd").exists() else None
    response = upload(client, ("../../etc/passwd", samples["png"].read_bytes()),
                      ("/tmp/../../root/.ssh/authorized_keys", samples["png"].read_bytes()))
    assert response.status_code == 200
    assert [r["name"] for r in response.get_json()["results"]] == ["passwd", "authorized_keys"]
    body = assert_json_error(upload(client, ("../../etc/passwd", b"root:x:0:0:root:/root:/bin/bash\n")), 422, "passwd")
    assert "../" not in json.dumps(body)
    assert list(tmp_path.iterdir()) == []
    assert (Path("/etc/passwd").stat().st_mtime if before is not None else None) == before


@pytest.mark.parametrize("name, shown", [
    ("../../etc/passwd", "passwd"), ("C:\\Users\\me\\x-ray.png", "x-ray.png"), ("", "upload-3"),
    ("a\x00b\nc.png", "abc.png"), ("..", "upload-3"), ("x" * 200 + ".png", "x" * 60 + "…" + "x" * 15 + ".png"),
])
def test_display_name(name, shown):
    assert serve.display_name(name, 2) == shown


def test_too_many_files_is_a_413(client, samples):
    data = samples["png"].read_bytes()
    assert_json_error(upload(client, *[(f"{i}.png", data) for i in range(MAX_FILES + 1)]), 413,
                      f"{MAX_FILES + 1} files", f"at most {MAX_FILES}", "--max-files")
    assert_json_error(upload(client, *[(f"{i}.png", b"x") for i in range(40)]), 413)  # stopped by the parser's part limit


def test_other_bad_requests_get_json_errors(client):
    assert_json_error(client.post("/api/predict", data={"note": "hello"}, content_type="multipart/form-data",
                                  headers=HEADER), 400, "no files", "X-Xraylib: 1", "text fields (note)")
    assert_json_error(client.post("/api/predict", json={"image": "x"}, headers=HEADER), 415, "multipart/form-data",
                      "-H 'X-Xraylib: 1'")
    assert_json_error(client.get("/api/predict"), 405)
    assert_json_error(client.get("/no/such/page"), 404)
    assert_json_error(client.delete("/"), 405)


def test_an_unexpected_error_is_a_500_without_a_stack_trace(client, analyser, samples, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("secret detail from /home/someone/model")

    monkeypatch.setattr(analyser, "analyse", broken)
    body = assert_json_error(upload(client, ("x.png", samples["png"].read_bytes())), 500, "server log")
    assert "secret" not in json.dumps(body)
    assert client.get("/healthz").status_code == 200


def test_uploads_are_never_written_to_disk(client, samples, monkeypatch):
    """Werkzeug spools uploads over 500 kB to temporary files; the app keeps them in memory."""

    def no_temp_files(*args, **kwargs):
        raise AssertionError("an upload was written to a temporary file")

    for name in ("TemporaryFile", "NamedTemporaryFile", "SpooledTemporaryFile", "mkstemp", "mkdtemp"):
        monkeypatch.setattr(tempfile, name, no_temp_files)
    big = cv2.imencode(".png", np.random.default_rng(0).integers(0, 256, (900, 800), dtype=np.uint8))[1].tobytes()
    assert 600_000 < len(big) < MAX_MB * 1_000_000
    response = upload(client, ("big.png", big), (samples["png"].name, samples["png"].read_bytes()))
    assert response.status_code == 200
    assert [r["ok"] for r in response.get_json()["results"]] == [True, True]


# --------------------------------------------------------------------------------------------
# A real server: 50 parallel uploads


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
             f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n" for name, data in files]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post(port: int, files: list[tuple[str, bytes]], path: str = "/api/predict?images=0") -> tuple[int, dict]:
    body, content_type = multipart(files)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": content_type, **HEADER})
        response = connection.getresponse()
        assert response.getheader("Content-Type") == "application/json"
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def start_server(analyser, **settings):
    """The app served by waitress (as ``python -m xraylib serve`` does) on a free loopback port, in a thread."""
    options = {"max_upload_mb": MAX_MB, "max_files": MAX_FILES, "port": 0, **settings}
    server = serve.Server(create_live_app(analyser, serve.ServeSettings(**options)), serve.ServeSettings(**options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    return server, thread


def create_live_app(analyser, settings):
    app = serve.create_app(analyser, settings)
    app.testing = False
    return app


@pytest.fixture
def live_server(analyser):
    server, thread = start_server(analyser)
    yield server.effective_port
    server.close()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_50_parallel_uploads_each_get_a_clean_answer_and_nothing_is_left_on_disk(
        live_server, samples, run_dir, tmp_path, monkeypatch):
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.chdir(tmp_path)
    png, dicom = samples["png"].read_bytes(), samples["dicom"].read_bytes()
    expected = predict_files(run_dir, [samples["png"], samples["dicom"]])  # (writes ood.json on its first call)
    model_files = sorted(p.name for p in run_dir.iterdir())
    cases = [
        ("xray", [("x.png", png)], 200),
        ("dicom", [("x.dcm", dicom)], 200),
        ("photo", [("holiday.jpg", samples["photo"].read_bytes())], 200),
        ("text", [("notes.png", b"not an image at all\n")], 422),
        ("truncated", [("cut.dcm", dicom[: len(dicom) // 2])], 422),
        ("path", [("../../etc/passwd", png)], 200),
        ("too large", [("big.png", b"\x89PNG\r\n\x1a\n" + b"\0" * int(1.5 * MAX_MB * 1_000_000))], 413),
    ]
    jobs = [cases[i % len(cases)] for i in range(50)]
    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(lambda job: post(live_server, job[1]), jobs))

    for (kind, _, status), (got, body) in zip(jobs, answers):
        assert got == status, (kind, body)
        if status != 200:
            assert body["error"]["status"] == status and body["error"]["message"]
            continue
        (result,) = body["results"]
        if kind == "photo":
            assert not result["judgeable"] and result["decision"] is None
            continue
        row = expected.iloc[1 if kind == "dicom" else 0]
        np.testing.assert_allclose(result["probabilities"]["covid"], row["prob_covid"], atol=1e-5)
        assert result["decision"] == row["decision"]
        assert result["name"] == {"path": "passwd", "dicom": "x.dcm"}.get(kind, "x.png")

    connection = http.client.HTTPConnection("127.0.0.1", live_server, timeout=30)
    connection.request("GET", "/healthz")
    assert connection.getresponse().status == 200  # still up
    connection.close()
    assert list(temp.iterdir()) == [] and list(tmp_path.iterdir()) == [temp]
    assert sorted(p.name for p in run_dir.iterdir()) == model_files


# --------------------------------------------------------------------------------------------
# Model files that load anywhere, and what the server builds from them


@pytest.fixture(scope="module")
def formats(run_dir, tmp_path_factory) -> dict[str, Path]:
    """The trained run as .keras, .h5 and a SavedModel folder (model.export) inside a copy of the run folder."""
    folder = tmp_path_factory.mktemp("formats") / "run"
    folder.mkdir()
    for name in ("model.keras", "model.h5", "model.json"):
        shutil.copy(run_dir / name, folder / name)
    keras.models.load_model(folder / "model.keras", compile=False).export(folder / "saved_model", verbose=False)
    return {"keras": folder / "model.keras", "h5": folder / "model.h5", "savedmodel": folder / "saved_model"}


def test_keras_h5_and_saved_model_load_and_give_the_same_probabilities(formats, run):
    images = np.asarray(run[1]["test"].images)
    probs = {}
    for fmt, path in formats.items():
        loaded = models.load_model(path)
        assert loaded.file_format == fmt and loaded.classes == ("normal", "covid")
        assert loaded.has_layers == (fmt != "savedmodel")
        probs[fmt] = predict_images(loaded.model, images)
    assert np.ptp(probs["keras"][:, 1]) > 1e-3  # the images get different answers: the equality below means something
    np.testing.assert_allclose(probs["h5"], probs["keras"], atol=1e-6)
    np.testing.assert_allclose(probs["savedmodel"], probs["keras"], atol=1e-5)
    # A run folder with only the SavedModel beside its JSON loads it.
    only = formats["keras"].parent.parent / "only_saved_model"
    only.mkdir(exist_ok=True)
    shutil.copy(formats["keras"].parent / "model.json", only / "model.json")
    shutil.copytree(formats["savedmodel"], only / "saved_model", dirs_exist_ok=True)
    assert models.load_model(only).file_format == "savedmodel"


def test_the_server_runs_a_saved_model_without_grad_cam_and_says_so(formats, run, samples):
    loaded = models.load_model(formats["savedmodel"])
    reference = ood.fit_ood(loaded, run[1])
    analyser = serve.Analyser(loaded, reference, runs._partial_note(loaded, reference))
    assert analyser.info()["model"] == "run" and analyser.info()["ood_check"] == "statistics"
    (result,) = analyser.analyse([(samples["png"].name, samples["png"].read_bytes())])
    expected = predict_files(models.load_model(formats["keras"]), samples["png"])
    np.testing.assert_allclose(result["probabilities"]["covid"], expected["prob_covid"].iloc[0], atol=1e-5)
    assert result["images"]["overlay"] is None and "SavedModel" in result["gradcam_note"]
    assert "feature-distance" in analyser.info()["ood_note"]


def test_a_saved_model_that_cannot_load_names_the_format_the_versions_and_the_fix(formats, tmp_path):
    broken = tmp_path / "saved_model"
    shutil.copytree(formats["savedmodel"], broken)
    (broken / "saved_model.pb").write_bytes(b"\x08\x01 not a saved model")
    meta = json.loads((formats["keras"].parent / "model.json").read_text())
    meta["versions"].update({"keras": "3.4.1", "tensorflow": "2.16.1"})
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError) as caught:
        models.load_model(tmp_path)  # the run folder: finds saved_model/ and reads model.json beside it
    message = str(caught.value)
    for words in (str(broken), "TensorFlow SavedModel", "saved with Keras 3.4.1", "TensorFlow 2.16.1",
                  "model.keras or model.h5", "tensorflow==2.16.1"):
        assert words in message, message


def test_prepare_ood_builds_the_reference_from_the_training_data_and_reuses_it(run_dir, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("model.keras", "model.json"):
        shutil.copy(run_dir / name, folder / name)
    loaded = models.load_model(folder)
    said = []
    reference, note = runs.prepare_ood(loaded, say=said.append)  # the folder named in model.json
    assert reference is not None and note is None
    assert (folder / "ood.json").is_file() and (folder / "ood.npz").is_file()
    assert any("training data" in line for line in said)
    said.clear()
    again, _ = runs.prepare_ood(loaded, say=said.append)
    np.testing.assert_array_equal(again.train_features, reference.train_features)
    assert said == [f"out-of-distribution reference: {folder / 'ood.json'}"]

    # Without the training data: the cheap checks only, and the page says so.
    meta = json.loads((folder / "model.json").read_text())
    meta["training_data"]["folder"] = str(tmp_path / "gone")
    meta["saved_at"] = "2031-01-01T00:00:00+00:00"  # as if retrained: the saved reference is stale
    (folder / "model.json").write_text(json.dumps(meta))
    retrained = models.load_model(folder)
    said.clear()
    reference, note = runs.prepare_ood(retrained, say=said.append)
    assert reference is None and "--data" in note and "stale" in note
    assert any("made for another model" in line for line in said)
    assert serve.Analyser(retrained, None, note).info()["ood_check"] == "basic"


def test_the_command_line_defaults_are_safe_and_errors_are_one_line(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(["--model", "x"])
    assert (args.host, args.port, args.max_upload_mb, args.max_files, args.data) == ("127.0.0.1", 8000, 20.0, 16, None)
    assert serve.main(["--model", str(tmp_path / "missing")]) == 2
    assert "no model file" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="max_files"):
        serve.ServeSettings(max_files=0)
    with pytest.raises(ConfigError, match="max_upload_mb"):
        serve.ServeSettings(max_upload_mb=0)


# --------------------------------------------------------------------------------------------
# Hardening round 2: decoded-pixel budgets per request and per server, one full-size image at a time


def _budgeted(analyser: serve.Analyser, request_pixels: int | None = None, server_pixels: int | None = None,
              pixel_wait_s: float | None = None) -> serve.Analyser:
    """The test analyser (same model, guard and lock) with other pixel budgets."""
    import copy

    other = copy.copy(analyser)
    if request_pixels is not None:
        other.request_pixels = request_pixels
    if server_pixels is not None:
        other.decoding = serve.PixelBudget(server_pixels)
    if pixel_wait_s is not None:
        other.pixel_wait_s = pixel_wait_s
    return other


def _chest_png(seed: int, side: int) -> bytes:
    return encode(cv2.resize(frontal_phantom(seed, "normal"), (side, side), interpolation=cv2.INTER_LINEAR), ".png")


def test_the_default_budgets_hold_two_of_the_largest_images_per_request_and_three_per_server():
    settings = serve.ServeSettings()
    assert (settings.request_pixels, settings.server_pixels) == (2 * serve.images.MAX_PIXELS, 3 * serve.images.MAX_PIXELS)
    with pytest.raises(ConfigError, match="request_pixels must be a whole number of at least 60,000,000"):
        serve.ServeSettings(request_pixels=1000)


def test_a_file_over_the_requests_pixel_budget_is_refused_in_its_result_naming_the_limit(analyser):
    budgeted = _budgeted(analyser, request_pixels=200_000)  # two 300x300 images fit, not three
    uploads = [(f"chest-{k}.png", _chest_png(8100 + k, 300)) for k in range(3)]
    results = budgeted.analyse(uploads, with_images=False)
    assert [r["ok"] for r in results] == [True, True, False]
    assert results[2]["error"] == ("not decoded: its 300x300 pixels would take this request's files to 270,000 pixels, "
                                   "over the server's budget of 200,000 decoded pixels per request; send it in another request")
    # Nothing could be analysed: the API's 422, naming the file and the limit.
    app = serve.create_app(_budgeted(analyser, request_pixels=50_000), serve.ServeSettings(max_upload_mb=MAX_MB))
    body = assert_json_error(upload(app.test_client(), uploads[0]), 422, "chest-0.png", "budget of 50,000 decoded pixels")
    assert body["results"][0]["ok"] is False


def test_a_file_that_finds_no_room_in_the_servers_pixel_budget_is_refused_after_a_wait(analyser):
    budgeted = _budgeted(analyser, server_pixels=100_000, pixel_wait_s=0.05)
    with budgeted.decoding.hold(100_000, timeout_s=1):  # another request decoding a large image
        busy = budgeted.analyse([("chest.png", _chest_png(8200, 200))], with_images=False)[0]
    assert busy["ok"] is False and busy["error"] == (
        "not decoded: the server was decoding other large images (at most 100,000 pixels at once) for 0.05 s; "
        "try again in a minute")
    assert budgeted.decoding.held == 0
    assert budgeted.analyse([("chest.png", _chest_png(8200, 200))], with_images=False)[0]["ok"]
    assert budgeted.decoding.held == 0


def test_heavy_uploads_queue_in_their_own_lane_and_never_take_an_ordinary_uploads_slot(analyser, monkeypatch):
    """Issue 17's load test: four clients sending large images held every analysis slot, and ordinary uploads
    waited seconds behind them. With one slot and a heavy request being analysed (held here until released),
    an ordinary upload is still answered, and a second heavy request gets a 503 at once (the heavy queue is as
    long as max_concurrent)."""
    settings = serve.ServeSettings(max_upload_mb=MAX_MB, max_concurrent=1, queue_timeout_s=5.0, heavy_pixels=250_000)
    app = serve.create_app(analyser, settings)
    heavy_png, ordinary_png = _chest_png(8300, 600), _chest_png(8301, 300)  # 360,000 and 90,000 pixels
    assert analyser.decoded_pixels([("heavy.png", heavy_png)]) == 360_000
    assert analyser.decoded_pixels([("a.png", ordinary_png), ("bad.png", b"not an image")]) == 90_000
    entered, release = threading.Event(), threading.Event()
    analyse = analyser.analyse

    def held_when_heavy(uploads, with_images=True):
        if uploads[0][0] == "heavy.png":
            entered.set()
            assert release.wait(timeout=60)
        return analyse(uploads, with_images=with_images)

    monkeypatch.setattr(analyser, "analyse", held_when_heavy)
    with ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(upload, app.test_client(), ("heavy.png", heavy_png))
        assert entered.wait(timeout=60)
        try:
            second = upload(app.test_client(), ("heavy.png", heavy_png))
            assert_json_error(second, 503, "busy with other uploads of large images", "250,000 pixels")
            ordinary = upload(app.test_client(), ("chest.png", ordinary_png))
            assert ordinary.status_code == 200 and ordinary.get_json()["results"][0]["ok"]
        finally:
            release.set()
        assert first.result(timeout=60).status_code == 200
    with pytest.raises(ConfigError, match="heavy_pixels must be a whole number of at least 1"):
        serve.ServeSettings(heavy_pixels=0)


def test_a_request_decodes_one_full_size_image_at_a_time(analyser, monkeypatch):
    """Four 2000x2000 PNGs: when each is decoded no earlier full-size array is still alive, and the peak of
    traced memory stays near one image (4 MB), not four; the results keep every image reduced to display_px."""
    import tracemalloc
    import weakref

    from xraylib import preprocess

    side = 2000
    uploads = [(f"big-{k}.png", _chest_png(8300 + k, side)) for k in range(4)]
    decode, alive, live_at_decode = preprocess.decode_for_model, [], []

    def counting(data, path, settings):
        live_at_decode.append(sum(ref() is not None for ref in alive))
        pixels = decode(data, path, settings)
        assert pixels.shape == (side, side)
        alive.append(weakref.ref(pixels))
        return pixels

    monkeypatch.setattr(preprocess, "decode_for_model", counting)
    tracemalloc.start()
    try:
        results = analyser.analyse(uploads, with_images=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r["ok"] for r in results] == [True] * 4 and live_at_decode == [0, 0, 0, 0]
    assert all(max(decode_data_uri(r["images"]["original"]).shape) == 320 for r in results)
    one_image = side * side
    assert peak < 2.5 * one_image, f"peak {peak:,} bytes for four {side}x{side} images"
    assert analyser.decoding.held == 0 and analyser.decoding.peak <= one_image
# Hardening round 2: waitress with timeouts, Host / Origin / custom header, names, Allow


def post_raw(port: int, body: bytes | None, headers: dict, path: str = "/api/predict") -> tuple[int, dict, bytes]:
    """A POST with exactly these headers (``body=None``: the headers only, no body sent)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        if body is None:
            connection.putrequest("POST", path)
            for name, value in headers.items():
                connection.putheader(name, value)
            connection.endheaders()
        else:
            connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_slow_clients_do_not_lock_out_a_normal_upload_and_are_closed_by_the_timeout(analyser, samples):
    """The attack of issue 17: 4 clients announce 1 MB and trickle it. As many as the server has analysis slots and
    worker threads: with the Werkzeug server they took all 4 slots before their body arrived and every other upload
    waited queue_timeout_s for a 503. waitress reads bodies in its I/O thread, so a slot is taken only once a body
    is complete, and a connection that goes silent for channel_timeout_s is closed."""
    import select
    import socket

    server, thread = start_server(analyser, max_concurrent=4, threads=4, queue_timeout_s=5.0, channel_timeout_s=3)
    port = server.effective_port
    head = (f"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Xraylib: 1\r\n"
            "Content-Type: multipart/form-data; boundary=slow\r\nContent-Length: 1000000\r\n\r\n--slow\r\n").encode()
    slow = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(4)]
    stop = threading.Event()

    def trickle():  # one byte each every 0.3 s: never silent for the 3 s timeout
        while not stop.wait(0.3):
            for sock in slow:
                try:
                    sock.send(b"x")
                except OSError:
                    pass

    trickler = threading.Thread(target=trickle, daemon=True)
    try:
        for sock in slow:
            sock.sendall(head)
        trickler.start()
        status, body = post(port, [("x.png", samples["png"].read_bytes())])
        assert status == 200 and body["results"][0]["ok"] and body["results"][0]["decision"]
        assert select.select(slow, [], [], 0)[0] == []  # the slow ones: still open, nothing answered
        stop.set()
        trickler.join(timeout=10)
        for sock in slow:  # silent now: the server closes them (generous bound: 60 s socket timeout, about 3-5 s)
            try:
                answer = sock.recv(65536)
            except ConnectionResetError:
                answer = b""
            assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:200]
    finally:
        stop.set()
        for sock in slow:
            sock.close()
        server.close()
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_a_body_over_the_limit_is_refused_as_json_before_it_is_sent(live_server):
    status, headers, body = post_raw(live_server, None, {"Host": f"127.0.0.1:{live_server}", **HEADER,
                                                        "Content-Type": "multipart/form-data; boundary=x",
                                                        "Content-Length": "100000000"})
    assert status == 413 and headers["Content-Type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["status"] == 413 and "1 MB limit" in error["message"] and "--max-upload-mb" in error["message"]


def test_a_few_mb_upload_and_its_answer_are_never_spooled_to_a_temporary_file(analyser, tmp_path, monkeypatch):
    """waitress spools request bodies over 512 KB and answers over 1 MB to temporary files unless told otherwise."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    made = []
    for name in ("TemporaryFile", "NamedTemporaryFile", "SpooledTemporaryFile", "mkstemp", "mkdtemp"):
        def record(*args, _original=getattr(tempfile, name), _name=name, **kwargs):
            made.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(tempfile, name, record)  # TemporaryFile leaves no name in the folder on Linux
    rng = np.random.default_rng(1)
    files = [(f"noise{i}.png", cv2.imencode(".png", rng.integers(0, 256, (700, 700), dtype=np.uint8))[1].tobytes())
             for i in range(8)]
    body, content_type = multipart(files)
    assert 3_000_000 < len(body) < 8_000_000
    server, thread = start_server(analyser, max_upload_mb=8.0)
    try:
        status, _, answer = post_raw(server.effective_port, body, {"Content-Type": content_type, **HEADER})
    finally:
        server.close()
        thread.join(timeout=10)
    assert status == 200, answer[:300]
    assert len(answer) > 1_100_000  # over waitress' default outbuf_overflow as well
    assert [r["ok"] for r in json.loads(answer)["results"]] == [True] * 8
    assert made == [] and list(temp.iterdir()) == []


def test_a_foreign_host_a_foreign_origin_or_no_custom_header_is_refused(client, samples):
    png = samples["png"].read_bytes()

    def send(**headers):
        return client.post("/api/predict?images=0", data={"files": [(io.BytesIO(png), "x.png")]},
                           content_type="multipart/form-data", headers=headers)

    # DNS rebinding: the attacker's name resolves to 127.0.0.1; the browser sends that name as Host.
    assert_json_error(send(Host="rebind.attacker.example:8000", **HEADER), 421, "'rebind.attacker.example'",
                      "--allow-host rebind.attacker.example")
    assert_json_error(client.get("/", headers={"Host": "rebind.attacker.example"}), 421)
    assert_json_error(client.get("/healthz", headers={"Host": "rebind.attacker.example"}), 421)
    # A page on another origin posting through the user's browser (fetch mode "no-cors" or a form).
    assert_json_error(send(Origin="https://attacker.example", **HEADER), 403, "another web page", "'https://attacker.example'",
                      "X-Xraylib: 1")
    assert_json_error(send(Origin="null", **HEADER), 403, "another web page")
    # Without the custom header (all a cross-site form or no-cors fetch can do): what to send, exactly.
    assert_json_error(send(), 403, "'X-Xraylib: 1'", "curl -H 'X-Xraylib: 1' -F files=@image.png")
    assert_json_error(send(**{"X-Xraylib": "0"}), 403, "'X-Xraylib: 1'")
    # The server's own names and its own page's Origin pass.
    for host in ("localhost", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST."):
        response = send(Host=host, Origin=f"http://{host}", **HEADER)
        assert response.status_code == 200, (host, response.get_data(as_text=True)[:300])
    assert send(Host="localhost", Origin="http://localhost:9999", **HEADER).status_code == 403  # another origin


def test_allow_host_adds_names_and_domains(analyser, samples):
    settings = serve.ServeSettings(max_upload_mb=MAX_MB, allow_hosts=("XRay.example.org", ".lab.example"))
    client = serve.create_app(analyser, settings).test_client()
    for host, status in [("xray.example.org", 200), ("xray.example.org:8443", 200), ("ct.lab.example", 200),
                         ("lab.example", 200), ("evil-lab.example", 421), ("example.org", 421), ("localhost", 200)]:
        assert client.get("/healthz", headers={"Host": host}).status_code == status, host
    # Behind a proxy that rewrites Host to 127.0.0.1, the page's Origin is the allowed name: accepted; others not.
    for origin, status in [("https://xray.example.org", 200), ("https://ct.lab.example:8443", 200),
                           ("https://attacker.example", 403), ("http://localhost:9999", 403)]:
        response = client.get("/healthz", headers={"Host": "127.0.0.1:8000", "Origin": origin})
        assert response.status_code == status, origin
    for bad in ("http://xray.example.org", "a b", "x/y"):
        with pytest.raises(ConfigError, match="--allow-host"):
            serve.ServeSettings(allow_hosts=(bad,))
    import argparse

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(["--model", "m", "--host", "0.0.0.0", "--allow-host", "a.example", "--allow-host", "10.0.0.5"])
    assert args.allow_host == ["a.example", "10.0.0.5"] and parser.parse_args(["--model", "m"]).allow_host == []


def test_a_405_carries_allow(client):
    response = client.get("/api/predict")
    assert_json_error(response, 405, "POST")
    assert "POST" in response.headers["Allow"] and "GET" not in response.headers["Allow"]
    response = client.delete("/")
    assert_json_error(response, 405)
    assert "GET" in response.headers["Allow"]


def test_a_decoder_message_never_shows_a_python_object(client):
    """A JPEG Baseline DICOM whose frame is not JPEG: pydicom's Pillow plugin says "cannot identify image file
    <_io.BytesIO object at 0x7f...>", which reached the answer."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([b"\xff\xd8 not a JPEG frame \xff\xd9"])
    ds["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    body = assert_json_error(upload(client, ("frame.dcm", buffer.getvalue())), 422, "frame.dcm", "DICOM")
    text = json.dumps(body)
    assert "object at 0x" not in text and "BytesIO" not in text
    assert "cannot decode DICOM pixel data" in body["results"][0]["error"]


def raw_multipart(parts: list[tuple[bytes, bytes]], boundary: bytes = b"xraylibraw") -> tuple[bytes, str]:
    """A multipart body written byte by byte: (raw file name, data) per part, the name not encoded or escaped."""
    body = b"".join(b"--" + boundary + b'\r\nContent-Disposition: form-data; name="files"; filename="' + name
                    + b'"\r\nContent-Type: application/octet-stream\r\n\r\n' + data + b"\r\n" for name, data in parts)
    return body + b"--" + boundary + b"--\r\n", f"multipart/form-data; boundary={boundary.decode()}"


def test_file_names_with_cr_lf_or_invalid_utf8_are_analysed_under_a_safe_name(client, samples):
    """Werkzeug splits part headers at CR/LF (the file became a text field) and decodes them as strict UTF-8 (the
    whole form parsed as empty): both answered "no files in the upload". Now each file is analysed under a
    cleaned name, and the files beside them too."""
    png = samples["png"].read_bytes()
    body, content_type = raw_multipart([(b"left\r\nlung.png", png), (b"caf\xe9 \xff.png", png), (b"ok.png", png),
                                        (b"a\nb.png", png)])
    response = client.post("/api/predict?images=0", data=body, content_type=content_type, headers=HEADER)
    assert response.status_code == 200, response.get_data(as_text=True)[:500]
    results = response.get_json()["results"]
    assert [r["name"] for r in results] == ["left lung.png", "caf\ufffd \ufffd.png", "ok.png", "a b.png"]
    assert all(r["ok"] and r["decision"] for r in results)
    probabilities = [r["probabilities"]["covid"] for r in results]
    np.testing.assert_allclose(probabilities, probabilities[2], atol=1e-5)  # the same image, whatever its name
    # Only the broken name: still analysed, not "no files in the upload".
    body, content_type = raw_multipart([(b"\xff\xfe\r\n.png", png)])
    response = client.post("/api/predict?images=0", data=body, content_type=content_type, headers=HEADER)
    assert response.status_code == 200 and response.get_json()["results"][0]["ok"]
