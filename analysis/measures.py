"""The metrics of a view, registered in one place: how each is computed, shown and guarded.

A new metric is one `Measure` added with `register`: analysis.view.measure computes it, the dashboard's
metrics table and the per-layer table (app and CLI) show it (label, value field, chance, declared extras),
the verdict and analysis.guard read it as an `Estimate`. A number about the layer before any removal is
one `LayerStat` added with `register_layer_stat`: computed on the raw view, shown in the per-layer table.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from analysis import metrics as M
from analysis import probe as P
from analysis.engine.neighbours import Workspace
from analysis.stats import Z, half_width
from analysis.tokens import TokenSet


@dataclass(frozen=True)
class Context:
    """What a measure may read: the tokens (vectors in `tokens.X`), the space the neighbours live in
    (cosine-normalized when the projection is) and its workspace (one index for every search), the 2-D
    coordinates (or None) and the view's settings."""

    tokens: TokenSet
    space: np.ndarray
    coords: np.ndarray | None
    k: int
    window: int
    n_queries: int
    workspace: Workspace | None = None  # of `space`

    # cached: every measure asks (a frozen dataclass keeps them in its __dict__)
    @cached_property
    def several_branches(self) -> bool:
        return len(np.unique(self.tokens.branch)) > 1

    @cached_property
    def several_prompts(self) -> bool:
        return len(np.unique(self.tokens.prompt)) > 1

    @property
    def units(self) -> np.ndarray:
        """What a band resamples (analysis.resample): prompts, or a lone prompt's branches."""
        return self.tokens.prompt if self.several_prompts else self.tokens.branch

    @property
    def unit_name(self) -> str:
        return "prompt" if self.several_prompts else "branch"


NAN = float("nan")


@dataclass(frozen=True)
class Estimate:
    """One measure's number as every reader takes it (the metrics table, the per-layer table and its
    charts, the CLI report, the guard): the value with its 95% band, the chance level with the interval a
    value at chance falls in, which way means more of the nuisance, and what it means. NaN where the
    measure gave nothing."""

    key: str
    label: str
    value: float
    lo: float
    hi: float
    band: float  # half-width of [lo, hi] (or Z sds where the measure gave no interval)
    chance: float
    chance_lo: float
    chance_hi: float
    chance_band: float  # half-width of [chance_lo, chance_hi] (NaN where the level is fixed)
    better: str  # 'chance': nearer chance is less of the nuisance; 'higher', 'lower'; '': descriptive
    signed: bool
    help: str
    extra: Mapping[str, float] = field(default_factory=dict, hash=False)  # the declared extras (Extra)
    sd: float = NAN  # the value's standard error (the guard's band of a change: Z x hypot of two)


@dataclass(frozen=True)
class Extra:
    """A further number a measure's result carries beside its value (R2_pos: adjusted, held-out, the
    variance it is a share of), declared so every reader finds it by name in Estimate.extra.

    label: its column's header in the per-layer table ('' = none; read by the verdict only); short: the
    CLI report's header (None = the JSON and the app only); row: (key, label) of its own line in the
    metrics table, with chance 0 (None = no line)."""

    field: str
    label: str = ""
    help: str = ""
    short: str | None = None
    signed: bool = False
    row: tuple[str, str] | None = None


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else NAN


@dataclass(frozen=True)
class Measure:
    """key: name in a view's metrics; compute: Context -> dict (or None when it does not apply).

    field: the dict's value shown; chance: how the table reads chance ('field' = the dict's `chance`,
    'leak' = 0 with the shuffles' band `chance_hi`, 'zero', 'half'); signed: shown with a sign; guard:
    what the guard checks ('leak:position', 'leak:token', 'separability', or None); shown: in the table;
    help: what high, low and (for signed ones) negative values mean, shown beside the number;
    reads_vectors: compute reads c.tokens.X (the residuals); every other measure reads c.space only;
    layout: it reads the 2-D layout (c.coords), so it has no column in the per-layer table
    (views.layer_table)."""

    key: str
    label: str
    compute: Callable[[Context], dict[str, Any] | None]
    field: str
    chance: str = "field"
    signed: bool = False
    guard: str | None = None
    shown: bool = True
    help: str = ""
    reads_vectors: bool = False  # reads tokens.X itself, not the neighbour space (computed before it is made)
    layout: bool = (
        False  # reads the 2-D layout: a number about the picture, not the layer (no per-layer column)
    )
    better: str = "chance"  # which way means less of the nuisance (Estimate.better)
    extras: tuple[Extra, ...] = ()

    def estimate(self, result: dict[str, Any] | None) -> Estimate:
        """The measure's result read as an Estimate. Chance: 'field' its own level with the interval its
        nulls gave (chance_lo, chance_hi; else +- Z of their sd) and a band of Z sds (else the interval's
        half-width); 'leak' 0 with the shuffles' band; 'zero' and 'half' fixed levels (no interval)."""
        r = result or {}
        value, lo, hi = _num(r.get(self.field)), _num(r.get("lo")), _num(r.get("hi"))
        if not r:
            chance = chance_lo = chance_hi = NAN
        elif self.chance == "leak":
            half = _num(r.get("chance_hi"))
            chance, chance_lo, chance_hi = 0.0, -half, half
        elif self.chance == "field":
            chance, sd = _num(r.get("chance")), _num(r.get("chance_sd"))
            chance_lo = _num(r["chance_lo"]) if "chance_lo" in r else chance - Z * sd
            chance_hi = _num(r["chance_hi"]) if "chance_hi" in r else chance + Z * sd
        else:
            chance, chance_lo, chance_hi = (0.5 if self.chance == "half" else 0.0), NAN, NAN
        return Estimate(
            self.key,
            self.label,
            value,
            lo,
            hi,
            half_width(r) if r else NAN,
            chance,
            chance_lo,
            chance_hi,
            Z * sd if self.chance == "field" and "chance_sd" in r else (chance_hi - chance_lo) / 2,
            self.better,
            self.signed,
            self.help,
            {x.field: _num(r.get(x.field)) for x in self.extras},
            _num(r.get("sd")),
        )


MEASURES: dict[str, Measure] = {}


def estimate_in(metrics: dict[str, Any], key: str) -> Estimate:
    """The registered measure `key` of a view's metrics as an Estimate (NaN where the view lacks it)."""
    return MEASURES[key].estimate(metrics.get(key))


def register(measure: Measure) -> Measure:
    MEASURES[measure.key] = measure
    return measure


def _leak(groups: str, space: str = "space") -> Callable[[Context], dict | None]:
    def compute(c: Context) -> dict | None:
        if groups == "prompt" and not c.several_prompts or not c.several_branches:
            return None
        X = c.coords if space == "coords" else c.space
        if X is None:
            return None
        return M.knn_position_leak(
            X,
            c.tokens.position,
            getattr(c.tokens, groups),
            k=c.k,
            n_queries=c.n_queries,
            units=c.units,
            workspace=c.workspace if space == "space" else None,
        )

    return compute


def _purity(label: str, k: int | None, window: bool) -> Callable[[Context], dict | None]:
    def compute(c: Context) -> dict | None:
        if label == "prompt" and not c.several_prompts:
            return None
        return M.label_purity(
            c.space,
            c.tokens.position,
            getattr(c.tokens, label),
            k=k or c.k,
            window=c.window if window else None,
            n_queries=c.n_queries,
            units=c.units,
            workspace=c.workspace,
        )

    return compute


HELD_OUT_HELP = (
    "R2 of each token predicted by the other prompts' mean at its position, against their overall "
    "mean: 0 = position carries nothing that holds across prompts; negative = per-position means "
    "fit only noise or content."
)


def _r2(c: Context) -> dict:
    return M.r2_pos(c.tokens.X, c.tokens.position, groups=c.units, within=c.tokens.branch, units=c.units)


def _token_leak(c: Context) -> dict | None:
    if not c.several_branches or "token_id" not in c.tokens.extra:
        return None
    return P.token_identity_leak(
        c.space,
        c.tokens.extra["token_id"],
        c.tokens.branch,
        k=c.k,
        n_queries=c.n_queries,
        units=c.units,
        workspace=c.workspace,
    )


def _probe(c: Context) -> dict | None:
    n_units = len(np.unique(c.units))
    if n_units < 2 or len(c.tokens) < 20:
        return None
    return P.position_probe(c.tokens.X, c.tokens.position, c.units, n_folds=min(5, n_units))


def _trust(c: Context) -> dict | None:
    return None if c.coords is None else M.trustworthiness(c.space, c.coords, k=c.k)


register(
    Measure(
        "r2_pos",
        "R2_pos (variance explained by position)",
        _r2,
        "r2",
        reads_vectors=True,
        extras=(
            Extra(
                "adjusted",
                "R2_pos adjusted",
                "R2_pos adjusted for the number of positions (~0 at chance)",
                "adj",
            ),
            Extra(
                "heldout",
                "R2_pos held-out",
                HELD_OUT_HELP,
                "held-out",
                True,
                ("r2_heldout", "R2_pos held-out (other prompts' means)"),
            ),
            Extra("total_var", help="the latents' total variance (per token, summed over dimensions)"),
        ),
        help="Share of the latents' variance that per-position means explain. Chance: the same with positions shuffled within each branch (more positions than tokens per position inflate it). High: position is a large part of the geometry. Near chance: position adds little variance, though it may still be decodable (see the layer's probe).",
    )
)
register(
    Measure(
        "leak",
        "kNN position leak, full space",
        _leak("branch"),
        "leak",
        "leak",
        True,
        "leak:position",
        help="Do a token's nearest neighbours from other branches sit at its position? 0: no more than chance (positions shuffled within branches); 1: always the same position; negative: neighbours farther apart in position than chance, which after a removal means it pushed tokens at the same position apart.",
    )
)
register(
    Measure(
        "leak_2d",
        "kNN position leak, 2-D",
        _leak("branch", "coords"),
        "leak",
        "leak",
        True,
        "leak:position",
        help="The same leak measured in the 2-D layout you see: what the picture shows of position. Compare with the full-space leak to see what the projection adds or hides.",
        layout=True,
    )
)
# Sibling branches share their prompt and forks copy their parent's context, so other-branch neighbours
# at nearby positions can be content; other-prompt neighbours cannot.
register(
    Measure(
        "leak_prompt",
        "kNN position leak, other prompts only",
        _leak("prompt"),
        "leak",
        "leak",
        True,
        "leak:position",
        help="Position leak counting only neighbours from other prompts: unlike sibling branches, they share no context, so a leak here is position (or token identity), not content.",
    )
)
register(
    Measure(
        "token_leak",
        "same-token neighbours, other branches",
        _token_leak,
        "leak",
        guard="leak:token",
        help="Share of a token's nearest neighbours from other branches that are the same token id, against the share a random pick would give. Far above chance: this layer is organized by the current token's identity.",
    )
)
# 1-NN accuracy at matched positions: uncapped (k=10 purity of a branch with one token per position cannot
# pass 2*window/k), and it can fall when a removal takes content away.
register(
    Measure(
        "nn_branch",
        "branch 1-NN accuracy, matched positions",
        _purity("branch", 1, True),
        "purity",
        guard="separability",
        help="Is a token's nearest neighbour at the same position (within the window) from its own branch? Chance: a random pick among those tokens. High: branches are separable by content. A removal must not lower it: if it falls, content was removed.",
        better="",
    )
)
register(
    Measure(
        "nn_prompt",
        "prompt 1-NN accuracy, matched positions",
        _purity("prompt", 1, True),
        "purity",
        guard="separability",
        help="As the branch 1-NN accuracy, for prompts: are tokens at the same position closer to their own prompt's tokens than to other prompts'?",
        better="",
    )
)
register(
    Measure(
        "purity_branch",
        "branch kNN purity, matched positions",
        _purity("branch", None, True),
        "purity",
        shown=False,
        better="",
    )
)
register(
    Measure(
        "purity_prompt",
        "prompt kNN purity, matched positions",
        _purity("prompt", None, True),
        "purity",
        shown=False,
        better="",
    )
)
register(
    Measure(
        "purity_branch_pooled",
        "branch kNN purity, all positions",
        _purity("branch", None, False),
        "purity",
        shown=False,
        better="",
    )
)
register(
    Measure(
        "purity_prompt_pooled",
        "prompt kNN purity, all positions",
        _purity("prompt", None, False),
        "purity",
        shown=False,
        better="",
    )
)
register(
    Measure(
        "probe",
        "position probe R2, prompts held out",
        _probe,
        "r2",
        signed=True,
        reads_vectors=True,
        help="How well a linear (ridge) probe, trained on other prompts (a lone prompt's other branches), reads each token's position: 1 = exactly, 0 = no better than the mean position. Chance: the same with positions reversed in a random half of the prompts (runs of positions stay runs, so content that drifts along a branch is as easy to fit as with the real positions; a shuffle made chance's band far too narrow; with fewer than 4 prompts (a lone prompt: 4 branches) too few flips differ and chance is not given). Above chance's band: position is linearly decodable here, however little variance it takes (compare R2_pos); after a removal, what is left of it.",
    )
)
register(
    Measure(
        "projection",
        "trustworthiness of the 2-D layout",
        _trust,
        "trustworthiness",
        "half",
        help="Trustworthiness of the 2-D layout: are the layout's neighbours true neighbours in the full space? 1: all are; 0.5: a random layout. Below ~0.8, read distances in the picture with care.",
        layout=True,
        better="higher",
    )
)


@dataclass(frozen=True)
class LayerStat:
    """A number about a layer as it is, before any removal: computed once, on the raw view, beside the
    measures (analysis.view.layer_stats) and shown in the per-layer table (views.layer_table).

    key: its name in the raw view's metrics; compute: the raw tokens -> result, None where it does not
    apply; cells: the result as per-layer table cells {column key: value}; header: one of its column
    keys -> (header, help), None for a key not its own."""

    key: str
    compute: Callable[[TokenSet], Any]
    cells: Callable[[Any], dict[str, float]]
    header: Callable[[str], tuple[str, str] | None]


LAYER_STATS: dict[str, LayerStat] = {}


def register_layer_stat(stat: LayerStat) -> LayerStat:
    LAYER_STATS[stat.key] = stat
    return stat


def _pcs(t: TokenSet) -> list[dict] | None:
    if len(np.unique(t.branch)) < 2 or len(t) < 20:
        return None
    return P.pc_position_share(t.X, t.position, n_components=min(5, t.dim), groups=t.branch)


def _pc_cells(pcs: list[dict]) -> dict[str, float]:
    out = {}
    for i, pc in enumerate(pcs):
        out[f"pc{i + 1}_position"] = pc["pos_r2"]
        out[f"pc{i + 1}_variance"] = pc["var_share"]
    return out


def _pc_header(key: str) -> tuple[str, str] | None:
    found = re.fullmatch(r"pc(\d+)_(position|variance)", key)
    if not found:
        return None
    i, what = found.groups()
    if what == "position":
        return f"PC{i} position R2", f"R2 of position on principal component {i}"
    return f"PC{i} variance", f"share of variance on principal component {i}"


# the share of each top principal component that position explains ("large")
register_layer_stat(LayerStat("pcs", _pcs, _pc_cells, _pc_header))
