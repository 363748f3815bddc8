"""Shards on S3-compatible storage, against a real S3 server (moto's server mode on a local port): the
commit marker, resume of uncommitted shards, merge and in-place reading from a bucket, and one-line
errors for bad URLs, missing buckets or credentials and unreachable endpoints."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
from helpers import PYTHON, app_charts, dump, dump_rows

from store import StoreError
from store.inplace import open_shards
from store.queries import layer_vectors, run_summary
from store.records import BranchRecord, RunRecord
from store.shards import (
    finished_shards,
    merge,
    read_manifest,
    run_dir,
    shard_exists,
    sweep,
    write_manifest,
    write_shard,
)

DIM = 8
LAYERS = [0, 3]
RUN = RunRecord("run-s3", "tiny", {"samples": 1}, "hash-1", 3, DIM, "rope", "cpu", "float32")
N_PROMPTS, PER_TASK = 5, 2  # tasks 0, 1, 2 holding prompts [0, 1], [2, 3], [4]


def prompt_tree(prompt_id: int) -> tuple[int, str, int, list[BranchRecord]]:
    """A prompt of 3 tokens and one 4-token sample, latents drawn from a generator seeded by the prompt."""
    rng = np.random.default_rng(prompt_id)

    def record(branch_id: int, parent: int | None, fork: int, n: int, kind: str) -> BranchRecord:
        return BranchRecord(
            branch_id=branch_id,
            prompt_id=prompt_id,
            parent_branch_id=parent,
            fork_position=fork,
            depth=int(parent is not None),
            kind=kind,
            path=kind[0] + str(branch_id),
            token_ids=rng.integers(0, 50, n),
            token_texts=[f"w{i}" for i in range(n)],
            logprobs=rng.normal(size=n).astype(np.float32),
            entropies=np.ones(n, np.float32),
            ended_with_eos=False,
            latents=rng.normal(size=(len(LAYERS), n, DIM)).astype(np.float32),
        )

    base = 2 * prompt_id
    return (
        prompt_id,
        f"prompt {prompt_id}",
        3,
        [record(base, None, 0, 3, "prompt"), record(base + 1, base, 3, 4, "sample")],
    )


def task(t: int) -> list[tuple[int, str, int, list[BranchRecord]]]:
    return [prompt_tree(p) for p in range(t * PER_TASK, min((t + 1) * PER_TASK, N_PROMPTS))]


def write_run(where: str, tasks=range(3)) -> str:
    path = run_dir("unused", RUN.run_id, where)
    write_manifest(path, RUN, N_PROMPTS, PER_TASK)
    for t in tasks:
        assert write_shard(path, t, task(t), LAYERS)
    return path


def objects(s3, under: str = "") -> list[str]:
    """Every object key in the test bucket (relative to it), as the server lists them."""
    infos = s3.fs.get_file_info(pafs.FileSelector(f"{s3.bucket}/{under}".rstrip("/"), recursive=True))
    return sorted(i.path[len(s3.bucket) + 1 :] for i in infos if i.type == pafs.FileType.File)


def test_s3_shards_commit_with_a_marker_and_merge_to_the_same_rows_as_local_shards(s3, tmp_path):
    remote = write_run(s3.url)
    local = write_run(str(tmp_path / "shards"))
    assert remote == f"{s3.url}/run-s3"

    keys = objects(s3)
    assert "runs/run-s3/run.json" in keys
    for t in range(3):
        markers = [
            k for k in keys if k.startswith(f"runs/run-s3/shard-{t:05d}/") and k.endswith(".committed")
        ]
        assert len(markers) == 1, keys
        attempt = markers[0][: -len(".committed")]
        assert sorted(k for k in keys if k.startswith(attempt + "/")) == [
            f"{attempt}/{name}.parquet" for name in ("branches", "latents", "prompts", "tokens")
        ]
        marker = json.loads(s3.fs.open_input_stream(f"{s3.bucket}/{markers[0]}").read())
        assert marker["files"]["prompts"]["rows"] == len(task(t))
        assert marker["run_id"] == RUN.run_id and marker["task"] == t
    assert read_manifest(remote)["run"]["run_id"] == RUN.run_id
    assert sorted(finished_shards(remote)) == [0, 1, 2] and shard_exists(remote, 2)

    assert merge(remote, tmp_path / "from_s3.duckdb", created_by="test") == (3, 0, True)
    assert merge(local, tmp_path / "from_local.duckdb", created_by="test") == (3, 0, True)
    assert dump(tmp_path / "from_s3.duckdb", RUN.run_id) == dump(tmp_path / "from_local.duckdb", RUN.run_id)
    # merging again adds nothing
    assert merge(remote, tmp_path / "from_s3.duckdb", created_by="test") == (0, 3, True)
    # a committed shard is not written again: no new object appears
    before = objects(s3)
    assert write_shard(remote, 1, task(1), LAYERS) is False
    assert objects(s3) == before


_KILLED_WRITER = """
import sys
sys.path.insert(0, {tests!r})
from test_s3_shards import LAYERS, task
from store.shards import write_shard
write_shard({path!r}, 1, task(1), LAYERS)
"""


def test_s3_shard_killed_before_its_marker_is_ignored_then_redone(s3, tmp_path):
    """A writer SIGKILLed (fault hook `shard`) after uploading task 1's four files but before its marker:
    nothing of it counts (listing, merge, in-place reads); resume writes the task again, and the dead
    attempt's objects are swept once the run is complete. A stray half object written straight to the
    server for task 2 is ignored the same way."""
    path = write_run(s3.url, tasks=[0])
    script = _KILLED_WRITER.format(tests=str(Path(__file__).parent), path=path)
    killed = subprocess.run(
        [PYTHON, "-c", script],
        env=s3.env | {"BRANCHLENS_FAULT": "shard:1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -9 and "fault: shard 1" in killed.stderr, killed.stderr[-2000:]
    uploaded = [k for k in objects(s3, "runs/run-s3/shard-00001")]
    assert len(uploaded) == 4 and all(k.endswith(".parquet") for k in uploaded)  # data there, no marker
    with s3.fs.open_output_stream(f"{s3.bucket}/runs/run-s3/shard-00002/attempt-x/latents.parquet") as f:
        f.write(b"PAR1 half an upload")

    assert sorted(finished_shards(path)) == [0] and not shard_exists(path, 1)
    store = tmp_path / "s.duckdb"
    assert merge(path, store, created_by="test") == (1, 0, False)
    with open_shards(path) as con:
        assert con.execute("SELECT list(prompt_id ORDER BY prompt_id) FROM prompts").fetchall()[0][0] == [
            0,
            1,
        ]
        assert con.execute("SELECT status FROM runs").fetchall() == [("running",)]

    # resume: the uncommitted tasks are written again and count
    for t in (1, 2):
        assert write_shard(path, t, task(t), LAYERS)
    assert sorted(finished_shards(path)) == [0, 1, 2]
    assert sweep(path) == 2  # the killed attempt of task 1, the stray object of task 2
    assert all(
        k.endswith(".committed")
        or k.split("/")[3]
        in {m.split("/")[3][: -len(".committed")] for m in objects(s3) if m.endswith(".committed")}
        for k in objects(s3)
        if "/shard-" in k
    )
    assert merge(path, store, created_by="test") == (2, 1, True)
    reference = tmp_path / "local.duckdb"
    merge(write_run(str(tmp_path / "shards")), reference, created_by="test")
    assert dump(store, RUN.run_id) == dump(reference, RUN.run_id)


def test_s3_shards_read_in_place_answer_like_the_merged_store(s3, tmp_path):
    path = write_run(s3.url)
    store = tmp_path / "m.duckdb"
    merge(path, store, created_by="test")
    from store import reading

    with open_shards(path) as con, reading(store) as merged:
        assert dump_rows(con, RUN.run_id) == dump_rows(merged, RUN.run_id)
        assert run_summary(con, RUN.run_id) == run_summary(merged, RUN.run_id)
        assert run_summary(con, RUN.run_id)["status"] == "complete"
        got, want = layer_vectors(con, RUN.run_id, 3), layer_vectors(merged, RUN.run_id, 3)
        assert (
            got[0].equals(want[0])
            and got[1].shape == (N_PROMPTS * 7, DIM)
            and np.array_equal(got[1], want[1])
        )
        for view in ("branch_tokens", "branch_latents", "branch_lineage"):
            query = f"SELECT * FROM {view} ORDER BY ALL"
            assert con.execute(query).fetchall() == merged.execute(query).fetchall() != []
        # the vector is the fixed-size FLOAT[d] of a store: array functions work on it
        assert con.execute(
            "SELECT any_value(typeof(vec)), max(array_cosine_similarity(vec, vec)) FROM latents"
        ).fetchall() == [(f"FLOAT[{DIM}]", pytest.approx(1.0))]


def test_shards_read_in_place_from_a_local_directory_too(tmp_path):
    path = write_run(str(tmp_path / "shards"), tasks=[0, 2])
    with open_shards(path) as con:
        assert con.execute("SELECT count(*), list(prompt_id ORDER BY prompt_id) FROM prompts").fetchall() == [
            (3, [0, 1, 4])
        ]
        assert con.execute("SELECT status FROM runs").fetchall() == [("running",)]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    "url, expected",
    [
        ("s3://Bad_Bucket/x", "bad S3 URL s3://Bad_Bucket/x: 'Bad_Bucket' is not a bucket name"),
        ("s3:///runs", "bad S3 URL s3:///runs: '' is not a bucket name"),
        (
            "gs://bucket/x",
            "unsupported shard location gs://bucket/x: use a local directory or s3://bucket/prefix",
        ),
    ],
)
def test_s3_bad_urls_are_refused_in_one_line(url, expected, s3):
    with pytest.raises(StoreError) as err:
        merge(url, "unused.duckdb", created_by="test")
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)


def test_s3_missing_bucket_credentials_or_endpoint_give_one_line_and_leave_the_store_as_it_was(
    s3, tmp_path, monkeypatch
):
    path = write_run(s3.url)
    store = tmp_path / "s.duckdb"
    merge(path, store, created_by="test")
    before = dump(store, RUN.run_id)

    def merge_error(where: str, **env: str | None) -> str:
        command = [PYTHON, "-m", "store", "merge", where, "--store", str(store)]
        environment = {k: v for k, v in (s3.env | env).items() if v is not None}
        done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and done.stdout == "", done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
        return lines[0]

    missing = f"no-such-{s3.bucket}"
    assert merge_error(f"s3://{missing}/runs/run-s3") == (
        f"error: cannot use s3://{missing}/runs/run-s3: bucket '{missing}' does not exist (create it first)"
    )
    no_credentials = merge_error(
        path,
        AWS_ACCESS_KEY_ID=None,
        AWS_SECRET_ACCESS_KEY=None,
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
    )
    assert no_credentials.startswith(f"error: cannot read {path}/run.json: ")
    assert no_credentials.endswith(
        "(no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
    )
    wrong = merge_error(path, AWS_SECRET_ACCESS_KEY="not-the-secret")
    assert wrong == (
        f"error: cannot read {path}/run.json: access denied (check AWS_ACCESS_KEY_ID / "
        "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the bucket's permissions)"
    )
    dead = f"http://127.0.0.1:{_closed_port()}"
    unreachable = merge_error(path, AWS_ENDPOINT_URL=dead)
    assert f"cannot reach the S3 endpoint {dead}" in unreachable
    assert dump(store, RUN.run_id) == before


def test_s3_ingest_with_a_missing_bucket_stops_before_any_work(s3, model_dirs, tmp_path):
    pytest.importorskip("ray", reason="Ray is the optional 'distributed' extra")
    store = tmp_path / "x.duckdb"
    done = subprocess.run(
        [
            PYTHON,
            "-m",
            "ingest",
            "--config",
            str(_tiny_config(model_dirs, tmp_path)),
            "--store",
            str(store),
            "--workers",
            "1",
            "--no-progress",
            "--shards",
            f"s3://missing-{s3.bucket}/runs",
        ],
        env=s3.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: cannot use s3://missing-{s3.bucket}/runs: bucket 'missing-{s3.bucket}' does not exist (create it first)"
    )
    assert not store.exists()


def _tiny_config(model_dirs, tmp_path):
    import tomli_w

    config = tmp_path / "run.toml"
    config.write_text(
        tomli_w.dumps(
            dict(
                model=str(model_dirs["llama"]),
                prompts=["a b", "c d"],
                samples=1,
                forks=1,
                max_new_tokens=4,
                layers=[0],
                device="cpu",
            )
        )
    )
    return config


def test_s3_the_app_opens_a_runs_shards_in_place(s3, tmp_path, monkeypatch):
    """The Store box takes a run's shard URL (or a local shard directory): the app draws it without a merge,
    with every committed token, and a root set to another prefix keeps it out."""
    from streamlit.testing.v1 import AppTest

    app = str(Path(__file__).resolve().parents[1] / "app.py")
    monkeypatch.setenv("BRANCHLENS_NO_WARMUP", "1")
    monkeypatch.setenv("BRANCHLENS_CACHE", str(tmp_path / "cache"))
    remote, local = write_run(s3.url), write_run(str(tmp_path / "shards"))
    for where in (remote, local):
        at = AppTest.from_file(app, default_timeout=240)
        at.session_state["store_path"] = where
        at.run()
        assert not at.exception and not at.error, [e.value for e in at.exception] + [
            e.value for e in at.error
        ]
        assert at.selectbox(key="run").value == RUN.run_id
        with open_shards(where) as con:
            # the first four prompts; their position-0 tokens are random ids, not one BOS id, so they are kept
            expected = con.execute(
                "SELECT count(*) FROM latents JOIN branches USING (run_id, branch_id) "
                "WHERE layer = 3 AND prompt_id < 4"
            ).fetchone()[0]
        assert f"{N_PROMPTS} prompts" in at.caption[0].value
        tables = [
            t
            for _, ts in app_charts(at)
            for t in ts
            if "raw_x" in t.column_names and "token_text" in t.column_names
        ]
        assert tables and tables[0].num_rows == expected
    monkeypatch.setenv("BRANCHLENS_STORE_ROOT", "s3://another-bucket")
    at = AppTest.from_file(app, default_timeout=240)
    at.session_state["store_path"] = remote
    at.run()
    assert [i.value.split("`")[0] for i in at.info] == ["No store at "]
