"""Every sentence the app says about a view, checked against the numbers it states (issue 35 item 4).

The verdict, the removal note, the metrics table and the guard's warnings are built for synthetic regimes
with known parts (no position, helix, few branches, token only, weak linear) under every kind of removal,
and each sentence is read back by tests/claims.py, which re-derives its claim from its own printed
numbers. The six contradictions the issue found are each a test at the end, on the numbers it quoted."""

from __future__ import annotations

import math
import re

import pytest
from claims import read_all, split

from analysis.guard import LEAKS, check, removed_nuisances
from analysis.nuisances import NUISANCES
from analysis.project import ProjectionSpec
from analysis.regimes import generate
from analysis.residualize import ResidualSpec
from analysis.verdict import sentences, verdict
from analysis.view import ViewSpec, compute_view
from views.present import band_caption, metric_rows, removal_note, removal_title

REGIMES = ("no_position", "helix", "one_prompt_3", "token_only", "weak_linear")
METHODS = ("auto", "position", "per_token", "projection", "linear_erase")
PCA = ProjectionSpec(method="pca")


@pytest.fixture(scope="module")
def views() -> dict:
    """(regime, method) -> (raw metrics, removed metrics), one seed each (the few-branch regime two)."""
    out = {}
    for regime in REGIMES:
        for seed in (0, 1) if regime == "one_prompt_3" else (0,):
            t = generate(regime, seed=seed).tokens
            raw = compute_view(t, ViewSpec(residual=ResidualSpec(method="none"), projection=PCA)).metrics
            for method in METHODS:
                out[regime, seed, method] = (
                    raw,
                    compute_view(t, ViewSpec(residual=ResidualSpec(method=method), projection=PCA)).metrics,
                )
    return out


def _close(printed: str, value: float, scale: float = 1.0) -> bool:
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return abs(float(printed) - value * scale) <= 0.51 * 10**-decimals * (1 + 1e-9)


def test_every_sentence_of_every_verdict_follows_from_its_numbers(views):
    kinds = set()
    for (regime, seed, method), (raw, removed) in views.items():
        said = sentences(raw, removed)
        claims = read_all(said, known_notes=(removed["removal"].get("note", ""),))
        for c in claims:
            assert not c.problems, (regime, seed, method, c.sentence, c.problems)
            kinds.add(c.kind)
        assert split(verdict(raw, removed)) == [" ".join(s.replace("**", "").split()) for s in said]
    # every kind of sentence was met at least once over the regimes
    assert {
        "position",
        "token",
        "factors",
        "means_test",
        "linear",
        "change",
        "leak",
        "token_after",
    } <= kinds, kinds


def test_the_headline_and_its_details_hold_every_sentence_and_the_headline_says_what_changed(views):
    """The app shows the verdict as a headline with the tests folded below it: together they are every
    sentence of the verdict, each once; where something was removed the headline holds what changed (not
    the tests), where nothing was it holds the tests (they are the outcome then)."""
    from analysis.verdict import headline_and_details, removal_parts

    for (regime, seed, method), (raw, removed) in views.items():
        head, details = headline_and_details(raw, removed)
        said = [" ".join(s.replace("**", "").split()) for s in sentences(raw, removed)]
        shown = split(head) + (split(details) if details else [])
        assert sorted(shown) == sorted(said), (regime, seed, method)
        tests, outcome = removal_parts(raw, removed)
        in_head = set(split(head))
        flat = [" ".join(t.replace("**", "").split()) for t in tests + outcome]
        if removed["removal"].get("weight"):
            assert set(flat[len(tests) :]) <= in_head and not set(flat[: len(tests)]) & in_head
        else:
            assert set(flat) <= in_head
        assert split(head)[0].startswith("Position explains")


def test_the_numbers_a_sentence_quotes_are_the_measures_it_names(views):
    """Contradiction 2 in general: each test sentence quotes its own nuisance's test, the R2 and
    same-token sentences the raw view's numbers."""
    for key, (raw, removed) in views.items():
        rem = removed["removal"]
        for c in read_all(sentences(raw, removed), known_notes=(rem.get("note", ""),)):
            if c.kind == "position":
                assert _close(re.search(r"explains ([\d.]+)%", c.sentence).group(1), raw["r2_pos"]["r2"], 100)
                if "probe" in c.numbers:
                    assert _close(re.search(r"probe R2 ([-\d.]+)", c.sentence).group(1), raw["probe"]["r2"])
            if c.kind == "means_test":
                name = re.match(r"(?:A|An|The|No) ([\w ]+?) (?:component|test)", c.sentence).group(1)
                test = next(t for k, t in rem["tests"].items() if NUISANCES[k].words == name)
                assert _close(re.search(r"held-out R2 ([-+\d.]+)", c.sentence).group(1), test["r2_oof"]), key
                assert _close(
                    re.search(r"against ([-+\d.]+) by chance", c.sentence).group(1), test["null_r2"]
                ), key
            if c.kind == "token":
                assert _close(
                    re.search(r"token ([\d.]+)%", c.sentence).group(1), raw["token_leak"]["leak"], 100
                )


def test_titles_and_notes_name_what_went_and_how_much(views):
    """Contradictions 4 and 5 in general: the right panel's title names exactly the nuisances removed
    (or says why nothing was), and no note calls a method's weight a share 'removed'."""
    for key, (_raw, removed) in views.items():
        rem = removed["removal"]
        title, note = removal_title(rem), removal_note(rem)
        took = removed_nuisances(rem)
        if took:
            assert title.endswith(" removed") and not title.startswith("nothing"), (key, title)
            for k in took:
                assert NUISANCES[k].words in title, (key, title, took)
        else:
            assert title.startswith("nothing removed"), (key, title)
            significant = [t for t in rem["tests"].values() if t["p_value"] <= rem["alpha"]]
            assert ("none detected" in title) == (not significant), (key, title)
        assert note.startswith(f"Right panel: {title}."), (key, note)
        assert not re.search(r"\d+% of it removed", note), (key, note)
        if rem.get("crossfit") and took:
            m = re.search(r"subtracted at weight (\d+)% .* from (<1%|>99%|\d+%) of the tokens", note)
            assert m and _close(m.group(1), rem["weight"], 100), (key, note)


def test_the_guard_names_every_leak_past_chance_on_the_far_side_and_nothing_else(views):
    """The guard's rule re-derived from its printed numbers, and every case the rule covers named."""
    for key, (raw, removed) in views.items():
        warned = {w.metric: w for w in check(raw, removed)}
        took = removed_nuisances(removed["removal"])
        for w in warned.values():
            m = re.search(
                r"\(([-+\d.]+) -> ([-+\d.]+), band of the change ±([\d.]+); chance ([-+\d.]+) ±([\d.]+)\)",
                w.message,
            )
            r, a, band, c, half = (float(g) for g in m.groups())
            dr, da = r - c, a - c
            if w.kind in ("invented", "pushed apart"):
                crossed = dr > 0 > da + half - 0.002 or dr < 0 < da - half + 0.002
                assert crossed or abs(da) > abs(dr) + band - 0.002, (key, w.message)
                assert (w.kind == "invented") == (da > 0), (key, w.message)
        if "position" not in took:
            continue
        for metric in LEAKS:
            r, a = raw.get(metric), removed.get(metric)
            if not r or not a or not all(math.isfinite(x.get("leak", math.nan)) for x in (r, a)):
                continue
            half = a.get("chance_hi", 0.0)
            if r["leak"] > 0 and a["leak"] < -half:
                assert metric in warned, (key, metric, r["leak"], a["leak"], half)


def test_the_metrics_table_flags_what_the_guard_names_and_says_what_its_bands_cover(views):
    for key, (raw, removed) in views.items():
        flagged = {w.metric for w in check(raw, removed)}
        rows = metric_rows(raw, removed)
        assert {r.key for r in rows if r.warned} == flagged & {r.key for r in rows}, key
        probe = next(r for r in rows if r.key == "probe")
        assert probe.removed != "–", key  # the probe after removal is in the table
        caption = band_caption(removed)
        n_prompts = 1 if key[0].startswith("one_prompt") else 6
        assert ("over prompts" in caption) == (n_prompts > 1), (key, caption)
        assert ("this prompt's" in caption) == (n_prompts == 1), (key, caption)


# The six contradictions of issue 35, each on the numbers it was found with.


def _removal(**kw) -> dict:
    base = {
        "method": "auto",
        "nuisance": "position",
        "removes": ["position"],
        "detected": False,
        "p_value": 0.05,
        "p_min": 0.0476,
        "alpha": 0.05,
        "weight": 0.0,
        "tests": {},
        "removed": [],
        "removed_keys": [],
        "weights": {},
        "crossfit": False,
        "note": "",
    }
    return base | kw


def _test(p, r2, null, key="position"):
    return {
        "key": key,
        "r2_oof": r2,
        "null_r2": null,
        "null_hi": null + 0.02,
        "p_value": p,
        "detected": p <= 0.05 and r2 > 0,
    }


def test_the_probe_found_part_is_named_as_subtracted_only_when_a_weight_was_subtracted():
    """Position only the probe reads: 'subtracted as a smooth rank-r component' with the weight quoted when
    the low-rank part was subtracted; 'reads position ... not removed' when no rank predicted held-out
    prompts (nothing subtracted); each read back against the probe test's own numbers."""
    lin = {
        "r2_oof": 0.31,
        "null_r2": -0.01,
        "null_hi": 0.02,
        "p_value": 0.0125,
        "p_min": 0.0125,
        "alpha": 0.025,
        "detected": True,
    }
    tests = {"position": _test(0.5, -0.07, -0.075)}
    took = _removal(
        detected=True,
        weight=0.78,
        linear_test=lin,
        tests=tests,
        removed=["position (low rank)"],
        removed_keys=["position"],
        lowrank={"rank": 1, "weight": 0.78, "gain": 0.03},
    )
    text = verdict({}, {"removal": took})
    assert (
        "subtracted as a smooth rank-1 component at weight 0.78" in text
        and "so it was not removed" not in text
    )
    assert removal_title(took) == "position (low rank) removed" and "rank-1" in removal_note(took)
    left = _removal(
        detected=True, linear_test=lin, tests=tests, lowrank={"rank": 0, "weight": 0.0, "gain": 0.0}
    )
    text = verdict({}, {"removal": left})
    assert (
        "reads position across prompts" in text
        and "so it was not removed" in text
        and "subtracted" not in text
    )
    assert removal_title(left).startswith("nothing removed")
    for said in (took, left):
        assert not [c.problems for c in read_all(verdict({}, {"removal": said})) if c.problems]
    failed = lin | {"p_value": 0.2, "detected": False}
    wrong = verdict({}, {"removal": took | {"linear_test": failed}})
    assert any(c.problems for c in read_all(wrong))  # 'subtracted' beside a failed probe test is caught


def test_contradiction_1_no_not_detected_beside_a_significant_p():
    rem = _removal(tests={"position": _test(0.0476, -0.012, -0.05)})
    text = verdict({}, {"removal": rem})
    assert "No position component detected" not in text
    assert "significant" in text and "too small to predict held-out tokens" in text
    assert not [c.problems for c in read_all(text) if c.problems]


def test_contradiction_2_each_test_quotes_its_own_numbers():
    rem = _removal(
        method="position_token",
        removes=["position", "token"],
        detected=True,
        weight=0.8,
        tests={"position": _test(0.0476, -0.070, -0.072), "token": _test(0.0476, 0.295, -0.118, "token")},
        removed=["token identity"],
        removed_keys=["token"],
    )
    text = verdict({}, {"removal": rem})
    assert (
        "A token identity component was detected (p <= 0.048, held-out R2 +0.295 against -0.118 by chance)"
        in text
    )
    assert (
        "The position test was significant (p <= 0.048, held-out R2 -0.070 against -0.072 by chance)" in text
    )


def test_contradiction_3_decodable_only_when_the_band_clears_chance():
    raw = {
        "r2_pos": {"r2": 0.01, "chance": 0.005, "chance_sd": 0.001, "lo": 0.004, "hi": 0.016},
        "probe": {"r2": 0.01, "lo": -0.02, "hi": 0.04, "chance_hi": 0.0},
    }
    text = verdict(raw)
    assert "is linearly decodable" not in text and "undecided" in text
    assert not [c.problems for c in read_all(text) if c.problems]


def test_contradiction_4_removed_is_the_positional_variance_that_went_not_the_methods_weight():
    """projection said '100% removed' while R2_pos rose 0.111 -> 0.122; per_token '94% of it removed' while
    cross-fitting left 40% of the tokens untouched."""
    raw = {"r2_pos": {"r2": 0.111, "chance": 0.03, "chance_sd": 0.001, "lo": 0.108, "hi": 0.114}}
    after = {
        "r2_pos": {"r2": 0.122, "chance": 0.03, "chance_sd": 0.001, "lo": 0.119, "hi": 0.125},
        "removal": _removal(
            method="projection",
            detected=True,
            weight=1.0,
            crossfit=True,
            folds=5,
            fold_by="prompt",
            crossfit_share=0.6,
            removed=["position"],
            removed_keys=["position"],
            tests={"position": _test(0.0476, 0.2, -0.04)},
        ),
    }
    text = verdict(raw, after)
    assert "position's share of the variance went 11.1%" in text and ": it rose." in text
    assert "100%" not in removal_note(after["removal"]).replace("weight 100%", "")
    assert "from 60% of the tokens" in removal_note(after["removal"])
    assert not [c.problems for c in read_all(text) if c.problems]


def test_contradiction_5_titles_and_warnings_name_what_was_removed():
    rem = _removal(
        method="per_token",
        removes=["token"],
        detected=True,
        weight=1.0,
        removed=["token identity"],
        removed_keys=["token"],
        tests={"token": _test(0.0476, 0.3, -0.1, "token")},
    )
    assert removal_title(rem) == "token identity removed"
    from views.present import layout_note

    loose = {"projection": {"trustworthiness": 0.6, "sd": 0.01}}
    note = layout_note({"projection": {"trustworthiness": 0.95, "sd": 0.01}}, loose | {"removal": rem})
    assert "token identity removed" in note and "position-removed" not in note


def test_contradiction_6_a_token_removals_effect_on_the_position_leak_is_not_called_position_removal():
    raw = {
        "leak": {"leak": 0.189, "lo": 0.15, "hi": 0.23},
        "token_leak": {"leak": 0.75, "lo": 0.69, "hi": 0.81, "chance": 0.02, "chance_hi": 0.03},
    }
    after = {
        "leak": {"leak": 0.405, "lo": 0.35, "hi": 0.46, "chance_hi": 0.09},
        "token_leak": {"leak": 0.025, "lo": 0.01, "hi": 0.04, "chance": 0.02, "chance_hi": 0.027},
        "removal": _removal(
            method="per_token",
            removes=["token"],
            detected=True,
            weight=1.0,
            removed=["token identity"],
            removed_keys=["token"],
            tests={"token": _test(0.0476, 0.6, -0.18, "token")},
        ),
    }
    text = verdict(raw, after)
    assert "After removing token identity, the kNN position leak went +0.189" in text
    assert "After removing token identity, neighbours in other branches share the current token 75.0%" in text
    assert "position removed" not in text and "position component was detected" not in text
    assert not [c.problems for c in read_all(text) if c.problems]


@pytest.mark.parametrize(
    "true, false",
    [
        (
            "and its linear decodability across prompts is undecided: the band reaches chance",
            "and is linearly decodable across prompts",
        ),
        (
            "No position component detected at this layer (p = 0.30",
            "No position component detected at this layer (p = 0.03",
        ),
        (": down to chance.", ": unchanged within its band."),
        ("This layer is organized by", "No single factor organizes"),
    ],
)
def test_the_reader_catches_a_claim_stronger_than_its_numbers(true, false):
    """The reader is itself tested: one word or number changed in a true verdict is found."""
    text = (
        "Position explains 5.4% of the variance here ±0.5% (chance 5.1% ±0.4%) and its linear decodability "
        "across prompts is undecided: the band reaches chance (probe R2 -0.03, band -0.38 to 0.32, chance at "
        "most 0.00). This layer is organized by position (above-chance scores, 0 chance to 1 perfect: position "
        "0.95 ±0.01, prompt 0.56 ±0.05). No position component detected at this layer (p = 0.30, held-out R2 "
        "-0.070 against -0.073 by chance): not removed. After removing token identity, position's share of the "
        "variance went 57.7% ±1.5% (chance 6.0% ±0.4%) -> 6.6% ±1.5% (chance 5.1% ±0.1%), band of the change "
        "±2.1%: down to chance."
    )
    assert true in text
    assert not [c.problems for c in read_all(text) if c.problems]
    assert [c.problems for c in read_all(text.replace(true, false)) if c.problems]


def test_no_leader_is_named_when_another_band_holds_its_score_or_a_band_is_missing():
    """Reviewed: position 0.15 ±0.01 beside prompt 0.10 ±0.15 was said to lead; a factor with no band was
    printed ±0.00 and decided on its point estimate."""
    from analysis.verdict import factor_sentence

    raw = {
        "leak": {"leak": 0.15, "lo": 0.14, "hi": 0.16},
        "purity_prompt_pooled": {"purity": 0.10, "chance": 0.0, "lo": -0.05, "hi": 0.25},
    }
    said = factor_sentence(raw)
    assert said.startswith("No factor clearly leads: the bands of **position and prompt** overlap"), said
    assert not [c.problems for c in read_all(said) if c.problems]
    wrong = said.replace(
        "No factor clearly leads: the bands of **position and prompt** overlap",
        "**position** leads, but its band reaches below 0.2, the score from which this verdict "
        "calls a factor organizing",
    )
    assert [c.problems for c in read_all(wrong) if c.problems]
    unbanded = {
        "leak": {"leak": 0.9, "lo": 0.89, "hi": 0.91},
        "purity_branch_pooled": {"purity": 0.3, "chance": 0.0},
    }
    said = factor_sentence(unbanded)
    assert "branch 0.30 (no band)" in said and "organized by" not in said, said
    assert not [c.problems for c in read_all(said) if c.problems]


@pytest.mark.parametrize(
    "after_share, after_total, word",
    [
        (0.08, 200.0, "it fell; the share after removal is of a whole 80% smaller"),  # 50 -> 16
        (0.30, 400.0, "it grew as well"),  # 50 -> 120
        (
            0.06,
            800.0,
            "unchanged within its band; the share after removal is of a whole 20% smaller",
        ),  # 50 -> 48
    ],
)
def test_a_share_that_rose_after_token_removal_says_what_the_positional_variance_did(
    after_share, after_total, word
):
    """Removing token identity shrinks the whole, so position's share of what is left can rise with no more
    position (the demo's layer 4: 5.6% -> 8.0% while the variance per-position means explain fell from
    5.6% to 1.7% of the raw view's): the verdict says how much of the variance went and what the positional variance did,
    in words the reader checks against the numbers."""
    from analysis.verdict import smaller_whole_sentence

    def r2(share, total, half):
        return {
            "r2": share,
            "chance": 0.02,
            "chance_sd": 0.002,
            "lo": share - half,
            "hi": share + half,
            "total_var": total,
        }

    raw = {"r2_pos": r2(0.05, 1000.0, 0.005)}  # 5.0% +- 0.5% of the raw variance
    removed = {
        "r2_pos": r2(after_share, after_total, 0.01),
        "removal": _removal(removed=["token identity"], removed_keys=["token"], weight=1.0),
    }
    said = smaller_whole_sentence(raw, removed)
    assert said.startswith(f"Removing token identity took {1 - after_total / 1000:.0%} of the variance")
    assert said.endswith(word + ".")
    assert not [c.problems for c in read_all(said) if c.problems]
    wrong = "it grew as well" if not word.startswith("it grew") else "it fell"
    assert [c.problems for c in read_all(said.replace(word, wrong)) if c.problems]
    assert smaller_whole_sentence(raw, {**removed, "r2_pos": r2(0.04, after_total, 0.01)}) == ""  # fell
    assert smaller_whole_sentence(raw, {**removed, "r2_pos": r2(0.051, 990.0, 0.01)}) == ""  # 1% taken
    no_band = {k: v for k, v in r2(after_share, after_total, 0.01).items() if k not in ("lo", "hi")}
    assert smaller_whole_sentence(raw, {**removed, "r2_pos": no_band}) == ""  # nothing to judge it by
