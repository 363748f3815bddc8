"""BLAS threads for loops of small products.

A product of a few rows with a block of candidates (a few MFLOP) is slower on two BLAS threads than on one
(thread hand-off costs more than the work, and far more when the cores are busy: 10x measured on the
shared 2-core machine). Loops of such products run under `one_thread()`; large products keep every core.
Results equal the threaded ones to float rounding (a dot product's summation order may differ).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """BLAS (OpenBLAS, MKL, ...) limited to one thread inside the block, restored after. The libraries
    are looked up on every call (a few ms), so one loaded later (scipy's own OpenBLAS) is limited too."""
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    with threadpool_limits(limits=1, user_api="blas"):
        yield
