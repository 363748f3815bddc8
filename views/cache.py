"""On-disk cache of computed views, keyed by everything that decides them."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from analysis.view import ViewResult

CACHE_FORMAT = 2  # 2: removal report, bands, content hash in the key
MATHS = Path(__file__).resolve().parents[1] / "analysis"  # the code that decides every cached number


@lru_cache(maxsize=1)
def code_version() -> str:
    """A digest of the maths' source (analysis/**/*.py, the engine included): a changed metric or method
    is another key, so a number computed by older code is never served (a bumped CACHE_FORMAT was once
    forgotten: a changed metric was served as 0.9451 where it now is 0.1235)."""
    digest = hashlib.sha256()
    for path in sorted(MATHS.rglob("*.py")):
        digest.update(path.relative_to(MATHS).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    """$BRANCHLENS_CACHE, else ~/.cache/branchlens: where the app keeps what it computed."""
    return Path(os.environ.get("BRANCHLENS_CACHE") or Path.home() / ".cache" / "branchlens")


def default_cache_dir() -> Path:
    """$BRANCHLENS_CACHE/views, else ~/.cache/branchlens/views."""
    return cache_root() / "views"


def key_digest(key: dict[str, Any]) -> str:
    """A stable hex digest of a JSON-able key."""
    blob = json.dumps({"format": CACHE_FORMAT, "code": code_version(), **key}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class ViewCache:
    """Projected coordinates and metrics of views, one .npz per key. Residuals are not stored (they are
    as large as the input and cheap to recompute)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

    def _path(self, key: dict[str, Any]) -> Path:
        digest = key_digest(key)
        return self.root / digest[:2] / f"{digest}.npz"

    def get(self, key: dict[str, Any]) -> ViewResult | None:
        found = self.get_arrays(key)
        return None if found is None else result_from_arrays(found)

    def put(self, key: dict[str, Any], result: ViewResult) -> None:
        self.put_arrays(key, **result_arrays(result))

    def get_arrays(self, key: dict[str, Any]) -> dict[str, np.ndarray] | None:
        """The arrays stored under key, or None (missing or unreadable entry: a miss)."""
        try:
            with np.load(self._path(key), allow_pickle=False) as data:
                return {name: data[name] for name in data.files}
        except (OSError, KeyError, ValueError):
            return None

    def put_arrays(self, key: dict[str, Any], **arrays: np.ndarray) -> None:
        """Store arrays atomically (write a temporary file, then rename); a full disk just skips caching."""
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
                np.savez(tmp, **arrays)
            os.replace(tmp.name, path)
        except OSError:
            try:
                os.unlink(tmp.name)
            except (OSError, UnboundLocalError):
                pass


def jsonable(obj: Any) -> Any:
    """json.dumps' default for the metrics: numpy scalars as Python numbers."""
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON-serializable: {type(obj).__name__}")


def result_arrays(result: ViewResult) -> dict[str, np.ndarray]:
    """A view's index, coordinates and (as JSON) metrics and timings, as the cache stores them."""
    meta = json.dumps({"metrics": result.metrics, "timings": result.timings}, default=jsonable)
    return {"index": result.index, "coords": result.coords, "meta": np.array(meta)}


def is_result(found: dict[str, np.ndarray]) -> bool:
    """Whether cached arrays are a view's (result_arrays'), without reading its JSON."""
    return {"index", "coords", "meta"} <= found.keys()


def result_from_arrays(found: dict[str, np.ndarray]) -> ViewResult | None:
    """The view back from result_arrays' arrays (None where they are not a view's)."""
    if not is_result(found):
        return None
    meta = json.loads(str(found["meta"]))
    return ViewResult(found["index"], found["coords"], None, meta["metrics"], meta["timings"])
