"""A verdict on top of every view: what organizes this layer, in words, with the numbers behind it.

It reads the metrics of the raw view (analysis.view.measure + layer_stats) and of the residualized one,
and says how much of the layer is position (variance explained, and whether a linear probe reads it
across prompts), how often nearest neighbours share the current token, what the removal did, and which
factor dominates the neighbourhoods: position, token identity, prompt or branch.
"""

from __future__ import annotations

import math
from typing import Any

from analysis.measures import MEASURES, Estimate, estimate_in


def _finite(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _excess(value: float, chance: float) -> float:
    """How far above chance, on a 0..1 scale (1 = perfect, 0 = chance)."""
    return (value - chance) / (1 - chance) if chance < 1 else 0.0


ORGANIZING = 0.2  # an above-chance score (0..1) from which a factor is said to organize a layer


def factor_scores(raw: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Each factor's above-chance score (0 = chance, 1 = perfect) with its 95% half-width (nan: none): position (kNN
    leak across branches), token identity (same-token neighbours), prompt and branch (pooled kNN purity)."""
    scores = {}
    leak = estimate_in(raw, "leak")
    if _finite(leak.value):
        scores["position"] = (leak.value, leak.band)
    for label, key in (
        ("token identity", "token_leak"),
        ("prompt", "purity_prompt_pooled"),
        ("branch", "purity_branch_pooled"),
    ):
        e = estimate_in(raw, key)
        if _finite(e.value, e.chance) and e.chance < 1:
            scores[label] = (_excess(e.value, e.chance), e.band / (1 - e.chance))
    return scores


def _band(e: Estimate) -> float:
    """The estimate's 95% half-width, 0 where it has none (a sentence then quotes ±0)."""
    return e.band if math.isfinite(e.band) else 0.0


def dominant_factor(raw: dict[str, Any]) -> tuple[str, float]:
    """(factor, score) with the largest above-chance score (factor_scores), or ('nothing measured', 0)."""
    scores = factor_scores(raw)
    if not scores:
        return "nothing measured", 0.0
    factor = max(scores, key=lambda f: scores[f][0])
    return factor, scores[factor][0]


def factor_sentence(raw: dict[str, Any]) -> str:
    """Which factor organizes the neighbourhoods, no stronger than the bands (a factor without a band counts
    as one whose band covers everything): one factor only when its band clears ORGANIZING and every other
    factor's band; 'leads' when it clears the others' but not ORGANIZING; none when every band stays
    under ORGANIZING; else which factors' bands overlap the leader's."""
    scores = factor_scores(raw)
    if not scores:
        return ""
    ranked = sorted(scores, key=lambda f: -scores[f][0])
    lo = {f: v[0] - v[1] if math.isfinite(v[1]) else -math.inf for f, v in scores.items()}
    hi = {f: v[0] + v[1] if math.isfinite(v[1]) else math.inf for f, v in scores.items()}
    shown = [
        f"{f} {scores[f][0]:.2f} " + (f"±{scores[f][1]:.2f}" if math.isfinite(scores[f][1]) else "(no band)")
        for f in ranked
    ]
    quoted = "above-chance scores, 0 chance to 1 perfect: " + ", ".join(shown)
    best, rest = ranked[0], ranked[1:]
    if all(hi[f] < ORGANIZING for f in ranked):
        return f"No single factor organizes this layer's neighbourhoods ({quoted}; each band under {ORGANIZING})."
    if all(lo[best] > hi[f] for f in rest):
        if lo[best] >= ORGANIZING:
            return f"This layer is organized by **{best}** ({quoted})."
        return (
            f"**{best}** leads, but its band reaches below {ORGANIZING}, the score from which this verdict calls "
            f"a factor organizing ({quoted})."
        )
    tied = [best] + [f for f in rest if hi[f] >= lo[best]]
    names = f"{', '.join(tied[:-1])} and {tied[-1]}"
    return f"No factor clearly leads: the bands of **{names}** overlap ({quoted})."


def token_sentence(raw: dict[str, Any]) -> str:
    """How often other branches' nearest neighbours share the current token, with both bands."""
    tok = estimate_in(raw, "token_leak")
    if not _finite(tok.value, tok.chance):
        return ""
    band = f" ±{_band(tok):.0%}" if _band(tok) else ""
    chance = f"chance {tok.chance:.0%}" + (f", up to {tok.chance_hi:.0%}" if _finite(tok.chance_hi) else "")
    return f"Nearest neighbours in other branches share the current token **{tok.value:.0%}**{band} of the time ({chance})."


def p_value_text(removal: dict[str, Any]) -> str:
    """'p = 0.43', or 'p <= 0.05' at the smallest value the permutations can give."""
    p, p_min = removal.get("p_value"), removal.get("p_min")
    if not _finite(p):
        return "not tested"
    fmt = (lambda v: f"{v:.3f}") if _finite(p_min) and p_min < 0.05 - 1e-12 else (lambda v: f"{v:.2f}")
    return f"p <= {fmt(p_min)}" if _finite(p_min) and p <= p_min + 1e-12 else f"p = {fmt(p)}"


def probe_clause(probe: dict[str, Any]) -> str:
    """What the prompt-held-out probe says, no stronger than its band: "decodable" only when the whole
    band clears chance's top, "not decodable" only when the band's top is under it, else undecided."""
    e = MEASURES["probe"].estimate(probe)
    if not _finite(e.value, e.chance_hi, e.lo, e.hi):
        return ""
    top = max(e.chance_hi, 0.0)
    numbers = f"probe R2 {e.value:.2f}, band {e.lo:.2f} to {e.hi:.2f}, chance at most {top:.2f}"
    if e.lo > top:
        return f" and is linearly decodable across prompts ({numbers})"
    if e.hi <= top:
        return f" and is not linearly decodable across prompts ({numbers})"
    return f" and its linear decodability across prompts is undecided: the band reaches chance ({numbers})"


def verdict(raw: dict[str, Any], removed: dict[str, Any] | None = None) -> str:
    """Two or three sentences with their numbers, chance levels and bands (markdown)."""
    return " ".join(sentences(raw, removed))


def sentences(raw: dict[str, Any], removed: dict[str, Any] | None = None) -> list[str]:
    """The verdict's sentences, each generated from the numbers it quotes."""
    parts = [t for t in (position_sentence(raw), token_sentence(raw), factor_sentence(raw)) if t]
    return parts + removal_sentences(raw, removed)


def position_sentence(raw: dict[str, Any]) -> str:
    """Position's share of the variance with its band and chance, and what the probe reads ('' without)."""
    r2 = estimate_in(raw, "r2_pos")
    if not _finite(r2.value, r2.chance):
        return ""
    band = f" ±{r2.band:.1%}" if _finite(r2.band) else ""
    cband = f" ±{r2.chance_band:.1%}" if _finite(r2.chance_band) else ""
    text = f"Position explains **{r2.value:.1%}** of the variance here{band} (chance {r2.chance:.1%}{cband})"
    return text + probe_clause(raw.get("probe", {})) + "."


def removal_title(removal: dict[str, Any] | None) -> str:
    """What the right panel shows, in words: 'position removed', 'token identity and position (linear)
    removed', 'nothing removed (none detected)', 'raw'."""
    if not removal or removal.get("method") == "none":
        return "raw (no removal)"
    what = removal.get("removed") or ([removal.get("nuisance")] if removal.get("weight") else [])
    if what:
        return f"{' and '.join(what)} removed"
    from analysis.nuisances import NUISANCES

    tests = {k: t for k, t in (removal.get("tests") or {}).items() if k in NUISANCES}
    kept = [NUISANCES[k].words for k, t in tests.items() if t.get("detected")]
    if kept:
        return f"nothing removed ({' and '.join(kept)} found but kept)"
    alpha = removal.get("alpha", 0.05)
    small = [
        NUISANCES[k].words for k, t in tests.items() if _finite(t.get("p_value")) and t["p_value"] <= alpha
    ]
    if small:
        return f"nothing removed ({' and '.join(small)} significant, too small to estimate)"
    return "nothing removed (none detected)"


def removal_sentences(raw: dict[str, Any], removed: dict[str, Any] | None) -> list[str]:
    """One sentence per test the removal ran, each quoting its own numbers, then what the removal did to
    the position leak. Under one rule: 'detected' is significant (p <= alpha) with an out-of-fold estimate
    that predicts held-out tokens (R2 above 0); a significant test whose estimate does not predict is said
    to be so, not 'not detected'."""
    tests, outcome = removal_parts(raw, removed)
    return tests + outcome


def headline_and_details(raw: dict[str, Any], removed: dict[str, Any] | None = None) -> tuple[str, str]:
    """The verdict in two parts (markdown), together every sentence of `verdict`: the headline says what the layer holds (position, token identity) and what the removal changed; the
    details hold the factor comparison and, where something was removed, the test behind each decision
    (where nothing was, the tests are the outcome and stay in the headline)."""
    head = [t for t in (position_sentence(raw), token_sentence(raw)) if t]
    factor = factor_sentence(raw)
    tests, outcome = removal_parts(raw, removed)
    rem = (removed or {}).get("removal") or {}
    if rem.get("weight"):
        return " ".join(head + outcome), " ".join(([factor] if factor else []) + tests)
    return " ".join(head + tests + outcome), factor or ""


def removal_parts(raw: dict[str, Any], removed: dict[str, Any] | None) -> tuple[list[str], list[str]]:
    """(one sentence per test the removal ran, the rest: forced, its note, and what it changed)."""
    from analysis.guard import removed_nuisances
    from analysis.nuisances import NUISANCES

    rem = (removed or {}).get("removal")
    if not rem or rem.get("method") == "none":
        return [], []
    alpha = rem.get("alpha", 0.05)
    took = removed_nuisances(rem)
    # removed as means: the joint estimators list them with their weights; a linear erasure is not one
    by_probe = bool(rem.get("erased") or (rem.get("lowrank") or {}).get("weight"))
    as_means = set(rem["weights"]) if rem.get("weights") else (set() if by_probe else took)
    out = []
    for key, t in (rem.get("tests") or {}).items():
        name = NUISANCES[key].words
        level = "" if abs(alpha - 0.05) < 1e-12 else f" at level {alpha:.3f}"
        nums = (
            f"{p_value_text(t | {'p_min': rem.get('p_min')})}{level}, held-out R2 {t['r2_oof']:+.3f} against "
            f"{t['null_r2']:+.3f} by chance"
        )
        significant = _finite(t.get("p_value")) and t["p_value"] <= alpha
        if key in as_means:
            out.append(f"A {name} component was detected ({nums}) and removed.")
        elif significant and t["r2_oof"] <= 0:
            out.append(
                f"The {name} test was significant ({nums}), but its estimate is too small to predict held-out "
                "tokens, so it was not removed as means."
            )
        elif t.get("detected"):
            out.append(
                f"A {name} component was detected ({nums}) but not removed: {rem.get('note') or 'see the note'}."
            )
        elif key == "position" and (rem.get("lowrank") or {}).get("weight"):
            # the next sentence says the probe's part was subtracted: this test is of the means only
            out.append(
                f"No {name} component detected at this layer ({nums}): not removed as per-position means."
            )
        else:
            out.append(f"No {name} component detected at this layer ({nums}): not removed.")
    lin = rem.get("linear_test") or {}
    if lin:
        # its own probe, not the layer's: the removal's scaling and within-branch shuffles, so its R2 can
        # differ from the probe R2 of the first sentence (a researcher asked which one to believe)
        nums = (
            f"the removal's own probe, a ridge on the latents as the removal scales them, against position "
            "shuffled within branches: "
            f"{p_value_text(lin)} at level {lin.get('alpha', alpha):.3f}, probe R2 {lin['r2_oof']:+.3f} against "
            f"{lin['null_hi']:+.3f} at most by chance"
        )
        low = rem.get("lowrank") or {}
        if rem.get("erased"):
            out.append(f"Position that a linear probe reads across prompts was erased ({nums}).")
        elif low.get("weight"):
            out.append(
                "Position that a linear probe reads across prompts was subtracted as a smooth "
                f"rank-{low['rank']} component at weight {low['weight']:.2f}, its out-of-fold least-squares "
                f"weight ({nums})."
            )
        elif lin.get("detected"):
            out.append(
                f"A linear probe reads position across prompts ({nums}), but no smooth estimate of it predicts "
                "held-out prompts, so it was not removed."
            )
        else:
            out.append(f"A linear probe finds no position to erase across prompts ({nums}).")
    rest = []
    if rem.get("forced"):
        rest.append(f"Removal of {rem.get('nuisance', 'the nuisance')} forced, whatever the tests found.")
    if rem.get("note") and not any(rem["note"] in o for o in out):
        rest.append(rem["note"][0].upper() + rem["note"][1:] + ".")
    if rem.get("weight"):
        after = removed or {}
        whole = smaller_whole_sentence(raw, after) if "token" in took else ""
        rest += [t for t in (variance_sentence(raw, after), whole, leak_sentence(raw, after)) if t]
        if "token" in took and (t := token_removed_sentence(raw, after)):
            rest.append(t)
    return out, rest


def token_removed_sentence(raw: dict[str, Any], removed: dict[str, Any]) -> str:
    """What a token-identity removal did to the same-token share: 'down to chance' only when the band
    after reaches chance's interval, else how much of the above-chance part is left."""
    r, a = estimate_in(raw, "token_leak"), estimate_in(removed, "token_leak")
    if not _finite(r.value, a.value, a.chance):
        return ""
    top = a.chance_hi if _finite(a.chance_hi) else a.chance
    hr, ha = _band(r), _band(a)
    head = (
        f"After removing {_what(removed)}, neighbours in other branches share the current token "
        f"{r.value:.1%} ±{hr:.1%} -> {a.value:.1%} ±{ha:.1%} of the time (chance {a.chance:.1%}, "
        f"up to {top:.1%})"
    )
    if a.value - ha <= top:
        return head + ": down to chance."
    if r.value - a.chance <= 0:
        return head + "."
    left = (a.value - a.chance) / (r.value - a.chance)
    return head + f": {left:.0%} of its above-chance part is left."


def _what(removed: dict[str, Any]) -> str:
    return removal_title(removed.get("removal")).removesuffix(" removed")


def variance_sentence(raw: dict[str, Any], removed: dict[str, Any]) -> str:
    """What the removal did to position's share of the variance (R2_pos), the one measure of how much
    position went (a method's weight is the share of its own estimate it subtracted, not of position):
    'down to chance' when the band after reaches chance's band, 'unchanged' within the band of the change,
    'rose' beyond it, else the share of the above-chance part that went, with its band."""
    r, a = estimate_in(raw, "r2_pos"), estimate_in(removed, "r2_pos")
    if not _finite(r.value, r.chance, a.value, a.chance):
        return ""
    hr, ha = _band(r), _band(a)
    cr, ca = (e.chance_band if _finite(e.chance_band) else 0.0 for e in (r, a))
    change = math.hypot(hr, ha)
    nums = (
        f"{r.value:.1%} ±{hr:.1%} (chance {r.chance:.1%} ±{cr:.1%}) -> {a.value:.1%} ±{ha:.1%} "
        f"(chance {a.chance:.1%} ±{ca:.1%}), band of the change ±{change:.1%}"
    )
    head = f"After removing {_what(removed)}, position's share of the variance went {nums}"
    if a.value > r.value + change:
        return head + ": it rose."
    if r.value - hr <= r.chance + cr:
        return head + ": it was at chance before."
    if a.value - ha <= a.chance + ca:
        return head + ": down to chance."
    if abs(a.value - r.value) <= change:
        return head + ": unchanged within its band."
    above_r, above_a = r.value - r.chance, a.value - a.chance
    gone = 1 - above_a / above_r
    gone_half = math.hypot(ha, hr * above_a / above_r) / above_r
    return head + f": {gone:.0%} ±{gone_half:.0%} of its above-chance part went."


SMALLER_WHOLE = 0.05  # share of the variance a removal must take before a higher share is explained by it


def _decimals(x: float) -> int:
    """Decimals that print x with at least two significant digits (one at 10 and above), never in exponent
    notation: 6.4, 0.27, 0.0031."""
    return max(1, 1 - math.floor(math.log10(x))) if x > 0 and math.isfinite(x) else 1


def smaller_whole_sentence(raw: dict[str, Any], removed: dict[str, Any]) -> str:
    """Where a removal that took token identity (and at least SMALLER_WHOLE of the variance) left position's
    share of the variance higher than before: how much of the variance went, and what the variance
    per-position means explain (share x total, as a share of the raw view's total) did, with its band, so a
    higher share of a smaller whole is not read as position that grew. '' without bands."""
    r, a = estimate_in(raw, "r2_pos"), estimate_in(removed, "r2_pos")
    total_r, total_a = r.extra["total_var"], a.extra["total_var"]
    if not _finite(r.value, a.value, total_r, total_a) or total_r <= 0:
        return ""
    taken = 1 - total_a / total_r
    if a.value <= r.value or taken < SMALLER_WHOLE or not _finite(r.band, a.band):
        return ""
    # as shares of the raw view's variance (the model's own units read 132677 -> 55123 on the demo)
    scale = total_a / total_r
    before, after = 100 * r.value, 100 * a.value * scale
    hb, ha = 100 * r.band, 100 * a.band * scale
    band = math.hypot(hb, ha)
    dec = _decimals(max(abs(before), abs(after), band))
    head = (
        f"Removing {_what(removed)} took {taken:.0%} of the variance, and the variance per-position means "
        f"explain went {before:.{dec}f}% ±{hb:.{dec}f}% -> {after:.{dec}f}% ±{ha:.{dec}f}% of the raw view's "
        f"variance (band of the change ±{band:.{dec}f}%)"
    )
    whole = f"the share after removal is of a whole {taken:.0%} smaller"
    if after > before + band:
        return head + ": it grew as well."
    if after < before - band:
        return head + f": it fell; {whole}."
    return head + f": unchanged within its band; {whole}."


def leak_sentence(raw: dict[str, Any], removed: dict[str, Any]) -> str:
    """The kNN position leak before and after, with bands (the guard says when it moved the wrong way)."""
    r, a = estimate_in(raw, "leak"), estimate_in(removed, "leak")
    if not _finite(r.value, a.value):
        return ""
    chance = a.chance_hi if _finite(a.chance_hi) else r.chance_hi
    cband = f", chance 0 ±{chance:.3f}" if _finite(chance) else ""
    return (
        f"After removing {_what(removed)}, the kNN position leak went {r.value:+.3f} ±{_band(r):.3f} -> "
        f"{a.value:+.3f} ±{_band(a):.3f}{cband}."
    )
