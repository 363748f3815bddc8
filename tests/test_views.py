"""Views of a real store: selection, fit scope, the disk cache, the per-layer report command."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import PYTHON, ingest

from analysis import ProjectionSpec, ResidualSpec, ViewSpec
from analysis.synthetic import branch_tree
from views.__main__ import main as views_main
from views.cache import ViewCache
from views.service import Selection, compute
from views.specs import raw_of
from views.synthetic import write_tree

ROOT = Path(__file__).resolve().parents[1]

FAST = ViewSpec(projection=ProjectionSpec(n_epochs=20))


@pytest.fixture(scope="module")
def tree():
    return branch_tree(n_prompts=4, branches_per_prompt=6, length=40, d=32, seed=2)


@pytest.fixture
def synthetic_store(tmp_path, tree):
    path = tmp_path / "synthetic.duckdb"
    return path, write_tree(path, tree)


def test_view_of_a_store_matches_the_tokens_and_caches(synthetic_store, tree, tmp_path):
    store, run_id = synthetic_store
    cache = ViewCache(tmp_path / "cache")
    first = compute(store, Selection(run_id, 0), FAST, cache)
    assert first.timings["cached"] == 0.0
    points = first.points
    assert len(points) == len(tree) - int(tree.extra["is_sink"].sum())
    assert (points["position"] > 0).all() and {"x", "y", "token_text", "branch_id"} <= set(points.columns)
    again = compute(store, Selection(run_id, 0), FAST, cache)
    assert again.timings["cached"] == 1.0
    np.testing.assert_array_equal(again.result.coords, first.result.coords)
    assert again.result.metrics == json.loads(json.dumps(first.result.metrics))
    other = compute(
        store,
        Selection(run_id, 0),
        ViewSpec(residual=ResidualSpec(method="none"), projection=FAST.projection),
        cache,
    )
    assert other.timings["cached"] == 0.0


def test_a_growing_run_is_recomputed(tmp_path, tree):
    store = tmp_path / "growing.duckdb"
    run_id = write_tree(store, tree.subset(tree.prompt < 2))
    cache = ViewCache(tmp_path / "cache")
    small = compute(store, Selection(run_id, 0), FAST, cache)
    one_prompt = Selection(run_id, 0, prompt_ids=(0,), fit_scope="run")
    before = compute(store, one_prompt, FAST, cache)
    assert compute(store, one_prompt, FAST, cache).timings["cached"] == 1.0
    write_tree(store, tree.subset(tree.prompt >= 2), run_id=run_id)
    grown = compute(store, Selection(run_id, 0), FAST, cache)
    assert grown.timings["cached"] == 0.0 and len(grown.points) > len(small.points)
    # Prompt 0 itself did not change, but the run it is fitted on did.
    refit = compute(store, one_prompt, FAST, cache)
    assert refit.timings["cached"] == 0.0 and len(refit.points) == len(before.points)


def test_the_layer_profile_of_a_growing_run_is_recomputed(tmp_path, tree):
    """The Layers tab's key left out the reference: with the fit on the whole run and one prompt plotted,
    a run grown by two prompts was served its old numbers."""
    from views.service import layer_profile

    store = tmp_path / "growing.duckdb"
    run_id = write_tree(store, tree.subset(tree.prompt < 2))
    cache = ViewCache(tmp_path / "cache")
    one_prompt = Selection(run_id, 0, prompt_ids=(0,), fit_scope="run")
    spec = ViewSpec(residual=ResidualSpec(method="position"))
    before = layer_profile(store, one_prompt, spec, [0], cache)
    write_tree(store, tree.subset(tree.prompt >= 2), run_id=run_id)
    served = layer_profile(store, one_prompt, spec, [0], cache)
    fresh = layer_profile(store, one_prompt, spec, [0], None)

    def rows(profile: list[dict], raw: bool) -> str:  # NaN-aware equality
        return json.dumps([r for r in profile if (r["method"] == "raw") == raw], sort_keys=True)

    assert rows(served, raw=False) == rows(fresh, raw=False) != rows(before, raw=False)
    assert rows(served, raw=True) == rows(before, raw=True)  # the plotted prompt did not change


def test_the_layer_profile_reuses_the_views_already_shown_with_the_same_numbers(
    synthetic_store, tmp_path, monkeypatch
):
    """The Layers tab measured the shown layer again; it now reads the raw and removed views' metrics.
    Raw and removed are measured side by side on two threads, or one after the other past PAIR_BYTES:
    the same numbers."""
    import views.loader as loader
    from views.service import layer_profile
    from views.specs import raw_of

    store, run_id = synthetic_store
    cache = ViewCache(tmp_path / "cache")
    spec = ViewSpec(residual=ResidualSpec(method="position"), projection=FAST.projection)
    shown = Selection(run_id, 0)
    compute(store, shown, raw_of(spec), cache)
    compute(store, shown, spec, cache)
    entries = set(cache.root.rglob("*.npz"))
    served = layer_profile(store, shown, spec, [0], cache)
    assert set(cache.root.rglob("*.npz")) == entries  # nothing measured again, nothing new cached
    fresh = layer_profile(store, shown, spec, [0], None)
    assert json.dumps(served, sort_keys=True) == json.dumps(fresh, sort_keys=True)  # NaN-aware
    monkeypatch.setattr(loader, "PAIR_BYTES", 0)
    one_by_one = layer_profile(store, shown, spec, [0], None)
    assert json.dumps(one_by_one, sort_keys=True) == json.dumps(fresh, sort_keys=True)
    assert {r["method"] for r in served} == {"raw", spec.residual.label()}


@pytest.mark.parametrize("side_by_side", [True, False])
def test_a_removal_that_finds_nothing_is_the_raw_view_with_its_own_report(
    tmp_path, monkeypatch, side_by_side
):
    """No position in the latents: `position` tests and removes nothing. The pair's removed view then takes
    the raw view's layout and measures instead of computing them again: the same points and numbers as
    compute() of the removed spec alone, its own removal report, no raw-only layer statistics; the Layers
    tab's rows likewise."""
    import views.loader as loader
    import views.service as service
    from views.specs import raw_of

    if not side_by_side:
        monkeypatch.setattr(loader, "PAIR_BYTES", 0)
    flat = branch_tree(n_prompts=4, branches_per_prompt=6, length=40, d=32, pos_scale=0.0, seed=2)
    store = tmp_path / "flat.duckdb"
    run_id = write_tree(store, flat, token_ids=np.arange(len(flat)) % 50)
    spec = ViewSpec(residual=ResidualSpec(method="position"), projection=FAST.projection)
    sel = Selection(run_id, 0)
    raw, removed = service.compute_pair(store, sel, raw_of(spec), spec, ViewCache(tmp_path / "cache"))
    report = removed.result.metrics["removal"]
    assert report["raw"] and report["weight"] == 0.0 and report["method"] == "position"
    assert "same_as_raw" in removed.result.timings  # side by side, or apart (one after the other)
    alone = compute(store, sel, spec)
    assert removed.points.equals(alone.points) and removed.points.equals(raw.points)
    assert json.dumps(removed.result.metrics, sort_keys=True, default=str) == json.dumps(
        alone.result.metrics, sort_keys=True, default=str
    )
    assert "pcs" in raw.result.metrics and "pcs" not in removed.result.metrics
    from views import layer_table

    profile = service.layer_profile(store, sel, spec, [0], ViewCache(tmp_path / "profile"))
    row = next(r for r in profile if r["method"] != "raw")
    row.pop("warning")
    assert json.dumps(row, sort_keys=True) == json.dumps(
        layer_table.row(0, spec.residual.label(), alone.result.metrics), sort_keys=True
    )


@pytest.mark.parametrize("side_by_side", [True, False])
def test_the_raw_and_removed_pair_is_what_compute_gives_for_each(
    synthetic_store, tmp_path, monkeypatch, side_by_side
):
    """compute_pair reads once and computes the two views on two threads (or, past PAIR_BYTES, one after
    the other from two reads): the same points and numbers as compute() of each spec, cached the same way."""
    import views.loader as loader
    import views.service as service
    from views.specs import raw_of

    if not side_by_side:
        monkeypatch.setattr(loader, "PAIR_BYTES", 0)
    store, run_id = synthetic_store
    spec = ViewSpec(residual=ResidualSpec(method="position"), projection=FAST.projection)
    sel = Selection(run_id, 0, prompt_ids=(0, 1, 2))
    cache = ViewCache(tmp_path / "cache")
    raw, removed = service.compute_pair(store, sel, raw_of(spec), spec, cache)
    assert raw.timings["cached"] == removed.timings["cached"] == 0.0
    for pair_view, alone in ((raw, compute(store, sel, raw_of(spec))), (removed, compute(store, sel, spec))):
        assert pair_view.points.equals(alone.points)
        assert json.dumps(pair_view.result.metrics, sort_keys=True, default=str) == json.dumps(
            alone.result.metrics, sort_keys=True, default=str
        )
    assert removed.result.metrics["removal"]["removed"]  # the removed view removed something
    again = service.compute_pair(store, sel, raw_of(spec), spec, cache)
    assert again[0].timings["cached"] == again[1].timings["cached"] == 1.0
    other = ViewSpec(residual=ResidualSpec(method="regression"), projection=FAST.projection)
    kept_raw, changed = service.compute_pair(store, sel, raw_of(other), other, cache)  # a method change
    assert kept_raw.timings["cached"] == 1.0 and changed.timings["cached"] == 0.0
    assert changed.points.equals(compute(store, sel, other).points)
    nothing = ViewSpec(residual=ResidualSpec(method="none"), projection=FAST.projection)
    first, second = service.compute_pair(store, sel, raw_of(nothing), nothing, ViewCache(tmp_path / "none"))
    assert first is second  # removing nothing is the raw view: computed once


def test_where_branches_go_apart_is_cached_on_disk_with_the_same_frames(tmp_path):
    """The divergence was computed again in every new session (no disk cache); now a second call is
    served from the cache, with the same frames, and a grown run is computed again."""
    from views.service import divergence

    tree = branch_tree(n_prompts=4, branches_per_prompt=6, length=40, d=32, seed=2)
    store = tmp_path / "apart.duckdb"
    run_id = write_tree(store, tree.subset(tree.prompt < 3))
    cache = ViewCache(tmp_path / "cache")
    spec = ViewSpec(residual=ResidualSpec(method="position"))
    sel = Selection(run_id, 0)
    fresh = divergence(store, sel, spec)
    first = divergence(store, sel, spec, cache=cache)
    entries = set(cache.root.rglob("*.npz"))
    served = divergence(store, sel, spec, cache=cache)
    assert len(entries) == 1 and set(cache.root.rglob("*.npz")) == entries
    for found in (first, served):
        for name in ("by_offset", "by_prompt", "by_prompt_offset"):
            assert found[name].equals(fresh[name]), name
        assert found["has_baseline"] == fresh["has_baseline"] and found["note"] == fresh["note"]
    write_tree(store, tree.subset(tree.prompt >= 3), run_id=run_id)
    grown = divergence(store, sel, spec, cache=cache)
    assert len(set(cache.root.rglob("*.npz"))) == 2
    assert grown["by_prompt"]["prompt"].n_unique() > fresh["by_prompt"]["prompt"].n_unique()


def test_a_change_of_the_maths_is_another_cache_key(synthetic_store, tmp_path, monkeypatch):
    """A cached view computed by other code (another digest of analysis/**/*.py) is not served."""
    import views.cache

    store, run_id = synthetic_store
    cache = ViewCache(tmp_path / "cache")
    compute(store, Selection(run_id, 0), FAST, cache)
    assert compute(store, Selection(run_id, 0), FAST, cache).timings["cached"] == 1.0
    monkeypatch.setattr(views.cache, "code_version", lambda: "another version of the maths")
    assert compute(store, Selection(run_id, 0), FAST, cache).timings["cached"] == 0.0


def test_the_maths_digest_covers_the_engine_and_every_module(tmp_path, monkeypatch):
    """The digest read only analysis/*.py: a change in analysis/engine (neighbours, kernels, ...) served
    numbers computed by the old code."""
    import shutil

    import views.cache

    maths = tmp_path / "analysis"
    shutil.copytree(views.cache.MATHS, maths, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(views.cache, "MATHS", maths)

    def digest() -> str:
        views.cache.code_version.cache_clear()
        return views.cache.code_version()

    try:
        first = digest()
        for changed in (maths / "engine" / "neighbours.py", maths / "metrics.py"):
            changed.write_text(changed.read_text() + "\n# changed\n")
            assert digest() != first, changed.name
            first = digest()
    finally:
        views.cache.code_version.cache_clear()


def test_prompt_subset_fitted_on_the_whole_run(synthetic_store, tree):
    store, run_id = synthetic_store
    plotted = compute(store, Selection(run_id, 0, prompt_ids=(1,)), FAST)
    scoped = compute(store, Selection(run_id, 0, prompt_ids=(1,), fit_scope="run"), FAST)
    n = int(((tree.prompt == 1) & ~tree.extra["is_sink"]).sum())
    assert len(plotted.points) == len(scoped.points) == n
    assert set(scoped.points["prompt_id"].unique()) == {1}
    # A per-position mean fitted on one prompt's branches eats more of their content than one fitted
    # on all prompts: the residuals differ.
    assert not np.allclose(plotted.result.residual, scoped.result.residual)
    with pytest.raises(ValueError, match="no stored tokens"):
        compute(store, Selection(run_id, 3), FAST)


def test_generated_only_and_sinks_on_a_real_ingest(tiny_cfg, tmp_path):
    cfg = tiny_cfg("llama", samples=2, forks=1, max_new_tokens=6, layers=[0, 2])
    run_id = ingest(cfg).run_id
    for layer in (0, 2):
        everything = compute(cfg.store, Selection(run_id, layer), FAST)
        kept = ViewSpec(exclude_sinks=False, projection=FAST.projection)
        with_bos = compute(cfg.store, Selection(run_id, layer), kept)
        generated = compute(cfg.store, Selection(run_id, layer, generated_only=True), FAST)
        assert len(with_bos.points) == len(with_bos.tokens)
        assert (everything.points["position"] > 0).all()
        assert not generated.points["is_prompt"].any() and len(generated.points) < len(everything.points)


def test_cache_survives_garbage_and_unwritable_dirs(synthetic_store, tmp_path):
    store, run_id = synthetic_store
    cache = ViewCache(tmp_path / "cache")
    compute(store, Selection(run_id, 0), FAST, cache)
    for f in (tmp_path / "cache").rglob("*.npz"):
        f.write_bytes(b"not a zip")
    assert compute(store, Selection(run_id, 0), FAST, cache).timings["cached"] == 0.0
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("x")
    view = compute(store, Selection(run_id, 0), FAST, ViewCache(blocked / "cache"))
    assert len(view.points) > 0


def test_report_command(synthetic_store, capsys, monkeypatch, tmp_path):
    store, run_id = synthetic_store
    monkeypatch.setenv("BRANCHLENS_CACHE", str(tmp_path / "bl-cache"))
    assert views_main(["report", str(store), "--projection", "pca"]) == 0
    table = capsys.readouterr().out
    for label in ("raw", "auto", "position (joint)", "per-position mean", "took out", "warning", "p "):
        assert label in table
    assert (
        views_main(["report", str(store), "--methods", "none,per_position", "--projection", "pca", "--json"])
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in rows] == ["raw", "per-position mean"]
    raw, removed = rows
    assert raw["r2_pos"] > 0.5 and removed["r2_pos"] < raw["r2_pos"] / 5 and raw["leak"] > 0.5
    assert raw["warning"] == removed["warning"] == ""
    assert removed["detected"] and removed["p_value"] <= 0.05 and 0 < removed["weight"] <= 1
    assert views_main(["report", str(store), "--variant", "zero_pe"]) == 2
    assert "no stored latents of variant 'zero_pe'" in capsys.readouterr().err
    assert views_main(["report", str(tmp_path / "missing.duckdb")]) == 2
    assert views_main(["report", str(store), "--methods", "mean"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: ") and "mean" in err[-1] and len(err) == 2


@pytest.mark.slow  # compiles umap's kernels into an empty cache first (a minute or more)
def test_numba_disk_cache_serves_a_fresh_process(tmp_path):
    """A second process loads umap's layout kernels from the disk cache instead of compiling them
    (numba's public dispatcher stats: cache hits per kernel)."""
    script = (
        "import warnings; warnings.simplefilter('ignore')\n"
        "from views import warmup; before = warmup.is_warm(); warmup.warm_up()\n"
        "import umap.layouts as L, umap.umap_ as U\n"
        "kernels = (L._nb_optimize_layout_euclidean_single_epoch, U.smooth_knn_dist)\n"
        "print(before, warmup.is_warm(), sum(sum(f.stats.cache_hits.values()) for f in kernels))\n"
    )
    env = {
        **os.environ,
        "NUMBA_CACHE_DIR": str(tmp_path / "numba"),
        "BRANCHLENS_CACHE": str(tmp_path / "cache"),
        "BRANCHLENS_KERNEL_CACHE": str(tmp_path / "kernels"),  # where the warm marker goes
    }

    def run() -> list[str]:
        out = subprocess.run([PYTHON, "-c", script], env=env, capture_output=True, text=True, check=True)
        return out.stdout.split()[-3:]

    assert run() == ["False", "True", "0"]  # empty cache: compiled, and the marker says so afterwards
    assert list((tmp_path / "numba").rglob("*.nbi"))
    before, after, hits = run()
    assert before == after == "True" and int(hits) >= 2  # both kernels loaded from disk


@pytest.mark.slow  # compiles the project's kernels into an empty cache first (about 20 s on 2 cores)
def test_a_second_checkout_loads_the_kernels_the_first_compiled(tmp_path):
    """Issue 30: kernels compiled once per machine, not per checkout. numba filed its cache next to each
    source file, so a second clone compiled again; the machine-wide cache is named for the source's
    content, so a copy of the package elsewhere loads them (numba's public dispatcher stats)."""
    import shutil

    script = (
        "from analysis.engine import kernels as K\n"
        "K.warm_up()\n"
        "kernels = [f for f in vars(K).values() if hasattr(f, 'stats')]\n"
        "hits = sum(sum(f.stats.cache_hits.values()) for f in kernels)\n"
        "misses = sum(sum(f.stats.cache_misses.values()) for f in kernels)\n"
        "print(K.__file__, len(kernels), hits, misses)\n"
    )
    copy = tmp_path / "checkout2"
    shutil.copytree(ROOT / "analysis", copy / "analysis", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "PYTHONPATH")}
    env["BRANCHLENS_KERNEL_CACHE"] = str(tmp_path / "kernels")

    def run(where: Path) -> tuple[str, int, int, int]:
        out = subprocess.run(
            [PYTHON, "-c", script],
            cwd=where,
            env=env | {"PYTHONPATH": str(where)},
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        path, n, hits, misses = out.stdout.split()[-4:]
        return path, int(n), int(hits), int(misses)

    path, n, hits, misses = run(ROOT)
    assert Path(path).resolve().is_relative_to(ROOT) and n >= 3 and hits == 0 and misses > 0  # compiled
    assert list((tmp_path / "kernels").rglob("*.nbi"))  # into the machine-wide directory
    path, n, hits, misses = run(copy)
    assert Path(path).resolve().is_relative_to(copy)  # the second checkout's own source file
    assert hits > 0 and misses == 0  # every kernel it used loaded from the first checkout's compile


def test_the_spinner_says_loading_or_compiling_as_it_is():
    """Tried: "compiling (once per machine, up to ~30 s)" on warm restarts, and a first start of 132 s."""
    from views.warmup import waiting_note

    assert waiting_note(False, False) == waiting_note(False, True) == ""
    assert "Loading the compiled projection kernels" in waiting_note(True, True)
    compiling = waiting_note(True, False)
    assert "compiling" in compiling and "first start on this machine" in compiling
    assert "once per machine" not in compiling + waiting_note(True, True)


def test_learned_positions_show_and_go_but_rope_embeddings_have_none(tiny_cfg):
    """On real ingests: GPT-2's layer 0 holds its learned position embedding, which per-position removal
    takes out (the default, auto, keeps token identity there: with position it is all layer 0 holds); a RoPE model's layer 0 (token embeddings only) carries no position to begin with."""
    pca = ProjectionSpec(method="pca")
    gpt2 = tiny_cfg("gpt2", store="gpt2.duckdb", samples=3, forks=1, max_new_tokens=16, layers=[0])
    run = ingest(gpt2).run_id
    raw = compute(
        gpt2.store, Selection(run, 0), ViewSpec(residual=ResidualSpec(method="none"), projection=pca)
    )
    removed = compute(gpt2.store, Selection(run, 0), ViewSpec(projection=pca))
    assert raw.result.metrics["r2_pos"]["adjusted"] > 0.3 and raw.result.metrics["leak"]["leak"] > 0.3
    # near chance; the few tokens at positions no other prompt reaches are left as they are (not cross-fittable)
    assert removed.result.metrics["r2_pos"]["r2"] < raw.result.metrics["r2_pos"]["chance"] + 0.05
    assert (
        removed.result.metrics["removal"]["detected"]
        and "position" in removed.result.metrics["removal"]["removed"]
    )
    assert abs(removed.result.metrics["leak"]["leak"]) < 0.15
    assert abs(removed.result.metrics["leak_prompt"]["leak"]) < 0.15

    llama = tiny_cfg("llama", store="llama.duckdb", samples=3, forks=1, max_new_tokens=16, layers=[0])
    run = ingest(llama).run_id
    rope = compute(
        llama.store, Selection(run, 0), ViewSpec(residual=ResidualSpec(method="none"), projection=pca)
    )
    assert abs(rope.result.metrics["leak_prompt"]["leak"]) < 0.15


def test_fit_on_another_run(tmp_path, tree):
    store = tmp_path / "two-runs.duckdb"
    run_id = write_tree(store, tree)
    ref_id = write_tree(
        store,
        branch_tree(n_prompts=6, branches_per_prompt=6, length=40, d=32, seed=9),
        run_id="run-reference",
    )
    view = compute(store, Selection(run_id, 0, prompt_ids=(0,), fit_scope=ref_id), FAST)
    assert set(view.points["prompt_id"].unique()) == {0}
    own = compute(store, Selection(run_id, 0, prompt_ids=(0,)), FAST)
    assert not np.allclose(view.result.residual, own.result.residual)
    # Both synthetic trees share one positional curve, so the reference's fit removes it here too.
    assert abs(view.result.metrics["leak"]["leak"]) < 0.2
    with pytest.raises(ValueError, match="reference run run-missing has no tokens"):
        compute(store, Selection(run_id, 0, fit_scope="run-missing"), FAST)


def test_view_spec_round_trips_and_single_prompt_metrics(tree):
    spec = ViewSpec(
        residual=ResidualSpec(method="regression", basis="poly", degree=4),
        projection=ProjectionSpec(method="pca", metric="euclidean"),
        window=1,
    )
    assert ViewSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    from analysis import compute_view

    one = compute_view(tree.subset(tree.prompt == 0), FAST)
    m = one.metrics
    assert m["heldout_by"] == "branch" and "leak_prompt" not in m and "purity_prompt" not in m
    assert np.isfinite(m["r2_pos"]["heldout"]) and np.isfinite(m["leak"]["leak"])


def test_warm_up_command(capsys):
    assert views_main(["warm-up"]) == 0
    assert "projection kernels ready" in capsys.readouterr().out


def test_two_stores_with_the_same_run_id_never_share_a_cached_view(tmp_path, tree):
    """A copy of a store with other vectors under the same run id and row count (and the same store moved
    to another path) gets its own view, not the cached one of the first."""
    cache = ViewCache(tmp_path / "cache")
    first, second = tmp_path / "a.duckdb", tmp_path / "b.duckdb"
    run_id = write_tree(first, tree)
    shifted = tree.with_X(tree.X + np.random.default_rng(5).normal(size=tree.X.shape).astype(np.float32) * 3)
    assert write_tree(second, shifted, run_id=run_id) == run_id
    a = compute(first, Selection(run_id, 0), FAST, cache)
    b = compute(second, Selection(run_id, 0), FAST, cache)
    assert b.timings["cached"] == 0.0
    assert b.result.metrics["leak"]["leak"] != a.result.metrics["leak"]["leak"]
    assert compute(second, Selection(run_id, 0), FAST, cache).timings["cached"] == 1.0
    moved = tmp_path / "moved.duckdb"
    moved.write_bytes(first.read_bytes())
    assert compute(moved, Selection(run_id, 0), FAST, cache).timings["cached"] == 0.0


def test_raw_is_raw_whatever_the_fit_scope(tmp_path, tree):
    store = tmp_path / "s.duckdb"
    run_id = write_tree(store, tree)
    raw = ViewSpec(residual=ResidualSpec(method="none"), projection=ProjectionSpec(method="pca"))
    views = [
        compute(store, Selection(run_id, 0, prompt_ids=(0, 1), fit_scope=scope), raw)
        for scope in ("plotted", "run")
    ]
    np.testing.assert_array_equal(views[0].result.coords, views[1].result.coords)
    same = [json.dumps(v.result.metrics, sort_keys=True, default=str) for v in views]  # NaN-aware
    assert same[0] == same[1]


def test_the_whole_run_under_two_names_is_computed_once(synthetic_store, tmp_path):
    """'All tokens of the run' with the whole run plotted is the plotted set: one cache entry, one compute."""
    store, run_id = synthetic_store
    cache = ViewCache(tmp_path / "cache")
    first = compute(store, Selection(run_id, 0, fit_scope="run"), FAST, cache)
    second = compute(store, Selection(run_id, 0, fit_scope="plotted"), FAST, cache)
    assert first.timings["cached"] == 0.0 and second.timings["cached"] == 1.0
    assert np.array_equal(first.result.coords, second.result.coords)
    subset = compute(store, Selection(run_id, 0, prompt_ids=(0, 1), fit_scope="run"), FAST, cache)
    assert subset.timings["cached"] == 0.0  # a subset fitted on the whole run is another view


def test_clusters_are_cached_and_say_when_one_holds_most_tokens(synthetic_store, tmp_path):
    from views.clusters import clusters

    store, run_id = synthetic_store
    cache = ViewCache(tmp_path / "cache")
    found = clusters(store, Selection(run_id, 0), FAST, "kmeans", 4, cache)
    assert found.tokens["cluster"].n_unique() == 4 and sum(s["size"] for s in found.summary) == len(
        found.tokens
    )
    assert all({"position", "prompts", "share"} <= s.keys() for s in found.summary)
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == 1
    again = clusters(store, Selection(run_id, 0), FAST, "kmeans", 4, cache)
    assert again.tokens["cluster"].to_list() == found.tokens["cluster"].to_list()
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == 1  # served from the cache, nothing new written
    one = clusters(store, Selection(run_id, 0), FAST, "kmeans", 1, cache)
    assert one.dominant is not None and one.dominant["share"] == 1.0
    assert found.dominant is None or found.dominant["share"] > 0.5


def test_metric_rows_carry_help_band_and_chance(synthetic_store, tmp_path):
    from analysis.measures import MEASURES
    from views.present import metric_rows

    store, run_id = synthetic_store
    raw = compute(
        store,
        Selection(run_id, 0),
        ViewSpec(residual=ResidualSpec(method="none"), projection=FAST.projection),
    ).result.metrics
    res = compute(store, Selection(run_id, 0), FAST).result.metrics
    rows = {r.key: r for r in metric_rows(raw, res)}
    assert {k for k, m in MEASURES.items() if m.shown} <= rows.keys()
    for key in ("leak", "leak_prompt"):
        assert (
            rows[key].chance == "0"
            and rows[key].chance_band.startswith("±")
            and rows[key].raw_band.startswith("±")
        )
    assert rows["r2_pos"].chance_band.startswith("±") and rows["projection"].raw_band.startswith("±")
    assert all(r.help for r in rows.values())


def test_the_dashboard_reaches_store_and_maths_only_through_views():
    """app.py and dashboard/ import nothing from store/ or analysis/ (the views package is their door)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in [root / "app.py", *(root / "dashboard").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [
                f"{path.name}: {n}" for n in names if n.split(".")[0] in ("store", "analysis", "ingest")
            ]
    assert not offenders, offenders


def test_a_loose_layout_is_named_on_screen_and_a_faithful_one_is_not():
    """The app warns under the metrics when a picture keeps few true neighbours (trustworthiness below 0.8
    beyond its band): a random layout (~0.5) is named, the data's own plane (1.0) is not."""
    from analysis.metrics import trustworthiness
    from views.present import TRUST_CAUTION, layout_note

    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 2))
    faithful = {"projection": trustworthiness(X, X, k=10)}
    loose = {"projection": trustworthiness(X, rng.normal(size=(600, 2)), k=10)}
    assert faithful["projection"]["trustworthiness"] > 0.99 and loose["projection"]["trustworthiness"] < 0.6
    assert layout_note(faithful, faithful) == ""
    note = layout_note(faithful, loose)
    assert "the right-hand picture" in note and "raw picture" not in note and f"below {TRUST_CAUTION}" in note
    assert f"{loose['projection']['trustworthiness']:.3f}" in note
    assert "raw picture" in layout_note(loose, loose)
    # within its band of the threshold: no warning (the band says it may not be below)
    near = {"projection": {"trustworthiness": TRUST_CAUTION - 0.01, "sd": 0.01}}
    assert layout_note(faithful, near) == ""


def test_every_layer_profile_column_has_a_header_and_help():
    """The Layers tab's table names its columns in words (it showed r2_band, leak_chance_hi)."""
    from views.layer_table import row
    from views.present import profile_columns

    columns = list(row(0, "raw", {"pcs": [{"pos_r2": 0.1, "var_share": 0.2}] * 5}).keys())
    named = profile_columns(columns)
    assert set(named) == set(columns)
    headers = [h for h, _ in named.values()]
    assert len(set(headers)) == len(headers) and all(text for _, text in named.values())
    assert named["pc5_variance"][0] == "PC5 variance"
    assert named["r2_pos_band"][0] == "R2_pos (variance explained by position) ±"


def test_a_new_product_is_one_registered_class_with_its_own_cache_namespace(synthetic_store, tmp_path):
    """views.loader: a product defined here, registered, is loaded by name through the one loader: read
    from the store, cached under its own name (a second load is served, nonce and all), keyed by its
    parameters, and served for raw and removed from one read by load_pair."""
    from views.loader import PRODUCTS, Product, register

    class MeanNorm(Product):
        name = "test-mean-norm"
        labels_on_hit = False

        def compute(self, rows, request, raw=None):
            scale = request.param("scale")
            norms = np.linalg.norm(rows.X.astype(np.float64), axis=1)
            return {
                "n": len(rows.keys),
                "norm": scale * float(norms.mean()),
                "nonce": float(np.random.random()),
            }

        def encode(self, result):
            return {k: np.array(v) for k, v in result.items()}

        def decode(self, arrays, rows, request):
            return {k: arrays[k].item() for k in arrays}

    register(MeanNorm())
    try:
        _mean_norm_is_loaded_cached_and_paired(synthetic_store, tmp_path)
    finally:
        PRODUCTS.pop("test-mean-norm", None)  # registered for this test only


def _mean_norm_is_loaded_cached_and_paired(synthetic_store, tmp_path):
    from store.connect import reading
    from store.queries import token_rows
    from views.loader import Request, load, load_pair

    store, run_id = synthetic_store
    sel = Selection(run_id, 0, prompt_ids=(0, 1))
    spec = ViewSpec(residual=ResidualSpec(method="position"), projection=FAST.projection)
    cache = ViewCache(tmp_path / "cache")
    request = Request(store, sel, spec, (("scale", 2.0),))
    first = load("test-mean-norm", request, cache)
    with reading(store) as con:
        keys, X = token_rows(con, run_id, 0, "normal", [0, 1], False)
    assert first["n"] == len(keys) and first["norm"] == pytest.approx(2 * np.linalg.norm(X, axis=1).mean())
    assert load("test-mean-norm", Request(str(store), sel, spec, [("scale", 2.0)]), cache) == first  # served
    assert (
        load("test-mean-norm", Request(store, sel, spec, (("scale", 3.0),)), cache)["nonce"] != first["nonce"]
    )
    assert not any(p.name == "test-mean-norm" for p in cache.root.rglob("*"))  # keyed by content, not name
    raw, removed = load_pair(
        "test-mean-norm",
        Request(store, sel, raw_of(spec), (("scale", 2.0),)),
        request,
        ViewCache(tmp_path / "pair"),
    )
    assert raw["n"] == removed["n"] == first["n"] and raw["norm"] == removed["norm"] == pytest.approx(
        first["norm"]
    )
    assert raw["nonce"] != removed["nonce"]  # two requests, two results (the same rows read once)


def test_a_pair_of_requests_must_name_the_same_tokens(synthetic_store):
    from views.loader import Request, load_pair

    store, run_id = synthetic_store
    with pytest.raises(ValueError, match="same tokens"):
        load_pair(
            "points", Request(store, Selection(run_id, 0), FAST), Request(store, Selection(run_id, 1), FAST)
        )
