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
from collections.abc import Iterator

import numpy as np

SMALL_LAPACK = 1024  # up to this many rows LAPACK runs on one thread (above, the work is worth the hand-off)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """BLAS (OpenBLAS, MKL, ...) limited to one thread inside the block, restored after. The libraries
    are looked up on every call (a few ms), so one loaded later (scipy's own OpenBLAS) is limited too."""
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    with threadpool_limits(limits=1, user_api="blas"):
        yield


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
