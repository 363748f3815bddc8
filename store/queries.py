"""Read queries: everything the app, analysis scripts and tests read from a store."""

from __future__ import annotations

import json
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa

from store.schema import first_row


def vectors_to_numpy(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """A FLOAT[d] Arrow column as a (n, d) float32 array."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    if not chunks:
        return np.empty((0, dim), np.float32)
    flat = [c.flatten().to_numpy(zero_copy_only=False) for c in chunks]
    return np.concatenate(flat).astype(np.float32, copy=False).reshape(-1, dim)


def list_runs(con: duckdb.DuckDBPyConnection) -> pl.DataFrame:
    """All runs, newest first, without their config."""
    return pl.from_arrow(
        con.sql(
            "SELECT run_id, model, created_at, status, completed_at, n_layers, d_model, pe_type, device, dtype "
            "FROM runs ORDER BY created_at DESC"
        ).to_arrow_table()
    )


def run_config(con: duckdb.DuckDBPyConnection, run_id: str) -> dict[str, Any]:
    row = first_row(con, "SELECT config FROM runs WHERE run_id = ?", [run_id])
    if row is None:
        raise KeyError(run_id)
    return json.loads(row[0])


def run_summary(con: duckdb.DuckDBPyConnection, run_id: str) -> dict[str, Any]:
    """Counts for one run: prompts, branches, tokens (all / generated), latent vectors, layers, status."""
    row = first_row(
        con,
        """
        SELECT
            (SELECT status FROM runs WHERE run_id = $r),
            (SELECT count(*) FROM prompts WHERE run_id = $r),
            (SELECT count(*) FROM branches WHERE run_id = $r),
            (SELECT count(*) FROM tokens WHERE run_id = $r),
            (SELECT count(*) FROM tokens WHERE run_id = $r AND NOT is_prompt),
            (SELECT count(*) FROM latents WHERE run_id = $r),
            (SELECT list(DISTINCT layer ORDER BY layer) FROM latents WHERE run_id = $r)
        """,
        {"r": run_id},
    )
    keys = ("status", "prompts", "branches", "tokens", "generated_tokens", "latents", "layers")
    summary = dict(zip(keys, row))
    summary["layers"] = summary["layers"] or []
    return summary


def branches(con: duckdb.DuckDBPyConnection, run_id: str) -> pl.DataFrame:
    """The run's branch table, ordered by branch id."""
    return pl.from_arrow(
        con.sql(
            "SELECT * EXCLUDE (run_id) FROM branches WHERE run_id = ? ORDER BY branch_id", params=[run_id]
        ).to_arrow_table()
    )


def branch_sequence(con: duckdb.DuckDBPyConnection, run_id: str, branch_id: int) -> pl.DataFrame:
    """A branch's full token sequence, shared prefix included, ordered by position."""
    return pl.from_arrow(
        con.sql(
            "SELECT * EXCLUDE (run_id, branch_id) FROM branch_tokens WHERE run_id = ? AND branch_id = ? "
            "ORDER BY position",
            params=[run_id, branch_id],
        ).to_arrow_table()
    )


def branch_vectors(
    con: duckdb.DuckDBPyConnection, run_id: str, branch_id: int, layer: int, variant: str = "normal"
) -> np.ndarray:
    """A branch's latents over its full sequence (prefix included), ordered by position: (n, d)."""
    table = con.sql(
        "SELECT vec FROM branch_latents WHERE run_id = ? AND branch_id = ? AND layer = ? AND variant = ? "
        "ORDER BY position",
        params=[run_id, branch_id, layer, variant],
    ).to_arrow_table()
    return vectors_to_numpy(table["vec"], vector_dim(con))


def layer_vectors(
    con: duckdb.DuckDBPyConnection, run_id: str, layer: int, variant: str = "normal"
) -> tuple[pl.DataFrame, np.ndarray]:
    """Every stored latent of one layer (each token once): (branch_id, position) rows and an (n, d) array,
    ordered by (branch_id, position)."""
    branch_ids, positions, vectors = _layer_scan(con, run_id, layer, variant)
    order = _sort_order(branch_ids, positions)
    if order is not None:
        branch_ids, positions, vectors = branch_ids[order], positions[order], vectors[order]
    return pl.DataFrame({"branch_id": branch_ids, "position": positions}), vectors


def _layer_scan(
    con: duckdb.DuckDBPyConnection,
    run_id: str,
    layer: int,
    variant: str,
    prompt_ids: list[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One layer's (branch_id, position, vec) rows in storage order.

    The vectors are never sorted or joined inside DuckDB: a sort or hash join carries every 2.5 KB row
    through its buffers and reads at a quarter of the speed of this plain filtered scan (bench/store_read.py).
    """
    where, params = "", {}
    if prompt_ids is not None:
        where = (
            " AND branch_id IN (SELECT branch_id FROM branches WHERE run_id = $run AND prompt_id IN "
            "(SELECT unnest($prompts)))"
        )
        params["prompts"] = [int(p) for p in prompt_ids]
    table = con.sql(
        f"SELECT branch_id, position, vec FROM latents WHERE run_id = $run AND layer = $layer "
        f"AND variant = $variant{where}",
        params={"run": run_id, "layer": layer, "variant": variant, **params},
    ).to_arrow_table()
    return (
        table["branch_id"].to_numpy().astype(np.int32, copy=False),
        table["position"].to_numpy().astype(np.int32, copy=False),
        vectors_to_numpy(table["vec"], vector_dim(con)),
    )


def _keys(branch_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    return (branch_ids.astype(np.int64) << 32) | positions.astype(np.int64)


def _sort_order(branch_ids: np.ndarray, positions: np.ndarray) -> np.ndarray | None:
    """The permutation that sorts rows by (branch_id, position), or None when they already are."""
    keys = _keys(branch_ids, positions)
    if keys.size < 2 or bool(np.all(keys[1:] > keys[:-1])):
        return None
    return np.argsort(keys, kind="stable")


def vector_dim(con: duckdb.DuckDBPyConnection) -> int:
    """The width of the stored latents (the model's hidden size)."""
    return int(first_row(con, "SELECT value FROM meta WHERE key = 'vector_dim'")[0])


def _token_filter(prompt_ids: list[int] | None, generated_only: bool) -> tuple[str, dict[str, Any]]:
    clauses, params = [], {}
    if prompt_ids is not None:
        clauses.append("b.prompt_id IN (SELECT unnest($prompts))")
        params["prompts"] = [int(p) for p in prompt_ids]
    if generated_only:
        clauses.append("NOT t.is_prompt")
    return "".join(f" AND {c}" for c in clauses), params


def token_rows(
    con: duckdb.DuckDBPyConnection,
    run_id: str,
    layer: int,
    variant: str = "normal",
    prompt_ids: list[int] | None = None,
    generated_only: bool = False,
    with_vectors: bool = True,
) -> tuple[pl.DataFrame, np.ndarray | None]:
    """The stored tokens of one layer (each once) with their labels, and their latents as (n, d).

    Columns: branch_id, prompt_id, position, depth, parent_branch_id, token_id, token_text, is_prompt,
    logprob, entropy. Rows ordered by (branch_id, position). Optionally only some prompts, or only
    generated tokens; with_vectors=False skips the (large) vectors.
    """
    where, params = _token_filter(prompt_ids, generated_only)
    table = con.sql(
        f"""
        SELECT l.branch_id, b.prompt_id, l.position, b.depth, b.parent_branch_id, t.token_id, t.token_text,
               t.is_prompt, t.logprob, t.entropy
        FROM latents l
        JOIN tokens t USING (run_id, branch_id, position)
        JOIN branches b USING (run_id, branch_id)
        WHERE l.run_id = $run AND l.layer = $layer AND l.variant = $variant{where}
        ORDER BY l.branch_id, l.position
        """,
        params={"run": run_id, "layer": layer, "variant": variant, **params},
    ).to_arrow_table()
    keys = pl.from_arrow(table)
    if not with_vectors:
        return keys, None
    # The labels come sorted from a narrow join; the vectors from a plain scan, put in the same order here.
    branch_ids, positions, vectors = _layer_scan(con, run_id, layer, variant, prompt_ids)
    stored, wanted = (
        _keys(branch_ids, positions),
        _keys(keys["branch_id"].to_numpy(), keys["position"].to_numpy()),
    )
    if stored.shape == wanted.shape and np.array_equal(stored, wanted):
        return keys, vectors
    order = np.argsort(stored, kind="stable")
    at = np.searchsorted(stored, wanted, sorter=order)
    found = order[np.minimum(at, len(order) - 1)] if len(order) else at
    if len(order) == 0 or not np.array_equal(stored[found], wanted):
        raise RuntimeError(f"run {run_id} layer {layer}: tokens without latents (damaged store?)")
    return keys, vectors[found]


def token_count(
    con: duckdb.DuckDBPyConnection,
    run_id: str,
    layer: int,
    variant: str = "normal",
    prompt_ids: list[int] | None = None,
    generated_only: bool = False,
) -> int:
    """How many rows token_rows would return (cheap; part of cache keys, as a run being written grows)."""
    where, params = _token_filter(prompt_ids, generated_only)
    row = first_row(
        con,
        f"""
        SELECT count(*) FROM latents l
        JOIN tokens t USING (run_id, branch_id, position)
        JOIN branches b USING (run_id, branch_id)
        WHERE l.run_id = $run AND l.layer = $layer AND l.variant = $variant{where}
        """,
        {"run": run_id, "layer": layer, "variant": variant, **params},
    )
    return int(row[0])


def token_digest(
    con: duckdb.DuckDBPyConnection,
    run_id: str,
    layer: int,
    variant: str = "normal",
    prompt_ids: list[int] | None = None,
    generated_only: bool = False,
) -> tuple[int, int]:
    """(rows, content hash) of what token_rows would return: the hash covers every vector, label and
    token id, so two stores (or two states of one) with the same row count never share a cached view."""
    where, params = _token_filter(prompt_ids, generated_only)
    row = first_row(
        con,
        f"""
        SELECT count(*), coalesce(bit_xor(hash(l.branch_id, l.position, t.token_id, b.prompt_id, l.vec)), 0)
        FROM latents l
        JOIN tokens t USING (run_id, branch_id, position)
        JOIN branches b USING (run_id, branch_id)
        WHERE l.run_id = $run AND l.layer = $layer AND l.variant = $variant{where}
        """,
        {"run": run_id, "layer": layer, "variant": variant, **params},
    )
    return int(row[0]), int(row[1])


def run_layers(con: duckdb.DuckDBPyConnection, run_id: str) -> dict[str, list[int]]:
    """The layers stored for a run, per variant."""
    rows = con.sql(
        "SELECT variant, list(DISTINCT layer ORDER BY layer) FROM latents WHERE run_id = ? GROUP BY variant",
        params=[run_id],
    ).fetchall()
    return {variant: list(layers) for variant, layers in rows}


def prompts(con: duckdb.DuckDBPyConnection, run_id: str) -> pl.DataFrame:
    """The run's prompts (prompt_id, text, n_tokens), by id."""
    return pl.from_arrow(
        con.sql(
            "SELECT prompt_id, text, n_tokens FROM prompts WHERE run_id = ? ORDER BY prompt_id",
            params=[run_id],
        ).to_arrow_table()
    )


def lineage_text(
    con: duckdb.DuckDBPyConnection, run_id: str, prompt_ids: list[int] | None = None
) -> pl.DataFrame:
    """Every branch's full token sequence (prefix included) as (branch_id, position, token_text), for the
    text panel and token context windows; optionally only some prompts."""
    where, params = "", {"run": run_id}
    if prompt_ids is not None:
        where = " AND b.prompt_id IN (SELECT unnest($prompts))"
        params["prompts"] = [int(p) for p in prompt_ids]
    return pl.from_arrow(
        con.sql(
            f"""
        SELECT bt.branch_id, bt.position, bt.token_text
        FROM branch_tokens bt JOIN branches b USING (run_id, branch_id)
        WHERE bt.run_id = $run{where}
        ORDER BY bt.branch_id, bt.position
        """,
            params=params,
        ).to_arrow_table()
    )


def fingerprint(con: duckdb.DuckDBPyConnection) -> tuple:
    """Changes whenever data is committed: each run's id, status and number of written prompt trees (a
    prompt tree is written in one transaction, so this count moves with every commit)."""
    rows = con.sql(
        "SELECT r.run_id, r.status, (SELECT count(*) FROM prompts p WHERE p.run_id = r.run_id) "
        "FROM runs r ORDER BY r.run_id"
    ).fetchall()
    return tuple(tuple(r) for r in rows)


def prompts_without_variant(con: duckdb.DuckDBPyConnection, run_id: str, variant: str) -> list[int]:
    """Written prompts of the run that have no latents of `variant` yet (ordered)."""
    rows = con.sql(
        """
        SELECT p.prompt_id FROM prompts p
        WHERE p.run_id = $run AND NOT EXISTS (
            SELECT 1 FROM latents l JOIN branches b USING (run_id, branch_id)
            WHERE l.run_id = $run AND b.prompt_id = p.prompt_id AND l.variant = $variant)
        ORDER BY p.prompt_id
        """,
        params={"run": run_id, "variant": variant},
    ).fetchall()
    return [r[0] for r in rows]


def prompt_sequences(
    con: duckdb.DuckDBPyConnection, run_id: str, prompt_id: int
) -> list[tuple[int, int, list[int]]]:
    """Each branch of one prompt as (branch_id, fork_position, full token ids with the prefix)."""
    rows = con.sql(
        """
        SELECT b.branch_id, b.fork_position, list(bt.token_id ORDER BY bt.position)
        FROM branches b JOIN branch_tokens bt USING (run_id, branch_id)
        WHERE b.run_id = $run AND b.prompt_id = $prompt
        GROUP BY b.branch_id, b.fork_position ORDER BY b.branch_id
        """,
        params={"run": run_id, "prompt": prompt_id},
    ).fetchall()
    return [(int(b), int(f), list(ids)) for b, f, ids in rows]


def exchange_tokens(con: duckdb.DuckDBPyConnection, run_id: str) -> pl.DataFrame:
    """Every stored token of a run with its branch and prompt, ordered by (branch_id, position): the table
    store.exchange writes and reads (prompt_id, prompt_text, branch_id, parent_branch_id, position,
    token_id, token_text, is_prompt, logprob, entropy, branch_kind, branch_path, ended_with_eos)."""
    return con.sql(
        """
        SELECT b.prompt_id, p.text AS prompt_text, t.branch_id, b.parent_branch_id, t.position, t.token_id,
               t.token_text, t.is_prompt, t.logprob, t.entropy, b.kind AS branch_kind, b.path AS branch_path,
               b.ended_with_eos
        FROM tokens t JOIN branches b USING (run_id, branch_id) JOIN prompts p USING (run_id, prompt_id)
        WHERE t.run_id = $run ORDER BY t.branch_id, t.position
        """,
        params={"run": run_id},
    ).pl()


RUN_FIELDS = ("model", "n_layers", "d_model", "pe_type", "config", "config_hash", "status")


def run_row(con: duckdb.DuckDBPyConnection, run_id: str) -> dict[str, Any] | None:
    """A run's record (RUN_FIELDS), or None when the store has no such run."""
    row = first_row(con, f"SELECT {', '.join(RUN_FIELDS)} FROM runs WHERE run_id = ?", [run_id])
    return dict(zip(RUN_FIELDS, row, strict=True)) if row is not None else None
