"""The compiled loops of analysis.engine.kernels against plain numpy: per-code row sums (threaded and not, rows
outside every group, many codes, input that must be converted), the weighted sums of a bootstrap, and
their refusals of input the loops would read or write out of bounds."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.engine import kernels


def reference_sums(X: np.ndarray, codes: np.ndarray, G: int, shift: np.ndarray) -> np.ndarray:
    out = np.zeros((G, X.shape[1]))
    keep = codes >= 0
    np.add.at(out, codes[keep], X[keep].astype(np.float64) - shift)
    return out


@pytest.mark.parametrize("n, threads", [(0, None), (1, None), (1000, None), (70_000, 2), (70_000, 1)])
def test_code_sums_equal_numpy_sums_for_every_coding(n, threads):
    rng = np.random.default_rng(n)
    X = rng.normal(size=(n, 12)).astype(np.float32)
    shift = rng.normal(size=12)
    codings = [(rng.integers(0, 7, n), 7), (rng.integers(-1, 3, n), 3)]  # -1: in no group of that coding
    sums, sq = kernels.code_sums(X, codings, shift, threads=threads)
    for (codes, G), got in zip(codings, sums):
        np.testing.assert_allclose(got, reference_sums(X, codes, G, shift), rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(sq, ((X.astype(np.float64) - shift) ** 2).sum(axis=1), rtol=1e-12)


def test_large_inputs_are_summed_on_threads(monkeypatch):
    pools = []

    class CountingPool(kernels.ThreadPoolExecutor):
        def __init__(self, workers):
            pools.append(workers)
            super().__init__(workers)

    monkeypatch.setattr(kernels, "ThreadPoolExecutor", CountingPool)
    X = np.random.default_rng(4).normal(size=(2 * kernels.CHUNK, 3))
    kernels.code_sums(X, [(np.zeros(len(X), np.int64), 1)], threads=2)
    assert pools == [2]
    kernels.code_sums(X[: kernels.CHUNK], [(np.zeros(kernels.CHUNK, np.int64), 1)], threads=2)
    assert pools == [2]  # below two chunks' rows: one thread, no pool


def test_code_sums_convert_other_dtypes_and_strided_rows_a_block_at_a_time():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(20_000, 16))
    codes = rng.integers(0, 5, 20_000)
    want = reference_sums(base[:, ::2].astype(np.float16), codes, 5, np.zeros(8))
    for X in (base[:, ::2].astype(np.float16), base.astype(np.float16)[:, ::2]):  # float16; a strided view
        np.testing.assert_allclose(kernels.code_sums(X, [(codes, 5)])[0][0], want, rtol=1e-10, atol=1e-8)


def test_many_codes_sum_on_one_accumulator_with_the_same_result(monkeypatch):
    rng = np.random.default_rng(2)
    X = rng.normal(size=(70_000, 4))
    codes = rng.integers(0, 50, 70_000)
    threaded = kernels.code_sums(X, [(codes, 50)], threads=2)[0][0]
    monkeypatch.setattr(kernels, "MAX_PRIVATE", 1)  # every accumulator "too large" to copy per thread
    single = kernels.code_sums(X, [(codes, 50)], threads=2)[0][0]
    np.testing.assert_allclose(single, threaded, rtol=1e-12)
    np.testing.assert_allclose(single, reference_sums(X, codes, 50, np.zeros(4)), rtol=1e-10)


def test_weighted_code_sums_equal_numpy_per_weighting():
    rng = np.random.default_rng(3)
    Z = rng.normal(size=(500, 6))
    codes = rng.integers(0, 9, 500)
    W = rng.integers(0, 3, size=(4, 500)).astype(np.float64)
    got = kernels.weighted_code_sums(Z, codes, 9, W)
    for b in range(4):
        want = np.zeros((9, 6))
        np.add.at(want, codes, Z * W[b][:, None])
        np.testing.assert_allclose(got[b], want, rtol=1e-12, atol=1e-12)


def test_the_loops_refuse_input_they_would_read_or_write_out_of_bounds():
    X = np.ones((4, 3))
    with pytest.raises(ValueError, match="codes must lie"):
        kernels.code_sums(X, [(np.array([0, 1, 2, 3]), 3)])
    with pytest.raises(ValueError, match="codes must lie"):
        kernels.code_sums(X, [(np.array([0, -2, 0, 0]), 3)])
    with pytest.raises(ValueError, match="one code per row"):
        kernels.code_sums(X, [(np.array([0, 1]), 2)])
    with pytest.raises(ValueError, match="shift"):
        kernels.code_sums(X, [(np.array([0, 1, 0, 1]), 2)], shift=np.zeros(2))
    with pytest.raises(ValueError, match="one value and one key"):
        kernels.shuffle_within(np.arange(3.0), np.linspace(0, 1, 4), np.arange(4), np.array([0, 4]))
    with pytest.raises(ValueError, match="W"):
        kernels.weighted_code_sums(X, np.array([0, 1, 0, 1]), 2, np.ones((2, 5)))


def test_threaded_shuffle_is_the_single_thread_shuffle_and_the_lexsort_permutation():
    rng = np.random.default_rng(5)
    n = 3 * kernels.CHUNK
    groups = rng.integers(0, 300, n)
    values, keys = rng.normal(size=n), rng.random(n)
    keys[:50] = keys[50:100]  # ties in the keys: the stable order decides
    by_group = np.argsort(groups, kind="stable")
    starts = np.searchsorted(groups[by_group], np.arange(301)).astype(np.int64)
    single = kernels.shuffle_within(values, keys, by_group, starts, threads=1)
    threaded = kernels.shuffle_within(values, keys, by_group, starts, threads=2)
    np.testing.assert_array_equal(threaded, single)
    want = np.empty(n)
    want[by_group] = values[np.lexsort((keys, groups))]
    np.testing.assert_array_equal(single, want)


def reference_ivf(X, Zs, order, start, gs, q_rows, probed, k, rerank, need):
    """ivf_rank written out in numpy: candidates in probe order, the reduced-distance cut keeping ties
    first met, then a stable sort by exact distance."""
    at = np.argsort(order)
    sqs = (Zs.astype(np.float64) ** 2).sum(axis=1)
    out = np.full((len(q_rows), k), -1, np.int64)
    short = np.zeros(len(q_rows), bool)
    for j, (qi, cells) in enumerate(zip(q_rows, probed)):
        qa = at[qi]
        ids = np.concatenate([np.arange(start[c], start[c + 1]) for c in cells])
        ids = ids[(ids != qa) & ((gs[ids] != gs[qa]) if gs is not None else True)]
        if len(ids) < need:
            short[j] = True
            continue
        dz = sqs[ids] - 2 * (Zs[ids].astype(np.float64) @ Zs[qa])
        if len(ids) > rerank:
            cut = np.sort(dz)[rerank - 1]
            ids = np.concatenate([ids[dz < cut], ids[dz == cut]])[:rerank]
        full = ((X[order[ids]].astype(np.float64) - X[qi]) ** 2).sum(axis=1)
        best = order[ids[np.argsort(full, kind="stable")]][:k]
        out[j, : len(best)] = best
    return out, short


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("k, rerank, need", [(5, 20, 0), (5, 12, 30), (40, 400, 0), (3, 3, 0)])
def test_ivf_rank_equals_the_numpy_search_with_ties_and_duplicates(grouped, k, rerank, need):
    rng = np.random.default_rng(k + rerank)
    n, n_cells = 700, 12
    X = rng.integers(0, 3, size=(n, 5)).astype(np.float32)  # small integers: exact sums, many exact ties
    cell = rng.choice(n_cells, n, p=np.arange(1, n_cells + 1) ** 2 / 650)  # cells of ~1 to ~150 points
    order = np.argsort(cell, kind="stable")
    start = np.searchsorted(cell[order], np.arange(n_cells + 1)).astype(np.int64)
    Zs = np.ascontiguousarray(X[order][:, :3])
    at = np.argsort(order)
    gs = rng.integers(0, 9, n)[order] if grouped else None
    q_rows = rng.choice(n, 150, replace=False)
    probed = np.stack([rng.choice(n_cells, 2, replace=False) for _ in q_rows])
    want = reference_ivf(X, Zs, order, start, gs, q_rows, probed, k, rerank, need)
    sqs = (Zs * Zs).sum(axis=1)
    for threads in (1, 2):
        got = kernels.ivf_rank(
            X, Zs, sqs, order, at, start, gs, q_rows, probed, k, rerank, need, threads=threads
        )
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
    if k == 40:
        assert (want[0] == -1).any()  # some queries run out of candidates: the -1 padding is tested
    if need == 30:
        assert want[1].any() and not want[1].all()  # some queries short of candidates, some answered


def test_ivf_rank_refuses_what_it_would_read_out_of_bounds():
    X = np.ones((4, 3), np.float32)
    Zs, sqs, order, start = X[:, :2].copy(), np.ones(4, np.float32), np.arange(4), np.array([0, 2, 4])
    ok = dict(gs=None, q_rows=np.array([0, 1]), probed=np.array([[0], [1]]), k=2, rerank=4, need=0)
    kernels.ivf_rank(X, Zs, sqs, order, order, start, **ok)
    with pytest.raises(ValueError, match="float32"):
        kernels.ivf_rank(X.astype(np.float64), Zs, sqs, order, order, start, **ok)
    with pytest.raises(ValueError, match="float32"):
        kernels.ivf_rank(X, Zs, sqs, order, order, np.array([0, 2, 3]), **ok)
    with pytest.raises(ValueError, match="probed cells"):
        kernels.ivf_rank(X, Zs, sqs, order, order, start, **{**ok, "probed": np.array([[0], [2]])})
    with pytest.raises(ValueError, match="query rows"):
        kernels.ivf_rank(X, Zs, sqs, order, order, start, **{**ok, "q_rows": np.array([0, 4])})
