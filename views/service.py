"""Compute a view of a stored run: the one entry point the app, the report and the benchmarks use."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import polars as pl

from analysis.tokens import TokenSet
from analysis.view import ViewResult, ViewSpec, compute_view, measure, residualize
from store import queries
from store.connect import reading
from views.cache import ViewCache

@dataclass(frozen=True)
class Selection:
    """Which tokens of a run to plot."""

    run_id: str
    layer: int
    variant: str = "normal"
    prompt_ids: tuple[int, ...] | None = None
    generated_only: bool = False
    fit_scope: str = "plotted"  # 'plotted', 'run' (all tokens of this run), or another run's id

    def key(self) -> dict:
        return {"run": self.run_id, "layer": self.layer, "variant": self.variant,
                "prompts": list(self.prompt_ids) if self.prompt_ids is not None else None,
                "generated_only": self.generated_only, "fit_scope": self.fit_scope}


@dataclass
class View:
    """The plotted tokens (labels and text, no vectors) and what was computed for them.

    result.index indexes rows of `tokens`; timings include 'load' (store reads) and 'cached'.
    """

    tokens: pl.DataFrame
    result: ViewResult
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def points(self) -> pl.DataFrame:
        """One row per plotted token: its labels and projected coordinates x, y (and z)."""
        rows = self.tokens[self.result.index]
        names = ["x", "y", "z"][: self.result.coords.shape[1]]
        return rows.with_columns(
            [pl.Series(n, self.result.coords[:, i]) for i, n in enumerate(names)]
        )


def to_token_set(keys: pl.DataFrame, X: np.ndarray) -> TokenSet:
    extra = {c: keys[c].to_numpy() for c in ("depth", "token_id", "is_prompt")}
    return TokenSet(X, keys["position"].to_numpy(), keys["branch_id"].to_numpy(), keys["prompt_id"].to_numpy(), extra)


def compute(
    store: str | Path, selection: Selection, spec: ViewSpec | None = None, cache: ViewCache | None = None,
    lock_timeout: float = 0.0,
) -> View:
    """Read the selected tokens, fit on the chosen scope, residualize, project and measure; cached.

    A cache hit reads only the token labels (no vectors). The key holds the store (its path and a hash
    of the selected rows' content), the run, selection and spec, so a run still being written is
    recomputed as it grows and two stores never share a view. Raw is raw: a view that removes
    nothing ignores the fit scope.
    """
    spec = spec or ViewSpec()
    selection = _raw_is_raw(selection, spec)
    t0 = time.perf_counter()
    with reading(store, lock_timeout) as con:
        count, digest = queries.token_digest(con, selection.run_id, selection.layer, selection.variant,
                                             _list(selection.prompt_ids), selection.generated_only)
        if count == 0:
            raise ValueError(
                f"no stored tokens for run {selection.run_id}, layer {selection.layer}, variant {selection.variant}"
            )
        key = {"store": _identity(store), "selection": selection.key(), "rows": count, "content": digest,
               "spec": spec.to_dict()}
        ref_run = _reference_run(selection)
        if ref_run is not None:
            key["reference"] = queries.token_digest(con, ref_run, selection.layer, selection.variant)
        hit = cache.get(key) if cache is not None else None
        keys, X = queries.token_rows(con, selection.run_id, selection.layer, selection.variant,
                                     _list(selection.prompt_ids), selection.generated_only,
                                     with_vectors=hit is None)
        reference = None if hit is not None or ref_run is None else _reference(con, ref_run, selection)
    load = time.perf_counter() - t0
    if hit is not None:
        return View(keys, hit, {"load": load, "cached": 1.0})
    result = compute_view(to_token_set(keys, X), spec, reference, independent=_independent(selection))
    if cache is not None:
        cache.put(key, result)
    return View(keys, result, {"load": load, "cached": 0.0, **result.timings})


def _identity(store: str | Path) -> str:
    return str(Path(store).resolve())


def _raw_is_raw(selection: Selection, spec: ViewSpec) -> Selection:
    """A view that removes nothing is fitted on nothing: the fit scope must not change it."""
    return replace(selection, fit_scope="plotted") if spec.residual.method == "none" else selection


def _independent(selection: Selection) -> bool:
    """The reference is another run: it shares no prompt with the plotted tokens."""
    return selection.fit_scope not in ("plotted", "run")


def _reference_run(selection: Selection) -> str | None:
    """The run to fit on, or None when the reference is the plotted set itself (no second read)."""
    if selection.fit_scope == "plotted":
        return None
    if selection.fit_scope == "run":
        whole_run_plotted = selection.prompt_ids is None and not selection.generated_only
        return None if whole_run_plotted else selection.run_id
    return selection.fit_scope


def _reference(con, run: str, selection: Selection) -> TokenSet:
    keys, X = queries.token_rows(con, run, selection.layer, selection.variant)
    if len(keys) == 0:
        raise ValueError(f"reference run {run} has no tokens at layer {selection.layer}, variant {selection.variant}")
    return to_token_set(keys, X)


def _list(ids: tuple[int, ...] | None) -> list[int] | None:
    return list(ids) if ids is not None else None


def layer_profile(
    store: str | Path, selection: Selection, spec: ViewSpec, layers: list[int], cache: ViewCache | None = None,
    lock_timeout: float = 0.0,
) -> list[dict]:
    """Per layer, how much position the raw latents and the residualized ones hold (no projection):
    rows of layer, method ('raw' or the residualizer's label), r2, chance, adjusted, heldout, leak."""
    rows = []
    for layer in layers:
        for residual in (replace(spec.residual, method="none"), spec.residual):
            layer_spec = replace(spec, residual=residual)
            sel = _raw_is_raw(replace(selection, layer=layer), layer_spec)
            key = {"profile": sel.key(), "spec": layer_spec.to_dict(), "store": _identity(store)}
            with reading(store, lock_timeout) as con:
                key["rows"], key["content"] = queries.token_digest(con, sel.run_id, layer, sel.variant,
                                                                   _list(sel.prompt_ids), sel.generated_only)
                hit = cache.get(key) if cache is not None else None
                if hit is None:
                    keys, X = queries.token_rows(con, sel.run_id, layer, sel.variant, _list(sel.prompt_ids),
                                                 sel.generated_only)
                    ref_run = _reference_run(sel)
                    reference = _reference(con, ref_run, sel) if ref_run is not None else None
            if hit is None:
                _, tokens, removal = residualize(to_token_set(keys, X), layer_spec, reference, _independent(sel))
                metrics = measure(tokens, None, layer_spec) | {"removal": removal.to_dict()}
                hit = ViewResult(np.zeros(0, np.int64), np.zeros((0, 2), np.float32), None, metrics, {})
                if cache is not None:
                    cache.put(key, hit)
            m = hit.metrics
            rows.append({
                "layer": layer, "method": residual.label(), "r2": m["r2_pos"]["r2"], "chance": m["r2_pos"]["chance"],
                "adjusted": m["r2_pos"]["adjusted"], "heldout": m["r2_pos"]["heldout"],
                "leak": m.get("leak", {}).get("leak", float("nan")),
                "leak_prompt": m.get("leak_prompt", {}).get("leak", float("nan")),
            })
            if spec.residual.method == "none":
                break
    return rows


def residuals(
    store: str | Path, selection: Selection, spec: ViewSpec, lock_timeout: float = 0.0
) -> tuple[pl.DataFrame, np.ndarray]:
    """The plotted tokens (sinks dropped as in the view) and their residual vectors, for clustering."""
    with reading(store, lock_timeout) as con:
        keys, X = queries.token_rows(con, selection.run_id, selection.layer, selection.variant,
                                     _list(selection.prompt_ids), selection.generated_only)
        ref_run = _reference_run(selection)
        reference = _reference(con, ref_run, selection) if ref_run is not None else None
    index, tokens, _ = residualize(to_token_set(keys, X), spec, reference, _independent(selection))
    return keys[index], tokens.X
