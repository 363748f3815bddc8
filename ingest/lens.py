"""TransformerLens activations into a store (issue 33): run a TransformerLens model (a `TransformerBridge`,
or anything with `run_with_cache` and `blocks.<i>.hook_resid_*` hook points) over the sequences of a
tree, or hand over the caches you already have, and import the residual stream as a branchlens run.

    from ingest.lens import import_transformer_lens
    import_transformer_lens("mine.duckdb", model, [prompt + continuation_1, prompt + continuation_2, ...],
                            prompt_len=len(prompt))

Layer L is branchlens's layer numbering (Hugging Face's `hidden_states[L]`): layer 0 is
`blocks.0.hook_resid_pre` (token + position embedding), layer L >= 1 is `blocks.{L-1}.hook_resid_post`
(the output of block L - 1, before the final LayerNorm: where HF applies that norm to its last hidden
state, TransformerLens does not, so the last layer differs from HF's by that norm).

Sequences are whole (from position 0, the prompt first); those sharing a prefix become forks of one
another (store.exchange.from_sequences): a causal model computes the same latents for a shared prefix,
so each is stored once. TransformerLens itself is not a dependency of branchlens: this module only calls
the model you pass (`pip install transformer-lens`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from store.errors import StoreError

TL_PE_TYPES = {"standard": "learned_absolute", "rotary": "rope", "alibi": "alibi"}  # TL cfg -> store pe_type


def hook_name(layer: int) -> str:
    """The TransformerLens hook that holds branchlens layer `layer` (see the module docstring)."""
    return "blocks.0.hook_resid_pre" if layer == 0 else f"blocks.{layer - 1}.hook_resid_post"


def _ids(sequence: Any) -> list[int]:
    array = np.asarray(sequence.detach().cpu() if hasattr(sequence, "detach") else sequence)
    if array.ndim == 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 1 or len(array) == 0 or not np.issubdtype(array.dtype, np.integer):
        raise StoreError(
            f"a sequence must be a non-empty 1-D list of token ids, got shape {array.shape} of {array.dtype}"
        )
    return array.astype(np.int64).tolist()


def run_caches(model: Any, sequences: Sequence[Any], layers: Sequence[int]) -> list[dict[int, np.ndarray]]:
    """Per sequence: layer -> (len, d) float32 residual stream, from model.run_with_cache one sequence at
    a time (no padding, so no position shifts)."""
    import torch

    names = {hook_name(layer) for layer in layers}
    out = []
    with torch.no_grad():
        for seq in sequences:
            tokens = torch.tensor([_ids(seq)], dtype=torch.long)
            _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
            out.append({layer: cache[hook_name(layer)][0].detach().float().cpu().numpy() for layer in layers})
    return out


def lens_tables(
    sequences: Sequence[Any],
    caches: Sequence[Any],
    layers: Sequence[int],
    prompt_len: int | Sequence[int],
    prompt_ids: Sequence[int] | None = None,
    token_text: Callable[[int], str] = str,
) -> tuple[pl.DataFrame, dict[int, np.ndarray]]:
    """The exchange's whole-sequence table (prompt_id, sequence_id, position, token_id, token_text,
    is_prompt) and layer -> latents rows, from sequences and their caches (an ActivationCache, a dict
    hook name -> tensor, or layer -> array per sequence, batch dimension 1 or none). prompt_ids default:
    sequences with the same prompt tokens share one."""
    if len(caches) != len(sequences):
        raise StoreError(f"{len(sequences)} sequences but {len(caches)} caches")
    if not layers:
        raise StoreError("no layers to import")
    lens = [prompt_len] * len(sequences) if isinstance(prompt_len, int) else list(prompt_len)
    if len(lens) != len(sequences):
        raise StoreError(f"{len(sequences)} sequences but {len(lens)} prompt lengths")
    ids = [_ids(s) for s in sequences]
    if prompt_ids is None:
        seen: dict[tuple[int, ...], int] = {}
        prompt_ids = [seen.setdefault(tuple(i[:n]), len(seen)) for i, n in zip(ids, lens)]
    rows, arrays = [], {layer: [] for layer in layers}
    for s, (tok, n, cache, prompt) in enumerate(zip(ids, lens, caches, prompt_ids)):
        if not 0 < n <= len(tok):
            raise StoreError(f"sequence {s}: prompt length {n} outside 1..{len(tok)}")
        for layer in layers:
            array = _layer_of(cache, layer)
            if array.shape[0] != len(tok):
                raise StoreError(
                    f"sequence {s}: layer {layer} holds {array.shape[0]} positions, the sequence {len(tok)}"
                )
            arrays[layer].append(array)
        rows += [(int(prompt), s, p, t, token_text(t), p < n) for p, t in enumerate(tok)]
    table = pl.DataFrame(
        rows,
        schema={
            "prompt_id": pl.Int64,
            "sequence_id": pl.Int64,
            "position": pl.Int64,
            "token_id": pl.Int64,
            "token_text": pl.String,
            "is_prompt": pl.Boolean,
        },
        orient="row",
    )
    return table, {layer: np.concatenate(parts).astype(np.float32) for layer, parts in arrays.items()}


def _layer_of(cache: Any, layer: int) -> np.ndarray:
    """(len, d) float32 of one layer from a cache: layer -> array, or hook name -> (1, len, d) tensor."""
    value = cache[layer] if isinstance(cache, dict) and layer in cache else None
    if value is None:
        try:
            value = cache[hook_name(layer)]
        except KeyError:
            raise StoreError(f"the cache holds neither layer {layer} nor {hook_name(layer)}") from None
    array = np.asarray(value.detach().float().cpu() if hasattr(value, "detach") else value, dtype=np.float32)
    return array[0] if array.ndim == 3 and array.shape[0] == 1 else array


def import_transformer_lens(
    store: str | Path,
    model: Any,
    sequences: Sequence[Any],
    prompt_len: int | Sequence[int],
    layers: Sequence[int] | None = None,
    caches: Sequence[Any] | None = None,
    prompt_ids: Sequence[int] | None = None,
    run_id: str | None = None,
    model_name: str | None = None,
):
    """Run `model` over `sequences` (or take `caches`, one per sequence, from your own run_with_cache) and
    import layers (default all: 0..n_layers) as a run of `store`; returns store.exchange's ImportReport."""
    from store.exchange import import_tables

    cfg = getattr(model, "cfg", None)
    n_layers = int(getattr(cfg, "n_layers", 0)) or None
    if layers is None:
        if n_layers is None:
            raise StoreError("pass layers: the model's cfg does not say how many layers it has")
        layers = list(range(n_layers + 1))
    layers = sorted({int(layer) for layer in layers})
    if caches is None:
        caches = run_caches(model, sequences, layers)
    tokenizer = getattr(model, "tokenizer", None)
    text = (lambda t: tokenizer.decode([t])) if tokenizer is not None else str
    table, latents = lens_tables(sequences, caches, layers, prompt_len, prompt_ids, text)
    h = hashlib.sha256(table.write_ipc(None).getvalue())
    for layer in layers:
        h.update(latents[layer].tobytes())
    name = model_name or str(getattr(cfg, "model_name", None) or "transformer-lens")
    pe = TL_PE_TYPES.get(str(getattr(cfg, "positional_embedding_type", "")), "unknown")
    return import_tables(
        store,
        table,
        latents,
        h.hexdigest()[:16],
        run_id,
        name,
        pe,
        n_layers,
        "branchlens lens",
        sequences=True,
        origin={"from": "transformer-lens", "hooks": [hook_name(x) for x in layers]},
    )
