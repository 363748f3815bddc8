"""Every run setting is declared once (ingest.config.RunConfig): the CLI's flags are built from it, and
docs/ingest.md's settings table and examples/run.toml are checked against it (as datasette's test_docs does)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ingest.cli import flag_of, overrides, parser
from ingest.config import FIELD_NAMES, SETTINGS, build_config, default_of, default_text
from ingest.errors import IngestError

ROOT = Path(__file__).resolve().parents[1]


def documented_settings() -> dict[str, str]:
    """setting -> its default as docs/ingest.md's settings table shows it (backticks dropped), in table order."""
    text = (ROOT / "docs" / "ingest.md").read_text(encoding="utf-8")
    table = text.split("| setting | default | meaning |", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines():
        if line.startswith("| `"):
            name, default = (cell.strip() for cell in line.strip("|").split("|")[:2])
            rows[name.strip("`")] = default.replace("`", "")
    return rows


def test_docs_table_names_every_setting_with_its_true_default():
    rows = documented_settings()
    assert list(rows) == list(FIELD_NAMES)  # every setting, nothing else, in declaration order
    wrong = {f.name: (rows[f.name], default_text(f)) for f in SETTINGS if rows[f.name] != default_text(f)}
    assert not wrong, f"docs/ingest.md default vs declared: {wrong}"


def test_example_config_names_every_setting_with_its_true_default():
    lines = (ROOT / "examples" / "run.toml").read_text(encoding="utf-8").splitlines()
    for f in SETTINGS:
        named = [line for line in lines if re.match(rf"#?\s*{f.name}\s*=", line)]
        assert named, f"examples/run.toml does not name {f.name}"
        assert any(f"(default {default_text(f)})" in line for line in named), (f.name, named)


def test_every_setting_has_a_flag_that_overrides_it(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\n")
    text = {
        "model": "m",
        "prompts": str(prompts),
        "layers": "0,-1",
        "fork_offsets": "9,3",
        "device": "cpu",
        "store": "s.duckdb",
        "run_id": "x",
    }
    argv = []
    for f in SETTINGS:
        default = default_of(f)
        if isinstance(default, bool):
            argv.append(flag_of(f))
        else:
            argv += [
                flag_of(f),
                f.metadata["choices"][-1]
                if f.metadata["choices"]
                else text.get(f.name, "0.5" if isinstance(default, float) else "7"),
            ]
    given = overrides(parser().parse_args(argv))
    assert set(given) == set(FIELD_NAMES)
    assert (
        given["prompts"] == ["one", "two"] and given["layers"] == [0, -1] and given["fork_offsets"] == [9, 3]
    )
    assert (given["stop_at_eos"], given["zero_pe"], given["compact"]) == (False, True, False)
    assert given["samples"] == 7 and given["temperature"] == 0.5 and given["dtype"] == "float16"
    cfg = build_config({"samples": 2, "seed": 3}, overrides(parser().parse_args(["--samples", "5"])))
    assert (cfg.samples, cfg.seed, cfg.forks) == (5, 3, 2)  # flag over file over default
    assert overrides(parser().parse_args([])) == {}


def test_a_malformed_flag_value_names_the_flag():
    with pytest.raises(IngestError, match="--fork-offsets must be integers like 4,8"):
        overrides(parser().parse_args(["--fork-offsets", "4,x"]))
