"""One view: select tokens, fit the residualizer on a reference, project, measure what position is left."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from analysis import metrics as M
from analysis import probe as P
from analysis.project import ProjectionSpec, project
from analysis.crossfit import RemovalReport, fit_remove
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
        return cls(residual=ResidualSpec(**d.pop("residual", {})),
                   projection=ProjectionSpec(**d.pop("projection", {})), **d)


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
    plot: TokenSet, spec: ViewSpec, reference: TokenSet | None = None, independent: bool = False,
) -> tuple[np.ndarray, TokenSet, RemovalReport]:
    """Drop sinks (if asked), estimate the nuisance on `reference` (default: the kept plot tokens),
    cross-fitted, tested and shrunk (analysis.crossfit), and return (kept indices into plot, the kept
    tokens with residual vectors, the removal report). `independent`: the reference is another run."""
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
    residual, report = fit_remove(tokens, spec.residual, ref, independent)
    return index, tokens.with_X(residual), report


def compute_view(plot: TokenSet, spec: ViewSpec | None = None, reference: TokenSet | None = None,
                 independent: bool = False) -> ViewResult:
    """Residualize `plot` with a residualizer fitted on `reference` (default: on `plot` itself), project it,
    and measure it.

    Fitting on a larger reference (all tokens of the run, or another run) keeps content that only the
    plotted branches share from being taken for position.
    """
    spec = spec or ViewSpec()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    index, tokens, removal = residualize(plot, spec, reference, independent)
    timings["residualize"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    coords = project(tokens.X, spec.projection)
    timings["project"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    metrics = measure(tokens, coords, spec) if spec.metrics else {}
    timings["metrics"] = time.perf_counter() - t2
    metrics["n_tokens"] = len(tokens)
    metrics["n_sinks_dropped"] = int(len(plot) - len(tokens))
    metrics["removal"] = removal.to_dict()
    if spec.metrics and spec.residual.method == "none":
        t3 = time.perf_counter()
        metrics.update(layer_stats(tokens))
        timings["layer_stats"] = time.perf_counter() - t3
    return ViewResult(index, coords, tokens.X, metrics, timings, removal)


def layer_stats(tokens: TokenSet) -> dict[str, Any]:
    """What a layer holds before any removal, beside R2_pos: the prompt-held-out linear probe of position
    ("decodable") and the share of each top principal component that position explains ("large")."""
    out: dict[str, Any] = {}
    groups = tokens.prompt if len(np.unique(tokens.prompt)) > 1 else tokens.branch
    if len(np.unique(groups)) >= 2 and len(tokens) >= 20:
        out["probe"] = P.position_probe(tokens.X, tokens.position, groups, n_folds=min(5, len(np.unique(groups))))
        out["pcs"] = P.pc_position_share(tokens.X, tokens.position, n_components=min(5, tokens.dim),
                                         groups=tokens.branch)
    return out


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
        # 1-NN accuracy at matched positions: uncapped (k=10 purity of a branch with one token per
        # position cannot pass 2*window/k), and it can fall when a removal takes content away.
        out[f"nn_{name}"] = M.label_purity(space, tokens.position, lab, k=1, window=spec.window)
        out[f"purity_{name}"] = M.label_purity(space, tokens.position, lab, k=spec.k, window=spec.window)
        out[f"purity_{name}_pooled"] = M.label_purity(
            space, tokens.position, lab, k=spec.k, window=None, n_queries=spec.n_queries)
    if coords is not None:
        out["projection"] = M.trustworthiness(space, coords, k=spec.k)
    if several_branches and "token_id" in tokens.extra:
        out["token_leak"] = P.token_identity_leak(space, tokens.extra["token_id"], tokens.branch, k=spec.k,
                                                  n_queries=spec.n_queries)
    return out
