"""Reading and decoding many files in parallel: results in order with a few files in flight, OpenCV on one thread.

Decoding holds Python's lock only for the parsing; OpenCV's decoding and resizing and file reads release it, so
threads scale without the start-up and memory of worker processes, but not all the way: on 2 cores two threads
kept the cores about 80% busy with uncompressed DICOMs, and two processes (writing their rows themselves) were
0.96x to 2.1x as fast (the speed benchmark's "Uncompressed DICOMs" rows: the more so the smaller the files).
"""
from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import signal
import sys
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor
from functools import partial
from typing import Callable, Iterable, Iterator, TypeVar

import cv2

from . import fileio

T = TypeVar("T")
R = TypeVar("R")


def map_ahead(pool: Executor, fn: Callable[[T], R], items: Iterable[T], ahead: int) -> Iterator[R]:
    """``fn`` over ``items`` in ``pool``, the results in the items' order, at most ``ahead`` submitted and not yet
    taken: the threads keep working while the caller handles a result (writes it, saves a checkpoint), and the
    futures held stay a few, however many items there are (``Executor.map`` submits them all at once). Closing the
    generator early cancels the items not started.
    """
    ahead = max(1, int(ahead))
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def map_batched(pool: Executor, fn: Callable[[T], R], items: Iterable[T], batch: int, ahead: int) -> Iterator[R]:
    """:func:`map_ahead` with each task running ``fn`` over ``batch`` consecutive items: the results come in the
    items' order, a task's at a time. A thread that decodes 16 files before it hands its results over needs
    Python's lock (and wakes the caller) a sixteenth as often: on 2 cores, 10% more files a second."""
    iterator = iter(items)
    batches = iter(lambda: list(itertools.islice(iterator, batch)), [])
    with contextlib.closing(map_ahead(pool, partial(_map_list, fn), batches, ahead)) as tasks:
        for results in tasks:
            yield from results


def _map_list(fn: Callable[[T], R], items: list[T]) -> list[R]:
    return [fn(item) for item in items]


def process_pool(workers: int, preload: tuple[str, ...]) -> ProcessPoolExecutor:
    """``workers`` worker processes, each with OpenCV on one thread and deaf to Ctrl-C (the caller stops them).

    Started by a fork server where the system has one (Linux, macOS), which imports the ``preload`` modules once
    and forks each worker from itself: a process that has loaded TensorFlow (whose threads make a plain fork
    unsafe) starts workers in about 0.1 s after the first time, which costs the imports (about 1 s). Elsewhere
    (Windows) they are spawned, each importing the modules itself. The functions and arguments sent to them must
    be picklable (module-level functions, no lambdas or closures).
    """
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if context.get_start_method() == "forkserver":
        context.set_forkserver_preload(list(preload))  # (no effect where a fork server is running already)
    # (settings of this process that the workers' code reads: a fresh program has the defaults)
    return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_start_worker,
                               initargs=(fileio.MAP_FILES,))


def script_safe_for_processes() -> bool:
    """Whether worker processes can start without running the caller's script again: true in a notebook or the
    interactive interpreter (whose ``__main__`` has no file) and under ``python -m xraylib``; false in a script,
    whose ``__main__`` every worker imports anew (``multiprocessing``'s rule), running whatever it runs outside an
    ``if __name__ == "__main__":`` block. Such a script asks for processes itself, inside that block."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return getattr(main, "__file__", None) is None or (spec is not None and spec.name == "xraylib.__main__")


def _start_worker(map_files: bool = True) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # an interrupt stops the caller, which cancels the work left
    cv2.setNumThreads(1)  # the processes are the parallelism (see opencv_threads)
    fileio.MAP_FILES = map_files  # the caller's (xraylib.fileio.MAP_FILES)


@contextlib.contextmanager
def opencv_threads(count: int | None) -> Iterator[None]:
    """OpenCV's own thread count set to ``count`` while the block runs (None: unchanged), then set back.

    Where our threads decode one file each, OpenCV splitting each resize across the same cores only adds
    hand-overs (about 10% of the time on 2 cores). The setting is OpenCV's, for the whole process.
    """
    if count is None:
        yield
        return
    before = cv2.getNumThreads()
    cv2.setNumThreads(count)
    try:
        yield
    finally:
        cv2.setNumThreads(before)
