"""Distributed ingest on a local Ray cluster (2 CPU workers, tiny model): the sharded run equals the
single-process run, and a worker killed mid-run is restarted by Ray without losing or duplicating rows."""

from __future__ import annotations

import os
import subprocess
from datetime import datetime
from pathlib import Path

import pytest
import tomli_w
from helpers import PROMPTS, PYTHON, cli_env, dump, dump_rows

from store import reading

if os.environ.get("BRANCHLENS_REQUIRE_RAY") != "1":
    pytest.importorskip("ray", reason="Ray is the optional 'distributed' extra")


def _config(model_dirs, tmp_path: Path, n: int, **extra) -> Path:
    config = tmp_path / "run.toml"
    settings = (
        dict(
            model=str(model_dirs["llama"]),
            prompts=[f"{p} {i}" for i in range(n) for p in PROMPTS][:n],
            samples=2,
            forks=2,
            max_new_tokens=12,
            layers=[0, 1, 2],
            device="cpu",
        )
        | extra
    )
    config.write_text(tomli_w.dumps(settings))
    return config


def _env(tmp_path: Path) -> dict[str, str]:
    # One torch thread, as each Ray CPU actor has: then the single-process reference computes bit for bit
    # the same latents (with other thread counts they agree to ~1e-6, float summation order).
    return cli_env(tmp_path) | {"OMP_NUM_THREADS": "1", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}


def _reference(config: Path, tmp_path: Path) -> tuple[Path, str]:
    store = tmp_path / "single.duckdb"
    done = subprocess.run(
        [PYTHON, "-m", "ingest", "--config", str(config), "--store", str(store), "--no-progress"],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    with reading(store) as con:
        return store, con.execute("SELECT run_id FROM runs").fetchall()[0][0]


def test_sharded_run_equals_the_single_process_run_and_resumes(model_dirs, tmp_path):
    # batch_rows 4 with 2 samples: prompts decode in pairs, so each task of 2 holds one whole group
    config = _config(model_dirs, tmp_path, 9, batch_rows=4)
    store = tmp_path / "dist.duckdb"
    command = [
        PYTHON,
        "-m",
        "ingest",
        "--config",
        str(config),
        "--store",
        str(store),
        "--no-progress",
        "--workers",
        "2",
        "--prompts-per-task",
        "2",
    ]
    result = subprocess.run(command, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 Ray actors (CPU)" in result.stdout and "complete" in result.stdout
    reference, run_id = _reference(config, tmp_path)
    assert dump(store, run_id) == dump(reference, run_id)  # same run id, same rows, same bits
    shards = sorted(p.name for p in (tmp_path / "dist.duckdb.shards" / run_id).iterdir())
    assert shards == ["run.json", *[f"shard-{t:05d}" for t in range(5)]]  # 9 prompts / 2 per task

    # Lose the store: the merge command rebuilds it from the shards alone.
    store.unlink()
    merged = subprocess.run(
        [
            PYTHON,
            "-m",
            "store",
            "merge",
            str(tmp_path / "dist.duckdb.shards" / run_id),
            "--store",
            str(store),
        ],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
    )
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

    config = _config(
        model_dirs, tmp_path, 12, samples=3, depth=2, max_new_tokens=40, batch_rows=3
    )  # 1 per group
    store = tmp_path / "dist.duckdb"
    marker = tmp_path / "fault-fired"
    fault = f"generate:{TreePlan(3, 2, 2).size + 2}"  # the 2nd branch of a worker's second task
    result = subprocess.run(
        [
            PYTHON,
            "-m",
            "ingest",
            "--config",
            str(config),
            "--store",
            str(store),
            "--no-progress",
            "--workers",
            "2",
            "--prompts-per-task",
            "1",
        ],
        env=_env(tmp_path) | {"BRANCHLENS_FAULT": fault, "BRANCHLENS_FAULT_ONCE": str(marker)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert marker.exists(), "no worker reached the fault point"
    assert "complete" in result.stdout
    reference, run_id = _reference(config, tmp_path)
    assert dump(store, run_id) == dump(reference, run_id)
    with reading(store) as con:
        dupes = con.execute(
            "SELECT count(*) - count(DISTINCT (branch_id, position, layer, variant)) FROM latents"
        ).fetchall()[0][0]
    assert dupes == 0


def test_s3_sharded_run_on_two_workers_survives_a_kill_mid_upload(model_dirs, tmp_path, s3):
    """Shards on a real S3 server (moto): one worker is SIGKILLed after uploading its second shard's files
    but before the commit marker (fault hook `shard`); Ray retries the task, the dead attempt's objects
    are swept, and the store equals the single-process run. The shards read in place answer the SQL
    cookbook like the merged store, and `python -m store merge` rebuilds the store from the bucket."""
    import pyarrow.fs as pafs
    from test_sql_cookbook import cookbook, personalize

    from store.inplace import open_shards

    config = _config(model_dirs, tmp_path, 9, batch_rows=4)  # tasks of 2 = whole groups, as above
    store = tmp_path / "dist.duckdb"
    marker = tmp_path / "fault-fired"
    result = subprocess.run(
        [
            PYTHON,
            "-m",
            "ingest",
            "--config",
            str(config),
            "--store",
            str(store),
            "--no-progress",
            "--workers",
            "2",
            "--prompts-per-task",
            "2",
            "--shards",
            s3.url,
        ],
        env=s3.env | _env(tmp_path) | {"BRANCHLENS_FAULT": "shard:2", "BRANCHLENS_FAULT_ONCE": str(marker)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert marker.exists(), "no worker reached the fault point"
    assert f"shards in {s3.url}/run-" in result.stdout and "complete" in result.stdout
    reference, run_id = _reference(config, tmp_path)
    assert dump(store, run_id) == dump(reference, run_id)

    keys = [
        i.path.split("/", 3)[3]
        for i in s3.fs.get_file_info(pafs.FileSelector(f"{s3.bucket}/runs/{run_id}", recursive=True))
        if i.type == pafs.FileType.File
    ]
    for t in range(5):  # one committed attempt per shard, nothing else left
        mine = {k for k in keys if k.startswith(f"shard-{t:05d}/")}
        markers = [k for k in mine if k.endswith(".committed")]
        assert len(markers) == 1, mine
        attempt = markers[0][: -len(".committed")]
        assert mine == {
            markers[0],
            *(f"{attempt}/{n}.parquet" for n in ("branches", "latents", "prompts", "tokens")),
        }

    run_url = f"{s3.url}/{run_id}"
    with open_shards(run_url) as con, reading(store) as merged:
        assert dump_rows(con, run_id) == dump_rows(merged, run_id)
        forks = [
            r[0]
            for r in merged.execute(
                "SELECT branch_id FROM branches WHERE kind = 'fork' ORDER BY end_position DESC, branch_id LIMIT 2"
            ).fetchall()
        ]
        answered = 0
        for query in cookbook():
            sql = personalize(query, run_id, forks)
            rows = _comparable(con.execute(sql).fetchall())
            assert rows == _comparable(merged.execute(sql).fetchall()), sql
            answered += bool(rows)
        assert answered >= len(cookbook()) - 1

    store.unlink()
    merged_again = subprocess.run(
        [PYTHON, "-m", "store", "merge", run_url, "--store", str(store)],
        env=s3.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert merged_again.returncode == 0 and "merged 5 shards" in merged_again.stdout, merged_again.stderr
    assert dump(store, run_id) == dump(reference, run_id)


def _comparable(rows: list[tuple]) -> list[tuple]:
    """Rows in a fixed order, floats to 6 significant digits (aggregates may sum in another order), times
    left out (runs.created_at is when the shards began in place, when the merge registered the run in a
    store)."""

    def value(v):
        return float(f"{v:.6g}") if isinstance(v, float) else "<time>" if isinstance(v, datetime) else v

    return sorted((tuple(value(v) for v in row) for row in rows), key=repr)


def _silent_server():
    """A TCP server on a local port that accepts connections and never answers (not Ray's GCS)."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []

    def accept():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return server


@pytest.mark.parametrize("listening", [False, True], ids=["nothing-listens", "not-ray-listens"])
def test_a_bad_ray_address_ends_with_one_line_and_writes_nothing(model_dirs, tmp_path, listening):
    """Tried: --ray-address 127.0.0.1:1 printed Ray's warnings for 400+ s and no error line. Now nothing
    listening is said at once; a server that is not Ray's GCS within BRANCHLENS_RAY_CONNECT_WAIT."""
    import socket

    server = _silent_server() if listening else None
    if server:
        port = server.getsockname()[1]
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]  # closed again: nothing listens there
    store = tmp_path / "store.duckdb"
    try:
        out = subprocess.run(
            [
                PYTHON,
                "-m",
                "ingest",
                "--config",
                str(_config(model_dirs, tmp_path, 2)),
                "--store",
                str(store),
                "--ray-address",
                f"127.0.0.1:{port}",
                "--no-progress",
            ],
            env=_env(tmp_path) | {"BRANCHLENS_RAY_CONNECT_WAIT": "10"},
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        if server:
            server.close()
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-3000:]
    expected = "no Ray cluster answers at" if listening else "cannot reach Ray at"
    assert lines[0].startswith(f"error: {expected} 127.0.0.1:{port}"), lines
    assert not store.exists() and not Path(f"{store}.shards").exists()
