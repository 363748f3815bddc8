"""Position removal on synthetic trees with a known positional and content component."""

from __future__ import annotations

import numpy as np
import pytest

from analysis import ResidualSpec, ViewSpec, compute_view
from analysis.synthetic import branch_tree


@pytest.fixture(scope="module")
def tree():
    return branch_tree(n_prompts=4, branches_per_prompt=10, d=64, seed=3)


@pytest.fixture(scope="module")
def raw(tree):
    return compute_view(tree, ViewSpec(residual=ResidualSpec(method="none")))


def _near_chance(leak: dict) -> bool:
    return abs(leak["mean_abs_dpos"] - leak["chance"]) <= max(4 * leak["chance_sd"], 0.1 * leak["chance"])


def test_raw_data_shows_the_leak(raw):
    m = raw.metrics
    assert m["r2_pos"]["r2"] > 0.5 and m["r2_pos"]["heldout"] > 0.5
    assert m["leak"]["leak"] > 0.8 and not _near_chance(m["leak"])
    assert m["leak_2d"]["leak"] > 0.5 and not _near_chance(m["leak_2d"])


@pytest.mark.parametrize("method", ["per_position", "regression"])
def test_removal_brings_position_to_chance(tree, raw, method):
    view = compute_view(tree, ViewSpec(residual=ResidualSpec(method=method)))
    m = view.metrics
    assert _near_chance(m["leak"]), m["leak"]
    assert _near_chance(m["leak_2d"]), m["leak_2d"]
    assert m["r2_pos"]["r2"] <= m["r2_pos"]["chance"] + 0.02
    assert abs(m["r2_pos"]["adjusted"]) < 0.05 and abs(m["r2_pos"]["heldout"]) < 0.05
    # Content must survive: branch and prompt separability at matched positions do not drop.
    for key in ("purity_branch", "purity_prompt"):
        assert m[key]["purity"] >= raw.metrics[key]["purity"] - 0.01, key
    assert m["purity_branch"]["purity"] > 3 * m["purity_branch"]["chance"]


def test_projection_removes_the_top_positional_directions(tree, raw):
    two = compute_view(tree, ViewSpec(residual=ResidualSpec(method="projection", k=2)))
    five = compute_view(tree, ViewSpec(residual=ResidualSpec(method="projection", k=5)))
    # The synthetic curve spans 5 directions: removing 2 helps, removing all 5 reaches chance.
    assert two.metrics["r2_pos"]["r2"] < raw.metrics["r2_pos"]["r2"] - 0.05
    assert five.metrics["r2_pos"]["r2"] < 0.1
    assert _near_chance(five.metrics["leak"])


def test_sinks_are_dropped_by_default_and_kept_on_request(tree):
    n_sinks = int(tree.extra["is_sink"].sum())
    dropped = compute_view(tree, ViewSpec(metrics=False))
    kept = compute_view(tree, ViewSpec(exclude_sinks=False, metrics=False))
    assert dropped.metrics["n_sinks_dropped"] == n_sinks == 4
    assert not tree.extra["is_sink"][dropped.index].any()
    assert len(kept.index) == len(tree) and kept.coords.shape == (len(tree), 2)


def test_reference_fit_scope(tree):
    """Fitting on a big reference tree and plotting a small one: position still goes to chance."""
    reference = branch_tree(n_prompts=8, branches_per_prompt=10, d=64, seed=11)
    plot = tree.subset(np.isin(tree.prompt, [0, 1]))
    view = compute_view(plot, ViewSpec(residual=ResidualSpec(method="per_position")), reference=reference)
    assert len(view.index) == int((~plot.extra["is_sink"]).sum())
    assert _near_chance(view.metrics["leak"])
    # The reference's positional means do not contain the plotted branches' content.
    assert view.metrics["purity_branch"]["purity"] > 3 * view.metrics["purity_branch"]["chance"]
    with pytest.raises(ValueError, match="width"):
        compute_view(plot, reference=branch_tree(d=32, seed=1))


def test_removing_too_much_content_is_flagged(tree, raw):
    """Projecting out 60 directions of the per-position means (most of them noise, i.e. content) lowers
    matched-position prompt purity: the over-correction flag fires; per-position removal does not."""
    from analysis.metrics import overcorrection

    heavy = compute_view(tree, ViewSpec(residual=ResidualSpec(method="projection", k=60)))
    gentle = compute_view(tree, ViewSpec(residual=ResidualSpec(method="per_position")))
    assert overcorrection(raw.metrics["purity_prompt"], heavy.metrics["purity_prompt"])
    assert not overcorrection(raw.metrics["purity_prompt"], gentle.metrics["purity_prompt"])
    # Pooled over all positions, removal lets content show: prompt purity rises.
    assert gentle.metrics["purity_prompt_pooled"]["purity"] >= raw.metrics["purity_prompt_pooled"]["purity"]
