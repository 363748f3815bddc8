"""Per-label sums and counts of rows: the building block of per-position means and of R2_pos."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

BLOCK = 8192  # rows per block where a pass over all rows would otherwise make an (n, d) temporary
F64_BUFFER = 4 << 20  # bytes of f64_blocks' one buffer (a block of a few thousand rows at d = 640)


def blocks(n: int, size: int = BLOCK) -> Iterator[slice]:
    """Consecutive row slices of at most `size` rows covering range(n)."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def f64_blocks(X: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
    """(rows, X[rows] as float64) for consecutive blocks of rows of X (n, d), every block written into the
    same buffer of at most F64_BUFFER bytes: a float64 pass over float32 rows with no float64 copy of X
    and no allocation per block (memory new to a process is slow to touch on VMs: ~4-10 ms per MB on the
    dev machine). A block is overwritten by the next one: use it before asking for the next."""
    n, d = X.shape
    size = max(1, min(BLOCK, F64_BUFFER // (8 * max(d, 1))))
    buf = np.empty((min(size, n), d))
    for rows in blocks(n, size):
        block = buf[: rows.stop - rows.start]
        np.copyto(block, X[rows])
        yield rows, block


def row_sq(X: np.ndarray, shift: np.ndarray | None = None) -> np.ndarray:
    """(n,) float64 squared norm of each row of X (n, d) (after subtracting `shift` (d,)), from one compiled
    pass over X in its own dtype: no (n, d) temporary of squares or of a float64 copy."""
    return code_sums64(X, [], shift=shift, with_sq=True)[1]


def row_norms(X: np.ndarray) -> np.ndarray:
    """(n, 1) float32 norms of the rows of X (n, d), at least 1e-12: X / row_norms(X) are its unit rows.
    Every unit vector of a view (cosine projection, neighbour measures) is made with it, so they agree."""
    return np.maximum(np.sqrt(row_sq(X)), 1e-12).astype(np.float32)[:, None]


def onehot(codes: np.ndarray, n_groups: int, weights: np.ndarray | None = None, dtype=np.float64):
    """(n_groups, n) sparse matrix with weights[i] (default 1) at (codes[i], i): onehot @ X sums rows per code."""
    from scipy import sparse  # scipy costs ~0.15 s to import; only the maths that group rows needs it

    codes = np.asarray(codes).ravel()
    data = np.ones(len(codes), dtype) if weights is None else np.asarray(weights, dtype)
    return sparse.csr_matrix((data, (codes, np.arange(len(codes)))), shape=(n_groups, len(codes)))


def group_sums(X: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sorted unique labels, per-label row sums of X in float64 (G, d), counts (G,)).

    One compiled pass over X in its own dtype (analysis.engine.kernels), no copy of it.
    """
    uniq, inverse, counts = np.unique(np.asarray(labels), return_inverse=True, return_counts=True)
    return uniq, code_sums64(X, [(inverse.ravel(), len(uniq))])[0], counts


def code_sums64(
    X: np.ndarray,
    codings: list[tuple[np.ndarray, int]],
    shift: np.ndarray | None = None,
    with_sq: bool = False,
) -> list[np.ndarray] | tuple[list[np.ndarray], np.ndarray]:
    """Per-code row sums of X (n, d) in float64 for several codings at once (codes (n,) in 0..G-1, or -1
    for rows in no group; G), minus `shift` (d,) from every row when given: [(G, d), ...]. X is read once
    in its own dtype, each value added in float64 (as exact as on a float64 copy of X, without one).
    with_sq: also each row's squared norm after the shift, (n,) float64, from the same pass."""
    from analysis.engine.kernels import code_sums  # numba: imported by the first sum, not with this module

    sums, sq = code_sums(X, codings, shift)
    return (sums, sq) if with_sq else sums


def branch_centred(Z: np.ndarray, branch: np.ndarray) -> np.ndarray:
    """Z minus each branch's mean: a branch's content, constant along it, no longer looks like position."""
    _, inverse, counts = np.unique(branch, return_inverse=True, return_counts=True)
    _, sums, _ = group_sums(Z, branch)
    means, inverse = sums / counts[:, None], inverse.ravel()
    out = np.empty(Z.shape, np.float32)
    for rows in blocks(len(Z)):  # no (n, m) float64 temporaries
        out[rows] = Z[rows] - means[inverse[rows]]
    return out
