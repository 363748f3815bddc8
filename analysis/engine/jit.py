"""Pay numba's compilation once per machine, not once per process or per checkout.

umap-learn compiles its kernels without numba's on-disk cache, so every fresh process spends 20-70 s
in JIT before its first layout. Turning the cache on for its module-level kernels, before anything
compiles, makes the second process load machine code from disk instead. Kernels that numba cannot
cache (closures over other functions, as in pynndescent) are avoided by the projection code.

Where: numba files its cache by each source file's path (next to it, in __pycache__), so every checkout
and every environment compiled its own (16 s for analysis.engine.kernels, 22 s for umap-learn's on 2
cores). `MachineLocator` files the project's and umap-learn's kernels instead under one directory per
source file *content* in the user's cache (kernel_cache_dir()), so a second checkout or virtualenv with
the same sources loads them. numba checks each entry against a hash of the source's content and its own
version, so a changed file compiles anew. NUMBA_CACHE_DIR, where set, still decides.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import threading
import warnings
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_MODULES = ("umap.utils", "umap.distances", "umap.layouts", "umap.umap_", "umap.spectral")
_lock = threading.Lock()
_enabled = False
_KERNELS = Path(__file__).resolve().parent / "kernels.py"


def kernel_cache_dir() -> Path:
    """$BRANCHLENS_KERNEL_CACHE, else ~/.cache/branchlens/numba: compiled kernels, shared by every checkout
    (apart from $BRANCHLENS_CACHE, which tests and benches point at throwaway directories)."""
    return Path(os.environ.get("BRANCHLENS_KERNEL_CACHE") or Path.home() / ".cache" / "branchlens" / "numba")


def source_digest(path: Path) -> str:
    """A short hash of a source file's content: what its cache directory is named for."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:20]


def _shared(py_file: str) -> bool:
    """Whether a kernel's source file is one whose cache goes to the machine-wide directory: the project's
    kernels and umap-learn's."""
    path = Path(py_file).resolve()
    if path == _KERNELS:
        return True
    spec = importlib.util.find_spec("umap")
    return bool(spec and spec.origin) and path.is_relative_to(Path(spec.origin).resolve().parent)


def install_machine_cache() -> bool:
    """Put MachineLocator before numba's own locators (after NUMBA_CACHE_DIR's); idempotent. False where
    this numba has no locator list to extend (its default, per source path, then applies)."""
    try:
        from numba.core import caching
    except ImportError:
        return False
    classes = getattr(getattr(caching, "CacheImpl", None), "_locator_classes", None)
    if not isinstance(classes, list) or not hasattr(caching, "_SourceFileBackedLocatorMixin"):
        return False
    with _lock:
        if not any(getattr(c, "__name__", "") == "MachineLocator" for c in classes):
            classes.insert(min(1, len(classes)), _machine_locator(caching))
    return True


def _machine_locator(caching):
    from numba.core import config

    class MachineLocator(caching._SourceFileBackedLocatorMixin, caching._CacheLocator):
        """numba's cache for one source file, in kernel_cache_dir()/<stem>-<content digest>-numba<version>."""

        def __init__(self, py_func, py_file):
            import numba

            self._py_file = py_file
            self._lineno = py_func.__code__.co_firstlineno
            name = f"{Path(py_file).stem}-{source_digest(Path(py_file))}-numba{numba.__version__}"
            self._cache_path = str(kernel_cache_dir() / name)

        def get_cache_path(self):
            return self._cache_path

        @classmethod
        def from_function(cls, py_func, py_file):
            if config.CACHE_DIR or not _shared(py_file):
                return None
            return super().from_function(py_func, py_file)

    return MachineLocator


def enable_disk_cache() -> int:
    """Turn on numba's on-disk cache for umap-learn's kernels; returns how many kernels it covers.

    Idempotent. Must run before those kernels first compile in this process (umap_fit does it). Cache
    files go to kernel_cache_dir() (MachineLocator; NUMBA_CACHE_DIR overrides it).
    """
    global _enabled
    install_machine_cache()
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
