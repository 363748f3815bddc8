"""The store contract: schema round trip, versioning, read-only access, clear errors."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest

from store import SCHEMA_VERSION, StoreError, open_read, reading
from store.queries import branch_sequence, branch_vectors, layer_vectors, list_runs
from store.records import BranchRecord, RunRecord
from store.schema import CONTRACT_TABLES, CONTRACT_VIEWS, file_schema_version
from store.writer import StoreWriter

DIM = 4
CONTRACT_COLUMNS = {
    "runs": {"run_id", "model", "created_at", "config"},
    "prompts": {"run_id", "prompt_id", "text"},
    "branches": {"run_id", "branch_id", "prompt_id", "parent_branch_id", "fork_position"},
    "tokens": {
        "run_id",
        "branch_id",
        "position",
        "token_id",
        "token_text",
        "logprob",
        "entropy",
        "is_prompt",
    },
    "latents": {"run_id", "branch_id", "position", "layer", "variant", "vec"},
}


def branch(branch_id, parent, fork, tokens, kind, n_layers=2):
    n = len(tokens)
    latents = np.stack(
        [
            np.arange(n * DIM, dtype=np.float32).reshape(n, DIM) + 1000 * branch_id + 100 * li
            for li in range(n_layers)
        ]
    )
    return BranchRecord(
        branch_id=branch_id,
        prompt_id=0,
        parent_branch_id=parent,
        fork_position=fork,
        depth=0 if parent is None else 1,
        kind=kind,
        path=f"b{branch_id}",
        token_ids=np.array(tokens),
        token_texts=[f"t{t}" for t in tokens],
        logprobs=np.full(n, -1.0, np.float32),
        entropies=np.full(n, 2.0, np.float32),
        ended_with_eos=False,
        latents=latents,
    )


@pytest.fixture
def small_store(tmp_path):
    """A store with one run: root [10 11 12], sample 1 [20 21] from 3, fork 2 [30] at 4."""
    path = tmp_path / "s.duckdb"
    writer = StoreWriter(path, created_by="test")
    writer.prepare(DIM)
    run = RunRecord("r1", "tiny", {"a": 1}, "h1", 2, DIM, "rope", "cpu", "float32")
    assert writer.start_run(run) == set()
    records = [
        branch(0, None, 0, [10, 11, 12], "prompt"),
        branch(1, 0, 3, [20, 21], "sample"),
        branch(2, 1, 4, [30], "fork"),
    ]
    writer.write_prompt("r1", 0, "hello", 3, records, layers=[0, 5])
    writer.finish_run("r1")
    return path, records


def test_schema_file_version_matches_code():
    assert file_schema_version() == SCHEMA_VERSION


def test_contract_tables_columns_and_views(small_store):
    path, _ = small_store
    with reading(path) as con:
        for table, columns in CONTRACT_COLUMNS.items():
            found = {r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()}
            assert columns <= found, (table, columns - found)
        vec_type = con.execute(
            "SELECT data_type FROM duckdb_columns() WHERE table_name='latents' AND column_name='vec'"
        ).fetchall()[0][0]
        assert vec_type == f"FLOAT[{DIM}]"
        views = {
            r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()
        }
        assert set(CONTRACT_VIEWS) <= views
        assert set(CONTRACT_TABLES) <= {r[0] for r in con.execute("SHOW TABLES").fetchall()}


def test_round_trip_tokens_and_vectors(small_store):
    path, records = small_store
    with reading(path) as con:
        seq = branch_sequence(con, "r1", 2)
        assert seq["token_id"].to_list() == [10, 11, 12, 20, 30]
        assert seq["source_branch_id"].to_list() == [0, 0, 0, 1, 2]
        assert seq["is_prompt"].to_list() == [True, True, True, False, False]
        vecs = branch_vectors(con, "r1", 2, layer=5)
        expected = np.concatenate([records[0].latents[1], records[1].latents[1][:1], records[2].latents[1]])
        np.testing.assert_array_equal(vecs, expected)
        keys, all_vecs = layer_vectors(con, "r1", layer=0)
        assert keys.height == 6 and all_vecs.shape == (6, DIM)
        cos = con.execute("SELECT array_cosine_similarity(a.vec, a.vec) FROM latents a LIMIT 1").fetchall()[
            0
        ][0]
        assert cos == pytest.approx(1.0)
        runs = list_runs(con)
        assert runs["run_id"].to_list() == ["r1"] and runs["status"].to_list() == ["complete"]


def test_read_only_connection_cannot_write(small_store):
    path, _ = small_store
    with reading(path) as con:
        with pytest.raises(duckdb.Error):
            con.execute("DELETE FROM tokens")


def test_other_schema_version_is_refused(small_store):
    path, _ = small_store
    con = duckdb.connect(str(path))
    con.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    con.close()
    with pytest.raises(StoreError, match="schema version 999"):
        open_read(path)
    with pytest.raises(StoreError, match="schema version 999"):
        StoreWriter(path, created_by="test").prepare(DIM)


def test_foreign_files_are_refused(tmp_path):
    other = tmp_path / "other.duckdb"
    duckdb.connect(str(other)).close()
    with pytest.raises(StoreError, match="not a branchlens store"):
        open_read(other)
    junk = tmp_path / "junk.duckdb"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match="cannot open store"):
        open_read(junk)
    assert junk.read_bytes() == b"not a database at all" * 100
    with pytest.raises(StoreError, match="does not exist"):
        open_read(tmp_path / "missing.duckdb")


def test_width_mismatch_and_changed_settings_are_refused(small_store):
    path, _ = small_store
    writer = StoreWriter(path, created_by="test")
    with pytest.raises(StoreError, match="width 4"):
        writer.prepare(8)
    changed = RunRecord("r1", "tiny", {"a": 2}, "h2", 2, DIM, "rope", "cpu", "float32")
    with pytest.raises(StoreError, match="other settings"):
        writer.start_run(changed)
    same = RunRecord("r1", "tiny", {"a": 1}, "h1", 2, DIM, "rope", "cpu", "float32")
    assert writer.start_run(same) == {0}


def test_store_creation_is_atomic(tmp_path, monkeypatch):
    import store.writer as writer_module

    def broken(con, dim, created_by):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer_module, "create_schema", broken)
    path = tmp_path / "sub" / "new.duckdb"
    with pytest.raises(StoreError, match="No space left"):
        StoreWriter(path, created_by="test").prepare(DIM)
    # no store and no half-made file; only the writer's (empty) ingest lock file
    assert not path.exists() and [p.name for p in path.parent.iterdir()] == ["new.duckdb.ingest-lock"]


def test_a_dead_creators_leftovers_are_removed_and_creation_never_overwrites(tmp_path):
    import subprocess

    from helpers import PYTHON

    path = tmp_path / "new.duckdb"
    dead = int(
        subprocess.run([PYTHON, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    )
    leftovers = [tmp_path / f"new.duckdb.creating-{dead}", tmp_path / f"new.duckdb.creating-{dead}.wal"]
    for f in leftovers:
        f.write_bytes(b"half a store")
    first = StoreWriter(path, created_by="first")
    first.prepare(DIM)
    assert path.exists() and not any(f.exists() for f in leftovers)
    first.release()
    before = path.read_bytes()
    StoreWriter(path, created_by="second")._create(DIM)  # losing a creation race: the first store stays
    assert path.read_bytes() == before and not list(tmp_path.glob("new.duckdb.creating-*"))


def test_one_error_line_first_or_last():
    from store.errors import reason

    assert reason(ValueError("what went wrong\n  detail")) == "what went wrong"
    assert (
        reason(RuntimeError("ray::Task() (pid=1)\n  trace\nValueError: bad"), last_line=True)
        == "ValueError: bad"
    )
    assert reason(FileNotFoundError(2, "No such file or directory", "x")) == "No such file or directory"
    assert reason(KeyError()) == "KeyError"
