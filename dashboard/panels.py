"""Main-area panels: metrics, text and tree, clusters, SQL, exports."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import TypeVar

import altair as alt
import polars as pl
import streamlit as st

from analysis.clusters import cluster_summary
from analysis.guard import check
from analysis.measures import MEASURES
from analysis.verdict import p_value_text, verdict
from store.errors import StoreBusy
from store.sandbox import SqlError, run_query

T = TypeVar("T")


def busy_note(path: str, key: str) -> None:
    """What every tab shows when an ingest holds the store longer than a read waits: a note and Retry."""
    st.warning(f"An ingest is committing to `{path}` right now; the dashboard shows what is committed "
               "once it releases the file (it does after every prompt).")
    st.button("Retry", key=f"retry_{key}")


def guarded(path: str, key: str, read: Callable[..., T], *args) -> T | None:
    """`read(*args)`, or None after a busy note when the store stayed locked for the whole lock wait."""
    try:
        return read(*args)
    except StoreBusy:
        busy_note(path, key)
        return None


def _fmt(value: float, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _with_band(m: dict, field: str, signed: bool) -> str:
    """'value ±half-width of its 95% band' (the band from bootstrap resamples of the query tokens)."""
    value = m.get(field, float("nan"))
    text = _fmt(value, signed)
    sd = m.get("sd")
    if text != "–" and sd is not None and not math.isnan(sd):
        text += f" ±{1.96 * sd:.3f}"
    return text


# The table's rows: every shown measure (analysis.measures), with the held-out R2 after R2_pos.
ROWS = [(m.label, m.key, m.field, m.signed, m.chance) for m in MEASURES.values() if m.shown]
ROWS.insert(1, ("R2_pos held-out (other prompts' means)", "r2_pos", "heldout", True, "zero"))


def metrics_table(raw: dict, res: dict) -> pl.DataFrame:
    """Rows: metric, raw, position removed, chance; each value with the half-width of its 95% band."""
    out = []
    for label, name, field, signed, chance_kind in ROWS:
        r, a = raw.get(name, {}), res.get(name, {})
        if chance_kind == "field":
            chance = _fmt(r.get("chance", a.get("chance", float("nan"))), signed)
        elif chance_kind == "leak":
            hi = a.get("chance_hi", r.get("chance_hi"))
            chance = "+0 ±" + f"{hi:.3f}" if hi is not None and not math.isnan(hi) else "0"
        elif chance_kind == "zero":
            chance = "0"
        else:
            chance = "0.5"
        band = field != "heldout"
        out.append({"metric": label, "raw": _with_band(r, field, signed) if band else _fmt(r.get(field), signed),
                    "removed": _with_band(a, field, signed) if band else _fmt(a.get(field), signed),
                    "chance": chance})
    return pl.DataFrame(out)


def removal_note(removal: dict | None) -> str:
    """One line on what the removal did: detected or not (p), how much, cross-fitted or not."""
    if not removal or removal.get("method") == "none":
        return ""
    what = removal.get("nuisance", "nuisance")
    p_text = p_value_text(removal)
    r2 = removal.get("r2_oof")
    r2_text = f", held-out R2 {r2:.3f} vs {removal.get('null_hi', float('nan')):.3f} by chance" \
        if r2 is not None and not math.isnan(r2) else ""
    if removal.get("forced"):
        head = f"Removal forced: the {what} component was removed whole ({p_text}{r2_text})."
    elif not removal.get("detected"):
        head = (f"No {what} component detected at this layer ({p_text}{r2_text}): nothing was removed, "
                "the right panel is the raw view.")
    else:
        head = (f"{what.capitalize()} component detected ({p_text}{r2_text}); "
                f"{removal.get('weight', 1):.0%} of its estimate removed")
        if removal.get("k"):
            head += f", {removal['k']} directions"
        head += "."
    if removal.get("crossfit"):
        head += (f" Cross-fitted over {removal.get('folds')} folds of {removal.get('fold_by')}s: the estimate "
                 "removed from a token never saw its own " + str(removal.get("fold_by")) + ".")
    if removal.get("note"):
        head += f" {removal['note'].capitalize()}."
    return head


def metrics_panel(raw: dict, res: dict) -> None:
    st.dataframe(metrics_table(raw, res), hide_index=True, width="stretch")
    st.caption("Leaks: 0 = chance (positions shuffled within branches), 1 = neighbours at the same position, "
               "below 0 = farther apart than chance. ± is the 95% band (resampled query tokens). "
               f"{res.get('n_tokens', 0)} tokens, {res.get('n_sinks_dropped', 0)} attention sinks left out.")
    note = removal_note(res.get("removal"))
    if note:
        st.info(note)


def text_panel(html_text: str, n_selected: int) -> None:
    st.caption(f"{n_selected} tokens selected (marked). Draw a box in either chart to select.")
    st.markdown(f'<div style="max-height:520px;overflow-y:auto">{html_text}</div>', unsafe_allow_html=True)


def cluster_controls(key: str = "clusters") -> tuple[str, int]:
    c1, c2 = st.columns(2)
    method = c1.radio("Clustering", ["kmeans", "hdbscan"], horizontal=True, key=f"{key}_method")
    k = c2.slider("k (k-means) / min cluster size (HDBSCAN)", 2, 40, 8, key=f"{key}_k")
    return method, k


def clusters_panel(keys: pl.DataFrame, labels) -> None:
    """Per cluster (on the position-removed latents): size, most frequent tokens, branches."""
    summary = cluster_summary(labels, keys["token_text"].to_list(), keys["branch_id"].to_numpy())
    st.dataframe(pl.DataFrame([{
        "cluster": "noise" if s["cluster"] == -1 else str(s["cluster"]), "tokens": s["size"],
        "most frequent tokens": ", ".join(f"{t!r}×{n}" for t, n in s["top_tokens"]),
        "branches (tokens)": ", ".join(f"{b} ({n})" for b, n in s["branches"][:8]),
    } for s in summary]), hide_index=True, width="stretch")


def sql_panel(store: str, run_id: str) -> None:
    """A read-only query box; a busy store gives the note and a Retry that runs the query again."""
    st.caption("Read-only: no writes, no file or network access; at most 10,000 rows, 64 MB of results, "
               "1 GB of memory and 10 s per query.")
    default = (f"SELECT branch_id, position, token_text, round(entropy, 2) AS entropy\n"
               f"FROM tokens WHERE run_id = '{run_id}' AND NOT is_prompt\nORDER BY entropy DESC LIMIT 20")
    sql = st.text_area("SQL", value=default, height=140, key="sql")
    if not (st.button("Run query", key="sql_run") or st.session_state.get("retry_sql")):
        return
    try:
        result = run_query(store, sql)
    except StoreBusy:
        busy_note(store, "sql")
        return
    except SqlError as exc:
        st.error(f"Query refused or failed: {exc}")
        return
    except Exception as exc:  # the store itself (missing, locked): a message, not a traceback
        st.error(str(exc))
        return
    frame = pl.from_arrow(result.table)
    note = {"rows": " (cut at 10,000 rows)", "bytes": " (cut at 64 MB of results)"}.get(result.cut_by, "")
    st.caption(f"{len(frame)} rows in {result.seconds:.2f} s{note}")
    st.dataframe(frame, width="stretch")
    downloads(frame, "query")


def csv_columns(frame: pl.DataFrame) -> tuple[pl.DataFrame, list[str]]:
    """The frame without the columns CSV cannot hold (lists, arrays, structs, binary), and their names."""
    nested = [c for c, t in frame.schema.items()
              if isinstance(t, (pl.List, pl.Array, pl.Struct, pl.Object)) or t == pl.Binary]
    return frame.drop(nested), nested


def downloads(frame: pl.DataFrame, name: str) -> None:
    c1, c2 = st.columns(2)
    flat, nested = csv_columns(frame)
    c1.download_button("CSV", flat.write_csv(), f"{name}.csv", "text/csv", key=f"{name}_csv")
    if nested:
        c1.caption(f"CSV leaves out {', '.join(nested)} (nested or binary); Parquet keeps every column.")
    buf = io.BytesIO()
    frame.write_parquet(buf)
    c2.download_button("Parquet", buf.getvalue(), f"{name}.parquet", "application/octet-stream", key=f"{name}_pq")


def chart_exports(chart: alt.TopLevelMixin, name: str) -> None:
    """PNG and SVG of the chart, rendered on request (vl-convert)."""
    if not st.button("Prepare PNG / SVG", key=f"{name}_render"):
        return
    import vl_convert as vlc

    spec = chart.to_json()
    c1, c2 = st.columns(2)
    c1.download_button("PNG", vlc.vegalite_to_png(spec, scale=2), f"{name}.png", "image/png", key=f"{name}_png")
    c2.download_button("SVG", vlc.vegalite_to_svg(spec), f"{name}.svg", "image/svg+xml", key=f"{name}_svg")


def verdict_panel(raw: dict, res: dict) -> None:
    """The verdict on top of the view, and a red line for each number the removal made worse."""
    st.markdown(verdict(raw, res))
    for warning in check(raw, res):
        st.error(f"Removal made this worse: {warning.message}. Fit on more tokens (sidebar: Fit on), use a "
                 "smoother method, or keep the raw view.")


def divergence_panel(found: dict) -> None:
    """Where branches go apart: the chart over offsets since the fork, and the per-prompt table."""
    import dashboard.charts as charts

    st.caption("Distance between two related branches (a fork and its parent, or two siblings) at the same "
               "position after they part, over the distance between tokens of unrelated prompts at that "
               "position: 1 = as far apart as unrelated prompts. Bands: 95%, resampling branches. Removing "
               "position cannot change distances at matched positions; removing token identity can.")
    if not found["has_baseline"]:
        st.info(found["note"] or "One prompt only: no unrelated prompts to compare with. Select two or more.")
        return
    st.altair_chart(charts.divergence(found["by_offset"]), width="stretch")
    st.caption("Per prompt:")
    st.altair_chart(charts.divergence_per_prompt(found["by_prompt_offset"]))
    table = found["by_prompt"].pivot(on="view", index="prompt", values="median")
    st.dataframe(table, hide_index=True, width="stretch")
