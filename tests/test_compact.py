"""Compaction: the rewritten store holds the same rows, no free space, and answers the same SQL."""

from __future__ import annotations

import os
import subprocess

import numpy as np
from helpers import PYTHON, cli_env, dump, ingest

from analysis.synthetic import branch_tree
from store import reading
from store.compact import compact, free_fraction
from store.queries import layer_vectors, token_rows
from store.writer import StoreWriter
from views.synthetic import write_tree


def test_ingest_compacts_its_store_and_keeps_every_row(tiny_cfg):
    cfg = tiny_cfg("llama", prompts=["The cat sat on"] * 6, layers="all", compact=False)
    report = ingest(cfg)
    before = dump(cfg.store, report.run_id)
    with reading(cfg.store) as con:
        assert free_fraction(con) > 0.2  # per-prompt commits leave free blocks behind
    size = report.store.stat().st_size
    result = compact(cfg.store)
    assert result.bytes_after < size == result.bytes_before
    with reading(cfg.store) as con:
        assert free_fraction(con) == 0
        assert (
            con.execute("SELECT count(*) FROM branch_tokens WHERE run_id = ?", [report.run_id]).fetchall()[0][
                0
            ]
            > 0
        )
        cos = con.execute("SELECT min(array_cosine_similarity(vec, vec)) FROM latents").fetchall()[0][0]
        assert abs(cos - 1) < 1e-6
    assert dump(cfg.store, report.run_id) == before

    # the same run with compaction on (the default) ends compacted on its own, with the same rows
    auto = tiny_cfg("llama", store="auto.duckdb", prompts=["The cat sat on"] * 6, layers="all")
    report = ingest(auto)
    assert "compact" in report.seconds
    with reading(auto.store) as con:
        assert free_fraction(con) == 0
    assert dump(auto.store, report.run_id) == before


def test_compact_command_errors_and_a_held_lock(tmp_path):
    env = cli_env(tmp_path)
    missing = subprocess.run(
        [PYTHON, "-m", "store", "compact", str(tmp_path / "none.duckdb")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert (
        missing.returncode == 2
        and missing.stderr.strip() == f"error: store {tmp_path / 'none.duckdb'} does not exist"
    )

    store = tmp_path / "s.duckdb"
    run_id = write_tree(store, branch_tree(n_prompts=3, branches_per_prompt=3, length=20, d=8))
    before = dump(store, run_id)
    writer = StoreWriter(store, created_by="test")
    with writer._connection():  # an ingest holding the write lock
        held = subprocess.run(
            [PYTHON, "-m", "store", "compact", str(store), "--lock-timeout", "0.5"],
            env=env,
            capture_output=True,
            text=True,
        )
    assert (
        held.returncode == 2 and held.stderr.count("\n") == 1 and "written by another process" in held.stderr
    )
    assert dump(store, run_id) == before and not list(tmp_path.glob("s.duckdb.compact-*"))
    ok = subprocess.run(
        [PYTHON, "-m", "store", "compact", str(store)], env=env, capture_output=True, text=True
    )
    assert ok.returncode == 0 and ok.stdout.startswith("compacted ")
    assert dump(store, run_id) == before


def test_vectors_line_up_with_labels_whatever_the_storage_order(tmp_path):
    """Reads sort in numpy, not in DuckDB: a store whose rows are stored out of order must read the same."""
    tree = branch_tree(n_prompts=4, branches_per_prompt=3, length=15, d=6, seed=3)
    ordered, shuffled = tmp_path / "a.duckdb", tmp_path / "b.duckdb"
    run_id = write_tree(ordered, tree, extra_layers=1)
    for prompt in (3, 1, 0, 2):  # prompts committed out of order
        write_tree(shuffled, tree.subset(tree.prompt == prompt), run_id=run_id, extra_layers=1)
    for layer in (0, 1):
        with reading(ordered) as con:
            keys_a, vec_a = layer_vectors(con, run_id, layer)
            rows_a, tok_a = token_rows(con, run_id, layer)
            sub_rows, sub_vec = token_rows(con, run_id, layer, prompt_ids=[2], generated_only=True)
        with reading(shuffled) as con:
            keys_b, vec_b = layer_vectors(con, run_id, layer)
            rows_b, tok_b = token_rows(con, run_id, layer)
        assert keys_a.equals(keys_b) and np.array_equal(vec_a, vec_b)
        assert rows_a.equals(rows_b) and np.array_equal(tok_a, tok_b) and np.array_equal(vec_a, tok_a)
        keys = list(zip(keys_a["branch_id"], keys_a["position"]))
        assert keys == sorted(keys)
        # a filtered read gives exactly the matching rows of the full one
        index = {k: i for i, k in enumerate(keys)}
        picked = [index[k] for k in zip(sub_rows["branch_id"], sub_rows["position"])]
        assert set(sub_rows["prompt_id"]) == {2} and not any(sub_rows["is_prompt"])
        assert np.array_equal(sub_vec, vec_a[picked])


def test_the_next_writer_removes_copies_of_dead_compactions_only(tmp_path):
    store = tmp_path / "s.duckdb"
    write_tree(store, branch_tree(n_prompts=1, branches_per_prompt=2, length=5, d=4))
    dead = subprocess.run([PYTHON, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = [tmp_path / f"s.duckdb.compact-{dead_pid}", tmp_path / f"s.duckdb.compact-{dead_pid}.wal"]
    live = tmp_path / f"s.duckdb.compact-{os.getpid()}"  # a compaction still running
    for f in (*stale, live):
        f.write_bytes(b"half a copy")
    StoreWriter(store, created_by="test").prepare(4)
    assert not any(f.exists() for f in stale) and live.exists()


def test_compaction_merges_a_leftover_wal_first_and_the_store_opens_after(tmp_path):
    """A writer killed after a commit leaves STORE.wal; compaction used to replace the file and keep that
    log, and every later open failed ('WAL does not match database file')."""
    store = tmp_path / "s.duckdb"
    run_id = write_tree(store, branch_tree(n_prompts=3, branches_per_prompt=3, length=20, d=8))
    killed = subprocess.run(
        [
            PYTHON,
            "-c",
            f"import duckdb, os, signal; c = duckdb.connect({str(store)!r}); "
            "c.execute(\"INSERT INTO meta VALUES ('left', 'in the wal')\"); "
            "os.kill(os.getpid(), signal.SIGKILL)",
        ],
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -9 and (tmp_path / "s.duckdb.wal").exists()
    done = subprocess.run(
        [PYTHON, "-m", "store", "compact", str(store)], env=cli_env(tmp_path), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "s.duckdb.wal").exists()
    with reading(store) as con:
        assert con.execute("SELECT value FROM meta WHERE key = 'left'").fetchall() == [("in the wal",)]
        assert con.execute("SELECT count(*) FROM runs WHERE run_id = ?", [run_id]).fetchall()[0][0] == 1
    StoreWriter(store, created_by="test").prepare(8)  # a writer (resume) opens it too


def paused_compaction(store, tmp_path) -> subprocess.Popen:
    """`python -m store compact STORE` held by the fault hook inside its copy (the copy written, not yet in
    place); a line on its stdin lets it go on."""
    proc = subprocess.Popen(
        [PYTHON, "-m", "store", "compact", str(store)],
        env=cli_env(tmp_path) | {"BRANCHLENS_FAULT": "compact:1:pause"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stderr:
        if "fault: compact 1 paused" in line:
            return proc
    raise AssertionError(f"the compaction ended before its copy (exit {proc.wait()})")


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    proc.stdin.write("\n")
    proc.stdin.close()
    err = proc.stderr.read()
    return proc.wait(), err  # stderr read to its end: the process is ending


def test_overlapping_compactions_cannot_both_swap_and_lose_nothing(tmp_path):
    """Two compactions at once (issue 36, 1): the second is refused with one line while the first holds the
    store's one-writer claim, so no copy of an older file can replace rows written in between."""
    store = tmp_path / "s.duckdb"
    run_id = write_tree(store, branch_tree(n_prompts=3, branches_per_prompt=3, length=20, d=8))
    before = dump(store, run_id)
    first = paused_compaction(store, tmp_path)
    try:
        second = subprocess.run(
            [PYTHON, "-m", "store", "compact", str(store)],
            env=cli_env(tmp_path),
            capture_output=True,
            text=True,
        )
        assert second.returncode == 2 and second.stderr.count("\n") == 1
        assert f"another ingest, merge or compaction (pid {first.pid}) is writing to {store}" in second.stderr
        code, err = finish(first)
    finally:
        first.kill()
        first.wait()
    assert code == 0, err[-2000:]
    assert dump(store, run_id) == before


def test_a_compaction_refuses_to_swap_a_file_that_changed_underneath(tmp_path):
    """A store replaced by another file while its compaction copies the old one (not through branchlens):
    the compaction's copy is discarded, not put in place of the new file."""
    import shutil

    store = tmp_path / "s.duckdb"
    run_id = write_tree(store, branch_tree(n_prompts=3, branches_per_prompt=3, length=20, d=8))
    other = tmp_path / "other.duckdb"
    other_run = write_tree(
        other, branch_tree(n_prompts=2, branches_per_prompt=2, length=10, d=8, seed=5), run_id="run-other"
    )
    first = paused_compaction(store, tmp_path)
    try:
        shutil.copy(other, tmp_path / "swap.duckdb")
        os.replace(tmp_path / "swap.duckdb", store)
        code, err = finish(first)
    finally:
        first.kill()
        first.wait()
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"error: cannot compact store {store}: the file changed while it was being compacted (replaced by another "
        "process); the copy was discarded, the file left as it is now"
    )
    assert dump(store, "run-other") == dump(other, other_run) and not list(
        tmp_path.glob("s.duckdb.compact-*")
    )
    assert run_id != "run-other"


def _store_and_another_name(tmp_path, make_name) -> tuple:
    """A small store, a second name for it made by make_name(target, name) (a symlink or a hard link), and
    `python -m store compact` through that name run twice: while a claim on the first name is held, then
    after it is released."""
    store = tmp_path / "s.duckdb"
    write_tree(store, branch_tree(n_prompts=2, branches_per_prompt=2, length=10, d=8))
    other = tmp_path / "other.duckdb"
    make_name(store, other)
    compact = lambda: subprocess.run(
        [PYTHON, "-m", "store", "compact", str(other)], env=cli_env(tmp_path), capture_output=True, text=True
    )
    writer = StoreWriter(store, created_by="test")
    writer.claim()
    try:
        held = compact()
    finally:
        writer.release()
    return store, other, held, compact()


def test_the_writer_claim_holds_through_a_symlink(tmp_path):
    """The one-writer lock belongs to the store file, not to the path typed: a compaction through a symlink
    waits for a claim taken on the real path."""
    store, link, held, done = _store_and_another_name(tmp_path, lambda target, name: name.symlink_to(target))
    assert held.returncode == 2 and f"(pid {os.getpid()}) is writing to {link}" in held.stderr
    # Released: the compaction through the link rewrites the store itself and the link still names it
    # (replacing the link with the copy left the real store stale behind a regular file).
    assert done.returncode == 0, done.stderr
    assert link.is_symlink() and link.resolve() == store.resolve() and store.is_file()


def test_the_writer_claim_holds_through_a_hard_link(tmp_path):
    """A hard link names the same file beside another lock file: the claim also locks the file itself, so a
    compaction through the link is refused in one line while a claim on the first name is held, and runs
    once it is released."""
    _, _, held, free = _store_and_another_name(tmp_path, os.link)
    assert held.returncode == 2 and "under another name (a hard link)" in held.stderr, held.stderr
    assert len(held.stderr.strip().splitlines()) == 1
    assert free.returncode == 0, free.stderr
