"""Linear erasure of position (LEACE, Belrose et al. 2023) and the cross-fitted test that decides it.

Position can be linearly decodable while it explains almost none of the variance (a small, consistent
direction: RoPE models' layers). Per-position means never reach it (their out-of-fold R2 stays below 0),
but a linear probe reads it. The eraser removes exactly what a linear probe of position features z(t)
could read:

    x -> x - S (B^T S)^{-1} B^T (x - mu),   S = Cov(x, z) (d, k),  B = (Cov(x) + alpha I)^{-1} S

After it Cov(x, z) = 0 on the data it was fitted on, whatever B is (B^T S cancels), so no linear
predictor of z does better than a constant there; B = Cov(x)^{-1} S (alpha -> 0) is the LEACE choice,
the least-squares-smallest edit. It is an oblique projection of rank k: no per-position offset is added
to any token, so the estimate's noise cannot imprint position the way subtracted means do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis.basis import PositionBasis
from analysis.engine import blas
from analysis.engine.groups import blocks
from analysis.stats import PermutationTest

ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # ridge, relative to the mean eigenvalue of the covariance
FEATURE_KNOTS = 5  # a cubic spline basis of position with this many knots: 7 functions, 6 after centring


def position_features(position: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """(n, k) smooth functions of position (a cubic B-spline basis, linear and curved trends included),
    orthonormalized and centred over these tokens: what the eraser makes unreadable."""
    p = np.asarray(position, dtype=np.float64)
    basis = PositionBasis("spline", degree=3, n_knots=FEATURE_KNOTS).fit(p)
    F = basis.transform(p)
    F = F - F.mean(axis=0)
    q, r = np.linalg.qr(F)
    keep = np.abs(np.diag(r)) > 1e-8 * max(np.abs(np.diag(r)).max(), 1e-300)
    return q[:, keep] * np.sqrt(len(p))  # (n, k), each column mean 0 and variance 1


@dataclass
class Moments:
    """First and second moments of rows X (n, d) and targets Y (n, m), float64: what ridge fits and the
    eraser need. Sums over disjoint row sets add."""

    G: np.ndarray  # (d, d) X^T X
    s: np.ndarray  # (d,) sum of x
    XY: np.ndarray  # (d, m) X^T Y
    ysum: np.ndarray  # (m,)
    yss: np.ndarray  # (m,) sum of y^2
    n: int

    @classmethod
    def of(cls, X: np.ndarray, Y: np.ndarray) -> Moments:
        X = np.asarray(X, dtype=np.float32)
        Y = np.asarray(Y, dtype=np.float64)
        G = np.zeros((X.shape[1], X.shape[1]))
        XY = np.zeros((X.shape[1], Y.shape[1]))
        s = np.zeros(X.shape[1])
        for rows in blocks(len(X)):
            xb = X[rows]
            G += (xb.T @ xb).astype(np.float64)  # float32 product of centred rows, added in float64
            XY += xb.T.astype(np.float64) @ Y[rows]
            s += xb.sum(axis=0, dtype=np.float64)
        return cls(G, s, XY, Y.sum(axis=0), (Y**2).sum(axis=0), len(X))

    def __add__(self, other: Moments) -> Moments:
        return Moments(
            self.G + other.G,
            self.s + other.s,
            self.XY + other.XY,
            self.ysum + other.ysum,
            self.yss + other.yss,
            self.n + other.n,
        )

    def __sub__(self, other: Moments) -> Moments:
        return Moments(
            self.G - other.G,
            self.s - other.s,
            self.XY - other.XY,
            self.ysum - other.ysum,
            self.yss - other.yss,
            self.n - other.n,
        )

    def cov(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(mean of x (d,), Cov(x) (d, d), Cov(x, y) (d, m), mean of y (m,))."""
        mx, my = self.s / self.n, self.ysum / self.n
        C = self.G / self.n - np.outer(mx, mx)
        return mx, C, self.XY / self.n - np.outer(mx, my), my


def ridge_path(m: Moments, alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ridge weights W (a, d, k) and intercepts (a, k) of y on x for each relative alpha, from one
    eigendecomposition of Cov(x)."""
    mx, C, Cxy, my = m.cov()
    lam, V = blas.eigh(C)
    lam = np.clip(lam, 0, None)
    scale = max(float(lam.mean()), 1e-300)
    z = V.T @ Cxy  # (d, k)
    W = np.stack([V @ (z / (lam + a * scale)[:, None]) for a in alphas])  # (a, d, k)
    return W, my[None, :] - np.einsum("d,adk->ak", mx, W)


def sse(m: Moments, W: np.ndarray, b0: np.ndarray) -> np.ndarray:
    """Squared error (a, k) of the fits (W, b0) on the rows summarized by m."""
    quad = (W * (m.G[None] @ W)).sum(axis=1)
    cross = (W * m.XY[None]).sum(axis=1)
    sw = np.einsum("d,adk->ak", m.s, W)
    return m.yss - 2 * cross - 2 * b0 * m.ysum + quad + 2 * b0 * sw + m.n * b0**2


@dataclass
class LinearTest(PermutationTest):
    """Out-of-fold R2 of a ridge probe of position, against refits with position shuffled within
    branches (each branch keeps its own positions, so content that only tells branches apart reads as
    chance); alpha: the ridge the real target chose."""

    alpha: float = 0.0


def linear_test(
    X: np.ndarray, position: np.ndarray, fold: np.ndarray, shuffled: list[np.ndarray]
) -> LinearTest:
    """The prompt-held-out (fold) ridge probe of standardized position from X (n, d), and the same probe
    refitted on each shuffled copy of position (each (n,)); the alpha with the least pooled held-out
    error on the real target serves the shuffles too (one choice, so the comparison stays fair)."""
    y = np.asarray(position, dtype=np.float64)
    Y = np.column_stack([y] + list(shuffled))
    Y = (Y - y.mean()) / max(y.std(), 1e-12)
    n_folds = int(fold.max()) + 1
    parts = [Moments.of(X[fold == f], Y[fold == f]) for f in range(n_folds)]
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    alphas = np.asarray(ALPHAS)
    errs = np.zeros((len(alphas), Y.shape[1]))
    for part in parts:
        if part.n == 0:
            continue
        W, b0 = ridge_path(total - part, alphas)
        errs += sse(part, W, b0)
    best = int(np.argmin(errs[:, 0]))
    ss_tot = total.yss - total.ysum**2 / total.n
    r2 = 1 - errs[best] / np.where(ss_tot > 0, ss_tot, np.nan)
    return LinearTest(float(r2[0]), r2[1:], float(alphas[best]))


class LinearEraser:
    """LEACE of position features, fitted from moments; transform works in place, a block at a time."""

    def fit(self, m: Moments, alpha: float = 1e-3) -> LinearEraser:
        mx, C, S, _ = m.cov()  # S: (d, k)
        scale = max(float(np.trace(C)) / len(C), 1e-300)
        B = blas.solve(C + alpha * scale * np.eye(len(C)), S)  # (d, k)
        M = B.T @ S  # (k, k) symmetric
        self.mean_ = mx.astype(np.float32)
        self.read_ = (B @ np.linalg.pinv(M)).astype(np.float32)  # (d, k)
        self.write_ = S.T.astype(np.float32)  # (k, d)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        """X (n, d) float32, erased in place."""
        for rows in blocks(len(X)):
            X[rows] -= ((X[rows] - self.mean_) @ self.read_) @ self.write_
        return X
