"""BLAS threads for loops of small products.

A product of a few rows with a block of candidates (a few MFLOP) is slower on two BLAS threads than on one
(thread hand-off costs more than the work, and far more when the cores are busy: 10x measured on the
shared 2-core machine). Loops of such products run under `one_thread()`; large products keep every core.
Results equal the threaded ones to float rounding (a dot product's summation order may differ).

The same holds for LAPACK on the d x d matrices of the probes and the PCAs (d = a model's width): an
eigendecomposition of 640 x 640 took 0.06 s on one thread and 0.2-2 s on two busy ones (bench/README.md,
"BLAS threads and LAPACK"), so `eigh` and `solve` run on one thread up to SMALL_LAPACK rows.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import numpy as np

SMALL_LAPACK = 1024  # up to this many rows LAPACK runs on one thread (above, the work is worth the hand-off)


_lock = threading.Lock()
_inside = 0  # threads inside one_thread(): the limit is set by the first and restored by the last
_limits = None


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """BLAS (OpenBLAS, MKL, ...) limited to one thread inside the block, restored after. The libraries
    are looked up on every outermost call (a few ms), so one loaded later (scipy's own OpenBLAS) is
    limited too. The limit is process-wide and counted: it holds while any thread is inside, and the
    last one out restores what was there before. Set it from the thread that starts worker threads
    (views.service.compute_pair): OpenBLAS 0.3.30 here did not always take a limit set or restored
    from a worker thread."""
    global _inside, _limits
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    with _lock:
        if _inside == 0:
            _limits = threadpool_limits(limits=1, user_api="blas")
        _inside += 1
    try:
        yield
    finally:
        with _lock:
            _inside -= 1
            if _inside == 0:
                _limits.restore_original_limits()
                _limits = None


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
