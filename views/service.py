"""Compute a view of a stored run: the one entry point the app, the report and the benchmarks use."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import polars as pl

from analysis.engine.blas import half_the_cores, limited
from analysis.guard import check
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
from store import queries
from store.connect import is_duckdb_file
from store.errors import StoreMissing
from store.sources import is_shard_run, reading
from views import layer_table
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
        return {
            "run": self.run_id,
            "layer": self.layer,
            "variant": self.variant,
            "prompts": list(self.prompt_ids) if self.prompt_ids is not None else None,
            "generated_only": self.generated_only,
            "fit_scope": self.fit_scope,
        }


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


def to_token_set(keys: pl.DataFrame, X: np.ndarray) -> TokenSet:
    extra = {c: keys[c].to_numpy() for c in ("depth", "token_id", "is_prompt")}
    extra["parent"] = keys["parent_branch_id"].fill_null(-1).to_numpy()
    return TokenSet(
        X, keys["position"].to_numpy(), keys["branch_id"].to_numpy(), keys["prompt_id"].to_numpy(), extra
    )


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
    spec = spec or ViewSpec()
    selection = raw_is_raw(selection, spec)
    t0 = time.perf_counter()
    with reading(store, lock_timeout) as con:
        key = content_key(con, store, selection) | {"spec": spec.to_dict()}
        hit = cache.get(key) if cache is not None else None
        keys, X = selected_rows(con, selection, with_vectors=hit is None)
        reference = None if hit is not None else reference_tokens(con, selection)
    # X is this call's own read: the view writes its residuals over it (no second copy of the vectors)
    return _view_of(keys, X, hit, spec, selection, reference, key, cache, time.perf_counter() - t0)


def _view_of(
    keys: pl.DataFrame,
    X: np.ndarray | None,
    hit: ViewResult | None,
    spec: ViewSpec,
    selection: Selection,
    reference: TokenSet | None,
    key: dict,
    cache: ViewCache | None,
    load: float,
    raw: Callable[[], ViewResult] | None = None,
) -> View:
    """The cached view, or the view computed from the rows (X overwritten with the residuals) and cached.
    raw: the raw view of these rows, for a removal that leaves them raw (analysis.view.compute_view)."""
    if hit is not None:
        return View(keys, hit, {"load": load, "cached": 1.0})
    result = compute_view(
        to_token_set(keys, X),
        spec,
        reference,
        independent=independent_reference(selection),
        in_place=True,
        raw=raw,
    )
    if cache is not None:
        cache.put(key, result)
    return View(keys, result, {"load": load, "cached": 0.0, **result.timings})


PAIR_BYTES = 512 << 20  # extra memory two views side by side may take (else one after the other)
PAIR_COPIES = 4  # extra copies of the vectors that raw and removed side by side hold (measured: 10.6 vs 7.0)
PROFILE_COPIES = 10  # the same for one layer of the Layers tab (measured: 16.7 vs 7.5)


def compute_pair(
    store: str | Path,
    selection: Selection,
    raw_spec: ViewSpec,
    spec: ViewSpec,
    cache: ViewCache | None = None,
    lock_timeout: float = 0.0,
) -> tuple[View, View]:
    """The raw and the removed view of one selection, each what compute() gives for its spec.

    Where the extra copies of the vectors fit in PAIR_BYTES they come from one read of the store and are
    computed side by side on two threads: one view's numpy and LAPACK work runs while the other holds the
    interpreter for its UMAP epochs (1.85 s against 2.7 s one after the other on the demo;
    bench/README.md). Above, one after the other, each from its own read, one view's vectors in memory at
    a time. A spec that removes nothing is its own raw view: computed once.
    """
    specs = (raw_spec, spec)
    sels = [raw_is_raw(selection, s) for s in specs]
    t0 = time.perf_counter()
    with reading(store, lock_timeout) as con:
        keys_ = [content_key(con, store, sel) | {"spec": s.to_dict()} for sel, s in zip(sels, specs)]
        hits = [cache.get(k) if cache is not None else None for k in keys_]
        missing = [h is None for h in hits]
        x_bytes = keys_[0]["rows"] * queries.vector_dim(con) * 4
        apart = all(missing) and (keys_[0] == keys_[1] or x_bytes * PAIR_COPIES > PAIR_BYTES)
        if not apart:
            keys, X = selected_rows(con, selection, with_vectors=any(missing))
            refs = [None if h is not None else reference_tokens(con, sel) for sel, h in zip(sels, hits)]
    load = time.perf_counter() - t0
    if apart and keys_[0] == keys_[1]:
        same = compute(store, selection, spec, cache, lock_timeout)
        return same, same
    if apart:
        raw = compute(store, selection, raw_spec, cache, lock_timeout)
        raw.result.residual = None  # the caller reads points and metrics: free the vectors before the next
        return raw, compute(store, selection, spec, cache, lock_timeout)

    def one(i: int, vectors: np.ndarray | None, raw: Callable[[], ViewResult] | None = None) -> View:
        return _view_of(keys, vectors, hits[i], specs[i], sels[i], refs[i], keys_[i], cache, load, raw)

    if all(missing):  # each view writes its residuals over its own copy
        # BLAS on half the cores for each view, set and restored from this thread: the views' own
        # one_thread() blocks then only count (analysis.engine.blas). A removal that finds nothing waits
        # for the raw view and takes its layout and measures.
        with limited(half_the_cores()), ThreadPoolExecutor(2, thread_name_prefix="branchlens-view") as pool:
            raw = pool.submit(one, 0, X.copy())
            removed = one(1, X, lambda: raw.result().result)
            return raw.result(), removed
    first = one(0, X)
    return first, one(1, X, lambda: first.result)


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


def content_key(con, store: str | Path, selection: Selection) -> dict:
    """What decides the selected tokens' vectors: the store's path, the selection, and the row count and
    content hash of those rows (so a run still being written, or a changed copy, is another key)."""
    count, digest = queries.token_digest(con, *_filter(selection))
    if count == 0:
        raise ValueError(
            f"no stored tokens for run {selection.run_id}, layer {selection.layer}, variant {selection.variant}"
        )
    return _tokens_key(con, store, selection, count, digest)


def _tokens_key(con, store: str | Path, selection: Selection, count: int, digest: int) -> dict:
    """content_key from the selected rows' count and hash already read (the Layers tab reads them once
    per layer for both methods)."""
    key = {"store": _identity(store), "selection": selection.key(), "rows": count, "content": digest}
    ref_run = _reference_run(selection)
    if ref_run is not None:
        key["reference"] = queries.token_digest(con, ref_run, selection.layer, selection.variant)
    return key


def _identity(store: str | Path) -> str:
    return str(store) if str(store).startswith("s3://") else str(Path(store).resolve())


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


def raw_is_raw(selection: Selection, spec: ViewSpec) -> Selection:
    """One name per token set and fit: a view that removes nothing is fitted on nothing (the fit scope
    must not change it), and "all tokens of the run" when the whole run is plotted is the plotted set
    (so the two are computed and cached once)."""
    if spec.residual.method == "none" or (selection.fit_scope == "run" and _reference_run(selection) is None):
        return replace(selection, fit_scope="plotted")
    return selection


def independent_reference(selection: Selection) -> bool:
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


def selected_rows(
    con, selection: Selection, with_vectors: bool = True
) -> tuple[pl.DataFrame, np.ndarray | None]:
    """The selection's tokens: their labels, and their vectors (n, d) unless with_vectors is False."""
    return queries.token_rows(con, *_filter(selection), with_vectors=with_vectors)


def reference_tokens(con, selection: Selection) -> TokenSet | None:
    """The tokens the removal is fitted on when that is not the plotted set itself (else None)."""
    run = _reference_run(selection)
    return None if run is None else _reference(con, run, selection)


def _reference(con, run: str, selection: Selection) -> TokenSet:
    keys, X = queries.token_rows(con, run, selection.layer, selection.variant)
    if len(keys) == 0:
        raise ValueError(
            f"reference run {run} has no tokens at layer {selection.layer}, variant {selection.variant}"
        )
    return to_token_set(keys, X)


def _filter(selection: Selection) -> tuple:
    """The store's token filter for a selection: run, layer, variant, prompts (or None), generated only."""
    return (
        selection.run_id,
        selection.layer,
        selection.variant,
        _list(selection.prompt_ids),
        selection.generated_only,
    )


def _list(ids: tuple[int, ...] | None) -> list[int] | None:
    return list(ids) if ids is not None else None


def _cached_measures(cache: ViewCache | None, key: dict) -> ViewResult | None:
    """A layer's measures from the cache: the profile's own entry, or the view of the same tokens and spec
    (compute's key: the profile's without its product) when that layer was shown, whose metrics hold every
    measure the profile reads."""
    if cache is None:
        return None
    own = cache.get(key)
    if own is not None:
        return own
    view = cache.get({k: v for k, v in key.items() if k != "product"})
    return view if view is not None and "r2_pos" in view.metrics else None  # a view cached without measures


def _measured(
    keys: pl.DataFrame,
    X: np.ndarray | None,
    reference: TokenSet | None,
    cache: ViewCache | None,
    residual,
    layer_spec: ViewSpec,
    sel: Selection,
    key: dict,
    hit: ViewResult | None,
    raw: Callable[[], ViewResult] | None = None,
) -> ViewResult:
    """One layer's measures for one method (no projection), or the cached ones. X is only read here
    (nothing in place), so raw and removed share it. raw: the raw method's measures of these rows, taken
    where the removal leaves them raw."""
    if hit is not None:
        return hit
    ref = reference if _reference_run(sel) is not None else None  # raw is fitted on nothing
    _, tokens, removal = residualize(to_token_set(keys, X), layer_spec, ref, independent_reference(sel))
    if removal.raw and raw is not None:
        hit = same_as_raw(raw(), tokens, removal, {})
        hit.residual = hit.removal = None
    else:
        metrics = measure(tokens, None, layer_spec) | {"removal": removal.to_dict()}
        if residual.method == "none":
            metrics |= layer_stats(tokens)
        hit = ViewResult(np.zeros(0, np.int64), np.zeros((0, 2), np.float32), None, metrics, {})
    if cache is not None:
        cache.put(key, hit)
    return hit


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
    the per-layer table (views.layer_table), one per layer and view ('raw' or the residualizer's label)."""
    rows = []
    residuals_ = [raw_view_spec(spec).residual] + ([spec.residual] if spec.residual.method != "none" else [])
    for layer in layers:
        specs = [replace(spec, residual=r) for r in residuals_]
        sels = [raw_is_raw(replace(selection, layer=layer), s) for s in specs]
        keys, X, reference = None, None, None  # read below unless both methods are cached
        with reading(store, lock_timeout) as con:
            # one content hash per layer: it depends on the tokens, not on the method or the fit scope
            digest = queries.token_digest(con, *_filter(replace(selection, layer=layer)))
            # what the removal is fitted on decides its numbers too (the reference's digest is in the key)
            bases = [_tokens_key(con, store, sel, *digest) for sel in sels]
            keys_ = [base | {"spec": s.to_dict(), "product": "profile"} for base, s in zip(bases, specs)]
            hits = [_cached_measures(cache, key) for key in keys_]
            x_bytes = digest[0] * queries.vector_dim(con) * 4
            side_by_side = x_bytes * PROFILE_COPIES <= PAIR_BYTES and all(h is None for h in hits)
            if any(h is None for h in hits):  # one read of the layer serves both methods
                keys, X = selected_rows(con, replace(selection, layer=layer))
                reference = reference_tokens(con, sels[-1])

        jobs = list(zip(residuals_, specs, sels, keys_, hits))
        if side_by_side:  # raw and removed on two threads (see compute_pair)
            with (
                limited(half_the_cores()),
                ThreadPoolExecutor(2, thread_name_prefix="branchlens-layer") as pool,
            ):
                first = pool.submit(_measured, keys, X, reference, cache, *jobs[0])
                done = [_measured(keys, X, reference, cache, *job, first.result) for job in jobs[1:]]
                done = [first.result(), *done]
        else:
            raw = _measured(keys, X, reference, cache, *jobs[0])
            done = [raw] + [_measured(keys, X, reference, cache, *job, lambda r=raw: r) for job in jobs[1:]]
        here = [
            layer_table.row(layer, residual.label(), hit.metrics) for (residual, *_), hit in zip(jobs, done)
        ]
        for r in here[1:]:  # the guard on the removal: each number it moved the wrong way beyond its band
            r["warning"] = warning_text(done[0].metrics, done[-1].metrics)
        here[0]["warning"] = ""
        rows += here
        keys = X = reference = (
            None  # one layer (and its reference) in memory at a time, not two while reading
        )
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
    with reading(store, lock_timeout) as con:
        key = content_key(con, store, selection) | {"spec": spec.to_dict(), "product": "divergence"}
        hit = cache.get_arrays(key) if cache is not None else None
        if hit is not None:
            return _divergence_from_arrays(hit)
        keys, X = selected_rows(con, selection)
        reference = reference_tokens(con, selection)
    found = _divergence(keys, X, reference, selection, spec)
    if cache is not None:
        cache.put_arrays(key, **_divergence_arrays(found))
    return found


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
