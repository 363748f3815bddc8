"""The zero-PE what-if: per-family adapters, re-encoding, storing as a variant, the separate command."""

from __future__ import annotations

import copy
import subprocess

import numpy as np
import pytest
import torch
from helpers import PYTHON, cli_env, ingest

from ingest.errors import IngestError
from ingest.models import load_model
from ingest.positions import PositionAdapter, adapter_for
from ingest.zero_pe import encode
from store.connect import reading


def stored(store, run_id, variant, layer):
    with reading(store) as con:
        rows = con.execute(
            "SELECT l.branch_id, l.position, l.vec FROM latents l WHERE run_id = ? AND variant = ? AND layer = ? "
            "ORDER BY 1, 2",
            [run_id, variant, layer],
        ).fetchall()
        seqs = {
            b: ids
            for b, ids in con.execute(
                "SELECT branch_id, list(token_id ORDER BY position) FROM branch_tokens WHERE run_id = ? GROUP BY 1",
                [run_id],
            ).fetchall()
        }
    return rows, seqs


def test_gpt2_zero_pe_equals_a_forward_pass_with_the_position_embedding_zeroed(tiny_cfg, model_dirs):
    cfg = tiny_cfg("gpt2", samples=2, forks=1, max_new_tokens=8, layers=[0, 1, 2], zero_pe=True)
    run_id = ingest(cfg).run_id
    lm = load_model(str(model_dirs["gpt2"]), torch.device("cpu"), torch.float32)
    manual = copy.deepcopy(lm.model)
    manual.transformer.wpe.weight.data.zero_()
    for layer in (0, 1, 2):
        rows, seqs = stored(cfg.store, run_id, "zero_pe", layer)
        normal_rows, _ = stored(cfg.store, run_id, "normal", layer)
        assert [r[:2] for r in rows] == [r[:2] for r in normal_rows]  # same tokens, once each
        for branch, position, vec in rows[::7]:
            with torch.no_grad():
                hidden = manual(torch.tensor([seqs[branch]]), output_hidden_states=True).hidden_states[layer]
            np.testing.assert_allclose(vec, hidden[0, position].numpy(), atol=1e-5)
        differs = [not np.allclose(a[2], b[2], atol=1e-4) for a, b in zip(rows, normal_rows)]
        assert any(differs)  # position embeddings did matter


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_rope_zero_pe_ignores_position_ids_normal_does_not(model_dirs, family):
    """With RoPE neutralized, a token's latent does not depend on which position ids the sequence gets
    (shifted start, or stretched spacing); normal latents depend on the spacing. (RoPE is relative, so
    normal latents are unchanged by a pure shift up to rounding.)"""
    lm = load_model(str(model_dirs[family]), torch.device("cpu"), torch.float32)
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48]])
    n = ids.shape[1]

    def run(position_ids, zero_pe):
        kwargs = {"position_ids": position_ids}
        with torch.no_grad():
            if zero_pe:
                with lm.positions.neutralized(lm.model):
                    kwargs = lm.positions.forward_kwargs(ids)
                    return lm.model(ids, output_hidden_states=True, **kwargs).hidden_states[-1][0]
            return lm.model(ids, output_hidden_states=True, **kwargs).hidden_states[-1][0]

    base = torch.arange(n)[None]
    shifted, stretched = base + 37, base * 3
    assert torch.allclose(run(base, True), run(shifted, True)) and torch.allclose(
        run(base, True), run(stretched, True)
    )
    assert not torch.allclose(run(base, False), run(stretched, False), atol=1e-3)
    assert not torch.allclose(run(base, False), run(base, True), atol=1e-3)
    np.testing.assert_allclose(
        encode(lm, ids[0].tolist(), [lm.n_layers])[0], run(base, True).numpy(), atol=1e-5
    )


def test_alibi_slopes_are_zeroed_for_bloom(tmp_path):
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)).eval()
    adapter = adapter_for(model.config)
    assert adapter.pe_type == "alibi" and adapter.supported
    from transformers.models.bloom import modeling_bloom

    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    slopes = getattr(modeling_bloom, "_get_alibi_slopes", None)  # transformers 5.25; 5.17 has another path
    with torch.no_grad():
        normal = model(ids, output_hidden_states=True).hidden_states[-1]
        with adapter.neutralized(model):
            if slopes is not None:
                assert torch.count_nonzero(modeling_bloom._get_alibi_slopes(4, torch.device("cpu"))) == 0
            zero = model(ids, output_hidden_states=True, **adapter.forward_kwargs(ids)).hidden_states[-1]
            # no position left: after the first block the last token has attended to a set of token
            # embeddings, so the order of the tokens before it is lost (deeper, each earlier state depends on
            # its own prefix, which the order changes)
            mixed = ids[:, [4, 2, 0, 3, 1, 5]]
            first = model(ids, output_hidden_states=True, **adapter.forward_kwargs(ids)).hidden_states[1]
            zero_mixed = model(
                mixed, output_hidden_states=True, **adapter.forward_kwargs(mixed)
            ).hidden_states[1]
        after = model(ids, output_hidden_states=True).hidden_states[-1]
        normal_first = model(ids, output_hidden_states=True).hidden_states[1]
        normal_mixed = model(mixed, output_hidden_states=True).hidden_states[1]
    if slopes is not None:
        assert torch.count_nonzero(modeling_bloom._get_alibi_slopes(4, torch.device("cpu"))) == 4  # restored
    assert not torch.allclose(normal, zero, atol=1e-4) and torch.equal(normal, after)
    torch.testing.assert_close(zero_mixed[0, -1], first[0, -1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(
        normal_mixed[0, -1], normal_first[0, -1], atol=1e-4
    )  # with ALiBi the order counts


def test_pe_types_and_a_clear_error_for_unknown_families(model_dirs):
    from transformers import AutoConfig

    kinds = {
        f: load_model(str(model_dirs[f]), torch.device("cpu"), torch.float32).pe_type
        for f in ("gpt2", "llama", "gemma3")
    }
    assert kinds == {"gpt2": "learned_absolute", "llama": "rope", "gemma3": "rope"}
    assert adapter_for(AutoConfig.for_model("opt")).detail == "model.decoder.embed_positions"
    unknown = PositionAdapter("mamba", "unknown")
    with pytest.raises(IngestError, match="zero-PE is not available for model family 'mamba'"):
        unknown.require()


def test_runs_table_says_how_positions_enter(tiny_cfg):
    cfg = tiny_cfg("llama", samples=1, forks=0, max_new_tokens=4)
    run_id = ingest(cfg).run_id
    with reading(cfg.store) as con:
        assert con.execute("SELECT pe_type FROM runs WHERE run_id = ?", [run_id]).fetchall()[0][0] == "rope"


def test_separate_command_adds_zero_pe_to_an_existing_run(tiny_cfg, tmp_path):
    cfg = tiny_cfg("llama", samples=2, forks=1, max_new_tokens=8, layers=[0, 2])
    run_id = ingest(cfg).run_id
    with reading(cfg.store) as con:
        before = con.execute("SELECT count(*) FROM latents WHERE variant = 'normal'").fetchall()[0][0]
        tokens_before = con.execute("SELECT count(*) FROM tokens").fetchall()[0][0]
    command = [PYTHON, "-m", "ingest.zero_pe", str(cfg.store), "--no-progress"]
    done = subprocess.run(command, env=cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "zero-PE latents added for 3 prompt(s)" in done.stdout and "RoPE" in done.stdout
    with reading(cfg.store) as con:
        counts = dict(con.execute("SELECT variant, count(*) FROM latents GROUP BY 1").fetchall())
        assert (
            con.execute("SELECT count(*) FROM tokens").fetchall()[0][0] == tokens_before
        )  # nothing regenerated
    assert counts == {"normal": before, "zero_pe": before}
    # Running it again adds nothing (every prompt has the variant).
    again = subprocess.run(command, env=cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "added for 0 prompt(s)" in again.stdout
    # Same latents as re-encoding during the ingest itself.
    inline = tiny_cfg(
        "llama", store="inline.duckdb", samples=2, forks=1, max_new_tokens=8, layers=[0, 2], zero_pe=True
    )
    ingest(inline)
    a, _ = stored(cfg.store, run_id, "zero_pe", 2)
    b, _ = stored(inline.store, run_id, "zero_pe", 2)
    assert [r[:2] for r in a] == [r[:2] for r in b]
    np.testing.assert_allclose(np.array([r[2] for r in a]), np.array([r[2] for r in b]), atol=1e-5)
    bad = subprocess.run(
        [PYTHON, "-m", "ingest.zero_pe", str(tmp_path / "none.duckdb")],
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        bad.returncode == 2
        and bad.stderr.strip().startswith("error:")
        and len(bad.stderr.strip().splitlines()) == 1
    )


def test_alibi_bias_is_zeroed_for_mpt():
    from transformers import MptConfig, MptForCausalLM

    torch.manual_seed(0)
    model = MptForCausalLM(MptConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=64, max_seq_len=16)).eval()
    adapter = adapter_for(model.config)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        normal = model(ids, output_hidden_states=True).hidden_states[-1]
        with adapter.neutralized(model):
            bias = model.transformer.build_mpt_alibi_tensor(4, 16)
            zero = model(ids, output_hidden_states=True, **adapter.forward_kwargs(ids)).hidden_states[-1]
        after = model(ids, output_hidden_states=True).hidden_states[-1]
    assert adapter.pe_type == "alibi" and torch.count_nonzero(bias) == 0
    assert "build_mpt_alibi_tensor" not in vars(model.transformer)  # the class method is back
    assert not torch.allclose(normal, zero, atol=1e-4) and torch.equal(normal, after)
