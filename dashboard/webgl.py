"""A WebGL scatter (deck.gl through pydeck) for views too large for Vega: every token drawn, 10^6 and more.

Vega draws a few tens of thousands of points; deck.gl draws millions on the GPU. What limits it here is
the spec Streamlit sends: pydeck writes each point as a JSON object with float fields (190 MB and 14 s
of Python for 10^6 points, measured). So points travel as bare pairs of integers (coordinates quantized
to a grid of GRID units, ~14 bytes a point), one layer per colour (a few dozen at most: branch shades
are binned), written by polars, not by pydeck. A clicked point comes back as (layer, index within the
layer), which `picked_rows` maps to the token; its text is read on the server (on demand), so hover
shows text only for views small enough to carry it (HOVER_TEXT_MAX).
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pydeck as pdk

from dashboard.charts import COLOR_BY, HEIGHT
from dashboard.palette import BASE

GRID = (36_000, 30_000)  # quantized x and y extents (6:5, about a panel's shape)
PANEL_PX = (520, HEIGHT)  # the narrowest panel the initial zoom fits (two side by side at 1366 px)
HOVER_TEXT_MAX = 100_000  # points up to which each carries its token, branch and position for hover
MAX_LAYERS = 48  # colour bins: branch shades beyond this share the nearest bin of their prompt
RAMP = ["#440154", "#3b528b", "#21918c", "#5ec962", "#fde725"]  # viridis, as the Vega charts use
RAMP_BINS = 16
POINT_PX = 2.0
HOW_TO = (
    "Wheel: zoom · drag: pan · click a point: follow its branch in both panels and the text below (click "
    "it again to let go) · hover: the point's token, where the view is small enough to carry text · a box: "
    "Select a region, below"
)


def _rgb(hex_colour: str) -> list[int]:
    return [int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)]


def _ramp(t: float) -> list[int]:
    """The viridis ramp at t in [0, 1], interpolated between its stops."""
    stops = np.array([_rgb(c) for c in RAMP], float)
    u = min(max(t, 0.0), 1.0) * (len(stops) - 1)
    i = min(int(u), len(stops) - 2)
    return [int(round(v)) for v in stops[i] + (u - i) * (stops[i + 1] - stops[i])]


def colour_bins(points: pl.DataFrame, color_by: str) -> tuple[pl.Series, dict[int, list[int]], str]:
    """(bin per point (n,), bin -> RGB, legend text): the points' colours in at most MAX_LAYERS bins."""
    field, kind = COLOR_BY[color_by]
    if kind == "hue" and field in points.columns:
        colours = points[field]
        names = colours.unique(maintain_order=True).to_list()
        if len(names) > MAX_LAYERS:  # many branch shades: their prompt's hue instead
            colours = points["prompt_color"]
            names = colours.unique(maintain_order=True).to_list()[:MAX_LAYERS]
        index = {c: i for i, c in enumerate(names)}
        bins = colours.replace_strict(index, default=len(names) - 1, return_dtype=pl.Int32)
        return (
            bins,
            {i: _rgb(c) for c, i in index.items()},
            "colour: " + ("prompt" if field == "prompt_color" or len(names) == MAX_LAYERS else color_by),
        )
    if field in points.columns and points[field].dtype.is_numeric() and kind == "quantitative":
        v = points[field].cast(pl.Float64).fill_null(strategy="mean").fill_nan(None).fill_null(0.0)
        lo, hi = float(v.min()), float(v.max())
        bins = ((v - lo) / max(hi - lo, 1e-12) * (RAMP_BINS - 1)).round().cast(pl.Int32)
        return (
            bins,
            {b: _ramp(b / (RAMP_BINS - 1)) for b in range(RAMP_BINS)},
            f"colour: {color_by} {lo:.3g} (dark) to {hi:.3g} (yellow)",
        )
    if field in points.columns:  # nominal or ordinal: tableau10, cycled
        codes = points[field].cast(pl.String).fill_null("?")
        names = sorted(codes.unique().to_list())[:MAX_LAYERS]
        index = {c: i for i, c in enumerate(names)}
        bins = codes.replace_strict(index, default=len(names) - 1, return_dtype=pl.Int32)
        return bins, {i: _rgb(BASE[i % len(BASE)]) for i in index.values()}, f"colour: {color_by}"
    return pl.Series("bin", np.zeros(len(points), np.int32)), {0: _rgb(BASE[0])}, ""


def quantize(points: pl.DataFrame, prefix: str) -> pl.DataFrame:
    """Integer grid coordinates qx, qy of a panel (y flipped: deck.gl's orthographic y grows downward)."""
    out = []
    for axis, size in zip(("x", "y"), GRID):
        col = pl.col(f"{prefix}_{axis}")
        lo, hi = points[f"{prefix}_{axis}"].min(), points[f"{prefix}_{axis}"].max()
        span = max(float(hi - lo), 1e-12) if lo is not None else 1.0
        q = ((col - lo) / span * (size - 1)).round().cast(pl.Int32)
        out.append((size - 1 - q if axis == "y" else q).alias(f"q{axis}"))
    return points.with_columns(out)


class FastDeck(pdk.Deck):
    """A pydeck Deck whose point layers' data are spliced into its JSON as polars wrote them (pydeck's
    own serializer takes seconds per 10^5 points). Streamlit calls to_json()."""

    def __init__(self, *args, payloads: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._payloads = payloads or {}

    def to_json(self) -> str:
        payloads = self.__dict__.pop("_payloads")  # pydeck serializes every attribute
        try:
            text = super().to_json()
        finally:
            self._payloads = payloads
        for placeholder, data in payloads.items():
            text = text.replace(json.dumps(placeholder), data, 1)
        return text


def _rows_json(frame: pl.DataFrame, text: bool) -> str:
    """[[qx, qy], ...] or, with text, [[qx, qy, token, branch, position], ...] as one JSON string."""
    if text:  # mixed types: Python's json (HOVER_TEXT_MAX rows at most)
        return json.dumps(
            frame.select("qx", "qy", "token_text", "branch_id", "position").rows(), separators=(",", ":")
        )
    body = frame.select(pl.concat_list(pl.col("qx", "qy")).alias("r")).write_ndjson()
    return "[" + ",".join(line[5:-1] for line in body.splitlines()) + "]"  # each line is {"r":[x,y]}


def point_layers(
    frame: pl.DataFrame, prefix: str, color_by: str, faint: bool = False
) -> tuple[list[pdk.Layer], dict[str, str], dict[str, np.ndarray], str]:
    """frame: a panel's points with grid coordinates (quantize). (layers, placeholder -> data JSON, layer id
    -> the row numbers of `frame` it draws in order,
    legend text). One pickable layer per colour bin; which layers exist and what they hold depends on the
    points and the colouring only, so a click's (layer, index) keeps meaning the same token while the
    selection changes. faint: drawn pale (a selection is shown on top)."""
    bins, rgb, legend = colour_bins(frame, color_by)
    text = len(frame) <= HOVER_TEXT_MAX
    layers, payloads, rows = [], {}, {}
    for b, drawn in layer_rows(bins).items():
        sub = frame[drawn]
        layer_id = f"{prefix}-{b}"
        placeholder = f"__data_{layer_id}__"
        layers.append(
            pdk.Layer(
                "ScatterplotLayer",
                data=placeholder,
                id=layer_id,
                get_position="-",
                get_fill_color=rgb[b] + [45 if faint else 210],
                get_radius=POINT_PX,
                radius_units="pixels",
                radius_min_pixels=1.5,
                pickable=True,
                auto_highlight=True,
                highlight_color=[0, 0, 0, 255],
            )
        )
        payloads[placeholder] = _rows_json(sub, text)
        rows[layer_id] = drawn
    return layers, payloads, rows, legend


def layer_rows(bins: pl.Series) -> dict[int, np.ndarray]:
    """Colour bin -> the row numbers its layer draws, in order (bins without points have no layer)."""
    b = bins.to_numpy()
    order = np.argsort(b, kind="stable")
    values, starts = np.unique(b[order], return_index=True)
    return {int(v): rows for v, rows in zip(values, np.split(order, starts[1:]))}


def clicked_rows(points: pl.DataFrame, color_by: str, prefix: str, selection: dict) -> list[int]:
    """Row numbers of `points` a pydeck selection event of the panel `prefix` reports, found again from
    the points and the colouring alone (the layers are a function of them)."""
    if not (selection.get("indices") or {}):
        return []
    bins = colour_bins(points, color_by)[0]
    return picked_rows(selection, {f"{prefix}-{b}": rows for b, rows in layer_rows(bins).items()})


def chosen_layer(
    frame: pl.DataFrame, prefix: str, chosen_rows: np.ndarray
) -> tuple[pdk.Layer, str, str] | None:
    """The selected tokens drawn again on top, ringed (not pickable: clicks go to the stable layers
    below): (layer, its data placeholder, the data JSON)."""
    if not len(chosen_rows):
        return None
    placeholder = f"__data_{prefix}-chosen__"
    layer = pdk.Layer(
        "ScatterplotLayer",
        data=placeholder,
        id=f"{prefix}-chosen",
        get_position="-",
        get_fill_color=[255, 255, 255, 0],
        stroked=True,
        get_line_color=[0, 0, 0, 230],
        line_width_min_pixels=1.2,
        get_radius=POINT_PX + 1.5,
        radius_units="pixels",
        pickable=False,
    )
    return layer, placeholder, _rows_json(frame[chosen_rows], text=False)


def line_layer(frame: pl.DataFrame, prefix: str, branches: set[int]) -> pdk.Layer | None:
    """The trajectories of `branches` (their tokens in position order) as one PathLayer, black."""
    if not branches:
        return None
    q = frame.filter(pl.col("branch_id").is_in(list(branches))).sort("branch_id", "position")
    paths = [
        {"path": [[int(a), int(b)] for a, b in zip(g["qx"], g["qy"])], "branch": int(k[0])}
        for k, g in q.group_by(["branch_id"], maintain_order=True)
        if len(g) > 1
    ]
    if not paths:
        return None
    return pdk.Layer(
        "PathLayer",
        data=paths,
        id=f"{prefix}-lines",
        get_path="path",
        get_color=[20, 20, 20, 200],
        width_units="pixels",
        get_width=1.5,
        pickable=False,
    )


def deck(
    points: pl.DataFrame,
    prefix: str,
    color_by: str,
    chosen_rows: np.ndarray | None = None,
    lit: set[int] | None = None,
) -> tuple[FastDeck, dict[str, np.ndarray], str]:
    """One panel as a deck (every point, zoom and pan, hover, click to pick), the layer -> rows map that
    turns a click back into a token, and the colour legend's text. chosen_rows: row numbers of the
    selected tokens (ringed on top, the rest pale); lit: branches whose lines are drawn."""
    chosen_rows = np.asarray([] if chosen_rows is None else chosen_rows, dtype=np.int64)
    frame = quantize(points, prefix)  # the panel's grid coordinates, once for every layer
    layers, payloads, rows, legend = point_layers(frame, prefix, color_by, faint=len(chosen_rows) > 0)
    ring = chosen_layer(frame, prefix, chosen_rows)
    if ring is not None:
        layers.append(ring[0])
        payloads[ring[1]] = ring[2]
    lines = line_layer(frame, prefix, lit or set())
    if lines is not None:
        layers.append(lines)
    text = len(points) <= HOVER_TEXT_MAX
    tooltip = {"text": "{2}\nbranch {3} · position {4}"} if text else None
    view = pdk.View(type="OrthographicView", controller=True)
    zoom = float(np.log2(min(PANEL_PX[0] / GRID[0], PANEL_PX[1] / GRID[1]) * 0.92))
    state = pdk.ViewState(
        target=[GRID[0] / 2, GRID[1] / 2, 0], zoom=zoom, min_zoom=zoom - 2, max_zoom=zoom + 12
    )
    return (
        FastDeck(
            layers=layers,
            views=[view],
            initial_view_state=state,
            map_provider=None,
            tooltip=tooltip,
            payloads=payloads,
        ),
        rows,
        legend,
    )


def picked_rows(selection: dict, rows: dict[str, np.ndarray]) -> list[int]:
    """Row numbers of the points a pydeck selection event reports ({"indices": {layer id: [i, ...]}})."""
    out: list[int] = []
    for layer_id, indices in (selection.get("indices") or {}).items():
        drawn = rows.get(layer_id)
        if drawn is not None:
            out += [int(drawn[i]) for i in indices if 0 <= i < len(drawn)]
    return out
