"""Latents from elsewhere (issue 33): a run exported as plain arrays and imported into another store is the
same run, row for row and number for number; malformed inputs are refused in one line with nothing
written; an import cut short resumes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from helpers import PROMPTS, PYTHON, dump, ingest

from store import StoreError
from store.exchange import export_arrays, import_arrays


@pytest.fixture(scope="module")
def source(model_dirs, tmp_path_factory):
    """A real ingest of the tiny Llama (3 prompts, samples and forks, layers 0-2), exported as arrays."""
    from ingest.config import build_config

    folder = tmp_path_factory.mktemp("exchange")
    store = folder / "source.duckdb"
    run_id = ingest(
        build_config(
            dict(
                model=str(model_dirs["llama"]),
                prompts=list(PROMPTS),
                samples=2,
                forks=1,
                depth=1,
                max_new_tokens=8,
                layers=[0, 1, 2],
                device="cpu",
                store=str(store),
            )
        )
    ).run_id
    out = export_arrays(store, run_id, folder / "arrays")
    return store, run_id, out


def _cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "store", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )


def test_export_then_import_is_the_same_run_row_for_row_and_view_for_view(source, tmp_path):
    from analysis.project import ProjectionSpec
    from analysis.residualize import ResidualSpec
    from analysis.view import ViewSpec
    from views.service import Selection, compute

    store, run_id, arrays = source
    target = tmp_path / "target.duckdb"
    done = _cli(
        "import",
        "--tokens",
        str(arrays / "tokens.parquet"),
        "--latents",
        str(arrays / "latents.npz"),
        "--store",
        str(target),
        "--run-id",
        "again",
        cwd=tmp_path,
    )
    assert done.returncode == 0 and "3 prompts imported" in done.stdout, done.stderr
    assert dump(target, "again") == dump(store, run_id)  # prompts, branches, tokens, latents: every row
    pca = ProjectionSpec(method="pca")
    for method in ("none", "auto"):
        spec = ViewSpec(residual=ResidualSpec(method=method), projection=pca)
        a = compute(store, Selection(run_id, 1, fit_scope="run"), spec).result.metrics
        b = compute(target, Selection("again", 1, fit_scope="run"), spec).result.metrics
        for key in ("r2_pos", "leak", "leak_prompt", "token_leak", "probe", "purity_branch_pooled"):
            same = [
                json.dumps(m[key], sort_keys=True) for m in (a, b)
            ]  # NaN-aware (3 prompts: no probe chance)
            assert same[0] == same[1], (method, key)
        assert a["removal"] == b["removal"]
    again = _cli(
        "import",
        "--tokens",
        str(arrays / "tokens.parquet"),
        "--latents",
        str(arrays / "latents.npz"),
        "--store",
        str(target),
        "--run-id",
        "again",
        cwd=tmp_path,
    )
    assert (
        again.returncode == 0 and "0 prompts imported" in again.stdout and "(3 there before)" in again.stdout
    )


def test_an_import_cut_after_one_prompt_resumes_to_the_same_run(source, tmp_path):
    """A prompt is one transaction: a store holding the first prompt only (what a killed import leaves)
    gets the others from the same command, and equals an import that was never cut."""
    store, run_id, arrays = source
    tokens = pl.read_parquet(arrays / "tokens.parquet")
    first = tokens["prompt_id"].min()
    keep = (tokens["prompt_id"] == first).to_numpy()
    cut = tmp_path / "cut"
    cut.mkdir()
    tokens.filter(pl.Series(keep)).write_parquet(cut / "tokens.parquet")
    with np.load(arrays / "latents.npz") as f:
        np.savez(cut / "latents.npz", **{k: f[k][keep] for k in f.files})
    target = tmp_path / "t.duckdb"
    import_arrays(target, cut / "tokens.parquet", cut / "latents.npz", run_id="r")
    with pytest.raises(
        StoreError, match="already exists in .* with other settings"
    ):  # other content: refused
        import_arrays(target, arrays / "tokens.parquet", arrays / "latents.npz", run_id="r")
    whole = tmp_path / "whole.duckdb"
    import_arrays(whole, arrays / "tokens.parquet", arrays / "latents.npz", run_id="r")
    assert dump(whole, "r") == dump(store, run_id)


def _broken(arrays, tmp_path, how: str):
    tokens = pl.read_parquet(arrays / "tokens.parquet")
    with np.load(arrays / "latents.npz") as f:
        latents = {k: f[k].copy() for k in f.files}
    if how == "shape":
        latents["layer_1"] = latents["layer_1"][:-1]
    elif how == "width":
        latents["layer_2"] = latents["layer_2"][:, :-1]
    elif how == "duplicate":
        tokens = tokens.with_columns(
            pl.when(pl.int_range(pl.len()) == 1)
            .then(pl.col("position").first())
            .otherwise(pl.col("position"))
            .alias("position")
        )
    elif how == "parent":
        child = tokens.filter(pl.col("parent_branch_id").is_not_null())["branch_id"][0]
        tokens = tokens.with_columns(
            pl.when(pl.col("branch_id") == child)
            .then(9999)
            .otherwise(pl.col("parent_branch_id"))
            .alias("parent_branch_id")
        )
    elif how == "nan":
        latents["layer_0"][5, 3] = np.nan
    elif how == "column":
        tokens = tokens.drop("token_text")
    elif how == "gap":
        root = tokens["branch_id"][0]
        tokens = tokens.with_columns(
            pl.when((pl.col("branch_id") == root) & (pl.int_range(pl.len()) == 0))
            .then(-1)
            .otherwise(pl.col("position"))
            .alias("position")
        )
    tokens.write_parquet(tmp_path / "tokens.parquet")
    np.savez(tmp_path / "latents.npz", **latents)
    return tmp_path / "tokens.parquet", tmp_path / "latents.npz"


@pytest.mark.parametrize(
    "how, message",
    [
        ("shape", "layer 1 has"),
        ("width", "the layers have different widths"),
        ("duplicate", "more than once"),
        ("parent", "parent branch 9999 is not in the table"),
        ("nan", "layer 0 holds NaN or infinite values (first at token row 5)"),
        ("column", "lacks column(s) token_text"),
        ("gap", "are not contiguous"),
    ],
)
def test_malformed_input_is_one_line_and_writes_nothing(source, tmp_path, how, message):
    _, _, arrays = source
    tokens, latents = _broken(arrays, tmp_path, how)
    target = tmp_path / "target.duckdb"
    out = _cli(
        "import", "--tokens", str(tokens), "--latents", str(latents), "--store", str(target), cwd=tmp_path
    )
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr and not target.exists()


def test_independent_samples_import_as_single_level_trees(tmp_path):
    """Branches without a tree: each sample a root of its own prompt (no parent), from a CSV table."""
    rng = np.random.default_rng(0)
    rows = [(p, p, None, t, int(rng.integers(0, 50)), f"w{t}") for p in range(3) for t in range(6)]
    table = pl.DataFrame(
        rows,
        schema=["prompt_id", "branch_id", "parent_branch_id", "position", "token_id", "token_text"],
        orient="row",
    )
    table.write_csv(tmp_path / "tokens.csv")
    np.savez(tmp_path / "latents.npz", layer_3=rng.normal(size=(len(table), 8)).astype(np.float32))
    report = import_arrays(
        tmp_path / "s.duckdb", tmp_path / "tokens.csv", tmp_path / "latents.npz", run_id="ind"
    )
    assert report.prompts_written == 3 and report.layers == [3]
    got = dump(tmp_path / "s.duckdb", "ind")
    assert [(b[0], b[1], b[2], b[3], b[4]) for b in got["branches"]] == [(p, p, None, 0, 0) for p in range(3)]
    assert len(got["latents"]) == 18


def test_a_view_exports_as_parquet_that_pandas_opens_with_both_projections_and_the_verdict(source, tmp_path):
    import json

    import pandas as pd
    import pyarrow.parquet as pq

    store, run_id, _ = source
    out = tmp_path / "view.parquet"
    done = subprocess.run(
        [
            PYTHON,
            "-m",
            "views",
            "export",
            str(store),
            "--layer",
            "1",
            "--projection",
            "pca",
            "--to",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "BRANCHLENS_CACHE": str(tmp_path / "cache")},
    )
    assert done.returncode == 0, done.stderr
    frame = pd.read_parquet(out)
    assert {"x", "y", "raw_x", "raw_y", "token_text", "branch_id", "prompt_id", "position"} <= set(
        frame.columns
    )
    assert frame[["x", "y", "raw_x", "raw_y"]].notna().all().all()
    meta = json.loads(pq.read_schema(out).metadata[b"branchlens"])
    assert meta["selection"]["run"] == run_id and meta["verdict"].startswith("Position explains")
    assert meta["removed"]["n_tokens"] == len(frame)
    bad = subprocess.run(
        [PYTHON, "-m", "views", "export", str(tmp_path / "nope.duckdb"), "--layer", "1", "--to", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "does not exist" in bad.stderr


def test_a_run_copied_across_stores_is_the_same_run(source, tmp_path):
    store, run_id, _ = source
    target = tmp_path / "copy.duckdb"
    done = _cli("copy", str(store), "--run", run_id, "--store", str(target), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert dump(target, run_id) == dump(store, run_id)
    from store import queries, reading

    with reading(store) as a, reading(target) as b:
        ra, rb = queries.run_row(a, run_id), queries.run_row(b, run_id)
    assert (ra["model"], ra["pe_type"], ra["n_layers"]) == (rb["model"], rb["pe_type"], rb["n_layers"])
    assert rb["status"] == "complete" and '"source": "import"' in rb["config"]


def test_sequences_with_shared_prefixes_become_a_tree_of_forks(tmp_path):
    """Whole sequences in, parent/fork records out: each forks off the earlier sequence it shares the
    longest prefix of, where they part; a prefix of an earlier one adds nothing; one sharing nothing is
    another root. The stored latents are each sequence's own rows from its fork on."""
    seqs = {
        (0, "A"): [1, 2, 3, 4, 5],
        (0, "B"): [1, 2, 3, 9, 9, 9],
        (0, "C"): [1, 2, 7],
        (0, "D"): [1, 2, 3],
        (1, "E"): [5, 6],
        (1, "F"): [8, 8],
    }
    rows = [(p, s, i, t, f"t{t}") for (p, s), ids in seqs.items() for i, t in enumerate(ids)]
    table = pl.DataFrame(
        rows, schema=["prompt_id", "sequence_id", "position", "token_id", "token_text"], orient="row"
    )
    table.write_parquet(tmp_path / "seqs.parquet")
    vec = np.arange(len(table) * 4, dtype=np.float32).reshape(len(table), 4)  # row r holds 4r .. 4r+3
    np.savez(tmp_path / "latents.npz", layer_0=vec)
    done = _cli(
        "import",
        "--sequences",
        "--tokens",
        str(tmp_path / "seqs.parquet"),
        "--latents",
        str(tmp_path / "latents.npz"),
        "--store",
        str(tmp_path / "s.duckdb"),
        "--run-id",
        "seq",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    got = dump(tmp_path / "s.duckdb", "seq")
    assert [b[:4] for b in got["branches"]] == [
        (0, 0, None, 0),
        (1, 0, 0, 3),
        (2, 0, 0, 2),
        (3, 1, None, 0),
        (4, 1, None, 0),
    ]
    row = {(p, s, i): r for r, (p, s, i, _, _) in enumerate(rows)}
    expected = {
        0: [row[0, "A", i] for i in range(5)],
        1: [row[0, "B", i] for i in (3, 4, 5)],
        2: [row[0, "C", 2]],
        3: [row[1, "E", i] for i in range(2)],
        4: [row[1, "F", i] for i in range(2)],
    }
    stored = {}
    for branch_id, position, _, _, v in got["latents"]:
        stored.setdefault(branch_id, []).append((position, list(v)))
    for branch_id, src in expected.items():
        assert [v for _, v in sorted(stored[branch_id])] == [vec[r].tolist() for r in src], branch_id
    assert len(got["tokens"]) == 5 + 3 + 1 + 2 + 2  # D, a prefix of A, added nothing


def test_a_root_holding_its_prompt_and_what_followed_is_split_where_the_prompt_ends(tmp_path):
    """Reviewed: a root whose rows said is_prompt T,T,T,F,F was stored as five prompt tokens (the store
    marks a root's tokens as its prompt). The generated part becomes a sample forking at position 3; the
    root's child forking later hangs from that sample; logprobs come through."""
    rows = [(0, 0, None, p, 10 + p, f"w{p}", p < 3, -float(p)) for p in range(5)] + [
        (0, 1, 0, p, 20 + p, f"v{p}", False, -1.0) for p in (4, 5)
    ]  # forks at 4: after the prompt's end
    table = pl.DataFrame(
        rows,
        schema=[
            "prompt_id",
            "branch_id",
            "parent_branch_id",
            "position",
            "token_id",
            "token_text",
            "is_prompt",
            "logprob",
        ],
        orient="row",
    )
    table.write_parquet(tmp_path / "t.parquet")
    np.savez(tmp_path / "l.npz", layer_0=np.arange(len(table) * 2, dtype=np.float32).reshape(-1, 2))
    import_arrays(tmp_path / "s.duckdb", tmp_path / "t.parquet", tmp_path / "l.npz", run_id="r")
    got = dump(tmp_path / "s.duckdb", "r")
    assert [b[:6] for b in got["branches"]] == [
        (0, 0, None, 0, 0, "prompt"),
        (1, 0, 2, 4, 2, "fork"),
        (2, 0, 0, 3, 1, "sample"),
    ]
    assert got["prompts"][0][2] == 3  # the prompt's length
    prompt_flags = {(t[0], t[1]): t[6] for t in got["tokens"]}
    assert [prompt_flags[0, p] for p in range(3)] == [True] * 3 and prompt_flags[2, 3] is False
    assert [t[4] for t in got["tokens"] if t[0] == 2] == [-3.0, -4.0]  # logprobs kept
    # a root with no prompt row at all is left whole (its tokens count as its prompt), not split into nothing
    table.filter(pl.col("branch_id") == 0).with_columns(pl.lit(False).alias("is_prompt")).write_parquet(
        tmp_path / "u.parquet"
    )
    np.savez(tmp_path / "u.npz", layer_0=np.zeros((5, 2), np.float32))
    import_arrays(tmp_path / "u.duckdb", tmp_path / "u.parquet", tmp_path / "u.npz", run_id="u")
    assert [b[:4] for b in dump(tmp_path / "u.duckdb", "u")["branches"]] == [(0, 0, None, 0)]


def test_broken_latents_files_are_one_line(source, tmp_path):
    _, _, arrays = source
    data = (arrays / "latents.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 3])
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    for name in ("cut.npz", "bad.safetensors"):
        out = _cli(
            "import",
            "--tokens",
            str(arrays / "tokens.parquet"),
            "--latents",
            str(tmp_path / name),
            "--store",
            str(tmp_path / "s.duckdb"),
            cwd=tmp_path,
        )
        assert out.returncode == 2 and out.stderr.startswith("error: cannot read latents"), out.stderr
        assert "Traceback" not in out.stderr and not (tmp_path / "s.duckdb").exists()
