"""Shared engine core: KV-cache format, block manager, attention ops, sampling, checkpoints, tokenizer."""
