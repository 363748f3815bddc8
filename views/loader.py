"""One way from a store to a computed product: a frozen Request, registered Products, one loader.

Every product (the projected points of a view, a layer's measures for the Layers tab, where branches go
apart, clusters) is read the same way: open the store for as short as it takes, key the request by the
selected rows' content (views.cache), serve a cache hit, else read the rows (and the reference the removal
is fitted on) and compute. A product is one class registered here: its name is its cache namespace.

    load("divergence", Request(store, selection, spec))
    load_pair("points", raw_request, request)   # raw and removed from one read, side by side
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from analysis.engine.blas import half_the_cores, limited
from analysis.tokens import TokenSet
from analysis.view import ViewSpec
from store import queries
from store.sources import reading
from views.cache import ViewCache

PAIR_BYTES = 512 << 20  # extra memory two results side by side may take (else one after the other)


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


@dataclass(frozen=True)
class Request:
    """What a product is asked for: a store, the tokens, the view's settings and the product's own
    parameters ((name, value) pairs, sorted: a request is hashable and names one cache entry)."""

    store: str
    selection: Selection
    spec: ViewSpec
    params: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "store", str(self.store))
        object.__setattr__(self, "params", tuple(sorted(dict(self.params).items())))

    @property
    def tokens(self) -> Selection:
        """The selection as read and keyed: raw is fitted on nothing, and the whole run plotted is the
        plotted set (raw_is_raw)."""
        return raw_is_raw(self.selection, self.spec)

    def param(self, name: str) -> Any:
        return dict(self.params)[name]


@dataclass
class Rows:
    """What the loader read for a request: the tokens' labels, their vectors (None on a cache hit) and
    the reference the removal is fitted on (None: the plotted tokens themselves); load: seconds read."""

    keys: pl.DataFrame
    X: np.ndarray | None
    reference: TokenSet | None
    load: float = 0.0


class Product:
    """A computed product of some tokens. name: its cache namespace; labels_on_hit: a cache hit still
    reads the tokens' labels (cheap, no vectors); copies: extra copies of the vectors its compute holds
    (decides whether two run side by side); writes_vectors: compute overwrites rows.X (two side by side
    then need a copy each)."""

    name: str = ""
    labels_on_hit: bool = True
    copies: int = 4
    writes_vectors: bool = False

    def compute(self, rows: Rows, request: Request, raw: Callable[[], Any] | None = None) -> Any:
        """The product of rows. raw: the same product of the raw view of these rows, for a removal that
        leaves them raw (a product may reuse it)."""
        raise NotImplementedError

    def encode(self, result: Any) -> dict[str, np.ndarray]:
        """Arrays to cache (views.cache.ViewCache.put_arrays)."""
        raise NotImplementedError

    def decode(self, arrays: dict[str, np.ndarray], rows: Rows | None, request: Request) -> Any:
        """The result back from its cached arrays (rows: the labels, when labels_on_hit)."""
        raise NotImplementedError

    def cached(self, cache: ViewCache, key: dict, request: Request) -> dict[str, np.ndarray] | None:
        """The cached arrays for key, None where there are none or they are not this product's (a product
        may also look in another's namespace)."""
        found = cache.get_arrays(key)
        return found if found is not None and self.readable(found) else None

    def readable(self, arrays: dict[str, np.ndarray]) -> bool:
        """Whether decode can read these arrays (an unreadable entry is a miss, not an error)."""
        return True


PRODUCTS: dict[str, Product] = {}


def register(product: Product) -> Product:
    """Make a product loadable by its name (a new product is one registered class)."""
    PRODUCTS[product.name] = product
    return product


def _key(con, name: str, request: Request, digest: tuple[int, int] | None = None) -> dict:
    sel = request.tokens
    base = (
        content_key(con, request.store, sel)
        if digest is None
        else _tokens_key(con, request.store, sel, *digest)
    )
    return base | {"spec": request.spec.to_dict(), "product": name, "params": dict(request.params)}


def load(
    name: str,
    request: Request,
    cache: ViewCache | None = None,
    lock_timeout: float = 0.0,
    raw: Callable[[], Any] | None = None,
) -> Any:
    """The product `name` of a request: from the cache (a hit reads no vectors), else read and computed
    and cached. The store is open only while reading. raw: the product of the raw view of the same tokens
    (Product.compute)."""
    product = PRODUCTS[name]
    sel = request.tokens
    t0 = time.perf_counter()
    with reading(request.store, lock_timeout) as con:
        key = _key(con, name, request)
        hit = product.cached(cache, key, request) if cache is not None else None
        if hit is not None and not product.labels_on_hit:
            return product.decode(hit, None, request)
        keys, X = selected_rows(con, sel, with_vectors=hit is None)
        reference = None if hit is not None else reference_tokens(con, sel)
    rows = Rows(keys, X, reference, time.perf_counter() - t0)
    if hit is not None:
        return product.decode(hit, rows, request)
    result = product.compute(rows, request, raw)
    if cache is not None:
        cache.put_arrays(key, **product.encode(result))
    return result


def load_pair(
    name: str, first: Request, second: Request, cache: ViewCache | None = None, lock_timeout: float = 0.0
) -> tuple[Any, Any]:
    """The product of two requests on the same tokens (the raw view and the removed one), each what
    load() gives. One read of the store serves both. Where the product's copies of the vectors fit in
    PAIR_BYTES the two are computed side by side on two threads (one's numpy and LAPACK work runs while
    the other holds the interpreter); else one after the other, each from its own read when the product
    writes over the vectors (one copy in memory at a time). The second may take the first's result
    where its removal leaves the tokens raw. Two requests with one key are computed once."""
    product = PRODUCTS[name]
    requests = (first, second)
    t0 = time.perf_counter()
    sels = [r.tokens for r in requests]
    if _filter(sels[0]) != _filter(sels[1]) or first.store != second.store:
        raise ValueError("load_pair takes two requests on the same tokens of one store")
    with reading(first.store, lock_timeout) as con:
        digest = queries.token_digest(con, *_filter(sels[0]))  # one content hash serves both keys
        if digest[0] == 0:
            content_key(con, first.store, sels[0])  # raises the no-tokens error
        keys_ = [_key(con, name, r, digest) for r in requests]
        hits = [product.cached(cache, k, r) if cache is not None else None for k, r in zip(keys_, requests)]
        missing = [h is None for h in hits]
        x_bytes = keys_[0]["rows"] * queries.vector_dim(con) * 4
        side_by_side = all(missing) and keys_[0] != keys_[1] and x_bytes * product.copies <= PAIR_BYTES
        apart = all(missing) and not side_by_side and (keys_[0] == keys_[1] or product.writes_vectors)
        rows_keys, X, refs = None, None, [None, None]  # apart: each load() reads its own
        if not apart and (any(missing) or product.labels_on_hit):  # else both served without labels
            rows_keys, X = selected_rows(con, sels[0], with_vectors=any(missing))
            refs = [None if h is not None else reference_tokens(con, s) for s, h in zip(sels, hits)]
    load_s = time.perf_counter() - t0
    if apart and keys_[0] == keys_[1]:
        same = load(name, second, cache, lock_timeout)
        return same, same
    if apart:
        one = load(name, first, cache, lock_timeout)
        release = getattr(product, "release", None)
        if release is not None:
            release(one)  # the caller reads what it needs: the vectors go before the next read
        return one, load(name, second, cache, lock_timeout, lambda: one)

    def one(i: int, vectors: np.ndarray | None, raw: Callable[[], Any] | None = None) -> Any:
        rows = Rows(rows_keys, vectors, refs[i], load_s) if rows_keys is not None else None
        if hits[i] is not None:
            return product.decode(hits[i], rows, requests[i])
        result = product.compute(rows, requests[i], raw)
        if cache is not None:
            cache.put_arrays(keys_[i], **product.encode(result))
        return result

    if side_by_side:
        # BLAS on half the cores for each, set and restored from this thread (analysis.engine.blas)
        with limited(half_the_cores()), ThreadPoolExecutor(2, thread_name_prefix="branchlens-pair") as pool:
            raw = pool.submit(one, 0, X.copy() if product.writes_vectors else X)
            other = one(1, X, raw.result)
            return raw.result(), other
    done = one(0, X)
    return done, one(1, X, lambda: done)


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
    """content_key from the selected rows' count and hash already read."""
    key = {"store": _identity(store), "selection": selection.key(), "rows": count, "content": digest}
    ref_run = reference_run(selection)
    if ref_run is not None:
        key["reference"] = queries.token_digest(con, ref_run, selection.layer, selection.variant)
    return key


def _identity(store: str | Path) -> str:
    return str(store) if str(store).startswith("s3://") else str(Path(store).resolve())


def raw_is_raw(selection: Selection, spec: ViewSpec) -> Selection:
    """One name per token set and fit: a view that removes nothing is fitted on nothing (the fit scope
    must not change it), and "all tokens of the run" when the whole run is plotted is the plotted set
    (so the two are computed and cached once)."""
    if spec.residual.method == "none" or (selection.fit_scope == "run" and reference_run(selection) is None):
        return replace(selection, fit_scope="plotted")
    return selection


def independent_reference(selection: Selection) -> bool:
    """The reference is another run: it shares no prompt with the plotted tokens."""
    return selection.fit_scope not in ("plotted", "run")


def reference_run(selection: Selection) -> str | None:
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
    run = reference_run(selection)
    if run is None:
        return None
    keys, X = queries.token_rows(con, run, selection.layer, selection.variant)
    if len(keys) == 0:
        raise ValueError(
            f"reference run {run} has no tokens at layer {selection.layer}, variant {selection.variant}"
        )
    return to_token_set(keys, X)


def to_token_set(keys: pl.DataFrame, X: np.ndarray) -> TokenSet:
    """The tokens of stored rows (labels from keys, vectors X (n, d)) as analysis takes them."""
    extra = {c: keys[c].to_numpy() for c in ("depth", "token_id", "is_prompt")}
    extra["parent"] = keys["parent_branch_id"].fill_null(-1).to_numpy()
    return TokenSet(
        X, keys["position"].to_numpy(), keys["branch_id"].to_numpy(), keys["prompt_id"].to_numpy(), extra
    )


def _filter(selection: Selection) -> tuple:
    """The store's token filter for a selection: run, layer, variant, prompts (or None), generated only."""
    return (
        selection.run_id,
        selection.layer,
        selection.variant,
        list(selection.prompt_ids) if selection.prompt_ids is not None else None,
        selection.generated_only,
    )


__all__ = [
    "PAIR_BYTES",
    "PRODUCTS",
    "Product",
    "Request",
    "Rows",
    "Selection",
    "content_key",
    "independent_reference",
    "load",
    "load_pair",
    "raw_is_raw",
    "reference_run",
    "reference_tokens",
    "register",
    "selected_rows",
    "to_token_set",
]
