"""A verdict on top of every view: what organizes this layer, in words, with the numbers behind it.

It reads the metrics of the raw view (analysis.view.measure + layer_stats) and of the residualized one,
and says how much of the layer is position (variance explained, and whether a linear probe reads it
across prompts), how often nearest neighbours share the current token, what the removal did, and which
factor dominates the neighbourhoods: position, token identity, prompt or branch.
"""

from __future__ import annotations

import math
from typing import Any


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
    return f"p <= {p_min:.2f}" if _finite(p_min) and p <= p_min + 1e-12 else f"p = {p:.2f}"


def verdict(raw: dict[str, Any], removed: dict[str, Any] | None = None) -> str:
    """Two or three sentences with their numbers, chance levels and bands (markdown)."""
    parts = []
    r2 = raw.get("r2_pos", {})
    if _finite(r2.get("r2"), r2.get("chance")):
        band = f" ±{1.96 * r2['sd']:.1%}" if _finite(r2.get("sd")) else ""
        text = f"Position explains **{r2['r2']:.1%}** of the variance here{band} (chance {r2['chance']:.1%})"
        probe = raw.get("probe", {})
        if _finite(probe.get("r2"), probe.get("chance_hi")):
            if probe["r2"] > max(probe["chance_hi"], 0.0):
                text += (f" and is linearly decodable across prompts (probe R2 **{probe['r2']:.2f}**, "
                         f"chance at most {max(probe['chance_hi'], 0.0):.2f})")
            else:
                text += f" and is not linearly decodable across prompts (probe R2 {probe['r2']:.2f}, at chance)"
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
    rem = (removed or {}).get("removal")
    if rem and rem.get("method") != "none":
        what = rem.get("nuisance", "nuisance")
        p_text = p_value_text(rem)
        if rem.get("forced"):
            parts.append(f"Removal of {what} forced ({p_text}).")
        elif not rem.get("detected"):
            parts.append(f"No {what} component detected at this layer ({p_text}): nothing was removed.")
        else:
            leak_r, leak_a = raw.get("leak", {}).get("leak"), removed.get("leak", {}).get("leak")
            moved = f"; kNN position leak {leak_r:+.3f} -> {leak_a:+.3f}" if _finite(leak_r, leak_a) else ""
            parts.append(f"A {what} component was detected ({p_text}) and {rem.get('weight', 1):.0%} of it "
                         f"removed{moved}.")
    return " ".join(parts)
