"""LAPACK on one BLAS thread against every thread, for the d x d eigendecompositions of the probes and PCAs.

    python bench/lapack_threads.py            # --sizes 256,640,1024,2048 --reps 5

Prints the median time of np.linalg.eigh on a (d, d) covariance with one BLAS thread and with the
library's default, side by side in one run (alternating), and their ratio; analysis.engine.blas.eigh picks one
thread up to SMALL_LAPACK rows.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.engine.blas import SMALL_LAPACK  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="256,640,1024,2048")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    threads = max((i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"), default=1)
    print(f"{os.cpu_count()} CPUs, BLAS default {threads} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"{'d':>6} {'one thread':>11} {'default':>9} {'one / default':>14}  analysis.engine.blas.eigh uses")
    rng = np.random.default_rng(0)
    for d in map(int, args.sizes.split(",")):
        X = rng.normal(size=(d + 100, d))
        C = X.T @ X
        times: dict[int | None, list[float]] = {1: [], None: []}
        for _ in range(args.reps):
            for limit in (1, None):
                with threadpool_limits(limits=limit, user_api="blas"):
                    t = time.perf_counter()
                    np.linalg.eigh(C)
                    times[limit].append(time.perf_counter() - t)
        one, default = np.median(times[1]), np.median(times[None])
        uses = "one thread" if d <= SMALL_LAPACK else "default"
        print(f"{d:>6} {one:>10.3f}s {default:>8.3f}s {one / default:>14.2f}  {uses}")


if __name__ == "__main__":
    main()
