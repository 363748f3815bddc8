"""A merge checks every shard against its commit record (issue 36 item 8): a latents file rewritten with
half its rows, a shard copied from another run, a truncated Parquet file and a shard with no record are
each refused in one line before any of that shard is imported; the run stays incomplete, shards that
matched stay merged, and the merge completes once the bad shard is written again."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from helpers import PYTHON
from test_s3_shards import LAYERS, RUN, task, write_run

from store import StoreError
from store.shards import merge, write_shard


def _merge_cli(run_path: str, store: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "store", "merge", run_path, "--store", str(store)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _prompts(store: Path) -> list[int]:
    with duckdb.connect(str(store), read_only=True) as con:
        return sorted(r[0] for r in con.execute("SELECT prompt_id FROM prompts").fetchall())


def _status(store: Path) -> str:
    with duckdb.connect(str(store), read_only=True) as con:
        return con.execute("SELECT status FROM runs").fetchall()[0][0]


def _half_latents(shard: Path) -> None:
    table = pq.read_table(shard / "latents.parquet")
    pq.write_table(table.slice(0, table.num_rows // 2), shard / "latents.parquet")


def _truncate(shard: Path) -> None:
    data = (shard / "tokens.parquet").read_bytes()
    (shard / "tokens.parquet").write_bytes(data[: len(data) // 2])


def _no_record(shard: Path) -> None:
    (shard / "commit.json").unlink()


@pytest.mark.parametrize(
    "damage, expected",
    [
        (_half_latents, "latents.parquet has"),
        (_truncate, "tokens.parquet has"),
        (_no_record, "no commit record"),
    ],
)
def test_a_damaged_shard_is_refused_in_one_line_and_the_others_merge(tmp_path, damage, expected):
    run_path = write_run(str(tmp_path / "shards"))
    damage(Path(run_path, "shard-00001"))
    store = tmp_path / "store.duckdb"
    out = _merge_cli(run_path, store)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "shard-00001" in lines[0] and expected in lines[0], lines
    assert _prompts(store) == [0, 1] and _status(store) == "running"  # task 0 merged, nothing of task 1
    # The task written again (what rerunning the ingest does): the merge completes.
    shutil.rmtree(Path(run_path, "shard-00001"))
    assert write_shard(run_path, 1, task(1), LAYERS)
    assert merge(run_path, store, created_by="test") == (2, 1, True)
    assert _prompts(store) == [0, 1, 2, 3, 4] and _status(store) == "complete"


def test_a_shard_of_another_run_copied_in_is_refused(tmp_path, monkeypatch):
    """Same layout and run id, another seed (so another config hash): its record names the other run."""
    import test_s3_shards

    ours = write_run(str(tmp_path / "ours"))
    monkeypatch.setattr(
        test_s3_shards,
        "RUN",
        dataclasses.replace(RUN, config={"samples": 1, "seed": 1}, config_hash="hash-2"),
    )
    theirs = write_run(str(tmp_path / "theirs"))
    monkeypatch.undo()
    shutil.rmtree(Path(ours, "shard-00002"))
    shutil.copytree(Path(theirs, "shard-00002"), Path(ours, "shard-00002"))
    store = tmp_path / "store.duckdb"
    with pytest.raises(
        StoreError,
        match=r"shard-00002 does not match its commit record \(it belongs to run "
        r"'run-s3' with config hash-2, not 'run-s3' with config hash-1\)",
    ):
        merge(ours, store, created_by="test")
    assert _prompts(store) == [0, 1, 2, 3] and _status(store) == "running"


def test_a_shard_renamed_to_another_task_is_refused(tmp_path):
    run_path = write_run(str(tmp_path / "shards"), tasks=[0, 1])
    Path(run_path, "shard-00001").rename(Path(run_path, "shard-00002"))
    with pytest.raises(StoreError, match="written for task 1, not 2"):
        merge(run_path, tmp_path / "store.duckdb", created_by="test")
