"""Residualizers, metrics and projections on tiny arrays with hand-computed answers."""

from __future__ import annotations

import numpy as np
import pytest

from analysis import ProjectionSpec, ResidualSpec, find_sinks, make_residualizer, project
from analysis import metrics as M
from analysis.basis import PositionBasis


def test_r2_pos_by_hand():
    X = np.array([[0.0], [2.0], [4.0], [6.0]])
    pos = np.array([0, 0, 1, 1])
    r = M.r2_pos(X, pos, n_shuffles=50)
    # grand mean 3; position means 1 and 5: SSB = 2*4 + 2*4 = 16, SST = 9+1+1+9 = 20.
    assert r["r2"] == pytest.approx(0.8)
    # SSW = 4 over N-T = 2 dof; SST over N-1 = 3 dof.
    assert r["adjusted"] == pytest.approx(1 - (4 / 2) / (20 / 3))
    assert r["chance_analytic"] == pytest.approx(1 / 3)
    # Shuffles of 2+2 labels: r2 is 0.8 (1/3 of pairings) or 0.2*... average to exactly 1/3 in expectation.
    assert r["chance"] == pytest.approx(1 / 3, abs=0.15)


def test_heldout_r2_by_hand():
    # Two groups, two positions. Group a: 0 at t=0, 4 at t=1; group b: 2 at t=0, 6 at t=1.
    X = np.array([[0.0], [4.0], [2.0], [6.0]])
    pos = np.array([0, 1, 0, 1])
    grp = np.array([0, 0, 1, 1])
    # Each token is predicted by the other group at its position (squared errors 4, 4, 4, 4) or by the
    # other group's mean (b: 4, a: 2), squared errors 16, 0, 0, 16.
    r = M.r2_pos(X, pos, groups=grp)
    assert r["heldout"] == pytest.approx(1 - 16 / 32) and r["heldout_coverage"] == 1.0


def test_knn_leak_by_hand():
    # Two branches on a line; each token's nearest other-branch token is at the same position.
    X = np.array([[0.0], [10.0], [20.0], [0.1], [10.1], [20.1]])
    pos = np.array([0, 1, 2, 0, 1, 2])
    br = np.array([0, 0, 0, 1, 1, 1])
    r = M.knn_position_leak(X, pos, br, k=1, n_shuffles=200)
    assert r["mean_abs_dpos"] == 0.0 and r["leak"] == pytest.approx(1.0)
    # Within-branch shuffles: E|t_i - t_j| for independent uniform picks from {0,1,2} is 8/9.
    assert r["chance"] == pytest.approx(8 / 9, abs=0.1)
    nbrs = M.knn_other_groups(X, br, np.arange(6), k=2)
    assert nbrs[0].tolist() == [3, 4] and nbrs[4].tolist() == [1, 2]


def test_label_purity_by_hand():
    X = np.array([[0.0], [0.1], [5.0], [5.1]])
    pos = np.zeros(4, int)
    lab = np.array([0, 0, 1, 1])
    r = M.label_purity(X, pos, lab, k=1, window=0)
    assert r["purity"] == 1.0 and r["chance"] == pytest.approx(1 / 3)
    mixed = M.label_purity(X, pos, np.array([0, 1, 0, 1]), k=1, window=0)
    assert mixed["purity"] == 0.0
    # Tokens two positions apart are not compared at window=1.
    far = M.label_purity(X, np.array([0, 2, 4, 6]), lab, k=1, window=1)
    assert far["n_queries"] == 0


def test_trustworthiness_of_identity_and_of_a_scramble():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 5))
    assert M.trustworthiness(X, X[:, :5], k=5)["trustworthiness"] == pytest.approx(1.0)
    scrambled = M.trustworthiness(X, rng.normal(size=(200, 2)), k=5)
    assert scrambled["trustworthiness"] < 0.7 and scrambled["continuity"] < 0.7


def test_trustworthiness_equals_sklearn_and_its_band_matches_the_spread_over_samples():
    from sklearn.manifold import trustworthiness as sk_trust

    rng = np.random.default_rng(1)
    X = rng.normal(size=(4000, 20))
    Y = X[:, :2] + 0.5 * rng.normal(size=(4000, 2))
    m = M.trustworthiness(X, Y, k=7, n_samples=None)
    assert m["trustworthiness"] == pytest.approx(sk_trust(X, Y, n_neighbors=7), abs=1e-12)
    assert m["continuity"] == pytest.approx(sk_trust(Y, X, n_neighbors=7), abs=1e-12)
    # The band says what another sample of tokens would give: its sd matches the spread over samples.
    small = M.trustworthiness(X, Y, k=7, n_samples=600, seed=0)
    assert small["lo"] < small["trustworthiness"] < small["hi"]
    spread = np.std(
        [M.trustworthiness(X, Y, k=7, n_samples=600, seed=s)["trustworthiness"] for s in range(12)]
    )
    assert 0.5 < small["sd"] / spread < 2, (small["sd"], spread)


def test_guard_names_invented_pushed_apart_and_removed_content():
    from analysis.guard import check

    def leak(v, sd=0.01, chance_hi=0.03):
        return {"leak": v, "sd": sd, "chance_leak": 0.0, "chance_lo": -chance_hi, "chance_hi": chance_hi}

    pos = {"removal": {"removes": ["position"], "detected_covariates": ["position"], "weight": 1.0}}
    tok = {"removal": {"removes": ["token"], "detected_covariates": ["token"], "weight": 1.0}}
    assert [w.kind for w in check({"leak": leak(0.01)}, pos | {"leak": leak(0.30)})] == ["invented"]
    assert [w.kind for w in check({"leak_prompt": leak(-0.08)}, pos | {"leak_prompt": leak(-0.23)})] == [
        "pushed apart"
    ]
    assert (
        check({"leak": leak(0.90)}, pos | {"leak": leak(-0.02)}) == []
    )  # toward chance, within its band past it
    assert check({"leak": leak(0.01)}, pos | {"leak": leak(0.03)}) == []  # within the band of the change
    # A large raw leak does not blind it: one prompt, three branches, +0.308 -> -0.397 (chance band 0.11).
    few = check({"leak": leak(0.308, 0.03, 0.11)}, pos | {"leak": leak(-0.397, 0.03, 0.11)})
    assert [w.kind for w in few] == ["pushed apart"] and "+0.308 -> -0.397" in few[0].message
    # Nothing removed: nothing to guard.
    assert (
        check({"leak": leak(0.01)}, {"removal": {"removes": ["position"], "weight": 0.0}, "leak": leak(0.30)})
        == []
    )
    # The position leak after a token removal: content unmasked when prompts stay at chance, else position.
    raw = {"leak": leak(0.03), "leak_prompt": leak(-0.01)}
    content = check(raw, tok | {"leak": leak(0.21), "leak_prompt": leak(0.01)})
    assert [w.kind for w in content] == ["content unmasked"] and "across prompts +0.010" in content[0].message
    revealed = check(raw, tok | {"leak": leak(0.21), "leak_prompt": leak(0.20)})
    assert sorted(w.kind for w in revealed) == ["position unmasked", "position unmasked"]
    drop = check({"nn_branch": {"purity": 0.8, "sd": 0.01}}, pos | {"nn_branch": {"purity": 0.6, "sd": 0.01}})
    assert [w.kind for w in drop] == ["content removed"] and "0.800 -> 0.600" in drop[0].message


def test_per_position_mean_exact_without_shrinkage():
    X = np.array([[1.0, 0.0], [3.0, 2.0], [10.0, 10.0]])
    pos = np.array([0, 0, 1])
    res = make_residualizer(method="per_position", shrink=0.0, center=False).fit_transform(X, pos)
    np.testing.assert_allclose(res, [[-1, -1], [1, 1], [0, 0]], atol=1e-5)


def test_shrinkage_keeps_positions_seen_once():
    """Late positions with one branch must not be wiped to zero; with shrink=0 they are."""
    rng = np.random.default_rng(1)
    n_branches, length = 30, 40
    pos = np.concatenate([np.arange(length)] * n_branches + [np.arange(length, length + 5)])
    X = np.sin(pos / 7.0)[:, None] * np.ones(8) + rng.normal(size=(len(pos), 8)) * 0.5
    lonely = pos >= length
    auto = make_residualizer(method="per_position").fit_transform(X, pos)
    exact = make_residualizer(method="per_position", shrink=0.0).fit_transform(X, pos)
    assert np.abs(exact[lonely]).max() < 1e-4
    # What is left is the token's own noise (norm ~0.5 * sqrt(8) = 1.4), not zero.
    left = np.linalg.norm(auto[lonely], axis=1)
    assert left.min() > 0.2 and left.mean() > 0.8
    # Well-populated positions are still corrected: the per-position means (amplitude 1 raw) are ~0.
    assert np.abs(auto[~lonely].reshape(n_branches, length, 8).mean(0)).max() < 0.35


def test_fit_on_one_set_transform_another():
    rng = np.random.default_rng(2)
    ref_pos = np.repeat(np.arange(20), 10)
    curve = lambda p: np.stack([np.cos(p / 5), np.sin(p / 5), p / 20], 1) @ np.eye(3, 6) * 5  # noqa: E731
    ref = curve(ref_pos) + rng.normal(size=(len(ref_pos), 6)) * 0.1
    new_pos = np.array([0, 5, 19, 25, 40])  # 25 and 40 were never seen
    new = curve(new_pos) + 1.0
    for method in ("per_position", "regression", "projection", "none"):
        r = make_residualizer(method=method).fit(ref, ref_pos)
        out = r.transform(new, new_pos)
        assert out.shape == new.shape and np.isfinite(out).all(), method
    r = make_residualizer(method="per_position", shrink=0.0, center=False).fit(ref, ref_pos)
    seen = new_pos < 20
    np.testing.assert_allclose(r.transform(new, new_pos)[seen], 1.0, atol=0.1)
    # Unseen positions take the smooth fit held at its edge value.
    at = lambda p: r.component(np.zeros((1, 6)), position=np.array([p]))[0]  # noqa: E731
    np.testing.assert_allclose(at(40), at(19), atol=0.5)


def test_regression_removes_a_polynomial_exactly():
    rng = np.random.default_rng(3)
    pos = np.tile(np.arange(50), 6)
    content = rng.normal(size=(6, 4)).repeat(50, axis=0)
    u = pos / 49.0
    X = np.stack([u, u**2, u**3], 1) @ rng.normal(size=(3, 4)) * 10 + content
    res = make_residualizer(method="regression", basis="poly", degree=3).fit_transform(X, pos)
    np.testing.assert_allclose(res, content - content.mean(0), atol=1e-3)


@pytest.mark.parametrize("kind", ["spline", "poly", "sinusoid"])
def test_bases_have_an_intercept_and_hold_outside_the_range(kind):
    b = PositionBasis(kind, n_knots=5, degree=3, n_freq=2).fit(np.arange(10, 30))
    phi = b.transform(np.array([0, 10, 20, 29, 100]))
    assert np.isfinite(phi).all()
    np.testing.assert_allclose(phi[0], phi[1])
    np.testing.assert_allclose(phi[3], phi[4])
    coef = np.linalg.lstsq(b.transform(np.arange(10, 30)), np.ones(20), rcond=None)[0]
    np.testing.assert_allclose(b.transform(np.arange(10, 30)) @ coef, 1.0, atol=1e-8)


def test_scaling_options():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(100, 3)) * [1, 10, 100] + 5
    pos = np.zeros(100, int)
    std = make_residualizer(method="none", standardize=True).fit_transform(X, pos)
    np.testing.assert_allclose(std.std(0), 1, atol=1e-4)
    unit = make_residualizer(method="none", l2=True, center=False).fit_transform(X, pos)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1, atol=1e-5)


def test_bad_specs_name_the_problem():
    with pytest.raises(ValueError, match="unknown residualizer 'mean'"):
        ResidualSpec(method="mean")
    with pytest.raises(ValueError, match="unknown basis 'wavelet'; choose one of spline, poly, sinusoid"):
        ResidualSpec(method="per_position", basis="wavelet")
    with pytest.raises(ValueError, match="no parameter 'basis' \\(it takes n_knots, linear\\)"):
        ResidualSpec(method="auto", basis="spline")  # a parameter the method does not declare
    with pytest.raises(ValueError, match="k must be >= 1"):
        ResidualSpec(method="projection", k=0)
    with pytest.raises(ValueError, match="unknown projection"):
        ProjectionSpec(method="tsne")
    with pytest.raises(ValueError, match="at least 3 tokens"):
        project(np.zeros((2, 4)))


def test_find_sinks_flags_bos_and_norm_outliers():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(100, 16))
    X[0] *= 40
    X[37] *= 25  # a massive activation away from position 0 (e.g. the first newline)
    pos = np.arange(100)
    mask = find_sinks(X, pos)
    assert mask[0] and mask[37] and mask.sum() == 2
    assert not find_sinks(X, pos, include_first=False)[1:37].any()


@pytest.mark.parametrize("method", ["umap", "pca"])
def test_projection_is_reproducible_with_a_seed(method):
    rng = np.random.default_rng(6)
    X = np.concatenate([rng.normal(size=(60, 20)), rng.normal(size=(60, 20)) + 6]).astype(np.float32)
    spec = ProjectionSpec(method=method, n_epochs=30, metric="euclidean")
    a, b = project(X, spec), project(X, spec)
    assert a.shape == (120, 2)
    np.testing.assert_array_equal(a, b)
    # Two far-apart clusters stay apart: each point's nearest neighbour is from its own cluster.
    d = ((a[:, None] - a[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert ((d.argmin(1) < 60) == (np.arange(120) < 60)).all()
    assert project(X, ProjectionSpec(method=method, n_components=3, n_epochs=10)).shape == (120, 3)


def test_identical_vectors_share_one_point_and_distinct_ones_are_laid_out_as_before():
    """UMAP lays out each distinct vector once (a RoPE model's layer 0 repeats its token embedding);
    copies get the same coordinates; without copies the layout is umap-learn's on the rows themselves."""
    from analysis.project import _prepared, distinct_rows, umap_layout

    rng = np.random.default_rng(3)
    words = rng.normal(size=(40, 16)).astype(np.float32)
    ids = rng.integers(0, 40, 200)
    X = words[ids]  # 200 tokens, at most 40 distinct vectors
    spec = ProjectionSpec(method="umap", n_epochs=30)
    coords = project(X, spec)
    assert coords.shape == (200, 2)
    for i in np.unique(ids):
        copies = coords[ids == i]
        assert (copies == copies[0]).all()  # every copy of a vector on one point
    assert len(np.unique(coords, axis=0)) == len(np.unique(ids))  # distinct vectors on distinct points
    Y = rng.normal(size=(120, 16)).astype(np.float32)  # all distinct: exactly the plain layout
    np.testing.assert_array_equal(project(Y, spec), umap_layout(_prepared(Y, spec), spec))
    first, copy_of = distinct_rows(X)
    assert np.array_equal(X[first][copy_of], X) and np.all(np.diff(first) > 0)  # first appearances, in order
    assert len(first) == len(np.unique(ids))


def test_degenerate_inputs_give_clear_errors():
    X = np.random.default_rng(7).normal(size=(4, 10)).astype(np.float32)
    # One token per position: no noise estimate, so the smooth fit is used and the tokens are kept.
    res = make_residualizer(method="per_position").fit_transform(X, np.arange(4))
    assert np.linalg.norm(res, axis=1).min() > 0.1
    with pytest.raises(ValueError, match="all 5 vectors are the same"):
        project(np.ones((5, 3), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        project(np.full((5, 3), np.nan, np.float32))


def test_project_refuses_non_finite_or_identical_vectors_with_one_clear_error():
    from analysis.project import ProjectionSpec, project

    X = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    for bad in (np.nan, np.inf):
        Y = X.copy()
        Y[7, 3] = bad
        with pytest.raises(ValueError, match="NaN or infinity"):
            project(Y, ProjectionSpec())
    with pytest.raises(ValueError, match="nothing to project"):
        project(np.tile(X[:1] + 1000, (50, 1)), ProjectionSpec())
    assert project(X, ProjectionSpec(method="pca")).shape == (50, 2)
