"""Layers shared by the drafts: RMSNorm, RoPE, SwiGLU and mask-explicit grouped-query attention (DESIGN.md §4)."""

from confu_lightning.nn.attention import KV, GQAttention, KVCache, additive_mask, attend
from confu_lightning.nn.layers import RMSNorm, RotaryEmbedding, SwiGLU, apply_rotary, rope_from_hf_config

__all__ = [
    "KV",
    "GQAttention",
    "KVCache",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
    "additive_mask",
    "apply_rotary",
    "attend",
    "rope_from_hf_config",
]
