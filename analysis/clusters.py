"""Clusters of (residualized) latents and what each one holds: its frequent tokens and its branches."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from sklearn.cluster import HDBSCAN, KMeans

from analysis.project import pca_reduce

CLUSTERINGS = ("kmeans", "hdbscan")


def cluster(
    X: np.ndarray, method: str = "kmeans", k: int = 8, min_cluster_size: int = 10, pca_dims: int = 50, seed: int = 0,
) -> np.ndarray:
    """Cluster labels per row (HDBSCAN marks noise as -1), on a PCA pre-reduction of X."""
    if method not in CLUSTERINGS:
        raise ValueError(f"unknown clustering {method!r}; choose one of {', '.join(CLUSTERINGS)}")
    X = np.asarray(X, dtype=np.float32)
    if len(X) < 2:
        return np.zeros(len(X), np.int64)
    Y = pca_reduce(X, pca_dims, seed) if 0 < pca_dims < X.shape[1] else X
    if method == "kmeans":
        k = int(min(k, len(X)))
        return KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(Y).astype(np.int64)
    size = int(max(2, min(min_cluster_size, len(X))))
    return HDBSCAN(min_cluster_size=size, copy=True).fit_predict(Y).astype(np.int64)


def cluster_summary(
    labels: np.ndarray, token_text: list[str] | np.ndarray, branch: np.ndarray, top: int = 5
) -> list[dict[str, Any]]:
    """Per cluster (largest first): size, its most frequent tokens and the branches it contains, with counts."""
    labels = np.asarray(labels)
    token_text = np.asarray(token_text, dtype=object)
    branch = np.asarray(branch)
    out = []
    for c in np.unique(labels):
        rows = labels == c
        out.append({
            "cluster": int(c),
            "size": int(rows.sum()),
            "top_tokens": Counter(token_text[rows].tolist()).most_common(top),
            "branches": sorted(Counter(branch[rows].tolist()).items(), key=lambda kv: (-kv[1], kv[0])),
        })
    return sorted(out, key=lambda r: (r["cluster"] == -1, -r["size"]))
