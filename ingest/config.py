"""Run configuration: defaults < config file (TOML/JSON) < command-line flags, validated in one place."""

from __future__ import annotations

import math

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ingest.errors import IngestError

DEFAULT_MODEL = "gemma-3-270m"
FORK_RULES = ("entropy", "offsets")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class RunConfig:
    """Everything one ingest run needs. See README 'Run config' for the meaning of each field."""

    model: str = DEFAULT_MODEL
    prompts: list[str] = field(default_factory=list)
    samples: int = 3
    forks: int = 2
    depth: int = 1
    fork_rule: str = "entropy"
    fork_offsets: list[int] = field(default_factory=lambda: [4, 8])
    min_child_tokens: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop_at_eos: bool = True
    layers: str | list[int] = "spread"
    device: str = "auto"
    dtype: str = "auto"
    store: str = "branchlens.duckdb"
    run_id: str | None = None
    zero_pe: bool = False  # also store latents re-encoded with positions neutralized (variant 'zero_pe')
    batch_rows: int = 64  # branches decoded together at most (GPU memory knob; does not change the tree)
    compact: bool = True  # rewrite the store without free space at the end of the run


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(RunConfig))
# Settings that change what is written; the run hash (and so resume) depends on these only.
OUTPUT_FIELDS = (
    "model", "prompts", "samples", "forks", "depth", "fork_rule", "fork_offsets", "min_child_tokens",
    "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop_at_eos",
)


# Bump when the same settings and seed would sample other tokens (so a resume never mixes two samplers).
# 2: batched nucleus sampling (zeros outside the nucleus instead of a compacted head).
SAMPLER_VERSION = 2


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
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise IngestError(f"prompt file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise IngestError(f"cannot read prompt file {path}: {exc}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise IngestError(f"prompt file {path} holds no prompts (one per line expected)")
    return prompts


def _read_structured(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise IngestError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise IngestError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(raw.decode("utf-8"))
        else:
            data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
        raise IngestError(f"config file {path} is not valid {kind}: {exc}") from None
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
            raise IngestError(f"'layers' must be 'spread', 'all' or integers like '0,6,-1', got {value!r}") from None
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    raise IngestError(f"'layers' must be 'spread', 'all' or a list of integers, got {value!r}")


def build_config(file_values: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Merge defaults, config-file values and flag overrides (None = not given), then validate."""
    merged: dict[str, Any] = dataclasses.asdict(RunConfig())
    for source in (file_values or {}, overrides or {}):
        merged.update({k: v for k, v in source.items() if v is not None})
    cfg = RunConfig(**merged)
    cfg.prompts = _check_prompts(cfg.prompts, "run config") if cfg.prompts else []
    if not isinstance(cfg.model, str) or not cfg.model.strip():
        raise IngestError("'model' must be a non-empty string")
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
