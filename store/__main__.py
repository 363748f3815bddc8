"""`python -m store compact|merge|import|export`: store maintenance and exchange from the command line."""

from __future__ import annotations

import argparse
import sys

from store.compact import compact
from store.errors import StoreError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m store", description="branchlens store maintenance")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser(
        "compact",
        help="rewrite the store without free space, latents ordered by layer "
        "(ingest does this at the end of a run)",
    )
    c.add_argument("store", help="the DuckDB store file")
    c.add_argument(
        "--lock-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for a writer (an ingest) to let go of the file (default 120)",
    )
    m = sub.add_parser(
        "merge",
        help="import a distributed run's Parquet shards into a store (ingest --workers "
        "does this at the end; run it again after more shards finished)",
    )
    m.add_argument(
        "run_dir",
        help="the run's shard directory, e.g. branchlens.duckdb.shards/run-... or "
        "s3://bucket/prefix/run-... (AWS settings from the environment)",
    )
    m.add_argument(
        "--store",
        default="branchlens.duckdb",
        help="the DuckDB store to merge into (default branchlens.duckdb; created if missing)",
    )
    i = sub.add_parser(
        "import",
        help="write a run into a store from a token table and per-layer latents computed "
        "elsewhere (docs/store.md, 'Latents from elsewhere')",
    )
    i.add_argument(
        "--tokens", required=True, help="token table: .parquet or .csv (columns in store/exchange.py)"
    )
    i.add_argument(
        "--latents",
        required=True,
        help="latents: .npz or .safetensors, one (tokens, d) array per layer named layer_<L>",
    )
    i.add_argument("--store", default="branchlens.duckdb", help="the store to write (created if missing)")
    i.add_argument("--run-id", help="default: import-<digest of the two files>")
    i.add_argument("--model", default="imported", help="what computed the latents (shown in the app)")
    i.add_argument("--pe-type", default="unknown", help="learned_absolute, rope, alibi or unknown")
    i.add_argument(
        "--sequences",
        action="store_true",
        help="the table holds whole sequences (sequence_id, each "
        "from position 0): shared prefixes become forks",
    )
    e = sub.add_parser(
        "export",
        help="write a run's tokens (tokens.parquet) and latents (latents.npz) for other "
        "tools, in the format `import` reads",
    )
    e.add_argument("store", help="the DuckDB store file")
    e.add_argument("--run", required=True, help="the run id")
    e.add_argument("--to", required=True, help="the folder to write into")
    cp = sub.add_parser(
        "copy",
        help="copy a run from one store into another (the same rows; model and positional encoding kept)",
    )
    cp.add_argument("source", help="the store holding the run")
    cp.add_argument("--run", required=True, help="the run id")
    cp.add_argument("--store", required=True, help="the store to copy into (created if missing)")
    cp.add_argument("--run-id", help="the id in the target store (default: the same)")
    args = p.parse_args(argv)
    try:
        if args.command == "copy":
            from store.exchange import copy_run

            print(copy_run(args.source, args.run, args.store, args.run_id).summary())
            return 0
        if args.command == "import":
            from store.exchange import import_arrays

            print(
                import_arrays(
                    args.store,
                    args.tokens,
                    args.latents,
                    args.run_id,
                    args.model,
                    args.pe_type,
                    sequences=args.sequences,
                ).summary()
            )
            return 0
        if args.command == "export":
            from store.exchange import export_arrays

            print(
                f"wrote {export_arrays(args.store, args.run, args.to)}: tokens.parquet, latents.npz, run.json"
            )
            return 0
        if args.command == "merge":
            from store.shards import merge

            imported, skipped, complete = merge(args.run_dir, args.store, created_by="branchlens merge")
            print(
                f"merged {imported} shards into {args.store} ({skipped} already there); run "
                f"{'complete' if complete else 'not complete yet: shards missing'}"
            )
            return 0
        print(compact(args.store, lock_timeout=args.lock_timeout).summary())
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
