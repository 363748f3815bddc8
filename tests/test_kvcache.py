"""The KV-cache adapter (ingest.kvcache) on every cache kind the project meets: full dynamic layers (GPT-2,
learned positions; Llama, RoPE with grouped KV heads), hybrid sliding-window + full layers (Gemma 3) and
sliding-window layers only (Mistral). A fork batch assembled from cut parent rows must equal a fresh forward
pass over each child's own sequence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, DynamicCache, MistralConfig, MistralForCausalLM, StaticCache

from ingest import kvcache
from ingest.models import LoadedModel, load_model

KINDS = ("gpt2", "llama", "gemma3", "mistral")  # the fixtures' sliding windows are 8: 7 slots kept
PARENTS = [[5, 17, 42, 99, 7, 63], [11, 250, 3, 88]]  # two parent rows; the second is left-padded by 2


@pytest.fixture(scope="module")
def mistral_dir(model_dirs, tmp_path_factory) -> Path:
    """A tiny Mistral whose every layer has a sliding window, saved like the other fixtures."""
    path = tmp_path_factory.mktemp("tiny-mistral")
    torch.manual_seed(0)
    MistralForCausalLM(
        MistralConfig(
            vocab_size=320,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=8,
            max_position_embeddings=256,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    ).save_pretrained(path)
    AutoTokenizer.from_pretrained(model_dirs["llama"]).save_pretrained(path)
    return path


@pytest.fixture(params=KINDS)
def lm(request, model_dirs, mistral_dir) -> LoadedModel:
    where = mistral_dir if request.param == "mistral" else model_dirs[request.param]
    return load_model(str(where), torch.device("cpu"), torch.float32, log=lambda _m: None)


def prefill(lm: LoadedModel, rows: list[list[int]]):
    """The model's cache after a left-padded prefill of `rows`, with each row's padding."""
    mask, pad = kvcache.left_padding([len(r) for r in rows], lm.device)
    ids = torch.tensor([[0] * k + r for k, r in zip(pad, rows)])  # (rows, width)
    positions = torch.clamp(mask.cumsum(dim=1) - 1, min=0)  # (rows, width)
    with torch.no_grad():
        out = lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    return kvcache.returned(out), pad


def fresh(lm: LoadedModel, ids: list[int]):
    with torch.no_grad():
        return lm.model(input_ids=torch.tensor([ids]), use_cache=True, output_hidden_states=True)


def test_a_fork_batch_assembled_from_cut_rows_equals_fresh_forward_passes(lm):
    parents, pad = prefill(lm, PARENTS)
    assert kvcache.holds_all(parents, len(PARENTS[0]))
    # children: parent row, prefix length kept in the cache, then the token fed next
    children = [(0, 5), (1, 3), (0, 2), (1, 1)]
    cuts = [kvcache.RowCut(parents, row, pad[row], n) for row, n in children]
    cache = kvcache.assemble(cuts, lm.model.config)
    mask, child_pad = kvcache.left_padding([n for _, n in children], lm.device)
    assert child_pad == [0, 2, 3, 4]

    for c, (row, n) in enumerate(children):  # the assembled rows hold what a prefill of the prefix holds
        reference = kvcache.returned(fresh(lm, PARENTS[row][:n]))
        for got, want in zip(cache.layers, reference.layers):
            torch.testing.assert_close(got.keys[c, :, child_pad[c] :], want.keys[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got.values[c, :, child_pad[c] :], want.values[0], rtol=1e-5, atol=1e-5)

    feed = torch.tensor([[PARENTS[row][n]] for row, n in children])  # (rows, 1)
    mask = torch.cat([mask, mask.new_ones(len(children), 1)], dim=1)  # (rows, width + 1)
    positions = torch.tensor([[n] for _, n in children])  # (rows, 1)
    with torch.no_grad():
        out = lm.model(
            input_ids=feed,
            **{kvcache.cache_kwarg(lm.model): cache},
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            output_hidden_states=True,
        )
    for c, (row, n) in enumerate(children):
        want = fresh(lm, PARENTS[row][: n + 1])
        torch.testing.assert_close(out.logits[c, -1], want.logits[0, -1], rtol=1e-4, atol=1e-4)
        for got_h, want_h in zip(out.hidden_states, want.hidden_states):
            torch.testing.assert_close(got_h[c, -1], want_h[0, -1], rtol=1e-4, atol=1e-4)


def test_a_cache_is_cut_only_while_it_holds_every_slot(lm):
    long = list(range(10, 22))  # 12 tokens: past the fixtures' 8-token sliding windows
    cache, _ = prefill(lm, [long])
    sliding = any(getattr(layer, "is_sliding", False) for layer in cache.layers)
    assert kvcache.holds_all(cache, len(long)) is not sliding
    short, _ = prefill(lm, [long[:6]])
    assert kvcache.holds_all(short, 6) and not kvcache.holds_all(short, 7)
    static = StaticCache(config=lm.model.config, max_cache_len=16)
    assert not kvcache.holds_all(static, 0) and not kvcache.holds_all(None, 0)


def test_left_padding_and_repeated_rows():
    mask, pad = kvcache.left_padding([3, 1, 2], torch.device("cpu"))
    assert pad == [0, 2, 1]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    cache = DynamicCache()
    keys = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 1, 3, 4)  # (rows, heads, slots, head_dim)
    cache.update(keys, -keys, 0)
    kvcache.repeat_rows(cache, 3)
    assert [torch.equal(cache.layers[0].keys[i], keys[i // 3]) for i in range(6)] == [True] * 6
    assert torch.equal(cache.layers[0].values, -cache.layers[0].keys)
