"""Speculative decoding: draft trees, verification and the engine (plain PyTorch, no Lightning)."""
