"""The sidebar: which store, run, prompts, layer, variant, residualizer, projection, colours, tokens."""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

from dashboard.charts import COLOR_BY
from views.specs import (
    Param,
    ProjectionSpec,
    ResidualSpec,
    Selection,
    ViewSpec,
    method_alternative,
    method_help,
    method_label,
    method_params,
    methods,
)


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
    return st.sidebar.text_input(
        "Store", value=default, key="store_path", help="DuckDB file written by `python -m ingest`"
    ).strip()


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

    chosen = st.sidebar.multiselect(
        "Prompts",
        ids,
        default=default,
        key=f"prompts::{scope}::{len(ids)}",
        format_func=lambda i: f"{i}: {prompts[i][:40]}",
        on_change=remember,
        placeholder=f"all {len(ids)} prompts (pick some to narrow)",
    )
    st.session_state[chosen_key] = chosen
    new = [i for i in ids if i not in known and i not in chosen]
    if not chosen or set(chosen) == set(ids):
        return None, new  # all of the run: one name for one token set (and no prompt filter)
    return tuple(sorted(chosen)), new


def controls(store: str, run: dict, other_runs: list[str]) -> Controls:
    sb = st.sidebar
    prompt_ids, new_prompts = _prompts(store, run)
    variants = sorted(run["layers"]) or ["normal"]
    variant = sb.selectbox(
        "Variant",
        variants,
        key="variant",
        help="normal, or zero_pe (positional encoding neutralized) when the run has it",
    )
    layers = run["layers"].get(variant, [])
    layer = sb.selectbox(
        "Layer",
        layers,
        index=len(layers) // 2 if layers else 0,
        key="layer",
        help="0 = embeddings; later layers mix in more context",
    )
    generated_only = sb.checkbox("Generated tokens only", value=False, key="generated_only")
    keep_sinks = sb.checkbox(
        "Show BOS / attention sinks",
        value=False,
        key="keep_sinks",
        help="Tokens with norms 10x+ the rest; they squash everything else when kept",
    )

    sb.subheader("Nuisance removal")
    names = methods()
    if st.session_state.get("method") not in names:
        st.session_state.pop("method", None)
    method = sb.selectbox("Method", names, format_func=method_label, key="method", help=method_help(names[0]))
    if alternative := method_alternative(method):
        other, label, help_text = alternative
        sb.button(label, key=f"alternative::{method}", on_click=_choose, args=(other,), help=help_text)
    elif method != "none":
        sb.caption(method_help(method))
    with sb.expander("Method parameters"):
        params = {p.name: _control(p, method) for p in method_params(method)}
    scopes = {
        "run": "all tokens of this run",
        "plotted": "plotted tokens",
        **{r: f"run {r}" for r in other_runs},
    }
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
    color_by = sb.selectbox(
        "Colour by",
        list(COLOR_BY),
        key="color_by",
        help="branch: a hue per prompt, a shade per branch; prompt: a hue per prompt",
    )
    trajectories = sb.checkbox(
        "Branch lines and fork points",
        value=True,
        key="trajectories",
        help="Lines for the branches you hover, click, select in the text or brush",
    )
    all_lines = sb.checkbox(
        "Draw every branch's line",
        value=False,
        key="all_lines",
        disabled=not trajectories,
        help="All trajectories at once: readable for a few branches, a mesh for many",
    )
    max_points = sb.number_input("Max points drawn", 100, 200_000, 20_000, step=1000, key="max_points")

    selection = Selection(
        run["run_id"], int(layer) if layer is not None else 0, variant, prompt_ids, generated_only, fit_scope
    )
    spec = ViewSpec(
        residual=ResidualSpec(method=method, **params),
        projection=ProjectionSpec(method=proj, **pparams),
        exclude_sinks=not keep_sinks,
    )
    return Controls(
        selection, spec, color_by, trajectories, all_lines and trajectories, int(max_points), new_prompts
    )


def _choose(method: str) -> None:
    st.session_state["method"] = method


def _control(p: Param, method: str):
    """The widget a declared parameter asks for (keyed per method, so each keeps its own value); a
    parameter with an automatic choice gets a checkbox for it first. 'gate' shows as Force removal."""
    key = f"{method}::{p.name}"
    if p.name == "gate":
        return not st.checkbox(
            "Force removal",
            value=not p.default,
            key=key,
            help="Remove the estimate whole even when its test finds nothing",
        )
    if p.auto and st.checkbox(
        f"{p.label}: {p.auto}", value=p.default is None, key=f"{key}::auto", help=p.help
    ):
        return None
    default = p.default if p.default is not None else (p.low or 0)
    if p.kind == "bool":
        return st.checkbox(p.label, value=bool(default), key=key, help=p.help)
    if p.kind == "choice":
        return st.selectbox(
            p.label, list(p.choices), index=list(p.choices).index(default), key=key, help=p.help
        )
    if p.kind == "int":
        hi = int(p.high if p.high is not None and p.high <= 200 else max(default * 4, 10))
        return st.slider(p.label, int(p.low or 0), hi, int(default), key=key, help=p.help)
    hi = float(p.high if p.high is not None and p.high <= 1000 else max(default * 4, 50.0))
    return st.slider(
        p.label,
        float(p.low or 0.0),
        hi,
        float(default if p.default is not None else min(5.0, hi)),
        key=key,
        help=p.help,
    )
