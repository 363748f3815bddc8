"""Ingest on tiny models: tree shape, shared prefixes, latents vs a fresh forward pass, determinism."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from helpers import dump, ingest
from transformers import AutoModelForCausalLM, AutoTokenizer

from ingest.generate import TreeBuilder
from ingest.models import load_model
from ingest.tree import TreePlan
from store import reading
from store.queries import branch_sequence, branch_vectors, branches, run_summary


def test_tree_shape_and_shared_prefixes(tiny_cfg, family):
    cfg = tiny_cfg(family)
    report = ingest(cfg)
    with reading(cfg.store) as con:
        table = branches(con, report.run_id)
        by_id = {row["branch_id"]: row for row in table.iter_rows(named=True)}
        assert report.counts["prompts"] == len(cfg.prompts)
        for prompt_id in range(len(cfg.prompts)):
            rows = [r for r in by_id.values() if r["prompt_id"] == prompt_id]
            roots = [r for r in rows if r["parent_branch_id"] is None]
            samples = [r for r in rows if r["kind"] == "sample"]
            forks = [r for r in rows if r["kind"] == "fork"]
            assert len(roots) == 1 and roots[0]["kind"] == "prompt" and roots[0]["fork_position"] == 0
            assert len(samples) == cfg.samples
            assert all(s["parent_branch_id"] == roots[0]["branch_id"] for s in samples)
            assert all(s["fork_position"] == roots[0]["n_tokens"] for s in samples)
            # each sample gets `forks` children unless too short to offer that many fork positions
            for s in samples:
                children = [f for f in forks if f["parent_branch_id"] == s["branch_id"]]
                room = (
                    min(s["end_position"], roots[0]["n_tokens"] + cfg.max_new_tokens - cfg.min_child_tokens)
                    - s["fork_position"]
                )
                assert len(children) == min(cfg.forks, max(room, 0))
                for child in children:
                    assert s["fork_position"] < child["fork_position"] <= s["end_position"]
                    assert child["depth"] == 2 and child["path"].startswith(s["path"] + ".f")
            assert len(rows) == 1 + len(samples) + len(forks)

        for row in by_id.values():
            seq = branch_sequence(con, report.run_id, row["branch_id"])
            assert seq["position"].to_list() == list(range(row["end_position"] + 1))
            if row["parent_branch_id"] is None:
                continue
            parent_seq = branch_sequence(con, report.run_id, row["parent_branch_id"])
            fork = row["fork_position"]
            assert seq["token_id"][:fork].to_list() == parent_seq["token_id"][:fork].to_list()
            if row["kind"] == "fork":  # a fork takes another token than its parent at the fork position
                assert seq["token_id"][fork] != parent_seq["token_id"][fork]
        # prefix tokens are stored once: every (branch, position) row in tokens is unique
        dupes = con.execute(
            "SELECT count(*) FROM (SELECT branch_id, position FROM tokens GROUP BY ALL HAVING count(*) > 1)"
        ).fetchall()[0][0]
        assert dupes == 0
        own = con.execute("SELECT sum(n_tokens) FROM branches WHERE run_id = ?", [report.run_id]).fetchall()[
            0
        ][0]
        assert own == report.counts["tokens"]


def test_latents_equal_a_fresh_forward_pass(tiny_cfg, family, model_dirs):
    cfg = tiny_cfg(family, depth=2)
    report = ingest(cfg)
    reference = AutoModelForCausalLM.from_pretrained(model_dirs[family], dtype=torch.float32).eval()
    compared = 0
    with reading(cfg.store) as con:
        for row in branches(con, report.run_id).iter_rows(named=True):
            ids = branch_sequence(con, report.run_id, row["branch_id"])["token_id"].to_list()
            with torch.no_grad():
                hidden = reference(torch.tensor([ids]), output_hidden_states=True).hidden_states
            for layer in report.layers:
                stored = branch_vectors(con, report.run_id, row["branch_id"], layer)
                expected = hidden[layer][0].numpy()
                assert stored.shape == expected.shape
                np.testing.assert_allclose(stored, expected, rtol=1e-4, atol=1e-4)
                compared += 1
    assert compared >= len(report.layers) * 3 * len(cfg.prompts)
    if family == "gemma3":
        # sequences outgrow the 8-token sliding window: forks had to recompute their prefix
        assert report.prefix_recomputed > 0
    else:
        assert report.prefix_reused > 0 and report.prefix_recomputed == 0


def _list_selection_as(lm, meaning: str) -> None:
    """Make lm's forward answer output_hidden_states=[layers] as other transformers versions do, from the
    states of output_hidden_states=True (n_layers + 1, index 0 = embeddings):
    "5.17": n_layers states, index i = decoder layer i's output (state i + 1), None where not asked;
    "only selected": the asked states alone, in order."""
    forward = lm.model.forward

    @functools.wraps(forward)  # keeps the signature the builder inspects
    def patched(*args, output_hidden_states=None, **kwargs):
        if not isinstance(output_hidden_states, list):
            return forward(*args, output_hidden_states=output_hidden_states, **kwargs)
        out = forward(*args, output_hidden_states=True, **kwargs)
        full, asked = out.hidden_states, set(output_hidden_states)
        if meaning == "5.17":
            out.hidden_states = tuple(full[i + 1] if i in asked else None for i in range(len(full) - 1))
        else:
            out.hidden_states = tuple(full[i] for i in output_hidden_states)
        return out

    lm.model.forward = patched


@pytest.mark.parametrize("meaning", ["5.17", "only selected"])
def test_other_meanings_of_a_layer_list_give_the_same_latents(tiny_cfg, meaning):
    """transformers 5.17 (a GPU image's) reads output_hidden_states=[0, 4, ...] as decoder layers' outputs,
    one index off the states this store holds; the builder must notice on its first prefill and store the
    states output_hidden_states=True gives, not shifted or missing ones."""
    cfg = tiny_cfg("llama", samples=2, forks=1, max_new_tokens=6, stop_at_eos=False)
    plan = TreePlan(cfg.samples, cfg.forks, cfg.depth)
    reference_lm = load_model(cfg.model, torch.device("cpu"), torch.float32, log=lambda _m: None)
    ids = list(reference_lm.tokenizer(cfg.prompts[0])["input_ids"])
    n_layers = reference_lm.model.config.num_hidden_layers
    # 5.17: as many layers as it returns states, so a shifted read finds a tensor for every one (the check
    # by length alone let that through); "only selected": two, so reading them by layer index fails
    layers = list(range(n_layers)) if meaning == "5.17" else [0, n_layers]
    reference = TreeBuilder(reference_lm, cfg, layers, plan)
    want = reference.build(0, ids)  # what the installed transformers gives (test_latents_equal_a_fresh_...)

    other_lm = load_model(cfg.model, torch.device("cpu"), torch.float32, log=lambda _m: None)
    _list_selection_as(other_lm, meaning)
    other = TreeBuilder(other_lm, cfg, layers, plan)
    got = other.build(0, ids)
    # 5.17's list gives other states: all states are asked for; the selected ones alone, in order, are right
    assert other._selection == (False if meaning == "5.17" else "in order")
    assert [r.token_ids.tolist() for r in got] == [r.token_ids.tolist() for r in want]
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.latents, b.latents)


def test_depth_two_forks_fork_off_forks(tiny_cfg):
    cfg = tiny_cfg("llama", depth=2, samples=1, forks=2, max_new_tokens=16, prompts=["The cat sat on"])
    report = ingest(cfg)
    with reading(cfg.store) as con:
        table = branches(con, report.run_id)
    depth3 = table.filter(table["depth"] == 3)
    assert depth3.height > 0
    parents = set(table.filter(table["depth"] == 2)["branch_id"].to_list())
    assert set(depth3["parent_branch_id"].to_list()) <= parents


def test_same_seed_same_tree_other_seed_other_tree(tiny_cfg):
    a = ingest(tiny_cfg("gpt2", store="a.duckdb", seed=7))
    b = ingest(tiny_cfg("gpt2", store="b.duckdb", seed=7))
    c = ingest(tiny_cfg("gpt2", store="c.duckdb", seed=8))
    assert a.run_id == b.run_id != c.run_id
    assert dump(a.store, a.run_id) == dump(b.store, b.run_id)
    assert dump(a.store, a.run_id)["tokens"] != dump(c.store, c.run_id)["tokens"]


def test_greedy_forks_take_the_second_best_token(tiny_cfg, model_dirs):
    cfg = tiny_cfg("llama", temperature=0.0, samples=1, forks=1, prompts=["The cat sat on"])
    report = ingest(cfg)
    reference = AutoModelForCausalLM.from_pretrained(model_dirs["llama"]).eval()
    with reading(cfg.store) as con:
        table = branches(con, report.run_id)
        fork = table.filter(table["kind"] == "fork").row(0, named=True)
        seq = branch_sequence(con, report.run_id, fork["branch_id"])["token_id"].to_list()
    with torch.no_grad():
        logits = reference(torch.tensor([seq])).logits[0]
    p = fork["fork_position"]
    assert seq[p] == int(torch.topk(logits[p - 1], 2).indices[1])  # second best at the fork
    assert all(seq[t] == int(logits[t - 1].argmax()) for t in range(p + 1, len(seq)))  # greedy after


def test_summary_counts_match_the_store(tiny_cfg):
    cfg = tiny_cfg("llama")
    report = ingest(cfg)
    with reading(cfg.store) as con:
        counts = run_summary(con, report.run_id)
    assert counts["status"] == "complete"
    assert counts["latents"] == counts["tokens"] * len(report.layers)
    assert counts["layers"] == report.layers == [0, 1, 2]
    text = report.summary()
    assert f"{counts['branches']} branches" in text and report.run_id in text


def test_prompt_logprobs_match_the_model(tiny_cfg, model_dirs):
    cfg = tiny_cfg("llama", prompts=["The cat sat on"])
    report = ingest(cfg)
    reference = AutoModelForCausalLM.from_pretrained(model_dirs["llama"]).eval()
    with reading(cfg.store) as con:
        rows = con.execute(
            "SELECT position, token_id, logprob, entropy, is_prompt FROM branch_tokens "
            "WHERE run_id = ? AND branch_id = (SELECT min(branch_id) FROM branches WHERE kind = 'sample') "
            "ORDER BY position",
            [report.run_id],
        ).fetchall()
    ids = [r[1] for r in rows]
    with torch.no_grad():
        logp = torch.log_softmax(reference(torch.tensor([ids])).logits[0], -1)
    assert rows[0][2] is None and rows[0][3] is None  # nothing predicts position 0
    for pos in range(1, len(ids)):
        assert rows[pos][2] == pytest.approx(float(logp[pos - 1, ids[pos]]), abs=1e-4)
        entropy = float(-(logp[pos - 1].exp() * logp[pos - 1]).sum())
        assert rows[pos][3] == pytest.approx(entropy, abs=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["llama"])
    prompt_ids = tokenizer("The cat sat on")["input_ids"]
    assert prompt_ids[0] == tokenizer.bos_token_id
    assert [r[1] for r in rows if r[4]] == prompt_ids
