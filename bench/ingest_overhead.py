"""Capture overhead: the full ingest (generate + capture + write) against bare `model.generate` of the same tree.

Both run on the same loaded model, device and dtype, alternating, in one process. The bare side is what a
user would write without branchlens: per prompt one `generate` call for the samples
(`num_return_sequences`), then per fork level one left-padded batch `generate` over the forks' prefixes,
each row asked for exactly the tokens its branch has in the tree (EOS off on both sides, so both make the
same tokens). Sampling settings are the run's. Tokens/s counts the tree's generated tokens on both sides.

    python bench/ingest_overhead.py                               # bundled Gemma 3 270M on this machine
    python bench/ingest_overhead.py --arch llama-1b --device cuda # random-init model of real size
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest.config import build_config  # noqa: E402
from ingest.models import load_model, resolve_device, resolve_dtype  # noqa: E402
from ingest.run import run_ingest  # noqa: E402
from store import reading  # noqa: E402
from store.queries import branch_sequence, branches  # noqa: E402

DEMO_PROMPTS = [
    "The old lighthouse keeper climbed the stairs one last time and",
    "To make a good cup of coffee, the first thing you need is",
    "In 1969, the first people to walk on the Moon",
    "def fibonacci(n):",
]


def tree_jobs(store: Path, run_id: str) -> list[tuple[list[list[int]], list[int]]]:
    """Per (prompt, depth) level: the prefixes the branches start from and how many tokens each makes."""
    jobs: dict[tuple[int, int], tuple[list[list[int]], list[int]]] = {}
    with reading(store) as con:
        table = branches(con, run_id)
        for row in table.iter_rows(named=True):
            if row["kind"] == "prompt":
                continue
            seq = branch_sequence(con, run_id, row["branch_id"])["token_id"].to_list()
            start = row["fork_position"]
            prefixes, counts = jobs.setdefault((row["prompt_id"], row["depth"]), ([], []))
            prefixes.append(seq[:start])
            counts.append(len(seq) - start)
    return [jobs[key] for key in sorted(jobs)]


@torch.inference_mode()
def bare_generate(lm, jobs, cfg) -> int:
    """Plain HF generate over the same tree; returns the tree's generated token count."""
    model, device = lm.model, lm.device
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    sampling = dict(do_sample=cfg.temperature > 0, temperature=cfg.temperature or None, top_p=cfg.top_p,
                    top_k=cfg.top_k or None, pad_token_id=pad)
    made = 0
    for prefixes, counts in jobs:
        n_new = max(counts)
        if all(p == prefixes[0] for p in prefixes):  # the samples: one prompt, num_return_sequences
            ids = torch.tensor([prefixes[0]], device=device)
            mask = torch.ones_like(ids)
            extra = dict(num_return_sequences=len(prefixes))
        else:
            width = max(map(len, prefixes))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prefixes], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prefixes], device=device)
            extra = {}
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                             **sampling, **extra)
        assert out.shape[1] == ids.shape[1] + n_new
        made += sum(counts)
    return made


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma-3-270m", help="model spec as ingest takes it (ignored with --arch)")
    p.add_argument("--arch", default=None, help="random-init model of real size (see ingest_random_model.py)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--forks", type=int, default=2)
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--layers", default="spread")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        prompts = DEMO_PROMPTS
        if args.arch:
            from ingest_random_model import build

            model = str(Path(tmp) / "model")
            build(args.arch, Path(model))
            rng = np.random.default_rng(0)
            prompts = [" ".join(f"w{i}" for i in rng.integers(3, 30000, size=12)) for _ in range(args.prompts)]
        prompts = (prompts * args.prompts)[: args.prompts]
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        lm = load_model(model, device, dtype, log=lambda _m: None)

        def config(i: int):
            return build_config(dict(
                model=model, prompts=prompts, samples=args.samples, forks=args.forks, depth=args.depth,
                max_new_tokens=args.max_new_tokens, top_p=args.top_p, layers=args.layers, device=args.device,
                dtype=args.dtype, store=str(Path(tmp) / f"run{i}.duckdb"), stop_at_eos=False))

        cfg = config(0)
        report = run_ingest(cfg, progress=False, log=lambda _m: None, lm=lm)  # warm-up, and the tree
        jobs = tree_jobs(cfg.store, report.run_id)
        bare_generate(lm, jobs, cfg)  # warm-up
        ours, bare, tokens = [], [], report.generated_now
        for i in range(1, args.repeats + 1):
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
            t0 = time.perf_counter()
            made = bare_generate(lm, jobs, cfg)
            sync()
            bare.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            rep = run_ingest(config(i), progress=False, log=lambda _m: None, lm=lm)
            ours.append(time.perf_counter() - t0)
            assert made == tokens == rep.generated_now, (made, tokens, rep.generated_now)
        ours_s, bare_s = statistics.median(ours), statistics.median(bare)
        gpu = torch.cuda.get_device_name() if device.type == "cuda" else None
        print(json.dumps({
            "model": args.arch or args.model, "device": str(device), "gpu": gpu, "dtype": str(dtype),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "tree": dict(prompts=args.prompts, samples=args.samples, forks=args.forks, depth=args.depth,
                         max_new_tokens=args.max_new_tokens, branches=report.counts["branches"],
                         generated_tokens=tokens, layers=report.layers),
            "ingest_s": [round(t, 2) for t in ours], "bare_generate_s": [round(t, 2) for t in bare],
            "ingest_tokens_per_s": round(tokens / ours_s, 1), "bare_tokens_per_s": round(tokens / bare_s, 1),
            "ingest_over_bare": round(ours_s / bare_s, 3),
            "overhead_pct": round(100 * (ours_s / bare_s - 1), 1),
            "ingest_split_s": {k: round(v, 2) for k, v in rep.seconds.items()},
        }, indent=1))


if __name__ == "__main__":
    main()
