"""Compute a view of a stored run: the one entry point the app, the report and the benchmarks use.

The products of views.loader that this module registers: "points" (a view's projected points and
metrics), "profile" (a layer's measures, raw and removed, for the Layers tab and the report) and
"divergence" (where branches go apart). compute, compute_pair, layer_profile and divergence load them.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import polars as pl

from analysis.guard import check
from analysis.measures import MEASURES
from analysis.residualize import ResidualSpec
from analysis.tokens import TokenSet
from analysis.view import (
    ViewResult,
    ViewSpec,
    compute_view,
    layer_stats,
    measure,
    residualize,
    same_as_raw,
)
from store.connect import is_duckdb_file
from store.errors import StoreMissing
from store.sources import is_shard_run
from views import layer_table
from views.cache import ViewCache, is_result, result_arrays, result_from_arrays
from views.loader import (
    Product,
    Request,
    Rows,
    Selection,
    independent_reference,
    load,
    load_pair,
    register,
    to_token_set,
)

PAIR_COPIES = 4  # extra copies of the vectors that raw and removed side by side hold (measured: 10.6 vs 7.0)
PROFILE_COPIES = 10  # the same for one layer of the Layers tab (measured: 16.7 vs 7.5)


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
        return rows.with_columns([pl.Series(n, self.result.coords[:, i]) for i, n in enumerate(names)])


class Points(Product):
    """A view: the selected tokens residualized, projected and measured (analysis.view.compute_view), the
    residuals written over the rows' vectors. A cache hit reads the labels only."""

    name = "points"
    copies = PAIR_COPIES
    writes_vectors = True

    def compute(self, rows: Rows, request: Request, raw: Callable[[], View] | None = None) -> View:
        result = compute_view(
            to_token_set(rows.keys, rows.X),
            request.spec,
            rows.reference,
            independent=independent_reference(request.tokens),
            in_place=True,
            raw=(lambda: raw().result) if raw is not None else None,
        )
        return View(rows.keys, result, {"load": rows.load, "cached": 0.0, **result.timings})

    def encode(self, view: View) -> dict[str, np.ndarray]:
        return result_arrays(view.result)

    def readable(self, arrays: dict[str, np.ndarray]) -> bool:
        return is_result(arrays)  # checked without parsing the metrics, which decode does

    def decode(self, arrays: dict[str, np.ndarray], rows: Rows | None, request: Request) -> View:
        return View(rows.keys, result_from_arrays(arrays), {"load": rows.load, "cached": 1.0})

    @staticmethod
    def release(view: View) -> None:
        """Free a view's residuals (its points and metrics stay)."""
        view.result.residual = None


class Profile(Product):
    """A layer's measures for one method, without a projection (the Layers tab, the report). X is only
    read, so raw and removed share it. The view of the same tokens and spec, where it was shown, serves
    too: its metrics hold every measure the profile reads."""

    name = "profile"
    labels_on_hit = False
    copies = PROFILE_COPIES

    def compute(
        self, rows: Rows, request: Request, raw: Callable[[], ViewResult] | None = None
    ) -> ViewResult:
        _, tokens, removal = residualize(
            to_token_set(rows.keys, rows.X),
            request.spec,
            rows.reference,
            independent_reference(request.tokens),
        )
        if removal.raw and raw is not None:
            done = same_as_raw(raw(), tokens, removal, {})
            # the raw measures may come from a shown view's entry: no layout here, as if measured
            metrics = {k: v for k, v in done.metrics.items() if not (k in MEASURES and MEASURES[k].layout)}
            return ViewResult(np.zeros(0, np.int64), np.zeros((0, 2), np.float32), None, metrics, {})
        metrics = measure(tokens, None, request.spec) | {"removal": removal.to_dict()}
        if request.spec.residual.method == "none":
            metrics |= layer_stats(tokens)
        return ViewResult(np.zeros(0, np.int64), np.zeros((0, 2), np.float32), None, metrics, {})

    def encode(self, result: ViewResult) -> dict[str, np.ndarray]:
        return result_arrays(result)

    def readable(self, arrays: dict[str, np.ndarray]) -> bool:
        return is_result(arrays)  # checked without parsing the metrics, which decode does

    def decode(self, arrays: dict[str, np.ndarray], rows: Rows | None, request: Request) -> ViewResult:
        return result_from_arrays(arrays)

    def cached(self, cache: ViewCache, key: dict, request: Request) -> dict[str, np.ndarray] | None:
        own = super().cached(cache, key, request)
        if own is not None:
            return own
        view = cache.get_arrays(key | {"product": Points.name})
        shown = result_from_arrays(view) if view is not None else None
        return view if shown is not None and "r2_pos" in shown.metrics else None  # a view without measures


class Divergence(Product):
    """Where branches go apart, raw and removed, from the selection's rows (see divergence())."""

    name = "divergence"
    labels_on_hit = False

    def compute(self, rows: Rows, request: Request, raw=None) -> dict:
        return _divergence(rows.keys, rows.X, rows.reference, request.tokens, request.spec)

    def encode(self, found: dict) -> dict[str, np.ndarray]:
        return _divergence_arrays(found)

    def decode(self, arrays: dict[str, np.ndarray], rows: Rows | None, request: Request) -> dict:
        return _divergence_from_arrays(arrays)


for _product in (Points(), Profile(), Divergence()):
    register(_product)


def compute(
    store: str | Path,
    selection: Selection,
    spec: ViewSpec | None = None,
    cache: ViewCache | None = None,
    lock_timeout: float = 0.0,
) -> View:
    """Read the selected tokens, fit on the chosen scope, residualize, project and measure; cached.

    A cache hit reads only the token labels (no vectors). The key holds the store (its path and a hash
    of the selected rows' content), the run, selection and spec, so a run still being written is
    recomputed as it grows and two stores never share a view. Raw is raw: a view that removes
    nothing ignores the fit scope.
    """
    return load(Points.name, Request(store, selection, spec or ViewSpec()), cache, lock_timeout)


def compute_pair(
    store: str | Path,
    selection: Selection,
    raw_spec: ViewSpec,
    spec: ViewSpec,
    cache: ViewCache | None = None,
    lock_timeout: float = 0.0,
) -> tuple[View, View]:
    """The raw and the removed view of one selection, each what compute() gives for its spec
    (views.loader.load_pair: one read, side by side on two threads where they fit in PAIR_BYTES: 1.85 s
    against 2.7 s one after the other on the demo, bench/README.md). A spec that removes nothing is its
    own raw view: computed once. A removal that finds nothing takes the raw view's layout and measures."""
    return load_pair(
        Points.name, Request(store, selection, raw_spec), Request(store, selection, spec), cache, lock_timeout
    )


def store_to_open(path: str | Path, root: str | Path | None = None) -> Path | str:
    """What the app may open for a path typed in its Store box: a DuckDB file (by its header) or a
    distributed run's shard directory (read in place), inside `root` when one is set
    ($BRANCHLENS_STORE_ROOT), or an s3:// run URL (under root when root is an s3:// prefix). Anything
    else, missing, unreadable, another kind of file or outside the root, gets the same StoreMissing, so
    the box tells a visitor nothing about the server's files."""
    if str(path).startswith(
        "s3://"
    ):  # a run's shards on S3, read in place: only under an s3:// root if one is set
        if root is not None and not str(path).startswith(str(root).rstrip("/") + "/"):
            raise StoreMissing(f"no branchlens store at {path}")
        return str(path)
    candidate = Path(path).expanduser()
    try:
        resolved = candidate.resolve()
        inside = root is None or resolved.is_relative_to(Path(root).expanduser().resolve())
    except (OSError, RuntimeError):
        inside = False
    if not inside or not (is_duckdb_file(resolved) or is_shard_run(resolved)):
        raise StoreMissing(f"no branchlens store at {path}")
    return resolved


def raw_view_spec(spec: ViewSpec) -> ViewSpec:
    """The raw view beside `spec`: no removal, the same scaling and projection (one raw per scaling, so
    the app's raw panel, the Layers tab and the divergence share its cache entry)."""
    residual = spec.residual
    return replace(
        spec,
        residual=ResidualSpec(
            method="none", center=residual.center, l2=residual.l2, standardize=residual.standardize
        ),
    )


def warning_text(raw: dict, removed: dict) -> str:
    """The guard's warnings as one line: 'leak invented; ...' (empty when it says nothing)."""
    return "; ".join(f"{w.metric} {w.kind}" for w in check(raw, removed))


def layer_profile(
    store: str | Path,
    selection: Selection,
    spec: ViewSpec,
    layers: list[int],
    cache: ViewCache | None = None,
    lock_timeout: float = 0.0,
) -> list[dict]:
    """Per layer, how much position the raw latents and the residualized ones hold (no projection): rows of
    the per-layer table (views.layer_table), one per layer and view ('raw' or the residualizer's label).
    One read of a layer serves both methods; one layer in memory at a time."""
    rows = []
    specs = [raw_view_spec(spec)] + ([spec] if spec.residual.method != "none" else [])
    for layer in layers:
        requests = [Request(store, replace(selection, layer=layer), s) for s in specs]
        if len(requests) == 2:
            done = list(load_pair(Profile.name, *requests, cache, lock_timeout))
        else:
            done = [load(Profile.name, requests[0], cache, lock_timeout)]
        here = [layer_table.row(layer, s.residual.label(), d.metrics) for s, d in zip(specs, done)]
        for r in here[1:]:  # the guard on the removal: each number it moved the wrong way beyond its band
            r["warning"] = warning_text(done[0].metrics, done[-1].metrics)
        here[0]["warning"] = ""
        rows += here
    return rows


DIVERGENCE_FRAMES = ("by_offset", "by_prompt", "by_prompt_offset")


def divergence(
    store: str | Path,
    selection: Selection,
    spec: ViewSpec,
    lock_timeout: float = 0.0,
    cache: ViewCache | None = None,
) -> dict[str, pl.DataFrame | bool | str]:
    """Where branches go apart, without a projection: for every fork and sibling pair of the selected
    prompts, the distance at matched positions after they part, over the distance between tokens of
    unrelated prompts at the same position (1 = as far apart as unrelated prompts), raw and after removal.

    Returns 'by_offset' (rows: offset since the fork, view 'raw'/'removed', median, lo, hi, n_pairs),
    'by_prompt' (the same per prompt), 'by_prompt_offset' (per prompt and offset), 'has_baseline' and
    'note'. Cached on disk under the tokens' content key, as views are (a hit reads no vectors).
    """
    return load(Divergence.name, Request(store, selection, spec), cache, lock_timeout)


def _divergence_arrays(found: dict) -> dict[str, np.ndarray]:
    """The divergence's frames as Arrow IPC bytes and its flags as JSON, for the disk cache."""
    out = {}
    for name in DIVERGENCE_FRAMES:
        sink = io.BytesIO()
        found[name].write_ipc(sink)
        out[name] = np.frombuffer(sink.getvalue(), dtype=np.uint8)
    out["meta"] = np.array(json.dumps({"has_baseline": found["has_baseline"], "note": found["note"]}))
    return out


def _divergence_from_arrays(arrays: dict[str, np.ndarray]) -> dict:
    meta = json.loads(str(arrays["meta"]))
    frames = {name: pl.read_ipc(io.BytesIO(arrays[name].tobytes())) for name in DIVERGENCE_FRAMES}
    return frames | {"has_baseline": bool(meta["has_baseline"]), "note": meta["note"]}


def _divergence(
    keys: pl.DataFrame, X: np.ndarray, reference: TokenSet | None, selection: Selection, spec: ViewSpec
) -> dict:
    """divergence() computed from the selection's rows."""
    from analysis.divergence import divergence as pairs_apart
    from analysis.divergence import divergence_summary

    if len(keys) == 0:
        raise ValueError(f"no stored tokens for run {selection.run_id}, layer {selection.layer}")
    raw_spec = raw_view_spec(spec)
    frames: dict[str, list[pl.DataFrame]] = {"offset": [], "prompt": []}
    per_prompt: list[pl.DataFrame] = []
    result = None
    for name, view_spec in (("raw", raw_spec), ("removed", spec)):
        _, tokens, _ = residualize(
            to_token_set(keys, X), view_spec, reference, independent_reference(selection)
        )
        result = pairs_apart(tokens.X, tokens.position, tokens.branch, tokens.prompt, tokens.extra["parent"])
        for by in frames:
            frames[by].append(_summary_frame(divergence_summary(result, by=by), by, name))
        for p in np.unique(result.prompt):
            per_prompt.append(
                _summary_frame(
                    divergence_summary(result, by="offset", prompt=int(p)), "offset", name
                ).with_columns(pl.lit(int(p)).alias("prompt"))
            )
    empty = pl.DataFrame(
        schema={
            "offset": pl.Int64,
            "view": pl.String,
            "median": pl.Float64,
            "lo": pl.Float64,
            "hi": pl.Float64,
            "n_pairs": pl.Int64,
            "prompt": pl.Int64,
        }
    )
    return {
        "by_offset": pl.concat(frames["offset"]),
        "by_prompt": pl.concat(frames["prompt"]),
        "by_prompt_offset": pl.concat(per_prompt) if per_prompt else empty,
        "has_baseline": bool(result.has_baseline),
        "note": result.note,
    }


def _summary_frame(summary: dict, by: str, view: str) -> pl.DataFrame:
    return pl.DataFrame(
        {
            by: summary["key"],
            "view": view,
            "median": summary["median"],
            "lo": summary["lo"],
            "hi": summary["hi"],
            "n_pairs": summary["n_pairs"],
        }
    )
