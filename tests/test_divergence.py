"""Branch divergence at matched positions: pairs, offsets, the unrelated-prompt baseline, and why no
positional removal can change it."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.divergence import branch_pairs, divergence, divergence_summary
from analysis.synthetic import branch_tree
from analysis.tokens import TokenSet


def _run(ts: TokenSet, X: np.ndarray | None = None, **kw):
    return divergence(ts.X if X is None else X, ts.position, ts.branch, ts.prompt, ts.extra["parent"], **kw)


@pytest.fixture(scope="module")
def tree() -> TokenSet:
    return branch_tree(n_prompts=6, branches_per_prompt=10, d=32, pos_scale=3.0, seed=2)


def test_removing_any_function_of_position_leaves_matched_distances(tree):
    raw = _run(tree)
    removed = _run(tree, tree.X - tree.extra["pos_part"])
    assert len(raw.distance) > 1000 and raw.has_baseline
    ok = np.isfinite(raw.baseline_value)
    assert ok.mean() > 0.9 and (raw.baseline_n[ok] > 0).all()
    assert (raw.baseline_lo[ok] <= raw.baseline_value[ok]).all() and (
        raw.baseline_value[ok] <= raw.baseline_hi[ok]
    ).all()
    np.testing.assert_array_equal(raw.row_a, removed.row_a)
    np.testing.assert_allclose(removed.distance, raw.distance, rtol=1e-5)
    np.testing.assert_allclose(removed.baseline_value, raw.baseline_value, rtol=1e-5)
    np.testing.assert_allclose(removed.ratio, raw.ratio, rtol=1e-5)
    # Not vacuous: the same rows compared 8 positions apart move a lot when position is removed.
    ts, X_res = tree, tree.X - tree.extra["pos_part"]
    later = {(b, t): i for i, (b, t) in enumerate(zip(ts.branch, ts.position))}
    pairs = [
        (a, later[(ts.branch[a], ts.position[a] + 8)])
        for a in raw.row_a
        if (ts.branch[a], ts.position[a] + 8) in later
    ]
    a, b = np.array(pairs).T
    d_raw = np.linalg.norm(ts.X[a] - ts.X[b], axis=1)
    d_res = np.linalg.norm(X_res[a] - X_res[b], axis=1)
    assert np.median(np.abs(d_raw - d_res) / d_raw) > 0.2


def test_siblings_closer_than_unrelated_prompts(tree):
    s = divergence_summary(_run(tree), by="kind")
    for kind in ("siblings", "fork"):
        g = list(s["key"]).index(kind)
        assert s["median"][g] < 0.9 and s["hi"][g] < 1.0, (kind, s)
        assert s["lo"][g] <= s["median"][g] <= s["hi"][g] and s["n_pairs"][g] >= 5
    assert s["chance"] == 1.0


def test_without_shared_content_siblings_are_at_chance():
    # Only position + noise: tokens of one prompt are no closer than tokens of others at the same t.
    flat = branch_tree(n_prompts=6, branches_per_prompt=10, d=32, pos_scale=3.0, content_scale=0.0, seed=2)
    s = divergence_summary(_run(flat), by="kind")
    g = list(s["key"]).index("siblings")
    assert s["lo"][g] < 1.0 < s["hi"][g] and abs(s["median"][g] - 1) < 0.05, s


def test_summary_by_offset_and_prompt_bootstrap_pairs(tree):
    r = _run(tree, max_offset=20)
    assert r.offset.min() == 0 and r.offset.max() == 20
    by_off = divergence_summary(r, by="offset", kind="siblings")
    np.testing.assert_array_equal(by_off["key"], np.arange(21))
    # One matched position per pair per offset.
    sib = r.kind == "siblings"
    assert by_off["n_pairs"][0] == len(np.unique(r.pair[sib & (r.offset == 0)])) == by_off["n_tokens"][0]
    by_prompt = divergence_summary(r, by="prompt")
    np.testing.assert_array_equal(by_prompt["key"], np.arange(6))
    assert (by_prompt["n_tokens"] > by_prompt["n_pairs"]).all()
    assert np.all(by_prompt["lo"] <= by_prompt["median"]) and np.all(by_prompt["median"] <= by_prompt["hi"])
    again = divergence_summary(_run(tree, max_offset=20), by="prompt")
    np.testing.assert_array_equal(again["lo"], by_prompt["lo"])  # seeded
    with pytest.raises(ValueError):
        divergence_summary(r, by="layer")


def _hand_tree() -> TokenSet:
    # prompt 0: root 0 (t 0-3); samples 1 (t 4-9) and 2 (t 4-7); 3 forks off 1 at t=6 (t 6-10).
    # prompt 1: root 4 (t 0-3); sample 5 (t 4-8).
    spans = {
        0: (0, 3, -1, 0),
        1: (4, 9, 0, 0),
        2: (4, 7, 0, 0),
        3: (6, 10, 1, 0),
        4: (0, 3, -1, 1),
        5: (4, 8, 4, 1),
    }
    rows = [(t, b, pr, par) for b, (lo, hi, par, pr) in spans.items() for t in range(lo, hi + 1)]
    position, branch, prompt, parent = (np.array(c) for c in zip(*rows))
    X = np.stack([np.zeros(len(rows)), 10.0 * branch], axis=1)  # tokens of branch b sit at 10 b
    return TokenSet(X, position, branch, prompt, {"parent": parent})


def test_pairs_and_offsets_on_a_hand_built_tree():
    ts = _hand_tree()
    pairs = branch_pairs(ts.position, ts.branch, ts.extra["parent"])
    assert sorted(pairs) == sorted(
        [(1, 0, "fork", 4), (2, 0, "fork", 4), (3, 1, "fork", 6), (5, 4, "fork", 4), (1, 2, "siblings", 4)]
    )
    r = _run(ts)
    by_pair = {
        (int(r.pair_a[p]), int(r.pair_b[p])): r.position[r.pair == p].tolist() for p in range(len(r.pair_a))
    }
    # Roots hold only the prompt, so a sample and its root share no position after the fork.
    assert by_pair == {(1, 0): [], (2, 0): [], (3, 1): [6, 7, 8, 9], (5, 4): [], (1, 2): [4, 5, 6, 7]}
    fork = r.pair_kind[r.pair] == "fork"
    assert r.offset[fork].tolist() == [0, 1, 2, 3] and r.offset[~fork].tolist() == [0, 1, 2, 3]
    assert np.allclose(r.distance[fork], 20) and np.allclose(r.distance[~fork], 10)
    # Baseline at t=4: prompt-0 tokens of branches 1, 2 against branch 5: distances 40, 30 -> median 35.
    # At t=6 branch 3 joins: 40, 30, 20 -> 30. At t=9 prompt 1 has no token: no baseline there.
    base = dict(zip(r.baseline_position.tolist(), r.baseline_value.tolist()))
    assert base[4] == 35 and base[6] == 30 and np.isnan(base[9])
    assert r.ratio[~fork][0] == pytest.approx(10 / 35) and np.isnan(r.ratio[fork][-1])
    s = divergence_summary(r, by="kind")
    assert s["n_pairs"].tolist() == [1, 1] and s["n_tokens"].tolist() == [4, 4]
    short = _run(ts, max_offset=1)
    assert len(short.distance) == 4 and short.offset.max() == 1


def test_one_prompt_has_no_baseline_and_does_not_crash(tree):
    one = tree.subset(tree.prompt == 0)
    r = _run(one)
    assert not r.has_baseline and "one prompt" in r.note
    assert len(r.distance) > 0 and np.isfinite(r.distance).all()
    assert np.isnan(r.ratio).all() and np.isnan(r.baseline_value).all()
    s = divergence_summary(r, by="offset")
    assert np.isnan(s["median"]).all() and np.isfinite(s["distance"]).all() and not s["has_baseline"]


def test_sibling_pairs_are_capped_deterministically():
    wide = branch_tree(n_prompts=1, branches_per_prompt=30, fork_share=0.0, d=8, seed=0)
    par = wide.extra["parent"]
    full = [
        p for p in branch_pairs(wide.position, wide.branch, par, max_sibling_pairs=None) if p[2] == "siblings"
    ]
    assert len(full) == 30 * 29 // 2
    capped = [
        p for p in branch_pairs(wide.position, wide.branch, par, max_sibling_pairs=50) if p[2] == "siblings"
    ]
    assert len(capped) == 50 == len(set(capped)) and set(capped) <= set(full)
    assert capped == [
        p for p in branch_pairs(wide.position, wide.branch, par, max_sibling_pairs=50) if p[2] == "siblings"
    ]
    other = [
        p
        for p in branch_pairs(wide.position, wide.branch, par, max_sibling_pairs=50, seed=1)
        if p[2] == "siblings"
    ]
    assert other != capped
    r = divergence(wide.X, wide.position, wide.branch, wide.prompt, par, max_sibling_pairs=50)
    assert (r.pair_kind == "siblings").sum() == 50
