"""Do the reported 95% bands hold the true value? Checked on synthetic regimes whose truth is known.

The true value of a metric at a design (so many prompts, branches, tokens) is its expectation over new
draws of the generator: new prompts, same model. It is estimated by the mean over `n_seeds` independent
runs; the bands of `n_seeds` other runs are then checked against it. Metrics are computed as the views
compute them (analysis.view.measure and layer_stats), attention sinks dropped as the views drop them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from analysis.measures import estimate_in
from analysis.regimes import generate
from analysis.tokens import TokenSet
from analysis.view import ViewSpec, layer_stats, measure

CHECKED = ("r2_pos", "leak", "leak_prompt", "token_leak", "nn_branch", "probe")  # registered measures


@dataclass
class Coverage:
    regime: str
    metric: str
    truth: float
    spread: float  # sd of the value across the checked seeds
    reported_sd: float  # mean reported sd
    covered: int  # seeds whose [lo, hi] holds the truth
    n: int

    @property
    def share(self) -> float:
        return self.covered / self.n if self.n else float("nan")


def values(regime: str, seed: int, **overrides) -> dict[str, tuple[float, float, float, float]]:
    """metric -> (value, lo, hi, sd) for one run of a regime, raw latents, sinks dropped."""
    t = generate(regime, seed=seed, **overrides).tokens
    keep = ~t.extra["is_sink"]
    t = TokenSet(
        t.X[keep], t.position[keep], t.branch[keep], t.prompt[keep], {k: v[keep] for k, v in t.extra.items()}
    )
    out = measure(t, None, ViewSpec()) | layer_stats(t)
    found = {}
    for key in CHECKED:
        e = estimate_in(out, key)
        if math.isfinite(e.value):
            found[key] = (e.value, e.lo, e.hi, e.sd)
    return found


def coverage(regime: str, n_seeds: int = 20, **overrides) -> list[Coverage]:
    """Per metric: the truth from seeds n_seeds..2*n_seeds-1, the bands of seeds 0..n_seeds-1 against it."""
    runs = [values(regime, seed, **overrides) for seed in range(2 * n_seeds)]
    out = []
    for metric in runs[0]:
        v = np.array([r[metric] for r in runs if metric in r])  # (2n, 4)
        checked, truth = v[:n_seeds], float(v[n_seeds:, 0].mean())
        covered = int(((checked[:, 1] <= truth) & (truth <= checked[:, 2])).sum())
        out.append(
            Coverage(
                regime,
                metric,
                truth,
                float(checked[:, 0].std()),
                float(checked[:, 3].mean()),
                covered,
                len(checked),
            )
        )
    return out
