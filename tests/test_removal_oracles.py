"""Every removal against exact answers (issue 34's oracles).

1. GPT-2 with a known position table, through the normal ingest: layer 0 is exactly wte[token] +
   wpe[position], so exact subtraction of wpe is the truth. The default removal must reach it; every other
   position method must reach it or say in its help that it cannot.
2. Synthetic regimes of analysis.regimes (content that drifts token by token, forks that share it): few
   branches, no position, token identity only, weak linear position, a helix.
Each test prints its distances (pytest -s shows them); docs/removal.md records them.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import gpt2_layer0, table_error

from analysis import ResidualSpec, ViewSpec, compute_view
from analysis.guard import LEAKS, check
from analysis.project import ProjectionSpec
from analysis.regimes import generate
from analysis.residualize import registry

PCA = ProjectionSpec(method="pca")  # the maths under test is the removal; PCA keeps these fast
TOLERANCE = 0.03  # issue 34: within 0.03 of exact subtraction's leak
ORACLES = [("random", 1.0), ("smooth", 1.0), ("smooth", 0.2)]


def view(tokens, method: str = "auto", **params):
    return compute_view(tokens, ViewSpec(residual=ResidualSpec(method=method, **params), projection=PCA))


@pytest.fixture(scope="module")
def oracle_layers(tmp_path_factory):
    """(kind, scale) -> (layer-0 TokenSet read back from the store, the true position table)."""
    workdir = tmp_path_factory.mktemp("oracles")
    return {oracle: gpt2_layer0(*oracle, workdir) for oracle in ORACLES}


def exact_view(tokens, table):
    return view(tokens.with_X((tokens.X - table[tokens.position]).astype(np.float32)), "none")


@pytest.mark.parametrize("oracle", ORACLES, ids=lambda o: f"{o[0]}-{o[1]}")
def test_the_default_reaches_exact_subtraction_on_gpt2_layer_0(oracle_layers, oracle):
    tokens, table = oracle_layers[oracle]
    assert (
        not tokens.extra["token_id"][tokens.position == 0]
        .tolist()
        .count(tokens.extra["token_id"][tokens.position == 0][0])
        == (tokens.position == 0).sum()
    )  # no BOS: first words differ
    raw, exact, default = view(tokens, "none"), exact_view(tokens, table), view(tokens)
    m, e = default.metrics, exact.metrics
    assert m["n_sinks_dropped"] == 0  # GPT-2 adds no BOS: position 0 holds each prompt's first word, kept
    err = table_error(tokens, default, table)
    print(
        f"\n{oracle}: leak raw {raw.metrics['leak']['leak']:+.3f}, exact {e['leak']['leak']:+.3f}, default "
        f"{m['leak']['leak']:+.3f}; table error {err:.4f}; removed {m['removal']['removed']}"
    )
    assert "position" in m["removal"]["removed"] and m["removal"]["detected"]
    assert abs(m["leak"]["leak"] - e["leak"]["leak"]) <= TOLERANCE
    assert abs(m["leak_prompt"]["leak"] - e["leak_prompt"]["leak"]) <= TOLERANCE
    assert err < 0.01  # the subtracted part is the true table
    assert check(raw.metrics, m) == [], [w.message for w in check(raw.metrics, m)]


def position_methods() -> list[str]:
    return [name for name, cls in registry().items() if cls.removes == ("position",) or name == "auto"]


@pytest.mark.parametrize("method", position_methods())
@pytest.mark.parametrize("oracle", [("random", 1.0), ("smooth", 1.0)], ids=lambda o: f"{o[0]}-{o[1]}")
def test_every_position_method_reaches_the_oracle_or_says_it_cannot(oracle_layers, oracle, method):
    tokens, table = oracle_layers[oracle]
    exact, result = exact_view(tokens, table), view(tokens, method)
    gap = result.metrics["leak"]["leak"] - exact.metrics["leak"]["leak"]
    print(
        f"\n{method} on {oracle}: leak gap to exact {gap:+.3f}, table error {table_error(tokens, result, table):.3f}"
    )
    if abs(gap) > TOLERANCE:
        assert "cannot reach exact subtraction" in registry()[method].help.lower(), (method, gap)


def leak_of(result) -> dict:
    return result.metrics["leak"]


@pytest.mark.parametrize("regime", ["one_prompt_3", "one_prompt_5", "one_prompt_3_none", "one_prompt_5_none"])
def test_few_branches_never_end_beyond_chance_on_the_far_side_from_raw(regime):
    worst = []
    for seed in range(10):
        run = generate(regime, seed)
        raw, after = leak_of(view(run.tokens, "none")), leak_of(view(run.tokens))
        sign = np.sign(raw["leak"])
        beyond = sign * after["leak"] < -after["chance_hi"]  # past chance's band, on the other side from raw
        worst.append((seed, raw["leak"], after["leak"], after["chance_hi"]))
        assert not beyond, (regime, seed, raw["leak"], after["leak"], after["chance_hi"])
    print(f"\n{regime}: (seed, raw, after, chance band) {[tuple(round(v, 3) for v in w) for w in worst]}")


def test_a_helix_over_many_prompts_is_removed_to_exact_on_average():
    """Raw leak +0.95. Per seed the gap to exact stays within two bands of the gap; over seeds it averages
    within 0.03 (the balance leaves a little of a large effect on purpose: see analysis.estimators)."""
    gaps, bands = [], []
    for seed in range(4):
        run = generate("helix", seed)
        exact, after = leak_of(view(run.exact(), "none")), leak_of(view(run.tokens, "position"))
        gaps.append(after["leak"] - exact["leak"])
        bands.append(1.96 * np.hypot(exact["sd"], after["sd"]))
    print(f"\nhelix: leak gap to exact {np.round(gaps, 3)}, bands {np.round(bands, 3)}")
    assert all(abs(g) <= 2 * b for g, b in zip(gaps, bands)) and abs(np.mean(gaps)) <= TOLERANCE


def test_no_position_no_method_moves_the_leak_unnamed():
    """No position at all: in at least 95% of seeds no method moves the position leak beyond the band of the
    change, unless the guard names a move of a position leak on screen (content unmasked by a token removal,
    with the cross-prompt leak beside it; tokens pushed apart by an erasure the linear test let through)."""
    methods = [m for m in registry() if m != "none"]
    unnamed = {m: 0 for m in methods}
    seeds = 20
    for seed in range(seeds):
        run = generate("no_position", seed, n_prompts=4, branches=6, length=40)
        raw = view(run.tokens, "none").metrics
        for method in methods:
            after = view(run.tokens, method).metrics
            band = 1.96 * np.hypot(raw["leak"]["sd"], after["leak"]["sd"])
            moved = abs(after["leak"]["leak"] - raw["leak"]["leak"]) > band
            named = any(w.metric in LEAKS for w in check(raw, after))  # a position leak named on screen
            unnamed[method] += bool(moved and not named)
    print(f"\nno position, unnamed moves of the leak over {seeds} seeds: {unnamed}")
    assert all(count <= 0.05 * seeds for count in unnamed.values()), unnamed


def test_token_only_is_removed_and_the_unmasked_content_is_named():
    run = generate("token_only", 0)
    raw, after = view(run.tokens, "none").metrics, view(run.tokens).metrics
    assert after["removal"]["removed"] == ["token identity"]
    assert after["token_leak"]["leak"] < raw["token_leak"]["leak"] / 5
    named = [w for w in check(raw, after) if w.metric == "leak"]
    assert [w.kind for w in named] == ["content unmasked"] and "across prompts" in named[0].message


def test_weak_linear_position_is_subtracted_where_means_see_nothing():
    """Position a probe reads but per-position means do not reach: the default subtracts a smooth low-rank
    component (rank and weight chosen on held-out prompts); the prompt-held-out probe no longer reads it
    and the position leak moves most of the way to exact's."""
    from analysis.probe import position_probe

    for seed in range(3):
        run = generate("weak_linear", seed)
        raw, after, exact = view(run.tokens, "none"), view(run.tokens, "position"), view(run.exact(), "none")
        rem = after.metrics["removal"]
        assert rem["linear_test"]["detected"] and not rem["tests"]["position"]["detected"]
        assert rem["lowrank"]["rank"] >= 1 and 0 < rem["lowrank"]["weight"] <= 1 and not rem["erased"]
        assert rem["removed"] == ["position (low rank)"]
        kept = run.tokens.subset(after.index)
        probe = position_probe(after.residual, kept.position, kept.prompt)
        assert probe["hi"] < 0.05 and probe["r2"] <= probe["chance_hi"] + 0.01
        r, a, e = (v.metrics["leak"]["leak"] for v in (raw, after, exact))
        assert abs(a - e) < abs(r - e) / 2
        print(
            f"\nweak linear seed {seed}: probe {probe['r2']:+.3f} (chance up to {probe['chance_hi']:+.3f}); "
            f"leak raw {r:+.3f}, exact {e:+.3f}, subtracted {a:+.3f}"
        )


WEAK_SEEDS = range(10)


def test_weak_linear_leak_ends_within_the_band_of_exact_in_every_seed():
    """LEACE zeroed the sample's whole covariance with position and ended 0.04-0.07 below exact; the
    smooth low-rank component, weighted out of fold, ends within the band of the difference."""
    gaps = []
    for seed in WEAK_SEEDS:
        run = generate("weak_linear", seed)
        a, e = leak_of(view(run.tokens, "position")), leak_of(view(run.exact(), "none"))
        gaps.append((round(a["leak"] - e["leak"], 3), round(1.96 * float(np.hypot(a["sd"], e["sd"])), 3)))
    print(f"\nweak linear, (leak gap to exact, band) per seed: {gaps}")
    assert all(abs(g) <= b for g, b in gaps), gaps


@pytest.mark.parametrize("method", ["auto", "position"])
def test_weak_linear_probe_ends_within_the_band_of_chance_in_every_seed(method):
    """The default (`auto`, which also removes token identity here) and `position`. The probe sits
    0.002-0.011 below chance's mean: the estimated direction's noise, subtracted along position; with the
    true direction and the estimated amplitude the probe matches exact subtraction's (docs/removal.md)."""
    from analysis.probe import position_probe

    rows = []
    for seed in WEAK_SEEDS:
        run = generate("weak_linear", seed)
        after = view(run.tokens, method)
        kept = run.tokens.subset(after.index)
        probe = position_probe(after.residual, kept.position, kept.prompt)
        rows.append((seed, round(probe["r2"], 4), round(probe["chance_lo"], 4), round(probe["chance_hi"], 4)))
        assert probe["hi"] >= probe["chance_lo"] and probe["lo"] <= probe["chance_hi"], (seed, probe)
    print(f"\nweak linear, {method}: (seed, probe R2, chance band) {rows}")
