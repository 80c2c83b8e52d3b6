"""Small speed targets that tests must not time (a loaded CI machine would fail them): measured here instead.

    .venv/bin/python benchmarks/micro.py          # a few seconds; writes results/micro.json and results/micro.md

- bootstrap: ``xraylib.evaluate.bootstrap_ci`` on 2,000 images of 700 patients, 1,000 resamples. Target: under 3 s.
- phantoms: ``xraylib.phantoms.make_phantom`` (320x288, the three labels in turn). Target: under 30 ms per image.

Each figure is the median of several repeats. The results name the machine and its load average, so a figure
measured on a busy machine can be told from one measured on a free one.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGETS = {"bootstrap_seconds": 3.0, "phantom_ms": 30.0}


def median_seconds(work, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_bootstrap(repeats: int) -> float:
    from xraylib import evaluate

    rng = np.random.default_rng(0)
    patients = rng.integers(0, 700, 2000)
    y_true = (patients % 3 == 0).astype(int)
    y_score = np.clip(rng.normal(0.35 + 0.3 * y_true, 0.2), 0, 1)
    return median_seconds(lambda: evaluate.bootstrap_ci(y_true, y_score, patients, 0.5, n_boot=1000), repeats)


def bench_phantoms(repeats: int) -> float:
    from xraylib.phantoms import LABELS, make_phantom

    rng = np.random.default_rng(0)
    make_phantom("normal", rng)  # warm-up: OpenCV's first calls

    def sixty() -> None:
        for i in range(60):
            make_phantom(LABELS[i % 3], rng)

    return median_seconds(sixty, repeats) / 60 * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    measured = {"bootstrap_seconds": bench_bootstrap(args.repeats), "phantom_ms": bench_phantoms(args.repeats)}
    results = {
        "measured_at": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "load_average": list(os.getloadavg()), "repeats": args.repeats,
        "results": {name: {"value": round(value, 4), "target": TARGETS[name], "met": value < TARGETS[name]}
                    for name, value in measured.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "micro.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# Micro benchmarks", "", f"Measured {results['measured_at']}, {results['cores']} cores, load average "
             f"{', '.join(f'{x:.2f}' for x in results['load_average'])}; median of {args.repeats} repeats.", "",
             "| what | measured | target | met |", "|---|---|---|---|"]
    for name, row in results["results"].items():
        lines.append(f"| {name} | {row['value']:.3f} | < {row['target']:g} | {'yes' if row['met'] else 'no'} |")
    (args.out / "micro.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
