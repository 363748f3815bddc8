"""Clusters of a view's position-removed latents, cached on disk like the view itself."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from analysis.clusters import CLUSTERINGS, cluster, cluster_summary
from analysis.view import ViewSpec, residualize
from views import loader
from views.cache import ViewCache
from views.loader import Product, Request, Rows, Selection

DOMINANT = 0.5  # a cluster holding more than this share of the tokens says little: the app says so


@dataclass
class Clusters:
    """tokens: the clustered tokens' labels (branch_id, position, prompt_id, token_text, ...) with a
    `cluster` column (-1: HDBSCAN's noise); summary: analysis.clusters.cluster_summary of them."""

    tokens: pl.DataFrame
    summary: list[dict[str, Any]]
    index: np.ndarray | None = None  # the clustered tokens' rows among the selection's (sinks dropped)

    @property
    def dominant(self) -> dict[str, Any] | None:
        """The one cluster (not noise) holding more than DOMINANT of the tokens, if any."""
        big = [s for s in self.summary if s["cluster"] >= 0 and s["share"] > DOMINANT]
        return big[0] if big else None


class ClusterIds(Product):
    """Cluster ids of a view's residual latents (sinks dropped as in the view); params: method, k. A cache
    hit reads only the token labels."""

    name = "clusters"

    def compute(self, rows: Rows, request: Request, raw=None) -> Clusters:
        index, tokens, _ = residualize(
            loader.to_token_set(rows.keys, rows.X),
            request.spec,
            rows.reference,
            loader.independent_reference(request.tokens),
        )
        k = request.param("k")
        labels = cluster(tokens.X, method=request.param("method"), k=k, min_cluster_size=k)
        return _clusters(rows.keys, np.asarray(index), labels)

    def encode(self, found: Clusters) -> dict[str, np.ndarray]:
        return {"index": found.index, "labels": np.asarray(found.tokens["cluster"].to_numpy(), np.int64)}

    def decode(self, arrays: dict[str, np.ndarray], rows: Rows | None, request: Request) -> Clusters:
        return _clusters(rows.keys, arrays["index"], arrays["labels"])


loader.register(ClusterIds())


def clusters(
    store: str | Path,
    selection: Selection,
    spec: ViewSpec,
    method: str = "kmeans",
    k: int = 8,
    cache: ViewCache | None = None,
    lock_timeout: float = 0.0,
) -> Clusters:
    """Cluster the view's residual latents (sinks dropped as in the view) with k-means (k clusters) or
    HDBSCAN (min cluster size k). A cache hit reads only the token labels."""
    if method not in CLUSTERINGS:
        raise ValueError(f"unknown clustering {method!r}; choose one of {', '.join(CLUSTERINGS)}")
    request = Request(store, selection, spec, (("method", method), ("k", int(k))))
    return loader.load(ClusterIds.name, request, cache, lock_timeout)


def _clusters(keys: pl.DataFrame, index: np.ndarray, labels: np.ndarray) -> Clusters:
    """The clustered tokens' labels with their cluster ids, and the summary of them."""
    rows = keys[np.asarray(index)].with_columns(pl.Series("cluster", np.asarray(labels, np.int64)))
    summary = cluster_summary(
        labels,
        rows["token_text"].to_list(),
        rows["branch_id"].to_numpy(),
        position=rows["position"].to_numpy(),
        prompt=rows["prompt_id"].to_numpy(),
    )
    return Clusters(rows, summary, np.asarray(index))
