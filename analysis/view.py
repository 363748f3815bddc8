"""One view: select tokens, fit the residualizer on a reference, project, measure what position is left."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from analysis.crossfit import RemovalReport, fit_remove
from analysis.engine import neighbours
from analysis.engine.groups import blocks, row_norms
from analysis.measures import LAYER_STATS, MEASURES, Context
from analysis.project import ProjectionSpec, project, unit_pca_fit
from analysis.residualize import ResidualSpec
from analysis.tokens import TokenSet, find_sinks


@dataclass(frozen=True)
class ViewSpec:
    """Everything that decides a view's numbers (used as a cache key)."""

    residual: ResidualSpec = field(default_factory=ResidualSpec)
    projection: ProjectionSpec = field(default_factory=ProjectionSpec)
    exclude_sinks: bool = True
    sink_z: float = 6.0
    k: int = 10  # neighbours for the metrics
    window: int = 2  # matched positions for label purity: |t_j - t_i| <= window
    n_queries: int = 1000  # tokens sampled as queries by the kNN position-leak metrics
    metrics: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViewSpec:
        d = dict(d)
        return cls(
            residual=ResidualSpec(**d.pop("residual", {})),
            projection=ProjectionSpec(**d.pop("projection", {})),
            **d,
        )


@dataclass
class ViewResult:
    """coords[i] and residual[i] belong to plot token index[i] (sinks dropped when excluded).

    residual and removal are None for a result read back from a cache (metrics["removal"] keeps the report).
    """

    index: np.ndarray
    coords: np.ndarray
    residual: np.ndarray | None
    metrics: dict[str, Any]
    timings: dict[str, float]
    removal: RemovalReport | None = None


def residualize(
    plot: TokenSet,
    spec: ViewSpec,
    reference: TokenSet | None = None,
    independent: bool = False,
    in_place: bool = False,
) -> tuple[np.ndarray, TokenSet, RemovalReport]:
    """Drop sinks (if asked), estimate the nuisance on `reference` (default: the kept plot tokens),
    cross-fitted, tested and shrunk (analysis.crossfit), and return (kept indices into plot, the kept
    tokens with residual vectors, the removal report). `independent`: the reference is another run.
    in_place: plot.X (float32, writeable) becomes the buffer of the residuals (no copy of the vectors;
    the caller must not read plot.X afterwards)."""
    keep = (
        ~find_sinks(plot.X, plot.position, spec.sink_z, token_id=plot.extra.get("token_id"))
        if spec.exclude_sinks
        else np.ones(len(plot), bool)
    )
    index = np.flatnonzero(keep)
    tokens = (
        _kept(plot, index)
        if in_place and plot.X.flags.writeable and plot.X.flags.c_contiguous
        else plot.subset(index)
    )  # either way the vectors are ours to overwrite
    ref = tokens if reference is None else reference
    if reference is not None and spec.exclude_sinks:
        ref = ref.subset(~find_sinks(ref.X, ref.position, spec.sink_z, token_id=ref.extra.get("token_id")))
    if len(tokens) < 3:
        raise ValueError(
            f"only {len(tokens)} tokens left to plot (after dropping attention sinks); pick more"
        )
    if ref.dim != tokens.dim:
        raise ValueError(f"reference vectors have width {ref.dim}, plotted ones {tokens.dim}")
    residual, report = fit_remove(
        tokens, spec.residual, ref if ref is not tokens else None, independent, in_place=True
    )
    return index, tokens.with_X(residual), report


def _kept(plot: TokenSet, index: np.ndarray) -> TokenSet:
    """plot's rows at the sorted `index`, their vectors moved to the front of plot.X in place (a block
    at a time: row index[i] >= i, so no row is overwritten before it is read)."""
    X = plot.X
    if len(index) < len(X):
        for rows in blocks(len(index)):
            X[rows] = X[index[rows]]
        X = X[: len(index)]
    return TokenSet(
        X,
        plot.position[index],
        plot.branch[index],
        plot.prompt[index],
        {k: np.asarray(v)[index] for k, v in plot.extra.items()},
    )


def compute_view(
    plot: TokenSet,
    spec: ViewSpec | None = None,
    reference: TokenSet | None = None,
    independent: bool = False,
    in_place: bool = False,
    raw: Callable[[], ViewResult] | None = None,
) -> ViewResult:
    """Residualize `plot` with a residualizer fitted on `reference` (default: on `plot` itself), project it,
    and measure it.

    Fitting on a larger reference (all tokens of the run, or another run) keeps content that only the
    plotted branches share from being taken for position. in_place: plot.X is overwritten with the
    residuals (the result's `residual` is a view of it), saving a copy of the vectors. raw: gives the raw
    view of the same tokens (spec with method 'none', the same scaling, projection and measures), asked
    for only where the removal leaves the tokens raw: its layout and measures are this view's then.
    """
    spec = spec or ViewSpec()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    index, tokens, removal = residualize(plot, spec, reference, independent, in_place)
    timings["residualize"] = time.perf_counter() - t0
    if removal.raw and raw is not None:
        raw_view = raw()
        if np.array_equal(raw_view.index, index):  # the same tokens kept (it always is: one sink rule)
            return same_as_raw(raw_view, tokens, removal, timings)

    t1 = time.perf_counter()
    pca = _shared_pca(tokens.X, spec)
    coords = project(tokens.X, spec.projection, pca)
    timings["project"] = time.perf_counter() - t1

    stats: dict[str, Any] = {}
    if spec.metrics and spec.residual.method == "none":  # before measure() scales the rows in place
        t3 = time.perf_counter()
        stats = layer_stats(tokens)
        timings["layer_stats"] = time.perf_counter() - t3
    t2 = time.perf_counter()
    metrics = (
        measure(tokens, coords, spec, in_place=True, pca=pca) if spec.metrics else {}
    )  # residuals are ours
    timings["metrics"] = time.perf_counter() - t2
    metrics["n_tokens"] = len(tokens)
    metrics["n_sinks_dropped"] = int(len(plot) - len(tokens))
    metrics["removal"] = removal.to_dict()
    metrics.update(stats)
    return ViewResult(index, coords, tokens.X, metrics, timings, removal)


def same_as_raw(
    raw: ViewResult, tokens: TokenSet, removal: RemovalReport, timings: dict[str, float]
) -> ViewResult:
    """The view of a removal that left the tokens raw: the raw view's layout and measures (the same
    vectors, projection and measures give the same numbers; 0.6-0.8 s of a demo layer's pair of views),
    its own removal report, without the raw view's layer statistics."""
    metrics = {k: v for k, v in raw.metrics.items() if k not in LAYER_STATS}
    metrics["removal"] = removal.to_dict()
    return ViewResult(raw.index, raw.coords, tokens.X, metrics, timings | {"same_as_raw": 1.0}, removal)


def _shared_pca(X: np.ndarray, spec: ViewSpec) -> tuple[np.ndarray, np.ndarray] | None:
    """One PCA for UMAP's pre-reduction and the neighbour measures' index (neighbours.Cells), where the
    two would fit the very same one: the same seeded sample of the same unit rows (cosine metric, seed
    0), above EXACT_QUERY_MAX tokens (below, no index is built). Its width is the wider of the two; each
    uses its own leading axes, equal to the fit it would have made. None where they differ."""
    p = spec.projection
    if not (
        spec.metrics
        and p.method == "umap"
        and p.metric == "cosine"
        and (p.seed or 0) == 0
        and len(X) > neighbours.EXACT_QUERY_MAX
    ):
        return None
    return unit_pca_fit(X, max(p.pca_dims, neighbours.REDUCED_DIMS), p)


def layer_stats(tokens: TokenSet) -> dict[str, Any]:
    """What a layer holds before any removal, beside the measures: every registered LayerStat
    (analysis.measures) that applies, by its key."""
    out: dict[str, Any] = {}
    for key, stat in LAYER_STATS.items():
        result = stat.compute(tokens)
        if result is not None:
            out[key] = result
    return out


def measure(
    tokens: TokenSet,
    coords: np.ndarray | None,
    spec: ViewSpec,
    in_place: bool = False,
    pca: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Every registered measure (analysis.measures) that applies: position left in `tokens.X` and in its
    projection, token identity, branch/prompt separability, projection quality.

    With a cosine projection the neighbour measures search unit vectors: a unit copy of tokens.X, or with
    in_place tokens.X itself, scaled to unit rows after the measures that read the vectors themselves
    and scaled back at the end (each value within a float32 rounding of what it was). pca: _shared_pca's
    fit, given to the neighbour index of the unit vectors (cosine only)."""
    X = tokens.X
    norms = None
    early: dict[str, Any] = {}
    if spec.projection.metric == "cosine" and in_place:
        ctx = Context(tokens, X, coords, spec.k, spec.window, spec.n_queries)
        early = {key: m.compute(ctx) for key, m in MEASURES.items() if m.reads_vectors}
        norms = row_norms(X)  # (n, 1)
        for rows in blocks(len(X)):
            X[rows] /= norms[rows]
        space = X
    elif spec.projection.metric == "cosine":
        space = np.empty_like(X)
        norms_ = row_norms(X)  # (n, 1)
        for rows in blocks(len(X)):
            np.divide(X[rows], norms_[rows], out=space[rows])
    else:
        space = X
    workspace = neighbours.Workspace(space, pca if spec.projection.metric == "cosine" else None)
    try:
        ctx = Context(tokens, space, coords, spec.k, spec.window, spec.n_queries, workspace)
        out: dict[str, Any] = {
            "heldout_by": ctx.unit_name,
            "band_over": ctx.unit_name,
            "band_units": int(len(np.unique(ctx.units))),
        }
        for key, m in MEASURES.items():
            value = early[key] if key in early else m.compute(ctx)
            if value is not None:
                out[key] = value
    finally:
        if norms is not None:
            for rows in blocks(len(X)):
                X[rows] *= norms[rows]
    return out
