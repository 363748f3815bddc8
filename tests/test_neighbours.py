"""Neighbour search (analysis.engine.neighbours) and what uses it: approximate recall against exact, the metrics
with approximate neighbours against exact ones, the landmark layout against the full one, and the exact
path kept for small n."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from analysis import ProjectionSpec, project
from analysis import metrics as M
from analysis.engine import neighbours
from analysis.metrics import trustworthiness
from analysis.probe import token_identity_leak
from analysis.synthetic import branch_tree

P = importlib.import_module("analysis.project")  # the attribute `analysis.project` is the function


@pytest.fixture(scope="module")
def tree():
    """~6k tokens of seeded synthetic branch trees (above EXACT_GRAPH_MAX), d=64, unit vectors."""
    t = branch_tree(n_prompts=8, branches_per_prompt=10, length=120, d=64, seed=3, sinks=False)
    X = t.X / np.linalg.norm(t.X, axis=1, keepdims=True)
    token_id = np.random.default_rng(0).integers(0, 40, len(t))
    token_id[t.position % 7 == 0] = 7  # a token that recurs at fixed positions: its neighbours share it
    return t.with_X(X.astype(np.float32)), token_id


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(
        np.mean(
            [len(np.intersect1d(a[a >= 0], b[b >= 0])) / max((b >= 0).sum(), 1) for a, b in zip(found, truth)]
        )
    )


def test_hnsw_graph_recall_against_exact(tree):
    t, _ = tree
    Y = P.pca_reduce(t.X, 50)
    assert len(Y) > neighbours.EXACT_GRAPH_MAX
    approx_idx, approx_dist = neighbours.knn_graph(Y, 15)
    exact_idx, exact_dist = neighbours.exact_knn(Y, Y, 15)
    assert not neighbours.Index(Y).exact
    assert recall(approx_idx, exact_idx) >= 0.97
    assert (approx_idx[:, 0] == np.arange(len(Y))).all() and (approx_dist[:, 0] == 0).all()
    # Distances are true Euclidean distances of the pairs returned.
    d = np.linalg.norm(Y[approx_idx[:50]] - Y[:50, None], axis=2)
    np.testing.assert_allclose(approx_dist[:50], d, rtol=1e-3, atol=1e-4)


def test_hnsw_graph_is_the_same_on_every_build(tree):
    t, _ = tree
    Y = P.pca_reduce(t.X, 50)
    np.testing.assert_array_equal(neighbours.knn_graph(Y, 15)[0], neighbours.knn_graph(Y, 15)[0])


def test_graph_from_an_index_the_caller_built_equals_the_graph_that_builds_its_own(tree):
    t, _ = tree
    Y = np.ascontiguousarray(P.pca_reduce(t.X, 50), dtype=np.float32)
    own = neighbours.knn_graph(Y, 15)
    shared = neighbours.knn_graph(Y, 15, index=neighbours.Index(Y))
    np.testing.assert_array_equal(shared[0], own[0])
    np.testing.assert_array_equal(shared[1], own[1])
    with pytest.raises(ValueError, match="index holds"):
        neighbours.knn_graph(Y[:100], 15, index=neighbours.Index(Y))


def test_exact_path_for_small_n():
    rng = np.random.default_rng(1)
    Y = rng.normal(size=(500, 8)).astype(np.float32)
    assert neighbours.Index(Y).exact
    idx, _ = neighbours.knn_graph(Y, 5)
    d = ((Y[:, None] - Y[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(idx, np.argsort(d, axis=1, kind="stable")[:, :5])


def test_metric_search_is_exact_below_the_cut(tree):
    t, _ = tree
    q = np.arange(0, len(t), 37)
    found = neighbours.search(t.X, q, 5, t.branch)
    d = ((t.X[q, None] - t.X[None]) ** 2).sum(-1)
    d[t.branch[q, None] == t.branch[None]] = np.inf
    np.testing.assert_array_equal(found, np.argsort(d, axis=1, kind="stable")[:, :5])


@pytest.mark.parametrize("by", ["branch", "prompt", None])
def test_approximate_metric_search_recall(tree, by):
    t, _ = tree
    groups = None if by is None else getattr(t, by)
    q = np.sort(np.random.default_rng(2).choice(len(t), 300, replace=False))
    exact = neighbours.search(t.X, q, 10, groups)
    approx = neighbours.search(t.X, q, 10, groups, exact_max=0)
    assert recall(approx, exact) >= 0.9
    own = q[:, None] if groups is None else groups[q, None]
    assert not (
        (approx if groups is None else groups[approx]) == own
    ).any()  # excluded points never come back


@pytest.fixture(scope="module")
def residual_tree():
    """~13k unit residuals (per-position means removed) at d=256: what the metrics search after a removal,
    where a PCA-64 space keeps little of the distances and ranks the nearest few poorly."""
    t = branch_tree(n_prompts=12, branches_per_prompt=10, length=200, d=256, seed=5, sinks=False)
    X = t.X.astype(np.float64)
    for p in np.unique(t.position):
        X[t.position == p] -= X[t.position == p].mean(axis=0)
    return t.with_X((X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32))


@pytest.mark.parametrize("by", ["branch", None])
def test_approximate_search_recall_where_the_reduced_space_ranks_poorly(residual_tree, by):
    t = residual_tree
    groups = None if by is None else t.branch
    q = np.sort(np.random.default_rng(2).choice(len(t), 300, replace=False))
    exact = neighbours.search(t.X, q, 10, groups)
    # re-ranking 4 candidates per neighbour (the old default) found 0.75 of them here
    assert recall(neighbours.search(t.X, q, 10, groups, exact_max=0, rerank=40), exact) < 0.9
    assert recall(neighbours.search(t.X, q, 10, groups, exact_max=0), exact) >= 0.97


def test_metrics_with_approximate_neighbours_agree_with_exact_within_their_bands(tree, monkeypatch):
    t, token_id = tree
    exact = {
        "leak": M.knn_position_leak(t.X, t.position, t.branch, n_queries=600),
        "leak_prompt": M.knn_position_leak(t.X, t.position, t.prompt, n_queries=600),
        "pooled": M.label_purity(t.X, t.position, t.branch, window=None, n_queries=600),
        "token": token_identity_leak(t.X, token_id, t.branch, n_queries=600),
    }
    monkeypatch.setattr(neighbours, "EXACT_QUERY_MAX", 1000)
    approx = {
        "leak": M.knn_position_leak(t.X, t.position, t.branch, n_queries=600),
        "leak_prompt": M.knn_position_leak(t.X, t.position, t.prompt, n_queries=600),
        "pooled": M.label_purity(t.X, t.position, t.branch, window=None, n_queries=600),
        "token": token_identity_leak(t.X, token_id, t.branch, n_queries=600),
    }
    for key, field in (("leak", "leak"), ("leak_prompt", "leak"), ("pooled", "purity"), ("token", "leak")):
        gap = abs(approx[key][field] - exact[key][field])
        assert gap <= 1.96 * exact[key]["sd"], (key, approx[key][field], exact[key][field], exact[key]["sd"])
    assert exact["token"]["excess"] > 0.05  # the planted token is found by both


def test_matched_purity_samples_queries_above_the_cut_and_its_band_covers_the_full_value(tree, monkeypatch):
    t, _ = tree
    full = M.label_purity(t.X, t.position, t.branch, k=10, window=2)
    assert full["n_queries"] == len(t) and 0.2 < full["purity"] < 0.95  # not saturated: the band has width
    monkeypatch.setattr(neighbours, "EXACT_QUERY_MAX", 1000)
    sampled = M.label_purity(t.X, t.position, t.branch, k=10, window=2, n_queries=800)
    assert sampled["n_queries"] == 800
    assert sampled["lo"] <= full["purity"] <= sampled["hi"]
    assert sampled["sd"] > full["sd"]  # the band says what the sampling costs


def test_landmark_layout_keeps_the_full_layouts_trustworthiness(tree):
    t, _ = tree
    spec = ProjectionSpec(n_epochs=60)
    Y = P.pca_reduce(t.X, 50)
    full = P.umap_layout(Y, spec)
    landmark = P.landmark_layout(Y, spec, n_landmarks=2000)
    q_full = trustworthiness(t.X, full, k=10, n_samples=1500)
    q_land = trustworthiness(t.X, landmark, k=10, n_samples=1500)
    assert q_full["trustworthiness"] > 0.8
    assert abs(q_full["trustworthiness"] - q_land["trustworthiness"]) <= 0.03, (q_full, q_land)


def test_projection_switches_to_landmarks_only_above_the_cut(monkeypatch):
    rng = np.random.default_rng(4)
    X = np.concatenate([rng.normal(size=(300, 20)), rng.normal(size=(300, 20)) + 6]).astype(np.float32)
    calls = []
    real = P.landmark_layout
    monkeypatch.setattr(
        P, "landmark_layout", lambda Y, spec, **kw: calls.append(len(Y)) or real(Y, spec, n_landmarks=200)
    )
    project(X, ProjectionSpec(n_epochs=20, metric="euclidean"))
    assert calls == []
    monkeypatch.setattr(P, "LANDMARK_ABOVE", 500)
    coords = project(X, ProjectionSpec(n_epochs=20, metric="euclidean"))
    assert calls == [600] and coords.shape == (600, 2) and np.isfinite(coords).all()
    # Placed points land with their own cluster.
    d = ((coords[:, None] - coords[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert ((d.argmin(1) < 300) == (np.arange(600) < 300)).mean() > 0.99


def test_cells_assigned_by_the_narrow_hnsw_search_keep_the_recall(residual_tree, monkeypatch):
    t = residual_tree
    X = t.X
    monkeypatch.setattr(neighbours, "EXACT_CELLS_MAX", 0)
    q = np.sort(np.random.default_rng(4).choice(len(t), 300, replace=False))
    workspace = neighbours.Workspace(X)
    approx = neighbours.search(X, q, 10, t.branch, exact_max=0, workspace=workspace)
    assert not workspace.cells().landmarks.exact
    assert recall(approx, neighbours.search(X, q, 10, t.branch)) >= 0.95


def test_a_workspace_serves_only_its_own_array(residual_tree):
    t = residual_tree
    q = np.arange(0, len(t), 97)
    with pytest.raises(ValueError, match="another array"):
        neighbours.search(t.X.copy(), q, 5, t.branch, exact_max=0, workspace=neighbours.Workspace(t.X))
