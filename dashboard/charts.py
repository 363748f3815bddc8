"""Altair chart builders (no Streamlit): projections with trajectories, raw vs residualized side by side,
the per-layer position profile."""

from __future__ import annotations

import altair as alt
import polars as pl

from dashboard.trajectories import anchor_rows, trajectory_lines

COLOR_BY = {  # label -> (field, Altair type)
    "branch": ("branch_id", "nominal"),
    "prompt": ("prompt_id", "nominal"),
    "position": ("position", "quantitative"),
    "depth in tree": ("depth", "ordinal"),
    "logprob": ("logprob", "quantitative"),
    "cluster": ("cluster", "nominal"),
}
TOOLTIP = [
    alt.Tooltip("token_text:N", title="token"), alt.Tooltip("position:Q"), alt.Tooltip("branch_id:N", title="branch"),
    alt.Tooltip("prompt_id:N", title="prompt"), alt.Tooltip("context:N", title="text around"),
]
PANELS = (("raw", "raw"), ("res", "position removed"))


def _color(color_by: str) -> alt.Color:
    field, kind = COLOR_BY[color_by]
    scale = alt.Scale(scheme="viridis") if kind == "quantitative" else alt.Scale(scheme="tableau20")
    return alt.Color(f"{field}:{kind[0].upper()}", title=color_by, scale=scale)


def projection_panel(
    points: pl.DataFrame, branches: pl.DataFrame, prefix: str, title: str, color_by: str,
    brushes: dict[str, alt.Parameter], trajectories: bool = True, width: int = 430, height: int = 400,
) -> alt.LayerChart:
    """One projection: points (coloured, tooltips), a line per branch in token order and fork markers.

    points holds {prefix}_x / {prefix}_y; every brush in `brushes` dims the points outside it, so a box
    drawn in either panel highlights the same tokens in both.
    """
    xy = points.drop(["x", "y"], strict=False).rename({f"{prefix}_x": "x", f"{prefix}_y": "y"})
    x = alt.X(f"{prefix}_x:Q", title=None, axis=alt.Axis(labels=False, ticks=False))
    y = alt.Y(f"{prefix}_y:Q", title=None, axis=alt.Axis(labels=False, ticks=False))
    selected = None
    for brush in brushes.values():
        selected = brush if selected is None else selected & brush
    own = brushes[prefix]
    dots = alt.Chart(points).mark_circle(size=28).encode(
        x=x, y=y, color=_color(color_by), tooltip=TOOLTIP,
        opacity=alt.condition(selected, alt.value(0.9), alt.value(0.08)),
    ).add_params(own)
    layers: list[alt.Chart] = []
    if trajectories:
        lines = trajectory_lines(xy, branches).rename({"x": f"{prefix}_x", "y": f"{prefix}_y"})
        layers.append(alt.Chart(lines).mark_line(strokeWidth=0.8, opacity=0.25).encode(
            x=x, y=y, detail="branch_id:N", order="order:Q", color=alt.value("#7a7a7a"),
        ))
        forks = anchor_rows(xy, branches).rename({"x": f"{prefix}_x", "y": f"{prefix}_y"})
        if len(forks):
            layers.append(alt.Chart(forks).mark_point(shape="diamond", size=90, filled=True, color="black").encode(
                x=x, y=y, tooltip=[alt.Tooltip("branch_id:N", title="fork of branch"),
                                   alt.Tooltip("anchor_branch_id:N", title="off branch"), "position:Q"],
            ))
    layers.append(dots)
    return alt.layer(*layers).properties(title=title, width=width, height=height)


def side_by_side(
    points: pl.DataFrame, branches: pl.DataFrame, color_by: str = "branch", trajectories: bool = True,
    titles: tuple[str, str] = ("raw", "position removed"),
) -> alt.HConcatChart:
    """Raw and residualized projections of the same tokens, with linked interval selections."""
    brushes = {prefix: alt.selection_interval(name=f"brush_{prefix}", encodings=["x", "y"])
               for prefix, _ in PANELS}
    panels = [projection_panel(points, branches, prefix, title, color_by, brushes, trajectories)
              for (prefix, _), title in zip(PANELS, titles)]
    return alt.hconcat(*panels).resolve_scale(color="shared")


def layer_profile(rows: pl.DataFrame) -> alt.LayerChart:
    """R2_pos per layer, raw vs residualized, with the shuffled-position chance level dashed."""
    base = alt.Chart(rows).encode(x=alt.X("layer:O", title="layer"))
    r2 = base.mark_line(point=True).encode(
        y=alt.Y("r2:Q", title="R2_pos (share of variance explained by position)"),
        color=alt.Color("method:N", title=None),
        tooltip=["layer:O", "method:N", alt.Tooltip("r2:Q", format=".3f"), alt.Tooltip("chance:Q", format=".3f"),
                 alt.Tooltip("heldout:Q", format="+.3f"), alt.Tooltip("leak:Q", format="+.3f")],
    )
    chance = base.mark_line(strokeDash=[4, 4], color="gray").encode(y="mean(chance):Q")
    return alt.layer(r2, chance).properties(height=260, title="Position per layer (dashed: chance)")


def divergence(rows: pl.DataFrame) -> alt.LayerChart:
    """Median distance ratio (related branches / unrelated prompts) per offset since the fork, raw vs
    removed, with its band; the dashed line at 1 is chance (as far apart as unrelated prompts)."""
    base = alt.Chart(rows.fill_nan(None).drop_nulls("median")).encode(
        x=alt.X("offset:Q", title="tokens since the branches parted"), color=alt.Color("view:N", title=None))
    band = base.mark_area(opacity=0.2).encode(y="lo:Q", y2="hi:Q")
    line = base.mark_line(point=True).encode(
        y=alt.Y("median:Q", title="distance / unrelated prompts", scale=alt.Scale(zero=False)),
        tooltip=["offset:Q", "view:N", alt.Tooltip("median:Q", format=".3f"), alt.Tooltip("lo:Q", format=".3f"),
                 alt.Tooltip("hi:Q", format=".3f"), "n_pairs:Q"])
    chance = alt.Chart(pl.DataFrame({"y": [1.0]})).mark_rule(strokeDash=[4, 4], color="gray").encode(y="y:Q")
    return alt.layer(band, line, chance).properties(height=300, title="Where branches go apart")


def divergence_per_prompt(rows: pl.DataFrame) -> alt.FacetChart:
    """The divergence chart, one small panel per prompt."""
    data = rows.fill_nan(None).drop_nulls("median")
    base = alt.Chart(data).encode(x=alt.X("offset:Q", title="tokens since parting"),
                                  color=alt.Color("view:N", title=None))
    layered = alt.layer(
        base.mark_area(opacity=0.2).encode(y="lo:Q", y2="hi:Q"),
        base.mark_line().encode(y=alt.Y("median:Q", title="distance / unrelated", scale=alt.Scale(zero=False))),
    ).properties(width=220, height=140)
    return layered.facet(facet=alt.Facet("prompt:N", title="prompt"), columns=4)


def sample_branches(points: pl.DataFrame, max_points: int, seed: int = 0) -> pl.DataFrame:
    """Whole branches, in a seeded random order, while their tokens fit in max_points."""
    sizes = points.group_by("branch_id").len().sample(fraction=1.0, shuffle=True, seed=seed)
    keep = sizes.filter(pl.col("len").cum_sum() <= max_points)["branch_id"]
    return points.filter(pl.col("branch_id").is_in(keep.implode()))


def selected_rows(points: pl.DataFrame, selection: dict) -> pl.DataFrame:
    """The points inside the brushes a Streamlit selection event reports ({param: {field: [lo, hi]}})."""
    mask = pl.lit(True)
    for brush in selection.values():
        if not isinstance(brush, dict):
            continue
        for field, bounds in brush.items():
            if field in points.columns and isinstance(bounds, list) and len(bounds) == 2:
                lo, hi = sorted(bounds)
                mask = mask & pl.col(field).is_between(lo, hi)
    return points.filter(mask)


def density(points: pl.DataFrame, bins: int = 60) -> alt.HConcatChart:
    """Binned counts of raw and residualized coordinates, for views too large to draw point by point."""
    def one(prefix: str, title: str) -> alt.Chart:
        return alt.Chart(points.select(f"{prefix}_x", f"{prefix}_y")).mark_rect().encode(
            x=alt.X(f"{prefix}_x:Q", bin=alt.Bin(maxbins=bins), title=None),
            y=alt.Y(f"{prefix}_y:Q", bin=alt.Bin(maxbins=bins), title=None),
            color=alt.Color("count():Q", scale=alt.Scale(scheme="greenblue"), title="tokens"),
        ).properties(title=title, width=430, height=400)
    return alt.hconcat(*(one(prefix, title) for prefix, title in PANELS))
