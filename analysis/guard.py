"""The guard on every view: a removal that moved a number the wrong way, beyond its noise band, is named.

After removal a position leak should move toward chance (0). Moving farther from it is a fault of the
method, not a finding: up means position was invented (e.g. a smooth fit of noise subtracted from
identical tokens breaks their ties by position), down means tokens at the same position were pushed
apart (means fitted on few branches hold their content). A matched-position separability that falls
means content was removed with the nuisance.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from analysis.measures import MEASURES

LEAKS = {k: m.label for k, m in MEASURES.items() if m.guard == "leak:position"}
SEPARABILITY = {k: m.label for k, m in MEASURES.items() if m.guard == "separability"}
Z = 1.96


@dataclass(frozen=True)
class Warning:
    metric: str
    label: str
    raw: float
    after: float
    band: float  # half-width of the 95% band of the change (raw and after taken as independent: they share
    # their query tokens, so the true band is narrower and the guard errs on the quiet side)
    kind: str  # 'invented', 'pushed apart', 'content removed'

    @property
    def message(self) -> str:
        what = {"invented": "rose away from chance: the removal invented position",
                "pushed apart": "fell below chance: the removal pushed tokens at the same position apart",
                "content removed": "fell: the removal took content away with the nuisance"}[self.kind]
        fmt = "{:+.3f}" if self.metric in LEAKS else "{:.3f}"
        return f"{self.label} {what} ({fmt.format(self.raw)} -> {fmt.format(self.after)}, band ±{self.band:.3f})"

    def to_dict(self) -> dict:
        return asdict(self) | {"message": self.message}


def _sd(m: dict) -> float:
    sd = m.get("sd", float("nan"))
    return 0.0 if sd is None or math.isnan(sd) else float(sd)


def check(raw: dict, after: dict) -> list[Warning]:
    """Warnings for metric dicts of the raw and the residualized view (as analysis.view.measure gives).

    Position leaks are checked when the removal took out position, the token-identity leak when it took
    out token identity (removing token identity may reveal position that it hid: not a fault)."""
    out = []
    nuisance = after.get("removal", {}).get("nuisance", "position")
    leaks = dict(LEAKS) if "position" in nuisance else {}
    if "token" in nuisance:
        leaks |= {k: m.label for k, m in MEASURES.items() if m.guard == "leak:token"}
    for key, label in leaks.items():
        r, a = raw.get(key), after.get(key)
        if not r or not a or not all(math.isfinite(m.get("leak", math.nan)) for m in (r, a)):
            continue
        # Farther from chance than raw, beyond the band of the change. (A leak that drops from +0.9 to
        # -0.05 moved toward chance: on data whose content is tied to position, e.g. forks that start
        # late, even a perfect removal lands a little below the shuffle's chance.)
        band = Z * math.hypot(_sd(r), _sd(a))
        if key == "token_leak":  # a share with a chance level above 0: farther from that chance
            if abs(a["leak"] - a.get("chance", 0)) > abs(r["leak"] - r.get("chance", 0)) + band:
                out.append(Warning(key, label, r["leak"], a["leak"], band,
                                   "invented" if a["leak"] > a.get("chance", 0) else "pushed apart"))
            continue
        if abs(a["leak"]) > abs(r["leak"]) + band:
            out.append(Warning(key, label, r["leak"], a["leak"], band, "invented" if a["leak"] > 0 else "pushed apart"))
    for key, label in SEPARABILITY.items():
        r, a = raw.get(key), after.get(key)
        if not r or not a or not all(math.isfinite(m.get("purity", math.nan)) for m in (r, a)):
            continue
        band = Z * math.hypot(_sd(r), _sd(a))
        if a["purity"] < r["purity"] - band:
            out.append(Warning(key, label, r["purity"], a["purity"], band, "content removed"))
    return out
