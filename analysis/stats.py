"""Shared statistical constants and the permutation test every detection reports."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Z = 1.96  # two-sided 95% normal quantile: a band's half-width is Z times its standard deviation


@dataclass
class PermutationTest:
    """A statistic (an out-of-fold R2) against its values under shuffles of the labels."""

    r2: float
    null: np.ndarray

    @property
    def p_value(self) -> float:
        return float((1 + (self.null >= self.r2).sum()) / (1 + len(self.null)))
