"""Synthetic branch trees with a known positional and a known content component (tests and benchmarks)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from analysis.tokens import TokenSet


def positional_curve(position: np.ndarray, d: int, scale: float, seed: int = 0) -> np.ndarray:
    """A smooth, low-rank curve in position: two helix turns and a slow log drift, embedded in d dims."""
    p = np.asarray(position, dtype=np.float64)
    feats = np.stack(
        [
            np.cos(2 * np.pi * p / 80),
            np.sin(2 * np.pi * p / 80),
            np.cos(2 * np.pi * p / 23),
            np.sin(2 * np.pi * p / 23),
            np.log1p(p) / np.log(100.0),
        ],
        axis=1,
    )
    basis = np.random.default_rng(seed + 7919).normal(size=(feats.shape[1], d)) / np.sqrt(d)
    return scale * np.sqrt(d) * feats @ basis


def branch_tree(
    n_prompts: int = 4,
    branches_per_prompt: int = 10,
    prompt_len: int = 6,
    length: int = 80,
    d: int = 64,
    pos_scale: float = 3.0,
    content_scale: float = 1.0,
    noise: float = 0.5,
    fork_share: float = 0.5,
    sinks: bool = True,
    seed: int = 0,
    model_seed: int = 0,
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
        X.astype(np.float32),
        position,
        branch,
        np.array([r[2] for r in rows]),
        {
            "pos_part": pos_part.astype(np.float32),
            "is_sink": is_sink,
            "parent": np.array([parent_of[b] for b in branch]),
            "depth": np.array([depth_of[b] for b in branch]),
        },
    )


# --- A whole synthetic run: a made-up vocabulary, token ids, branch trees and several layers of known
# structure, shaped like what ingest stores (views.synthetic.write_helix_run writes it to a store). ---

HELIX_VERSION = 1  # bump when helix_run's output changes for the same settings (part of the resume key)


@dataclass(frozen=True)
class LayerMix:
    """What one synthetic layer holds: the per-dimension standard deviation of each component.

    token: a fixed embedding vector per token id; position: positional_curve (the helix), scaled to a
    per-dimension RMS of 1 over positions 1..128; branch: branch content (constant along a branch, a fork
    adds its own to its parent's); prompt: prompt content (shared by every token of a prompt); noise:
    fresh per token and layer. sink: the BOS latent's norm as a multiple of a typical token's norm
    (0 = the BOS is an ordinary token: its embedding plus the helix at position 0).
    """

    token: float = 0.0
    position: float = 0.0
    branch: float = 0.0
    prompt: float = 0.0
    noise: float = 0.0
    sink: float = 0.0
    note: str = ""

    def typical_norm(self, d: int) -> float:
        return math.sqrt(
            d * (self.token**2 + self.position**2 + self.branch**2 + self.prompt**2 + self.noise**2)
        )


HELIX_LAYERS: tuple[LayerMix, ...] = (
    LayerMix(
        token=1.0,
        noise=0.1,
        note="token identity only: a fixed vector per token id plus a little noise; no position, no "
        "content (like a RoPE model's layer 0, the token embeddings)",
    ),
    LayerMix(
        token=1.0,
        position=3.0,
        branch=0.3,
        prompt=0.3,
        noise=0.4,
        sink=25.0,
        note="a strong positional helix over token identity, weak branch and prompt content: one path "
        "ordered by position, the picture users complain about; after removal, token identity",
    ),
    LayerMix(
        token=0.4,
        position=3.5,
        branch=1.0,
        prompt=0.3,
        noise=0.4,
        sink=25.0,
        note="the helix over strong branch content: raw still one path ordered by position (branches "
        "at most parallel strands along it); removing position reveals the branches",
    ),
    LayerMix(
        token=0.4,
        position=0.5,
        branch=1.2,
        prompt=2.0,
        noise=0.4,
        sink=25.0,
        note="content dominated (prompt first, then branch), little position: removal changes little",
    ),
)


@dataclass
class SyntheticBranch:
    """One branch as ingest stores it: its own tokens (positions fork_position ..) and their latents."""

    branch_id: int
    prompt_id: int
    parent_branch_id: int | None
    fork_position: int
    depth: int
    kind: str  # 'prompt' | 'sample' | 'fork'
    path: str
    token_ids: np.ndarray  # (n,) int64
    logprobs: np.ndarray  # (n,) float32, NaN at position 0
    entropies: np.ndarray  # (n,) float32, NaN at position 0
    ended_with_eos: bool
    content: np.ndarray  # (d,) branch content before its layer weight (zeros for the prompt's root)
    latents: np.ndarray | None = None  # (n_layers, n, d) float32

    @property
    def positions(self) -> np.ndarray:
        return np.arange(self.fork_position, self.fork_position + len(self.token_ids))

    @property
    def end_position(self) -> int:
        return self.fork_position + len(self.token_ids) - 1


@dataclass
class SyntheticRun:
    """A whole synthetic run: vocabulary (token text by id), prompts with their trees, layers, truth.

    `truth[layer]` holds each component's share of that layer's variance over the non-BOS tokens as
    generated (the parts are nearly orthogonal, so the shares add up to about 1).
    """

    vocab: list[str]
    prompt_texts: list[str]
    prompt_lengths: list[int]  # tokens, BOS included
    branches: list[list[SyntheticBranch]]  # per prompt, root first
    layers: tuple[LayerMix, ...]
    truth: dict[int, dict[str, float]]
    settings: dict = field(default_factory=dict)

    def all_branches(self) -> list[SyntheticBranch]:
        return [b for tree in self.branches for b in tree]

    def token_set(self, layer: int) -> TokenSet:
        """The tokens of one layer as a TokenSet (extra: token_id, parent (-1 at roots), depth, is_sink)."""
        bs = self.all_branches()
        pos = np.concatenate([b.positions for b in bs])
        return TokenSet(
            np.concatenate([b.latents[layer] for b in bs]),
            pos,
            np.concatenate([np.full(len(b.token_ids), b.branch_id) for b in bs]),
            np.concatenate([np.full(len(b.token_ids), b.prompt_id) for b in bs]),
            {
                "token_id": np.concatenate([b.token_ids for b in bs]),
                "parent": np.concatenate(
                    [
                        np.full(len(b.token_ids), -1 if b.parent_branch_id is None else b.parent_branch_id)
                        for b in bs
                    ]
                ),
                "depth": np.concatenate([np.full(len(b.token_ids), b.depth) for b in bs]),
                "is_sink": (pos == 0) & (self.layers[layer].sink > 0),
            },
        )


_ONSETS = [
    "b",
    "br",
    "c",
    "ch",
    "d",
    "dr",
    "f",
    "fl",
    "g",
    "gl",
    "h",
    "k",
    "l",
    "m",
    "n",
    "p",
    "pl",
    "r",
    "s",
    "sh",
    "sk",
    "st",
    "t",
    "th",
    "tr",
    "v",
    "w",
    "z",
    "",
]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "y"]
_CODAS = ["", "", "", "n", "r", "s", "l", "m", "th", "st", "nd", "k"]
BOS_ID, EOS_ID = 0, 1  # the special tokens; words follow
_PARTS = ("token", "position", "branch", "prompt", "noise")
ZIPF_EXPONENT, ZIPF_OFFSET = 1.07, 2.7  # p(rank r) ~ (r + offset) ** -exponent (Zipf-Mandelbrot)


def synthetic_vocab(size: int = 400, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """(token text by id, frequency rank by id) for a made-up vocabulary of `size` tokens besides BOS/EOS.

    Ids 0 and 1 are '<bos>' and '<eos>'; the rest are ',', '.', a newline and pronounceable made-up
    words with a leading space, as a BPE tokenizer writes them. Shorter words get the more frequent ranks
    (Zipf's law of abbreviation); ids are shuffled against ranks, as in a real tokenizer. Rank 0 is the
    most frequent; the special tokens have rank -1.
    """
    if size < 16:
        raise ValueError("the synthetic vocabulary needs at least 16 tokens")
    rng = np.random.default_rng(seed + 271828)
    words: set[str] = set()
    while len(words) < size - 3:
        n_syl = int(rng.choice([1, 1, 2, 2, 2, 3]))
        w = "".join(str(rng.choice(_ONSETS)) + str(rng.choice(_VOWELS)) for _ in range(n_syl)) + str(
            rng.choice(_CODAS)
        )
        if 2 <= len(w) <= 10:
            words.add(" " + w)
    jitter = {w: rng.random() * 3 for w in sorted(words)}
    by_length = sorted(words, key=lambda w: (len(w) + jitter[w], w))
    ranked = [",", "."] + by_length[:6] + ["\n"] + by_length[6:]
    ids = rng.permutation(size) + 2
    vocab = ["<bos>", "<eos>"] + [""] * size
    rank = np.full(size + 2, -1, np.int64)
    for r, (word, i) in enumerate(zip(ranked, ids)):
        vocab[i] = word
        rank[i] = r
    return vocab, rank


class _Sampler:
    """Next-token draws from a Zipf distribution over the words whose sharpness varies per step (so the
    entropy varies, independently of position); logprob and entropy are those of that distribution."""

    def __init__(self, rank: np.ndarray, length: int, eos_rate: float, rng: np.random.Generator):
        self.word_ids = np.argsort(np.where(rank < 0, len(rank), rank))[: int((rank >= 0).sum())]
        r = np.arange(len(self.word_ids))
        self.base = -ZIPF_EXPONENT * np.log(r + ZIPF_OFFSET)
        # per-step hazard of EOS, so that a branch running `length` tokens ends early with p = eos_rate
        self.hazard = 1 - (1 - eos_rate) ** (1 / max(length, 1)) if eos_rate > 0 else 0.0
        self.rng = rng

    def draw(
        self, n: int, exclude: int | None = None, first_tau: float | None = None, eos_after: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool, np.ndarray]:
        """n tokens: (ids, logprobs, entropies, ended_with_eos, taus). `exclude` is a token id the first
        draw may not take (a fork re-samples its first token without its parent's); EOS may end the
        sequence from index `eos_after` on (None: no EOS, as in a prompt)."""
        rng = self.rng
        tau = np.exp(rng.normal(0.0, 0.35, size=n))
        if first_tau is not None:
            tau[0] = first_tau
        logits = self.base[None, :] / tau[:, None]
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        entropy = -(p * np.log(p)).sum(axis=1)
        q = p.copy()
        if exclude is not None:
            q[0, np.flatnonzero(self.word_ids == exclude)] = 0.0
            q[0] /= q[0].sum()
        cdf = np.cumsum(q, axis=1)
        u = rng.random(n)[:, None] * cdf[:, -1:]
        choice = np.minimum((cdf < u).sum(axis=1), len(self.word_ids) - 1)
        ids = self.word_ids[choice]
        logprob = np.log(p[np.arange(n), choice])
        stop = rng.random(n) < self.hazard
        if eos_after is None:
            stop[:] = False
        else:
            stop[:eos_after] = False
            logprob = logprob + np.log1p(-self.hazard)
        eos = bool(stop.any())
        if eos:
            end = int(np.argmax(stop))
            ids, logprob = ids[: end + 1].copy(), logprob[: end + 1].copy()
            entropy, tau = entropy[: end + 1], tau[: end + 1]
            ids[end] = EOS_ID
            logprob[end] = np.log(self.hazard)
        return ids.astype(np.int64), logprob.astype(np.float32), entropy.astype(np.float32), eos, tau


def helix_run(
    n_prompts: int = 8,
    branches_per_prompt: int = 12,
    length: int = 96,
    d: int = 128,
    layers: tuple[LayerMix, ...] = HELIX_LAYERS,
    seed: int = 0,
    model_seed: int = 0,
    vocab_size: int = 400,
    prompt_words: tuple[int, int] = (5, 14),
    samples: int | None = None,
    min_child_tokens: int = 4,
    eos_rate: float = 0.15,
) -> SyntheticRun:
    """A synthetic run shaped like an ingest: prompts of made-up words, trees of branches, latents per layer.

    Per prompt: a root branch holding BOS + the prompt's words, `samples` (default a third of the
    branches) continuing it for `length` tokens, then forks up to `branches_per_prompt` branches below
    the root. Each fork hangs off a random earlier sample or fork at that parent's highest-entropy own
    position (after its first) that leaves `min_child_tokens`, re-samples the token there without the
    parent's, and runs to the prompt's common last position, unless EOS ends it earlier (probability
    `eos_rate` over `length` tokens). Token ids are drawn from a Zipf distribution over the vocabulary,
    independently of position. Branch ids are prompt * (branches_per_prompt + 1) + index, root first.

    Layer l of a token with id v at position t on branch b of prompt q is
        token_l * E[v] + position_l * helix_l(t) + branch_l * C_b + prompt_l * P_q + noise_l * eps
    with E, helix_l and the sink vectors fixed by model_seed (the same "model" for every seed) and C, P,
    eps and the tokens drawn from seed. C is zero at the root, a fresh N(0, I) for a sample and
    C_parent + N(0, I) for a fork. The BOS latent (position 0) is the same for every prompt, as in a causal
    model, and where `sink` > 0 it is a fixed vector of `sink` times a typical token's norm.
    """
    if n_prompts < 1 or branches_per_prompt < 1 or length < min_child_tokens + 1 or d < 2:
        raise ValueError("helix_run needs >= 1 prompt, >= 1 branch, length > min_child_tokens and d >= 2")
    lo, hi = prompt_words
    if not 1 <= lo <= hi:
        raise ValueError("prompt_words must be (min, max) with 1 <= min <= max")
    if samples is None:
        samples = max(1, math.ceil(branches_per_prompt / 3))
    n_samples = min(branches_per_prompt, samples)
    vocab, rank = synthetic_vocab(vocab_size, model_seed)
    model = np.random.default_rng(model_seed + 314159)
    embed = model.normal(size=(len(vocab), d))
    ref = np.arange(1, 129)
    helix_norm, sinks = [], []
    for li in range(len(layers)):
        curve = positional_curve(ref, d, 1.0, model_seed + li)
        helix_norm.append(1.0 / np.sqrt((curve**2).mean()))
        s = model.normal(size=d)
        sinks.append(s / np.linalg.norm(s))
    rng = np.random.default_rng(seed)
    sampler = _Sampler(rank, length, eos_rate, rng)
    stride = branches_per_prompt + 1
    trees: list[list[SyntheticBranch]] = []
    texts: list[str] = []
    prompt_lengths: list[int] = []
    prompt_content = []
    for q in range(n_prompts):
        n_words = int(rng.integers(lo, hi + 1))
        while True:
            ids, lp, ent, _, _ = sampler.draw(n_words)
            if vocab[ids[0]].startswith(" "):  # a prompt starts with a word
                break
        text = "".join(vocab[i] for i in ids).strip()
        texts.append(text)
        prompt_ids = np.concatenate([[BOS_ID], ids])
        n_prompt = len(prompt_ids)
        prompt_lengths.append(n_prompt)
        last = n_prompt + length - 1
        prompt_content.append(rng.normal(size=d))
        nan = np.array([np.nan], np.float32)
        tree = [
            SyntheticBranch(
                q * stride,
                q,
                None,
                0,
                0,
                "prompt",
                "prompt",
                prompt_ids,
                np.concatenate([nan, lp]),
                np.concatenate([nan, ent]),
                False,
                np.zeros(d),
            )
        ]
        taus: dict[int, np.ndarray] = {}
        children: dict[int, int] = {}
        used: dict[int, set[int]] = {}
        for s in range(n_samples):
            ids, lp, ent, eos, tau = sampler.draw(length, eos_after=1)
            bid = q * stride + len(tree)
            tree.append(
                SyntheticBranch(
                    bid, q, q * stride, n_prompt, 1, "sample", f"s{s}", ids, lp, ent, eos, rng.normal(size=d)
                )
            )
            taus[bid] = tau
        for _ in range(branches_per_prompt - n_samples):
            options = []
            for parent in tree[1:]:
                own = parent.positions[1:]
                ok = (own <= last - min_child_tokens + 1) & ~np.isin(
                    own, list(used.get(parent.branch_id, ()))
                )
                if ok.any():
                    ents = np.where(ok, parent.entropies[1:], -np.inf)
                    options.append((parent, int(own[int(np.argmax(ents))])))
            if not options:
                break  # as in ingest: a planned fork that finds no valid position is absent
            parent, at = options[int(rng.integers(len(options)))]
            k = at - parent.fork_position
            ids, lp, ent, eos, tau = sampler.draw(
                last - at + 1,
                exclude=int(parent.token_ids[k]),
                first_tau=float(taus[parent.branch_id][k]),
                eos_after=min_child_tokens,
            )
            bid = q * stride + len(tree)
            j = children.get(parent.branch_id, 0)
            children[parent.branch_id] = j + 1
            used.setdefault(parent.branch_id, set()).add(at)
            tree.append(
                SyntheticBranch(
                    bid,
                    q,
                    parent.branch_id,
                    at,
                    parent.depth + 1,
                    "fork",
                    f"{parent.path}.f{j}",
                    ids,
                    lp,
                    ent,
                    eos,
                    parent.content + rng.normal(size=d),
                )
            )
            taus[bid] = tau
        trees.append(tree)

    # latents, one prompt at a time (bounded memory); truth from running sums over the non-BOS tokens
    stats = [{k: [0, 0.0, np.zeros(d)] for k in (*_PARTS, "total")} for _ in layers]
    for q, tree in enumerate(trees):
        sizes = [len(b.token_ids) for b in tree]
        pos = np.concatenate([b.positions for b in tree])
        parts = {
            "token": embed[np.concatenate([b.token_ids for b in tree])],
            "branch": np.concatenate([np.broadcast_to(b.content, (n, d)) for b, n in zip(tree, sizes)]),
            "prompt": np.broadcast_to(prompt_content[q], (len(pos), d)),
        }
        bos = pos == 0
        per_layer = []
        for li, mix in enumerate(layers):
            comp = {
                "token": mix.token * parts["token"],
                "position": mix.position * helix_norm[li] * positional_curve(pos, d, 1.0, model_seed + li),
                "branch": mix.branch * parts["branch"],
                "prompt": mix.prompt * parts["prompt"],
                "noise": mix.noise * rng.normal(size=(len(pos), d)),
            }
            X = sum(comp.values())
            # BOS: the same latent for every prompt (nothing comes before it in a causal model)
            X[bos] = (
                sinks[li] * mix.sink * mix.typical_norm(d)
                if mix.sink > 0
                else comp["token"][bos] + comp["position"][bos]
            )
            for k, v in (*comp.items(), ("total", X)):
                acc = stats[li][k]
                acc[0] += int((~bos).sum())
                acc[1] += float((v[~bos] ** 2).sum())
                acc[2] += v[~bos].sum(axis=0)
            per_layer.append(X.astype(np.float32))
        starts = np.cumsum([0] + sizes)
        for i, b in enumerate(tree):
            b.latents = np.stack([X[starts[i] : starts[i + 1]] for X in per_layer])
    truth: dict[int, dict[str, float]] = {}
    for li, acc in enumerate(stats):
        ss = {k: a[1] - float(a[2] @ a[2]) / max(a[0], 1) for k, a in acc.items()}
        truth[li] = {k: round(ss[k] / ss["total"], 4) if ss["total"] > 0 else 0.0 for k in _PARTS}
    settings = dict(
        n_prompts=n_prompts,
        branches_per_prompt=branches_per_prompt,
        length=length,
        d=d,
        seed=seed,
        model_seed=model_seed,
        vocab_size=vocab_size,
        prompt_words=list(prompt_words),
        samples=n_samples,
        min_child_tokens=min_child_tokens,
        eos_rate=eos_rate,
        layers=[asdict(m) for m in layers],
        version=HELIX_VERSION,
    )
    return SyntheticRun(vocab, texts, prompt_lengths, trees, tuple(layers), truth, settings)
