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

from analysis.measures import MEASURES, Measure
from analysis.verdict import removal_title

NAN = float("nan")
HELD_OUT_HELP = (
    "R2 of each token predicted by the other prompts' mean at its position, against their overall "
    "mean: 0 = position carries nothing that holds across prompts; negative = per-position means "
    "fit only noise or content."
)


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


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else NAN


def _field(key: str, field: str) -> Callable[[dict], float]:
    return lambda m: _num((m.get(key) or {}).get(field))


def _estimate(measure: Measure, part: str) -> Callable[[dict], float]:
    """One number of a measure's Estimate (analysis.measures), from a view's metrics."""
    return lambda m: getattr(measure.estimate(m.get(measure.key)), part)


def measure_columns(measure: Measure) -> list[Column]:
    """The four columns of one measure (R2_pos adds its adjusted and held-out forms)."""
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
    if k == "r2_pos":
        cols += [
            Column(
                "r2_pos_adjusted",
                "R2_pos adjusted",
                "R2_pos adjusted for the number of positions (~0 at chance)",
                _field(k, "adjusted"),
                "adj",
            ),
            Column(
                "r2_pos_heldout",
                "R2_pos held-out",
                HELD_OUT_HELP,
                _field(k, "heldout"),
                "held-out",
                "{:+.3f}",
            ),
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
    """One (layer, view) row of the table from the view's metrics; the principal components' position R2
    and variance share where the raw view measured them (pc<i>_position, pc<i>_variance)."""
    out = {c.key: c.get(metrics) for c in columns()}
    out |= {"layer": layer, "method": method}
    if method == "raw":
        out["took_out"] = ""
    for i, pc in enumerate(metrics.get("pcs", [])):
        out[f"pc{i + 1}_position"] = pc["pos_r2"]
        out[f"pc{i + 1}_variance"] = pc["var_share"]
    return out


def headers(keys: list[str]) -> dict[str, tuple[str, str]]:
    """(header, help) of each column key of a table of rows (the principal components' included)."""
    known = {c.key: (c.header, c.help) for c in columns()}
    out = {}
    for key in keys:
        if key in known:
            out[key] = known[key]
        elif key.startswith("pc") and key.endswith(("_position", "_variance")):
            i, what = key[2:].split("_", 1)
            out[key] = (
                (f"PC{i} position R2", f"R2 of position on principal component {i}")
                if what == "position"
                else (f"PC{i} variance", f"share of variance on principal component {i}")
            )
        elif key == "warning":
            out[key] = ("warning", "each number the removal moved the wrong way beyond its band")
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
