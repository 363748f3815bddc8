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
    for branch, texts in lineage.group_by("branch_id", maintain_order=True).agg(pl.col("token_text")).iter_rows():
        seqs[int(branch)] = list(texts)
    return seqs


def context_windows(points: pl.DataFrame, lineage: pl.DataFrame, before: int = 8, after: int = 4) -> list[str]:
    """For each point (branch_id, position), its surrounding text on its branch: `...before [token] after...`."""
    seqs = _sequences(lineage)
    out = []
    for branch, pos in points.select("branch_id", "position").iter_rows():
        seq = seqs.get(int(branch), [])
        left = "".join(seq[max(0, pos - before):pos])
        right = "".join(seq[pos + 1:pos + 1 + after])
        token = seq[pos] if pos < len(seq) else ""
        out.append(printable(f"…{left}[{token}]{right}…"))
    return out


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


def branches_html(branches: pl.DataFrame, lineage: pl.DataFrame, highlight: set[tuple[int, int]]) -> str:
    """The tree of each prompt as an indented list: each branch's own tokens, fork points named, the
    highlighted (branch_id, position) tokens marked."""
    seqs = _sequences(lineage)
    info = {b: (p, f, k) for b, p, f, k in branches.select("branch_id", "prompt_id", "fork_position", "kind").iter_rows()}
    lines = []
    for branch, depth in tree_order(branches):
        prompt, fork, kind = info[branch]
        seq = seqs.get(branch, [])
        own = []
        for pos in range(fork, len(seq)):
            tok = html.escape(printable(seq[pos]))
            own.append(f"<mark>{tok}</mark>" if (branch, pos) in highlight else tok)
        if kind == "prompt":
            head = f"<b>prompt {prompt}</b> (branch {branch})"
        else:
            before = html.escape(printable("".join(seq[max(0, fork - 3):fork])))
            head = f"↳ <b>branch {branch}</b> {kind}, from position {fork} after “{before}”"
        pad = 1.4 * depth
        lines.append(f'<div style="margin-left:{pad}em;margin-bottom:0.35em">{head}: '
                     f'<span style="font-family:monospace">{"".join(own)}</span></div>')
    return "\n".join(lines)
