"""Capture overhead: the full ingest (generate + capture + write) against bare `model.generate` of the same tree.

Both run on the same loaded model, device and dtype, alternating, in one process. The bare side is plain HF
`generate` over the same tree, two ways: `per_prompt`, as a user would write it one prompt at a time (one
call with `num_return_sequences` for a prompt's samples, then one left-padded call per fork level of that
prompt), and `batched`, batched the way the ingest batches (the samples of batch_rows // samples prompts in
one call, each fork level across prompts in calls of up to batch_rows rows). Each row is asked for exactly
the tokens its branch has in the tree (EOS off on both sides, so both make the same tokens); sampling
settings are the run's. Tokens/s counts the tree's generated tokens on both sides. A last ingest runs with
the builder's per-section profile (ingest.profile: forward, sampling, host syncs, capture, copies, records),
whose device syncs make it slower than the timed runs.
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


def tree_jobs(store: Path, run_id: str) -> dict[tuple[int, int], tuple[list[list[int]], list[int]]]:
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
    return jobs


def batches(
    jobs, per_prompt: bool, batch_rows: int, samples: int
) -> list[tuple[list[list[int]], list[int], int]]:
    """The generate calls of the tree: (prefixes, token counts, num_return_sequences) each.

    per_prompt: as a user would write it one prompt at a time (one call per prompt and depth). Otherwise
    batched as the ingest batches: the samples of up to batch_rows // samples prompts in one call, and
    each fork level across prompts in calls of up to batch_rows rows."""
    if per_prompt:
        return [
            (prefixes[:1], counts, len(prefixes)) if depth == 1 else (prefixes, counts, 1)
            for (_, depth), (prefixes, counts) in sorted(jobs.items())
        ]
    calls = []
    for depth in sorted({d for _, d in jobs}):
        level = [jobs[key] for key in sorted(jobs) if key[1] == depth]
        if depth == 1:
            step = max(1, batch_rows // samples)
            for lo in range(0, len(level), step):
                part = level[lo : lo + step]
                calls.append(([p[0][0] for p in part], [c for p in part for c in p[1]], samples))
        else:
            prefixes = [x for p in level for x in p[0]]
            counts = [c for p in level for c in p[1]]
            for lo in range(0, len(prefixes), batch_rows):
                calls.append((prefixes[lo : lo + batch_rows], counts[lo : lo + batch_rows], 1))
    return calls


@torch.inference_mode()
def bare_generate(lm, calls, cfg) -> int:
    """Plain HF generate over the same tree (left-padded batches); returns the tree's generated token count."""
    model, device = lm.model, lm.device
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    sampling = dict(
        do_sample=cfg.temperature > 0,
        temperature=cfg.temperature or None,
        top_p=cfg.top_p,
        top_k=cfg.top_k or None,
        pad_token_id=pad,
    )
    made = 0
    for prefixes, counts, repeats in calls:
        n_new = max(counts)
        width = max(map(len, prefixes))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prefixes], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prefixes], device=device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            num_return_sequences=repeats,
            **sampling,
        )
        assert out.shape[1] == ids.shape[1] + n_new
        made += sum(counts)
    return made


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", default="gemma-3-270m", help="model spec as ingest takes it (ignored with --arch)"
    )
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
    p.add_argument("--batch-rows", type=int, default=64)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        prompts = DEMO_PROMPTS
        if args.arch:
            from ingest_random_model import build

            model = str(Path(tmp) / "model")
            build(args.arch, Path(model))
            rng = np.random.default_rng(0)
            prompts = [
                " ".join(f"w{i}" for i in rng.integers(3, 30000, size=12)) for _ in range(args.prompts)
            ]
        prompts = (prompts * args.prompts)[: args.prompts]
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        lm = load_model(model, device, dtype, log=lambda _m: None)

        def config(i: int):
            return build_config(
                dict(
                    model=model,
                    prompts=prompts,
                    samples=args.samples,
                    forks=args.forks,
                    depth=args.depth,
                    max_new_tokens=args.max_new_tokens,
                    top_p=args.top_p,
                    layers=args.layers,
                    device=args.device,
                    batch_rows=args.batch_rows,
                    dtype=args.dtype,
                    store=str(Path(tmp) / f"run{i}.duckdb"),
                    stop_at_eos=False,
                )
            )

        cfg = config(0)
        report = run_ingest(cfg, progress=False, log=lambda _m: None, lm=lm)  # warm-up, and the tree
        jobs = tree_jobs(cfg.store, report.run_id)
        modes = {
            mode: batches(jobs, mode == "per_prompt", args.batch_rows, args.samples)
            for mode in ("batched", "per_prompt")
        }
        for calls in modes.values():
            bare_generate(lm, calls, cfg)  # warm-up
        ours, bare, tokens = [], {mode: [] for mode in modes}, report.generated_now
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        for i in range(1, args.repeats + 1):
            for mode, calls in modes.items():
                t0 = time.perf_counter()
                made = bare_generate(lm, calls, cfg)
                sync()
                bare[mode].append(time.perf_counter() - t0)
                assert made == tokens, (mode, made, tokens)
            t0 = time.perf_counter()
            rep = run_ingest(config(i), progress=False, log=lambda _m: None, lm=lm)
            ours.append(time.perf_counter() - t0)
            assert tokens == rep.generated_now, (tokens, rep.generated_now)
        profiled = run_ingest(
            config(args.repeats + 1), progress=False, log=lambda _m: None, lm=lm, profile=True
        )
        ours_s = statistics.median(ours)
        bare_s = {mode: statistics.median(times) for mode, times in bare.items()}
        gpu = torch.cuda.get_device_name() if device.type == "cuda" else None
        split = {k: round(v, 2) for k, v in profiled.seconds.items()}
        print(
            json.dumps(
                {
                    "model": args.arch or args.model,
                    "device": str(device),
                    "gpu": gpu,
                    "dtype": str(dtype),
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "tree": dict(
                        prompts=args.prompts,
                        samples=args.samples,
                        forks=args.forks,
                        depth=args.depth,
                        max_new_tokens=args.max_new_tokens,
                        branches=report.counts["branches"],
                        generated_tokens=tokens,
                        layers=report.layers,
                        batch_rows=args.batch_rows,
                        top_p=args.top_p,
                    ),
                    "ingest_s": [round(t, 2) for t in ours],
                    "bare_generate_s": {mode: [round(t, 2) for t in times] for mode, times in bare.items()},
                    "ingest_tokens_per_s": round(tokens / ours_s, 1),
                    "bare_tokens_per_s": {mode: round(tokens / t, 1) for mode, t in bare_s.items()},
                    "ingest_over_bare": {mode: round(ours_s / t, 3) for mode, t in bare_s.items()},
                    "profile_run": {
                        "generate_s": split.get("generate"),
                        "write_s (background)": split.get("write"),
                        "compact_s": split.get("compact"),
                        "sections": profiled.profile,
                    },
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
