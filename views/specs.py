"""The settings of a view, for the app's sidebar: which tokens (Selection) and how to compute (ViewSpec),
with the registered residualizers (their labels, help and declared parameters) and projections."""

from dataclasses import replace

from analysis.nuisances import Param
from analysis.project import ProjectionSpec
from analysis.residualize import COMMON, RESIDUALIZERS, ResidualSpec, registry
from analysis.view import ViewSpec
from views.service import Selection, raw_view_spec

FIRST = ("auto", "position", "token")  # the menu's order: these first, then the rest as registered


def methods() -> list[str]:
    """Every registered residualizer: the default and its one-nuisance variants first, `none` last."""
    names = list(registry())
    return [m for m in FIRST if m in names] + [m for m in names if m not in FIRST and m != "none"] + ["none"]


def method_label(method: str) -> str:
    return RESIDUALIZERS[method].label


def method_help(method: str) -> str:
    return RESIDUALIZERS[method].help


def method_params(method: str) -> tuple[Param, ...]:
    """The method's own declared parameters shown as controls, then the shared ones that are."""
    return tuple(p for p in RESIDUALIZERS[method].params if p.ui) + tuple(p for p in COMMON if p.ui)


def raw_of(spec: ViewSpec) -> ViewSpec:
    """The raw view beside `spec`: no removal, the same scaling and projection."""
    return raw_view_spec(spec)


def position_only(spec: ViewSpec) -> ViewSpec:
    """The same view with position removed alone (the one-click alternative to `auto`)."""
    return replace(spec, residual=spec.residual.with_method("position"))


__all__ = [
    "Param",
    "ProjectionSpec",
    "RESIDUALIZERS",
    "ResidualSpec",
    "Selection",
    "ViewSpec",
    "method_help",
    "method_label",
    "method_params",
    "methods",
    "position_only",
    "raw_of",
]
