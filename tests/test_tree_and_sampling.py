"""Tree plan numbering, fork-position rules and the sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ingest.errors import IngestError
from ingest.sampling import branch_seed, choose_next, token_stats
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


def test_sampler_rules():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = torch.Generator().manual_seed(0)
    assert choose_next(logits, 0.0, 0, 1.0, gen) == 0
    assert choose_next(logits, 0.0, 0, 1.0, gen, exclude=0) == 1
    draws = [choose_next(logits, 1.0, 0, 0.8, gen) for _ in range(400)]
    assert set(draws) == {0, 1}  # nucleus of mass 0.8 is exactly {0, 1}
    assert 0.5 < draws.count(0) / 400 < 0.75  # renormalized: 0.5 / 0.8 = 0.625
    assert {choose_next(logits, 1.0, 1, 1.0, gen) for _ in range(50)} == {0}
    # exclusion comes before top-k: a fork picks among the top-k of the other tokens
    assert {choose_next(logits, 1.0, 2, 1.0, gen, exclude=0) for _ in range(200)} == {1, 2}
    full = [choose_next(logits, 1.0, 0, 1.0, gen) for _ in range(2000)]
    np.testing.assert_allclose(np.bincount(full, minlength=4) / 2000, [0.5, 0.3, 0.15, 0.05], atol=0.04)


def test_nucleus_over_a_large_vocabulary_matches_a_full_sort():
    torch.manual_seed(1)
    logits = torch.randn(5000) * 0.5  # flat: the nucleus needs far more than the first top-k guess
    probs = torch.softmax(logits, -1)
    sorted_probs, order = torch.sort(probs, descending=True)
    nucleus = set(order[(torch.cumsum(sorted_probs, -1) - sorted_probs) < 0.9].tolist())
    gen = torch.Generator().manual_seed(0)
    draws = {choose_next(logits, 1.0, 0, 0.9, gen) for _ in range(3000)}
    assert draws <= nucleus and len(draws) > 256


def test_token_stats_and_seeds():
    logits = torch.tensor([[0.0, 0.0], [10.0, -10.0]])
    logprob, entropy = token_stats(logits, torch.tensor([1, 0]))
    np.testing.assert_allclose(logprob, [np.log(0.5), 0.0], atol=1e-6)
    np.testing.assert_allclose(entropy, [np.log(2), 0.0], atol=1e-6)
    assert branch_seed(0, 1, 2) == branch_seed(0, 1, 2) != branch_seed(0, 2, 1)
