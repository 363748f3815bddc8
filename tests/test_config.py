"""Run config: precedence, validation, layer resolution and the run hash."""

from __future__ import annotations

import dataclasses

import pytest

from ingest.config import build_config, config_hash, load_config_file, read_prompt_file, resolve_layers
from ingest.errors import IngestError


def test_flags_beat_file_beat_defaults():
    cfg = build_config({"samples": 5, "forks": 1, "prompts": ["a"]}, {"samples": 2, "forks": None})
    assert (cfg.samples, cfg.forks, cfg.depth) == (2, 1, 1)


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\n  second  \n")
    assert read_prompt_file(txt) == ["first prompt", "second"]
    toml = tmp_path / "p.toml"
    toml.write_text('prompts = ["x", "y"]\n')
    assert read_prompt_file(toml) == ["x", "y"]
    config = tmp_path / "sub" / "run.json"
    config.parent.mkdir()
    config.write_text('{"prompts_file": "../p.txt", "seed": 3}')
    assert load_config_file(config) == {"prompts": ["first prompt", "second"], "seed": 3}


@pytest.mark.parametrize(
    "values, message",
    [
        ({"temperature": -1}, "'temperature' must be >= 0"),
        ({"top_p": 1.5}, "'top_p' must be in"),
        ({"fork_rule": "random"}, "'fork_rule' must be one of"),
        ({"layers": "middle"}, "'layers' must be"),
        ({"dtype": "int8"}, "'dtype' must be one of"),
        ({"samples": True}, "'samples' must be an integer"),
        ({"prompts": ["", " "]}, "no prompts given"),
    ],
)
def test_invalid_values_name_the_setting(values, message):
    with pytest.raises(IngestError, match=message.replace("(", r"\(")):
        build_config(values)


def test_layer_resolution():
    assert resolve_layers("spread", 18) == [0, 4, 9, 14, 18]
    assert resolve_layers("spread", 2) == [0, 1, 2]
    assert resolve_layers("all", 3) == [0, 1, 2, 3]
    assert resolve_layers([-1, 0, 0, 2], 4) == [0, 2, 4]
    with pytest.raises(IngestError, match="layer -6 is out of range"):
        resolve_layers([-6], 4)


def test_hash_depends_on_output_settings_only():
    base = dataclasses.asdict(build_config({"prompts": ["a"]})) | {
        "layers": [0, 1],
        "device": "cpu",
        "dtype": "float32",
    }
    same = base | {
        "store": "elsewhere.duckdb",
        "run_id": "x",
        "fork_offsets": [9],
    }  # offsets unused by 'entropy'
    assert config_hash(base) == config_hash(same)
    for change in ({"seed": 1}, {"layers": [0]}, {"device": "cuda"}, {"prompts": ["b"]}, {"top_p": 0.9}):
        assert config_hash(base | change) != config_hash(base), change


def test_the_run_hash_has_not_moved():
    """Resume finds a run by this hash: the same settings must keep giving it (docs/ingest.md's demo summary).
    It moves only on purpose: a new sampler (ingest.config.SAMPLER_VERSION, 3 since the inverse-CDF
    sampler) must not resume a run that an older one started."""
    from importlib.resources import files
    from pathlib import Path

    demo = build_config(load_config_file(Path(str(files("ingest").joinpath("demo.toml")))))
    resolved = dataclasses.asdict(demo) | {"layers": [0, 4, 9, 14, 18], "device": "cpu", "dtype": "float32"}
    assert config_hash(resolved) == "3a5d15bb1491"
    offsets = build_config({"prompts": ["a"], "fork_rule": "offsets", "fork_offsets": [3]})
    resolved = dataclasses.asdict(offsets) | {"layers": [0], "device": "cpu", "dtype": "float32"}
    assert config_hash(resolved) == "487e3a4e2b80"


def test_shipped_configs_are_valid():
    from importlib.resources import files
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    example = build_config(load_config_file(root / "examples" / "run.toml"))
    assert example.depth == 2 and example.layers == "all" and len(example.prompts) == 3
    demo = build_config(load_config_file(Path(str(files("ingest").joinpath("demo.toml")))))
    assert demo.model == "gemma-3-270m" and demo.store == "branchlens.duckdb" and len(demo.prompts) == 4
