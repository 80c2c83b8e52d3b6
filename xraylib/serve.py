"""A local web page (and a JSON API) to check your own images with a trained model.

``python -m xraylib serve --model OUTPUT_DIR/models/RUN`` starts it on http://127.0.0.1:8000:
upload PNG, JPEG or DICOM files (or drop them on the page) and see, for each, the class
probabilities, the decision at the model's threshold, a Grad-CAM heatmap, and the
out-of-distribution verdict of :mod:`xraylib.ood` ("not a chest X-ray this model can judge").
Scripts use ``POST /api/predict`` (multipart form, one or more files, with the header ``X-Xraylib: 1``:
``curl -H 'X-Xraylib: 1' -F files=@image.png http://127.0.0.1:8000/api/predict``) and ``GET /healthz``.
``--site NAME`` decides at a site profile's threshold (:mod:`xraylib.calibrate`; with ``--calibrate-normals DIR``
the profile is made first), and the page and every result say which.

The server is waitress (a production WSGI server, pure Python): it runs in the same process on Linux, macOS,
Windows and in Colab, and reads each request's whole body in its I/O thread (with a per-connection
``channel_timeout``) before a worker thread (a bounded pool) calls the app, so a slow or stalled client holds
a connection, never a worker or an analysis slot. gunicorn was not chosen: it forks worker processes (each
would load the model) and does not run on Windows.

Safe by default:

- it listens on 127.0.0.1 (this machine only) unless ``host`` says otherwise;
- it answers only requests whose ``Host`` is a name of this server (127.0.0.1, localhost, [::1], the address it
  listens on, and the names given with ``--allow-host``; 421 otherwise), whose ``Origin``, when a browser sends
  one, is the server's own or under an ``--allow-host`` name (a proxy that rewrites Host; 403 otherwise), and ``POST /api/predict`` only with the header ``X-Xraylib: 1``
  (403 otherwise), which a page on another site cannot make a browser send: no cross-site uploads, no DNS
  rebinding;
- a request may carry at most ``max_upload_mb`` MB (413 otherwise, refused before the body is
  read when the client says its size) and ``max_files`` files; a connection that sends nothing for
  ``channel_timeout_s`` seconds is closed; at most ``connection_limit`` connections are open and ``threads``
  requests handled at once, and of those at most ``max_concurrent`` analysed at once (a slot is taken only
  once the whole body has arrived), so memory stays bounded under many parallel uploads; a request whose images
  hold more than ``heavy_pixels`` pixels is analysed in a lane of its own, one at a time, so large images
  never take the slots of ordinary uploads;
- uploads are kept in memory and decoded from bytes: nothing is written to disk, not even to a
  temporary folder (waitress' ``inbuf_overflow`` and ``outbuf_overflow`` are set above the largest request
  and answer, so it never spools them to temporary files), and nothing is kept after the response; file
  names are shown, never used as paths (a name with a line break or invalid UTF-8 is shown cleaned, not
  dropped); the type is decided by content (:func:`xraylib.images.detect_format`); images over
  :data:`xraylib.images.MAX_PIXELS` are refused before decoding (decompression bombs);
- the model is loaded with Keras' safe mode (:func:`xraylib.models.load_model`), and calls to
  it are serialised by a lock (Keras models are not safe to call from several threads at once);
- every error is a JSON object ``{"error": {"status", "title", "message"}}`` with a 4xx status
  (500 only for a bug, without its stack trace, which goes to the server log), also those waitress answers
  itself (a body over the limit); a 405 carries ``Allow``.

It does not authenticate anyone, encrypt anything or limit the rate per client: to let others on a network
use it, put it behind a reverse proxy that adds TLS and a login (README, "The command line").

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
import re
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
    ``threads``: waitress' worker threads (requests handled at once, after their body has arrived).
    ``channel_timeout_s``: a connection that sends nothing for this many seconds is closed (whole seconds).
    ``connection_limit``: open connections at most (more wait in the listen queue). ``allow_hosts``: names
    besides this server's own addresses that the ``Host`` header may carry (``--allow-host``; a leading dot
    allows a domain and its subdomains).
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
    #: A request whose files hold more decoded pixels than this (from their headers) is heavy: heavy requests are
    #: analysed one at a time in a lane of their own (at most ``max_concurrent`` wait for it, more get 503 at once),
    #: so they take at most one core and never the slots of ordinary uploads. 4096x4096 by default: a chest X-ray
    #: from a detector or a CR plate (about 3000x3000 to 4280x3520) is never heavy on its own.
    heavy_pixels: int = 4096 * 4096
    threads: int = 8
    channel_timeout_s: int = 30
    connection_limit: int = 100
    allow_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 < float(self.max_upload_mb) <= 1024:
            raise ConfigError(f"max_upload_mb must be above 0 and at most 1024, got {self.max_upload_mb}")
        for name in ("max_files", "max_concurrent", "threads", "channel_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
                raise ConfigError(f"{name} must be a whole number from 1 to 1000, got {value!r}")
        if isinstance(self.heavy_pixels, bool) or not isinstance(self.heavy_pixels, int) or self.heavy_pixels < 1:
            raise ConfigError(f"heavy_pixels must be a whole number of at least 1, got {self.heavy_pixels!r}")
        for name in ("request_pixels", "server_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < images.MAX_PIXELS:
                raise ConfigError(f"{name} must be a whole number of at least {images.MAX_PIXELS:,} (the largest "
                                  f"image's pixels), got {value!r}")
        if isinstance(self.connection_limit, bool) or not isinstance(self.connection_limit, int) \
                or not 1 <= self.connection_limit <= 100_000:
            raise ConfigError(f"connection_limit must be a whole number from 1 to 100000, got {self.connection_limit!r}")
        if isinstance(self.allow_hosts, str):
            object.__setattr__(self, "allow_hosts", (self.allow_hosts,))
        for name in self.allow_hosts:
            if not _host_name(str(name)) or not _HOST_NAME.fullmatch(_host_name(str(name))):
                raise ConfigError(f"--allow-host takes a host name or address without a port, like "
                                  f"xray.example.org or 192.168.1.20, got {name!r}")
        object.__setattr__(self, "allow_hosts", tuple(_host_name(str(name)) for name in self.allow_hosts))
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


_HOST_NAME = re.compile(r"\.?[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?|\[[0-9a-f:.]+\]|[0-9a-f:.]+")
_HOST_HEADER = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]/@\s]+)(?::(\d{1,5}))?")
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9A-Fa-f]+>")
_LOCAL_NAMES = ("127.0.0.1", "localhost", "[::1]")
#: What ``POST /api/predict`` needs besides the files: a header a cross-site form or ``no-cors`` fetch cannot send.
CUSTOM_HEADER = ("X-Xraylib", "1")
CURL_HINT = "curl -H 'X-Xraylib: 1' -F files=@image.png http://HOST:PORT/api/predict"


def _host_name(name: str) -> str:
    """A host name as compared: lower case, no trailing dot, an IPv6 address in brackets (``::1`` -> ``[::1]``)."""
    name = name.strip().lower().rstrip(".") if name.strip() != "." else ""
    if ":" in name and not name.startswith("["):
        name = f"[{name}]"
    return name


def _clean_message(text: str) -> str:
    """A decoder's message without Python object reprs (``<_io.BytesIO object at 0x...>`` -> ``the file``)."""
    return _OBJECT_REPR.sub("the file", text)


def _balanced_header_lines(block: bytes) -> bytes:
    """A multipart part's header block whose lines a file name with CR/LF broke, joined again (with a space)."""
    merged: list[bytes] = []
    for line in block.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n"):
        if merged and (merged[-1].count(b'"') - merged[-1].count(b'\\"')) % 2 == 1:  # inside a quoted value
            merged[-1] += b" " + line
        else:
            merged.append(line)
    return b"\r\n".join(merged)


def _repair_part_headers(body: bytes, boundary: str) -> bytes:
    """The multipart ``body`` with each part's headers made parseable, so that no file is dropped for its name.

    Werkzeug decodes part headers as strict UTF-8 (one file name in Latin-1 and the whole form parses as
    empty) and splits them at any CR or LF (a name with a line break ends the header, and the file becomes a
    text field). Header blocks that are not UTF-8 are decoded with U+FFFD for the bad bytes, and lines split
    inside a quoted value are joined; the file data is left as it is.
    """
    delimiter = b"--" + boundary.encode("latin-1", "replace")
    pieces = body.split(delimiter)
    changed = False
    for k in range(1, len(pieces)):
        piece = pieces[k]
        start = 2 if piece.startswith(b"\r\n") else 1 if piece.startswith(b"\n") else 0
        end = piece.find(b"\r\n\r\n", start)
        if not start or end < 0:
            continue
        block = piece[start:end]
        try:
            fixed = block.decode("utf-8").encode("utf-8")
        except UnicodeDecodeError:
            fixed = block.decode("utf-8", "replace").encode("utf-8")
        if any((line.count(b'"') - line.count(b'\\"')) % 2 for line in fixed.splitlines()):
            fixed = _balanced_header_lines(fixed)
        if fixed != block:
            pieces[k] = piece[:start] + fixed + piece[end:]
            changed = True
    return delimiter.join(pieces) if changed else body


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

    def decoded_pixels(self, uploads: Sequence[tuple[str | None, bytes]]) -> int:
        """Pixels the uploads' images would hold decoded, from their headers (files that cannot be read count 0)."""
        from . import ood

        total = 0
        for index, (name, data) in enumerate(uploads):
            try:
                fact = ood.image_facts(data, display_name(name, index))
            except BadFileError:
                continue
            total += fact.width * fact.height
        return total

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

        def _get_stream_for_parsing(self):
            # The body is in memory anyway (waitress buffers it; bounded by MAX_CONTENT_LENGTH): repair the part
            # headers a file name with invalid UTF-8 or CR/LF would break, so that no file is silently dropped.
            data = self.get_data(cache=True)
            if self.content_length is None and self.max_content_length is not None \
                    and len(data) >= self.max_content_length:  # a body of unknown size, read up to the limit
                from werkzeug.exceptions import RequestEntityTooLarge

                raise RequestEntityTooLarge()
            boundary = self.mimetype_params.get("boundary")
            return io.BytesIO(_repair_part_headers(data, boundary) if boundary and self.mimetype.startswith("multipart/")
                              else data)

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
    heavy_lane = threading.BoundedSemaphore(1)  # heavy requests analysed at once
    heavy_queue = threading.BoundedSemaphore(settings.max_concurrent)  # heavy requests waiting for it or in it
    limit_text = f"{settings.max_upload_mb:g} MB"
    own_names = {_host_name(name) for name in (*_LOCAL_NAMES, settings.host) if name not in ("0.0.0.0", "::", "")}
    header_name, header_value = CUSTOM_HEADER

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
        allowed = getattr(exc, "valid_methods", None) if exc.code == 405 else None
        message = messages.get(exc.code, exc.description or exc.name)
        response = error(exc.code or 500, f"{message}; it takes {', '.join(allowed)}" if allowed else message)
        if allowed:
            response.headers["Allow"] = ", ".join(allowed)
        return response

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unexpected error while handling %s %s", flask.request.method, flask.request.path)
        return error(500, "internal error while handling this request; the server log has the details")

    def allowed_host(host: str) -> bool:
        """Is ``host`` (the Host header) a name of this server: its own addresses (any port: a port cannot point a
        browser elsewhere) or one given with --allow-host (a leading dot: that domain and its subdomains)?"""
        match = _HOST_HEADER.fullmatch(host.strip())
        if not match:
            return False
        name = _host_name(match.group(1))
        if name in own_names or name in settings.allow_hosts:
            return True
        return any(allowed.startswith(".") and (name.endswith(allowed) or name == allowed[1:])
                   for allowed in settings.allow_hosts)

    @app.before_request
    def check_host_and_origin():
        """DNS rebinding and cross-site requests: refuse a foreign Host (421) and a foreign Origin (403)."""
        request = flask.request
        host = request.headers.get("Host")
        if host is not None and not allowed_host(host):
            shown = display_name(host.split(":")[0] if not host.startswith("[") else host, 0)
            return error(421, f"this server does not answer to the name {shown!r} (Host header); it answers to "
                              f"{', '.join(sorted(own_names))}. To serve under another name on a network, start it "
                              f"with --allow-host {shown}")
        origin = request.headers.get("Origin")
        if origin is not None:
            from urllib.parse import urlsplit

            parts = urlsplit(origin.strip()) if origin.strip() != "null" else None
            same = parts is not None and parts.scheme in ("http", "https") and (
                (host is not None and parts.netloc.lower() == host.strip().lower())
                or (settings.allow_hosts and parts.hostname is not None and allowed_host(parts.hostname)
                    and _host_name(parts.hostname) not in own_names))  # a page under an --allow-host name
            if not same:
                shown_origin = "".join(ch for ch in origin if ch.isprintable())[:100]
                return error(403, f"this request comes from another web page (Origin {shown_origin!r}), "
                                  "not from this server's own page; other sites cannot use this server through "
                                  f"a browser. Scripts send no Origin: {CURL_HINT}")
        return None

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
        if request.headers.get(header_name, "").strip() != header_value:
            return error(403, f"send the header '{header_name}: {header_value}' with POST /api/predict ({CURL_HINT}); "
                              "the page sends it itself. A form or page on another site cannot send it, which keeps "
                              "other sites from uploading through your browser")
        if request.mimetype != "multipart/form-data":
            return error(415, "send the images as multipart/form-data, one or more files in the field 'files' "
                              f"({CURL_HINT})")
        if request.content_length is not None and request.content_length > settings.max_upload_bytes:
            return error(413, f"the upload ({request.content_length / 1e6:.1f} MB) is larger than the {limit_text} "
                              "limit of this server (start it with --max-upload-mb to change it)")
        files = [f for _, f in request.files.items(multi=True)]  # parses the body (waitress has read it, in memory)
        if not files:
            fields = sorted({display_name(key, 0) for key in request.form.keys()})
            why = (f"; the form had only text fields ({', '.join(fields)}): send each file as a file part "
                   "(filename=\"...\")" if fields else "")
            return error(400, "no files in the upload: send one or more PNG, JPEG or DICOM files in the field "
                              f"'files' ({CURL_HINT}){why}")
        if len(files) > settings.max_files:
            return error(413, f"{len(files)} files in one upload; this server takes at most {settings.max_files} "
                              "(start it with --max-files to change it)")
        uploads = [(f.filename, f.stream.getvalue() if isinstance(f.stream, io.BytesIO) else f.read()) for f in files]
        for f in files:
            f.close()
        with_images = request.args.get("images", "1").lower() not in ("0", "false", "no")
        with contextlib.ExitStack() as slots:
            # Ordinary uploads and heavy ones (large images: see ServeSettings.heavy_pixels) queue apart.
            if analyser.decoded_pixels(uploads) > settings.heavy_pixels:
                if not heavy_queue.acquire(blocking=False):
                    return error(503, "the server is busy with other uploads of large images (more than "
                                      f"{settings.heavy_pixels:,} pixels in one request); try again in a minute")
                slots.callback(heavy_queue.release)
                lane = heavy_lane
            else:
                lane = gate
            if not lane.acquire(timeout=settings.queue_timeout_s):
                return error(503, "the server is busy with other uploads; try again in a minute")
            slots.callback(lane.release)
            results = analyser.analyse(uploads, with_images=with_images)
        del uploads
        for result in results:
            if result.get("error"):
                result["error"] = _clean_message(result["error"])
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


def _json_error_channel(settings: ServeSettings):
    """waitress' connection class, answering the errors waitress decides itself (a body over the limit, a bad
    request line) with the JSON error object instead of its plain text."""
    import json

    from waitress.channel import HTTPChannel
    from waitress.task import ErrorTask

    messages = {413: f"the upload is larger than the {settings.max_upload_mb:g} MB limit of this server (start it "
                     "with --max-upload-mb to change it)"}

    class JsonErrorTask(ErrorTask):
        def execute(self):
            error = self.request.error
            code = int(error.code)
            message = messages.get(code, " ".join(str(error.body).split()) or error.reason)
            body = json.dumps({"error": {"status": code, "title": error.reason, "message": message}}).encode()
            self.status = f"{code} {error.reason}"
            self.response_headers.extend([("Content-Type", "application/json"), ("Connection", "close"),
                                          ("X-Content-Type-Options", "nosniff"), ("Cache-Control", "no-store")])
            self.set_close_on_finish()
            self.content_length = len(body)
            self.write(body)

    class JsonErrorChannel(HTTPChannel):
        error_task_class = JsonErrorTask

    return JsonErrorChannel


class Server:
    """The app served by waitress, not yet serving: :meth:`run` serves until :meth:`close` (from another
    thread) or Ctrl+C; :attr:`effective_port` is the port (``settings.port=0`` takes a free one); :attr:`app`
    the Flask app. ``serve_forever``, ``server_port``, ``shutdown`` and ``server_close`` are kept for code
    written for the Werkzeug server of earlier versions."""

    def __init__(self, app: "flask.Flask", settings: ServeSettings):
        from waitress import create_server
        from waitress.server import BaseWSGIServer

        self.app = app
        self.settings = settings
        # Requests and answers stay in memory: waitress spools bodies over inbuf_overflow (512 KB by default) and
        # answers over outbuf_overflow (1 MB) to temporary files. An answer holds at most max_files x 3 small PNGs.
        largest = settings.max_upload_bytes + 1_000_000
        self._server = create_server(
            app, host=settings.host, port=settings.port, threads=settings.threads,
            channel_timeout=settings.channel_timeout_s, cleanup_interval=max(1, min(30, settings.channel_timeout_s // 2)),
            connection_limit=settings.connection_limit,
            max_request_body_size=settings.max_upload_bytes + 1,  # waitress refuses a body of this size or more
            inbuf_overflow=largest, outbuf_overflow=max(largest, 256_000_000), ident="xraylib",
            expose_tracebacks=False, clear_untrusted_proxy_headers=True)
        channel = _json_error_channel(settings)
        listeners = [self._server] if isinstance(self._server, BaseWSGIServer) else \
            [d for d in self._server.map.values() if isinstance(d, BaseWSGIServer)]
        for listener in listeners:
            listener.channel_class = channel
        self.effective_port = int(listeners[0].effective_port)
        self._closed = threading.Event()

    def run(self) -> None:
        """Serve until :meth:`close` or Ctrl+C (which closes it)."""
        try:
            self._server.run()
        finally:
            self.close()

    def close(self) -> None:
        """Stop serving: close the listening socket and every connection, and stop the worker threads."""
        if self._closed.is_set():
            return
        self._closed.set()
        from waitress import wasyncore

        self._server.task_dispatcher.shutdown(timeout=5)
        wasyncore.close_all(self._server._map if hasattr(self._server, "_map") else self._server.map)

    # The Werkzeug server's names, for code written for earlier versions.
    serve_forever = run
    shutdown = close
    server_close = close

    @property
    def server_port(self) -> int:
        return self.effective_port


def build_server(model: "LoadedModel | str | Path", settings: ServeSettings = ServeSettings(),
                 data_dir: str | Path | None = None, say: Callable[[str], None] = print, site: str | None = None,
                 site_normals: Any = None, site_positives: Any = None, target_specificity: float | None = None,
                 target_sensitivity: float | None = None):
    """A :class:`Server` (waitress) for ``model``, not yet serving: ``server.run()`` (``server.close()`` from
    another thread stops it); its port is ``server.effective_port`` (``settings.port=0`` takes a free one). ``site``: decide at that site profile's
    threshold (:mod:`xraylib.calibrate`) instead of the model's own; an unknown one raises :class:`ModelError`.
    With ``site_normals`` (and optionally ``site_positives``) the profile ``site`` is first made (or remade) by
    :func:`xraylib.calibrate.calibrate` for ``target_specificity`` or ``target_sensitivity``, and its report said."""
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
    analyser = Analyser(loaded, reference, note, settings.display_px, request_pixels=settings.request_pixels,
                        server_pixels=settings.server_pixels, pixel_wait_s=settings.pixel_wait_s)
    app = create_app(analyser, settings)
    try:
        return Server(app, settings)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot listen on {settings.host}:{settings.port} "
                          f"({getattr(exc, 'strerror', None) or exc}); choose another --port or --host") from None


def run_server(model: "LoadedModel | str | Path", host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
               max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, max_files: int = DEFAULT_MAX_FILES,
               data_dir: str | Path | None = None, site: str | None = None, allow_hosts: Sequence[str] = (),
               **calibration: Any) -> None:
    """Serve the page until Ctrl+C. ``host="0.0.0.0"`` lets other machines in; the default is this machine only.
    ``allow_hosts``: the names others use to reach it (``--allow-host``). ``site``: decide at that site profile's
    threshold; ``calibration``: :func:`build_server`'s ``site_normals``, ``site_positives``,
    ``target_specificity``, ``target_sensitivity`` (calibrate the site first)."""
    settings = ServeSettings(host=host, port=port, max_upload_mb=max_upload_mb, max_files=max_files,
                             allow_hosts=tuple(allow_hosts))
    server = build_server(model, settings, data_dir, site=site, **calibration)
    if not _is_loopback(host):
        print(f"warning: listening on {host}: anyone who can reach this machine can upload images. There is no "
              "login and no encryption; use it only on a network you trust, or behind a reverse proxy with TLS and "
              "a login.")
        if not settings.allow_hosts:
            print("note: only requests to 127.0.0.1 or localhost are answered; give the name or address others use "
                  "to reach this machine with --allow-host NAME")
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    print(DISCLAIMER)
    print(f"xraylib: open http://{shown}:{server.effective_port}/ in a browser (Ctrl+C to stop); "
          f"limits: {settings.max_upload_mb:g} MB and {settings.max_files} files per upload; "
          f"scripts: curl -H 'X-Xraylib: 1' -F files=@image.png http://{shown}:{server.effective_port}/api/predict")
    try:
        server.run()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` command's options (for ``python -m xraylib serve`` and ``python -m xraylib.serve``)."""
    parser.add_argument("--model", required=True,
                        help="a run folder (OUTPUT_DIR/models/RUN), model.keras, model.h5 or a SavedModel folder")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0 opens it to "
                             "the network, without login or encryption)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free port)")
    parser.add_argument("--allow-host", metavar="NAME", action="append", default=[],
                        help="a name or address others use to reach this server (the Host of their requests), when "
                             "serving on a network (repeatable; .example.org allows its subdomains too). Without it "
                             "only 127.0.0.1, localhost, [::1] and the --host address are answered (against DNS "
                             "rebinding)")
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
               max_files=args.max_files, data_dir=args.data, site=args.site, allow_hosts=args.allow_host, **calibration)


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
