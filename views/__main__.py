"""`python -m views report STORE`: per-layer position metrics, raw vs each residualizer.
`python -m views warm-up`: compile the projection kernels into numba's disk cache ahead of first use.
`python -m views synthetic STORE`: write a synthetic run where position dominates, known by construction."""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from store.errors import StoreError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m views", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser(
        "report", help="per-layer table: R2_pos, kNN position leak, separability, per method"
    )
    rep.add_argument("store", help="DuckDB store written by `python -m ingest`")
    rep.add_argument("--run", help="run id (default: the newest run)")
    rep.add_argument(
        "--methods",
        help="comma-separated residualizers (default: the report's standard set, "
        "views.report.DEFAULT_METHODS)",
    )
    rep.add_argument(
        "--projection",
        choices=("umap", "pca"),
        default=None,
        help="no effect (kept so older commands run): the per-layer table holds no 2-D number",
    )
    rep.add_argument("--generated-only", action="store_true", help="leave the prompt tokens out")
    rep.add_argument("--variant", default="normal", help="normal (default) or zero_pe")
    rep.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    rep.add_argument("--no-cache", action="store_true", help="recompute instead of reading the view cache")
    sub.add_parser(
        "warm-up",
        help="compile UMAP's and the row-sum kernels into numba's disk cache (once per installation, about "
        "1-2 min on 2 cores; later starts load them in seconds)",
    )
    syn = sub.add_parser(
        "synthetic",
        help="write a synthetic run with a known positional helix into a store (opens in the app)",
        description="Write one synthetic run (id run-synthetic-helix) into STORE, as an ingest would: prompts "
        "of made-up words, branches forking off branches, token ids from a Zipf-like vocabulary "
        "of 400 made-up words, a BOS attention sink, and 4 layers of known structure: 0 token "
        "identity only (no position); 1 a strong positional helix over token identity (the "
        "picture where position dominates); 2 the helix over strong branch content (removing "
        "position reveals the branches); 3 prompt and branch content, little position. The "
        "run's config (runs.config) records each layer's weights and variance shares; see "
        "docs/synthetic.md. Same settings again: nothing written. Then: streamlit run app.py -- STORE",
    )
    syn.add_argument("store", help="DuckDB store to write (created if missing; latents of width --d)")
    syn.add_argument(
        "--seed", type=int, default=0, help="seed for the tokens, trees, content and noise (default 0)"
    )
    syn.add_argument("--prompts", type=int, default=8, help="prompts (default 8)")
    syn.add_argument(
        "--branches",
        type=int,
        default=12,
        help="branches per prompt below its root: a third samples, the rest forks (default 12)",
    )
    syn.add_argument("--length", type=int, default=96, help="tokens after each prompt (default 96)")
    syn.add_argument("--d", type=int, default=128, help="latent width (default 128)")
    syn.add_argument(
        "--run-id",
        default="run-synthetic-helix",
        help="run id (default run-synthetic-helix; another id puts a second run in the same store)",
    )
    syn.add_argument("--no-compact", action="store_true", help="skip rewriting the store without free space")
    exp = sub.add_parser(
        "export",
        help="write one view (both projections, labels, text, numbers, verdict) as "
        "Parquet for Embedding Atlas, latent-scope or pandas",
    )
    exp.add_argument("store", help="DuckDB store written by `python -m ingest` (or `python -m store import`)")
    exp.add_argument("--run", help="run id (default: the newest run)")
    exp.add_argument("--layer", type=int, required=True, help="layer to export")
    exp.add_argument("--method", default="auto", help="removal method (default auto)")
    exp.add_argument("--projection", default="umap", choices=["umap", "pca"], help="umap (default) or pca")
    exp.add_argument("--to", required=True, help="the Parquet file to write")
    args = parser.parse_args(argv)
    if args.command == "export":
        return _export(args)
    if args.command == "warm-up":
        return _warm_up()
    if args.command == "synthetic":
        return _synthetic(args)
    # imported here, so that `synthetic` and `warm-up` do not need the report's stack
    from views.cache import ViewCache
    from views.report import DEFAULT_METHODS, format_table, layer_report

    try:
        methods = (
            DEFAULT_METHODS
            if args.methods is None
            else tuple(m.strip() for m in args.methods.split(",") if m.strip())
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = layer_report(
                args.store,
                args.run,
                methods,
                args.projection,
                args.generated_only,
                None if args.no_cache else ViewCache(),
                args.variant,
            )
    except (StoreError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0


def _synthetic(args: argparse.Namespace) -> int:
    from views.synthetic import write_helix_run

    limits = {
        "--prompts": (args.prompts, 1, 10_000),
        "--branches": (args.branches, 1, 1_000),
        "--length": (args.length, 8, 100_000),
        "--d": (args.d, 8, 16_384),
    }
    for flag, (value, lo, hi) in limits.items():
        if not lo <= value <= hi:
            print(f"error: {flag} must be between {lo} and {hi}, got {value}", file=sys.stderr)
            return 2
    if not args.run_id.strip():
        print("error: --run-id must not be empty", file=sys.stderr)
        return 2
    try:
        report = write_helix_run(
            args.store,
            args.prompts,
            args.branches,
            args.length,
            args.d,
            args.seed,
            args.run_id,
            compact_store=not args.no_compact,
        )
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


def _export(args) -> int:
    from analysis.project import ProjectionSpec
    from analysis.residualize import ResidualSpec
    from analysis.view import ViewSpec
    from views import catalog
    from views.errors import StoreError
    from views.export import export_view
    from views.service import Selection

    try:
        run = args.run or catalog.newest_run(args.store)
        spec = ViewSpec(
            residual=ResidualSpec(method=args.method), projection=ProjectionSpec(method=args.projection)
        )
        out = export_view(args.store, Selection(run, args.layer, fit_scope="run"), spec, args.to)
    except (StoreError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {out}: open it with pandas.read_parquet, or `embedding-atlas {out} --x x --y y --text token_text`"
    )
    return 0


def _warm_up() -> int:
    import time

    from views.warmup import warm_up

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warm_up()
    print(f"projection kernels ready in {time.perf_counter() - start:.1f} s (numba disk cache)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
