"""The zero-PE what-if: re-encode stored branches with positional encoding neutralized, store as a variant.

    python -m ingest.zero_pe STORE [--run RUN]     # add it to a run already in the store
    python -m ingest --zero-pe ...                 # or during the ingest itself

Each branch's full sequence (prefix included) is fed once through the model inside the family adapter's
neutralized() context; the hidden states of the branch's own positions are stored under
variant = 'zero_pe', like the normal latents. Prompts that already have it are skipped (resumable).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from ingest.errors import IngestError
from ingest.models import LoadedModel
from store import queries
from store.connect import JOB_LOCK_WAIT, reading
from store.errors import StoreError
from store.writer import StoreWriter

VARIANT = "zero_pe"


@torch.no_grad()
def encode(lm: LoadedModel, token_ids: list[int], layers: list[int]) -> np.ndarray:
    """Hidden states (len(layers), n, d) of one full sequence with positions neutralized."""
    ids = torch.tensor([token_ids], device=lm.device)
    with lm.positions.neutralized(lm.model):
        out = lm.model(
            input_ids=ids, output_hidden_states=True, use_cache=False, **lm.positions.forward_kwargs(ids)
        )
    return np.stack([out.hidden_states[layer][0].float().cpu().numpy() for layer in layers])


def add_zero_pe(
    lm: LoadedModel,
    store: str,
    run_id: str,
    layers: list[int],
    progress: bool = False,
    log: Callable[[str], None] = lambda _m: None,
) -> int:
    """Re-encode every written prompt of the run that has no zero_pe latents yet; returns how many."""
    lm.positions.require()
    with reading(store, lock_timeout=JOB_LOCK_WAIT) as con:
        todo = queries.prompts_without_variant(con, run_id, VARIANT)
    writer = StoreWriter(store, created_by="branchlens zero-pe")
    writer.claim()  # the one writing job of the store: no compaction swaps the file under these writes
    try:
        for prompt_id in tqdm(todo, desc="zero-PE", unit="prompt", disable=not progress, file=sys.stderr):
            with reading(store, lock_timeout=JOB_LOCK_WAIT) as con:
                branches = queries.prompt_sequences(con, run_id, prompt_id)
            items = []
            for branch_id, fork, token_ids in branches:
                hidden = encode(lm, token_ids, layers)
                items.append(
                    (branch_id, np.arange(fork, len(token_ids), dtype=np.int32), hidden[:, fork:, :])
                )
            writer.write_variant(run_id, prompt_id, items, layers, VARIANT)
            if not progress:
                log(f"zero-PE: prompt {prompt_id} written ({len(items)} branches)")
    finally:
        writer.release()
    return len(todo)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ingest.zero_pe",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("store", help="store written by `python -m ingest`")
    parser.add_argument("--run", help="run id (default: the newest run)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, mps")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    from ingest.models import load_model, resolve_device, resolve_dtype

    try:
        with reading(args.store) as con:
            runs = queries.list_runs(con)
            if runs.is_empty():
                raise IngestError(f"{args.store} holds no runs")
            run_id = args.run or runs["run_id"][0]
            if run_id not in runs["run_id"].to_list():
                raise IngestError(f"run {run_id} is not in {args.store}")
            config = queries.run_config(con, run_id)
        device = resolve_device(args.device)
        dtype = resolve_dtype(config.get("dtype", "auto"), device)
        progress = not args.no_progress and sys.stderr.isatty()
        lm = load_model(config["model"], device, dtype, log=lambda m: print(m, file=sys.stderr))
        if lm.d_model != int(runs.filter(runs["run_id"] == run_id)["d_model"][0]):
            raise IngestError(
                f"model {config['model']} has width {lm.d_model}, the run was written with another"
            )
        done = add_zero_pe(
            lm, args.store, run_id, list(config["layers"]), progress, log=lambda m: print(m, file=sys.stderr)
        )
    except (IngestError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: prompts written so far are kept; run again to finish", file=sys.stderr)
        return 130
    print(f"zero-PE latents added for {done} prompt(s) of run {run_id} ({lm.positions.describe()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
