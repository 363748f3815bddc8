"""The settings of a view, for the app's sidebar: which tokens (Selection) and how to compute (ViewSpec),
with the registered residualizers and projections and their labels."""

from analysis.project import ProjectionSpec
from analysis.residualize import RESIDUALIZERS, ResidualSpec
from analysis.view import ViewSpec
from views.service import Selection

METHOD_LABELS = {"per_position": "position: per-position mean", "regression": "position: regression",
                 "projection": "position: project out top directions", "per_token": "token identity: per-token mean",
                 "position_token": "position + token identity", "none": "none (centre only)"}


def methods() -> list[str]:
    """Every registered residualizer, the labelled ones first (a new one appears under its own name)."""
    return [m for m in METHOD_LABELS if m in RESIDUALIZERS] + [m for m in RESIDUALIZERS if m not in METHOD_LABELS]


def raw_of(spec: ViewSpec) -> ViewSpec:
    """The raw view beside `spec`: no removal, the same scaling and projection."""
    from dataclasses import replace

    return replace(spec, residual=ResidualSpec(method="none", standardize=spec.residual.standardize))


__all__ = ["METHOD_LABELS", "ProjectionSpec", "RESIDUALIZERS", "ResidualSpec", "Selection", "ViewSpec", "methods",
           "raw_of"]
