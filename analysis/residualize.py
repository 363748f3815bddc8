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

from dataclasses import dataclass
from typing import Any

import numpy as np

from analysis.basis import BASES, PositionBasis, fit_smooth
from analysis.engine.groups import blocks, group_sums
from analysis.nuisances import NUISANCES, Param, words

RESIDUALIZERS: dict[str, type[Residualizer]] = {}
BUILTIN_MODULES = (
    "analysis.estimators",
)  # register auto, position, token, linear_erase (they import this module)


def registry() -> dict[str, type[Residualizer]]:
    """RESIDUALIZERS with the built-in methods of other modules registered (imported on first use)."""
    import importlib

    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    return RESIDUALIZERS


def register(cls: type[Residualizer]) -> type[Residualizer]:
    """Make a residualizer class available by its `name`: specs, the app's method menu and controls, the
    report and the cache pick it up from RESIDUALIZERS, its settings from `cls.params`."""
    for nuisance in cls.removes:
        if nuisance not in NUISANCES:
            raise ValueError(f"{cls.__name__} removes {nuisance!r}, which is not a registered nuisance")
    RESIDUALIZERS[cls.name] = cls
    return cls


# Settings every method shares (spec fields); the method's own are declared in its `params`.
COMMON = (
    Param("center", True, "Centre", "Subtract the reference's mean first.", "bool", ui=False),
    Param("l2", False, "Unit rows", "Scale each latent to unit length first.", "bool", ui=False),
    Param(
        "standardize",
        False,
        "Standardize dimensions",
        "Divide each dimension by its spread on the reference (against a few rogue dimensions).",
        "bool",
    ),
    Param(
        "crossfit",
        True,
        "Cross-fit",
        "Methods that fit per fold: the estimate removed from a token never saw that token's prompt "
        "(its branch, with one prompt).",
        "bool",
    ),
    Param(
        "folds",
        5,
        "Folds",
        "Folds of prompts (branches, with one prompt) for the tests and cross-fits.",
        "int",
        2,
        20,
        ui=False,
    ),
    Param(
        "gate",
        True,
        "Remove only what is detected",
        "Off (Force removal): remove the estimate whole even when the test finds no component.",
        "bool",
    ),
    Param("alpha", 0.05, "Test level", "The detection tests' level.", "float", 0.001, 0.5, ui=False),
    Param(
        "n_perm",
        19,
        "Permutations",
        "Permutations behind each test's p-value (smallest p = 1 / (n + 1)).",
        "int",
        1,
        999,
        ui=False,
    ),
    Param(
        "within_branch",
        True,
        "Net of branch content",
        "Estimate the nuisance net of each branch's mean (its content).",
        "bool",
        ui=False,
    ),
)
_COMMON_NAMES = tuple(p.name for p in COMMON)


@dataclass(frozen=True, init=False)
class ResidualSpec:
    """Which residualizer, the settings every method shares, and the method's own declared parameters
    (`params`, a sorted tuple of (name, value); read them as attributes: spec.k). Hashable and
    serializable (cache keys).

    ResidualSpec(method="projection", k=3): keyword arguments other than the shared settings are the
    method's parameters and must be declared by it. `params=` carries another spec's values over (those
    the method does not declare are dropped, so replace(spec, method=...) works)."""

    method: str
    center: bool
    l2: bool
    standardize: bool
    crossfit: bool
    folds: int
    gate: bool
    alpha: float
    n_perm: int
    within_branch: bool
    params: tuple[tuple[str, Any], ...]

    def __init__(
        self,
        method: str = "auto",
        center: bool = True,
        l2: bool = False,
        standardize: bool = False,
        crossfit: bool = True,
        folds: int = 5,
        gate: bool = True,
        alpha: float = 0.05,
        n_perm: int = 19,
        within_branch: bool = True,
        params: tuple | dict = (),
        **method_params: Any,
    ):
        if method not in registry():
            raise ValueError(f"unknown residualizer {method!r}; choose one of {', '.join(RESIDUALIZERS)}")
        cls = RESIDUALIZERS[method]
        common = dict(
            center=center,
            l2=l2,
            standardize=standardize,
            crossfit=crossfit,
            folds=folds,
            gate=gate,
            alpha=alpha,
            n_perm=n_perm,
            within_branch=within_branch,
        )
        for p in COMMON:
            p.check(common[p.name], cls.label)
        declared = {p.name: p for p in cls.params}
        unknown = [k for k in method_params if k not in declared]
        if unknown:
            takes = ", ".join(declared) or "no parameters"
            raise ValueError(f"{cls.label}: no parameter {unknown[0]!r} (it takes {takes})")
        carried = {k: v for k, v in dict(params).items() if k in declared}
        values = {name: method_params.get(name, carried.get(name, p.default)) for name, p in declared.items()}
        for name, value in values.items():
            declared[name].check(value, cls.label)
        object.__setattr__(self, "method", method)
        for name, value in common.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "params", tuple(sorted(values.items())))
        cls.validate(self)

    def __getattr__(self, name: str) -> Any:
        for key, value in object.__getattribute__(self, "params"):
            if key == name:
                return value
        raise AttributeError(
            f"{type(self).__name__} of {object.__getattribute__(self, 'method')!r} has no {name!r}"
        )

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            **{n: getattr(self, n) for n in _COMMON_NAMES},
            "params": dict(self.params),
        }

    @classmethod
    def from_dict(cls, d: dict) -> ResidualSpec:
        d = dict(d)
        params = d.pop("params", {})
        method = d.pop("method", "auto")
        common = {k: d.pop(k) for k in list(d) if k in _COMMON_NAMES}
        return cls(method, **common, **params, **d)

    def with_method(self, method: str, **params: Any) -> ResidualSpec:
        """The same shared settings with another method (its parameters: these, else carried, else defaults)."""
        return ResidualSpec(
            method, **{n: getattr(self, n) for n in _COMMON_NAMES}, params=self.params, **params
        )

    def with_params(self, **params: Any) -> ResidualSpec:
        """The same spec with some of its method's parameters changed."""
        return self.with_method(self.method, **params)

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
    """Base, and the `none` method: scaling, then removal of the fitted component (none here).

    The contract of a residualizer, all on its class:
    - name, label (menus), help (what it does, and where it cannot reach exact subtraction);
    - removes: the nuisances (analysis.nuisances) it removes, each tested before removal; covariates:
      the per-token columns it reads (by default what it removes);
    - params: its own settings as Params (the sidebar, the report and the spec's checks use them);
    - means_of: the nuisance whose plain per-label means the method subtracts (the out-of-fold check of
      a joint estimator, and a projection's back-fit, use that method: means_method());
    - menu_order: where the method stands in the app's menu (lower first; ties in registration order;
      `none` always last); alternative: (method, button label, help) of a one-click switch the sidebar
      offers beside this method, or None;
    - fold_unit: what cross-fitting and the tests hold out ('prompt': prompts, or branches with one);
    - additive: component() estimates E[x | covariates] (so it can be shrunk) rather than a projection;
      sufficient: it fits from LabelStats of its one covariate (fit_stats), so folds fit by algebra;
    - hooks: validate(spec), tune(spec, ...) (data-driven parameters, e.g. a rank), reduce(spec, detected)
      (the method for the nuisances actually detected); a classmethod remove(plot, spec, reference,
      independent, seed, in_place) -> (residuals, RemovalReport), where defined, is the whole removal (by
      default analysis.crossfit's cross-fitted, tested and shrunk one).
    """

    name = "none"
    label = "none (centre only)"
    short = ""  # the name in tables and titles (describe); default: the label
    help = "No removal: the latents centred (and scaled, if asked), as the raw panel shows them."
    removes: tuple[str, ...] = ()
    covariates: tuple[str, ...] = ()
    params: tuple[Param, ...] = ()
    menu_order = 100
    alternative: tuple[str, str, str] | None = None
    means_of: str | None = None  # the nuisance whose plain per-label means this method is (tests use it)
    fold_unit = "prompt"
    additive = True
    sufficient = False

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "covariates" not in cls.__dict__:
            cls.covariates = tuple(cls.removes)

    def __init__(self, spec: ResidualSpec):
        self.spec = spec
        self.scaler = Scaler(spec.center, spec.l2, spec.standardize)

    @classmethod
    def nuisance_words(cls) -> str:
        return words(cls.removes)

    @classmethod
    def describe(cls, spec: ResidualSpec) -> str:
        return "raw" if cls.name == "none" else (cls.short or cls.label)

    @classmethod
    def validate(cls, spec: ResidualSpec) -> None:
        """Checks across parameters (each one alone is checked by its Param)."""

    @classmethod
    def tune(cls, spec: ResidualSpec, Zt: np.ndarray, ref, fold: np.ndarray | None, report) -> ResidualSpec:
        """The spec with its data-driven parameters chosen (Zt: the reference on the tests' projection)."""
        return spec

    @classmethod
    def reduce(cls, spec: ResidualSpec, detected: list[str]) -> ResidualSpec:
        """The spec to run when only `detected` of the nuisances it removes were found (at least one)."""
        return spec

    def fit(
        self,
        X: np.ndarray,
        position: np.ndarray | None = None,
        token: np.ndarray | None = None,
        branch: np.ndarray | None = None,
        scale: bool = True,
        **columns: np.ndarray,
    ) -> Residualizer:
        """Fit on X (n, d); with scale=False, X is taken as already scaled (cross-fitting scales once).

        With `branch` (and spec.within_branch), the nuisance is estimated net of each branch's mean: the
        two-way model x = a_branch + m(covariates) + e, by backfitting. Without it, a per-position mean
        pooled over a few branches is partly their content (branches end at different lengths, so the
        mix of content changes with position), and subtracting it would add that content back, as a
        function of position, to every other token.
        """
        X, cov = self._check(X, dict(position=position, token=token, **columns))
        if len(X) == 0:
            raise ValueError("cannot fit a residualizer on zero tokens")
        if scale:
            self.scaler.fit(X)
            X = self.scaler.transform(X)
        if branch is not None and self.spec.within_branch and self.covariates and len(np.unique(branch)) > 1:
            X = X - branch_offsets(self, X, cov, np.asarray(branch))
        self.fit_cov(X, cov)
        return self

    def component(
        self,
        X: np.ndarray,
        position: np.ndarray | None = None,
        token: np.ndarray | None = None,
        **columns: np.ndarray,
    ) -> np.ndarray:
        """(n, d): what this method removes from already scaled X."""
        X, cov = self._check(X, dict(position=position, token=token, **columns))
        return self.component_of(X, cov)

    def transform(
        self,
        X: np.ndarray,
        position: np.ndarray | None = None,
        token: np.ndarray | None = None,
        weight: float = 1.0,
        **columns: np.ndarray,
    ) -> np.ndarray:
        """Scaled X minus `weight` times the fitted component."""
        X, cov = self._check(X, dict(position=position, token=token, **columns))
        Z = self.scaler.transform(X)
        if not self.covariates or weight == 0:
            return Z
        return (Z - weight * self.component_of(Z, cov)).astype(np.float32)

    def fit_transform(
        self,
        X: np.ndarray,
        position: np.ndarray | None = None,
        token: np.ndarray | None = None,
        **columns: np.ndarray,
    ) -> np.ndarray:
        return self.fit(X, position, token, **columns).transform(X, position, token, **columns)

    def fit_cov(self, X: np.ndarray, cov: dict[str, np.ndarray]) -> None:
        """Fit on scaled X (n, d) with the covariates by name."""

    def component_of(self, X: np.ndarray | None, cov: dict[str, np.ndarray]) -> np.ndarray:
        """(n, d) the fitted component at the covariates `cov` (X: the scaled rows, for projections)."""
        return np.zeros_like(X)

    def _check(self, X, given: dict) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2:
            raise ValueError(f"need X of shape (n, d), got {X.shape}")
        cov = {}
        for name in self.covariates:
            if given.get(name) is None:
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


def means_method(nuisance: str) -> str:
    """The registered method that subtracts plain per-label means of `nuisance` (its class's means_of)."""
    found = [name for name, cls in RESIDUALIZERS.items() if cls.means_of == nuisance]
    if not found:
        raise ValueError(f"no registered method subtracts per-label means of {nuisance!r}")
    return found[0]


def means_model(spec: ResidualSpec, nuisance: str) -> Residualizer:
    """An unfitted instance of means_method(nuisance) with spec's other settings."""
    return make_residualizer(spec.with_method(means_method(nuisance)))


def branch_offsets(
    model: Residualizer, X: np.ndarray, cov: dict[str, np.ndarray], branch: np.ndarray, sweeps: int = 2
) -> np.ndarray:
    """(n, d) per-token offset a_branch of the backfitted model x = a_branch + m(cov) + e, with the a's
    weighted mean zero (so the nuisance keeps the overall level). A projection backfits with
    per-position means, then finds its directions in what is left."""
    helper = model if model.additive else means_model(model.spec, "position")
    _, inverse, counts = np.unique(branch, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    offsets = np.zeros_like(X)
    for _ in range(sweeps):
        helper.fit_cov(X - offsets, cov)
        _, sums, _ = group_sums(X - helper.component_of(X, cov), branch)
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


SMOOTH_PARAMS = (
    Param(
        "basis",
        "spline",
        "Smooth basis",
        "The smooth curve of position: B-spline, Legendre polynomial or sinusoids.",
        "choice",
        choices=BASES,
    ),
    Param("n_knots", 12, "Spline knots", "Knots of the spline basis (fewer: smoother).", "int", 2, 40),
    Param("degree", 3, "Degree", "Degree of the spline or polynomial basis.", "int", 1, 6),
    Param("n_freq", 4, "Frequencies", "Sine/cosine pairs of the sinusoid basis.", "int", 1, 16, ui=False),
)
SHRINK = Param(
    "shrink",
    None,
    "Shrink (pseudo-count)",
    "Group means are pulled toward their prior (the smooth fit, or the grand mean) by this many "
    "tokens' worth; estimated from the data (empirical Bayes) when automatic.",
    "float",
    0.0,
    1e6,
    auto="estimated from the data",
)


def smooth_basis(spec: ResidualSpec) -> PositionBasis:
    return PositionBasis(spec.basis, spec.degree, spec.n_knots, spec.n_freq)


class _SmoothChecked(Residualizer):
    @classmethod
    def validate(cls, spec: ResidualSpec) -> None:
        smooth_basis(spec)  # the basis settings together


@register
class PerPositionMean(_SmoothChecked):
    """x - mu_p, with mu_p shrunk toward a smooth fit f(p) where few tokens share p (GroupMeans).
    Positions never seen at fit time get f(p)."""

    name = "per_position"
    label = "position: per-position mean"
    help = (
        "Subtracts the mean latent at each position (shrunk toward a smooth curve where few tokens share "
        "a position), cross-fitted over prompts. Cannot reach exact subtraction where the tokens at a "
        "position vary a lot (token identity, content): that spread is noise shared by every token at the "
        "position, and subtracting it is itself a position signal. Use `position` for the joint estimate."
    )
    removes = ("position",)
    params = (*SMOOTH_PARAMS, SHRINK)
    means_of = "position"
    sufficient = True

    @classmethod
    def describe(cls, spec: ResidualSpec) -> str:
        return "per-position mean"

    def fit_cov(self, X, cov):
        self.fit_stats(LabelStats.of(X, cov["position"]))

    def fit_stats(self, stats: LabelStats) -> PerPositionMean:
        self.smooth_ = _Smooth(self.spec, stats)
        self.means_ = GroupMeans().fit(stats, self.smooth_(stats.labels), self.spec.shrink)
        self.lam_ = self.means_.lam_
        return self

    def component_of(self, X, cov):
        return self.means_.lookup(cov["position"], self.smooth_)


@register
class PositionRegression(_SmoothChecked):
    """x - f(p) with f a least-squares fit on a smooth basis of position (spline, polynomial or sinusoid)."""

    name = "regression"
    label = "position: regression"
    help = (
        "Subtracts a smooth curve of position (least squares on a spline, polynomial or sinusoid basis). "
        "Cannot reach exact subtraction of a position table that is not smooth (learned position "
        "embeddings often are not): the part between the curve and the table stays."
    )
    removes = ("position",)
    params = SMOOTH_PARAMS
    sufficient = True

    @classmethod
    def describe(cls, spec: ResidualSpec) -> str:
        return f"regression ({spec.basis})"

    def fit_cov(self, X, cov):
        self.fit_stats(LabelStats.of(X, cov["position"]))

    def fit_stats(self, stats: LabelStats) -> PositionRegression:
        self.smooth_ = _Smooth(self.spec, stats)
        return self

    def component_of(self, X, cov):
        return self.smooth_(cov["position"])


@register
class PositionProjection(Residualizer):
    """Project out the k directions that position explains most: the top principal axes of the
    count-weighted per-position means. Removes everything along them, content included."""

    name = "projection"
    label = "position: project out top directions"
    help = (
        "Projects out the k directions along which the per-position means vary most, content along them "
        "included. Cannot reach exact subtraction: position outside those k directions stays, and the "
        "content along them goes."
    )
    removes = ("position",)
    params = (
        Param(
            "k",
            None,
            "Directions removed",
            "How many directions to project out; chosen where the "
            "out-of-fold R2 of rank-k per-position means stops rising when automatic.",
            "int",
            1,
            64,
            auto="chosen from the data",
        ),
    )
    additive = False
    sufficient = True

    @classmethod
    def describe(cls, spec: ResidualSpec) -> str:
        return f"projection (k={spec.k})" if spec.k is not None else "projection (k from data)"

    @classmethod
    def tune(cls, spec, Zt, ref, fold, report):
        from analysis.rank import choose_rank

        if spec.k is None:
            spec = spec.with_params(k=choose_rank(Zt, ref, fold, report))
        report.k = spec.k
        return spec

    def fit_cov(self, X, cov):
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

    def component_of(self, X, cov):
        return ((X - self.center_) @ self.components_.T) @ self.components_


@register
class PerTokenMean(Residualizer):
    """x - nu_w: the mean latent of the current token id w, shrunk toward the grand mean for rare tokens.
    Shows branches by context rather than by which token sits there."""

    name = "per_token"
    label = "token identity: per-token mean"
    help = (
        "Subtracts the mean latent of each token id (shrunk toward the grand mean for rare ids), "
        "cross-fitted: ids never seen in the other folds are left as they are."
    )
    removes = ("token",)
    params = (SHRINK,)
    sufficient = True
    means_of = "token"

    @classmethod
    def describe(cls, spec: ResidualSpec) -> str:
        return "per-token mean"

    def fit_cov(self, X, cov):
        self.fit_stats(LabelStats.of(X, cov["token"]))

    def fit_stats(self, stats: LabelStats) -> PerTokenMean:
        self.grand_ = (stats.sums.sum(axis=0) / stats.n).astype(np.float32)
        self.means_ = GroupMeans().fit(stats, np.tile(self.grand_, (len(stats.labels), 1)), self.spec.shrink)
        self.lam_ = self.means_.lam_
        return self

    def component_of(self, X, cov):
        return self.means_.lookup(cov["token"], lambda unseen: self.grand_)


@register
class PositionAndToken(_SmoothChecked):
    """x - (grand + a_p + b_w): an additive two-way fit of position and token identity (backfitting:
    position effects smoothed as in per_position, token effects shrunk as in per_token)."""

    name = "position_token"
    label = "position + token identity (backfitted means)"
    help = (
        "An additive fit of per-position and per-token means by backfitting, both subtracted; where the "
        "test finds only one of them, that one alone is removed."
    )
    removes = ("position", "token")
    params = (*SMOOTH_PARAMS, SHRINK)
    sweeps = 4

    @classmethod
    def describe(cls, spec: ResidualSpec) -> str:
        return "position + token"

    @classmethod
    def reduce(cls, spec, detected):
        return spec.with_method("per_position" if detected == ["position"] else "per_token")

    def fit_cov(self, X, cov):
        self.grand_ = X.mean(axis=0)
        Z = X - self.grand_
        tok_part = np.zeros_like(Z)
        for _ in range(self.sweeps):
            pos_fit = PerPositionMean(self.spec.with_method("per_position"))
            pos_fit.fit_cov(Z - tok_part, {"position": cov["position"]})
            pos_part = pos_fit.component_of(Z, {"position": cov["position"]})
            tok_fit = PerTokenMean(self.spec.with_method("per_token"))
            tok_fit.fit_cov(Z - pos_part, {"token": cov["token"]})
            tok_part = tok_fit.component_of(Z, {"token": cov["token"]})
        self.pos_, self.tok_ = pos_fit, tok_fit

    def component_of(self, X, cov):
        return (
            self.grand_
            + self.pos_.component_of(X, {"position": cov["position"]})
            + self.tok_.component_of(X, {"token": cov["token"]})
        )


def make_residualizer(spec: ResidualSpec | None = None, **params) -> Residualizer:
    """The residualizer for a spec (or for keyword parameters, e.g. method='regression', basis='poly')."""
    spec = spec or ResidualSpec(**params)
    return RESIDUALIZERS[spec.method](spec)
