"""Plain records that ingest hands to the store writer (no SQL, no torch)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

# A run id names the run's shard folder (STORE.shards/<run_id>): a name, never a path (`../../x` wrote a
# shard outside the store's folder).
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def is_run_name(run_id: object) -> bool:
    """True for a run id that is a plain name: letters, digits, '.', '_', '-', not '..', <= 128 chars."""
    return isinstance(run_id, str) and RUN_NAME.fullmatch(run_id) is not None and ".." not in run_id


@dataclass(frozen=True)
class RunRecord:
    """One ingest run: what `runs` holds."""

    run_id: str
    model: str
    config: dict[str, Any]
    config_hash: str
    n_layers: int
    d_model: int
    pe_type: str
    device: str
    dtype: str


@dataclass
class BranchRecord:
    """One branch with its own tokens (positions fork_position ..) and their latents.

    latents has shape (len(layers), n_tokens, d_model), float32, layers as given to the writer.
    logprobs/entropies use NaN where undefined (position 0).
    """

    branch_id: int
    prompt_id: int
    parent_branch_id: int | None
    fork_position: int
    depth: int
    kind: str
    path: str
    token_ids: np.ndarray
    token_texts: list[str]
    logprobs: np.ndarray
    entropies: np.ndarray
    ended_with_eos: bool
    latents: np.ndarray

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def positions(self) -> np.ndarray:
        return np.arange(self.fork_position, self.fork_position + self.n_tokens, dtype=np.int32)

    @property
    def end_position(self) -> int:
        return self.fork_position + self.n_tokens - 1
