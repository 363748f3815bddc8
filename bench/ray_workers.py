"""Distributed ingest throughput: 1 against 2 Ray workers on this machine, and the single-process run.

Each configuration ingests the same tree into a fresh store (prompts re-used with a suffix so every task
has the same work) and reports generated tokens/s over the generation phase (Ray and model start-up and
the merge are given separately). Each Ray CPU actor runs torch with one thread; the single-process run
uses all cores.

    python bench/ray_workers.py                 # bundled Gemma 3 270M; --prompts 8 --max-new-tokens 16
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from ingest.config import build_config
from ingest.distributed import run_distributed
from ingest.run import run_ingest

BASE = [
    "The old lighthouse keeper climbed the stairs one last time and",
    "To make a good cup of coffee, the first thing you need is",
    "In 1969, the first people to walk on the Moon",
    "def fibonacci(n):",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--forks", type=int, default=2)
    args = p.parse_args()
    prompts = [f"{BASE[i % len(BASE)]} ({i})" for i in range(args.prompts)]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:

        def cfg(name: str):
            return build_config(
                dict(
                    model=args.model,
                    prompts=prompts,
                    samples=args.samples,
                    forks=args.forks,
                    max_new_tokens=args.max_new_tokens,
                    stop_at_eos=False,
                    device="cpu",
                    store=str(Path(tmp) / f"{name}.duckdb"),
                )
            )

        for workers in (1, 2):
            t0 = time.perf_counter()
            rep = run_distributed(
                cfg(f"w{workers}"),
                workers,
                None,
                None,
                prompts_per_task=1,
                progress=False,
                log=lambda _m: None,
            )
            out[f"{workers} worker(s)"] = {
                "total_s": round(time.perf_counter() - t0, 1),
                "start_s": round(rep.seconds["start"], 1),
                "generate_s": round(rep.seconds["generate"], 1),
                "merge_s": round(rep.seconds["merge"], 2),
                "generated_tokens": rep.generated_now,
                "tokens_per_s": round(rep.generated_now / rep.seconds["generate"], 1),
            }
        t0 = time.perf_counter()
        single = run_ingest(cfg("single"), progress=False, log=lambda _m: None)
        out["single process (no Ray)"] = {
            "total_s": round(time.perf_counter() - t0, 1),
            "generate_s": round(single.seconds["generate"], 1),
            "generated_tokens": single.generated_now,
            "tokens_per_s": round(single.generated_now / single.seconds["generate"], 1),
        }
    out["ratio 2 workers / 1 worker (tokens/s)"] = round(
        out["2 worker(s)"]["tokens_per_s"] / out["1 worker(s)"]["tokens_per_s"], 2
    )
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
