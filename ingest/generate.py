"""Building one prompt's generation tree with a KV cache and capturing the chosen layers.

Latent of a token = hidden state of the chosen layer at that token's position when the token is fed,
exactly HF's `output_hidden_states[layer]` of a forward pass over the full sequence (0 = embeddings).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ingest.config import RunConfig
from ingest.models import LoadedModel
from ingest.sampling import branch_seed, choose_next, token_stats
from ingest.tree import Slot, TreePlan, fork_positions
from store.records import BranchRecord

# Cache layer types whose update() never writes into existing tensors, so a copy may share them.
_APPEND_ONLY_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer")


@dataclass
class Segment:
    """The tokens one branch generated, with their stats and latents (n_layers_sel, n, d)."""

    token_ids: list[int]
    logprobs: np.ndarray
    entropies: np.ndarray
    latents: np.ndarray
    ended_with_eos: bool


@dataclass
class BuildStats:
    forward_calls: int = 0
    generated_tokens: int = 0
    prefix_reused: int = 0
    prefix_recomputed: int = 0


class TreeBuilder:
    """Generates the planned tree for one prompt at a time."""

    def __init__(self, lm: LoadedModel, cfg: RunConfig, layers: list[int], plan: TreePlan):
        self.lm, self.cfg, self.layers, self.plan = lm, cfg, layers, plan
        self.eos_ids = lm.eos_ids if cfg.stop_at_eos else set()
        self.stats = BuildStats()

    @torch.inference_mode()
    def build(self, prompt_id: int, prompt_ids: list[int],
              on_branch: Callable[[BranchRecord], None] | None = None) -> list[BranchRecord]:
        """All branches of one prompt's tree, root first, then depth-first below each sample."""
        self._prompt_id, self._on_branch = prompt_id, on_branch
        n_prompt = len(prompt_ids)
        self._max_end = n_prompt + self.cfg.max_new_tokens - 1
        ids = torch.tensor([prompt_ids], device=self.lm.device)
        out = self._forward(ids, None)
        logprobs, entropies = token_stats(out.logits[0, :-1], ids[0, 1:])
        nan = np.full(1, np.nan, np.float32)
        records: list[BranchRecord] = []
        root = Segment(list(prompt_ids), np.concatenate([nan, logprobs]), np.concatenate([nan, entropies]),
                       self._to_host(self._hidden(out))[:, 0], False)
        self._emit(records, self.plan.slots[0], 0, root)

        samples = self.plan.children(0)
        cache = out.past_key_values
        cache.batch_repeat_interleave(len(samples))
        logits = out.logits[:, -1].expand(len(samples), -1)
        segments = self._decode(cache, logits, samples, start=n_prompt, exclude=None)
        for row, (slot, seg) in enumerate(zip(samples, segments)):
            record = self._emit(records, slot, n_prompt, seg)
            self._grow(slot, record, list(prompt_ids) + seg.token_ids, cache, row, records)
        return records

    def _grow(self, slot: Slot, record: BranchRecord, sequence: list[int],
              cache, row: int, records: list[BranchRecord]) -> None:
        """Fork the planned children of `record` at positions chosen by the fork rule, recursively."""
        children = self.plan.children(slot.local_id)
        if not children:
            return
        cfg = self.cfg
        positions = fork_positions(cfg.fork_rule, len(children), record.fork_position, record.entropies,
                                   self._max_end - cfg.min_child_tokens + 1, cfg.fork_offsets)
        for child, p in zip(children, positions):
            child_cache, logits = self._prefix_state(cache, row, sequence[:p])
            seg = self._decode(child_cache, logits[None], [child], start=p, exclude=[sequence[p]])[0]
            child_record = self._emit(records, child, p, seg)
            self._grow(child, child_record, sequence[:p] + seg.token_ids, child_cache, 0, records)

    def _decode(self, cache, logits: torch.Tensor, slots: list[Slot], start: int,
                exclude: list[int] | None) -> list[Segment]:
        """Sample len(slots) rows in lockstep from `start` to the tree's last position or EOS.

        The cache and logits hold one row per slot; each row samples with its own seeded generator.
        At `start`, row i never picks exclude[i] (a fork must differ from its parent there).
        """
        cfg, device = self.cfg, self.lm.device
        gens = [torch.Generator(device=device).manual_seed(branch_seed(cfg.seed, self._prompt_id, s.local_id))
                for s in slots]
        n_rows = len(slots)
        tokens: list[list[int]] = [[] for _ in slots]
        stats: list[tuple[list[float], list[float]]] = [([], []) for _ in slots]
        lengths = [0] * n_rows
        ended = [False] * n_rows
        hidden_steps = []
        for pos in range(start, self._max_end + 1):
            alive = [i for i in range(n_rows) if not ended[i]]
            choice = [0] * n_rows  # rows that ended are fed a dummy token; their outputs are dropped
            for i in alive:
                banned = exclude[i] if exclude is not None and pos == start else None
                choice[i] = choose_next(logits[i], cfg.temperature, cfg.top_k, cfg.top_p, gens[i], banned)
            chosen = torch.tensor(choice, device=device)
            logprobs, entropies = token_stats(logits, chosen)
            out = self._forward(chosen[:, None], cache)
            hidden_steps.append(self._hidden(out))
            for i in alive:
                tokens[i].append(choice[i])
                stats[i][0].append(logprobs[i])
                stats[i][1].append(entropies[i])
                lengths[i] += 1
                if choice[i] in self.eos_ids:
                    ended[i] = True
            if all(ended):
                break
            logits = out.logits[:, -1]
        hidden = self._to_host(torch.cat(hidden_steps, dim=2))
        self.stats.generated_tokens += sum(lengths)
        return [
            Segment(tokens[i], np.asarray(stats[i][0], np.float32), np.asarray(stats[i][1], np.float32),
                    hidden[:, i, :lengths[i]], ended[i])
            for i in range(n_rows)
        ]

    def _prefix_state(self, cache, row: int, prefix: list[int]):
        """A cache holding exactly `prefix` for one row, and the logits that predict the next token.

        Re-uses the parent's cache (row selected, cropped to len(prefix) - 1, last prefix token fed
        again to get its logits); where the cache cannot be cropped (a sliding window already full,
        other cache types) the prefix is recomputed from scratch.
        """
        device = self.lm.device
        try:
            child = _copy_cache(cache)
            child.batch_select_indices(torch.tensor([row], device=device))
            excess = child.get_seq_length() - (len(prefix) - 1)
            if excess > 0:
                child.crop(-excess)
            if child.get_seq_length() != len(prefix) - 1:
                raise RuntimeError("cache crop did not reach the fork position")
        except (RuntimeError, ValueError, AttributeError, TypeError, IndexError):
            out = self._forward(torch.tensor([prefix], device=device), None)
            self.stats.prefix_recomputed += 1
            return out.past_key_values, out.logits[0, -1]
        out = self._forward(torch.tensor([prefix[-1:]], device=device), child)
        self.stats.prefix_reused += 1
        return child, out.logits[0, -1]

    def _forward(self, input_ids: torch.Tensor, cache):
        self.stats.forward_calls += 1
        return self.lm.model(input_ids=input_ids, past_key_values=cache, use_cache=True,
                             output_hidden_states=True, return_dict=True)

    def _hidden(self, out) -> torch.Tensor:
        """The chosen layers' hidden states: (n_layers_sel, batch, seq, d)."""
        return torch.stack([out.hidden_states[layer] for layer in self.layers])

    @staticmethod
    def _to_host(hidden: torch.Tensor) -> np.ndarray:
        return hidden.float().cpu().numpy()

    def _emit(self, records: list[BranchRecord], slot: Slot, fork_position: int, seg: Segment) -> BranchRecord:
        plan, tok = self.plan, self.lm.tokenizer
        record = BranchRecord(
            branch_id=plan.branch_id(self._prompt_id, slot.local_id),
            prompt_id=self._prompt_id,
            parent_branch_id=None if slot.parent is None else plan.branch_id(self._prompt_id, slot.parent),
            fork_position=fork_position,
            depth=slot.depth,
            kind=slot.kind,
            path=slot.path,
            token_ids=np.asarray(seg.token_ids, np.int64),
            token_texts=tok.batch_decode([[t] for t in seg.token_ids], skip_special_tokens=False,
                                         clean_up_tokenization_spaces=False),
            logprobs=seg.logprobs,
            entropies=seg.entropies,
            ended_with_eos=seg.ended_with_eos,
            latents=seg.latents,
        )
        records.append(record)
        if self._on_branch is not None:
            self._on_branch(record)
        return record


def _copy_cache(cache):
    """A copy of a KV cache that shares its tensors where the layer type never writes in place."""
    layers = getattr(cache, "layers", None)
    if layers is None or any(type(layer).__name__ not in _APPEND_ONLY_LAYERS for layer in layers):
        return copy.deepcopy(cache)
    memo = {id(v): v for layer in layers for v in vars(layer).values() if isinstance(v, torch.Tensor)}
    return copy.deepcopy(cache, memo)
