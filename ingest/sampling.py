"""Next-token choice and per-token statistics."""

from __future__ import annotations

import numpy as np
import torch


def branch_seed(seed: int, prompt_id: int, local_id: int) -> int:
    """A seed for one branch's sampler that does not depend on the order branches are built in."""
    return int(np.random.SeedSequence([seed, prompt_id, local_id]).generate_state(1, np.uint64)[0] >> 1)


def token_stats_tensors(logits: torch.Tensor, token_ids: torch.Tensor,
                        chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of token_ids[i] and entropy (nats) under softmax(logits[i]), at temperature 1,
    as fp32 tensors on the logits' device (no host sync).

    Chunked so a long prompt times a large vocabulary does not materialize at once in fp32.
    """
    logprobs, entropies = [], []
    for lo in range(0, logits.shape[0], chunk):
        logp = torch.log_softmax(logits[lo:lo + chunk].float(), dim=-1)
        p = logp.exp()
        entropies.append(-(torch.where(p > 0, p * logp, torch.zeros_like(p))).sum(-1))
        logprobs.append(logp.gather(-1, token_ids[lo:lo + chunk, None].to(logp.device)).squeeze(-1))
    if not logprobs:
        empty = torch.empty(0, device=logits.device)
        return empty, empty
    return torch.cat(logprobs), torch.cat(entropies)


def token_stats(logits: torch.Tensor, token_ids: torch.Tensor, chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """token_stats_tensors as float32 numpy arrays."""
    logprobs, entropies = token_stats_tensors(logits, token_ids, chunk)
    return logprobs.cpu().numpy().astype(np.float32), entropies.cpu().numpy().astype(np.float32)


def choose_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator,
    exclude: int | None = None,
) -> int:
    """Sample a token id from one row of logits; temperature 0 is greedy. `exclude` is never chosen."""
    return int(choose_rows(logits[None], temperature, top_k, top_p, [generator], [exclude])[0])


def choose_rows(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generators: list[torch.Generator],
    exclude: list[int | None] | None = None,
) -> torch.Tensor:
    """Sample one token id per row of logits (rows, vocab), row i with its own generator; returns a
    (rows,) tensor on the logits' device. Temperature 0 is greedy; exclude[i] is never chosen by row i.

    top-k is applied first, then top-p on the renormalized top-k distribution (as in HF generate).
    The nucleus is found with growing top-k calls instead of sorting the whole vocabulary. A row's
    draw depends only on its logits and its generator, so batching rows together changes nothing.
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
        probs = torch.softmax(scores, dim=-1)
        return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])
    if k < n:
        head, index = torch.topk(scores, k, dim=-1)
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
    picks = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])
    return index.gather(-1, picks[:, None]).squeeze(-1)
