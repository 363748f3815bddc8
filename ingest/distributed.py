"""Ingest across workers on Ray: the run split by prompt into tasks, one actor per GPU (CPU actors where
there is none), each task written as a Parquet shard, then merged into the DuckDB store.

Ray is an optional extra (`pip install -e ".[distributed]"`); nothing here is imported by the
single-machine path. Scheduling, retries and restarts are Ray's: an actor that dies is restarted and
its task run again (max_restarts / max_task_retries); a task whose shard already exists writes nothing,
so retries and resumed runs never duplicate rows. Shards go to a local directory or to S3-compatible
storage (`--shards s3://bucket/prefix`, see store.objectstore), so workers on several machines need no
shared disk.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ingest.config import RunConfig, build_config
from ingest.errors import IngestError
from store.errors import reason

RESTARTS = 4  # per actor, and retries per task: a worker may die this many times before the run fails


def _seconds(name: str, default: float) -> float:
    """A positive number of seconds from the environment, else the default (a typo must not break imports)."""
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value > 0 else default


CONNECT_WAIT = _seconds("BRANCHLENS_RAY_CONNECT_WAIT", 60.0)  # seconds a Ray address has to answer
_GCS_PROBE = (
    "import sys, ray._raylet as r; r.GcsClient(address=sys.argv[1]).internal_kv_get(b'branchlens', None)"
)


def check_ray_address(address: str | None, wait: float = CONNECT_WAIT) -> None:
    """One IngestError line, within about `wait` seconds, when HOST:PORT is no Ray cluster: nothing
    listening, or something that is not Ray's GCS (ray.init would retry for minutes, printing warnings).
    The GCS is asked in a child process, whose C++ warnings are kept off the terminal. 'auto' and ray://
    addresses are left to ray.init, which answers those at once."""
    if not address or address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # [::1]:6379
    if not host or not port.isdigit():
        raise IngestError(f"--ray-address must be auto, local, ray://HOST:PORT or HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=wait).close()
    except OSError as exc:
        raise IngestError(
            f"cannot reach Ray at {address}: {reason(exc)} (is `ray start --head` running there? "
            "the port is the GCS port, 6379 by default)"
        ) from None
    try:
        probe = subprocess.run(
            [sys.executable, "-c", _GCS_PROBE, address], capture_output=True, text=True, timeout=wait
        )
    except subprocess.TimeoutExpired:
        raise IngestError(
            f"no Ray cluster answers at {address} within {wait:.0f} s (something listens there, "
            "but not Ray's GCS)"
        ) from None
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no answer"])[-1]
        raise IngestError(
            f"no Ray cluster answers at {address} (something listens there, but not Ray's GCS: {last[-200:]})"
        )


@dataclass
class DistributedReport:
    run_id: str
    store: Path
    shards: str
    workers: int
    resources: str
    tasks: int
    tasks_done_before: int
    generated_now: int
    counts: dict[str, Any]
    seconds: dict[str, float]

    def summary(self) -> str:
        s, c = self.seconds, self.counts
        rate = self.generated_now / s["generate"] if s.get("generate") else 0.0
        return "\n".join(
            [
                f"run {self.run_id}: {c['status']}",
                f"  workers   {self.workers} Ray actors ({self.resources})",
                f"  tasks     {self.tasks} ({self.tasks_done_before} already done); shards in {self.shards}",
                f"  prompts   {c['prompts']} written; {c['branches']} branches, {c['tokens']} tokens "
                f"({c['generated_tokens']} generated)",
                f"  latents   {c['latents']} vectors",
                f"  time      start {s.get('start', 0):.1f} s, generate {s.get('generate', 0):.1f} s "
                f"({rate:.1f} generated tokens/s over all workers), merge {s.get('merge', 0):.1f} s",
                f"  store     {self.store} ({self.store.stat().st_size / 1e6:.1f} MB)",
            ]
        )


class ShardWorker:
    """One Ray actor: loads the model once, then builds whole tasks (lists of prompts) into shards."""

    def __init__(self, values: dict[str, Any]):
        import torch

        from ingest.models import resolve_device
        from ingest.prepare import prepare

        cfg = build_config(values)
        if resolve_device(cfg.device).type == "cpu":
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.prep = prepare(cfg)
        self.builder = self.prep.tree_builder()

    def describe(self) -> dict[str, Any]:
        return {"run": dataclasses.asdict(self.prep.run), "pid": os.getpid()}

    def build(self, run_path: str, task: int, prompt_ids: list[int]) -> tuple[int, int, float, bool]:
        """Build and write one task's shard: (task, generated tokens, seconds, written now)."""
        from ingest.generate import prompt_groups
        from store.shards import shard_exists, write_shard

        if shard_exists(run_path, task):  # a retry of a task that finished before its worker died
            return task, 0, 0.0, False
        t0 = time.perf_counter()
        before = self.builder.stats.generated_tokens
        prep = self.prep
        trees: dict[int, list] = {}
        for group in prompt_groups(
            prompt_ids, self.builder.prompts_per_group
        ):  # the run's groups, cut by the task
            trees.update(self.builder.build_group([(p, prep.prompt_ids[p]) for p in group]))
        prompts = [(p, prep.cfg.prompts[p], len(prep.prompt_ids[p]), trees[p]) for p in prompt_ids]
        written = write_shard(run_path, task, prompts, prep.layers)
        return task, self.builder.stats.generated_tokens - before, time.perf_counter() - t0, written


def run_distributed(
    cfg: RunConfig,
    workers: int | None,
    address: str | None,
    shards: str | None,
    prompts_per_task: int = 4,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> DistributedReport:
    """Run (or resume) the ingest of cfg on Ray and merge the shards into cfg.store."""
    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise IngestError('--workers/--ray-address need Ray: pip install -e ".[distributed]"') from None
    from ingest.prepare import branchlens_version, require_prompts
    from store.compact import compact_if_worth
    from store.connect import JOB_LOCK_WAIT, reading
    from store.queries import run_summary
    from store.shards import (
        check_location,
        finished_shards,
        merge,
        run_dir,
        sweep,
        task_prompts,
        write_manifest,
    )
    from store.writer import StoreWriter

    require_prompts(cfg)
    if cfg.zero_pe:
        raise IngestError(
            "--zero-pe is not yet available with --workers; add it after the merge with "
            "python -m ingest.zero_pe STORE"
        )
    if workers is not None and workers < 1:
        raise IngestError(f"--workers must be >= 1, got {workers}")
    StoreWriter(cfg.store, created_by=branchlens_version()).check_existing()
    check_location(
        shards or f"{cfg.store}.shards"
    )  # a bad URL, bucket or credentials: fail before Ray starts
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    started_here = not ray.is_initialized()
    if started_here:
        check_ray_address(address)
        init: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        if address:
            init["address"] = address
        else:
            init["num_cpus"] = workers or os.cpu_count() or 1
        try:
            ray.init(**init)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise IngestError(f"cannot start or reach Ray ({address or 'local'}): {reason(exc)}") from None
    try:
        cluster = ray.cluster_resources()
        gpus = int(cluster.get("GPU", 0))
        use_gpu = gpus > 0 and cfg.device != "cpu"
        n = workers or (gpus if use_gpu else int(cluster.get("CPU", 1)))
        resources = {"num_gpus": 1} if use_gpu else {"num_cpus": 1}
        Worker = ray.remote(ShardWorker).options(
            **resources, max_restarts=RESTARTS, max_task_retries=RESTARTS
        )
        values = dataclasses.asdict(cfg)
        actors = [Worker.remote(values) for _ in range(n)]
        try:
            described = ray.get(actors[0].describe.remote())
        except ray.exceptions.RayActorError as exc:
            raise IngestError(f"a worker could not start: {reason(exc, last_line=True)}") from None
        from store.records import RunRecord

        run = RunRecord(**described["run"])
        run_path = run_dir(cfg.store, run.run_id, shards)
        manifest = write_manifest(run_path, run, len(cfg.prompts), prompts_per_task)
        per_task = manifest["prompts_per_task"]  # a resumed run keeps its first split
        chunks = task_prompts(manifest)
        tasks_total = len(chunks)
        done = set(finished_shards(run_path))
        todo = [t for t in chunks if t not in done]
        seconds["start"] = time.perf_counter() - t0
        if done:
            log(f"resuming run {run.run_id}: {len(done)} of {tasks_total} tasks already in {run_path}")
        log(
            f"{n} workers ({'1 GPU' if use_gpu else '1 CPU'} each) on {len(todo)} tasks of {per_task} prompts"
        )

        t1 = time.perf_counter()
        generated = 0
        bar = tqdm(
            total=tasks_total,
            initial=len(done),
            desc="tasks",
            unit="task",
            disable=not progress,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        with bar:
            pool = ActorPool(actors)
            results = pool.map_unordered(lambda actor, t: actor.build.remote(run_path, t, chunks[t]), todo)
            try:
                for task, tokens, _secs, _written in results:
                    generated += tokens
                    bar.update()
                    bar.set_postfix(tok_s=f"{generated / max(time.perf_counter() - t1, 1e-9):.1f}")
                    if not progress:
                        log(f"task {task + 1}/{tasks_total} written")
            except ray.exceptions.RayError as exc:
                raise IngestError(
                    f"a task failed after {RESTARTS} retries: {reason(exc, last_line=True)}; "
                    "finished shards are kept, run the same command to resume"
                ) from None
        seconds["generate"] = time.perf_counter() - t1
    finally:
        if started_here:
            ray.shutdown()

    t2 = time.perf_counter()
    if len(finished_shards(run_path)) == tasks_total:
        sweep(run_path)  # what killed attempts left; no worker is running any more
    merge(run_path, cfg.store, created_by=branchlens_version())
    if cfg.compact:
        compact_if_worth(cfg.store, log)
    seconds["merge"] = time.perf_counter() - t2
    with reading(cfg.store, lock_timeout=JOB_LOCK_WAIT) as con:
        counts = run_summary(con, run.run_id)
    return DistributedReport(
        run.run_id,
        Path(cfg.store),
        run_path,
        n,
        "GPU" if use_gpu else "CPU",
        tasks_total,
        len(done),
        generated,
        counts,
        seconds,
    )
