"""Text for manual inspection: context windows around tokens, branches as highlighted text, the tree."""

from __future__ import annotations

import html
import unicodedata

import polars as pl


def printable(text: str) -> str:
    """Control characters as visible escapes (⏎ for newlines): raw bytes that random or byte-level models
    emit otherwise break SVG/PNG export (not valid XML) and hide in tooltips."""
    out = []
    for ch in text:
        if ch == "\n":
            out.append("⏎")
        elif ch == "\t":
            out.append("⇥")
        elif unicodedata.category(ch) in ("Cc", "Cs", "Co", "Cn"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def _sequences(lineage: pl.DataFrame) -> dict[int, list[str]]:
    """branch_id -> its full token sequence (index = position)."""
    seqs: dict[int, list[str]] = {}
    for branch, texts in (
        lineage.group_by("branch_id", maintain_order=True).agg(pl.col("token_text")).iter_rows()
    ):
        seqs[int(branch)] = list(texts)
    return seqs


def context_windows(
    points: pl.DataFrame, lineage: pl.DataFrame, before: int = 8, after: int = 4
) -> list[str]:
    """For each point (branch_id, position), its surrounding text on its branch: `...before [token] after...`
    (a branch's lineage rows in order are its positions 0, 1, ...)."""
    return contexts(points, lineage, before, after).to_list()


def contexts(points: pl.DataFrame, lineage: pl.DataFrame, before: int = 8, after: int = 4) -> pl.Series:
    """context_windows as a Series, in columns (no loop over points): 10^6 points in about a second, where
    the loop took 17 s and ran on every rerun of the app."""
    idx = pl.int_range(pl.len()).over("branch_id")
    line = lineage.select(
        pl.col("branch_id").cast(pl.Int64),
        idx.cast(pl.Int64).alias("position"),
        printable_column("token_text"),
    )
    keys = points.select(pl.col("branch_id").cast(pl.Int64), pl.col("position").cast(pl.Int64))
    # a point past its branch's text still shows the text before it: pad each branch with empty tokens
    need = keys.group_by("branch_id").agg((pl.col("position").max() + 1).alias("need"))
    have = line.group_by("branch_id").agg(pl.len().cast(pl.Int64).alias("have"))
    pad = (
        need.join(have, on="branch_id", how="left")
        .with_columns(pl.col("have").fill_null(0))
        .filter(pl.col("need") > pl.col("have"))
        .select("branch_id", pl.int_ranges("have", "need").alias("position"))
        .explode("position")
        .with_columns(pl.col("position").cast(pl.Int64), pl.lit("").alias("token_text"))
    )
    line = pl.concat([line, pad])
    tok = pl.col("token_text")
    left = [tok.shift(k).over("branch_id").fill_null("") for k in range(before, 0, -1)]
    right = [tok.shift(-k).over("branch_id").fill_null("") for k in range(1, after + 1)]
    windows = line.select(
        "branch_id",
        "position",
        pl.concat_str([pl.lit("…"), *left, pl.lit("["), tok, pl.lit("]"), *right, pl.lit("…")]).alias(
            "context"
        ),
    )
    found = keys.join(windows, on=["branch_id", "position"], how="left", maintain_order="left")
    return found["context"].fill_null("…[]…")


def printable_column(name: str) -> pl.Expr:
    """printable() of a string column, computed once per distinct value."""
    return pl.col(name).map_batches(_printable_series, return_dtype=pl.String)


def _printable_series(values: pl.Series) -> pl.Series:
    distinct = values.unique().drop_nulls()
    mapping = dict(zip(distinct.to_list(), (printable(v) for v in distinct.to_list())))
    return values.replace_strict(mapping, default=None, return_dtype=pl.String)


def tree_order(branches: pl.DataFrame) -> list[tuple[int, int]]:
    """(branch_id, depth) in depth-first order, children by fork position then id."""
    kids: dict[int | None, list[tuple[int, int]]] = {}
    for b, parent, fork in branches.select("branch_id", "parent_branch_id", "fork_position").iter_rows():
        kids.setdefault(parent, []).append((fork, b))
    order: list[tuple[int, int]] = []

    def walk(parent: int | None, depth: int) -> None:
        for _, b in sorted(kids.get(parent, [])):
            order.append((b, depth))
            walk(b, depth + 1)

    walk(None, 0)
    return order


def branches_html(
    branches: pl.DataFrame,
    lineage: pl.DataFrame,
    highlight: set[tuple[int, int]],
    only: set[int] | None = None,
) -> str:
    """The tree of each prompt as an indented list: each branch's own tokens, fork points named, the
    highlighted (branch_id, position) tokens marked (the first carries the id `bl-first-selected`, for a
    jump link). With `only`, just those branches."""
    seqs = _sequences(lineage)
    info = {
        b: (p, f, k)
        for b, p, f, k in branches.select("branch_id", "prompt_id", "fork_position", "kind").iter_rows()
    }
    lines = []
    first = True
    for branch, depth in tree_order(branches):
        if only is not None and branch not in only:
            continue
        prompt, fork, kind = info[branch]
        seq = seqs.get(branch, [])
        own = []
        for pos in range(fork, len(seq)):
            tok = html.escape(printable(seq[pos]))
            if (branch, pos) in highlight:
                own.append(f'<mark id="bl-first-selected">{tok}</mark>' if first else f"<mark>{tok}</mark>")
                first = False
            else:
                own.append(tok)
        if kind == "prompt":
            head = f"<b>prompt {prompt}</b> (branch {branch})"
        else:
            before = html.escape(printable("".join(seq[max(0, fork - 3) : fork])))
            head = f"↳ <b>branch {branch}</b> {kind}, from position {fork} after “{before}”"
        pad = 1.4 * depth
        lines.append(
            f'<div style="margin-left:{pad}em;margin-bottom:0.35em">{head}: '
            f'<span style="font-family:monospace">{"".join(own)}</span></div>'
        )
    return "\n".join(lines)


def branch_table(branches: pl.DataFrame, lineage: pl.DataFrame, chars: int = 120) -> pl.DataFrame:
    """One row per branch in tree order: branch, prompt, kind, fork position, own tokens and the start
    of their text (for picking branches by what they say)."""
    seqs = _sequences(lineage)
    info = {
        b: (p, f, k)
        for b, p, f, k in branches.select("branch_id", "prompt_id", "fork_position", "kind").iter_rows()
    }
    rows = []
    for branch, _ in tree_order(branches):
        prompt, fork, kind = info[branch]
        seq = seqs.get(branch, [])
        rows.append(
            (branch, prompt, kind, fork, max(len(seq) - fork, 0), printable("".join(seq[fork:]))[:chars])
        )
    return pl.DataFrame(
        rows,
        schema={
            "branch": pl.Int64,
            "prompt": pl.Int64,
            "kind": pl.String,
            "from position": pl.Int64,
            "tokens": pl.Int64,
            "text": pl.String,
        },
        orient="row",
    )


def branch_tokens(lineage: pl.DataFrame, branch: int, start: int) -> pl.DataFrame:
    """A branch's own tokens (from its fork position on): position, printable token_text."""
    rows = lineage.filter((pl.col("branch_id") == branch) & (pl.col("position") >= start)).sort("position")
    return rows.select("position", pl.col("token_text").map_elements(printable, return_dtype=pl.String))
