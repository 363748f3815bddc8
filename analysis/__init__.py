"""The maths of branchlens: residualizers, projections, metrics on numpy arrays.

Pure functions and sklearn-style fit/transform classes. Nothing here reads a store or draws a widget:
`views` feeds it from the store, the app shows what it returns.

The names below are loaded on first use (PEP 562), so `import analysis.tokens` does not pay for the
metrics' or the residualizers' imports (scipy, scikit-learn). `project` is bound here at once: its
module imports only numpy (umap-learn and numba wait for the first UMAP), and the function must shadow
the submodule of the same name.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from analysis.project import ProjectionSpec, project

_EXPORTS = {
    "ResidualSpec": "analysis.residualize",
    "make_residualizer": "analysis.residualize",
    "TokenSet": "analysis.tokens",
    "find_sinks": "analysis.tokens",
    "ViewResult": "analysis.view",
    "ViewSpec": "analysis.view",
    "compute_view": "analysis.view",
}

__all__ = [
    "ProjectionSpec",
    "ResidualSpec",
    "TokenSet",
    "ViewResult",
    "ViewSpec",
    "compute_view",
    "find_sinks",
    "make_residualizer",
    "project",
]

if TYPE_CHECKING:
    from analysis.residualize import ResidualSpec, make_residualizer
    from analysis.tokens import TokenSet, find_sinks
    from analysis.view import ViewResult, ViewSpec, compute_view


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'analysis' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
