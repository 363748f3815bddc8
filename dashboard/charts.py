"""Altair chart builders (no Streamlit): the projections with trajectories on demand, their density form
for large views, the per-layer profile and the divergence charts. Every chart fills its container's width."""

from __future__ import annotations

import functools
import math
import os

import altair as alt
import polars as pl

# Altair checks every part of a chart against the Vega-Lite schema as it is built, and the whole spec
# again when Streamlit serializes it: 0.2-0.3 s of every rerun of the demo (two projection panels), about
# half of a rerun that changed nothing. The tests check them (BRANCHLENS_VALIDATE_CHARTS=1, tests/conftest.py).
VALIDATE = os.environ.get("BRANCHLENS_VALIDATE_CHARTS") == "1"
if not VALIDATE:
    alt.utils.schemapi.disable_debug_mode()


def unchecked(chart: alt.TopLevelMixin) -> alt.TopLevelMixin:
    """The chart, serialized without the schema check unless VALIDATE (Streamlit calls to_dict())."""
    if not VALIDATE:
        object.__setattr__(chart, "to_dict", functools.partial(type(chart).to_dict, chart, validate=False))
    return chart


COLOR_BY = {  # label -> (field, Altair type); branch and prompt use the prompt hue families (dashboard.palette)
    "branch": ("shade", "hue"),
    "prompt": ("prompt_color", "hue"),
    "position": ("position", "quantitative"),
    "depth in tree": ("depth", "ordinal"),
    "logprob": ("logprob", "quantitative"),
    "cluster": ("cluster", "nominal"),
}
TOOLTIP = [
    alt.Tooltip("token_text:N", title="token"),
    alt.Tooltip("position:Q"),
    alt.Tooltip("branch_id:N", title="branch"),
    alt.Tooltip("prompt_label:N", title="prompt"),
    alt.Tooltip("context:N", title="text around"),
]
HEIGHT = 460
SVG = {
    "embedOptions": {"renderer": "svg"}
}  # charts that zoom: on canvas (Streamlit's choice past 2,000 rows) the wheel scrolled the page
LEGEND_MAX = 12  # prompts named in a legend (the ones with most tokens drawn); more would squeeze the plot
# Two columns of labels cut at 160 px fit a panel of a 1366 px window with the sidebar open (~430 px); three cut the third
LEGEND_COLUMNS, LEGEND_LABEL_PX = 2, 160
FACET_COLUMNS, FACET_WIDTH = 3, 200  # per-prompt panels: 3 x 200 px fit the main area at 1366 px
NEAREST_HOVER_MAX = 6000  # points up to which hovering near a point (not only on it) shows its branch
# Drag draws a box; shift-drag pans, the wheel zooms, a double-click resets (Vega-Lite event streams).
DRAG = "[pointerdown[!event.shiftKey], window:pointerup] > window:pointermove!"
PAN = "[pointerdown[event.shiftKey], window:pointerup] > window:pointermove!"
HOW_TO = (
    "Drag: select a box · click a point: follow its branch (shift-click adds) · hover: its branch's line · "
    "wheel: zoom · shift-drag: pan · double-click: reset · click a prompt in the legend: only its branches "
    "lit, in both panels"
)


def _axes(prefix: str) -> tuple[alt.X, alt.Y]:
    # no zero baseline: the points fill the panel
    return (
        alt.X(
            f"{prefix}_x:Q",
            title=None,
            axis=alt.Axis(labels=False, ticks=False, grid=False),
            scale=alt.Scale(zero=False, nice=False, padding=8),
        ),
        alt.Y(
            f"{prefix}_y:Q",
            title=None,
            axis=alt.Axis(labels=False, ticks=False, grid=False),
            scale=alt.Scale(zero=False, nice=False, padding=8),
        ),
    )


def prompt_legend(
    rows: pl.DataFrame, label: str, colour: str, count: str | None = None, title: str = "prompt"
) -> tuple[alt.Scale, alt.Legend]:
    """The colour scale of prompts (rows: prompt_id, `label`, `colour`, optional `count` of tokens) in
    prompt order, and its legend: every prompt up to LEGEND_MAX, else the LEGEND_MAX with most tokens,
    said in the title (a hundred entries would leave the plot a strip)."""
    by_prompt = rows.group_by("prompt_id").agg(
        pl.col(label).first(),
        pl.col(colour).first(),
        (pl.col(count).sum() if count else pl.len()).alias("_n"),
    )
    by_prompt = by_prompt.sort("prompt_id")
    named = by_prompt
    if len(by_prompt) > LEGEND_MAX:
        named = (
            by_prompt.sort(["_n", "prompt_id"], descending=[True, False]).head(LEGEND_MAX).sort("prompt_id")
        )
        title = f"{title}: {LEGEND_MAX} of {len(by_prompt)} named (most tokens)"
    scale = alt.Scale(domain=by_prompt[label].to_list(), range=by_prompt[colour].to_list())
    return scale, alt.Legend(
        title=title,
        titleLimit=480,
        orient="bottom",
        columns=LEGEND_COLUMNS,
        labelLimit=LEGEND_LABEL_PX,
        symbolOpacity=1,
        symbolType="circle",
        values=named[label].to_list(),
    )


def projection(
    points: pl.DataFrame,
    lines: pl.DataFrame | None,
    forks: pl.DataFrame | None,
    prefix: str,
    title: str,
    color_by: str = "branch",
    draw_all_lines: bool = False,
    interactive: bool = True,
) -> alt.LayerChart:
    """One projection panel.

    points: one row per token with {prefix}_x, {prefix}_y, prompt_label, prompt_color, shade, alpha
    (opacity: low for tokens outside the current selection) and the tooltip fields. lines: trajectory
    vertices (branch_id, order, {prefix}_x/_y, shade, lit); a branch's line is drawn when it is lit
    (selected in the app), hovered or clicked here, or all of them with draw_all_lines. forks: fork
    markers (branch_id, anchor_branch_id, position, {prefix}_x/_y, lit), shown with their lines.
    Params: brush_{prefix} (box), pick_{prefix} (clicked branches), both reported to the app; none with
    interactive=False (the exported picture: lit lines only, a fixed width).
    """
    x, y = _axes(prefix)
    brush = alt.selection_interval(
        name=f"brush_{prefix}", encodings=["x", "y"], on=DRAG, translate=DRAG, zoom=False
    )
    pick = alt.selection_point(name=f"pick_{prefix}", fields=["branch_id"], on="click")
    # nearest-point hover needs a Voronoi diagram of every point: only where it stays cheap in the browser
    hover = alt.selection_point(
        name=f"hover_{prefix}",
        fields=["branch_id"],
        on="pointerover",
        nearest=len(points) <= NEAREST_HOVER_MAX,
        clear="pointerout",
        empty=False,
    )
    zoom = alt.selection_interval(name=f"zoom_{prefix}", bind="scales", zoom="wheel!", translate=PAN)
    field, kind = COLOR_BY[color_by]
    legend_pick = legend = None
    if kind == "hue":
        # The dots take their exact colour (a branch's shade, or its prompt's hue); the legend, by prompt,
        # comes from an invisible layer with one row per prompt, clicking it keeps that prompt lit.
        color = alt.Color(f"{field}:N", scale=None, legend=None)
        legend_pick = alt.selection_point(name=f"legend_{prefix}", fields=["prompt_label"], bind="legend")
        keys = (
            points.group_by("prompt_id", maintain_order=True)
            .agg(
                pl.col("prompt_label", "prompt_color", f"{prefix}_x", f"{prefix}_y").first(),
                pl.len().alias("tokens"),
            )
            .sort("prompt_id")
        )
        scale, key = prompt_legend(keys, "prompt_label", "prompt_color", "tokens")
        legend = (
            alt.Chart(keys)
            .mark_point(opacity=0, filled=True)
            .encode(x=x, y=y, color=alt.Color("prompt_label:N", scale=scale, legend=key))
        )
        legend = legend.add_params(legend_pick) if interactive else legend
    elif kind == "quantitative":
        color = alt.Color(f"{field}:Q", title=color_by, scale=alt.Scale(scheme="viridis"))
    else:
        color = alt.Color(f"{field}:{kind[0].upper()}", title=color_by, scale=alt.Scale(scheme="tableau10"))
    opacity = alt.Opacity("alpha:Q", scale=None, legend=None)
    if legend_pick is not None and interactive:
        opacity = alt.condition(legend_pick, opacity, alt.value(0.04))
    dots = (
        alt.Chart(points)
        .mark_circle(size=30, strokeWidth=0)
        .encode(x=x, y=y, color=color, opacity=opacity, tooltip=TOOLTIP)
    )
    if interactive:
        dots = dots.add_params(brush, pick, hover, zoom)

    layers: list[alt.Chart] = []
    shown = (
        None
        if draw_all_lines
        else {
            "or": [{"param": hover.name, "empty": False}, {"param": pick.name, "empty": False}, "datum.lit"]
        }
        if interactive
        else "datum.lit"
    )
    if lines is not None and len(lines):
        line = (
            alt.Chart(lines)
            .mark_line(strokeWidth=1.6, opacity=0.8)
            .encode(
                x=x,
                y=y,
                detail="branch_id:N",
                order="order:Q",
                color=alt.Color("shade:N", scale=None, legend=None),
            )
        )
        layers.append(
            line.transform_filter(shown) if shown else line.mark_line(strokeWidth=0.8, opacity=0.35)
        )
    if forks is not None and len(forks):
        marks = (
            alt.Chart(forks)
            .mark_point(shape="diamond", size=80, filled=True, color="black")
            .encode(
                x=x,
                y=y,
                tooltip=[
                    alt.Tooltip("branch_id:N", title="fork of branch"),
                    alt.Tooltip("anchor_branch_id:N", title="off branch"),
                    "position:Q",
                ],
            )
        )
        layers.append(marks.transform_filter(shown) if shown else marks)
    layers.append(dots)
    if legend is not None:
        layers.append(legend)
    # Everything set as the layer is made: each .properties() or .resolve_scale() after it deep-copies the
    # whole chart (0.05 s a panel on the demo, every rerun).
    extra: dict = {}
    if interactive:
        # Streamlit draws a chart of over 2,000 rows on canvas, where the wheel scrolled the page instead of
        # zooming (measured in Chromium); SVG keeps wheel zoom (and the legend click) working.
        extra["usermeta"] = SVG
    if len(layers) > 1:
        # independent: the lines' identity colours (no legend) would otherwise take the dots' legend away
        extra["resolve"] = alt.Resolve(scale=alt.ScaleResolveMap(color="independent"))
    return alt.layer(*layers, title=title, height=HEIGHT, width="container" if interactive else 560, **extra)


def density_bins(points: pl.DataFrame, prefix: str, color_by: str, bins: int = 70) -> pl.DataFrame:
    """Tokens binned on a bins x bins grid of one panel: per occupied cell its corners, count, and the
    colour it keeps: the mean position (colour by position) or the majority prompt's hue and share."""
    xs, ys = points[f"{prefix}_x"], points[f"{prefix}_y"]
    x0, y0 = float(xs.min()), float(ys.min())
    wx = (float(xs.max()) - x0) / bins or 1.0
    wy = (float(ys.max()) - y0) / bins or 1.0
    cells = points.with_columns(
        ((pl.col(f"{prefix}_x") - x0) / wx).floor().clip(0, bins - 1).alias("bx"),
        ((pl.col(f"{prefix}_y") - y0) / wy).floor().clip(0, bins - 1).alias("by"),
    )
    out = cells.group_by("bx", "by").agg(
        pl.len().alias("tokens"), pl.col("position").mean().alias("mean_position")
    )
    # the majority prompt of a cell with its own colour (label and colour taken from the same rows; ties:
    # the lowest prompt id, so a cell reads the same on every rerun)
    top = (
        cells.group_by("bx", "by", "prompt_id", "prompt_label", "prompt_color")
        .len()
        .sort(["bx", "by", "len", "prompt_id"], descending=[False, False, True, False])
        .group_by("bx", "by", maintain_order=True)
        .first()
    )
    out = (
        out.join(
            top.select(
                "bx",
                "by",
                "prompt_id",
                pl.col("prompt_label").alias("majority_prompt"),
                pl.col("prompt_color").alias("majority_color"),
                pl.col("len").alias("_top"),
            ),
            on=["bx", "by"],
        )
        .with_columns((pl.col("_top") / pl.col("tokens")).alias("majority_share"))
        .drop("_top")
    )
    return out.with_columns(
        (x0 + pl.col("bx") * wx).alias("x0"),
        (x0 + (pl.col("bx") + 1) * wx).alias("x1"),
        (y0 + pl.col("by") * wy).alias("y0"),
        (y0 + (pl.col("by") + 1) * wy).alias("y1"),
        (pl.col("tokens").log1p() / math.log1p(max(int(cells.height), 1))).alias("weight"),
    )


def density(points: pl.DataFrame, prefix: str, title: str, color_by: str = "branch") -> alt.Chart:
    """One panel as binned tokens: colour = mean position (colour by position) or majority prompt;
    opacity grows with the count (log), so dense and sparse cells both read."""
    cells = density_bins(points, prefix, color_by)
    common = dict(
        x=alt.X("x0:Q", title=None, axis=None, scale=alt.Scale(zero=False, nice=False)),
        x2="x1:Q",
        y=alt.Y("y0:Q", title=None, axis=None, scale=alt.Scale(zero=False, nice=False)),
        y2="y1:Q",
        opacity=alt.Opacity("weight:Q", scale=alt.Scale(domain=[0, 1], range=[0.25, 1]), legend=None),
        tooltip=[
            alt.Tooltip("tokens:Q"),
            alt.Tooltip("majority_prompt:N", title="majority prompt"),
            alt.Tooltip("majority_share:Q", format=".0%", title="its share"),
            alt.Tooltip("mean_position:Q", format=".1f", title="mean position"),
        ],
    )
    if color_by == "position":
        color = alt.Color("mean_position:Q", title="mean position", scale=alt.Scale(scheme="viridis"))
    else:
        scale, key = prompt_legend(
            cells, "majority_prompt", "majority_color", "tokens", title="majority prompt"
        )
        color = alt.Color("majority_prompt:N", scale=scale, legend=key)
    zoom = alt.selection_interval(name=f"zoom_{prefix}", bind="scales", zoom="wheel!", translate=PAN)
    region = alt.selection_interval(
        name=f"region_{prefix}", encodings=["x", "y"], on=DRAG, translate=DRAG, zoom=False
    )
    return (
        alt.Chart(cells)
        .mark_rect()
        .encode(color=color, **common)
        .add_params(zoom, region)
        .properties(title=title, height=HEIGHT, width="container", usermeta=SVG)
    )


def region_rows(points: pl.DataFrame, prefix: str, selection: dict) -> pl.DataFrame | None:
    """The tokens inside a region brushed on a density panel ({region_<prefix>: {x0: [lo, hi], y0: [lo, hi]}}),
    or None when no region is brushed."""
    box = selection.get(f"region_{prefix}")
    if not isinstance(box, dict) or not {"x0", "y0"} <= box.keys():
        return None
    (x_lo, x_hi), (y_lo, y_hi) = sorted(box["x0"]), sorted(box["y0"])
    return points.filter(
        pl.col(f"{prefix}_x").is_between(x_lo, x_hi) & pl.col(f"{prefix}_y").is_between(y_lo, y_hi)
    )


RAW_COLOUR, REMOVED_COLOUR = "#4e79a7", "#e15759"


def profile_panel(
    rows: pl.DataFrame, value: str, band: str, chance: str, chance_band: str, title: str
) -> alt.LayerChart:
    """One number per layer, raw and removed (lines with their 95% bands), against its chance level (a
    grey band). rows: layer_profile rows."""
    cols = [c for c in ("layer", "method", value, band, chance, chance_band) if c in rows.columns]
    data = rows.select(cols).fill_nan(None)
    if value not in data.columns or data[value].null_count() == len(data):
        return (
            alt.Chart(pl.DataFrame({"note": ["not measured for these tokens"]}))
            .mark_text()
            .encode(text="note:N")
            .properties(title=title, height=260, width="container")
        )
    data = data.with_columns(
        (pl.col(value) - pl.col(band).fill_null(0)).alias("lo"),
        (pl.col(value) + pl.col(band).fill_null(0)).alias("hi"),
        (pl.col(chance) - pl.col(chance_band).fill_null(0)).alias("chance_lo")
        if chance in data.columns
        else pl.lit(None).alias("chance_lo"),
        (pl.col(chance) + pl.col(chance_band).fill_null(0)).alias("chance_hi")
        if chance in data.columns
        else pl.lit(None).alias("chance_hi"),
    )
    x = alt.X(
        "layer:Q",
        title="layer",
        axis=alt.Axis(tickMinStep=1, format="d"),
        scale=alt.Scale(zero=False, nice=False),
    )
    base = alt.Chart(data).encode(x=x)
    chance_band_ = (
        base.transform_filter("datum.method == 'raw'")
        .mark_area(color="#bbbbbb", opacity=0.35)
        .encode(y=alt.Y("chance_lo:Q", title=None), y2="chance_hi:Q")
    )
    methods = data["method"].unique(maintain_order=True).to_list()
    scale = alt.Scale(domain=methods, range=[RAW_COLOUR if m == "raw" else REMOVED_COLOUR for m in methods])
    color = alt.Color(
        "method:N",
        title=None,
        scale=scale,
        legend=alt.Legend(orient="top", symbolType="stroke", symbolStrokeWidth=3),
    )
    # the bands' colours resolve apart from the lines': sharing the scale, legend=None took the lines' key away
    bands = base.mark_area(opacity=0.18).encode(
        y="lo:Q", y2="hi:Q", color=alt.Color("method:N", scale=scale, legend=None)
    )
    line = base.mark_line(point=True).encode(
        y=alt.Y(f"{value}:Q", title=None, scale=alt.Scale(zero=False)),
        color=color,
        tooltip=[
            "layer:Q",
            "method:N",
            alt.Tooltip(f"{value}:Q", format="+.3f", title="value"),
            alt.Tooltip("lo:Q", format="+.3f"),
            alt.Tooltip("hi:Q", format="+.3f"),
            alt.Tooltip("chance_hi:Q", format="+.3f", title="chance up to"),
        ],
    )
    return (
        alt.layer(chance_band_, bands, line)
        .resolve_scale(color="independent")
        .properties(title=title, height=260, width="container")
    )


def view_colour(rows: pl.DataFrame, legend: bool = True) -> alt.Color:
    """Raw and removed in the Layers tab's two colours (the same two things, the same two colours)."""
    views = rows["view"].unique(maintain_order=True).to_list() if "view" in rows.columns else []
    scale = alt.Scale(domain=views, range=[RAW_COLOUR if v == "raw" else REMOVED_COLOUR for v in views])
    return alt.Color(
        "view:N",
        title=None,
        scale=scale,
        legend=alt.Legend(orient="top", symbolType="stroke", symbolStrokeWidth=3) if legend else None,
    )


def divergence(rows: pl.DataFrame) -> alt.LayerChart:
    """Median distance ratio (related branches / unrelated prompts) per offset since the fork, raw vs
    removed, with its band; the dashed line at 1 is chance (as far apart as unrelated prompts)."""
    base = alt.Chart(rows.fill_nan(None).drop_nulls("median")).encode(
        x=alt.X("offset:Q", title="tokens since the branches parted"), color=view_colour(rows)
    )
    band = base.mark_area(opacity=0.2).encode(y="lo:Q", y2="hi:Q")
    line = base.mark_line(point=True).encode(
        y=alt.Y("median:Q", title="distance / unrelated prompts", scale=alt.Scale(zero=False)),
        tooltip=[
            "offset:Q",
            "view:N",
            alt.Tooltip("median:Q", format=".3f"),
            alt.Tooltip("lo:Q", format=".3f"),
            alt.Tooltip("hi:Q", format=".3f"),
            "n_pairs:Q",
        ],
    )
    chance = alt.Chart(pl.DataFrame({"y": [1.0]})).mark_rule(strokeDash=[4, 4], color="gray").encode(y="y:Q")
    return alt.layer(band, line, chance).properties(
        height=300, width="container", title="Where branches go apart"
    )


def divergence_per_prompt(rows: pl.DataFrame) -> alt.FacetChart:
    """The divergence chart, one small panel per prompt."""
    data = rows.fill_nan(None).drop_nulls("median")
    base = alt.Chart(data).encode(x=alt.X("offset:Q", title="tokens since parting"), color=view_colour(rows))
    layered = alt.layer(
        base.mark_area(opacity=0.2).encode(y="lo:Q", y2="hi:Q"),
        base.mark_line().encode(
            y=alt.Y("median:Q", title="distance / unrelated", scale=alt.Scale(zero=False))
        ),
    ).properties(width=FACET_WIDTH, height=140)
    # an x axis under each panel: a shared footer axis was drawn under the empty cells of the last row
    return layered.facet(facet=alt.Facet("prompt:N", title="prompt"), columns=FACET_COLUMNS).resolve_axis(
        x="independent"
    )


def sample_branches(points: pl.DataFrame, max_points: int, seed: int = 0) -> pl.DataFrame:
    """Whole branches, in a seeded random order, while their tokens fit in max_points."""
    sizes = points.group_by("branch_id").len().sample(fraction=1.0, shuffle=True, seed=seed)
    keep = sizes.filter(pl.col("len").cum_sum() <= max_points)["branch_id"]
    return points.filter(pl.col("branch_id").is_in(keep.implode()))


def selected_rows(points: pl.DataFrame, selection: dict) -> pl.DataFrame:
    """The points inside the brushes a Streamlit selection event reports ({param: {field: [lo, hi]}});
    point selections (lists) are left to picked_branches."""
    mask = None
    for brush in selection.values():
        if not isinstance(brush, dict):
            continue
        for field, bounds in brush.items():
            if field in points.columns and isinstance(bounds, list) and len(bounds) == 2:
                lo, hi = sorted(bounds)
                cond = pl.col(field).is_between(lo, hi)
                mask = cond if mask is None else mask & cond
    return points.filter(mask) if mask is not None else points


def legend_prompts(selection: dict) -> set[str]:
    """Prompt labels clicked in a chart's legend, as a Streamlit selection event reports them."""
    out: set[str] = set()
    for name, value in selection.items():
        if name.startswith("legend_") and isinstance(value, list):
            out |= {
                str(v["prompt_label"])
                for v in value
                if isinstance(v, dict) and v.get("prompt_label") is not None
            }
    return out


def picked_branches(selection: dict) -> set[int]:
    """Branch ids of the point selections (clicked branches) a Streamlit selection event reports."""
    out: set[int] = set()
    for value in selection.values():
        if isinstance(value, list):
            out |= {
                int(v["branch_id"]) for v in value if isinstance(v, dict) and v.get("branch_id") is not None
            }
    return out
