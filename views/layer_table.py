"""The one per-layer table: the app's Layers tab and the CLI report (`python -m views report`) both show
it. Its columns are generated from the registered measures (analysis.measures) and the removal's report,
so a new measure appears in both with no other edit.

Per shown measure that does not read a 2-D layout (a per-layer number is about the latents, not a
picture): its value `<key>`, the 95% band's half-width `<key>_band`, its chance level `<key>_chance` and
the chance band's half-width `<key>_chance_band`, as the metrics table reads them (views.present).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from analysis.measures import LAYER_STATS, MEASURES, Measure
from analysis.verdict import removal_title

NAN = float("nan")


@dataclass(frozen=True)
class Column:
    """key: the row's field; header and help: the app's column; short: the CLI's header (None: in the JSON
    and the app only); get: the value from a view's metrics; fmt: the CLI's text cell."""

    key: str
    header: str
    help: str
    get: Callable[[dict], Any]
    short: str | None = None
    fmt: str = "{:.3f}"


def _estimate(measure: Measure, part: str) -> Callable[[dict], float]:
    """One number of a measure's Estimate (analysis.measures), from a view's metrics."""
    return lambda m: getattr(measure.estimate(m.get(measure.key)), part)


def _extra(measure: Measure, field: str) -> Callable[[dict], float]:
    """One of a measure's declared extras (Estimate.extra), from a view's metrics."""
    return lambda m: measure.estimate(m.get(measure.key)).extra[field]


def measure_columns(measure: Measure) -> list[Column]:
    """The four columns of one measure, then one per declared extra that has a header."""
    k, label, signed = measure.key, measure.label, measure.signed
    fmt = "{:+.3f}" if signed else "{:.3f}"
    cols = [
        Column(k, label, measure.help or label, _estimate(measure, "value"), k, fmt),
        Column(f"{k}_band", f"{label} ±", f"95% band of {label}", _estimate(measure, "band")),
        Column(
            f"{k}_chance",
            f"{label}: chance",
            f"{label} at chance",
            _estimate(measure, "chance"),
            f"{k} chance" if measure.chance == "field" else None,
            fmt,
        ),
        Column(
            f"{k}_chance_band",
            f"{label}: chance ±",
            "half-width of the interval a value at chance falls in (95%)",
            _estimate(measure, "chance_band"),
        ),
    ]
    cols += [
        Column(
            f"{k}_{x.field}",
            x.label,
            x.help,
            _extra(measure, x.field),
            x.short,
            "{:+.3f}" if x.signed else "{:.3f}",
        )
        for x in measure.extras
        if x.label
    ]
    return cols


def _removal(field: str) -> Callable[[dict], Any]:
    return lambda m: (m.get("removal") or {}).get(field, NAN)


def columns() -> list[Column]:
    """Every column, in order: which layer and view, each per-layer measure, what the removal did."""
    head = [
        Column("layer", "layer", "hidden-state layer (0 = token embeddings)", lambda m: NAN, "layer", "{}"),
        Column("method", "view", "raw, or the removal method", lambda m: "", "method", "{}"),
        Column(
            "tokens", "tokens", "tokens measured", lambda m: (m.get("r2_pos") or {}).get("n"), "tokens", "{}"
        ),
    ]
    per_measure = [c for m in MEASURES.values() if m.shown and not m.layout for c in measure_columns(m)]
    removal = [
        Column(
            "detected",
            "detected",
            "whether the removal's test found a component at this layer",
            _removal("detected"),
            None,
            "{}",
        ),
        Column("p_value", "p", "the removal test's p-value", _removal("p_value"), "p", "{:.2f}"),
        Column(
            "weight",
            "weight",
            "share of the method's own estimate subtracted (its out-of-fold shrinkage), not a share of "
            "position: compare R2_pos raw and after for how much of position's variance went",
            _removal("weight"),
            "weight",
            "{:.0%}",
        ),
        Column(
            "took_out",
            "took out",
            "what the removal took out",
            lambda m: removal_title(m.get("removal")).removesuffix(" removed") if m.get("removal") else "",
            "took out",
            "{}",
        ),
    ]
    return head + per_measure + removal


def row(layer: int, method: str, metrics: dict) -> dict[str, Any]:
    """One (layer, view) row of the table from the view's metrics, then the cells of each layer statistic
    (analysis.measures.LAYER_STATS) the raw view computed."""
    out = {c.key: c.get(metrics) for c in columns()}
    out |= {"layer": layer, "method": method}
    if method == "raw":
        out["took_out"] = ""
    for stat in LAYER_STATS.values():
        if metrics.get(stat.key) is not None:
            out |= stat.cells(metrics[stat.key])
    return out


def headers(keys: list[str]) -> dict[str, tuple[str, str]]:
    """(header, help) of each column key of a table of rows (the layer statistics' included)."""
    known = {c.key: (c.header, c.help) for c in columns()}
    out = {}
    for key in keys:
        if key in known:
            out[key] = known[key]
        elif key == "warning":
            out[key] = ("warning", "each number the removal moved the wrong way beyond its band")
        else:
            found = (stat.header(key) for stat in LAYER_STATS.values())
            if header := next((h for h in found if h), None):
                out[key] = header
    return out


def panels(keys: tuple[str, ...] = ("r2_pos", "probe", "leak", "leak_prompt")) -> list[tuple[str, ...]]:
    """The Layers tab's charts: (title, value, band, chance, chance band) column keys per measure."""
    return [
        (MEASURES[k].label, k, f"{k}_band", f"{k}_chance", f"{k}_chance_band") for k in keys if k in MEASURES
    ]


def text(rows: list[dict[str, Any]]) -> str:
    """The table as fixed-width text (markdown-compatible): the columns with a short header, then the
    guard's warning."""
    shown = [(c.short, c.key, c.fmt) for c in columns() if c.short] + [("warning", "warning", "{}")]

    def cell(fmt: str, value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return fmt.format(value)

    header = [title for title, _, _ in shown]
    body = [[cell(fmt, r.get(key)) for _, key, fmt in shown] for r in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])
