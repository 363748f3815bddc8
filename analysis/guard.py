"""The guard on every view: a removal that moved a number the wrong way, beyond its noise band, is named.

Signed, and over every nuisance whatever was removed. After a removal a leak of the removed nuisance
should move toward chance. It is named when it ends beyond chance's band on the far side of chance from
raw (tokens at the same position pushed apart: a raw +0.31 that ends at -0.40 is named however large raw
was), or farther from chance than raw beyond the band of the change (invented). A leak of a nuisance that
was not removed and rose is named too: after token identity goes, a position leak that rises while the
leak across prompts (which share no content) stays at chance is content the tokens hid, not position;
one that rises across prompts too is position the tokens hid. A matched-position separability that falls
means content was removed with the nuisance.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from analysis.measures import MEASURES, Estimate, estimate_in
from analysis.stats import Z

LEAKS = {k: m.label for k, m in MEASURES.items() if m.guard == "leak:position"}
TOKEN_LEAKS = {k: m.label for k, m in MEASURES.items() if m.guard == "leak:token"}
SEPARABILITY = {k: m.label for k, m in MEASURES.items() if m.guard == "separability"}
NUISANCE_OF = {"leak:position": "position", "leak:token": "token"}
CROSS_PROMPT = "leak_prompt"  # the position leak among prompts, which share no content


@dataclass(frozen=True)
class Warning:
    metric: str
    label: str
    raw: float
    after: float
    band: float  # half-width of the 95% band of the change (raw and after taken as independent: they share
    # their query tokens, so the true band is narrower and the guard errs on the quiet side)
    kind: str  # 'invented', 'pushed apart', 'content removed', 'content unmasked', 'position unmasked'
    chance: float = 0.0
    chance_band: float = 0.0  # half-width of the band a value at chance falls in
    context: str = ""  # the cross-prompt leak quoted beside an unmasked one

    @property
    def message(self) -> str:
        fmt = "{:+.3f}" if self.metric in LEAKS else "{:.3f}"
        moved = f"({fmt.format(self.raw)} -> {fmt.format(self.after)}, band of the change ±{self.band:.3f}"
        moved += f"; chance {fmt.format(self.chance)} ±{self.chance_band:.3f})"
        what = {
            "invented": "ended above chance, farther than raw or past chance's band from raw's side: the removal "
            "invented it",
            "pushed apart": "ended below chance, farther than raw or past chance's band from raw's side: the removal "
            "pushed tokens that share it apart",
            "content removed": "fell: the removal took content away with the nuisance",
            "content unmasked": "rose after token identity was removed, but not across prompts "
            f"({self.context}): content the tokens hid (siblings near their forks), not position",
            "position unmasked": "rose after token identity was removed, across prompts too "
            f"({self.context}): position-dependent structure the tokens hid (position itself, "
            "or which tokens sit at which positions)",
        }[self.kind]
        return f"{self.label} {what} {moved}"

    def to_dict(self) -> dict:
        return asdict(self) | {"message": self.message}


def _sd(e: Estimate) -> float:
    return e.sd if math.isfinite(e.sd) else 0.0


def _chance(e: Estimate) -> tuple[float, float]:
    """(chance level, how far above it a value at chance may fall) of a leak's Estimate: a position leak 0
    with the shuffles' band, a same-token share its chance interval's top."""
    above = e.chance_hi - e.chance
    return e.chance, max(above, 0.0) if math.isfinite(above) else 0.0


def _estimate(key: str, metrics: dict) -> Estimate | None:
    """The measure's Estimate in a view's metrics, or None where it has no finite value."""
    if not metrics.get(key):
        return None
    e = estimate_in(metrics, key)
    return e if math.isfinite(e.value) else None


def removed_nuisances(removal: dict) -> set[str]:
    """The nuisance keys a removal actually took out (nothing when it removed nothing)."""
    if not removal or not removal.get("weight"):
        return set()
    if removal.get("removed_keys") is not None:
        return set(removal["removed_keys"])
    keys = set(removal.get("removes", []))
    if not removal.get("forced"):
        keys &= set(removal.get("detected_covariates", []))
    return keys


def check(raw: dict, after: dict) -> list[Warning]:
    """Warnings for metric dicts of the raw and the residualized view (as analysis.view.measure gives)."""
    out: list[Warning] = []
    removed = removed_nuisances(after.get("removal", {}))
    if not removed:
        return out
    for key, m in MEASURES.items():
        if m.guard not in NUISANCE_OF:
            continue
        r, a = _estimate(key, raw), _estimate(key, after)
        if not r or not a:
            continue
        c, half = _chance(a)
        band = Z * math.hypot(_sd(r), _sd(a))
        dr, da = r.value - c, a.value - c
        if NUISANCE_OF[m.guard] in removed:
            crossed = (
                dr > 0 > da + half or dr < 0 < da - half
            )  # past chance's band, on the other side from raw
            if crossed or abs(da) > abs(dr) + band:
                kind = "invented" if da > 0 else "pushed apart"
                out.append(Warning(key, m.label, r.value, a.value, band, kind, c, half))
        elif m.guard == "leak:position" and "token" in removed and da > dr + band and da > half:
            kind, context = "content unmasked", "no other prompts to compare"
            if cross := _estimate(CROSS_PROMPT, after):
                cc, ch = _chance(cross)
                context = f"across prompts {cross.value:+.3f}, chance band ±{ch:.3f}"
                if key != CROSS_PROMPT and cross.value - cc > ch:
                    kind = "position unmasked"
                elif key == CROSS_PROMPT:
                    kind = "position unmasked"
            out.append(Warning(key, m.label, r.value, a.value, band, kind, c, half, context))
    for key, label in SEPARABILITY.items():
        r, a = _estimate(key, raw), _estimate(key, after)
        if not r or not a:
            continue
        band = Z * math.hypot(_sd(r), _sd(a))
        if a.value < r.value - band:
            chance = a.chance if math.isfinite(a.chance) else 0.0
            out.append(Warning(key, label, r.value, a.value, band, "content removed", chance))
    return out
