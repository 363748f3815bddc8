"""`python -m store compact STORE`: store maintenance from the command line."""

from __future__ import annotations

import argparse
import sys

from store.compact import compact
from store.errors import StoreError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m store", description="branchlens store maintenance")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compact", help="rewrite the store without free space, latents ordered by layer "
                                       "(ingest does this at the end of a run)")
    c.add_argument("store", help="the DuckDB store file")
    c.add_argument("--lock-timeout", type=float, default=120.0,
                   help="seconds to wait for a writer (an ingest) to let go of the file (default 120)")
    args = p.parse_args(argv)
    try:
        print(compact(args.store, lock_timeout=args.lock_timeout).summary())
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
