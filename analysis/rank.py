"""The rank of the positional part: how many directions of per-position means predict held-out tokens."""

from __future__ import annotations

import numpy as np

from analysis.engine.groups import branch_centred, group_sums

MAX_RANK = 10  # largest rank tried


def choose_rank(Zt: np.ndarray, ref, fold: np.ndarray | None, report) -> int:
    """The rank where the out-of-fold R2 of rank-r per-position means (of branch-centred latents) stops
    rising: the first r whose next rank adds less than 0.1% of the best R2."""
    if fold is None:
        return 2
    Z = branch_centred(Zt, ref.branch)
    r_max = min(MAX_RANK, Z.shape[1])
    sse = np.zeros(r_max)
    sse_0 = 0.0
    for f in np.unique(fold):
        train, test = fold != f, fold == f
        base = Z[train].mean(axis=0)
        uniq, sums, counts = group_sums(Z[train], ref.position[train])
        dev = sums / counts[:, None] - base  # (T, m)
        _, _, vt = np.linalg.svd(dev * np.sqrt(counts)[:, None], full_matrices=False)
        idx = np.searchsorted(uniq, ref.position[test])
        seen = (idx < len(uniq)) & (uniq[np.minimum(idx, len(uniq) - 1)] == ref.position[test])
        mu = np.zeros((int(test.sum()), Z.shape[1]))
        mu[seen] = dev[idx[seen]]
        resid0 = Z[test] - base
        sse_0 += float((resid0**2).sum())
        for r in range(1, r_max + 1):
            V = vt[:r]  # (r, m)
            sse[r - 1] += float(((resid0 - (mu @ V.T) @ V) ** 2).sum())
    r2 = 1 - sse / sse_0 if sse_0 > 0 else np.zeros(r_max)
    report.rank_r2 = [float(v) for v in r2]
    best = float(r2.max())
    if best <= 0:
        return 1
    gains = np.diff(np.concatenate([r2, [r2[-1]]]))
    return int(np.argmax(gains < 0.001 * best) + 1)
