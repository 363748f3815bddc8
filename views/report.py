"""Per-layer table of how much position each residualizer leaves in a stored run: the rows of the one
per-layer table the app's Layers tab shows too (views.layer_table), with the guard's warnings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from analysis.residualize import ResidualSpec
from analysis.view import ViewSpec
from store import queries
from store.sources import reading
from views import layer_table
from views.cache import ViewCache
from views.service import Selection, layer_profile

DEFAULT_METHODS = ("none", "auto", "position", "per_position")  # any of analysis.residualize.RESIDUALIZERS


def layer_report(
    store: str | Path,
    run_id: str | None = None,
    methods: tuple[str, ...] = DEFAULT_METHODS,
    projection: str | None = None,
    generated_only: bool = False,
    cache: ViewCache | None = None,
    variant: str = "normal",
) -> list[dict[str, Any]]:
    """One row per (layer, method) of the per-layer table (views.layer_table), for every stored layer: the
    Layers tab's rows (views.service.layer_profile, no projection: the table holds no 2-D number; served
    from the views the app already computed where it can). `projection` is accepted and unused.

    `p_value` and `weight`: the detection test of the nuisance and the share of its estimate removed (0
    when not detected). `warning` names each metric the removal moved the wrong way beyond its band
    (analysis.guard): invented position, tokens pushed apart, or content removed.
    """
    with reading(store) as con:
        runs = queries.list_runs(con)
        if runs.is_empty():
            raise ValueError(f"{store} holds no runs")
        run_id = run_id or runs["run_id"][0]
        layers = queries.run_layers(con, run_id).get(variant, [])
    if not layers:
        raise ValueError(f"run {run_id} has no stored latents of variant {variant!r}")
    selection = Selection(run_id, layers[0], variant, generated_only=generated_only)
    removals = [m for m in methods if m != "none"]
    profiles = [
        layer_profile(store, selection, ViewSpec(residual=ResidualSpec(method=m)), layers, cache)
        for m in removals or ["none"]
    ]
    rows = []
    for layer in layers:
        here = [[r for r in profile if r["layer"] == layer] for profile in profiles]
        if "none" in methods:
            rows.append(here[0][0])  # raw: the same row in every profile
        rows += [r for rows_ in here for r in rows_[1:]]
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The per-layer table as fixed-width text (views.layer_table.text)."""
    return layer_table.text(rows)
