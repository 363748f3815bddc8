"""A smooth, low-rank position component, its rank and weight chosen out of fold.

For position that a linear probe reads but per-position means do not reach (a small, consistent direction:
RoPE models' layers, the `weak_linear` regime). The component is a translation per position, as the truth
is, but with few degrees of freedom, so the estimate's noise stays off the tokens:

    a(t) = w * phi(t) W_r      phi: a cubic spline basis of position (k functions), W_r (k, d) of rank r

W is the least-squares fit of x on phi within branches (each branch's mean removed from both sides, so
what tells branches apart is not taken for position). The rank r and the weight w come from held-out
folds (prompts): W_r fitted on the other folds predicts a fold's tokens, w is the out-of-fold
least-squares weight of that prediction, and r is the rank whose prediction explains the most held-out
variance. Content that happens to drift with position in the folds a fit saw does not predict another
fold, so w shrinks the estimate toward what carries over (measured: LEACE, which zeroes the sample's
whole covariance with position, ended 0.04-0.06 below exact subtraction on `weak_linear`; this ends
within the band of exact, docs/removal.md).

An estimate fitted on N tokens with k << N functions holds about r k / N of each token's own content,
so the push-apart that analysis.estimators balances for per-position means is negligible here.
"""

from __future__ import annotations

import numpy as np

from analysis.basis import PositionBasis
from analysis.engine.groups import f64_blocks, group_sums, row_sq

KNOTS = 5  # cubic spline knots: 7 functions, 6 after the within-branch centring


class SmoothLowRank:
    """fit(X, position, branch, fold) -> self; component(position) -> (n, d) to subtract.

    After fit: rank_ (0 where no rank predicts held-out folds), weight_ in [0, 1], gains_ (per rank
    1..k, the held-out sum of squares the weighted prediction explains, as a share of the held-out
    within-branch sum of squares)."""

    def __init__(self, n_knots: int = KNOTS):
        self.n_knots = n_knots

    def _design(self, position: np.ndarray, codes: np.ndarray, n_branches: int) -> np.ndarray:
        """(n, k) the basis centred within each branch (codes: each token's branch, 0..n_branches-1)."""
        Phi = self.basis_.transform(position)  # (n, k)
        sums = np.zeros((n_branches, Phi.shape[1]))
        np.add.at(sums, codes, Phi)
        return Phi - (sums / np.bincount(codes, minlength=n_branches)[:, None])[codes]

    def fit(self, X: np.ndarray, position: np.ndarray, branch: np.ndarray, fold: np.ndarray) -> SmoothLowRank:
        """X (n, d) float32 rows; position, branch, fold (n,): branches must nest in folds."""
        self.basis_ = PositionBasis("spline", 3, self.n_knots).fit(position)
        _, bsum, counts = group_sums(X, branch)  # (G, d) float64 per-branch sums, (G,)
        codes = np.unique(branch, return_inverse=True)[1].ravel()
        F = self._design(position, codes, len(counts))  # (n, k)
        n_folds = int(fold.max()) + 1
        A = np.stack([F[fold == f].T @ F[fold == f] for f in range(n_folds)])  # per fold: F^T F (k, k)
        B = np.zeros(
            (n_folds, F.shape[1], X.shape[1])
        )  # per fold: F^T X (= F^T X_centred: F sums to 0 per branch)
        for rows, xb in f64_blocks(X):
            for f in np.unique(fold[rows]):
                sel = fold[rows] == f
                B[f] += F[rows][sel].T @ xb[sel]
        within_ss = float(row_sq(X).sum()) - float(((bsum**2).sum(axis=1) / counts).sum())
        k = F.shape[1]
        num, den = np.zeros(k), np.zeros(k)
        A_all, B_all = A.sum(axis=0), B.sum(axis=0)
        for f in range(n_folds):
            if not A[f].any():
                continue
            paths = _rank_path(A_all - A[f], B_all - B[f], k)  # (k, k, d)
            num += np.einsum("rkd,kd->r", paths, B[f])
            den += np.einsum("rkd,kj,rjd->r", paths, A[f], paths)
        w = np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)
        gains = np.where(num > 0, num * w, 0.0) / max(within_ss, 1e-300)
        self.gains_ = gains
        best = int(np.argmax(gains))
        self.rank_ = best + 1 if gains[best] > 0 else 0
        self.weight_ = float(np.clip(w[best], 0.0, 1.0)) if self.rank_ else 0.0
        self.W_ = _rank_path(A_all, B_all, k)[best] if self.rank_ else np.zeros((k, X.shape[1]))
        return self

    def component(self, position: np.ndarray) -> np.ndarray:
        """(n, d) float32: the weighted component at these positions (held at the edges outside the fit)."""
        return (self.weight_ * self.basis_.transform(position) @ self.W_).astype(np.float32)


def _rank_path(A: np.ndarray, B: np.ndarray, k: int) -> np.ndarray:
    """(k, k, d): the least-squares W = A^+ B truncated to rank 1..k in the metric of the fitted values
    (|F W|^2 = |A^(1/2) W|^2), so rank r keeps the r directions of F W with the most variance."""
    lam, V = np.linalg.eigh(A)
    keep = lam > 1e-10 * max(float(lam.max()), 1e-300)
    inv_root = V[:, keep] / np.sqrt(lam[keep])  # (k, m)
    M = inv_root.T @ B  # A^(1/2) W  with W = A^+ B: (m, d)
    U, S, Vt = np.linalg.svd(M, full_matrices=False)
    out = np.zeros((k, A.shape[0], B.shape[1]))
    for r in range(1, k + 1):
        m = min(r, len(S))
        out[r - 1] = inv_root @ ((U[:, :m] * S[:m]) @ Vt[:m])
    return out
