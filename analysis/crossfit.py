"""Removal that cannot silently invent or exaggerate: cross-fitted, tested, shrunk.

Three rules (docs/design.md, "Trust rules for removal"), each behind a measured failure:
- Cross-fit: the estimate subtracted from a token was fitted on folds that never held that token's
  prompt (or its branch, with one prompt), so it cannot hold the token's own content.
- Test first: the nuisance estimate must predict tokens of held-out prompts better than their mean
  (out-of-fold R2), beyond what the same estimate reaches with the covariate shuffled within branches
  (a permutation p-value). Not detected: nothing is removed, and the view says so.
- Shrink: what is removed is c times the estimate, c in [0, 1] the out-of-fold least-squares weight, so
  an estimate that is half noise is removed at about half strength.
The test runs on a seeded Gaussian random projection of the latents (R2 is preserved in expectation),
which keeps its permutations cheap; the removal itself is in the full space.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from analysis.engine.groups import blocks, branch_centred, code_sums64, f64_blocks, onehot, row_sq
from analysis.metrics import WithinShuffler
from analysis.nuisances import NUISANCES
from analysis.residualize import (
    RESIDUALIZERS,
    LabelStats,
    Residualizer,
    ResidualSpec,
    Scaler,
    branch_offsets,
    make_residualizer,
    means_model,
)
from analysis.stats import PermutationTest
from analysis.tokens import TokenSet

TEST_DIMS = 64  # width of the random projection the detection test runs in


@dataclass
class RemovalReport:
    """What a removal did, for the view's verdict and warnings (JSON-able)."""

    method: str
    nuisance: str
    removes: list[str] = field(default_factory=list)  # the nuisance keys the method removes
    detected: bool = True
    p_value: float = float("nan")
    p_min: float = float("nan")  # the smallest p the permutations can give: 1 / (n_perm + 1)
    alpha: float = 0.05  # the tests' level
    r2_oof: float = float("nan")  # out-of-fold R2 of the nuisance estimate
    null_r2: float = float("nan")  # its mean under permutation
    null_hi: float = float("nan")  # and the 95th percentile
    weight: float = 1.0  # share of the estimate removed (0 = nothing)
    forced: bool = False
    crossfit: bool = False
    folds: int = 0
    fold_by: str = ""
    k: int | None = None  # projection: directions removed
    rank_r2: list[float] = field(
        default_factory=list
    )  # projection: out-of-fold R2 per rank 1..analysis.rank.MAX_RANK
    crossfit_share: float = 0.0  # share of plotted tokens whose estimate never saw their prompt (branch)
    detected_covariates: list[str] = field(default_factory=list)
    tests: dict = field(default_factory=dict)  # per nuisance: MeansTest.to_dict()
    deciding: str = ""  # the nuisance whose test the top-level p_value / r2_oof quote
    linear_test: dict = field(default_factory=dict)  # the linear probe test of position, where one ran
    erased: bool = False  # position erased linearly (LEACE)
    lowrank: dict = field(
        default_factory=dict
    )  # joint: the smooth low-rank part for probe-found position (rank, weight, gain)
    removed: list[str] = field(
        default_factory=list
    )  # what was removed, in words ("position", "token identity", ...)
    removed_keys: list[str] | None = (
        None  # the nuisance keys removed (None: those detected, or all when forced)
    )
    weights: dict = field(default_factory=dict)  # joint estimators: mean weight removed per nuisance
    noise_share: float = float(
        "nan"
    )  # joint estimators: share of the removed position part that is estimate noise
    note: str = ""
    raw: bool = False  # nothing removed: the residuals are the raw view's vectors, exactly

    def to_dict(self) -> dict:
        return asdict(self)


def covariates(tokens: TokenSet) -> dict[str, np.ndarray | None]:
    """Every registered nuisance's column of these tokens (None where they do not carry it)."""
    return {key: n.values(tokens) for key, n in NUISANCES.items()}


def fit_remove(
    plot: TokenSet,
    spec: ResidualSpec,
    reference: TokenSet | None = None,
    independent: bool = False,
    seed: int = 0,
    in_place: bool = False,
) -> tuple[np.ndarray, RemovalReport]:
    """Residual vectors of `plot` (n, d) and a report of what was removed: the method's own removal (a
    classmethod `remove` on its class) or, by default, crossfit_remove."""
    own = getattr(RESIDUALIZERS[spec.method], "remove", None)
    return (own or crossfit_remove)(plot, spec, reference, independent, seed, in_place)


def new_report(spec: ResidualSpec) -> RemovalReport:
    cls = RESIDUALIZERS[spec.method]
    return RemovalReport(spec.method, cls.nuisance_words(), list(cls.removes), alpha=spec.alpha)


def crossfit_remove(
    plot: TokenSet,
    spec: ResidualSpec,
    reference: TokenSet | None = None,
    independent: bool = False,
    seed: int = 0,
    in_place: bool = False,
) -> tuple[np.ndarray, RemovalReport]:
    """Residual vectors of `plot` (n, d) and a report of what was removed.

    reference: the tokens the nuisance is estimated from (default: plot). With `independent`, the
    reference shares no prompt with plot (another run): it is used whole, no cross-fitting needed.
    Otherwise tokens are matched to folds by prompt id (branch id with one prompt), so plot may be a
    subset of reference (fit scope "all tokens of the run"). With in_place, the residuals are written
    over plot.X (float32) and returned: no copy of the vectors is made.
    """
    cls = RESIDUALIZERS[spec.method]
    report = new_report(spec)
    if not cls.covariates:
        report.detected, report.weight, report.raw = False, 0.0, True
        return raw_rows(plot, spec, in_place), report
    ref = plot if reference is None else reference
    for name in cls.covariates:
        if covariates(ref)[name] is None or covariates(plot)[name] is None:
            raise ValueError(f"{spec.label()} needs each token's {name}, which these tokens do not carry")
    # Zr: the scaled reference. When it is the plot, it is also the plot's raw view and the buffer the
    # residuals are written to, so everything fitted from it is fitted before any row is changed.
    if ref is plot:
        Zr = raw_rows(plot, spec, in_place)
    else:
        ref_scaler = Scaler(spec.center, spec.l2, spec.standardize).fit(ref.X)
        Zr = ref_scaler.transform(ref.X)

    unit_name, ref_units, plot_units = units(ref, plot, independent, cls.fold_unit)
    folds = fold_of(ref_units, plot_units, spec.folds, seed)
    report.fold_by = unit_name
    Zt = random_projection(Zr, seed)  # what the tests and the choice of rank run on
    spec = cls.tune(spec, Zt, ref, folds[0], report)
    _detect(Zt, ref, folds[0], spec, cls, seed, report)
    if spec.gate and report.detected and 0 < len(report.detected_covariates) < len(cls.removes):
        # e.g. position + token where only token identity is there: remove that alone, since a fitted
        # but absent positional part would be noise subtracted by position (an invented leak)
        spec = cls.reduce(spec, report.detected_covariates)
        cls = RESIDUALIZERS[spec.method]
        report.note = (
            f"only {NUISANCES[report.detected_covariates[0]].words} detected: removed as {spec.label()}"
        )
        report.method, report.nuisance, report.removes = spec.method, cls.nuisance_words(), list(cls.removes)
        _weigh(Zt, ref, folds[0], spec, report)
    del Zt
    if not spec.gate:
        report.forced, report.weight = True, 1.0
    if report.weight == 0.0:  # nothing detected: the view is the raw one, exactly
        report.raw = True
        return Zr if ref is plot else raw_rows(plot, spec, in_place), report
    Zp = Zr if ref is plot else ref_scaler.transform(plot.X, in_place)  # ours to overwrite from here on

    crossfit = not (independent or folds[0] is None or not spec.crossfit)
    ref_fold = folds[0] if crossfit else np.zeros(len(ref), np.int64)
    plot_fold = folds[1] if crossfit else np.zeros(len(plot), np.int64)
    # Branch content out of the reference (backfitting on all of it); every fit below sees only what is
    # left, so per-position means do not carry the content of whichever branches reach a position.
    backfit = spec.within_branch and len(np.unique(ref.branch)) > 1
    models = _fold_models(Zr, ref, cls, spec, ref_fold, np.unique(plot_fold), backfit, crossfit)
    if not crossfit:
        report.note = report.note or (
            "fitted on another run"
            if independent
            else "not cross-fitted (asked)"
            if not spec.crossfit
            else "one group: not cross-fitted"
        )
        _subtract(Zp, np.arange(len(plot)), models[0], _cov(plot, cls), report.weight)
        return recentred(Zp, spec), report
    # Where the other folds never saw a token's position (or token id), e.g. the tail of a prompt's one
    # long branch or a rare token, a cross-fitted estimate would be an extrapolation and the whole
    # reference's estimate would hold the token's own prompt: those tokens are left as they are, and the
    # report counts them.
    crossfitted = np.zeros(len(plot), bool)
    for f, model in models.items():
        train = ref_fold != f
        rows = (plot_fold == f) & _supported(_cov_rows(ref, cls, train), _cov(plot, cls))
        _subtract(Zp, np.flatnonzero(rows), model, _cov(plot, cls), report.weight)
        crossfitted |= rows
    report.crossfit, report.folds = True, int(len(np.unique(ref_fold)))
    report.crossfit_share = float(crossfitted.mean())
    if report.crossfit_share < 1:
        left = int(len(plot) - crossfitted.sum())
        report.note = (
            f"{left} of {len(plot)} tokens sit where the other folds have no data "
            "(position or token unseen there): they are left as they are"
        )
    return recentred(Zp, spec), report


def raw_rows(tokens: TokenSet, spec: ResidualSpec, in_place: bool) -> np.ndarray:
    """The scaled vectors (what `none` shows): a new array, or tokens.X scaled in place."""
    return Scaler(spec.center, spec.l2, spec.standardize).fit(tokens.X).transform(tokens.X, in_place)


def _fold_models(
    Zr: np.ndarray,
    ref: TokenSet,
    cls: type[Residualizer],
    spec: ResidualSpec,
    fold: np.ndarray,
    targets: np.ndarray,
    backfit: bool,
    crossfit: bool,
) -> dict[int, Residualizer]:
    """The fitted model that serves each target fold's tokens (fitted on the reference's other folds;
    none where those are empty; with crossfit=False one model, key 0, fitted on all of Zr). Every model is fitted before any residual is written, since
    Zr may be the buffer the residuals go to. Single-covariate methods fit from per-(fold, value) sums,
    the branch offsets taken out by algebra (no (n, d) temporary); the others from rows."""
    if len(cls.covariates) == 1 and cls.sufficient:
        label = _cov(ref, cls)[cls.covariates[0]]
        helper = make_residualizer(spec) if cls.additive else means_model(spec, "position")
        stats = fold_label_stats(Zr, label, ref.branch, fold, helper if backfit else None)
        if not crossfit:
            return {0: make_residualizer(spec).fit_stats(stats[0])}
        total = _sum_stats(list(stats.values()))
        return {
            int(f): make_residualizer(spec).fit_stats(total.minus(stats[f]) if f in stats else total)
            for f in targets
            if (fold != f).any()
        }
    if backfit:
        Zr = Zr - branch_offsets(make_residualizer(spec), Zr, _cov(ref, cls), ref.branch)  # a copy: (n, d)
    if not crossfit:
        return {0: make_residualizer(spec).fit(Zr, **_cov(ref, cls), scale=False)}
    return {
        int(f): make_residualizer(spec).fit(Zr[fold != f], **_cov_rows(ref, cls, fold != f), scale=False)
        for f in targets
        if (fold != f).any()
    }


def fold_label_stats(
    Z: np.ndarray,
    labels: np.ndarray,
    branch: np.ndarray,
    fold: np.ndarray,
    helper: Residualizer | None = None,
    sweeps: int = 2,
) -> dict[int, LabelStats]:
    """LabelStats (by `labels`) of each fold's rows of Z (n, d), each row minus its branch's offset when
    a helper is given: the offsets of residualize.branch_offsets (backfitted with the helper on all rows,
    weighted mean zero), here per branch (B, d), taken out of per-(fold, label) and per-(fold, branch)
    sums, so Z is read once and never copied. Equal to LabelStats.of(Z_f - offsets_f) up to rounding."""
    cells = FoldCells.of(Z, labels, branch, fold)
    everywhere = np.ones(int(cells.fold_ids.max()) + 1 if len(cells.fold_ids) else 0, bool)
    offsets = cells.offsets(helper, everywhere, sweeps) if helper is not None else cells.no_offsets()
    return {int(f): cells.fold_stats(f, offsets) for f in cells.fold_ids}


class FoldCells:
    """Sums of the rows of Z (n, d) per (fold, label) and per (fold, branch) cell, with their counts and
    sums of squares: every fit of a single-covariate method on some folds' rows, its branch offsets
    backfitted on those rows, and its out-of-fold errors, come from these by algebra (one pass over Z)."""

    def __init__(self, lab_uniq, fl_keys, fl_n, fb_keys, fb_n, S_fl, S_fb, sq_fl, sq_fb, counts, B, fold_ids):
        self.lab_uniq, self.L, self.B = lab_uniq, len(lab_uniq), B
        self.fl_label, self.fl_fold, self.fl_n = fl_keys % self.L, fl_keys // self.L, fl_n
        self.fb_branch, self.fb_fold, self.fb_n = fb_keys % B, fb_keys // B, fb_n
        self.S_fl, self.S_fb, self.sq_fl, self.sq_fb = S_fl, S_fb, sq_fl, sq_fb  # (FL, d) (FB, d) (FL,) (FB,)
        self.counts = counts  # (FL, FB) sparse: rows in both cells
        self.fold_ids = fold_ids

    @classmethod
    def of(cls, Z: np.ndarray, labels: np.ndarray, branch: np.ndarray, fold: np.ndarray) -> FoldCells:
        lab_uniq, lab = np.unique(labels, return_inverse=True)
        br_uniq, br = np.unique(branch, return_inverse=True)
        L, B = len(lab_uniq), len(br_uniq)
        fl_keys, fl, fl_n = np.unique(fold * L + lab.ravel(), return_inverse=True, return_counts=True)
        fb_keys, fb, fb_n = np.unique(fold * B + br.ravel(), return_inverse=True, return_counts=True)
        fl, fb = fl.ravel(), fb.ravel()
        (S_fl, S_fb), sq_rows = code_sums64(Z, [(fl, len(fl_keys)), (fb, len(fb_keys))], with_sq=True)
        counts = onehot(fl, len(fl_keys)) @ onehot(fb, len(fb_keys)).T
        return cls(
            lab_uniq,
            fl_keys,
            fl_n,
            fb_keys,
            fb_n,
            S_fl,
            S_fb,
            np.bincount(fl, weights=sq_rows, minlength=len(fl_keys)),
            np.bincount(fb, weights=sq_rows, minlength=len(fb_keys)),
            counts,
            B,
            np.unique(fold),
        )

    def no_offsets(self) -> np.ndarray:
        return np.zeros((self.B, self.S_fl.shape[1]), np.float32)

    def n_branches(self, folds: np.ndarray) -> int:
        """Branches with rows in the folds marked True in `folds` (F,)."""
        return int(len(np.unique(self.fb_branch[folds[self.fb_fold]])))

    def offsets(self, helper: Residualizer, folds: np.ndarray, sweeps: int = 2) -> np.ndarray:
        """(B, d) branch offsets backfitted with `helper` on the rows of the folds marked True in `folds`
        (F,) (residualize.branch_offsets on those rows); 0 for branches outside them."""
        fl_in, fb_in = folds[self.fl_fold], folds[self.fb_fold]
        to_label, to_branch = onehot(self.fl_label, self.L, fl_in), onehot(self.fb_branch, self.B, fb_in)
        S_l, n_l = to_label @ self.S_fl, np.asarray(to_label @ self.fl_n).astype(np.int64)  # (L, d), (L,)
        S_b, n_b = to_branch @ self.S_fb, np.asarray(to_branch @ self.fb_n)  # (B, d), (B,)
        N = to_branch @ self.counts.T @ to_label.T  # (B, L) rows per (branch, label), in these folds
        labs, brs = n_l > 0, n_b > 0  # what these folds hold
        N = N.tocsr()[np.flatnonzero(brs)][:, np.flatnonzero(labs)]  # sparse: (B', L')
        S_l, n_l, S_b, n_b = S_l[labs], n_l[labs], S_b[brs], n_b[brs]
        sq, n, name = float(self.sq_fb[fb_in].sum()), int(n_l.sum()), helper.covariates[0]
        per = np.zeros((int(brs.sum()), self.S_fl.shape[1]), np.float32)
        for _ in range(sweeps):
            o = per.astype(np.float64)
            # sum |x - o_b|^2 = sum |x|^2 - 2 <S_b, o_b> + n_b |o_b|^2, per branch
            helper.fit_stats(
                LabelStats(
                    self.lab_uniq[labs],
                    S_l - N.T @ o,
                    n_l,
                    sq - 2 * float((S_b * o).sum()) + float((n_b * (o**2).sum(1)).sum()),
                    n,
                )
            )
            fitted = helper.component_of(None, {name: self.lab_uniq[labs]}).astype(np.float64)  # (L', d)
            branch_means = (S_b - N @ fitted) / n_b[:, None]  # (B', d) branch means of x - fitted
            branch_means -= np.average(branch_means, axis=0, weights=n_b)
            per = branch_means.astype(np.float32)
        out = self.no_offsets()
        out[brs] = per
        return out

    def fold_stats(self, f: int, offsets: np.ndarray) -> LabelStats:
        """LabelStats of fold f's rows, each minus its branch's offset (B, d)."""
        cells, fb = self.fl_fold == f, self.fb_fold == f
        o = offsets.astype(np.float64)[self.fb_branch[fb]]  # (FB_f, d) the offset of each of its branch cells
        S = self.S_fl[cells] - self.counts[cells][:, np.flatnonzero(fb)] @ o
        sq = self.sq_fb[fb] - 2 * (self.S_fb[fb] * o).sum(axis=1) + self.fb_n[fb] * (o**2).sum(axis=1)
        return LabelStats(
            self.lab_uniq[self.fl_label[cells]],
            S,
            self.fl_n[cells],
            float(sq.sum()),
            int(self.fl_n[cells].sum()),
        )

    def train_stats(self, folds: np.ndarray, offsets: np.ndarray) -> LabelStats:
        """LabelStats (by label) of the rows of the folds marked True in `folds` (F,), minus the offsets."""
        return _sum_stats(
            [self.fold_stats(int(f), offsets) for f in np.flatnonzero(folds) if (self.fl_fold == f).any()]
        )


def _subtract(
    Z: np.ndarray, rows: np.ndarray, model: Residualizer, cov: dict[str, np.ndarray], weight: float
) -> None:
    """Z[rows] -= weight * the model's component there, in place, a block of rows at a time."""
    for part in blocks(len(rows)):
        idx = rows[part]
        Z[idx] -= weight * model.component(Z[idx], **{name: v[idx] for name, v in cov.items()})


def recentred(residual: np.ndarray, spec: ResidualSpec) -> np.ndarray:
    """Residuals centred on the plotted tokens, as the raw view is (cosine metrics see the same origin);
    in place."""
    if spec.center:
        residual -= residual.mean(axis=0)
    return residual


def _sum_stats(parts: list[LabelStats]) -> LabelStats:
    """The statistics of the union of disjoint row sets."""
    labels = np.unique(np.concatenate([p.labels for p in parts]))
    sums = np.zeros((len(labels), parts[0].sums.shape[1]))
    counts = np.zeros(len(labels), np.int64)
    for p in parts:
        idx = np.searchsorted(labels, p.labels)
        sums[idx] += p.sums
        counts[idx] += p.counts
    return LabelStats(labels, sums, counts, sum(p.sq for p in parts), sum(p.n for p in parts))


def _supported(train_cov: dict[str, np.ndarray], plot_cov: dict[str, np.ndarray]) -> np.ndarray:
    """(n_plot,) True where the training folds can estimate the token's nuisance without extrapolating:
    its position within the range of their positions (between them the smooth fit interpolates), its
    token id seen there at least once."""
    ok = np.ones(len(next(iter(plot_cov.values()))), bool)
    for name, values in plot_cov.items():
        train = np.asarray(train_cov[name])
        if name == "position":
            ok &= (values >= train.min()) & (values <= train.max())
        else:
            seen = np.unique(train)
            idx = np.minimum(np.searchsorted(seen, values), len(seen) - 1)
            ok &= seen[idx] == values
    return ok


def _cov(tokens: TokenSet, cls: type[Residualizer]) -> dict[str, np.ndarray]:
    """The covariates the method reads."""
    c = covariates(tokens)
    return {name: c[name] for name in cls.covariates}


def _cov_rows(tokens: TokenSet, cls: type[Residualizer], rows: np.ndarray) -> dict[str, np.ndarray]:
    """The method's covariates at some rows (no copy of the latents)."""
    return {name: values[rows] for name, values in _cov(tokens, cls).items()}


def units(
    ref: TokenSet, plot: TokenSet, independent: bool, unit: str = "prompt"
) -> tuple[str, np.ndarray, np.ndarray]:
    """The unit folds are made of: prompts (unit 'prompt'), or branches when the reference has one prompt
    or the method holds out branches (unit 'branch')."""
    if unit == "prompt" and len(np.unique(ref.prompt)) >= 2:
        return "prompt", ref.prompt, (plot.prompt if not independent else np.full(len(plot), -1))
    return "branch", ref.branch, (plot.branch if not independent else np.full(len(plot), -1))


def fold_of(
    ref_units: np.ndarray, plot_units: np.ndarray, n_folds: int, seed: int
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Fold ids of reference and plot tokens (units spread over folds at random, seeded); None, None when
    there are fewer than 2 units."""
    units = np.unique(np.concatenate([ref_units, plot_units]))
    k = min(n_folds, len(np.unique(ref_units)))
    if k < 2:
        return None, None
    order = np.random.default_rng(seed).permutation(len(units))
    fold = np.empty(len(units), np.int64)
    fold[order] = np.arange(len(units)) % k
    return fold[np.searchsorted(units, ref_units)], fold[np.searchsorted(units, plot_units)]


def random_projection(Z: np.ndarray, seed: int) -> np.ndarray:
    """(n, TEST_DIMS) seeded Gaussian random projection (Z itself when it is narrower)."""
    if Z.shape[1] <= TEST_DIMS:
        return Z
    R = np.random.default_rng(seed + 17).normal(size=(Z.shape[1], TEST_DIMS)).astype(np.float32)
    R = R / np.sqrt(TEST_DIMS)  # float64 (d, m): a numpy float64 scalar promotes the float32 matrix
    out = np.empty((len(Z), TEST_DIMS))  # (n, m) float64, as the tests have always run in
    for rows, zb in f64_blocks(Z):  # Z @ R at once would first cast all of Z to float64 (2x its size)
        np.matmul(zb, R, out=out[rows])
    return out


def out_of_fold(
    Z: np.ndarray, ref: TokenSet, fold: np.ndarray, spec: ResidualSpec, cov: dict[str, np.ndarray]
) -> tuple[float, float]:
    """Out-of-fold (R2, least-squares weight) of the method's estimate of E[x | covariates], over the
    held-out tokens whose covariates the training folds cover (as in the removal)."""
    cls = RESIDUALIZERS[spec.method]
    if len(cls.covariates) == 1 and cls.sufficient and cls.additive:  # the model is its own helper
        return _oof_from_cells(Z, ref, fold, spec, cov[cls.covariates[0]])
    return _oof_rows(Z, ref, fold, spec, cov)


def _oof_rows(
    Z: np.ndarray, ref: TokenSet, fold: np.ndarray, spec: ResidualSpec, cov: dict[str, np.ndarray]
) -> tuple[float, float]:
    """out_of_fold by fitting each fold's model on its training rows (any method)."""
    cls = RESIDUALIZERS[spec.method]
    sse_m = sse_0 = num = den = 0.0
    for f in np.unique(fold):
        train = fold != f
        test = (fold == f) & _supported(_cov_rows(ref, cls, train), _cov(ref, cls))
        if not test.any():
            continue
        model = make_residualizer(spec).fit(
            Z[train], **{n: cov[n][train] for n in cls.covariates}, branch=ref.branch[train], scale=False
        )
        base = Z[train].mean(axis=0)
        pred = model.component(Z[test], **{n: cov[n][test] for n in cls.covariates})
        resid0 = Z[test] - base
        dev = pred - base
        sse_m += float(((Z[test] - pred) ** 2).sum())
        sse_0 += float((resid0**2).sum())
        num += float((resid0 * dev).sum())
        den += float((dev**2).sum())
    r2 = 1 - sse_m / sse_0 if sse_0 > 0 else 0.0
    return r2, (float(np.clip(num / den, 0.0, 1.0)) if den > 0 else 0.0)


def _oof_from_cells(
    Z: np.ndarray, ref: TokenSet, fold: np.ndarray, spec: ResidualSpec, label: np.ndarray
) -> tuple[float, float]:
    """out_of_fold for a single-covariate method that fits from LabelStats: every fold's fit (its branch offsets
    backfitted on the training folds, as fit(..., branch=) does on their rows) and every held-out error
    from FoldCells' sums, so Z (n, m) is read once instead of copied per fold."""
    cls = RESIDUALIZERS[spec.method]
    name = cls.covariates[0]
    cells = FoldCells.of(Z, label, ref.branch, fold)
    n_folds = int(fold.max()) + 1
    S_fold = np.zeros((n_folds, Z.shape[1]))
    np.add.at(S_fold, cells.fl_fold, cells.S_fl)  # (F, m) raw sums per fold
    n_fold = np.bincount(cells.fl_fold, weights=cells.fl_n, minlength=n_folds)
    sse_m = sse_0 = num = den = 0.0
    for f in cells.fold_ids:
        train = np.arange(n_folds) != f
        test = cells.fl_fold == f
        train_labels = cells.lab_uniq[np.unique(cells.fl_label[train[cells.fl_fold]])]
        labels = cells.lab_uniq[cells.fl_label[test]]
        ok = _supported({name: train_labels}, {name: labels})
        if not ok.any():
            continue
        backfit = spec.within_branch and cells.n_branches(train) > 1
        model = make_residualizer(spec)
        offsets = cells.offsets(model, train) if backfit else cells.no_offsets()
        model.fit_stats(cells.train_stats(train, offsets))
        base = S_fold[train].sum(axis=0) / n_fold[train].sum()  # (m,) the training rows' mean
        pred = model.component_of(None, {name: labels[ok]}).astype(np.float64)  # (c, m) at each test label
        S, c, sq = cells.S_fl[test][ok], cells.fl_n[test][ok], cells.sq_fl[test][ok]
        dev = pred - base
        # sums over a cell's rows z: |z - p|^2 = sq - 2 <S, p> + c |p|^2, <z - b, p - b> = <S - c b, p - b>
        sse_m += float(sq.sum() - 2 * (S * pred).sum() + (c * (pred**2).sum(axis=1)).sum())
        sse_0 += float(sq.sum() - 2 * (S @ base).sum() + c.sum() * float(base @ base))
        num += float(((S - c[:, None] * base) * dev).sum())
        den += float((c * (dev**2).sum(axis=1)).sum())
    r2 = 1 - sse_m / sse_0 if sse_0 > 0 else 0.0
    return r2, (float(np.clip(num / den, 0.0, 1.0)) if den > 0 else 0.0)


def _fold_sq(Zc: np.ndarray, fold: np.ndarray, n_folds: int) -> np.ndarray:
    """(F,) sum of |z|^2 over each fold's rows (float64)."""
    return np.bincount(fold, weights=row_sq(Zc), minlength=n_folds)


def _oof_group_r2(
    Zc: np.ndarray,
    labels: np.ndarray,
    fold: np.ndarray,
    n_folds: int,
    sq: np.ndarray | None = None,
    n_labels: int | None = None,
) -> float:
    """Out-of-fold R2 of per-label means: each token predicted by the mean of its label (position or
    token id) over the other folds, against the other folds' overall mean. From per-(fold, label) sums
    only: sum over a cell of |z - m|^2 = sum |z|^2 - 2 <S, m> + n |m|^2. labels: any values, or with
    n_labels codes 0..n_labels-1 (each present); sq: _fold_sq(Zc, fold, n_folds), which permutations of the
    labels share."""
    if n_labels is None:
        _, lab = np.unique(labels, return_inverse=True)
        lab, n_lab = lab.ravel(), int(lab.max()) + 1
    else:
        lab, n_lab = np.asarray(labels), n_labels
    cell = fold * n_lab + lab
    S_full = code_sums64(Zc, [(cell, n_folds * n_lab)])[0]  # (F * L, m) per-cell sums (empty cells 0)
    n_full = np.bincount(cell, minlength=n_folds * n_lab).astype(np.float64)
    S_full = S_full.reshape(n_folds, n_lab, -1)  # (F, L, m)
    n_full = n_full.reshape(n_folds, n_lab)
    sq = _fold_sq(Zc, fold, n_folds) if sq is None else sq
    S_lab, n_lab_tot = S_full.sum(axis=0), n_full.sum(axis=0)  # (L, m), (L,)
    S_fold, n_fold = S_full.sum(axis=1), n_full.sum(axis=1)  # (F, m), (F,)
    sse_m = sse_0 = 0.0
    for f in range(n_folds):
        if n_fold[f] == 0:
            continue
        base = (S_fold.sum(axis=0) - S_fold[f]) / max(n_full.sum() - n_fold[f], 1)  # (m,)
        n_train = n_lab_tot - n_full[f]  # (L,)
        means = np.where(n_train[:, None] > 0, (S_lab - S_full[f]) / np.maximum(n_train, 1)[:, None], base)
        sse_m += sq[f] - 2 * float((S_full[f] * means).sum()) + float((n_full[f] * (means**2).sum(1)).sum())
        sse_0 += sq[f] - 2 * float(S_fold[f] @ base) + n_fold[f] * float(base @ base)
    return 1 - sse_m / sse_0 if sse_0 > 0 else 0.0


@dataclass
class MeansTest(PermutationTest):
    """One nuisance's detection test: the out-of-fold R2 of its per-label means, against the same with
    the labels shuffled as the nuisance says (analysis.nuisances)."""

    key: str = ""
    alpha: float = 0.05

    @property
    def detected(self) -> bool:
        """Significant and an estimate that predicts held-out tokens (R2 above 0)."""
        return self.p_value <= self.alpha and self.r2 > 0

    def to_dict(self) -> dict:
        return {
            "r2_oof": float(self.r2),
            "null_r2": float(self.null.mean()),
            "null_hi": float(np.quantile(self.null, 0.95)),
            "p_value": self.p_value,
            "detected": self.detected,
        }


def shuffler(how: str, tokens: TokenSet):
    """A callable (codes (n,), rng) -> codes permuted as `how` says: 'within:UNIT' (among each unit's rows)
    or 'between:UNIT' (each unit's label moved whole to another unit; labels constant within a unit)."""
    kind, unit = how.split(":")
    groups = getattr(tokens, unit)
    if kind == "within":
        return WithinShuffler(groups)
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    return lambda codes, rng: codes[first][rng.permutation(len(first))][inverse]


def test_means(
    Zt: np.ndarray,
    ref: TokenSet,
    fold: np.ndarray,
    keys: tuple[str, ...],
    n_perm: int,
    alpha: float,
    seed: int,
) -> dict[str, MeansTest]:
    """Each nuisance's MeansTest on Zt (the reference on the tests' projection): its per-label means of
    the latents centred within the nuisance's unit, out of fold, against n_perm shuffles (one grouped sum
    each). Tested in order, each net of those found before it: a nuisance found has its per-label means
    taken out of the latents the next ones are tested on, so a strong one (a helix) does not drown a weaker
    one (token identity) in its variance."""
    n_folds = int(fold.max()) + 1
    cov = covariates(ref)
    rng = np.random.default_rng(seed + 1)
    found: list[np.ndarray] = []  # codes of the nuisances detected so far
    centred: dict[str | None, np.ndarray] = {}  # per centring unit, once
    out = {}
    for key in keys:
        n = NUISANCES[key]
        if n.centre not in centred:
            centred[n.centre] = (
                branch_centred(Zt, getattr(ref, n.centre)) if n.centre else Zt - Zt.mean(axis=0)
            )
        Zc = centred[n.centre]
        for codes_found in found:
            Zc = Zc - _label_means(Zc, codes_found)
        sq = _fold_sq(Zc, fold, n_folds)
        shuffle = shuffler(n.shuffle, ref)
        uniq, codes = np.unique(np.asarray(cov[key]), return_inverse=True)  # a shuffle of codes = of labels
        codes, L = codes.ravel(), len(uniq)
        r2 = _oof_group_r2(Zc, codes, fold, n_folds, sq, L)
        null = np.array([_oof_group_r2(Zc, shuffle(codes, rng), fold, n_folds, sq, L) for _ in range(n_perm)])
        out[key] = MeansTest(float(r2), null, key=key, alpha=alpha)
        if out[key].detected:
            found.append(codes)
    return out


def _label_means(Z: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """(n, m) each row's label mean (codes 0..L-1)."""
    L = int(codes.max()) + 1
    sums = code_sums64(Z, [(codes, L)])[0]
    return (sums / np.maximum(np.bincount(codes, minlength=L), 1)[:, None])[codes]


def deciding(tests: dict[str, MeansTest]) -> MeansTest:
    """The test whose numbers a sentence should quote: the detected one clearest above its null (its R2 over
    the null's 95th percentile), else the one nearest to detection."""
    detected = [t for t in tests.values() if t.detected]
    pool = detected or list(tests.values())
    return max(pool, key=lambda t: (t.r2 - float(np.quantile(t.null, 0.95)), -t.p_value))


def record_tests(report: RemovalReport, tests: dict[str, MeansTest], n_perm: int) -> None:
    """Copy the tests into the report: per nuisance (report.tests), and the deciding one's numbers."""
    report.tests = {k: t.to_dict() for k, t in tests.items()}
    report.detected_covariates = [k for k, t in tests.items() if t.detected]
    t = deciding(tests)
    report.r2_oof, report.null_r2 = t.r2, float(t.null.mean())
    report.null_hi = float(np.quantile(t.null, 0.95))
    report.p_value, report.p_min = t.p_value, 1 / (n_perm + 1)
    report.deciding = t.key
    report.detected = bool(report.detected_covariates)


def _detect(
    Zt: np.ndarray,
    ref: TokenSet,
    fold: np.ndarray | None,
    spec: ResidualSpec,
    cls: type[Residualizer],
    seed: int,
    report: RemovalReport,
) -> None:
    """Out-of-fold test of each nuisance the method removes (test_means); sets detected, the deciding
    test's p_value, r2_oof and null band, and the weight: the out-of-fold least-squares weight of the
    method's own estimate (1 for a projection)."""
    if fold is None:
        report.detected, report.weight = False, 0.0
        report.note = (
            "one prompt and one branch: the nuisance cannot be tested out of fold, so nothing is "
            "removed (Force removal removes it as fitted)"
        )
        return
    record_tests(report, test_means(Zt, ref, fold, cls.removes, spec.n_perm, spec.alpha, seed), spec.n_perm)
    if not report.detected:
        report.weight = 0.0
    elif cls.additive:
        _weigh(Zt, ref, fold, spec, report)
    else:
        report.weight = 1.0


def _weigh(
    Zt: np.ndarray, ref: TokenSet, fold: np.ndarray, spec: ResidualSpec, report: RemovalReport
) -> None:
    """Set the share of the estimate to remove: its out-of-fold least-squares weight; at 0 the component
    counts as not detected."""
    report.weight = out_of_fold(
        Zt, ref, fold, spec, {k: v for k, v in covariates(ref).items() if v is not None}
    )[1]
    if report.weight == 0.0:
        report.detected = False
        report.note = "the estimate does not predict held-out tokens better than their mean: nothing removed"
