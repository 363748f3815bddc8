"""Additive nuisance effects estimated together, from cell sums: x = a[position] + b[token] + g[branch] + e.

Why together: a per-position mean of latents is also the mean of whatever else varies at that position
(which tokens sit there, which branches reach it), and the estimate's noise is one vector shared by
every token at a position, so subtracting it is itself a position signal. At layer 0 of a model with
learned absolute positions the latent is exactly wte[token] + wpe[position]: fitted with the token's
identity beside it, the position part comes out exact, where a per-position mean carries the noise of
the ~sqrt(n_t) tokens that happened to sit at t.

The model:
- position effects a_t: unpenalized, then shrunk toward a smooth fit s(t) by their own standard errors
  (empirical Bayes: a_t* = s(t) + w_t (a_t - s(t)), w_t = tau^2 / (tau^2 + se_t^2)), so a position
  seen by few tokens takes the smooth curve, and one seen by many keeps its own value;
- token effects b_v: random effects (ridge lambda = sigma^2 / tau_v^2 by EM), 0 for ids never seen;
- branch offsets g_b: each branch's content, fitted so it is not taken for position, never removed.

Everything is solved from per-level sums and per-(level, level) counts made in one pass over the rows:
eliminating the token effects leaves a (positions + branches) square system.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from analysis.basis import PositionBasis, fit_smooth
from analysis.engine.groups import code_sums64

LAMBDA_FLOOR = 1e-4  # smallest token ridge: keeps the position system definite when tokens explain all
EM_STEPS = 6  # EM updates of the token ridge where no fixed-effects fit has residual degrees of freedom
SWEEPS = (
    20  # alternations between (position, token) and the branch offsets, where they are not solved together
)
MAX_JOINT = 3000  # positions + branches up to which position and branch effects are solved as one system


@dataclass
class FactorSums:
    """Sums of the rows of Z (n, d) grouped by each factor, and counts of rows in each pair of levels."""

    levels: dict[str, np.ndarray]  # factor -> (L,) sorted distinct labels
    sums: dict[str, np.ndarray]  # factor -> (L, d) float64
    counts: dict[str, np.ndarray]  # factor -> (L,)
    pairs: dict[tuple[str, str], object]  # (f, g) -> sparse (L_f, L_g) counts of rows in both levels
    sq: float  # sum of squared norms of the rows
    n: int

    @classmethod
    def of(cls, Z: np.ndarray, labels: dict[str, np.ndarray]) -> FactorSums:
        """One compiled pass over Z for every factor's sums (no copy of Z)."""
        from scipy import sparse

        names = tuple(labels)
        levels, codes = {}, {}
        for name, lab in labels.items():
            u, c = np.unique(np.asarray(lab), return_inverse=True)
            levels[name], codes[name] = u, c.ravel()
        sums, sq = code_sums64(Z, [(codes[f], len(levels[f])) for f in names], with_sq=True)
        counts = {f: np.bincount(codes[f], minlength=len(levels[f])) for f in names}
        ones = np.ones(len(Z))
        pairs = {
            (f, g): sparse.csr_matrix((ones, (codes[f], codes[g])), shape=(len(levels[f]), len(levels[g])))
            for i, f in enumerate(names)
            for g in names[i + 1 :]
        }
        return cls(levels, dict(zip(names, sums)), counts, pairs, float(sq.sum()), len(Z))


class SmoothCurve:
    """A precision-weighted least-squares fit of a table (T, d) on a smooth basis of its positions."""

    def __init__(self, basis: PositionBasis, positions: np.ndarray, table: np.ndarray, weights: np.ndarray):
        self.basis = basis
        self.coef = fit_smooth(positions, table * weights[:, None], weights, basis)

    def table(self, positions: np.ndarray) -> np.ndarray:
        """(n, d) the curve at each position, computed once per distinct position."""
        uniq, inverse = np.unique(positions, return_inverse=True)
        return (self.basis.transform(uniq) @ self.coef).astype(np.float32)[inverse.ravel()]


@dataclass
class Effects:
    """Fitted effects per factor (labels (L,), values (L, d)) and, for position, the smooth curve that
    serves positions inside the fitted range that no token held, and the standard errors behind it."""

    labels: dict[str, np.ndarray]
    values: dict[str, np.ndarray]
    smooth: SmoothCurve | None = None  # serves positions no token held, inside the fitted range
    sigma2: float = 0.0  # residual variance per dimension
    lam_token: float = float("inf")
    se2: np.ndarray | None = None  # (T,) squared standard error per dimension of the raw position effects
    weight: np.ndarray | None = None  # (T,) share of each raw position effect kept by the shrinkage
    info: dict = field(default_factory=dict)

    def lookup(self, factor: str, labels: np.ndarray) -> np.ndarray:
        """(n, d) the factor's effect at each label: unseen positions take the smooth curve, unseen
        token ids 0."""
        known, values = self.labels[factor], self.values[factor]
        labels = np.asarray(labels)
        idx = np.minimum(np.searchsorted(known, labels), len(known) - 1)
        seen = known[idx] == labels
        out = values[idx].astype(np.float32)  # (n, d) gather
        if not seen.all():
            if factor == "position" and self.smooth is not None:
                out[~seen] = self.smooth.table(labels[~seen])
            else:
                out[~seen] = 0.0
        return out


def fit_effects(s: FactorSums, basis: PositionBasis | None) -> Effects:
    """The additive model on pooled sums `s` (factors among 'position', 'token', 'branch'; position
    required); position effects shrunk toward a smooth curve on `basis` (None: not shrunk)."""
    from scipy import sparse

    has_tok, has_br = "token" in s.levels, "branch" in s.levels
    d = s.sums["position"].shape[1]
    grand = s.sums["position"].sum(axis=0) / s.n  # (d,) the rows' mean about the shift
    S_t = s.sums["position"] - s.counts["position"][:, None] * grand  # (T, d) sums about the mean
    n_t = s.counts["position"].astype(np.float64)
    T = len(n_t)
    S_v = s.sums["token"] - s.counts["token"][:, None] * grand if has_tok else None
    n_v = s.counts["token"].astype(np.float64) if has_tok else None
    S_b = s.sums["branch"] - s.counts["branch"][:, None] * grand if has_br else None
    n_b = s.counts["branch"].astype(np.float64) if has_br else None
    N_tv = s.pairs.get(("position", "token")) if has_tok else None
    N_tb = s.pairs.get(("position", "branch")) if has_br else None
    N_vb = s.pairs.get(("token", "branch")) if has_tok and has_br else None
    sst = s.sq - s.n * float(grand @ grand)  # total sum of squares about the mean

    g = np.zeros((len(n_b), d)) if has_br else None
    T, B = len(n_t), (len(n_b) if has_br else 0)
    joint = T + B <= MAX_JOINT  # solve (position, branch) together; else alternate with the branch offsets
    # The token ridge lambda = sigma^2 / tau^2: first the fixed-effects fit (lambda at its floor) gives
    # sigma^2 from its residuals and tau^2 from its token effects by moments; then the fit at that lambda.
    # With no residual degrees of freedom left (ids seen once), EM steps from a guess instead.
    fe_dof = s.n - T - (len(n_v) if has_tok else 0) - B
    lam = LAMBDA_FLOOR if fe_dof > 0 else (float(max(n_v.mean(), 1.0)) if has_tok else np.inf)
    steps = (2 if fe_dof > 0 else EM_STEPS) if has_tok else 1
    a = b = Kinv = None
    for _sweep in range(1 if joint or not has_br else SWEEPS):
        for step in range(steps):
            inv = 1.0 / (n_v + lam) if has_tok else None  # (V,)
            if joint:
                a, g, Kinv = _solve_joint(S_t, n_t, S_v, inv, N_tv, S_b, n_b, N_tb, N_vb)
            else:
                St = S_t - (N_tb @ g if has_br else 0)
                K, r = np.diag(n_t), St
                if has_tok:
                    Sv_ = S_v - (N_vb @ g if has_br else 0)
                    K = K - np.asarray((N_tv @ sparse.diags(inv) @ N_tv.T).todense())
                    r = St - N_tv @ (inv[:, None] * Sv_)
                K[np.diag_indices(T)] += 1e-10 * max(float(np.trace(K)) / T, 1e-12)
                Kinv = np.linalg.inv(K)
                a = Kinv @ r  # (T, d)
            if not has_tok or step == steps - 1:
                if has_tok:
                    b = inv[:, None] * (S_v - N_tv.T @ a - (N_vb @ g if has_br else 0))
                break
            b = inv[:, None] * (S_v - N_tv.T @ a - (N_vb @ g if has_br else 0))  # (V, d) posterior means
            rss = _rss(
                sst,
                S_t - (N_tb @ g if has_br else 0),
                S_v - (N_vb @ g if has_br else 0),
                a,
                b,
                n_t,
                n_v,
                N_tv,
                g,
                S_b,
                n_b,
                N_tb,
                N_vb,
            )
            if fe_dof > 0:  # moments of the fixed-effects fit
                sigma2 = max(rss, 0.0) / (d * fe_dof)
                tau2 = float(np.average((b**2).sum(axis=1) / d - sigma2 / n_v, weights=n_v))
            else:  # an EM step
                df = T + float((n_v * inv).sum()) + B
                sigma2 = max(rss, 0.0) / (d * max(s.n - df, 1.0))
                tau2 = float(((b**2).sum() / d + sigma2 * inv.sum()) / len(n_v))
            lam = max(sigma2 / tau2, LAMBDA_FLOOR) if tau2 > 0 else 1e12
        if (
            has_br and not joint
        ):  # branch offsets given position and token: each branch's mean of what is left
            left = S_b - N_tb.T @ a - (N_vb.T @ b if has_tok else 0)  # (B, d)
            g = left / n_b[:, None]
    if has_br:  # offsets about zero: their level moves to the positions (a + g unchanged, so is the fit)
        level = np.average(g, axis=0, weights=n_b)
        g, a = g - level, a + level
    St = S_t - (N_tb @ g if has_br else 0)
    Sv = (S_v - (N_vb @ g if has_br else 0)) if has_tok else None
    rss = _rss(sst, St, Sv, a, b, n_t, n_v, N_tv, g, S_b, n_b, N_tb, N_vb)
    df = T + (float((n_v / (n_v + lam)).sum()) if has_tok else 0.0) + B
    sigma2 = max(rss, 0.0) / (d * max(s.n - df, 1.0))
    se2 = sigma2 * np.clip(np.diag(Kinv), 0, None)  # (T,) per dimension

    # Shrink each position's effect toward a smooth fit by its own standard error (empirical Bayes).
    pos = s.levels["position"]
    curve_at, w = None, np.ones(T)
    if basis is not None and T >= 2:
        prec = 1.0 / np.maximum(se2, 1e-300) if sigma2 > 0 else n_t
        curve_at = SmoothCurve(basis.fit(pos), pos, a, prec)
        curve = curve_at.table(pos)  # (T, d)
        if sigma2 > 0:  # an exact fit (sigma2 = 0) has no noise to shrink
            tau2 = float(np.average(((a - curve) ** 2).sum(axis=1) / d - se2, weights=prec))
            w = tau2 / (tau2 + se2) if tau2 > 0 else np.zeros(T)
        a = curve + w[:, None] * (a - curve)
    values = {"position": a}
    labels = {"position": pos}
    if has_tok:
        values["token"], labels["token"] = b, s.levels["token"]
    if has_br:
        values["branch"], labels["branch"] = g, s.levels["branch"]
    return Effects(
        labels, values, curve_at, sigma2, lam if has_tok else float("inf"), se2, w, {"rss": rss, "sst": sst}
    )


def _rss(sst, St, Sv, a, b, n_t, n_v, N_tv, g, S_b, n_b, N_tb, N_vb) -> float:
    """Residual sum of squares of the fit, from the sums (about the mean) and the effects:
    sum |x - a_t - b_v - g_b|^2 = SST - 2 sum <x, fit> + sum |fit|^2, expanded over the cells."""
    fit_x = float((St * a).sum())  # St = S_t - N_tb g already; the branch cross term is added below
    fit_sq = float((n_t * (a**2).sum(axis=1)).sum())
    if b is not None:
        fit_x += float((Sv * b).sum())
        fit_sq += float((n_v * (b**2).sum(axis=1)).sum()) + 2 * float((a * (N_tv @ b)).sum())
    if g is not None:
        # St, Sv hold -N g: add back <S_b, g> and the g terms of |fit|^2
        fit_x += (
            float((S_b * g).sum())
            + float(((N_tb @ g) * a).sum())
            + (float(((N_vb @ g) * b).sum()) if b is not None else 0)
        )
        fit_sq += float((n_b * (g**2).sum(axis=1)).sum()) + 2 * float((a * (N_tb @ g)).sum())
        if b is not None:
            fit_sq += 2 * float((b * (N_vb @ g)).sum())
    return sst - 2 * fit_x + fit_sq


def _solve_joint(S_t, n_t, S_v, inv, N_tv, S_b, n_b, N_tb, N_vb):
    """Position effects a (T, d) and branch offsets g (B, d) solved together (sum_b n_b g_b = 0), token
    effects (ridge weights inv = 1 / (n_v + lambda)) eliminated, and the (T, T) block of the inverse system
    (the position effects' covariance over sigma^2, for their standard errors)."""
    from scipy import sparse

    T = len(n_t)
    has_br, has_tok = S_b is not None, S_v is not None
    A = np.diag(n_t).astype(np.float64)
    r = S_t.copy()
    if has_tok:
        W = sparse.diags(inv)
        A -= np.asarray((N_tv @ W @ N_tv.T).todense())
        r -= N_tv @ (inv[:, None] * S_v)
    if has_br:
        top = np.asarray(N_tb.todense())
        bottom = np.diag(n_b).astype(np.float64)
        rb = S_b.copy()
        if has_tok:
            top = top - np.asarray((N_tv @ W @ N_vb).todense())
            bottom -= np.asarray((N_vb.T @ W @ N_vb).todense())
            rb -= N_vb.T @ (inv[:, None] * S_v)
        # A constant moves freely between a and g: pin it with a penalty on sum_b n_b g_b alone, which is
        # 0 at one point of that line of equal fits (so the solution is the constrained one, exactly)
        bottom += np.outer(n_b, n_b) / float(n_b.sum())
        A = np.block([[A, top], [top.T, bottom]])
        r = np.vstack([r, rb])
    A[np.diag_indices(T)] += 1e-10 * max(float(np.trace(A[:T, :T])) / T, 1e-12)
    Ainv = np.linalg.inv(A)
    sol = Ainv @ r
    return sol[:T], (sol[T:] if has_br else None), Ainv[:T, :T]
