"""A WebGL scatter for views too large for Vega: every token drawn, 10^6 and more (a Streamlit component,
its browser half in webgl.js and webgl.css).

Vega draws a few tens of thousands of points; WebGL draws millions. What limits the size is what travels:
the points go as one binary blob (a JSON header, then packed arrays: branch and position as int32,
coordinates quantized to a GRID of uint16, a colour bin as uint8, the token as an index into the list
of distinct token texts: 17 bytes a point), with no JSON per point. Hover shows a point's token with the
text around it, as the Vega tooltip does, built in the browser from the points themselves: the header
carries each branch's parent and fork position (a few bytes a branch), so the text before a fork is read
from the parent's points; no text travels per point. Picking is done in the browser on the CPU (a grid
index), so clicks and hover work the same under software WebGL (SwiftShader) as on a GPU; deck.gl's GPU
picking dropped clicks there from 10^5 points.

What comes back is state, read from the session before the panels are drawn: `click` (the last clicks,
each a point's branch and position with a nonce) and `selection` (a box or lasso as a polygon in grid units,
which `inside` turns into the tokens it holds, tested on the same grid the browser drew).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import polars as pl
import streamlit as st

from dashboard.charts import COLOR_BY, HEIGHT
from dashboard.palette import BASE

GRID = (36_000, 30_000)  # quantized x and y extents (6:5, about a panel's shape; uint16)
MAX_COLOURS = 48  # colour bins (the shader's palette): branch shades beyond this share their prompt's hue
RAMP = ["#440154", "#3b528b", "#21918c", "#5ec962", "#fde725"]  # viridis, as the Vega charts use
RAMP_BINS = 16
POINT_PX = 4.0  # a point's diameter in CSS pixels
HOW_TO = (
    "Wheel: zoom · drag: pan · click a point: follow its branch in both panels and the text below (click "
    "it again to let go) · Box (or shift-drag) and Lasso: select the tokens inside, in both panels · "
    "Escape or Clear: drop the box · Fit or double-click: every point · hover: a point's token in the "
    "text around it, its branch and position"
)
CONTEXT = (8, 4)  # tokens before and after a hovered one (dashboard.text.contexts' window)
_HERE = Path(__file__).parent
_COMPONENT = st.components.v2.component(
    "branchlens_scatter", js=(_HERE / "webgl.js").read_text(), css=(_HERE / "webgl.css").read_text()
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
    """(bin per point (n,), bin -> RGB, legend text): the points' colours in at most MAX_COLOURS bins."""
    field, kind = COLOR_BY[color_by]
    if kind == "hue" and field in points.columns:
        colours = points[field]
        names = colours.unique(maintain_order=True).to_list()
        by_prompt = field == "prompt_color"
        if len(names) > MAX_COLOURS:  # many branch shades: their prompt's hue instead
            colours, by_prompt = points["prompt_color"], True
            names = colours.unique(maintain_order=True).to_list()[:MAX_COLOURS]
        index = {c: i for i, c in enumerate(names)}
        bins = colours.replace_strict(index, default=len(names) - 1, return_dtype=pl.Int32)
        return (
            bins,
            {i: _rgb(c) for c, i in index.items()},
            "colour: " + ("prompt" if by_prompt else color_by),
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
        every = sorted(codes.unique().to_list())
        names = every[:MAX_COLOURS]
        index = {c: i for i, c in enumerate(names)}
        bins = codes.replace_strict(index, default=len(names) - 1, return_dtype=pl.Int32)
        more = (
            f" (the last {len(every) - MAX_COLOURS + 1} values share one colour)"
            if len(every) > MAX_COLOURS
            else ""
        )
        return bins, {i: _rgb(BASE[i % len(BASE)]) for i in index.values()}, f"colour: {color_by}{more}"
    return pl.Series("bin", np.zeros(len(points), np.int32)), {0: _rgb(BASE[0])}, ""


def quantize(points: pl.DataFrame, prefix: str) -> np.ndarray:
    """(n, 2) uint16 grid coordinates of a panel's points (y flipped: the screen's y grows downward)."""
    out = []
    for axis, size in zip(("x", "y"), GRID):
        v = points[f"{prefix}_{axis}"].cast(pl.Float64).to_numpy()
        lo, hi = (float(v.min()), float(v.max())) if len(v) else (0.0, 1.0)
        q = np.rint((v - lo) / max(hi - lo, 1e-12) * (size - 1))
        out.append(size - 1 - q if axis == "y" else q)
    return np.column_stack(out).astype(np.uint16) if out[0].size else np.zeros((0, 2), np.uint16)


def tree_of(points: pl.DataFrame, branches: pl.DataFrame) -> list[list[int]]:
    """[[branch, parent (-1 for a root), fork position], ...] of the points' branches and their ancestors:
    what webgl.js walks to read the text before a fork from the parent's points."""
    up = {
        int(b): (-1 if p is None else int(p), int(f or 0))
        for b, p, f in branches.select("branch_id", "parent_branch_id", "fork_position").iter_rows()
    }
    todo, seen = set(points["branch_id"].unique().to_list()), set()
    while todo:
        b = todo.pop()
        if b in seen or b not in up:
            continue
        seen.add(b)
        if up[b][0] >= 0:
            todo.add(up[b][0])
    return [[b, *up[b]] for b in sorted(seen)]


def _pad(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def payload(
    points: pl.DataFrame,
    prefix: str,
    color_by: str,
    chosen_rows: np.ndarray | None = None,
    lit: set[int] | None = None,
    view: str = "",
    selection: list | None = None,
    label: str = "",
    tree: list[list[int]] | None = None,
) -> tuple[bytes, str]:
    """(the blob webgl.js draws, the colour legend's text) for one panel of `points`. chosen_rows: row
    numbers of the selected tokens (ringed on top, the rest pale); lit: branches whose lines are drawn (in
    position order); selection: the panel's box or lasso (grid units), drawn dashed; tree: `tree_of`, for
    the text around a hovered token (without it, the token's own branch only)."""
    n = len(points)
    text = (
        points["token_text"] if "token_text" in points.columns else pl.repeat("", n, eager=True)
    ).fill_null("")
    vocab = text.unique().sort()  # the distinct token texts; each point sends its rank among them
    tok = (text.rank("dense") - 1).cast(pl.UInt32).to_numpy() if n else np.zeros(0, np.uint32)
    chosen = np.asarray([] if chosen_rows is None else chosen_rows, dtype=np.uint32)
    bins, rgb, legend = colour_bins(points, color_by)
    palette = [rgb.get(b, [136, 136, 136]) for b in range(max(rgb) + 1 if rgb else 1)]
    lines, line_rows = [], np.zeros(0, np.uint32)
    if lit:
        q = (
            points.select("branch_id", "position")
            .with_row_index("_row")
            .filter(pl.col("branch_id").is_in(list(lit)))
            .sort("branch_id", "position")
        )
        sizes = q.group_by("branch_id", maintain_order=True).len()["len"].to_numpy()
        keep = np.repeat(sizes > 1, sizes)
        line_rows = q["_row"].to_numpy()[keep].astype(np.uint32)
        lines = [int(s) for s in sizes if s > 1]
    header = {
        "n": n,
        "grid": list(GRID),
        "palette": palette,
        "n_chosen": len(chosen),
        "lines": lines,
        "n_line_rows": len(line_rows),
        "point_px": POINT_PX,
        "height": HEIGHT,
        "view": view,
        "label": label,
        "selection": selection,
        "vocab": vocab.to_list(),
        "tree": tree or [],
        "context": list(CONTEXT),
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    parts = [
        struct.pack("<I", len(head)) + head,
        points["branch_id"].cast(pl.Int32).to_numpy().astype("<i4").tobytes(),
        points["position"].cast(pl.Int32).to_numpy().astype("<i4").tobytes(),
        tok.astype("<u4").tobytes(),
        quantize(points, prefix).astype("<u2").tobytes(),
        bins.cast(pl.UInt8).to_numpy().tobytes(),
        chosen.astype("<u4").tobytes(),
        line_rows.astype("<u4").tobytes(),
    ]
    return b"".join(_pad(p) for p in parts), legend


def decode(blob: bytes) -> dict:
    """What webgl.js reads from a payload (the header's fields and the arrays), for tests and benches."""
    (size,) = struct.unpack_from("<I", blob)
    header = json.loads(blob[4 : 4 + size])
    at = 4 + size + (-(4 + size) % 4)
    out = dict(header)
    for name, dtype, count in (
        ("branch", "<i4", header["n"]),
        ("position", "<i4", header["n"]),
        ("tok", "<u4", header["n"]),
        ("q", "<u2", 2 * header["n"]),
        ("bin", "u1", header["n"]),
        ("chosen", "<u4", header["n_chosen"]),
        ("line_rows", "<u4", header["n_line_rows"]),
    ):
        out[name] = np.frombuffer(blob, dtype, count, at)
        at += out[name].nbytes + (-out[name].nbytes % 4)
    out["q"] = out["q"].reshape(-1, 2)
    return out


def inside(q: np.ndarray, polygon: list) -> np.ndarray:
    """(n,) bool: which grid points q (n, 2) lie inside the polygon [[x, y], ...] (grid units; even-odd
    rule, as a canvas fills it)."""
    poly = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    hit = np.zeros(len(q), bool)
    if len(poly) < 3 or not len(q):
        return hit
    lo, hi = poly.min(axis=0), poly.max(axis=0)
    box = np.flatnonzero(((q >= lo) & (q <= hi)).all(axis=1))  # the polygon's bounding box first
    x, y = q[box, 0].astype(np.float64), q[box, 1].astype(np.float64)
    odd = np.zeros(len(box), bool)
    for (x1, y1), (x2, y2) in zip(poly, np.roll(poly, -1, axis=0)):
        crosses = (y1 > y) != (y2 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            odd ^= crosses & (x < (x2 - x1) * (y - y1) / (y2 - y1) + x1)
    hit[box] = odd
    return hit


def state(key: str) -> dict:
    """The panel's state as the browser last set it ({"selection": ..., "click": ...}), before it is drawn."""
    value = st.session_state.get(key)
    return dict(value) if value else {}


def scatter(blob: bytes, key: str) -> None:
    """Draw one panel (`payload`'s blob); what it reports is read with `state` on the next run."""
    _COMPONENT(
        data=blob,
        key=key,
        height=HEIGHT + 40,
        on_selection_change=lambda: None,
        on_click_change=lambda: None,
    )
