"""Disk full and unwritable paths: one clear error line, the store stays readable, resume completes it.

A full disk is simulated with RLIMIT_FSIZE on the ingest process (writes past the limit fail with
"File too large", as on a full file system), so no special mount is needed.
"""

from __future__ import annotations

import resource
import signal
import subprocess

import tomli_w
from helpers import PROMPTS, PYTHON, cli_env, dump

from store import reading


def _run(config, store, tmp_path, file_limit: int | None = None):
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG errors instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    return subprocess.run(
        [PYTHON, "-m", "ingest", "--config", str(config), "--store", str(store), "--no-progress"],
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=limit if file_limit else None,
    )


def _config(model_dirs, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        tomli_w.dumps(
            dict(
                model=str(model_dirs["llama"]),
                prompts=[*PROMPTS] * 4,
                samples=3,
                forks=3,
                max_new_tokens=32,
                layers="all",
                device="cpu",
            )
        )
    )
    return config


def _error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert lines[-1].startswith("error: ") and "Traceback" not in result.stderr
    return lines[-1]


def test_disk_full_mid_run_keeps_what_was_written_and_resumes(model_dirs, tmp_path):
    config = _config(model_dirs, tmp_path)
    full = tmp_path / "full.duckdb"
    failed = _run(config, full, tmp_path, file_limit=800_000)
    line = _error_line(failed)
    assert "cannot write to store" in line and "File too large" in line
    with reading(full) as con:  # still a readable store, with whole prompt trees only
        run_id = con.execute("SELECT run_id FROM runs").fetchall()[0][0]
        written = con.execute("SELECT count(*) FROM prompts").fetchall()[0][0]
    assert 1 <= written < 12

    reference = tmp_path / "reference.duckdb"
    assert _run(config, reference, tmp_path).returncode == 0
    partial, whole = dump(full, run_id), dump(reference, run_id)
    kept = {p[0] for p in partial["prompts"]}
    assert partial["prompts"] == [p for p in whole["prompts"] if p[0] in kept]
    resumed = _run(config, full, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert dump(full, run_id) == whole


def test_disk_full_at_creation_leaves_no_broken_store(model_dirs, tmp_path):
    store = tmp_path / "tiny.duckdb"
    line = _error_line(_run(_config(model_dirs, tmp_path), store, tmp_path, file_limit=400_000))
    assert "cannot create store" in line and "File too large" in line
    # no store and no half-made file; the (empty) ingest lock file may stay
    assert [p.name for p in tmp_path.glob("tiny.duckdb*")] in ([], ["tiny.duckdb.ingest-lock"])


def test_unwritable_store_path(model_dirs, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a directory should be")
    line = _error_line(_run(_config(model_dirs, tmp_path), blocker / "store.duckdb", tmp_path))
    assert "store" in line and str(blocker) in line
