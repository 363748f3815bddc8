"""What can be removed from a view, and how a residualizer declares its settings.

A nuisance names a per-token column (position, the current token's id, ...), says how its detection
test is run (the unit its estimate is centred within, the unit its labels are shuffled within or
between) and which measures guard a removal of it. A residualizer names the nuisances it removes and
declares its parameters as `Param`s; the app's sidebar, the report and the spec's checks are built
from these declarations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Nuisance:
    """key: what residualizers name in `removes`; column: the TokenSet column holding it ('position',
    'branch', 'prompt' or an extra such as 'token_id'); words: how sentences name it; guard: the measures'
    guard kind that watches it ('leak:position', 'leak:token') or None; centre: the unit whose mean is
    taken out before the test (None: the grand mean); shuffle: 'within:UNIT' (labels permuted among the
    rows of each unit) or 'between:UNIT' (each unit's label moved whole to another unit)."""

    key: str
    column: str
    words: str
    guard: str | None = None
    centre: str | None = "branch"
    shuffle: str = "within:branch"

    def values(self, tokens) -> np.ndarray | None:
        """(n,) the column, or None when these tokens do not carry it."""
        if self.column in ("position", "branch", "prompt"):
            return getattr(tokens, self.column)
        return tokens.extra.get(self.column)


NUISANCES: dict[str, Nuisance] = {}


def register_nuisance(nuisance: Nuisance) -> Nuisance:
    NUISANCES[nuisance.key] = nuisance
    return nuisance


register_nuisance(Nuisance("position", "position", "position", "leak:position"))
register_nuisance(Nuisance("token", "token_id", "token identity", "leak:token"))


def words(keys: tuple[str, ...] | list[str]) -> str:
    """'position', 'position and token identity', ..."""
    names = [NUISANCES[k].words for k in keys]
    return " and ".join(names) if names else "nothing"


@dataclass(frozen=True)
class Param:
    """A declared setting: its default, a label and help for the controls built from it, and its range.

    kind: 'bool', 'int', 'float' or 'choice'. auto: when not empty, None is allowed and means this
    (e.g. 'estimated from the data'). ui: shown among the method's controls in the app."""

    name: str
    default: Any
    label: str
    help: str
    kind: str = "float"
    low: float | None = None
    high: float | None = None
    choices: tuple = ()
    auto: str = ""
    ui: bool = True

    def check(self, value: Any, owner: str) -> None:
        """Raise ValueError with one line naming the setting and what it accepts."""
        if value is None:
            if self.auto:
                return
            raise ValueError(f"{owner}: {self.name} needs a value")
        if self.kind == "bool":
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{owner}: {self.name} must be true or false, got {value!r}")
            return
        if self.kind == "choice":
            if value not in self.choices:
                raise ValueError(
                    f"{owner}: unknown {self.name} {value!r}; choose one of {', '.join(map(str, self.choices))}"
                )
            return
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"{owner}: {self.name} must be a number, got {value!r}")
        if self.kind == "int" and int(value) != value:
            raise ValueError(f"{owner}: {self.name} must be a whole number, got {value!r}")
        if not np.isfinite(value):
            raise ValueError(f"{owner}: {self.name} must be finite")
        if self.low is not None and value < self.low:
            raise ValueError(f"{owner}: {self.name} must be >= {self.low:g}, got {value!r}")
        if self.high is not None and value > self.high:
            raise ValueError(f"{owner}: {self.name} must be <= {self.high:g}, got {value!r}")
