"""Load test of the web server (`python -m xraylib serve`): normal uploads beside slow and large-image clients.

    .venv/bin/python benchmarks/load.py --model outputs/demo/models/run --label after
    .venv/bin/python benchmarks/load.py --model outputs/demo/models/run --label before --code /tmp/before --no-header

It starts the server as a subprocess (``python -m xraylib serve --model RUN --port 0``, with ``PYTHONPATH=--code``
so that another checkout's server can be measured), samples its memory (RSS with any children, psutil), and:

1. unloaded: ``--unloaded`` normal uploads one after the other (the latency a user sees on an idle server);
2. capacity: 4 clients uploading back to back for ``--capacity-seconds`` (requests per second);
3. under load, for ``--seconds``: normal clients at half the capacity (open loop: a request every
   2/capacity seconds, whatever the answers do), 4 slow clients (``Content-Length: 1000000``, then one byte
   every 5 s, reconnecting when the server closes them) and 4 clients sending 16 grey 7745x7745 PNGs
   (about 58 KB each) per request, back to back (the attack of issue 17).

A normal upload is ``--image`` (default: a PNG of the model's sample data, else a generated 1024x1024 one), sent
as the page sends it (with images). It writes the run under ``--label`` into ``--out`` (default
``benchmarks/results/load.json``; other labels already there are kept) and prints a summary. The machine load
(os.getloadavg) is recorded: on a shared machine the timings are noisy.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
HEADER = {"X-Xraylib": "1"}
LARGE_SIDE = 7745
LARGE_FILES = 16
TIMEOUT_S = 60.0


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
             f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n" for name, data in files]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Client:
    def __init__(self, port: int, header: bool):
        self.port, self.headers = port, (dict(HEADER) if header else {})

    def post(self, body: bytes, content_type: str, path: str = "/api/predict") -> tuple[int, float]:
        """(status, seconds); status 0: no answer within TIMEOUT_S or the connection failed."""
        start = time.perf_counter()
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT_S)
        try:
            connection.request("POST", path, body=body, headers={"Content-Type": content_type, **self.headers})
            response = connection.getresponse()
            response.read()
            status = response.status
        except (OSError, http.client.HTTPException):
            status = 0
        finally:
            connection.close()
        return status, time.perf_counter() - start


class MemorySampler(threading.Thread):
    """Peak RSS of a process and its children, sampled every 0.1 s."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.process, self.peak, self.stop = psutil.Process(pid), 0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.1):
            try:
                procs = [self.process, *self.process.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass


def start_server(model: str, code: Path, extra: list[str]) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "PYTHONPATH": str(code), "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    process = subprocess.Popen([sys.executable, "-m", "xraylib", "serve", "--model", model, "--port", "0", *extra],
                               cwd=str(code), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:  # "xraylib: open http://127.0.0.1:PORT/ in a browser" (old and new servers)
        lines.append(line)
        found = re.search(r"open http://[^:]+:(\d+)/", line)
        if found:
            threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()  # drain the log
            return process, int(found.group(1))
    raise SystemExit("the server did not start:\n" + "".join(lines[-30:]))


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def slow_client(port: int, header: bool, stop: threading.Event, counts: dict) -> None:
    """Announce 1 MB, then one byte every 5 s; reconnect whenever the server closes the connection."""
    head = (f"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n" + ("X-Xraylib: 1\r\n" if header else "")
            + "Content-Type: multipart/form-data; boundary=slow\r\nContent-Length: 1000000\r\n\r\n--slow\r\n").encode()
    while not stop.is_set():
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(head)
            counts["connections"] += 1
            sock.settimeout(0.05)
            while not stop.wait(5.0):
                try:
                    if sock.recv(4096) == b"":
                        break  # closed by the server
                except socket.timeout:
                    pass
                sock.send(b"x")
        except OSError:
            pass
        else:
            sock.close()
        if not stop.is_set():
            counts["closed_by_server"] += 1


def run(args: argparse.Namespace) -> dict:
    normal = Path(args.image).read_bytes() if args.image else default_image(args.model)
    normal_body = multipart([("normal.png", normal)])
    grey = [cv2.imencode(".png", np.full((LARGE_SIDE, LARGE_SIDE), 96 + k, np.uint8))[1].tobytes() for k in range(4)]
    large_body = multipart([(f"large{k}.png", grey[k % 4]) for k in range(LARGE_FILES)])
    sizes = {"normal_upload_kb": len(normal_body[0]) / 1e3, "large_request_kb": len(large_body[0]) / 1e3,
             "large_png_kb": len(grey[0]) / 1e3, "large_request": f"{LARGE_FILES} grey PNGs of {LARGE_SIDE}x{LARGE_SIDE}"}
    print(f"normal upload {sizes['normal_upload_kb']:.0f} KB; large request {sizes['large_request_kb']:.0f} KB "
          f"({LARGE_FILES} PNGs of {LARGE_SIDE}x{LARGE_SIDE}, {sizes['large_png_kb']:.0f} KB each)")
    load_before = os.getloadavg()
    process, port = start_server(args.model, Path(args.code).resolve(), args.server_arg or [])
    sampler = MemorySampler(process.pid)
    sampler.start()
    client = Client(port, args.header)
    try:
        for _ in range(3):  # warm up (first model call, Grad-CAM graph)
            client.post(*normal_body)
        idle_rss = sampler.peak
        unloaded = [client.post(*normal_body) for _ in range(args.unloaded)]
        unloaded_ok = [t for s, t in unloaded if s == 200]
        # Capacity: 4 clients back to back.
        done: list[tuple[int, float]] = []
        end = time.monotonic() + args.capacity_seconds

        def closed_loop():
            while time.monotonic() < end:
                done.append(client.post(*normal_body))

        start = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: closed_loop(), range(4)))
        capacity = sum(1 for s, _ in done if s == 200) / (time.monotonic() - start)
        rate = max(capacity / 2, 0.05)
        print(f"unloaded p50 {percentile(unloaded_ok, 50):.3f} s, p95 {percentile(unloaded_ok, 95):.3f} s; "
              f"capacity {capacity:.2f} uploads/s; under load: normal clients at {rate:.2f}/s for {args.seconds} s")

        # Under load.
        stop = threading.Event()
        slow_counts = {"connections": 0, "closed_by_server": 0}
        large: list[tuple[int, float]] = []

        def large_client():
            while not stop.is_set():
                large.append(client.post(*large_body, path="/api/predict?images=0"))

        background = [threading.Thread(target=slow_client, args=(port, args.header, stop, slow_counts), daemon=True)
                      for _ in range(4)] + [threading.Thread(target=large_client, daemon=True) for _ in range(4)]
        for thread in background:
            thread.start()
        normal_results: list[tuple[int, float]] = []
        start = time.monotonic()
        futures = []
        with ThreadPoolExecutor(64) as pool:
            k = 0
            while True:
                due = start + k / rate
                if due - start >= args.seconds:
                    break
                time.sleep(max(0.0, due - time.monotonic()))
                futures.append(pool.submit(client.post, *normal_body))
                k += 1
            normal_results = [f.result() for f in futures]
        elapsed = time.monotonic() - start
        stop.set()
        for thread in background:
            thread.join(timeout=TIMEOUT_S + 10)
    finally:
        sampler.stop.set()
        sampler.join(timeout=5)
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
    ok = [t for s, t in normal_results if s == 200]
    statuses: dict[str, int] = {}
    for s, _ in normal_results:
        statuses[str(s)] = statuses.get(str(s), 0) + 1
    large_statuses: dict[str, int] = {}
    for s, _ in large:
        large_statuses[str(s)] = large_statuses.get(str(s), 0) + 1
    p95_unloaded, p95_loaded = percentile(unloaded_ok, 95), percentile([t for _, t in normal_results], 95)
    return {
        "label": args.label,
        "code": str(Path(args.code).resolve()),
        "commit": git_commit(Path(args.code)),
        "custom_header_sent": args.header,
        "model": args.model_note or args.model,
        "seconds": args.seconds,
        "requests": sizes,
        "unloaded": {"n": len(unloaded), "ok": len(unloaded_ok), "p50_s": percentile(unloaded_ok, 50),
                     "p95_s": p95_unloaded},
        "capacity_uploads_per_s": capacity,
        "normal_rate_per_s": rate,
        "normal": {"sent": len(normal_results), "ok": len(ok), "statuses": statuses,
                   "throughput_ok_per_s": len(ok) / elapsed,
                   "p50_s": percentile([t for _, t in normal_results], 50), "p95_s": p95_loaded,
                   "p95_ok_only_s": percentile(ok, 95),
                   "p95_vs_unloaded": (p95_loaded / p95_unloaded) if p95_loaded and p95_unloaded else None,
                   "note": f"status 0: no answer within {TIMEOUT_S:g} s (its latency counts as {TIMEOUT_S:g} s or more)"},
        "large_requests": {"done": len(large), "statuses": large_statuses,
                           "p50_s": percentile([t for _, t in large], 50)},
        "slow_clients": slow_counts,
        "server_peak_rss_mb": sampler.peak / 1e6,
        "server_idle_rss_mb": idle_rss / 1e6,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def default_image(model: str) -> bytes:
    found = sorted((Path(model).resolve().parent.parent / "sample_data").rglob("*.png"))
    if found:
        return found[0].read_bytes()
    yy, xx = np.mgrid[:1024, :1024]
    return cv2.imencode(".png", (128 + 60 * np.sin(xx / 90.0) * np.cos(yy / 70.0)).astype(np.uint8))[1].tobytes()


def git_commit(code: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a run folder (its ood.json is written there on first start)")
    parser.add_argument("--model-note", default=None, help="how the model was made, for the results")
    parser.add_argument("--code", default=str(REPO), help="the checkout whose server runs (PYTHONPATH; default this one)")
    parser.add_argument("--label", default="after", help="the name of this run in the results (before, after, ...)")
    parser.add_argument("--no-header", dest="header", action="store_false",
                        help="do not send X-Xraylib: 1 (servers before it was required)")
    parser.add_argument("--seconds", type=float, default=60.0, help="duration of the load phase (default 60)")
    parser.add_argument("--capacity-seconds", type=float, default=15.0, help="duration of the capacity phase")
    parser.add_argument("--unloaded", type=int, default=20, help="sequential uploads on the idle server")
    parser.add_argument("--image", default=None, help="the normal upload (a PNG)")
    parser.add_argument("--server-arg", action="append", help="an extra option for `serve` (repeatable)")
    parser.add_argument("--note", default=None, help="a note stored with this run")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "load.json"))
    args = parser.parse_args(argv)
    result = run(args)
    if args.note:
        result["note"] = args.note
    out = Path(args.out)
    everything = json.loads(out.read_text()) if out.is_file() else {"runs": {}}
    everything["runs"][args.label] = result
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(everything, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
