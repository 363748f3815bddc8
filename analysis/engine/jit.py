"""Pay numba's compilation once per machine, not once per process or per checkout.

umap-learn compiles its kernels without numba's on-disk cache, so every fresh process spends 20-70 s
in JIT before its first layout. Turning the cache on for its module-level kernels, before anything
compiles, makes the second process load machine code from disk instead. Kernels that numba cannot
cache (closures over other functions, as in pynndescent) are avoided by the projection code.

Where the cache lives: analysis.engine.numba_cache (one directory per machine, filed by source content).
"""

from __future__ import annotations

import importlib
import logging
import threading
import warnings

import numpy as np

from analysis.engine import numba_cache

log = logging.getLogger(__name__)

_MODULES = ("umap.utils", "umap.distances", "umap.layouts", "umap.umap_", "umap.spectral")
_lock = threading.Lock()
_enabled = False


def enable_disk_cache() -> int:
    """Turn on numba's on-disk cache for umap-learn's kernels; returns how many kernels it covers.

    Idempotent. Must run before those kernels first compile in this process (umap_fit does it). Cache
    files go to kernel_cache_dir() (MachineLocator; NUMBA_CACHE_DIR overrides it).
    """
    global _enabled
    with _lock:
        if _enabled:
            return 0
        numba_cache.install()  # before umap's kernels get their caches: the machine-wide locator first
        from numba.core.registry import CPUDispatcher

        count = 0
        for name in _MODULES:
            module = importlib.import_module(name)
            for obj in vars(module).values():
                if isinstance(obj, CPUDispatcher) and not obj.signatures:
                    try:
                        obj.enable_caching()
                        count += 1
                    except Exception as exc:  # a kernel numba refuses to cache just stays uncached
                        log.debug("numba cache not enabled for %s: %s", obj, exc)
        _enabled = True
        return count


_one_fit = threading.Lock()


def umap_fit(
    Y: np.ndarray,
    idx: np.ndarray,
    dist: np.ndarray,
    n_components: int = 2,
    min_dist: float = 0.1,
    n_epochs: int = 200,
    seed: int | None = 0,
) -> np.ndarray:
    """umap-learn's layout (n, n_components) of Y (n, r) on a precomputed kNN graph (idx, dist: (n, k),
    each point first in its own row), PCA-initialised. The only place that imports umap.

    One fit at a time in a process (raw and removed views run on two threads, views.service): umap-learn
    calls numba kernels compiled with parallel=True, and numba's fallback threading layer (workqueue, used
    where no OpenMP or TBB runtime is found) aborts the process when two threads enter such kernels at
    once. The epochs hold the interpreter anyway, so the other view's numpy and LAPACK work still overlaps."""
    enable_disk_cache()  # before umap's kernels first compile in this process
    import umap

    n = len(Y)
    model = umap.UMAP(
        n_neighbors=idx.shape[1],
        n_components=n_components,
        min_dist=min_dist,
        metric="euclidean",
        precomputed_knn=(idx, dist, None),
        init="pca" if n > n_components + 1 else "random",
        n_epochs=n_epochs,
        random_state=seed,
        n_jobs=1 if seed is not None else -1,
    )
    with _one_fit, warnings.catch_warnings():  # catch_warnings is process-wide: inside the lock too
        # umap warns that precomputed kNN disables transform() and that a seed disables parallelism:
        # both are the intended trade-offs here.
        warnings.simplefilter("ignore")
        coords = model.fit_transform(Y)
    return np.asarray(coords, dtype=np.float32)


def warm_up(seed: int = 0) -> None:
    """Compile (or load from the disk cache) every kernel a default view uses, on a tiny input.

    The app runs this in the background at start, so the user's first UMAP does not pay for JIT.
    Both graph sizes umap-learn treats differently (below 4096 points it recomputes the graph itself).
    """
    from analysis.engine import kernels
    from analysis.engine.neighbours import knn_graph

    kernels.warm_up()  # the row-sum and shuffle kernels of the removal and the metrics
    rng = np.random.default_rng(seed)
    for n in (300, 4200):
        X = rng.normal(size=(n, 16)).astype(np.float32)
        idx, dist = knn_graph(X, 15)
        umap_fit(X, idx, dist, n_epochs=5, seed=seed)
