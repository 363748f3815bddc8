"""Every removal method against exact answers; prints the markdown tables of docs/removal.md.

1. GPT-2 (random init, d=64) with a known position table, through the normal ingest (16 prompts x 4
   samples x 2 forks x 40 new tokens, ~6k tokens): layer 0 is exactly wte[token] + wpe[position], so
   subtracting wpe is the truth. Per method: the kNN position leak (other branches, and other prompts
   only), its gap to exact subtraction's, and the distance of what it subtracted from the true table.
2. The synthetic regimes of analysis.regimes, several seeds each: the mean gap of the leak to exact
   subtraction of the true positional part, its range, and how often the method removed something.

    python bench/removal_oracle.py [--seeds 5] [--methods auto,position,per_position,...]

Needs the dev extra (the GPT-2 fixtures reuse the tests' tokenizer).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from helpers import gpt2_layer0, table_error  # noqa: E402

from analysis import ResidualSpec, ViewSpec, compute_view  # noqa: E402
from analysis.project import ProjectionSpec  # noqa: E402
from analysis.regimes import generate  # noqa: E402
from analysis.residualize import registry  # noqa: E402

PCA = ProjectionSpec(method="pca")
ORACLES = [("random", 1.0), ("random", 0.2), ("smooth", 1.0), ("smooth", 0.2)]
REGIMES = [
    "helix",
    "random_table",
    "weak_linear",
    "one_prompt_3",
    "one_prompt_5",
    "one_prompt_3_none",
    "no_position",
    "token_only",
]


def view(tokens, method):
    return compute_view(tokens, ViewSpec(residual=ResidualSpec(method=method), projection=PCA))


def oracle_table(methods: list[str]) -> None:
    print("## GPT-2 layer 0 against exact subtraction of wpe\n")
    print(
        "| table | scale | tokens | method | leak | gap to exact | leak, other prompts | gap | table error | removed |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for kind, scale in ORACLES:
            tokens, table = gpt2_layer0(kind, scale, Path(tmp))  # tests/helpers.py
            exact = view(
                tokens.with_X((tokens.X - table[tokens.position]).astype(np.float32)), "none"
            ).metrics
            for method in ["none", "exact", *methods]:
                if method == "exact":
                    m, err, took = exact, 0.0, "wpe"
                else:
                    r = view(tokens, method)
                    m = r.metrics
                    err = table_error(tokens, r, table) if method != "none" else 1.0
                    took = ", ".join(m["removal"].get("removed") or []) or (
                        f"{m['removal']['weight']:.0%}" if m["removal"].get("weight") else "-"
                    )
                gap = m["leak"]["leak"] - exact["leak"]["leak"]
                gap_p = m["leak_prompt"]["leak"] - exact["leak_prompt"]["leak"]
                print(
                    f"| {kind} | {scale} | {m['n_tokens']} | {'raw' if method == 'none' else method} | "
                    f"{m['leak']['leak']:+.3f} ±{1.96 * m['leak']['sd']:.3f} | {gap:+.3f} | "
                    f"{m['leak_prompt']['leak']:+.3f} | {gap_p:+.3f} | {err:.3f} | {took} |"
                )
    print()


def regime_table(methods: list[str], seeds: int) -> None:
    print(f"## Synthetic regimes (analysis.regimes), {seeds} seeds: leak gap to exact subtraction\n")
    print(
        "| regime | method | mean gap | range | other prompts: mean gap | removed something | leak raw -> exact |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in REGIMES:
        runs = [generate(name, s) for s in range(seeds)]
        exacts = [view(r.exact(), "none").metrics for r in runs]
        raws = [view(r.tokens, "none").metrics for r in runs]
        head = (
            f"{np.mean([m['leak']['leak'] for m in raws]):+.3f} -> "
            f"{np.mean([m['leak']['leak'] for m in exacts]):+.3f} (band ±"
            f"{np.mean([1.96 * m['leak']['sd'] for m in exacts]):.3f})"
        )
        for method in methods:
            ms = [view(r.tokens, method).metrics for r in runs]
            gap = np.array([m["leak"]["leak"] - e["leak"]["leak"] for m, e in zip(ms, exacts)])
            gap_p = np.array(
                [
                    m.get("leak_prompt", {}).get("leak", np.nan)
                    - e.get("leak_prompt", {}).get("leak", np.nan)
                    for m, e in zip(ms, exacts)
                ]
            )
            took = np.mean([bool(m["removal"].get("weight")) for m in ms])
            print(
                f"| {name} | {method} | {gap.mean():+.3f} | {gap.min():+.3f} .. {gap.max():+.3f} | "
                f"{np.nanmean(gap_p) if np.isfinite(gap_p).any() else float('nan'):+.3f} | {took:.0%} | {head} |"
            )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--methods", default="auto,position,linear_erase,per_position,regression,projection")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    methods = [m for m in args.methods.split(",") if m in registry()]
    t0 = time.perf_counter()
    oracle_table(methods)
    regime_table(methods, args.seeds)
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
