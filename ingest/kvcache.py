"""KV-cache surgery for fork batches: the one module that knows transformers' cache classes.

A fork continues from its parent's cache row, cut at the fork position; a fork level decodes as one
left-padded batch assembled from such rows. Only layers that keep every past slot as plain tensors
(batch, heads, slots, head_dim) can be cut: `DynamicLayer`, and `DynamicSlidingWindowLayer` while its
window has dropped nothing yet. Anything else is refused (`holds_all`) and the caller recomputes.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

_CUTTABLE = (DynamicLayer, DynamicSlidingWindowLayer)  # exact types: subclasses may store other things


@dataclass(frozen=True)
class RowCut:
    """Positions 0 .. length-1 of row `row` of `cache`, whose position 0 sits in slot `start`."""

    cache: DynamicCache
    row: int
    start: int
    length: int


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name `model.forward` takes a cache by: `cache` from transformers 5.2x (`past_key_values` there
    warns on every call and goes in 5.40), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned(out) -> DynamicCache:
    """The cache a forward returned (`out.cache` in newer transformers, `out.past_key_values` before)."""
    return out["cache"] if "cache" in out else out.past_key_values


def repeat_rows(cache: DynamicCache, times: int) -> DynamicCache:
    """Each row repeated `times` times in place (rows, ...) -> (rows * times, ...); returns the cache."""
    cache.batch_repeat_interleave(times)
    return cache


def holds_all(cache: object, slots: int) -> bool:
    """Whether every layer of `cache` is one this module can cut and still holds all `slots` slots (a
    sliding-window layer past its window has dropped the oldest ones)."""
    layers = getattr(cache, "layers", None)
    return (
        isinstance(cache, DynamicCache)
        and bool(layers)
        and all(type(layer) in _CUTTABLE and layer.keys.shape[-2] == slots for layer in layers)
    )


def left_padding(lengths: list[int], device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """The attention mask of rows of these lengths padded on the left to the longest (rows, width; 0 =
    padding), and each row's padding."""
    width = max(lengths)
    pad = [width - n for n in lengths]
    mask = torch.zeros(len(lengths), width, dtype=torch.long, device=device)  # (rows, width)
    for r, k in enumerate(pad):
        mask[r, k:] = 1
    return mask, pad


def assemble(cuts: list[RowCut], config: PreTrainedConfig) -> DynamicCache:
    """A new cache of len(cuts) rows padded on the left to the longest cut (the padding of
    `left_padding`), row c holding cuts[c]'s positions in its last cuts[c].length slots: what a prefill
    of those prefixes with that padding leaves. Every cut must come from a cache that `holds_all`."""
    width = max(cut.length for cut in cuts)
    cache = DynamicCache(config=config)  # the model's own layer kinds (full, sliding window)
    if [type(layer) for layer in cache.layers] != [type(layer) for layer in cuts[0].cache.layers]:
        raise ValueError("the cut caches do not have the layer kinds of this model's cache")
    for li, layer in enumerate(cache.layers):
        like = cuts[0].cache.layers[li]
        keys = like.keys.new_zeros(
            (len(cuts), like.keys.shape[1], width, like.keys.shape[3])
        )  # (rows, heads, width, head_dim)
        values = like.values.new_zeros(
            (len(cuts), like.values.shape[1], width, like.values.shape[3])
        )  # (rows, heads, width, v_dim)
        for c, cut in enumerate(cuts):
            src = cut.cache.layers[li]
            span = slice(cut.start, cut.start + cut.length)
            keys[c, :, width - cut.length :] = src.keys[cut.row, :, span]  # (heads, length, head_dim)
            values[c, :, width - cut.length :] = src.values[cut.row, :, span]  # (heads, length, v_dim)
        layer.update(keys, values)  # a sliding-window layer keeps only its window, as after a prefill
    return cache
