"""`python -m views synthetic STORE`: a synthetic run where position dominates, known by construction,
written through the store writer and opened like any store (real DuckDB files, no mocks)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import PYTHON, cli_env, dump

from analysis.metrics import label_purity, r2_pos
from analysis.residualize import make_residualizer
from analysis.synthetic import branch_tree
from analysis.tokens import find_sinks
from store import reading
from store.queries import run_summary, token_rows
from views.__main__ import main
from views.synthetic import write_tree

ROOT = Path(__file__).resolve().parents[1]
RUN = "run-synthetic-helix"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """The command as users run it, with its defaults."""
    tmp = tmp_path_factory.mktemp("synthetic")
    path = tmp / "helix.duckdb"
    done = subprocess.run(
        [PYTHON, "-m", "views", "synthetic", str(path)],
        cwd=ROOT,
        env=cli_env(tmp),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"run {RUN}: complete")
    return path


def layer_tokens(path: Path, layer: int):
    with reading(path) as con:
        keys, X = token_rows(con, RUN, layer)
    return keys, X


def test_the_store_opens_with_consistent_counts(store):
    with reading(store) as con:
        run = con.execute(
            "SELECT model, status, n_layers, d_model, pe_type, config FROM runs WHERE run_id = ?", [RUN]
        ).fetchone()
        summary = run_summary(con, RUN)
        prompts = con.execute(
            "SELECT prompt_id, text, n_tokens FROM prompts WHERE run_id = ? ORDER BY prompt_id", [RUN]
        ).fetchall()
        roots = con.execute(
            "SELECT prompt_id, n_tokens FROM branches WHERE run_id = ? AND kind = 'prompt' "
            "ORDER BY prompt_id",
            [RUN],
        ).fetchall()
        per_branch = con.execute(
            """
            SELECT b.branch_id, b.n_tokens, b.end_position - b.fork_position + 1, count(t.position),
                   min(t.position) = any_value(b.fork_position) AND max(t.position) = any_value(b.end_position)
            FROM branches b JOIN tokens t USING (run_id, branch_id) WHERE b.run_id = ?
            GROUP BY b.branch_id, b.n_tokens, b.fork_position, b.end_position""",
            [RUN],
        ).fetchall()
        layers_per_token = con.execute(
            """
            SELECT count(*), min(n), max(n) FROM (
                SELECT count(*) AS n FROM latents WHERE run_id = ? AND variant = 'normal'
                GROUP BY branch_id, position)""",
            [RUN],
        ).fetchone()
        full = con.execute(
            """
            SELECT count(*), sum((n = end_position + 1 AND lo = 0 AND hi = end_position)::INT) FROM (
                SELECT b.branch_id, b.end_position, count(*) AS n, min(s.position) AS lo, max(s.position) AS hi
                FROM branches b JOIN branch_tokens s USING (run_id, branch_id) WHERE b.run_id = ? GROUP BY ALL)""",
            [RUN],
        ).fetchone()
        width = con.execute("SELECT value FROM meta WHERE key = 'vector_dim'").fetchone()[0]
    model, status, n_layers, d_model, pe_type, config = run
    config = json.loads(config)
    assert (model, status, n_layers, d_model, width) == ("synthetic-helix", "complete", 3, 128, "128")
    assert pe_type == "synthetic"
    assert summary["prompts"] == 8 and summary["layers"] == [0, 1, 2, 3]
    assert 8 * 4 < summary["branches"] <= 8 * 13  # a root per prompt, its samples, most forks
    assert summary["latents"] == 4 * summary["tokens"]
    assert layers_per_token == (summary["tokens"], 4, 4)
    # each branch stores its own contiguous segment, as many tokens as it says
    assert all(n == span == count and contiguous for _, n, span, count, contiguous in per_branch)
    # every branch's full sequence (prefix included) runs from the BOS to its end
    assert full == (summary["branches"], summary["branches"])
    # the prompts: texts recorded in the config, lengths that match their root branches
    assert [p[1] for p in prompts] == config["prompts"] and all(p[1] for p in prompts)
    assert [(p[0], p[2]) for p in prompts] == roots
    # the config documents each layer's structure and its measured variance shares
    assert config["layers"] == [0, 1, 2, 3]
    structure = config["layer_structure"]
    assert structure["0"]["position"] == 0 and structure["0"]["variance_share"]["token"] > 0.9
    assert structure["1"]["variance_share"]["position"] > 0.7
    assert structure["2"]["variance_share"]["branch"] > 0.1
    assert structure["3"]["variance_share"]["position"] < 0.1 and all(s["note"] for s in structure.values())


def test_token_ids_come_from_a_vocabulary_not_from_position(store):
    with reading(store) as con:
        rows = con.execute(
            "SELECT t.position, t.token_id, t.token_text, t.logprob, t.is_prompt, b.kind "
            "FROM tokens t JOIN branches b USING (run_id, branch_id) WHERE t.run_id = ?",
            [RUN],
        ).fetchall()
        eos = con.execute(
            """
            SELECT b.ended_with_eos, t.token_text FROM branches b
            JOIN tokens t ON t.run_id = b.run_id AND t.branch_id = b.branch_id AND t.position = b.end_position
            WHERE b.run_id = ?""",
            [RUN],
        ).fetchall()
    position = np.array([r[0] for r in rows])
    ids = np.array([r[1] for r in rows])
    texts: dict[int, set[str]] = {}
    for _, i, text, *_ in rows:
        texts.setdefault(i, set()).add(text)
    assert all(len(t) == 1 for t in texts.values())  # one text per id, as a tokenizer decodes it
    assert 100 < len(texts) <= 402  # a few hundred made-up words plus BOS / EOS
    assert {next(iter(texts[i])) for i in ids[position == 0]} == {"<bos>"}
    assert "<bos>" not in {next(iter(texts[i])) for i in ids[position > 0]}
    # not a function of position: many ids at a position, the same id at many positions
    later = position > 0
    per_position = {p: len(set(ids[position == p])) for p in np.unique(position[later])}
    crowded = [p for p in per_position if (position == p).sum() >= 20]
    assert crowded and all(per_position[p] >= 5 for p in crowded)
    common = np.bincount(ids[later]).argmax()
    assert len(set(position[ids == common])) > 50
    assert abs(np.corrcoef(position[later], ids[later])[0, 1]) < 0.1
    # a Zipf-like frequency: the commonest token is far more frequent than the median one
    counts = np.sort(np.bincount(ids[later])[np.bincount(ids[later]) > 0])[::-1]
    assert counts[0] > 10 * np.median(counts)
    # logprob is NULL at position 0 only; prompt tokens belong to the prompt's root
    assert all((r[3] is None) == (r[0] == 0) for r in rows)
    assert all(r[4] == (r[5] == "prompt") for r in rows)
    assert all(ended == (text == "<eos>") for ended, text in eos) and any(e for e, _ in eos)


def test_forks_have_parents(store):
    with reading(store) as con:
        branches = {
            r[0]: r
            for r in con.execute(
                "SELECT branch_id, prompt_id, parent_branch_id, fork_position, end_position, depth, kind, path "
                "FROM branches WHERE run_id = ?",
                [RUN],
            ).fetchall()
        }
        token = dict(
            ((b, p), t)
            for b, p, t in con.execute(
                "SELECT branch_id, position, token_id FROM branch_tokens WHERE run_id = ?", [RUN]
            ).fetchall()
        )
    kinds = {"prompt": 0, "sample": 0, "fork": 0}
    for bid, prompt, parent, fork, end, depth, kind, path in branches.values():
        kinds[kind] += 1
        if parent is None:
            assert (kind, depth, fork, path) == ("prompt", 0, 0, "prompt")
            continue
        p = branches[parent]
        assert p[1] == prompt and depth == p[5] + 1
        assert p[3] < fork <= p[4] + 1 and end >= fork
        if kind == "sample":
            assert p[6] == "prompt" and fork == p[4] + 1
        else:
            assert kind == "fork" and p[6] != "prompt" and path.startswith(p[7] + ".f")
            assert p[3] < fork <= p[4]  # forks off its parent's own tokens
            assert token[(bid, fork)] != token[(parent, fork)]  # and re-samples the token there
    assert kinds["prompt"] == 8 and kinds["sample"] == 8 * 4 and kinds["fork"] > 8 * 4
    assert max(b[5] for b in branches.values()) >= 3  # forks of forks


def test_layers_hold_the_documented_structure(store):
    r2 = {}
    for layer in range(4):
        keys, X = layer_tokens(store, layer)
        position = keys["position"].to_numpy()
        sinks = find_sinks(X, position)
        assert np.array_equal(sinks, position == 0)  # the BOS and nothing else
        norms = np.linalg.norm(X, axis=1)
        ratio = norms[position == 0].min() / np.median(norms[position > 0])
        assert (ratio > 10) if layer > 0 else (ratio < 2)  # an attention sink from layer 1 on
        keep = ~sinks
        r2[layer] = r2_pos(X[keep], position[keep], groups=keys["prompt_id"].to_numpy()[keep])
    # layer 0: token identity only, R2_pos inside its chance band; layer 1: far above it
    band = max(4 * r2[0]["chance_sd"], 0.005)
    assert abs(r2[0]["r2"] - r2[0]["chance"]) <= band and abs(r2[0]["adjusted"]) < 0.01
    assert r2[1]["r2"] > r2[1]["chance"] + 0.6 and r2[1]["heldout"] > 0.6
    assert r2[2]["r2"] > r2[2]["chance"] + 0.5
    assert r2[3]["r2"] < 0.1 < r2[2]["r2"]


def test_removing_position_reveals_the_branches_at_layer_2(store):
    keys, X = layer_tokens(store, 2)
    position = keys["position"].to_numpy()
    keep = position > 0
    X, position, branch = X[keep], position[keep], keys["branch_id"].to_numpy()[keep]
    residual = make_residualizer(method="per_position").fit(X, position).transform(X, position)
    raw = label_purity(X, position, branch, window=None, n_queries=500)
    removed = label_purity(residual, position, branch, window=None, n_queries=500)
    assert removed["purity"] > 0.9 and removed["purity"] > raw["purity"] + 0.2


def test_same_settings_again_write_nothing(store, capsys):
    before = dump(store, RUN)
    with reading(store) as con:
        run_row = con.execute("SELECT * FROM runs WHERE run_id = ?", [RUN]).fetchall()
    data = store.read_bytes()
    assert main(["synthetic", str(store)]) == 0
    assert "already complete: nothing written" in capsys.readouterr().out
    assert store.read_bytes() == data and dump(store, RUN) == before
    with reading(store) as con:
        assert con.execute("SELECT * FROM runs WHERE run_id = ?", [RUN]).fetchall() == run_row


def test_a_killed_run_resumes_to_the_same_rows(tmp_path, capsys):
    small = ["--prompts", "4", "--branches", "5", "--length", "24"]
    whole = tmp_path / "whole.duckdb"
    assert main(["synthetic", str(whole), *small]) == 0
    killed = tmp_path / "killed.duckdb"
    env = cli_env(tmp_path) | {"BRANCHLENS_FAULT": "commit:3"}  # SIGKILL inside the third prompt's commit
    cmd = [PYTHON, "-m", "views", "synthetic", str(killed), *small]
    died = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert died.returncode != 0 and "fault: commit 3" in died.stderr
    with reading(killed) as con:
        assert run_summary(con, RUN)["prompts"] == 2 and run_summary(con, RUN)["status"] == "running"
    again = subprocess.run(cmd, cwd=ROOT, env=cli_env(tmp_path), capture_output=True, text=True)
    assert again.returncode == 0 and "2 written, 2 already there" in again.stdout, again.stdout + again.stderr
    assert dump(killed, RUN) == dump(whole, RUN)


def test_write_tree_can_store_token_ids_apart_from_position(tmp_path):
    tree = branch_tree(n_prompts=2, branches_per_prompt=3, length=20, d=8)
    ids = np.random.default_rng(0).integers(0, 50, size=len(tree))
    run_id = write_tree(tmp_path / "t.duckdb", tree, token_ids=ids)
    with reading(tmp_path / "t.duckdb") as con:
        keys, _ = token_rows(con, run_id, 0, with_vectors=False)
    order = np.lexsort((tree.position, tree.branch))  # token_rows orders by (branch, position)
    assert np.array_equal(keys["token_id"].to_numpy(), ids[order])
    assert keys["token_text"].to_list() == [f" w{i}" for i in ids[order]]


def test_other_settings_are_refused_and_the_store_is_untouched(store, tmp_path, capsys):
    copy = tmp_path / "copy.duckdb"
    shutil.copy(store, copy)
    data = copy.read_bytes()
    for argv, message in (
        (["--seed", "1"], "already exists"),
        (["--length", "40"], "already exists"),
        (["--d", "64"], "width 128"),
    ):
        assert main(["synthetic", str(copy), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
        assert copy.read_bytes() == data
    assert main(["synthetic", str(tmp_path / "new.duckdb"), "--length", "2"]) == 2
    assert capsys.readouterr().err.startswith("error: --length")
    assert not (tmp_path / "new.duckdb").exists()
    # another run id puts a second run beside the first, which stays as it was
    before = dump(copy, RUN)
    assert (
        main(["synthetic", str(copy), "--seed", "1", "--prompts", "2", "--run-id", "run-synthetic-s1"]) == 0
    )
    assert dump(copy, RUN) == before
    with reading(copy) as con:
        assert run_summary(con, "run-synthetic-s1")["prompts"] == 2


def test_the_app_opens_it(tmp_path, monkeypatch, capsys):
    from streamlit.testing.v1 import AppTest

    path = tmp_path / "small.duckdb"
    assert main(["synthetic", str(path), "--prompts", "4", "--branches", "4", "--length", "24"]) == 0
    monkeypatch.setenv("BRANCHLENS_NO_WARMUP", "1")
    monkeypatch.setenv("BRANCHLENS_CACHE", str(tmp_path / "cache"))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=240)
    at.session_state["store_path"] = str(path)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert at.selectbox(key="run").value == RUN
    assert "synthetic-helix" in at.caption[0].value
