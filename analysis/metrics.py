"""How much position is left in a set of latents, and how well a projection keeps its neighbourhoods.

Notation as in docs/design.md: x_i a latent, t_i its position, mu_t the mean of the n_t latents at t.
Every metric comes with its chance level so a number can be read on its own.
"""

from __future__ import annotations

import numpy as np

from analysis import resample
from analysis.engine import neighbours
from analysis.engine.blas import one_thread
from analysis.engine.groups import BLOCK, blocks, code_sums64, row_sq
from analysis.stats import Z


def r2_pos(
    X: np.ndarray,
    position: np.ndarray,
    groups: np.ndarray | None = None,
    n_shuffles: int = 5,
    seed: int = 0,
    within: np.ndarray | None = None,
    units: np.ndarray | None = None,
) -> dict[str, float]:
    """Share of variance explained by per-position means, with its chance level and corrected forms.

    - r2: sum_t n_t |mu_t - mu|^2 / sum_i |x_i - mu|^2.
    - chance: r2 under shuffled positions (mean of n_shuffles), shuffled within each of the `within`
      groups (branches: each keeps its span, as the leak's chance does) when given; chance_sd their
      spread. chance_analytic: (T-1)/(N-1), a shuffle over all tokens.
    - adjusted: 1 - (SS_within/(N-T)) / (SS_total/(N-1)); ~0 at chance, so few tokens per position
      do not inflate it.
    - heldout (when groups are given): leave-one-group-out; each token is predicted by the other
      groups' mean at its position, against their overall mean. ~0 when no position signal
      generalizes across groups, negative when per-position means only fit noise or content.
      `heldout_coverage` is the share of tokens whose position has other groups.

    - sd, lo, hi: bootstrap band over the tokens, or with `units` (n,) (prompts) the delete-one-unit
      jackknife, so it carries what another set of prompts would give.

    Sums are float64, made by one compiled pass over X in its own dtype (float32 input is never copied).
    """
    X = np.asarray(X)
    position = np.asarray(position)
    n = len(X)
    if n < 2:
        raise ValueError("r2_pos needs at least 2 tokens")
    grand = X.sum(axis=0, dtype=np.float64) / n  # (d,)
    _, pos_code, pos_counts = np.unique(position, return_inverse=True, return_counts=True)
    pos_code = pos_code.ravel()
    n_pos = len(pos_counts)
    rng = np.random.default_rng(seed)
    # a permutation of the codes is the same draw as of the positions (it depends on n only)
    if within is None:
        codings = [(pos_code, n_pos)] + [(rng.permutation(pos_code), n_pos) for _ in range(n_shuffles)]
    else:
        shuffle = WithinShuffler(within)
        codings = [(pos_code, n_pos)] + [(shuffle(pos_code, rng), n_pos) for _ in range(n_shuffles)]
    if groups is not None:
        _, g_code = np.unique(np.asarray(groups), return_inverse=True)
        g_code = g_code.ravel()
        codings.append((g_code, int(g_code.max()) + 1))
    # one pass: per-position sums, per shuffle, per group, all about the grand mean, and each row's |x - mu|^2
    sums, sq = code_sums64(X, codings, shift=grand, with_sq=True)
    sst = float(sq.sum())
    if sst <= 0:
        return {
            "r2": 0.0,
            "adjusted": 0.0,
            "chance": 0.0,
            "chance_sd": 0.0,
            "chance_analytic": 0.0,
            "heldout": float("nan"),
            "heldout_coverage": 0.0,
            "n": n,
            "n_positions": n_pos,
        }
    centre = np.zeros_like(grand)  # the sums are about the grand mean already
    between = [_between_ss(s, pos_counts, centre) for s in sums[: 1 + n_shuffles]]
    ssb, shuffled = between[0], [b / sst for b in between[1:]]
    out = {
        "r2": ssb / sst,
        "adjusted": 1 - ((sst - ssb) / max(n - n_pos, 1)) / (sst / (n - 1)) if n > n_pos else float("nan"),
        "chance": float(np.mean(shuffled)) if shuffled else float("nan"),
        "chance_sd": float(np.std(shuffled)) if shuffled else float("nan"),
        "chance_analytic": (n_pos - 1) / (n - 1),
        "n": n,
        "n_positions": n_pos,
        "total_var": sst / n,  # per token, summed over dimensions: what r2 is a share of
    }
    out.update(
        _heldout_r2(X, pos_code, sums[0], pos_counts, g_code, sums[-1], grand)
        if groups is not None
        else {"heldout": float("nan"), "heldout_coverage": 0.0}
    )
    out.update(_r2_band(X, pos_code, n_pos, rng, grand, units=units, estimate=out["r2"]))
    return out


def _between_ss(sums: np.ndarray, counts: np.ndarray, grand: np.ndarray) -> float:
    """sum_t n_t |mu_t - mu|^2 from per-position sums (T, d) and counts (T,)."""
    means = sums / counts[:, None]
    return float((counts * ((means - grand) ** 2).sum(axis=1)).sum())


def _r2_band(
    X: np.ndarray,
    pos_code: np.ndarray,
    n_pos: int,
    rng: np.random.Generator,
    grand: np.ndarray,
    n_boot: int = 30,
    dims: int = 64,
    chunk: int = 10,
    units: np.ndarray | None = None,
    estimate: float | None = None,
) -> dict[str, float]:
    """sd / lo / hi of r2 over bootstrap resamples of the tokens (weights), or with units by the delete-one
    unit jackknife (_jackknife_r2), on a seeded random projection
    to `dims` dimensions (R2 is a ratio of sums of squares, kept in expectation), so it stays cheap.

    The projection Z of the rows less their mean `grand` (d,) is float32 (a band needs no more; half the
    memory to make and touch); every sum over it is float64. The per-position weighted sums of `chunk`
    resamples at once come from one compiled pass over Z."""
    n, d = X.shape
    R = (rng.normal(size=(d, dims)) / np.sqrt(dims)).astype(np.float32) if d > dims else None
    Z = np.empty((n, dims if R is not None else d), np.float32)  # (n, m)
    shift = grand.astype(np.float32)
    # Centred before projecting, at the input's precision, so each resample's total sum of squares comes
    # from row norms without cancellation (R2 does not change when every row moves by the same vector).
    buf = np.empty((min(BLOCK, n), d), np.float32)
    for rows in blocks(n):
        xb = buf[: rows.stop - rows.start]
        np.subtract(X[rows], shift, out=xb, casting="same_kind")
        if R is not None:
            np.matmul(xb, R, out=Z[rows])
        else:
            Z[rows] = xb
    sq = row_sq(Z)  # (n,) float64
    if units is not None:
        return _jackknife_r2(Z, sq, pos_code, n_pos, units, estimate)
    return _band(_boot_r2(Z, sq, pos_code, n_pos, rng, n_boot, chunk))


def _jackknife_r2(
    Z: np.ndarray, sq: np.ndarray, pos_code: np.ndarray, n_pos: int, units: np.ndarray, estimate: float | None
) -> dict[str, float]:
    """sd / lo / hi of r2 by the delete-one-unit jackknife (estimate +- Student's t sds), from per-(unit, position)
    sums of the centred projection Z (n, m). R2 is smooth in these sums, so the jackknife is consistent;
    a unit bootstrap is not usable here: a prompt drawn twice doubles its per-position means' overfit, and
    its band was 5-10x the spread across seeds."""
    _, u_code = np.unique(np.asarray(units), return_inverse=True)
    u_code = u_code.ravel()
    n_units = int(u_code.max()) + 1
    if n_units < 2:
        return {"sd": float("nan"), "lo": float("nan"), "hi": float("nan")}
    cell = u_code * n_pos + pos_code
    (S,) = code_sums64(Z, [(cell, n_units * n_pos)])
    S = S.reshape(n_units, n_pos, -1)  # (U, T, m)
    C = np.bincount(cell, minlength=n_units * n_pos).reshape(n_units, n_pos).astype(np.float64)  # (U, T)
    Q = np.bincount(u_code, weights=sq, minlength=n_units)  # (U,)
    S_t, C_t = S.sum(axis=0), C.sum(axis=0)  # (T, m), (T,)
    values = np.empty(n_units)
    for u in range(n_units):
        St, Ct = S_t - S[u], C_t - C[u]
        n = Ct.sum()
        G = St.sum(axis=0)
        sst = Q.sum() - Q[u] - (G @ G) / n
        ok = Ct > 0
        ssb = ((St[ok] ** 2).sum(axis=1) / Ct[ok]).sum() - (G @ G) / n
        values[u] = ssb / sst if sst > 0 else np.nan
    values = values[np.isfinite(values)]
    sd = float(np.sqrt((len(values) - 1) / len(values) * ((values - values.mean()) ** 2).sum()))
    return resample.unit_band(estimate if estimate is not None else float(values.mean()), sd, n_units)


def _boot_r2(
    Z: np.ndarray,
    sq: np.ndarray,
    pos_code: np.ndarray,
    n_pos: int,
    rng: np.random.Generator,
    n_boot: int,
    chunk: int,
) -> np.ndarray:
    """_r2_band's resampled R2 values (n_boot,) of the centred projection Z (n, m): `chunk` resamples'
    per-position weighted sums from one compiled pass over Z. A resample's counts are the bincount of n
    uniform draws (the multinomial, 30x faster than rng.multinomial with n categories)."""
    from analysis.engine.kernels import weighted_code_sums  # numba: imported by the first band

    n = len(Z)
    values = []
    W = np.empty((min(chunk, n_boot), n))  # (b, n) resample counts, one buffer for every chunk
    for first in range(0, n_boot, chunk):
        b = min(chunk, n_boot - first)
        for i in range(b):
            W[i] = np.bincount(rng.integers(0, n, n), minlength=n)
        w = W[:b]
        total = w.sum(axis=1)  # (b,)
        sums = weighted_code_sums(Z, pos_code, n_pos, w)  # (b, T, m) weighted sums per position
        grand = sums.sum(axis=1) / total[:, None]  # (b, m)
        sst = w @ sq - total * (grand**2).sum(axis=1)  # (b,)
        cnt = np.stack([np.bincount(pos_code, weights=wi, minlength=n_pos) for wi in w])  # (b, T)
        ok = cnt > 0
        means = sums / np.where(ok, cnt, 1)[:, :, None]
        ssb = (np.where(ok, cnt, 0) * ((means - grand[:, None, :]) ** 2).sum(axis=2)).sum(axis=1)  # (b,)
        values.extend(np.where(sst > 0, ssb / np.where(sst > 0, sst, 1), 0.0))
    return np.asarray(values)


def _heldout_r2(
    X: np.ndarray,
    pos_code: np.ndarray,
    pos_sums: np.ndarray,
    pos_counts: np.ndarray,
    g_code: np.ndarray,
    g_sums: np.ndarray,
    shift: np.ndarray,
) -> dict[str, float]:
    """Leave-one-group-out R2: predict each token by the mean of the other groups at its position, and
    compare with predicting it by the other groups' overall mean (so ~0 when position carries nothing
    that generalizes across groups). Per-position and per-group sums of x - shift come in. Every token
    of a (group, position) cell has the same two predictions, so the squared errors come from the cell's
    sum and sum of squares (about the grand mean, so nothing cancels): sum |x - m|^2 = S2 - 2 <S, m> + c |m|^2.
    The cells' sums are made a few whole groups at a time, so no (n, d) temporary exists."""
    n = len(X)
    g_counts = np.bincount(g_code, minlength=len(g_sums))
    total = g_sums.sum(axis=0)
    grand = total / n  # (d,) of x - shift
    pos_c = pos_sums - pos_counts[:, None] * grand  # (T, d) sums about the grand mean
    sorted_groups = bool((np.diff(g_code) >= 0).all())
    order = np.arange(n) if sorted_groups else np.argsort(g_code, kind="stable")
    starts = np.searchsorted(
        g_code[order], np.arange(len(g_sums) + 1)
    )  # rows of group g: order[starts[g]:starts[g+1]]
    sse_pos = sse_all = 0.0
    n_ok = 0
    g = 0
    while g < len(g_sums):
        h = max(
            g + 1, int(np.searchsorted(starts, starts[g] + BLOCK, "right")) - 1
        )  # whole groups, ~BLOCK rows
        rows = slice(starts[g], starts[h]) if sorted_groups else order[starts[g] : starts[h]]
        pair = g_code[rows] * len(pos_counts) + pos_code[rows]
        keys, pair_inv, c = np.unique(pair, return_inverse=True, return_counts=True)
        pair_inv = pair_inv.ravel()
        (S,), sq = code_sums64(X[rows], [(pair_inv, len(keys))], shift=shift + grand, with_sq=True)
        S2 = np.bincount(
            pair_inv, weights=sq, minlength=len(keys)
        )  # (P,) sums of squares about the grand mean
        gr, p = keys // len(pos_counts), keys % len(pos_counts)
        other = pos_counts[p] - c
        ok = (other > 0) & (g_counts[gr] < n)
        if ok.any():
            S, S2, c, gr, p = S[ok], S2[ok], c[ok], gr[ok], p[ok]
            u = (pos_c[p] - S) / other[ok, None]  # (P, d) other groups' mean at t, minus the grand mean
            v = (total - g_sums[gr]) / (n - g_counts[gr])[:, None] - grand  # other groups' mean, minus it
            sse_pos += float((S2 - 2 * (S * u).sum(axis=1) + c * (u**2).sum(axis=1)).sum())
            sse_all += float((S2 - 2 * (S * v).sum(axis=1) + c * (v**2).sum(axis=1)).sum())
            n_ok += int(c.sum())
        g = h
    if n_ok == 0:
        return {"heldout": float("nan"), "heldout_coverage": 0.0}
    return {"heldout": 1 - sse_pos / sse_all if sse_all > 0 else float("nan"), "heldout_coverage": n_ok / n}


def _sample(n: int, n_queries: int | None, rng: np.random.Generator) -> np.ndarray:
    if n_queries is None or n <= n_queries:
        return np.arange(n)
    return np.sort(rng.choice(n, n_queries, replace=False))


def knn_other_groups(
    X: np.ndarray,
    groups: np.ndarray,
    queries: np.ndarray,
    k: int,
    workspace: neighbours.Workspace | None = None,
) -> np.ndarray:
    """Indices (len(queries), k) of each query's k nearest tokens (Euclidean) among tokens of other groups.

    Exact by brute force up to neighbours.EXACT_QUERY_MAX tokens, approximate above (analysis.engine.neighbours);
    a KD-tree in 1-3 dimensions (projections). Rows with fewer than k candidates are padded with -1.
    workspace: X's (analysis.engine.neighbours.Workspace), when X is a view's neighbour space.
    """
    groups = np.asarray(groups)
    if X.shape[1] <= 3:
        return _knn_other_groups_tree(np.asarray(X, dtype=np.float32), groups, queries, k)
    return neighbours.search(X, queries, k, groups, workspace=workspace)


def _knn_other_groups_tree(X: np.ndarray, groups: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Low-dimensional case (a 2-D projection): a KD-tree query deep enough to skip the query's own group."""
    from sklearn.neighbors import KDTree

    _, sizes = np.unique(groups, return_counts=True)
    depth = int(min(len(X), k + sizes.max()))
    _, idx = KDTree(X).query(X[queries], k=depth)
    other = groups[idx] != groups[queries, None]
    out = np.full((len(queries), k), -1, np.int64)
    rank = np.cumsum(other, axis=1) - 1
    rows, cols = np.nonzero(other & (rank < k))
    out[rows, rank[rows, cols]] = idx[rows, cols]
    return out


class WithinShuffler:
    """Permutations of values within each group, the groups sorted once (a view shuffles the same branches
    dozens of times). Each call is the draw `np.lexsort((rng.random(n), groups))` always made, found by a
    stable sort of the uniform keys within each group (analysis.engine.kernels): the same permutation."""

    def __init__(self, groups: np.ndarray):
        groups = np.asarray(groups)
        self.n = len(groups)
        self.by_group = np.argsort(groups, kind="stable")  # (n,) rows of each group together, in row order
        g_sorted = groups[self.by_group]
        edges = np.flatnonzero(g_sorted[1:] != g_sorted[:-1]) + 1 if self.n else np.zeros(0, np.int64)
        self.starts = np.concatenate([[0], edges, [self.n]]).astype(
            np.int64
        )  # group g: by_group[starts[g]:starts[g+1]]

    def __call__(self, values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """values (n,) permuted at random within each group."""
        from analysis.engine.kernels import shuffle_within as within  # numba: imported by the first shuffle

        return within(np.asarray(values), rng.random(self.n), self.by_group, self.starts)


class GroupFlipper:
    """Positions reflected about their group's mean (t -> 2 m_g - t) in a random half of the groups, a new
    half each draw (the same number flipped as kept, give or take one, so a probe trained on most groups
    sees the real and the reversed meaning of position about equally often).

    Unlike a shuffle, runs of consecutive positions stay consecutive, so content that drifts along a
    branch keeps its drift against the flipped positions: a probe finds spurious trends to fit as it does
    on the real positions. What position means is reversed between groups, so a probe trained on some
    groups reads nothing real in another. Where content drifts the same way forward and backward in time
    (any stationary Gaussian process), the flipped positions are as good a null as the real ones."""

    MIN_GROUPS = 4  # a flip and its complement give one R2: 2 groups have 1 distinct null, 4 have 3

    def __init__(self, groups: np.ndarray, position: np.ndarray):
        self.code = np.unique(np.asarray(groups), return_inverse=True)[1].ravel()
        self.n_groups = int(self.code.max()) + 1 if len(self.code) else 0
        self.position = np.asarray(position, np.float64)
        sums = np.bincount(self.code, self.position, minlength=self.n_groups)
        self.mirror = 2 * (sums / np.maximum(np.bincount(self.code, minlength=self.n_groups), 1))[self.code]

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """(n,) the positions, reflected in the drawn half of the groups."""
        G = self.n_groups
        half = G // 2 + (G % 2 and rng.random() < 0.5)  # odd: one more or one fewer at random
        flip = np.zeros(G, bool)
        flip[rng.permutation(G)[:half]] = True
        return np.where(flip[self.code], self.mirror - self.position, self.position)


def shuffle_within(values: np.ndarray, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """values permuted at random within each group (WithinShuffler(groups) for many draws)."""
    return WithinShuffler(groups)(values, rng)


def knn_position_leak(
    X: np.ndarray,
    position: np.ndarray,
    groups: np.ndarray,
    k: int = 10,
    n_queries: int | None = 1000,
    n_shuffles: int = 20,
    seed: int = 0,
    units: np.ndarray | None = None,
    workspace: neighbours.Workspace | None = None,
) -> dict[str, float]:
    """Mean |t_i - t_j| over each token's k nearest neighbours from other groups (branches), vs shuffled.

    Neighbours in time within a branch are trivially close, hence other groups only. `chance` is the
    same statistic with positions shuffled within each group (mean of n_shuffles, spread in chance_sd):
    that keeps each branch's span (forks start late, branches end early), so content that picks a
    late-starting branch as neighbour is not counted as position. `leak` = 1 - observed / chance:
    0 at chance, 1 when neighbours sit at the very same position, below 0 when farther than chance.
    Band: sd, lo, hi of the leak over bootstrap resamples of the queries, or with `units` (n,) (prompts)
    of whole units, so it carries what another set of prompts would give (analysis.resample); chance_lo /
    chance_hi: the interval a leak at chance would fall in.
    """
    position = np.asarray(position, dtype=np.float64)
    rng = np.random.default_rng(seed)
    queries = _sample(len(position), n_queries, rng)
    nbrs = knn_other_groups(X, groups, queries, k, workspace)
    valid = nbrs >= 0
    if not valid.any():
        raise ValueError("knn_position_leak needs tokens from at least two groups")

    n_valid = np.maximum(valid.sum(axis=1), 1)

    def per_query(pos: np.ndarray) -> np.ndarray:
        """(q,) mean |t_i - t_j| over each query's valid neighbours."""
        d = np.abs(pos[queries, None] - pos[np.where(valid, nbrs, 0)])
        return np.where(valid, d, 0).sum(axis=1) / n_valid

    groups = np.asarray(groups)
    observed_q = per_query(position)  # (q,)
    shuffle = WithinShuffler(groups)
    shuffled_q = np.stack([per_query(shuffle(position, rng)) for _ in range(n_shuffles)])  # (s, q)
    observed, shuffled = float(observed_q.mean()), shuffled_q.mean(axis=1)
    chance = float(shuffled.mean())
    out = {
        "mean_abs_dpos": observed,
        "chance": chance,
        "chance_sd": float(np.std(shuffled)),
        "leak": 1 - observed / chance if chance > 0 else float("nan"),
        "k": k,
        "n_queries": len(queries),
    }
    # Bands: resample the query tokens (what a new sample of queries would give), or whole units; at
    # chance, the leak of each shuffle against the rest.
    expected_q = shuffled_q.mean(axis=0)
    if units is None:
        boot = rng.integers(0, len(queries), size=(N_BOOT, len(queries)))
        leaks = 1 - observed_q[boot].mean(axis=1) / np.maximum(expected_q[boot].mean(axis=1), 1e-12)
    else:
        W = resample.counts(N_BOOT, len(queries), rng, np.asarray(units)[queries])  # (B, q)
        leaks = 1 - (W @ observed_q) / np.maximum(W @ expected_q, 1e-12)
    null = 1 - shuffled / chance if chance > 0 else np.zeros(1)
    out.update(
        _band(leaks)
        if units is None
        else resample.widened_band(leaks, out["leak"], resample.n_units(np.asarray(units)[queries]))
    )
    half = Z * float(np.hypot(out["sd"], out_sd(null)))  # query sampling and shuffle noise together
    out.update(chance_leak=0.0, chance_lo=-half, chance_hi=half)
    return out


N_BOOT = 200  # bootstrap resamples behind every band


def out_sd(values: np.ndarray) -> float:
    return float(np.std(values)) if len(values) > 1 else 0.0


def _band(boot: np.ndarray) -> dict[str, float]:
    """sd and 95% interval of a bootstrap distribution."""
    boot = np.asarray(boot, dtype=np.float64)
    boot = boot[np.isfinite(boot)]
    if len(boot) == 0:
        return {"sd": float("nan"), "lo": float("nan"), "hi": float("nan")}
    return {"sd": out_sd(boot), "lo": float(np.quantile(boot, 0.025)), "hi": float(np.quantile(boot, 0.975))}


def label_purity(
    X: np.ndarray,
    position: np.ndarray,
    labels: np.ndarray,
    k: int = 10,
    window: int | None = 2,
    n_queries: int | None = 1000,
    seed: int = 0,
    units: np.ndarray | None = None,
    workspace: neighbours.Workspace | None = None,
) -> dict[str, float]:
    """kNN agreement of labels (branch or prompt): the share of a token's k nearest neighbours with its label.

    window=w compares only tokens at |t_j - t_i| <= w (matched positions: position cannot help),
    window=None pools all tokens (then n_queries sampled tokens ask, all tokens answer; with branch
    labels, a branch's own neighbours in time count too). `chance` is the share a random pick from the same candidates would
    give. Band over the queries, or with `units` (n,) over whole units (prompts). Subtracting the exact per-position mean shifts every candidate at t by the same vector, so at
    window=0 it leaves this number unchanged: a method that lowers it removed content.
    """
    if workspace is not None:
        workspace.holds(X)
    X = np.asarray(X, dtype=np.float32)
    position = np.asarray(position)
    labels = np.asarray(labels)
    if window is None:
        queries = _sample(len(X), n_queries, np.random.default_rng(seed))
        return _purity_summary(*_purity_pooled(X, labels, queries, k, workspace), seed, _of(units, queries))
    # Matched positions: every token asks up to EXACT_QUERY_MAX tokens, n_queries sampled ones above
    # (the band then carries the sampling); candidates within the window, exact either way.
    sample = None if len(X) <= neighbours.EXACT_QUERY_MAX else n_queries
    depth = max(k, MATCHED_DEPTH)  # one search serves k=1 and k=10, branch and prompt labels
    build = lambda: _matched_neighbours(X, position, window, depth, sample, seed)
    key = ("matched", window, depth, sample, seed)  # one workspace, one view's positions
    asks, nbrs = build() if workspace is None else workspace.kept(key, build)
    cols = nbrs[:, :k]
    valid = cols >= 0
    has = valid.any(axis=1)
    hits = ((labels[np.where(valid, cols, 0)] == labels[asks, None]) & valid).sum(axis=1)[has] / valid.sum(
        axis=1
    )[has]
    return _purity_summary(
        hits, _window_label_share(position, labels, asks[has], window), seed, _of(units, asks[has])
    )


def _of(units: np.ndarray | None, rows: np.ndarray) -> np.ndarray | None:
    return None if units is None else np.asarray(units)[rows]


MATCHED_DEPTH = 10


def _matched_neighbours(
    X: np.ndarray, position: np.ndarray, window: int, k: int, sample: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(asking tokens (q,), their k nearest tokens within |t_j - t_i| <= window, self excluded (q, k), -1
    pads): every token asks, or `sample` of them drawn with `seed`. Exact.

    Positions are walked in order and each position's rows (and squared norms) are gathered once, kept
    while a window still needs them, instead of gathering every window's 2 * window + 1 positions anew."""
    asks = np.zeros(len(X), bool)
    asks[_sample(len(X), sample, np.random.default_rng(seed))] = True
    order = np.argsort(position, kind="stable")
    sorted_pos = position[order]
    ts, first = np.unique(sorted_pos, return_index=True)  # positions present, their first row in `order`
    bounds = np.append(first, len(order))
    out_q, out_n = [], []
    with one_thread():  # products of a few asking rows with a window's rows: small
        _matched_walk(X, position, asks, window, k, order, ts, bounds, out_q, out_n)
    return np.concatenate(out_q), np.concatenate(out_n)


def _matched_walk(
    X: np.ndarray,
    position: np.ndarray,
    asks: np.ndarray,
    window: int,
    k: int,
    order: np.ndarray,
    ts: np.ndarray,
    bounds: np.ndarray,
    out_q: list,
    out_n: list,
) -> None:
    """_matched_neighbours' walk over the asked positions; appends each position's (asks, neighbours)."""
    held: dict[
        int, tuple[np.ndarray, np.ndarray, np.ndarray]
    ] = {}  # position index -> (rows, X[rows], |x|^2)
    for t in np.unique(position[asks]):
        lo, hi = np.searchsorted(ts, t - window, "left"), np.searchsorted(ts, t + window, "right")
        for j in [j for j in held if j < lo]:
            del held[j]
        for j in range(lo, hi):
            if j not in held:
                rows = order[bounds[j] : bounds[j + 1]]
                Xj = X[rows]
                held[j] = (rows, Xj, (Xj * Xj).sum(axis=1))
        at = np.searchsorted(ts, t)
        q = order[bounds[at] : bounds[at + 1]]
        q = q[asks[q]]
        c = np.concatenate([held[j][0] for j in range(lo, hi)])  # candidates, in position order
        nn = np.full((len(q), k), -1, np.int64)
        kk = min(k, len(c) - 1)
        if kk >= 1:
            Xq = X[q]
            dots = np.concatenate([Xq @ held[j][1].T for j in range(lo, hi)], axis=1)  # (q, c)
            sq_c = np.concatenate([held[j][2] for j in range(lo, hi)])
            d2 = (Xq * Xq).sum(axis=1)[:, None] - 2 * dots + sq_c[None, :]  # (q, c)
            d2[q[:, None] == c[None, :]] = np.inf
            part = np.argpartition(d2, kk - 1, axis=1)[:, :kk]
            part = np.take_along_axis(part, np.argsort(np.take_along_axis(d2, part, axis=1), axis=1), axis=1)
            nn[:, :kk] = c[part]
        out_q.append(q)
        out_n.append(nn)


def _window_label_share(
    position: np.ndarray, labels: np.ndarray, asks: np.ndarray, window: int
) -> np.ndarray:
    """Per asking token (q,): the share of the other tokens within |t_j - t_i| <= window with its label."""
    _, code = np.unique(labels, return_inverse=True)
    code = code.ravel()
    order = np.argsort(position, kind="stable")
    sorted_pos = position[order]
    share = np.empty(len(asks))
    for t in np.unique(position[asks]):
        at = np.flatnonzero(position[asks] == t)
        c = order[
            np.searchsorted(sorted_pos, t - window, "left") : np.searchsorted(sorted_pos, t + window, "right")
        ]
        counts = np.bincount(code[c], minlength=code.max() + 1)
        share[at] = (counts[code[asks[at]]] - 1) / max(len(c) - 1, 1)
    return share


def _purity_pooled(
    X: np.ndarray, labels: np.ndarray, queries: np.ndarray, k: int, workspace: neighbours.Workspace | None
) -> tuple[np.ndarray, np.ndarray]:
    """Per query: (share of its k nearest tokens, self excluded, with its label; that share by chance).
    Neighbours from analysis.engine.neighbours.search: exact up to EXACT_QUERY_MAX tokens, approximate above."""
    nbrs = neighbours.search(X, queries, min(k, len(X) - 1), workspace=workspace)  # (q, k), self excluded
    valid = nbrs >= 0
    same = (labels[np.where(valid, nbrs, 0)] == labels[queries, None]) & valid
    _, code, counts = np.unique(labels, return_inverse=True, return_counts=True)
    chance = (counts[code.ravel()[queries]] - 1) / (len(X) - 1)
    return same.sum(axis=1) / np.maximum(valid.sum(axis=1), 1), chance


def _purity_summary(
    hits: np.ndarray, chances: np.ndarray, seed: int, units: np.ndarray | None = None
) -> dict[str, float]:
    """Mean purity and chance over queries, with a bootstrap band over the queries (or their units)."""
    if len(hits) == 0:
        return {
            "purity": float("nan"),
            "chance": float("nan"),
            "n_queries": 0,
            "sd": float("nan"),
            "lo": float("nan"),
            "hi": float("nan"),
        }
    rng = np.random.default_rng(seed + 3)
    if units is None:
        boot = hits[rng.integers(0, len(hits), size=(N_BOOT, len(hits)))].mean(axis=1)
    else:
        W = resample.counts(N_BOOT, len(hits), rng, units)  # (B, q)
        boot = (W @ hits) / np.maximum(W.sum(axis=1), 1)
    band = (
        _band(boot)
        if units is None
        else resample.widened_band(boot, float(hits.mean()), resample.n_units(units))
    )
    band |= {"lo": max(band["lo"], 0.0), "hi": min(band["hi"], 1.0)}  # a share: a widened band reached 1.14
    return {
        "purity": float(hits.mean()),
        "chance": float(chances.mean()),
        "n_queries": int(len(hits)),
        **band,
    }


def _untrusted_penalties(X: np.ndarray, Y: np.ndarray, k: int) -> np.ndarray:
    """(n,) per-token sum over its k nearest in Y of max(0, rank in X - k): trustworthiness's penalty
    (Venna & Kaski), kept per token so it can be resampled. sum / normalizer = 1 - sklearn's value."""
    n = len(X)
    sq = (X * X).sum(axis=1)
    dx = sq[:, None] - 2 * (X @ X.T) + sq[None, :]  # (n, n) squared distances, high space
    np.fill_diagonal(dx, np.inf)
    rank = np.empty((n, n), np.int64)  # rank[i, j]: j is i's rank-th nearest in X (1-based)
    rank[np.arange(n)[:, None], np.argsort(dx, axis=1)] = np.arange(1, n + 1)
    sy = (Y * Y).sum(axis=1)
    dy = sy[:, None] - 2 * (Y @ Y.T) + sy[None, :]
    np.fill_diagonal(dy, np.inf)
    nn = np.argpartition(dy, k - 1, axis=1)[:, :k]  # (n, k) nearest in Y
    return np.maximum(np.take_along_axis(rank, nn, axis=1) - k, 0).sum(axis=1).astype(np.float64)


def trustworthiness(
    X_high: np.ndarray,
    X_low: np.ndarray,
    k: int = 10,
    n_samples: int | None = 1500,
    seed: int = 0,
) -> dict[str, float]:
    """Trustworthiness (are 2-D neighbours true neighbours?) and continuity (are true neighbours kept?).

    sklearn's definition on a random sample of tokens (full distance matrices); continuity is the same
    measure with the roles of the two spaces swapped. Band (sd, lo, hi; continuity_lo/_hi): bootstrap over
    the sampled tokens' penalties. Chance: a random layout scores ~0.5.
    """
    rng = np.random.default_rng(seed)
    idx = _sample(len(X_high), n_samples, rng)
    hi, lo = np.asarray(X_high)[idx].astype(np.float64), np.asarray(X_low)[idx].astype(np.float64)
    n = len(idx)
    k = int(min(k, (n - 1) // 2))
    if k < 1:
        return {
            "trustworthiness": float("nan"),
            "continuity": float("nan"),
            "k": k,
            "sd": float("nan"),
            "lo": float("nan"),
            "hi": float("nan"),
        }
    scale = 2.0 / (n * k * (2.0 * n - 3.0 * k - 1.0))
    trust_p, cont_p = _untrusted_penalties(hi, lo, k), _untrusted_penalties(lo, hi, k)
    boot = rng.integers(0, n, size=(N_BOOT, n))
    band = _band(1 - scale * n * trust_p[boot].mean(axis=1))
    cont = _band(1 - scale * n * cont_p[boot].mean(axis=1))
    return {
        "trustworthiness": float(1 - scale * trust_p.sum()),
        "continuity": float(1 - scale * cont_p.sum()),
        "k": k,
        **band,
        "continuity_sd": cont["sd"],
        "continuity_lo": cont["lo"],
        "continuity_hi": cont["hi"],
    }
