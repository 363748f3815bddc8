"""Run configuration: defaults < config file (TOML/JSON) < command-line flags, validated in one place."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ingest.errors import IngestError
from store.connect import mode_kind
from store.records import is_run_name

DEFAULT_MODEL = "gemma-3-270m"
FORK_RULES = ("entropy", "offsets")
DTYPES = ("auto", "float32", "bfloat16", "float16")


# Bump when the same settings and seed would sample other tokens (so a resume never mixes two samplers).
# 2: batched nucleus sampling (zeros outside the nucleus instead of a compacted head).
# 3: inverse-CDF picks from per-branch Philox uniform streams (one batched search per step).
SAMPLER_VERSION = 3


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a .txt file (one per line, blank lines skipped) or a TOML/JSON file with `prompts`."""
    path = Path(path)
    if path.suffix.lower() in (".toml", ".json"):
        data = _read_structured(path)
        prompts = data.get("prompts")
        if prompts is None:
            raise IngestError(f"prompt file {path} has no 'prompts' list")
        return _check_prompts(prompts, str(path))
    try:
        text = read_whole(path, "prompt file").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise IngestError(f"cannot read prompt file {path}: {exc}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise IngestError(f"prompt file {path} holds no prompts (one per line expected)")
    return prompts


MAX_INPUT_BYTES = 64 * 2**20  # a prompt or config file is read whole


def read_whole(path: Path, what: str) -> bytes:
    """A regular file's bytes, at most MAX_INPUT_BYTES; IngestError otherwise. Opened without waiting and
    its type checked on the open file: `--prompts` on a FIFO hung, on /dev/zero grew to 21 GB."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise IngestError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise IngestError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise IngestError(f"{what} {path} is a {mode_kind(info.st_mode)}, not a regular file")
        if info.st_size > MAX_INPUT_BYTES:
            raise IngestError(
                f"{what} {path} is {info.st_size / 2**20:.0f} MB; at most "
                f"{MAX_INPUT_BYTES // 2**20} MB is read"
            )
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(MAX_INPUT_BYTES)
    except OSError as exc:
        raise IngestError(f"cannot read {what} {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _read_structured(path: Path) -> dict[str, Any]:
    raw = read_whole(path, "config file")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(raw.decode("utf-8"))
        else:
            data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
        raise IngestError(f"config file {path} is not valid {kind}: {exc}") from None
    except RecursionError:
        raise IngestError(f"config file {path} nests too deeply to be a run config") from None
    if not isinstance(data, dict):
        raise IngestError(f"config file {path} must hold a table of settings at the top level")
    return data


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a TOML or JSON run config; `prompts_file` is read relative to the config."""
    path = Path(path)
    if path.suffix.lower() not in (".toml", ".json"):
        raise IngestError(f"config file {path} must end in .toml or .json")
    data = _read_structured(path)
    unknown = sorted(set(data) - set(FIELD_NAMES) - {"prompts_file"})
    if unknown:
        raise IngestError(f"config file {path}: unknown setting(s) {', '.join(unknown)}")
    if "prompts_file" in data:
        if "prompts" in data:
            raise IngestError(f"config file {path}: give either 'prompts' or 'prompts_file', not both")
        prompts_path = Path(str(data.pop("prompts_file")))
        if not prompts_path.is_absolute():
            prompts_path = path.parent / prompts_path
        data["prompts"] = read_prompt_file(prompts_path)
    return data


def _check_prompts(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise IngestError(f"{where}: 'prompts' must be a list of strings")
    prompts = [p for p in value if p.strip()]
    if not prompts:
        raise IngestError(f"{where}: no prompts given (empty list or only blank prompts)")
    return prompts


def _int(name: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise IngestError(f"'{name}' must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise IngestError(f"'{name}' must be >= {minimum}, got {value}")
    return value


def _float(name: str, value: Any, low: float, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise IngestError(f"'{name}' must be a number, got {value!r}")
    if not math.isfinite(value):
        raise IngestError(f"'{name}' must be a finite number, got {value}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise IngestError(f"'{name}' must be {bound}, got {value}")
    return float(value)


def parse_layers(value: Any) -> str | list[int]:
    """'spread', 'all', a list of ints, or a comma-separated string of ints (negative counts from the end)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("spread", "all"):
            return text
        try:
            return [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise IngestError(
                f"'layers' must be 'spread', 'all' or integers like '0,6,-1', got {value!r}"
            ) from None
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return list(value)
    raise IngestError(f"'layers' must be 'spread', 'all' or a list of integers, got {value!r}")


def parse_offsets(text: str) -> list[int]:
    """The --fork-offsets flag's text, e.g. '4,8'."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise IngestError(f"--fork-offsets must be integers like 4,8, got {text!r}") from None


def setting(
    default: Any,
    help: str,
    *,
    output: bool = False,
    flag: str | None = None,
    parse: Callable[[str], Any] | None = None,
    choices: tuple[str, ...] | None = None,
    shown: str | None = None,
) -> Any:
    """Declare a run setting: its default and the help text of its flag (`--name-with-dashes`, or `flag`).

    output: the setting decides what is written, so the run hash covers it. A true/false setting's flag
    is a switch to the other value, and its help says what the switch does. parse: turns the flag's text
    into the value. shown: how docs and help show a default that is not a value (None)."""
    meta = dict(help=help, output=output, flag=flag, parse=parse, choices=choices, shown=shown)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    """Everything one ingest run needs: the one declaration of every setting, its default and its help
    (the CLI's flags are built from these; docs/ingest.md and examples/run.toml are checked against them)."""

    model: str = setting(
        DEFAULT_MODEL,
        "bundled alias (gemma-3-270m), local Hugging Face model directory, .gguf file or hub id",
        output=True,
    )
    prompts: list[str] = setting(
        [],
        "prompt file: .txt one prompt per line, or .toml/.json with 'prompts'; with "
        "neither this nor --config the demo runs",
        output=True,
        parse=read_prompt_file,
    )
    samples: int = setting(3, "continuations sampled from each prompt", output=True)
    forks: int = setting(2, "children forked off each branch (0 = none)", output=True)
    depth: int = setting(1, "levels of forking below the samples (2 = forks of forks)", output=True)
    fork_rule: str = setting(
        "entropy",
        "where to fork: the branch's highest-entropy tokens, or fixed offsets from its first token",
        output=True,
        choices=FORK_RULES,
    )
    fork_offsets: list[int] = setting(
        [4, 8], "offsets for --fork-rule offsets, e.g. 4,8", output=True, parse=parse_offsets
    )
    min_child_tokens: int = setting(4, "a fork leaves room for at least this many tokens", output=True)
    max_new_tokens: int = setting(32, "tokens generated after the prompt", output=True)
    temperature: float = setting(1.0, "sampling temperature; 0 = greedy", output=True)
    top_p: float = setting(1.0, "nucleus sampling mass (1.0 = off)", output=True)
    top_k: int = setting(0, "sample among the k most likely tokens (0 = off)", output=True)
    seed: int = setting(0, "same seed + settings + device = the same tree", output=True)
    stop_at_eos: bool = setting(
        True, "keep generating past end-of-sequence", output=True, flag="--ignore-eos"
    )
    layers: str | list[int] = setting(
        "spread",
        "'spread' (0, L/4, L/2, 3L/4, L), 'all', or a list like 0,6,-1 (0 = embeddings)",
        parse=parse_layers,
    )
    device: str = setting("auto", "auto (cuda if available, else mps, else cpu), cpu, cuda, cuda:N or mps")
    dtype: str = setting("auto", "auto = bf16 (else fp16) on GPU, fp32 on CPU", choices=DTYPES)
    store: str = setting("branchlens.duckdb", "the DuckDB store file to write")
    run_id: str | None = setting(None, "name of the run", shown="run-<hash>")
    zero_pe: bool = setting(
        False, "also store latents re-encoded with positional encoding neutralized (variant zero_pe)"
    )
    batch_rows: int = setting(
        64, "branches decoded together at most; lower it if GPU memory runs out (the tree stays the same)"
    )
    compact: bool = setting(
        True,
        "skip rewriting the store without free space at the end (see docs/ingest.md, 'Plan first, store size and the summary')",
        flag="--no-compact",
    )


SETTINGS = dataclasses.fields(RunConfig)
FIELD_NAMES = tuple(f.name for f in SETTINGS)
# Settings that change what is written; the run hash (and so resume) depends on these only.
OUTPUT_FIELDS = tuple(f.name for f in SETTINGS if f.metadata["output"])


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def default_text(f: dataclasses.Field) -> str:
    """A setting's default as docs and help show it: TOML spelling, strings bare."""
    value = default_of(f)
    if f.metadata["shown"] is not None:
        return f.metadata["shown"]
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def build_config(
    file_values: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None
) -> RunConfig:
    """Merge defaults, config-file values and flag overrides (None = not given), then validate."""
    merged: dict[str, Any] = dataclasses.asdict(RunConfig())
    for source in (file_values or {}, overrides or {}):
        merged.update({k: v for k, v in source.items() if v is not None})
    cfg = RunConfig(**merged)
    cfg.prompts = _check_prompts(cfg.prompts, "run config") if cfg.prompts else []
    if not isinstance(cfg.model, str) or not cfg.model.strip():
        raise IngestError("'model' must be a non-empty string")
    if not isinstance(cfg.store, str) or not cfg.store.strip() or "\0" in cfg.store:
        raise IngestError(f"'store' must be a file path (a non-empty string), got {cfg.store!r}")
    cfg.samples = _int("samples", cfg.samples, 1)
    cfg.forks = _int("forks", cfg.forks, 0)
    cfg.depth = _int("depth", cfg.depth, 0)
    cfg.min_child_tokens = _int("min_child_tokens", cfg.min_child_tokens, 1)
    cfg.max_new_tokens = _int("max_new_tokens", cfg.max_new_tokens, 1)
    cfg.top_k = _int("top_k", cfg.top_k, 0)
    cfg.seed = _int("seed", cfg.seed, 0)
    cfg.temperature = _float("temperature", cfg.temperature, 0.0)
    cfg.top_p = _float("top_p", cfg.top_p, 0.0, 1.0)
    if cfg.top_p == 0.0:
        raise IngestError("'top_p' must be > 0")
    if cfg.fork_rule not in FORK_RULES:
        raise IngestError(f"'fork_rule' must be one of {', '.join(FORK_RULES)}, got {cfg.fork_rule!r}")
    if not isinstance(cfg.fork_offsets, list) or not cfg.fork_offsets:
        raise IngestError("'fork_offsets' must be a non-empty list of integers >= 1")
    cfg.fork_offsets = sorted({_int("fork_offsets", v, 1) for v in cfg.fork_offsets})
    if not isinstance(cfg.stop_at_eos, bool):
        raise IngestError(f"'stop_at_eos' must be true or false, got {cfg.stop_at_eos!r}")
    for name in ("zero_pe", "compact"):
        if not isinstance(getattr(cfg, name), bool):
            raise IngestError(f"'{name}' must be true or false, got {getattr(cfg, name)!r}")
    cfg.batch_rows = _int("batch_rows", cfg.batch_rows, 1)
    cfg.layers = parse_layers(cfg.layers)
    if cfg.dtype not in DTYPES:
        raise IngestError(f"'dtype' must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    if not isinstance(cfg.device, str) or not cfg.device:
        raise IngestError(f"'device' must be a string like auto, cpu, cuda or cuda:1, got {cfg.device!r}")
    if cfg.run_id is not None and (not isinstance(cfg.run_id, str) or not cfg.run_id.strip()):
        raise IngestError("'run_id' must be a non-empty string")
    if cfg.run_id is not None and not is_run_name(cfg.run_id):
        raise IngestError(
            f"'run_id' must be a name: letters, digits, '.', '_' or '-', starting with a letter or "
            f"digit, at most 128 characters (it names the run's shard folder), got {cfg.run_id!r}"
        )
    return cfg


def resolve_layers(spec: str | list[int], n_layers: int) -> list[int]:
    """Layer numbers in 0..n_layers (0 = embedding output, n_layers = last block), sorted, unique."""
    if spec == "all":
        return list(range(n_layers + 1))
    if spec == "spread":
        return sorted({round(i * n_layers / 4) for i in range(5)})
    out = set()
    for layer in spec:
        resolved = layer + n_layers + 1 if layer < 0 else layer
        if not 0 <= resolved <= n_layers:
            raise IngestError(
                f"layer {layer} is out of range: this model has layers 0..{n_layers} "
                f"(0 = embeddings, {n_layers} = last block; negative counts from the end)"
            )
        out.add(resolved)
    return sorted(out)


def config_hash(resolved: dict[str, Any]) -> str:
    """A short hash of the settings that decide the output (plus resolved layers, device, dtype)."""
    keyed = {k: resolved[k] for k in (*OUTPUT_FIELDS, "layers", "device", "dtype")}
    keyed["sampler"] = SAMPLER_VERSION
    if keyed["fork_rule"] != "offsets":
        keyed.pop("fork_offsets")
    blob = json.dumps(keyed, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]
