"""Approximate-neighbour libraries on branchlens data: build + search time and recall@15 against exact.

Synthetic branch trees (analysis.synthetic), unit vectors, in the PCA-50 space UMAP uses and in the full
d=640 space; all points query the index (UMAP's kNN graph), then every point queries an index of 15k
landmarks (the landmark placement). Libraries not installed are skipped (hnswlib has no prebuilt wheel
for this Python, so it is not a dependency).

    python bench/neighbour_libs.py [--tokens 20000] [--full-space]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.engine.neighbours import exact_knn, pca_fit  # noqa: E402
from analysis.synthetic import branch_tree  # noqa: E402

K = 15


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a, b)) / K for a, b in zip(found[:3000], truth[:3000])]))


def libraries(M: int, efc: int, ef: int):
    """name -> fn(base, queries) -> (q, K) indices, for each installed library."""
    out = {}
    try:
        import usearch.index as ui

        def usearch_knn(B, Q):
            u = ui.Index(
                ndim=B.shape[1],
                metric="l2sq",
                dtype="f32",
                connectivity=M,
                expansion_add=efc,
                expansion_search=ef,
            )
            u.add(np.arange(len(B)), B, threads=1)
            return u.search(Q, K, threads=0).keys.astype(np.int64)

        out["usearch"] = usearch_knn
    except ImportError:
        pass
    try:
        import faiss

        def faiss_hnsw(B, Q):
            f = faiss.IndexHNSWFlat(B.shape[1], M)
            f.hnsw.efConstruction = efc
            f.add(B)
            f.hnsw.efSearch = ef
            return f.search(Q, K)[1]

        def faiss_ivf(B, Q):
            nlist = int(4 * np.sqrt(len(B)))
            f = faiss.IndexIVFFlat(faiss.IndexFlatL2(B.shape[1]), B.shape[1], nlist)
            f.train(B[np.random.default_rng(0).choice(len(B), min(len(B), 40 * nlist), replace=False)])
            f.add(B)
            f.nprobe = 8
            return f.search(Q, K)[1]

        out["faiss HNSW"] = faiss_hnsw
        out["faiss IVF nprobe 8"] = faiss_ivf
    except ImportError:
        pass
    try:
        import hnswlib

        def hnswlib_knn(B, Q):
            p = hnswlib.Index("l2", B.shape[1])
            p.init_index(len(B), ef_construction=efc, M=M)
            p.add_items(B)
            p.set_ef(ef)
            return p.knn_query(Q, K)[0].astype(np.int64)

        out["hnswlib"] = hnswlib_knn
    except ImportError:
        pass
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument(
        "--full-space", action="store_true", help="also the d=640 space (slow exact baseline)"
    )
    args = parser.parse_args()
    t = branch_tree(n_prompts=max(4, args.tokens // 1100), branches_per_prompt=10, length=200, d=640, seed=0)
    X = t.X[: args.tokens] / np.linalg.norm(t.X[: args.tokens], axis=1, keepdims=True)
    mean, comps = pca_fit(X, 50)
    spaces = {"PCA-50": np.ascontiguousarray(X @ comps - mean @ comps)}
    if args.full_space:
        spaces["d=640"] = np.ascontiguousarray(X)
    print(f"{len(X)} tokens, recall@{K} against exact, build + search wall time")
    for space, D in spaces.items():
        landmarks = np.ascontiguousarray(
            D[np.random.default_rng(0).choice(len(D), min(len(D), 15000), replace=False)]
        )
        tasks = {"graph": (D, D), "placement": (landmarks, D)}
        for task, (B, Q) in tasks.items():
            s = time.perf_counter()
            truth = exact_knn(Q, B, K)[0]
            print(f"{space} {task}: exact (numpy brute force) {time.perf_counter() - s:.2f} s")
            for M, efc, ef in ((8, 32, 24), (12, 48, 48)):
                for name, fn in libraries(M, efc, ef).items():
                    if name.startswith("faiss IVF") and M != 12:
                        continue
                    s = time.perf_counter()
                    found = fn(B, Q)
                    print(
                        f"  {name:<20} M={M:<3} {time.perf_counter() - s:6.2f} s  recall {recall(found, truth):.3f}"
                    )


if __name__ == "__main__":
    main()
