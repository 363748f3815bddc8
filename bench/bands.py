"""Do the reported 95% bands hold the truth? Coverage over new draws of each synthetic regime.

For each regime of analysis.regimes and each metric the views show with a band: the truth (mean over
`--seeds` independent runs), the spread of the value over `--seeds` other runs, the mean reported sd,
and how many of those runs' bands hold the truth (analysis.coverage). A band that holds it in ~95% of
runs says honestly what another set of prompts would give.

    python bench/bands.py [--seeds 20] [--regimes weak_linear,no_position,...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.coverage import coverage  # noqa: E402

REGIMES = [
    "no_position",
    "helix",
    "weak_linear",
    "token_only",
    "random_table",
    "one_prompt_5",
    "one_prompt_3_none",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--regimes", default=",".join(REGIMES))
    args = ap.parse_args()
    print(
        "| regime | metric | truth | spread across runs | mean reported sd | spread / sd | bands holding the truth |"
    )
    print("|---|---|---|---|---|---|---|")
    for regime in args.regimes.split(","):
        t0 = time.perf_counter()
        for c in coverage(regime, n_seeds=args.seeds):
            print(
                f"| {regime} | {c.metric} | {c.truth:+.4f} | {c.spread:.4f} | {c.reported_sd:.4f} | "
                f"{c.spread / c.reported_sd:.2f} | {c.covered}/{c.n} |"
            )
        print(f"<!-- {regime}: {time.perf_counter() - t0:.0f} s -->", file=sys.stderr)


if __name__ == "__main__":
    main()
