"""Clusters of (residualized) latents and what each one holds: its frequent tokens and its branches."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from analysis.project import pca_reduce

CLUSTERINGS = ("kmeans", "hdbscan")


def cluster(
    X: np.ndarray,
    method: str = "kmeans",
    k: int = 8,
    min_cluster_size: int = 10,
    pca_dims: int = 50,
    seed: int = 0,
) -> np.ndarray:
    """Cluster labels per row (HDBSCAN marks noise as -1), on a PCA pre-reduction of X."""
    if method not in CLUSTERINGS:
        raise ValueError(f"unknown clustering {method!r}; choose one of {', '.join(CLUSTERINGS)}")
    from sklearn.cluster import HDBSCAN, KMeans  # ~0.8 s to import: only when clustering

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
    labels: np.ndarray,
    token_text: list[str] | np.ndarray,
    branch: np.ndarray,
    top: int = 5,
    position: np.ndarray | None = None,
    prompt: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Per cluster (largest first, noise last): size and share of the tokens, its most frequent tokens
    and the branches it holds (with counts), and when given, its positions (median, 10th-90th
    percentile) and prompts (with counts): enough to tell a cluster of one token, of one span of
    positions or of one prompt's context apart."""
    labels = np.asarray(labels)
    token_text = np.asarray(token_text, dtype=object)
    branch = np.asarray(branch)
    out = []
    for c in np.unique(labels):
        rows = labels == c
        row: dict[str, Any] = {
            "cluster": int(c),
            "size": int(rows.sum()),
            "share": float(rows.mean()),
            "top_tokens": Counter(token_text[rows].tolist()).most_common(top),
            "branches": sorted(Counter(branch[rows].tolist()).items(), key=lambda kv: (-kv[1], kv[0])),
        }
        if position is not None:
            p = np.asarray(position)[rows]
            row["position"] = (float(np.median(p)), float(np.quantile(p, 0.1)), float(np.quantile(p, 0.9)))
        if prompt is not None:
            row["prompts"] = sorted(
                Counter(np.asarray(prompt)[rows].tolist()).items(), key=lambda kv: (-kv[1], kv[0])
            )
        out.append(row)
    return sorted(out, key=lambda r: (r["cluster"] == -1, -r["size"]))
