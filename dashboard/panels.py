"""Main-area panels (Streamlit): verdict, metrics, branch text and picking, clusters, layers, SQL, exports."""

from __future__ import annotations

import html
import io
import json
from collections.abc import Callable
from typing import TypeVar

import altair as alt
import polars as pl
import streamlit as st

from dashboard import charts
from views.clusters import Clusters
from views.errors import SqlError, StoreBusy, StoreError
from views.present import (
    band_caption,
    headline_and_details,
    layout_note,
    metric_rows,
    profile_columns,
    profile_panels,
    removal_note,
    warnings,
)
from views.sql import LIMITS, displayable, query

T = TypeVar("T")


PAGE_CSS = """<style>
[data-testid="stMainBlockContainer"] {padding-top: 2.5rem;}
</style>"""  # Streamlit's 6rem above the title pushed the charts below a 768 px screen's first view


def page_style() -> None:
    """The page's own CSS (written once per run, before anything else)."""
    st.markdown(PAGE_CSS, unsafe_allow_html=True)


def busy_note(path: str, key: str) -> None:
    """What every tab shows when an ingest holds the store longer than a read waits: a note and Retry."""
    st.warning(
        f"An ingest is committing to `{path}` right now; the dashboard shows what is committed "
        "once it releases the file (it does after every prompt)."
    )
    st.button("Retry", key=f"retry_{key}")


def guarded(path: str, key: str, read: Callable[..., T], *args) -> T | None:
    """`read(*args)`, or None after a busy note when the store stayed locked for the whole lock wait."""
    try:
        return read(*args)
    except StoreBusy:
        busy_note(path, key)
        return None


TABLE_CSS = """
<style>
.bl-metrics {width:100%; border-collapse:collapse; font-size:0.86rem; table-layout:auto}
.bl-metrics th, .bl-metrics td {padding:0.25rem 0.45rem; border-bottom:1px solid rgba(128,128,128,0.25);
  text-align:right; white-space:nowrap}
.bl-metrics th:first-child, .bl-metrics td:first-child {text-align:left; white-space:normal}
.bl-metrics td.band {color:rgba(128,128,128,0.95); padding-left:0}
.bl-metrics tr.warned td {background:rgba(255,75,75,0.12)}
.bl-metrics abbr {text-decoration:none; cursor:help; display:inline-block; width:1.1em; height:1.1em;
  line-height:1.05em; border:1px solid rgba(128,128,128,0.7); border-radius:50%; text-align:center;
  font-size:0.72rem; margin-left:0.25em; color:rgba(128,128,128,1)}
</style>
"""


def metrics_html(raw: dict, res: dict) -> str:
    """The metrics as an HTML table that fits a laptop screen: each number beside its band, chance and
    its band always visible, the metric's meaning on hover (?)."""
    head = "<tr><th>metric</th><th>raw</th><th></th><th>removed</th><th></th><th>chance</th><th></th></tr>"
    body = []
    for r in metric_rows(raw, res):
        cls = ' class="warned"' if r.warned else ""
        label = html.escape(r.label)
        if r.help:
            label += f'<abbr title="{html.escape(r.help)}">?</abbr>'
        cells = "".join(
            f"<td>{html.escape(v)}</td>" if i % 2 == 0 else f'<td class="band">{html.escape(v)}</td>'
            for i, v in enumerate((r.raw, r.raw_band, r.removed, r.removed_band, r.chance, r.chance_band))
        )
        body.append(f"<tr{cls}><td>{label}</td>{cells}</tr>")
    return f'{TABLE_CSS}<table class="bl-metrics">{head}{"".join(body)}</table>'


def metrics_panel(raw: dict, res: dict) -> None:
    st.markdown(metrics_html(raw, res), unsafe_allow_html=True)
    with st.expander(
        "What each number means"
    ):  # the ? tooltips are mouse-only; this is for keyboards and reading
        st.markdown("\n".join(f"- **{r.label}**: {r.help}" for r in metric_rows(raw, res) if r.help))
    st.caption(
        f"{band_caption(res)}. Leaks: 0 = chance (positions shuffled within "
        "branches), 1 = neighbours at the same position, below 0 = farther apart in position than chance "
        "(after a removal: tokens at the same position pushed apart). Hover ? for what each number "
        f"means. {res.get('n_tokens', 0)} tokens, {res.get('n_sinks_dropped', 0)} attention sinks left out."
    )
    note = removal_note(res.get("removal"))
    if note:
        st.info(note)
    loose = layout_note(raw, res)
    if loose:
        st.warning(loose)


def verdict_panel(raw: dict, res: dict) -> None:
    """The verdict on top of the view (what the layer holds and what the removal changed; the tests
    behind it folded below, so the charts start on the first screen), and a red line for each number the
    removal made worse."""
    head, details = headline_and_details(raw, res)
    st.markdown(head)
    if details:
        with st.expander("Why: the factors compared, and the test behind each decision", key="bl-why"):
            st.markdown(details)
    for warning in warnings(raw, res):
        if warning.kind.endswith("unmasked"):
            st.warning(f"{warning.message}.")
        else:
            st.error(
                f"Removal made this worse: {warning.message}. Fit on more tokens (sidebar: Fit on), use a "
                "smoother method, or keep the raw view."
            )


def text_panel(html_text: str, n_selected: int) -> None:
    jump = ' · <a href="#bl-first-selected">jump to the first selected token</a>' if n_selected else ""
    st.markdown(
        f"<small>{n_selected} tokens selected (marked). Draw a box or click a point in either chart, "
        f"or pick branches and tokens above, to select.{jump}</small>",
        unsafe_allow_html=True,
    )
    st.markdown(f'<div style="max-height:520px;overflow-y:auto">{html_text}</div>', unsafe_allow_html=True)


def branch_picker(table: pl.DataFrame, key: str) -> set[int]:
    """The branches as a table with their text; the rows a user selects are followed in both charts."""
    event = st.dataframe(
        table,
        hide_index=True,
        width="stretch",
        height=min(38 + 35 * len(table), 280),
        on_select="rerun",
        selection_mode="multi-row",
        key=key,
        column_config={"text": st.column_config.TextColumn("text (own tokens)", width="large")},
    )
    rows = event.selection.rows if event and event.selection else []
    return {int(table["branch"][i]) for i in rows}


def token_picker(tokens: pl.DataFrame, branch: int, key: str) -> set[tuple[int, int]]:
    """A followed branch's tokens as chips: the ones clicked are lit in both charts and the text."""
    chosen = st.pills(
        f"Tokens of branch {branch} (click to light them in both charts)",
        tokens["position"].to_list(),
        selection_mode="multi",
        key=key,
        format_func=dict(zip(tokens["position"].to_list(), tokens["token_text"].to_list())).get,
    )
    return {(branch, int(p)) for p in chosen or []}


def cluster_controls(key: str = "clusters") -> tuple[str, int]:
    c1, c2 = st.columns(2)
    method = c1.radio("Clustering", ["kmeans", "hdbscan"], horizontal=True, key=f"{key}_method")
    k = c2.slider("k (k-means) / min cluster size (HDBSCAN)", 2, 40, 8, key=f"{key}_k")
    return method, k


def clusters_panel(found: Clusters) -> None:
    """Per cluster (on the position-removed latents): what it holds, so a cluster of one token, of a span
    of positions or of one prompt reads as such; a warning when one cluster holds most tokens."""
    big = found.dominant
    if big is not None:
        st.warning(
            f"One cluster holds {big['share']:.0%} of the tokens: these settings do not split this layer "
            "usefully. Try k-means, a smaller minimum cluster size, or another layer."
        )
    total = max(sum(s["size"] for s in found.summary), 1)
    rows = []
    for s in found.summary:
        med, lo, hi = s.get("position", (float("nan"),) * 3)
        rows.append(
            {
                "cluster": "noise" if s["cluster"] == -1 else str(s["cluster"]),
                "tokens": s["size"],
                "share": s["size"] / total,
                "positions (median, 10-90%)": f"{med:.0f} ({lo:.0f}-{hi:.0f})",
                "prompts (tokens)": ", ".join(f"{p} ({n})" for p, n in s.get("prompts", [])[:6]),
                "most frequent tokens": ", ".join(f"{t!r}×{n}" for t, n in s["top_tokens"]),
                "branches": len(s["branches"]),
            }
        )
    st.dataframe(
        pl.DataFrame(rows),
        hide_index=True,
        width="stretch",
        column_config={
            "cluster": st.column_config.Column("cluster", pinned=True),
            "share": st.column_config.ProgressColumn("share", format="percent", min_value=0, max_value=1),
        },
    )
    st.caption("Colour the charts by cluster (sidebar: Colour by) to see where each one lies.")


PINNED = ("layer", "method")  # the per-layer table's columns that say which row it is


def layers_panel(profile: pl.DataFrame) -> None:
    """Four numbers per layer, raw and removed, each against its chance band; the table below."""
    cols = st.columns(2)
    for i, (title, value, band, chance, chance_band) in enumerate(profile_panels()):
        with cols[i % 2]:
            st.altair_chart(
                charts.unchecked(charts.profile_panel(profile, value, band, chance, chance_band, title)),
                width="stretch",
            )
    st.caption(
        "Lines: raw and after removal, with their 95% bands; grey: the chance band. Which layer is least "
        "tainted by position: compare raw with the removed line and with chance. Learned absolute positions "
        "(GPT-2) are strongest in early layers; RoPE models have none at layer 0 (token embeddings). "
        "A probe well above chance with R2_pos near chance: position is decodable but small."
    )
    # a measure without a chance band (or a number no layer has) would be a column of blanks
    empty = [
        c
        for c in profile.columns
        if profile[c].dtype.is_float() and profile[c].fill_nan(None).null_count() == len(profile)
    ]
    profile = profile.drop(empty)
    # which layer and view a row is stay in sight while the measures scroll sideways (a 1366 px window
    # shows a few of its columns at a time)
    config = {
        c: st.column_config.Column(label, help=text, pinned=c in PINNED)
        for c, (label, text) in profile_columns(profile.columns).items()
    }
    st.dataframe(profile, hide_index=True, width="stretch", column_config=config)
    st.caption("Scroll sideways for every measure: the layer and view columns stay in place.")


def sql_panel(store: str, run_id: str) -> None:
    """A read-only query box; a busy store gives the note and a Retry that runs the query again. The last
    result stays on screen through reruns (another widget, a download) until the query or the store
    changes; the example query follows the store and run shown."""
    st.caption(LIMITS)
    state = st.session_state
    default = (
        f"SELECT branch_id, position, token_text, round(entropy, 2) AS entropy\n"
        f"FROM tokens WHERE run_id = '{run_id}' AND NOT is_prompt\nORDER BY entropy DESC LIMIT 20"
    )
    if state.get("sql_default") != default:  # another store or run: its own example, not the last one's
        if state.get("sql") in (None, state.get("sql_default")):
            state["sql"] = default
        state["sql_default"] = default
    sql = st.text_area("SQL", height=140, key="sql")
    if st.button("Run query", key="sql_run") or state.get("retry_sql"):
        try:
            result = query(store, sql)
        except StoreBusy:
            busy_note(store, "sql")
            return
        except SqlError as exc:
            st.error(f"Query refused or failed: {exc}")
            return
        except StoreError as exc:  # the store itself (missing, another schema): a message, not a traceback
            st.error(str(exc))
            return
        state["sql_result"] = (store, sql, result)
    last = state.get("sql_result")
    if not last or last[0] != store or last[1] != sql:
        return
    result = last[2]
    table, changes = displayable(result.table)
    frame = pl.from_arrow(table)
    note = {"rows": " (cut at 10,000 rows)", "bytes": " (cut at 64 MB of results)"}.get(result.cut_by, "")
    empty = f" (the run shown is '{run_id}': check the run id a WHERE clause names)" if not len(frame) else ""
    st.caption(
        f"{len(frame)} rows in {result.seconds:.2f} s{note}{empty}" + "".join(f"; {c}" for c in changes)
    )
    st.dataframe(frame, width="stretch")
    downloads(frame, "query")


def csv_columns(frame: pl.DataFrame) -> tuple[pl.DataFrame, list[str]]:
    """The frame without the columns CSV cannot hold (lists, arrays, structs, binary), and their names."""
    nested = [
        c
        for c, t in frame.schema.items()
        if isinstance(t, (pl.List, pl.Array, pl.Struct, pl.Object)) or t == pl.Binary
    ]
    return frame.drop(nested), nested


def downloads(frame: pl.DataFrame, name: str) -> None:
    c1, c2 = st.columns(2)
    flat, nested = csv_columns(frame)
    if flat.width:
        c1.download_button(
            "CSV", flat.write_csv(), f"{name}.csv", "text/csv", key=f"{name}_csv", on_click="ignore"
        )
    if nested:
        c1.caption(
            f"CSV {'leaves out' if flat.width else 'cannot hold'} {', '.join(nested)} (nested or binary); "
            "Parquet keeps every column."
        )
    buf = io.BytesIO()
    frame.write_parquet(buf)
    c2.download_button(
        "Parquet",
        buf.getvalue(),
        f"{name}.parquet",
        "application/octet-stream",
        key=f"{name}_pq",
        on_click="ignore",
    )


def export_spec(chart: alt.TopLevelMixin, title: list[str]) -> dict:
    """The chart as a Vega-Lite spec for a file: a fixed width, and a title that says what it shows (the
    first line) and where it comes from (the others: store, run, model, layer, method)."""
    spec = chart.to_dict()
    _fixed_width(spec, 560)
    if title:
        spec["title"] = {"text": title[0], "subtitle": title[1:], "anchor": "start"}
    return spec


def chart_exports(build: Callable[[], alt.TopLevelMixin], name: str, title: list[str] | None = None) -> None:
    """PNG and SVG of the chart `build()` returns, titled, built and rendered on request (vl-convert); the
    buttons stay after a download (they do not rerun the page)."""
    state = st.session_state
    if st.button("Prepare PNG / SVG", key=f"{name}_render"):
        state["export_ready"] = name
    if state.get("export_ready") != name:
        return
    png, svg = _rendered(json.dumps(export_spec(build(), title or []), sort_keys=True))
    c1, c2 = st.columns(2)
    c1.download_button("PNG", png, f"{name}.png", "image/png", key=f"{name}_png", on_click="ignore")
    c2.download_button("SVG", svg, f"{name}.svg", "image/svg+xml", key=f"{name}_svg", on_click="ignore")


@st.cache_data(show_spinner=False, max_entries=4)
def _rendered(spec_json: str) -> tuple[bytes, str]:
    """PNG (2x) and SVG of a spec, rendered once per spec: the buttons stay through reruns (a box, a click)
    without vl-convert running again."""
    import vl_convert as vlc

    spec = json.loads(spec_json)
    return vlc.vegalite_to_png(spec, scale=2), vlc.vegalite_to_svg(spec)


def _fixed_width(spec: dict, width: int) -> None:
    """'container' widths (which need a page) replaced by a fixed one, in place."""
    if spec.get("width") == "container":
        spec["width"] = width
    for part in ("hconcat", "vconcat", "layer"):
        for sub in spec.get(part, []):
            _fixed_width(sub, width)


def divergence_panel(found: dict) -> None:
    """Where branches go apart: the chart over offsets since the fork, and the per-prompt table."""
    st.caption(
        "Distance between two related branches (a fork and its parent, or two siblings) at the same "
        "position after they part, over the distance between tokens of unrelated prompts at that "
        "position: 1 = as far apart as unrelated prompts. Bands: 95%, resampling branches. Removing "
        "position cannot change distances at matched positions; removing token identity can."
    )
    if not found["has_baseline"]:
        st.info(found["note"] or "One prompt only: no unrelated prompts to compare with. Select two or more.")
        return
    st.altair_chart(charts.unchecked(charts.divergence(found["by_offset"])), width="stretch")
    st.caption("Per prompt:")
    st.altair_chart(charts.unchecked(charts.divergence_per_prompt(found["by_prompt_offset"])))
    st.dataframe(per_prompt_table(found["by_prompt"]), hide_index=True, width="stretch")


def per_prompt_table(by_prompt: pl.DataFrame) -> pl.DataFrame:
    """Per prompt, the median distance ratio raw and removed, named as such, at one precision (3 decimals)."""
    table = by_prompt.pivot(on="view", index="prompt", values="median")
    return table.with_columns(pl.col(c).round(3) for c in table.columns if c != "prompt").rename(
        {c: f"median ratio, {c}" for c in table.columns if c != "prompt"}
    )
