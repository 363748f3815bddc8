"""What the app says about a view, as text and rows (no Streamlit): the verdict, the guard's warnings,
the removal's one-line note and the metrics table with help, bands and chance for every row."""

from __future__ import annotations

import math
from dataclasses import dataclass

from analysis.guard import Warning, check
from analysis.measures import MEASURES, Measure, estimate_in
from analysis.stats import Z
from analysis.verdict import headline_and_details, removal_title, verdict
from views import layer_table

__all__ = [
    "MetricRow",
    "Warning",
    "headline_and_details",
    "layout_note",
    "metric_rows",
    "profile_columns",
    "profile_panels",
    "removal_note",
    "removal_title",
    "verdict",
    "warnings",
]

TRUST_CAUTION = (
    0.8  # trustworthiness below which distances in a picture are read with care (its help says so)
)


@dataclass(frozen=True)
class MetricRow:
    """One line of the metrics table: each number as text, its 95% band's half-width apart, so the table
    can keep both visible at any width."""

    key: str
    label: str
    help: str
    raw: str
    raw_band: str
    removed: str
    removed_band: str
    chance: str
    chance_band: str
    warned: bool  # the guard flagged this number after removal


def _fmt(value, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _band(half: float) -> str:
    return f"±{half:.3f}" if math.isfinite(half) else ""


def band_caption(metrics: dict) -> str:
    """What the ± of the metrics table covers, from what the view resampled."""
    unit, n = metrics.get("band_over"), metrics.get("band_units")
    if unit == "prompt":
        return (
            f"± : the 95% band over prompts (the {n} prompts resampled, with Student's t for {n}): what "
            "another set of prompts would give"
        )
    if unit == "branch":
        return (
            f"± : the 95% band over this prompt's {n} branches only; another prompt may differ by more "
            "than it says"
        )
    return "± : the 95% band (resampled query tokens)"


def _chance(measure: Measure, raw: dict, removed: dict) -> tuple[str, str]:
    """(chance level, its band) as text, from the measure's Estimate (analysis.measures): of the raw view's
    result where it has the level, else the removed one's (a leak's band: the removed view's shuffles
    where it has them)."""
    if measure.chance == "field":
        result = raw if "chance" in raw else removed
    else:
        result = removed if "chance_hi" in removed else raw
    est = measure.estimate(result)
    kind = measure.chance
    shown = _fmt(est.chance, measure.signed) if kind == "field" else ("0.5" if kind == "half" else "0")
    band = est.chance_band
    keep = math.isfinite(band) and (band > 0 or kind != "field")  # a field's zero sd: no band shown
    return shown, (f"±{band:.3f}" if keep else "")


def metric_rows(raw: dict, removed: dict) -> list[MetricRow]:
    """Every shown measure (analysis.measures), with the held-out R2 after R2_pos; rows whose number
    neither view has are left out."""
    flagged = {w.metric for w in check(raw, removed)}
    rows = []
    for m in MEASURES.values():
        if not m.shown:
            continue
        r, a = raw.get(m.key) or {}, removed.get(m.key) or {}
        if not r and not a:
            continue
        chance, chance_band = _chance(m, r, a)
        er, ea = m.estimate(r), m.estimate(a)
        rows.append(
            MetricRow(
                m.key,
                m.label,
                m.help,
                _fmt(er.value, m.signed),
                _band(er.band),
                _fmt(ea.value, m.signed),
                _band(ea.band),
                chance,
                chance_band,
                m.key in flagged,
            )
        )
        rows += [
            MetricRow(
                x.row[0],
                x.row[1],
                x.help,
                _fmt(er.extra[x.field], x.signed),
                "",
                _fmt(ea.extra[x.field], x.signed),
                "",
                "0",
                "",
                False,
            )
            for x in m.extras
            if x.row
        ]
    return rows


def warnings(raw: dict, removed: dict) -> list[Warning]:
    """The guard's warnings: numbers the removal moved the wrong way beyond their band."""
    return check(raw, removed)


def layout_note(raw: dict, removed: dict) -> str:
    """A caution for each picture whose layout keeps few of its true neighbours (trustworthiness below
    TRUST_CAUTION beyond its band), or "". After a removal the residuals spread over many directions, so
    the right-hand picture is often the looser one: the numbers still hold, distances in it less."""
    loose = []
    right = "right-hand" + (f" ({removal_title(removed['removal'])})" if removed.get("removal") else "")
    for name, m in (("raw", raw), (right, removed)):
        e = estimate_in(m, "projection")
        value, sd = e.value, e.sd if math.isfinite(e.sd) else 0.0
        if math.isfinite(value) and value + Z * sd < TRUST_CAUTION:
            loose.append(f"the {name} picture {value:.3f} ±{Z * sd:.3f}")
    if not loose:
        return ""
    return (
        "Layout trustworthiness (1: every neighbour in the picture is a true one; 0.5: a random layout): "
        + " and ".join(loose)
        + f", below {TRUST_CAUTION}. Read the numbers above, not distances in that "
        "picture; fewer tokens (sidebar: Prompts) usually give a picture that keeps more of them."
    )


def profile_columns(columns: list[str]) -> dict[str, tuple[str, str]]:
    """(header, help) for each column of the per-layer table (views.layer_table.headers)."""
    return layer_table.headers(columns)


def profile_panels() -> list[tuple[str, ...]]:
    """The Layers tab's charts: (title, value, band, chance, chance band) columns per measure."""
    return layer_table.panels()


def share_text(x: float) -> str:
    """A share as a whole percent that never rounds a few to none or all: '<1%', '>99%'."""
    if 0 < x < 0.005:
        return "<1%"
    if 0.995 <= x < 1:
        return ">99%"
    return f"{x:.0%}"


def removal_note(removal: dict | None) -> str:
    """One line on how the removal was fitted (what its tests found is in the verdict): what went, one
    vector per level or cross-fitted, the weights against the estimate's own noise, its noise share."""
    if not removal or removal.get("method") == "none":
        return ""
    head = f"Right panel: {removal_title(removal)}."
    weights = removal.get("weights") or {}
    if weights:
        shares = ", ".join(f"{k} {w:.0%}" for k, w in weights.items())
        head += (
            " Each removed part is one vector per position (per token id), fitted on the whole reference, so "
            f"tokens at the same position keep their distances; removed at weight {shares} (mean over tokens), "
            "the rest left to balance what the estimate holds of the tokens themselves."
        )
        noise = removal.get("noise_share")
        if "position" in weights and isinstance(noise, (int, float)) and math.isfinite(noise):
            head += f" Estimate noise: {noise:.1%} of the removed position part."
    elif removal.get("crossfit"):
        head += (
            f" Cross-fitted over {removal.get('folds')} folds of {removal.get('fold_by')}s: the estimate "
            "removed from a token never saw its own "
            + str(removal.get("fold_by"))
            + "; subtracted at weight "
            f"{removal.get('weight', 1):.0%} (the out-of-fold shrinkage of the method's own estimate, not a share "
            f"of position: the verdict says how much of position's variance went) from "
            f"{share_text(removal.get('crossfit_share', 1.0))} of the tokens."
        )
    if removal.get("erased"):
        head += " Linear erasure: what a probe of position reads is projected out (no per-position offset)."
    low = removal.get("lowrank") or {}
    if low.get("weight"):
        head += (
            f" Position found only by the probe: a smooth rank-{low['rank']} component of position, fitted within "
            f"branches, subtracted at weight {low['weight']:.0%} (rank and weight chosen on held-out prompts)."
        )
    if removal.get("k") and removal.get("weight"):
        k = removal["k"]
        head += f" {k} direction{'s' if k != 1 else ''} projected out."
    if removal.get("fold_by") and removal.get("folds"):
        head += f" Tests held out by {removal['fold_by']} ({removal['folds']} folds)."
    return head
