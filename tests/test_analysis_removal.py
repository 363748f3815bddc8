"""Nuisance removal on synthetic trees with a known positional, content and token-identity component:
it removes what is there, invents nothing where nothing is, and the guard names what it made worse."""

from __future__ import annotations

import numpy as np
import pytest

from analysis import ResidualSpec, ViewSpec, compute_view
from analysis.guard import check
from analysis.project import ProjectionSpec
from analysis.synthetic import branch_tree

PCA = ProjectionSpec(method="pca")  # the maths under test is the removal; PCA keeps these fast


def view(tokens, method="per_position", reference=None, independent=False, **params):
    spec = ViewSpec(residual=ResidualSpec(method=method, **params), projection=PCA)
    return compute_view(tokens, spec, reference=reference, independent=independent)


def small_tree(seed: int, pos_scale: float, n_prompts: int = 4, **kw):
    return branch_tree(
        n_prompts=n_prompts, branches_per_prompt=6, length=40, d=32, pos_scale=pos_scale, seed=seed, **kw
    )


def with_tokens(tokens, seed: int, vocab: int = 300, scale: float = 1.0):
    """The tree plus a token-identity part: Zipf-distributed ids, one embedding vector per id."""
    rng = np.random.default_rng(seed + 1)
    p = 1 / np.arange(1, vocab + 1)
    ids = rng.choice(vocab, len(tokens), p=p / p.sum())
    emb = np.random.default_rng(99).normal(size=(vocab, tokens.dim)) * scale
    out = tokens.with_X((tokens.X + emb[ids]).astype(np.float32))
    out.extra["token_id"] = ids
    return out


def within_chance(leak: dict) -> bool:
    """The leak's own 95% band meets the band a leak at chance falls in: consistent with chance."""
    return leak["lo"] <= leak["chance_hi"] and leak["hi"] >= leak["chance_lo"]


@pytest.fixture(scope="module")
def tree():
    return branch_tree(n_prompts=4, branches_per_prompt=10, d=64, seed=3)


@pytest.fixture(scope="module")
def raw(tree):
    return view(tree, "none")


def test_raw_data_shows_the_leak(raw):
    m = raw.metrics
    assert m["r2_pos"]["r2"] > 0.5 and m["r2_pos"]["heldout"] > 0.5
    assert m["leak"]["leak"] > 0.8 and not within_chance(m["leak"])
    assert m["leak_2d"]["leak"] > 0.5 and not within_chance(m["leak_2d"])
    assert m["removal"]["method"] == "none" and not m["removal"]["detected"]


@pytest.mark.parametrize("method", ["per_position", "regression", "projection"])
def test_a_strong_helix_is_detected_and_removed_to_chance_keeping_content(tree, raw, method):
    m = view(tree, method).metrics
    assert m["removal"]["detected"] and m["removal"]["p_value"] <= 0.05 and m["removal"]["crossfit"]
    assert within_chance(m["leak"]), m["leak"]
    assert within_chance(m["leak_2d"]), m["leak_2d"]
    assert m["r2_pos"]["r2"] <= m["r2_pos"]["chance"] + 1.96 * m["r2_pos"]["sd"] + 0.01
    # Content survives: matched-position separability does not drop, and the guard is silent.
    assert check(raw.metrics, m) == []
    for key in ("nn_branch", "nn_prompt"):
        assert m[key]["purity"] >= raw.metrics[key]["purity"] - 1.96 * m[key]["sd"], key


def test_projection_chooses_its_rank_from_the_data(tree):
    """The synthetic curve spans 5 directions (two helices and a drift): k=2, the old default, leaves
    much of it; the rank chosen out of fold removes it."""
    auto = view(tree, "projection").metrics
    two = view(tree, "projection", k=2).metrics
    assert auto["removal"]["k"] >= 4 and len(auto["removal"]["rank_r2"]) == 10
    assert within_chance(auto["leak"]) and not within_chance(two["leak"])


def test_nothing_is_invented_where_there_is_no_position():
    """No positional part: every method and fit scope leaves every leak within its band of raw, and the
    guard stays silent, in at least 95% of seeds (the detection test's level)."""
    clean_runs = total = 0
    for seed in range(20):
        run = small_tree(seed, pos_scale=0.0)
        other = small_tree(seed + 1000, pos_scale=0.0, n_prompts=6)
        plot = run.subset(np.isin(run.prompt, [0, 1]))
        raw_all, raw_sub = view(run, "none").metrics, view(plot, "none").metrics
        for method in ("per_position", "regression", "projection"):
            for r, m in [
                (raw_all, view(run, method).metrics),  # fit on the plotted tokens (the whole run)
                (raw_sub, view(plot, method, reference=run).metrics),  # a subset, fit on the run
                (raw_all, view(run, method, reference=other, independent=True).metrics),
            ]:  # another run
                total += 1
                moved = [
                    k
                    for k in ("leak", "leak_prompt", "leak_2d")
                    if abs(m[k]["leak"] - r[k]["leak"]) > 1.96 * np.hypot(m[k]["sd"], r[k]["sd"])
                ]
                clean_runs += not moved and not check(r, m)
    assert clean_runs >= 0.95 * total, (clean_runs, total)


def test_three_branches_are_not_pushed_below_chance():
    """One prompt, three branches: folds over branches; where the other branches never reach a position
    nothing is extrapolated (those tokens are left as they are), and the leak is not pushed below chance."""
    for seed in range(5):
        tokens = branch_tree(
            n_prompts=1, branches_per_prompt=3, length=60, d=32, pos_scale=3.0, seed=seed, fork_share=0
        )
        raw_m = view(tokens, "none").metrics
        m = view(tokens, "per_position").metrics
        assert m["removal"]["fold_by"] == "branch" and m["removal"]["crossfit_share"] < 1
        assert m["leak"]["leak"] >= m["leak"]["chance_lo"], (seed, m["leak"])
        assert "pushed apart" not in {w.kind for w in check(raw_m, m)}, seed


def test_token_identity_is_not_position():
    """Latents that are token embeddings alone (a RoPE model's layer 0): no positional component is
    detected, the view is exactly raw; forcing the removal invents a leak and the guard says so; the
    per-token residualizer finds the token component."""
    tokens = with_tokens(small_tree(0, pos_scale=0.0, content_scale=0.0, noise=0.05), seed=0)
    raw_v = view(tokens, "none")
    default = view(tokens)
    assert not default.metrics["removal"]["detected"] and default.metrics["removal"]["weight"] == 0
    np.testing.assert_array_equal(default.residual, raw_v.residual)
    forced = view(tokens, gate=False).metrics
    assert forced["removal"]["forced"] and [w.kind for w in check(raw_v.metrics, forced)][:1] == ["invented"]
    for method in ("per_token", "position_token"):
        m = view(tokens, method).metrics
        assert m["removal"]["detected"], method
        assert check(raw_v.metrics, m) == [], method
    with pytest.raises(ValueError, match="token"):
        view(small_tree(0, pos_scale=0.0), "per_token")  # no token ids: a clear error


def test_one_prompt_one_branch_cannot_be_tested_so_nothing_is_removed():
    tokens = branch_tree(n_prompts=1, branches_per_prompt=1, length=40, d=16, pos_scale=3.0, seed=0)
    tokens = tokens.subset(tokens.branch == tokens.branch.max())  # a single branch
    m = view(tokens).metrics
    assert (
        not m["removal"]["detected"]
        and m["removal"]["weight"] == 0
        and "cannot be tested" in m["removal"]["note"]
    )
    assert view(tokens, gate=False).metrics["removal"]["forced"]


def test_sinks_are_dropped_by_default_and_kept_on_request(tree):
    n_sinks = int(tree.extra["is_sink"].sum())
    dropped = compute_view(tree, ViewSpec(metrics=False))
    kept = compute_view(tree, ViewSpec(exclude_sinks=False, metrics=False))
    assert dropped.metrics["n_sinks_dropped"] == n_sinks == 4
    assert not tree.extra["is_sink"][dropped.index].any()
    assert len(kept.index) == len(tree) and kept.coords.shape == (len(tree), 2)


def test_reference_fit_scope(tree):
    """Fitting on a big reference tree (another run) and plotting a small one: position goes to chance."""
    reference = branch_tree(n_prompts=8, branches_per_prompt=10, d=64, seed=11)
    plot = tree.subset(np.isin(tree.prompt, [0, 1]))
    v = view(plot, reference=reference, independent=True)
    assert len(v.index) == int((~plot.extra["is_sink"]).sum())
    assert within_chance(v.metrics["leak"]) and v.metrics["removal"]["note"] == "fitted on another run"
    assert v.metrics["nn_branch"]["purity"] > 3 * v.metrics["nn_branch"]["chance"]
    with pytest.raises(ValueError, match="width"):
        compute_view(plot, reference=branch_tree(d=32, seed=1))


def test_removing_too_much_content_is_flagged(tree, raw):
    """Projecting out 60 directions of the per-position means, forced and fitted in sample, removes content:
    matched-position separability falls and the guard names it; the default removal does not."""
    heavy = view(tree, "projection", k=60, gate=False, crossfit=False).metrics
    assert "content removed" in {w.kind for w in check(raw.metrics, heavy)}
    assert check(raw.metrics, view(tree).metrics) == []


@pytest.mark.parametrize("tail", [0, 1, 3])
def test_the_cross_fit_note_counts_the_tokens_left_and_is_silent_when_none_are(tail):
    """Issue 30: "0% of tokens sit where the other folds have no data" was printed when none did. Each
    prompt is its own fold; a tail of positions only the last prompt reaches is unseen by the other folds,
    so exactly those tokens are left as they are, and the note says how many (1 of 321 read "0%")."""
    from analysis.crossfit import fit_remove
    from analysis.tokens import TokenSet

    rng = np.random.default_rng(0)
    position, branch, prompt = [], [], []
    for q in range(4):
        for b in range(2):
            n = 40 + (tail if (q, b) == (3, 1) else 0)
            position += list(range(n))
            branch += [q * 2 + b] * n
            prompt += [q] * n
    tokens = TokenSet(
        rng.normal(size=(len(position), 8)).astype(np.float32),
        np.array(position),
        np.array(branch),
        np.array(prompt),
    )
    residual, report = fit_remove(tokens, ResidualSpec(method="per_position", gate=False, folds=4))
    if tail:  # left as they are: moved only by the shift that recentres every residual
        moved = (residual - (tokens.X - tokens.X.mean(axis=0)))[np.array(position) >= 40]
        np.testing.assert_allclose(moved, np.broadcast_to(moved[0], moved.shape), atol=1e-5)
        assert report.note == (
            f"{tail} of {len(position)} tokens sit where the other folds have no data "
            "(position or token unseen there): they are left as they are"
        )
    else:
        assert "other folds have no data" not in (report.note or "") and report.crossfit_share == 1.0
