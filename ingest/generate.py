"""Building prompts' generation trees with KV caches, level by level in batches, capturing chosen layers.

Latent of a token = hidden state of the chosen layer at that token's position when the token is fed,
exactly HF's `output_hidden_states[layer]` of a forward pass over the full sequence (0 = embeddings).

How a group of prompts is decoded: each prompt is prefilled once; the samples of all the group's
prompts decode in lockstep as one left-padded batch assembled from the prompts' caches; then each fork
level (all children of all branches of the level above, across the group's prompts) decodes as
left-padded batches of up to `batch_rows` rows whose cache is assembled from the parents' caches (each
child takes its parent's row, cut at the fork position: the cache surgery lives in ingest.kvcache).
Rows start at different positions and each ends at its prompt's last position (or EOS); a row that is
done is fed on until the batch ends and its outputs are dropped.
Every row samples from its own seeded stream, so the tree does not depend on batching or grouping.
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
from ingest.profile import StepProfile
from ingest.sampling import branch_seed, row_uniforms, sample_step, token_stats_tensors
from ingest.tree import Slot, TreePlan, fork_positions
from store.faults import fault_point
from store.records import BranchRecord

DEFAULT_BATCH_ROWS = 64
EOS_CHECK_EVERY = 8


@dataclass
class BuildStats:
    forward_calls: int = 0
    generated_tokens: int = 0
    prefix_reused: int = 0
    prefix_recomputed: int = 0
    decode_batches: list[int] = field(default_factory=list)  # rows of each batch decoded, in order


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


@dataclass(eq=False)  # identity: two branches are never "equal"
class Built:
    """A decoded branch of prompt `prompt_id`: its own tokens and stats, latents (layers, batch rows,
    steps, d) still in a HostArray with this branch in `row`, and where its cache lives until its
    children are built."""

    slot: Slot
    fork_position: int
    token_ids: list[int]
    logprobs: np.ndarray
    entropies: np.ndarray
    latents: HostArray | None
    row: int
    ended_with_eos: bool
    sequence: list[int]  # full token ids, prefix included
    batch: Batch | None = field(default=None, repr=False)
    prompt_id: int = 0
    max_end: int = 0  # its prompt's last position
    own: np.ndarray | None = field(default=None, repr=False)  # (layers, tokens, d), once copied out

    def own_latents(self) -> np.ndarray:
        """This branch's latents (layers, its tokens, d) as an array of its own, so the level's HostArray
        (all rows, padded steps, pinned memory on CUDA) can go."""
        if self.own is None:
            self.own = np.ascontiguousarray(self.latents.numpy()[:, self.row, : len(self.token_ids)])
            self.latents = None
        return self.own


def group_size(batch_rows: int, samples: int) -> int:
    """Prompts decoded together: as many as fill one decode batch with their samples (at least one)."""
    return max(1, max(1, batch_rows) // max(1, samples))


def prompt_groups(prompt_ids: list[int], per_group: int) -> list[list[int]]:
    """The given prompt ids in the run's fixed groups: prompt p belongs to group p // per_group. Fixed
    blocks, not "the next per_group left to do", so a resumed run or a task of a distributed run decodes a
    group with the same companions as an uninterrupted run does (the same rows, so the same float bits)."""
    groups: dict[int, list[int]] = {}
    for p in prompt_ids:
        groups.setdefault(p // max(1, per_group), []).append(p)
    return [groups[k] for k in sorted(groups)]


def planned_batches(n_prompts: int, samples: int, forks: int, depth: int, batch_rows: int) -> list[int]:
    """The rows of every decode batch the builder runs for n_prompts full trees (no EOS, every fork
    found), in order: per group of prompts, the samples' batches, then each fork level's."""
    batch_rows = max(1, batch_rows)
    per_group = group_size(batch_rows, samples)
    out: list[int] = []
    for lo in range(0, n_prompts, per_group):
        m = min(per_group, n_prompts - lo)
        if samples:
            out += [m * samples]  # a group's samples decode together (one prompt's never split)
        for level in range(1, depth + 1 if forks else 1):
            rows = m * samples * forks**level
            out += [min(batch_rows, rows - r) for r in range(0, rows, batch_rows)]
    return out


class TreeBuilder:
    """Generates the planned trees of prompts, a group of prompts at a time."""

    def __init__(
        self,
        lm: LoadedModel,
        cfg: RunConfig,
        layers: list[int],
        plan: TreePlan,
        batch_rows: int = DEFAULT_BATCH_ROWS,
        profile: bool = False,
    ):
        self.lm, self.cfg, self.layers, self.plan = lm, cfg, layers, plan
        self.batch_rows = max(1, batch_rows)
        self.eos_ids = lm.eos_ids if cfg.stop_at_eos else set()
        self.stats = BuildStats()
        self.profile = StepProfile(lm.device, enabled=profile)
        # decode steps between host checks for a batch whose rows have all hit EOS: every step on the CPU
        # (where a check costs nothing), every few on an accelerator so the host can queue steps ahead
        self.eos_check_every = 1 if lm.device.type == "cpu" else EOS_CHECK_EVERY
        params = inspect.signature(lm.model.forward).parameters
        self._can_keep_logits = "logits_to_keep" in params
        self._cache_kwarg = kvcache.cache_kwarg(lm.model)
        # how a list given to output_hidden_states indexes what comes back ("by layer", "in order"), False
        # where it gives other states (then all states are asked for), None until the first prefill checks
        self._selection: str | bool | None = None

    @property
    def prompts_per_group(self) -> int:
        """Prompts built together (group_size); groups are fixed blocks of prompt ids (prompt_groups)."""
        return group_size(self.batch_rows, self.cfg.samples)

    def build(
        self, prompt_id: int, prompt_ids: list[int], on_branch: Callable[[], None] | None = None
    ) -> list[BranchRecord]:
        """All branches of one prompt's tree, in plan order (root, samples, then each fork level)."""
        return self.build_group([(prompt_id, prompt_ids)], on_branch)[prompt_id]

    @torch.inference_mode()
    def build_group(
        self, prompts: list[tuple[int, list[int]]], on_branch: Callable[[], None] | None = None
    ) -> dict[int, list[BranchRecord]]:
        """The trees of several prompts (prompt_id, token ids), decoded together; per prompt id, its
        branches in plan order. The trees are those `build` makes one prompt at a time."""

        def notify() -> None:
            if on_branch is not None:
                on_branch()
            fault_point("generate")  # test-only: die or pause after the N-th branch (store.faults)

        roots, logits = [], []
        for prompt_id, prompt_ids in prompts:
            root, last_logits = self._prefill(prompt_id, prompt_ids)
            roots.append(root)
            logits.append(last_logits)
            notify()
        built = list(roots)
        level = self._samples(roots, logits, notify)
        del logits
        while level:
            built += level
            kids = []
            for parent in level:
                children = self.plan.children(parent.slot.local_id)
                if not children:
                    continue
                cfg = self.cfg
                positions = fork_positions(
                    cfg.fork_rule,
                    len(children),
                    parent.fork_position,
                    parent.entropies,
                    parent.max_end - cfg.min_child_tokens + 1,
                    cfg.fork_offsets,
                )
                kids += [(child, parent, p) for child, p in zip(children, positions)]
            next_level: list[Built] = []
            for lo in range(0, len(kids), self.batch_rows):
                chunk = kids[lo : lo + self.batch_rows]
                batch, chunk_logits = self._fork_batch(chunk)
                next_level += self._decode(
                    batch,
                    chunk_logits,
                    [(parent.prompt_id, child, parent.max_end) for child, parent, _ in chunk],
                    [p for _, _, p in chunk],
                    [parent.sequence[p] for _, parent, p in chunk],
                    [parent.sequence[:p] for _, parent, p in chunk],
                    notify,
                )
            for parent in level:
                parent.batch = None  # its children exist: let its cache go
                parent.own_latents()  # and its level's whole latents array, once all its rows are copied out
            level = next_level
        out: dict[int, list[BranchRecord]] = {prompt_id: [] for prompt_id, _ in prompts}
        for b in sorted(built, key=lambda b: (b.prompt_id, b.slot.local_id)):
            out[b.prompt_id].append(self._record(b))
        return out

    def _prefill(self, prompt_id: int, prompt_ids: list[int]) -> tuple[Built, torch.Tensor]:
        """The root branch of one prompt (its cache kept for the samples) and the logits (1, vocab)
        that predict its first generated position."""
        n_prompt = len(prompt_ids)
        device = self.lm.device
        with self.profile.section("prefill"):
            ids = torch.tensor([prompt_ids], device=device)  # (1, n)
            mask = torch.ones_like(ids)
            out = self._forward(ids, None, mask, torch.arange(n_prompt, device=device)[None])
            logprobs, entropies = token_stats_tensors(out.logits[0, :-1], ids[0, 1:])
            nan = np.full(1, np.nan, np.float32)
            root = Built(
                self.plan.slots[0],
                0,
                list(prompt_ids),
                np.concatenate([nan, logprobs.cpu().numpy()]),
                np.concatenate([nan, entropies.cpu().numpy()]),
                HostArray(self._hidden(out)),
                0,
                False,
                list(prompt_ids),
                Batch(kvcache.returned(out), mask, [0]),
                prompt_id,
                n_prompt + self.cfg.max_new_tokens - 1,
            )
        return root, out.logits[:, -1].clone()  # a view would keep the whole (1, n, vocab) logits alive

    def _samples(
        self, roots: list[Built], logits: list[torch.Tensor], notify: Callable[[], None]
    ) -> list[Built]:
        """The samples of all roots, decoded in batches of whole prompts up to batch_rows rows, each
        batch's cache assembled from its prompts' caches (one prompt alone reuses its own)."""
        samples = self.plan.children(0)
        if not samples:
            return []
        per = len(samples)
        together = self.prompts_per_group
        if not all(kvcache.holds_all(r.batch.cache, r.batch.mask.shape[1]) for r in roots):
            together = 1  # a sliding window has dropped part of a prompt: its cache cannot be cut
        level: list[Built] = []
        for lo in range(0, len(roots), together):
            group, group_logits = roots[lo : lo + together], logits[lo : lo + together]
            if len(group) == 1:
                root = group[0]
                cache = kvcache.repeat_rows(root.batch.cache, per)
                batch = Batch(cache, root.batch.mask.expand(per, -1).clone(), [0] * per)
            else:
                lengths = [len(r.token_ids) for r in group for _ in samples]
                cuts = [kvcache.RowCut(r.batch.cache, 0, 0, len(r.token_ids)) for r in group for _ in samples]
                mask, pad = kvcache.left_padding(lengths, self.lm.device)
                batch = Batch(kvcache.assemble(cuts, self.lm.model.config), mask, pad)
                del cuts
                for r in group:
                    r.batch = None  # the assembled cache holds copies of the prompts' caches
            first = torch.cat([lg.expand(per, -1) for lg in group_logits])  # (rows, vocab)
            rows = [(r.prompt_id, s, r.max_end) for r in group for s in samples]
            level += self._decode(
                batch,
                first,
                rows,
                [len(r.token_ids) for r in group for _ in samples],
                None,
                [list(r.token_ids) for r in group for _ in samples],
                notify,
            )
            for r in group:
                r.batch = None
        return level

    def _decode(
        self,
        batch: Batch,
        logits: torch.Tensor,
        rows: list[tuple[int, Slot, int]],
        starts: list[int],
        exclude: list[int] | None,
        prefixes: list[list[int]],
        notify: Callable[[], None],
    ) -> list[Built]:
        """Sample the rows of `batch` in lockstep, row i = (prompt id, slot, last position) from position
        starts[i] to its last position or EOS; at its first position row i never picks exclude[i] (a
        fork differs from its parent there). `logits` predict each row's first position."""
        cfg, device, prof = self.cfg, self.lm.device, self.profile
        n_rows = len(rows)
        self.stats.decode_batches.append(n_rows)
        budget = [end - s + 1 for (_, _, end), s in zip(rows, starts)]  # tokens row i may make
        uniforms = row_uniforms(
            [branch_seed(cfg.seed, pid, slot.local_id) for pid, slot, _ in rows], max(budget), device
        )  # (rows, steps)
        first = torch.tensor(starts, device=device)
        last = torch.tensor([end for _, _, end in rows], device=device)
        steps_left = torch.tensor(budget, device=device)  # (rows,)
        eos = torch.tensor(sorted(self.eos_ids), dtype=torch.long, device=device)
        # tokens up to and including each row's first EOS; max(budget) + 1 = none yet
        done_at = torch.full((n_rows,), max(budget) + 1, dtype=torch.long, device=device)
        check_every = self.eos_check_every  # EOS is the one thing the host cannot know ahead
        lp_steps, ent_steps, hidden_steps, token_steps = [], [], [], []
        for step in range(max(budget)):
            with prof.section("sample"):
                chosen, logprobs, entropies = sample_step(
                    logits,
                    cfg.temperature,
                    cfg.top_k,
                    cfg.top_p,
                    uniforms[:, step],
                    exclude if step == 0 else None,
                )
                if eos.numel():
                    hit = torch.isin(chosen, eos) & (done_at > step)
                    done_at = torch.where(hit, step + 1, done_at)
            batch.mask = torch.cat([batch.mask, batch.mask.new_ones(n_rows, 1)], dim=1)
            # rows past their last position are fed on (outputs dropped); keep their position in range
            position = torch.minimum(first + step, last)[:, None]
            with prof.section("forward"):
                out = self._forward(chosen[:, None], batch.cache, batch.mask, position)
            with prof.section("capture"):
                hidden_steps.append(self._hidden(out))
            lp_steps.append(logprobs)
            ent_steps.append(entropies)
            token_steps.append(chosen)
            if step + 1 == max(budget):
                break
            if eos.numel() and (step + 1) % check_every == 0:
                with prof.section("host_sync"):
                    if bool((torch.minimum(done_at, steps_left) <= step + 1).all()):
                        break
            logits = out.logits[:, -1]
        with prof.section("capture"):
            stacked = torch.cat(hidden_steps, dim=2)  # (layers, rows, steps, d)
        with prof.section("copy"):
            latents = HostArray(stacked)
            tokens = torch.stack(token_steps, dim=1).cpu().numpy()  # (rows, steps)
            lengths = torch.minimum(done_at, steps_left).tolist()
            ended = (done_at <= steps_left).tolist()  # ended by EOS within its budget
            logprobs = torch.stack(lp_steps, dim=1).cpu().numpy()
            entropies = torch.stack(ent_steps, dim=1).cpu().numpy()
        self.stats.generated_tokens += sum(lengths)
        level = []
        for i, (prompt_id, slot, end) in enumerate(rows):
            n = lengths[i]
            own = tokens[i, :n].tolist()
            level.append(
                Built(
                    slot,
                    starts[i],
                    own,
                    logprobs[i, :n].astype(np.float32),
                    entropies[i, :n].astype(np.float32),
                    latents,
                    i,
                    ended[i],
                    prefixes[i] + own,
                    batch,
                    prompt_id,
                    end,
                )
            )
            notify()
        return level

    def _fork_batch(self, kids: list[tuple[Slot, Built, int]]) -> tuple[Batch, torch.Tensor]:
        """A batch holding each child's prefix (positions < its fork position p) and the logits that
        predict position p: assembled from the parents' caches, or recomputed where they cannot give it."""
        parents = [parent for _, parent, _ in kids]
        if not all(
            p.batch is not None and kvcache.holds_all(p.batch.cache, p.batch.mask.shape[1]) for p in parents
        ):
            return self._recompute(kids)
        # Each child takes its parent's row up to position p - 2; position p - 1 is fed again for its logits.
        widths = [p - 1 for _, _, p in kids]
        cuts = [
            kvcache.RowCut(parent.batch.cache, parent.row, parent.batch.pad[parent.row], w)
            for parent, w in zip(parents, widths)
        ]
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
        return Batch(kvcache.returned(out), mask, pad), out.logits[:, -1]

    def _forward(
        self,
        input_ids: torch.Tensor,
        cache,
        mask: torch.Tensor,
        positions: torch.Tensor,
        keep_last_logits: bool = False,
    ):
        self.stats.forward_calls += 1
        extra = {"logits_to_keep": 1} if keep_last_logits and self._can_keep_logits else {}

        def run(select, keep=extra):
            return self.lm.model(
                input_ids=input_ids,
                use_cache=True,
                attention_mask=mask,
                position_ids=positions,
                output_hidden_states=select,
                return_dict=True,
                **{self._cache_kwarg: cache},
                **keep,
            )

        if not self._selection:
            if self._selection is None and cache is None:  # the first prefill: safe to run twice (no cache)
                selected = run(list(self.layers))
                # only its states are compared: its logits, (1, n, vocab), would double the prefill's peak
                full = run(True, {"logits_to_keep": 1} if self._can_keep_logits else extra)
                return self._check_selection(selected, full)
            return run(True)
        return run(list(self.layers))

    def _check_selection(self, selected, full):
        """Decide how to read a list selection of hidden states from one prefill run both ways.

        A list asks transformers to record only those layers, but its meaning changed between versions:
        5.25 returns n_layers + 1 states indexed by layer (None where not asked), 5.17 returns n_layers
        states of the decoder layers' outputs (its index i is layer i + 1 here), models without the support
        return them all. So the selection is kept only where it gives exactly the states of
        output_hidden_states=True; otherwise every later forward asks for all states. Returns `selected`
        (its logits and cache are those of any run), with all of `full`'s states where the selection fails."""
        want = self._pick(full.hidden_states, "by layer")
        if want is None:
            raise RuntimeError(
                f"the model returned {len(full.hidden_states or ())} hidden states; layers {self.layers} "
                "need one per layer plus the embeddings"
            )
        self._selection = False
        for mode in ("by layer", "in order"):
            got = self._pick(selected.hidden_states, mode)
            if got is not None and all(torch.equal(g, w) for g, w in zip(got, want)):
                self._selection = mode
                return selected
        selected.hidden_states = full.hidden_states  # read by layer from now on
        return selected

    def _pick(self, states, mode: str) -> list[torch.Tensor] | None:
        """The chosen layers' states read from `states` as `mode` says (by layer index, or the selected
        ones in order), or None where one of them is missing."""
        if states is None:  # a model that answers a list with no states at all
            return None
        if mode == "by layer":
            picked = [states[layer] if layer < len(states) else None for layer in self.layers]
        else:
            picked = list(states) if len(states) == len(self.layers) else [None]
        return None if any(p is None for p in picked) else picked

    def _hidden(self, out) -> torch.Tensor:
        """The chosen layers' hidden states: (n_layers_sel, batch, seq, d)."""
        picked = self._pick(out.hidden_states, self._selection or "by layer")
        if picked is None:
            raise RuntimeError(
                f"the model returned {len(out.hidden_states or ())} hidden states for layers {self.layers}"
            )
        return torch.stack(picked)

    def _record(self, b: Built) -> BranchRecord:
        plan, tok = self.plan, self.lm.tokenizer
        slot = b.slot
        with self.profile.section("copy"):
            latents = b.own_latents()
        with self.profile.section("records"):
            texts = tok.batch_decode(
                [[t] for t in b.token_ids], skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
        return BranchRecord(
            branch_id=plan.branch_id(b.prompt_id, slot.local_id),
            prompt_id=b.prompt_id,
            parent_branch_id=None if slot.parent is None else plan.branch_id(b.prompt_id, slot.parent),
            fork_position=b.fork_position,
            depth=slot.depth,
            kind=slot.kind,
            path=slot.path,
            token_ids=np.asarray(b.token_ids, np.int64),
            token_texts=texts,
            logprobs=b.logprobs,
            entropies=b.entropies,
            ended_with_eos=b.ended_with_eos,
            latents=latents,
        )
