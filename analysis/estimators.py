"""The joint estimators: `position`, `token`, `linear_erase` and `auto` (the default).

They share one removal (joint_remove), built on three measured facts (docs/removal.md has the numbers):

1. Estimate nuisances together. A per-position mean also averages whichever tokens sat at that position;
   that spread is noise shared by every token at the position, so subtracting it is itself a position
   signal. Position effects fitted net of token identity and branch content (analysis.effects) carry
   none of it where the latents are additive (layer 0 of a learned-position model comes out exact).
2. One translation per level, fitted on the whole reference. A cross-fitted per-position estimate gives
   each fold's tokens another vector, so two tokens at the same position in different folds move apart
   (for per-position means the cross-fitted residual is the in-sample one times n_t / (n_t - 1)): it
   pushed tokens at the same position apart (leak -0.4 with three branches). One vector per position
   leaves every same-position distance exactly as it was.
3. Balance what the estimate holds of each token. An estimate fitted on the tokens it is subtracted from
   holds 1/n_t of each one's own content, which draws tokens at other positions closer (a push-apart of
   2 v / n_t in squared distance, v the within-position variance); leaving (1 - w) of a position effect
   of spread D adds (1 - w)^2 D back. Each level's weight w is the largest that keeps the sum at or above
   0: w = 1 - sqrt(2 / (n R + 2)) for R = D / v. Where the fit is exact (v = 0) w = 1; with many tokens
   per position w -> 1; with three branches about 0.6.

The tests that decide what is removed stay out of fold (prompts, or branches with one prompt): the
per-label means test of analysis.crossfit for position and token identity, and a linear probe of
position (analysis.erase) for position that a probe reads but means do not reach; that part is subtracted
as a smooth low-rank component with its rank and weight chosen out of fold (analysis.lowrank).
"""

from __future__ import annotations

import numpy as np

from analysis.basis import PositionBasis
from analysis.crossfit import (
    RemovalReport,
    covariates,
    fold_of,
    new_report,
    out_of_fold,
    random_projection,
    raw_rows,
    recentred,
    record_tests,
    test_means,
    units,
)
from analysis.effects import Effects, FactorSums, fit_effects
from analysis.engine.groups import blocks
from analysis.erase import LinearEraser, Moments, linear_test, position_features
from analysis.lowrank import SmoothLowRank
from analysis.metrics import WithinShuffler
from analysis.nuisances import NUISANCES, Param, words
from analysis.residualize import Residualizer, ResidualSpec, Scaler, means_method, register
from analysis.tokens import TokenSet

LINEAR_ROWS = 8192  # rows the linear test samples (its power needs no more; its cost grows with rows x d^2)
NOTHING_LEFT = 1e-3  # auto keeps token identity where position, token and branch leave less than this share


def balance_weight(counts: np.ndarray, own: np.ndarray, R: float) -> np.ndarray:
    """(L,) per level: the largest w in [0, 1] with (1 - w)^2 R >= 2 w own (2 - w n own), i.e. where
    subtracting w times an estimate that holds `own` of each of its n tokens (n = counts) draws tokens of
    other levels no closer than the part it leaves keeps them apart. R: the effect's spread between two
    random tokens' levels over the within-level variance (inf where the fit is exact)."""
    n = np.asarray(counts, np.float64)
    own = np.asarray(own, np.float64)
    if not np.isfinite(R):
        return np.ones(len(n))
    a = R + 2 * n * own**2  # (R + 2 n w^2) w^2 - (2R + 4 w) w + R >= 0: the smaller root
    b = 2 * R + 4 * own
    disc = np.clip(b**2 - 4 * a * R, 0, None)
    w = (b - np.sqrt(disc)) / (2 * np.where(a > 0, a, 1))
    return np.clip(np.where(a > 0, w, 1.0), 0.0, 1.0)


def _spread(values: np.ndarray, counts: np.ndarray) -> float:
    """E|e_i - e_j|^2 over two random tokens: twice the count-weighted variance of the effect table."""
    mean = np.average(values, axis=0, weights=counts)
    return 2 * float(np.average(((values - mean) ** 2).sum(axis=1), weights=counts))


class JointRemoval:
    """The effects to subtract (one vector per level, weighted)."""

    def __init__(self):
        self.effects: Effects | None = None
        self.weights: dict[str, np.ndarray] = {}
        self.removed: list[str] = []

    def subtract(self, Z: np.ndarray, tokens: TokenSet, lo: float, hi: float) -> np.ndarray:
        """Z (n, d) minus the weighted effects at the tokens' levels, in place, a block at a time; returns
        (n,) True where the token's position lies outside [lo, hi] (the reference's range: left as it is)."""
        cov = covariates(tokens)
        outside = np.zeros(len(Z), bool)
        if "position" in self.removed:
            outside = (tokens.position < lo) | (tokens.position > hi)
        for rows in blocks(len(Z)):
            for key in self.removed:
                labels = np.asarray(cov[key])[rows]
                part = self.effects.lookup(key, labels) * self._weight(key, labels)[:, None]
                if key == "position":
                    part[outside[rows]] = 0.0
                Z[rows] -= part
        return outside

    def _weight(self, key: str, labels: np.ndarray) -> np.ndarray:
        known = self.effects.labels[key]
        idx = np.minimum(np.searchsorted(known, labels), len(known) - 1)
        w = self.weights[key][idx]
        return np.where(known[idx] == labels, w, float(np.median(self.weights[key]))).astype(np.float32)


def joint_remove(
    cls: type[Residualizer],
    plot: TokenSet,
    spec: ResidualSpec,
    reference: TokenSet | None = None,
    independent: bool = False,
    seed: int = 0,
    in_place: bool = False,
) -> tuple[np.ndarray, RemovalReport]:
    """Residuals of plot (n, d) and the report, for a joint estimator `cls` (see the module docstring)."""
    report = new_report(spec)
    ref = plot if reference is None else reference
    cov_ref, cov_plot = covariates(ref), covariates(plot)
    have = {k for k in NUISANCES if cov_ref.get(k) is not None and cov_plot.get(k) is not None}
    for key in cls.required:
        if key not in have:
            raise ValueError(
                f"{spec.label()} needs each token's {NUISANCES[key].words}, which these tokens do not carry"
            )
    candidates = tuple(k for k in cls.removes if k in have)
    Zr, scaler, unit_name, fold = _prepare(
        plot, ref, spec, independent, seed, in_place, cls.fold_unit, report
    )

    subtract_keys: list[str] = []
    low_rank = False
    if fold is None:
        report.detected, report.weight = False, 0.0
        report.note = (
            "one prompt and one branch: nothing can be tested out of fold, so nothing is removed "
            "(Force removal removes it as fitted)"
        )
        if not spec.gate:
            subtract_keys = list(candidates)
    else:
        Zt = random_projection(Zr, seed)
        tests = test_means(Zt, ref, fold, candidates, spec.n_perm, spec.alpha, seed)
        record_tests(report, tests, spec.n_perm)
        subtract_keys = [
            k
            for k in candidates
            if not spec.gate or (tests[k].detected and _predicts(Zt, ref, fold, k, spec))
        ]
        del Zt
        if spec.gate and len(subtract_keys) < len(report.detected_covariates):
            report.note = (
                "significant, but the estimate does not predict held-out tokens better than their mean: "
                f"{words([k for k in report.detected_covariates if k not in subtract_keys])} not removed"
            )
        report.detected = bool(subtract_keys) if spec.gate else report.detected
        if (
            "position" in candidates
            and cls.linear(spec)
            and "position" not in subtract_keys
            and unit_name != "prompt"
        ):
            report.note = report.note or (
                "one prompt: a probe held out by branch cannot tell position from the content "
                "its branches share, so nothing is removed for the probe"
            )
        elif "position" in candidates and cls.linear(spec) and "position" not in subtract_keys:
            report.linear_test = _linear_test(Zr, ref, fold, spec, seed, second=True)
            low_rank = report.linear_test["detected"]
            report.detected = report.detected or low_rank
    if not spec.gate:
        report.forced = True
    if not subtract_keys and not low_rank:
        report.weight, report.raw = 0.0, True
        return Zr if ref is plot else raw_rows(plot, spec, in_place), report

    plan = JointRemoval()
    factors = {"position": np.asarray(ref.position)}
    if "token" in have:
        factors["token"] = np.asarray(cov_ref["token"])
    if spec.within_branch and len(np.unique(ref.branch)) > 1:
        factors["branch"] = ref.branch
    if subtract_keys:
        sums = FactorSums.of(Zr, factors)
        plan.effects = fit_effects(sums, PositionBasis("spline", 3, spec.n_knots))
        rss, sst = plan.effects.info["rss"], plan.effects.info["sst"]
        if cls.keep_something and "token" in subtract_keys and sst > 0 and rss / sst < NOTHING_LEFT:
            subtract_keys = [k for k in subtract_keys if k != "token"]
            report.note = (
                f"position, token identity and branch content explain {1 - rss / sst:.2%} of this layer's "
                "variance: nothing else is left to show, so token identity is kept"
            )
        v = plan.effects.sigma2 * Zr.shape[1]  # within-level variance of a token, all dimensions
        for key in subtract_keys:
            values, counts = plan.effects.values[key], sums.counts[key].astype(np.float64)
            R = _spread(values, counts) / v if v > 0 else np.inf
            own = 1.0 / (counts + (plan.effects.lam_token if key == "token" else 0.0))
            plan.weights[key] = balance_weight(counts, own, R)
        plan.removed = subtract_keys
    smooth = None
    if (
        low_rank and not plan.removed
    ):  # fitted before the plot's rows are touched: finding nothing returns raw
        smooth = _smooth_part(Zr, ref, fold, report)
        low_rank = smooth is not None
    if not plan.removed and not low_rank:  # the tests found only what is kept
        report.weight, report.removed_keys, report.raw = 0.0, [], True
        return Zr if ref is plot else raw_rows(plot, spec, in_place), report
    Zp = Zr if ref is plot else scaler.transform(plot.X, in_place)  # ours to overwrite from here on
    if plan.removed:
        lo, hi = float(ref.position.min()), float(ref.position.max())
        outside = plan.subtract(Zp, plot, lo, hi)
        report.crossfit_share = float(1 - outside.mean())
        if outside.any():
            report.note = (
                f"{outside.mean():.0%} of tokens sit outside the reference's positions: their position "
                "is left as it is"
            )
        share = {k: float(np.average(plan.weights[k], weights=sums.counts[k])) for k in plan.removed}
        report.weights = share
        report.weight = float(np.mean(list(share.values())))
        report.noise_share = _noise_share(plan, sums)
    if low_rank and smooth is None:  # fitted on the reference net of the effects just subtracted
        smooth = _smooth_part(Zp if ref is plot else _residual_copy(Zr, ref, plan), ref, fold, report)
        low_rank = smooth is not None
    if low_rank:
        for rows in blocks(len(Zp)):
            Zp[rows] -= smooth.component(plot.position[rows])
        report.weight = report.weight if plan.removed else smooth.weight_
    report.removed = [
        *(NUISANCES[k].words for k in plan.removed),
        *(["position (low rank)"] if low_rank else []),
    ]
    report.removed_keys = sorted(set(plan.removed) | ({"position"} if low_rank else set()))
    return recentred(Zp, spec), report


def _smooth_part(
    Z: np.ndarray, ref: TokenSet, fold: np.ndarray, report: RemovalReport
) -> SmoothLowRank | None:
    """The smooth low-rank part of the reference's rows Z (analysis.lowrank), recorded in the report (the
    verdict says when it is None: no rank predicts held-out prompts)."""
    smooth = SmoothLowRank().fit(Z, ref.position, ref.branch, fold)
    report.lowrank = {"rank": smooth.rank_, "weight": smooth.weight_, "gain": float(smooth.gains_.max())}
    return smooth if smooth.rank_ and smooth.weight_ > 0 else None


def _predicts(Zt: np.ndarray, ref: TokenSet, fold: np.ndarray, key: str, spec: ResidualSpec) -> bool:
    """Whether the nuisance's per-label means, fitted out of fold (net of branch content), predict held-out
    tokens better than their mean: a positive out-of-fold least-squares weight (analysis.crossfit.out_of_fold)."""
    single = spec.with_method(means_method(key))
    return out_of_fold(Zt, ref, fold, single, {key: covariates(ref)[key]})[1] > 0


def _residual_copy(Zr: np.ndarray, ref: TokenSet, plan: JointRemoval) -> np.ndarray:
    """A copy of the reference's scaled rows with the plan's effects subtracted (for the low-rank part's fit)."""
    out = Zr.copy()
    plan.subtract(out, ref, float(ref.position.min()), float(ref.position.max()))
    return out


def _noise_share(plan: JointRemoval, sums) -> float:
    """The share of the subtracted position component's variance that is its estimate's own noise
    (standard errors of the effects, weighted as removed); 0 where the fit is exact."""
    e = plan.effects
    if "position" not in plan.removed or e.se2 is None:
        return 0.0
    counts = sums.counts["position"].astype(np.float64)
    w = plan.weights["position"]
    values = e.values["position"]
    signal = _spread(values * w[:, None], counts) / 2
    noise = float(np.average(w**2 * e.se2 * e.weight**2 * values.shape[1], weights=counts))
    return float(min(noise / signal, 1.0)) if signal > 0 else 0.0


def _prepare(
    plot: TokenSet,
    ref: TokenSet,
    spec: ResidualSpec,
    independent: bool,
    seed: int,
    in_place: bool,
    unit: str,
    report: RemovalReport,
):
    """(the reference's scaled rows Zr, the reference's scaler or None when it is the plot (then Zr is the
    plot's buffer), the fold unit's name, the reference's folds or None); the report gets the folds."""
    if ref is plot:
        Zr, scaler = raw_rows(plot, spec, in_place), None
    else:
        scaler = Scaler(spec.center, spec.l2, spec.standardize).fit(ref.X)
        Zr = scaler.transform(ref.X)
    unit_name, ref_units, plot_units = units(ref, plot, independent, unit)
    fold = fold_of(ref_units, plot_units, spec.folds, seed)[0]
    report.fold_by, report.crossfit = unit_name, False
    report.folds = 0 if fold is None else int(fold.max()) + 1
    return Zr, scaler, unit_name, fold


def _linear_test(
    Zr: np.ndarray, ref: TokenSet, fold: np.ndarray, spec: ResidualSpec, seed: int, second: bool = False
) -> dict:
    """The report's linear_test: linear_test on at most LINEAR_ROWS rows of the reference, position
    shuffled within branches, at its level. As the second test of position (after the means test) it runs
    at alpha / 2 (Bonferroni), with enough shuffles for a p-value that small (its refits are cheap: only
    X^T y changes)."""
    level = spec.alpha / 2 if second else spec.alpha
    n_perm = max(spec.n_perm, int(np.ceil(1 / level)) - 1)
    rng = np.random.default_rng(seed + 23)
    rows = (
        np.arange(len(Zr))
        if len(Zr) <= LINEAR_ROWS
        else np.sort(rng.choice(len(Zr), LINEAR_ROWS, replace=False))
    )
    pos, br = ref.position[rows], ref.branch[rows]
    shuffle = WithinShuffler(br)
    lt = linear_test(Zr[rows], pos, fold[rows], [shuffle(pos, rng) for _ in range(n_perm)])
    return {
        "r2_oof": lt.r2,
        "null_r2": float(lt.null.mean()),
        "null_hi": float(np.quantile(lt.null, 0.95)),
        "p_value": lt.p_value,
        "alpha": level,
        "p_min": 1 / (len(lt.null) + 1),
        "detected": bool(lt.p_value <= level and lt.r2 > 0),
    }


KNOTS = Param(
    "n_knots",
    12,
    "Spline knots",
    "Knots of the smooth curve that positions seen by few tokens are shrunk toward (fewer: smoother).",
    "int",
    2,
    40,
)
LINEAR = Param(
    "linear",
    True,
    "Remove linearly decodable position",
    "Where per-position means find no position but a prompt-held-out linear probe reads it, remove what "
    "the probe reads, as a smooth low-rank component of position (rank and weight chosen on held-out "
    "prompts).",
    "bool",
)


class _Joint(Residualizer):
    """Shared by the joint estimators: their removal is joint_remove."""

    required: tuple[str, ...] = ("position",)
    keep_something = False
    params = (KNOTS, LINEAR)

    @classmethod
    def linear(cls, spec: ResidualSpec) -> bool:
        return bool(getattr(spec, "linear", False))

    @classmethod
    def remove(cls, plot, spec, reference=None, independent=False, seed=0, in_place=False):
        return joint_remove(cls, plot, spec, reference, independent, seed, in_place)


@register
class Auto(_Joint):
    name = "auto"
    label = "auto: remove what the tests find"
    help = (
        "Tests position and token identity out of fold and removes each one found: both estimated together "
        "(position net of token identity and branch content), one vector per position and per token id, "
        "weighted so the estimate's own noise cannot push tokens apart; position that a linear probe reads "
        "but means do not reach is subtracted as a smooth low-rank part, weighted out of fold. Keeps token "
        "identity when position and token together are all the layer holds. Reached exact subtraction on learned-position layers 0 (see docs/removal.md)."
    )
    short = "auto"
    removes = ("position", "token")
    keep_something = True
    menu_order = 0
    alternative = (
        "position",
        "Remove position only",
        "The joint position estimate alone, keeping token identity",
    )


@register
class Position(_Joint):
    name = "position"
    label = "position only (joint estimate)"
    short = "position (joint)"
    help = (
        "Removes position alone, when its test finds it: position effects estimated net of token identity "
        "and branch content, one vector per position, weighted against the estimate's own noise; position "
        "that only a linear probe reads is subtracted as a smooth low-rank part. Token identity is kept."
    )
    removes = ("position",)
    menu_order = 1


@register
class Token(_Joint):
    name = "token"
    label = "token identity only (joint estimate)"
    short = "token (joint)"
    help = (
        "Removes token identity alone, when its test finds it: per-token effects estimated net of position "
        "and branch content (random effects: rare ids shrunk toward nothing), one vector per id, weighted "
        "against the estimate's own noise. Ids the reference never saw are left as they are."
    )
    removes = ("token",)
    required = ("position", "token")
    params = (KNOTS,)
    menu_order = 2


@register
class LinearErase(_Joint):
    name = "linear_erase"
    label = "position: linear erasure (LEACE)"
    short = "linear erasure"
    help = (
        "Erases what a linear probe of position reads (LEACE of a smooth basis of position: a projection of "
        "rank ~6, no per-position offset), when the prompt-held-out probe test finds it. Cannot reach exact "
        "subtraction of position that is not linear in those features (a helix of many turns, a random "
        "table)."
    )
    removes = ("position",)
    params = ()

    @classmethod
    def remove(cls, plot, spec, reference=None, independent=False, seed=0, in_place=False):
        return erase_remove(plot, spec, reference, independent, seed, in_place)


def erase_remove(
    plot: TokenSet,
    spec: ResidualSpec,
    reference: TokenSet | None = None,
    independent: bool = False,
    seed: int = 0,
    in_place: bool = False,
) -> tuple[np.ndarray, RemovalReport]:
    """LEACE of position alone: tested with the linear probe (forced: erased whatever it finds)."""
    report = new_report(spec)
    ref = plot if reference is None else reference
    Zr, scaler, unit_name, fold = _prepare(plot, ref, spec, independent, seed, in_place, "prompt", report)
    detected = False
    if fold is not None and unit_name != "prompt":
        report.note = (
            "one prompt: a probe held out by branch cannot tell position from the content its branches "
            "share, so nothing is erased (Force removal erases it)"
        )
    elif fold is not None:
        lt = report.linear_test = _linear_test(Zr, ref, fold, spec, seed)
        detected = lt["detected"]
        report.p_value, report.p_min, report.r2_oof = lt["p_value"], lt["p_min"], lt["r2_oof"]
        report.null_r2, report.null_hi = lt["null_r2"], lt["null_hi"]
        report.deciding = "position"
    else:
        report.note = (
            "one prompt and one branch: the probe cannot be tested out of fold, so nothing is erased"
        )
    report.forced = not spec.gate
    report.detected = detected
    report.detected_covariates = ["position"] if detected else []
    if not (detected or report.forced):
        report.weight, report.raw = 0.0, True
        return Zr if ref is plot else raw_rows(plot, spec, in_place), report
    eraser = LinearEraser().fit(Moments.of(Zr, position_features(ref.position)))
    Zp = Zr if ref is plot else scaler.transform(plot.X, in_place)
    eraser.transform(Zp)
    report.weight, report.erased, report.removed = 1.0, True, ["position (linear)"]
    report.removed_keys = ["position"]
    return recentred(Zp, spec), report


__all__ = ["Auto", "LinearErase", "Position", "Token", "balance_weight", "joint_remove", "words"]
