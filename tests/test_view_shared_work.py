"""Work a view now does once and shares (issue 15, speed): the within-branch shuffles, the matched-position
neighbours, the PCA of the projection and the neighbour index, the one-thread BLAS blocks. Each must give
what the plain computation gives."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from analysis import ViewSpec, compute_view
from analysis import metrics as M
from analysis.engine import neighbours
from analysis.engine.blas import one_thread
from analysis.engine.groups import row_norms
from analysis.metrics import WithinShuffler, shuffle_within
from analysis.synthetic import branch_tree
from analysis.view import _shared_pca, measure, residualize

P = importlib.import_module("analysis.project")  # `analysis.project` the attribute is the function


def lexsort_shuffle(values: np.ndarray, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The within-group permutation as it was drawn before WithinShuffler (a two-key lexsort)."""
    by_group = np.argsort(groups, kind="stable")
    shuffled = np.lexsort((rng.random(len(groups)), groups))
    out = np.empty_like(values)
    out[by_group] = values[shuffled]
    return out


@pytest.mark.parametrize("n, n_groups", [(1, 1), (7, 1), (1000, 9), (40_000, 3000), (200_000, 150_000)])
def test_within_shuffler_draws_the_lexsort_permutations(n, n_groups):
    rng = np.random.default_rng(n)
    groups = rng.integers(0, n_groups, n) * 7 - 3  # unsorted, negative ids, gaps
    values = rng.normal(size=n)
    shuffle = WithinShuffler(groups)
    assert len(shuffle.starts) - 1 == len(np.unique(groups))  # one segment per group, however many
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    for _ in range(3):
        got = shuffle(values, b)
        np.testing.assert_array_equal(got, lexsort_shuffle(values, groups, a))
        for g in np.unique(groups)[:20]:  # a permutation within each group
            np.testing.assert_array_equal(np.sort(got[groups == g]), np.sort(values[groups == g]))
    np.testing.assert_array_equal(
        shuffle_within(values, groups, np.random.default_rng(2)),
        lexsort_shuffle(values, groups, np.random.default_rng(2)),
    )


class TiedKeys:
    """A generator stand-in whose uniform keys repeat: the tie path must keep lexsort's order."""

    def random(self, n: int) -> np.ndarray:
        return np.repeat(np.array([0.5, 0.25, 0.75]), -(-n // 3))[:n]


def test_within_shuffler_with_tied_keys_keeps_the_lexsort_order():
    groups = np.array([3, 1, 3, 1, 3, 1, 2, 2, 2, 3])
    values = np.arange(10.0)
    np.testing.assert_array_equal(
        WithinShuffler(groups)(values, TiedKeys()), lexsort_shuffle(values, groups, TiedKeys())
    )


def matched_reference(
    X: np.ndarray, position: np.ndarray, window: int, k: int, sample: int | None, seed: int
):
    """Matched-position neighbours by one distance matrix per asking token (the definition)."""
    asks = np.zeros(len(X), bool)
    asks[M._sample(len(X), sample, np.random.default_rng(seed))] = True
    q_all, n_all = [], []
    for t in np.unique(position[asks]):
        for i in np.flatnonzero(asks & (position == t)):
            c = np.flatnonzero(np.abs(position - t) <= window)
            c = c[c != i]
            d = ((X[c].astype(np.float64) - X[i]) ** 2).sum(axis=1)
            row = np.full(k, -1)
            best = c[np.argsort(d, kind="stable")[:k]]
            row[: len(best)] = best
            q_all.append(i)
            n_all.append(row)
    return np.array(q_all), np.array(n_all)


@pytest.mark.parametrize("sample", [None, 300])
def test_matched_neighbours_walk_finds_the_nearest_within_the_window(sample):
    tree = branch_tree(n_prompts=3, branches_per_prompt=5, length=40, d=16, seed=2, sinks=False)
    X = tree.X / np.linalg.norm(tree.X, axis=1, keepdims=True)
    position = tree.position.copy()
    position[position % 11 == 3] += 1  # some positions absent: windows with gaps
    asks, nbrs = M._matched_neighbours(X, position, 2, 10, sample, seed=4)
    ref_q, ref_n = matched_reference(X, position, 2, 10, sample, seed=4)
    np.testing.assert_array_equal(asks, ref_q)
    assert (nbrs == ref_n).mean() > 0.999  # float32 ties aside, the same neighbours in the same order


def test_shared_pca_is_the_fit_projection_and_index_make_themselves(monkeypatch):
    monkeypatch.setattr(neighbours, "EXACT_QUERY_MAX", 500)
    tree = branch_tree(n_prompts=3, branches_per_prompt=6, length=80, d=96, seed=6)
    spec = ViewSpec()
    _, tokens, _ = residualize(tree, spec)
    mean, comps = _shared_pca(tokens.X, spec)
    assert comps.shape == (96, neighbours.REDUCED_DIMS)
    unit = tokens.X / row_norms(tokens.X)  # the unit vectors measure() searches
    own_mean, own_comps = neighbours.pca_fit(unit, neighbours.REDUCED_DIMS, seed=0)  # what Cells would fit
    np.testing.assert_array_equal(mean, own_mean)
    np.testing.assert_array_equal(comps, own_comps)
    np.testing.assert_array_equal(
        P._prepared(tokens.X, spec.projection, pca=(mean, comps)), P._prepared(tokens.X, spec.projection)
    )  # and what UMAP's PCA would fit
    assert _shared_pca(tokens.X, ViewSpec(projection=P.ProjectionSpec(seed=3))) is None  # another sample


def test_view_with_the_shared_pca_gives_the_unshared_numbers(monkeypatch):
    monkeypatch.setattr(neighbours, "EXACT_QUERY_MAX", 500)
    tree = branch_tree(n_prompts=3, branches_per_prompt=6, length=80, d=96, seed=6)
    spec = ViewSpec()
    shared = compute_view(tree, spec)
    monkeypatch.setattr("analysis.view._shared_pca", lambda X, spec: None)
    plain = compute_view(tree, spec)
    np.testing.assert_array_equal(shared.coords, plain.coords)
    for key in (
        "leak",
        "leak_prompt",
        "token_leak",
        "purity_branch_pooled",
        "purity_prompt_pooled",
        "projection",
    ):
        if key in plain.metrics:
            assert shared.metrics[key] == plain.metrics[key], key


def test_one_thread_limits_blas_inside_and_restores_it_after():
    from threadpoolctl import threadpool_info

    def blas_threads() -> list[int]:
        return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]

    before = blas_threads()
    with one_thread():
        assert set(blas_threads()) == {1}
    assert blas_threads() == before


def _blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info

    return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]


def _crossing_blocks() -> list[int]:
    """Two threads' one_thread() blocks, the first in leaving first; BLAS threads seen by the second inside."""
    import threading

    a_in, b_in, a_leaving = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with one_thread():
            a_in.set()
            b_in.wait()
            a_leaving.set()  # it leaves now, while the second is still inside

    def second():
        a_in.wait()
        with one_thread():
            b_in.set()
            a_leaving.wait()
            seen["second inside"] = _blas_threads()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return seen["second inside"]


def test_one_thread_left_in_crossing_order_by_two_threads_is_restored_by_the_one_that_set_it():
    """Two sessions' blocks overlap (Streamlit runs each script on a thread of its own), the first in
    leaves first: BLAS stays limited while the second is inside and is restored at the end. The limit was
    restored by whichever thread left last, and OpenBLAS here did not always take a limit restored from
    another thread (one thread for good). In a fresh process, as the app's threads are: once the main
    thread has set a limit, this OpenBLAS ignores limits set from other threads altogether."""
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/tests']\n"
        "from test_view_shared_work import _blas_threads, _crossing_blocks\n"
        "before = _blas_threads()\n"
        "for _ in range(5):\n"
        "    inside = _crossing_blocks()\n"
        "    print(set(inside) == {1}, _blas_threads() == before)\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", script, root], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"] * 5, out.stdout + out.stderr


def test_workers_inside_the_callers_block_keep_its_limit_and_it_is_restored_after():
    """compute_pair's threads: the caller holds limited() while two workers enter and leave their own
    one_thread() blocks in crossing order; the caller's limit holds until it leaves, then BLAS is as before."""
    import threading

    from threadpoolctl import threadpool_info

    from analysis.engine.blas import limited

    def blas_threads() -> list[int]:
        return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]

    before = blas_threads()
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with one_thread():
            a_in.set()
            b_in.wait()
        seen["after the first left"] = blas_threads()
        a_out.set()

    def second():
        a_in.wait()
        with one_thread():
            b_in.set()
            a_out.wait()

    with limited(1):
        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seen["after both left"] = blas_threads()
    assert set(seen["after the first left"]) == {1} and set(seen["after both left"]) == {1}
    assert blas_threads() == before


def test_measure_takes_a_pca_only_for_the_cosine_space(monkeypatch):
    monkeypatch.setattr(neighbours, "EXACT_QUERY_MAX", 500)
    tree = branch_tree(n_prompts=3, branches_per_prompt=6, length=80, d=96, seed=6)
    spec = ViewSpec(projection=P.ProjectionSpec(metric="euclidean"))
    _, tokens, _ = residualize(tree, spec)
    wrong = (np.zeros(96, np.float32), np.eye(96, 64, dtype=np.float32))
    # fresh copies: each measure() call scales its rows in place and gets a workspace of its own
    with_wrong = measure(tokens.with_X(tokens.X.copy()), None, spec, pca=wrong)
    assert with_wrong["leak"] == measure(tokens.with_X(tokens.X.copy()), None, spec)["leak"]
