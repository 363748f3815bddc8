"""Nearest neighbours for the projection and the metrics: exact where n is small, approximate above.

The one module that decides how neighbours are found (Euclidean distances throughout):
- `knn_graph(Y, k, index)`: every point's k nearest, itself first (UMAP's precomputed graph);
- `Index(base).search(Q, k)`: points of a fixed base set nearest to other points (landmark placement);
- `search(X, queries, k, groups, workspace=)`: sampled queries' k nearest among all points, optionally
  from other groups only (the kNN metrics); a view's `Workspace` builds X's index once for all of them.

Approximate search is usearch's HNSW (prebuilt wheels, no JIT; bench/neighbour_libs.py compares it with
faiss-cpu and hnswlib on these data). Graphs are built on one thread so that the same points give the same
graph; searches run on every core (each query's answer does not depend on the others).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from analysis.engine import blas

EXACT_GRAPH_MAX = 4096  # up to this many base points: brute force (umap-learn's own small-data cut-off)
EXACT_QUERY_MAX = 20_000  # metrics: sampled queries search all points exactly up to this many points
CONNECTIVITY, EXPANSION_ADD, EXPANSION_SEARCH = 12, 48, 48  # recall@15 >= 0.99 on PCA-50 synthetic trees
CELL_SIZE = 128  # metrics above EXACT_QUERY_MAX: average points per inverted-list cell
REDUCED_DIMS = 64  # ... ranked in a PCA space of this width, then re-ranked exactly in the full space
N_PROBE = 64  # cells a query walks first
RERANK_PER_K = 128  # candidates re-ranked exactly per neighbour asked: 4 per k kept recall@10 at 0.54 on
#   1M residuals at d=640 (PCA-64 distances rank the nearest few poorly there), 128 per k gives 0.97
EXACT_CELLS_MAX = 2048  # up to this many cells, every point's cell is its exact nearest landmark; above,
ASSIGN_EXPANSION = 8  # ... HNSW at this search breadth (1M points: 23 s at 48, 7 s at 8; recall above)


def _threads() -> int:
    return os.cpu_count() or 1


def exact_knn(Q: np.ndarray, B: np.ndarray, k: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows of B (n, d) for each row of Q (q, d): (indices (q, k), distances (q, k)), nearest first."""
    Q, B = np.asarray(Q, np.float32), np.asarray(B, np.float32)
    k = int(min(k, len(B)))
    sq_b = (B * B).sum(axis=1)
    idx = np.empty((len(Q), k), np.int64)
    dist = np.empty((len(Q), k), np.float32)
    for s in range(0, len(Q), block):
        q = Q[s : s + block]
        if k == 1:  # the nearest only (IVF cell assignment): one argmin, |q|^2 added to the winner alone
            d2 = sq_b[None, :] - 2 * (q @ B.T)  # (b, n)
            best = d2.argmin(axis=1)
            idx[s : s + block, 0] = best
            dist[s : s + block, 0] = np.sqrt(np.maximum((q * q).sum(axis=1) + d2[np.arange(len(q)), best], 0))
            continue
        d2 = (q * q).sum(axis=1)[:, None] - 2 * (q @ B.T) + sq_b[None, :]  # (b, n)
        part = (
            np.argpartition(d2, k - 1, axis=1)[:, :k]
            if k < len(B)
            else np.tile(np.arange(len(B)), (len(q), 1))
        )
        vals = np.take_along_axis(d2, part, axis=1)
        order = np.argsort(vals, axis=1, kind="stable")
        idx[s : s + block] = np.take_along_axis(part, order, axis=1)
        dist[s : s + block] = np.sqrt(np.maximum(np.take_along_axis(vals, order, axis=1), 0))
    return idx, dist


class Index:
    """The points of a fixed base set (n, d) nearest to query points: brute force up to `exact_max` base
    points (default EXACT_GRAPH_MAX), usearch HNSW above."""

    def __init__(self, base: np.ndarray, exact_max: int | None = None):
        self.base = np.ascontiguousarray(base, dtype=np.float32)
        self.exact = len(self.base) <= (EXACT_GRAPH_MAX if exact_max is None else exact_max)
        self._hnsw = None
        if not self.exact:
            from usearch.index import Index as HNSW

            self._hnsw = HNSW(
                ndim=self.base.shape[1],
                metric="l2sq",
                dtype="f32",
                connectivity=CONNECTIVITY,
                expansion_add=EXPANSION_ADD,
                expansion_search=EXPANSION_SEARCH,
            )
            self._hnsw.add(np.arange(len(self.base), dtype=np.uint64), self.base, threads=1)

    def __len__(self) -> int:
        return len(self.base)

    def search(self, Q: np.ndarray, k: int, expansion: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(indices (q, k), distances (q, k)) of each query's k nearest base points, nearest first.
        expansion: HNSW's search breadth for this call (default EXPANSION_SEARCH; at least k)."""
        Q = np.ascontiguousarray(Q, dtype=np.float32)
        k = int(min(k, len(self.base)))
        if self.exact:
            return exact_knn(Q, self.base, k)
        self._hnsw.expansion_search = max(k, expansion or EXPANSION_SEARCH)
        found = self._hnsw.search(Q, k, threads=_threads())
        idx = found.keys.astype(np.int64).reshape(len(Q), k)
        dist = np.sqrt(np.maximum(found.distances, 0)).astype(np.float32).reshape(len(Q), k)
        missing = (found.counts < k) if found.counts is not None else np.zeros(len(Q), bool)
        if missing.any():  # rare: HNSW returned fewer than k; answer those exactly
            idx[missing], dist[missing] = exact_knn(Q[missing], self.base, k)
        return idx, dist


def knn_graph(Y: np.ndarray, k: int, index: Index | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every point's k nearest points of Y (n, d), itself included and first: (indices (n, k), distances (n, k)).
    index: Index(Y) when the caller has built it already (it is then searched, not rebuilt)."""
    Y = np.ascontiguousarray(Y, dtype=np.float32)
    if index is not None and index.base.shape != Y.shape:
        raise ValueError(f"the index holds {index.base.shape} points, the graph is of {Y.shape}")
    idx, dist = (index or Index(Y)).search(Y, k)
    # A duplicate point can come before the point itself; put self first so UMAP sees it at distance 0.
    rows = np.arange(len(Y))
    not_first = idx[:, 0] != rows
    if not_first.any():
        r = np.flatnonzero(not_first)
        has_self = idx[r] == rows[r, None]
        pos = np.where(has_self.any(axis=1), has_self.argmax(axis=1), k - 1)
        idx[r, pos] = idx[r, 0]
        dist[r, pos] = dist[r, 0]
        idx[r, 0], dist[r, 0] = r, 0.0
    return idx, dist


def pca_fit(
    X: np.ndarray, n_components: int, max_rows: int = 50_000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(mean (d,), components (d, k)) of the rows of X, from its covariance (on a seeded sample of
    max_rows rows when there are more; the leading axes of a sample that size are the population's to
    well under a degree on these data). Axis signs fixed (largest |loading| positive)."""
    if len(X) > max_rows:
        X = X[np.sort(np.random.default_rng(seed).choice(len(X), max_rows, replace=False))]
    X = np.asarray(X, dtype=np.float32)
    k = int(min(n_components, X.shape[0], X.shape[1]))
    mean = X.mean(axis=0, dtype=np.float64)
    # Covariance without a centred copy of X: X^T X - n mean mean^T.
    cov = (X.T @ X).astype(np.float64) - len(X) * np.outer(mean, mean)
    _, vecs = blas.eigh(cov)  # a d x d problem: 0.09 s on one thread, 0.25 s to 4 s on two (shared 2 cores)
    comps = vecs[:, ::-1][:, :k].astype(np.float32)
    comps *= np.sign(comps[np.abs(comps).argmax(axis=0), np.arange(k)])
    return mean.astype(np.float32), comps


class Cells:
    """Inverted lists for the metrics' sampled queries over many points (IVF with landmark centroids).

    Every point belongs to the cell of its nearest landmark (a seeded sample of n / CELL_SIZE points),
    found in a PCA space of REDUCED_DIMS dimensions (exactly up to EXACT_CELLS_MAX cells, by a narrow HNSW
    search above). A query's candidates are the members of its nearest
    cells, walked until enough of them qualify; they are ranked in the reduced space and the best are
    re-ranked with exact distances in the full space (analysis.engine.kernels.ivf_rank). The reduced coordinates
    are kept sorted by cell, so a cell's members are one contiguous slice.
    """

    def __init__(
        self,
        X: np.ndarray,
        seed: int = 0,
        cell_size: int = CELL_SIZE,
        dims: int = REDUCED_DIMS,
        fit: tuple[np.ndarray, np.ndarray] | None = None,
    ):
        """fit: pca_fit(X, dims, seed=seed) when the caller has it already (a Workspace's pca)."""
        n = len(X)
        mean, comps = pca_fit(X, dims, seed=seed) if fit is None else (fit[0], fit[1][:, :dims])
        Z = np.empty((n, comps.shape[1]), np.float32)  # (n, r) reduced coordinates
        for s in range(0, n, 65536):
            Z[s : s + 65536] = X[s : s + 65536] @ comps - mean @ comps
        n_cells = max(1, n // cell_size)
        rng = np.random.default_rng(seed)
        self.landmarks = Index(Z[np.sort(rng.choice(n, n_cells, replace=False))], exact_max=EXACT_CELLS_MAX)
        # A point in a near (not the nearest) cell is still found by the queries that probe that cell.
        cell = self.landmarks.search(Z, 1, ASSIGN_EXPANSION)[0][:, 0]  # (n,)
        self.order = np.argsort(cell, kind="stable")  # members of cell c: order[start[c]:start[c + 1]]
        self.start = np.searchsorted(cell[self.order], np.arange(n_cells + 1))
        self.Zs = Z[self.order]  # (n, r) sorted by cell
        del Z
        self.sqs = np.einsum("ij,ij->i", self.Zs, self.Zs)  # (n,) |z|^2: reduced distances from one product
        self.at = np.empty(n, np.int64)  # row i of X is row at[i] of Zs
        self.at[self.order] = np.arange(n)

    def reduced(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), r) reduced coordinates of rows of X."""
        return self.Zs[self.at[rows]]


class Workspace:
    """One view's neighbour space, handed to every measure that searches it (analysis.measures.Context):
    the vectors X (n, d), a PCA fit to build the cell index on (the projection's, analysis.view), the
    index itself (built on first need) and what the measures share (kept). It belongs to one view's
    tokens and dies with it; X must not change while it is in use."""

    def __init__(self, X: np.ndarray, pca: tuple[np.ndarray, np.ndarray] | None = None, seed: int = 0):
        """pca: pca_fit(X, m, seed=seed) for some m >= REDUCED_DIMS, made elsewhere (or None: fitted here)."""
        self.X = X
        self.pca = pca
        self.seed = seed
        self._cells: Cells | None = None
        self._kept: dict[tuple, Any] = {}

    def holds(self, X: np.ndarray) -> Workspace:
        """self, after checking it is X's (ValueError otherwise)."""
        if self.X is not X:
            raise ValueError("this workspace holds another array than the one searched")
        return self

    def cells(self) -> Cells:
        """The cell index of X, built once."""
        if self._cells is None:
            self._cells = Cells(self.X, self.seed, fit=self.pca)
        return self._cells

    def kept(self, key: tuple, build: Callable[[], Any]) -> Any:
        """build() once per key (one search serves several measures)."""
        if key not in self._kept:
            self._kept[key] = build()
        return self._kept[key]


def search(
    X: np.ndarray,
    queries: np.ndarray,
    k: int,
    groups: np.ndarray | None = None,
    exact_max: int | None = None,
    n_probe: int = N_PROBE,
    min_candidates: int = 64,
    rerank: int | None = None,
    workspace: Workspace | None = None,
) -> np.ndarray:
    """Indices (len(queries), k) of each query's k nearest points of X (n, d), the query itself excluded
    and, when groups are given, every point of its group too; rows with fewer than k such points end in -1.

    Exact (blocked brute force) up to exact_max points (default EXACT_QUERY_MAX). Above: candidates from Cells (at least
    `min_candidates` qualifying ones, walking up to 16x n_probe cells), the best `rerank` (default RERANK_PER_K * k) by
    reduced distance re-ranked exactly; a query still short of k falls back to brute force. workspace:
    X's Workspace, whose index is built once for every search of X (else one is built for this search).
    """
    if workspace is not None:
        workspace.holds(X)
    X = np.asarray(X, dtype=np.float32)
    queries = np.asarray(queries, dtype=np.int64)
    if len(X) <= (EXACT_QUERY_MAX if exact_max is None else exact_max):
        return _exact_excluding(X, queries, k, groups)
    from analysis.engine.kernels import ivf_rank  # numba: imported by the first approximate search

    cells = (workspace or Workspace(X)).cells()
    rerank = rerank or RERANK_PER_K * k
    gs = None
    if groups is not None:
        groups = np.asarray(groups)
        codes = groups if groups.dtype.kind in "iub" else np.unique(groups, return_inverse=True)[1].ravel()
        gs = np.asarray(codes, np.int64)[cells.order]
    X = np.ascontiguousarray(X)
    out = np.full((len(queries), k), -1, np.int64)
    pending = np.arange(len(queries))
    for probe in (n_probe, 4 * n_probe, 16 * n_probe):
        probe = min(probe, len(cells.landmarks))
        probed, _ = cells.landmarks.search(cells.reduced(queries[pending]), probe)  # (q, probe) nearest cells
        last = probe >= len(cells.landmarks)
        found, short = ivf_rank(
            X,
            cells.Zs,
            cells.sqs,
            cells.order,
            cells.at,
            cells.start,
            gs,
            queries[pending],
            probed,
            k,
            rerank,
            0 if last else max(min_candidates, k),
        )
        out[pending[~short]] = found[~short]
        pending = pending[short]
        if len(pending) == 0:
            break
    if len(pending):
        out[pending] = _exact_excluding(X, queries[pending], k, groups)
    return out


def _exact_excluding(
    X: np.ndarray, queries: np.ndarray, k: int, groups: np.ndarray | None, block: int = 512
) -> np.ndarray:
    """Exact search of `search`: blocked distance matrices, excluded points at infinity."""
    sq = (X * X).sum(axis=1)
    out = np.full((len(queries), k), -1, np.int64)
    kk = min(k, X.shape[0] - 1)
    if kk < 1:
        return out
    for start in range(0, len(queries), block):
        q = queries[start : start + block]
        d2 = sq[q, None] - 2 * (X[q] @ X.T) + sq[None, :]  # (b, n)
        if groups is None:
            d2[np.arange(len(q)), q] = np.inf
        else:
            d2[groups[q, None] == groups[None, :]] = np.inf
        part = np.argpartition(d2, kk - 1, axis=1)[:, :kk]
        vals = np.take_along_axis(d2, part, axis=1)
        order = np.argsort(vals, axis=1, kind="stable")
        part = np.take_along_axis(part, order, axis=1)
        part[np.take_along_axis(vals, order, axis=1) == np.inf] = -1
        out[start : start + block, :kk] = part
    return out
