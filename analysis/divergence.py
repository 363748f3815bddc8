"""Where branches go apart, without a projection: the distance between two related branches at matched
positions after their fork, against the distance between tokens of unrelated prompts at the same position.

Both distances compare tokens at the same position t, so subtracting any function of position (the
exact per-position mean, a fitted curve, the true positional part) leaves every number here unchanged:
these are the divergence curves that no positional removal can fake.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = ("fork", "siblings")


@dataclass
class DivergenceResult:
    """Matched-position distances of related branch pairs, and the unrelated-prompt baseline.

    Per pair (P,): pair_a, pair_b (branch ids), pair_kind ("fork": a is the child of b; "siblings":
    children of one parent), pair_start (first position compared), pair_prompt.
    Per matched position (M,): pair (index into the pair arrays), position, offset (position - start),
    row_a, row_b (token rows), distance |x_a(t) - x_b(t)|, baseline (at t), ratio (distance / baseline).
    Per position with matched tokens (T,): baseline_position, baseline (median cross-prompt distance),
    its bootstrap sd / lo / hi over the sampled cross-prompt pairs, and baseline_n (pairs used; 0 where
    fewer than two prompts have a token at t, then NaN).
    has_baseline is False when there is one prompt: ratios are NaN, `note` says why.
    """

    pair_a: np.ndarray
    pair_b: np.ndarray
    pair_kind: np.ndarray
    pair_start: np.ndarray
    pair_prompt: np.ndarray
    pair: np.ndarray
    position: np.ndarray
    offset: np.ndarray
    row_a: np.ndarray
    row_b: np.ndarray
    distance: np.ndarray
    baseline: np.ndarray
    ratio: np.ndarray
    baseline_position: np.ndarray
    baseline_value: np.ndarray
    baseline_sd: np.ndarray
    baseline_lo: np.ndarray
    baseline_hi: np.ndarray
    baseline_n: np.ndarray
    has_baseline: bool
    note: str = ""

    @property
    def kind(self) -> np.ndarray:
        """Pair kind of each matched position (M,)."""
        return self.pair_kind[self.pair]

    @property
    def prompt(self) -> np.ndarray:
        """Prompt of each matched position (M,)."""
        return self.pair_prompt[self.pair]


def _branch_table(
    position: np.ndarray,
    branch: np.ndarray,
    parent: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(branch ids (B,), first position (B,), parent id (B,)), from per-token columns."""
    ids, inv = np.unique(branch, return_inverse=True)
    inv = inv.ravel()
    first = np.full(len(ids), np.iinfo(np.int64).max)
    np.minimum.at(first, inv, position)
    par = np.empty(len(ids), np.int64)
    par[inv] = parent  # constant along a branch
    return ids, first, par


def branch_pairs(
    position: np.ndarray,
    branch: np.ndarray,
    parent: np.ndarray,
    max_sibling_pairs: int | None = 50,
    seed: int = 0,
) -> list[tuple[int, int, str, int]]:
    """Related branch pairs (a, b, kind, start), from per-token position, branch and parent (-1 at roots).

    - ("fork"): a child and its parent, start = the child's first stored position (its fork position).
      Listed only when the parent has tokens here.
    - ("siblings"): two children of one parent (a < b), start = the later of their first positions, so
      both hold their own tokens from start on. At most max_sibling_pairs per parent, drawn at random
      (seeded) when there are more, so 150 siblings do not give 11k pairs.
    Roots (parent -1) are not siblings of each other: they belong to different prompts.
    """
    position, branch, parent = (np.asarray(a, dtype=np.int64) for a in (position, branch, parent))
    ids, first, par = _branch_table(position, branch, parent)
    present = set(ids.tolist())
    pairs = [
        (int(b), int(p), "fork", int(f)) for b, p, f in zip(ids, par, first) if p >= 0 and int(p) in present
    ]
    rng = np.random.default_rng(seed)
    for p in np.unique(par[par >= 0]):
        kids = np.flatnonzero(par == p)  # indices into ids, sorted by branch id
        i, j = np.triu_indices(len(kids), k=1)
        if max_sibling_pairs is not None and len(i) > max_sibling_pairs:
            keep = np.sort(rng.choice(len(i), max_sibling_pairs, replace=False))
            i, j = i[keep], j[keep]
        a, b = kids[i], kids[j]
        pairs += [(int(ids[x]), int(ids[y]), "siblings", int(max(first[x], first[y]))) for x, y in zip(a, b)]
    return pairs


def _matched_rows(
    position: np.ndarray,
    branch: np.ndarray,
    pairs: list[tuple[int, int, str, int]],
    max_offset: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(pair index, t, row of a at t, row of b at t) for every t >= start where both branches hold a token."""
    ids, inv = np.unique(branch, return_inverse=True)
    inv = inv.ravel()
    pmin = int(position.min())
    span = int(position.max()) - pmin + 1
    key = inv * span + (position - pmin)  # (n,) one key per stored (branch, position)
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    last = np.full(len(ids), pmin - 1)
    np.maximum.at(last, inv, position)
    a = np.searchsorted(ids, [p[0] for p in pairs])
    b = np.searchsorted(ids, [p[1] for p in pairs])
    start = np.array([p[3] for p in pairs], np.int64)
    stop = np.minimum(last[a], last[b])  # inclusive
    if max_offset is not None:
        stop = np.minimum(stop, start + max_offset)
    count = np.maximum(stop - start + 1, 0)
    pair = np.repeat(np.arange(len(pairs)), count)
    t = start[pair] + np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)

    def lookup(code: np.ndarray) -> np.ndarray:
        k = code[pair] * span + (t - pmin)
        at = np.minimum(np.searchsorted(sorted_key, k), len(sorted_key) - 1)
        return np.where(sorted_key[at] == k, order[at], -1)

    row_a, row_b = lookup(a), lookup(b)
    ok = (row_a >= 0) & (row_b >= 0)
    return pair[ok], t[ok], row_a[ok], row_b[ok]


def _distances(X: np.ndarray, rows_a: np.ndarray, rows_b: np.ndarray, block: int = 65536) -> np.ndarray:
    """|X[a] - X[b]| per pair of rows, in float64 so that shifting both rows by one vector changes nothing."""
    out = np.empty(len(rows_a))
    for s in range(0, len(rows_a), block):
        diff = X[rows_a[s : s + block]].astype(np.float64) - X[rows_b[s : s + block]]  # (m, d)
        out[s : s + block] = np.sqrt((diff * diff).sum(axis=1))
    return out


def _cross_prompt_pairs(
    rows: np.ndarray,
    prompt: np.ndarray,
    n_pairs: int,
    rng: np.random.Generator,
    enumerate_below: int = 200,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of rows (from `rows`, tokens at one position) whose prompts differ.

    All such pairs when they are at most n_pairs (and rows are few); otherwise n_pairs drawn uniformly
    from all cross-prompt pairs, with replacement.
    """
    p = prompt[rows]
    _, counts = np.unique(p, return_counts=True)
    n_cross = (len(rows) ** 2 - int((counts**2).sum())) // 2
    if n_cross == 0:
        return rows[:0], rows[:0]
    if n_cross <= n_pairs and len(rows) <= enumerate_below:
        i, j = np.triu_indices(len(rows), k=1)
        keep = p[i] != p[j]
        return rows[i[keep]], rows[j[keep]]
    rows = rows[np.argsort(p, kind="stable")]
    p = np.sort(p)
    lo = np.searchsorted(p, p, "left")  # each row's prompt block [lo, hi)
    hi = np.searchsorted(p, p, "right")
    others = len(rows) - (hi - lo)  # (r,) tokens of other prompts
    i = rng.choice(len(rows), n_pairs, p=others / others.sum())  # weight by partners: uniform over pairs
    u = (rng.random(n_pairs) * others[i]).astype(np.int64)
    j = np.where(u < lo[i], u, u + (hi[i] - lo[i]))  # skip i's own prompt block
    return rows[i], rows[j]


def _median_band(
    values: np.ndarray, n_boot: int, rng: np.random.Generator
) -> tuple[float, float, float, float]:
    """(median, bootstrap sd, 2.5% and 97.5% quantiles) of the median of values."""
    boots = np.median(values[rng.integers(len(values), size=(n_boot, len(values)))], axis=1)  # (n_boot,)
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return float(np.median(values)), float(boots.std()), float(lo), float(hi)


def _baseline(
    X: np.ndarray,
    position: np.ndarray,
    prompt: np.ndarray,
    positions: np.ndarray,
    n_pairs: int,
    n_boot: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Median distance between tokens of different prompts at each of `positions`, with a bootstrap band."""
    out = {k: np.full(len(positions), np.nan) for k in ("value", "sd", "lo", "hi")}
    out["n"] = np.zeros(len(positions), np.int64)
    order = np.argsort(position, kind="stable")
    sorted_pos = position[order]
    for i, t in enumerate(positions):
        rows = order[np.searchsorted(sorted_pos, t, "left") : np.searchsorted(sorted_pos, t, "right")]
        ra, rb = _cross_prompt_pairs(rows, prompt, n_pairs, rng)
        if len(ra) == 0:
            continue
        d = _distances(X, ra, rb)
        out["value"][i], out["sd"][i], out["lo"][i], out["hi"][i] = _median_band(d, n_boot, rng)
        out["n"][i] = len(ra)
    return out


def _row_of_branch(branch: np.ndarray, ids: list[int] | np.ndarray) -> np.ndarray:
    """For each branch id in ids, the row of one of its tokens."""
    uniq, first_row = np.unique(branch, return_index=True)
    return first_row[np.searchsorted(uniq, np.asarray(ids, np.int64))].astype(np.int64)


def divergence(
    X: np.ndarray,
    position: np.ndarray,
    branch: np.ndarray,
    prompt: np.ndarray,
    parent: np.ndarray,
    max_offset: int | None = None,
    n_baseline_pairs: int = 200,
    max_sibling_pairs: int | None = 50,
    n_boot: int = 200,
    seed: int = 0,
) -> DivergenceResult:
    """Distances between related branches (branch_pairs) at every matched position t >= their start,
    and their ratio to the typical distance between tokens of unrelated prompts at the same t.

    The baseline at t is the median distance over n_baseline_pairs cross-prompt token pairs at t (all of
    them when fewer), with a bootstrap band over those pairs. Ratio 1 = as far apart as unrelated
    prompts (chance); below 1 = the pair still shares content. With one prompt there is no baseline:
    ratios are NaN and has_baseline is False. Tokens at t are the branches' own stored tokens: from
    start on both members of a pair hold their own (a child's inherited prefix lies before its start).
    Drop attention sinks first if they should not count (they only matter for a fork at position 0).
    """
    X = np.asarray(X)
    position, branch, prompt, parent = (
        np.asarray(a, dtype=np.int64) for a in (position, branch, prompt, parent)
    )
    rng = np.random.default_rng(seed)
    pairs = branch_pairs(position, branch, parent, max_sibling_pairs, seed)
    if pairs:
        pair, t, row_a, row_b = _matched_rows(position, branch, pairs, max_offset)
    else:
        pair = t = row_a = row_b = np.zeros(0, np.int64)
    start = np.array([p[3] for p in pairs], np.int64)
    distance = _distances(X, row_a, row_b)
    b_pos = np.unique(t)
    n_prompts = len(np.unique(prompt))
    has_baseline = n_prompts >= 2
    if has_baseline:
        base = _baseline(X, position, prompt, b_pos, n_baseline_pairs, n_boot, rng)
    else:
        base = {k: np.full(len(b_pos), np.nan) for k in ("value", "sd", "lo", "hi")} | {
            "n": np.zeros(len(b_pos), np.int64)
        }
    baseline = base["value"][np.searchsorted(b_pos, t)] if len(t) else np.zeros(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = distance / baseline
    note = (
        ""
        if has_baseline
        else "one prompt: no unrelated prompts to compare with, so no baseline and no ratio"
    )
    if not pairs:
        note = (note + "; " if note else "") + "no related branch pairs"
    return DivergenceResult(
        pair_a=np.array([p[0] for p in pairs], np.int64),
        pair_b=np.array([p[1] for p in pairs], np.int64),
        pair_kind=np.array([p[2] for p in pairs], dtype="<U8"),
        pair_start=start,
        pair_prompt=prompt[_row_of_branch(branch, [p[0] for p in pairs])],
        pair=pair,
        position=t,
        offset=t - start[pair],
        row_a=row_a,
        row_b=row_b,
        distance=distance,
        baseline=baseline,
        ratio=ratio,
        baseline_position=b_pos,
        baseline_value=base["value"],
        baseline_sd=base["sd"],
        baseline_lo=base["lo"],
        baseline_hi=base["hi"],
        baseline_n=base["n"],
        has_baseline=has_baseline,
        note=note,
    )


def _weighted_median(sorted_values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Median of sorted_values (m,) under each row of weights (b, m); np.median when all weights are 1,
    NaN for a row of zero weights."""
    cum = np.cumsum(weights, axis=1)  # (b, m)
    half = cum[:, -1:] / 2
    lower = np.minimum((cum < half).sum(axis=1), len(sorted_values) - 1)  # first index with cum >= half
    upper = np.minimum((cum <= half).sum(axis=1), len(sorted_values) - 1)  # first index with cum > half
    out = (sorted_values[lower] + sorted_values[upper]) / 2
    return np.where(cum[:, -1] > 0, out, np.nan)


def _dyadic_median_band(
    values: np.ndarray,
    ca: np.ndarray,
    cb: np.ndarray,
    branch_w: np.ndarray,
    chunk: int = 25,
) -> tuple[float, float, float, float]:
    """(median, sd, 2.5%, 97.5%) of the median of values measured on branch pairs (codes ca, cb).

    Pairs are resampled through their branches (Owen's pigeonhole bootstrap for dyadic data): in each
    replicate every branch has a Poisson(1) weight, branch_w (B, branches), and a pair weighs the
    product of its two. Sibling pairs share branches (10 siblings make 45 pairs out of 10 branches'
    tokens), so resampling pairs as if they were independent gives bands about half as wide as the
    spread between seeds.
    """
    if len(values) == 0:
        return (np.nan,) * 4
    order = np.argsort(values, kind="stable")
    v, ca, cb = values[order], ca[order], cb[order]
    boots = np.concatenate(
        [
            _weighted_median(v, w[:, ca] * w[:, cb])
            for w in np.split(branch_w, range(chunk, len(branch_w), chunk))
        ]
    )
    boots = boots[np.isfinite(boots)]
    if len(boots) == 0:
        return float(np.median(v)), np.nan, np.nan, np.nan
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return float(np.median(v)), float(boots.std()), float(lo), float(hi)


def divergence_summary(
    result: DivergenceResult,
    by: str = "offset",
    kind: str | None = None,
    n_boot: int = 200,
    seed: int = 0,
    prompt: int | None = None,
) -> dict[str, np.ndarray | float | bool | str]:
    """Median ratio (and median distance) per offset since the fork, per prompt or per pair kind.

    Bands bootstrap pairs, not tokens (the matched positions of one pair are not independent), and
    resample them through their branches, since sibling pairs share branches (_dyadic_median_band);
    the baseline is held fixed (its own band is in the result). kind restricts
    to "fork" or "siblings" pairs, prompt to one prompt's pairs. chance = 1: a ratio of 1 means as far apart as tokens of unrelated
    prompts at the same position. Keys: by, key (G,), median, sd, lo, hi (ratio), distance, distance_lo,
    distance_hi, n_pairs, n_tokens (G,), chance, has_baseline, note.
    """
    if by not in ("offset", "prompt", "kind"):
        raise ValueError(f"by must be 'offset', 'prompt' or 'kind', got {by!r}")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
    rng = np.random.default_rng(seed)
    keep = np.ones(len(result.pair), bool) if kind is None else result.kind == kind
    if prompt is not None:
        keep &= result.prompt == prompt
    labels = {"offset": result.offset, "prompt": result.prompt, "kind": result.kind}[by][keep]
    pair, ratio, distance = result.pair[keep], result.ratio[keep], result.distance[keep]
    _, codes = np.unique(np.concatenate([result.pair_a[pair], result.pair_b[pair]]), return_inverse=True)
    ca, cb = codes[: len(pair)], codes[len(pair) :]
    # one set of branch weights for all groups: the bands of neighbouring offsets share their replicates
    branch_w = rng.poisson(1.0, size=(n_boot, int(codes.max()) + 1 if len(codes) else 0)).astype(np.float64)
    keys = np.unique(labels)
    cols = {
        name: np.full(len(keys), np.nan)
        for name in ("median", "sd", "lo", "hi", "distance", "distance_lo", "distance_hi")
    }
    n_pairs = np.zeros(len(keys), np.int64)
    n_tokens = np.zeros(len(keys), np.int64)
    for g, key in enumerate(keys):
        m = labels == key
        n_pairs[g], n_tokens[g] = len(np.unique(pair[m])), int(m.sum())
        fin = m & np.isfinite(ratio)
        cols["median"][g], cols["sd"][g], cols["lo"][g], cols["hi"][g] = _dyadic_median_band(
            ratio[fin], ca[fin], cb[fin], branch_w
        )
        cols["distance"][g], _, cols["distance_lo"][g], cols["distance_hi"][g] = _dyadic_median_band(
            distance[m], ca[m], cb[m], branch_w
        )
    return {
        "by": by,
        "key": keys,
        **cols,
        "n_pairs": n_pairs,
        "n_tokens": n_tokens,
        "chance": 1.0,
        "has_baseline": result.has_baseline,
        "note": result.note,
    }
