"""Shared statistical constants."""

Z = 1.96  # two-sided 95% normal quantile: a band's half-width is Z times its standard deviation
