"""Next-token choice and per-token statistics.

Each branch draws from its own stream of uniforms (seeded by run seed, prompt and branch, so the tree
does not depend on the order or batching of work), one uniform per step, and picks its token by inverse
CDF: the first token whose cumulative probability exceeds u times the total. A whole batch of rows is
sampled by one cumsum and one searchsorted, with no per-row kernel and no host round trip.
"""

from __future__ import annotations

import numpy as np
import torch

_BELOW_ONE = float(np.nextafter(np.float32(1), np.float32(0)))  # a float32 uniform never reaches 1


def branch_seed(seed: int, prompt_id: int, local_id: int) -> int:
    """A seed for one branch's sampler that does not depend on the order branches are built in."""
    return int(np.random.SeedSequence([seed, prompt_id, local_id]).generate_state(1, np.uint64)[0] >> 1)


def row_uniforms(seeds: list[int], steps: int, device: torch.device) -> torch.Tensor:
    """(rows, steps) float32 uniforms in [0, 1): row i's are the first `steps` draws of its seed's stream."""
    draws = np.stack([np.random.Generator(np.random.Philox(s)).random(steps) for s in seeds])  # (rows, steps)
    return torch.from_numpy(np.minimum(draws.astype(np.float32), _BELOW_ONE)).to(device)


def token_stats_tensors(
    logits: torch.Tensor, token_ids: torch.Tensor, chunk: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of token_ids[i] and entropy (nats) under softmax(logits[i]), at temperature 1,
    as fp32 tensors on the logits' device (no host sync).

    Chunked so a long prompt times a large vocabulary does not materialize at once in fp32.
    """
    logprobs, entropies = [], []
    for lo in range(0, logits.shape[0], chunk):
        logp = torch.log_softmax(logits[lo : lo + chunk].float(), dim=-1)  # (rows, vocab)
        entropies.append(_entropy(logp))
        logprobs.append(logp.gather(-1, token_ids[lo : lo + chunk, None].to(logp.device)).squeeze(-1))
    if not logprobs:
        empty = torch.empty(0, device=logits.device)
        return empty, empty
    return torch.cat(logprobs), torch.cat(entropies)


def token_stats(
    logits: torch.Tensor, token_ids: torch.Tensor, chunk: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """token_stats_tensors as float32 numpy arrays."""
    logprobs, entropies = token_stats_tensors(logits, token_ids, chunk)
    return logprobs.cpu().numpy().astype(np.float32), entropies.cpu().numpy().astype(np.float32)


def _entropy(logp: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy of each row of log-probabilities (rows, vocab) -> (rows,); 0 log 0 counts as 0. `p`:
    logp.exp() where the caller has it already."""
    p = logp.exp() if p is None else p
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


def sample_step(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    uniforms: torch.Tensor,
    exclude: list[int | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode step for a batch: the chosen ids (rows,) and their log-probability and the entropy of
    the row's next-token distribution (both at temperature 1, fp32), all on the logits' device.

    logits (rows, vocab); uniforms (rows,) this step's draw of each row. The temperature-1 log-softmax
    serves both the statistics and, at temperature 1 without top-k/top-p, the sampler itself.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (rows, vocab)
    probs = logp.exp()  # (rows, vocab), once for the entropy and the plain sampler
    excluding = exclude is not None and any(e is not None for e in exclude)
    # an exclusion (a fork's first token) goes the renormalizing way: the excluded token may hold all the mass
    if temperature == 1 and top_p >= 1.0 and not 0 < top_k < logits.shape[-1] and not excluding:
        chosen = _inverse_cdf(probs, uniforms)
    else:
        chosen = choose_rows(logits, temperature, top_k, top_p, uniforms, exclude)
    return chosen, logp.gather(-1, chosen[:, None]).squeeze(-1), _entropy(logp, probs)


def choose_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    u: float,
    exclude: int | None = None,
) -> int:
    """The token id one row of logits picks with uniform u in [0, 1); temperature 0 is greedy.
    `exclude` is never chosen."""
    uniforms = torch.tensor([min(u, _BELOW_ONE)], dtype=torch.float32, device=logits.device)
    return int(choose_rows(logits[None], temperature, top_k, top_p, uniforms, [exclude])[0])


def choose_rows(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    uniforms: torch.Tensor,
    exclude: list[int | None] | None = None,
) -> torch.Tensor:
    """One token id per row of logits (rows, vocab), row i picked by its uniform uniforms[i]; returns a
    (rows,) tensor on the logits' device. Temperature 0 is greedy; exclude[i] is never chosen by row i.

    top-k is applied first, then top-p on the renormalized top-k distribution (as in HF generate).
    The nucleus is found with growing top-k calls instead of sorting the whole vocabulary. A row's
    pick depends only on its logits and its uniform, so batching rows together changes nothing.
    """
    scores = logits.float()
    if exclude is not None and any(e is not None for e in exclude):
        rows = [i for i, e in enumerate(exclude) if e is not None]
        scores = scores.clone()
        scores[rows, [exclude[i] for i in rows]] = float("-inf")
    if temperature == 0:
        return scores.argmax(dim=-1)
    scores = scores / temperature
    n = scores.shape[-1]
    k = top_k if 0 < top_k < n else n
    if top_p >= 1.0 and k == n:
        return _inverse_cdf(torch.softmax(scores, dim=-1), uniforms)
    if k < n:
        head, index = torch.topk(scores, k, dim=-1)  # (rows, k), sorted descending
        probs = torch.softmax(head, dim=-1)
    else:
        full = torch.softmax(scores, dim=-1)
        size = min(256, n)
        while True:
            probs, index = torch.topk(full, size, dim=-1)
            if size == n or bool((probs.sum(dim=-1) >= top_p).all()):
                break
            size = min(size * 8, n)
    if top_p < 1.0:
        keep = (torch.cumsum(probs, dim=-1) - probs) < top_p  # smallest head with mass >= top_p
        probs = probs * keep
    return index.gather(-1, _inverse_cdf(probs, uniforms)[:, None]).squeeze(-1)


def _inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row of non-negative weights (rows, n), the first index whose cumulative weight exceeds
    uniforms[row] times the row's total: index i with probability weights[i] / total; a zero weight is
    never picked (its cumulative sum does not rise)."""
    cum = torch.cumsum(weights, dim=-1)  # (rows, n)
    total = cum[:, -1:]  # (rows, 1)
    # u * total can round up to total itself, which would land past the last token of non-zero weight
    target = torch.minimum(
        uniforms.to(cum.dtype)[:, None] * total, torch.nextafter(total, torch.zeros_like(total))
    )
    picks = torch.searchsorted(cum, target, right=True).squeeze(-1).clamp_(max=weights.shape[-1] - 1)
    if weights.device.type != "cpu":
        # a parallel scan (CUDA, MPS) can leave a zero weight's cumulative sum an ulp above its
        # neighbour's, so the search may land on it
        picks = step_back_from_zero(weights, picks)
    return picks


def step_back_from_zero(weights: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """Each row's pick (rows,), moved to the last index of non-zero weight at or below it (a pick of
    non-zero weight stays)."""
    index = torch.arange(weights.shape[-1], device=weights.device, dtype=torch.int32)
    allowed = (weights > 0) & (index <= picks[:, None])  # (rows, n)
    return torch.where(allowed, index, -1).amax(dim=-1).clamp_(min=0).long()
