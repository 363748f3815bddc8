"""Helpers the tests share (imported as `from helpers import ...`; fixtures live in conftest.py): the tiny
models and tokenizer, the prompts, running the CLI in a subprocess, and reading back what a run wrote."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

CORPUS = [
    "The cat sat on the mat and looked at the moon.",
    "Branches of a story go apart at the tokens where the model is unsure.",
    "def add(a, b):\n    return a + b",
    "Position dominates content in the hidden states of small language models.",
    "0123456789 numbers, letters and punctuation: a b c d e f g h i j k l m n o p q r s t u v w x y z!",
]
PROMPTS = ["The cat sat on", "Branches go apart where", "def add(a, b):"]
VOCAB = 320


def build_tokenizer(add_bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def build_model(family: str):
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, **common)
        return GPT2LMHeadModel(cfg)
    if family == "llama":
        cfg = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **common,
        )
        return LlamaForCausalLM(cfg)
    if family == "gemma3":
        # A sliding window shorter than the sequences makes fork-prefix re-use fall back to recompute.
        cfg = Gemma3TextConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            sliding_window=8,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            max_position_embeddings=256,
            **common,
        )
        return Gemma3ForCausalLM(cfg)
    raise ValueError(family)


FAMILIES = ("gpt2", "llama", "gemma3")


def cli_env(tmp_path: Path) -> dict[str, str]:
    """Environment for running the CLI in a subprocess: offline, own cache, this checkout importable."""
    import os

    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        BRANCHLENS_CACHE=str(tmp_path / "cache"),
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )
    return env


PYTHON = sys.executable


def paused_ingest(command: list[str], tmp_path: Path, fault: str):
    """Start the ingest CLI with the fault hook pausing it at `fault` (PHASE:N) and return the process once
    it is paused there (a line on its stdin lets it go on); fails if it ends first."""
    import subprocess

    proc = subprocess.Popen(
        command,
        env=cli_env(tmp_path) | {"BRANCHLENS_FAULT": f"{fault}:pause"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    marker = f"fault: {fault.replace(':', ' ')} paused"
    for line in proc.stderr:
        if marker in line:
            return proc
    pytest.fail(f"the ingest ended before reaching {fault} (exit {proc.wait()})")


def ingest(cfg):
    """run_ingest without progress bars or log lines."""
    from ingest.run import run_ingest

    return run_ingest(cfg, progress=False, log=lambda _msg: None)


def dump(store, run_id: str) -> dict[str, list]:
    """Every row a run wrote (prompts, branches, tokens, latents), in a fixed order, for equality checks."""
    from store import reading

    with reading(store) as con:
        return dump_rows(con, run_id)


def dump_rows(con, run_id: str) -> dict[str, list]:
    """dump() on an open connection (a store file, or shards read in place)."""
    return {
        name: con.execute(
            f"SELECT * EXCLUDE (run_id) FROM {name} WHERE run_id = ? ORDER BY ALL", [run_id]
        ).fetchall()
        for name in ("prompts", "branches", "tokens")
    } | {
        "latents": con.execute(
            "SELECT branch_id, position, layer, variant, vec FROM latents WHERE run_id = ? "
            "ORDER BY branch_id, position, layer",
            [run_id],
        ).fetchall(),
    }


def app_elements(at, kind: str) -> list:
    """The elements of type `kind` (e.g. "vega_lite_chart", "bidi_component") an AppTest page holds."""

    def walk(node):
        children = getattr(node, "children", None)
        if isinstance(children, dict):
            for child in children.values():
                yield from walk(child)
        else:
            yield node

    return [el for el in walk(at.main) if getattr(el, "type", None) == kind]


def app_charts(at) -> list[tuple[dict, list]]:
    """Per Vega-Lite chart an AppTest page holds: its spec and its datasets as Arrow tables."""
    import json

    import pyarrow as pa

    return [
        (json.loads(el.proto.spec), [pa.ipc.open_stream(ds.data.data).read_all() for ds in el.proto.datasets])
        for el in app_elements(at, "vega_lite_chart")
    ]


ORACLE_WORDS = (
    "the cat sat on mat and looked at moon branches of a story go apart tokens where model is unsure "
    "def add return numbers letters position dominates content hidden states small language models"
).split()


def oracle_prompts(n: int, seed: int = 0) -> list[str]:
    """n prompts of 3-7 words from the tokenizer's corpus (distinct first words, so no BOS-like start)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(ORACLE_WORDS, size=int(rng.integers(3, 8)))) for _ in range(n)]


def gpt2_with_positions(kind: str, scale: float, d: int = 64, n_positions: int = 128, seed: int = 0):
    """A tiny random-init GPT-2 whose position table is known: 'random' (unstructured) or 'smooth' (a
    low-rank helix of two periods and a drift), with a mean row norm `scale` times the token embeddings'.
    Its layer 0 is exactly wte[token] + wpe[position]. Returns (model, wpe as numpy (n_positions, d))."""
    import numpy as np
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(
        GPT2Config(
            n_embd=d,
            n_layer=2,
            n_head=2,
            n_positions=n_positions,
            vocab_size=VOCAB,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    )
    rng = np.random.default_rng(seed + 5)
    if kind == "random":
        table = rng.normal(size=(n_positions, d))
    elif kind == "smooth":
        t = np.arange(n_positions)
        feats = np.stack(
            [
                np.cos(2 * np.pi * t / 60),
                np.sin(2 * np.pi * t / 60),
                np.cos(2 * np.pi * t / 17),
                np.sin(2 * np.pi * t / 17),
                t / n_positions,
            ],
            1,
        )
        table = feats @ rng.normal(size=(feats.shape[1], d))
    else:
        raise ValueError(kind)
    token_norm = float(model.transformer.wte.weight.detach().norm(dim=1).mean())
    table = table / np.linalg.norm(table, axis=1).mean() * token_norm * scale
    with torch.no_grad():
        model.transformer.wpe.weight.copy_(torch.tensor(table, dtype=torch.float32))
    return model, table.astype(np.float32)


def gpt2_layer0(kind: str, scale: float, workdir: Path):
    """(layer-0 TokenSet of an ingest on gpt2_with_positions(kind, scale), the true position table): 16
    prompts x 4 samples x 2 forks x 40 new tokens through the normal ingest and store, read back."""
    from ingest.config import build_config
    from store import queries, reading
    from views.service import to_token_set

    model, table = gpt2_with_positions(kind, scale)
    path = workdir / f"gpt2-{kind}-{scale}"
    model.save_pretrained(path / "model")
    build_tokenizer(add_bos=False).save_pretrained(path / "model")
    cfg = build_config(
        dict(
            model=str(path / "model"),
            prompts=oracle_prompts(16),
            samples=4,
            forks=2,
            depth=1,
            max_new_tokens=40,
            layers=[0],
            device="cpu",
            store=str(path / "s.duckdb"),
        )
    )
    ingest(cfg)
    with reading(cfg.store) as con:
        keys, X = queries.token_rows(con, queries.list_runs(con)["run_id"][0], 0)
    return to_token_set(keys, X), table


def table_error(tokens, result, table) -> float:
    """RMS distance between what a view's removal subtracted and the true position table (both about their
    means), over the true table's RMS: 0 = the exact table, 1 = nothing of it."""
    import numpy as np

    kept = tokens.subset(result.index)
    removed = (kept.X - kept.X.mean(axis=0)) - result.residual
    removed = removed - removed.mean(axis=0)
    true = table[kept.position] - table[kept.position].mean(axis=0)
    return float(np.sqrt(((removed - true) ** 2).sum() / (true**2).sum()))


def synthetic_store(path, prompts: int, branches: int, length: int, d: int):
    """A synthetic store (`python -m views synthetic`, known helix) written at path; returns path."""
    from views.__main__ import main

    assert (
        main(
            ["synthetic", str(path), "--prompts", str(prompts), "--branches", str(branches)]
            + ["--length", str(length), "--d", str(d)]
        )
        == 0
    )
    return path


def app_on(store, monkeypatch, tmp_path, timeout: int = 240):
    """The app (AppTest) opened on a store, with its own view cache and no kernel warm-up thread."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("BRANCHLENS_NO_WARMUP", "1")
    monkeypatch.setenv("BRANCHLENS_CACHE", str(tmp_path / "cache"))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=timeout)
    at.session_state["store_path"] = str(store)
    at.run()
    return at
