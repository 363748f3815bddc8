"""Per-layer diagnostics that keep "decodable" apart from "large".

Position can be linearly decodable from a layer (a ridge probe reads it back) while it spans a small
share of the variance (the top principal components are about something else), or the other way round.
position_probe measures the first, pc_position_share the second, token_identity_leak the main other
nuisance (the current token's identity). Every number comes with a chance level and a band.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from analysis import resample
from analysis.engine import blas
from analysis.engine.neighbours import Workspace
from analysis.metrics import GroupFlipper, WithinShuffler, knn_other_groups
from analysis.stats import Z

if TYPE_CHECKING:  # scipy costs ~0.5 s to import: loaded by the functions that need it
    from scipy import sparse

DEFAULT_ALPHAS = tuple(float(f"1e{e}") for e in range(-5, 3))  # per training token, on standardized features


def _assign_folds(groups: np.ndarray, n_folds: int, rng: np.random.Generator) -> np.ndarray:
    """Fold (0..n_folds-1) of every token; whole groups per fold, folds balanced by token count."""
    uniq, inv, counts = np.unique(groups, return_inverse=True, return_counts=True)
    fold_of_group = np.empty(len(uniq), np.int64)
    load = np.zeros(n_folds)
    # largest groups first, ties in random order; each to the lightest fold
    for g in np.lexsort((rng.random(len(uniq)), -counts)):
        f = int(np.argmin(load))
        fold_of_group[g] = f
        load[f] += counts[g]
    return fold_of_group[inv.ravel()]


Stats = tuple  # (G (d, d), s (d,), XtY (d, m), ysum (m,), yss (m,), n): sufficient statistics of some tokens


def _fold_stats(Xc: np.ndarray, Y: np.ndarray, fold: np.ndarray, n_folds: int) -> list[Stats]:
    """Per-fold sufficient statistics of ridge on X for the m targets in Y (n, m)."""
    out = []
    for f in range(n_folds):
        Xf, Yf = Xc[fold == f], Y[fold == f]
        G = (Xf.T @ Xf).astype(np.float64)  # float32 product: 2x faster, exact enough on centred data
        out.append(
            (
                G,
                Xf.sum(axis=0, dtype=np.float64),
                Xf.T.astype(np.float64) @ Yf,
                Yf.sum(axis=0),
                (Yf**2).sum(axis=0),
                len(Xf),
            )
        )
    return out


def _minus(total: Stats, *parts: Stats) -> Stats:
    """Statistics of the tokens in total but not in parts."""
    return tuple(t - sum(p[i] for p in parts) for i, t in enumerate(total))


def _ridge_path(stats: Stats, alphas: np.ndarray, n_pcs: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Ridge on standardized features fitted from stats, for every alpha (a per-token penalty), from
    one eigendecomposition of the standardized covariance: raw-space weights W (a, d, m), intercepts (a, m)."""
    G, s, XtY, ysum, yss, n = stats
    mean = s / n
    C = G - n * np.outer(mean, mean)  # (d, d) centred cross-products
    sd = np.sqrt(np.clip(np.diag(C), 0, None) / n)
    sd = np.where(sd > 0, sd, 1.0)
    lam, V = blas.eigh(C / np.outer(sd, sd))  # ascending
    if n_pcs is not None and n_pcs < len(lam):
        lam, V = lam[-n_pcs:], V[:, -n_pcs:]
    lam = np.clip(lam, 0, None)
    ybar = ysum / n
    z = V.T @ ((XtY - np.outer(s, ybar)) / sd[:, None])  # (k, m) standardized X^T (y - ybar) on the axes
    pen = alphas * n  # (a,)
    W = (V[None] @ (z[None] / (lam[None, :, None] + pen[:, None, None]))) / sd[None, :, None]  # (a, d, m)
    return W, ybar[None, :] - np.einsum("d,adm->am", mean, W)


def _sse(stats: Stats, W: np.ndarray, b0: np.ndarray) -> np.ndarray:
    """Sum of squared errors (a, m) of the fits (W, b0) on the tokens summarized by stats."""
    G, s, XtY, ysum, yss, n = stats
    quad = (W * (G[None] @ W)).sum(axis=1)  # (a, m) w^T G w
    cross = (W * XtY[None]).sum(axis=1)  # (a, m) w^T X^T y
    sw = np.einsum("d,adm->am", s, W)
    return yss - 2 * cross - 2 * b0 * ysum + quad + 2 * b0 * sw + n * b0**2


def _inner_cv_alpha(
    parts: list[Stats],
    total: Stats,
    f: int,
    alphas: np.ndarray,
    n_pcs: int | None,
    cache: dict,
) -> np.ndarray:
    """Index of the alpha (m,) with the least held-out error when the other outer folds take turns as
    validation groups; fits on a pair of left-out folds are shared between outer folds via cache."""
    sse = 0.0
    for g in range(len(parts)):
        if g == f:
            continue
        key = (min(f, g), max(f, g))
        if key not in cache:
            cache[key] = _ridge_path(_minus(total, parts[f], parts[g]), alphas, n_pcs)
        sse = sse + _sse(parts[g], *cache[key])
    return np.argmin(sse, axis=0)


def position_probe(
    X: np.ndarray,
    position: np.ndarray,
    groups: np.ndarray,
    n_folds: int = 5,
    alphas: tuple[float, ...] = DEFAULT_ALPHAS,
    n_permutations: int = 20,
    n_boot: int = 200,
    n_pcs: int | None = None,
    nested: bool = False,
    seed: int = 0,
    units: np.ndarray | None = None,
) -> dict[str, float | int | list | str]:
    """How well a linear (ridge) probe reads position from X on groups (prompts) it never saw, and how
    much of X's variance that decodable position accounts for.

    Folds hold out whole groups; inside each training fold features are standardized. alpha is a
    per-token penalty (alpha x training tokens). It is chosen with whole groups held out too:
    generalized CV treats tokens as independent, but tokens of one branch are not, so it picks a small
    alpha that memorizes branch content (held-out R2 -0.4, chance -0.01, on a tree with no position).
    nested=False (default): the alpha with the least pooled out-of-fold error, one eigendecomposition
    per fold; picking the best of a few alphas on the held-out folds flatters r2 a little, and the
    permutation refits go through the same choice, so the comparison with chance stays fair.
    nested=True: inner cross-validation over the other folds (whole groups), about twice as slow.
    Everything comes from per-fold X^T X, so the permutation refits (only X^T y changes) are nearly
    free. n_pcs=None uses every dimension (exact ridge; d=640 needs no reduction); n_pcs=k keeps the
    top k principal components of each standardized training set (for d in the thousands), which can
    miss position that lives in low-variance directions.

    Keys: r2 (pooled out-of-fold R2) with sd, lo, hi (bootstrap over whole groups, or over `units` (n,)
    when given, predictions fixed: a token bootstrap gave a fourteenth of the spread across prompts);
    chance, chance_sd, chance_lo, chance_hi (refits with positions reflected about their group's mean in a
    random half of the groups, band = mean +- 1.96 sd: runs of positions stay runs, so content that
    drifts along a branch gives the probe spurious trends to fit as the real positions do; a shuffle did
    not, and its band was a tenth of the spread of R2 over seeds with no position at all,
    docs/removal.md; NaN with a note under GroupFlipper.MIN_GROUPS groups, too few distinct flips);
    rmse and position_sd (in positions); pos_var_share: the share of X's total variance that is position
    (per-position means) along the probe's pattern direction (decodable but small: r2 high,
    pos_var_share tiny), with pos_var_share_sd, _lo, _hi (the same bootstrap) and
    pos_var_share_chance, _chance_sd (the flipped refits); alphas (chosen, per fold), n,
    n_groups, n_folds, n_dims, selection ("pooled" or "nested"), note.
    Drop attention sinks first: a few huge-norm tokens dominate the standardization.
    """
    X = np.asarray(X)
    y = np.asarray(position, dtype=np.float64)
    groups = np.asarray(groups)
    n, d = X.shape
    n_groups = len(np.unique(groups))
    n_folds = min(n_folds, n_groups)
    nested = nested and n_folds >= 3
    rng = np.random.default_rng(seed)
    nan = float("nan")
    out: dict = {
        "n": n,
        "n_groups": n_groups,
        "n_folds": n_folds,
        "n_dims": d if n_pcs is None else min(n_pcs, d),
        "position_sd": float(y.std()),
        "selection": "nested" if nested else "pooled",
        "note": "",
    }
    if n_folds < 2:
        return (
            out
            | dict.fromkeys(
                (
                    "r2",
                    "sd",
                    "lo",
                    "hi",
                    "chance",
                    "chance_sd",
                    "chance_lo",
                    "chance_hi",
                    "rmse",
                    "pos_var_share",
                    "pos_var_share_sd",
                    "pos_var_share_lo",
                    "pos_var_share_hi",
                    "pos_var_share_chance",
                    "pos_var_share_chance_sd",
                ),
                nan,
            )
            | {"alphas": [], "note": "one group: nothing to hold out (pass branches as groups)"}
        )
    fold = _assign_folds(groups, n_folds, rng)
    flip = GroupFlipper(groups, position)
    Y = np.column_stack([y] + [flip(rng) for _ in range(n_permutations)]).astype(np.float64)  # (n, 1 + P)
    Xc = _centred32(X)  # centred once: little cancellation in G - n m m^T
    parts = _fold_stats(Xc, Y, fold, n_folds)
    total = tuple(sum(p[i] for p in parts) for i in range(6))
    alpha_grid = np.asarray(alphas, dtype=np.float64)
    fits = [_ridge_path(_minus(total, parts[f]), alpha_grid, n_pcs) for f in range(n_folds)]
    cols = np.arange(Y.shape[1])
    if nested:
        cache: dict = {}
        best = [_inner_cv_alpha(parts, total, f, alpha_grid, n_pcs, cache) for f in range(n_folds)]
    else:
        pooled = np.argmin(sum(_sse(parts[f], *fits[f]) for f in range(n_folds)), axis=0)  # (m,)
        best = [pooled] * n_folds
    pred = np.empty_like(Y)
    for f, ((W, b0), bf) in enumerate(zip(fits, best)):
        test = fold == f
        pred[test] = Xc[test] @ W[bf, :, cols].T + b0[bf, cols]
    r2 = _r2(Y, pred)  # (1 + P,)
    units = groups if units is None else np.asarray(units)
    counts = resample.counts(n_boot, n, rng, units)
    boot = _boot_r2(y, pred[:, 0], counts)
    m = resample.n_units(units)  # each held-out prediction depends on the other prompts: widened
    onehot = _onehot(y)
    share, share_boot = _position_var_share(Xc, pred, onehot, counts)
    chance = r2[1:] if flip.n_groups >= GroupFlipper.MIN_GROUPS else r2[:0]
    if not len(chance):
        out["note"] = (
            f"chance needs at least {GroupFlipper.MIN_GROUPS} groups to flip (here {flip.n_groups}): "
            "not estimated"
        )
    c_mean, c_sd = (float(chance.mean()), float(chance.std())) if len(chance) else (nan, nan)
    s_mean, s_sd = (float(share[1:].mean()), float(share[1:].std())) if len(chance) else (nan, nan)
    return out | {
        "r2": float(r2[0]),
        **_band("", boot, r2[0], n_units=m),
        "chance": c_mean,
        "chance_sd": c_sd,
        "chance_lo": c_mean - Z * c_sd,
        "chance_hi": c_mean + Z * c_sd,
        "rmse": float(np.sqrt(((y - pred[:, 0]) ** 2).mean())),
        "pos_var_share": float(share[0]),
        **_band("pos_var_share", share_boot, share[0], floor=0.0, n_units=m),
        "pos_var_share_chance": s_mean,
        "pos_var_share_chance_sd": s_sd,
        "alphas": [float(alpha_grid[bf[0]]) for bf in best],
    }


def _r2(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """R2 of each column of pred (n, m) against the matching column of y (n, m)."""
    ss_tot = ((y - y.mean(axis=0)) ** 2).sum(axis=0)
    return 1 - ((y - pred) ** 2).sum(axis=0) / np.where(ss_tot > 0, ss_tot, np.nan)


def _boot_r2(y: np.ndarray, pred: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """R2 of pred against y under each row of resampling counts (B, n)."""
    tot = counts.sum(axis=1)
    ybar = counts @ y / tot
    ss_tot = counts @ (y**2) - tot * ybar**2
    return 1 - counts @ ((y - pred) ** 2) / np.where(ss_tot > 0, ss_tot, np.nan)


def _position_var_share(
    Xc: np.ndarray,
    pred: np.ndarray,
    onehot: sparse.csr_matrix,
    counts: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Share of the total variance of centred Xc (n, d) that is per-position-mean variance along each
    prediction's pattern direction u ~ Cov(X, pred) (Haufe et al. 2014): one value per pred column (m,),
    and bootstrap values (B,) of the first column under resampling counts (B, n), direction held fixed.

    Any linear read-out of X, even one fitted to shuffled positions, explains much of X's variance
    (it leans on the top principal axes); only the part of that axis that moves with position counts.
    """
    u = (Xc.T @ (pred - pred.mean(axis=0)).astype(np.float32)).astype(np.float64)  # (d, m)
    u /= np.where((norm := np.linalg.norm(u, axis=0)) > 0, norm, 1)
    S = (Xc @ u.astype(np.float32)).astype(np.float64)  # (n, m) scores along each pattern
    sq = _sq_norms(Xc)
    ss_x = sq.sum()
    share = _between_share(S, onehot, np.ones((1, len(Xc))))[0] * (S**2).sum(axis=0) / ss_x
    s0 = S[:, 0]
    tot = counts.sum(axis=1)
    var0 = counts @ s0**2 / tot - (counts @ s0 / tot) ** 2  # (B,)
    boot = _between_share(S[:, :1], onehot, counts)[:, 0] * var0 / (counts @ sq / tot)
    return share, boot


def _centred32(X: np.ndarray) -> np.ndarray:
    """X - its column means, float32 (n, d)."""
    X = np.asarray(X, dtype=np.float32)
    return X - X.mean(axis=0, dtype=np.float64).astype(np.float32)


def _sq_norms(Xc: np.ndarray) -> np.ndarray:
    """Squared norm of every row (n,), float64."""
    return (Xc * Xc).sum(axis=1, dtype=np.float64)


def _shuffled_columns_t(Xc: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Xc with every column re-paired with the others at random, transposed (d, n): rows in a random
    order, then each column rolled by its own random shift (10x faster than d permutations)."""
    out = Xc[rng.permutation(len(Xc))].T.copy()
    for j, shift in enumerate(rng.integers(len(Xc), size=Xc.shape[1])):
        out[j] = np.roll(out[j], shift)
    return out


def _top_pcs(Xc: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(top k eigenvalues of X^T X / n, descending (k,), their eigenvectors (d, k)) of centred Xc."""
    lam, V = blas.eigh((Xc.T @ Xc).astype(np.float64) / len(Xc))
    return lam[::-1][:k], V[:, ::-1][:, :k]


def _onehot(labels: np.ndarray) -> sparse.csr_matrix:
    """(n, G) indicator matrix of the sorted unique labels."""
    from scipy import sparse

    _, code = np.unique(labels, return_inverse=True)
    code = code.ravel()
    return sparse.csr_matrix(
        (np.ones(len(code)), (np.arange(len(code)), code)), shape=(len(code), int(code.max()) + 1)
    )


def _between_share(scores: np.ndarray, onehot: sparse.csr_matrix, weights: np.ndarray) -> np.ndarray:
    """R2 of each score column (n, k) on the groups of onehot (n, G): between-group over total sum of
    squares, under each row of token weights (B, n) (resampling counts; ones for the plain value)."""
    tot = weights.sum(axis=1)  # (B,)
    cnt = np.asarray(onehot.T @ weights.T).T  # (B, G)
    out = np.empty((len(weights), scores.shape[1]))
    for j in range(scores.shape[1]):
        s = scores[:, j]
        sums = np.asarray(onehot.T @ (weights * s).T).T  # (B, G)
        mean = weights @ s / tot
        sst = weights @ s**2 - tot * mean**2
        ssb = (sums**2 / np.where(cnt > 0, cnt, 1)).sum(axis=1) - tot * mean**2
        out[:, j] = ssb / np.where(sst > 0, sst, np.nan)
    return out


def pc_position_share(
    X: np.ndarray,
    position: np.ndarray,
    n_components: int = 5,
    groups: np.ndarray | None = None,
    n_shuffles: int = 20,
    n_boot: int = 200,
    seed: int = 0,
) -> list[dict[str, float | int]]:
    """For each top principal component: its share of the total variance, and how much of its own
    variance the per-position means of its score explain (R2 of the score on position).

    Per component: component; var_share with var_share_sd/_lo/_hi (bootstrap over tokens, axes held
    fixed) and var_share_chance (the same component of X with every column shuffled on its own:
    parallel analysis, one shuffle); pos_r2 with sd/lo/hi (bootstrap over tokens) and adjusted
    (~0 at chance); chance = (T-1)/(N-1) (T positions, N tokens) with chance_sd/_lo/_hi from its null
    distribution Beta((T-1)/2, (N-T)/2), which assumes independent tokens. When groups (branches) are
    given, also chance_within with its sd and lo/hi (mean +- 1.96 sd): positions shuffled within each
    branch, which keeps each branch's span. A score that is constant along branches (content) moves
    with who is alive at t, and neighbouring positions share their branches, so its R2 can sit well
    below (T-1)/(N-1); only chance_within is the right null then. n, n_positions.
    """
    Xc = _centred32(X)
    position = np.asarray(position)
    n = len(Xc)
    k = min(n_components, Xc.shape[1])
    rng = np.random.default_rng(seed)
    lam, V = _top_pcs(Xc, k)
    sq = _sq_norms(Xc)
    total_var = float(sq.sum() / n)
    scores = (Xc @ V.astype(np.float32)).astype(np.float64)  # (n, k)
    onehot = _onehot(position)
    T = onehot.shape[1]
    ones = np.ones((1, n))
    r2 = _between_share(scores, onehot, ones)[0]
    shuffled_t = _shuffled_columns_t(Xc, rng)  # (d, n) parallel analysis
    lam_null = np.linalg.eigvalsh((shuffled_t @ shuffled_t.T).astype(np.float64) / n)[::-1][:k]
    counts = resample.counts(n_boot, n, rng)
    boot_r2 = _between_share(scores, onehot, counts)  # (B, k)
    tot = counts.sum(axis=1)[:, None]
    boot_var = counts @ scores**2 / tot - (counts @ scores / tot) ** 2  # (B, k) variance along each axis
    # total variance about the full-sample mean: the resample's own mean is ~1/n closer, not worth an (B, d) pass
    boot_share = boot_var / (counts @ sq)[:, None] * tot
    from scipy import stats

    null = stats.beta((T - 1) / 2, (n - T) / 2) if 1 < T < n else None
    within = None
    if groups is not None and n_shuffles > 0:
        shuffle = WithinShuffler(groups)
        within = np.concatenate(
            [_between_share(scores, _onehot(shuffle(position, rng)), ones) for _ in range(n_shuffles)]
        )  # (S, k)
    out = []
    for j in range(k):
        row = {
            "component": j + 1,
            "var_share": float(lam[j] / total_var),
            **_band("var_share", boot_share[:, j], lam[j] / total_var, floor=0.0),
            "var_share_chance": float(lam_null[j] / total_var),
            "pos_r2": float(r2[j]),
            **_band("", boot_r2[:, j], r2[j], floor=0.0),
            "adjusted": float(1 - (1 - r2[j]) * (n - 1) / (n - T)) if n > T else float("nan"),
            "chance": (T - 1) / (n - 1) if n > 1 else float("nan"),
            "chance_sd": float(null.std()) if null else float("nan"),
            "chance_lo": float(null.ppf(0.025)) if null else float("nan"),
            "chance_hi": float(null.ppf(0.975)) if null else float("nan"),
            "n": n,
            "n_positions": T,
        }
        if within is not None:
            m, sd = float(within[:, j].mean()), float(within[:, j].std())
            row |= {
                "chance_within": m,
                "chance_within_sd": sd,
                "chance_within_lo": m - Z * sd,
                "chance_within_hi": m + Z * sd,
            }
        out.append(row)
    return out


def _band(
    prefix: str,
    boots: np.ndarray,
    estimate: float,
    floor: float = -np.inf,
    n_units: int = 0,
    ceiling: float = 1.0,
) -> dict[str, float]:
    """{prefix_sd, prefix_lo, prefix_hi} (sd, lo, hi when prefix is empty): bootstrap sd and the 95%
    percentile interval moved to centre on the estimate. Resampled tokens come with duplicates, which
    inflate per-group statistics such as a per-position R2; the shift takes that bias out of the band
    (lo is kept at or above floor, e.g. 0 for a share; hi at or below ceiling: an R2 or a share is at most 1,
    and a widened band reached 1.02 on screen). With n_units (a unit bootstrap): the sd widened by
    resample.REFERENCE_FACTOR, estimate +- Student's t sds (resample.unit_band)."""
    name = (lambda s: f"{prefix}_{s}") if prefix else (lambda s: s)
    boots = boots[np.isfinite(boots)]
    if len(boots) == 0:
        return {name(s): float("nan") for s in ("sd", "lo", "hi")}
    if n_units:
        band = resample.widened_band(boots, estimate, n_units)
        return {
            name("sd"): band["sd"],
            name("lo"): max(band["lo"], floor),
            name("hi"): min(band["hi"], ceiling),
        }
    lo, hi = np.quantile(boots - boots.mean() + estimate, [0.025, 0.975])
    return {
        name("sd"): float(boots.std()),
        name("lo"): float(max(lo, floor)),
        name("hi"): float(min(hi, ceiling)),
    }


def token_identity_leak(
    X: np.ndarray,
    token_id: np.ndarray,
    groups: np.ndarray,
    k: int = 10,
    n_queries: int | None = 1000,
    n_boot: int = 200,
    seed: int = 0,
    units: np.ndarray | None = None,
    workspace: Workspace | None = None,
) -> dict[str, float | int]:
    """Share of a token's k nearest neighbours from other groups (branches) that are the same token id.

    chance: per query, the share of other-group tokens with its id (what a random pick among the same
    candidates gives), averaged over queries. Keys: leak, sd, lo, hi (bootstrap over queries, or over
    their `units` (n,), e.g. prompts); chance,
    chance_lo, chance_hi; excess = leak - chance with excess_lo, excess_hi (paired bootstrap); k,
    n_queries (queries with at least one neighbour). When token ids stay this close in every
    layer, per-token-id means are a nuisance to remove alongside position.
    """
    token_id = np.asarray(token_id)
    groups = np.asarray(groups)
    rng = np.random.default_rng(seed)
    n = len(token_id)
    queries = (
        np.arange(n)
        if n_queries is None or n <= n_queries
        else np.sort(rng.choice(n, n_queries, replace=False))
    )
    nbrs = knn_other_groups(X, groups, queries, k, workspace)  # (q, k), -1 pads
    valid = nbrs >= 0
    same = (token_id[np.where(valid, nbrs, 0)] == token_id[queries, None]) & valid
    has = valid.any(axis=1)
    observed = same.sum(axis=1)[has] / valid.sum(axis=1)[has]  # (q,)
    chance = _same_id_share_elsewhere(token_id, groups)[queries][has]  # (q,)
    if len(observed) == 0:
        raise ValueError("token_identity_leak needs tokens from at least two groups")
    if units is None:
        idx = rng.integers(len(observed), size=(n_boot, len(observed)))
        bo, bc = observed[idx].mean(axis=1), chance[idx].mean(axis=1)  # (n_boot,)
    else:
        q_units = np.asarray(units)[queries][has]
        W = resample.counts(n_boot, len(observed), rng, q_units)  # (B, q)
        tot = np.maximum(W.sum(axis=1), 1)
        bo, bc = W @ observed / tot, W @ chance / tot
        # about the estimates, widened: the neighbours are drawn from the same prompts
        m = resample.n_units(q_units)
        leak, ch = float(observed.mean()), float(chance.mean())
        b, c, e = (
            resample.widened_band(v, est, m) for v, est in ((bo, leak), (bc, ch), (bo - bc, leak - ch))
        )
        return {
            "leak": leak,
            "sd": b["sd"],
            "lo": max(b["lo"], 0.0),  # shares: their widened bands stop at 0 and 1
            "hi": min(b["hi"], 1.0),
            "chance": ch,
            "chance_lo": max(c["lo"], 0.0),
            "chance_hi": min(c["hi"], 1.0),
            "excess": leak - ch,
            "excess_lo": e["lo"],
            "excess_hi": e["hi"],
            "k": k,
            "n_queries": int(has.sum()),
        }
    (lo, hi), (c_lo, c_hi), (e_lo, e_hi) = (np.quantile(v, [0.025, 0.975]) for v in (bo, bc, bo - bc))
    return {
        "leak": float(observed.mean()),
        "sd": float(bo.std()),
        "lo": float(lo),
        "hi": float(hi),
        "chance": float(chance.mean()),
        "chance_lo": float(c_lo),
        "chance_hi": float(c_hi),
        "excess": float(observed.mean() - chance.mean()),
        "excess_lo": float(e_lo),
        "excess_hi": float(e_hi),
        "k": k,
        "n_queries": int(has.sum()),
    }


def _same_id_share_elsewhere(token_id: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Per token (n,): the share of tokens outside its group that have its token id."""
    _, id_code, id_count = np.unique(token_id, return_inverse=True, return_counts=True)
    _, g_code, g_count = np.unique(groups, return_inverse=True, return_counts=True)
    id_code, g_code = id_code.ravel(), g_code.ravel()
    _, pair_code, pair_count = np.unique(
        id_code * (g_code.max() + 1) + g_code, return_inverse=True, return_counts=True
    )
    same_elsewhere = id_count[id_code] - pair_count[pair_code.ravel()]
    others = len(token_id) - g_count[g_code]
    return np.where(others > 0, same_elsewhere / np.maximum(others, 1), np.nan)
