"""Fixtures: tiny random-init models with a locally trained tokenizer, saved to disk and loaded through the
same code path a user's model takes (ingest.models.load_model on a directory). Plain helpers are in
helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import FAMILIES, PROMPTS, build_model, build_tokenizer


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """family -> directory holding a saved tiny model and its tokenizer (GPT-2 without BOS, others with)."""
    out = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(f"tiny-{family}")
        build_model(family).save_pretrained(path)
        build_tokenizer(add_bos=family != "gpt2").save_pretrained(path)
        out[family] = path
    return out


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny_cfg(model_dirs, tmp_path):
    """A factory of small RunConfigs on a tiny model, writing to a store in tmp_path."""
    from ingest.config import build_config

    def make(family: str = "llama", store: str = "store.duckdb", **overrides):
        values = dict(model=str(model_dirs[family]), prompts=list(PROMPTS), samples=2, forks=2, depth=1,
                      max_new_tokens=12, layers=[0, 1, -1], device="cpu", store=str(tmp_path / store))
        values.update(overrides)
        return build_config(values)

    return make


