"""Smooth bases of token position (polynomial, B-spline, sinusoid) for regression on position."""

from __future__ import annotations

import numpy as np
from numpy.polynomial import legendre

BASES = ("spline", "poly", "sinusoid")


class PositionBasis:
    """Features phi(p) of position, scaled to the positions seen at fit time.

    Outside the fitted range every basis is held constant at its edge value, so a position
    longer than any reference branch gets the nearest fitted value, not a wild extrapolation.
    A basis never gets more than half as many functions as there are distinct positions (degree,
    knots or frequencies are lowered to fit), so it stays a smooth fit rather than an interpolation.
    """

    def __init__(self, kind: str = "spline", degree: int = 3, n_knots: int = 12, n_freq: int = 4):
        if kind not in BASES:
            raise ValueError(f"unknown position basis {kind!r}; choose one of {', '.join(BASES)}")
        if degree < 1 or n_knots < 2 or n_freq < 1:
            raise ValueError("basis needs degree >= 1, n_knots >= 2 and n_freq >= 1")
        self.kind, self.degree, self.n_knots, self.n_freq = kind, degree, n_knots, n_freq

    def fit(self, position: np.ndarray) -> PositionBasis:
        p = np.asarray(position, dtype=np.float64)
        if len(p) == 0:
            raise ValueError("cannot fit a position basis on zero tokens")
        self.lo_, self.hi_ = float(p.min()), float(max(p.max(), p.min() + 1))
        budget = max(2, len(np.unique(p)) // 2)  # most basis functions allowed
        self.degree_ = int(max(1, min(self.degree, budget - 1)))
        self.n_freq_ = int(max(0, min(self.n_freq, (budget - 2) // 2)))
        if self.kind == "spline":
            from sklearn.preprocessing import (
                SplineTransformer,  # ~0.8 s to import: only when a spline is fitted
            )

            n_knots = int(max(2, min(self.n_knots, budget - self.degree_ + 1)))
            self.spline_ = SplineTransformer(
                n_knots=n_knots, degree=self.degree_, extrapolation="constant", include_bias=True
            ).fit(p[:, None])
        return self

    def _unit(self, position: np.ndarray) -> np.ndarray:
        p = np.clip(np.asarray(position, dtype=np.float64), self.lo_, self.hi_)
        return (p - self.lo_) / (self.hi_ - self.lo_)

    def transform(self, position: np.ndarray) -> np.ndarray:
        """(n, n_features) design matrix, intercept included."""
        if self.kind == "spline":
            p = np.clip(np.asarray(position, dtype=np.float64), self.lo_, self.hi_)
            return self.spline_.transform(p[:, None])
        u = self._unit(position)
        if self.kind == "poly":
            return legendre.legvander(2 * u - 1, self.degree_)
        # Periods up to twice the range, so the basis is not forced to repeat inside it.
        freqs = np.arange(1, self.n_freq_ + 1)
        angle = np.pi * u[:, None] * freqs[None, :]
        return np.hstack([np.ones((len(u), 1)), u[:, None], np.sin(angle), np.cos(angle)])


def fit_smooth(
    positions: np.ndarray, sums: np.ndarray, counts: np.ndarray, basis: PositionBasis, ridge: float = 1e-6
) -> np.ndarray:
    """Least-squares coefficients W (n_features, d) of x ~ phi(t) W over all tokens, from per-position sums.

    phi depends on t only, so the token-level normal equations reduce to the distinct positions:
    sum_t n_t phi_t phi_t^T W = sum_t phi_t S_t^T (S_t the sum of the latents at t). A tiny ridge keeps
    the system solvable when a basis has more functions than distinct positions.
    """
    phi = basis.transform(positions)
    gram = phi.T @ (phi * np.asarray(counts, np.float64)[:, None])
    gram[np.diag_indices_from(gram)] += ridge * max(np.trace(gram) / len(gram), 1e-12)
    return np.linalg.solve(gram, phi.T @ np.asarray(sums, dtype=np.float64))
