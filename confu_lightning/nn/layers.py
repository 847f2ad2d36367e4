"""Llama building blocks shared by the drafts: RMSNorm, rotary position embedding, SwiGLU MLP.

An EAGLE-3 draft layer is a Llama decoder layer (EAGLE-3 paper §3; research/anchors.md §0), so
these blocks reproduce Hugging Face's `LlamaRMSNorm`, `LlamaRotaryEmbedding` and `LlamaMLP`
numerically (tests compare them). RoPE settings come from a plain dict — the target's
`rope_parameters` (transformers >= 5) or its `rope_theta` + `rope_scaling` (older configs) — so a
draft records exactly what it was trained with and an exported checkpoint can tell a serving engine
(EAGLE's own trainer silently used base 10000 for a 500000-base target; anchors.md §1.1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from confu_lightning.errors import DraftError

ROPE_TYPES = ("default", "linear", "llama3")
"""RoPE variants implemented here (`rope_type` values of transformers' `rope_parameters`)."""


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32 and cast back, as `LlamaRMSNorm`.

    Shapes:
        x: (..., D). returns: (..., D) in x's dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_from_hf_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Normalise a Hugging Face config dict's RoPE settings into one flat `rope_parameters`-style dict.

    Accepts transformers-5 `rope_parameters` (which carries `rope_theta`) and the older top-level
    `rope_theta` + `rope_scaling` (with `type` or `rope_type`). Returns e.g.
    `{"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, ...}`.

    Raises:
        DraftError: an unsupported RoPE type or a per-layer-type RoPE dict.
    """
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if params and all(isinstance(v, Mapping) for v in params.values()):
        raise DraftError(f"per-layer-type rope_parameters {sorted(params)} are not supported by the draft")
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    theta = params.pop("rope_theta", None) or config.get("rope_theta") or 10000.0
    rope = {"rope_type": str(rope_type), "rope_theta": float(theta), **params}
    check_rope(rope)
    return rope


def check_rope(rope: Mapping[str, Any]) -> None:
    """Raise DraftError unless `rope` is a RoPE dict this module implements."""
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise DraftError(f"RoPE type {rope_type!r} is not supported by the draft (supported: {', '.join(ROPE_TYPES)})")
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise DraftError("partial_rotary_factor != 1 is not supported by the draft")
    needed = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                 "original_max_position_embeddings")}.get(rope_type, ())
    missing = [key for key in needed if key not in rope]
    if missing:
        raise DraftError(f"RoPE type {rope_type!r} needs {', '.join(missing)} in its parameters, got {dict(rope)}")


def rope_inv_freq(rope: Mapping[str, Any], head_dim: int) -> Tensor:
    """Inverse frequencies (head_dim/2,) float32 for `rope` (default, linear or Llama-3.1 scaling)."""
    check_rope(rope)
    theta = float(rope.get("rope_theta", 10000.0))
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    rope_type = rope.get("rope_type", "default")
    if rope_type == "linear":
        return inv_freq / float(rope["factor"])
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, rope)
    return inv_freq


def _llama3_inv_freq(inv_freq: Tensor, rope: Mapping[str, Any]) -> Tensor:
    """Llama-3.1 scaling: divide long wavelengths by `factor`, keep short ones, blend in between."""
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_ctx = float(rope["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for explicit position ids (any order, any gaps: tree and TTT positions).

    Shapes:
        position_ids: (B, T) int. returns: cos, sin (B, T, head_dim) float32.
    """

    def __init__(self, head_dim: int, rope: Mapping[str, Any]) -> None:
        super().__init__()
        self.rope = dict(rope)
        self.register_buffer("inv_freq", rope_inv_freq(rope, head_dim), persistent=False)

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim, the Llama/NeoX rotary layout."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate queries or keys.

    Shapes:
        x: (B, H, T, D). cos, sin: (B, T, D). returns: (B, H, T, D) in x's dtype.
    """
    cos = cos.unsqueeze(1).to(x.dtype)  # (B, 1, T, D)
    sin = sin.unsqueeze(1).to(x.dtype)
    return x * cos + rotate_half(x) * sin


class SwiGLU(nn.Module):
    """Llama MLP: down(silu(gate(x)) * up(x)).

    Shapes:
        x: (..., D). returns: (..., D).
    """

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
