"""Colours that read at a glance with many branches: one hue family per prompt, a shade per branch."""

from __future__ import annotations

import colorsys

import polars as pl

# Ten well-separated hues (tableau10's), then evenly spaced ones by the golden angle.
BASE = [
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
]
GOLDEN = 0.618033988749895


def prompt_color(index: int) -> str:
    """The base colour of the index-th prompt of a view (stable for a given order of prompts)."""
    if index < len(BASE):
        return BASE[index]
    r, g, b = colorsys.hls_to_rgb((index * GOLDEN) % 1.0, 0.5, 0.6)
    return _hex(r, g, b)


def shades(base: str, n: int) -> list[str]:
    """n shades of one hue, dark to light (lightness 0.28-0.72), the base's hue and saturation kept."""
    h, _lightness, s = colorsys.rgb_to_hls(*(int(base[i : i + 2], 16) / 255 for i in (1, 3, 5)))
    s = max(s, 0.45)
    if n == 1:
        return [base]
    return [_hex(*colorsys.hls_to_rgb(h, 0.28 + 0.44 * i / (n - 1), s)) for i in range(n)]


def _hex(r: float, g: float, b: float) -> str:
    return "#" + "".join(f"{round(255 * c):02x}" for c in (r, g, b))


def branch_colors(branches: pl.DataFrame) -> pl.DataFrame:
    """Per branch (branch_id, prompt_id): `prompt_color` (the prompt's base hue) and `shade` (the
    branch's shade of it, in branch order within its prompt)."""
    prompts = sorted(branches["prompt_id"].unique().to_list())
    rows = []
    for i, p in enumerate(prompts):
        ids = sorted(branches.filter(pl.col("prompt_id") == p)["branch_id"].to_list())
        base = prompt_color(i)
        rows += [(b, base, shade) for b, shade in zip(ids, shades(base, len(ids)))]
    return pl.DataFrame(
        rows, schema={"branch_id": pl.Int64, "prompt_color": pl.String, "shade": pl.String}, orient="row"
    )
