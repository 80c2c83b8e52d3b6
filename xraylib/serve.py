"""A local web page (and a JSON API) to check your own images with a trained model.

``python -m xraylib serve --model OUTPUT_DIR/models/RUN`` starts it on http://127.0.0.1:8000:
upload PNG, JPEG or DICOM files (or drop them on the page) and see, for each, the class
probabilities, the decision at the model's threshold, a Grad-CAM heatmap, and the
out-of-distribution verdict of :mod:`xraylib.ood` ("not a chest X-ray this model can judge").
Scripts use ``POST /api/predict`` (multipart form, one or more files) and ``GET /healthz``.
``--site NAME`` decides at a site profile's threshold (:mod:`xraylib.calibrate`; with ``--calibrate-normals DIR``
the profile is made first), and the page and every result say which.

Safe by default:

- it listens on 127.0.0.1 (this machine only) unless ``host`` says otherwise;
- a request may carry at most ``max_upload_mb`` MB (413 otherwise, refused before the body is
  read when the client says its size) and ``max_files`` files; at most ``max_concurrent``
  requests are read and analysed at once, so memory stays bounded under many parallel uploads;
- uploads are kept in memory and decoded from bytes: nothing is written to disk, not even to a
  temporary folder, and nothing is kept after the response; file names are shown, never used
  as paths; the type is decided by content (:func:`xraylib.images.detect_format`); images over
  :data:`xraylib.images.MAX_PIXELS` are refused before decoding (decompression bombs);
- the model is loaded with Keras' safe mode (:func:`xraylib.models.load_model`), and calls to
  it are serialised by a lock (Keras models are not safe to call from several threads at once);
- every error is a JSON object ``{"error": {"status", "title", "message"}}`` with a 4xx status
  (500 only for a bug, without its stack trace, which goes to the server log).

The preprocessing always comes from the model's ``model.json``: the same
:func:`xraylib.preprocess.preprocess_bytes` that :func:`xraylib.predict.predict_files` uses, so
the page and ``predict`` agree.

Research software, not a diagnostic device: the page says so at the top.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import io
import ipaddress
import logging
import sys
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import cv2
import numpy as np

from . import DISCLAIMER, images, preprocess
from .errors import BadFileError, ConfigError, ModelError, XraylibError

if TYPE_CHECKING:
    import flask
    import pandas as pd

    from .models import LoadedModel
    from .ood import OODReference

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_UPLOAD_MB = 20.0
DEFAULT_MAX_FILES = 16
#: The heading of every image the out-of-distribution guard flags.
NOT_JUDGEABLE = "Not a chest X-ray this model can judge"
WEB_DIR = Path(__file__).resolve().parent / "web"

log = logging.getLogger("xraylib.serve")


@dataclass(frozen=True)
class ServeSettings:
    """Limits of the web app. ``max_upload_mb``: whole request, in MB (10^6 bytes). ``max_files``: files per request.

    ``max_concurrent``: requests read and analysed at once (the others wait up to
    ``queue_timeout_s`` seconds, then get 503). ``display_px``: side of the images shown.
    """

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    max_files: int = DEFAULT_MAX_FILES
    max_concurrent: int = 4
    queue_timeout_s: float = 120.0
    display_px: int = 320
    #: Decoded pixels one request may hold, summed over its files from their headers before decoding
    #: (a file that would go past it is refused in its result).
    request_pixels: int = 2 * images.MAX_PIXELS
    #: Pixels being decoded at once across all requests (a file waits up to ``pixel_wait_s`` for room, then is refused).
    server_pixels: int = 3 * images.MAX_PIXELS
    pixel_wait_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < float(self.max_upload_mb) <= 1024:
            raise ConfigError(f"max_upload_mb must be above 0 and at most 1024, got {self.max_upload_mb}")
        for name in ("max_files", "max_concurrent"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
                raise ConfigError(f"{name} must be a whole number from 1 to 1000, got {value!r}")
        for name in ("request_pixels", "server_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < images.MAX_PIXELS:
                raise ConfigError(f"{name} must be a whole number of at least {images.MAX_PIXELS:,} (the largest "
                                  f"image's pixels), got {value!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0..65535 (0: any free port), got {self.port!r}")

    @property
    def max_upload_bytes(self) -> int:
        return int(float(self.max_upload_mb) * 1_000_000)


def display_name(name: str | None, index: int = 0) -> str:
    """A file name safe to show: the last path component, printable characters only, at most 80 characters.

    For display only: uploads are never written under any name. ``"../../etc/passwd"`` -> ``"passwd"``.
    """
    text = unicodedata.normalize("NFC", str(name or ""))
    text = text.replace("\\", "/").rsplit("/", 1)[-1]
    text = "".join(ch for ch in text if unicodedata.category(ch)[0] not in "CZ" or ch == " ").strip(" .")
    if len(text) > 80:
        text = text[:60] + "…" + text[-19:]
    return text or f"upload-{index + 1}"


def _png_data_uri(image: np.ndarray) -> str:
    """``(H, W)`` gray or ``(H, W, 3)`` RGB uint8 as a ``data:image/png;base64,...`` URI."""
    bgr = image[..., ::-1] if image.ndim == 3 else image
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(bgr))
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 array
        raise RuntimeError("PNG encoding failed")
    return "data:image/png;base64," + base64.b64encode(encoded.tobytes()).decode("ascii")


def _fit_within(image: np.ndarray, side: int) -> np.ndarray:
    height, width = image.shape[:2]
    scale = side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


# --------------------------------------------------------------------------------------------
# Analysis: what the page, the JSON API and notebook 05's upload widget call


class PixelBudget:
    """How many decoded pixels may be held at once, shared by the threads of one server.

    :meth:`hold` waits (up to a timeout) until the pixels fit, and gives them back when its block ends.
    ``peak`` is the most ever held at once (for tests and measurements).
    """

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self.held = 0
        self.peak = 0
        self._room = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int, timeout_s: float):
        """Hold ``pixels`` (at most the capacity) for the block; :class:`TimeoutError` when they do not fit in time."""
        pixels = min(int(pixels), self.capacity)
        with self._room:
            if not self._room.wait_for(lambda: self.held + pixels <= self.capacity, timeout=timeout_s):
                raise TimeoutError
            self.held += pixels
            self.peak = max(self.peak, self.held)
        try:
            yield
        finally:
            with self._room:
                self.held -= pixels
                self._room.notify_all()


class Analyser:
    """A loaded model with its preprocessing (from ``model.json``), its out-of-distribution guard and a lock.

    ``analyse([(name, bytes), ...])`` returns one JSON-ready dict per file. Safe to call from
    several threads: decoding runs in parallel, the model calls one at a time.

    Memory is bounded by pixel budgets: a request's files may hold at most ``request_pixels`` pixels
    together (from their headers, before decoding), and at most ``server_pixels`` are decoded at once
    across all the threads using this analyser (a file waits up to ``pixel_wait_s`` s for room). A file
    past either is refused in its result, naming the limit. Files are decoded one at a time, and each
    is reduced at once to the model's input and the ``display_px`` image shown, so a request never
    holds more than one full-size image. Defaults: :class:`ServeSettings`'.
    """

    def __init__(self, loaded: "LoadedModel", reference: "OODReference | None" = None, ood_note: str | None = None,
                 display_px: int = 320, *, request_pixels: int | None = None, server_pixels: int | None = None,
                 pixel_wait_s: float | None = None):
        from .ood import OODGuard

        self.loaded = loaded
        self.settings = preprocess.PreprocessSettings.from_dict(loaded.metadata["preprocessing"])
        self.guard = OODGuard.for_model(loaded, reference)
        self.ood_note = ood_note
        self.display_px = int(display_px)
        defaults = ServeSettings()
        self.request_pixels = int(request_pixels if request_pixels is not None else defaults.request_pixels)
        self.pixel_wait_s = float(pixel_wait_s if pixel_wait_s is not None else defaults.pixel_wait_s)
        self.decoding = PixelBudget(server_pixels if server_pixels is not None else defaults.server_pixels)
        self._lock = threading.Lock()
        self._gradcam_layer = None
        if loaded.has_layers:
            from .explain import find_last_conv_layer

            try:
                self._gradcam_layer = find_last_conv_layer(loaded.model)
            except ModelError:
                pass

    def info(self) -> dict[str, Any]:
        """What the page shows about the model (no file-system paths)."""
        loaded = self.loaded
        meta = loaded.metadata
        return {
            "model": loaded.path.parent.name if loaded.path.is_file() or loaded.path.name == "saved_model" else loaded.path.name,
            "format": loaded.file_format,
            "backbone": meta.get("model", {}).get("backbone", "unknown"),
            "classes": list(loaded.classes),
            "positive_class": loaded.positive_class,
            "threshold": loaded.threshold,
            "threshold_chosen_on": meta.get("threshold", {}).get("chosen_on", "unknown"),
            "site": loaded.site,
            "model_threshold": loaded.model_threshold,
            "image_size": self.settings.image_size,
            "resize": self.settings.resize,
            "saved_with_keras": meta.get("versions", {}).get("keras", "unknown"),
            "gradcam": self._gradcam_layer is not None,
            "ood_check": self.guard.level,
            "ood_note": self.ood_note,
        }

    def analyse(self, uploads: Sequence[tuple[str | None, bytes]], with_images: bool = True) -> list[dict[str, Any]]:
        """One result per upload, in order (see the module doc and :meth:`_result` for the fields)."""
        from . import ood
        from .models import predict_images
        from .predict import decide

        results: list[dict[str, Any]] = []
        inputs, facts, originals, where = [], [], [], []
        held = 0  # pixels of this request's files taken so far
        for index, (name, data) in enumerate(uploads):
            shown = display_name(name, index)
            try:
                # Facts first: its inspect_bytes refuses decompression bombs before any pixel is decoded.
                fact = ood.image_facts(data, shown)
                pixels = fact.width * fact.height
                if held + pixels > self.request_pixels:
                    raise BadFileError(shown, f"not decoded: its {fact.width}x{fact.height} pixels would take this "
                                              f"request's files to {held + pixels:,} pixels, over the server's budget of "
                                              f"{self.request_pixels:,} decoded pixels per request; send it in another request")
                held += pixels
                model_input, shown_image = self._reduce(data, shown, pixels, with_images)
            except BadFileError as exc:
                results.append({"name": shown, "ok": False, "error": exc.reason})
                continue
            inputs.append(model_input)
            facts.append(fact)
            originals.append(shown_image)
            where.append(len(results))
            results.append({"name": shown, "ok": True, "error": None})
        if not inputs:
            return results
        batch = np.stack(inputs)
        loaded = self.loaded
        with self._lock:
            probs = predict_images(loaded.model, batch)
            decisions = decide(probs, loaded.classes, loaded.positive_class, loaded.threshold)
            verdicts = self.guard.check(batch, facts)
            judgeable = np.array([v.ok for v in verdicts])
            heatmaps = None
            if with_images and self._gradcam_layer is not None and judgeable.any():
                from .explain import gradcam

                # The evidence for the decision shown (at the threshold), which need not be the likeliest class.
                decided = [loaded.classes.index(d) for d, ok in zip(decisions, judgeable) if ok]
                heatmaps = np.zeros(batch.shape, dtype=np.float32)
                heatmaps[judgeable] = gradcam(loaded.model, batch[judgeable], class_index=decided,
                                              layer_name=self._gradcam_layer)
        for k, slot in enumerate(where):
            results[slot].update(self._result(batch[k], originals[k], facts[k], probs[k], decisions[k], verdicts[k],
                                              None if heatmaps is None or not judgeable[k] else heatmaps[k], with_images))
        return results

    def _reduce(self, data: bytes, shown: str, pixels: int, with_images: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """One file decoded once (holding its ``pixels`` in the server's budget) and reduced at once: the model's
        input (as :func:`xraylib.preprocess.preprocess_bytes` makes it) and the image shown (``display_px`` at most).
        The full-size pixels are dropped before this returns."""
        try:
            with self.decoding.hold(pixels, self.pixel_wait_s):
                decoded = preprocess.decode_for_model(data, shown, self.settings)
                model_input = preprocess.preprocess_pixels(decoded, self.settings)
                shown_image = _fit_within(decoded, self.display_px) if with_images else None
                del decoded
        except TimeoutError:
            raise BadFileError(shown, f"not decoded: the server was decoding other large images (at most "
                                      f"{self.decoding.capacity:,} pixels at once) for {self.pixel_wait_s:g} s; "
                                      "try again in a minute") from None
        return model_input, shown_image

    def _result(self, model_input, original, fact, probs, decision, verdict, heatmap, with_images) -> dict[str, Any]:
        from .explain import overlay

        loaded = self.loaded
        out: dict[str, Any] = {
            "width": fact.width, "height": fact.height,
            "judgeable": verdict.ok,
            "ood": verdict.to_dict(),
            # Probabilities are reported for every decoded image; a decision only for images the model can judge.
            "probabilities": {c: float(p) for c, p in zip(loaded.classes, probs)},
            "decision": decision if verdict.ok else None,
            "threshold": loaded.threshold,
            "site": loaded.site,
            "positive_class": loaded.positive_class,
        }
        if verdict.ok and heatmap is None:
            out["gradcam_note"] = ("Grad-CAM needs the model's layers: load model.keras or model.h5, not a SavedModel"
                                   if self._gradcam_layer is None else None)
        if with_images:
            side = self.display_px
            shown_input = cv2.resize(model_input, (side, side), interpolation=cv2.INTER_LINEAR)
            out["images"] = {
                "original": _png_data_uri(original),  # already fitted within display_px by _reduce
                "model_input": _png_data_uri(shown_input),
                "overlay": None if heatmap is None else _png_data_uri(overlay(shown_input, heatmap)),
            }
        return out


def results_frame(results: Sequence[dict[str, Any]]) -> "pd.DataFrame":
    """:meth:`Analyser.analyse` results as a table: name, ok, judgeable, decision, ``prob_<class>``, problem."""
    import pandas as pd

    rows = []
    for result in results:
        row = {"name": result["name"], "ok": result["ok"], "judgeable": result.get("judgeable", False),
               "decision": result.get("decision")}
        row.update({f"prob_{c}": p for c, p in result.get("probabilities", {}).items()})
        row["problem"] = result["error"] if not result["ok"] else " ".join(result["ood"]["reasons"]) or None
        rows.append(row)
    return pd.DataFrame(rows)


def results_html(results: Sequence[dict[str, Any]], side: int = 256) -> str:
    """The images of :meth:`Analyser.analyse` results as HTML for a notebook: the Grad-CAM overlay where there
    is one, else the image, each with its name and the decision or why there is none (names HTML-escaped)."""
    import html

    figures = []
    for result in results:
        name = html.escape(result["name"])
        if not result["ok"]:
            caption, src = f"{name}: not read ({html.escape(result['error'])})", None
        elif not result["judgeable"]:
            caption, src = f"{name}: {html.escape(NOT_JUDGEABLE)}", result.get("images", {}).get("original")
        else:
            images_ = result.get("images", {})
            p = result["probabilities"][result["positive_class"]]
            caption = f"{name}: {html.escape(result['decision'])} (P({html.escape(result['positive_class'])}) {p:.2f})"
            src = images_.get("overlay") or images_.get("original")
        image = f'<img src="{src}" width="{side}" height="{side}" style="object-fit:contain;background:#000">' if src else ""
        figures.append(f'<figure style="display:inline-block;margin:4px;vertical-align:top;width:{side}px">{image}'
                       f'<figcaption style="font-size:12px">{caption}</figcaption></figure>')
    return "<div>" + "".join(figures) + "</div>"


def strict_json_provider(app: "flask.Flask") -> Any:
    """The app's JSON provider: strict JSON for every answer. NaN and Infinity, which ``json.dumps`` would write as the
    invalid tokens ``NaN``/``Infinity``, become null (:func:`xraylib.fileio.json_safe`), and ``allow_nan=False`` makes
    any left a server error rather than an answer a browser cannot parse. Keys keep their reading order."""
    from flask.json.provider import DefaultJSONProvider

    from .fileio import json_safe

    class StrictJSONProvider(DefaultJSONProvider):
        sort_keys = False

        def dumps(self, obj: Any, **kwargs: Any) -> str:
            return super().dumps(json_safe(obj), **{**kwargs, "allow_nan": False})

    return StrictJSONProvider(app)


# --------------------------------------------------------------------------------------------
# The Flask app


def create_app(analyser: Analyser, settings: ServeSettings = ServeSettings()) -> "flask.Flask":
    """The Flask app: ``GET /`` (the page), ``POST /api/predict``, ``GET /healthz``, static files."""
    import flask
    from werkzeug.exceptions import HTTPException

    class InMemoryRequest(flask.Request):
        """Uploads stay in memory (bounded by MAX_CONTENT_LENGTH): Werkzeug would spool large ones to temporary files."""

        def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
            return io.BytesIO()

    app = flask.Flask("xraylib.serve", template_folder=str(WEB_DIR / "templates"), static_folder=str(WEB_DIR / "static"))
    app.request_class = InMemoryRequest
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_upload_bytes,
        MAX_FORM_PARTS=2 * settings.max_files + 8,  # bounds the parser's work before the count is checked
        # Werkzeug's multipart decoder applies this to file parts too; the request limit bounds both.
        MAX_FORM_MEMORY_SIZE=settings.max_upload_bytes,
        PROPAGATE_EXCEPTIONS=False,
        TRAP_HTTP_EXCEPTIONS=False,
        SEND_FILE_MAX_AGE_DEFAULT=0,
    )
    app.json = strict_json_provider(app)  # never NaN in an answer
    app.json.sort_keys = False  # results keep their reading order
    app.extensions["xraylib"] = {"analyser": analyser, "settings": settings}
    gate = threading.BoundedSemaphore(settings.max_concurrent)
    limit_text = f"{settings.max_upload_mb:g} MB"

    def error(status: int, message: str, **extra: Any) -> "flask.Response":
        from werkzeug.http import HTTP_STATUS_CODES

        body = {"error": {"status": status, "title": HTTP_STATUS_CODES.get(status, "Error"), "message": message}, **extra}
        response = flask.jsonify(body)
        response.status_code = status
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        messages = {
            413: f"the upload is larger than the {limit_text} limit of this server (start it with --max-upload-mb to "
                 f"change it), or has more than {settings.max_files} files",
            404: "no such page: the page is at /, the API at POST /api/predict and GET /healthz",
            405: "this address does not take that method (POST /api/predict takes a multipart form with the files)",
        }
        return error(exc.code or 500, messages.get(exc.code, exc.description or exc.name))

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unexpected error while handling %s %s", flask.request.method, flask.request.path)
        return error(500, "internal error while handling this request; the server log has the details")

    @app.after_request
    def headers(response: "flask.Response") -> "flask.Response":
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; object-src 'none'; "
            "base-uri 'none'; form-action 'self'")
        if flask.request.path.startswith("/api/"):
            response.headers["Cache-Control"] = "no-store"  # results describe someone's X-ray
        return response

    @app.get("/")
    def index():
        return flask.render_template("index.html", info=analyser.info(), disclaimer=DISCLAIMER, settings=settings,
                                     not_judgeable=NOT_JUDGEABLE)

    @app.get("/healthz")
    def healthz():
        info = analyser.info()
        return flask.jsonify({"status": "ok", "model": info["model"], "backbone": info["backbone"],
                              "classes": info["classes"], "ood_check": info["ood_check"]})

    @app.post("/api/predict")
    def api_predict():
        request = flask.request
        if request.mimetype != "multipart/form-data":
            return error(415, "send the images as multipart/form-data, one or more files in the field 'files' "
                              "(curl -F files=@image.png http://HOST:PORT/api/predict)")
        if request.content_length is not None and request.content_length > settings.max_upload_bytes:
            return error(413, f"the upload ({request.content_length / 1e6:.1f} MB) is larger than the {limit_text} "
                              "limit of this server (start it with --max-upload-mb to change it)")
        if not gate.acquire(timeout=settings.queue_timeout_s):
            return error(503, "the server is busy with other uploads; try again in a minute")
        try:
            files = [f for _, f in request.files.items(multi=True)]  # reads and parses the body (in memory)
            if not files:
                return error(400, "no files in the upload: send one or more PNG, JPEG or DICOM files in the field 'files'")
            if len(files) > settings.max_files:
                return error(413, f"{len(files)} files in one upload; this server takes at most {settings.max_files} "
                                  "(start it with --max-files to change it)")
            uploads = [(f.filename, f.stream.getvalue() if isinstance(f.stream, io.BytesIO) else f.read()) for f in files]
            for f in files:
                f.close()
            with_images = request.args.get("images", "1").lower() not in ("0", "false", "no")
            results = analyser.analyse(uploads, with_images=with_images)
            del uploads
        finally:
            gate.release()
        body = {"results": results, "model": analyser.info()["model"], "disclaimer": DISCLAIMER}
        if not any(r["ok"] for r in results):
            reasons = "; ".join(f"{r['name']}: {r['error']}" for r in results)
            return error(422, f"no file could be read as a PNG, JPEG or DICOM image ({reasons})", **body)
        return flask.jsonify(body)

    return app


# --------------------------------------------------------------------------------------------
# Running it


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_server(model: "LoadedModel | str | Path", settings: ServeSettings = ServeSettings(),
                 data_dir: str | Path | None = None, say: Callable[[str], None] = print, site: str | None = None,
                 site_normals: Any = None, site_positives: Any = None, target_specificity: float | None = None,
                 target_sensitivity: float | None = None):
    """A Werkzeug server (threaded) for ``model``, not yet serving: ``server.serve_forever()``; its port is
    ``server.server_port`` (``settings.port=0`` takes a free one). ``site``: decide at that site profile's
    threshold (:mod:`xraylib.calibrate`) instead of the model's own; an unknown one raises :class:`ModelError`.
    With ``site_normals`` (and optionally ``site_positives``) the profile ``site`` is first made (or remade) by
    :func:`xraylib.calibrate.calibrate` for ``target_specificity`` or ``target_sensitivity``, and its report said."""
    from werkzeug.serving import make_server

    from . import runs
    from .models import LoadedModel, load_model

    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    if site_normals is not None:
        from . import calibrate

        if site is None:
            raise ConfigError("calibrating at start needs a site name (--site NAME) for the profile")
        calibration = calibrate.calibrate(loaded, site_normals, site, positives=site_positives,
                                          target_specificity=target_specificity, target_sensitivity=target_sensitivity,
                                          data_dir=data_dir, say=say)
        for line in calibration.messages():
            say(line)
        loaded = loaded.with_site_profile(calibration.site, calibration.profile())
    loaded = loaded.for_site(site)
    if site is not None:
        say(f"site profile {site!r}: decisions at threshold {loaded.threshold:.4f} (the model's own: "
            f"{loaded.model_threshold:.4f})")
    if loaded.file_format == "savedmodel":
        say("note: a SavedModel runs a TensorFlow graph outside Keras' safe mode; serve only SavedModels you trust")
    reference, note = runs.prepare_ood(loaded, data_dir, say)
    app = create_app(Analyser(loaded, reference, note, settings.display_px), settings)
    try:
        return make_server(settings.host, settings.port, app, threaded=True)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {settings.host}:{settings.port} ({exc.strerror or exc}); "
                          "choose another --port or --host") from None


def run_server(model: "LoadedModel | str | Path", host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
               max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, max_files: int = DEFAULT_MAX_FILES,
               data_dir: str | Path | None = None, site: str | None = None, **calibration: Any) -> None:
    """Serve the page until Ctrl+C. ``host="0.0.0.0"`` lets other machines in; the default is this machine only.
    ``site``: decide at that site profile's threshold; ``calibration``: :func:`build_server`'s ``site_normals``,
    ``site_positives``, ``target_specificity``, ``target_sensitivity`` (calibrate the site first)."""
    settings = ServeSettings(host=host, port=port, max_upload_mb=max_upload_mb, max_files=max_files)
    server = build_server(model, settings, data_dir, site=site, **calibration)
    if not _is_loopback(host):
        print(f"warning: listening on {host}: anyone who can reach this machine can upload images. There is no "
              "login and no encryption; use it only on a network you trust.")
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    print(DISCLAIMER)
    print(f"xraylib: open http://{shown}:{server.server_port}/ in a browser (Ctrl+C to stop); "
          f"limits: {settings.max_upload_mb:g} MB and {settings.max_files} files per upload")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` command's options (for ``python -m xraylib serve`` and ``python -m xraylib.serve``)."""
    parser.add_argument("--model", required=True,
                        help="a run folder (OUTPUT_DIR/models/RUN), model.keras, model.h5 or a SavedModel folder")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0 opens it to "
                             "the network, without login or encryption)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free port)")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                        help=f"largest upload in MB, all files together (default {DEFAULT_MAX_UPLOAD_MB:g})")
    parser.add_argument("--max-files", type=int, default=DEFAULT_MAX_FILES,
                        help=f"most files per upload (default {DEFAULT_MAX_FILES})")
    parser.add_argument("--data", metavar="DIR", default=None,
                        help="the preprocessed data the model was trained on (OUTPUT_DIR/preprocessed), to build the "
                             "out-of-distribution reference when the model has none (default: the folder named in "
                             "model.json, when it still holds that data)")
    parser.add_argument("--site", metavar="NAME", default=None,
                        help="decide at this site profile's threshold (made by `python -m xraylib calibrate`) instead "
                             "of the model's own")
    parser.add_argument("--calibrate-normals", metavar="DIR", default=None,
                        help="first calibrate --site on these images of the site known to be normal (as `python -m "
                             "xraylib calibrate` does: the profile is stored in model.json), then serve at it")
    parser.add_argument("--calibrate-positives", metavar="DIR", default=None,
                        help="with --calibrate-normals: the site's images known to be positive (optional)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--target-specificity", type=float, metavar="S", default=None,
                        help="with --calibrate-normals: share of the site's normals to call normal (default 0.9)")
    target.add_argument("--target-sensitivity", type=float, metavar="R", default=None,
                        help="with --calibrate-normals: share of the site's positives to call positive")


def cmd_serve(args: argparse.Namespace) -> None:
    """``python -m xraylib serve``: what :func:`add_arguments` parsed, to :func:`run_server`."""
    calibration: dict[str, Any] = {}
    if args.calibrate_normals is not None:
        specificity = args.target_specificity
        if specificity is None and args.target_sensitivity is None:
            specificity = 0.9
        calibration = {"site_normals": args.calibrate_normals, "site_positives": args.calibrate_positives,
                       "target_specificity": specificity, "target_sensitivity": args.target_sensitivity}
    elif args.calibrate_positives or args.target_specificity is not None or args.target_sensitivity is not None:
        raise ConfigError("--calibrate-positives, --target-specificity and --target-sensitivity go with "
                          "--calibrate-normals DIR (the site's known normals) and --site NAME")
    run_server(args.model, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb,
               max_files=args.max_files, data_dir=args.data, site=args.site, **calibration)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m xraylib.serve --model PATH ...``; errors print one line and exit with status 2."""
    parser = argparse.ArgumentParser(prog="python -m xraylib serve", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cmd_serve(args)
    except XraylibError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
