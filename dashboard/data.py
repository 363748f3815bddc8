"""Store access for the app, cached by Streamlit. Connections are opened per read and closed at once, so
an ingest writing the same file is never blocked by an open dashboard."""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import polars as pl
import streamlit as st

from analysis.clusters import cluster
from analysis.view import ViewSpec
from store import queries
from store.connect import reading
from views.cache import ViewCache
from views.service import Selection, compute, divergence, layer_profile, residuals

LOCK_TIMEOUT = float(os.environ.get("BRANCHLENS_LOCK_TIMEOUT", "5"))  # seconds a read waits while an ingest commits


def version(path: str) -> tuple:
    """Changes whenever an ingest commits to the store: part of every cache key. A short query, not file
    times (two commits within the file system's timestamp resolution would look the same)."""
    with reading(path, LOCK_TIMEOUT) as con:
        return queries.fingerprint(con)


@st.cache_data(show_spinner=False, max_entries=32)
def overview(path: str, data_version: tuple) -> dict[str, Any]:
    """Runs (newest first) with their layers, variants and prompts."""
    with reading(path, LOCK_TIMEOUT) as con:
        runs = queries.list_runs(con)
        out = {"runs": []}
        for run in runs.iter_rows(named=True):
            layers = queries.run_layers(con, run["run_id"])
            out["runs"].append({
                **{k: (str(v) if k in ("created_at", "completed_at") else v) for k, v in run.items()},
                "layers": layers,
                "prompts": queries.prompts(con, run["run_id"]).to_dicts(),
                "summary": queries.run_summary(con, run["run_id"]),
            })
    return out


@st.cache_data(show_spinner=False, max_entries=32)
def branches_and_text(path: str, data_version: tuple, run_id: str, prompt_ids: tuple[int, ...] | None):
    with reading(path, LOCK_TIMEOUT) as con:
        branches = queries.branches(con, run_id)
        lineage = queries.lineage_text(con, run_id, list(prompt_ids) if prompt_ids is not None else None)
    if prompt_ids is not None:
        branches = branches.filter(pl.col("prompt_id").is_in(list(prompt_ids)))
    return branches, lineage


@st.cache_data(show_spinner=False, max_entries=32)
def view(path: str, data_version: tuple, selection: Selection, spec_json: str) -> tuple[pl.DataFrame, dict]:
    """Plotted tokens with x, y, and the view's metrics (disk-cached across sessions as well)."""
    v = compute(path, selection, ViewSpec.from_dict(json.loads(spec_json)), ViewCache(), LOCK_TIMEOUT)
    return v.points, v.result.metrics


@st.cache_data(show_spinner=False, max_entries=16)
def profile(path: str, data_version: tuple, selection: Selection, spec_json: str, layers: tuple[int, ...]) -> pl.DataFrame:
    rows = layer_profile(path, selection, ViewSpec.from_dict(json.loads(spec_json)), list(layers), ViewCache(),
                         LOCK_TIMEOUT)
    return pl.DataFrame(rows)


@st.cache_data(show_spinner=False, max_entries=8)
def apart(path: str, data_version: tuple, selection: Selection, spec_json: str) -> dict:
    """Branch divergence at matched positions, raw and removed (views.service.divergence)."""
    return divergence(path, selection, ViewSpec.from_dict(json.loads(spec_json)), LOCK_TIMEOUT)


@st.cache_data(show_spinner=False, max_entries=8)
def clusters(path: str, data_version: tuple, selection: Selection, spec_json: str, method: str, k: int):
    """Token labels and cluster ids of the position-removed latents of the view."""
    keys, X = residuals(path, selection, ViewSpec.from_dict(json.loads(spec_json)), LOCK_TIMEOUT)
    return keys, cluster(X, method=method, k=k, min_cluster_size=k)


@st.cache_resource(show_spinner=False)
def warm_up_in_background() -> threading.Thread:
    """Compile (or load) the UMAP kernels once per server process, while the user looks at the sidebar."""
    from analysis import jit

    thread = threading.Thread(target=jit.warm_up, name="branchlens-warm-up", daemon=True)
    if os.environ.get("BRANCHLENS_NO_WARMUP") != "1":
        thread.start()
    return thread
