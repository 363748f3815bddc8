"""Where each model family keeps its positional information, and how to neutralize it (the zero-PE what-if).

One adapter per family, the only place that knows these internals:
- learned absolute embeddings (GPT-2, GPT-Neo, OPT, BioGPT, GPT-BigCode): the position-embedding module's
  output is replaced by zeros, so every token gets the same (null) position vector;
- RoPE (Llama, Mistral, Qwen, Gemma, Phi-3, GPT-NeoX/Pythia, ...): every token gets position id 0, so
  queries and keys are all rotated by the same (zero) angle and attention no longer sees distance;
- ALiBi (BLOOM, MPT): the linear distance bias is replaced by zeros (slopes set to zero).
The causal mask stays in place: a token still sees only its prefix, and models can recover position
from that (e.g. by attending to the first token), so zero-PE latents are a what-if, not position-free.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ingest.errors import IngestError

LEARNED = {  # model_type -> attribute path of the position-embedding module
    "gpt2": "transformer.wpe",
    "gpt_neo": "transformer.wpe",
    "gpt_bigcode": "transformer.wpe",
    "opt": "model.decoder.embed_positions",
    "biogpt": "biogpt.embed_positions",
}
ROPE = {
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "gemma",
    "gemma2",
    "gemma3",
    "gemma3_text",
    "phi3",
    "gpt_neox",
    "olmo",
    "olmo2",
    "stablelm",
    "starcoder2",
    "granite",
    "cohere",
    "smollm3",
    "ministral",
}
# model_type -> what computes the ALiBi slopes or bias: a module-level function or a model method; where
# transformers versions differ, candidates separated by "|", the first one found is used (Bloom's forward
# calls _get_alibi_slopes in 5.25, its build_alibi_tensor method in 5.17)
ALIBI = {
    "bloom": "transformers.models.bloom.modeling_bloom:_get_alibi_slopes|build_alibi_tensor",
    "mpt": "build_mpt_alibi_tensor",
}


@dataclass(frozen=True)
class PositionAdapter:
    """How one family injects position; `neutralized()` turns it off for the forward passes inside."""

    family: str
    pe_type: str  # 'learned_absolute' | 'rope' | 'alibi' | 'unknown'
    detail: str = field(default="")

    @property
    def supported(self) -> bool:
        return self.pe_type != "unknown"

    def describe(self) -> str:
        return {
            "learned_absolute": "learned absolute position embeddings, added to the token embeddings",
            "rope": "RoPE: positions enter only through attention (rotated queries and keys)",
            "alibi": "ALiBi: positions enter only as a distance bias on attention scores",
        }.get(self.pe_type, f"unknown position encoding (model family '{self.family}')")

    def forward_kwargs(self, input_ids: torch.Tensor) -> dict:
        """Extra forward() arguments for a zero-PE pass over input_ids (batch, n).

        The explicit all-ones attention mask matters: without a mask or a cache, transformers reads
        position ids that do not count up as several packed sequences and would block attention
        between the tokens (each token its own "sequence").
        """
        kwargs = {"attention_mask": torch.ones_like(input_ids)}
        if self.pe_type == "rope":
            kwargs["position_ids"] = torch.zeros_like(input_ids)
        return kwargs

    def require(self) -> None:
        """Raise a clear error naming the family when zero-PE cannot be done for it."""
        if not self.supported:
            raise IngestError(
                f"zero-PE is not available for model family '{self.family}': branchlens does not know where it "
                f"keeps positions (supported: {', '.join(sorted({*LEARNED, *ROPE, *ALIBI}))})"
            )

    @contextlib.contextmanager
    def neutralized(self, model: torch.nn.Module) -> Iterator[None]:
        """Inside, forward passes of `model` (with forward_kwargs) carry no positional encoding."""
        self.require()
        if self.pe_type == "learned_absolute":
            module = _attr(model, self.detail)
            handle = module.register_forward_hook(lambda _m, _inp, out: torch.zeros_like(out))
            try:
                yield
            finally:
                handle.remove()
        elif self.pe_type == "alibi":
            with _zeroed(model, self.detail, self.family):
                yield
        else:
            yield


def adapter_for(config: object) -> PositionAdapter:
    """The adapter of a transformers config (by model_type); pe_type 'unknown' when the family is not known."""
    family = str(getattr(config, "model_type", "") or "unknown")
    if family in LEARNED:
        return PositionAdapter(family, "learned_absolute", LEARNED[family])
    if family in ALIBI or getattr(config, "alibi", False):
        return PositionAdapter(family, "alibi", ALIBI.get(family, "build_alibi_tensor"))
    rope_config = any(
        getattr(config, a, None) is not None
        for a in ("rope_parameters", "rope_theta", "rotary_dim", "rotary_pct")
    )
    if family in ROPE or rope_config:  # HF RoPE models take the rotation angles from position_ids
        return PositionAdapter(family, "rope")
    return PositionAdapter(family, "unknown")


@contextlib.contextmanager
def _zeroed(model: torch.nn.Module, target: str, family: str) -> Iterator[None]:
    """Make `target` return zeros of its usual shape: 'package.module:function' or a method name on the
    model's submodules, or several such candidates joined by '|' (the first one found)."""
    owners: list = []
    for candidate in target.split("|"):
        if ":" in candidate:
            module_name, name = candidate.split(":")
            module = importlib.import_module(module_name)
            owners = [module] if callable(getattr(module, name, None)) else []
        else:
            name = candidate
            owners = [m for m in model.modules() if callable(getattr(m, name, None))]
        if owners:
            break
    if not owners:
        raise IngestError(
            f"model family '{family}': none of {target.replace('|', ', ')} found to neutralize ALiBi"
        )
    originals = [(owner, getattr(owner, name), name in vars(owner)) for owner in owners]
    for owner, original, _ in originals:
        setattr(owner, name, lambda *a, _f=original, **k: torch.zeros_like(_f(*a, **k)))
    try:
        yield
    finally:
        for owner, original, own_attr in originals:
            if own_attr:
                setattr(owner, name, original)
            else:
                delattr(owner, name)  # back to the class's method


def _attr(obj: object, path: str) -> torch.nn.Module:
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj
