"""xraylib.parallel: results in order, a bounded number of files in flight, and nothing started after a stop."""
from __future__ import annotations

import threading
from functools import partial
from concurrent.futures import ThreadPoolExecutor

import cv2

from xraylib import parallel
from xraylib.parallel import map_ahead, map_batched, opencv_threads


def test_results_come_in_order_across_uneven_batches():
    with ThreadPoolExecutor(3) as pool:
        assert list(map_batched(pool, lambda x: x * x, range(37), batch=5, ahead=3)) == [x * x for x in range(37)]
        assert list(map_ahead(pool, str, range(10), ahead=4)) == [str(x) for x in range(10)]
        assert list(map_batched(pool, str, [], batch=5, ahead=3)) == []


def test_stopping_early_leaves_the_rest_unstarted():
    started, gate = [], threading.Event()

    def work(x):
        started.append(x)
        gate.wait(5)
        return x

    with ThreadPoolExecutor(2) as pool:
        results = map_batched(pool, work, range(1000), batch=4, ahead=2)
        gate.set()
        assert next(results) == 0
        results.close()
    # Only the tasks submitted before the stop ran: 2 (ahead) of 4 files, not the 1,000 Executor.map would submit.
    assert len(started) <= 8


def test_opencv_threads_are_set_for_the_block_and_put_back():
    before = cv2.getNumThreads()
    with opencv_threads(1):
        assert cv2.getNumThreads() == 1
    assert cv2.getNumThreads() == before
    with opencv_threads(None):
        assert cv2.getNumThreads() == before


def test_worker_processes_take_the_callers_setting_for_mapping_files(monkeypatch):
    from xraylib import fileio

    ask = partial(eval, "__import__('xraylib.fileio', fromlist=['fileio']).MAP_FILES")  # (run in the worker)
    for setting in (False, True):  # (a worker is a fresh program: it would have the default, True)
        monkeypatch.setattr(fileio, "MAP_FILES", setting)
        with parallel.process_pool(1, preload=("xraylib.fileio",)) as pool:
            assert pool.submit(ask).result(timeout=300) is setting
