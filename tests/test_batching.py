"""Fork levels decode as padded batches: the tree must not depend on how branches are batched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import dump, ingest
from ingest.generate import TreeBuilder
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
    np.testing.assert_allclose(np.array([r[4:6] for r in a["tokens"]], float),
                               np.array([r[4:6] for r in b["tokens"]], float), rtol=1e-4, atol=1e-5)
    assert [r[:4] for r in a["latents"]] == [r[:4] for r in b["latents"]]
    np.testing.assert_allclose(np.array([r[4] for r in a["latents"]]), np.array([r[4] for r in b["latents"]]),
                               rtol=1e-4, atol=1e-4)
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
