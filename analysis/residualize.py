"""Residualizers: fit the positional component on a reference set of tokens, remove it from any set.

Each class follows sklearn's shape: fit(X, position) -> self, transform(X, position) -> residuals.
Every method runs after the same optional scaling step (row L2-normalization, centring, per-dimension
standardization), so `none` is that scaling alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from analysis.basis import PositionBasis, fit_smooth
from analysis.groups import group_sums

METHODS = ("none", "per_position", "regression", "projection")


@dataclass(frozen=True)
class ResidualSpec:
    """Which residualizer and its parameters; hashable and serializable (cache keys)."""

    method: str = "per_position"
    center: bool = True
    l2: bool = False
    standardize: bool = False
    shrink: float | None = None  # per_position: pseudo-count toward the smooth fit; None = estimated
    basis: str = "spline"  # per_position (smooth fit) and regression
    degree: int = 3
    n_knots: int = 12
    n_freq: int = 4
    k: int = 2  # projection: directions removed

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown residualizer {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.k < 1:
            raise ValueError("projection needs k >= 1 directions to remove")
        if self.shrink is not None and self.shrink < 0:
            raise ValueError("shrink must be >= 0")
        PositionBasis(self.basis, self.degree, self.n_knots, self.n_freq)  # validates the basis settings

    def to_dict(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        """A short human name, e.g. 'per-position mean' or 'regression (spline)'."""
        return {
            "none": "raw",
            "per_position": "per-position mean",
            "regression": f"regression ({self.basis})",
            "projection": f"projection (k={self.k})",
        }[self.method]


class Scaler:
    """Row L2-normalization (stateless), then centring and per-dimension standardization fitted on the reference."""

    def __init__(self, center: bool = True, l2: bool = False, standardize: bool = False):
        self.center, self.l2, self.standardize = center, l2, standardize

    def _rows(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        if self.l2:
            X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        return X

    def fit(self, X: np.ndarray) -> Scaler:
        X = self._rows(X)
        self.mean_ = X.mean(axis=0) if (self.center or self.standardize) else np.zeros(X.shape[1], np.float32)
        std = X.std(axis=0) if self.standardize else np.ones(X.shape[1], np.float32)
        self.scale_ = np.where(std > 1e-12, std, 1.0).astype(np.float32)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        return ((self._rows(X) - self.mean_) / self.scale_).astype(np.float32)


class Residualizer:
    """Base: scaling, then remove() of the fitted positional component."""

    def __init__(self, spec: ResidualSpec):
        self.spec = spec
        self.scaler = Scaler(spec.center, spec.l2, spec.standardize)

    def fit(self, X: np.ndarray, position: np.ndarray) -> Residualizer:
        X, position = _check(X, position)
        if len(X) == 0:
            raise ValueError("cannot fit a residualizer on zero tokens")
        self.scaler.fit(X)
        self._fit(self.scaler.transform(X), position)
        return self

    def transform(self, X: np.ndarray, position: np.ndarray) -> np.ndarray:
        X, position = _check(X, position)
        return self._remove(self.scaler.transform(X), position).astype(np.float32)

    def fit_transform(self, X: np.ndarray, position: np.ndarray) -> np.ndarray:
        return self.fit(X, position).transform(X, position)

    def positional(self, position: np.ndarray) -> np.ndarray | None:
        """The fitted positional component at these positions (None for methods without one)."""
        return None

    def _fit(self, X: np.ndarray, position: np.ndarray) -> None:
        pass

    def _remove(self, X: np.ndarray, position: np.ndarray) -> np.ndarray:
        return X


class PerPositionMean(Residualizer):
    """x - mu_p, with mu_p shrunk toward a smooth fit f(p) where few tokens share p.

    mu_p = (n_p * mean_p + lam * f(p)) / (n_p + lam). With shrink=None, lam is the ratio of the
    within-position variance to the spread of the true means around f (an empirical-Bayes estimate),
    so a position seen once keeps most of its own deviation instead of being wiped to zero.
    Positions never seen at fit time get f(p).
    """

    def _fit(self, X: np.ndarray, position: np.ndarray) -> None:
        s = self.spec
        uniq, sums, counts = group_sums(X, position)
        self.basis_ = PositionBasis(s.basis, s.degree, s.n_knots, s.n_freq).fit(position)
        self.coef_ = fit_smooth(uniq, sums, counts, self.basis_)
        means = sums / counts[:, None]
        smooth = self.basis_.transform(uniq) @ self.coef_
        if s.shrink is None:
            self.lam_ = _shrinkage(X, sums, counts, smooth)
        else:
            self.lam_ = float(s.shrink)
        w = (counts / (counts + self.lam_))[:, None] if np.isfinite(self.lam_) else np.zeros((len(uniq), 1))
        self.positions_ = uniq
        self.means_ = (w * means + (1 - w) * smooth).astype(np.float32)

    def positional(self, position: np.ndarray) -> np.ndarray:
        position = np.asarray(position)
        idx = np.searchsorted(self.positions_, position)
        idx_c = np.minimum(idx, len(self.positions_) - 1)
        seen = self.positions_[idx_c] == position
        out = np.empty((len(position), self.means_.shape[1]), np.float32)
        out[seen] = self.means_[idx_c[seen]]
        if (~seen).any():
            out[~seen] = self.basis_.transform(position[~seen]) @ self.coef_
        return out

    def _remove(self, X: np.ndarray, position: np.ndarray) -> np.ndarray:
        return X - self.positional(position)


def _shrinkage(X: np.ndarray, sums: np.ndarray, counts: np.ndarray, smooth: np.ndarray) -> float:
    """Empirical-Bayes pseudo-count: within-position variance / variance of the means around the smooth fit."""
    if len(X) - len(counts) < 2:
        return float("inf")  # (almost) no position has two tokens: no noise estimate, so trust the smooth fit
    means = sums / counts[:, None]
    # sum_i |x_i - mean_t|^2 = sum_i |x_i|^2 - sum_t n_t |mean_t|^2, without an (n, d) temporary
    within_ss = float(np.einsum("ij,ij->", X, X, dtype=np.float64)) - float((counts * (means**2).sum(1)).sum())
    within = max(within_ss, 0.0) / (len(X) - len(counts))
    spread = ((means - smooth) ** 2).sum(axis=1) - within / counts
    tau2 = float(np.average(spread, weights=counts))
    if tau2 <= 0:
        return float("inf")  # the means differ from the smooth fit by no more than noise: use the fit
    return within / tau2


class PositionRegression(Residualizer):
    """x - f(p) with f a least-squares fit on a smooth basis of position (spline, polynomial or sinusoid)."""

    def _fit(self, X: np.ndarray, position: np.ndarray) -> None:
        s = self.spec
        uniq, sums, counts = group_sums(X, position)
        self.basis_ = PositionBasis(s.basis, s.degree, s.n_knots, s.n_freq).fit(position)
        self.coef_ = fit_smooth(uniq, sums, counts, self.basis_)

    def positional(self, position: np.ndarray) -> np.ndarray:
        return (self.basis_.transform(position) @ self.coef_).astype(np.float32)

    def _remove(self, X: np.ndarray, position: np.ndarray) -> np.ndarray:
        return X - self.positional(position)


class PositionProjection(Residualizer):
    """Project out the k directions that position explains most: the top principal axes of the
    count-weighted per-position means. Removes everything along them, content included."""

    def _fit(self, X: np.ndarray, position: np.ndarray) -> None:
        uniq, sums, counts = group_sums(X, position)
        self.center_ = X.mean(axis=0)
        dev = (sums / counts[:, None] - self.center_) * np.sqrt(counts)[:, None]
        _, sv, vt = np.linalg.svd(dev, full_matrices=False)
        k = min(self.spec.k, len(sv))
        self.components_ = vt[:k].astype(np.float32)  # (k, d)
        total = float((sv**2).sum())
        self.explained_ratio_ = (sv[:k] ** 2 / total) if total > 0 else np.zeros(k)

    def _remove(self, X: np.ndarray, position: np.ndarray) -> np.ndarray:
        return X - ((X - self.center_) @ self.components_.T) @ self.components_


def make_residualizer(spec: ResidualSpec | None = None, **params) -> Residualizer:
    """The residualizer for a spec (or for keyword parameters, e.g. method='regression', basis='poly')."""
    spec = spec or ResidualSpec(**params)
    cls = {"none": Residualizer, "per_position": PerPositionMean,
           "regression": PositionRegression, "projection": PositionProjection}[spec.method]
    return cls(spec)


def _check(X: np.ndarray, position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float32)
    position = np.asarray(position)
    if X.ndim != 2 or position.shape != (len(X),):
        raise ValueError(f"need X of shape (n, d) and position of shape (n,), got {X.shape} and {position.shape}")
    return X, position
