"""Ingest: generate trees of continuations with a causal LM and write token latents to the store."""
