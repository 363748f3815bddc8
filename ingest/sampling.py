"""Next-token choice and per-token statistics."""

from __future__ import annotations

import numpy as np
import torch


def branch_seed(seed: int, prompt_id: int, local_id: int) -> int:
    """A seed for one branch's sampler that does not depend on the order branches are built in."""
    return int(np.random.SeedSequence([seed, prompt_id, local_id]).generate_state(1, np.uint64)[0] >> 1)


def token_stats(logits: torch.Tensor, token_ids: torch.Tensor, chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Log-probability of token_ids[i] and entropy (nats) under softmax(logits[i]), at temperature 1.

    Chunked so a long prompt times a large vocabulary does not materialize at once in fp32.
    """
    logprobs, entropies = [], []
    for lo in range(0, logits.shape[0], chunk):
        logp = torch.log_softmax(logits[lo:lo + chunk].float(), dim=-1)
        p = logp.exp()
        entropies.append(-(torch.where(p > 0, p * logp, torch.zeros_like(p))).sum(-1))
        logprobs.append(logp.gather(-1, token_ids[lo:lo + chunk, None].to(logp.device)).squeeze(-1))
    if not logprobs:
        return np.empty(0, np.float32), np.empty(0, np.float32)
    return (torch.cat(logprobs).cpu().numpy().astype(np.float32),
            torch.cat(entropies).cpu().numpy().astype(np.float32))


def choose_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator,
    exclude: int | None = None,
) -> int:
    """Sample a token id from one row of logits; temperature 0 is greedy. `exclude` is never chosen.

    top-k is applied first, then top-p on the renormalized top-k distribution (as in HF generate).
    The nucleus is found with growing top-k calls instead of sorting the whole vocabulary.
    """
    scores = logits.float()
    if exclude is not None:
        scores = scores.clone()
        scores[exclude] = float("-inf")
    if temperature == 0:
        return int(scores.argmax())
    scores = scores / temperature
    n = scores.numel()
    k = top_k if 0 < top_k < n else n
    if top_p >= 1.0 and k == n:
        return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator))
    if k < n:
        head, index = torch.topk(scores, k)
        probs = torch.softmax(head, dim=-1)
    else:
        full = torch.softmax(scores, dim=-1)
        size = min(256, n)
        while True:
            probs, index = torch.topk(full, size)
            if size == n or float(probs.sum()) >= top_p:
                break
            size = min(size * 8, n)
    if top_p < 1.0:
        keep = (torch.cumsum(probs, dim=-1) - probs) < top_p  # smallest head with mass >= top_p
        probs, index = probs[keep], index[keep]
    return int(index[torch.multinomial(probs, 1, generator=generator)])
