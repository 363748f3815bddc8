"""A set of token latents with their labels, and detection of attention-sink tokens."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from analysis.engine.groups import row_sq


@dataclass
class TokenSet:
    """Latents X (n, d) of n tokens with their position, branch and prompt; extra per-token columns ride along.

    Each token appears once (a child branch stores only its own tokens), so rows are independent samples.
    """

    X: np.ndarray
    position: np.ndarray
    branch: np.ndarray
    prompt: np.ndarray
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.X = np.asarray(self.X, dtype=np.float32)
        if self.X.ndim != 2:
            raise ValueError(f"X must be 2-D (tokens, dims), got shape {self.X.shape}")
        n = len(self.X)
        for name in ("position", "branch", "prompt"):
            arr = np.asarray(getattr(self, name))
            if arr.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
            setattr(self, name, arr.astype(np.int64, copy=False))
        for name, arr in self.extra.items():
            if len(arr) != n:
                raise ValueError(f"extra column {name!r} has {len(arr)} rows, expected {n}")

    def __len__(self) -> int:
        return len(self.X)

    @property
    def dim(self) -> int:
        return self.X.shape[1]

    def subset(self, mask: np.ndarray) -> TokenSet:
        """The tokens where mask is true (a boolean mask or an index array)."""
        return TokenSet(
            self.X[mask],
            self.position[mask],
            self.branch[mask],
            self.prompt[mask],
            {k: np.asarray(v)[mask] for k, v in self.extra.items()},
        )

    def with_X(self, X: np.ndarray) -> TokenSet:
        """The same tokens with other vectors (e.g. residuals)."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        kw["X"] = X
        return TokenSet(**kw)


def find_sinks(
    X: np.ndarray,
    position: np.ndarray,
    z: float = 6.0,
    include_first: bool = True,
    token_id: np.ndarray | None = None,
) -> np.ndarray:
    """Boolean mask of attention-sink tokens: a BOS at position 0, and any token whose norm is an outlier.

    In a causal model the latent at position 0 depends on the first token alone. Where the tokenizer adds
    a BOS every prompt starts with the same id, so those rows are copies of one vector (and often a
    massive activation): dropped. Where it adds none (GPT-2), position 0 holds each prompt's first word:
    kept unless its norm marks it. Without `token_id` (or with one position-0 token) position 0 counts as
    BOS when include_first. Massive activations sit on the first token and sometimes on the first '.' or
    newline, so position alone is not enough: a token is a sink when its log-norm lies more than z robust
    standard deviations (median absolute deviation) above the median.
    """
    X = np.asarray(X)
    position = np.asarray(position)
    first = position == 0
    if not include_first:
        mask = np.zeros(len(X), bool)
    elif token_id is not None and first.sum() >= 2:
        ids = np.asarray(token_id)[first]
        mask = first if (ids == ids[0]).all() else np.zeros(len(X), bool)
    else:
        mask = first
    if len(X) < 3:
        return mask
    lognorm = np.log(np.sqrt(row_sq(X)) + 1e-12)  # (n,)
    rest = lognorm[~mask] if (~mask).sum() >= 3 else lognorm
    med = np.median(rest)
    mad = 1.4826 * np.median(np.abs(rest - med))
    if mad <= 0:
        return mask
    return mask | ((lognorm - med) / mad > z)
