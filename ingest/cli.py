"""`python -m ingest`: build a generation tree and store its latents (see README)."""

from __future__ import annotations

import argparse
import sys
from importlib.resources import files
from pathlib import Path
from typing import Any

from ingest.config import FORK_RULES, build_config, load_config_file, parse_layers, read_prompt_file
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
    p.add_argument("--prompts", help="prompt file: .txt one prompt per line, or .toml/.json with 'prompts'")
    p.add_argument("--model", help="bundled alias (gemma-3-270m), local HF directory, .gguf file or hub id")
    p.add_argument("--samples", type=int, help="continuations per prompt (default 3)")
    p.add_argument("--forks", type=int, help="children forked off each branch (default 2; 0 = none)")
    p.add_argument("--depth", type=int, help="levels of forking below the samples (default 1)")
    p.add_argument("--fork-rule", choices=FORK_RULES, help="where to fork: highest-entropy tokens, or fixed offsets")
    p.add_argument("--fork-offsets", help="offsets from a branch's first token for --fork-rule offsets, e.g. 4,8")
    p.add_argument("--min-child-tokens", type=int, help="forks leave room for at least this many tokens (default 4)")
    p.add_argument("--max-new-tokens", type=int, help="tokens generated after the prompt (default 32)")
    p.add_argument("--temperature", type=float, help="sampling temperature; 0 = greedy (default 1.0)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (default 1.0 = off)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens (default 0 = off)")
    p.add_argument("--seed", type=int, help="seed; same seed + settings + device = same tree (default 0)")
    p.add_argument("--ignore-eos", action="store_true", default=None, help="keep generating past end-of-sequence")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (prompts, branches, tokens, layers, store size, time) and stop")
    p.add_argument("--zero-pe", action="store_true", default=None,
                   help="also store latents re-encoded with positional encoding neutralized (variant zero_pe)")
    p.add_argument("--batch-rows", type=int, help="branches decoded together at most (default 64; lower it if "
                   "GPU memory runs out; the tree stays the same)")
    p.add_argument("--no-compact", action="store_true", default=None,
                   help="skip rewriting the store without free space at the end (see README 'Store size')")
    p.add_argument("--layers", help="'spread' (default), 'all', or a list like 0,6,-1 (0 = embeddings)")
    p.add_argument("--device", help="auto (default: cuda if available, else cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto = bf16/fp16 on GPU, fp32 on CPU")
    p.add_argument("--store", help="DuckDB store file (default branchlens.duckdb)")
    p.add_argument("--run-id", help="name of the run (default: run-<hash of the settings>)")
    dist = p.add_argument_group("distributed (Ray; pip install -e \".[distributed]\")")
    dist.add_argument("--workers", type=int, help="Ray actors, one per GPU (CPU actors where there is no GPU); "
                      "default with --ray-address: one per GPU, else per CPU")
    dist.add_argument("--ray-address", help="join a Ray cluster: auto or HOST:PORT (default: a local one)")
    dist.add_argument("--shards", help="directory for the run's Parquet shards (default STORE.shards)")
    dist.add_argument("--prompts-per-task", type=int, default=4, help="prompts per task and shard (default 4)")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of progress bars")
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        name: getattr(args, name)
        for name in ("model", "samples", "forks", "depth", "fork_rule", "min_child_tokens", "max_new_tokens",
                     "temperature", "top_p", "top_k", "seed", "device", "dtype", "store", "run_id", "batch_rows")
    }
    if args.layers is not None:
        out["layers"] = parse_layers(args.layers)
    if args.fork_offsets is not None:
        try:
            out["fork_offsets"] = [int(v) for v in args.fork_offsets.split(",") if v.strip()]
        except ValueError:
            raise IngestError(f"--fork-offsets must be integers like 4,8, got {args.fork_offsets!r}") from None
    if args.ignore_eos:
        out["stop_at_eos"] = False
    if args.zero_pe:
        out["zero_pe"] = True
    if args.no_compact:
        out["compact"] = False
    if args.prompts is not None:
        out["prompts"] = read_prompt_file(args.prompts)
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
        cfg = build_config(file_values, _overrides(args))
        if args.dry_run:
            from ingest.dryrun import dry_run

            print(dry_run(cfg, log=lambda m: print(m, file=sys.stderr)).summary())
            return 0
        show = not args.no_progress and sys.stderr.isatty()
        if args.workers is not None or args.ray_address is not None:
            from ingest.distributed import run_distributed

            if args.prompts_per_task < 1:
                raise IngestError(f"--prompts-per-task must be >= 1, got {args.prompts_per_task}")
            report = run_distributed(cfg, args.workers, args.ray_address, args.shards, args.prompts_per_task, show)
        else:
            from ingest.run import run_ingest  # heavy imports (torch, transformers) only once input is valid

            report = run_ingest(cfg, progress=show)
    except (IngestError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: prompts already written are kept; run the same command again to resume",
              file=sys.stderr)
        return 130
    print(report.summary())
    return 0
