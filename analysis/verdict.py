"""A verdict on top of every view: what organizes this layer, in words, with the numbers behind it.

It reads the metrics of the raw view (analysis.view.measure + layer_stats) and of the residualized one,
and says how much of the layer is position (variance explained, and whether a linear probe reads it
across prompts), how often nearest neighbours share the current token, what the removal did, and which
factor dominates the neighbourhoods: position, token identity, prompt or branch.
"""

from __future__ import annotations

import math
from typing import Any

from analysis.stats import half_width


def _finite(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _excess(value: float, chance: float) -> float:
    """How far above chance, on a 0..1 scale (1 = perfect, 0 = chance)."""
    return (value - chance) / (1 - chance) if chance < 1 else 0.0


def dominant_factor(raw: dict[str, Any]) -> tuple[str, float]:
    """(factor, score) with the largest above-chance score among position (kNN leak across branches),
    token identity (same-token neighbours), prompt (pooled kNN purity) and branch (the same); score 0..1."""
    scores = {}
    if _finite(raw.get("leak", {}).get("leak")):
        scores["position"] = raw["leak"]["leak"]
    tok = raw.get("token_leak", {})
    if _finite(tok.get("leak"), tok.get("chance")):
        scores["token identity"] = _excess(tok["leak"], tok["chance"])
    for label, key in (("prompt", "purity_prompt_pooled"), ("branch", "purity_branch_pooled")):
        m = raw.get(key, {})
        if _finite(m.get("purity"), m.get("chance")):
            scores[label] = _excess(m["purity"], m["chance"])
    if not scores:
        return "nothing measured", 0.0
    factor = max(scores, key=scores.get)
    return factor, float(scores[factor])


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
    if not _finite(probe.get("r2"), probe.get("chance_hi"), probe.get("lo"), probe.get("hi")):
        return ""
    top = max(probe["chance_hi"], 0.0)
    numbers = f"probe R2 {probe['r2']:.2f}, band {probe['lo']:.2f} to {probe['hi']:.2f}, chance at most {top:.2f}"
    if probe["lo"] > top:
        return f" and is linearly decodable across prompts ({numbers})"
    if probe["hi"] <= top:
        return f" and is not linearly decodable across prompts ({numbers})"
    return f" and its linear decodability across prompts is undecided: the band reaches chance ({numbers})"


def verdict(raw: dict[str, Any], removed: dict[str, Any] | None = None) -> str:
    """Two or three sentences with their numbers, chance levels and bands (markdown)."""
    parts = []
    r2 = raw.get("r2_pos", {})
    if _finite(r2.get("r2"), r2.get("chance")):
        half = half_width(r2)
        band = f" ±{half:.1%}" if _finite(half) else ""
        text = f"Position explains **{r2['r2']:.1%}** of the variance here{band} (chance {r2['chance']:.1%})"
        text += probe_clause(raw.get("probe", {}))
        parts.append(text + ".")
    tok = raw.get("token_leak", {})
    if _finite(tok.get("leak"), tok.get("chance")):
        parts.append(f"Nearest neighbours in other branches share the current token **{tok['leak']:.0%}** of the "
                     f"time (chance {tok['chance']:.0%}).")
    factor, score = dominant_factor(raw)
    if score >= 0.2:
        parts.append(f"This layer is organized by **{factor}**.")
    elif factor != "nothing measured":
        parts.append("No single factor (position, token, prompt, branch) organizes this layer's neighbourhoods.")
    parts += removal_sentences(raw, removed)
    return " ".join(parts)


def removal_title(removal: dict[str, Any] | None) -> str:
    """What the right panel shows, in words: 'position removed', 'token identity and position (linear)
    removed', 'nothing removed (none detected)', 'raw'."""
    if not removal or removal.get("method") == "none":
        return "raw (no removal)"
    what = removal.get("removed") or ([removal.get("nuisance")] if removal.get("weight") else [])
    if what:
        return f"{' and '.join(what)} removed"
    from analysis.nuisances import NUISANCES

    kept = [NUISANCES[k].words for k, t in (removal.get("tests") or {}).items() if t.get("detected") and k in NUISANCES]
    return f"nothing removed ({' and '.join(kept)} found but kept)" if kept else "nothing removed (none detected)"


def removal_sentences(raw: dict[str, Any], removed: dict[str, Any] | None) -> list[str]:
    """One sentence per test the removal ran, each quoting its own numbers, then what the removal did to
    the position leak. Under one rule: 'detected' is significant (p <= alpha) with an out-of-fold estimate
    that predicts held-out tokens (R2 above 0); a significant test whose estimate does not predict is said
    to be so, not 'not detected'."""
    from analysis.guard import removed_nuisances
    from analysis.nuisances import NUISANCES

    rem = (removed or {}).get("removal")
    if not rem or rem.get("method") == "none":
        return []
    alpha = rem.get("alpha", 0.05)
    took = removed_nuisances(rem)
    # removed as means: the joint estimators list them with their weights; a linear erasure is not one
    as_means = set(rem["weights"]) if rem.get("weights") else (set() if rem.get("erased") else took)
    out = []
    for key, t in (rem.get("tests") or {}).items():
        name = NUISANCES[key].words
        nums = (f"{p_value_text(t | {'p_min': rem.get('p_min')})}, held-out R2 {t['r2_oof']:+.3f} against "
                f"{t['null_r2']:+.3f} by chance")
        significant = _finite(t.get("p_value")) and t["p_value"] <= alpha
        if key in as_means:
            out.append(f"A {name} component was detected ({nums}) and removed.")
        elif significant and t["r2_oof"] <= 0:
            out.append(f"The {name} test was significant ({nums}), but its estimate is too small to predict held-out "
                       "tokens, so it was not removed as means.")
        elif t.get("detected"):
            out.append(f"A {name} component was detected ({nums}) but not removed: {rem.get('note') or 'see the note'}.")
        else:
            out.append(f"No {name} component detected at this layer ({nums}): not removed.")
    lin = rem.get("linear_test") or {}
    if lin:
        nums = (f"{p_value_text(lin)} at level {lin.get('alpha', alpha):.3f}, probe R2 {lin['r2_oof']:+.3f} against "
                f"{lin['null_hi']:+.3f} at most by chance")
        if rem.get("erased"):
            out.append(f"Position that a linear probe reads across prompts was erased ({nums}).")
        else:
            out.append(f"A linear probe finds no position to erase across prompts ({nums}).")
    if rem.get("forced"):
        out.append(f"Removal of {rem.get('nuisance', 'the nuisance')} forced, whatever the tests found.")
    if rem.get("note") and not any(rem["note"] in o for o in out):
        out.append(rem["note"][0].upper() + rem["note"][1:] + ".")
    leak_r, leak_a = raw.get("leak", {}).get("leak"), (removed or {}).get("leak", {}).get("leak")
    if rem.get("weight") and _finite(leak_r, leak_a):
        out.append(f"kNN position leak {leak_r:+.3f} -> {leak_a:+.3f}.")
    return out
