"""Setting a run up, once for every way of running it (single process, dry run, Ray worker): device and
dtype, the model, the layers, the tokenized prompts and the run's record (resolved config, hash, id)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import torch

from ingest.config import RunConfig, config_hash, resolve_layers
from ingest.errors import IngestError
from ingest.generate import TreeBuilder
from ingest.models import LoadedModel, load_model, resolve_device, resolve_dtype
from ingest.tree import TreePlan
from store.records import RunRecord


@dataclass
class Prepared:
    """A run ready to generate: everything derived from its config and its model."""

    cfg: RunConfig
    lm: LoadedModel
    layers: list[int]
    prompt_ids: list[list[int]]
    run: RunRecord
    plan: TreePlan
    load_seconds: float

    @property
    def run_id(self) -> str:
        return self.run.run_id

    def tree_builder(self, profile: bool = False) -> TreeBuilder:
        """The run's tree builder; `profile` times each section of its work (ingest.profile)."""
        return TreeBuilder(
            self.lm, self.cfg, self.layers, self.plan, batch_rows=self.cfg.batch_rows, profile=profile
        )


def branchlens_version() -> str:
    """What writes the store, for its `created_by`."""
    try:
        return f"branchlens {version('branchlens')}"
    except PackageNotFoundError:
        return "branchlens (not installed)"


def require_prompts(cfg: RunConfig) -> None:
    """Fail before anything slow when the config holds no prompts."""
    if not cfg.prompts:
        raise IngestError(
            "no prompts: give --prompts FILE, a config with 'prompts', or no arguments for the demo"
        )


def prepare(
    cfg: RunConfig,
    log: Callable[[str], None] = lambda _m: None,
    lm: LoadedModel | None = None,
    progress: bool = False,
) -> Prepared:
    """Resolve device and dtype, load the model (or check that `lm` matches them), resolve the layers,
    tokenize the prompts and derive the run's record. Raises IngestError on bad input."""
    require_prompts(cfg)
    plan = TreePlan(cfg.samples, cfg.forks, cfg.depth)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    from transformers.utils import logging as hf_logging

    # transformers' own bars follow ours: plain log lines only when ours are off (e.g. under nohup)
    if progress:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    if lm is None:
        log(f"loading model {cfg.model} on {device} ({str(dtype).removeprefix('torch.')})")
        lm = load_model(cfg.model, device, dtype, log)
    elif (lm.device.type, lm.dtype) != (device.type, dtype):
        raise IngestError(
            f"the loaded model is on {lm.device}/{lm.dtype}, the config asks for {device}/{dtype}"
        )
    layers = resolve_layers(cfg.layers, lm.n_layers)
    if cfg.zero_pe:
        lm.positions.require()  # before any generation: an unsupported family fails fast
    prompt_ids = tokenize_prompts(lm, cfg)
    run = run_record(cfg, lm, layers, device, dtype)
    return Prepared(cfg, lm, layers, prompt_ids, run, plan, time.perf_counter() - t0)


def run_record(
    cfg: RunConfig, lm: LoadedModel, layers: list[int], device: torch.device, dtype: torch.dtype
) -> RunRecord:
    """The run's record: resolved config, the hash of what decides the output, and its id."""
    resolved = dataclasses.asdict(cfg) | {
        "layers": layers,
        "device": device.type,
        "dtype": str(dtype).removeprefix("torch."),
    }
    digest = config_hash(resolved)
    run_id = cfg.run_id or f"run-{digest}"
    resolved["run_id"] = run_id
    return RunRecord(
        run_id,
        cfg.model,
        resolved,
        digest,
        lm.n_layers,
        lm.d_model,
        lm.pe_type,
        str(device),
        resolved["dtype"],
    )


def tokenize_prompts(lm: LoadedModel, cfg: RunConfig) -> list[list[int]]:
    """Token ids of every prompt (special tokens such as BOS included), checked against the context."""
    out = []
    for i, text in enumerate(cfg.prompts):
        ids = list(lm.tokenizer(text, add_special_tokens=True)["input_ids"])
        if not ids:
            raise IngestError(f"prompt {i} tokenizes to nothing: {text[:40]!r}")
        if lm.max_positions and len(ids) + cfg.max_new_tokens > lm.max_positions:
            raise IngestError(
                f"prompt {i} has {len(ids)} tokens; with max_new_tokens={cfg.max_new_tokens} it exceeds "
                f"the model's {lm.max_positions} positions"
            )
        out.append(ids)
    return out
