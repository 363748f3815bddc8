"""The app's reads, through `views` only, cached by Streamlit per store version. Every read opens the
store and closes it at once, so an ingest writing the same file is never blocked by an open dashboard."""

from __future__ import annotations

import os
import threading
from typing import Any

import polars as pl
import streamlit as st

from views import catalog
from views.cache import ViewCache
from views.clusters import Clusters
from views.clusters import clusters as compute_clusters
from views.service import Selection, compute_pair, divergence, layer_profile
from views.specs import ViewSpec

LOCK_TIMEOUT = float(
    os.environ.get("BRANCHLENS_LOCK_TIMEOUT", "5")
)  # seconds a read waits while an ingest commits


def version(path: str) -> tuple:
    return catalog.version(path, LOCK_TIMEOUT)


@st.cache_data(show_spinner=False, max_entries=32)
def overview(path: str, data_version: tuple) -> dict[str, Any]:
    return catalog.overview(path, LOCK_TIMEOUT)


@st.cache_data(show_spinner=False, max_entries=32)
def branches_and_text(path: str, data_version: tuple, run_id: str, prompt_ids: tuple[int, ...] | None):
    return catalog.branches_and_text(path, run_id, prompt_ids, LOCK_TIMEOUT)


@st.cache_data(show_spinner=False, max_entries=32)
def views(
    path: str, data_version: tuple, selection: Selection, raw_spec: ViewSpec, spec: ViewSpec
) -> tuple[tuple[pl.DataFrame, dict], tuple[pl.DataFrame, dict]]:
    """The raw and the removed view: plotted tokens with x, y, and each view's metrics, from one read and
    computed side by side (views.service.compute_pair; disk-cached across sessions as well)."""
    raw, removed = compute_pair(
        path,
        selection,
        raw_spec,
        spec,
        ViewCache(),
        LOCK_TIMEOUT,
    )
    return (raw.points, raw.result.metrics), (removed.points, removed.result.metrics)


@st.cache_data(show_spinner=False, max_entries=16)
def profile(
    path: str, data_version: tuple, selection: Selection, spec: ViewSpec, layers: tuple[int, ...]
) -> pl.DataFrame:
    rows = layer_profile(path, selection, spec, list(layers), ViewCache(), LOCK_TIMEOUT)
    return pl.DataFrame(rows)


@st.cache_data(show_spinner=False, max_entries=8)
def apart(path: str, data_version: tuple, selection: Selection, spec: ViewSpec) -> dict:
    """Branch divergence at matched positions, raw and removed (views.service.divergence)."""
    return divergence(path, selection, spec, LOCK_TIMEOUT, ViewCache())


@st.cache_data(show_spinner=False, max_entries=8)
def clusters(
    path: str, data_version: tuple, selection: Selection, spec: ViewSpec, method: str, k: int
) -> Clusters:
    """Cluster ids of the view's position-removed latents (views.clusters, disk-cached too)."""
    return compute_clusters(path, selection, spec, method, k, ViewCache(), LOCK_TIMEOUT)


@st.cache_resource(show_spinner=False)
def warm_up_in_background() -> threading.Thread:
    """Compile (or load) the UMAP kernels once per server process, while the user looks at the sidebar."""
    from views.warmup import warm_up

    _warm_at_start()  # looked at before the warm-up writes its marker
    thread = threading.Thread(target=warm_up, name="branchlens-warm-up", daemon=True)
    if os.environ.get("BRANCHLENS_NO_WARMUP") != "1":
        thread.start()
    return thread


def compiling() -> bool:
    """True while the first UMAP of this server process may still be getting its kernels."""
    return warm_up_in_background().is_alive()


@st.cache_resource(show_spinner=False)
def _warm_at_start() -> bool:
    """Whether the kernels were on disk when this server started (before its warm-up wrote them)."""
    from views.warmup import is_warm

    return is_warm()


def kernel_note() -> str:
    """The spinner's words on the kernels: '' once they are in, else loading or compiling, truthfully."""
    from views.warmup import waiting_note

    return waiting_note(compiling(), _warm_at_start())
