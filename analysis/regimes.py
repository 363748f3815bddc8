"""Named synthetic regimes with known parts, from a generator independent of analysis.synthetic.

Where analysis.synthetic gives each branch a constant content vector, here content is a state that
drifts token by token (a stationary AR(1) walk): a fork copies its parent's state at the fork and then
drifts away, so siblings are alike just after they part, as real continuations are. A latent is

    x = position part (none, helix, weak linear, or a random table) + token_scale * E[token id]
        + content_scale * state + noise * eps

with E a fixed embedding per token id (Zipf-distributed ids). The parts are returned separately, so
every removal can be scored against exact subtraction of the true part (the oracle).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

from analysis.tokens import TokenSet

POSITION_KINDS = ("none", "helix", "linear", "random")


@dataclass(frozen=True)
class Regime:
    """The shape of a synthetic run and the size of each part (scales are per-dimension sds)."""

    name: str
    position: str = "helix"  # one of POSITION_KINDS
    pos_scale: float = 1.0
    token_scale: float = 0.0
    content_scale: float = 1.0
    noise: float = 0.5
    n_prompts: int = 6
    branches: int = 8  # per prompt, below its root: a third samples, the rest forks
    prompt_len: int = 6
    length: int = 60  # tokens after the prompt
    d: int = 64
    vocab: int = 300
    rho: float = 0.9  # the content walk's step-to-step correlation
    bos: bool = True  # position 0 is the same huge-norm token (an attention sink) in every prompt

    def __post_init__(self) -> None:
        if self.position not in POSITION_KINDS:
            raise ValueError(
                f"unknown position kind {self.position!r}; choose one of {', '.join(POSITION_KINDS)}"
            )
        if self.n_prompts < 1 or self.branches < 1 or self.length < 8 or self.d < 2:
            raise ValueError("a regime needs >= 1 prompt, >= 1 branch, length >= 8 and d >= 2")


REGIMES = {
    r.name: r
    for r in (
        Regime("no_position", position="none", pos_scale=0.0, token_scale=0.5),
        Regime("helix", position="helix", pos_scale=1.5, token_scale=0.5),
        Regime("weak_linear", position="linear", pos_scale=0.25, token_scale=1.0, content_scale=1.0),
        Regime("token_only", position="none", pos_scale=0.0, token_scale=1.5),
        Regime("random_table", position="random", pos_scale=0.5, token_scale=1.0),
        Regime("one_prompt_3", position="helix", pos_scale=1.5, n_prompts=1, branches=3),
        Regime("one_prompt_5", position="helix", pos_scale=1.5, n_prompts=1, branches=5),
        Regime("one_prompt_3_none", position="none", pos_scale=0.0, n_prompts=1, branches=3),
        Regime("one_prompt_5_none", position="none", pos_scale=0.0, n_prompts=1, branches=5),
    )
}


def position_table(kind: str, positions: int, d: int, scale: float, model_seed: int = 0) -> np.ndarray:
    """(positions, d) the positional part at each position, with a per-dimension sd of about `scale`
    over positions 1..positions-1: a smooth helix (two turns, a slow drift), one linear direction, or
    an unstructured random table."""
    t = np.arange(positions, dtype=np.float64)
    rng = np.random.default_rng(model_seed + 4241)
    if kind == "none" or scale == 0:
        return np.zeros((positions, d))
    if kind == "helix":
        F = np.stack(
            [
                np.cos(2 * np.pi * t / 70),
                np.sin(2 * np.pi * t / 70),
                np.cos(2 * np.pi * t / 19),
                np.sin(2 * np.pi * t / 19),
                np.log1p(t) - np.log1p(t).mean(),
            ],
            1,
        )
        table = F @ rng.normal(size=(F.shape[1], d))
    elif kind == "linear":
        u = rng.normal(size=d)
        table = np.outer((t - t.mean()) / t.std(), u / np.linalg.norm(u) * np.sqrt(d))
    else:
        table = rng.normal(size=(positions, d))
    table -= table[1:].mean(axis=0)
    return scale * table / np.sqrt((table[1:] ** 2).mean())


@dataclass
class RegimeRun:
    """A generated run: the tokens (extra: token_id, parent, depth, is_sink) and each true part (n, d)."""

    tokens: TokenSet
    parts: dict[str, np.ndarray]
    regime: Regime
    seed: int

    def exact(self, remove: tuple[str, ...] = ("position",)) -> TokenSet:
        """The oracle: the tokens with the true parts named in `remove` subtracted exactly."""
        X = self.tokens.X - sum(self.parts[p] for p in remove)
        return self.tokens.with_X(X.astype(np.float32))

    def settings(self) -> dict:
        return asdict(self.regime) | {"seed": self.seed}


def generate(regime: Regime | str, seed: int = 0, model_seed: int = 0, **overrides) -> RegimeRun:
    """One run of a regime (by name or Regime), `overrides` replacing its fields. Branch ids are
    prompt * (branches + 1) + index, the root first; each token is stored once (a fork holds only its own)."""
    regime = REGIMES[regime] if isinstance(regime, str) else regime
    regime = replace(regime, **overrides) if overrides else regime
    r = regime
    rng = np.random.default_rng(seed)
    model = np.random.default_rng(model_seed + 77)
    emb = model.normal(size=(r.vocab, r.d))
    zipf = 1.0 / (np.arange(r.vocab - 1) + 2.7) ** 1.07
    zipf /= zipf.sum()
    sink = model.normal(size=r.d)
    sink *= (
        20 * np.sqrt(r.d) * (r.pos_scale + r.token_scale + r.content_scale + r.noise) / np.linalg.norm(sink)
    )
    last = r.prompt_len + r.length - 1
    table = position_table(r.position, last + 1, r.d, r.pos_scale, model_seed)
    innov = np.sqrt(1 - r.rho**2)

    rows_pos, rows_branch, rows_prompt, rows_tok, rows_state, rows_parent, rows_depth = (
        [],
        [],
        [],
        [],
        [],
        [],
        [],
    )

    def walk(start_state: np.ndarray, n: int) -> np.ndarray:
        out = np.empty((n, r.d))
        s = start_state
        for i in range(n):
            s = r.rho * s + innov * rng.normal(size=r.d)
            out[i] = s
        return out

    def emit(positions, branch, prompt, states, parent, depth):
        ids = 1 + rng.choice(r.vocab - 1, size=len(positions), p=zipf)
        if r.bos:
            ids[positions == 0] = 0
        rows_pos.append(positions), rows_tok.append(ids), rows_state.append(states)
        (
            rows_branch.append(np.full(len(positions), branch)),
            rows_prompt.append(np.full(len(positions), prompt)),
        )
        rows_parent.append(np.full(len(positions), parent)), rows_depth.append(np.full(len(positions), depth))

    stride = r.branches + 1
    for q in range(r.n_prompts):
        root = q * stride
        root_states = walk(rng.normal(size=r.d), r.prompt_len)
        emit(np.arange(r.prompt_len), root, q, root_states, -1, 0)
        spans = []  # (branch id, first position, states (n, d), depth)
        n_samples = max(1, -(-r.branches // 3))
        for i in range(r.branches):
            bid = root + 1 + i
            if i < n_samples or not spans:
                states = walk(root_states[-1], r.length)
                first, parent, depth = r.prompt_len, root, 1
            else:
                parent, p_first, p_states, p_depth = spans[int(rng.integers(len(spans)))]
                at = int(rng.integers(p_first + 1, max(p_first + 2, last - 3)))
                states = walk(p_states[at - 1 - p_first], last - at + 1)
                first, depth = at, p_depth + 1
            spans.append((bid, first, states, depth))
            emit(np.arange(first, first + len(states)), bid, q, states, parent, depth)

    position = np.concatenate(rows_pos)
    ids = np.concatenate(rows_tok)
    parts = {
        "position": table[position],
        "token": r.token_scale * emb[ids],
        "content": r.content_scale * np.concatenate(rows_state),
        "noise": r.noise * rng.normal(size=(len(position), r.d)),
    }
    X = sum(parts.values())
    is_sink = (position == 0) & r.bos
    if r.bos:  # the same latent for every prompt's first token (nothing precedes it)
        for k in parts:
            parts[k][is_sink] = 0.0
        parts["sink"] = np.where(is_sink[:, None], sink, 0.0)
        X[is_sink] = sink
    tokens = TokenSet(
        X.astype(np.float32),
        position,
        np.concatenate(rows_branch),
        np.concatenate(rows_prompt),
        {
            "token_id": ids,
            "parent": np.concatenate(rows_parent),
            "depth": np.concatenate(rows_depth),
            "is_sink": is_sink,
        },
    )
    return RegimeRun(tokens, {k: v.astype(np.float32) for k, v in parts.items()}, regime, seed)
