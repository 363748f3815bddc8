"""The measure contract: a new measure is one registered row. A toy measure defined in this file, and
nothing else edited, is computed for every view, shown in the metrics table, in the one per-layer table
(the Layers tab and the CLI report) and charted by name."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.measures import MEASURES, Measure, register


def _mean_norm(c) -> dict:
    """Toy: the mean norm of the vectors measured, with a fake chance level and band."""
    norms = np.linalg.norm(c.tokens.X, axis=1)
    return {
        "norm": float(norms.mean()),
        "sd": float(norms.std() / np.sqrt(len(norms))),
        "chance": 0.0,
        "chance_sd": 0.0,
    }


@pytest.fixture
def toy():
    measure = register(
        Measure("toy_norm", "toy: mean vector norm", _mean_norm, "norm", reads_vectors=True, help="A toy.")
    )
    yield measure
    MEASURES.pop("toy_norm", None)


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
    assert "toy_norm" in format_table(rows).splitlines()[0]  # the CLI's header
    assert layer_table.headers(list(rows[0]))["toy_norm"][0] == "toy: mean vector norm"
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
