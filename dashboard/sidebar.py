"""The sidebar: which store, run, prompts, layer, variant, residualizer, projection, colours, tokens."""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

from dashboard.charts import COLOR_BY
from views.specs import METHOD_LABELS, ProjectionSpec, ResidualSpec, Selection, ViewSpec, methods


@dataclass
class Controls:
    selection: Selection
    spec: ViewSpec
    color_by: str
    trajectories: bool
    all_lines: bool
    max_points: int
    new_prompts: list[int]  # committed since this run was opened here, and not selected


def store_path(default: str) -> str:
    return st.sidebar.text_input("Store", value=default, key="store_path",
                                 help="DuckDB file written by `python -m ingest`").strip()


def _prompts(store: str, run: dict) -> tuple[tuple[int, ...] | None, list[int]]:
    """The chosen prompt ids (None: all of the run's) and those committed since the run was opened here
    and not chosen. The widget is keyed by store, run and prompt count, so another store's labels never
    linger, and the choice carries over (not reset to a default) when an ingest commits more prompts."""
    prompts = {p["prompt_id"]: p["text"] for p in run["prompts"]}
    ids = list(prompts)
    scope = f"{store}::{run['run_id']}"
    chosen_key, known_key = f"chosen::{scope}", f"known::{scope}"
    before = st.session_state.get(chosen_key)
    default = [i for i in before if i in prompts] if before is not None else ids[:4]
    known = st.session_state.setdefault(known_key, ids)

    def remember() -> None:
        st.session_state[known_key] = ids

    chosen = st.sidebar.multiselect("Prompts", ids, default=default, key=f"prompts::{scope}::{len(ids)}",
                                    format_func=lambda i: f"{i}: {prompts[i][:40]}", on_change=remember,
                                    placeholder=f"all {len(ids)} prompts (pick some to narrow)")
    st.session_state[chosen_key] = chosen
    new = [i for i in ids if i not in known and i not in chosen]
    if not chosen or set(chosen) == set(ids):
        return None, new  # all of the run: one name for one token set (and no prompt filter)
    return tuple(sorted(chosen)), new


def controls(store: str, run: dict, other_runs: list[str]) -> Controls:
    sb = st.sidebar
    prompt_ids, new_prompts = _prompts(store, run)
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
    method = sb.selectbox("Method", methods(), format_func=lambda m: METHOD_LABELS.get(m, m), key="method")
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
    sb.subheader("Drawing")
    color_by = sb.selectbox("Colour by", list(COLOR_BY), key="color_by",
                            help="branch: a hue per prompt, a shade per branch; prompt: a hue per prompt")
    trajectories = sb.checkbox("Branch lines and fork points", value=True, key="trajectories",
                               help="Lines for the branches you hover, click, select in the text or brush")
    all_lines = sb.checkbox("Draw every branch's line", value=False, key="all_lines", disabled=not trajectories,
                            help="All trajectories at once: readable for a few branches, a mesh for many")
    max_points = sb.number_input("Max points drawn", 100, 200_000, 20_000, step=1000, key="max_points")

    selection = Selection(run["run_id"], int(layer) if layer is not None else 0, variant, prompt_ids,
                          generated_only, fit_scope)
    spec = ViewSpec(residual=ResidualSpec(method=method, **params), projection=ProjectionSpec(method=proj, **pparams),
                    exclude_sinks=not keep_sinks)
    return Controls(selection, spec, color_by, trajectories, all_lines and trajectories, int(max_points),
                    new_prompts)
