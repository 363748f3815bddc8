"""The shape of a generation tree: deterministic branch numbering and the fork-position rules.

Per prompt the tree is: a root holding the prompt tokens (kind 'prompt'), `samples` children that
continue it (kind 'sample', depth 1), and then `forks` children per branch, `depth` levels deep
(kind 'fork'). Branch ids are fixed by the plan, not by the order of work, so a resumed run writes
the same ids; a planned fork that finds no valid position is simply absent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ingest.errors import IngestError

MAX_BRANCHES_PER_PROMPT = 100_000


@dataclass(frozen=True)
class Slot:
    """A planned branch: its local id within the prompt's tree and where it hangs."""

    local_id: int
    parent: int | None
    depth: int
    kind: str
    path: str


class TreePlan:
    """All planned branch slots of one prompt, in breadth-first order."""

    def __init__(self, samples: int, forks: int, depth: int):
        n_forks = sum(samples * forks**level for level in range(1, depth + 1)) if forks else 0
        if 1 + samples + n_forks > MAX_BRANCHES_PER_PROMPT:
            raise IngestError(
                f"samples={samples}, forks={forks}, depth={depth} plan {1 + samples + n_forks} branches per "
                f"prompt; the limit is {MAX_BRANCHES_PER_PROMPT}"
            )
        self.slots: list[Slot] = [Slot(0, None, 0, "prompt", "prompt")]
        self._children: dict[int, list[int]] = {0: []}
        level = []
        for s in range(samples):
            level.append(self._add(0, 1, "sample", f"s{s}"))
        for d in range(2, depth + 2 if forks else 2):
            next_level = []
            for parent in level:
                for j in range(forks):
                    next_level.append(self._add(parent, d, "fork", f"{self.slots[parent].path}.f{j}"))
            level = next_level

    def _add(self, parent: int, depth: int, kind: str, path: str) -> int:
        local = len(self.slots)
        self.slots.append(Slot(local, parent, depth, kind, path))
        self._children[parent].append(local)
        self._children[local] = []
        return local

    @property
    def size(self) -> int:
        return len(self.slots)

    def children(self, local_id: int) -> list[Slot]:
        return [self.slots[c] for c in self._children[local_id]]

    def branch_id(self, prompt_id: int, local_id: int) -> int:
        return prompt_id * self.size + local_id


def fork_positions(
    rule: str,
    k: int,
    start: int,
    entropies: np.ndarray,
    last_allowed: int,
    offsets: list[int],
) -> list[int]:
    """Positions at which to fork k children off a branch whose own tokens start at `start`.

    Candidates are the branch's own positions after its first one and at most `last_allowed` (so a
    child has room for min_child_tokens). 'entropy' takes the k candidates whose next-token
    distribution had the highest entropy (earlier wins ties); 'offsets' takes start + offset for the
    configured offsets. Returned sorted ascending.
    """
    last = min(start + len(entropies) - 1, last_allowed)
    candidates = np.arange(start + 1, last + 1)
    if k <= 0 or candidates.size == 0:
        return []
    if rule == "offsets":
        return [start + o for o in offsets if start + o <= last][:k]
    cand_entropy = np.nan_to_num(entropies[candidates - start], nan=-np.inf)
    order = np.lexsort((candidates, -cand_entropy))  # by entropy desc, then position asc
    return sorted(int(p) for p in candidates[order[:k]])
