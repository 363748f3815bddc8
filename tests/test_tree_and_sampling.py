"""Tree plan numbering, fork-position rules and the sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ingest.errors import IngestError
from ingest.sampling import (
    branch_seed,
    choose_next,
    row_uniforms,
    sample_step,
    step_back_from_zero,
    token_stats,
)
from ingest.tree import TreePlan, fork_positions


def test_plan_numbering_is_breadth_first_and_fixed():
    plan = TreePlan(samples=2, forks=2, depth=2)
    assert plan.size == 1 + 2 + 4 + 8
    assert [s.path for s in plan.slots[:7]] == ["prompt", "s0", "s1", "s0.f0", "s0.f1", "s1.f0", "s1.f1"]
    assert [c.local_id for c in plan.children(1)] == [3, 4]
    assert all(c.depth == 3 and c.parent == 3 for c in plan.children(3))
    assert plan.branch_id(prompt_id=2, local_id=4) == 2 * plan.size + 4
    assert TreePlan(samples=3, forks=0, depth=5).size == 4
    with pytest.raises(IngestError, match="branches per prompt"):
        TreePlan(samples=10, forks=10, depth=6)


def test_entropy_rule_picks_the_most_uncertain_positions():
    entropies = np.array([9.0, 1.0, 5.0, 3.0, 5.0, 8.0], np.float32)  # positions 10..15
    assert fork_positions("entropy", 2, 10, entropies, last_allowed=20, offsets=[]) == [12, 15]
    # the branch's first position is never a fork point (that would be another sample); ties -> earlier
    assert fork_positions("entropy", 1, 10, entropies[:5], last_allowed=20, offsets=[]) == [12]
    # room for the child: nothing after last_allowed
    assert fork_positions("entropy", 3, 10, entropies, last_allowed=13, offsets=[]) == [11, 12, 13]
    assert fork_positions("entropy", 2, 10, entropies[:1], last_allowed=20, offsets=[]) == []


def test_offsets_rule():
    entropies = np.zeros(10, np.float32)
    assert fork_positions("offsets", 2, 5, entropies, last_allowed=100, offsets=[2, 4, 6]) == [7, 9]
    assert fork_positions("offsets", 3, 5, entropies, last_allowed=10, offsets=[2, 4, 6]) == [7, 9]


def draws(logits, temperature, top_k, top_p, n, exclude=None, seed=0):
    """n picks of one row of logits, each with the next uniform of one seeded stream."""
    us = np.random.default_rng(seed).random(n)
    return [choose_next(logits, temperature, top_k, top_p, float(u), exclude=exclude) for u in us]


def test_sampler_rules():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert choose_next(logits, 0.0, 0, 1.0, 0.9) == 0
    assert choose_next(logits, 0.0, 0, 1.0, 0.9, exclude=0) == 1
    nucleus = draws(logits, 1.0, 0, 0.8, 400)
    assert set(nucleus) == {0, 1}  # nucleus of mass 0.8 is exactly {0, 1}
    assert 0.5 < nucleus.count(0) / 400 < 0.75  # renormalized: 0.5 / 0.8 = 0.625
    assert set(draws(logits, 1.0, 1, 1.0, 50)) == {0}
    # exclusion comes before top-k: a fork picks among the top-k of the other tokens
    assert set(draws(logits, 1.0, 2, 1.0, 200, exclude=0)) == {1, 2}
    full = draws(logits, 1.0, 0, 1.0, 2000)
    np.testing.assert_allclose(np.bincount(full, minlength=4) / 2000, [0.5, 0.3, 0.15, 0.05], atol=0.04)


def test_inverse_cdf_edges_never_pick_a_zero_probability_token():
    logits = torch.log(torch.tensor([0.0, 0.7, 0.0, 0.3, 0.0]))  # zeros first, between and last
    edge = float(np.nextafter(np.float32(1), np.float32(0)))
    assert choose_next(logits, 1.0, 0, 1.0, 0.0) == 1  # u = 0: the first token of non-zero mass
    assert choose_next(logits, 1.0, 0, 1.0, edge) == 3  # u just below 1: the last one, not the zero after it
    assert choose_next(logits, 1.0, 0, 1.0, 0.69) == 1 and choose_next(logits, 1.0, 0, 1.0, 0.71) == 3


def test_a_pick_that_lands_on_a_zero_weight_steps_back_to_the_last_non_zero_one():
    weights = torch.tensor([[0.2, 0.0, 0.5, 0.0, 0.0, 0.3], [0.0, 0.4, 0.0, 0.6, 0.0, 0.0]])
    assert step_back_from_zero(weights, torch.tensor([4, 2])).tolist() == [2, 1]
    assert step_back_from_zero(weights, torch.tensor([5, 3])).tolist() == [5, 3]  # valid picks stay


def test_a_fork_excluding_the_only_likely_token_picks_among_the_others():
    logits = torch.tensor([0.0, 200.0, 1.0, -300.0])  # all float32 mass on token 1
    picks = {choose_next(logits, 1.0, 0, 1.0, float(u), exclude=1) for u in np.linspace(0, 0.999, 50)}
    assert picks == {0, 2}
    chosen, _, _ = sample_step(
        logits[None].expand(3, -1), 1.0, 0, 1.0, torch.tensor([0.0, 0.5, 0.99]), [1, 1, 1]
    )
    assert set(chosen.tolist()) <= {0, 2}


def test_batched_step_equals_rows_alone_and_shares_the_statistics():
    torch.manual_seed(3)
    logits = torch.randn(6, 3000) * 2  # (rows, vocab)
    uniforms = row_uniforms([11, 12, 13, 14, 15, 16], 4, torch.device("cpu"))  # (rows, steps)
    assert uniforms.shape == (6, 4) and bool(((uniforms >= 0) & (uniforms < 1)).all())
    assert torch.equal(
        uniforms[2], row_uniforms([13], 4, torch.device("cpu"))[0]
    )  # a row's stream is its own
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.0, 50, 1.0), (0.0, 0, 1.0)]:
        exclude = [None, 5, None, 7, None, None]
        chosen, logprob, entropy = sample_step(logits, temperature, top_k, top_p, uniforms[:, 0], exclude)
        alone = [
            choose_next(logits[i], temperature, top_k, top_p, float(uniforms[i, 0]), exclude=exclude[i])
            for i in range(6)
        ]
        assert chosen.tolist() == alone
        assert 5 != chosen[1] and 7 != chosen[3]
        ref_lp, ref_ent = token_stats(logits, chosen)
        np.testing.assert_allclose(logprob.numpy(), ref_lp, atol=1e-5)
        np.testing.assert_allclose(entropy.numpy(), ref_ent, atol=1e-5)


def test_nucleus_over_a_large_vocabulary_matches_a_full_sort():
    torch.manual_seed(1)
    logits = torch.randn(5000) * 0.5  # flat: the nucleus needs far more than the first top-k guess
    probs = torch.softmax(logits, -1)
    sorted_probs, order = torch.sort(probs, descending=True)
    nucleus = set(order[(torch.cumsum(sorted_probs, -1) - sorted_probs) < 0.9].tolist())
    picked = set(draws(logits, 1.0, 0, 0.9, 3000))
    assert picked <= nucleus and len(picked) > 256


def test_token_stats_and_seeds():
    logits = torch.tensor([[0.0, 0.0], [10.0, -10.0]])
    logprob, entropy = token_stats(logits, torch.tensor([1, 0]))
    np.testing.assert_allclose(logprob, [np.log(0.5), 0.0], atol=1e-6)
    np.testing.assert_allclose(entropy, [np.log(2), 0.0], atol=1e-6)
    assert branch_seed(0, 1, 2) == branch_seed(0, 1, 2) != branch_seed(0, 2, 1)
