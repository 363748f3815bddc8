"""Compiled loops (numba, compiled once per machine: on-disk cache, analysis.engine.numba_cache): per-code row sums, within-group
shuffles, and the bootstrap's weighted per-code sums.

A per-position (or per-branch, per-cell) sum of rows is the inner loop of the removal, its detection
test and R2_pos. As a sparse one-hot product (scipy's csr_matvecs) it ran at ~0.5 GFLOP/s and needed a
float64 copy of every block of float32 rows; here each row is read once, in its own dtype, and added in
float64 to every coding's accumulator (they fit in cache: a few hundred codes x d). Imported lazily,
inside the functions that use it (analysis.engine.groups, metrics, jit), since numba costs ~0.5 s to import.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

from analysis.engine import numba_cache

numba_cache.install()  # before the decorators below: their cache goes to the machine-wide directory

# Rows per thread chunk: each chunk has its own accumulators (added up at the end), so threads never
# write the same memory; below this many rows one chunk does all (fewer accumulators to add).
CHUNK = 32_768
MAX_PRIVATE = 64 << 20  # bytes of accumulators per thread above which one thread sums
MAX_ACCUMULATORS = 256 << 20  # bytes of all threads' accumulators together
CONVERT_BLOCK = 8192  # rows converted at a time from a dtype or layout the loop does not read in place


@njit(cache=True, nogil=True)
def _sums_chunk(X, codes, offsets, shift, out, sq, start, stop):  # pragma: no cover - compiled
    d = X.shape[1]
    row = np.empty(d, np.float64)
    for i in range(start, stop):
        total = 0.0
        for k in range(d):
            row[k] = X[i, k] - shift[k]
            total += row[k] * row[k]
        sq[i] = total
        for j in range(codes.shape[0]):
            code = codes[j, i]
            if code < 0:  # the row is in no group of this coding
                continue
            r = offsets[j] + code
            for k in range(d):
                out[r, k] += row[k]


def cores() -> int:
    """CPUs this process may run on (its affinity, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def code_sums(
    X: np.ndarray,
    codings: list[tuple[np.ndarray, int]],
    shift: np.ndarray | None = None,
    threads: int | None = None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-code sums of the rows of X (n, d) minus `shift` (d,), in float64, for several codings at once
    (codes (n,) in 0..G-1, or -1 for rows outside every group; G): ([(G, d), ...], each row's squared norm
    after the shift (n,)). C-contiguous float32 / float64 rows are read in place, on up to `threads`
    threads (default: this process's CPUs); any other X a block of rows at a time, converted."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"need rows of shape (n, d), got {X.shape}")
    n, d = X.shape
    sizes = [int(g) for _, g in codings]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    codes = np.empty((len(codings), n), np.int64)
    for j, (c, _) in enumerate(codings):
        c = np.asarray(c).ravel()
        if len(c) != n:
            raise ValueError(f"need one code per row: {len(c)} codes for {n} rows")
        codes[j] = c
        if n and (codes[j].min() < -1 or codes[j].max() >= sizes[j]):  # the loop does not check bounds
            raise ValueError(f"codes must lie in -1..{sizes[j] - 1}")
    shift = np.zeros(d) if shift is None else np.ascontiguousarray(shift, np.float64).ravel()
    if shift.shape != (d,):
        raise ValueError(f"need a shift of shape ({d},), got {shift.shape}")
    total = int(sum(sizes))
    acc_bytes = max(total * d * 8, 1)
    n_chunks = max(1, min(threads or cores(), n // CHUNK, MAX_ACCUMULATORS // acc_bytes))
    if n_chunks > 1 and acc_bytes > MAX_PRIVATE:
        n_chunks = 1  # many codes (e.g. token ids): one accumulator, not one per thread
    parts = np.zeros((n_chunks, total, d))
    sq = np.empty(n)
    if not (X.dtype in (np.float32, np.float64) and X.flags.c_contiguous):
        for start in range(
            0, n, CONVERT_BLOCK
        ):  # e.g. float16 or a strided view: a block at a time, never whole
            rows = slice(start, min(start + CONVERT_BLOCK, n))
            _sums_chunk(
                np.ascontiguousarray(X[rows], np.float64),
                np.ascontiguousarray(codes[:, rows]),
                offsets,
                shift,
                parts[0],
                sq[rows],
                0,
                rows.stop - rows.start,
            )
        return [parts[0][o : o + g] for o, g in zip(offsets, sizes)], sq
    bounds = np.linspace(0, n, n_chunks + 1).astype(np.int64)
    if n_chunks == 1:
        _sums_chunk(X, codes, offsets, shift, parts[0], sq, 0, n)
    else:  # the kernel releases the GIL; plain threads, so concurrent callers (app sessions) are safe
        with ThreadPoolExecutor(n_chunks) as pool:
            list(
                pool.map(
                    lambda c: _sums_chunk(X, codes, offsets, shift, parts[c], sq, bounds[c], bounds[c + 1]),
                    range(n_chunks),
                )
            )
    out = parts.sum(axis=0) if n_chunks > 1 else parts[0]
    return [out[o : o + g] for o, g in zip(offsets, sizes)], sq


@njit(cache=True, nogil=True)
def _shuffle_within(values, keys, by_group, starts, out, g_lo, g_hi):  # pragma: no cover - compiled
    for g in range(g_lo, g_hi):
        rows = by_group[starts[g] : starts[g + 1]]
        k = keys[rows]
        order = np.argsort(k)  # quicksort: the keys are distinct but for ties, which take the stable sort
        for i in range(1, len(order)):
            if k[order[i]] == k[order[i - 1]]:
                order = np.argsort(k, kind="mergesort")
                break
        for i in range(len(rows)):
            out[rows[i]] = values[rows[order[i]]]


def shuffle_within(
    values: np.ndarray, keys: np.ndarray, by_group: np.ndarray, starts: np.ndarray, threads: int | None = None
) -> np.ndarray:
    """values (n,) permuted within groups: the rows of group g, by_group[starts[g]:starts[g + 1]] in row
    order, receive the values of those rows sorted by `keys` (stable) - the permutation of
    np.lexsort((keys, groups)), one small sort per group instead of sorts of all n keys; groups split over
    up to `threads` threads (default: this process's CPUs) from CHUNK rows up."""
    values, keys = np.ascontiguousarray(values), np.ascontiguousarray(keys)
    if not (
        values.ndim == 1 and len(values) == len(keys) == len(by_group) == (starts[-1] if len(starts) else 0)
    ):
        raise ValueError(
            f"need one value and one key per row: {len(values)} values, {len(keys)} keys, "
            f"{len(by_group)} rows"
        )
    out = np.empty_like(values)
    n_groups = len(starts) - 1
    n_threads = max(1, min(threads or cores(), len(values) // CHUNK, n_groups))
    if n_threads == 1:
        _shuffle_within(values, keys, by_group, starts, out, 0, n_groups)
        return out
    # groups split where the rows split evenly; each thread writes its own groups' rows only
    cuts = np.searchsorted(starts, np.linspace(0, len(values), n_threads + 1)).astype(np.int64)
    cuts[0], cuts[-1] = 0, n_groups
    with ThreadPoolExecutor(n_threads) as pool:
        list(
            pool.map(
                lambda c: _shuffle_within(values, keys, by_group, starts, out, cuts[c], cuts[c + 1]),
                range(n_threads),
            )
        )
    return out


@njit(cache=True, nogil=True)
def _weighted_sums(Z, codes, W, out):  # pragma: no cover - compiled
    d = Z.shape[1]
    for i in range(Z.shape[0]):
        c = codes[i]
        for b in range(W.shape[0]):
            w = W[b, i]
            if w == 0:
                continue
            for k in range(d):
                out[b, c, k] += w * Z[i, k]


def weighted_code_sums(Z: np.ndarray, codes: np.ndarray, n_codes: int, W: np.ndarray) -> np.ndarray:
    """(b, G, d) float64: for each row of weights W (b, n), the weighted per-code sums of the rows of Z (n, d)
    (codes (n,) in 0..G-1): one pass over Z for all b weightings (a bootstrap's resamples at once).
    Z is read in its own dtype when float32 or float64 (sums in float64 either way)."""
    codes = np.ascontiguousarray(codes, dtype=np.int64)
    if Z.ndim != 2 or W.ndim != 2 or not len(codes) == len(Z) == W.shape[1]:
        raise ValueError(f"need Z (n, d), codes (n,) and W (b, n): got {Z.shape}, {codes.shape}, {W.shape}")
    if len(codes) and (codes.min() < 0 or codes.max() >= n_codes):  # the loop does not check bounds
        raise ValueError(f"codes must lie in 0..{n_codes - 1}")
    out = np.zeros((W.shape[0], n_codes, Z.shape[1]))
    Z = np.ascontiguousarray(Z, dtype=Z.dtype if Z.dtype in (np.float32, np.float64) else np.float64)
    _weighted_sums(Z, codes, np.ascontiguousarray(W, dtype=np.float64), out)
    return out


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})  # lets the distance sums vectorize
def _ivf_rank(
    X, Zs, sqs, order, start, gs, use_groups, q_rows, q_at, probed, k, rerank, need, out, short, lo, hi
):  # pragma: no cover - compiled
    r, d = Zs.shape[1], X.shape[1]
    for j in range(lo, hi):
        qi, qa = q_rows[j], q_at[j]
        total = 0
        for p in range(probed.shape[1]):
            total += start[probed[j, p] + 1] - start[probed[j, p]]
        ids = np.empty(total, np.int64)
        dz = np.empty(total, np.float64)
        m = 0
        for p in range(probed.shape[1]):
            c = probed[j, p]
            for t in range(start[c], start[c + 1]):
                if t == qa or (use_groups and gs[t] == gs[qa]):
                    continue
                dot = 0.0
                for e in range(r):
                    dot += Zs[t, e] * Zs[qa, e]
                ids[m] = t
                dz[m] = sqs[t] - 2.0 * dot  # |z_t - z_q|^2 - |z_q|^2: the same order
                m += 1
        if m < need:
            short[j] = True
            continue
        if m > rerank:  # the rerank best by reduced distance (ties at the cut-off: the first met)
            cut = np.partition(dz[:m], rerank - 1)[rerank - 1]
            chosen = np.empty(rerank, np.int64)
            kept = 0
            for i in range(m):
                if dz[i] < cut:
                    chosen[kept] = ids[i]
                    kept += 1
            for i in range(m):
                if kept == rerank:
                    break
                if dz[i] == cut:
                    chosen[kept] = ids[i]
                    kept += 1
            ids, m = chosen, kept
        full = np.empty(m, np.float64)
        for i in range(m):
            row = order[ids[i]]
            acc = 0.0
            for e in range(d):
                diff = X[row, e] - X[qi, e]
                acc += diff * diff
            full[i] = acc
        best = np.argsort(full, kind="mergesort")
        for i in range(min(k, m)):
            out[j, i] = order[ids[best[i]]]


def ivf_rank(
    X: np.ndarray,
    Zs: np.ndarray,
    sqs: np.ndarray,
    order: np.ndarray,
    at: np.ndarray,
    start: np.ndarray,
    gs: np.ndarray | None,
    q_rows: np.ndarray,
    probed: np.ndarray,
    k: int,
    rerank: int,
    need: int,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The inverted-list search of analysis.engine.neighbours for q queries, rows q_rows (q,) of X (n, d).

    Points are kept sorted by cell: cell c holds sorted rows start[c]:start[c + 1], which are rows
    order[...] of X (row i of X is sorted row at[i]); Zs (n, r) and sqs = |z|^2 (n,) are their reduced
    coordinates, gs (n,) their integer group codes, in that order. A query's candidates are the members of
    its probed cells (q, p), less itself and (with gs) its group; the best `rerank` by reduced distance
    (ties at the cut: the first met) are re-ranked by exact distance in X (ties: the first met). Both
    distances are summed in a vectorized order (reassociated), so they may differ from numpy's in the last
    bits: exact where the sums are (the tests' small integers), a near-tie elsewhere may rank either way.
    Returns (indices (q, k) of X, -1 where fewer; short (q,): the queries with fewer than `need`
    candidates, left unanswered). Queries split over threads (the loop releases the GIL); each answer
    depends on its query alone."""
    n = len(order)
    if not (
        X.dtype == Zs.dtype == np.float32
        and X.flags.c_contiguous
        and Zs.flags.c_contiguous
        and len(X) == len(Zs) == len(sqs) == len(at) == n
        and len(start) >= 2
        and start[-1] == n
    ):
        raise ValueError(
            f"need float32 C-contiguous X (n, d) and Zs (n, r), sqs (n,), order (n,) and cell "
            f"starts ending at n: got {X.shape}, {Zs.shape}, {sqs.shape}, {order.shape}"
        )
    probed = np.ascontiguousarray(probed, np.int64)
    q_rows = np.ascontiguousarray(q_rows, np.int64)
    if (
        probed.ndim != 2
        or len(probed) != len(q_rows)
        or (probed.size and (probed.min() < 0 or probed.max() >= len(start) - 1))
    ):
        raise ValueError(f"need one row of probed cells (0..{len(start) - 2}) per query")
    if len(q_rows) and (q_rows.min() < 0 or q_rows.max() >= n):
        raise ValueError(f"query rows must lie in 0..{n - 1}")
    q_at = np.ascontiguousarray(at[q_rows], np.int64)  # each query's row in the sorted arrays
    use_groups = gs is not None
    gs = np.ascontiguousarray(gs if use_groups else np.zeros(1, np.int64), np.int64)
    out = np.full((len(q_rows), k), -1, np.int64)
    short = np.zeros(len(q_rows), np.bool_)
    args = (
        X,
        Zs,
        np.ascontiguousarray(sqs, np.float32),
        order,
        np.ascontiguousarray(start, np.int64),
        gs,
        use_groups,
        q_rows,
        q_at,
        probed,
        int(k),
        int(rerank),
        int(need),
        out,
        short,
    )
    n_threads = max(1, min(threads or cores(), len(q_rows) // 64))
    if n_threads == 1:
        _ivf_rank(*args, 0, len(q_rows))
    else:
        bounds = np.linspace(0, len(q_rows), n_threads + 1).astype(np.int64)
        with ThreadPoolExecutor(n_threads) as pool:
            list(pool.map(lambda c: _ivf_rank(*args, bounds[c], bounds[c + 1]), range(n_threads)))
    return out, short


def warm_up() -> None:
    """Compile (or load from the disk cache) each kernel for the dtypes a view uses, on tiny inputs."""
    codes = np.array([0, 1, 0, 1])
    for dtype in (np.float32, np.float64):
        code_sums(np.ones((4, 3), dtype), [(codes, 2)])
    by_group, starts = np.arange(4), np.array([0, 2, 4])
    for values in (np.arange(4.0), np.arange(4), np.arange(4, dtype=np.int32)):
        shuffle_within(values, np.linspace(0, 1, 4), by_group, starts)
        values.flags.writeable = False  # arrays read zero-copy from Arrow are read-only: another type
        shuffle_within(values, np.linspace(0, 1, 4), by_group, starts)
    rows = np.ones((4, 3), np.float32)
    rows.flags.writeable = False
    code_sums(rows, [(codes, 2)])
    for dtype in (np.float32, np.float64):
        weighted_code_sums(np.ones((4, 3), dtype), codes, 2, np.ones((2, 4)))
    X = np.ones((4, 3), np.float32)
    cells = (X[:, :2].copy(), np.ones(4, np.float32), np.arange(4), np.arange(4), np.array([0, 2, 4]))
    for gs in (None, codes):
        ivf_rank(X, *cells, gs, np.array([0, 2]), np.array([[0], [1]]), 1, 2, 0)
    ivf_rank(rows, *cells, None, np.array([0, 2]), np.array([[0], [1]]), 1, 2, 0)  # read-only rows
