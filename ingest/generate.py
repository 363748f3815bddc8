"""Building one prompt's generation tree with KV caches, level by level in batches, capturing chosen layers.

Latent of a token = hidden state of the chosen layer at that token's position when the token is fed,
exactly HF's `output_hidden_states[layer]` of a forward pass over the full sequence (0 = embeddings).

How the tree is decoded: the prompt is prefilled once; its samples decode in lockstep from a copy of
that cache; then each fork level (all children of all branches of the level above) decodes as one
left-padded batch whose cache is assembled from the parents' caches (each child takes its parent's
row, cut at the fork position: the cache surgery lives in ingest.kvcache). Rows start at different
positions and all end at the tree's last position (or EOS); a row that is done is fed on until the
batch ends and its outputs are dropped.
Every row samples with its own seeded generator, so the tree does not depend on batching.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ingest import kvcache
from ingest.config import RunConfig
from ingest.models import LoadedModel
from ingest.sampling import branch_seed, choose_rows, token_stats_tensors
from ingest.tree import Slot, TreePlan, fork_positions
from store.faults import fault_point
from store.records import BranchRecord

DEFAULT_BATCH_ROWS = 64


@dataclass
class BuildStats:
    forward_calls: int = 0
    generated_tokens: int = 0
    prefix_reused: int = 0
    prefix_recomputed: int = 0


@dataclass
class Batch:
    """Rows decoding in lockstep: a KV cache, its attention mask (rows, slots; 0 = left padding) and
    each row's padding, so that row r's position j sits in slot pad[r] + j."""

    cache: Any
    mask: torch.Tensor
    pad: list[int]


class HostArray:
    """A device tensor on its way to host memory: on CUDA copied into pinned memory without blocking,
    so the copy overlaps the next batch's work; `numpy()` waits for it."""

    def __init__(self, tensor: torch.Tensor):
        tensor = tensor.detach().float()
        self._event = None
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=torch.float32, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tensor.cpu()

    def numpy(self) -> np.ndarray:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._host.numpy()


@dataclass
class Built:
    """A decoded branch: its own tokens and stats, latents (layers, batch rows, steps, d) still in a
    HostArray with this branch in `row`, and where its cache lives until its children are built."""

    slot: Slot
    fork_position: int
    token_ids: list[int]
    logprobs: np.ndarray
    entropies: np.ndarray
    latents: HostArray
    row: int
    ended_with_eos: bool
    sequence: list[int]  # full token ids, prefix included
    batch: Batch | None = field(default=None, repr=False)


class TreeBuilder:
    """Generates the planned tree for one prompt at a time."""

    def __init__(self, lm: LoadedModel, cfg: RunConfig, layers: list[int], plan: TreePlan,
                 batch_rows: int = DEFAULT_BATCH_ROWS):
        self.lm, self.cfg, self.layers, self.plan = lm, cfg, layers, plan
        self.batch_rows = max(1, batch_rows)
        self.eos_ids = lm.eos_ids if cfg.stop_at_eos else set()
        self.stats = BuildStats()
        params = inspect.signature(lm.model.forward).parameters
        self._can_keep_logits = "logits_to_keep" in params

    @torch.inference_mode()
    def build(self, prompt_id: int, prompt_ids: list[int],
              on_branch: Callable[[], None] | None = None) -> list[BranchRecord]:
        """All branches of one prompt's tree, in plan order (root, samples, then each fork level)."""
        self._prompt_id = prompt_id

        def notify() -> None:
            if on_branch is not None:
                on_branch()
            fault_point("generate")  # test-only: die or pause after the N-th branch (store.faults)

        n_prompt = len(prompt_ids)
        self._max_end = n_prompt + self.cfg.max_new_tokens - 1
        device = self.lm.device
        ids = torch.tensor([prompt_ids], device=device)
        mask = torch.ones_like(ids)
        out = self._forward(ids, None, mask, torch.arange(n_prompt, device=device)[None])
        logprobs, entropies = token_stats_tensors(out.logits[0, :-1], ids[0, 1:])
        nan = np.full(1, np.nan, np.float32)
        root = Built(self.plan.slots[0], 0, list(prompt_ids), np.concatenate([nan, logprobs.cpu().numpy()]),
                     np.concatenate([nan, entropies.cpu().numpy()]), HostArray(self._hidden(out)), 0, False,
                     list(prompt_ids))
        built = [root]
        notify()

        samples = self.plan.children(0)
        level: list[Built] = []
        if samples:
            cache = kvcache.repeat_rows(out.past_key_values, len(samples))
            batch = Batch(cache, mask.expand(len(samples), -1).clone(), [0] * len(samples))
            logits = out.logits[:, -1].expand(len(samples), -1)
            level = self._decode(batch, logits, samples, [n_prompt] * len(samples), None,
                                 [list(prompt_ids)] * len(samples), notify)
        del out
        while level:
            built += level
            kids = []
            for parent in level:
                children = self.plan.children(parent.slot.local_id)
                if not children:
                    continue
                cfg = self.cfg
                positions = fork_positions(cfg.fork_rule, len(children), parent.fork_position, parent.entropies,
                                           self._max_end - cfg.min_child_tokens + 1, cfg.fork_offsets)
                kids += [(child, parent, p) for child, p in zip(children, positions)]
            next_level: list[Built] = []
            for lo in range(0, len(kids), self.batch_rows):
                chunk = kids[lo:lo + self.batch_rows]
                batch, logits = self._fork_batch(chunk)
                next_level += self._decode(
                    batch, logits, [child for child, _, _ in chunk], [p for _, _, p in chunk],
                    [parent.sequence[p] for _, parent, p in chunk],
                    [parent.sequence[:p] for _, parent, p in chunk], notify)
            for parent in level:
                parent.batch = None  # its children exist: let its cache go
            level = next_level
        return [self._record(b) for b in sorted(built, key=lambda b: b.slot.local_id)]

    def _decode(self, batch: Batch, logits: torch.Tensor, slots: list[Slot], starts: list[int],
                exclude: list[int] | None, prefixes: list[list[int]], notify: Callable[[], None]) -> list[Built]:
        """Sample the rows of `batch` in lockstep, row i from position starts[i] to the tree's last
        position or EOS; at its first position row i never picks exclude[i] (a fork differs from its
        parent there). `logits` predict each row's first position."""
        cfg, device = self.cfg, self.lm.device
        n_rows = len(slots)
        gens = [torch.Generator(device=device).manual_seed(branch_seed(cfg.seed, self._prompt_id, s.local_id))
                for s in slots]
        budget = [self._max_end - s + 1 for s in starts]  # tokens row i may make
        first = torch.tensor(starts, device=device)
        lengths = [0] * n_rows
        ended = [False] * n_rows
        lp_steps, ent_steps, hidden_steps, host_steps = [], [], [], []
        for step in range(max(budget)):
            chosen = choose_rows(logits, cfg.temperature, cfg.top_k, cfg.top_p, gens, exclude if step == 0 else None)
            logprobs, entropies = token_stats_tensors(logits, chosen)
            host = chosen.tolist()  # the one host sync per step: EOS and lengths
            for i in range(n_rows):
                if not ended[i] and step < budget[i]:
                    lengths[i] += 1
                    ended[i] = host[i] in self.eos_ids
            batch.mask = torch.cat([batch.mask, batch.mask.new_ones(n_rows, 1)], dim=1)
            # rows past their last position are fed on (outputs dropped); keep their position in range
            position = torch.clamp(first + step, max=self._max_end)[:, None]
            out = self._forward(chosen[:, None], batch.cache, batch.mask, position)
            hidden_steps.append(self._hidden(out))
            lp_steps.append(logprobs)
            ent_steps.append(entropies)
            host_steps.append(host)
            if all(ended[i] or step + 1 >= budget[i] for i in range(n_rows)):
                break
            logits = out.logits[:, -1]
        latents = HostArray(torch.cat(hidden_steps, dim=2))
        tokens = np.asarray(host_steps, np.int64).T
        logprobs = torch.stack(lp_steps, dim=1).cpu().numpy()
        entropies = torch.stack(ent_steps, dim=1).cpu().numpy()
        self.stats.generated_tokens += sum(lengths)
        level = []
        for i, slot in enumerate(slots):
            n = lengths[i]
            own = tokens[i, :n].tolist()
            level.append(Built(slot, starts[i], own, logprobs[i, :n].astype(np.float32),
                               entropies[i, :n].astype(np.float32), latents, i, ended[i], prefixes[i] + own, batch))
            notify()
        return level

    def _fork_batch(self, kids: list[tuple[Slot, Built, int]]) -> tuple[Batch, torch.Tensor]:
        """A batch holding each child's prefix (positions < its fork position p) and the logits that
        predict position p: assembled from the parents' caches, or recomputed where they cannot give it."""
        parents = [parent for _, parent, _ in kids]
        if not all(p.batch is not None and kvcache.holds_all(p.batch.cache, p.batch.mask.shape[1]) for p in parents):
            return self._recompute(kids)
        # Each child takes its parent's row up to position p - 2; position p - 1 is fed again for its logits.
        widths = [p - 1 for _, _, p in kids]
        cuts = [kvcache.RowCut(parent.batch.cache, parent.row, parent.batch.pad[parent.row], w)
                for parent, w in zip(parents, widths)]
        device = self.lm.device
        mask, pad = kvcache.left_padding(widths, device)
        batch = Batch(kvcache.assemble(cuts, self.lm.model.config), mask, pad)
        feed = torch.tensor([[parent.sequence[p - 1]] for _, parent, p in kids], device=device)  # (rows, 1)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(kids), 1)], dim=1)  # (rows, width + 1)
        last = torch.tensor(widths, device=device)[:, None]  # (rows, 1): position p - 1
        out = self._forward(feed, batch.cache, batch.mask, last)
        self.stats.prefix_reused += len(kids)
        return batch, out.logits[:, -1]

    def _recompute(self, kids: list[tuple[Slot, Built, int]]) -> tuple[Batch, torch.Tensor]:
        """Prefill every child's prefix in one left-padded batch."""
        device = self.lm.device
        prefixes = [parent.sequence[:p] for _, parent, p in kids]
        mask, pad = kvcache.left_padding([len(seq) for seq in prefixes], device)
        ids = torch.tensor([[0] * k + seq for k, seq in zip(pad, prefixes)], device=device)  # (rows, width)
        positions = torch.clamp(mask.cumsum(dim=1) - 1, min=0)  # (rows, width)
        out = self._forward(ids, None, mask, positions, keep_last_logits=True)
        self.stats.prefix_recomputed += len(kids)
        return Batch(out.past_key_values, mask, pad), out.logits[:, -1]

    def _forward(self, input_ids: torch.Tensor, cache, mask: torch.Tensor, positions: torch.Tensor,
                 keep_last_logits: bool = False):
        self.stats.forward_calls += 1
        extra = {"logits_to_keep": 1} if keep_last_logits and self._can_keep_logits else {}
        # A list selects hidden states: transformers records only those layers (others are None);
        # models without that support return all of them, indexed the same way.
        return self.lm.model(input_ids=input_ids, past_key_values=cache, use_cache=True, attention_mask=mask,
                             position_ids=positions, output_hidden_states=list(self.layers), return_dict=True,
                             **extra)

    def _hidden(self, out) -> torch.Tensor:
        """The chosen layers' hidden states: (n_layers_sel, batch, seq, d)."""
        return torch.stack([out.hidden_states[layer] for layer in self.layers])

    def _record(self, b: Built) -> BranchRecord:
        plan, tok = self.plan, self.lm.tokenizer
        slot = b.slot
        latents = b.latents.numpy()[:, b.row, :len(b.token_ids)]
        return BranchRecord(
            branch_id=plan.branch_id(self._prompt_id, slot.local_id),
            prompt_id=self._prompt_id,
            parent_branch_id=None if slot.parent is None else plan.branch_id(self._prompt_id, slot.parent),
            fork_position=b.fork_position,
            depth=slot.depth,
            kind=slot.kind,
            path=slot.path,
            token_ids=np.asarray(b.token_ids, np.int64),
            token_texts=tok.batch_decode([[t] for t in b.token_ids], skip_special_tokens=False,
                                         clean_up_tokenization_spaces=False),
            logprobs=b.logprobs,
            entropies=b.entropies,
            ended_with_eos=b.ended_with_eos,
            latents=latents,
        )
