"""Per-layer table of how much position each residualizer leaves in a stored run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from analysis.guard import check
from analysis.project import ProjectionSpec
from analysis.residualize import ResidualSpec
from analysis.verdict import removal_title
from analysis.view import ViewSpec
from store import queries
from store.sources import reading
from views.cache import ViewCache
from views.service import Selection, compute

DEFAULT_METHODS = ("none", "auto", "position", "per_position")  # any of analysis.residualize.RESIDUALIZERS
COLUMNS = (
    ("layer", "layer", "{}"),
    ("method", "method", "{}"),
    ("tokens", "tokens", "{}"),
    ("R2_pos", "r2", "{:.3f}"),
    ("chance", "r2_chance", "{:.3f}"),
    ("adj", "r2_adjusted", "{:.3f}"),
    ("held-out", "r2_heldout", "{:+.3f}"),
    ("leak", "leak", "{:+.3f}"),
    ("leak 2-D", "leak_2d", "{:+.3f}"),
    ("leak /prompt", "leak_prompt", "{:+.3f}"),
    ("probe", "probe", "{:+.3f}"),
    ("(chance to)", "probe_chance_hi", "{:+.3f}"),
    ("branch kNN", "purity_branch", "{:.3f}"),
    ("(chance)", "purity_branch_chance", "{:.3f}"),
    ("prompt kNN", "purity_prompt", "{:.3f}"),
    ("trust", "trustworthiness", "{:.3f}"),
    ("p", "p_value", "{:.2f}"),
    ("weight", "weight", "{:.0%}"),
    ("took out", "took_out", "{}"),
    ("warning", "warning", "{}"),
)


def layer_report(
    store: str | Path,
    run_id: str | None = None,
    methods: tuple[str, ...] = DEFAULT_METHODS,
    projection: str = "umap",
    generated_only: bool = False,
    cache: ViewCache | None = None,
    variant: str = "normal",
) -> list[dict[str, Any]]:
    """One row per (layer, method) with the view metrics, for every stored layer of the run.

    `p` and `removed`: the detection test of the nuisance and the share of its estimate removed (0 when
    not detected). `warning` names each metric the removal moved the wrong way beyond its band
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
    rows = []
    for layer in layers:
        raw = None
        for method in ("none", *[m for m in methods if m != "none"]):
            spec = ViewSpec(
                residual=ResidualSpec(method=method), projection=ProjectionSpec(method=projection)
            )
            view = compute(
                store, Selection(run_id, layer, variant, generated_only=generated_only), spec, cache
            )
            metrics = view.result.metrics
            raw = raw or metrics
            row = _row(layer, spec.residual.label(), metrics)
            row["warning"] = (
                "; ".join(f"{w.metric} {w.kind}" for w in check(raw, metrics)) if metrics is not raw else ""
            )
            if method in methods:
                rows.append(row)
    return rows


def _row(layer: int, method: str, m: dict[str, Any]) -> dict[str, Any]:
    nan = float("nan")
    get = lambda name, field: m.get(name, {}).get(field, nan)  # noqa: E731
    return {
        "layer": layer,
        "method": method,
        "tokens": m.get("n_tokens"),
        "r2": get("r2_pos", "r2"),
        "r2_chance": get("r2_pos", "chance"),
        "r2_adjusted": get("r2_pos", "adjusted"),
        "r2_heldout": get("r2_pos", "heldout"),
        "leak": get("leak", "leak"),
        "leak_2d": get("leak_2d", "leak"),
        "leak_prompt": get("leak_prompt", "leak"),
        "leak_sd": get("leak", "sd"),
        "leak_prompt_sd": get("leak_prompt", "sd"),
        "probe": get("probe", "r2"),
        "probe_chance_hi": get("probe", "chance_hi"),
        "purity_branch": get("purity_branch", "purity"),
        "purity_branch_chance": get("purity_branch", "chance"),
        "purity_prompt": get("purity_prompt", "purity"),
        "trustworthiness": get("projection", "trustworthiness"),
        "p_value": m.get("removal", {}).get("p_value", nan),
        "weight": m.get("removal", {}).get("weight", nan),
        "detected": m.get("removal", {}).get("detected"),
        "k": m.get("removal", {}).get("k"),
        "took_out": removal_title(m.get("removal")).removesuffix(" removed") if method != "raw" else "",
        "nn_branch": get("nn_branch", "purity"),
        "nn_prompt": get("nn_prompt", "purity"),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table (markdown-compatible)."""

    def cell(fmt: str, value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return fmt.format(value)

    header = [title for title, _, _ in COLUMNS]
    body = [[cell(fmt, row[key]) for _, key, fmt in COLUMNS] for row in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])
