"""branchlens dashboard: where do branches go apart, once position is taken out?

    streamlit run app.py                       # opens ./branchlens.duckdb (or $BRANCHLENS_STORE)
    streamlit run app.py -- path/to/store.duckdb
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace

import polars as pl
import streamlit as st

from analysis.residualize import ResidualSpec
from dashboard import charts, data, panels, sidebar, text
from store.errors import StoreBusy, StoreError
from views.service import store_to_open

st.set_page_config(page_title="branchlens", page_icon="🌿", layout="wide")


def default_store() -> str:
    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    return args[0] if args else os.environ.get("BRANCHLENS_STORE", "branchlens.duckdb")


data.warm_up_in_background()
path = sidebar.store_path(default_store())
st.title("branchlens")

try:
    store_to_open(path, os.environ.get("BRANCHLENS_STORE_ROOT") or None)
    version = data.version(path)
    info = data.overview(path, version)
except StoreError as exc:
    message = str(exc)
    if "no branchlens store at" in message or "does not exist" in message:
        st.info(f"No store at `{path}`. Create one with `python -m ingest` (the demo), or enter a path on the left.")
    elif isinstance(exc, StoreBusy):
        panels.busy_note(path, "store")
    else:
        st.error(message)
    st.stop()

runs = {r["run_id"]: r for r in info["runs"]}
if not runs:
    st.info(f"`{path}` holds no runs yet. If an ingest is running, its first prompt appears once written.")
    st.stop()
run_id = st.sidebar.selectbox("Run", list(runs), key="run",
                              format_func=lambda r: f"{r} · {runs[r]['model']} · {runs[r]['status']}")
run = runs[run_id]
if not run["layers"]:
    st.info("This run has no latents yet; an ingest may still be writing its first prompt.")
    st.stop()
ctl = sidebar.controls(run, [r for r in runs if r != run_id])
sel, spec = ctl.selection, ctl.spec

PE_NOTES = {
    "rope": "RoPE model: positions enter only through attention",
    "alibi": "ALiBi model: positions enter only as an attention bias",
    "learned_absolute": "learned absolute position embeddings, added at the input",
}
summary = run["summary"]
st.caption(
    f"**{run['model']}** · {PE_NOTES.get(run['pe_type'], run['pe_type'] + ' positions')} · "
    f"run `{run_id}` ({run['status']}) · "
    f"{summary['prompts']} prompts, {summary['branches']} branches, {summary['tokens']} tokens · "
    f"layer {sel.layer} of {run['n_layers']}"
)
if run["status"] != "complete":
    st.info("This run is still being written: the views show the prompts committed so far.")

raw_spec = replace(spec, residual=ResidualSpec(method="none", standardize=spec.residual.standardize))
try:
    with st.spinner("Residualizing and projecting (the first UMAP on a new machine compiles for ~30 s)…"):
        raw_points, raw_metrics = data.view(path, version, sel, json.dumps(raw_spec.to_dict()))
        res_points, res_metrics = data.view(path, version, sel, json.dumps(spec.to_dict()))
        branches, lineage = data.branches_and_text(path, version, run_id, sel.prompt_ids)
except StoreBusy:
    panels.busy_note(path, "view")
    st.stop()
except (ValueError, StoreError) as exc:
    st.error(str(exc))
    st.stop()

points = res_points.rename({"x": "res_x", "y": "res_y"}).join(
    raw_points.select("branch_id", "position", pl.col("x").alias("raw_x"), pl.col("y").alias("raw_y")),
    on=["branch_id", "position"], how="inner",
)
points = points.with_columns(
    pl.Series("context", text.context_windows(points, lineage)),
    pl.col("token_text").map_elements(text.printable, return_dtype=pl.String),
)

panels.verdict_panel(raw_metrics, res_metrics)
tab_space, tab_apart, tab_layers, tab_clusters, tab_sql = st.tabs(
    ["Latent space", "Where branches go apart", "Layers", "Clusters", "SQL"])

with tab_apart:
    with st.spinner("Measuring distances between related branches…"):
        apart = panels.guarded(path, "apart", data.apart, path, version, sel, json.dumps(spec.to_dict()))
    if apart is not None:
        panels.divergence_panel(apart)

with tab_clusters:
    method, k = panels.cluster_controls()
    with st.spinner("Clustering…"):
        found = panels.guarded(path, "clusters", data.clusters, path, version, sel, json.dumps(spec.to_dict()),
                               method, k)
    if found is not None:
        keys, labels = found
        panels.clusters_panel(keys, labels)
if found is not None:
    clusters = keys.select("branch_id", "position").with_columns(pl.Series("cluster", labels))
    points = points.join(clusters, on=["branch_id", "position"], how="left")
else:  # the store was busy: no cluster colours this time
    points = points.with_columns(pl.lit(None, pl.Int64).alias("cluster"))

with tab_space:
    drawn = points
    if len(points) > ctl.max_points:
        mode = st.radio(f"{len(points):,} tokens is more than {ctl.max_points:,} to draw:",
                        ["sample branches", "density", "draw all"], horizontal=True, key="big_mode")
        st.warning("Large views slow the browser down; sampling keeps whole branches, density bins the plane.")
        if mode == "sample branches":
            drawn = charts.sample_branches(points, ctl.max_points)
    if len(points) > ctl.max_points and st.session_state.get("big_mode") == "density":
        chart = charts.density(points)
        st.altair_chart(chart, key="density")
        selected = points.head(0)
    else:
        chart = charts.side_by_side(drawn, branches, ctl.color_by, ctl.trajectories)
        event = st.altair_chart(chart, on_select="rerun", selection_mode=["brush_raw", "brush_res"], key="proj")
        selected = charts.selected_rows(drawn, event.selection) if event.selection else drawn.head(0)
        if len(selected) == len(drawn):
            selected = drawn.head(0)
    left, right = st.columns([3, 2])
    with left:
        st.subheader("Branches")
        highlight = set(selected.select("branch_id", "position").iter_rows())
        panels.text_panel(text.branches_html(branches, lineage, highlight), len(selected))
    with right:
        st.subheader("How much position is left")
        panels.metrics_panel(raw_metrics, res_metrics)
        st.subheader("Export")
        panels.chart_exports(chart, f"branchlens-{run_id}-layer{sel.layer}")
        panels.downloads(points.drop("context"), f"points-{run_id}-layer{sel.layer}")

with tab_layers:
    layers = tuple(run["layers"].get(sel.variant, []))
    with st.spinner(f"Measuring {len(layers)} layers…"):
        profile = panels.guarded(path, "layers", data.profile, path, version, sel, json.dumps(spec.to_dict()),
                                 layers)
    if profile is not None:
        st.altair_chart(charts.layer_profile(profile), width="stretch")
        st.caption("Which layer is least tainted by position: compare raw with the residualized line and the "
                   "chance level. GPT-2-style learned positions are strongest in early layers; RoPE models "
                   "have none at layer 0 (token embeddings).")
        st.dataframe(profile, hide_index=True, width="stretch")

with tab_sql:
    panels.sql_panel(path, run_id)
