"""Projections to 2-D (or 3-D): PCA, and UMAP on a PCA pre-reduction with an exact kNN graph.

The UMAP path is tuned for the app's budget: exact neighbours from sklearn's brute-force kernel (no
JIT, ~1 s for 20k x 50), umap-learn's layout with numba's disk cache on (analysis.jit), PCA
initialisation, and an epoch count that shrinks with the number of points unless set.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

from analysis import jit

jit.enable_disk_cache()

PROJECTIONS = ("umap", "pca")
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

    When n > d, the exact eigendecomposition of the d x d covariance is several times faster than a
    randomized SVD (0.1 s vs 0.6 s for 20k x 640); otherwise sklearn's randomized PCA.
    """
    X = np.asarray(X, dtype=np.float32)
    k = int(min(n_components, X.shape[0], X.shape[1]))
    if len(X) > X.shape[1] and X.shape[1] <= 4096:
        mean = X.mean(axis=0, dtype=np.float64)
        # Covariance without a centred copy of X: X^T X - n mean mean^T.
        cov = (X.T @ X).astype(np.float64) - len(X) * np.outer(mean, mean)
        _, vecs = np.linalg.eigh(cov)
        comps = vecs[:, ::-1][:, :k].astype(np.float32)
        # Fix the sign of each axis (largest |loading| positive) so layouts do not flip between runs.
        comps *= np.sign(comps[np.abs(comps).argmax(axis=0), np.arange(k)])
        return X @ comps - (mean @ comps).astype(np.float32)
    return PCA(k, svd_solver="randomized", random_state=seed).fit_transform(X).astype(np.float32)


def knn(Y: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours (each point first in its own list): (indices, distances)."""
    nn = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(Y)
    dist, idx = nn.kneighbors(Y)
    return idx.astype(np.int64), dist.astype(np.float32)


def project(X: np.ndarray, spec: ProjectionSpec | None = None) -> np.ndarray:
    """Coordinates (n, n_components) of the rows of X."""
    spec = spec or ProjectionSpec()
    X = np.asarray(X, dtype=np.float32)
    n = len(X)
    if n < 3:
        raise ValueError(f"need at least 3 tokens to project, got {n}")
    if not np.isfinite(X).all():
        raise ValueError("cannot project: the vectors contain NaN or infinity")
    if spec.method == "pca":
        return _pad(pca_reduce(X, spec.n_components, spec.seed), spec.n_components)
    if float(X.var(axis=0).sum()) <= 1e-12 * max(float((X * X).mean()), 1e-30):
        raise ValueError(f"nothing to project: all {n} vectors are the same (too few tokens per position?)")
    coords = _umap(X, spec)
    if not np.isfinite(coords).all():
        raise ValueError("UMAP produced non-finite coordinates (degenerate input); try PCA or more tokens")
    return coords


def _umap(X: np.ndarray, spec: ProjectionSpec) -> np.ndarray:
    import umap

    n = len(X)
    if spec.metric == "cosine":  # cosine neighbours = euclidean neighbours of unit vectors
        X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    Y = pca_reduce(X, spec.pca_dims, spec.seed) if 0 < spec.pca_dims < X.shape[1] else X
    k = int(min(spec.n_neighbors, n - 1))
    idx, dist = knn(Y, k)
    model = umap.UMAP(
        n_neighbors=k, n_components=spec.n_components, min_dist=spec.min_dist, metric="euclidean",
        precomputed_knn=(idx, dist, None), init="pca" if n > spec.n_components + 1 else "random",
        n_epochs=spec.epochs_for(n), random_state=spec.seed, n_jobs=1 if spec.seed is not None else -1,
    )
    with warnings.catch_warnings():
        # umap warns that precomputed kNN disables transform() and that a seed disables parallelism:
        # both are the intended trade-offs here.
        warnings.simplefilter("ignore")
        coords = model.fit_transform(Y)
    return np.asarray(coords, dtype=np.float32)


def _pad(coords: np.ndarray, n_components: int) -> np.ndarray:
    if coords.shape[1] < n_components:  # fewer dims than asked (e.g. d=1): pad with zeros
        coords = np.hstack([coords, np.zeros((len(coords), n_components - coords.shape[1]), np.float32)])
    return coords
