"""Clusters of a view's position-removed latents, cached on disk like the view itself."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from analysis.clusters import CLUSTERINGS, cluster, cluster_summary
from analysis.view import ViewSpec, residualize
from store.sources import reading
from views.cache import ViewCache
from views.service import (
    Selection,
    content_key,
    independent_reference,
    raw_is_raw,
    reference_tokens,
    selected_rows,
    to_token_set,
)

DOMINANT = 0.5  # a cluster holding more than this share of the tokens says little: the app says so


@dataclass
class Clusters:
    """tokens: the clustered tokens' labels (branch_id, position, prompt_id, token_text, ...) with a
    `cluster` column (-1: HDBSCAN's noise); summary: analysis.clusters.cluster_summary of them."""

    tokens: pl.DataFrame
    summary: list[dict[str, Any]]

    @property
    def dominant(self) -> dict[str, Any] | None:
        """The one cluster (not noise) holding more than DOMINANT of the tokens, if any."""
        big = [s for s in self.summary if s["cluster"] >= 0 and s["share"] > DOMINANT]
        return big[0] if big else None


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
    selection = raw_is_raw(selection, spec)
    with reading(store, lock_timeout) as con:
        key = content_key(con, store, selection) | {"spec": spec.to_dict(), "clusters": [method, int(k)]}
        hit = cache.get_arrays(key) if cache is not None else None
        keys, X = selected_rows(con, selection, with_vectors=hit is None)
        reference = None if hit is not None else reference_tokens(con, selection)
    if hit is not None:
        index, labels = hit["index"], hit["labels"]
    else:
        index, tokens, _ = residualize(
            to_token_set(keys, X), spec, reference, independent_reference(selection)
        )
        labels = cluster(tokens.X, method=method, k=k, min_cluster_size=k)
        if cache is not None:
            cache.put_arrays(key, index=np.asarray(index), labels=labels)
    rows = keys[np.asarray(index)].with_columns(pl.Series("cluster", np.asarray(labels, np.int64)))
    summary = cluster_summary(
        labels,
        rows["token_text"].to_list(),
        rows["branch_id"].to_numpy(),
        position=rows["position"].to_numpy(),
        prompt=rows["prompt_id"].to_numpy(),
    )
    return Clusters(rows, summary)
