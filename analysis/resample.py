"""Bootstrap resampling counts: of tokens, or of whole units (prompts) so a band carries their variation.

Tokens of one prompt share its content, so a band from resampling tokens covers only the noise of which
tokens were asked, not what another set of prompts would give: measured on an 8-prompt store, the
leak's token band was a third of its leave-one-prompt-out spread, the probe's a fourteenth. Resampling
whole prompts (a cluster bootstrap) carries that; with one prompt, its branches are the units.
"""

from __future__ import annotations

import numpy as np

UNIT_WORDS = {"prompt": "prompts", "branch": "branches", "token": "tokens"}
# A kNN metric (and the probe) averages a per-token value that depends on the other tokens too: its
# neighbours, the probe's training prompts. Resampling units with those values held fixed draws only the
# query half of what another set of prompts changes; for a U-statistic of order two the reference half is
# as large again, which doubles the sd in the limit. Measured (bench/bands.py, 20 seeds per regime): the
# spread across seeds was 1.3-2.5x the unit bootstrap's sd over six regimes; R2_pos, recomputed from the
# resampled tokens themselves, needs no widening (ratio 1.0).
REFERENCE_FACTOR = 2.0


def counts(n_boot: int, n: int, rng: np.random.Generator, units: np.ndarray | None = None) -> np.ndarray:
    """(n_boot, n) float: how often each of n items is drawn in each resample. Without units, n items at
    random (a resample's counts are the bincount of n uniform draws); with units (n,) labels, as many
    units at random as there are, each item counted as often as its unit is drawn."""
    out = np.empty((n_boot, n))
    if units is None:
        for b in range(n_boot):
            out[b] = np.bincount(rng.integers(0, n, n), minlength=n)
        return out
    _, code = np.unique(np.asarray(units), return_inverse=True)
    code = code.ravel()
    m = int(code.max()) + 1 if n else 0
    for b in range(n_boot):
        out[b] = np.bincount(rng.integers(0, m, m), minlength=m)[code]
    return out


def n_units(units: np.ndarray | None) -> int:
    """How many distinct units label the items (0 without units)."""
    return 0 if units is None else len(np.unique(np.asarray(units)))


def t_quantile(n_units: int) -> float:
    """The 97.5% quantile of Student's t with n_units - 1 degrees of freedom: a band's half-width in sds.
    An sd estimated from a few prompts is itself noisy (with 6, 1.96 sds held the truth in 83% of runs)."""
    from scipy.stats import t

    return float(t.ppf(0.975, max(n_units - 1, 1)))


def unit_band(estimate: float, sd: float, n_units: int) -> dict[str, float]:
    """sd, lo, hi: estimate +- t_quantile(n_units) sd."""
    half = t_quantile(n_units) * sd
    return {"sd": float(sd), "lo": float(estimate - half), "hi": float(estimate + half)}


def widened_band(boots: np.ndarray, estimate: float, n_units: int) -> dict[str, float]:
    """The band of a value that depends on the other tokens (its neighbours, a probe's training prompts),
    from its unit-bootstrap values: their sd widened by REFERENCE_FACTOR, estimate +- Student's t sds."""
    boots = np.asarray(boots, dtype=np.float64)
    boots = boots[np.isfinite(boots)]
    if len(boots) == 0:
        return {"sd": float("nan"), "lo": float("nan"), "hi": float("nan")}
    return unit_band(estimate, REFERENCE_FACTOR * float(boots.std()), n_units)
