"""`python -m views report STORE`: per-layer position metrics, raw vs each residualizer.
`python -m views warm-up`: compile the projection kernels into numba's disk cache ahead of first use."""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from store.errors import StoreError
from views.cache import ViewCache
from views.report import DEFAULT_METHODS, format_table, layer_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m views", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="per-layer table: R2_pos, kNN position leak, separability, per method")
    rep.add_argument("store", help="DuckDB store written by `python -m ingest`")
    rep.add_argument("--run", help="run id (default: the newest run)")
    rep.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                     help=f"comma-separated residualizers (default {','.join(DEFAULT_METHODS)})")
    rep.add_argument("--projection", choices=("umap", "pca"), default="umap", help="for the 2-D metrics")
    rep.add_argument("--generated-only", action="store_true", help="leave the prompt tokens out")
    rep.add_argument("--variant", default="normal", help="normal (default) or zero_pe")
    rep.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    rep.add_argument("--no-cache", action="store_true", help="recompute instead of reading the view cache")
    sub.add_parser("warm-up", help="compile UMAP's kernels into numba's disk cache (once per machine, ~30 s)")
    args = parser.parse_args(argv)
    if args.command == "warm-up":
        return _warm_up()
    try:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = layer_report(args.store, args.run, methods, args.projection, args.generated_only,
                                None if args.no_cache else ViewCache(), args.variant)
    except (StoreError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0


def _warm_up() -> int:
    import time

    from analysis import jit

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jit.warm_up()
    print(f"projection kernels ready in {time.perf_counter() - start:.1f} s (numba disk cache)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
