"""One ingest run end to end: validate, load, plan, generate per prompt, write, summarize."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ingest.config import RunConfig
from ingest.generate import prompt_groups
from ingest.models import LoadedModel
from ingest.prepare import branchlens_version, prepare, require_prompts
from ingest.zero_pe import add_zero_pe
from store.compact import compact_if_worth
from store.connect import JOB_LOCK_WAIT, reading
from store.faults import fault_point
from store.queries import run_summary
from store.writer import StoreWriter


@dataclass
class IngestReport:
    """What a run did: the figures the CLI prints at the end."""

    run_id: str
    store: Path
    model: str
    device: str
    dtype: str
    layers: list[int]
    n_layers: int
    d_model: int
    pe_type: str
    counts: dict[str, Any]
    prompts_written: int
    prompts_skipped: int
    generated_now: int
    seconds: dict[str, float] = field(default_factory=dict)
    prefix_reused: int = 0
    prefix_recomputed: int = 0
    wall_seconds: float = 0.0
    profile: dict[str, dict[str, float]] = field(default_factory=dict)  # run_ingest(profile=True) only

    def summary(self) -> str:
        c, s = self.counts, self.seconds
        total = self.wall_seconds or sum(s.values())
        rate = self.generated_now / s["generate"] if s.get("generate") else 0.0
        size_mb = self.store.stat().st_size / 1e6 if self.store.exists() else 0.0
        resumed = f" ({self.prompts_skipped} already in the store)" if self.prompts_skipped else ""
        zero_pe = f", zero-PE re-encoding {s['zero_pe']:.1f}" if "zero_pe" in s else ""
        zero_pe += f", compaction {s['compact']:.1f}" if s.get("compact", 0) >= 0.05 else ""
        return "\n".join(
            [
                f"run {self.run_id}: {c['status']}",
                f"  model     {self.model} ({self.n_layers} layers, d={self.d_model}, {self.pe_type}) "
                f"on {self.device}/{self.dtype}",
                f"  prompts   {c['prompts']} written{resumed}; {c['branches']} branches, {c['tokens']} tokens "
                f"({c['generated_tokens']} generated)",
                f"  latents   {c['latents']} vectors, layers {', '.join(map(str, self.layers))}",
                f"  forks     prefix cache re-used {self.prefix_reused}x, recomputed {self.prefix_recomputed}x",
                f"  time      {total:.1f} s (load {s.get('load', 0):.1f}, generate {s.get('generate', 0):.1f}, "
                f"write {s.get('write', 0):.1f} alongside{zero_pe}); {rate:.1f} generated tokens/s",
                f"  store     {self.store} ({size_mb:.1f} MB)",
            ]
        )


def run_ingest(
    cfg: RunConfig,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    lm: LoadedModel | None = None,
    profile: bool = False,
) -> IngestReport:
    """Run (or resume) the ingest described by cfg; raises IngestError/StoreError on bad input.

    `lm` is a model already loaded for cfg.model on cfg's device and dtype (benchmarks, workers that
    serve many runs); without it the model is loaded here. `profile` times each section of the tree
    builder's work into the report's `profile` (serializing the device: for benchmarks, not throughput).
    """
    writer = StoreWriter(cfg.store, created_by=branchlens_version())
    try:
        return _ingest(cfg, writer, progress, log, lm, profile)
    finally:
        writer.release()  # another ingest may write this store from here on


def _ingest(
    cfg: RunConfig,
    writer: StoreWriter,
    progress: bool,
    log: Callable[[str], None] | None,
    lm: LoadedModel | None,
    profile: bool,
) -> IngestReport:
    t_start = time.perf_counter()
    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    require_prompts(cfg)
    writer.check_existing()  # a foreign or other-version store fails before the slow model load
    writer.claim()  # so does a store another ingest is writing
    prep = prepare(cfg, log, lm, progress)
    lm, layers, prompt_ids, plan, run_id = prep.lm, prep.layers, prep.prompt_ids, prep.plan, prep.run_id
    seconds: dict[str, float] = {"load": prep.load_seconds}
    fault_point("load")

    writer.prepare(lm.d_model)
    done = writer.start_run(prep.run)
    todo = [i for i in range(len(cfg.prompts)) if i not in done]
    if done:
        log(f"resuming run {run_id}: {len(done)} of {len(cfg.prompts)} prompts already in {cfg.store}")

    builder = prep.tree_builder(profile)
    seconds["generate"] = seconds["write"] = 0.0
    prompt_bar = tqdm(
        total=len(cfg.prompts),
        initial=len(done),
        desc="prompts",
        unit="prompt",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )

    def write(prompt_ids_: list[int], trees: dict[int, list]) -> list[tuple[int, int]]:
        """Write the prompts in order, one transaction each, stopping at the first that fails."""
        out = []
        for prompt_id in prompt_ids_:
            t = time.perf_counter()
            writer.write_prompt(
                run_id,
                prompt_id,
                cfg.prompts[prompt_id],
                len(prompt_ids[prompt_id]),
                trees[prompt_id],
                layers,
            )
            seconds["write"] += time.perf_counter() - t
            out.append((prompt_id, len(trees[prompt_id])))
        return out

    def written(future: Future | None) -> None:
        """Wait for a group's writes (raising the first error) and show them."""
        if future is None:
            return
        for prompt_id, n_branches in future.result():
            prompt_bar.update()
            prompt_bar.set_postfix(
                tok_s=f"{builder.stats.generated_tokens / max(seconds['generate'], 1e-9):.1f}"
            )
            if not progress:
                log(f"prompt {prompt_id + 1}/{len(cfg.prompts)} written ({n_branches} branches)")

    # Prompts decode together in the run's fixed groups (ingest.generate.prompt_groups); a group some of
    # whose prompts are already written (a killed run) is decoded whole again, so every prompt is made
    # with the same companions as in an uninterrupted run. A group's new prompts are then written, one
    # transaction each, by a background thread while the next group generates. On any error or interrupt
    # the pool's exit still waits for the writes in flight, so a finished prompt is kept.
    groups = [
        g
        for g in prompt_groups(list(range(len(cfg.prompts))), builder.prompts_per_group)
        if any(p not in done for p in g)
    ]
    pending: Future | None = None
    with prompt_bar, ThreadPoolExecutor(max_workers=1, thread_name_prefix="branchlens-writer") as pool:
        for group in groups:
            what = f"prompt {group[0]}" if len(group) == 1 else f"{len(group)} prompts"
            with tqdm(
                total=plan.size * len(group),
                desc=f"{what} branches",
                unit="branch",
                leave=False,
                disable=not progress,
                file=sys.stderr,
                dynamic_ncols=True,
            ) as branch_bar:
                t1 = time.perf_counter()
                trees = builder.build_group([(p, prompt_ids[p]) for p in group], on_branch=branch_bar.update)
                seconds["generate"] += time.perf_counter() - t1
            written(pending)
            pending = pool.submit(write, [p for p in group if p not in done], trees)
        written(pending)
    if cfg.zero_pe:
        t3 = time.perf_counter()
        add_zero_pe(lm, cfg.store, run_id, layers, progress, log)
        seconds["zero_pe"] = time.perf_counter() - t3
    writer.finish_run(run_id)
    if cfg.compact:
        t4 = time.perf_counter()
        compact_if_worth(cfg.store, log)
        seconds["compact"] = time.perf_counter() - t4
    with reading(cfg.store, lock_timeout=JOB_LOCK_WAIT) as con:
        counts = run_summary(con, run_id)
    return IngestReport(
        run_id=run_id,
        store=Path(cfg.store),
        model=cfg.model,
        device=prep.run.device,
        dtype=prep.run.dtype,
        layers=layers,
        n_layers=lm.n_layers,
        d_model=lm.d_model,
        pe_type=lm.pe_type,
        counts=counts,
        prompts_written=len(todo),
        prompts_skipped=len(done),
        generated_now=builder.stats.generated_tokens,
        seconds=seconds,
        prefix_reused=builder.stats.prefix_reused,
        prefix_recomputed=builder.stats.prefix_recomputed,
        wall_seconds=time.perf_counter() - t_start,
        profile=builder.profile.as_dict() if profile else {},
    )
