"""Pay umap-learn's numba compilation once per machine, not once per process.

umap-learn compiles its kernels without numba's on-disk cache, so every fresh process spends 20-70 s
in JIT before its first layout. Turning the cache on for its module-level kernels, before anything
compiles, makes the second process load machine code from disk instead. Kernels that numba cannot
cache (closures over other functions, as in pynndescent) are avoided by the projection code.
"""

from __future__ import annotations

import importlib
import logging
import threading
import warnings

import numpy as np

log = logging.getLogger(__name__)

_MODULES = ("umap.utils", "umap.distances", "umap.layouts", "umap.umap_", "umap.spectral")
_lock = threading.Lock()
_enabled = False


def enable_disk_cache() -> int:
    """Turn on numba's on-disk cache for umap-learn's kernels; returns how many kernels it covers.

    Idempotent. Must run before those kernels first compile in this process (importing
    analysis.project does it). Cache files go next to the package, or to numba's per-user cache
    directory when that is not writable (NUMBA_CACHE_DIR overrides both).
    """
    global _enabled
    with _lock:
        if _enabled:
            return 0
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


def warm_up(seed: int = 0) -> None:
    """Compile (or load from the disk cache) every kernel a default projection uses, on a tiny input.

    The app runs this in the background at start, so the user's first UMAP does not pay for JIT.
    """
    from analysis.project import ProjectionSpec, project

    rng = np.random.default_rng(seed)
    X = rng.normal(size=(300, 16)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for metric in ("euclidean", "cosine"):
            project(X, ProjectionSpec(method="umap", metric=metric, n_epochs=5, seed=seed))
