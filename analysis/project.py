"""Projections to 2-D (or 3-D): PCA, and UMAP on a PCA pre-reduction with a precomputed kNN graph.

The UMAP path is tuned for the app's budget: neighbours from analysis.engine.neighbours (exact for small n, HNSW
above), umap-learn's layout with numba's disk cache on (analysis.engine.jit), PCA initialisation, and an epoch
count that shrinks with the number of points unless set. Above LANDMARK_ABOVE points, UMAP lays out a
seeded sample of LANDMARKS points and places every other point from its nearest landmarks, so the layout
costs the same at 100k as at 1M and the rest grows linearly.

umap-learn and numba are imported on the first UMAP only (importing them costs seconds).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from analysis.engine import jit
from analysis.engine.groups import code_sums64, row_norms
from analysis.engine.neighbours import Index, knn_graph, pca_fit

PROJECTIONS = ("umap", "pca")
LANDMARK_ABOVE = 30_000  # more points than this: UMAP on landmarks, the rest placed from them
LANDMARKS = 20_000  # landmarks laid out by UMAP (the full layout's trustworthiness within 0.02 at 50k)
PLACE_NEIGHBOURS = 10  # landmarks each other point is placed from
PLACE_EXPANSION = 16  # HNSW search breadth for the placement (a weighted mean of 10 landmarks: near ones do)
METRICS = ("cosine", "euclidean")


@dataclass(frozen=True)
class ProjectionSpec:
    """Which projection and its parameters; hashable and serializable (cache keys)."""

    method: str = "umap"
    n_components: int = 2
    n_neighbors: int = 15
    min_dist: float = 0.1
    metric: str = "cosine"
    pca_dims: int = 50  # UMAP pre-reduction; 0 = none
    n_epochs: int | None = None  # None: 200 up to 4k points, then 8e5 / n (40 at 20k), at least 40
    seed: int | None = 0  # None: parallel layout, not reproducible

    def __post_init__(self) -> None:
        if self.method not in PROJECTIONS:
            raise ValueError(f"unknown projection {self.method!r}; choose one of {', '.join(PROJECTIONS)}")
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; choose one of {', '.join(METRICS)}")
        if self.n_components not in (2, 3):
            raise ValueError("n_components must be 2 or 3")
        if self.n_neighbors < 2 or not 0 <= self.min_dist <= 1 or self.pca_dims < 0:
            raise ValueError("need n_neighbors >= 2, 0 <= min_dist <= 1 and pca_dims >= 0")
        if self.n_epochs is not None and self.n_epochs < 1:
            raise ValueError("n_epochs must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)

    def epochs_for(self, n: int) -> int:
        if self.n_epochs is not None:
            return self.n_epochs
        # The layout costs ~30 ms per epoch at 20k points on 2 cores; with PCA initialisation,
        # trustworthiness at 40 epochs is within 0.005 of 200 (bench/analysis_speed.py prints both).
        return int(min(200, max(40, round(8e5 / max(n, 1)))))


def pca_reduce(X: np.ndarray, n_components: int, seed: int | None = 0) -> np.ndarray:
    """Principal-component scores of X (n, d) -> (n, k).

    When n > d, the exact eigendecomposition of the d x d covariance (of a 50k-row sample when n is
    larger) is several times faster than a randomized SVD (0.1 s vs 0.6 s for 20k x 640); otherwise
    sklearn's randomized PCA.
    """
    X = np.asarray(X, dtype=np.float32)
    k = int(min(n_components, X.shape[0], X.shape[1]))
    if len(X) > X.shape[1] and X.shape[1] <= 4096:
        mean, comps = pca_fit(X, k, seed=seed or 0)  # axis signs fixed: layouts do not flip between runs
        return X @ comps - mean @ comps
    from sklearn.decomposition import PCA

    return PCA(k, svd_solver="randomized", random_state=seed).fit_transform(X).astype(np.float32)


def project(
    X: np.ndarray, spec: ProjectionSpec | None = None, pca: tuple[np.ndarray, np.ndarray] | None = None
) -> np.ndarray:
    """Coordinates (n, n_components) of the rows of X. pca: unit_pca_fit(X, m, spec) for some m >=
    spec.pca_dims, when the caller has it (UMAP's pre-reduction then uses its first pca_dims axes)."""
    spec = spec or ProjectionSpec()
    X = np.asarray(X, dtype=np.float32)
    n = len(X)
    if n < 3:
        raise ValueError(f"need at least 3 tokens to project, got {n}")
    total_var, mean_sq = _spread(X)
    if not np.isfinite(total_var):
        raise ValueError("cannot project: the vectors contain NaN or infinity")
    if spec.method == "pca":
        return _pad(pca_reduce(X, spec.n_components, spec.seed), spec.n_components)
    if total_var <= 1e-12 * max(mean_sq, 1e-30):
        raise ValueError(f"nothing to project: all {n} vectors are the same (too few tokens per position?)")
    coords = _umap(X, spec, pca)
    if not np.isfinite(coords).all():
        raise ValueError("UMAP produced non-finite coordinates (degenerate input); try PCA or more tokens")
    return coords


def _spread(X: np.ndarray) -> tuple[float, float]:
    """(sum over columns of the variance of X (n, d), mean square of its entries), from one compiled pass
    (no (n, d) temporary); the first is not finite when X holds a NaN or an infinity."""
    n = len(X)
    with np.errstate(over="ignore", invalid="ignore"):
        mean = X.sum(axis=0, dtype=np.float64) / n
        _, sq = code_sums64(X, [], shift=mean, with_sq=True)  # (n,) |x_i - mean|^2
        total = float(sq.sum())
        return total / n, (total + n * float(mean @ mean)) / X.size


def _umap(
    X: np.ndarray, spec: ProjectionSpec, pca: tuple[np.ndarray, np.ndarray] | None = None
) -> np.ndarray:
    Y = _prepared(X, spec, pca=pca)
    first, copy_of = distinct_rows(Y)
    if len(first) < len(Y) and len(first) > spec.n_components + 2:
        # Identical vectors (a RoPE model's layer 0 is its token embedding: every copy of a token is one
        # vector) are laid out once and share that point. UMAP spread copies into a small cloud they do not
        # have, and laid out 926 rows where 383 differ (the demo's layer 0: 0.51 s, against 0.15 s).
        return _layout(Y[first], spec)[copy_of]
    return _layout(Y, spec)


def _layout(Y: np.ndarray, spec: ProjectionSpec) -> np.ndarray:
    return umap_layout(Y, spec) if len(Y) <= LANDMARK_ABOVE else landmark_layout(Y, spec)


def distinct_rows(Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the first row of each distinct one, in row order (k,), each row's index into them (n,)): rows that
    are bitwise the same are one (a sort of the rows as bytes: about 1 s for 10^6 x 50)."""
    Y = np.ascontiguousarray(Y)
    as_bytes = Y.view(np.dtype((np.void, Y.dtype.itemsize * Y.shape[1]))).ravel()
    _, first, copy_of = np.unique(as_bytes, return_index=True, return_inverse=True)
    order = np.argsort(first)  # the distinct rows in the order they first appear
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return first[order], rank[copy_of.ravel()]


PCA_SAMPLE = 50_000  # rows UMAP's pre-reduction is fitted on (a seeded sample when there are more)


def unit_pca_fit(
    X: np.ndarray, n_components: int, spec: ProjectionSpec
) -> tuple[np.ndarray, np.ndarray] | None:
    """The PCA fit (mean (d,), components (d, k)) of UMAP's pre-reduction of X (n, d), with n_components
    axes: of the rows' unit vectors with a cosine metric, on a seeded sample of PCA_SAMPLE rows when there
    are more. None where the pre-reduction is no covariance PCA (pca_dims off, or sklearn's for d > 4096
    or n <= d). Its first k axes are the fit with k axes (pca_fit sorts and signs each axis alone)."""
    if not 0 < spec.pca_dims < X.shape[1] or not (X.shape[1] < len(X) and X.shape[1] <= 4096):
        return None
    rows = X
    if len(X) > max(PCA_SAMPLE, X.shape[1]):
        rows = X[np.sort(np.random.default_rng(spec.seed or 0).choice(len(X), PCA_SAMPLE, replace=False))]
    if spec.metric == "cosine":
        rows = rows / row_norms(rows) if rows is X else _unit_in_place(rows)  # the sample is a copy already
    return pca_fit(rows, n_components, seed=spec.seed or 0)


def _unit_in_place(X: np.ndarray) -> np.ndarray:
    """X (n, d) float32 scaled to unit rows, in place."""
    X /= row_norms(X)
    return X


def _prepared(
    X: np.ndarray, spec: ProjectionSpec, block: int = 65536, pca: tuple[np.ndarray, np.ndarray] | None = None
) -> np.ndarray:
    """What UMAP lays out: X (n, d) as unit vectors when the metric is cosine (cosine neighbours = Euclidean
    neighbours of unit vectors), reduced to pca_dims by PCA (unit_pca_fit, or `pca` when given). The unit
    vectors are made one block at a time, never all at once (a 1M x 640 copy is 2.6 GB). Returns
    (n, min(pca_dims, d) or d)."""
    unit = spec.metric == "cosine"
    fit = unit_pca_fit(X, spec.pca_dims, spec) if pca is None else pca
    if fit is None:
        if unit:
            X = X / row_norms(X)
        return pca_reduce(X, spec.pca_dims, spec.seed) if 0 < spec.pca_dims < X.shape[1] else X
    mean, comps = fit[0], fit[1][:, : spec.pca_dims]
    shift = mean @ comps
    Y = np.empty((len(X), comps.shape[1]), np.float32)
    for s in range(0, len(X), block):
        out = Y[s : s + block]
        np.matmul(X[s : s + block], comps, out=out)
        if unit:  # unit(x) @ C = (x @ C) / |x|: no unit copy of the rows
            out /= row_norms(X[s : s + block])
        out -= shift
    return Y


def landmark_layout(Y: np.ndarray, spec: ProjectionSpec, n_landmarks: int = LANDMARKS) -> np.ndarray:
    """UMAP of a seeded sample of n_landmarks rows of Y (n, r); every other row placed at the weighted
    mean of its PLACE_NEIGHBOURS nearest landmarks' coordinates (weights as in UMAP's membership
    strengths: exp(-(d - d_nearest) / (mean d - d_nearest))). Returns (n, n_components)."""
    n = len(Y)
    chosen = np.sort(np.random.default_rng(spec.seed or 0).choice(n, min(n, n_landmarks), replace=False))
    coords = np.empty((n, spec.n_components), np.float32)
    index = Index(Y[chosen])  # one HNSW graph of the landmarks: UMAP's kNN graph and the placement
    coords[chosen] = umap_layout(index.base, spec, index)
    others = np.setdiff1d(np.arange(n), chosen, assume_unique=True)
    for s in range(0, len(others), 65536):  # bounded temporaries at 1M points
        rows = others[s : s + 65536]
        idx, dist = index.search(
            Y[rows], PLACE_NEIGHBOURS, PLACE_EXPANSION
        )  # (b, m) landmark indices, distances
        spread = np.maximum(dist.mean(axis=1, keepdims=True) - dist[:, :1], 1e-12)
        w = np.exp(-(dist - dist[:, :1]) / spread)  # (b, m)
        coords[rows] = np.einsum("bm,bmc->bc", w, coords[chosen][idx]) / w.sum(axis=1, keepdims=True)
    return coords


def umap_layout(Y: np.ndarray, spec: ProjectionSpec, index: Index | None = None) -> np.ndarray:
    """umap-learn's layout of Y (n, r) on the precomputed kNN graph of analysis.engine.neighbours: (n, n_components).
    index: an Index of Y already built."""
    n = len(Y)
    idx, dist = knn_graph(Y, int(min(spec.n_neighbors, n - 1)), index)
    return jit.umap_fit(
        Y,
        idx,
        dist,
        n_components=spec.n_components,
        min_dist=spec.min_dist,
        n_epochs=spec.epochs_for(n),
        seed=spec.seed,
    )


def _pad(coords: np.ndarray, n_components: int) -> np.ndarray:
    if coords.shape[1] < n_components:  # fewer dims than asked (e.g. d=1): pad with zeros
        coords = np.hstack([coords, np.zeros((len(coords), n_components - coords.shape[1]), np.float32)])
    return coords
