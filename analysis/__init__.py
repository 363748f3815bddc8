"""The maths of branchlens: residualizers, projections, metrics on numpy arrays.

Pure functions and sklearn-style fit/transform classes. Nothing here reads a store or draws a widget:
`views` feeds it from the store, the app shows what it returns.
"""

from analysis.project import ProjectionSpec, project
from analysis.residualize import ResidualSpec, make_residualizer
from analysis.tokens import TokenSet, find_sinks
from analysis.view import ViewResult, ViewSpec, compute_view

__all__ = [
    "ProjectionSpec", "ResidualSpec", "TokenSet", "ViewResult", "ViewSpec",
    "compute_view", "find_sinks", "make_residualizer", "project",
]
