"""TransformerLens activations into a store (issue 33, ingest.lens): a tiny TransformerLens model built from a
config (no download) run through the helper over the sequences of a tree; every stored latent equals the
model's own hook value at that token (captured here by run_with_hooks, not the helper's run_with_cache),
layer 0 is exactly W_E[token] + W_pos[position], and shared prefixes are stored once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import dump

from ingest.lens import import_transformer_lens, lens_tables
from store import StoreError

SEQUENCES = [
    [1, 2, 3, 4, 5, 6],
    [1, 2, 3, 4, 7, 8, 9],
    [1, 2, 3, 10],
    [1, 2, 3, 4, 5, 6, 11],
    [1, 2, 3, 4],
    [20, 21, 22, 23],
    [20, 21, 22, 24, 25],
]
PROMPT_LEN = 3
# branchlens layer L is HF's hidden_states[L]: the embeddings, then each block's output
HOOKS = {0: "blocks.0.hook_resid_pre", 1: "blocks.0.hook_resid_post", 2: "blocks.1.hook_resid_post"}


@pytest.fixture(scope="module")
def bridge():
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_native(
        dict(
            n_layers=2, d_model=16, n_ctx=32, d_head=4, n_heads=4, d_vocab=50, act_fn="relu", d_mlp=32, seed=0
        )
    )


def hooked(model, sequence: list[int], layers: list[int]) -> dict[int, np.ndarray]:
    """layer -> (len, d) captured by forward hooks on the model's own hook points."""
    got: dict[int, np.ndarray] = {}

    def keeper(layer):
        def keep(t, hook):  # returns None: a hook's return value would replace the activation
            got[layer] = t[0].detach().float().numpy().copy()

        return keep

    with torch.no_grad():
        model.run_with_hooks(torch.tensor([sequence]), fwd_hooks=[(HOOKS[x], keeper(x)) for x in layers])
    return got


def paths(dumped) -> dict[int, list[int]]:
    """branch id -> the token ids of its whole path from position 0 to its last token."""
    parent = {b[0]: (b[2], b[3]) for b in dumped["branches"]}
    own: dict[int, dict[int, int]] = {}
    for branch_id, position, token_id, *_ in dumped["tokens"]:
        own.setdefault(branch_id, {})[position] = token_id

    def path(b):
        p, fork = parent[b]
        head = path(p)[:fork] if p is not None else []
        return head + [own[b][t] for t in sorted(own[b])]

    return {b: path(b) for b in own}


def test_transformer_lens_latents_are_the_models_own_hook_values_stored_once_per_prefix(bridge, tmp_path):
    layers = [0, 1, 2]
    report = import_transformer_lens(tmp_path / "tl.duckdb", bridge, SEQUENCES, prompt_len=PROMPT_LEN)
    got = dump(tmp_path / "tl.duckdb", report.run_id)
    assert (
        report.layers == layers and report.prompts_written == 2
    )  # two prompts (their first three tokens differ)
    full = paths(got)
    truth = {tuple(s): hooked(bridge, s, layers) for s in SEQUENCES}
    prefixes = {(s[0], tuple(s[: t + 1])) for s in SEQUENCES for t in range(len(s))}
    assert len(got["tokens"]) == len(prefixes)  # each shared prefix once; [1, 2, 3, 4] adds nothing
    W_E, W_pos = bridge.W_E.detach().numpy(), bridge.W_pos.detach().numpy()
    worst = 0.0
    for branch_id, position, layer, variant, vec in got["latents"]:
        assert variant == "normal"
        prefix = full[branch_id][: position + 1]
        source = next(
            s for s in SEQUENCES if s[: position + 1] == prefix
        )  # causal: any sequence with this prefix
        worst = max(worst, float(np.abs(np.asarray(vec) - truth[tuple(source)][layer][position]).max()))
        if layer == 0:  # the oracle: token embedding + learned position embedding
            np.testing.assert_allclose(vec, W_E[prefix[-1]] + W_pos[position], atol=1e-5)
    print(f"\nlargest difference to the hooks: {worst:.2e}")
    assert worst < 1e-5
    runs = got["prompts"]
    assert [p[2] for p in runs] == [PROMPT_LEN, PROMPT_LEN]  # each prompt's length, from prompt_len


def test_the_run_record_names_the_model_its_positions_and_the_hooks(bridge, tmp_path):
    import duckdb

    report = import_transformer_lens(
        tmp_path / "tl.duckdb",
        bridge,
        SEQUENCES[:3],
        prompt_len=PROMPT_LEN,
        layers=[2, 0],
        model_name="tiny-tl",
    )
    con = duckdb.connect(str(tmp_path / "tl.duckdb"), read_only=True)
    model, pe, n_layers, config = con.execute(
        "SELECT model, pe_type, n_layers, config FROM runs WHERE run_id = ?", [report.run_id]
    ).fetchone()
    con.close()
    assert (model, pe, n_layers) == ("tiny-tl", "learned_absolute", 2)
    assert (
        '"blocks.0.hook_resid_pre"' in config
        and '"blocks.1.hook_resid_post"' in config
        and '"import"' in config
    )
    again = import_transformer_lens(
        tmp_path / "tl.duckdb",
        bridge,
        SEQUENCES[:3],
        prompt_len=PROMPT_LEN,
        layers=[0, 2],
        model_name="tiny-tl",
    )
    # the same content is the same run: it resumes and writes nothing
    assert again.run_id == report.run_id and again.prompts_written == 0 and again.prompts_before == 1


@pytest.mark.parametrize(
    "how, message",
    [
        ("short cache", "layer 1 holds 3 positions, the sequence 4"),
        ("missing layer", "the cache holds neither layer 2 nor blocks.1.hook_resid_post"),
        ("prompt too long", "prompt length 9 outside 1..4"),
        ("count", "2 sequences but 1 caches"),
    ],
)
def test_caches_that_do_not_fit_their_sequences_are_one_line(how, message):
    seqs = [[1, 2, 3, 4], [1, 2, 5, 6]]
    caches = [{0: np.zeros((4, 8)), 1: np.zeros((4, 8))} for _ in seqs]
    layers, plen = [0, 1], 2
    if how == "short cache":
        caches[1][1] = np.zeros((3, 8))
    elif how == "missing layer":
        layers = [0, 2]
    elif how == "prompt too long":
        plen = [2, 9]
    else:
        caches = caches[:1]
    with pytest.raises(StoreError) as err:
        lens_tables(seqs, caches, layers, plen)
    assert message in str(err.value) and "\n" not in str(err.value)
