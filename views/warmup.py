"""Compile (or load from numba's disk cache) the projection's kernels before the first view needs them, and
remember that this machine has them (for the app's spinner)."""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def warm_up() -> None:
    """analysis.engine.jit.warm_up, then the marker that says this machine's kernels are on disk."""
    from analysis.engine import jit

    jit.warm_up()
    try:
        marker = warm_marker()
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError as exc:  # an unwritable cache only costs a truthful "compiling" note next time
        log.debug("kernel warm marker not written: %s", exc)


def warm_marker() -> Path:
    """The file that says this machine's kernels are in numba's disk cache: beside them (the machine-wide
    kernel cache, analysis.engine.numba_cache), named for what the entries depend on (Python, numba and
    umap-learn versions, the content of the project's kernel sources, and NUMBA_CACHE_DIR where set), so
    a second checkout of the same code finds it."""
    from importlib.metadata import version

    import analysis
    from analysis.engine.numba_cache import kernel_cache_dir, source_digest

    here = Path(analysis.__file__).resolve().parent
    sources = [here / "engine" / name for name in ("kernels.py", "jit.py", "numba_cache.py")]
    key = repr(
        (
            sys.version,
            version("numba"),
            version("umap-learn"),
            [source_digest(f) for f in sources],
            os.environ.get("NUMBA_CACHE_DIR", ""),
        )
    )
    return kernel_cache_dir() / f"warm-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def is_warm() -> bool:
    """Whether this machine's kernels were compiled to disk already (a start then loads them)."""
    try:
        return warm_marker().exists()
    except OSError:
        return False


def waiting_note(compiling: bool, warm: bool) -> str:
    """What the spinner adds while the server's first UMAP may still be getting its kernels, in words true
    for both cases: loading a few seconds, or compiling on the first start of an installation."""
    if not compiling:
        return ""
    if warm:
        return " Loading the compiled projection kernels (a few seconds)."
    return (
        " The projection kernels are compiling: the first start on this machine, 40-90 s on 2 cores; later "
        "starts, from any checkout of the same code, load them in seconds (`python -m views warm-up` does "
        "it ahead)."
    )
