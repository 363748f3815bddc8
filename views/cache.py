"""On-disk cache of computed views, keyed by everything that decides them."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from analysis.view import ViewResult

CACHE_FORMAT = 2  # 2: removal report, bands, content hash in the key


def default_cache_dir() -> Path:
    """$BRANCHLENS_CACHE/views, else ~/.cache/branchlens/views."""
    root = os.environ.get("BRANCHLENS_CACHE") or Path.home() / ".cache" / "branchlens"
    return Path(root) / "views"


def key_digest(key: dict[str, Any]) -> str:
    """A stable hex digest of a JSON-able key."""
    blob = json.dumps({"format": CACHE_FORMAT, **key}, sort_keys=True, default=str)
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
        path = self._path(key)
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                return ViewResult(data["index"], data["coords"], None, meta["metrics"], meta["timings"])
        except (OSError, KeyError, ValueError):  # missing or unreadable entry: a miss
            return None

    def put(self, key: dict[str, Any], result: ViewResult) -> None:
        """Store a result atomically (write a temporary file, then rename); a full disk just skips caching."""
        path = self._path(key)
        meta = json.dumps({"metrics": result.metrics, "timings": result.timings}, default=_jsonable)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
                np.savez(tmp, index=result.index, coords=result.coords, meta=np.array(meta))
            os.replace(tmp.name, path)
        except OSError:
            try:
                os.unlink(tmp.name)
            except (OSError, UnboundLocalError):
                pass


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON-serializable: {type(obj).__name__}")
