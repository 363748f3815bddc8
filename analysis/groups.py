"""Per-label sums and counts of rows: the building block of per-position means and of R2_pos."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

BLOCK = 8192  # rows per block where a pass over all rows would otherwise make an (n, d) temporary


def blocks(n: int, size: int = BLOCK) -> Iterator[slice]:
    """Consecutive row slices of at most `size` rows covering range(n)."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def onehot(codes: np.ndarray, n_groups: int, weights: np.ndarray | None = None, dtype=np.float64):
    """(n_groups, n) sparse matrix with weights[i] (default 1) at (codes[i], i): onehot @ X sums rows per code."""
    from scipy import sparse  # scipy costs ~0.15 s to import; only the maths that group rows needs it

    codes = np.asarray(codes).ravel()
    data = np.ones(len(codes), dtype) if weights is None else np.asarray(weights, dtype)
    return sparse.csr_matrix((data, (codes, np.arange(len(codes)))), shape=(n_groups, len(codes)))


def group_sums(X: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sorted unique labels, per-label row sums of X as float64 (G, d), counts (G,)).

    A sparse one-hot product: one pass over X, no sorted copy of it (np.add.at is ~50x slower).
    """
    uniq, inverse, counts = np.unique(np.asarray(labels), return_inverse=True, return_counts=True)
    # float32 input stays float32 in the product (no 2x copy); sums of a few hundred rows lose nothing visible
    return uniq, np.asarray(onehot(inverse, len(uniq), dtype=np.asarray(X).dtype) @ X, dtype=np.float64), counts


def code_sums64(X: np.ndarray, codings: list[tuple[np.ndarray, int]], block: int = BLOCK) -> list[np.ndarray]:
    """Per-code row sums of X (n, d) in float64 for several codings at once (codes (n,) in 0..G-1, G), as
    exact as on a float64 copy of X without making one: X is read `block` rows at a time. [(G, d), ...]"""
    out = [np.zeros((g, X.shape[1])) for _, g in codings]
    for rows in blocks(len(X), block):
        xb = np.asarray(X[rows], dtype=np.float64)  # (b, d)
        for (codes, g), acc in zip(codings, out):
            acc += onehot(codes[rows], g) @ xb
    return out
