"""The settings of a view, for the app's sidebar: which tokens (Selection) and how to compute (ViewSpec),
with the registered residualizers (their labels, help and declared parameters) and projections."""

from analysis.nuisances import Param
from analysis.project import ProjectionSpec
from analysis.residualize import COMMON, RESIDUALIZERS, ResidualSpec, registry
from analysis.view import ViewSpec
from views.service import Selection, raw_view_spec


def methods() -> list[str]:
    """Every registered residualizer in menu order (each class's menu_order, then registration), `none`
    last."""
    names = [m for m in registry() if m != "none"]
    return sorted(names, key=lambda m: RESIDUALIZERS[m].menu_order) + ["none"]


def method_alternative(method: str) -> tuple[str, str, str] | None:
    """(method, button label, help) of the one-click switch offered beside `method`, or None."""
    return RESIDUALIZERS[method].alternative


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


__all__ = [
    "Param",
    "ProjectionSpec",
    "RESIDUALIZERS",
    "ResidualSpec",
    "Selection",
    "ViewSpec",
    "method_alternative",
    "method_help",
    "method_label",
    "method_params",
    "methods",
    "raw_of",
]
