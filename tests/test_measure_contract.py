"""The measure contract: a new measure is one registered row. A toy measure defined in this file, and
nothing else edited, is computed for every view, shown in the metrics table, in the one per-layer table
(the Layers tab and the CLI report) and charted by name."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.measures import LAYER_STATS, MEASURES, Extra, LayerStat, Measure, register, register_layer_stat


def _mean_norm(c) -> dict:
    """Toy: the mean norm of the vectors measured, with a fake chance level and band, and the largest norm
    as a declared extra."""
    norms = np.linalg.norm(c.tokens.X, axis=1)
    return {
        "norm": float(norms.mean()),
        "sd": float(norms.std() / np.sqrt(len(norms))),
        "chance": 0.0,
        "chance_sd": 0.0,
        "largest": float(norms.max()),
    }


@pytest.fixture
def toy():
    largest = Extra(
        "largest", "toy: largest norm", "The largest.", "toy max", row=("toy_largest", "toy: max")
    )
    measure = register(
        Measure(
            "toy_norm",
            "toy: mean vector norm",
            _mean_norm,
            "norm",
            reads_vectors=True,
            help="A toy.",
            extras=(largest,),
        )
    )
    yield measure
    MEASURES.pop("toy_norm", None)


@pytest.fixture
def toy_stat():
    """Toy layer statistic: the span of the layer's positions, one cell."""
    stat = register_layer_stat(
        LayerStat(
            "toy_span",
            lambda t: {"span": int(t.position.max() - t.position.min())},
            lambda r: {"toy_span": r["span"]},
            lambda key: ("toy: position span", "last minus first position") if key == "toy_span" else None,
        )
    )
    yield stat
    LAYER_STATS.pop("toy_span", None)


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory):
    from helpers import synthetic_store as write

    return write(tmp_path_factory.mktemp("measure") / "s.duckdb", 3, 3, 16, 16)


def test_a_registered_measure_is_computed_and_in_every_table(toy, synthetic_store, tmp_path):
    from analysis import ResidualSpec, ViewSpec
    from analysis.project import ProjectionSpec
    from views import layer_table
    from views.cache import ViewCache
    from views.present import metric_rows
    from views.report import format_table, layer_report
    from views.service import Selection, compute

    spec = ViewSpec(residual=ResidualSpec(method="none"), projection=ProjectionSpec(method="pca"))
    view = compute(synthetic_store, Selection("run-synthetic-helix", 1), spec, ViewCache(tmp_path / "c"))
    value = view.result.metrics["toy_norm"]["norm"]
    assert value > 0
    row = next(r for r in metric_rows(view.result.metrics, view.result.metrics) if r.key == "toy_norm")
    assert row.label == "toy: mean vector norm" and row.raw == f"{value:.3f}"
    rows = layer_report(
        synthetic_store, methods=("none",), projection="pca", cache=ViewCache(tmp_path / "c2")
    )
    assert all(np.isfinite(r["toy_norm"]) and np.isfinite(r["toy_norm_band"]) for r in rows)
    assert all(r["toy_norm_largest"] >= r["toy_norm"] for r in rows)  # the declared extra, its own column
    header = format_table(rows).splitlines()[0]  # the CLI's header
    assert "toy_norm" in header and "toy max" in header
    assert layer_table.headers(list(rows[0]))["toy_norm"][0] == "toy: mean vector norm"
    assert layer_table.headers(list(rows[0]))["toy_norm_largest"] == ("toy: largest norm", "The largest.")
    extra = next(r for r in metric_rows(view.result.metrics, view.result.metrics) if r.key == "toy_largest")
    assert extra.label == "toy: max" and extra.raw == f"{view.result.metrics['toy_norm']['largest']:.3f}"
    assert (
        "toy: mean vector norm",
        "toy_norm",
        "toy_norm_band",
        "toy_norm_chance",
        "toy_norm_chance_band",
    ) in (layer_table.panels(("r2_pos", "toy_norm")))


def test_the_app_shows_a_registered_measure_in_the_metrics_and_the_layers_table(
    toy, synthetic_store, monkeypatch, tmp_path
):
    from helpers import app_on

    at = app_on(synthetic_store, monkeypatch, tmp_path)
    assert not at.exception, [e.value for e in at.exception]
    assert any("toy: mean vector norm" in m.value for m in at.markdown)  # a row of the metrics table
    at.session_state["tab"] = "Layers"
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    table = at.dataframe[-1].value
    assert "toy_norm" in table.columns and table["toy_norm"].notna().all()


def test_every_reader_takes_a_measures_numbers_from_its_one_estimate(synthetic_store, tmp_path):
    """analysis.measures.Measure.estimate reads each measure's result as one typed Estimate (value, band,
    chance and the interval a value at chance falls in, which way is better). The metrics table, the
    per-layer table and the guard quote the same numbers from it; the same-token share's chance interval,
    which the tables once left blank while the guard used it, is shown."""
    import math

    from analysis import ResidualSpec, ViewSpec
    from analysis.guard import check
    from analysis.measures import Estimate
    from analysis.stats import half_width
    from views import layer_table
    from views.present import metric_rows
    from views.service import Selection, compute

    spec = ViewSpec(residual=ResidualSpec(method="none"))
    metrics = compute(synthetic_store, Selection("run-synthetic-helix", 1), spec).result.metrics
    row = layer_table.row(1, "raw", metrics)
    table = {r.key: r for r in metric_rows(metrics, metrics)}
    seen = 0
    for key, measure in MEASURES.items():
        result = metrics.get(key)
        if not result:
            continue
        seen += 1
        est = measure.estimate(result)
        assert (
            isinstance(est, Estimate) and est.key == key and est.better in ("chance", "higher", "lower", "")
        )
        assert est.value == result[measure.field] and (est.band == half_width(result) or math.isnan(est.band))
        if measure.shown and not measure.layout:
            for part, column in (
                ("value", key),
                ("band", f"{key}_band"),
                ("chance_band", f"{key}_chance_band"),
            ):
                got, want = row[column], getattr(est, part)
                assert got == want or (math.isnan(got) and math.isnan(want)), (key, part, got, want)
        if (
            measure.shown
            and math.isfinite(est.chance_band)
            and (est.chance_band > 0 or measure.chance != "field")
        ):
            assert table[key].chance_band == f"±{est.chance_band:.3f}", key
        if measure.guard in ("leak:position", "leak:token"):  # a removal that sent it far up: named
            nuisance = measure.guard.split(":")[1]
            moved = metrics | {
                key: result | {measure.field: est.value + 5.0},
                "removal": {"weight": 1.0, "removed_keys": [nuisance]},
            }
            warned = next(w for w in check(metrics, moved) if w.metric == key)
            assert warned.kind == "invented" and warned.raw == est.value
            assert (warned.chance, warned.chance_band) == (est.chance, max(est.chance_hi - est.chance, 0.0))
    assert seen >= 8
    token = MEASURES["token_leak"].estimate(metrics["token_leak"])
    assert math.isfinite(token.chance_band) and table["token_leak"].chance_band == f"±{token.chance_band:.3f}"


def test_a_registered_layer_statistic_is_computed_on_raw_views_and_in_the_per_layer_table(
    toy_stat, synthetic_store, tmp_path
):
    from analysis import ResidualSpec, ViewSpec
    from analysis.project import ProjectionSpec
    from views import layer_table
    from views.cache import ViewCache
    from views.report import layer_report
    from views.service import Selection, compute

    spec = ViewSpec(residual=ResidualSpec(method="none"), projection=ProjectionSpec(method="pca"))
    view = compute(synthetic_store, Selection("run-synthetic-helix", 1), spec, ViewCache(tmp_path / "c"))
    kept = view.tokens["position"].to_numpy()[view.result.index]
    assert view.result.metrics["toy_span"] == {"span": int(kept.max() - kept.min())}
    removed = compute(
        synthetic_store,
        Selection("run-synthetic-helix", 1),
        ViewSpec(residual=ResidualSpec(method="position"), projection=ProjectionSpec(method="pca")),
        ViewCache(tmp_path / "c"),
    )
    assert "toy_span" not in removed.result.metrics  # a layer statistic is of the raw layer only
    rows = layer_report(synthetic_store, methods=("none",), cache=ViewCache(tmp_path / "c2"))
    assert [r["toy_span"] for r in rows if r["layer"] == 1] == [view.result.metrics["toy_span"]["span"]]
    assert layer_table.headers(list(rows[0]))["toy_span"] == (
        "toy: position span",
        "last minus first position",
    )


def test_the_per_layer_columns_have_unique_keys(toy):
    """Columns are generated from the registry (a measure's four, its extras' `<key>_<field>`): no two may
    share a key, or one would silently overwrite the other in a row."""
    from views import layer_table

    keys = [c.key for c in layer_table.columns()]
    assert "toy_norm_largest" in keys and len(keys) == len(set(keys)), sorted(
        k for k in keys if keys.count(k) > 1
    )
