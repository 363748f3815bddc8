"""Ingest on a random-init model of real size: stored latents vs a fresh forward pass, and tokens/s.

Builds the model from a config (no weights to download) and a word-level tokenizer covering its whole
vocabulary, saves both to a temp dir and runs the normal ingest path on it. Use it to check the GPU
path and measure throughput:

    python bench/ingest_random_model.py --arch gemma3-270m --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ingest.config import build_config
from ingest.run import run_ingest
from store import reading
from store.queries import branch_sequence, branch_vectors, branches

ARCHS = {
    # Gemma 3 270M's shapes (RoPE, sliding windows of 512 in 5 of every 6 layers, 262k vocabulary)
    "gemma3-270m": (
        "gemma3",
        dict(
            vocab_size=262144,
            hidden_size=640,
            intermediate_size=2048,
            num_hidden_layers=18,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            sliding_window=512,
            max_position_embeddings=32768,
            query_pre_attn_scalar=256,
        ),
    ),
    # A Llama-style ~1.1B model (TinyLlama shapes)
    "llama-1b": (
        "llama",
        dict(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            max_position_embeddings=4096,
        ),
    ),
    # GPT-2 small's shapes (learned absolute positions)
    "gpt2-124m": ("gpt2", dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024)),
}


def build(arch: str, where: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    family, shape = ARCHS[arch]
    torch.manual_seed(0)
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    classes = {
        "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM),
        "llama": (LlamaConfig, LlamaForCausalLM),
        "gpt2": (GPT2Config, GPT2LMHeadModel),
    }
    config_cls, model_cls = classes[family]
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = model_cls(config_cls(**shape, **ids))
    model.save_pretrained(where)
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2} | {f"w{i}": i for i in range(3, shape.get("vocab_size", 0))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    ).save_pretrained(where)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=sorted(ARCHS), default="gemma3-270m")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--forks", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--check-branches", type=int, default=4, help="branches compared with a fresh forward pass"
    )
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, store = Path(tmp) / "model", Path(tmp) / "bench.duckdb"
        t0 = time.perf_counter()
        build(args.arch, model_dir)
        built = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        prompts = [" ".join(f"w{i}" for i in rng.integers(3, 30000, size=12)) for _ in range(args.prompts)]
        cfg = build_config(
            dict(
                model=str(model_dir),
                prompts=prompts,
                samples=args.samples,
                forks=args.forks,
                max_new_tokens=args.max_new_tokens,
                layers="spread",
                device=args.device,
                dtype=args.dtype,
                store=str(store),
                stop_at_eos=False,
            )
        )
        report = run_ingest(cfg, progress=False, log=lambda _m: None)

        from transformers import AutoModelForCausalLM

        dtype = getattr(torch, report.dtype)
        reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(report.device).eval()
        worst: dict[int, float] = {}
        with reading(store) as con:
            ids = branches(con, report.run_id)["branch_id"].to_list()
            for branch_id in ids[-args.check_branches :]:  # the last ones: forks, deepest prefix re-use
                seq = branch_sequence(con, report.run_id, branch_id)["token_id"].to_list()
                with torch.no_grad():
                    hidden = reference(
                        torch.tensor([seq], device=report.device), output_hidden_states=True
                    ).hidden_states
                for layer in report.layers:
                    got = branch_vectors(con, report.run_id, branch_id, layer)
                    want = hidden[layer][0].float().cpu().numpy()
                    rel = np.linalg.norm(got - want, axis=1) / np.maximum(np.linalg.norm(want, axis=1), 1e-12)
                    worst[layer] = max(worst.get(layer, 0.0), float(rel.max()))
        gpu = torch.cuda.get_device_name() if report.device.startswith("cuda") else None
        print(
            json.dumps(
                {
                    "arch": args.arch,
                    "device": report.device,
                    "gpu": gpu,
                    "dtype": report.dtype,
                    "torch": torch.__version__,
                    "build_s": round(built, 1),
                    "generated_tokens": report.generated_now,
                    "branches": report.counts["branches"],
                    "generate_s": round(report.seconds["generate"], 2),
                    "write_s": round(report.seconds["write"], 2),
                    "generated_tokens_per_s": round(report.generated_now / report.seconds["generate"], 1),
                    "prefix_reused": report.prefix_reused,
                    "prefix_recomputed": report.prefix_recomputed,
                    "max_relative_error_vs_fresh_forward_by_layer": {
                        k: round(v, 5) for k, v in sorted(worst.items())
                    },
                }
            )
        )


if __name__ == "__main__":
    main()
