"""The "Latent space" tab: raw and residualized projections that fill the width, selections that
follow a branch or a box across both, the branch text with picking, the metrics and the exports."""

from __future__ import annotations

import altair as alt
import numpy as np
import polars as pl
import streamlit as st

from dashboard import charts, panels, text, webgl
from dashboard.palette import branch_colors
from dashboard.trajectories import anchor_rows, trajectory_lines
from views.present import removal_title

PANELS = (("raw", "raw"), ("res", "removed"))  # titles: panel_titles
GL_MODE = "every point (WebGL)"
DIM, SHOWN, FOCUSED = 0.07, 0.8, 0.95
# Two panels side by side from ~1200 px, stacked below (Streamlit's own columns stack only below 640 px).
RESPONSIVE_CSS = """<style>
@media (max-width: 1200px) {
  .st-key-bl-panels [data-testid="stHorizontalBlock"], .st-key-bl-density [data-testid="stHorizontalBlock"]
    {flex-direction: column;}
  .st-key-bl-panels [data-testid="stColumn"], .st-key-bl-density [data-testid="stColumn"]
    {width: 100% !important; flex: 1 1 100% !important;}
}
</style>"""


def prepare_points(
    raw: pl.DataFrame,
    res: pl.DataFrame,
    branches: pl.DataFrame,
    lineage: pl.DataFrame,
    prompts: dict[int, str],
) -> pl.DataFrame:
    """One row per token in both views: raw_x/raw_y, res_x/res_y, labels, text around it, prompt label,
    its prompt's hue and its branch's shade."""
    points = res.rename({"x": "res_x", "y": "res_y"}).join(
        raw.select("branch_id", "position", pl.col("x").alias("raw_x"), pl.col("y").alias("raw_y")),
        on=["branch_id", "position"],
        how="inner",
    )
    colours = branch_colors(branches.select("branch_id", "prompt_id"))
    labels = {
        p: f"{p}: {text.printable(prompts.get(p, ''))[:48]}" for p in points["prompt_id"].unique().to_list()
    }
    points = points.join(colours, on="branch_id", how="left").with_columns(
        text.contexts(points, lineage).alias("context"),  # in columns: 10^6 points in ~1 s, not 17
        text.printable_column("token_text"),
        pl.col("prompt_id").replace_strict(labels, return_dtype=pl.String).alias("prompt_label"),
    )
    return points.with_columns(
        pl.col("prompt_color").fill_null("#888888"), pl.col("shade").fill_null("#888888")
    )


def _chart_selection(key: str) -> dict:
    state = st.session_state.get(key)
    selection = getattr(state, "selection", None) if state is not None else None
    if selection is None and isinstance(state, dict):
        selection = state.get("selection")
    return dict(selection or {})


def _brushes(selection: dict) -> dict:
    return {k: v for k, v in selection.items() if isinstance(v, dict) and v}


MAX_BOX_LINES = 8  # branches of a box's tokens whose lines are drawn (all of 156 tokens' made a mesh)


def focus(
    points: pl.DataFrame,
    brushes: dict,
    picked: set[int],
    tokens: set[tuple[int, int]],
    prompts: set[str] = frozenset(),
    region: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, set[int]]:
    """The selected tokens and the branches whose lines are drawn. Selected: the tokens inside every
    brush ({param: {field: [lo, hi]}}, from either chart) or inside the WebGL view's box or lasso
    (`region`, its tokens), and the picked tokens; with neither, every token of the picked branches; of
    those (or of all tokens), only the prompts clicked in either legend when there are some. Lines: the
    picked branches, and the MAX_BOX_LINES branches with most selected tokens (ties by branch id)."""
    chosen = charts.selected_rows(points, brushes) if brushes else points.head(0)
    if region is not None:
        chosen = region
    if tokens:
        keys = pl.DataFrame(list(tokens), schema={"branch_id": pl.Int64, "position": pl.Int64}, orient="row")
        chosen = pl.concat([chosen, points.join(keys, on=["branch_id", "position"], how="semi")]).unique(
            ["branch_id", "position"], maintain_order=True
        )
    if not len(chosen) and picked:
        chosen = points.filter(pl.col("branch_id").is_in(list(picked)))
    if prompts:
        chosen = (chosen if len(chosen) else points).filter(pl.col("prompt_label").is_in(list(prompts)))
    counts = chosen.group_by("branch_id").len().sort(["len", "branch_id"], descending=[True, False])
    lit = set(picked) | set(counts["branch_id"].head(MAX_BOX_LINES).to_list())
    return chosen, lit


def chart_key(kind: str, prefix: str, view_id: str) -> str:
    """A chart's widget key: per view, so a box drawn on one projection is not applied to the next one's
    coordinates (Streamlit keeps a keyed chart's selection across reruns)."""
    return f"{kind}_{prefix}_{view_id}"


def view_id(points: pl.DataFrame) -> str:
    """A digest of both panels' coordinates: it changes exactly when a box drawn on them would mean other
    tokens (another layer, method or token set, a refit as prompts arrive), not on a colour change."""
    hashes = points.select("branch_id", "position", "raw_x", "raw_y", "res_x", "res_y").hash_rows(seed=0)
    return f"{int(hashes.to_numpy().sum(dtype=np.uint64)):016x}"[-12:]


def carry_picks(
    clicked_before: set[int] | None, carried: set[int], clicked_here: set[int], brushed_here: bool
) -> set[int]:
    """The branches clicked in the charts of earlier views that this view keeps following. clicked_before:
    on a change of view, those clicked in the last view's charts (None when the view did not change);
    with none clicked there, the last view's own carried ones stay. Dropped once a chart of this view is
    clicked or brushed."""
    if clicked_here or brushed_here:
        return set()
    return set(clicked_before or carried)


def _chart_picks(view: str, with_gl: bool = True) -> tuple[set[int], dict]:
    """The branches clicked and the boxes drawn in the projection charts of a view (with_gl: and the WebGL
    clicks as _gl_picks last found them)."""
    clicked, brushes = set(st.session_state.get(f"gl_picked_{view}", set())) if with_gl else set(), {}
    for prefix, _ in PANELS:
        selection = _chart_selection(chart_key("proj", prefix, view))
        clicked |= charts.picked_branches(selection)
        brushes |= _brushes(selection)
    return clicked, brushes


def gl_key(prefix: str, view: str) -> str:
    """A WebGL panel's widget key: per view, so a box drawn there is not applied to another view's points."""
    return chart_key("gl", prefix, view)


def _gl_picks(view: str) -> set[int]:
    """The branches clicked in the WebGL panels of this view: a click on a point toggles its branch. The
    browser sends its last clicks, each with a nonce, and each nonce is applied once (a click that came
    before the app read the previous one is not lost); remembered for _chart_picks."""
    state = st.session_state
    out: set[int] = set(state.get(f"gl_picked_{view}", set()))
    for prefix, _ in PANELS:
        key = gl_key(prefix, view)
        sent = webgl.state(key).get("click") or {}
        seen = state.setdefault(f"{key}_nonces", set())
        for click in sent.get("clicks") or [] if sent.get("view") == view else []:
            if click.get("nonce") not in seen:
                seen.add(click.get("nonce"))
                out ^= {int(click["branch"])}
    state[f"gl_picked_{view}"] = out
    return out


def gl_region(points: pl.DataFrame, view: str) -> pl.DataFrame | None:
    """The tokens inside the box or lasso drawn on the WebGL panels of this view (inside both, where both
    panels have one), tested on the grid the browser drew; None when there is none."""
    mask = None
    for prefix, _ in PANELS:
        selection = webgl.state(gl_key(prefix, view)).get("selection") or {}
        if selection.get("view") == view and len(selection.get("polygon") or []) >= 3:
            hit = webgl.inside(webgl.quantize(points, prefix), selection["polygon"])
            mask = hit if mask is None else mask & hit
    return None if mask is None else points.filter(pl.Series(mask))


def _legend_picks(view: str) -> set[str]:
    """The prompts clicked in either projection's legend: lit in both panels, not only the clicked one."""
    return set().union(
        *(charts.legend_prompts(_chart_selection(chart_key("proj", p, view))) for p, _ in PANELS)
    )


def panel_titles(res_metrics: dict) -> tuple[tuple[str, str], tuple[str, str]]:
    """(prefix, title) of the two panels: raw, and what the removal actually took out."""
    return ("raw", "raw"), ("res", removal_title(res_metrics.get("removal")))


def export_title(store: str, run: dict, selection, spec, res_metrics: dict) -> list[str]:
    """What an exported picture shows and where it comes from, as title lines: the two panels, then the
    store, run and model, then layer, method, projection and token count."""
    from pathlib import Path

    from views.specs import method_label

    prompts = (
        "all prompts"
        if selection.prompt_ids is None
        else f"prompts {', '.join(map(str, selection.prompt_ids))}"
    )
    return [
        f"raw | {removal_title(res_metrics.get('removal'))}",
        f"store {Path(str(store)).name} · run {run['run_id']} · model {run['model']}",
        f"layer {selection.layer} ({selection.variant}) · method {method_label(spec.residual.method)} · "
        f"{spec.projection.method.upper()} · {res_metrics.get('n_tokens', 0):,} tokens · {prompts}",
    ]


def render(
    points: pl.DataFrame,
    branches: pl.DataFrame,
    lineage: pl.DataFrame,
    ctl,
    raw_metrics: dict,
    res_metrics: dict,
    name: str,
    title: list[str] | None = None,
) -> None:
    """The tab's whole body; `title`: the lines an exported picture carries (what and where from)."""
    view = view_id(points)
    table = text.branch_table(branches, lineage)
    table_rows = _table_rows("branch_table")
    picked_in_table = {int(table["branch"][i]) for i in table_rows if i < len(table)}
    big = len(points) > ctl.max_points
    gl = big and st.session_state.get("big_mode", GL_MODE) == GL_MODE
    clicked, brushes = _chart_picks(view, with_gl=not gl)  # _gl_picks toggles the WebGL ones
    region = None
    if gl:
        clicked |= _gl_picks(view)
        region = gl_region(points, view)
    state = st.session_state
    before = _chart_picks(state["bl_view"])[0] if state.get("bl_view") not in (None, view) else None
    carried = carry_picks(
        before, state.get("bl_carried", set()), clicked, bool(brushes) or region is not None
    )
    state["bl_view"], state["bl_carried"] = view, carried
    picked = picked_in_table | clicked | carried
    first = min(picked_in_table) if picked_in_table else (min(picked) if picked else None)
    pill_key = f"tokens_of_{first}"
    token_sel = {(first, int(p)) for p in (state.get(pill_key) or [])} if first is not None else set()
    chosen, lit = focus(points, brushes, picked, token_sel, _legend_picks(view), region)
    touched = chosen["branch_id"].n_unique()
    if touched > MAX_BOX_LINES and not set(chosen["branch_id"].unique().to_list()) <= lit:
        st.caption(
            f"Lines drawn for the {MAX_BOX_LINES} branches with most selected tokens, of the {touched} "
            "the selection touches; click a branch, or pick it in the branch table, to follow it."
        )
    if carried:
        note, forget = st.columns([5, 1])
        note.caption(
            f"Following {len(carried)} branch{'es' if len(carried) > 1 else ''} clicked in the previous "
            "view (branch ids hold in every view; a box drawn there does not carry over)."
        )
        if forget.button("Forget them", key="bl_forget"):
            state["bl_carried"] = set()
            st.rerun()

    drawn = points
    mode = "draw all"
    if big:
        mode = st.radio(
            f"{len(points):,} tokens is more than {ctl.max_points:,} to draw with Vega:",
            [GL_MODE, "sample branches", "density", "draw all"],
            horizontal=True,
            key="big_mode",
        )
        if mode != GL_MODE:
            st.warning(
                "Large views slow the browser down; sampling keeps whole branches, density bins the plane "
                "and keeps the colour of the majority prompt (or the mean position)."
            )
        if mode == "sample branches":
            drawn = charts.sample_branches(points, ctl.max_points)
            st.caption(
                f"Drawn: {len(drawn):,} of {len(points):,} tokens "
                f"({drawn['branch_id'].n_unique()} of {points['branch_id'].n_unique()} whole branches)."
            )
    st.markdown(RESPONSIVE_CSS, unsafe_allow_html=True)
    static: dict = {}
    if big and mode == "density":
        region = None
        with st.container(key="bl-density"):
            for col, (prefix, title) in zip(st.columns(2), panel_titles(res_metrics)):
                with col:
                    key = chart_key("density", prefix, view)
                    st.altair_chart(
                        charts.unchecked(charts.density(points, prefix, title, ctl.color_by)),
                        width="stretch",
                        key=key,
                        on_select="rerun",
                        selection_mode=[f"region_{prefix}"],
                    )
                    found = charts.region_rows(points, prefix, _chart_selection(key))
                    region = found if found is not None else region
        st.caption(
            f"Density of all {len(points):,} tokens: colour = "
            f"{'mean position' if ctl.color_by == 'position' else 'majority prompt'} per cell, opacity = "
            "token count (log). Drag a box on either panel to draw the tokens inside it below."
        )
        if region is None or not len(region):
            drawn = None
        else:
            drawn = (
                region if len(region) <= ctl.max_points else charts.sample_branches(region, ctl.max_points)
            )
            st.caption(
                f"Drill-down: {len(region):,} tokens in the box, {len(drawn):,} drawn"
                f"{' (whole branches sampled)' if len(drawn) < len(region) else ''}."
            )
    if big and mode == GL_MODE:
        lines = lit if ctl.trajectories else set()
        _draw_gl(points, chosen, lines, ctl, view, panel_titles(res_metrics), webgl.tree_of(points, branches))
        drawn = None
    if drawn is not None:
        static = _draw_panels(drawn, chosen, lit, branches, ctl, view, panel_titles(res_metrics))
        st.caption(charts.HOW_TO)

    st.subheader("How much position is left")
    panels.metrics_panel(raw_metrics, res_metrics)

    st.subheader("Branches")
    only_selected = st.toggle(
        "Only branches with selected tokens", value=False, key="only_selected", disabled=not len(chosen)
    )
    panels.branch_picker(table, "branch_table")
    if first is not None:
        start = (
            int(branches.filter(pl.col("branch_id") == first)["fork_position"][0])
            if first in set(branches["branch_id"].to_list())
            else 0
        )
        panels.token_picker(text.branch_tokens(lineage, first, start), first, pill_key)
    highlight = set(chosen.select("branch_id", "position").iter_rows())
    only = set(chosen["branch_id"].to_list()) if only_selected and len(chosen) else None
    panels.text_panel(text.branches_html(branches, lineage, highlight, only), len(chosen))

    with st.expander("Export"):
        if static:  # the two panels as one picture, without the interactive parts
            panels.chart_exports(
                lambda: alt.hconcat(*(charts.projection(*a, interactive=False) for a in static.values())),
                f"branchlens-{name}",
                title,
            )
        panels.downloads(points.drop("context"), f"points-{name}")


def _draw_panels(
    drawn: pl.DataFrame,
    chosen: pl.DataFrame,
    lit: set[int],
    branches: pl.DataFrame,
    ctl,
    view_id: str,
    titles: tuple,
) -> dict:
    """The two projection panels of `drawn` (selection dimming, lines of lit branches); returns each
    panel's arguments for the static export."""
    keyed = chosen.select("branch_id", "position").with_columns(pl.lit(True).alias("_on"))
    drawn = (
        drawn.join(keyed, on=["branch_id", "position"], how="left")
        .with_columns(
            pl.when(pl.lit(len(chosen) > 0))
            .then(pl.when(pl.col("_on")).then(FOCUSED).otherwise(DIM))
            .otherwise(SHOWN)
            .alias("alpha")
        )
        .drop("_on")
    )
    static = {}
    with st.container(key="bl-panels"):
        for col, (prefix, title) in zip(st.columns(2), titles):
            with col:
                lines = forks = None
                if ctl.trajectories:
                    xy = drawn.select(
                        "branch_id",
                        "position",
                        pl.col(f"{prefix}_x").alias("x"),
                        pl.col(f"{prefix}_y").alias("y"),
                    )
                    shade = drawn.select("branch_id", "shade").unique("branch_id")
                    lit_col = pl.col("branch_id").is_in(list(lit)).alias("lit")
                    lines = (
                        trajectory_lines(xy, branches)
                        .rename({"x": f"{prefix}_x", "y": f"{prefix}_y"})
                        .join(shade, on="branch_id", how="left")
                        .with_columns(lit_col)
                    )
                    forks = (
                        anchor_rows(xy, branches)
                        .rename({"x": f"{prefix}_x", "y": f"{prefix}_y"})
                        .with_columns(lit_col)
                    )
                static[prefix] = (drawn, lines, forks, prefix, title, ctl.color_by, ctl.all_lines)
                legend = [f"legend_{prefix}"] if charts.COLOR_BY[ctl.color_by][1] == "hue" else []
                st.altair_chart(
                    charts.unchecked(charts.projection(*static[prefix])),
                    width="stretch",
                    key=chart_key("proj", prefix, view_id),
                    on_select="rerun",
                    selection_mode=[f"brush_{prefix}", f"pick_{prefix}", *legend],
                )
    return static


def _draw_gl(
    points: pl.DataFrame,
    chosen: pl.DataFrame,
    lit: set[int],
    ctl,
    view: str,
    titles: tuple,
    tree: list[list[int]] | None = None,
) -> None:
    """The two panels as WebGL scatters of every point: the selected tokens ringed, lit branches' lines,
    each panel's box or lasso drawn where it was; tree (webgl.tree_of): for the text around a hovered token."""
    rows = None
    if len(chosen):
        rows = (
            points.with_row_index("_row")
            .join(chosen.select("branch_id", "position"), on=["branch_id", "position"], how="semi")["_row"]
            .to_numpy()
        )
    legend = ""
    with st.container(key="bl-panels"):
        for col, (prefix, title) in zip(st.columns(2), titles):
            with col:
                st.markdown(f"**{title}**")
                key = gl_key(prefix, view)
                selection = webgl.state(key).get("selection") or {}
                blob, legend = webgl.payload(
                    points,
                    prefix,
                    ctl.color_by,
                    rows,
                    lit,
                    view=view,
                    selection=selection.get("polygon") if selection.get("view") == view else None,
                    label=f"{title}: {len(points):,} tokens",
                    tree=tree,
                )
                webgl.scatter(blob, key)
    st.caption(
        f"Every one of the {len(points):,} tokens drawn (WebGL){'; ' + legend if legend else ''}. "
        + webgl.HOW_TO
    )


def _table_rows(key: str) -> list[int]:
    state = st.session_state.get(key)
    selection = getattr(state, "selection", None) if state is not None else None
    if selection is None and isinstance(state, dict):
        selection = state.get("selection")
    rows = getattr(selection, "rows", None) if selection is not None else None
    if rows is None and isinstance(selection, dict):
        rows = selection.get("rows")
    return list(rows or [])
