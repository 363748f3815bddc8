"""BLAS threads for loops of small products.

A product of a few rows with a block of candidates (a few MFLOP) is slower on two BLAS threads than on one
(thread hand-off costs more than the work, and far more when the cores are busy: 10x measured on the
shared 2-core machine). Loops of such products run under `one_thread()`; large products keep every core,
or half of them each while two views are computed side by side (views.service). Results equal the threaded ones to float rounding (a dot product's summation order may differ).

The same holds for LAPACK on the d x d matrices of the probes and the PCAs (d = a model's width): an
eigendecomposition of 640 x 640 took a median 0.10 s on one thread and 0.18 s on two when the machine was
busy, single calls up to 2 s (bench/README.md, "`lapack_threads.py`"; idle, two threads were 1.3x faster),
so `eigh` and `solve` run on one thread up to SMALL_LAPACK rows.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import numpy as np

SMALL_LAPACK = 1024  # up to this many rows LAPACK runs on one thread (above, the work is worth the hand-off)


_cond = threading.Condition()
_inside = 0  # blocks entered and not left, over all threads
_owner: int | None = None  # the thread that set the limit: it alone restores it
_limits = None
_depth = threading.local()  # this thread's nesting


@contextlib.contextmanager
def limited(threads: int) -> Iterator[None]:
    """BLAS (OpenBLAS, MKL, ...) limited to `threads` threads inside the block, restored after.

    The limit is process-wide and counted: the first block entered sets it (a block entered while one is
    open, in any thread, keeps the limit already set), and the thread that set it restores it when it
    leaves, waiting there for blocks still open in other threads (a short block of one session can so
    wait for another session's block to end). OpenBLAS 0.3.30-0.3.31 here did not
    always take a limit restored from another thread than the one that set it (it stayed on one thread
    for the rest of the process). The libraries are looked up by each setting (a few ms), so one loaded
    later (scipy's own OpenBLAS) is limited too."""
    global _inside, _owner, _limits
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    me = threading.get_ident()
    with _cond:
        if _owner is None:  # not "_inside == 0": the setter may still be waiting to restore
            _limits, _owner = threadpool_limits(limits=threads, user_api="blas"), me
        _inside += 1
    _depth.n = getattr(_depth, "n", 0) + 1
    try:
        yield
    finally:
        _depth.n -= 1
        with _cond:
            _inside -= 1
            _cond.notify_all()
            if _owner == me and _depth.n == 0:
                _cond.wait_for(lambda: _inside == 0)
                _limits.restore_original_limits()
                _limits, _owner = None, None


def one_thread() -> contextlib.AbstractContextManager[None]:
    """BLAS on one thread inside the block (see limited): loops of small products, d x d decompositions."""
    return limited(1)


def half_the_cores() -> int:
    """BLAS threads for each of two computations run side by side (views.service): the cores shared."""
    return max(1, (os.cpu_count() or 2) // 2)


def eigh(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.linalg.eigh of a symmetric (d, d), on one BLAS thread where d <= SMALL_LAPACK."""
    if len(a) > SMALL_LAPACK:
        return np.linalg.eigh(a)
    with one_thread():
        return np.linalg.eigh(a)


def solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """np.linalg.solve(a, b) for a (d, d), on one BLAS thread where d <= SMALL_LAPACK."""
    if len(a) > SMALL_LAPACK:
        return np.linalg.solve(a, b)
    with one_thread():
        return np.linalg.solve(a, b)
