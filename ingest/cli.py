"""`python -m ingest`: build a generation tree and store its latents (see docs/ingest.md)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from importlib.resources import files
from pathlib import Path
from typing import Any

from ingest.config import SETTINGS, build_config, default_of, default_text, load_config_file
from ingest.errors import IngestError
from store.errors import StoreError

DEMO_CONFIG = "demo.toml"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ingest",
        description="Generate a tree of continuations with a causal LM and store token latents in DuckDB. "
        "With no arguments, runs the bundled demo (ingest/demo.toml).",
    )
    p.add_argument("--config", help="TOML or JSON run config (any setting below; flags override it)")
    add_settings(p.add_argument_group("run settings (docs/ingest.md; flags override the config file)"))
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (prompts, branches, tokens, layers, store size, time) and stop",
    )
    dist = p.add_argument_group('distributed (Ray; pip install -e ".[distributed]")')
    dist.add_argument(
        "--workers",
        type=int,
        help="Ray actors, one per GPU (CPU actors where there is no GPU); "
        "default with --ray-address: one per GPU, else per CPU",
    )
    dist.add_argument("--ray-address", help="join a Ray cluster: auto or HOST:PORT (default: a local one)")
    dist.add_argument(
        "--shards", help="directory or s3://bucket/prefix for the run's Parquet shards (default STORE.shards)"
    )
    dist.add_argument(
        "--prompts-per-task", type=int, default=4, help="prompts per task and shard (default 4)"
    )
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of progress bars")
    return p


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def add_settings(group: argparse._ActionsContainer) -> None:
    """One flag per run setting, from its declaration in RunConfig; a flag not given leaves it None."""
    for f in SETTINGS:
        meta = f.metadata
        default = default_of(f)
        if isinstance(default, bool):  # a switch to the other value
            group.add_argument(
                flag_of(f),
                dest=f.name,
                action="store_const",
                const=not default,
                default=None,
                help=f"{meta['help']} (sets {f.name} = {str(not default).lower()})",
            )
            continue
        kind = type(default) if isinstance(default, (int, float)) and meta["parse"] is None else str
        group.add_argument(
            flag_of(f),
            dest=f.name,
            type=kind,
            choices=meta["choices"],
            help=f"{meta['help']} (default {default_text(f)})",
        )


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags, parsed (the config file's values stay for the others)."""
    out: dict[str, Any] = {}
    for f in SETTINGS:
        value = getattr(args, f.name)
        if value is not None:
            out[f.name] = f.metadata["parse"](value) if f.metadata["parse"] else value
    return out


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.config is not None:
            file_values = load_config_file(args.config)
        elif args.prompts is None:
            file_values = load_config_file(Path(str(files("ingest").joinpath(DEMO_CONFIG))))
        else:
            file_values = {}
        cfg = build_config(file_values, overrides(args))
        if args.dry_run:
            from ingest.dryrun import dry_run

            print(dry_run(cfg, log=lambda m: print(m, file=sys.stderr)).summary())
            return 0
        show = not args.no_progress and sys.stderr.isatty()
        if args.workers is not None or args.ray_address is not None:
            from ingest.distributed import run_distributed

            if args.prompts_per_task < 1:
                raise IngestError(f"--prompts-per-task must be >= 1, got {args.prompts_per_task}")
            report = run_distributed(
                cfg, args.workers, args.ray_address, args.shards, args.prompts_per_task, show
            )
        else:
            from ingest.run import run_ingest  # heavy imports (torch, transformers) only once input is valid

            report = run_ingest(cfg, progress=show)
    except (IngestError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: prompts already written are kept; run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    print(report.summary())
    return 0
