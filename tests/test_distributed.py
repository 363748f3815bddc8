"""Distributed ingest on a local Ray cluster (2 CPU workers, tiny model): the sharded run equals the
single-process run, and a worker killed mid-run is restarted by Ray without losing or duplicating rows."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import tomli_w

from helpers import PROMPTS, PYTHON, cli_env, dump
from store import reading

if os.environ.get("BRANCHLENS_REQUIRE_RAY") != "1":
    pytest.importorskip("ray", reason="Ray is the optional 'distributed' extra")


def _config(model_dirs, tmp_path: Path, n: int, **extra) -> Path:
    config = tmp_path / "run.toml"
    settings = dict(model=str(model_dirs["llama"]), prompts=[f"{p} {i}" for i in range(n) for p in PROMPTS][:n],
                    samples=2, forks=2, max_new_tokens=12, layers=[0, 1, 2], device="cpu") | extra
    config.write_text(tomli_w.dumps(settings))
    return config


def _env(tmp_path: Path) -> dict[str, str]:
    # One torch thread, as each Ray CPU actor has: then the single-process reference computes bit for bit
    # the same latents (with other thread counts they agree to ~1e-6, float summation order).
    return cli_env(tmp_path) | {"OMP_NUM_THREADS": "1", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}


def _reference(config: Path, tmp_path: Path) -> tuple[Path, str]:
    store = tmp_path / "single.duckdb"
    done = subprocess.run([PYTHON, "-m", "ingest", "--config", str(config), "--store", str(store), "--no-progress"],
                          env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    with reading(store) as con:
        return store, con.execute("SELECT run_id FROM runs").fetchall()[0][0]


def test_sharded_run_equals_the_single_process_run_and_resumes(model_dirs, tmp_path):
    config = _config(model_dirs, tmp_path, 9)
    store = tmp_path / "dist.duckdb"
    command = [PYTHON, "-m", "ingest", "--config", str(config), "--store", str(store), "--no-progress",
               "--workers", "2", "--prompts-per-task", "2"]
    result = subprocess.run(command, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 Ray actors (CPU)" in result.stdout and "complete" in result.stdout
    reference, run_id = _reference(config, tmp_path)
    assert dump(store, run_id) == dump(reference, run_id)  # same run id, same rows, same bits
    shards = sorted(p.name for p in (tmp_path / "dist.duckdb.shards" / run_id).iterdir())
    assert shards == ["run.json", *[f"shard-{t:05d}" for t in range(5)]]  # 9 prompts / 2 per task

    # Lose the store: the merge command rebuilds it from the shards alone.
    store.unlink()
    merged = subprocess.run([PYTHON, "-m", "store", "merge", str(tmp_path / "dist.duckdb.shards" / run_id),
                             "--store", str(store)], env=_env(tmp_path), capture_output=True, text=True)
    assert merged.returncode == 0 and "merged 5 shards" in merged.stdout and "complete" in merged.stdout
    assert dump(store, run_id) == dump(reference, run_id)
    # Running the whole thing again finds every shard done and every prompt merged: nothing is added.
    again = subprocess.run(command, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "5 of 5 tasks already" in again.stderr
    assert dump(store, run_id) == dump(reference, run_id)


def test_a_worker_killed_mid_task_is_replaced_and_the_run_completes(model_dirs, tmp_path):
    """One Ray worker SIGKILLs itself in the middle of its second task (the fault hook, once across all
    processes, so its replacement runs on): Ray restarts it, the task runs again, and the run equals the
    single-process one with no row lost or doubled."""
    from ingest.tree import TreePlan

    config = _config(model_dirs, tmp_path, 12, samples=3, depth=2, max_new_tokens=40)
    store = tmp_path / "dist.duckdb"
    marker = tmp_path / "fault-fired"
    fault = f"generate:{TreePlan(3, 2, 2).size + 2}"  # the 2nd branch of a worker's second task
    result = subprocess.run([PYTHON, "-m", "ingest", "--config", str(config), "--store", str(store), "--no-progress",
                             "--workers", "2", "--prompts-per-task", "1"],
                            env=_env(tmp_path) | {"BRANCHLENS_FAULT": fault, "BRANCHLENS_FAULT_ONCE": str(marker)},
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert marker.exists(), "no worker reached the fault point"
    assert "complete" in result.stdout
    reference, run_id = _reference(config, tmp_path)
    assert dump(store, run_id) == dump(reference, run_id)
    with reading(store) as con:
        dupes = con.execute("SELECT count(*) - count(DISTINCT (branch_id, position, layer, variant)) "
                            "FROM latents").fetchall()[0][0]
    assert dupes == 0
