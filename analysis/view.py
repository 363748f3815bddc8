"""One view: select tokens, fit the residualizer on a reference, project, measure what position is left."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from analysis import metrics as M
from analysis.project import ProjectionSpec, project
from analysis.residualize import ResidualSpec, Residualizer, make_residualizer
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
        return cls(residual=ResidualSpec(**d.pop("residual", {})),
                   projection=ProjectionSpec(**d.pop("projection", {})), **d)


@dataclass
class ViewResult:
    """coords[i] and residual[i] belong to plot token index[i] (sinks dropped when excluded).

    residual and residualizer are None for a result read back from a cache.
    """

    index: np.ndarray
    coords: np.ndarray
    residual: np.ndarray | None
    metrics: dict[str, Any]
    timings: dict[str, float]
    residualizer: Residualizer | None = None


def residualize(
    plot: TokenSet, spec: ViewSpec, reference: TokenSet | None = None
) -> tuple[np.ndarray, TokenSet, Residualizer]:
    """Drop sinks (if asked), fit the residualizer on `reference` (default: the kept plot tokens) and
    return (kept indices into plot, the kept tokens with residual vectors, the fitted residualizer)."""
    keep = ~find_sinks(plot.X, plot.position, spec.sink_z) if spec.exclude_sinks else np.ones(len(plot), bool)
    index = np.flatnonzero(keep)
    tokens = plot.subset(index)
    ref = tokens if reference is None else reference
    if reference is not None and spec.exclude_sinks:
        ref = ref.subset(~find_sinks(ref.X, ref.position, spec.sink_z))
    if len(tokens) < 3:
        raise ValueError(f"only {len(tokens)} tokens left to plot (after dropping attention sinks); pick more")
    if ref.dim != tokens.dim:
        raise ValueError(f"reference vectors have width {ref.dim}, plotted ones {tokens.dim}")
    residualizer = make_residualizer(spec.residual).fit(ref.X, ref.position)
    return index, tokens.with_X(residualizer.transform(tokens.X, tokens.position)), residualizer


def compute_view(plot: TokenSet, spec: ViewSpec | None = None, reference: TokenSet | None = None) -> ViewResult:
    """Residualize `plot` with a residualizer fitted on `reference` (default: on `plot` itself), project it,
    and measure it.

    Fitting on a larger reference (all tokens of the run, or another run) keeps content that only the
    plotted branches share from being taken for position.
    """
    spec = spec or ViewSpec()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    index, tokens, residualizer = residualize(plot, spec, reference)
    timings["residualize"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    coords = project(tokens.X, spec.projection)
    timings["project"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    metrics = measure(tokens, coords, spec) if spec.metrics else {}
    timings["metrics"] = time.perf_counter() - t2
    metrics["n_tokens"] = len(tokens)
    metrics["n_sinks_dropped"] = int(len(plot) - len(tokens))
    if hasattr(residualizer, "lam_"):
        metrics["shrink"] = float(residualizer.lam_)
    return ViewResult(index, coords, tokens.X, metrics, timings, residualizer)


def measure(tokens: TokenSet, coords: np.ndarray | None, spec: ViewSpec) -> dict[str, Any]:
    """Position left in `tokens.X` (and in its projection), branch/prompt separability, projection quality."""
    X = tokens.X
    space = X
    if spec.projection.metric == "cosine":
        space = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    several_prompts = len(np.unique(tokens.prompt)) > 1
    out: dict[str, Any] = {
        "r2_pos": M.r2_pos(X, tokens.position, groups=tokens.prompt if several_prompts else tokens.branch),
        "heldout_by": "prompt" if several_prompts else "branch",
    }
    several_branches = len(np.unique(tokens.branch)) > 1
    if several_branches:
        out["leak"] = M.knn_position_leak(space, tokens.position, tokens.branch, k=spec.k, n_queries=spec.n_queries)
    if several_branches and coords is not None:
        out["leak_2d"] = M.knn_position_leak(coords, tokens.position, tokens.branch, k=spec.k, n_queries=spec.n_queries)
    if several_prompts:
        # Sibling branches share their prompt and forks copy their parent's context, so other-branch
        # neighbours at nearby positions can be content; other-prompt neighbours cannot.
        out["leak_prompt"] = M.knn_position_leak(
            space, tokens.position, tokens.prompt, k=spec.k, n_queries=spec.n_queries)
    labels = {"branch": tokens.branch, **({"prompt": tokens.prompt} if several_prompts else {})}
    for name, lab in labels.items():
        out[f"purity_{name}"] = M.label_purity(space, tokens.position, lab, k=spec.k, window=spec.window)
        out[f"purity_{name}_pooled"] = M.label_purity(
            space, tokens.position, lab, k=spec.k, window=None, n_queries=spec.n_queries)
    if coords is not None:
        out["projection"] = M.trustworthiness(space, coords, k=spec.k)
    return out
