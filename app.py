"""branchlens dashboard: where do branches go apart, once position is taken out?

streamlit run app.py                       # opens ./branchlens.duckdb (or $BRANCHLENS_STORE)
streamlit run app.py -- path/to/store.duckdb
"""

from __future__ import annotations

import os
import sys

import polars as pl
import streamlit as st

from dashboard import data, panels, sidebar, space
from views.errors import StoreBusy, StoreError, StoreMissing
from views.service import store_to_open
from views.specs import raw_of

st.set_page_config(page_title="branchlens", page_icon="🌿", layout="wide")
panels.page_style()

PE_NOTES = {
    "rope": "RoPE model: positions enter only through attention",
    "alibi": "ALiBi model: positions enter only as an attention bias",
    "learned_absolute": "learned absolute position embeddings, added at the input",
}
TABS = ["Latent space", "Where branches go apart", "Layers", "Clusters", "SQL"]


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
except StoreMissing:
    st.info(
        f"No store at `{path}`. Create one with `python -m ingest` (the demo), or enter a path on the left."
    )
    st.stop()
except StoreBusy:
    panels.busy_note(path, "store")
    st.stop()
except StoreError as exc:
    st.error(str(exc))
    st.stop()

runs = {r["run_id"]: r for r in info["runs"]}
if not runs:
    st.info(f"`{path}` holds no runs yet. If an ingest is running, its first prompt appears once written.")
    st.stop()
run_id = st.sidebar.selectbox(
    "Run", list(runs), key="run", format_func=lambda r: f"{r} · {runs[r]['model']} · {runs[r]['status']}"
)
run = runs[run_id]
if not run["layers"]:
    st.info("This run has no latents yet; an ingest may still be writing its first prompt.")
    st.stop()
ctl = sidebar.controls(path, run, [r for r in runs if r != run_id])
sel, spec = ctl.selection, ctl.spec

summary = run["summary"]
shown = "" if sel.prompt_ids is None else f" ({len(sel.prompt_ids)} shown)"
st.caption(
    f"**{run['model']}** · {PE_NOTES.get(run['pe_type'], run['pe_type'] + ' positions')} · "
    f"run `{run_id}` ({run['status']}) · "
    f"{summary['prompts']} prompts{shown}, {summary['branches']} branches, {summary['tokens']} tokens · "
    f"layer {sel.layer} of {run['n_layers']}"
)
if run["status"] != "complete":
    st.info("This run is still being written: the views show the prompts committed so far.")
if ctl.new_prompts:
    st.info(
        f"{len(ctl.new_prompts)} prompts were committed since you opened this run and are not shown "
        f"({', '.join(map(str, ctl.new_prompts[:10]))}{'…' if len(ctl.new_prompts) > 10 else ''}); "
        "add them in the sidebar's Prompts."
    )

what = f"{'all prompts' if sel.prompt_ids is None else f'{len(sel.prompt_ids)} prompts'}, layer {sel.layer}"
waiting = f"Residualizing and projecting {what} (raw and removed)…"
waiting += data.kernel_note()
try:
    with st.spinner(waiting):
        (raw_points, raw_metrics), (res_points, res_metrics) = data.views(
            path, version, sel, raw_of(spec), spec
        )
        branches, lineage = data.branches_and_text(path, version, run_id, sel.prompt_ids)
except StoreBusy:
    panels.busy_note(path, "view")
    st.stop()
except (ValueError, StoreError) as exc:
    st.error(str(exc))
    st.stop()

prompts = {p["prompt_id"]: p["text"] for p in run["prompts"]}
points = space.prepare_points(raw_points, res_points, branches, lineage, prompts)
panels.verdict_panel(raw_metrics, res_metrics)
tabs = dict(zip(TABS, st.tabs(TABS, key="tab", on_change="rerun")))  # a closed tab computes nothing

with tabs["Latent space"]:
    if tabs["Latent space"].open:
        if ctl.color_by == "cluster":
            found = panels.guarded(
                path,
                "clusters_colour",
                data.clusters,
                path,
                version,
                sel,
                spec,
                *panels.cluster_controls("colour_clusters"),
            )
            if found is not None:
                points = points.join(
                    found.tokens.select("branch_id", "position", "cluster"),
                    on=["branch_id", "position"],
                    how="left",
                )
        if "cluster" not in points.columns:
            points = points.with_columns(pl.lit(None, pl.Int64).alias("cluster"))
        space.render(
            points,
            branches,
            lineage,
            ctl,
            raw_metrics,
            res_metrics,
            f"{run_id}-layer{sel.layer}",
            space.export_title(path, run, sel, spec, res_metrics),
        )

with tabs["Where branches go apart"]:
    if tabs["Where branches go apart"].open:
        with st.spinner(f"Measuring distances between related branches ({what}), raw and removed…"):
            apart = panels.guarded(path, "apart", data.apart, path, version, sel, spec)
        if apart is not None:
            panels.divergence_panel(apart)

with tabs["Layers"]:
    if tabs["Layers"].open:
        layers = tuple(run["layers"].get(sel.variant, []))
        with st.spinner(f"Measuring position in {len(layers)} layers ({what}), raw and removed…"):
            profile = panels.guarded(path, "layers", data.profile, path, version, sel, spec, layers)
        if profile is not None:
            panels.layers_panel(profile)

with tabs["Clusters"]:
    if tabs["Clusters"].open:
        method, k = panels.cluster_controls()
        with st.spinner(f"Clustering the position-removed latents ({what}, {method})…"):
            found = panels.guarded(path, "clusters", data.clusters, path, version, sel, spec, method, k)
        if found is not None:
            panels.clusters_panel(found)

with tabs["SQL"]:
    if tabs["SQL"].open:
        panels.sql_panel(path, run_id)
