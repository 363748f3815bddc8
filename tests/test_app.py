"""The dashboard driven by Streamlit's AppTest on real stores: a tiny-model ingest and synthetic trees."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from streamlit.testing.v1 import AppTest

from conftest import PROMPTS, PYTHON, ingest

APP = str(Path(__file__).resolve().parents[1] / "app.py")


@pytest.fixture(scope="module")
def store(model_dirs, tmp_path_factory):
    """A real ingest on the tiny Llama: 3 prompts x 2 samples x 1 fork, layers 0, 1, 2."""
    from ingest.config import build_config

    path = tmp_path_factory.mktemp("app") / "app.duckdb"
    cfg = build_config(dict(model=str(model_dirs["llama"]), prompts=list(PROMPTS), samples=2, forks=1, depth=1,
                            max_new_tokens=10, layers=[0, 1, 2], device="cpu", store=str(path)))
    return path, ingest(cfg).run_id


@pytest.fixture(autouse=True)
def app_env(monkeypatch, tmp_path):
    monkeypatch.setenv("BRANCHLENS_NO_WARMUP", "1")
    monkeypatch.setenv("BRANCHLENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("BRANCHLENS_LOCK_TIMEOUT", "1")


def open_app(path) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=240)
    at.session_state["store_path"] = str(path)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def chart_tables(at: AppTest) -> list[list[pa.Table]]:
    """Per Vega-Lite chart on the page, its datasets as Arrow tables."""
    out = []
    for el in _elements(at.main):
        if getattr(el, "type", None) == "vega_lite_chart":
            out.append([pa.ipc.open_stream(ds.data.data).read_all() for ds in el.proto.datasets])
    return out


def _elements(node):
    children = getattr(node, "children", None)
    if isinstance(children, dict):
        for child in children.values():
            yield from _elements(child)
    else:
        yield node


def projection(at: AppTest) -> dict[str, pa.Table]:
    """The side-by-side chart's points, trajectory vertices and fork markers."""
    tables = chart_tables(at)[0]
    named = {}
    for t in tables:
        cols = set(t.column_names)
        if {"raw_x", "res_x", "token_text"} <= cols:
            named["points"] = t
        elif "order" in cols:
            named.setdefault("lines", t)
        elif "anchor_branch_id" in cols:
            named.setdefault("forks", t)
    return named


def expected_tokens(path, run_id, layer=1, generated_only=False) -> int:
    with duckdb.connect(str(path), read_only=True) as con:
        where = " AND NOT t.is_prompt" if generated_only else ""
        return con.execute(
            "SELECT count(*) FROM latents l JOIN tokens t USING (run_id, branch_id, position) "
            f"WHERE l.run_id = ? AND l.layer = ? AND t.position > 0{where}", [run_id, layer]).fetchall()[0][0]


def test_opens_the_store_with_both_projections_trajectories_and_numbers(store):
    path, run_id = store
    at = open_app(path)
    assert at.selectbox(key="run").value == run_id
    assert at.selectbox(key="layer").value == 1  # the middle stored layer
    parts = projection(at)
    # Every stored token but the BOS sinks, once in each panel's dataset (the two panels share it).
    assert parts["points"].num_rows == expected_tokens(path, run_id)
    with duckdb.connect(str(path), read_only=True) as con:
        n_branches, n_children = con.execute(
            "SELECT count(*), count(parent_branch_id) FROM branches WHERE run_id = ?", [run_id]).fetchall()[0]
    assert len(set(parts["lines"].column("branch_id").to_pylist())) == n_branches
    # Every child starts its line at a fork point on its lineage (the BOS is never a fork point here).
    assert parts["forks"].num_rows == n_children
    metrics = at.dataframe[0].value
    assert "R2_pos (variance explained by position)" in metrics["metric"].to_list()
    assert at.markdown and "<mark>" not in at.markdown[0].value  # nothing selected yet


def test_widgets_change_the_view(store):
    path, run_id = store
    at = open_app(path)
    before = projection(at)["points"]
    at.checkbox(key="generated_only").check().run()
    generated = projection(at)["points"]
    assert generated.num_rows == expected_tokens(path, run_id, generated_only=True) < before.num_rows
    at.checkbox(key="generated_only").uncheck()
    at.selectbox(key="layer").set_value(2).run()
    other_layer = projection(at)["points"]
    assert other_layer.num_rows == before.num_rows
    assert other_layer.column("raw_x").to_pylist() != before.column("raw_x").to_pylist()
    at.checkbox(key="trajectories").uncheck().run()
    assert "lines" not in projection(at) and "forks" not in projection(at)
    at.selectbox(key="color_by").set_value("position").run()
    spec = json.loads(next(e for e in _elements(at.main) if getattr(e, "type", None) == "vega_lite_chart").proto.spec)
    assert "position" in json.dumps(spec["hconcat"][0]["layer"][-1]["encoding"]["color"])
    at.checkbox(key="keep_sinks").check().run()
    assert projection(at)["points"].num_rows == before.num_rows + 3  # the three prompts' BOS tokens
    assert not at.exception


def test_layers_tab_and_clusters(store):
    path, run_id = store
    at = open_app(path)
    profile = [t for t in chart_tables(at) if t and "method" in t[0].column_names]
    assert profile and set(profile[0][0].column("layer").to_pylist()) == {0, 1, 2}
    clusters = at.dataframe[-1].value
    assert clusters["tokens"].sum() == expected_tokens(path, run_id)


@pytest.mark.parametrize("sql, message", [
    ("CREATE TABLE x AS SELECT 1", "CREATE statements are not allowed"),
    ("COPY tokens TO 'out.csv'", "COPY statements are not allowed"),
    ("SELECT * FROM read_csv('/etc/passwd')", "file system operations are disabled"),
    ("ATTACH 'other.duckdb' AS other", "ATTACH statements are not allowed"),
])
def test_sql_tab_refuses_writes_and_files(store, sql, message):
    path, _ = store
    at = open_app(path)
    at.text_area(key="sql").input(sql)
    at.button(key="sql_run").click().run()
    assert not at.exception
    assert any(message in e.value for e in at.error), [e.value for e in at.error]


def test_sql_tab_runs_a_query(store):
    path, run_id = store
    at = open_app(path)
    at.text_area(key="sql").input(f"SELECT branch_id, count(*) AS n FROM tokens WHERE run_id = '{run_id}' GROUP BY 1")
    at.button(key="sql_run").click().run()
    assert not at.error
    with duckdb.connect(str(path), read_only=True) as con:
        n = con.execute("SELECT count(*) FROM branches WHERE run_id = ?", [run_id]).fetchall()[0][0]
    assert len(at.dataframe[-1].value) == n


def test_missing_empty_and_foreign_stores_give_messages(tmp_path):
    at = open_app(tmp_path / "nothing.duckdb")
    assert "No store at" in at.info[0].value
    from store.writer import StoreWriter

    empty = tmp_path / "empty.duckdb"
    StoreWriter(empty, created_by="test").prepare(8)
    at = open_app(empty)
    assert "holds no runs" in at.info[0].value
    newer = tmp_path / "newer.duckdb"
    StoreWriter(newer, created_by="test").prepare(8)
    with duckdb.connect(str(newer)) as con:
        con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    at = open_app(newer)
    assert at.error and "schema version 99" in at.error[0].value
    foreign = tmp_path / "foreign.duckdb"
    with duckdb.connect(str(foreign)) as con:
        con.execute("CREATE TABLE t(a INT)")
    at = open_app(foreign)
    assert at.error and "branchlens" in at.error[0].value


def test_a_store_held_by_a_writer_shows_a_note_not_a_crash(store, tmp_path):
    """DuckDB allows one writer xor readers: while another process holds the file, the app says so."""
    path, _ = store
    copy = tmp_path / "busy.duckdb"
    copy.write_bytes(Path(path).read_bytes())
    holder = subprocess.Popen([PYTHON, "-c", f"import duckdb, time; c = duckdb.connect({str(copy)!r}); "
                               "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        at = open_app(copy)
        assert at.warning and "ingest is committing" in at.warning[0].value
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.2)
    at = open_app(copy)
    assert not at.warning and projection(at)["points"].num_rows > 0


def test_too_many_points_are_sampled_by_branch_or_binned(store):
    path, run_id = store
    at = open_app(path)
    total = projection(at)["points"].num_rows
    at.number_input(key="max_points").set_value(100).run()
    assert total > 100 and any("more than 100 to draw" in r.label for r in at.radio)
    assert at.warning and "slow the browser" in at.warning[0].value
    sampled = projection(at)["points"]
    assert 0 < sampled.num_rows <= 100
    # Whole branches only: every sampled branch has all its plotted tokens.
    counts = {}
    for b in sampled.column("branch_id").to_pylist():
        counts[b] = counts.get(b, 0) + 1
    with duckdb.connect(str(path), read_only=True) as con:
        full = dict(con.execute(
            "SELECT l.branch_id, count(*) FROM latents l WHERE run_id = ? AND layer = 1 AND position > 0 "
            "GROUP BY 1", [run_id]).fetchall())
    assert all(full[b] == n for b, n in counts.items())
    at.radio(key="big_mode").set_value("density").run()
    spec = json.loads(next(e for e in _elements(at.main) if getattr(e, "type", None) == "vega_lite_chart").proto.spec)
    assert spec["hconcat"][0]["mark"]["type"] == "rect"
    at.selectbox(key="color_by").set_value("cluster")
    at.radio(key="big_mode").set_value("draw all").run()
    assert projection(at)["points"].num_rows == total and not at.exception


def test_app_reads_while_an_ingest_writes(model_dirs, tmp_path):
    """Two real processes: an ingest writing prompt after prompt, the app re-reading the store meanwhile.
    The app never raises, shows either the committed data or a note, and the ingest finishes."""
    import tomli_w

    from conftest import cli_env

    import threading

    prompts = [f"{p} {i}" for i in range(12) for p in PROMPTS]
    config = tmp_path / "run.toml"
    config.write_text(tomli_w.dumps(dict(model=str(model_dirs["llama"]), prompts=prompts, samples=2, forks=1,
                                         max_new_tokens=32, layers=[0, 2], device="cpu")))
    store = tmp_path / "live.duckdb"
    ingest_proc = subprocess.Popen(
        [PYTHON, "-m", "ingest", "--config", str(config), "--store", str(store), "--no-progress"],
        env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    first_prompt = threading.Event()
    log: list[str] = []

    def follow() -> None:
        for line in ingest_proc.stderr:
            log.append(line)
            if line.startswith("prompt ") and "written" in line:
                first_prompt.set()

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    seen = set()
    try:
        assert first_prompt.wait(timeout=300), "".join(log)[-2000:]
        deadline = time.monotonic() + 300
        while ingest_proc.poll() is None and time.monotonic() < deadline:
            at = open_app(store)  # asserts no exception
            if at.warning and "ingest is committing" in at.warning[0].value:
                seen.add("busy")
            elif at.info and "No store at" in at.info[0].value:
                seen.add("missing")
            elif any("still being written" in i.value for i in at.info):
                assert projection(at)["points"].num_rows > 0
                seen.add("partial")
            elif chart_tables(at):
                seen.add("complete")
    finally:
        ingest_proc.wait(timeout=300)
        reader.join(timeout=10)
    assert ingest_proc.returncode == 0, "".join(log)[-2000:]
    assert "partial" in seen, seen  # the app showed a run in progress at least once
    final = open_app(store)
    assert not any("still being written" in i.value for i in final.info)
    with duckdb.connect(str(store), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM prompts").fetchall()[0][0] == len(prompts)


def test_exports(store):
    path, run_id = store
    at = open_app(path)
    downloads = {b.proto.label for b in at.get("download_button")}
    assert {"CSV", "Parquet"} <= downloads and "PNG" not in downloads
    at.button(key=f"branchlens-{run_id}-layer1_render").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert {"PNG", "SVG"} <= {b.proto.label for b in at.get("download_button")}


def test_zero_pe_variant_is_offered_when_stored(model_dirs, tmp_path):
    from ingest.config import build_config

    store = tmp_path / "zp.duckdb"
    ingest(build_config(dict(model=str(model_dirs["llama"]), prompts=list(PROMPTS), samples=2, forks=1,
                             max_new_tokens=8, layers=[0, 2], device="cpu", store=str(store), zero_pe=True)))
    at = open_app(store)
    assert at.selectbox(key="variant").options == ["normal", "zero_pe"]
    assert "RoPE model: positions enter only through attention" in at.caption[0].value
    normal = projection(at)["points"]
    at.selectbox(key="variant").set_value("zero_pe").run()
    zero = projection(at)["points"]
    assert zero.num_rows == normal.num_rows
    assert zero.column("raw_x").to_pylist() != normal.column("raw_x").to_pylist()
