"""`python -m ingest --dry-run`: what a run would do (prompts, branches, tokens, layers, store size, time),
without generating or touching the store."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ingest import kvcache
from ingest.config import RunConfig
from ingest.generate import planned_batches
from ingest.models import LoadedModel
from ingest.prepare import prepare
from store import queries
from store.connect import reading
from store.errors import StoreError

# Store bytes per byte of fp32 vectors. Compacted (the end of a run): keys, tokens and DuckDB's own
# overhead, ~1.05 in bench/store_read.py. While a run writes, per-prompt commits leave free blocks (~1.7),
# and compaction writes a new copy next to it: the disk must hold both for a moment.
FINAL_FACTOR = 1.1
PEAK_FACTOR = 1.8 + FINAL_FACTOR
# Sampling, capture and bookkeeping on top of the bare forward steps of a level (demo, CPU).
STEP_OVERHEAD = 1.3


@dataclass
class DryRun:
    run_id: str
    model: str
    device: str
    dtype: str
    prompts: int
    prompt_tokens: int
    branches_per_prompt: int
    max_generated: int
    max_stored_tokens: int
    layers: list[int]
    d_model: int
    max_vectors: int
    store_bytes: float
    peak_bytes: float
    step_seconds: dict[int, float]
    seconds: float
    already_written: int
    zero_pe: bool

    def summary(self) -> str:
        variants = 2 if self.zero_pe else 1
        return "\n".join(
            [
                f"dry run {self.run_id} (nothing generated, nothing written)",
                f"  model     {self.model} on {self.device}/{self.dtype}, d={self.d_model}",
                f"  prompts   {self.prompts} ({self.prompt_tokens} prompt tokens); {self.already_written} already in the store",
                f"  branches  {self.branches_per_prompt} per prompt (root + samples + forks), "
                f"{self.branches_per_prompt * self.prompts} in all",
                f"  tokens    at most {self.max_generated} generated, {self.max_stored_tokens} stored "
                "(forks start later and EOS ends branches early, so usually fewer)",
                f"  layers    {', '.join(map(str, self.layers))}"
                + (" (normal and zero_pe variants)" if self.zero_pe else ""),
                f"  latents   at most {self.max_vectors * variants} vectors, store about {self.store_bytes / 1e6:.0f} MB "
                f"(up to {self.peak_bytes / 1e6:.0f} MB of disk while it runs)",
                f"  time      about {self.seconds / 60:.1f} min to generate (a decode step of "
                + ", ".join(
                    f"{rows} rows took {s * 1000:.0f} ms" for rows, s in sorted(self.step_seconds.items())
                )
                + " here; rough)",
            ]
        )


def dry_run(cfg: RunConfig, log=lambda _m: None) -> DryRun:
    """Plan the run: load the model (for its tokenizer, width and one timed decode step), nothing else."""
    prep = prepare(cfg, log)
    lm, layers, prompt_ids, run_id = prep.lm, prep.layers, prep.prompt_ids, prep.run_id
    n_prompts = len(prompt_ids)
    prompt_tokens = sum(len(p) for p in prompt_ids)
    max_generated = n_prompts * (prep.plan.size - 1) * cfg.max_new_tokens
    max_stored = prompt_tokens + max_generated
    vectors = max_stored * len(layers)
    vector_bytes = vectors * lm.d_model * 4 * (2 if cfg.zero_pe else 1)
    # Groups of prompts decode together, each level of their trees in batches of at most batch_rows rows;
    # a batch takes about max_new_tokens steps. Only a few distinct batch sizes occur: time each once.
    batches = planned_batches(n_prompts, cfg.samples, cfg.forks, cfg.depth, cfg.batch_rows)
    steps = {rows: _decode_step_seconds(lm, prompt_ids[0], rows) for rows in sorted(set(batches))}
    seconds = cfg.max_new_tokens * sum(steps[r] for r in batches) * STEP_OVERHEAD
    return DryRun(
        run_id,
        cfg.model,
        lm.device.type,
        prep.run.dtype,
        n_prompts,
        prompt_tokens,
        prep.plan.size,
        max_generated,
        max_stored,
        layers,
        lm.d_model,
        vectors,
        vector_bytes * FINAL_FACTOR,
        vector_bytes * PEAK_FACTOR,
        steps,
        seconds,
        _already_written(cfg.store, run_id),
        cfg.zero_pe,
    )


@torch.no_grad()
def _decode_step_seconds(lm: LoadedModel, prompt: list[int], rows: int = 1, steps: int = 4) -> float:
    """Median time of one decode step of `rows` rows after a prefill of the first prompt."""
    ids = torch.tensor([prompt], device=lm.device)
    out = lm.model(input_ids=ids, use_cache=True)
    past = kvcache.repeat_rows(kvcache.returned(out), rows)
    token = out.logits[:, -1:].argmax(-1).expand(rows, 1)
    cache_kwarg = kvcache.cache_kwarg(lm.model)  # looked up once, outside the timed steps
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = lm.model(input_ids=token, use_cache=True, **{cache_kwarg: past})
        token = out.logits[:, -1:].argmax(-1)
        if lm.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        past = kvcache.returned(out)
    return sorted(times)[len(times) // 2]


def _already_written(store: str, run_id: str) -> int:
    if not Path(store).is_file():
        return 0
    try:
        with reading(store, lock_timeout=5) as con:
            return len(queries.prompts(con, run_id))
    except StoreError:
        raise
    except Exception:  # noqa: BLE001 - a store we cannot count in is reported as 0 written; the run itself checks it
        return 0
