"""Write a synthetic branch tree (analysis.synthetic) into a store, as ingest would (benchmarks, tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from analysis.tokens import TokenSet
from store.records import BranchRecord, RunRecord
from store.writer import StoreWriter


def write_tree(path: str | Path, tokens: TokenSet, run_id: str = "run-synthetic", layer: int = 0,
               extra_layers: int = 0) -> str:
    """Store `tokens` (with extra 'parent' and 'depth') as one run; returns the run id.

    The latents go to `layer`; with extra_layers=k, layers layer+1 .. layer+k get copies scaled by
    2, 3, .. (a store shaped like a real multi-layer run, for read benchmarks)."""
    layers = list(range(layer, layer + extra_layers + 1))
    writer = StoreWriter(path, created_by="branchlens synthetic")
    writer.prepare(tokens.dim)
    run = RunRecord(run_id, "synthetic", {"synthetic": True, "layers": layers}, run_id, n_layers=max(layers[-1], 1),
                    d_model=tokens.dim, pe_type="synthetic", device="cpu", dtype="float32")
    writer.start_run(run)
    parent = tokens.extra["parent"]
    depth = tokens.extra["depth"]
    for prompt in np.unique(tokens.prompt):
        records = []
        for branch in np.unique(tokens.branch[tokens.prompt == prompt]):
            rows = np.flatnonzero(tokens.branch == branch)
            rows = rows[np.argsort(tokens.position[rows])]
            pos = tokens.position[rows]
            if not np.array_equal(pos, np.arange(pos[0], pos[0] + len(pos))):
                raise ValueError(f"branch {branch} has gaps in its positions")
            p = int(parent[rows[0]])
            records.append(BranchRecord(
                branch_id=int(branch), prompt_id=int(prompt), parent_branch_id=None if p < 0 else p,
                fork_position=int(pos[0]), depth=int(depth[rows[0]]),
                kind="prompt" if p < 0 else ("sample" if depth[rows[0]] == 1 else "fork"),
                path=str(branch), token_ids=(pos % 1000).astype(np.int64),
                token_texts=[f"t{t}" for t in pos], logprobs=np.full(len(pos), np.nan, np.float32),
                entropies=np.full(len(pos), np.nan, np.float32), ended_with_eos=False,
                latents=np.stack([tokens.X[rows] * (1 + i) for i in range(len(layers))]).astype(np.float32),
            ))
        n_prompt = int((tokens.branch == records[0].branch_id).sum())
        writer.write_prompt(run_id, int(prompt), f"synthetic prompt {prompt}", n_prompt, records, layers)
    writer.finish_run(run_id)
    return run_id
