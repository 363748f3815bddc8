"""Shared statistical constants and the permutation test every detection reports."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Z = 1.96  # two-sided 95% normal quantile: a band's half-width is Z times its standard deviation


def half_width(m: dict, lo: str = "lo", hi: str = "hi", sd: str = "sd") -> float:
    """A measure's 95% band half-width: of [lo, hi] where it gives one (Student's t for a few prompts,
    analysis.resample), else Z sds; nan when it has neither."""
    a, b, s = m.get(lo), m.get(hi), m.get(sd)
    if all(isinstance(v, (int, float)) and np.isfinite(v) for v in (a, b)):
        return (b - a) / 2
    return Z * s if isinstance(s, (int, float)) and np.isfinite(s) else float("nan")


@dataclass
class PermutationTest:
    """A statistic (an out-of-fold R2) against its values under shuffles of the labels."""

    r2: float
    null: np.ndarray

    @property
    def p_value(self) -> float:
        return float((1 + (self.null >= self.r2).sum()) / (1 + len(self.null)))
