"""Where numba's compiled kernels live: once per machine, not once per checkout or environment.

numba files its cache by each source file's path (next to it, in __pycache__), so every checkout and
every environment compiled its own (16 s for analysis.engine.kernels, 22 s for umap-learn's on 2 cores).
`MachineLocator` files the project's and umap-learn's kernels instead under one directory per source
file *content* in the user's cache (kernel_cache_dir()), so a second checkout or virtualenv with the same
sources loads them. numba checks each entry against a hash of the source's content (and the directory
names its version), so a changed file compiles anew. NUMBA_CACHE_DIR, where set, still decides.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
from pathlib import Path

_KERNELS = Path(__file__).resolve().parent / "kernels.py"
_lock = threading.Lock()


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


def install() -> bool:
    """Put MachineLocator first among numba's locators (it steps aside where NUMBA_CACHE_DIR is set, so
    numba's own locator for that takes over); idempotent. False where this numba has no locator list to
    extend (its default, per source path, then applies)."""
    try:
        from numba.core import caching
    except ImportError:
        return False
    classes = getattr(getattr(caching, "CacheImpl", None), "_locator_classes", None)
    if not isinstance(classes, list) or not hasattr(caching, "_SourceFileBackedLocatorMixin"):
        return False
    with _lock:
        if not any(getattr(c, "__name__", "") == "MachineLocator" for c in classes):
            classes.insert(0, _machine_locator(caching))
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
