"""The app's per-rerun point table (dashboard.space.prepare_points) at 10^5 and 10^6 points, beside the
per-point Python loop its context windows were (tests/test_dashboard_parts.py keeps that loop as the
reference the columns must equal).

    python bench/prepare_points.py            # --sizes 100000,1000000 --loop-max 1000000
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_dashboard_parts import loop_contexts  # noqa: E402

from dashboard import space  # noqa: E402


def inputs(n: int, length: int = 200) -> tuple:
    """A synthetic view of n points: branches of `length` tokens, 50 branches per prompt, 5k words."""
    rng = np.random.default_rng(0)
    branch = np.repeat(np.arange(n // length), length)
    position = np.tile(np.arange(length), n // length)
    vocab = np.array([f"w{i}\n" if i % 50 == 0 else f" w{i}" for i in range(5000)])
    base = pl.DataFrame(
        {
            "branch_id": branch,
            "prompt_id": branch // 50,
            "position": position,
            "token_text": vocab[rng.integers(0, 5000, len(branch))],
        }
    )
    view = base.with_columns(
        pl.Series("x", rng.normal(size=len(base))), pl.Series("y", rng.normal(size=len(base)))
    )
    branches = base.select("branch_id", "prompt_id").unique(maintain_order=True)
    lineage = base.select("branch_id", "position", "token_text")
    prompts = {p: f"prompt {p}" for p in range(int(base["prompt_id"].max()) + 1)}
    return view, branches, lineage, prompts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument(
        "--loop-max", type=int, default=1_000_000, help="time the loop only up to this many points"
    )
    args = p.parse_args()
    warnings.simplefilter("ignore")
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'points':>10} {'prepare_points':>15} {'the loop (contexts only)':>25} {'ratio':>7}")
    for n in map(int, args.sizes.split(",")):
        view, branches, lineage, prompts = inputs(n)
        t = time.perf_counter()
        space.prepare_points(view, view, branches, lineage, prompts)
        ours = time.perf_counter() - t
        loop = float("nan")
        if n <= args.loop_max:
            t = time.perf_counter()
            loop_contexts(view, lineage)
            loop = time.perf_counter() - t
        print(f"{n:>10,} {ours:>14.2f}s {loop:>24.2f}s {ours / loop:>7.3f}")


if __name__ == "__main__":
    main()
