"""Write synthetic runs (analysis.synthetic) into a store, as ingest would.

- write_tree: one TokenSet as a run (benchmarks, tests).
- write_helix_run: `python -m views synthetic STORE`, a whole run with a made-up vocabulary, branch
  trees and four layers of known structure (a positional helix among them): a known-positive example
  of position dominating, for the app (docs/synthetic.md).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from analysis.synthetic import HELIX_VERSION, SyntheticRun, helix_run
from analysis.tokens import TokenSet
from store.compact import compact_if_worth
from store.connect import JOB_LOCK_WAIT, reading
from store.errors import StoreError
from store.queries import run_row, run_summary
from store.records import BranchRecord, RunRecord
from store.writer import StoreWriter


def write_tree(
    path: str | Path,
    tokens: TokenSet,
    run_id: str = "run-synthetic",
    layer: int = 0,
    extra_layers: int = 0,
    token_ids: np.ndarray | None = None,
) -> str:
    """Store `tokens` (with extra 'parent' and 'depth') as one run; returns the run id.

    The latents go to `layer`; with extra_layers=k, layers layer+1 .. layer+k get copies scaled by
    2, 3, .. (a store shaped like a real multi-layer run, for read benchmarks). Token ids are
    position % 1000 (text 't<position>'), which ties token identity to position; pass `token_ids`
    (one per row of `tokens`; text 'w<id>') to store ids that are not."""
    layers = list(range(layer, layer + extra_layers + 1))
    writer = StoreWriter(path, created_by="branchlens synthetic")
    writer.prepare(tokens.dim)
    run = RunRecord(
        run_id,
        "synthetic",
        {"synthetic": True, "layers": layers},
        run_id,
        n_layers=max(layers[-1], 1),
        d_model=tokens.dim,
        pe_type="synthetic",
        device="cpu",
        dtype="float32",
    )
    try:
        _write_prompts(writer, tokens, run, layers, token_ids)
    finally:
        writer.release()
    return run_id


def _write_prompts(
    writer: StoreWriter, tokens: TokenSet, run: RunRecord, layers: list[int], token_ids: np.ndarray | None
) -> None:
    run_id = run.run_id
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
            records.append(
                BranchRecord(
                    branch_id=int(branch),
                    prompt_id=int(prompt),
                    parent_branch_id=None if p < 0 else p,
                    fork_position=int(pos[0]),
                    depth=int(depth[rows[0]]),
                    kind="prompt" if p < 0 else ("sample" if depth[rows[0]] == 1 else "fork"),
                    path=str(branch),
                    token_ids=(pos % 1000 if token_ids is None else np.asarray(token_ids)[rows]).astype(
                        np.int64
                    ),
                    token_texts=(
                        [f"t{t}" for t in pos]
                        if token_ids is None
                        else [f" w{int(t)}" for t in np.asarray(token_ids)[rows]]
                    ),
                    logprobs=np.full(len(pos), np.nan, np.float32),
                    entropies=np.full(len(pos), np.nan, np.float32),
                    ended_with_eos=False,
                    latents=np.stack([tokens.X[rows] * (1 + i) for i in range(len(layers))]).astype(
                        np.float32
                    ),
                )
            )
        n_prompt = int((tokens.branch == records[0].branch_id).sum())
        writer.write_prompt(run_id, int(prompt), f"synthetic prompt {prompt}", n_prompt, records, layers)
    writer.finish_run(run_id)


HELIX_RUN_ID = "run-synthetic-helix"
HELIX_MODEL = "synthetic-helix"


@dataclass
class HelixReport:
    """What `python -m views synthetic` did."""

    run_id: str
    store: Path
    written: int  # prompts written now
    skipped: int  # prompts already in the store
    counts: dict[str, Any]
    config: dict[str, Any]
    seconds: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        c = self.counts
        size_mb = self.store.stat().st_size / 1e6 if self.store.exists() else 0.0
        state = (
            "already complete: nothing written" if self.written == 0 and self.skipped else f"{c['status']}"
        )
        lines = [
            f"run {self.run_id}: {state}",
            f"  model     {HELIX_MODEL}: synthetic latents with a known positional helix (d={self.config['d']}, "
            f"seed {self.config['seed']})",
            f"  prompts   {self.written} written, {self.skipped} already there; {c['branches']} branches, "
            f"{c['tokens']} tokens ({c['generated_tokens']} generated)",
            f"  latents   {c['latents']} vectors, layers {', '.join(map(str, c['layers']))}",
        ]
        for layer, mix in self.config["layer_structure"].items():
            share = mix["variance_share"]
            lines.append(
                f"  layer {layer}   position {share['position']:.2f}, token {share['token']:.2f}, "
                f"branch {share['branch']:.2f}, prompt {share['prompt']:.2f} of the variance"
            )
        lines += [f"  {note}" for note in self.notes]
        lines += [
            f"  time      {self.seconds:.1f} s",
            f"  store     {self.store} ({size_mb:.1f} MB); look at it: streamlit run app.py -- {self.store}",
        ]
        return "\n".join(lines)


def helix_settings(
    n_prompts: int = 8, branches: int = 12, length: int = 96, d: int = 128, seed: int = 0
) -> dict:
    """The settings that decide a helix run's output (what its resume key hashes)."""
    return {
        "generator": "analysis.synthetic.helix_run",
        "version": HELIX_VERSION,
        "n_prompts": n_prompts,
        "branches_per_prompt": branches,
        "length": length,
        "d": d,
        "seed": seed,
    }


def _settings_hash(settings: dict) -> str:
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def helix_config(run: SyntheticRun, settings: dict, run_id: str) -> dict[str, Any]:
    """The run's config JSON (runs.config): the settings, the prompts and what each layer holds."""
    s = run.settings
    return {
        **settings,
        "run_id": run_id,
        "synthetic": True,
        "model": HELIX_MODEL,
        "prompts": run.prompt_texts,
        "samples": s["samples"],
        "max_new_tokens": s["length"],
        "min_child_tokens": s["min_child_tokens"],
        "fork_rule": "entropy",
        "eos_rate": s["eos_rate"],
        "vocab_size": s["vocab_size"],
        "model_seed": s["model_seed"],
        "prompt_words": s["prompt_words"],
        "layers": list(range(len(run.layers))),
        "device": "cpu",
        "dtype": "float32",
        "latent_formula": "x = token*E[token_id] + position*helix(position) + branch*C_branch + prompt*P_prompt "
        "+ noise*eps; each part has per-dimension standard deviation 1 before its weight; "
        "C is 0 at the root, N(0, I) for a sample, C_parent + N(0, I) for a fork; the BOS "
        "(position 0) is one vector for every prompt, `sink` x a typical token norm",
        "layer_structure": {
            str(li): {**asdict(mix), "variance_share": run.truth[li]} for li, mix in enumerate(run.layers)
        },
        "docs": "docs/synthetic.md",
    }


def _existing(path: Path, run_id: str) -> tuple[str, str] | None:
    """(config_hash, status) of run_id in the store at path, or None (no store, or no such run)."""
    if not path.exists():
        return None
    with reading(path, lock_timeout=JOB_LOCK_WAIT) as con:
        row = run_row(con, run_id)
    return (row["config_hash"], row["status"]) if row is not None else None


def write_helix_run(
    path: str | Path,
    n_prompts: int = 8,
    branches: int = 12,
    length: int = 96,
    d: int = 128,
    seed: int = 0,
    run_id: str = HELIX_RUN_ID,
    compact_store: bool = True,
) -> HelixReport:
    """Write (or finish) the synthetic helix run into the store at `path` through StoreWriter, one
    transaction per prompt as ingest does; raises StoreError, before any write, when the store is not a
    store of this version, holds latents of another width, or holds run_id with other settings. The same
    settings again write nothing."""
    t0 = time.perf_counter()
    path = Path(path)
    settings = helix_settings(n_prompts, branches, length, d, seed)
    digest = _settings_hash(settings)
    writer = StoreWriter(path, created_by=_created_by())
    meta = writer.check_existing()
    if meta is not None and meta.get("vector_dim") != str(d):
        raise StoreError(
            f"{path} holds latents of width {meta.get('vector_dim')}, this run's are {d}; "
            "use another store file (or --d)"
        )
    found = _existing(path, run_id)
    if found is not None and found[0] != digest:
        raise StoreError(
            f"run '{run_id}' already exists in {path} with other settings; "
            "choose another --run-id or store, or the settings it was written with"
        )
    run = helix_run(n_prompts=n_prompts, branches_per_prompt=branches, length=length, d=d, seed=seed)
    config = helix_config(run, settings, run_id)
    if found is not None and found[1] == "complete":
        with reading(path, lock_timeout=JOB_LOCK_WAIT) as con:
            counts = run_summary(con, run_id)
        return HelixReport(run_id, path, 0, counts["prompts"], counts, config, time.perf_counter() - t0)
    layers = config["layers"]
    try:
        writer.prepare(d)
        record = RunRecord(
            run_id,
            HELIX_MODEL,
            config,
            digest,
            n_layers=len(layers) - 1,
            d_model=d,
            pe_type="synthetic",
            device="cpu",
            dtype="float32",
        )
        done = writer.start_run(record)
        for q, tree in enumerate(run.branches):
            if q in done:
                continue
            records = [_branch_record(b, run.vocab) for b in tree]
            writer.write_prompt(run_id, q, run.prompt_texts[q], run.prompt_lengths[q], records, layers)
        writer.finish_run(run_id)
    finally:
        writer.release()  # the claim goes even when a write fails
    notes: list[str] = []
    if compact_store:
        compact_if_worth(path, notes.append)
    with reading(path, lock_timeout=JOB_LOCK_WAIT) as con:
        counts = run_summary(con, run_id)
    return HelixReport(
        run_id,
        path,
        len(run.branches) - len(done),
        len(done),
        counts,
        config,
        time.perf_counter() - t0,
        notes,
    )


def _branch_record(b, vocab: list[str]) -> BranchRecord:
    return BranchRecord(
        branch_id=b.branch_id,
        prompt_id=b.prompt_id,
        parent_branch_id=b.parent_branch_id,
        fork_position=b.fork_position,
        depth=b.depth,
        kind=b.kind,
        path=b.path,
        token_ids=b.token_ids,
        token_texts=[vocab[i] for i in b.token_ids],
        logprobs=b.logprobs,
        entropies=b.entropies,
        ended_with_eos=b.ended_with_eos,
        latents=b.latents,
    )


def _created_by() -> str:
    try:
        return f"branchlens {version('branchlens')}"
    except PackageNotFoundError:
        return "branchlens (not installed)"
