"""Resume: a run killed part-way and started again ends identical to an uninterrupted one."""

from __future__ import annotations

import subprocess

import duckdb
import pytest
import tomli_w
from helpers import PYTHON, cli_env, dump, ingest, paused_ingest

from store import reading
from store.writer import StoreWriter


def uninterrupted(command: list[str], tmp_path) -> tuple:
    """The same CLI run into a fresh store, not interrupted: (its store, the run id)."""
    reference = tmp_path / "reference.duckdb"
    clean = subprocess.run(
        [*command[:-3], "--store", str(reference), "--no-progress"],
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert clean.returncode == 0, clean.stderr[-2000:]
    with reading(reference) as con:
        return reference, con.execute("SELECT run_id FROM runs").fetchall()[0][0]


def test_crash_inside_a_write_leaves_nothing_half_written_and_resume_completes(tiny_cfg, monkeypatch):
    reference = ingest(tiny_cfg("llama", store="reference.duckdb"))
    cfg = tiny_cfg("llama", store="crashed.duckdb")
    real_write = StoreWriter.write_prompt
    calls = []

    def failing_second_write(self, run_id, prompt_id, text, n_tokens, branches, layers, variant="normal"):
        calls.append(prompt_id)
        if len(calls) == 2:  # latents one element too narrow: prompts/branches/tokens insert, latents fail
            for b in branches:
                b.latents = b.latents[..., :-1]
        return real_write(self, run_id, prompt_id, text, n_tokens, branches, layers, variant)

    monkeypatch.setattr(StoreWriter, "write_prompt", failing_second_write)
    with pytest.raises(duckdb.Error):  # the latents insert refuses the narrow rows
        ingest(cfg)
    with reading(cfg.store) as con:
        counts = {
            t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0]
            for t in ("prompts", "branches", "tokens", "latents")
        }
        status = con.execute("SELECT status FROM runs").fetchall()[0][0]
        written = con.execute("SELECT DISTINCT prompt_id FROM branches").fetchall()
    assert status == "running"
    assert written == [(0,)] and counts["prompts"] == 1
    per_prompt = dump(reference.store, reference.run_id)
    assert counts["branches"] == sum(1 for b in per_prompt["branches"] if b[1] == 0)

    monkeypatch.setattr(StoreWriter, "write_prompt", real_write)
    resumed = ingest(cfg)
    assert resumed.prompts_skipped == 1 and resumed.prompts_written == len(cfg.prompts) - 1
    assert resumed.run_id == reference.run_id
    assert dump(cfg.store, resumed.run_id) == per_prompt


def test_a_finished_run_started_again_writes_nothing(tiny_cfg):
    from pathlib import Path

    cfg = tiny_cfg("gpt2")
    first = ingest(cfg)
    before = Path(cfg.store).read_bytes()
    again = ingest(cfg)
    assert again.prompts_written == 0 and again.prompts_skipped == len(cfg.prompts)
    assert again.counts == first.counts
    assert Path(cfg.store).read_bytes() == before  # not even runs.completed_at is rewritten


def test_a_directory_given_as_store_is_named_as_such(tiny_cfg, tmp_path):
    from ingest.errors import IngestError
    from store.errors import StoreError

    folder = tmp_path / "a-folder.duckdb"
    folder.mkdir()
    with pytest.raises((StoreError, IngestError), match="is a directory, not a DuckDB file"):
        ingest(tiny_cfg("gpt2", store="a-folder.duckdb"))


def test_five_sigkills_in_every_phase_then_resume_equals_uninterrupted(model_dirs, tmp_path):
    """SIGKILL the CLI five times, each at a point chosen by what it has done (the test-only fault hook,
    store.faults), not by the clock: while loading, while generating, inside the second and the first
    commit of a process, and inside compaction. After each kill the store holds exactly the prompts
    committed before it; a last run completes it, equal to an uninterrupted run, with no duplicate rows
    and no leftover files."""
    from ingest.tree import TreePlan

    prompts = [
        f"{p} {i}" for i in range(6) for p in ["The cat sat on", "Branches go apart where", "def f(x):"]
    ]
    config = tmp_path / "run.toml"
    # batch_rows 6 with 2 samples: prompts decode in fixed groups of 3 (0-2, 3-5, ...), each written alone
    config.write_text(
        tomli_w.dumps(
            dict(
                model=str(model_dirs["llama"]),
                prompts=prompts,
                samples=2,
                forks=2,
                max_new_tokens=24,
                layers=[0, 1, 2],
                device="cpu",
                batch_rows=6,
            )
        )
    )
    store = tmp_path / "killed.duckdb"
    command = [PYTHON, "-m", "ingest", "--config", str(config), "--store", str(store), "--no-progress"]
    branches_per_prompt = TreePlan(2, 2, 1).size

    def committed() -> int:
        if not store.exists():
            return 0
        with reading(store) as con:
            return con.execute("SELECT count(*) FROM prompts").fetchall()[0][0]

    def killed_at(fault: str) -> str:
        env = cli_env(tmp_path) | {"BRANCHLENS_FAULT": fault}
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == -9, f"{fault}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
        return proc.stderr

    # 1. loading: the model is loaded, nothing is written yet.
    assert "fault: load 1" in killed_at("load:1") and committed() == 0 and not store.exists()
    # 2. generating the 3rd group (prompts 6-8): the first group is committed, the second's three writes
    # run alongside, so 0 to 3 of them may be.
    assert "fault: generate" in killed_at(f"generate:{6 * branches_per_prompt + 2}")
    after_generate = committed()
    assert 3 <= after_generate <= 6
    # 3. inside the 2nd commit of a resumed process (which decodes a part-written group whole again and
    # writes only its missing prompts): exactly its first commit landed.
    stderr = killed_at("commit:2")
    assert "resuming run" in stderr and "fault: commit 2" in stderr
    assert committed() == after_generate + 1
    # 4. inside the very first commit: nothing of that prompt is visible.
    assert "fault: commit 1" in killed_at("commit:1") and committed() == after_generate + 1
    # 5. inside compaction, after the last prompt: all committed, the half-written copy left beside it.
    assert "fault: compact 1" in killed_at("compact:1")
    assert committed() == len(prompts)
    assert list(tmp_path.glob("killed.duckdb.compact-*")), "the kill did not land inside compaction"

    final = subprocess.run(command, env=cli_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-2000:]
    assert not list(tmp_path.glob("killed.duckdb.compact-*")), "a dead compaction's copy was not removed"

    reference, run_id = uninterrupted(command, tmp_path)
    assert dump(store, run_id) == dump(reference, run_id)
    with reading(store) as con:
        dupes = con.execute(
            "SELECT count(*) - count(DISTINCT (branch_id, position, layer, variant)) FROM latents"
        ).fetchall()[0][0]
        assert dupes == 0 and con.execute("SELECT status FROM runs").fetchall()[0][0] == "complete"


def test_a_second_ingest_on_a_busy_store_exits_with_one_line_then_resumes(model_dirs, tmp_path):
    """Two ingests with the same settings on one store: the second, started while the first is paused
    (the fault hook, right after loading), exits with one error line and writes nothing; the first then
    finishes, and the second run again finds everything done."""
    config = tmp_path / "run.toml"
    config.write_text(
        tomli_w.dumps(
            dict(
                model=str(model_dirs["llama"]),
                prompts=["The cat sat on", "def f(x):"],
                samples=2,
                forks=1,
                max_new_tokens=8,
                layers=[0, 2],
                device="cpu",
            )
        )
    )
    store = tmp_path / "busy.duckdb"
    command = [PYTHON, "-m", "ingest", "--config", str(config), "--store", str(store), "--no-progress"]
    first = paused_ingest(command, tmp_path, "load:1")
    try:
        second = subprocess.run(command, env=cli_env(tmp_path), capture_output=True, text=True, timeout=600)
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert second.returncode == 2 and len(errors) == 1, second.stderr[-2000:]
        assert f"another ingest, merge or compaction (pid {first.pid}) is writing to {store}" in errors[0]
        assert "Traceback" not in second.stderr and not store.exists()
        first.stdin.write("\n")
        first.stdin.close()
        first.stderr.read()
        assert first.wait(timeout=600) == 0
    finally:
        first.kill()
        first.wait()
    again = subprocess.run(command, env=cli_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "complete" in again.stdout, again.stderr[-2000:]


def test_a_kill_inside_a_group_then_resume_decodes_the_group_again_and_equals_uninterrupted(
    model_dirs, tmp_path
):
    """Groups of 3 prompts (batch_rows 6, 2 samples). Killed inside the 2nd commit of a fresh run, the store
    holds prompt 0 only: its group is part-written. The resumed run decodes prompts 0-2 together again (so
    1 and 2 get the same companions as in an uninterrupted run) and writes 1 and 2 only: the store then
    equals an uninterrupted run bit for bit, with no prompt written twice."""
    prompts = ["The cat sat on", "Branches go apart where", "def f(x):", "one two", "three four five"]
    config = tmp_path / "run.toml"
    config.write_text(
        tomli_w.dumps(
            dict(
                model=str(model_dirs["llama"]),
                prompts=prompts,
                samples=2,
                forks=2,
                max_new_tokens=10,
                layers=[0, 2],
                device="cpu",
                batch_rows=6,
            )
        )
    )
    store = tmp_path / "killed.duckdb"
    command = [PYTHON, "-m", "ingest", "--config", str(config), "--store", str(store), "--no-progress"]
    killed = subprocess.run(
        command,
        env=cli_env(tmp_path) | {"BRANCHLENS_FAULT": "commit:2"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -9 and "fault: commit 2" in killed.stderr, killed.stderr[-2000:]
    with reading(store) as con:
        assert con.execute("SELECT prompt_id FROM prompts").fetchall() == [(0,)]
    resumed = subprocess.run(command, env=cli_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and "resuming run" in resumed.stderr, resumed.stderr[-2000:]
    assert "5 written (1 already in the store)" in resumed.stdout
    reference, run_id = uninterrupted(command, tmp_path)
    assert dump(store, run_id) == dump(reference, run_id)
