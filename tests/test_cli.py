"""`python -m ingest` as a user runs it: flags over config, and bad input as one clear error line."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

import pytest
import tomli_w
from helpers import PROMPTS, PYTHON, cli_env, ingest

from store import reading


def cli(args, tmp_path, timeout=300):
    return subprocess.run(
        [PYTHON, "-m", "ingest", "--no-progress", *args],
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_config_file_with_flag_overrides(model_dirs, tmp_path):
    config = tmp_path / "run.toml"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The cat sat on\n\nBranches go apart where\n")
    config.write_text(
        tomli_w.dumps(
            dict(
                model=str(model_dirs["gpt2"]),
                prompts_file="prompts.txt",
                samples=3,
                forks=1,
                max_new_tokens=6,
                layers="all",
                device="cpu",
            )
        )
    )
    store = tmp_path / "out" / "cli.duckdb"
    result = cli(
        ["--config", str(config), "--samples", "2", "--store", str(store), "--run-id", "mine"], tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "run mine: complete" in result.stdout and "2 written" in result.stdout
    with reading(store) as con:
        config_json = json.loads(
            con.execute("SELECT config FROM runs WHERE run_id = 'mine'").fetchall()[0][0]
        )
        samples = con.execute("SELECT count(*) FROM branches WHERE kind = 'sample'").fetchall()[0][0]
        layers = con.execute("SELECT list(DISTINCT layer ORDER BY layer) FROM latents").fetchall()[0][0]
    assert config_json["samples"] == 2 and config_json["forks"] == 1  # flag beat the file; file beat defaults
    assert config_json["prompts"] == ["The cat sat on", "Branches go apart where"]
    assert samples == 2 * 2 and layers == [0, 1, 2]


@pytest.fixture(scope="module")
def existing_store(model_dirs, tmp_path_factory):
    """A store with one finished run, to check that bad input leaves it byte-for-byte alone."""
    from ingest.config import build_config

    path = tmp_path_factory.mktemp("existing") / "keep.duckdb"
    ingest(
        build_config(
            dict(
                model=str(model_dirs["llama"]),
                prompts=PROMPTS[:1],
                samples=1,
                forks=0,
                max_new_tokens=4,
                device="cpu",
                store=str(path),
            )
        )
    )
    return path


def bad_inputs(model_dirs, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    broken = tmp_path / "broken.toml"
    broken.write_text('model = "x"\nsamples = [1,\n')
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('prompts = ["a"]\nsampels = 3\n')
    wrong_type = tmp_path / "wrong.toml"
    wrong_type.write_text('prompts = ["a"]\nsamples = "three"\n')
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    fifo = tmp_path / "fifo.txt"
    if not fifo.exists():
        os.mkfifo(fifo)
    tiny = str(model_dirs["llama"])
    return {
        "unknown model": (
            ["--model", "nobody/no-such-model-xyz", "--prompts", str(tmp_path / "p.txt")],
            "cannot load model 'nobody/no-such-model-xyz'",
        ),
        "layer out of range": (["--model", tiny, "--layers", "0,99"], "layer 99 is out of range"),
        "empty prompt file": (["--model", tiny, "--prompts", str(empty)], "holds no prompts"),
        "missing prompt file": (["--model", tiny, "--prompts", str(tmp_path / "nope.txt")], "does not exist"),
        "malformed config": (["--config", str(broken)], "is not valid TOML"),
        "unknown setting": (["--config", str(unknown)], "unknown setting(s) sampels"),
        "wrong type": (["--config", str(wrong_type)], "'samples' must be an integer"),
        "bad flag value": (["--model", tiny, "--samples", "0"], "'samples' must be >= 1"),
        "model path missing": (["--model", "./no/such/dir"], "model path ./no/such/dir does not exist"),
        "temperature nan": (
            ["--model", tiny, "--temperature", "nan"],
            "'temperature' must be a finite number",
        ),
        "temperature inf": (
            ["--model", tiny, "--temperature", "inf"],
            "'temperature' must be a finite number",
        ),
        "top-p nan": (["--model", tiny, "--top-p", "nan"], "'top_p' must be a finite number"),
        # it wrote run.json and a shard outside STORE.shards/
        "run id a path": (
            ["--model", tiny, "--run-id", "../../../escaped-run", "--workers", "1"],
            "'run_id' must be a name",
        ),
        # a FIFO hung in open(); /dev/zero grew to 21 GB until the kernel killed the process
        "prompts a fifo": (["--model", tiny, "--prompts", str(fifo)], "is a FIFO, not a regular file"),
        "prompts /dev/zero": (["--model", tiny, "--prompts", "/dev/zero"], "is a device, not a regular file"),
        # RecursionError and TypeError tracebacks
        "config nested 10^5 deep": (["--config", str(deep)], "nests too deeply to be a run config"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "unknown model",
        "layer out of range",
        "empty prompt file",
        "missing prompt file",
        "malformed config",
        "unknown setting",
        "wrong type",
        "bad flag value",
        "model path missing",
        "temperature nan",
        "temperature inf",
        "top-p nan",
        "run id a path",
        "prompts a fifo",
        "prompts /dev/zero",
        "config nested 10^5 deep",
    ],
)
def test_bad_input_is_one_clear_line_and_leaves_the_store_alone(case, model_dirs, existing_store, tmp_path):
    (tmp_path / "p.txt").write_text("The cat sat on\n")
    args, message = bad_inputs(model_dirs, tmp_path)[case]
    before = digest(existing_store)
    for store in (existing_store, tmp_path / "fresh.duckdb"):
        result = cli([*args, "--store", str(store), "--device", "cpu"], tmp_path)
        assert result.returncode == 2, (case, result.stdout, result.stderr)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], result.stderr
        assert "Traceback" not in result.stderr
    assert digest(existing_store) == before
    assert not (tmp_path / "fresh.duckdb").exists()
    assert not list(tmp_path.parent.parent.glob("**/escaped-run"))


def test_store_of_another_model_width_is_refused_before_writing(model_dirs, existing_store, tmp_path):
    before = digest(existing_store)
    (tmp_path / "p.txt").write_text("The cat sat on\n")
    bigger = tmp_path / "bigger"
    from helpers import build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=320,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).save_pretrained(bigger)
    build_tokenizer(add_bos=True).save_pretrained(bigger)
    result = cli(
        [
            "--model",
            str(bigger),
            "--prompts",
            str(tmp_path / "p.txt"),
            "--store",
            str(existing_store),
            "--device",
            "cpu",
        ],
        tmp_path,
    )
    assert result.returncode == 2
    assert "holds latents of width 32, this model's are 48" in result.stderr
    assert digest(existing_store) == before


def test_store_of_another_schema_version_fails_before_the_model_loads(tmp_path):
    import duckdb

    old = tmp_path / "old.duckdb"
    con = duckdb.connect(str(old))
    con.execute("CREATE TABLE meta (key VARCHAR, value VARCHAR)")
    con.execute("INSERT INTO meta VALUES ('schema_version', '0')")
    con.close()
    before = digest(old)
    (tmp_path / "p.txt").write_text("The cat sat on\n")
    # the model does not exist either: the store's error coming out shows the store is checked first
    result = cli(
        ["--model", "./no/such/model", "--prompts", str(tmp_path / "p.txt"), "--store", str(old)], tmp_path
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "schema version 0" in errors[0] and "loading model" not in result.stderr
    assert digest(old) == before


def test_dry_run_prints_the_plan_and_writes_nothing(model_dirs, existing_store, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The cat sat on\nBranches go apart where\n")
    fresh = tmp_path / "fresh.duckdb"
    args = [
        "--model",
        str(model_dirs["llama"]),
        "--prompts",
        str(prompts),
        "--samples",
        "2",
        "--forks",
        "2",
        "--max-new-tokens",
        "6",
        "--layers",
        "0,2",
        "--device",
        "cpu",
        "--dry-run",
    ]
    result = cli([*args, "--store", str(fresh)], tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "dry run run-" in out and "nothing written" in out
    assert "prompts   2 (" in out and "0 already in the store" in out
    assert "7 per prompt" in out and "14 in all" in out  # root + 2 samples + 2x2 forks
    assert "at most 72 generated" in out  # 2 prompts x 6 non-root branches x 6 tokens
    assert "layers    0, 2" in out and "min to generate" in out
    # both prompts decode together: their samples (2 x 2 rows), then their forks (2 x 4 rows), timed
    assert "4 rows took" in out and "8 rows took" in out
    assert not fresh.exists()
    before = digest(existing_store)
    again = cli([*args, "--zero-pe", "--store", str(existing_store)], tmp_path)
    assert again.returncode == 0 and "(normal and zero_pe variants)" in again.stdout
    assert digest(existing_store) == before
    # The dry run names the run id the real run will use.
    run = cli([*args[:-1], "--store", str(fresh)], tmp_path)
    assert run.returncode == 0 and out.split()[2] in run.stdout


def _damage(kind: str, good, tmp_path):
    """A copy of a good store, damaged one way (what the issue tried), or an unusable store name."""
    import duckdb

    if kind == "name too long":
        return tmp_path / ("a" * 300 + ".duckdb")
    if kind == "no room for the lock":
        return tmp_path / ("b" * 246 + ".duckdb")
    path = tmp_path / f"{kind.replace(' ', '_')}.duckdb"
    path.write_bytes(good.read_bytes())
    if kind == "truncated":
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
        return path
    with duckdb.connect(str(path)) as con:
        if kind == "wrong vector_dim":
            con.execute("UPDATE meta SET value = '640' WHERE key = 'vector_dim'")
            return path
        for view in ("branch_latents", "branch_tokens", "branch_lineage"):
            con.execute(f"DROP VIEW {view}")
        tables = (
            ["tokens"] if kind == "a table missing" else ["latents", "tokens", "branches", "prompts", "runs"]
        )
        for table in tables:
            con.execute(f"DROP TABLE {table}")
    return path


@pytest.mark.parametrize(
    "kind, message",
    [
        (
            "only meta",
            "is a damaged branchlens store: table(s) runs, prompts, branches, tokens, latents missing",
        ),
        ("a table missing", "is a damaged branchlens store: table(s) tokens missing"),
        ("truncated", "is damaged: the file has"),
        ("wrong vector_dim", "its meta says vector_dim '640', its latents column is FLOAT[32]"),
        ("name too long", "File name too long"),
        ("no room for the lock", "must leave 12 characters for '.ingest-lock'"),
    ],
)
def test_a_damaged_or_unusable_store_is_one_line_before_the_model_loads(
    kind, message, existing_store, tmp_path
):
    """Tried: tracebacks (CatalogException, ConversionException, OSError), a 'free space' hint for a truncated
    file after the model had loaded, a numpy reshape message for a wrong width. The model named here does not
    exist, so the store's line coming out shows the store is checked first; the store is left as it was,
    and `views report` says the same in one line."""
    store = _damage(kind, existing_store, tmp_path)
    exists = os.path.exists(store)  # False for a name the system cannot look up
    before = digest(store) if exists else None
    (tmp_path / "p.txt").write_text("The cat sat on\n")
    result = cli(
        ["--model", "./no/such/model", "--prompts", str(tmp_path / "p.txt"), "--store", str(store)], tmp_path
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert (digest(store) if exists else None) == before and os.path.exists(store) == exists
    if exists:
        report = subprocess.run(
            [PYTHON, "-m", "views", "report", str(store)],
            env=cli_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert report.returncode == 2 and report.stderr.strip().count("\n") == 0, report.stderr
        assert message in report.stderr and "Traceback" not in report.stderr


def test_a_store_named_through_a_link_to_no_file_yet_is_made_where_the_link_points(model_dirs, tmp_path):
    """Tried: the link counted as an existing name, the store was never made and DuckDB made an empty file at
    the target that blocked every later run. A link into a missing folder is one line, nothing made."""
    (tmp_path / "p.txt").write_text("The cat sat on\n")
    target, link = tmp_path / "disk" / "real.duckdb", tmp_path / "link.duckdb"
    target.parent.mkdir()
    link.symlink_to(target)
    args = [
        "--model",
        str(model_dirs["llama"]),
        "--prompts",
        str(tmp_path / "p.txt"),
        "--samples",
        "1",
        "--forks",
        "0",
        "--max-new-tokens",
        "3",
        "--device",
        "cpu",
        "--store",
        str(link),
    ]
    done = cli(args, tmp_path)
    assert done.returncode == 0, done.stderr
    assert link.is_symlink() and target.is_file()
    with reading(link) as con:
        assert con.execute("SELECT count(*) FROM prompts").fetchall() == [(1,)]
    nowhere = tmp_path / "nowhere.duckdb"
    nowhere.symlink_to(tmp_path / "missing-folder" / "x.duckdb")
    refused = cli([*args[:-1], str(nowhere)], tmp_path)
    assert refused.returncode == 2 and "whose folder does not exist" in refused.stderr, refused.stderr
    assert not (tmp_path / "missing-folder").exists()


def test_device_meta_is_refused_before_a_run_is_registered(model_dirs, tmp_path):
    """Tried: --device meta loaded the model, failed in generation with a traceback and left a 'running' run."""
    (tmp_path / "p.txt").write_text("The cat sat on\n")
    store = tmp_path / "meta.duckdb"
    result = cli(
        [
            "--model",
            str(model_dirs["llama"]),
            "--prompts",
            str(tmp_path / "p.txt"),
            "--device",
            "meta",
            "--store",
            str(store),
        ],
        tmp_path,
    )
    assert result.returncode == 2 and "device 'meta' cannot run a model for ingest" in result.stderr, (
        result.stderr
    )
    assert "Traceback" not in result.stderr and not store.exists()


def test_a_store_setting_that_is_no_path_is_one_line(tmp_path):
    """Tried: `store = 5` in a config gave a TypeError traceback; a NUL in it a ValueError one."""
    for value, shown in ((5, "got 5"), ("a\u0000b.duckdb", "got 'a\\x00b.duckdb'")):
        config = tmp_path / "run.json"
        config.write_text(json.dumps({"prompts": ["a"], "store": value}))
        result = cli(["--config", str(config)], tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip() == f"error: 'store' must be a file path (a non-empty string), {shown}"
