"""The SQL tab's sandbox and the app's read connections: limits enforced by DuckDB and the kernel, not by
reading the query's text (issue 36, items 2-5 and 10)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import duckdb
import psutil
import pytest
from helpers import PYTHON

from analysis.synthetic import branch_tree
from store.connect import open_read, reading
from store.errors import StoreError
from store.sandbox import SqlError, run_query
from views.synthetic import write_tree

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sql_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("sandbox") / "s.duckdb"
    write_tree(path, branch_tree(n_prompts=2, branches_per_prompt=3, length=20, d=8))
    return path


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """Where the sandbox makes its per-query folders, so a test can see what is left."""
    where = tmp_path / "tmp"
    where.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(where))
    return where


def _store_reaching_for(sql_store, tmp_path, name: str, statements: list[str]):
    """A copy of sql_store changed by `statements` ({secret} stands for a server file's path) and carrying a
    macro that reads that file; (path, secret)."""
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-LINE\n")
    path = tmp_path / f"{name}.duckdb"
    path.write_bytes(sql_store.read_bytes())
    with duckdb.connect(str(path)) as con:
        for sql in [*statements, "CREATE MACRO secret() AS (SELECT content FROM read_text('{secret}'))"]:
            con.execute(sql.format(secret=secret))
    return path, secret


@pytest.fixture
def hostile_store(sql_store, tmp_path):
    """A store whose `prompts` is a view over a server file and which carries a macro reading another."""
    return _store_reaching_for(
        sql_store,
        tmp_path,
        "hostile",
        [
            "ALTER TABLE prompts RENAME TO prompts_kept",
            "CREATE VIEW prompts AS SELECT p.run_id, p.prompt_id, f.content AS text, p.n_tokens "
            "FROM prompts_kept p, read_text('{secret}') f",
        ],
    )


@pytest.fixture
def sneaky_store(sql_store, tmp_path):
    """A store whose contract tables are all there, with the contract view `branch_tokens` redefined over a
    server file and a macro reading it: what the open-time check cannot see, the locked config stops."""
    return _store_reaching_for(
        sql_store,
        tmp_path,
        "sneaky",
        [
            "DROP VIEW branch_latents",
            "DROP VIEW branch_tokens",
            "CREATE VIEW branch_tokens AS SELECT content AS text FROM read_text('{secret}')",
        ],
    )


def test_a_contract_table_replaced_by_a_view_is_refused_on_open(hostile_store):
    """Tried: `prompts` a view over /etc/passwd showed the file in the Prompts picker. The open-time check
    finds the table missing, so no view of the store runs at all."""
    path, _ = hostile_store
    with pytest.raises(StoreError, match="is a damaged branchlens store: table.s. prompts missing") as caught:
        with reading(path):
            pass
    assert "TOP-SECRET" not in str(caught.value) and "\n" not in str(caught.value)


def test_a_store_view_over_a_server_file_reads_nothing_and_says_one_line(sneaky_store):
    """The store's own views and macros run inside every read connection (app, report, views): file access
    is off there, so they fail with one StoreError line; nothing of the file comes out."""
    path, _ = sneaky_store
    with (
        pytest.raises(StoreError, match="file system operations are disabled") as caught,
        reading(path) as con,
    ):
        con.sql("SELECT text FROM branch_tokens").fetchall()
    assert "TOP-SECRET" not in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(StoreError, match="file system operations are disabled"), reading(path) as con:
        con.sql("SELECT secret()").fetchall()
    con = open_read(path)
    try:
        with pytest.raises(duckdb.Error, match="configuration has been locked"):
            con.execute("SET enable_external_access = true")
    finally:
        con.close()
    with pytest.raises(SqlError, match="file system operations are disabled"):
        run_query(path, "SELECT text FROM branch_tokens")


@pytest.mark.parametrize(
    "which, message",
    [("hostile", "table(s) prompts missing"), ("sneaky", "file system operations are disabled")],
)
def test_the_app_shows_one_line_not_the_file_for_a_hostile_store(
    which, message, hostile_store, sneaky_store, monkeypatch, tmp_path
):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("BRANCHLENS_NO_WARMUP", "1")
    monkeypatch.setenv("BRANCHLENS_CACHE", str(tmp_path / "cache"))
    path, _ = hostile_store if which == "hostile" else sneaky_store
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=240)
    at.session_state["store_path"] = str(path)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert [e.value for e in at.error] and message in at.error[0].value, [e.value for e in at.error]
    shown = " ".join(str(e) for e in [*at.main, *at.sidebar])
    assert "TOP-SECRET" not in shown


def test_assembled_names_reach_no_server_folder_and_harmless_text_runs(sql_store, private_tmp):
    """What text matching let through (names assembled at run time) shows no folder of the server's but the
    query's own private folder and the store file itself; text that merely mentions a name runs."""
    home = str(Path.home())
    settings = run_query(sql_store, "SELECT name, value FROM query('SELECT * FROM duck' || 'db_settings()')")
    paths = {n: v for n, v in zip(*settings.table.to_pydict().values(), strict=True) if v and "/" in v}
    assert paths, "no setting names a folder: the check below would check nothing"
    store = str(sql_store.resolve())
    for name, value in paths.items():
        for part in value.strip("[]").split(", "):
            if not part.startswith("/"):
                continue  # e.g. TimeZone Etc/UTC
            assert part.startswith(store) or "branchlens-sql-" in part, (name, part)
            assert not part.startswith(home + "/"), (name, part)
    for sql in ("SELECT * FROM which_secret('s3://b/k', 's3')", "SELECT * FROM duckdb_extensions()"):
        with pytest.raises(SqlError) as caught:
            run_query(sql_store, sql)
        assert home + "/" not in str(caught.value) and "branchlens-sql-" in str(caught.value)
    harmless = run_query(
        sql_store,
        "SELECT count(*) AS n FROM tokens WHERE token_text LIKE '%getenv%' OR token_text = 'duckdb_settings'",
    )
    assert harmless.table.column("n").to_pylist() == [0]
    assert list(private_tmp.iterdir()) == []  # each query's folder removed


def test_the_memory_limit_holds_inside_one_expression(sql_store):
    """list_sort(range(3e8)) reached 7.1 GB through DuckDB's own limit; the child's address-space limit
    stops it with an out-of-memory line, not the time limit, and the next query runs."""
    with pytest.raises(SqlError, match="Out of Memory|out of memory"):
        run_query(sql_store, "SELECT list_sort(range(300000000))[1] AS x", timeout_s=600)
    assert run_query(sql_store, "SELECT 42 AS x").table.column("x").to_pylist() == [42]


def test_a_query_past_the_progress_bars_delay_answers(sql_store):
    """DuckDB prints a progress bar on stdout after 2 s (this one ran 2.4 s on the 2-core CI machine): the
    answer travels apart from it, so the query answers instead of 'ended without an answer'."""
    result = run_query(sql_store, "SELECT sum(i * i % 7) AS s FROM range(400000000) t(i)", timeout_s=600)
    assert int(result.table.column("s")[0].as_py()) == sum(i * i % 7 for i in range(7)) * (
        400000000 // 7
    ) + sum(i * i % 7 for i in range(400000000 % 7))


def test_spill_files_of_a_killed_query_are_removed(sql_store, private_tmp, monkeypatch):
    """A sort past the memory limit spills; the query's process killed after its first batch (fault hook)
    leaves no spill file beside the store and no private folder."""
    monkeypatch.setenv("BRANCHLENS_FAULT", "sql:1")
    with pytest.raises(SqlError, match="ended"):
        run_query(sql_store, "SELECT i FROM range(30000000) t(i) ORDER BY hash(i)", timeout_s=600)
    assert not Path(f"{sql_store}.tmp").exists()
    assert list(private_tmp.iterdir()) == []


def test_the_query_process_ends_with_the_app(sql_store, tmp_path, monkeypatch):
    """Killing the app (kill -9) mid-query left the query's process at 98% CPU forever: now it ends. The app
    here is a process held by the fault hook once its query's process said the query started; the test
    kills it there, then waits for the query's process to end (a regression hangs here, whatever the speed)."""
    script = (
        "import sys; from store.sandbox import run_query; "
        "run_query(sys.argv[1], 'SELECT count(*) FROM range(100000000000) a, range(1000000) b', "
        "timeout_s=3600)"
    )
    app = subprocess.Popen(
        [PYTHON, "-c", script, str(sql_store)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT), BRANCHLENS_FAULT="sql-wait:1:pause", TMPDIR=str(tmp_path)),
    )
    children: list[psutil.Process] = []
    try:
        for line in app.stderr:
            if "fault: sql-wait 1 paused" in line:
                break
        else:
            raise AssertionError(f"the app ended before its query started (exit {app.wait()})")
        children = [c for c in psutil.Process(app.pid).children() if "store.sandbox" in _cmdline(c)]
        assert len(children) == 1, children
        app.kill()  # kill -9, mid-query
        app.wait()
        children[0].wait()  # ends because its stdin closed with the app
        # the killed app could not remove its query's folder; the next query does
        left = list(tmp_path.glob(f"branchlens-sql-{app.pid}-*"))
        assert left, "the killed app left no query folder: the sweep below would check nothing"
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where this process's queries look
        run_query(sql_store, "SELECT 1")
        assert not any(f.exists() for f in left)
    finally:
        if app.poll() is None:
            app.kill()
        for process in children:
            if process.is_running():
                process.kill()


def _cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""
