"""Resume: a run killed part-way and started again ends identical to an uninterrupted one."""

from __future__ import annotations

import subprocess
import time

import pytest
import tomli_w

from conftest import PYTHON, cli_env, dump, ingest
from store import reading
from store.writer import StoreWriter


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
    with pytest.raises(Exception):
        ingest(cfg)
    with reading(cfg.store) as con:
        counts = {t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in ("prompts", "branches", "tokens", "latents")}
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
    cfg = tiny_cfg("gpt2")
    first = ingest(cfg)
    again = ingest(cfg)
    assert again.prompts_written == 0 and again.prompts_skipped == len(cfg.prompts)
    assert again.counts == first.counts


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tiny_cfg, model_dirs, tmp_path):
    prompts = ["The cat sat on", "Branches go apart where", "def add(a, b):", "Position dominates", "The moon"]
    settings = dict(model=str(model_dirs["llama"]), prompts=prompts, samples=2, forks=2, max_new_tokens=24,
                    layers=[0, 2], device="cpu")
    config = tmp_path / "run.toml"
    config.write_text(tomli_w.dumps(settings))
    store = tmp_path / "killed.duckdb"
    command = [PYTHON, "-m", "ingest", "--config", str(config), "--store", str(store), "--no-progress"]
    proc = subprocess.Popen(command, env=cli_env(tmp_path), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    killed_after = None
    deadline = time.monotonic() + 300
    for line in proc.stderr:
        if "written" in line and line.startswith("prompt "):
            killed_after = line.split()[1]
            proc.kill()  # SIGKILL: no cleanup handlers run
            break
        assert time.monotonic() < deadline
    proc.wait(timeout=60)
    assert proc.returncode == -9, f"run ended before it could be killed ({killed_after})"

    with reading(store) as con:
        written = con.execute("SELECT count(*) FROM prompts").fetchall()[0][0]
    assert 1 <= written < len(prompts)

    resumed = subprocess.run(command, env=cli_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming run" in resumed.stderr
    assert "complete" in resumed.stdout

    reference = ingest(tiny_cfg(store="reference.duckdb", **settings))
    assert dump(str(store), reference.run_id) == dump(reference.store, reference.run_id)


def test_five_random_sigkills_then_resume_equals_uninterrupted(model_dirs, tmp_path):
    """Kill the CLI with SIGKILL at random moments (loading, generating, inside a commit) five times,
    restarting each time; the final store equals an uninterrupted run, with no duplicate rows."""
    import random

    prompts = [f"{p} {i}" for i in range(6) for p in ["The cat sat on", "Branches go apart where", "def f(x):"]]
    config = tmp_path / "run.toml"
    config.write_text(tomli_w.dumps(dict(model=str(model_dirs["llama"]), prompts=prompts, samples=2, forks=2,
                                         max_new_tokens=24, layers=[0, 1, 2], device="cpu")))
    store = tmp_path / "killed.duckdb"
    command = [PYTHON, "-m", "ingest", "--config", str(config), "--store", str(store), "--no-progress"]
    rng = random.Random(1234)
    kills = 0
    for _ in range(5):
        proc = subprocess.Popen(command, env=cli_env(tmp_path), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=rng.uniform(1.0, 6.0))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=60)
            kills += proc.returncode == -9
        if proc.returncode == 0:
            break  # finished before this kill: nothing left to interrupt
    assert kills >= 3, kills
    final = subprocess.run(command, env=cli_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-2000:]

    reference = tmp_path / "reference.duckdb"
    clean = subprocess.run([*command[:-3], "--store", str(reference), "--no-progress"], env=cli_env(tmp_path),
                           capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-2000:]
    with reading(reference) as con:
        run_id = con.execute("SELECT run_id FROM runs").fetchall()[0][0]
    assert dump(store, run_id) == dump(reference, run_id)
    with reading(store) as con:
        dupes = con.execute("SELECT count(*) - count(DISTINCT (branch_id, position, layer, variant)) "
                            "FROM latents").fetchall()[0][0]
        assert dupes == 0 and con.execute("SELECT status FROM runs").fetchall()[0][0] == "complete"
