"""Fork levels decode as padded batches: the tree must not depend on how branches are batched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import dump, ingest

from ingest.generate import TreeBuilder, planned_batches
from ingest.models import load_model
from ingest.tree import TreePlan


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_batch_size_changes_nothing_but_rounding(tiny_cfg, family):
    kw = dict(samples=3, forks=2, depth=2, max_new_tokens=14, stop_at_eos=True, top_p=0.9)
    one = ingest(tiny_cfg(family, store="one.duckdb", batch_rows=1, **kw))
    many = ingest(tiny_cfg(family, store="many.duckdb", batch_rows=64, **kw))
    assert one.run_id == many.run_id  # batch_rows is not an output setting
    a, b = dump(one.store, one.run_id), dump(many.store, many.run_id)
    # same tree: branches, fork points, tokens and their stats
    assert a["branches"] == b["branches"] and a["prompts"] == b["prompts"]
    assert [r[:4] for r in a["tokens"]] == [r[:4] for r in b["tokens"]]
    np.testing.assert_allclose(
        np.array([r[4:6] for r in a["tokens"]], float),
        np.array([r[4:6] for r in b["tokens"]], float),
        rtol=1e-4,
        atol=1e-5,
    )
    assert [r[:4] for r in a["latents"]] == [r[:4] for r in b["latents"]]
    np.testing.assert_allclose(
        np.array([r[4] for r in a["latents"]]), np.array([r[4] for r in b["latents"]]), rtol=1e-4, atol=1e-4
    )
    # batching did happen: one forward call per decode step of a whole level, not per branch
    assert many.counts["branches"] > 3 * len(tiny_cfg().prompts)


def test_forks_are_batched_and_reuse_their_parents_cache(tiny_cfg):
    cfg = tiny_cfg("llama", samples=4, forks=3, depth=1, max_new_tokens=10, stop_at_eos=False)
    lm = load_model(cfg.model, torch.device("cpu"), torch.float32, log=lambda _m: None)
    ids = list(lm.tokenizer(cfg.prompts[0])["input_ids"])
    plan = TreePlan(cfg.samples, cfg.forks, cfg.depth)
    batched = TreeBuilder(lm, cfg, [0, 1], plan, batch_rows=64)
    records = batched.build(0, ids)
    single = TreeBuilder(lm, cfg, [0, 1], plan, batch_rows=1)
    single.build(0, ids)
    n_forks = sum(r.kind == "fork" for r in records)
    assert n_forks == 12 and batched.stats.prefix_reused == 12 and batched.stats.prefix_recomputed == 0
    # 12 forks in one batch take one feed plus one call per step of the longest fork; one by one, 12 x that
    assert batched.stats.forward_calls < single.stats.forward_calls / 3


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_prompts_decoded_together_make_the_trees_each_makes_alone(tiny_cfg, family):
    cfg = tiny_cfg(family, samples=2, forks=2, depth=2, max_new_tokens=10, stop_at_eos=True, top_p=0.9)
    lm = load_model(cfg.model, torch.device("cpu"), torch.float32, log=lambda _m: None)
    prompts = [(p, list(lm.tokenizer(text)["input_ids"])) for p, text in enumerate(cfg.prompts)]
    assert len(prompts) >= 2 and len({len(ids) for _, ids in prompts}) > 1  # unequal lengths: padding is used
    plan = TreePlan(cfg.samples, cfg.forks, cfg.depth)
    together = TreeBuilder(lm, cfg, [0, 2], plan, batch_rows=64)
    assert together.prompts_per_group >= len(prompts)
    trees = together.build_group(prompts)
    alone = TreeBuilder(lm, cfg, [0, 2], plan, batch_rows=64)
    for prompt_id, ids in prompts:
        mine = trees[prompt_id]
        ref = alone.build(prompt_id, ids)
        assert [(r.branch_id, r.parent_branch_id, r.fork_position, r.token_ids.tolist()) for r in mine] == [
            (r.branch_id, r.parent_branch_id, r.fork_position, r.token_ids.tolist()) for r in ref
        ]
        assert {r.prompt_id for r in mine} == {prompt_id}
        for a, b in zip(mine, ref):
            np.testing.assert_allclose(a.latents, b.latents, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-4, atol=1e-5)
    # rows of several prompts shared the decode steps of each level
    assert together.stats.forward_calls < alone.stats.forward_calls
    assert together.stats.generated_tokens == alone.stats.generated_tokens


@pytest.mark.parametrize("batch_rows", [1, 5, 64])
def test_the_dry_runs_plan_of_batches_is_what_the_builder_decodes(tiny_cfg, batch_rows):
    # fixed fork offsets near each branch's start: every planned fork finds its position
    cfg = tiny_cfg(
        "llama",
        samples=3,
        forks=2,
        depth=2,
        max_new_tokens=12,
        stop_at_eos=False,
        fork_rule="offsets",
        fork_offsets=[1, 2],
        min_child_tokens=1,
        prompts=["one two three", "four five", "six", "seven eight nine ten"],
    )
    lm = load_model(cfg.model, torch.device("cpu"), torch.float32, log=lambda _m: None)
    prompts = [(p, list(lm.tokenizer(text)["input_ids"])) for p, text in enumerate(cfg.prompts)]
    builder = TreeBuilder(lm, cfg, [0], TreePlan(cfg.samples, cfg.forks, cfg.depth), batch_rows=batch_rows)
    for lo in range(0, len(prompts), builder.prompts_per_group):
        builder.build_group(prompts[lo : lo + builder.prompts_per_group])
    planned = planned_batches(len(prompts), cfg.samples, cfg.forks, cfg.depth, batch_rows)
    assert builder.stats.decode_batches == planned
    assert max(planned) <= max(batch_rows, cfg.samples)


def test_checking_for_eos_every_few_steps_makes_the_same_tree(tiny_cfg):
    """On an accelerator the builder checks for a batch that has all hit EOS only every few steps; the rows
    that ended are fed on until then and their extra tokens dropped, so the tree is the one of a check per step."""
    cfg = tiny_cfg("llama", samples=3, forks=2, depth=2, max_new_tokens=14, stop_at_eos=True)
    lm = load_model(cfg.model, torch.device("cpu"), torch.float32, log=lambda _m: None)
    prompts = [(p, list(lm.tokenizer(text)["input_ids"])) for p, text in enumerate(cfg.prompts)]
    trees = []
    for every in (1, 8):
        builder = TreeBuilder(lm, cfg, [0, 1], TreePlan(cfg.samples, cfg.forks, cfg.depth))
        builder.eos_ids = set(range(0, 320, 9))  # a ninth of the vocabulary ends a branch: many EOS
        builder.eos_check_every = every
        trees.append((builder.build_group(prompts), builder.stats))
    (a, stats_a), (b, stats_b) = trees
    rows = lambda t: [
        (r.branch_id, r.fork_position, r.token_ids.tolist(), r.ended_with_eos)  # noqa: E731
        for p in sorted(t)
        for r in t[p]
    ]
    assert rows(a) == rows(b)
    assert sum(r[3] for r in rows(a)) >= 5  # many branches did end early
    assert all(r.token_ids[-1] in set(range(0, 320, 9)) for p in a for r in a[p] if r.ended_with_eos)
    for p in a:
        for x, y in zip(a[p], b[p]):
            np.testing.assert_allclose(x.latents, y.latents, rtol=1e-5, atol=1e-5)
    assert stats_a.generated_tokens == stats_b.generated_tokens
    assert stats_b.forward_calls >= stats_a.forward_calls  # rows are fed on past EOS until a check
