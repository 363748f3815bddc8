"""A run as Parquet shards (what distributed ingest workers write) and merging them into a DuckDB store.

Layout of a run directory `ROOT/<run_id>/` (ROOT is `STORE.shards` unless given):

    run.json                 the RunRecord (model, resolved config, hash, width) and the task split
    shard-00000/             one finished task: its prompts' whole trees
        prompts.parquet      prompt_id, text, n_tokens
        branches.parquet     the `branches` columns without run_id
        tokens.parquet       the `tokens` columns without run_id
        latents.parquet      the `latents` columns without run_id (vec as a fixed-size list of float32)

A shard is written into a hidden temporary directory and renamed into place, so a shard directory that
exists is complete; a task that runs twice (a retried worker) finds it there and writes nothing.
The merge imports each shard in one transaction, skipping shards already imported, and marks the run
complete when every planned prompt is in; the store then answers the same SQL as a single-process run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from store.errors import StoreError, reason
from store.records import BranchRecord, RunRecord
from store.writer import SHARD_TABLES, StoreWriter, arrow_tables

_SHARD = re.compile(r"^shard-(\d{5,})$")


def _shard_name(task: int) -> str:
    return f"shard-{task:05d}"


def run_dir(store: str | Path, run_id: str, root: str | Path | None = None) -> Path:
    """The directory of a run's shards: ROOT/<run_id>, ROOT defaulting to STORE.shards."""
    return Path(root if root else f"{store}.shards") / run_id


def shard_exists(run_path: Path, task: int) -> bool:
    """Whether the task's shard is there (a shard that exists is complete)."""
    return (run_path / _shard_name(task)).exists()


def task_prompts(manifest: dict) -> dict[int, list[int]]:
    """task index -> the prompt ids it holds, from the manifest's split."""
    n, per_task = manifest["n_prompts"], manifest["prompts_per_task"]
    return {task: list(range(lo, min(lo + per_task, n))) for task, lo in enumerate(range(0, n, per_task))}


def write_manifest(run_path: Path, run: RunRecord, n_prompts: int, prompts_per_task: int) -> dict:
    """Create run.json, or check an existing one describes the same run; returns the manifest."""
    manifest = {"run": asdict(run), "n_prompts": n_prompts, "prompts_per_task": prompts_per_task}
    path = run_path / "run.json"
    if path.is_file():
        found = read_manifest(run_path)
        if found["run"]["config_hash"] != run.config_hash:
            raise StoreError(f"{run_path} holds shards of run '{run.run_id}' with other settings; "
                             "choose another --run-id or shard directory")
        return found
    try:
        run_path.mkdir(parents=True, exist_ok=True)
        tmp = run_path / f".run.json.tmp-{uuid.uuid4().hex}"
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as exc:
        raise StoreError(f"cannot write shards to {run_path}: {reason(exc)}") from exc
    return manifest


def read_manifest(run_path: Path) -> dict:
    try:
        return json.loads((run_path / "run.json").read_text())
    except FileNotFoundError:
        raise StoreError(f"{run_path} is not a branchlens run directory (no run.json)") from None
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read {run_path / 'run.json'}: {exc}") from None


def finished_shards(run_path: Path) -> dict[int, Path]:
    """task index -> shard directory, for every complete shard."""
    if not run_path.is_dir():
        return {}
    out = {}
    for entry in run_path.iterdir():
        match = _SHARD.match(entry.name)
        if match and entry.is_dir():
            out[int(match.group(1))] = entry
    return dict(sorted(out.items()))


def write_shard(run_path: Path, task: int, prompts: list[tuple[int, str, int, list[BranchRecord]]],
                layers: list[int], variant: str = "normal") -> bool:
    """Write one task's prompts (prompt_id, text, n_prompt_tokens, branches) as a shard. Returns False,
    writing nothing, when the shard already exists."""
    final = run_path / _shard_name(task)
    if final.exists():
        return False
    tmp = run_path / f".{_shard_name(task)}.tmp-{uuid.uuid4().hex}"
    try:
        tmp.mkdir(parents=True)
        tables: dict[str, list[pa.Table]] = {name: [] for name in SHARD_TABLES}
        for prompt_id, text, n_tokens, branches in prompts:
            tables["prompts"].append(pa.table({"prompt_id": pa.array([prompt_id], pa.int32()),
                                               "text": pa.array([text]), "n_tokens": pa.array([n_tokens], pa.int32())}))
            branch_tbl, token_tbl, latent_tbl = arrow_tables(branches, layers, variant)
            tables["branches"].append(branch_tbl)
            tables["tokens"].append(token_tbl)
            tables["latents"].append(latent_tbl)
        for name, parts in tables.items():
            pq.write_table(pa.concat_tables(parts), tmp / f"{name}.parquet")
        try:
            os.rename(tmp, final)  # atomic; fails when another attempt already put the shard there
        except OSError:
            if final.exists():
                return False
            raise
        return True
    except OSError as exc:
        raise StoreError(f"cannot write shard {final}: {reason(exc)}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def merge(run_path: str | Path, store: str | Path, created_by: str) -> tuple[int, int, bool]:
    """Import every finished shard of the run at `run_path` into `store` (created if missing).

    Returns (shards imported now, shards already there, run complete). Run it again at any time: it
    only adds what is missing."""
    run_path = Path(run_path)
    manifest = read_manifest(run_path)
    run = RunRecord(**manifest["run"])
    writer = StoreWriter(store, created_by=created_by)
    writer.check_existing()
    try:
        writer.prepare(run.d_model)
        writer.start_run(run)
        imported = skipped = 0
        for shard in finished_shards(run_path).values():
            if writer.import_shard(run.run_id, shard):
                imported += 1
            else:
                skipped += 1
        complete = len(writer.start_run(run)) == manifest["n_prompts"]
        if complete:
            writer.finish_run(run.run_id)
    finally:
        writer.release()
    return imported, skipped, complete
