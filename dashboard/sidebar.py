"""The sidebar: which store, run, prompts, layer, variant, residualizer, projection, colours, tokens."""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

from analysis.project import ProjectionSpec
from analysis.residualize import RESIDUALIZERS, ResidualSpec
from analysis.view import ViewSpec
from dashboard.charts import COLOR_BY
from views.service import Selection

METHOD_LABELS = {"per_position": "position: per-position mean", "regression": "position: regression",
                 "projection": "position: project out top directions", "per_token": "token identity: per-token mean",
                 "position_token": "position + token identity", "none": "none (centre only)"}


@dataclass
class Controls:
    selection: Selection
    spec: ViewSpec
    color_by: str
    trajectories: bool
    max_points: int


def store_path(default: str) -> str:
    return st.sidebar.text_input("Store", value=default, key="store_path",
                                 help="DuckDB file written by `python -m ingest`").strip()


def controls(run: dict, other_runs: list[str]) -> Controls:
    sb = st.sidebar
    prompts = {p["prompt_id"]: p["text"] for p in run["prompts"]}
    chosen = sb.multiselect("Prompts", list(prompts), default=list(prompts)[:4], key="prompts",
                            format_func=lambda i: f"{i}: {prompts[i][:40]}")
    variants = sorted(run["layers"]) or ["normal"]
    variant = sb.selectbox("Variant", variants, key="variant",
                           help="normal, or zero_pe (positional encoding neutralized) when the run has it")
    layers = run["layers"].get(variant, [])
    layer = sb.selectbox("Layer", layers, index=len(layers) // 2 if layers else 0, key="layer",
                         help="0 = embeddings; later layers mix in more context")
    generated_only = sb.checkbox("Generated tokens only", value=False, key="generated_only")
    keep_sinks = sb.checkbox("Show BOS / attention sinks", value=False, key="keep_sinks",
                             help="Tokens with norms 10x+ the rest; they squash everything else when kept")

    sb.subheader("Nuisance removal")
    methods = [m for m in METHOD_LABELS if m in RESIDUALIZERS] + [m for m in RESIDUALIZERS if m not in METHOD_LABELS]
    method = sb.selectbox("Method", methods, format_func=lambda m: METHOD_LABELS.get(m, m), key="method")
    params: dict = {}
    with sb.expander("Method parameters"):
        if method in ("per_position", "regression"):
            params["basis"] = st.selectbox("Smooth basis", ["spline", "poly", "sinusoid"], key="basis")
            params["n_knots"] = st.slider("Spline knots", 2, 40, 12, key="n_knots")
            params["degree"] = st.slider("Degree", 1, 6, 3, key="degree")
        if method in ("per_position", "per_token", "position_token"):
            auto = st.checkbox("Estimate shrinkage", value=True, key="shrink_auto")
            params["shrink"] = None if auto else st.slider("Shrink (pseudo-count)", 0.0, 50.0, 5.0, key="shrink")
        if method == "projection":
            auto_k = st.checkbox("Choose the number of directions from the data", value=True, key="k_auto")
            params["k"] = None if auto_k else st.slider("Directions removed", 1, 20, 2, key="k")
        params["standardize"] = st.checkbox("Standardize dimensions", value=False, key="standardize")
        params["crossfit"] = st.checkbox(
            "Cross-fit", value=True, key="crossfit",
            help="The estimate removed from a token never saw that token's prompt (its branch, with one prompt)")
        params["gate"] = not st.checkbox(
            "Force removal", value=False, key="force",
            help="Remove the estimate whole even when the test finds no component (p > 0.05)")
    scopes = {"run": "all tokens of this run", "plotted": "plotted tokens",
              **{r: f"run {r}" for r in other_runs}}
    fit_scope = sb.selectbox("Fit on", list(scopes), format_func=scopes.get, key="fit_scope")

    sb.subheader("Projection")
    proj = sb.radio("Method ", ["umap", "pca"], horizontal=True, key="projection")
    pparams: dict = {}
    with sb.expander("Projection parameters"):
        if proj == "umap":
            pparams["n_neighbors"] = st.slider("n_neighbors", 2, 100, 15, key="n_neighbors")
            pparams["min_dist"] = st.slider("min_dist", 0.0, 1.0, 0.1, key="min_dist")
            pparams["metric"] = st.selectbox("metric", ["cosine", "euclidean"], key="metric")
        pparams["seed"] = st.number_input("seed", 0, 10_000, 0, key="seed")
    color_by = sb.selectbox("Colour by", list(COLOR_BY), key="color_by")
    trajectories = sb.checkbox("Trajectories and fork points", value=True, key="trajectories")
    max_points = sb.number_input("Max points drawn", 100, 200_000, 20_000, step=1000, key="max_points")

    selection = Selection(run["run_id"], int(layer) if layer is not None else 0, variant,
                          tuple(sorted(chosen)) if chosen else None, generated_only, fit_scope)
    spec = ViewSpec(residual=ResidualSpec(method=method, **params), projection=ProjectionSpec(method=proj, **pparams),
                    exclude_sinks=not keep_sinks)
    return Controls(selection, spec, color_by, trajectories, int(max_points))
