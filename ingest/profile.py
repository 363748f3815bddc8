"""A per-step profile of the tree builder: where decode time goes (forward, sampling, host syncs, ...).

Off by default, and then free. When on, each section waits for the device before and after it, so the
figures are exact per section but the run is serialized (asynchronous overlap is lost): use it to find
what costs, and the plain run for throughput.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

SECTIONS = ("prefill", "forward", "sample", "host_sync", "capture", "copy", "records")


class StepProfile:
    """Seconds and call counts per section of the tree builder's work."""

    def __init__(self, device: torch.device, enabled: bool = False):
        self.device, self.enabled = device, enabled
        self.seconds = dict.fromkeys(SECTIONS, 0.0)
        self.calls = dict.fromkeys(SECTIONS, 0)

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - t0
            self.calls[name] += 1

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {name: {"s": round(self.seconds[name], 3), "calls": self.calls[name]} for name in SECTIONS}
