"""Residualizers: estimate a nuisance component (position, the current token's identity, or both) and
remove it.

Each class follows sklearn's shape: fit(X, position=..., token=...) -> self, transform(X, ...) ->
residuals. Every method runs after the same optional scaling step (row L2-normalization, centring,
per-dimension standardization), so `none` is that scaling alone. `component(X, ...)` is what a fitted
method would subtract; `analysis.crossfit` decides how much of it is removed (cross-fitted, tested,
shrunk). A new method is one class decorated with @register: the spec, the app, the report and the
cache pick it up from RESIDUALIZERS.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from analysis.basis import PositionBasis, fit_smooth
from analysis.groups import blocks, group_sums

RESIDUALIZERS: dict[str, type[Residualizer]] = {}


def register(cls: type[Residualizer]) -> type[Residualizer]:
    """Make a residualizer class available by its `name` (specs, app, report, cache)."""
    RESIDUALIZERS[cls.name] = cls
    return cls


@dataclass(frozen=True)
class ResidualSpec:
    """Which residualizer and its parameters; hashable and serializable (cache keys)."""

    method: str = "per_position"
    center: bool = True
    l2: bool = False
    standardize: bool = False
    shrink: float | None = None  # group means: pseudo-count toward the smooth fit / grand mean; None = estimated
    basis: str = "spline"  # per_position (smooth fit) and regression
    degree: int = 3
    n_knots: int = 12
    n_freq: int = 4
    k: int | None = None  # projection: directions removed; None = chosen from the data (out-of-fold R2)
    crossfit: bool = True  # the estimate removed from a token never saw that token's prompt (or branch)
    folds: int = 5
    gate: bool = True  # remove only a component detected out of fold (p <= alpha), shrunk; False = force
    alpha: float = 0.05
    n_perm: int = 19  # permutations behind the detection p-value (smallest p = 1 / (n_perm + 1))
    within_branch: bool = True  # estimate the nuisance net of each branch's mean (content), by backfitting

    def __post_init__(self) -> None:
        if self.method not in RESIDUALIZERS:
            raise ValueError(f"unknown residualizer {self.method!r}; choose one of {', '.join(RESIDUALIZERS)}")
        if self.k is not None and self.k < 1:
            raise ValueError("projection needs k >= 1 directions to remove")
        if self.shrink is not None and self.shrink < 0:
            raise ValueError("shrink must be >= 0")
        if self.folds < 2:
            raise ValueError("cross-fitting needs folds >= 2")
        if not 0 < self.alpha < 1:
            raise ValueError("alpha must be between 0 and 1")
        if self.n_perm < 1:
            raise ValueError("n_perm must be >= 1")
        PositionBasis(self.basis, self.degree, self.n_knots, self.n_freq)  # validates the basis settings

    def to_dict(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        """A short human name, e.g. 'per-position mean' or 'regression (spline)'."""
        return RESIDUALIZERS[self.method].describe(self)


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

    def transform(self, X: np.ndarray, in_place: bool = False) -> np.ndarray:
        """A new float32 array (never X itself), skipping the steps that would do nothing; with in_place,
        X itself (a float32 array) overwritten with the same values, no copy made."""
        if not in_place:
            out = self._rows(X)
            if self.mean_.any():
                out = out - self.mean_
            if (self.scale_ != 1).any():
                out = out / self.scale_
            return out.copy() if out is X else out.astype(np.float32, copy=False)
        if not (isinstance(X, np.ndarray) and X.dtype == np.float32):
            raise TypeError("in-place scaling needs a float32 array")
        if self.l2:
            for rows in blocks(len(X)):
                X[rows] /= np.maximum(np.linalg.norm(X[rows], axis=1, keepdims=True), 1e-12)
        if self.mean_.any():
            X -= self.mean_
        if (self.scale_ != 1).any():
            X /= self.scale_
        return X


class Residualizer:
    """Base, and the `none` method: scaling, then removal of the fitted component (none here)."""

    name = "none"
    covariates: tuple[str, ...] = ()  # what the method needs per token: 'position', 'token'
    nuisance = "nothing"  # what it removes, in words
    additive = True  # component() is an estimate of E[x | covariates] (shrinkable), not a projection

    def __init__(self, spec: ResidualSpec):
        self.spec = spec
        self.scaler = Scaler(spec.center, spec.l2, spec.standardize)

    @classmethod
    def describe(cls, spec: ResidualSpec) -> str:
        return "raw"

    def fit(self, X: np.ndarray, position: np.ndarray | None = None, token: np.ndarray | None = None,
            branch: np.ndarray | None = None, scale: bool = True) -> Residualizer:
        """Fit on X (n, d); with scale=False, X is taken as already scaled (cross-fitting scales once).

        With `branch` (and spec.within_branch), the nuisance is estimated net of each branch's mean: the
        two-way model x = a_branch + m(covariates) + e, by backfitting. Without it, a per-position mean
        pooled over a few branches is partly their content (branches end at different lengths, so the
        mix of content changes with position), and subtracting it would add that content back, as a
        function of position, to every other token.
        """
        X, cov = self._check(X, position, token)
        if len(X) == 0:
            raise ValueError("cannot fit a residualizer on zero tokens")
        if scale:
            self.scaler.fit(X)
            X = self.scaler.transform(X)
        if branch is not None and self.spec.within_branch and self.covariates and len(np.unique(branch)) > 1:
            X = X - branch_offsets(self, X, cov, np.asarray(branch))
        self._fit(X, cov)
        return self

    def component(self, X: np.ndarray, position: np.ndarray | None = None,
                  token: np.ndarray | None = None) -> np.ndarray:
        """(n, d): what this method removes from already scaled X."""
        X, cov = self._check(X, position, token)
        return self._component(X, cov)

    def transform(self, X: np.ndarray, position: np.ndarray | None = None, token: np.ndarray | None = None,
                  weight: float = 1.0) -> np.ndarray:
        """Scaled X minus `weight` times the fitted component."""
        X, cov = self._check(X, position, token)
        Z = self.scaler.transform(X)
        if not self.covariates or weight == 0:
            return Z
        return (Z - weight * self._component(Z, cov)).astype(np.float32)

    def fit_transform(self, X: np.ndarray, position: np.ndarray | None = None,
                      token: np.ndarray | None = None) -> np.ndarray:
        return self.fit(X, position, token).transform(X, position, token)

    def _fit(self, X: np.ndarray, cov: dict[str, np.ndarray]) -> None:
        pass

    def _component(self, X: np.ndarray, cov: dict[str, np.ndarray]) -> np.ndarray:
        return np.zeros_like(X)

    def _check(self, X, position, token) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2:
            raise ValueError(f"need X of shape (n, d), got {X.shape}")
        given = {"position": position, "token": token}
        cov = {}
        for name in self.covariates:
            if given[name] is None:
                raise ValueError(f"the {self.describe(self.spec)} residualizer needs each token's {name}")
            arr = np.asarray(given[name])
            if arr.shape != (len(X),):
                raise ValueError(f"need {name} of shape ({len(X)},), got {arr.shape}")
            cov[name] = arr
        return X, cov


register(Residualizer)


@dataclass
class LabelStats:
    """Sufficient statistics of rows X (n, d) grouped by one covariate: what the single-covariate methods
    fit from, so cross-fitting gets each fold's statistics by subtraction instead of a pass over X."""

    labels: np.ndarray  # (L,) sorted distinct covariate values
    sums: np.ndarray  # (L, d) float64 row sums per value
    counts: np.ndarray  # (L,) rows per value
    sq: float  # sum of squared norms of all rows
    n: int

    @classmethod
    def of(cls, X: np.ndarray, labels: np.ndarray) -> LabelStats:
        uniq, sums, counts = group_sums(X, labels)
        return cls(uniq, sums, counts, float(np.einsum("ij,ij->", X, X, dtype=np.float64)), len(X))

    def minus(self, other: LabelStats) -> LabelStats:
        """The statistics of the rows in self but not in other (other's labels a subset of self's)."""
        idx = np.searchsorted(self.labels, other.labels)
        sums, counts = self.sums.copy(), self.counts.copy()
        sums[idx] -= other.sums
        counts[idx] -= other.counts
        keep = counts > 0
        return LabelStats(self.labels[keep], sums[keep], counts[keep], self.sq - other.sq, self.n - other.n)


def branch_offsets(model: Residualizer, X: np.ndarray, cov: dict[str, np.ndarray], branch: np.ndarray,
                    sweeps: int = 2) -> np.ndarray:
    """(n, d) per-token offset a_branch of the backfitted model x = a_branch + m(cov) + e, with the a's
    weighted mean zero (so the nuisance keeps the overall level). A projection backfits with
    per-position means, then finds its directions in what is left."""
    helper = model if model.additive else PerPositionMean(model.spec)
    _, inverse, counts = np.unique(branch, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    offsets = np.zeros_like(X)
    for _ in range(sweeps):
        helper._fit(X - offsets, cov)
        _, sums, _ = group_sums(X - helper._component(X, cov), branch)
        per_branch = sums / counts[:, None]  # (B, d)
        per_branch -= np.average(per_branch, axis=0, weights=counts)
        offsets = per_branch[inverse].astype(np.float32)
    return offsets


class GroupMeans:
    """Per-label means of X, shrunk toward a prior mean per label (empirical Bayes when lam is None).

    mean_g = (n_g * raw_mean_g + lam * prior_g) / (n_g + lam); lam = within-label variance / spread of
    the true means around the prior, so a label seen once keeps most of its own deviation when the
    labels really differ, and little of it when they do not.
    """

    def fit(self, stats: LabelStats, prior: np.ndarray, lam: float | None) -> GroupMeans:
        # prior (G, d) per label of stats
        counts = stats.counts
        means = stats.sums / counts[:, None]
        self.lam_ = _shrinkage(stats, prior) if lam is None else float(lam)
        w = (counts / (counts + self.lam_))[:, None] if np.isfinite(self.lam_) else np.zeros((len(counts), 1))
        self.labels_ = stats.labels
        self.means_ = (w * means + (1 - w) * prior).astype(np.float32)  # (G, d)
        return self

    def lookup(self, labels: np.ndarray, fallback) -> np.ndarray:
        """(n, d) fitted means at `labels`; rows of unseen labels come from fallback(unseen labels)."""
        labels = np.asarray(labels)
        idx = np.minimum(np.searchsorted(self.labels_, labels), len(self.labels_) - 1)
        seen = self.labels_[idx] == labels
        out = self.means_[idx]  # (n, d) gather
        if not seen.all():
            out[~seen] = fallback(labels[~seen])
        return out


def _shrinkage(stats: LabelStats, prior: np.ndarray) -> float:
    """Empirical-Bayes pseudo-count: within-label variance / variance of the means around the prior."""
    counts = stats.counts
    if stats.n - len(counts) < 2:
        return float("inf")  # (almost) no label has two tokens: no noise estimate, so trust the prior
    means = stats.sums / counts[:, None]
    # sum_i |x_i - mean_g|^2 = sum_i |x_i|^2 - sum_g n_g |mean_g|^2, without an (n, d) temporary
    within_ss = stats.sq - float((counts * (means**2).sum(1)).sum())
    within = max(within_ss, 0.0) / (stats.n - len(counts))
    spread = ((means - prior) ** 2).sum(axis=1) - within / counts
    tau2 = float(np.average(spread, weights=counts))
    if tau2 <= 0:
        return float("inf")  # the means differ from the prior by no more than noise: use the prior
    return within / tau2


class _Smooth:
    """A least-squares fit of X on a smooth basis of position."""

    def __init__(self, spec: ResidualSpec, stats: LabelStats):
        # the basis depends on the range and the number of distinct positions only
        self.basis = PositionBasis(spec.basis, spec.degree, spec.n_knots, spec.n_freq).fit(stats.labels)
        self.coef = fit_smooth(stats.labels, stats.sums, stats.counts, self.basis)

    def __call__(self, position: np.ndarray) -> np.ndarray:
        """(n, d) fitted values, computed once per distinct position."""
        uniq, inverse = np.unique(position, return_inverse=True)
        return (self.basis.transform(uniq) @ self.coef).astype(np.float32)[inverse.ravel()]


@register
class PerPositionMean(Residualizer):
    """x - mu_p, with mu_p shrunk toward a smooth fit f(p) where few tokens share p (GroupMeans).
    Positions never seen at fit time get f(p)."""

    name = "per_position"
    covariates = ("position",)
    nuisance = "position"

    @classmethod
    def describe(cls, spec: ResidualSpec) -> str:
        return "per-position mean"

    def _fit(self, X, cov):
        self.fit_stats(LabelStats.of(X, cov["position"]))

    def fit_stats(self, stats: LabelStats) -> PerPositionMean:
        self.smooth_ = _Smooth(self.spec, stats)
        self.means_ = GroupMeans().fit(stats, self.smooth_(stats.labels), self.spec.shrink)
        self.lam_ = self.means_.lam_
        return self

    def _component(self, X, cov):
        return self.means_.lookup(cov["position"], self.smooth_)


@register
class PositionRegression(Residualizer):
    """x - f(p) with f a least-squares fit on a smooth basis of position (spline, polynomial or sinusoid)."""

    name = "regression"
    covariates = ("position",)
    nuisance = "position"

    @classmethod
    def describe(cls, spec: ResidualSpec) -> str:
        return f"regression ({spec.basis})"

    def _fit(self, X, cov):
        self.fit_stats(LabelStats.of(X, cov["position"]))

    def fit_stats(self, stats: LabelStats) -> PositionRegression:
        self.smooth_ = _Smooth(self.spec, stats)
        return self

    def _component(self, X, cov):
        return self.smooth_(cov["position"])


@register
class PositionProjection(Residualizer):
    """Project out the k directions that position explains most: the top principal axes of the
    count-weighted per-position means. Removes everything along them, content included."""

    name = "projection"
    covariates = ("position",)
    nuisance = "position"
    additive = False

    @classmethod
    def describe(cls, spec: ResidualSpec) -> str:
        return f"projection (k={spec.k})" if spec.k is not None else "projection (k from data)"

    def _fit(self, X, cov):
        self.fit_stats(LabelStats.of(X, cov["position"]))

    def fit_stats(self, stats: LabelStats) -> PositionProjection:
        sums, counts = stats.sums, stats.counts
        self.center_ = (sums.sum(axis=0) / stats.n).astype(np.float32)
        dev = (sums / counts[:, None] - self.center_) * np.sqrt(counts)[:, None]  # (T, d)
        _, sv, vt = np.linalg.svd(dev, full_matrices=False)
        k = min(self.spec.k or 2, len(sv))
        self.components_ = vt[:k].astype(np.float32)  # (k, d)
        total = float((sv**2).sum())
        self.explained_ratio_ = (sv[:k] ** 2 / total) if total > 0 else np.zeros(k)
        return self

    def _component(self, X, cov):
        return ((X - self.center_) @ self.components_.T) @ self.components_


@register
class PerTokenMean(Residualizer):
    """x - nu_w: the mean latent of the current token id w, shrunk toward the grand mean for rare tokens.
    Shows branches by context rather than by which token sits there."""

    name = "per_token"
    covariates = ("token",)
    nuisance = "token identity"

    @classmethod
    def describe(cls, spec: ResidualSpec) -> str:
        return "per-token mean"

    def _fit(self, X, cov):
        self.fit_stats(LabelStats.of(X, cov["token"]))

    def fit_stats(self, stats: LabelStats) -> PerTokenMean:
        self.grand_ = (stats.sums.sum(axis=0) / stats.n).astype(np.float32)
        self.means_ = GroupMeans().fit(stats, np.tile(self.grand_, (len(stats.labels), 1)), self.spec.shrink)
        self.lam_ = self.means_.lam_
        return self

    def _component(self, X, cov):
        return self.means_.lookup(cov["token"], lambda unseen: self.grand_)


@register
class PositionAndToken(Residualizer):
    """x - (grand + a_p + b_w): an additive two-way fit of position and token identity (backfitting:
    position effects smoothed as in per_position, token effects shrunk as in per_token)."""

    name = "position_token"
    covariates = ("position", "token")
    nuisance = "position and token identity"
    sweeps = 4

    @classmethod
    def describe(cls, spec: ResidualSpec) -> str:
        return "position + token"

    def _fit(self, X, cov):
        self.grand_ = X.mean(axis=0)
        Z = X - self.grand_
        tok_part = np.zeros_like(Z)
        for _ in range(self.sweeps):
            pos_fit = PerPositionMean(self.spec)
            pos_fit._fit(Z - tok_part, {"position": cov["position"]})
            pos_part = pos_fit._component(Z, {"position": cov["position"]})
            tok_fit = PerTokenMean(self.spec)
            tok_fit._fit(Z - pos_part, {"token": cov["token"]})
            tok_part = tok_fit._component(Z, {"token": cov["token"]})
        self.pos_, self.tok_ = pos_fit, tok_fit

    def _component(self, X, cov):
        return (self.grand_ + self.pos_._component(X, {"position": cov["position"]})
                + self.tok_._component(X, {"token": cov["token"]}))


def make_residualizer(spec: ResidualSpec | None = None, **params) -> Residualizer:
    """The residualizer for a spec (or for keyword parameters, e.g. method='regression', basis='poly')."""
    spec = spec or ResidualSpec(**params)
    return RESIDUALIZERS[spec.method](spec)
