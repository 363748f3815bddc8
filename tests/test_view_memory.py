"""The memory-lean paths of a view (issue 15) give the numbers of the plain ones: R2_pos read in float64
blocks against its definition on a float64 copy, the removal fitted from per-(fold, label) sums against
fits on the offset rows, and in-place views against copying ones."""

from __future__ import annotations

import numpy as np
import pytest

from analysis import ResidualSpec, ViewSpec, compute_view
from analysis.crossfit import fit_remove, fold_label_stats
from analysis.engine import groups as G
from analysis.engine.groups import BLOCK
from analysis.metrics import r2_pos
from analysis.project import ProjectionSpec
from analysis.residualize import LabelStats, PerPositionMean, branch_offsets, make_residualizer
from analysis.synthetic import branch_tree
from analysis.view import measure, residualize


def _sums(X: np.ndarray, codes: np.ndarray, n_codes: int, w: np.ndarray | None = None) -> np.ndarray:
    out = np.zeros((n_codes, X.shape[1]))
    np.add.at(out, codes, X if w is None else X * w[:, None])
    return out


def reference_r2_pos(
    X: np.ndarray,
    position: np.ndarray,
    groups: np.ndarray,
    n_shuffles: int = 5,
    seed: int = 0,
    n_boot: int = 30,
    dims: int = 64,
) -> dict[str, float]:
    """R2_pos as defined, on a float64 copy of X with (n, d) temporaries (the obvious way)."""
    X = X.astype(np.float64)
    n = len(X)
    grand = X.mean(axis=0)
    sst = ((X - grand) ** 2).sum()
    _, pos, cnt = np.unique(position, return_inverse=True, return_counts=True)
    T = len(cnt)

    def ssb(codes: np.ndarray, Z: np.ndarray, w: np.ndarray) -> float:
        c = np.bincount(codes, weights=w, minlength=T)
        g = (w @ Z) / w.sum()
        ok = c > 0
        return float((c[ok] * ((_sums(Z, codes, T, w)[ok] / c[ok, None] - g) ** 2).sum(axis=1)).sum())

    ones = np.ones(n)
    rng = np.random.default_rng(seed)
    shuffled = [ssb(rng.permutation(pos), X, ones) / sst for _ in range(n_shuffles)]
    _, grp = np.unique(groups, return_inverse=True)
    G = grp.max() + 1
    pair = grp * T + pos
    pair_sums, pair_n = _sums(X, pair, G * T), np.bincount(pair, minlength=G * T)
    g_sums, g_n = _sums(X, grp, G), np.bincount(grp, minlength=G)
    other_n = cnt[pos] - pair_n[pair]  # (n,) tokens of other groups at the same position
    ok = other_n > 0
    mu_pos = (_sums(X, pos, T)[pos] - pair_sums[pair])[ok] / other_n[ok, None]  # (n_ok, d)
    mu_all = (g_sums.sum(axis=0) - g_sums[grp])[ok] / (n - g_n[grp])[ok, None]
    heldout = 1 - ((X[ok] - mu_pos) ** 2).sum() / ((X[ok] - mu_all) ** 2).sum()
    Z = X @ (rng.normal(size=(X.shape[1], dims)) / np.sqrt(dims)) if X.shape[1] > dims else X
    boot = []
    for _ in range(n_boot):
        w = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)  # a multinomial resample
        g = (w @ Z) / w.sum()
        boot.append(ssb(pos, Z, w) / float(w @ ((Z - g) ** 2).sum(axis=1)))
    return {
        "r2": ssb(pos, X, ones) / sst,
        "chance": float(np.mean(shuffled)),
        "chance_sd": float(np.std(shuffled)),
        "heldout": heldout,
        "heldout_coverage": float(ok.mean()),
        "sd": float(np.std(boot)),
        "lo": float(np.quantile(boot, 0.025)),
        "hi": float(np.quantile(boot, 0.975)),
    }


@pytest.mark.parametrize(
    "shape",
    [
        dict(n_prompts=3, branches_per_prompt=4, length=30, d=80),  # d > 64: band projects
        dict(n_prompts=40, branches_per_prompt=10, length=100, d=24),
    ],
)  # > 2 blocks
def test_r2_pos_read_in_float64_blocks_equals_its_definition_on_a_float64_copy(shape):
    tree = branch_tree(seed=5, **shape)
    assert tree.X.dtype == np.float32
    if shape["n_prompts"] == 40:
        assert len(tree) > 2 * BLOCK  # several blocks of sums, several chunks of groups for the held-out part
    got = r2_pos(tree.X, tree.position, groups=tree.prompt)
    for key, value in reference_r2_pos(tree.X, tree.position, tree.prompt).items():
        band = key in ("sd", "lo", "hi")  # the band's projection is float32: its values to ~1e-7
        assert got[key] == pytest.approx(value, rel=1e-6 if band else 1e-9, abs=1e-12), key


@pytest.mark.parametrize("method", ["per_position", "projection", "per_token"])
def test_fold_statistics_by_algebra_equal_statistics_of_the_offset_rows(method):
    tree = branch_tree(n_prompts=5, branches_per_prompt=6, length=40, d=32, seed=7)
    rng = np.random.default_rng(0)
    token = rng.integers(0, 50, len(tree))
    labels = token if method == "per_token" else tree.position
    fold = tree.prompt % 3
    Z = tree.X - tree.X.mean(axis=0)
    spec = ResidualSpec(method=method)
    helper = (
        make_residualizer(spec)
        if method != "projection"
        else PerPositionMean(spec.with_method("per_position"))
    )
    cov = {"token": token} if method == "per_token" else {"position": tree.position}
    got = fold_label_stats(Z, labels, tree.branch, fold, helper)
    rows = Z - branch_offsets(make_residualizer(spec), Z, cov, tree.branch)  # (n, d): what the algebra avoids
    for f in range(3):
        want = LabelStats.of(rows[fold == f], labels[fold == f])
        np.testing.assert_array_equal(got[f].labels, want.labels)
        np.testing.assert_array_equal(got[f].counts, want.counts)
        np.testing.assert_allclose(got[f].sums, want.sums, rtol=1e-4, atol=1e-3)
        assert got[f].sq == pytest.approx(want.sq, rel=1e-5) and got[f].n == want.n


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"method": "per_position"},
        {"method": "projection"},
        {"method": "position_token"},
        {"method": "per_position", "crossfit": False},
        {"standardize": True},
        {"method": "linear_erase", "gate": False},
    ],
)
def test_removal_in_place_writes_the_same_residuals_over_the_input(params):
    tree = branch_tree(n_prompts=4, branches_per_prompt=6, length=40, d=32, seed=11)
    tree.extra["token_id"] = np.random.default_rng(1).integers(0, 40, len(tree))
    spec = ResidualSpec(**params)
    copied, report = fit_remove(tree, spec)
    X = tree.X.copy()
    own = tree.with_X(X)
    in_place, report2 = fit_remove(own, spec, in_place=True)
    assert in_place is own.X
    np.testing.assert_array_equal(in_place, copied)
    assert report2.to_dict().keys() == report.to_dict().keys() and report2.weight == report.weight
    np.testing.assert_array_equal(
        fit_remove(tree, spec, reference=tree.subset(tree.prompt < 3))[0],
        fit_remove(tree.with_X(tree.X.copy()), spec, tree.subset(tree.prompt < 3), in_place=True)[0],
    )


def test_view_in_place_equals_the_copying_view():
    tree = branch_tree(n_prompts=4, branches_per_prompt=8, length=40, d=48, seed=4)
    spec = ViewSpec(projection=ProjectionSpec(method="pca"))
    plain = compute_view(tree, spec)
    X_before = tree.X.copy()
    np.testing.assert_array_equal(tree.X, X_before)  # the plain view leaves its input alone
    own = tree.with_X(tree.X.copy())
    lean = compute_view(own, spec, in_place=True)
    np.testing.assert_array_equal(lean.index, plain.index)
    assert np.shares_memory(lean.residual, own.X)
    np.testing.assert_allclose(
        lean.residual, plain.residual, rtol=1e-6, atol=1e-6
    )  # scaled back after the measures
    np.testing.assert_allclose(lean.coords, plain.coords, rtol=1e-5, atol=1e-5)
    for key in ("r2_pos", "leak", "leak_prompt", "nn_branch", "purity_branch_pooled", "projection"):
        for field, value in plain.metrics[key].items():
            assert lean.metrics[key][field] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), (
                key,
                field,
            )


def test_measure_in_place_gives_the_copying_numbers_and_restores_the_vectors():
    tree = branch_tree(n_prompts=3, branches_per_prompt=6, length=30, d=24, seed=8)
    spec = ViewSpec()
    _, tokens, _ = residualize(tree, spec)
    before = tokens.X.copy()
    copied = measure(tokens, None, spec)
    np.testing.assert_array_equal(tokens.X, before)
    lean = measure(tokens, None, spec, in_place=True)
    np.testing.assert_allclose(tokens.X, before, rtol=1e-6, atol=1e-7)
    assert lean.keys() == copied.keys()
    for key in ("r2_pos", "leak", "nn_branch", "purity_prompt_pooled"):
        for field, value in copied[key].items():
            assert lean[key][field] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), (key, field)


def test_nearest_only_search_finds_the_brute_force_nearest():
    from analysis.engine.neighbours import exact_knn

    rng = np.random.default_rng(3)
    B, Q = rng.normal(size=(300, 16)).astype(np.float32), rng.normal(size=(2500, 16)).astype(np.float32)
    idx, dist = exact_knn(Q, B, 1)
    d = np.sqrt(((Q[:, None, :].astype(np.float64) - B[None]) ** 2).sum(axis=2))  # (q, n)
    np.testing.assert_array_equal(idx[:, 0], d.argmin(axis=1))
    np.testing.assert_allclose(dist[:, 0], d.min(axis=1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "params",
    [{}, {"method": "regression"}, {"method": "per_token"}, {"within_branch": False}, {"shrink": 0.0}],
)
def test_out_of_fold_weight_from_cell_sums_equals_the_fits_on_training_rows(params):
    """The removal's weight (crossfit.out_of_fold) from FoldCells' sums: the same R2 and weight as fitting each
    fold's model, its branch offsets backfitted, on the training rows themselves."""
    from analysis.crossfit import (
        _oof_from_cells,
        _oof_rows,
        _supported,
        covariates,
        fold_of,
        random_projection,
    )

    tree = branch_tree(n_prompts=6, branches_per_prompt=5, length=40, d=96, seed=3)
    rng = np.random.default_rng(2)
    token = rng.integers(0, 30, len(tree))
    token[tree.prompt == 1] += 30 * (rng.random(int((tree.prompt == 1).sum())) < 0.2)  # ids only prompt 1 has
    tree.extra["token_id"] = token
    tree = tree.with_X(tree.X + 3 * rng.normal(size=(60, tree.dim)).astype(np.float32)[token])
    spec = ResidualSpec(**({"method": "per_position"} | params))
    # prompt 0 alone reaches past position 30: its fold's late tokens have no support elsewhere
    tree = tree.subset(np.flatnonzero((tree.prompt == 0) | (tree.position <= 30)))
    fold, _ = fold_of(tree.prompt, tree.prompt, spec.folds, 0)
    Z = random_projection(tree.X - tree.X.mean(axis=0), 0)  # (n, 64) float64, as the removal's test runs on
    cov = {k: v for k, v in covariates(tree).items() if v is not None}
    name = "token" if spec.method == "per_token" else "position"
    label = cov[name]
    unsupported = sum(
        int((~_supported({name: label[fold != f]}, {name: label[fold == f]})).sum()) for f in np.unique(fold)
    )
    assert unsupported > 0  # held-out rows whose position (token id) the training folds never saw: left out
    got = _oof_from_cells(Z, tree, fold, spec, label)
    want = _oof_rows(Z, tree, fold, spec, cov)
    assert 0 < want[1] <= 1  # a real weight, not a degenerate 0
    assert got[0] == pytest.approx(want[0], rel=1e-5, abs=1e-7)
    assert got[1] == pytest.approx(want[1], rel=1e-5, abs=1e-7)


def test_float64_blocks_cover_every_row_once_from_one_buffer(monkeypatch):
    monkeypatch.setattr(G, "F64_BUFFER", 8 * 7 * 100)  # 100 rows of d = 7 per block
    X = np.random.default_rng(8).normal(size=(1234, 7)).astype(np.float32)
    seen, buffers = np.zeros(len(X), int), set()
    for rows, block in G.f64_blocks(X):
        assert block.dtype == np.float64 and len(block) <= 100
        np.testing.assert_array_equal(block, X[rows].astype(np.float64))
        seen[rows] += 1
        buffers.add(block.__array_interface__["data"][0])
    assert (seen == 1).all() and len(buffers) == 1


def test_row_norms_and_squares_equal_numpy():
    X = np.random.default_rng(9).normal(size=(3000, 33)).astype(np.float32)
    X[5] = 0  # a zero row: its norm is floored, its unit row finite
    shift = np.linspace(-1, 1, 33)
    np.testing.assert_allclose(
        G.row_sq(X, shift), ((X.astype(np.float64) - shift) ** 2).sum(axis=1), rtol=1e-12
    )
    norms = G.row_norms(X)
    assert norms.shape == (3000, 1) and norms.dtype == np.float32
    np.testing.assert_allclose(
        norms[:, 0], np.maximum(np.linalg.norm(X.astype(np.float64), axis=1), 1e-12), rtol=1e-6
    )
    assert np.isfinite(X / norms).all()
