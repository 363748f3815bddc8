"""Reading a distributed run's shards in place, without merging them into a store.

`open_shards(run_dir, ...)` gives an in-memory DuckDB connection that answers the store's SQL contract
(`meta`, `runs`, `prompts`, `branches`, `tokens`, `latents` and the `branch_*` views) over the committed
shards of one or more runs, local or on S3. The Parquet files are read through pyarrow's file systems as
Arrow datasets registered in DuckDB, so no DuckDB extension (httpfs) is needed, and scans read only the
columns and row groups a query needs. The connection is a snapshot: shards committed later appear in a
new connection. `store.queries` works on it as on a store file.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow.dataset as pads

from store.connect import NO_EXTENSIONS, READ_CONFIG
from store.errors import StoreError
from store.objectstore import locate, storage_error
from store.records import RunRecord
from store.schema import CONTRACT_VIEWS, SCHEMA_VERSION, schema_statements
from store.shards import finished_shards, read_manifest, task_prompts
from store.writer import SHARD_TABLES

CREATED_BY = "branchlens shards read in place"


def open_shards(*run_paths: str | Path) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the store contract over the committed shards of the runs at `run_paths`
    (run directories or s3:// URLs, as `python -m store merge` takes them). All runs must share one
    vector width, as in a store file. Close it when done."""
    if not run_paths:
        raise StoreError("open_shards needs at least one run directory")
    runs = []
    for where in run_paths:
        manifest = read_manifest(where)
        run = RunRecord(**manifest["run"])
        shards = finished_shards(where)
        split = task_prompts(manifest)
        status = (
            "complete"
            if sum(len(split[t]) for t in shards if t in split) == manifest["n_prompts"]
            else "running"
        )
        runs.append((run, shards, status, _created_at(where)))
    widths = sorted({run.d_model for run, *_ in runs})
    if len(widths) > 1:
        raise StoreError(
            f"runs of different vector widths ({', '.join(map(str, widths))}) cannot be read "
            "together; open them one width at a time"
        )
    dim = widths[0]

    con = duckdb.connect(":memory:", config=NO_EXTENSIONS)
    try:
        for sql in schema_statements(dim, ("meta", "runs")):
            con.execute(sql)
        con.executemany(
            "INSERT INTO meta VALUES (?, ?)",
            [["schema_version", str(SCHEMA_VERSION)], ["vector_dim", str(dim)], ["created_by", CREATED_BY]],
        )
        for run, _shards, status, created in runs:
            con.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, ?, ?, ?)",
                [
                    run.run_id,
                    run.model,
                    created,
                    json.dumps(run.config, sort_keys=True),
                    run.config_hash,
                    status,
                    run.n_layers,
                    run.d_model,
                    run.pe_type,
                    run.device,
                    run.dtype,
                    CREATED_BY,
                ],
            )
        for name in SHARD_TABLES:
            parts = []
            for i, (run, shards, _status, _created) in enumerate(runs):
                if not shards:
                    continue
                fs = next(iter(shards.values())).fs
                try:
                    dataset = pads.dataset(
                        [s.files[name] for s in shards.values()], filesystem=fs, format="parquet"
                    )
                except OSError as exc:
                    raise storage_error(exc, "read shards of", run_paths[i]) from None
                con.register(f"_shards_{i}_{name}", dataset)
                run_id = run.run_id.replace("'", "''")
                parts.append(f"SELECT '{run_id}'::VARCHAR AS run_id, * FROM _shards_{i}_{name}")
            if parts:
                con.execute(f"CREATE VIEW {name} AS " + " UNION ALL BY NAME ".join(parts))
            else:
                con.execute(schema_statements(dim, (name,))[0])  # an empty table of the right shape
        for sql in schema_statements(dim, CONTRACT_VIEWS):
            con.execute(sql)
        # the shards are read by pyarrow through the registered datasets; DuckDB itself needs no file access
        for key, value in READ_CONFIG.items():
            if key not in NO_EXTENSIONS:
                con.execute(f"SET {key} = {str(value).lower()}")
    except BaseException:
        con.close()
        raise
    return con


def _created_at(where: str | Path) -> datetime:
    """When the run's shard directory was started: run.json's modification time (UTC)."""
    manifest = locate(where).join("run.json")
    try:
        mtime = manifest.fs.get_file_info(manifest.path).mtime
    except OSError as exc:
        raise storage_error(exc, "read", manifest) from None
    if mtime is None:
        return datetime.now(UTC).replace(tzinfo=None)
    return mtime.astimezone(UTC).replace(tzinfo=None) if mtime.tzinfo else mtime
