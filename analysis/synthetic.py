"""Synthetic branch trees with a known positional and a known content component (tests and benchmarks)."""

from __future__ import annotations

import numpy as np

from analysis.tokens import TokenSet


def positional_curve(position: np.ndarray, d: int, scale: float, seed: int = 0) -> np.ndarray:
    """A smooth, low-rank curve in position: two helix turns and a slow log drift, embedded in d dims."""
    p = np.asarray(position, dtype=np.float64)
    feats = np.stack([
        np.cos(2 * np.pi * p / 80), np.sin(2 * np.pi * p / 80),
        np.cos(2 * np.pi * p / 23), np.sin(2 * np.pi * p / 23),
        np.log1p(p) / np.log(100.0),
    ], axis=1)
    basis = np.random.default_rng(seed + 7919).normal(size=(feats.shape[1], d)) / np.sqrt(d)
    return scale * np.sqrt(d) * feats @ basis


def branch_tree(
    n_prompts: int = 4, branches_per_prompt: int = 10, prompt_len: int = 6, length: int = 80, d: int = 64,
    pos_scale: float = 3.0, content_scale: float = 1.0, noise: float = 0.5, fork_share: float = 0.5,
    sinks: bool = True, seed: int = 0, model_seed: int = 0,
) -> TokenSet:
    """Tokens of n_prompts trees stored the way a store holds them (each token once).

    Each prompt has a root branch with the prompt tokens (positions 0..prompt_len-1; position 0 is a
    BOS attention sink with a norm ~30x the rest when `sinks`), then `branches_per_prompt` branches:
    samples from prompt_len on, and (fork_share of them) forks that start at a random position of an
    earlier branch. Branches end at random lengths, so late positions have few tokens.

    x = positional_curve(t) + prompt content + branch content + noise. Content is constant along a
    branch (a fork inherits its parent's plus its own), independent of position.
    The positional curve and the sink vector depend on model_seed only (the same "model" for trees of
    different seeds). extra holds 'pos_part' (the positional component), 'is_sink', 'parent' (-1 at roots) and 'depth'.
    """
    rng = np.random.default_rng(seed)
    unit = np.sqrt(d)
    sink_vec = np.random.default_rng(model_seed + 104729).normal(size=d)
    sink_vec *= 30 * (pos_scale + content_scale + noise) * unit / np.linalg.norm(sink_vec)
    rows: list[tuple[int, int, int, np.ndarray]] = []  # (position, branch, prompt, content)
    parent_of: dict[int, int] = {}
    depth_of: dict[int, int] = {}
    branch_id = 0
    for prompt in range(n_prompts):
        c_prompt = rng.normal(size=d) * content_scale
        root = branch_id
        parent_of[root], depth_of[root] = -1, 0
        branch_id += 1
        rows += [(t, root, prompt, c_prompt) for t in range(prompt_len)]
        spans: list[tuple[int, int, np.ndarray, int]] = []  # (start, end, content, id) of earlier branches
        for _ in range(branches_per_prompt):
            end = int(rng.integers(length // 2, length))
            c = c_prompt + rng.normal(size=d) * content_scale
            start, parent = prompt_len, root
            if spans and rng.random() < fork_share:
                p_start, p_end, p_content, parent = spans[int(rng.integers(len(spans)))]
                start = int(rng.integers(p_start + 1, max(p_start + 2, p_end)))
                c = p_content + rng.normal(size=d) * content_scale
            spans.append((start, end, c, branch_id))
            parent_of[branch_id], depth_of[branch_id] = parent, depth_of[parent] + 1
            rows += [(t, branch_id, prompt, c) for t in range(start, end + 1)]
            branch_id += 1
    position = np.array([r[0] for r in rows])
    content = np.stack([r[3] for r in rows])
    pos_part = positional_curve(position, d, pos_scale, model_seed)
    X = pos_part + content + rng.normal(size=content.shape) * noise
    is_sink = (position == 0) & sinks
    X[is_sink] = sink_vec + rng.normal(size=(int(is_sink.sum()), d)) * noise
    branch = np.array([r[1] for r in rows])
    return TokenSet(
        X.astype(np.float32), position, branch, np.array([r[2] for r in rows]),
        {"pos_part": pos_part.astype(np.float32), "is_sink": is_sink,
         "parent": np.array([parent_of[b] for b in branch]), "depth": np.array([depth_of[b] for b in branch])},
    )
